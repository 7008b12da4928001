"""Live reconstruction latency: line arrival -> updated reconstruction available.

For each frame size (256², 512²) and line rate (10, 50 lines/s), in-process (worker thread)
and over 0MQ (proxy -> worker process -> results back), the first lines of the frame are
sent as a burst (untimed; the frame is then as large as it gets), the last ``timed`` lines
at the line rate, then the stop, which triggers the final full-frame reconstruction.

Latency of a line = time from its Event being handed to the callback / publisher to the
first result that includes it, measured in the acquisition process (one clock). "lost"
counts raw lines missing from the worker's final frame (must be 0).

    python -m benchmarks bench_live            # or: stm-live bench --only live
    python benchmarks/bench_live.py --quick    # one size, one rate
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"cpu": (256, 150.0), "cuda": (512, 10.0)}  # size, p50 ms


def untrained_stmnet():
    """STM-Net architecture with random weights: same cost, used only when the shipped
    checkpoint is missing (the table says so)."""
    from stm_live.models.checkpoint import resolve_device
    from stm_live.models.stmnet import Reconstructor, STMNet

    return Reconstructor(STMNet(), 0.05, device=resolve_device("auto"))


def _reconstructor():
    from stm_live.models.stmnet import DEFAULT_CHECKPOINT, load_stmnet

    if DEFAULT_CHECKPOINT.is_file():
        return load_stmnet(device="auto"), "shipped checkpoint", None
    return untrained_stmnet(), "UNTRAINED weights (no shipped checkpoint yet)", "benchmarks.bench_live:untrained_stmnet"


def _docs(size: int, pixel_size_nm: float, seed: int):
    from event_model import compose_run

    rng = np.random.default_rng(seed)
    image = rng.random((size, size), dtype=np.float32) * 1e-10
    block = {
        "frame": {
            "center_x_m": 0.0,
            "center_y_m": 0.0,
            "width_m": size * pixel_size_nm * 1e-9,
            "height_m": size * pixel_size_nm * 1e-9,
            "angle_deg": 0.0,
        },
        "pixels": size,
        "lines": size,
        "pixel_size_nm": pixel_size_nm,
        "scan_direction": "down",
        "bias_V": -2.5,
        "setpoint_A": 1e-11,
        "z_controller": "constant_height",
        "line_key": "stm_line_index",
        "channels": [
            {
                "name": "Current",
                "index": 0,
                "units": "A",
                "keys": {"forward": "stm_current_fwd", "backward": "stm_current_bwd"},
            }
        ],
    }
    run = compose_run(metadata={"plan_name": "bench_live", "stm_live": block})
    keys = {
        "stm_line_index": {"dtype": "integer", "shape": [], "source": "bench"},
        "stm_current_fwd": {"dtype": "array", "shape": [size], "source": "bench"},
        "stm_current_bwd": {"dtype": "array", "shape": [size], "source": "bench"},
    }
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    events = []
    for row in range(size):
        data = {"stm_line_index": row, "stm_current_fwd": image[row], "stm_current_bwd": image[row, ::-1].copy()}
        events.append(desc.compose_event(data=data, timestamps={k: time.time() for k in data}))
    return run.start_doc, desc.descriptor_doc, events, run.compose_stop()


def _feed(send, docs, rate: float, timed: int, sent_at: dict, settle) -> None:
    start, descriptor, events, stop = docs
    send("start", start)
    send("descriptor", descriptor)
    burst = len(events) - timed
    for ev in events[:burst]:
        send("event", ev)
    settle()  # the burst's (coalesced) updates are not part of the measurement
    t0 = time.perf_counter()
    for i, ev in enumerate(events[burst:]):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent_at[ev["data"]["stm_line_index"]] = time.perf_counter()
        send("event", ev)
    send("stop", stop)


def _summary(latencies, lost, updates, final_ok) -> dict:
    lat = np.asarray(latencies, dtype=float) * 1e3
    return {
        "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "n": int(lat.size),
        "updates": updates,
        "lost": lost,
        "final": final_ok,
    }


def bench_inprocess(net, size: int, rate: float, timed: int, band_margin) -> dict:
    from stm_live.callbacks.live import LiveReconstruction

    finals = []
    live = LiveReconstruction(
        net,
        band_margin=band_margin,
        emit=lambda n, d: finals.append(d) if n == "event" and d["data"].get("final") else None,
    )
    docs = _docs(size, net.pixel_size_nm, seed=size)
    sent_at: dict[int, float] = {}
    try:
        _feed(live, docs, rate, timed, sent_at, settle=lambda: live.flush(120))
        done = live.flush(timeout=120)
    finally:
        live.close()
    timed_rows = set(sent_at)
    latencies = [lat for row, lat in list(live.history) if row in timed_rows][-timed:]
    final = finals[-1]["data"] if finals else None
    lost = size - (final["lines_done"] if final else 0)
    return _summary(latencies, lost, live.updates, done and final is not None)


class _ZmqRig:
    """Proxy + publisher + result receiver here, a worker process there."""

    def __init__(self, reconstructor_path: str | None, band_margin):
        from stm_live.streaming import DocumentProxy, ResultReceiver, make_publisher

        self.proxy = DocumentProxy()
        self.publisher = make_publisher(self.proxy.in_address)
        self.receiver = ResultReceiver()
        self.recv_at: list[tuple[float, list[int], bool, int]] = []
        self.receiver.subscribe(self._on_result, source="live")
        cmd = [
            sys.executable,
            "-m",
            "stm_live.app.worker",
            "--connect",
            self.proxy.out_address,
            "--results",
            self.receiver.address,
            "--no-tip-monitor",
            "--band-margin",
            str(-1 if band_margin is None else band_margin),
        ]
        if reconstructor_path:
            cmd += ["--reconstructor", reconstructor_path]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not self.receiver.wait_ready(1, timeout=90):
            self.close()
            raise RuntimeError("0MQ worker did not start within 90 s")

    def _on_result(self, name, doc):
        if name == "event" and "lines" in doc["data"]:  # the reconstruction stream, not the consistency one
            d = doc["data"]
            self.recv_at.append(
                (time.perf_counter(), [int(r) for r in d["lines"]], bool(d["final"]), int(d["lines_done"]))
            )

    def run(self, size: int, pixel_size_nm: float, rate: float, timed: int) -> dict:
        docs = _docs(size, pixel_size_nm, seed=size + 1)
        uid = docs[0]["uid"]
        sent_at: dict[int, float] = {}
        self.recv_at.clear()
        burst_last = size - timed - 1
        settle = lambda: self.receiver.wait_for(  # noqa: E731
            lambda r: any(burst_last in rows for _, rows, _, _ in self.recv_at), timeout=120
        )
        _feed(self.publisher, docs, rate, timed, sent_at, settle)
        final = self.receiver.wait_final(uid, timeout=120)
        latencies, seen = [], set()
        for t, rows, _, _ in list(self.recv_at):
            for r in rows:
                if r in sent_at and r not in seen:
                    seen.add(r)
                    latencies.append(t - sent_at[r])
        n_final = next((n for _, _, is_final, n in reversed(self.recv_at) if is_final), 0)
        lost = size - n_final + self.publisher.failed
        return _summary(latencies, lost, len(self.recv_at), final is not None)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.publisher.close()
        self.receiver.close()
        self.proxy.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256² at 10 lines/s only")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512])
    parser.add_argument("--rates", type=float, nargs="*", default=[10.0, 50.0])
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per case")
    parser.add_argument("--band-margin", type=int, default=32, help="-1: full-frame updates")
    parser.add_argument("--no-zmq", action="store_true")
    args = parser.parse_args(argv if argv is not None else [])
    import torch

    sizes, rates = ([256], [10.0]) if args.quick else (args.sizes, args.rates)
    band = None if args.band_margin < 0 else args.band_margin
    net, weights, path = _reconstructor()
    device = "cuda" if str(getattr(net, "device", "cpu")).startswith("cuda") else "cpu"
    print(
        f"STM-Net: {weights}; device {device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}; torch threads "
        f"{torch.get_num_threads()}; band_margin {band}; pixel size {net.pixel_size_nm:.3f} nm (no resampling)"
    )
    rows = []
    for size in sizes:
        warm = np.random.default_rng(0).random((size, size), dtype=np.float32)
        net.reconstruct(warm, net.pixel_size_nm)  # first call pays allocator / cuDNN setup
        for rate in rates:
            timed = max(10, min(size - 16, int(rate * args.seconds)))
            rows.append(("in-process", size, rate, bench_inprocess(net, size, rate, timed, band)))
            print(_fmt(*rows[-1]), flush=True)
    if not args.no_zmq:
        rig = _ZmqRig(path, band)
        try:
            for size in sizes:
                rig.run(size, net.pixel_size_nm, 50.0, 16)  # warm the worker for this size
                for rate in rates:
                    timed = max(10, min(size - 16, int(rate * args.seconds)))
                    rows.append(("0MQ worker", size, rate, rig.run(size, net.pixel_size_nm, rate, timed)))
                    print(_fmt(*rows[-1]), flush=True)
        finally:
            rig.close()
    size_t, p50_t = TARGETS[device]
    hits = [r for r in rows if r[1] == size_t]
    verdict = "met" if hits and all(r[3]["p50"] <= p50_t for r in hits) else "NOT met"
    lost = sum(r[3]["lost"] for r in rows)
    print(f"target ({device}): p50 <= {p50_t:.0f} ms at {size_t}x{size_t}: {verdict}; raw lines lost: {lost}")


def _fmt(mode, size, rate, s) -> str:
    return (
        f"{mode:11s} {size:4d}x{size:<4d} {rate:5.0f} lines/s  p50 {s['p50']:7.1f} ms  p99 {s['p99']:7.1f} ms"
        f"  lines {s['n']:3d}  updates {s['updates']:3d}  lost {s['lost']}  final {'ok' if s['final'] else 'MISSING'}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
