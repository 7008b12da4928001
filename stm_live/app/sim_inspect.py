"""``stm-live sim inspect SESSION.nrec [--redact OUT.nrec]``: what a session recording holds.

Prints the release, the connections, and per command the calls, error replies and reply
times (median, max: request sent to the controller -> whole reply read back), then the
distinct error texts. ``--redact`` writes a copy without session and file paths and scan
comments (``cassette.REDACTED_FIELDS``), the copy a lab shares.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path

__all__ = ["main", "command_table"]


def command_table(recording) -> list[dict]:
    """Per command: name, calls, replies, errors, median_ms, max_ms; and error texts."""
    from stm_live.devices import protocol as P

    rows: dict[str, dict] = defaultdict(lambda: {"calls": 0, "errors": Counter(), "times": []})
    for pair in recording.pairs:
        row = rows[pair.name]
        row["calls"] += 1
        if pair.reply is None:
            continue
        row["times"].append(pair.reply_s)
        try:
            _, status, text = P.decode_response_body(pair.name, pair.reply[P.HEADER_SIZE:])
        except P.ProtocolError as exc:
            status, text = 1, f"unreadable reply: {exc}"
        if status:
            row["errors"][text] += 1
    out = []
    for name in sorted(rows):
        r = rows[name]
        times = [t for t in r["times"] if t is not None]
        out.append({"name": name, "calls": r["calls"], "replies": len(r["times"]),
                    "errors": sum(r["errors"].values()), "error_texts": r["errors"],
                    "median_ms": statistics.median(times) * 1e3 if times else float("nan"),
                    "max_ms": max(times) * 1e3 if times else float("nan")})
    return out


def main(path: Path, redact: Path | None = None) -> None:
    from stm_live.simulators import cassette

    rec = cassette.read_recording(path)  # a cut-off last record: one logged warning line
    s = rec.session
    span = max((p.t for p in rec.pairs), default=0.0)
    rel = rec.release
    release = (f"R{rel['host_release']} (RT {rel['rt_release']}; {rel['product']}, {rel['version']})"
               if rel else "unknown (no client asked Util.VersionGet)")
    print(f"{path}: format {s.get('format', '?')}, {s.get('recorder', '?')}, upstreams "
          f"{', '.join(s.get('upstreams', [])) or '?'}{'; redacted' if s.get('redacted') else ''}")
    print(f"release {release}; {len(rec.pairs)} requests on {len(rec.connections)} connections over {span:.1f} s")
    for conn, c in sorted(rec.connections.items()):
        ended = f"closed by {c['by']} at {c['closed']:.1f} s ({c['why']})" if "closed" in c else "open at the end"
        print(f"  connection {conn}: upstream {c.get('upstream', '?')}, {ended}")
    rows = command_table(rec)
    print(f"{'command':32s} {'calls':>6s} {'no reply':>8s} {'errors':>6s} {'median ms':>10s} {'max ms':>9s}")
    for r in rows:
        print(f"{r['name']:32s} {r['calls']:6d} {r['calls'] - r['replies']:8d} {r['errors']:6d} "
              f"{r['median_ms']:10.3f} {r['max_ms']:9.3f}")
    texts = [(r["name"], text, n) for r in rows for text, n in r["error_texts"].items()]
    if texts:
        print("error replies:")
        for name, text, n in texts:
            print(f"  {name} ({n}x): {text}")
    if redact is not None:
        dropped = cassette.redact(rec, redact)
        what = ", ".join(f"{n} {field}" for field, n in sorted(dropped.items())) or "nothing to drop"
        print(f"redacted copy {redact}: emptied {what} ({', '.join(sorted(cassette.REDACTED_FIELDS))} fields)")
