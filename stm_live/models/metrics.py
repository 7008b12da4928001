"""Image-quality metrics (SSIM, PSNR), baselines, the evaluation frames and their tables.

Both metrics compare images after per-image min-max normalisation to [0, 1] (STM-Net's
output and |psi|^2 have arbitrary scales), so data range = 1:

- SSIM: Wang et al. 2004, Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03,
  'valid' filtering (no padding), mean over the map.
- PSNR: 10 log10(1 / MSE).

The paper also reports LPIPS; that needs an ImageNet backbone fetched at run time, which
this project cannot do, so only SSIM and PSNR are reported.

Baselines:

- ``identity``: the CO-tip image itself.
- ``chen_tikhonov``: a classical, training-free inversion. For a field dominated by one
  lateral wave number k0, |grad psi|^2 ≈ 1/2 lap(|psi|^2) + k0^2 |psi|^2, so a CO image
  I = w_s |psi|^2 + w_p |grad_xy psi|^2 is, to first order, linear in rho = |psi|^2:
  I^(q) = H(q) rho^(q), H(q) = w_s + w_p (k0^2 - q^2 / 2). We assume the common CO
  preset (w_s = 0.13, w_p = 0.87), estimate k0^2 from the image's own power spectrum
  (k0^2 = <q^2>_I / 4, since rho's spectrum is twice as wide as psi's), and invert with
  Tikhonov regularisation rho^ = H I^ / (H^2 + lambda max H^2), clipped at 0.

Evaluation frames (``eval_cells`` / ``make_eval_pairs``, used by ``stm-live evaluate``, the
benchmark, the tests and STM-Net's bf16 check): exact ``stm_live.simulators.imaging``
renders (``tip.TIP_PRESETS`` tips) with fixed seeds, the held-out set from
``pairs.HELD_OUT_MOLECULES``. The tables (``format_quality``, ``format_latency``) are rich
tables for a command to print.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from stm_live.interpret import STMNET_PIXEL_NM
from stm_live.io.cube import read_cube
from stm_live.models.inputs import normalise
from stm_live.simulators.imaging import (
    CubePlacement,
    Placement,
    ScanFrame,
    Substrate,
    constant_current_image,
    constant_height_image,
    s_wave_image,
)
from stm_live.simulators.orbitals import VACUUM_FROM_NM, CubeOrbital
from stm_live.simulators.pairs import HELD_OUT_MOLECULES
from stm_live.simulators.tip import TipState, tip_preset
from stm_live.simulators.vacuum import current_from_z

# --------------------------------------------------------------------------- metrics


def _gauss_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of a (N, 1, H, W) tensor to [0, 1]."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def ssim_torch(
    a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-image SSIM of two (N, 1, H, W) tensors (no normalisation applied here)."""
    g = _gauss_window(size, sigma, a.device, a.dtype)
    gx, gy = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, gx), gy)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a**2
    sbb = blur(b * b) - mu_b**2
    sab = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(dim=1)


def _as_batch(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"expected an image (H, W) or a stack (N, H, W), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("metric inputs must be finite (crop or mask NaN rows first)")
    return t[:, None]


def ssim(pred, target) -> np.ndarray | float:
    """SSIM after per-image min-max normalisation (data range 1). Image -> float, stack -> array."""
    p, t = _as_batch(pred), _as_batch(target)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(t.shape)}")
    if min(p.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(p.shape[-2:])}")
    out = ssim_torch(minmax(p), minmax(t)).numpy()
    return float(out[0]) if np.ndim(pred) == 2 else out


def psnr(pred, target) -> np.ndarray | float:
    """PSNR in dB after per-image min-max normalisation (peak 1). Identical images -> inf."""
    p, t = _as_batch(pred), _as_batch(target)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(t.shape)}")
    mse = ((minmax(p) - minmax(t)) ** 2).flatten(1).mean(dim=1).numpy()
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(1.0 / mse)
    return float(out[0]) if np.ndim(pred) == 2 else out


# --------------------------------------------------------------------------- baselines


def identity_baseline(image: np.ndarray, pixel_size_nm: float | None = None) -> np.ndarray:
    """The CO-tip image itself."""
    return np.asarray(image, dtype=np.float32)


def chen_tikhonov(
    image: np.ndarray, pixel_size_nm: float, *, w_s: float = 0.13, w_p: float = 0.87, lam: float = 0.05
) -> np.ndarray:
    """Linearised Chen-rule inversion with Tikhonov regularisation (see module docstring)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or not np.isfinite(img).all():
        raise ValueError("chen_tikhonov needs a finite 2-D image")
    if not (pixel_size_nm > 0):
        raise ValueError(f"pixel_size_nm must be > 0, got {pixel_size_nm}")
    h, w = img.shape
    # pad by reflection to reduce wrap-around artefacts of the FFT
    pad = np.pad(img - img.min(), ((h // 2, h // 2), (w // 2, w // 2)), mode="reflect")
    qy = 2 * np.pi * np.fft.fftfreq(pad.shape[0], d=pixel_size_nm)
    qx = 2 * np.pi * np.fft.fftfreq(pad.shape[1], d=pixel_size_nm)
    q2 = qy[:, None] ** 2 + qx[None, :] ** 2
    spec = np.fft.fft2(pad)
    power = np.abs(spec) ** 2
    power[0, 0] = 0.0
    k0sq = float((power * q2).sum() / max(power.sum(), 1e-30)) / 4.0
    H = w_s + w_p * (k0sq - q2 / 2.0)
    Hmax2 = float((H**2).max())
    rho = np.fft.ifft2(spec * H / (H**2 + lam * Hmax2)).real
    out = rho[h // 2 : h // 2 + h, w // 2 : w // 2 + w]
    return np.clip(out, 0, None).astype(np.float32)


# --------------------------------------------------------------------------- evaluation frames
EVAL_TIPS = ("co", "co_s40", "coherent_co", "tilted_co")


def eval_tip(name: str):
    """A ``tip.TIP_PRESETS`` tip, or ``co_s40`` (the CO preset with a 40 % s share)."""
    if name == "co_s40":
        return TipState(0.4, 0.3, 0.3, 0.0, name="co_s40")
    return tip_preset(name)


def eval_cells(split: str) -> list[dict]:
    """Fixed (molecule, orbital, tip, mode) cells for ``stm-live evaluate`` and the benchmark."""
    if split == "held-out":
        mols, tips = HELD_OUT_MOLECULES, EVAL_TIPS
    elif split == "in-distribution":
        mols, tips = ("naphthalene", "pyrene", "h2pc", "ptcda"), ("co", "tilted_co")
    else:
        raise ValueError(f"split must be 'in-distribution' or 'held-out', got {split!r}")
    cells = [
        {"molecule": m, "orbital": o, "tip": t, "mode": "height"} for m in mols for o in ("HOMO", "LUMO") for t in tips
    ]
    cells += [{"molecule": m, "orbital": "HOMO", "tip": "co", "mode": "current"} for m in mols]
    return cells


def cube_cells(paths, *, mo: int = 0, vacuum_from_nm: float | None = None) -> list[dict]:
    """Evaluation cells for orbitals read from cube files (e.g. DFT): each cube under every
    evaluation tip, at constant height (a cube's ψ has its own arbitrary scale, so the
    substrate a constant-current image needs has no meaningful weight beside it).
    ``vacuum_from_nm``: where the cube is continued into vacuum (``orbitals.CubeOrbital``; None =
    its default, 0 = sample the cube as it is)."""
    vacuum = VACUUM_FROM_NM if vacuum_from_nm is None else float(vacuum_from_nm)
    cells = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cube file {path} does not exist")
        cells += [
            {
                "molecule": path.name,
                "orbital": f"MO {mo}",
                "tip": t,
                "mode": "height",
                "cube": str(path),
                "mo": mo,
                "vacuum_from_nm": vacuum,
            }
            for t in EVAL_TIPS
        ]
    return cells


@lru_cache(maxsize=1)  # cube_cells lists a cube's cells together; a continued orbital holds ~100 MB
def _cube_orbital(path: str, mo: int, vacuum_from_nm: float):
    return CubeOrbital(read_cube(path), mo=mo, vacuum_from_nm=vacuum_from_nm or None)


def _eval_placement(cell: dict, x_nm: float, y_nm: float, rotation_deg: float):
    """The cell's molecule (library name, or a cube file's orbital) placed in the frame."""
    if "cube" in cell:
        return CubePlacement(_cube_orbital(cell["cube"], cell["mo"], cell["vacuum_from_nm"]), x_nm, y_nm, rotation_deg)
    return Placement(cell["molecule"], x_nm, y_nm, rotation_deg, cell["orbital"])


def make_eval_pairs(
    cell: dict, n: int, *, seed: int = 1234, size: int = 96, pixel_size_nm: float = STMNET_PIXEL_NM, noise: float = 0.0
):
    """``n`` frames of one cell rendered with ``simulators.imaging``: one molecule near the
    centre, random rotation, z 0.3-0.5 nm. Returns normalised inputs and max-1 targets.

    ``noise``: constant height: white noise sigma = noise x the image's 99.5th percentile;
    constant current: height noise sigma = noise x 0.02 nm on the Z map (then ``current_from_z``).
    """
    key = sum(ord(ch) for ch in "|".join(str(v) for v in cell.values()))
    rng = np.random.default_rng([seed, key, int(noise * 1000)])
    tip = eval_tip(cell["tip"])
    bias = -1.0 if cell["orbital"].startswith("HOMO") else 1.0
    fov = size * pixel_size_nm
    frame = ScanFrame(0.0, 0.0, fov, fov, pixels=size, lines=size)
    ins, tgs = [], []
    for _ in range(n):
        place = [
            _eval_placement(
                cell,
                float(rng.uniform(-0.05, 0.05) * fov),
                float(rng.uniform(-0.05, 0.05) * fov),
                float(rng.uniform(0, 360)),
            )
        ]
        z = float(rng.uniform(0.3, 0.5))
        target = s_wave_image(place, frame, z_nm=z, bias_V=bias).astype(np.float64)
        if cell["mode"] == "current":
            peak = constant_height_image(place, frame, tip, z_nm=z, bias_V=bias, substrate=Substrate()).max()
            z_map = constant_current_image(
                place, frame, tip, setpoint_A=float(peak) * rng.uniform(0.3, 0.9), bias_V=bias
            ).astype(np.float64)
            if noise:
                z_map = z_map + rng.normal(0, noise * 0.02, z_map.shape)
            image = current_from_z(z_map, unit="nm")
        else:
            image = constant_height_image(place, frame, tip, z_nm=z, bias_V=bias).astype(np.float64)
            if noise:
                image = image + rng.normal(0, noise * np.percentile(image, 99.5), image.shape)
        ins.append(normalise(np.asarray(image, dtype=np.float32)))
        tgs.append((target / max(float(target.max()), 1e-30)).astype(np.float32))
    return np.stack(ins), np.stack(tgs)


# --------------------------------------------------------------------------- evaluation


def evaluate_batch(reconstructor, inputs: np.ndarray, targets: np.ndarray, pixel_size_nm: float) -> dict:
    """Per-sample PSNR/SSIM for STM-Net, identity and the classical baseline."""
    preds = np.stack([reconstructor.reconstruct(x, pixel_size_nm) for x in inputs])
    classical = np.stack([chen_tikhonov(x, pixel_size_nm) for x in inputs])
    return {
        "stmnet": (psnr(preds, targets), ssim(preds, targets)),
        "identity": (psnr(inputs, targets), ssim(inputs, targets)),
        "classical": (psnr(classical, targets), ssim(classical, targets)),
    }


def latency_ms(reconstructor, size: int, repeats: int = 5) -> float:
    """Median wall time of ``reconstruct`` on a size x size frame at the training pixel size."""
    rng = np.random.default_rng(0)
    img = rng.random((size, size)).astype(np.float32)
    reconstructor.reconstruct(img, reconstructor.pixel_size_nm)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        reconstructor.reconstruct(img, reconstructor.pixel_size_nm)
        if reconstructor.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _means(results: list[dict]) -> dict:
    """{method: (mean PSNR, mean SSIM, n)} over the frames of several ``evaluate_batch`` results."""
    return {
        k: (
            float(np.mean(np.concatenate([r[k][0] for r in results]))),
            float(np.mean(np.concatenate([r[k][1] for r in results]))),
            sum(len(r[k][0]) for r in results),
        )
        for k in results[0]
    }


def quality_tables(
    reconstructor, *, samples: int = 8, seed: int = 1234, size: int = 96, noise_levels=(0.0, 0.02, 0.05, 0.1, 0.2)
) -> dict:
    """Rows per (set, molecule, orbital, tip), summaries per set and per (set, tip), plus a
    noise-degradation curve; each entry is {method: (mean PSNR, mean SSIM, n)}."""
    px = reconstructor.pixel_size_nm
    rows, summary, by_tip = [], {}, {}
    for split in ("in-distribution", "held-out"):
        results = []
        for cell in eval_cells(split):
            inputs, targets = make_eval_pairs(cell, samples, seed=seed, size=size, pixel_size_nm=px)
            res = evaluate_batch(reconstructor, inputs, targets, px)
            results.append(res)
            rows.append((split, cell, _means([res])))
            # where the gap is: tilted and coherent tips also move and reshape the image
            by_tip.setdefault((split, cell["tip"]), []).append(res)
        summary[split] = _means(results)
    by_tip = {key: _means(results) for key, results in by_tip.items()}
    curve = []
    for level in noise_levels:
        results = []
        for cell in eval_cells("held-out"):
            inputs, targets = make_eval_pairs(
                cell, max(2, samples // 2), seed=seed + 1, size=size, pixel_size_nm=px, noise=level
            )
            results.append(evaluate_batch(reconstructor, inputs, targets, px))
        curve.append((level, _means(results)))
    return {"rows": rows, "summary": summary, "by_tip": by_tip, "noise_curve": curve}


def cube_quality(
    reconstructor,
    cubes,
    *,
    samples: int = 8,
    seed: int = 1234,
    size: int = 96,
    mo: int = 0,
    vacuum_from_nm: float | None = None,
) -> dict:
    """Like :func:`quality_tables` for orbitals from cube files (:func:`cube_cells`):
    rows per (cube, tip) and a summary over them."""
    px = reconstructor.pixel_size_nm
    rows, results = [], []
    for cell in cube_cells(cubes, mo=mo, vacuum_from_nm=vacuum_from_nm):
        inputs, targets = make_eval_pairs(cell, samples, seed=seed, size=size, pixel_size_nm=px)
        res = evaluate_batch(reconstructor, inputs, targets, px)
        results.append(res)
        rows.append(("cube", cell, _means([res])))
    return {"rows": rows, "summary": {"cube orbitals": _means(results)}, "by_tip": {}, "noise_curve": []}


def latency_by_views(reconstructor, sizes=(128, 256, 512), views=(1, 2, 4)) -> dict:
    """Median ms per frame size for each number of symmetry views (one network pass each):
    ``{"ms": {views: {size: ms}}, "device", "threads", "default_views"}`` (what
    :func:`format_latency` shows)."""
    ms = {k: {s: latency_ms(reconstructor.with_views(k), s) for s in sizes} for k in views}
    return {
        "ms": ms,
        "device": reconstructor.device.type,
        "threads": torch.get_num_threads(),
        "default_views": reconstructor.views,
    }


# --------------------------------------------------------------------------- tables
def format_quality(result: dict, *, show_rows: bool = True) -> list[Table]:
    """The tables of :func:`quality_tables` or :func:`cube_quality`: per cell (``show_rows``),
    the summary per set and per (set, tip), and the noise curve when there is one."""
    tables = []
    if show_rows:
        t = Table(title="STM-Net per cell (mean PSNR dB / SSIM; min-max normalised, clean inputs)")
        for col in ("set", "molecule", "orbital", "tip", "mode", "STM-Net", "identity", "classical"):
            t.add_column(col)
        for split, cell, r in result["rows"]:
            t.add_row(
                split,
                cell["molecule"],
                cell["orbital"],
                cell["tip"],
                cell["mode"],
                *(f"{r[k][0]:.1f} / {r[k][1]:.3f}" for k in ("stmnet", "identity", "classical")),
            )
        tables.append(t)
    t = Table(title="Summary (mean over samples)")
    for col in (
        "set",
        "n",
        "STM-Net PSNR",
        "STM-Net SSIM",
        "identity PSNR",
        "identity SSIM",
        "classical PSNR",
        "classical SSIM",
        "gain over identity",
    ):
        t.add_column(col)
    sets = list(result["summary"].items())
    sets += [(f"{split}, tip {tip}", s) for (split, tip), s in result["by_tip"].items()]
    for name, s in sets:
        t.add_row(
            name,
            str(s["stmnet"][2]),
            f"{s['stmnet'][0]:.2f}",
            f"{s['stmnet'][1]:.4f}",
            f"{s['identity'][0]:.2f}",
            f"{s['identity'][1]:.4f}",
            f"{s['classical'][0]:.2f}",
            f"{s['classical'][1]:.4f}",
            f"{s['stmnet'][0] - s['identity'][0]:+.2f} dB",
        )
    tables.append(t)
    if result["noise_curve"]:
        t = Table(title="Noise degradation, held-out (white noise sigma / image p99.5)")
        for col in ("noise", "STM-Net PSNR / SSIM", "identity PSNR / SSIM", "classical PSNR / SSIM"):
            t.add_column(col)
        for level, r in result["noise_curve"]:
            t.add_row(f"{level:.2f}", *(f"{r[k][0]:.2f} / {r[k][1]:.4f}" for k in ("stmnet", "identity", "classical")))
        tables.append(t)
    return tables


def format_latency(latency: dict) -> Table:
    """The table of :func:`latency_by_views`."""
    views = list(latency["ms"])
    t = Table(
        title=f"Inference latency, median ms ({latency['device']}, torch threads="
        f"{latency['threads']}; default {latency['default_views']} views)"
    )
    t.add_column("frame")
    for k in views:
        t.add_column(f"{k} view{'s' if k > 1 else ''}")
    for s in next(iter(latency["ms"].values())):
        t.add_row(f"{s}x{s}", *(f"{latency['ms'][k][s]:.1f}" for k in views))
    return t


__all__ = [
    "ssim",
    "psnr",
    "ssim_torch",
    "minmax",
    "chen_tikhonov",
    "identity_baseline",
    "EVAL_TIPS",
    "eval_tip",
    "eval_cells",
    "cube_cells",
    "make_eval_pairs",
    "evaluate_batch",
    "latency_ms",
    "latency_by_views",
    "quality_tables",
    "cube_quality",
    "format_quality",
    "format_latency",
]
