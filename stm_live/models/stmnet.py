"""STM-Net: a small U-Net from a CO-tip image to the pristine orbital density |psi|^2.

After Zhu, Xue, ... Xu, JACS Au 5, 3163 (2025): a CO tip images
``w_s |psi|^2 + w_p (|d_x psi|^2 + |d_y psi|^2)`` (Chen's derivative rule); the network is
trained on simulated pairs (CO-tip image -> s-wave image) to undo the p-channel part.

This file holds the architecture (``STMNetConfig``, ``STMNet``), the pixel-size-aware
inference wrapper (``Reconstructor``), the checkpoint loader (``load_stmnet``) and the
``stm-live reconstruct`` implementation (``reconstruct_file``). Training lives in
``training.py``, metrics and baselines in ``metrics.py``.
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

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "stmnet.pt"
RETRAIN_HINT = "retrain it with `stm-live train --model stmnet` (writes checkpoint, hash and model card)"

# Vacuum decay constant kappa = sqrt(2 m_e phi) / hbar for a 5 eV work function, in 1/nm.
_HBAR, _ME, _EV = 1.054571817e-34, 9.1093837015e-31, 1.602176634e-19
KAPPA_PER_NM = math.sqrt(2 * _ME * 5.0 * _EV) / _HBAR * 1e-9  # ~11.46 /nm


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
def current_from_z(z, kappa_per_nm: float = KAPPA_PER_NM, *, unit: str = "m") -> np.ndarray:
    """Constant-current tip height map -> current-like (constant-height-like) image.

    In the tunnelling regime I ∝ exp(-2 kappa d) with d the tip-sample gap. Along a
    constant-current contour the tip is retracted by z(x, y) where the local density of
    states is higher, so the LDOS at a fixed reference height scales as
    ``exp(+2 kappa (z - z_ref))``. This returns ``exp(2 kappa (z - max z))`` (values in
    (0, 1], no overflow), NaN where ``z`` is NaN.

    Parameters
    ----------
    z : array
        Tip height, larger = further from the surface (Nanonis "Z" channel).
    kappa_per_nm : float
        Vacuum decay constant in 1/nm (default: 5 eV work function, ~11.46 /nm).
    unit : "m" or "nm"
        Unit of ``z``. Nanonis (and .sxm files) store Z in metres.
    """
    if unit not in ("m", "nm"):
        raise ValueError(f"unit must be 'm' or 'nm', got {unit!r}")
    z_nm = np.asarray(z, dtype=np.float64) * (1e9 if unit == "m" else 1.0)
    if not np.isfinite(z_nm).any():
        raise ValueError("current_from_z: z has no finite values")
    out = np.exp(2.0 * kappa_per_nm * (z_nm - np.nanmax(z_nm)))
    return out.astype(np.float32)


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


class Reconstructor:
    """Pixel-size-aware STM-Net inference on one image.

    ``reconstruct(image, pixel_size_nm)``: validates, fills NaN (unscanned) pixels, normalises
    (percentiles), resamples to the training pixel size, reflect-pads to a multiple of
    ``2**depth``, runs the network (tiled with overlap for large frames; averaged over
    ``views`` symmetry views, see :data:`SYMMETRY_VIEWS`), resamples back, clips at 0 and puts
    NaN back where the input was NaN. Output: float32, same shape, |psi|^2 estimate on an
    arbitrary scale (about 0..1).
    """

    def __init__(self, net: STMNet, pixel_size_nm: float, *, device="cpu", tile: int = 512, overlap: int = 32,
                 info: dict | None = None, views: int = DEFAULT_VIEWS):
        if views not in SYMMETRY_VIEWS:
            raise ValueError(f"symmetry views must be one of {sorted(SYMMETRY_VIEWS)}, got {views!r}")
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.pixel_size_nm = float(pixel_size_nm)
        self.tile, self.overlap = tile, overlap
        self.views = views
        self.info = info or {}

    def with_views(self, views: int) -> "Reconstructor":
        """The same network and settings, averaging over ``views`` symmetry views."""
        return Reconstructor(self.net, self.pixel_size_nm, device=self.device, tile=self.tile,
                             overlap=self.overlap, info=self.info, views=views)

    # -- checks
    @staticmethod
    def _validate(image, pixel_size_nm) -> np.ndarray:
        arr = np.asarray(image)
        if arr.ndim != 2:
            raise ValueError(f"image must be 2-D (lines, pixels), got shape {arr.shape}")
        if min(arr.shape) < 4:
            raise ValueError(f"image too small: shape {arr.shape}, need at least 4x4 pixels")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"image must be numeric, got dtype {arr.dtype}")
        try:
            px = float(pixel_size_nm)
        except (TypeError, ValueError):
            raise ValueError(f"pixel_size_nm must be a number, got {pixel_size_nm!r}") from None
        if not math.isfinite(px) or px <= 0:
            raise ValueError(f"pixel_size_nm must be finite and > 0, got {pixel_size_nm!r}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).any():
            raise ValueError("image has no finite values (all NaN: nothing scanned yet)")
        return arr

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Network on a (1, 1, h, w) tensor with reflect padding; tiled when large."""
        h, w = x.shape[-2:]
        if h <= self.tile and w <= self.tile:
            return self._run_padded(x)
        out = torch.zeros_like(x)
        weight = torch.zeros_like(x)
        step = self.tile - 2 * self.overlap
        ramp = torch.ones(self.tile, device=x.device)
        r = torch.linspace(0.05, 1.0, self.overlap, device=x.device)
        ramp[: self.overlap], ramp[-self.overlap:] = r, r.flip(0)
        for y0 in _starts(h, self.tile, step):
            for x0 in _starts(w, self.tile, step):
                tile = x[..., y0: y0 + self.tile, x0: x0 + self.tile]
                th, tw = tile.shape[-2:]
                wmap = ramp[:th, None] * ramp[:tw][None, :]
                out[..., y0: y0 + th, x0: x0 + tw] += self._run_padded(tile) * wmap
                weight[..., y0: y0 + th, x0: x0 + tw] += wmap
        return out / weight

    def _run_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output averaged over the symmetry views of ``x`` (each mapped back)."""
        out = 0.0
        for axes in SYMMETRY_VIEWS[self.views]:  # each flip is its own inverse
            y = self._net_padded(x.flip(axes) if axes else x)
            out = out + (y.flip(axes) if axes else y)
        return out / len(SYMMETRY_VIEWS[self.views])

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

    def reconstruct(self, image: np.ndarray, pixel_size_nm: float) -> np.ndarray:
        arr = self._validate(image, pixel_size_nm)
        nan_mask = ~np.isfinite(arr)
        x = normalise(arr)
        if nan_mask.any():
            x[nan_mask] = float(np.median(x[~nan_mask]))
        h, w = x.shape
        scale = float(pixel_size_nm) / self.pixel_size_nm
        t = torch.from_numpy(x)[None, None].to(self.device)
        th, tw = max(8, round(h * scale)), max(8, round(w * scale))
        resample = (th, tw) != (h, w)
        if resample:
            t = F.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False, antialias=scale < 1)
        y = self._run(t)
        if resample:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=scale > 1)
        out = y[0, 0].clamp_min(0).float().cpu().numpy()
        out[nan_mask] = np.nan
        return out

    __call__ = reconstruct


def _starts(n: int, tile: int, step: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


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


# --------------------------------------------------------------------------- CLI
def _sxm_image(scan, channel: str | None) -> tuple[np.ndarray, str]:
    names = list(scan.channels)
    if channel is None:
        pick = next((n for n in names if n.lower().startswith("current")), None) or next(
            (n for n in names if n.lower() == "z" or n.lower().startswith("z ")), None)
        if pick is None:
            raise ValueError(f"no Current or Z channel in the .sxm file; channels: {names}; pass --channel")
    else:
        pick = next((n for n in names if n.lower() == channel.lower()), None)
        if pick is None:
            raise ValueError(f"channel {channel!r} not in the .sxm file; channels: {names}")
    data = scan.channels[pick]
    image = np.asarray(data["forward"] if "forward" in data else next(iter(data.values())), dtype=np.float32)
    unit = (getattr(scan, "units", {}) or {}).get(pick, "")
    if pick.lower().startswith("z") or unit == "m":
        image = current_from_z(image, unit="m")
    return image, pick


def reconstruct_file(input, output, *, pixel_size_nm: float | None = None, channel: str | None = None,
                     device: str = "auto", views: int = DEFAULT_VIEWS) -> Path:
    """``stm-live reconstruct``: .npy/.sxm in, .npy/.png/.sxm out (chosen by the suffix), the
    output averaged over ``views`` symmetry views."""
    src, dst = Path(input), Path(output)
    if not src.is_file():
        raise ValueError(f"input file not found: {src}")
    if dst.suffix.lower() not in (".npy", ".png", ".sxm"):
        raise ValueError(f"output must end in .npy, .png or .sxm, got {dst.name!r}")
    scan = None
    if src.suffix.lower() == ".npy":
        if pixel_size_nm is None:
            raise ValueError(f"{src.name}: a .npy image needs --pixel-size (nm per pixel)")
        image = np.load(src, allow_pickle=False)
    elif src.suffix.lower() == ".sxm":
        from stm_live.io.sxm import read_sxm

        scan = read_sxm(src)
        image, _ = _sxm_image(scan, channel)
        if pixel_size_nm is None:
            pixel_size_nm = float(scan.range_m[0]) / int(scan.pixels) * 1e9
    else:
        raise ValueError(f"input must be .npy or .sxm, got {src.name!r}")
    recon = load_stmnet(device=device, views=views).reconstruct(image, pixel_size_nm)
    dst.parent.mkdir(parents=True, exist_ok=True)
    suffix = dst.suffix.lower()
    if suffix == ".npy":
        np.save(dst, recon)
    elif suffix == ".png":
        from stm_live.report import save_png

        def unit(a):
            a = np.asarray(a, dtype=np.float32)
            lo, hi = np.nanpercentile(a, [1, 99]) if np.isfinite(a).any() else (0.0, 1.0)
            return (a - lo) / (hi - lo if hi > lo else 1.0)

        gap = np.full((image.shape[0], max(2, image.shape[1] // 32)), np.nan, np.float32)
        save_png(dst, np.hstack([unit(image), gap, unit(recon)]))
    else:
        if scan is None:
            raise ValueError("writing .sxm needs an .sxm input (its header supplies the frame geometry)")
        import copy

        from stm_live.io.sxm import write_sxm

        out_scan = copy.deepcopy(scan)
        out_scan.channels["STM-Net"] = {"forward": recon, "backward": recon.copy()}
        if isinstance(getattr(out_scan, "units", None), dict):
            out_scan.units["STM-Net"] = "a.u."
        write_sxm(dst, out_scan)
    return dst
