"""Protocol benchmark against the simulated controller on 127.0.0.1.

1. Median round trip of Scan.FrameDataGrab of a 512x512 frame through our client,
   nanonisTCP 1.1.5 and nanonis_spm 1.0.9, in one run, with ratios.
   Targets: ours <= 1 ms median and >= 100x faster than nanonisTCP.
2. Lines served per second with 4 clients attached: each client follows a fast scan on its
   own connection (Scan.WaitEndOfLine, then a FrameDataGrab of the new row's frame).
3. Bias.Get, Current.Get and a 512x512 FrameDataGrab (median, p99) while a 512x512 frame
   renders: the serving loop must not wait on the renderer.
4. Time to serve each command of the table (median, p99 round trip on loopback through our
   codec, release R14718), except those that wait by design. Target: each <= 1 ms.
5. Recording proxy overhead: the 512x512 FrameDataGrab round trip through `stm-live sim
   record` (its own process, recording to a file) minus the same grab straight to the
   server, interleaved; back to back, and paced at 50 grabs/s as a scan grabs its lines.
   Target: <= 0.5 ms added.

    python -m benchmarks.bench_protocol [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from stm_live.devices.client import NanonisClient

SIZE = 512


def _median_ms(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def bench_grab(host: str, port: int, repeats: int, peer_repeats: int) -> list[tuple[str, float, str]]:
    rows = []
    with NanonisClient(host, port, timeout=30) as c:
        c.scan_action("stop")
        c.scan_buffer_set([0, 30], SIZE, SIZE)
        cfg = c.scan_buffer_get()
        assert (cfg.pixels, cfg.lines) == (SIZE, SIZE), cfg
        c.scan_frame_data_grab(30)  # warm-up
        ours_ms, ref = _median_ms(lambda: c.scan_frame_data_grab(30).data, repeats)
        rows.append(("stm_live NanonisClient", ours_ms, f"{repeats} calls"))

    from nanonisTCP import nanonisTCP
    from nanonisTCP.Scan import Scan

    conn = nanonisTCP(host, port)
    conn.s.settimeout(120)
    try:
        ntcp_ms, data = _median_ms(lambda: Scan(conn).FrameDataGrab(30, 1)[1], peer_repeats)
        np.testing.assert_array_equal(np.asarray(data, np.float32), ref)
        rows.append(("nanonisTCP 1.1.5", ntcp_ms, f"{peer_repeats} calls"))
    finally:
        conn.close_connection()

    import nanonis_spm

    sock = socket.create_connection((host, port), timeout=120)
    spm = nanonis_spm.Nanonis(sock)

    def spm_grab():
        sock.settimeout(120)
        with contextlib.redirect_stdout(io.StringIO()):
            return spm.Scan_FrameDataGrab(30, 1)[2][4]

    try:
        spm_ms, data = _median_ms(spm_grab, peer_repeats)
        np.testing.assert_array_equal(np.asarray(data, np.float32), ref)
        rows.append(("nanonis_spm 1.0.9", spm_ms, f"{peer_repeats} calls"))
    finally:
        sock.close()
    return rows


def bench_proxy(host: str, port: int, repeats: int, pace_s: float = 0.02) -> list[tuple[str, float, float, float]]:
    """(pattern, direct median ms, through the proxy median ms, median of the paired
    differences ms) for SIZE x SIZE grabs, direct and proxied alternating, back to back and
    one every ``pace_s``. The proxy runs as `stm-live sim record` does, in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.nrec"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stm_live.cli",
                "sim",
                "record",
                "--upstream",
                f"{host}:{port}",
                "--listen",
                "127.0.0.1:0",
                "--out",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            found = re.search(r"127\.0\.0\.1:(\d+) ->", line)
            if not found:
                raise RuntimeError(f"sim record did not start: {line}{proc.stderr.read()[-2000:]}")
            rows = []
            with (
                NanonisClient(host, port, timeout=30) as direct,
                NanonisClient(host, int(found.group(1)), timeout=30) as proxied,
            ):
                direct.scan_action("stop")
                direct.scan_buffer_set([0, 30], SIZE, SIZE)
                # warm-up, and the same frame both ways
                np.testing.assert_array_equal(
                    proxied.scan_frame_data_grab(30).data, direct.scan_frame_data_grab(30).data
                )
                for pattern, pace in (("back to back", 0.0), (f"one every {pace_s * 1e3:.0f} ms", pace_s)):
                    times: dict[str, list[float]] = {"direct": [], "proxied": []}
                    for i in range(repeats):
                        for name, c in (("direct", direct), ("proxied", proxied))[:: 1 if i % 2 else -1]:
                            t0 = time.perf_counter()
                            c.scan_frame_data_grab(30)
                            times[name].append(time.perf_counter() - t0)
                            if pace:
                                time.sleep(max(0.0, pace - (time.perf_counter() - t0)))
                    diff = [p - d for p, d in zip(times["proxied"], times["direct"])]
                    rows.append(
                        (
                            pattern,
                            statistics.median(times["direct"]) * 1e3,
                            statistics.median(times["proxied"]) * 1e3,
                            statistics.median(diff) * 1e3,
                        )
                    )
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        from stm_live.simulators.cassette import read_recording

        grabs = sum(p.name == "Scan.FrameDataGrab" and p.reply is not None for p in read_recording(out).pairs)
        if grabs != 2 * repeats + 1:
            raise RuntimeError(f"the recording holds {grabs} grabs, not {2 * repeats + 1}")
    return rows


def bench_lines(
    host: str,
    port: int,
    n_clients: int = 4,
    pixels: int = 256,
    lines: int = 128,
    line_time_s: float = 0.0005,
    limit_s: float = 60.0,
):
    """``n_clients`` connections follow one frame live: each waits for an end of line,
    grabs the frame and takes every row completed since its last grab (as LineFollower
    does). Returns (seconds from start to last row per client, rows per client)."""
    clients = [NanonisClient(host, port, timeout=10) for _ in range(n_clients)]
    ctl = clients[0]  # configures and starts the scan, then follows like the others
    ctl.scan_action("stop")
    ctl.scan_buffer_set([0], pixels, lines)
    ctl.scan_speed_set(1e-6, 1e-6, line_time_s, line_time_s, keep_constant="time", speed_ratio=1.0)
    ctl.scan_props_set(continuous=False)
    rows = [0] * n_clients
    finish = [float("nan")] * n_clients
    errors: list[BaseException] = []
    deadline = time.monotonic() + limit_s

    def follow(k: int, client: NanonisClient):
        try:
            while rows[k] < lines and time.monotonic() < deadline:
                ev = client.scan_wait_end_of_line(1.0)
                if ev.timed_out and rows[k] == 0:
                    continue
                data = client.scan_frame_data_grab(0).data
                rows[k] = int(np.isfinite(data[:, -1]).sum())
            finish[k] = time.perf_counter() - t0
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=follow, args=(k, c), daemon=True) for k, c in enumerate(clients)]
    t0 = time.perf_counter()
    ctl.scan_action("start", "down")
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit_s + 5)
    for c in clients:
        c.close()
    if errors:
        raise errors[0]
    return finish, rows


def bench_capacity(host: str, port: int, seconds: float, n_clients: int = 4) -> list[int]:
    """Grabs of the (complete) 256x128 frame per client in ``seconds``, all clients at once:
    the protocol's ceiling on lines served (one grab per line)."""
    clients = [NanonisClient(host, port, timeout=10) for _ in range(n_clients)]
    counts = [0] * n_clients
    end = time.monotonic() + seconds

    def hammer(k):
        while time.monotonic() < end:
            clients[k].scan_frame_data_grab(0)
            counts[k] += 1

    threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 10)
    for c in clients:
        c.close()
    return counts


# Commands that wait by design (scan events, simulated moves/pulses) or end the connection.
WAITS_BY_DESIGN = {"Scan.WaitEndOfScan", "Scan.WaitEndOfLine", "Util.Quit", "Scan.FrameDataGrab"}


def _request_values(cmd) -> dict:
    """Small valid-looking values per field; flags 0 so nothing waits."""
    out = {}
    for f in cmd.request:
        if f.name == "action":
            out[f.name] = 1  # stop: a start would time the renderer, not the server
        elif f.name in ("wait", "timeout_ms", "get_data"):
            out[f.name] = 0
        elif f.name in ("modulator", "demodulator", "output"):
            out[f.name] = 1
        elif f.type in ("u16", "u32", "i32"):
            out[f.name] = 0
        elif f.type in ("f32", "f64"):
            out[f.name] = 1e-9
        elif f.type == "str":
            out[f.name] = ""
        elif f.type in ("strarr", "strcnt", "strbytes", "strs", "str_2d"):
            out[f.name] = [] if f.type != "strs" else [""] * 2
        else:  # arrays: two elements
            out[f.name] = np.zeros(2, {"i": np.int32, "u": np.uint32, "f": np.float32}[f.type[0]])
    return out


def bench_commands(host: str, port: int, repeats: int) -> list[tuple[str, float, float, int]]:
    """(command, median ms, p99 ms, error replies) per command of the R14718 table."""
    from stm_live.devices import protocol as P

    rows = []
    sock = socket.create_connection((host, port), timeout=30)
    try:
        for name in sorted(P.LAYOUTS):
            if name in WAITS_BY_DESIGN:
                continue
            try:
                cmd = P.command_for(name)
            except P.UnknownCommandError:
                continue
            rows.append((name, *_serve_times(sock, name, _request_values(cmd), repeats)[:3]))
    finally:
        sock.close()
    return rows


def _serve_times(sock, name: str, values, repeats: int, seconds: float | None = None) -> tuple[float, float, int]:
    """(median ms, p99 ms, error replies) of ``repeats`` round trips of one request (or as
    many as fit in ``seconds``)."""
    from stm_live.devices import protocol as P

    cmd = P.command_for(name)
    msg = P.pack_request(name, values, command=cmd)
    times, errors = [], 0
    end = None if seconds is None else time.perf_counter() + seconds
    for _ in range(repeats):
        if end is not None and time.perf_counter() > end:
            break
        t0 = time.perf_counter()
        sock.sendall(msg)
        _, size = P.parse_response_header(_recv(sock, P.HEADER_SIZE))
        body = _recv(sock, size)
        times.append(time.perf_counter() - t0)
        errors += P.decode_response_body(name, body, cmd)[1] != 0
    times.sort()
    return (
        statistics.median(times) * 1e3,
        times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
        errors,
        len(times),
    )


# Cheap commands timed while a frame renders: Bias.Get is answered on the server's loop,
# Current.Get and Scan.FrameDataGrab go through the controller.
WHILE_RENDERING = (
    ("Bias.Get", {}),
    ("Current.Get", {}),
    ("Scan.FrameDataGrab", {"channel_index": 30, "data_direction": 1}),
)


def bench_while_rendering(host: str, port: int, seconds: float) -> list[tuple[str, float, float, int, int, int]]:
    """(command, median ms, p99 ms, errors, calls, lines scanned meanwhile): each command
    called back to back for ``seconds`` while a SIZE x SIZE frame renders (1 ms lines,
    continuous, so the scan always waits on the renderer)."""
    with NanonisClient(host, port, timeout=60) as c:
        c.scan_action("stop")
        c.scan_buffer_set([0, 30], SIZE, SIZE)
        c.scan_speed_set(1e-6, 1e-6, 1e-3, 1e-3, keep_constant="time", speed_ratio=1.0)
        c.scan_props_set(continuous=True)
        c.scan_action("start", "down")
        while c.scan_wait_end_of_line(60).movement != "forward":  # rendering has begun
            pass
        sock = socket.create_connection((host, port), timeout=60)
        rows = []
        try:
            for name, values in WHILE_RENDERING:
                first = c.scan_wait_end_of_line(0)
                times = _serve_times(sock, name, values, 1 << 30, seconds)
                last = c.scan_wait_end_of_line(0)
                rows.append((name, *times, (last.line - first.line) % SIZE))
        finally:
            sock.close()
            c.scan_action("stop")
    return rows


def _recv(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def main(argv: list[str] | None = None) -> None:
    """Print the tables; ``argv`` only from the command line (the runner passes none)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args([] if argv is None else argv)
    from stm_live.simulators.server import start_server_thread

    repeats, peer_repeats, seconds = (20, 1, 2.0) if args.quick else (200, 3, 5.0)
    with start_server_thread(seed=0, time_scale=1.0) as server:
        rows = bench_grab(server.host, server.port, repeats, peer_repeats)
    ours = rows[0][1]
    print(f"\nScan.FrameDataGrab {SIZE}x{SIZE} f32 ({SIZE * SIZE * 4 / 2**20:.1f} MiB), median round trip")
    print(f"{'client':26s} {'median ms':>11s} {'x slower than ours':>19s}  notes")
    for name, ms, note in rows:
        print(f"{name:26s} {ms:11.3f} {ms / ours:19.1f}  {note}")
    ntcp = next(ms for n, ms, _ in rows if n.startswith("nanonisTCP"))
    print(
        f"targets: ours <= 1 ms: {'PASS' if ours <= 1.0 else 'FAIL'} ({ours:.3f} ms); "
        f">= 100x nanonisTCP: {'PASS' if ntcp / ours >= 100 else 'FAIL'} ({ntcp / ours:.0f}x)"
    )

    with start_server_thread(seed=0, time_scale=1.0) as server:
        proxy_rows = bench_proxy(server.host, server.port, repeats)
    print(
        f"\nThrough the recording proxy (`stm-live sim record`, own process, writing the file): "
        f"{SIZE}x{SIZE} FrameDataGrab, {repeats} of each, interleaved"
    )
    print(f"{'pattern':22s} {'direct ms':>10s} {'proxied ms':>11s} {'added ms':>9s}  target <= 0.5 ms added")
    for pattern, d, p, added in proxy_rows:
        print(f"{pattern:22s} {d:10.3f} {p:11.3f} {added:9.3f}  {'PASS' if added <= 0.5 else 'FAIL'}")

    with start_server_thread(seed=0, time_scale=1.0) as server:
        finish, rows = bench_lines(server.host, server.port)
        cap = bench_capacity(server.host, server.port, seconds)
    print("\nLines served with 4 clients attached, following one 256-pixel x 128-line frame live")
    print("(Scan.WaitEndOfLine + FrameDataGrab each; the simulator's rendering sets the pace)")
    print(f"{'client':>8s} {'rows':>6s} {'seconds':>8s} {'lines/s':>8s}")
    for k, (n, t) in enumerate(zip(rows, finish)):
        print(f"{k:8d} {n:6d} {t:8.2f} {n / t:8.1f}")
    print(f"{'total':>8s} {sum(rows):6d} {max(finish):8.2f} {sum(rows) / max(finish):8.1f}")
    print(f"\nServing ceiling: 4 clients grabbing the 256x128 frame back to back for {seconds:.0f} s")
    print(f"{'client':>8s} {'grabs/s':>8s}")
    for k, n in enumerate(cap):
        print(f"{k:8d} {n / seconds:8.0f}")
    print(f"{'total':>8s} {sum(cap) / seconds:8.0f}   (= lines/s deliverable, one grab per line)")

    with start_server_thread(seed=0, time_scale=1.0) as server:
        busy = bench_while_rendering(server.host, server.port, 0.5 if args.quick else 3.0)
    print(
        f"\nServe time while a {SIZE}x{SIZE} frame renders (1 ms lines, continuous: the scan waits on "
        "the renderer throughout), each command back to back"
    )
    print(f"{'command':32s} {'median ms':>10s} {'p99 ms':>8s} {'errors':>7s} {'calls':>7s} {'lines meanwhile':>16s}")
    for name, med, p99, errs, calls, lines in busy:
        print(f"{name:32s} {med:10.3f} {p99:8.3f} {errs:7d} {calls:7d} {lines:16d}")

    with start_server_thread(seed=0, time_scale=1.0) as server:
        cmd_rows = bench_commands(server.host, server.port, 20 if args.quick else 200)
    print(
        f"\nServe time per command, R14718 layouts, {20 if args.quick else 200} calls each "
        "(round trip on loopback; waits-by-design excluded)"
    )
    print(f"{'command':32s} {'median ms':>10s} {'p99 ms':>8s} {'errors':>7s}")
    for name, med, p99, errs in cmd_rows:
        print(f"{name:32s} {med:10.3f} {p99:8.3f} {errs:7d}")
    slow = [r for r in cmd_rows if r[1] > 1.0]
    print(
        f"{len(cmd_rows)} commands; median <= 1 ms: {len(cmd_rows) - len(slow)}/{len(cmd_rows)} "
        f"{'PASS' if not slow else 'FAIL: ' + ', '.join(r[0] for r in slow)}; "
        f"worst p99 {max(r[2] for r in cmd_rows):.3f} ms ({max(cmd_rows, key=lambda r: r[2])[0]})"
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
