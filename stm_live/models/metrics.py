"""Image-quality metrics (SSIM, PSNR), baselines, and ``stm-live evaluate``.

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

Evaluation frames come from ``training.eval_cells`` / ``training.make_eval_pairs``: exact
``stm_live.simulators.imaging`` renders (``tip.TIP_PRESETS`` tips) with fixed seeds, the
held-out set from ``pairs.HELD_OUT_MOLECULES``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

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


def ssim_torch(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, size: int = 11,
               sigma: float = 1.5) -> torch.Tensor:
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


def chen_tikhonov(image: np.ndarray, pixel_size_nm: float, *, w_s: float = 0.13, w_p: float = 0.87,
                  lam: float = 0.05) -> np.ndarray:
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
    out = rho[h // 2: h // 2 + h, w // 2: w // 2 + w]
    return np.clip(out, 0, None).astype(np.float32)


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
    return {k: (float(np.mean(np.concatenate([r[k][0] for r in results]))),
                float(np.mean(np.concatenate([r[k][1] for r in results]))),
                sum(len(r[k][0]) for r in results))
            for k in results[0]}


def quality_tables(reconstructor, *, samples: int = 8, seed: int = 1234, size: int = 96,
                   noise_levels=(0.0, 0.02, 0.05, 0.1, 0.2)) -> dict:
    """Rows per (set, molecule, orbital, tip), summaries per set and per (set, tip), plus a
    noise-degradation curve; each entry is {method: (mean PSNR, mean SSIM, n)}."""
    from stm_live.models.training import eval_cells, make_eval_pairs

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
            inputs, targets = make_eval_pairs(cell, max(2, samples // 2), seed=seed + 1, size=size,
                                              pixel_size_nm=px, noise=level)
            results.append(evaluate_batch(reconstructor, inputs, targets, px))
        curve.append((level, _means(results)))
    return {"rows": rows, "summary": summary, "by_tip": by_tip, "noise_curve": curve}


def cube_quality(reconstructor, cubes, *, samples: int = 8, seed: int = 1234, size: int = 96, mo: int = 0,
                 vacuum_from_nm: float | None = None) -> dict:
    """Like :func:`quality_tables` for orbitals from cube files (``training.cube_cells``):
    rows per (cube, tip) and a summary over them."""
    from stm_live.models.training import cube_cells, make_eval_pairs

    px = reconstructor.pixel_size_nm
    rows, results = [], []
    for cell in cube_cells(cubes, mo=mo, vacuum_from_nm=vacuum_from_nm):
        inputs, targets = make_eval_pairs(cell, samples, seed=seed, size=size, pixel_size_nm=px)
        res = evaluate_batch(reconstructor, inputs, targets, px)
        results.append(res)
        rows.append(("cube", cell, _means([res])))
    return {"rows": rows, "summary": {"cube orbitals": _means(results)}, "by_tip": {}, "noise_curve": []}


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)


def print_quality(result: dict, *, show_rows: bool = True) -> None:
    from rich.table import Table

    console = _console()
    if show_rows:
        t = Table(title="STM-Net per cell (mean PSNR dB / SSIM; min-max normalised, clean inputs)")
        for col in ("set", "molecule", "orbital", "tip", "mode", "STM-Net", "identity", "classical"):
            t.add_column(col)
        for split, cell, r in result["rows"]:
            t.add_row(split, cell["molecule"], cell["orbital"], cell["tip"], cell["mode"],
                      *(f"{r[k][0]:.1f} / {r[k][1]:.3f}" for k in ("stmnet", "identity", "classical")))
        console.print(t)
    t = Table(title="Summary (mean over samples)")
    for col in ("set", "n", "STM-Net PSNR", "STM-Net SSIM", "identity PSNR", "identity SSIM",
                "classical PSNR", "classical SSIM", "gain over identity"):
        t.add_column(col)
    sets = list(result["summary"].items())
    sets += [(f"{split}, tip {tip}", s) for (split, tip), s in result["by_tip"].items()]
    for name, s in sets:
        t.add_row(name, str(s["stmnet"][2]), f"{s['stmnet'][0]:.2f}", f"{s['stmnet'][1]:.4f}",
                  f"{s['identity'][0]:.2f}", f"{s['identity'][1]:.4f}", f"{s['classical'][0]:.2f}",
                  f"{s['classical'][1]:.4f}", f"{s['stmnet'][0] - s['identity'][0]:+.2f} dB")
    console.print(t)
    if not result["noise_curve"]:
        return
    t = Table(title="Noise degradation, held-out (white noise sigma / image p99.5)")
    for col in ("noise", "STM-Net PSNR / SSIM", "identity PSNR / SSIM", "classical PSNR / SSIM"):
        t.add_column(col)
    for level, r in result["noise_curve"]:
        t.add_row(f"{level:.2f}", *(f"{r[k][0]:.2f} / {r[k][1]:.4f}" for k in ("stmnet", "identity", "classical")))
    console.print(t)


def print_latency(reconstructor, sizes=(128, 256, 512), views=(1, 2, 4)) -> dict:
    """Median ms per frame size for each number of symmetry views (one network pass each)."""
    from rich.table import Table

    res = {}
    for k in views:
        with_k = reconstructor.with_views(k)
        res[k] = {s: latency_ms(with_k, s) for s in sizes}
    t = Table(title=f"Inference latency, median ms ({reconstructor.device.type}, torch threads="
                    f"{torch.get_num_threads()}; default {reconstructor.views} views)")
    t.add_column("frame")
    for k in views:
        t.add_column(f"{k} view{'s' if k > 1 else ''}")
    for s in sizes:
        t.add_row(f"{s}x{s}", *(f"{res[k][s]:.1f}" for k in views))
    _console().print(t)
    return res


def evaluate_main(device: str = "auto", samples: int = 8, seed: int = 1234, cubes=(), cube_mo: int = 0,
                  vacuum_from_nm: float | None = None) -> dict:
    """``stm-live evaluate --model stmnet``: quality tables, noise curve and latency; with
    ``cubes``, the quality table on those cube files' orbitals instead."""
    from stm_live.models.stmnet import load_stmnet

    rec = load_stmnet(device=device)
    if cubes:
        result = cube_quality(rec, cubes, samples=samples, seed=seed, mo=cube_mo, vacuum_from_nm=vacuum_from_nm)
        print_quality(result)
        return result
    result = quality_tables(rec, samples=samples, seed=seed)
    print_quality(result)
    result["latency_ms"] = print_latency(rec)
    return result


__all__ = ["ssim", "psnr", "ssim_torch", "minmax", "chen_tikhonov", "identity_baseline", "evaluate_main",
           "quality_tables", "cube_quality", "latency_ms", "print_quality", "print_latency", "evaluate_batch"]
