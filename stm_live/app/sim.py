"""``stm-live sim serve|record|inspect``: the simulated Nanonis controller, session recordings.

* ``serve``: the simulated controller (:class:`~stm_live.simulators.server.SimServer`) until
  Ctrl-C or SIGTERM. With ``--cassette SESSION.nrec`` a session recording
  (:class:`~stm_live.simulators.cassette.Cassette`) answers first: without ``--cassette-only``
  the physics simulator answers what the recording never saw; with it such a request gets a
  Nanonis-style error reply. The server then speaks the recorded controller's release unless
  ``--nanonis-release`` says otherwise.
* ``record``: a transparent proxy (:mod:`stm_live.simulators.record`) between any client and a
  controller: every byte is forwarded unchanged, and each request/reply pair goes to a session
  recording (``.nrec``) as it passes. Runs until Ctrl-C (or SIGTERM).
* ``inspect``: what a recording holds: the release, the connections, and per command the
  calls, error replies and reply times (median, max: request sent to the controller -> whole
  reply read back), then the distinct error texts. ``--redact`` writes a copy without session
  and file paths and scan comments (``cassette.REDACTED_FIELDS``), the copy a lab shares.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from stm_live.devices import protocol as P
from stm_live.simulators import cassette as C
from stm_live.simulators.controller import SimulatedController
from stm_live.simulators.record import open_proxy, parse_address
from stm_live.simulators.scenario import load_scenario
from stm_live.simulators.server import SimServer

__all__ = ["serve", "record", "inspect", "command_table"]


async def _until_stopped() -> None:
    """Return on Ctrl-C or SIGTERM (``kill``), so the caller closes cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / Windows
            pass
    await stop.wait()


def serve(
    host: str = "127.0.0.1",
    port: int = 6501,
    scenario=None,
    replay=None,
    time_scale: float = 1.0,
    seed: int = 0,
    *,
    props_layout: str | None = None,
    nanonis_release: int | None = None,
    session_dir=None,
    cassette: Path | None = None,
    cassette_only: bool = False,
) -> None:
    """Serve until Ctrl-C (``stm-live sim serve``); prints the address.

    ``nanonis_release``: the release to emulate (``--nanonis-release``, one of
    ``protocol.RELEASES``); None: the recording's with a cassette, else
    ``protocol.DEFAULT_RELEASE``. ``session_dir``: the session folder (``--session-dir``,
    created if missing) where autosave and Scan.Save write .sxm files and
    Util.SessionPathGet points. ``cassette``: a session recording that answers first;
    ``cassette_only``: an error reply for what it never saw.
    """
    if cassette_only and cassette is None:
        raise ValueError("--cassette-only needs --cassette SESSION.nrec")
    tape = None
    if cassette is not None:
        tape = C.Cassette(cassette, fallback=not cassette_only, release=nanonis_release)
        if not len(tape):
            raise ValueError(f"{cassette}: the recording holds no replies")
        # the recording's release (the default one when no client asked for it while recording)
        nanonis_release = nanonis_release or tape.recording.nanonis_release
    nanonis_release = nanonis_release or P.DEFAULT_RELEASE
    if nanonis_release not in P.RELEASES:
        raise ValueError(
            f"--nanonis-release {nanonis_release}: the simulator emulates {', '.join(map(str, P.RELEASES))}"
        )
    if session_dir is not None:
        try:
            Path(session_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--session-dir {session_dir}: cannot create it: {exc.strerror or exc}") from None
    ctrl = SimulatedController(scenario, replay=replay, seed=seed, time_scale=time_scale)
    if session_dir is not None:
        ctrl.save_dir = str(session_dir)

    async def main() -> None:
        server = SimServer(ctrl, props_layout=props_layout, nanonis_release=nanonis_release, cassette=tape)
        try:
            await server.start(host, port)
        except OSError as exc:  # port taken, bad address: a message, not a traceback
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        source = f"replaying {ctrl.replay.name}" if ctrl.replay is not None else f"scenario {ctrl.scenario.name!r}"
        if tape is not None:
            source = f"{tape.describe()}; {source}"
        if server.faults:
            source += f", {len(server.faults.faults)} faults armed"
        print(
            f"simulated Nanonis controller on {server.host}:{server.port} ({source}, "
            f"time scale {time_scale:g}, seed {seed}, Nanonis release R{nanonis_release}); Ctrl-C stops",
            flush=True,
        )
        try:
            await _until_stopped()
        finally:
            await server.close()
        print("stopped", flush=True)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print("stopped", flush=True)


def record(upstreams: list[str], listen: str, out: Path, faults: str | None = None) -> None:
    """Record until interrupted; one line when listening, one when stopped."""
    ups = [parse_address(u, "--upstream") for u in upstreams]
    host, port = parse_address(listen, "--listen")
    if port and port + len(ups) > 65536:
        raise ValueError(f"--listen {listen}: {len(ups)} ports from {port} run past 65535")
    armed = ()
    if faults is not None:
        armed = load_scenario(faults).faults
        if not armed:
            raise ValueError(f"--faults {faults}: the scenario has no faults: section")

    async def run() -> None:
        proxy = await open_proxy(ups, out, host=host, port=port, faults=armed)
        links = ", ".join(f"{host}:{p} -> {h}:{u}" for p, (h, u) in zip(proxy.ports, ups))
        print(
            f"recording {links} into {out}{f' ({len(armed)} faults armed)' if armed else ''}; Ctrl-C stops", flush=True
        )
        try:
            await _until_stopped()
        finally:
            await proxy.close()
        failed = proxy.writer.error
        print(
            f"stopped: {proxy.pairs} request/reply pairs on {proxy.writer.records} records in {out}"
            + (f"; recording failed: {failed}" if failed else ""),
            flush=True,
        )

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


def command_table(recording) -> list[dict]:
    """Per command: name, calls, replies, errors, median_ms, max_ms; and error texts."""
    rows: dict[str, dict] = defaultdict(lambda: {"calls": 0, "errors": Counter(), "times": []})
    for pair in recording.pairs:
        row = rows[pair.name]
        row["calls"] += 1
        if pair.reply is None:
            continue
        row["times"].append(pair.reply_s)
        try:
            _, status, text = P.decode_response_body(pair.name, pair.reply[P.HEADER_SIZE :])
        except P.ProtocolError as exc:
            status, text = 1, f"unreadable reply: {exc}"
        if status:
            row["errors"][text] += 1
    out = []
    for name in sorted(rows):
        r = rows[name]
        times = [t for t in r["times"] if t is not None]
        out.append(
            {
                "name": name,
                "calls": r["calls"],
                "replies": len(r["times"]),
                "errors": sum(r["errors"].values()),
                "error_texts": r["errors"],
                "median_ms": statistics.median(times) * 1e3 if times else float("nan"),
                "max_ms": max(times) * 1e3 if times else float("nan"),
            }
        )
    return out


def inspect(path: Path, redact: Path | None = None) -> None:
    """Print what the recording at ``path`` holds; with ``redact``, write its shareable copy."""
    rec = C.read_recording(path)  # a cut-off last record: one logged warning line
    s = rec.session
    span = max((p.t for p in rec.pairs), default=0.0)
    rel = rec.release
    release = (
        f"R{rel['host_release']} (RT {rel['rt_release']}; {rel['product']}, {rel['version']})"
        if rel
        else "unknown (no client asked Util.VersionGet)"
    )
    print(
        f"{path}: format {s.get('format', '?')}, {s.get('recorder', '?')}, upstreams "
        f"{', '.join(s.get('upstreams', [])) or '?'}{'; redacted' if s.get('redacted') else ''}"
    )
    print(f"release {release}; {len(rec.pairs)} requests on {len(rec.connections)} connections over {span:.1f} s")
    for conn, c in sorted(rec.connections.items()):
        ended = f"closed by {c['by']} at {c['closed']:.1f} s ({c['why']})" if "closed" in c else "open at the end"
        print(f"  connection {conn}: upstream {c.get('upstream', '?')}, {ended}")
    rows = command_table(rec)
    print(f"{'command':32s} {'calls':>6s} {'no reply':>8s} {'errors':>6s} {'median ms':>10s} {'max ms':>9s}")
    for r in rows:
        print(
            f"{r['name']:32s} {r['calls']:6d} {r['calls'] - r['replies']:8d} {r['errors']:6d} "
            f"{r['median_ms']:10.3f} {r['max_ms']:9.3f}"
        )
    texts = [(r["name"], text, n) for r in rows for text, n in r["error_texts"].items()]
    if texts:
        print("error replies:")
        for name, text, n in texts:
            print(f"  {name} ({n}x): {text}")
    if redact is not None:
        dropped = C.redact(rec, redact)
        what = ", ".join(f"{n} {field}" for field, n in sorted(dropped.items())) or "nothing to drop"
        print(f"redacted copy {redact}: emptied {what} ({', '.join(sorted(C.REDACTED_FIELDS))} fields)")
