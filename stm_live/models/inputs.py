"""STM-Net's input convention: robust per-image normalisation.

One definition for what the network sees, shared by inference (``stmnet.Reconstructor``),
the training pairs (``training``) and the evaluation frames (``metrics``); it sits below all
three so that none of them imports another for it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["normalise", "quantiles"]


def normalise(image, lo_pct: float = 0.5, hi_pct: float = 99.9):
    """Robust per-image normalisation: percentile ``lo`` -> 0, ``hi`` -> 1, clipped to [-1, 3]
    (spikes and stray outliers cannot dominate). A numpy array gives float32 numpy; a float
    tensor is normalised on its own device (the GPU path: no round trip for the percentiles)."""
    if isinstance(image, torch.Tensor):
        finite = image[torch.isfinite(image)]
        lo, hi = quantiles(finite, (lo_pct / 100, hi_pct / 100))
        peak = finite.abs().max()
        scale = torch.where(hi > lo, hi - lo, torch.where(peak > 0, peak, torch.ones_like(peak)))
        return ((image - lo) / scale).clamp(-1.0, 3.0)
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    scale = hi - lo if hi > lo else (np.abs(finite).max() or 1.0)
    return np.clip((image - lo) / scale, -1.0, 3.0).astype(np.float32)


def quantiles(values: torch.Tensor, q) -> torch.Tensor:
    """``np.percentile``'s linear interpolation of a 1-D tensor at fractions ``q``, on its device
    (``torch.quantile`` refuses more than 2**24 values)."""
    v = values.sort().values
    pos = torch.tensor(q, dtype=torch.float64, device=v.device) * (v.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    return v[lo] + (v[hi] - v[lo]) * (pos - lo).to(v.dtype)
