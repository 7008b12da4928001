"""STM-Net on a GPU, every figure in one command (about 2-3 minutes on one GPU).

    python -m benchmarks gpu [--json PATH]     # CUDA; without a GPU it says so and stops
    python -m benchmarks gpu --smoke           # the same code on CPU at toy sizes, in seconds

Sections (rows as they are measured, then the targets; the JSON, rewritten after each
section, holds every row and the details):

- latency: ``Reconstructor.reconstruct`` (numpy in, numpy out) at 128^2, 256^2, 512^2, for
  1/2/4 symmetry views, fp32 and bf16, on the fast path (``stmnet.Acceleration``); median
  and p99 after warm-up (the second frame of a shape captures its CUDA graph). At 512^2,
  2 views: the reference path (numpy, a pass per view, fp32), bf16 without CUDA graphs, and
  bf16 in the other memory layout, to show what each part of the fast path buys.
- quality: ``stmnet.bf16_check`` on the held-out set (``metrics.eval_cells``): PSNR and
  SSIM against |psi|^2 in fp32 and bf16, the drop, and bf16 against fp32.
- live: line -> update p50/p99 at 512^2 and 50 lines/s (``bench_live``): in-process
  ``LiveReconstruction`` with full-frame and 32-row band updates, and through the 0MQ worker
  (``python -m stm_live.app.worker``, full-frame updates on CUDA as ``stm-live worker`` runs).
- training: pairs/s the data worker processes deliver, and steps/s of the default and the
  wide ``STMNetConfig`` on one batch on the device and fed by the workers
  (``training.throughput``; bf16, ``GPU_BATCH`` x ``GPU_CROP`` px).

Targets (CUDA): <= 3 ms at 512^2 (2 views, bf16); live update p50 <= 10 ms at 512^2.
``--smoke`` runs every section on CPU (32^2 and 64^2 frames, short windows, one data worker,
``CUDA_VISIBLE_DEVICES`` emptied for the 0MQ worker); CUDA graphs never run on CPU.

On a GPU machine with its own CUDA build of torch (and numpy, scipy), bring along only what
it lacks. Besides torch, numpy and scipy this benchmark and its 0MQ worker import bluesky,
event-model (with jsonschema, whose rpds-py is compiled), pyzmq (compiled), msgpack,
msgpack-numpy and typer, and their pure-Python dependencies. Here, into a folder that travels
with the tree (a few MB; give the GPU machine's Python version and platform)::

    .venv/bin/python -m pip download -d gpu_wheels --only-binary=:all: --python-version 3.11 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        bluesky event-model pyzmq msgpack msgpack-numpy typer
    rm -f gpu_wheels/numpy-* gpu_wheels/scipy-* gpu_wheels/torch-*   # the GPU machine has its own

There, in the tree (``PYTHONPATH=.``: no install of stm-live; the 0MQ worker inherits it)::

    python -m venv --system-site-packages .gpu && .gpu/bin/pip install --no-index --no-deps gpu_wheels/*.whl
    PYTHONPATH=. .gpu/bin/python -m benchmarks gpu --json bench_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = (512, 2, "bf16", 3.0)  # size, views, precision, median ms
LIVE_TARGET = (512, 10.0)  # size, p50 ms


@dataclass(frozen=True)
class Plan:
    device: str
    sizes: tuple[int, ...]
    repeats: int
    quality_samples: int
    quality_size: int
    live_size: int
    live_seconds: float
    train_seconds: float
    train_batch: int | None  # None: the device's default (training.GPU_BATCH on CUDA)
    train_crop: int | None
    train_workers: int | None  # None: training.default_workers

    @classmethod
    def for_run(cls, smoke: bool) -> Plan:
        if smoke:
            return cls(
                device="cpu",
                sizes=(32, 64),
                repeats=5,
                quality_samples=1,
                quality_size=48,
                live_size=64,
                live_seconds=0.5,
                train_seconds=0.5,
                train_batch=2,
                train_crop=32,
                train_workers=1,
            )
        return cls(
            device="cuda",
            sizes=(128, 256, 512),
            repeats=100,
            quality_samples=2,
            quality_size=96,
            live_size=512,
            live_seconds=3.0,
            train_seconds=5.0,
            train_batch=None,
            train_crop=None,
            train_workers=None,
        )


VIEWS = (1, 2, 4)
PRECISIONS = ("fp32", "bf16")
VARIANTS = ("reference path fp32", "bf16 without CUDA graphs", "bf16 other layout")
LIVE_MODES = ("in-process full-frame", "in-process band 32", "0MQ worker")
QUALITY_ROWS = ("fp32", "bf16", "bf16 vs fp32")


def expected_rows(plan: Plan, configs=("default", "wide")) -> list[tuple[str, str]]:
    """Every (section, row) the run prints."""
    big = max(plan.sizes)
    rows = [("latency", f"{s}x{s} {v} view{'s' * (v > 1)} {p}") for s in plan.sizes for v in VIEWS for p in PRECISIONS]
    rows += [("latency", f"{big}x{big} 2 views {name}") for name in VARIANTS]
    rows += [("quality", name) for name in QUALITY_ROWS]
    rows += [("live", f"{plan.live_size}x{plan.live_size} {name}") for name in LIVE_MODES]
    rows += [("training", "pairs/s")] + [("training", f"{c} steps/s") for c in configs]
    return rows


class Report:
    """Prints rows as they come and keeps them, with each section's details, for the JSON."""

    def __init__(self, path: Path | None, header: dict):
        self.path, self.rows, self.data = path, [], {"header": header}

    def row(self, section: str, name: str, text: str, **values) -> None:
        self.rows.append({"section": section, "row": name, "text": text, **values})
        print(f"{section:<9} {name:<34} {text}", flush=True)

    def section(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        if self.path is not None:
            doc = {**self.data, "rows": self.rows}
            self.path.write_text(json.dumps(_finite(doc), indent=1))


def _finite(value):
    """JSON without NaN/inf (null instead)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- sections
def _latency(rec, size: int, repeats: int, warm: int = 3) -> dict:
    """Median and p99 ms of ``reconstruct`` on one size x size frame, after ``warm`` frames."""
    image = np.random.default_rng(size).random((size, size), dtype=np.float32)
    for _ in range(warm):  # allocator, kernels; the second frame captures the shape's CUDA graph
        rec.reconstruct(image, rec.pixel_size_nm)
    laps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rec.reconstruct(image, rec.pixel_size_nm)  # numpy out: the device has finished
        laps.append(time.perf_counter() - t0)
    laps = np.asarray(laps) * 1e3
    return {"median_ms": float(np.median(laps)), "p99_ms": float(np.percentile(laps, 99)), "n": repeats}


def _ms(r: dict) -> str:
    return f"median {r['median_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms"


def latency_section(base, plan: Plan, report: Report) -> None:
    from dataclasses import asdict

    results = {}
    for size in plan.sizes:
        for views in VIEWS:
            for precision in PRECISIONS:
                rec = base.with_views(views).with_acceleration(precision=precision, fast=True)
                r = _latency(rec, size, plan.repeats if size < 512 else max(5, plan.repeats // 2))
                r["acceleration"] = asdict(rec.acceleration)
                name = f"{size}x{size} {views} view{'s' * (views > 1)} {precision}"
                results[name] = r
                report.row("latency", name, _ms(r), **r)
    big = max(plan.sizes)
    two = base.with_views(2)
    variants = {
        "reference path fp32": two.with_acceleration(fast=False, precision="fp32"),
        "bf16 without CUDA graphs": two.with_acceleration(fast=True, precision="bf16", graphs=False),
        "bf16 other layout": two.with_acceleration(
            fast=True, precision="bf16", channels_last=not base.acceleration.channels_last
        ),
    }
    for label, rec in variants.items():
        r = _latency(rec, big, max(5, plan.repeats // 2))
        r["acceleration"] = asdict(rec.acceleration)
        name = f"{big}x{big} 2 views {label}"
        results[name] = r
        report.row("latency", name, _ms(r) + f"  ({_describe(rec)})", **r)
    report.section("latency", results)


def _describe(rec) -> str:
    a = rec.acceleration
    return (
        f"{a.precision}, {'fast' if a.fast else 'reference'}, {'NHWC' if a.channels_last else 'NCHW'}, "
        f"graphs {'on' if a.graphs else 'off'}"
    )


def quality_section(base, plan: Plan, report: Report) -> None:
    from stm_live.models.stmnet import bf16_check

    check = bf16_check(base.with_views(2), samples=plan.quality_samples, size=plan.quality_size)
    for precision in PRECISIONS:
        r = check[precision]
        report.row(
            "quality",
            precision,
            f"PSNR {r['psnr_db']:6.2f} dB  SSIM {r['ssim']:.4f}  ({check['frames']} held-out frames, 2 views)",
            **r,
        )
    report.row(
        "quality",
        "bf16 vs fp32",
        f"drop {check['drop_db']:+.3f} dB (fallback above "
        f"{check['max_drop_db']:g})  SSIM drop {check['ssim_drop']:+.5f}  "
        f"agreement {check['agreement_db']:.1f} dB  -> "
        f"{'bf16' if check['ok'] else 'fp32'}",
        drop_db=check["drop_db"],
        ok=check["ok"],
    )
    report.section("quality", check)


def live_section(base, plan: Plan, report: Report) -> None:
    from benchmarks.bench_live import _ZmqRig, bench_inprocess

    size, rate = plan.live_size, 50.0
    timed = max(10, min(size - 16, int(rate * plan.live_seconds)))
    net = base.with_views(2)
    warm = np.random.default_rng(0).random((size, size), dtype=np.float32)
    for _ in range(3):
        net.reconstruct(warm, net.pixel_size_nm)
    results = {}

    def show(name, r):
        results[name] = r
        report.row(
            "live",
            name,
            f"p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  lines {r['n']}  updates "
            f"{r['updates']}  lost {r['lost']}  final {'ok' if r['final'] else 'MISSING'}",
            **r,
        )

    for name, band in (("in-process full-frame", None), ("in-process band 32", 32)):
        show(f"{size}x{size} {name}", bench_inprocess(net, size, rate, timed, band))
    # the worker's own default: full-frame updates on CUDA (app.worker.run_worker), 32-row bands on CPU
    band = None if plan.device == "cuda" else 32
    with _environ(**({} if plan.device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""})):
        rig = _ZmqRig(None, band)
    try:
        rig.run(size, net.pixel_size_nm, rate, 16)  # the worker's first frames of this size
        show(f"{size}x{size} 0MQ worker", rig.run(size, net.pixel_size_nm, rate, timed))
    finally:
        rig.close()
    report.section("live", {"rate_lines_per_s": rate, "timed_lines": timed, "results": results})


def training_section(plan: Plan, report: Report) -> None:
    from stm_live.models.stmnet import WIDE_CONFIG, STMNetConfig
    from stm_live.models.training import throughput

    r = throughput(
        {"default": STMNetConfig(), "wide": WIDE_CONFIG},
        device=plan.device,
        batch=plan.train_batch,
        crop=plan.train_crop,
        workers=plan.train_workers,
        seconds=plan.train_seconds,
    )
    report.row(
        "training",
        "pairs/s",
        f"{r['pairs_per_s']:8.0f} pairs/s  ({r['workers']} worker process{'es' * (r['workers'] != 1)}, "
        f"{r['batch']} x {r['crop']}^2 px)",
        pairs_per_s=r["pairs_per_s"],
    )
    for name, c in r["configs"].items():
        report.row(
            "training",
            f"{name} steps/s",
            f"{c['steps_per_s']:8.1f} steps/s on the device  {c['end_to_end_steps_per_s']:8.1f} fed by the "
            f"workers  ({c['params'] / 1e6:.2f} M parameters; needs "
            f"{c['steps_per_s'] * r['batch']:.0f} pairs/s)",
            **c,
        )
    report.section("training", r)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every section on CPU at toy sizes")
    parser.add_argument("--json", type=Path, default=Path("bench_gpu.json"), help="where to write the results")
    args = parser.parse_args(argv if argv is not None else [])
    import torch

    plan = Plan.for_run(args.smoke)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print(
            f"no CUDA device (torch {torch.__version__}): nothing measured; `python -m benchmarks gpu --smoke` "
            "runs the same code on CPU"
        )
        return
    from stm_live.models.stmnet import load_stmnet

    started = time.perf_counter()
    base = load_stmnet(device=plan.device)  # on CUDA: warm-up, layout timed, bf16 checked
    if plan.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    name = torch.cuda.get_device_name() if plan.device == "cuda" else platform.processor() or platform.machine()
    header = {
        "device": plan.device,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "smoke": args.smoke,
        "plan": vars(plan),
        "loaded_acceleration": _describe(base),
        "load_s": time.perf_counter() - started,
    }
    report = Report(args.json, header)
    print(
        f"STM-Net on {plan.device} ({name}), torch {torch.__version__}; loaded in {header['load_s']:.1f} s as "
        f"{_describe(base)}{'; SMOKE: toy sizes on CPU' if args.smoke else ''}",
        flush=True,
    )
    report.write()
    failed = []
    for key, run in (
        ("latency", lambda: latency_section(base, plan, report)),
        ("quality", lambda: quality_section(base, plan, report)),
        ("live", lambda: live_section(base, plan, report)),
        ("training", lambda: training_section(plan, report)),
    ):
        t0 = time.perf_counter()
        try:
            run()
        except Exception as exc:  # GPU time is short: one broken section must not cost the others
            failed.append(key)
            report.section(key, {"error": f"{type(exc).__name__}: {exc}"})
            print(f"{key:<9} FAILED: {type(exc).__name__}: {exc}", flush=True)
        print(f"({key}: {time.perf_counter() - t0:.1f} s)", flush=True)
    _targets(plan, report)
    printed = {(r["section"], r["row"]) for r in report.rows}
    missing = [f"{s}: {r}" for s, r in expected_rows(plan) if (s, r) not in printed]
    report.data["missing_rows"] = missing
    report.data["total_s"] = time.perf_counter() - started
    report.write()
    print(f"{len(printed)} rows in {report.data['total_s']:.0f} s; JSON: {args.json}", flush=True)
    if missing or failed:
        raise RuntimeError(f"sections failed: {failed or 'none'}; rows missing: {missing or 'none'}")


def _targets(plan: Plan, report: Report) -> None:
    if plan.device != "cuda":
        print("targets: not judged (smoke run on CPU)")
        return
    size, views, precision, limit = TARGET_MS
    rows = {(r["section"], r["row"]): r for r in report.rows}
    lat = rows.get(("latency", f"{size}x{size} {views} views {precision}"))
    live = [r for (s, name), r in rows.items() if s == "live" and name.startswith(f"{LIVE_TARGET[0]}x")]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    if lat:
        print(
            f"target: <= {limit:g} ms at {size}^2 ({views} views, {precision}): {lat['median_ms']:.2f} ms, "
            f"{verdict(lat['median_ms'] <= limit)}"
        )
    for r in live:
        print(
            f"target: live p50 <= {LIVE_TARGET[1]:g} ms at {LIVE_TARGET[0]}^2, {r['row']}: {r['p50']:.1f} ms, "
            f"{verdict(r['p50'] <= LIVE_TARGET[1])}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
