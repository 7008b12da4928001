"""STM-Net training: on-the-fly simulated pairs (CO-tip image -> |psi|^2) and the loop.

Data recipe (one sample = one frame, ``crop`` x ``crop`` pixels at ``TRAIN_PIXEL_SIZE_NM``):

- 1-3 molecules from ``TRAIN_MOLECULES`` (never ``HELD_OUT_MOLECULES``), each at a random
  position, rotation and lateral scale (0.93-1.07), each showing one level drawn from
  HOMO-2..LUMO+2 (all partners of a degenerate group, summed incoherently);
  fields psi, d_x psi, d_y psi, d_z psi from ``stm_live.simulators.orbitals.orbital_fields``.
- tip height z = 0.25-0.6 nm above the molecular plane.
- tip: s share 0-0.6 (70 %) or the CO preset 0.13; p_x/p_y imbalance up to +-15 %;
  variants: incoherent (Chen: I = w_s|psi|^2 + w_x|d_x psi/k|^2 + w_y|d_y psi/k|^2),
  coherent s-p_z mixing (|sqrt(w_s) psi +- sqrt(w_z) d_z psi/k|^2 + p terms), tilted CO
  (p axes tilted 5-25 deg towards z at a random azimuth).
- mode: constant height (70 %) or constant current (30 %): the contour z(x, y) follows
  from the currents at z and z + 0.05 nm with the local decay rate, gets height noise, and is
  turned back into a current-like image with ``stmnet.current_from_z`` (what users do).
- noise (constant height): clean (40 %) or white noise sigma = 0.5-15 % of the image's
  99.5th percentile (log-uniform), plus row offsets (20 %) and smooth 1/f-like noise (15 %).
- target: s-wave image sum |psi|^2 at the same height, normalised to max 1.

``stm_live.simulators.pairs`` (the physics engineer's sampler) was not available when the
shipped checkpoint was trained, so the pairs are assembled here from ``orbitals.py``
fields with the same Chen-rule forward model (and the variants above).
"""

from __future__ import annotations

import math
import os
import platform
import queue
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stm_live.models.stmnet import (
    DEFAULT_CHECKPOINT, KAPPA_PER_NM, STMNet, STMNetConfig, current_from_z, hash_path, normalise,
    resolve_device, sha256_of,
)

TRAIN_PIXEL_SIZE_NM = 0.05
# The project's one held-out list (stm_live.simulators.pairs): never used in training.
HELD_OUT_MOLECULES: tuple[str, ...] = ("perylene", "triphenylene", "h2nc")
ORBITAL_LABELS = ("HOMO-2", "HOMO-1", "HOMO", "LUMO", "LUMO+1", "LUMO+2")


def _train_molecules() -> tuple[str, ...]:
    from stm_live.simulators.orbitals import MOLECULE_NAMES

    return tuple(n for n in MOLECULE_NAMES if n not in HELD_OUT_MOLECULES)


TRAIN_MOLECULES: tuple[str, ...] = _train_molecules()


# --------------------------------------------------------------------------- physics of one frame
@dataclass(frozen=True)
class TipSpec:
    s: float = 0.13  # s share; the rest is p_x + p_y (+ p_z)
    px_py_imbalance: float = 0.0  # w_x = (1-s-pz)(0.5 + a), w_y = (1-s-pz)(0.5 - a)
    pz: float = 0.0
    coherent: bool = False  # s and p_z add as amplitudes
    tilt_deg: float = 0.0
    tilt_azimuth_deg: float = 0.0


EVAL_TIPS = {
    "co": TipSpec(),
    "co_s40": TipSpec(s=0.4),
    "co_coherent": TipSpec(s=0.2, pz=0.1, coherent=True),
    "co_tilted": TipSpec(tilt_deg=15.0, tilt_azimuth_deg=30.0),
}


def _level(name: str, label: str):
    from stm_live.simulators.orbitals import orbital_level

    try:
        return orbital_level(name, label)
    except ValueError:  # e.g. benzene has no HOMO-2 of its own: fall back to the frontier level
        return orbital_level(name, "HOMO" if label.startswith("HOMO") else "LUMO")


def _molecule_fields(name, label, x, y, z, x0, y0, rot_deg, scale):
    """(k, 4, H, W) fields in the frame's axes: psi, d_x psi, d_y psi, d_z psi."""
    from stm_live.simulators.orbitals import orbital_fields

    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    xl = (c * (x - x0) + s * (y - y0)) / scale
    yl = (-s * (x - x0) + c * (y - y0)) / scale
    f = orbital_fields(_level(name, label), xl, yl, z)
    gx = (f[:, 1] * c - f[:, 2] * s) / scale
    gy = (f[:, 1] * s + f[:, 2] * c) / scale
    return np.stack([f[:, 0], gx, gy, f[:, 3]], axis=1)


def co_image(fields: np.ndarray, tip: TipSpec) -> np.ndarray:
    """Chen derivative rule (Chen 1990; Gross et al. PRL 2011): tip orbital p_i sees d_i psi."""
    k = KAPPA_PER_NM
    psi, dx, dy, dz = fields[:, 0], fields[:, 1] / k, fields[:, 2] / k, fields[:, 3] / k
    p_tot = max(0.0, 1.0 - tip.s - tip.pz)
    wx, wy = p_tot * (0.5 + tip.px_py_imbalance), p_tot * (0.5 - tip.px_py_imbalance)
    if tip.tilt_deg:
        t, a = math.radians(tip.tilt_deg), math.radians(tip.tilt_azimuth_deg)
        d1 = math.cos(t) * (math.cos(a) * dx + math.sin(a) * dy) + math.sin(t) * dz
        d2 = -math.sin(a) * dx + math.cos(a) * dy
        dx, dy = d1, d2
    if tip.coherent:
        image = (math.sqrt(tip.s) * psi + math.sqrt(tip.pz) * dz) ** 2
    else:
        image = tip.s * psi**2 + tip.pz * dz**2
    image = image + wx * dx**2 + wy * dy**2
    return image.sum(axis=0)


def _grid(size: int, px: float):
    c = (np.arange(size) - (size - 1) / 2) * px
    y, x = np.meshgrid(-c, c, indexing="ij")  # row 0 = top (+y), columns left -> right
    return x, y


def render_pair(rng: np.random.Generator, placements, size: int, px: float, z: float, tip: TipSpec,
                mode: str = "height", noise: float = 0.0, extras: bool = False):
    """Input (normalised like the Reconstructor does) and target (max 1) for one frame.

    placements: list of (molecule, label, x0, y0, rotation_deg, scale).
    """
    x, y = _grid(size, px)
    fields = [_molecule_fields(m, lab, x, y, z, x0, y0, r, s) for (m, lab, x0, y0, r, s) in placements]
    target = sum((f[:, 0] ** 2).sum(axis=0) for f in fields)
    image = sum(co_image(f, tip) for f in fields)
    if mode == "current":
        dz = 0.05
        fields2 = [_molecule_fields(m, lab, x, y, z + dz, x0, y0, r, s) for (m, lab, x0, y0, r, s) in placements]
        image2 = sum(co_image(f, tip) for f in fields2)
        floor = rng.uniform(0.01, 0.1) * image.max()  # substrate current, same vacuum decay
        i1, i2 = image + floor, image2 + floor * math.exp(-2 * KAPPA_PER_NM * dz)
        kappa2 = np.clip(np.log(i1 / i2) / dz, 0.5 * KAPPA_PER_NM, 4 * KAPPA_PER_NM)  # local 2*kappa
        setpoint = np.percentile(i1, rng.uniform(20, 60))
        z_map = z + np.log(i1 / setpoint) / kappa2  # contour where I(z_map) = setpoint
        if noise or extras:
            z_map = z_map + rng.normal(0, noise * 0.02 if noise else rng.uniform(0, 0.003), z_map.shape)
        image = current_from_z(z_map, unit="nm").astype(np.float64)
    else:
        if extras:  # substrate background current
            image = image + rng.uniform(0, 0.02) * image.max()
        scale = np.percentile(image, 99.5)
        if noise:
            image = image + rng.normal(0, noise * scale, image.shape)
        if extras:
            if rng.random() < 0.2:
                image = image + rng.normal(0, rng.uniform(0, 0.05) * scale, (size, 1))
            if rng.random() < 0.15:
                from scipy.ndimage import gaussian_filter

                smooth = gaussian_filter(rng.normal(0, 1, image.shape), rng.uniform(2, 6))
                image = image + smooth / (smooth.std() + 1e-12) * rng.uniform(0, 0.05) * scale
    target = target / max(float(target.max()), 1e-30)
    return normalise(image.astype(np.float32)), target.astype(np.float32)


def random_tip(rng: np.random.Generator) -> TipSpec:
    s = rng.uniform(0.0, 0.6) if rng.random() < 0.7 else 0.13
    imb = rng.uniform(-0.15, 0.15) if rng.random() < 0.5 else 0.0
    variant = rng.random()
    if variant < 0.2:
        return TipSpec(s=s, px_py_imbalance=imb, pz=rng.uniform(0.02, 0.15), coherent=True)
    if variant < 0.4:
        return TipSpec(s=s, px_py_imbalance=imb, tilt_deg=rng.uniform(5, 25),
                       tilt_azimuth_deg=rng.uniform(0, 360))
    return TipSpec(s=s, px_py_imbalance=imb, pz=rng.uniform(0, 0.05) if rng.random() < 0.3 else 0.0)


def random_pair(rng: np.random.Generator, molecules, size: int, px: float):
    fov = size * px
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    placements = []
    for i in range(n):
        spread = 0.25 if i == 0 else 0.5
        placements.append((
            str(rng.choice(molecules)), str(rng.choice(ORBITAL_LABELS)),
            rng.uniform(-spread, spread) * fov, rng.uniform(-spread, spread) * fov,
            rng.uniform(0, 360), rng.uniform(0.93, 1.07)))
    z = rng.uniform(0.25, 0.6)
    mode = "current" if rng.random() < 0.3 else "height"
    noise = 0.0 if rng.random() < 0.4 else float(np.exp(rng.uniform(np.log(0.005), np.log(0.15))))
    if mode == "current":
        noise = 0.0
    return render_pair(rng, placements, size, px, z, random_tip(rng), mode=mode, noise=noise, extras=True)


def sample_batch(seed_seq, n: int, molecules=None, size: int = 72, px: float = TRAIN_PIXEL_SIZE_NM):
    """(n, size, size) inputs and targets, deterministic in ``seed_seq``."""
    rng = np.random.default_rng(seed_seq)
    molecules = tuple(molecules or TRAIN_MOLECULES)
    pairs = [random_pair(rng, molecules, size, px) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# --------------------------------------------------------------------------- evaluation cells
def eval_cells(split: str) -> list[dict]:
    """Fixed (molecule, orbital, tip, mode) cells for ``stm-live evaluate`` and the benchmark."""
    if split == "held-out":
        mols, tips = HELD_OUT_MOLECULES, ("co", "co_s40", "co_coherent", "co_tilted")
    elif split == "in-distribution":
        mols, tips = ("naphthalene", "pyrene", "h2pc", "ptcda"), ("co", "co_tilted")
    else:
        raise ValueError(f"split must be 'in-distribution' or 'held-out', got {split!r}")
    cells = [{"molecule": m, "orbital": o, "tip": t, "mode": "height"}
             for m in mols for o in ("HOMO", "LUMO") for t in tips]
    cells += [{"molecule": m, "orbital": "HOMO", "tip": "co", "mode": "current"} for m in mols]
    return cells


def make_eval_pairs(cell: dict, n: int, *, seed: int = 1234, size: int = 96,
                    pixel_size_nm: float = TRAIN_PIXEL_SIZE_NM, noise: float = 0.0):
    """``n`` frames of one cell: one molecule near the centre, random rotation, z 0.3-0.5 nm."""
    key = sum(ord(ch) for ch in "|".join(str(v) for v in cell.values()))
    rng = np.random.default_rng([seed, key, int(noise * 1000)])
    tip = EVAL_TIPS[cell["tip"]]
    ins, tgs = [], []
    fov = size * pixel_size_nm
    for _ in range(n):
        placement = (cell["molecule"], cell["orbital"], rng.uniform(-0.05, 0.05) * fov,
                     rng.uniform(-0.05, 0.05) * fov, rng.uniform(0, 360), 1.0)
        x, t = render_pair(rng, [placement], size, pixel_size_nm, rng.uniform(0.3, 0.5), tip,
                           mode=cell["mode"], noise=noise)
        ins.append(x)
        tgs.append(t)
    return np.stack(ins), np.stack(tgs)


# --------------------------------------------------------------------------- the loop
def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + (1 - SSIM) on max-normalised targets."""
    from stm_live.models.metrics import ssim_torch

    return (pred - target).abs().mean() + 0.5 * (1 - ssim_torch(pred, target)).mean()


class _Prefetcher:
    """Builds batches for steps start..steps-1 in a background thread, in order."""

    def __init__(self, seed: int, start: int, steps: int, batch: int, crop: int, depth: int = 6):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work():
            for step in range(start, steps):
                if self._stop.is_set():
                    return
                item = sample_batch([seed, step], batch, size=crop)
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


def _validate_net(net: STMNet, device, val) -> tuple[float, float]:
    from stm_live.models.metrics import minmax, ssim_torch

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


def train_main(steps: int = 4000, out=None, device: str = "auto", seed: int = 0, resume: bool = False, *,
               batch: int = 12, crop: int = 64, lr: float = 2e-3, threads: int = 2,
               config: STMNetConfig | None = None, val_every: int = 200, ckpt_every: int = 200,
               final_eval_samples: int = 4, quiet: bool = False) -> dict:
    """Train STM-Net and write ``out`` (checkpoint), ``out.sha256`` and the model card."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = Path(out) if out is not None else DEFAULT_CHECKPOINT
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_name(out.stem + ".train_state.pt")
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = STMNet(config or STMNetConfig()).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, history, elapsed_before = 0, [], 0.0
    if resume:
        if not state_path.is_file():
            raise ValueError(f"--resume: no training state at {state_path}; start without --resume")
        st = torch.load(state_path, map_location=dev, weights_only=True)
        if int(st["steps"]) != steps:
            raise ValueError(f"--resume: saved run was for --steps {int(st['steps'])}, not {steps}")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start, elapsed_before = int(st["step"]), float(st["elapsed_s"])
        history = [tuple(h) for h in st["history"].tolist()]
    val = sample_batch([seed, 10**9], 32, size=96)
    prefetch = _Prefetcher(seed, start, steps, batch, crop)
    t0 = time.perf_counter()
    wait_s, loss_ema = 0.0, None
    net.train()

    def save_state(step):
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "steps": steps, "elapsed_s": elapsed_before + time.perf_counter() - t0,
                    "history": torch.tensor(history or [(0, 0.0, 0.0, 0.0)], dtype=torch.float64)},
                   state_path)

    progress = Progress(TextColumn("[bold]STM-Net"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=quiet)
    try:
        with progress:
            task = progress.add_task("train", total=steps, completed=start, info="")
            for step in range(start, steps):
                tw = time.perf_counter()
                xb, tb = prefetch.get()
                wait_s += time.perf_counter() - tw
                x = torch.from_numpy(xb)[:, None].to(dev)
                t = torch.from_numpy(tb)[:, None].to(dev)
                loss = loss_fn(net(x), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
                lv = float(loss.detach())
                loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
                done = step + 1
                if done % val_every == 0 or done == steps:
                    p, s = _validate_net(net, dev, val)
                    history.append((done, loss_ema, p, s))
                    progress.console.print(f"step {done}: loss {loss_ema:.4f}, val PSNR {p:.2f} dB, SSIM {s:.4f}, "
                                           f"{elapsed_before + time.perf_counter() - t0:.0f} s")
                    sys.stdout.flush()
                if done % ckpt_every == 0 and done < steps:
                    save_state(done)
                last = history[-1] if history else None
                progress.update(task, completed=done, info=f"loss {loss_ema:.4f}" + (
                    f" | val {last[2]:.1f} dB SSIM {last[3]:.3f}" if last else ""))
    finally:
        prefetch.close()
    wall = elapsed_before + time.perf_counter() - t0
    net.eval()
    torch.save(net.cpu().checkpoint(pixel_size_nm=TRAIN_PIXEL_SIZE_NM, steps=steps, seed=seed), out)
    digest = sha256_of(out)
    hash_path(out).write_text(f"{digest}  {out.name}\n")
    summary = {"steps": steps, "wall_s": wall, "data_wait_s": wait_s, "history": history, "sha256": digest,
               "device": str(dev), "params": sum(p.numel() for p in net.parameters())}
    # final metrics with the Reconstructor exactly as users run it
    from stm_live.models.metrics import quality_tables
    from stm_live.models.stmnet import load_stmnet

    rec = load_stmnet(device=dev.type, path=out)
    summary["quality"] = quality_tables(rec, samples=final_eval_samples, seed=1234, noise_levels=(0.0, 0.05, 0.1))
    _write_card(out, summary, batch=batch, crop=crop, lr=lr, seed=seed, threads=threads)
    if state_path.exists():
        state_path.unlink()
    return summary


def _write_card(out: Path, s: dict, *, batch, crop, lr, seed, threads) -> Path:
    argv = sys.argv[:]
    if argv and argv[0].endswith("stm-live"):
        argv[0] = "stm-live"
    command = " ".join(shlex.quote(a) for a in ([os.path.basename(argv[0])] + argv[1:])) if argv else "?"
    q = s["quality"]
    lines = [
        "# STM-Net model card",
        "",
        f"- file: `{out.name}` ({out.stat().st_size / 1e6:.2f} MB), sha256 `{s['sha256']}` (also in `{hash_path(out).name}`)",
        f"- architecture: U-Net `{asdict(STMNetConfig())}`, {s['params']:,} parameters, "
        "GroupNorm/ReLU, max-pool encoder, bilinear decoder, softplus(residual) output",
        f"- trained with: `{command}`",
        f"- steps: {s['steps']}, batch {batch}, crops {crop}x{crop} px at {TRAIN_PIXEL_SIZE_NM} nm/px, "
        f"AdamW lr {lr} one-cycle, weight decay 1e-4, seed {seed}",
        f"- loss: L1 + 0.5 (1 - SSIM) on max-normalised |psi|^2 targets",
        f"- wall time: {s['wall_s'] / 60:.1f} min (of which waiting for data {s['data_wait_s']:.0f} s)",
        f"- hardware: {s['device']}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPU cores visible, torch {torch.__version__}, {threads} torch threads",
        "",
        "## Data recipe",
        "",
        "Simulated on the fly (`stm_live/models/training.py` docstring has the details): molecules "
        f"{', '.join(TRAIN_MOLECULES)}; orbitals HOMO-2..LUMO+2 (degenerate partners summed); "
        "tip heights 0.25-0.6 nm; CO tips with s share 0-0.6, p_x/p_y imbalance, coherent s-p_z and "
        "tilted variants; 1-3 molecules per frame at random position/rotation/scale (0.93-1.07); "
        "constant height (70 %) and constant current converted with `current_from_z` (30 %); "
        "clean to noisy (white noise up to 15 % of p99.5, row offsets, smooth noise). Fields come from "
        "`stm_live.simulators.orbitals` (Hückel + l=1 vacuum orbitals).",
        "",
        f"**Held-out molecules (never used in training): {', '.join(HELD_OUT_MOLECULES)}.**",
        "",
        "## Validation during training (32 fixed training-distribution frames, 96x96, mixed noise)",
        "",
        "| step | loss (EMA) | PSNR dB | SSIM |",
        "|---|---|---|---|",
    ]
    lines += [f"| {int(h[0])} | {h[1]:.4f} | {h[2]:.2f} | {h[3]:.4f} |" for h in s["history"]]
    lines += ["", "## Final metrics (clean inputs, min-max normalised, SSIM Gaussian 11/1.5)", "",
              "| set | n | STM-Net PSNR | STM-Net SSIM | identity PSNR | identity SSIM | classical PSNR | classical SSIM |",
              "|---|---|---|---|---|---|---|---|"]
    for split, r in q["summary"].items():
        lines.append(f"| {split} | {r['stmnet'][2]} | {r['stmnet'][0]:.2f} | {r['stmnet'][1]:.4f} | "
                     f"{r['identity'][0]:.2f} | {r['identity'][1]:.4f} | {r['classical'][0]:.2f} | "
                     f"{r['classical'][1]:.4f} |")
    lines += ["", "Noise degradation (held-out; white noise sigma as a fraction of p99.5):", "",
              "| noise | STM-Net PSNR / SSIM | identity PSNR / SSIM | classical PSNR / SSIM |", "|---|---|---|---|"]
    for level, r in q["noise_curve"]:
        lines.append(f"| {level:.2f} | " + " | ".join(f"{r[k][0]:.2f} / {r[k][1]:.4f}"
                                                      for k in ("stmnet", "identity", "classical")) + " |")
    lines += ["", "Classical baseline: linearised Chen-rule Tikhonov inversion (`metrics.chen_tikhonov`). "
              "Reproduce the tables with `stm-live evaluate --model stmnet`; LPIPS is not reported "
              "(it needs ImageNet weights fetched at run time).", ""]
    card = out.with_name("STMNET_MODEL_CARD.md") if out.name == "stmnet.pt" else out.with_suffix(".md")
    card.write_text("\n".join(lines))
    return card
