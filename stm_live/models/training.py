"""STM-Net training: on-the-fly simulated pairs (CO-tip image -> |psi|^2) and the loop.

All physics comes from ``stm_live.simulators`` (one forward model for the whole project):

- training batches: ``pairs.PairSampler(TRAIN_MOLECULES, size=crop,
  pixel_size_nm=TRAIN_PIXEL_SIZE_NM, ...)`` with the recipe in ``TRAIN_RECIPE``: 1-3
  molecules per frame (never ``HELD_OUT_MOLECULES``) at random positions and rotations, one
  level each from HOMO-2..LUMO+2 (degenerate partners summed), tip height 0.25-0.6 nm,
  random CO-like tips (s share 0-0.6, p_x/p_y imbalance, a little p_z; 30 % coherent s-p_z,
  30 % tilted 5-25 deg), half the frames with a NaCl-like substrate pattern; constant height
  (2/3, current in A) or constant current (1/3, tip height z in nm, turned into a current-like
  image with ``vacuum.current_from_z(z, unit="nm")`` as users do with a Z channel);
  ``CLEAN_SHARE`` of the frames clean, the rest with white + 1/f + row-offset noise at a
  level drawn from ``TRAIN_NOISE`` (fraction of the input's peak-to-peak).
  Inputs are normalised with ``inputs.normalise`` (what the ``Reconstructor`` does);
  targets are the sampler's s-wave Σ|ψ|² at the same height, max 1.
- validation during training: 32 frames of ``HELD_OUT_MOLECULES`` from the same sampler
  recipe with a fixed seed (monitoring only: nothing is selected on it).
- final evaluation, and ``stm-live evaluate`` (:func:`evaluate_main`): the evaluation
  frames of ``metrics`` (``eval_cells``/``make_eval_pairs``).

Each training step's batch depends only on ``(seed, step)`` (the sampler is reseeded per
step), so ``--resume`` continues the same data stream, and worker processes can build the
batches in any order.

On a GPU (``--device cuda``) pairs come from ``workers`` processes (a ``DataLoader`` over
``_StepBatches``: the numpy forward model on all but two cores, the field cache warmed once
and shared by fork), batches are ``GPU_BATCH`` crops of ``GPU_CROP`` px, the network runs
under bf16 autocast with a fused AdamW, and ``minutes`` bounds the run by wall-clock time (the
learning-rate cycle spans the budget). ``throughput`` measures both rates.

Progress (a line per validation) goes to this module's logger at INFO; a command shows it
with ``stm_live.models.console_progress()``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import platform
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from stm_live.interpret import STMNET_PIXEL_NM
from stm_live.models.checkpoint import card_command, hash_path, resolve_device, save_checkpoint
from stm_live.models.inputs import normalise
from stm_live.models.metrics import (
    cube_quality,
    latency_by_views,
    latency_ms,
    minmax,
    quality_tables,
    ssim_torch,
)
from stm_live.models.stmnet import DEFAULT_CHECKPOINT, STMNet, STMNetConfig, load_stmnet, sync_device
from stm_live.simulators.pairs import HELD_OUT_MOLECULES, TRAIN_MOLECULES, PairBatch, PairSampler
from stm_live.simulators.vacuum import current_from_z

logger = logging.getLogger(__name__)

TRAIN_PIXEL_SIZE_NM = STMNET_PIXEL_NM  # one number: STM-Net's scope (interpret.py) is set around it
ORBITAL_LABELS = ("HOMO-2", "HOMO-1", "HOMO", "LUMO", "LUMO+1", "LUMO+2")
TRAIN_NOISE = (0.0, 0.15)  # noise level range of the noisy frames (fraction of the input's peak-to-peak)
CLEAN_SHARE = 0.3  # share of frames without noise
TRAIN_RECIPE = dict(
    heights=(0.25, 0.6),
    s_share=(0.0, 0.6),
    coherent_prob=0.3,
    tilt_prob=0.3,
    modes=("height", "height", "current"),  # drawn uniformly from this tuple: 2/3 constant height
    max_molecules=3,
    orbitals=ORBITAL_LABELS,
    substrate_prob=0.5,
)
VAL_SEED = 10**9
CPU_BATCH, CPU_CROP = 12, 64
GPU_BATCH, GPU_CROP = 32, 96  # a GPU step wants more pixels; 96 px is the evaluation frames' size


# --------------------------------------------------------------------------- training pairs
def make_sampler(molecules=TRAIN_MOLECULES, *, size: int = 64, seed: int = 0) -> PairSampler:
    """The training-recipe ``PairSampler`` at the training pixel size."""
    return PairSampler(
        molecules, size=size, pixel_size_nm=TRAIN_PIXEL_SIZE_NM, seed=seed, noise=TRAIN_NOISE, **TRAIN_RECIPE
    )


def network_inputs(batch: PairBatch) -> np.ndarray:
    """Sampler inputs (A, or tip z in nm for constant current) -> normalised network inputs."""
    out = []
    for image, meta in zip(batch.inputs, batch.meta):
        if meta["mode"] == "current":
            image = current_from_z(image, unit="nm")
        out.append(normalise(np.asarray(image, dtype=np.float32)))
    return np.stack(out)


def sample_batch(sampler: PairSampler, seed_seq, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) network inputs and targets, deterministic in ``seed_seq``."""
    sampler.rng = np.random.default_rng(seed_seq)
    noisy = sampler.rng.random(n) >= CLEAN_SHARE
    inputs, targets = [], []
    try:
        for is_noisy in noisy:
            sampler.noise = TRAIN_NOISE if is_noisy else (0.0, 0.0)
            b = sampler.sample(1)
            inputs.append(network_inputs(b)[0])
            targets.append(b.targets[0])
    finally:
        sampler.noise = TRAIN_NOISE
    return np.stack(inputs), np.stack(targets)


# --------------------------------------------------------------------------- the loop
def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + (1 - SSIM) on max-normalised targets."""
    return (pred - target).abs().mean() + 0.5 * (1 - ssim_torch(pred, target)).mean()


class _Prefetcher:
    """Builds batches for steps start..stop-1 (stop None: endless) in a background thread, in order."""

    def __init__(self, seed: int, start: int, stop: int | None, batch: int, crop: int, depth: int = 6):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        sampler = make_sampler(size=crop, seed=seed)  # owned by the worker thread (its field cache too)

        def work():
            for step in range(start, stop) if stop is not None else itertools.count(start):
                if self._stop.is_set():
                    return
                item = sample_batch(sampler, [seed, step], batch)
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue

        self.thread = threading.Thread(target=work, daemon=True, name="stmnet-prefetch")
        self.thread.start()

    def get(self):
        return self.q.get(timeout=120)

    def close(self):
        self._stop.set()


class _StepBatches(torch.utils.data.Dataset):
    """Training step -> its batch (``sample_batch`` seeded by (seed, step)). Each DataLoader worker
    process uses its own copy of the sampler; forked, they share the parent's warm field cache."""

    def __init__(self, sampler: PairSampler, seed: int, batch: int):
        self.sampler, self.seed, self.batch = sampler, seed, batch

    def __getitem__(self, step):
        return sample_batch(self.sampler, [self.seed, int(step)], self.batch)


class _WorkerBatches:
    """The batches of steps start..stop-1 (stop None: endless), in order, built by ``workers``
    processes; ``pin``: in page-locked memory, for asynchronous copies to the GPU."""

    def __init__(self, seed: int, start: int, stop: int | None, batch: int, crop: int, workers: int, pin: bool):
        sampler = make_sampler(size=crop, seed=seed)
        if workers > 1:  # fill the field cache once, before the fork, rather than once per worker
            sampler.warm_up()
        steps = range(start, stop) if stop is not None else itertools.count(start)
        loader = DataLoader(
            _StepBatches(sampler, seed, batch),
            batch_size=None,
            sampler=steps,
            num_workers=workers,
            pin_memory=pin,
            prefetch_factor=4,
        )
        self._batches = iter(loader)

    def get(self):
        return next(self._batches)

    def close(self):
        self._batches = None  # the loader's worker processes end with their iterator


def batch_stream(
    seed: int, start: int, stop: int | None, batch: int, crop: int, *, workers: int = 0, pin: bool = False
):
    """The training batches of steps start..stop-1 (``.get()`` each in turn, ``.close()``): from
    a background thread with ``workers=0``, else from that many processes. The same batches either way."""
    if workers == 0:
        return _Prefetcher(seed, start, stop, batch, crop)
    return _WorkerBatches(seed, start, stop, batch, crop, workers, pin)


def default_workers(device: torch.device) -> int:
    """Data worker processes: none on CPU (a thread prefetches; the cores train), all cores this
    process may use but two on CUDA (one feeds the GPU, one is left to the system), at most 32."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return min(32, max(1, cores - 2))


def _train_step(net: STMNet, opt, x: torch.Tensor, t: torch.Tensor, amp: bool) -> torch.Tensor:
    """One optimiser step on a batch; ``amp``: the network under bf16 autocast (the loss in fp32).
    Returns the loss, still on the device (reading it would wait for the GPU)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else nullcontext():
        pred = net(x)
    loss = loss_fn(pred.float(), t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.detach()


def _optimizer(net: STMNet, lr: float, device: torch.device):
    return torch.optim.AdamW(
        net.parameters(), lr=lr, weight_decay=1e-4, **({"fused": True} if device.type == "cuda" else {})
    )


def _on_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xb, tb = batch
    return tuple(torch.as_tensor(a)[:, None].to(device, non_blocking=True) for a in (xb, tb))


def one_cycle_lr(fraction: float, max_lr: float, pct_start: float = 0.05) -> float:
    """The learning rate ``torch.optim.lr_scheduler.OneCycleLR`` (cosine, default factors) gives
    at ``fraction`` of the run: what a time-budgeted run follows, by elapsed time."""
    start, end = max_lr / 25.0, max_lr / 25.0 / 1e4

    def cos(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2 * (math.cos(math.pi * min(max(pct, 0.0), 1.0)) + 1)

    if fraction < pct_start:
        return cos(start, max_lr, fraction / pct_start)
    return cos(max_lr, end, (fraction - pct_start) / (1 - pct_start))


def throughput(
    configs: dict[str, STMNetConfig],
    *,
    device: str = "auto",
    batch: int | None = None,
    crop: int | None = None,
    workers: int | None = None,
    seconds: float = 10.0,
    seed: int = 0,
) -> dict:
    """What training runs at here, each rate over ``seconds`` after a warm-up: ``pairs_per_s`` the
    data pipeline delivers alone, and per config ``steps_per_s`` on one batch already on the device
    (the network's own rate) and ``end_to_end_steps_per_s`` fed by the pipeline, as ``train_main``
    runs (defaults by device: batch, crop, workers, bf16 on CUDA)."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    batch, crop = batch or (GPU_BATCH if cuda else CPU_BATCH), crop or (GPU_CROP if cuda else CPU_CROP)
    workers = default_workers(dev) if workers is None else int(workers)
    result = {"device": str(dev), "batch": batch, "crop": crop, "workers": workers, "configs": {}}
    stream = batch_stream(seed, 0, None, batch, crop, workers=workers, pin=cuda)

    def rate(step, warm: int = 2) -> float:
        for _ in range(warm):
            step()
        sync_device(dev)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            step()
            n += 1
        sync_device(dev)
        return n / (time.perf_counter() - t0)

    try:
        result["pairs_per_s"] = batch * rate(stream.get)
        for name, config in configs.items():
            net = STMNet(config).to(dev).train()
            opt = _optimizer(net, 1e-4, dev)
            x, t = _on_device(stream.get(), dev)
            result["configs"][name] = {
                "config": asdict(config),
                "params": sum(p.numel() for p in net.parameters()),
                "steps_per_s": rate(lambda net=net, opt=opt, x=x, t=t: _train_step(net, opt, x, t, cuda)),
                "end_to_end_steps_per_s": rate(
                    lambda net=net, opt=opt: _train_step(net, opt, *_on_device(stream.get(), dev), cuda)
                ),
            }
    finally:
        stream.close()
    return result


def _validate_net(net: STMNet, device, val) -> tuple[float, float]:
    net.eval()
    with torch.inference_mode():
        x = torch.from_numpy(val[0])[:, None].to(device)
        t = torch.from_numpy(val[1])[:, None].to(device)
        p = net(x)
        pn, tn = minmax(p.double()), minmax(t.double())
        mse = ((pn - tn) ** 2).flatten(1).mean(1)
        psnr = float((10 * torch.log10(1 / mse)).mean())
        ss = float(ssim_torch(pn, tn).mean())
    net.train()
    return psnr, ss


def train_main(
    steps: int | None = 4000,
    out=None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    *,
    batch: int | None = None,
    crop: int | None = None,
    lr: float = 2e-3,
    threads: int = 2,
    config: STMNetConfig | None = None,
    val_every: int = 500,
    ckpt_every: int = 500,
    final_eval_samples: int | None = None,
    quiet: bool = False,
    init: Path | None = None,
    minutes: float | None = None,
    workers: int | None = None,
) -> dict:
    """Train STM-Net and write ``out`` (checkpoint), ``out.sha256`` and the model card.

    ``init``: warm start from a (hash-verified) STM-Net checkpoint, whose architecture is kept;
    the new run has its own learning-rate cycle and data stream (``seed``), and the card and
    checkpoint record the lineage (``init_sha256``, ``total_steps``).
    ``minutes``: stop the training loop after this much wall-clock time (``steps``, if not None,
    still caps it); the learning-rate cycle then runs by elapsed time, and validation and the
    resumable state come every tenth of the budget. The final evaluation comes after it.
    ``batch``, ``crop``: default 12 x 64 px on CPU, ``GPU_BATCH`` x ``GPU_CROP`` on CUDA;
    ``workers``: data processes (``default_workers``).
    """
    if steps is None and minutes is None:
        raise ValueError("give a number of steps or a time budget (minutes)")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes}")
    out = Path(out) if out is not None else DEFAULT_CHECKPOINT
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_name(out.stem + ".train_state.pt")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    batch, crop = batch or (GPU_BATCH if cuda else CPU_BATCH), crop or (GPU_CROP if cuda else CPU_CROP)
    workers = default_workers(dev) if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    budget_s = None if minutes is None else 60.0 * minutes
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    parent_steps, init_sha = 0, None
    if init is not None:
        parent = load_stmnet(device="cpu", path=init)
        if config is not None and config != parent.net.config:
            raise ValueError(f"--init: {init} has architecture {asdict(parent.net.config)}, not {asdict(config)}")
        net = parent.net.train().to(dev)
        parent_steps = int(parent.info.get("total_steps", parent.info.get("steps", 0)))
        init_sha = parent.info["sha256"]
    else:
        net = STMNet(config or STMNetConfig()).to(dev)
    opt = _optimizer(net, lr, dev)
    # by steps: OneCycleLR over them; by time: the same cycle over the budget (one_cycle_lr)
    sched = (
        None
        if budget_s is not None
        else torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    )
    start, history, elapsed_before = 0, [], 0.0
    if resume:
        if not state_path.is_file():
            raise ValueError(f"--resume: no training state at {state_path}; start without --resume")
        st = torch.load(state_path, map_location=dev, weights_only=True)
        saved = (st["steps"], st.get("minutes"))
        if saved != (steps, minutes):

            def plan(n, m):
                return f"--steps {n}" if m is None else f"--minutes {m:g}" + (f" --steps {n}" if n else "")

            raise ValueError(f"--resume: saved run was for {plan(*saved)}, not {plan(steps, minutes)}")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        if sched is not None:
            sched.load_state_dict(st["sched"])
        start, elapsed_before = int(st["step"]), float(st["elapsed_s"])
        history = [tuple(h) for h in st["history"].tolist()]
    val = sample_batch(make_sampler(HELD_OUT_MOLECULES, size=96, seed=VAL_SEED), [seed, VAL_SEED], 32)
    prefetch = batch_stream(seed, start, steps, batch, crop, workers=workers, pin=cuda)
    t0 = time.perf_counter()
    wait_s, loss_ema, pending = 0.0, None, []
    sync_every = 20 if cuda else 1  # reading a loss waits for the GPU: fold them into the EMA in groups
    net.train()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def fold_losses() -> None:
        nonlocal loss_ema
        for lv in torch.stack(pending).tolist() if pending else ():
            loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        pending.clear()

    def save_state(step):
        torch.save(
            {
                "model": net.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict() if sched else {},
                "step": step,
                "steps": steps,
                "minutes": minutes,
                "elapsed_s": elapsed(),
                "history": torch.tensor(history or [(0, 0.0, 0.0, 0.0)], dtype=torch.float64),
            },
            state_path,
        )

    def validate(done: int) -> None:
        fold_losses()
        p, s = _validate_net(net, dev, val)
        history.append((done, loss_ema, p, s))
        logger.info("step %d: loss %.4f, val PSNR %.2f dB, SSIM %.4f, %.0f s", done, loss_ema, p, s, elapsed())

    timed = budget_s is not None
    progress = Progress(
        TextColumn("[bold]STM-Net"),
        BarColumn(),
        TextColumn("{task.fields[steps]}" if timed else "{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=quiet,
    )
    done = start
    next_mark = (math.floor(elapsed_before / budget_s * 10) + 1) / 10 if timed else None  # budget tenths
    try:
        with progress:
            task = progress.add_task(
                "train",
                total=budget_s if timed else steps,
                completed=elapsed_before if timed else start,
                info="",
                steps="",
            )
            while steps is None or done < steps:
                if timed:
                    fraction = elapsed() / budget_s
                    if fraction >= 1:
                        break
                    for group in opt.param_groups:
                        group["lr"] = one_cycle_lr(max(fraction, done / steps if steps else 0.0), lr)
                tw = time.perf_counter()
                x, t = _on_device(prefetch.get(), dev)
                wait_s += time.perf_counter() - tw
                pending.append(_train_step(net, opt, x, t, amp=cuda))
                if sched is not None:
                    sched.step()
                done += 1
                if timed:
                    mark = elapsed() >= next_mark * budget_s
                    if mark:
                        next_mark = (math.floor(elapsed() / budget_s * 10) + 1) / 10
                    validate_now, save_now = mark, mark
                else:
                    validate_now = done % val_every == 0 or done == steps
                    save_now = done % ckpt_every == 0 and done < steps
                if validate_now:
                    validate(done)
                if save_now and (steps is None or done < steps):
                    save_state(done)
                if validate_now or len(pending) >= sync_every:
                    fold_losses()
                    last = history[-1] if history else None
                    progress.update(
                        task,
                        completed=elapsed() if timed else done,
                        steps=f"{done} steps",
                        info=f"loss {loss_ema:.4f}" + (f" | val {last[2]:.1f} dB SSIM {last[3]:.3f}" if last else ""),
                    )
            if not history or history[-1][0] != done:
                validate(done)
    finally:
        prefetch.close()
    wall = elapsed()
    lineage = (
        {"init_sha256": init_sha, "init_steps": parent_steps, "total_steps": parent_steps + done}
        if init_sha
        else {"total_steps": done}
    )
    net.eval()
    digest = save_checkpoint(
        out, net.cpu(), asdict(net.config), pixel_size_nm=TRAIN_PIXEL_SIZE_NM, steps=done, seed=seed, **lineage
    )
    summary = {
        "steps": done,
        **lineage,
        "wall_s": wall,
        "data_wait_s": wait_s,
        "history": history,
        "sha256": digest,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if cuda else ""),
        "params": sum(p.numel() for p in net.parameters()),
        "config": asdict(net.config),
        "minutes": minutes,
        "workers": workers,
        "bf16": cuda,
        "pairs_per_s": done * batch / max(wall, 1e-9),
    }
    # final metrics with the Reconstructor exactly as users run it
    rec = load_stmnet(device=dev.type, path=out)
    if final_eval_samples is None:  # frames per cell: 4 for a real run, 1 for a smoke run
        final_eval_samples = min(4, max(1, done // 2500))
    summary["quality"] = quality_tables(rec, samples=final_eval_samples, seed=1234, noise_levels=(0.0, 0.05, 0.1))
    summary["latency_ms"] = {size: latency_ms(rec, size) for size in (128, 256, 512)}
    summary["symmetry_views"] = rec.views
    summary["inference"] = f"{rec.acceleration.precision}, {'fast path' if rec.acceleration.fast else 'reference path'}"
    _write_card(out, summary, batch=batch, crop=crop, lr=lr, seed=seed, threads=threads)
    if state_path.exists():
        state_path.unlink()
    return summary


def evaluate_main(
    device: str = "auto",
    samples: int = 8,
    seed: int = 1234,
    cubes=(),
    cube_mo: int = 0,
    vacuum_from_nm: float | None = None,
) -> dict:
    """``stm-live evaluate --model stmnet``: quality tables, noise curve and latency by symmetry
    views (``result["latency"]``) of the shipped checkpoint; with ``cubes``, the quality table on
    those cube files' orbitals instead. The command prints ``metrics.format_quality(result)``
    and, when there, ``metrics.format_latency(result["latency"])``."""
    rec = load_stmnet(device=device)
    if cubes:
        return cube_quality(rec, cubes, samples=samples, seed=seed, mo=cube_mo, vacuum_from_nm=vacuum_from_nm)
    result = quality_tables(rec, samples=samples, seed=seed)
    result["latency"] = latency_by_views(rec)
    return result


def _write_card(out: Path, s: dict, *, batch, crop, lr, seed, threads) -> Path:
    command = card_command()
    q = s["quality"]
    lines = [
        "# STM-Net model card",
        "",
        f"- file: `{out.name}` ({out.stat().st_size / 1e6:.2f} MB), sha256 `{s['sha256']}` "
        f"(also in `{hash_path(out).name}`)",
        f"- architecture: U-Net `{s['config']}`, {s['params']:,} parameters, "
        "GroupNorm/ReLU, max-pool encoder, bilinear decoder, softplus(residual) output",
        f"- trained with: `{command}`",
        f"- steps: {s['steps']}"
        + (
            f" (the steps that fit a {s['minutes']:g} min budget; the one-cycle learning rate runs by elapsed time)"
            if s.get("minutes")
            else ""
        )
        + f", batch {batch}, crops {crop}x{crop} px at {TRAIN_PIXEL_SIZE_NM} nm/px, "
        f"AdamW lr {lr} one-cycle, weight decay 1e-4, seed {seed}" + (", bf16 autocast" if s.get("bf16") else ""),
        *(
            [
                f"- warm start: from the checkpoint with sha256 `{s['init_sha256']}` ({s['init_steps']} steps; "
                f"its card is in the project history), {s['total_steps']} steps in all"
            ]
            if "init_sha256" in s
            else []
        ),
        "- loss: L1 + 0.5 (1 - SSIM) on max-normalised |psi|^2 targets",
        f"- wall time: {s['wall_s'] / 60:.1f} min (of which waiting for data {s['data_wait_s']:.0f} s; "
        f"{s['pairs_per_s']:.0f} pairs/s; "
        + (
            f"{s['workers']} data worker process{'es' * (s['workers'] > 1)})"
            if s.get("workers")
            else "pairs built by a prefetch thread)"
        ),
        f"- hardware: {s['device']}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPU cores visible, torch {torch.__version__}, {threads} torch threads",
        "",
        "## Data recipe",
        "",
        "Simulated on the fly by `stm_live.simulators.pairs.PairSampler` (the project's one forward "
        "model; `stm_live/models/training.py` docstring and `TRAIN_RECIPE` have the details): molecules "
        f"{', '.join(TRAIN_MOLECULES)}; {crop}x{crop} px at {TRAIN_PIXEL_SIZE_NM} nm/px; orbitals "
        "HOMO-2..LUMO+2 (degenerate partners summed); tip heights 0.25-0.6 nm; random CO-like tips "
        f"(s share 0-0.6, p_x/p_y imbalance, a little p_z; {TRAIN_RECIPE['coherent_prob']:.0%} coherent s-p_z, "
        f"{TRAIN_RECIPE['tilt_prob']:.0%} tilted 5-25 deg); "
        "1-3 molecules per frame at random position/rotation; NaCl-like substrate pattern on half the "
        "frames; constant height (2/3) and constant current (1/3, Z map in nm converted with "
        '`current_from_z(z, unit="nm")`); 30 % clean, the rest white + 1/f + row-offset noise at '
        f"{TRAIN_NOISE[0]:g}-{TRAIN_NOISE[1]:g} of the input's peak-to-peak. Inputs normalised with "
        "`inputs.normalise`; targets: s-wave sum |psi|^2 at the same height, max 1.",
        "",
        f"**Held-out molecules (never used in training): {', '.join(HELD_OUT_MOLECULES)}.**",
        "",
        "## Validation during training",
        "",
        "32 fixed held-out-molecule frames from the same sampler recipe, 96x96, mixed noise (monitoring only).",
        "",
        "| step | loss (EMA) | PSNR dB | SSIM |",
        "|---|---|---|---|",
    ]
    lines += [f"| {int(h[0])} | {h[1]:.4f} | {h[2]:.2f} | {h[3]:.4f} |" for h in s["history"]]
    rec_views = s["symmetry_views"]
    lines += [
        "",
        f"## Final metrics (clean inputs, min-max normalised, SSIM Gaussian 11/1.5; output averaged over "
        f"{rec_views} symmetry views, `stmnet.SYMMETRY_VIEWS`)",
        "",
        "| set | n | STM-Net PSNR | STM-Net SSIM | identity PSNR | identity SSIM | classical PSNR | classical SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, r in q["summary"].items():
        lines.append(
            f"| {split} | {r['stmnet'][2]} | {r['stmnet'][0]:.2f} | {r['stmnet'][1]:.4f} | "
            f"{r['identity'][0]:.2f} | {r['identity'][1]:.4f} | {r['classical'][0]:.2f} | "
            f"{r['classical'][1]:.4f} |"
        )
    lines += [
        "",
        "Noise degradation (held-out; constant height: white noise sigma as a fraction of p99.5; "
        "constant current: Z noise sigma = level x 0.02 nm):",
        "",
        "| noise | STM-Net PSNR / SSIM | identity PSNR / SSIM | classical PSNR / SSIM |",
        "|---|---|---|---|",
    ]
    for level, r in q["noise_curve"]:
        lines.append(
            f"| {level:.2f} | "
            + " | ".join(f"{r[k][0]:.2f} / {r[k][1]:.4f}" for k in ("stmnet", "identity", "classical"))
            + " |"
        )
    lines += [
        "",
        "Evaluation frames: `metrics.make_eval_pairs` (exact `simulators.imaging` renders, "
        "`tip.TIP_PRESETS` tips co / coherent_co / tilted_co plus co with s = 0.4, one molecule, "
        "z 0.3-0.5 nm, 96x96 px, fixed seeds).",
        "",
    ]
    if s.get("latency_ms"):
        lines += [
            f"Inference latency (`Reconstructor.reconstruct` averaging {rec_views} symmetry views, "
            f"{s['device']}, {s.get('inference', 'fp32')}, {threads} torch threads, median of 5):",
            "",
            "| frame | ms |",
            "|---|---|",
        ]
        lines += [f"| {k}x{k} | {v:.1f} |" for k, v in s["latency_ms"].items()]
    lines += [
        "",
        "Classical baseline: linearised Chen-rule Tikhonov inversion (`metrics.chen_tikhonov`). "
        "Reproduce the tables with `stm-live evaluate --model stmnet`; LPIPS is not reported "
        "(it needs ImageNet weights fetched at run time).",
        "",
    ]
    card = out.with_name("STMNET_MODEL_CARD.md") if out.name == "stmnet.pt" else out.with_suffix(".md")
    card.write_text("\n".join(lines))
    return card
