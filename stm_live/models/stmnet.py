"""STM-Net: a small U-Net from a CO-tip image to the pristine orbital density |psi|^2.

After Zhu, Xue, ... Xu, JACS Au 5, 3163 (2025): a CO tip images
``w_s |psi|^2 + w_p (|d_x psi|^2 + |d_y psi|^2)`` (Chen's derivative rule); the network is
trained on simulated pairs (CO-tip image -> s-wave image) to undo the p-channel part.

This file holds the architecture (``STMNetConfig``, ``STMNet``), the pixel-size-aware
inference wrapper (``Reconstructor``; ``Reconstruction`` adds the symmetry-view spread), the
checkpoint loader (``load_stmnet``). What a recorded frame means to the network (channel,
sign, Z -> current, scope) is decided in ``stm_live/interpret.py``; the command is
``stm_live/app/reconstruct.py``. Training lives in ``training.py``, metrics and baselines
in ``metrics.py``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stm_live.interpret import STMNET_MAX_SIDE_PX

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "stmnet.pt"
RETRAIN_HINT = "retrain it with `stm-live train --model stmnet` (writes checkpoint, hash and model card)"



# --------------------------------------------------------------------------- the network
@dataclass
class STMNetConfig:
    channels: int = 16  # width of the first level; doubles at each level down
    depth: int = 3  # number of down-samplings (input sides are padded to a multiple of 2**depth)
    groups: int = 8  # GroupNorm groups
    in_channels: int = 1
    out_channels: int = 1


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    """(conv 3x3 -> GroupNorm -> ReLU) x 2."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
    )


class STMNet(nn.Module):
    """Fully convolutional U-Net: max-pool encoder, bilinear-upsample decoder, skip concat.

    The output is a residual on the input added to a learned map, made non-negative with
    softplus (|psi|^2 >= 0).
    """

    def __init__(self, config: STMNetConfig | None = None):
        super().__init__()
        self.config = c = config or STMNetConfig()
        widths = [c.channels * 2**i for i in range(c.depth + 1)]
        self.stem = _block(c.in_channels, widths[0], c.groups)
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1], c.groups) for i in range(c.depth))
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i], c.groups) for i in range(c.depth))
        self.head = nn.Conv2d(widths[0], c.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for block in reversed(self.up):
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return F.softplus(self.head(h) + x)

    @property
    def multiple(self) -> int:
        return 2**self.config.depth

    @classmethod
    def from_checkpoint(cls, state: dict) -> "STMNet":
        net = cls(STMNetConfig(**state["config"]))
        net.load_state_dict(state["state_dict"])
        return net.eval()

    def checkpoint(self, **extra) -> dict:
        return {"config": asdict(self.config), "state_dict": self.state_dict(), **extra}


# --------------------------------------------------------------------------- helpers
def normalise(image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.9) -> np.ndarray:
    """Robust per-image normalisation: percentile ``lo`` -> 0, ``hi`` -> 1, clipped to [-1, 3]
    (spikes and stray outliers cannot dominate)."""
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    scale = hi - lo if hi > lo else (np.abs(finite).max() or 1.0)
    return np.clip((image - lo) / scale, -1.0, 3.0).astype(np.float32)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- inference
# Views the output is averaged over, as the image axes each flips: the identity, the 180-degree
# rotation and the mirrors about x and y. Flips keep scan lines horizontal (row offsets and
# streaks look as in training, which a transpose would not); a plain or coherent s-p_z CO tip
# images a molecule's mirror image as the mirror of its image, and training tilts point anywhere.
# The default is 2 views (identity and rotation: most of the gain on the validation seed); 4
# views are about 0.5-0.7 dB better but miss the 100 ms budget for a 256^2 frame on 2 CPU cores.
SYMMETRY_VIEWS = {1: ((),), 2: ((), (-2, -1)), 4: ((), (-2, -1), (-1,), (-2,))}
DEFAULT_VIEWS = 2

# Largest side (px) of the frame the network sees, after resampling to the training pixel size
# (stm_live.interpret sets it with the rest of STM-Net's scope). The whole frame runs in one
# pass (see Reconstructor): at 1024^2 that peaks at ~0.95 GB RSS (0.7 GB over the loaded
# model) and takes 7-11 s with 2 views on 2 CPU cores (benchmarks/bench_stmnet_files.py);
# larger frames are refused rather than tiled.
MAX_NETWORK_SIDE_PX = STMNET_MAX_SIDE_PX


@dataclass
class Reconstruction:
    """One reconstruction with its symmetry-view uncertainty.

    ``image``: the |psi|^2 estimate (float32, input shape, NaN where the input was NaN; what
    ``Reconstructor.reconstruct`` returns). ``view_spread``: per pixel, the standard deviation
    of the network's output over the symmetry views (each mapped back to the input
    orientation and grid), same shape and NaN as ``image``; all zeros with one view.
    ``spread``: the median of ``view_spread`` where ``image`` exceeds 10 % of its maximum,
    divided by ``image``'s 99th percentile (its maximum if that is 0): a scale-free summary,
    0.0 with one view.
    """

    image: np.ndarray
    view_spread: np.ndarray
    spread: float
    views: int


class Reconstructor:
    """Pixel-size-aware STM-Net inference on one image.

    ``reconstruct(image, pixel_size_nm, line_spacing_nm=None)``: validates, fills NaN
    (unscanned) pixels, normalises (percentiles), resamples rows and columns each to the
    training pixel size (columns by ``pixel_size_nm``, rows by ``line_spacing_nm``, default
    square pixels), reflect-pads to a multiple of ``2**depth``, runs the network on the whole
    frame in one pass for each of ``views`` symmetry views (see :data:`SYMMETRY_VIEWS`) and
    averages them, resamples back, clips at 0 and puts NaN back where the input was NaN.
    Output: float32, same shape, |psi|^2 estimate on an arbitrary scale (about 0..1).
    ``reconstruct_detailed`` returns the same image with the spread over the views.

    The frame is never split into tiles, because GroupNorm normalises by the statistics of
    the whole input, so a tile's output depends on the tile's content. That was the seam of
    the old 512 px tiles: on flat background a tile without a molecule has zero variance at
    the first GroupNorm (5e-4..2e-2 per group over the whole 1100^2 test frame), so it
    divides by sqrt(eps) and turns the only structure left, the convolutions' zero-padding
    response at the tile's edges, into bright lines, which the 0.05 ramp floor and the 32 px
    overlap (receptive-field radius 65 px) let into the blend: line means off by up to 0.04
    against one pass. Tiles normalised by the whole frame's statistics match one pass
    exactly, but those statistics need a whole-frame pass (or one pass per GroupNorm layer)
    first; so the frame runs in one pass, bounded by :data:`MAX_NETWORK_SIDE_PX`.
    """

    def __init__(self, net: STMNet, pixel_size_nm: float, *, device="cpu", info: dict | None = None,
                 views: int = DEFAULT_VIEWS):
        if views not in SYMMETRY_VIEWS:
            raise ValueError(f"symmetry views must be one of {sorted(SYMMETRY_VIEWS)}, got {views!r}")
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.pixel_size_nm = float(pixel_size_nm)
        self.views = views
        self.info = info or {}

    def with_views(self, views: int) -> "Reconstructor":
        """The same network and settings, averaging over ``views`` symmetry views."""
        return Reconstructor(self.net, self.pixel_size_nm, device=self.device, info=self.info, views=views)

    # -- checks
    @staticmethod
    def _pitch(value, name: str) -> float:
        try:
            px = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(px) or px <= 0:
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        return px

    @classmethod
    def _validate(cls, image, pixel_size_nm, line_spacing_nm=None) -> tuple[np.ndarray, float, float]:
        arr = np.asarray(image)
        if arr.ndim != 2:
            raise ValueError(f"image must be 2-D (lines, pixels), got shape {arr.shape}")
        if min(arr.shape) < 4:
            raise ValueError(f"image too small: shape {arr.shape}, need at least 4x4 pixels")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"image must be numeric, got dtype {arr.dtype}")
        px = cls._pitch(pixel_size_nm, "pixel_size_nm")
        line = px if line_spacing_nm is None else cls._pitch(line_spacing_nm, "line_spacing_nm")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).any():
            raise ValueError("image has no finite values (all NaN: nothing scanned yet)")
        return arr, px, line

    def network_shape(self, shape, pixel_size_nm: float, line_spacing_nm: float | None = None) -> tuple[int, int]:
        """(lines, pixels) of the frame the network sees for an input of ``shape`` (lines,
        pixels) at these pitches; ValueError if a side exceeds :data:`MAX_NETWORK_SIDE_PX`."""
        h, w = (int(n) for n in shape)
        px = self._pitch(pixel_size_nm, "pixel_size_nm")
        line = px if line_spacing_nm is None else self._pitch(line_spacing_nm, "line_spacing_nm")
        th = max(8, round(h * line / self.pixel_size_nm))
        tw = max(8, round(w * px / self.pixel_size_nm))
        if max(th, tw) > MAX_NETWORK_SIDE_PX:
            pitch = f"{px:g} nm/px" if line == px else f"{px:g} nm/px, {line:g} nm line spacing"
            raise ValueError(
                f"frame of {h}x{w} px (lines x pixels) at {pitch} resamples to {th}x{tw} px at STM-Net's "
                f"{self.pixel_size_nm:g} nm/px, over its {MAX_NETWORK_SIDE_PX} px limit per side: crop the frame "
                f"to the molecules (<= {MAX_NETWORK_SIDE_PX * self.pixel_size_nm:g} nm a side) or use a coarser "
                "tool for an overview")
        return th, tw

    # -- the network
    def _net_padded(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.net.multiple
        ph, pw = (-h) % m, (-w) % m
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        if ph or pw:
            mode = "reflect" if max(pad[2:]) < h and max(pad[:2]) < w else "replicate"
            x = F.pad(x, pad, mode=mode)
        y = self.net(x)
        return y[..., pad[2]: pad[2] + h, pad[0]: pad[0] + w]

    @torch.inference_mode()
    def _run(self, x: torch.Tensor, spread: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) over the symmetry views of the network's output on a (1, 1, h, w)
        tensor, each view mapped back; std is None with one view or ``spread=False``."""
        outs = []
        for axes in SYMMETRY_VIEWS[self.views]:  # each flip is its own inverse
            y = self._net_padded(x.flip(axes) if axes else x)
            outs.append(y.flip(axes) if axes else y)
        mean = 0.0
        for y in outs:  # summed in order, then divided: the same numbers as before the spread
            mean = mean + y
        mean = mean / len(outs)
        if len(outs) == 1 or not spread:
            return mean, None
        var = 0.0
        for y in outs:
            var = var + (y - mean) ** 2
        return mean, (var / len(outs)).sqrt()

    def reconstruct_detailed(self, image: np.ndarray, pixel_size_nm: float,
                             line_spacing_nm: float | None = None) -> Reconstruction:
        """The reconstruction with the spread of the network's output over the symmetry views
        (:class:`Reconstruction`; zeros with ``views=1``). ``line_spacing_nm``: the slow-axis
        pitch (rows), default ``pixel_size_nm`` (square pixels)."""
        out, spread_map = self._reconstruct(image, pixel_size_nm, line_spacing_nm, spread=True)
        return Reconstruction(out, spread_map, _spread_summary(out, spread_map), self.views)

    def reconstruct(self, image: np.ndarray, pixel_size_nm: float, line_spacing_nm: float | None = None) -> np.ndarray:
        """The |psi|^2 estimate (float32, input shape): ``reconstruct_detailed(...).image``
        without computing the spread."""
        return self._reconstruct(image, pixel_size_nm, line_spacing_nm, spread=False)[0]

    __call__ = reconstruct

    def _reconstruct(self, image, pixel_size_nm, line_spacing_nm, *, spread: bool):
        """(image, view-spread map or None if not ``spread``)."""
        arr, px, line = self._validate(image, pixel_size_nm, line_spacing_nm)
        h, w = arr.shape
        th, tw = self.network_shape(arr.shape, px, line)  # raises before anything frame-sized is made
        nan_mask = ~np.isfinite(arr)
        x = normalise(arr)
        if nan_mask.any():
            x[nan_mask] = float(np.median(x[~nan_mask]))
        t = torch.from_numpy(x)[None, None].to(self.device)
        sy, sx = line / self.pixel_size_nm, px / self.pixel_size_nm
        resample = (th, tw) != (h, w)
        if resample:  # antialias acts on the axes that shrink only (bilinear on the others)
            t = F.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False, antialias=min(sy, sx) < 1)
        mean, std = self._run(t, spread)

        def back(y: torch.Tensor) -> np.ndarray:
            if resample:
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=max(sy, sx) > 1)
            out = y[0, 0].clamp_min(0).float().cpu().numpy()
            out[nan_mask] = np.nan
            return out

        out = back(mean)
        if not spread:
            return out, None
        return out, back(std) if std is not None else np.where(nan_mask, np.nan, 0.0).astype(np.float32)


def _spread_summary(image: np.ndarray, spread: np.ndarray) -> float:
    """Median view spread over the bright part (> 10 % of the maximum) / the 99th percentile."""
    finite = np.isfinite(image)
    if not finite.any():
        return 0.0
    values = image[finite]
    top = float(values.max())
    if top <= 0:
        return 0.0
    scale = float(np.percentile(values, 99)) or top
    return float(np.median(spread[finite & (image > 0.1 * top)])) / scale


# --------------------------------------------------------------------------- loading
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".sha256")


def load_stmnet(device: str | None = "auto", path: str | Path | None = None, *,
                views: int = DEFAULT_VIEWS) -> Reconstructor:
    """The STM-Net checkpoint (default: the shipped one) as a ``Reconstructor`` averaging over
    ``views`` symmetry views (1, 2 or 4; each costs one network pass).

    The file's SHA-256 must match the hash stored beside it (``<name>.sha256``); it is
    loaded with ``torch.load(weights_only=True)``.
    """
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"STM-Net checkpoint not found: {path}; {RETRAIN_HINT}")
    hpath = hash_path(path)
    if not hpath.is_file():
        raise ValueError(f"STM-Net checkpoint hash file missing: {hpath}; {RETRAIN_HINT}")
    expected = hpath.read_text().split()[0].strip().lower() if hpath.read_text().strip() else ""
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"STM-Net checkpoint {path.name} is corrupt or modified: sha256 {actual[:16]}... "
            f"does not match {hpath.name} ({expected[:16] or 'empty'}...); {RETRAIN_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = STMNet.from_checkpoint(state)
    except Exception as exc:  # unreadable despite a matching hash: say so, with the fix
        raise ValueError(f"STM-Net checkpoint {path} could not be loaded ({exc}); {RETRAIN_HINT}") from exc
    info = {k: v for k, v in state.items() if k not in ("state_dict",)}
    return Reconstructor(net, float(state["pixel_size_nm"]), device=device, info=info, views=views)
