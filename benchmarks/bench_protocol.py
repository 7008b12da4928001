"""Protocol benchmark against the simulated controller on 127.0.0.1.

1. Median round trip of Scan.FrameDataGrab of a 512x512 frame through our client,
   nanonisTCP 1.1.5 and nanonis_spm 1.0.9, in one run, with ratios.
   Targets: ours <= 1 ms median and >= 100x faster than nanonisTCP.
2. Lines served per second with 4 clients attached: each client follows a fast scan on its
   own connection (Scan.WaitEndOfLine, then a FrameDataGrab of the new row's frame).
3. Time to serve each command of the table (median, p99 round trip on loopback through our
   codec, release R14718), except those that wait by design. Target: each <= 1 ms.

    python -m benchmarks.bench_protocol [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import statistics
import threading
import time

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


def bench_lines(host: str, port: int, n_clients: int = 4, pixels: int = 256, lines: int = 128,
                line_time_s: float = 0.0005, limit_s: float = 60.0):
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
            msg = P.pack_request(name, _request_values(cmd), command=cmd)
            times, errors = [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                sock.sendall(msg)
                head = _recv(sock, 40)
                _, size = P.parse_response_header(head)
                body = _recv(sock, size)
                times.append(time.perf_counter() - t0)
                errors += P.decode_response_body(name, body, cmd)[1] != 0
            times.sort()
            rows.append((name, statistics.median(times) * 1e3, times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
                         errors))
    finally:
        sock.close()
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
    print(f"targets: ours <= 1 ms: {'PASS' if ours <= 1.0 else 'FAIL'} ({ours:.3f} ms); "
          f">= 100x nanonisTCP: {'PASS' if ntcp / ours >= 100 else 'FAIL'} ({ntcp / ours:.0f}x)")

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
        cmd_rows = bench_commands(server.host, server.port, 20 if args.quick else 200)
    print(f"\nServe time per command, R14718 layouts, {20 if args.quick else 200} calls each "
          "(round trip on loopback; waits-by-design excluded)")
    print(f"{'command':32s} {'median ms':>10s} {'p99 ms':>8s} {'errors':>7s}")
    for name, med, p99, errs in cmd_rows:
        print(f"{name:32s} {med:10.3f} {p99:8.3f} {errs:7d}")
    slow = [r for r in cmd_rows if r[1] > 1.0]
    print(f"{len(cmd_rows)} commands; median <= 1 ms: {len(cmd_rows) - len(slow)}/{len(cmd_rows)} "
          f"{'PASS' if not slow else 'FAIL: ' + ', '.join(r[0] for r in slow)}; "
          f"worst p99 {max(r[2] for r in cmd_rows):.3f} ms ({max(cmd_rows, key=lambda r: r[2])[0]})")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
