"""Tip-state classifier: a small CNN trained on the physics simulator.

Input: one image (lines, pixels), possibly a partial frame (rows not yet scanned are NaN),
resampled to the training pixel size and robustly normalised over the scanned rows, plus a
mask channel (1 = scanned). Output: probabilities over :data:`TIP_CLASSES` and a regressed
s-wave share of the tip (``TipState.s_fraction``).

Training data come on the fly from ``stm_live.simulators`` (orbitals + tip presets +
``constant_height_image`` + artifacts); see :func:`make_batch` for the recipe.

The classifier loads with its domain statistics (:mod:`stm_live.models.tipdomain`): a frame
outside what it was trained and benchmarked on gets the verdict :data:`UNKNOWN`, which is
neither good nor bad (:func:`is_known_bad` is what a policy may act on).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "TIP_CLASSES",
    "GOOD_CLASSES",
    "UNKNOWN",
    "bad_probability",
    "is_known_bad",
    "is_held_back",
    "is_unknown",
    "TipVerdict",
    "TipNetConfig",
    "TipNet",
    "TipClassifier",
    "load_tip_classifier",
    "make_batch",
    "train_main",
    "evaluate_main",
    "DEFAULT_WEIGHTS",
]

TIP_CLASSES = ("co_sharp", "metal_s", "mixed", "asymmetric", "double", "blunt", "unstable")
# Tips fit for imaging (as the simulated controller's good tips): sharp CO, sharp metal, CO with
# a larger s share (STM-Net separates s and p); the rest call for reconditioning.
GOOD_CLASSES = ("co_sharp", "metal_s", "mixed")
# The verdict on a frame outside what the classifier knows (tipdomain.py): neither good nor
# bad, so nothing acts on it; the probabilities stay visible but mean little.
UNKNOWN = "unknown"
# Fewest nanometres of frame height a live verdict should rest on: on the held-out set the
# good-vs-bad call from 1.3 nm of frame is right 7 times in 10, from 2.6 nm 9 times in 10
# (evaluate_report's row curve), and a false "bad" costs a needless reconditioning.
MIN_VERDICT_HEIGHT_NM = 2.5


def bad_probability(probabilities: dict) -> float:
    """The classifier's probability that the tip needs reconditioning (not a good class).
    Meaningful only for a verdict inside the classifier's domain: see :func:`is_known_bad`."""
    return 1.0 - sum(probabilities.get(c, 0.0) for c in GOOD_CLASSES)


def is_unknown(verdict) -> bool:
    """Whether a verdict (a :class:`TipVerdict` or its record dict) is outside the
    classifier's domain: label "unknown" or ``in_domain`` false."""
    get = verdict.get if isinstance(verdict, dict) else (lambda k, d=None: getattr(verdict, k, d))
    return get("label") == UNKNOWN or get("in_domain", True) is False


def _bad_class(verdict, get) -> bool:
    return not is_unknown(verdict) and get("label") in TIP_CLASSES and get("label") not in GOOD_CLASSES


def is_held_back(verdict) -> bool:
    """Whether a verdict of a bad class, inside the domain, lies farther from that class's
    own frames than its action limit (``class_score`` > ``action_limit``,
    :func:`stm_live.models.tipdomain.action_limits`): near the edge of what the classifier
    knows of the class, so no policy acts on it. A record without the two says nothing."""
    get = verdict.get if isinstance(verdict, dict) else (lambda k, d=None: getattr(verdict, k, d))
    try:
        over = float(get("class_score", math.nan)) > float(get("action_limit", math.nan))
    except (TypeError, ValueError):  # a record's null
        over = False
    return _bad_class(verdict, get) and over


def is_known_bad(verdict) -> bool:
    """Whether a verdict says the tip needs reconditioning: a bad class, inside the domain,
    not held back (:func:`is_held_back`). The one test every policy acts on; "unknown" is
    never bad."""
    get = verdict.get if isinstance(verdict, dict) else (lambda k, d=None: getattr(verdict, k, d))
    return _bad_class(verdict, get) and not is_held_back(verdict)


WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "tipstate.pt"
MODEL_CARD = WEIGHTS_DIR / "TIPSTATE_MODEL_CARD.md"


@dataclass(frozen=True)
class TipVerdict:
    """What the classifier says about the tip that took an image.

    ``in_domain`` false (label :data:`UNKNOWN`): the frame is outside what the classifier was
    trained on (``domain_score`` above ``domain_threshold``, :mod:`stm_live.models.tipdomain`);
    the probabilities are kept for the record. A classifier without a domain model reports
    ``in_domain`` true and a NaN score. ``class_score`` is the distance to the label's own
    class and ``action_limit`` that class's limit for acting on a bad verdict (NaN: none);
    see :func:`is_held_back`."""

    label: str
    probabilities: dict
    s_fraction: float
    in_domain: bool = True
    domain_score: float = float("nan")
    domain_threshold: float = float("nan")
    class_score: float = float("nan")
    action_limit: float = float("nan")

    def __post_init__(self):
        if (self.label == UNKNOWN) == bool(self.in_domain):
            raise ValueError(f"TipVerdict: label {self.label!r} with in_domain={self.in_domain}; "
                             f"a verdict is {UNKNOWN!r} exactly when it is outside the domain")
        if self.label != UNKNOWN and self.label not in TIP_CLASSES:
            raise ValueError(f"TipVerdict: label {self.label!r} is not one of {TIP_CLASSES} or {UNKNOWN!r}")

    @property
    def good(self) -> bool:
        return self.label in GOOD_CLASSES

    @property
    def bad(self) -> bool:
        """A bad class inside the domain, not held back (what a policy may act on)."""
        return is_known_bad(self)

    @property
    def held_back(self) -> bool:
        """A bad class inside the domain but beyond its action limit: see :func:`is_held_back`."""
        return is_held_back(self)

    @property
    def nearest(self) -> str:
        """The most probable of :data:`TIP_CLASSES` (the label, unless "unknown")."""
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def confidence(self) -> float:
        """Probability of :attr:`nearest`."""
        return float(self.probabilities[self.nearest])

    def to_dict(self) -> dict:
        return {"label": self.label, "probabilities": dict(self.probabilities),
                "s_fraction": float(self.s_fraction), "good": self.good, "in_domain": bool(self.in_domain),
                "domain_score": float(self.domain_score), "domain_threshold": float(self.domain_threshold),
                "class_score": float(self.class_score), "action_limit": float(self.action_limit)}


# --------------------------------------------------------------------------- network
@dataclass(frozen=True)
class TipNetConfig:
    size: int = 64  # training image side (pixels): 5.1 nm, room for a second apex's ghost
    pixel_size_nm: float = 0.08  # training pixel size
    widths: tuple = (16, 48, 96, 128)  # channels per stage; each stage after the first halves the map
    n_classes: int = len(TIP_CLASSES)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TipNet(nn.Module):
    """Conv stages with max pooling between them -> masked mean+max pool over the scanned
    rows -> class logits and the tip's s share."""

    def __init__(self, cfg: TipNetConfig = TipNetConfig()):
        super().__init__()
        self.cfg = cfg
        chans = (2, *cfg.widths)  # input: normalised image + scanned-rows mask
        self.stages = nn.ModuleList(_block(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Sequential(nn.Linear(2 * chans[-1], 64), nn.ReLU(inplace=True), nn.Linear(64, cfg.n_classes + 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, s, _ = self.embed(x)
        return logits, s

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits, s share and the pooled penultimate features (masked mean and max of
        the last stage, what the head reads), which the domain model scores."""
        mask = x[:, 1:2]
        h = x
        for i, stage in enumerate(self.stages):
            h = stage(F.max_pool2d(h, 2) if i else h)
        m = F.interpolate(mask, size=h.shape[-2:], mode="area").gt(0.5).float()
        mean = (h * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1.0)
        mx = (h + (m - 1.0) * 1e4).amax(dim=(2, 3))  # unscanned cells never win the max
        pooled = torch.cat([mean, mx], dim=1)
        out = self.head(pooled)
        return out[:, :-1], torch.sigmoid(out[:, -1]), pooled


# --------------------------------------------------------------------------- preprocessing
def _prepare(image: np.ndarray, pixel_size_nm: float, cfg: TipNetConfig,
             line_spacing_nm: float | None = None) -> np.ndarray:
    """(H, W) image with NaN rows -> (2, h, w) float32 [normalised image, mask] at cfg pixel
    size (rows resampled by ``line_spacing_nm`` when lines are not square with pixels)."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"tip classifier: image must be 2-D (lines, pixels), got shape {img.shape}")
    if not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise ValueError(f"tip classifier: pixel_size_nm must be positive, got {pixel_size_nm!r}")
    mask = np.isfinite(img)
    if mask.sum() < 3 * img.shape[1]:
        raise ValueError("tip classifier: image has fewer than 3 scanned lines")
    if line_spacing_nm is None:
        line_spacing_nm = pixel_size_nm
    if not (np.isfinite(line_spacing_nm) and line_spacing_nm > 0):
        raise ValueError(f"tip classifier: line_spacing_nm must be positive, got {line_spacing_nm!r}")
    scale = pixel_size_nm / cfg.pixel_size_nm
    rscale = line_spacing_nm / cfg.pixel_size_nm
    filled = np.where(mask, img, 0.0)
    if abs(scale - 1.0) > 1e-3 or abs(rscale - 1.0) > 1e-3:
        out_shape = (max(4, round(img.shape[0] * rscale)), max(4, round(img.shape[1] * scale)))
        zoom = (out_shape[0] / img.shape[0], out_shape[1] / img.shape[1])
        m = ndimage.zoom(mask.astype(np.float64), zoom, order=1)
        filled = ndimage.zoom(filled, zoom, order=1) / np.maximum(m, 1e-6)
        mask = m > 0.5
    vals = filled[mask]
    lo, med, hi = np.percentile(vals, [1.0, 50.0, 99.0])
    spread = max(hi - lo, 1e-12 * max(abs(med), 1e-30), np.finfo(np.float64).tiny)
    norm = np.where(mask, (filled - med) / spread, 0.0)
    return np.stack([np.clip(norm, -5, 5), mask.astype(np.float64)]).astype(np.float32)


# --------------------------------------------------------------------------- data recipe
def _class_tip(label: str, rng: np.random.Generator):
    """A TipState for one class: a tip.py preset with jitter."""
    from stm_live.simulators.tip import tip_preset

    def co(s_lo=0.05, s_hi=0.22):
        sf = float(rng.uniform(s_lo, s_hi))
        if rng.random() < 0.3:  # coherent s-p_z CO (the coherent_co preset: a good tip)
            pz = float(rng.uniform(0.0, 0.1))
            return tip_preset("coherent_co").with_(s=sf, px=(1 - sf - pz) / 2, py=(1 - sf - pz) / 2, pz=pz)
        return tip_preset("co").with_(s=sf, px=(1 - sf) / 2, py=(1 - sf) / 2, pz=0.0)

    if label == "co_sharp":
        return co()
    if label == "metal_s":
        return tip_preset("s").with_(pz=float(rng.uniform(0.0, 0.05)))
    if label == "mixed":
        sf = float(rng.uniform(0.32, 0.6))
        return tip_preset("mixed").with_(s=sf, px=(1 - sf) / 2, py=(1 - sf) / 2)
    if label == "asymmetric":
        if rng.random() < 0.7:  # tilted CO
            return co().with_(tilt_deg=float(rng.uniform(15, 35)), tilt_azimuth_deg=float(rng.uniform(0, 360)),
                              name="tilted_co")
        sf, big = float(rng.uniform(0.05, 0.22)), float(rng.uniform(0.68, 0.85))
        px, py = (1 - sf) * big, (1 - sf) * (1 - big)
        if rng.random() < 0.5:
            px, py = py, px
        return tip_preset("asymmetric").with_(s=sf, px=px, py=py)
    if label == "double":
        r, a = float(rng.uniform(0.35, 0.9)), float(rng.uniform(0, 2 * np.pi))
        base = co() if rng.random() < 0.6 else tip_preset("s")
        return base.with_(double_offset_nm=(r * np.cos(a), r * np.sin(a)),
                          double_strength=float(rng.uniform(0.4, 1.0)), name="double")
    if label == "blunt":
        t = tip_preset("blunt")
        return t.with_(apex_width_nm=float(t.apex_width_nm * rng.uniform(0.8, 1.6)),
                       s=float(rng.uniform(0.4, 0.8)))
    raise ValueError(f"unknown tip class {label!r}")


def _scene(rng: np.random.Generator, cfg: TipNetConfig, *, scenery: bool = False, steps: bool = False):
    """Random scene: 1-3 library molecules (one orbital side for the frame, random position
    and rotation, the first near the centre, none overlapping another) on an optional
    NaCl-like substrate, in a frame of cfg.size pixels at cfg.pixel_size_nm. With ``scenery``
    (the broadened recipe, :mod:`stm_live.simulators.scenery`) some frames put them on a
    Au(111)/Cu(111) terrace instead (with ``steps``: 1-2 step edges) and add adsorbates and
    small molecules beside them. Returns (placements, frame, bias, substrate, surface)."""
    from stm_live.simulators import scenery as sc
    from stm_live.simulators.imaging import CubePlacement, ScanFrame, Substrate, scatter_molecules
    from stm_live.simulators.orbitals import MOLECULE_NAMES, molecule

    span = cfg.size * cfg.pixel_size_nm
    frame = ScanFrame(center_x_nm=0.0, center_y_nm=0.0, width_nm=span, height_nm=span,
                      pixels=cfg.size, lines=cfg.size)
    orbital = "HOMO" if rng.random() < 0.5 else "LUMO"
    names = [MOLECULE_NAMES[k] for k in rng.integers(len(MOLECULE_NAMES), size=int(rng.integers(1, 4)))]
    place = scatter_molecules(rng, names, lambda i: (span * (0.15 if i == 0 else 0.35),) * 2, orbital=orbital)
    substrate = surface = None
    metal = scenery and rng.random() < METAL_SHARE
    if not metal and rng.random() < 0.7:
        substrate = Substrate(corrugation=float(rng.uniform(0.0, 0.1)), angle_deg=float(rng.uniform(0, 90)))
    if scenery and rng.random() < SMALL_THINGS_SHARE:
        taken = [(p.x_nm, p.y_nm, molecule(p.molecule).radius_nm) for p in place]
        for _ in range(int(rng.integers(1, 5))):
            thing, radius, amplitude = sc.random_small_thing(rng, orbital)
            x, y = rng.uniform(-0.45 * span, 0.45 * span, size=2)
            if all(np.hypot(x - tx, y - ty) > radius + tr + 0.3 for tx, ty, tr in taken):
                place.append(CubePlacement(thing, float(x), float(y), float(rng.uniform(0, 360)), amplitude))
                taken.append((float(x), float(y), radius))
    if metal:  # a metal terrace conducts everywhere: a flat background under its apparent height
        substrate = Substrate()
        surface = sc.random_surface(rng, span, [(p.x_nm, p.y_nm) for p in place], steps=steps)
    return place, frame, (-1.0 if orbital == "HOMO" else 1.0), substrate, surface


def _degrade(img: np.ndarray, rng: np.random.Generator, unstable: bool, other=None) -> np.ndarray:
    """Noise (all classes) and instability artifacts (class 'unstable')."""
    a = np.asarray(img, dtype=np.float32)
    scale = float(np.percentile(a, 99) - np.percentile(a, 1)) or 1.0
    a = a + rng.normal(0.0, rng.uniform(0.005, 0.05) * scale, a.shape).astype(np.float32)
    if rng.random() < 0.5:
        a = a + (rng.normal(0.0, rng.uniform(0.0, 0.03) * scale, (a.shape[0], 1))).astype(np.float32)
    if unstable:
        n = a.shape[0]
        kind = rng.integers(3)
        if kind == 0 and other is not None:  # tip changes mid-frame
            cut = int(rng.integers(n // 4, 3 * n // 4))  # as artifacts.tip_change: rows >= cut new tip
            a = a.copy()
            a[cut:] = np.asarray(other, dtype=np.float32)[cut:] + (a[cut:] - np.asarray(img)[cut:])
        # jumps: blocks of lines shifted in offset and gain
        for _ in range(int(rng.integers(2, 6))):
            r0 = int(rng.integers(0, n - 1))
            r1 = min(n, r0 + int(rng.integers(1, 4)))
            a[r0:r1] = a[r0:r1] * rng.uniform(0.3, 1.8) + rng.choice([-1, 1]) * rng.uniform(0.3, 1.0) * scale
        if kind == 2:  # streaks: spikes along the fast axis
            for _ in range(int(rng.integers(2, 6))):
                r = int(rng.integers(0, n))
                c0 = int(rng.integers(0, a.shape[1] - 4))
                a[r, c0:c0 + int(rng.integers(3, a.shape[1] // 2))] += rng.uniform(0.5, 2.0) * scale
    return a


@dataclass
class Render:
    """One simulated frame before noise: what :func:`finish` turns into a network input."""

    image: np.ndarray  # current (A) at constant height, or current_from_z of a constant-current Z map
    other: np.ndarray | None  # class 'unstable': the same scene after a mid-frame tip change
    label: int
    s_fraction: float
    mode: str  # "height" | "current"


CURRENT_SHARE = 1 / 3  # share of constant-current frames in the recipe
# The broadened recipe: what real frames of molecules show beyond the library on NaCl.
METAL_SHARE = 0.45  # frames on a Au(111) or Cu(111) terrace (herringbone, standing waves)
STEP_SHARE = 0.3  # of the metal constant-current frames: step edges cross the frame
SMALL_THINGS_SHARE = 0.4  # frames with adsorbates and small molecules beside the library's
LOW_TIP_SHARE = 0.2  # constant-height frames at bond-resolving heights, z 0.3-0.45 nm


def render_sample(rng: np.random.Generator, cfg: TipNetConfig = TipNetConfig(), *, mode: str | None = None,
                  scenery: bool = False) -> Render:
    """A random class (uniform), its tip (:func:`_class_tip`) and scene (:func:`_scene`), imaged
    at constant height (z 0.45-0.8 nm; with ``scenery`` :data:`LOW_TIP_SHARE` at 0.3-0.45 nm)
    or at constant current (setpoint 0.3-0.9 of the constant-height peak at that z); Z maps
    become current-like with ``current_from_z``, as the TipMonitor does. A metal surface's
    apparent height h multiplies the current by exp(2κh) (raises Z by h). 'unstable' uses a
    random stable tip and a second render after a tip change. ``scenery=False`` (default, the
    shipped checkpoint's recipe): library molecules on a NaCl-like film or none;
    ``scenery=True``: the broadened recipe (``stm-live train --model tipstate --broad-recipe``)."""
    from stm_live.interpret import current_from_z
    from stm_live.simulators.imaging import constant_current_image, constant_height_image
    from stm_live.simulators.orbitals import KAPPA_PER_NM

    k = int(rng.integers(len(TIP_CLASSES)))
    unstable = TIP_CLASSES[k] == "unstable"
    tip = _class_tip(TIP_CLASSES[int(rng.integers(len(TIP_CLASSES) - 1))] if unstable else TIP_CLASSES[k], rng)
    after = _class_tip(TIP_CLASSES[int(rng.integers(len(TIP_CLASSES) - 1))], rng) if unstable else None
    if mode is None:
        mode = "current" if rng.random() < CURRENT_SHARE else "height"
    steps = scenery and mode == "current" and rng.random() < STEP_SHARE  # no tip crosses a step at constant height
    place, frame, bias, sub, surface = _scene(rng, cfg, scenery=scenery, steps=steps)
    low = scenery and mode == "height" and rng.random() < LOW_TIP_SHARE
    z = float(rng.uniform(0.3, 0.45) if low else rng.uniform(0.45, 0.8))
    h = 0.0 if surface is None else surface.apparent_height_nm(*frame.grid())

    def image(t):
        ch = constant_height_image(place, frame, t, z_nm=z, bias_V=bias, substrate=sub)
        if mode == "height":
            return ch * np.exp(2 * KAPPA_PER_NM * h)
        setpoint = float(ch.max()) * float(rng.uniform(0.3, 0.9))
        return current_from_z(constant_current_image(place, frame, t, setpoint_A=setpoint, bias_V=bias,
                                                     substrate=sub) + h, unit="nm")

    return Render(np.asarray(image(tip), np.float32), None if after is None else np.asarray(image(after), np.float32),
                  k, float(tip.s_fraction), mode)


# Half the training frames are re-sampled as coarser scans of the same area (pixel and line
# spacing drawn independently up to this many nm): live frames come at whatever resolution the
# operator chose, and a verification frame is often short and non-square.
COARSE_SHARE, COARSEST_NM = 0.5, 0.15
# A fifth of the others are finer scans (pixels and lines 0.02 nm up to the training pitch),
# as real frames of molecules often are: the noise is drawn at the fine pitch, then resampled.
FINE_SHARE, FINEST_NM = 0.2, 0.02
# 60 % of training frames are partial (>= a quarter of the rows); half of those are windows
# starting mid-frame, as the monitor judges the lines since a tip change or the latest lines.
PARTIAL_SHARE, WINDOW_SHARE = 0.6, 0.5


def finish(r: Render, rng: np.random.Generator, cfg: TipNetConfig = TipNetConfig(), *, partial: bool = True,
           rows: int | None = None, middle: bool = False, flip: bool = False, coarse: bool | None = None
           ) -> np.ndarray:
    """Render -> (2, S, S) network input: optional random flips (labels are flip-invariant;
    flips keep rows as scan lines), a coarser scan (``coarse``; None = :data:`COARSE_SHARE` of
    frames; else :data:`FINE_SHARE` of frames a finer one), a partial frame (``rows`` of S scanned, from the top or the ``middle`` of the
    frame; or with ``partial`` :data:`PARTIAL_SHARE` of frames cut to >= S/4 rows, some of them
    windows from mid-frame), fresh noise and artifacts (:func:`_degrade`) at the scan's own
    pixels, resampled back to the training pixel size as at inference (:func:`_prepare`)."""
    from scipy import ndimage

    img, other = r.image, r.other
    if flip:
        axes = tuple(a for a in (0, 1) if rng.random() < 0.5)
        if axes:
            img = np.flip(img, axes)
            other = None if other is None else np.flip(other, axes)
    line_nm = pixel_nm = cfg.pixel_size_nm
    if coarse or (coarse is None and rng.random() < COARSE_SHARE):
        line_nm, pixel_nm = rng.uniform(cfg.pixel_size_nm, COARSEST_NM, size=2)
    elif coarse is None and rng.random() < FINE_SHARE:
        line_nm, pixel_nm = rng.uniform(FINEST_NM, cfg.pixel_size_nm, size=2)
    if (line_nm, pixel_nm) != (cfg.pixel_size_nm,) * 2:
        zoom = (cfg.pixel_size_nm / line_nm, cfg.pixel_size_nm / pixel_nm)
        img = ndimage.zoom(img, zoom, order=1)  # the tip samples points: linear interpolation
        other = None if other is None else ndimage.zoom(other, zoom, order=1)
    n, first = img.shape[0], 0
    if rows is not None:
        rows = max(3, round(rows * n / cfg.size))
        first = (n - rows) // 2 if middle else 0
    elif partial and rng.random() < PARTIAL_SHARE:
        rows = int(rng.integers(max(3, n // 4), n + 1))
        if rng.random() < WINDOW_SHARE:
            first = int(rng.integers(0, n - rows + 1))
    if first:  # a window from mid-frame: its first line cuts through the scene
        img = img[first:first + rows]
        other = None if other is None else other[first:first + rows]
    img = _degrade(img, rng, TIP_CLASSES[r.label] == "unstable", other)
    n = img.shape[0]
    if rows is not None and rows < n:
        img = img.copy()
        img[rows:] = np.nan
    return _fit(_prepare(img, pixel_nm, cfg, line_nm), cfg.size)


def _fit(x: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad (mask 0 = not scanned) a prepared (2, h, w) input to (2, size, size)."""
    out = np.zeros((2, size, size), np.float32)
    h, w = min(size, x.shape[1]), min(size, x.shape[2])
    out[:, :h, :w] = x[:, :h, :w]
    return out


def simulate_scan(rng: np.random.Generator, tip, *, tip_after=None, change_line: int | None = None,
                  pixels: int = 64, lines: int = 64, width_nm: float = 7.0, height_nm: float | None = None,
                  z_nm: float = 0.5, molecules: int = 3, noise: float = 1.0, bias_V: float = -0.5) -> np.ndarray:
    """A simulator-like constant-height frame (current, A), as the simulated controller
    renders its default scene: ``molecules`` random library molecules on NaCl-like substrate
    (corrugation 0.05), white/pink noise and line offsets (0.03/0.02/0.01 of the image std,
    times ``noise``). Lines are square with pixels unless ``height_nm`` is given. With
    ``tip_after`` the tip changes at ``change_line`` (``artifacts.tip_change``). Tips are
    TipStates or preset names.
    """
    from stm_live.simulators import artifacts as art
    from stm_live.simulators.imaging import ScanFrame, Substrate, constant_height_image, scatter_molecules
    from stm_live.simulators.orbitals import MOLECULE_NAMES
    from stm_live.simulators.tip import tip_preset

    def as_tip(t):
        return tip_preset(t) if isinstance(t, str) else t

    if height_nm is None:
        height_nm = width_nm * lines / pixels
    frame = ScanFrame(center_x_nm=0.0, center_y_nm=0.0, width_nm=width_nm, height_nm=height_nm,
                      pixels=pixels, lines=lines)
    names = [MOLECULE_NAMES[k] for k in rng.integers(len(MOLECULE_NAMES), size=molecules)]
    place = scatter_molecules(rng, names, lambda i: (0.32 * width_nm, 0.32 * height_nm))
    sub = Substrate(corrugation=0.05)
    img = constant_height_image(place, frame, as_tip(tip), z_nm=z_nm, bias_V=bias_V, substrate=sub)
    if tip_after is not None:
        after = constant_height_image(place, frame, as_tip(tip_after), z_nm=z_nm, bias_V=bias_V, substrate=sub)
        img = art.tip_change(img, after, int(change_line))
    sd = float(np.std(img)) * noise
    if sd > 0:
        img = art.white_noise(img, 0.03 * sd, rng)
        img = art.pink_noise(img, 0.02 * sd, rng)
        img = art.line_offsets(img, 0.01 * sd, rng)
    return np.asarray(img, dtype=np.float32)


def make_batch(n: int, rng: np.random.Generator, cfg: TipNetConfig = TipNetConfig(), *,
               partial: bool = True, rows: int | None = None, middle: bool = False, mode: str | None = None,
               coarse: bool | None = None, scenery: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh simulated batch: inputs (n, 2, S, S), labels (n,), s-fraction targets (n,).

    Each sample is :func:`render_sample` then :func:`finish` (see those for the recipe).
    """
    xs = np.zeros((n, 2, cfg.size, cfg.size), np.float32)
    ys = np.zeros(n, np.int64)
    sf = np.zeros(n, np.float32)
    for i in range(n):
        r = render_sample(rng, cfg, mode=mode, scenery=scenery)
        xs[i], ys[i], sf[i] = finish(r, rng, cfg, partial=partial, rows=rows, middle=middle, coarse=coarse), r.label, r.s_fraction
    return xs, ys, sf


# --------------------------------------------------------------------------- inference
def _bucket(n: int, size: int) -> int:
    """Padded input size for ``n`` pixels: at least the training size, then multiples of 32."""
    return max(size, -(-n // 32) * 32)


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TipClassifier:
    """Inference wrapper: ``classify(image, pixel_size_nm) -> TipVerdict``."""

    def __init__(self, net: TipNet, device: torch.device, domain=None):
        self.net = net.to(device).eval()
        self.device = device
        self.cfg = net.cfg
        self.domain = domain  # tipdomain.DomainModel, or None: every frame counts as in domain
        if domain is not None:
            from stm_live.models.tipdomain import BANDS_PER_NM

            want = 2 * self.cfg.widths[-1] + len(BANDS_PER_NM) - 1
            if domain.whiten.shape[0] != want:
                raise ValueError(f"tip classifier: domain statistics have {domain.whiten.shape[0]} dimensions, this "
                                 f"network's descriptor {want}; refit them with `stm-live train --model tipdomain`")
            if domain.action_limits is not None and len(domain.action_limits) != len(TIP_CLASSES):
                raise ValueError(f"tip classifier: domain statistics have {len(domain.action_limits)} action limits, "
                                 f"not one per class ({len(TIP_CLASSES)}); refit them with "
                                 "`stm-live train --model tipdomain`")

    @property
    def pixel_size_nm(self) -> float:
        return self.cfg.pixel_size_nm

    @torch.no_grad()
    def predict(self, x: torch.Tensor | list, *, features: bool = False):
        """Prepared inputs ((n, 2, h, w), or a list of (2, h, w) of any sizes; scanned rows at
        the top, zero padding at the bottom and right) -> class probabilities (n, 7) and s
        shares (n,), averaged over flips of each frame's scanned area (classes do not change
        under a flip; about a point more accurate). Partial frames are flipped left-right only:
        training always has the scanned rows at the top. All views go through the network as
        one batch, which needs one size: views are zero-padded to a few fixed sizes
        (:func:`_bucket`), so repeated calls repeat input shapes. With ``features`` also the
        pooled penultimate features (n, D), averaged over the same views."""
        views, owner = [], []
        for i, xi in enumerate(x):
            xi = torch.as_tensor(xi)
            rows, cols = xi[1].gt(0.5).any(dim=1), xi[1].gt(0.5).any(dim=0)
            h = int(rows.nonzero().max()) + 1 if rows.any() else xi.shape[1]
            w = int(cols.nonzero().max()) + 1 if cols.any() else xi.shape[2]
            area = xi[:, :h, :w]
            flips = ((), (2,), (1,), (1, 2)) if bool(area[1].gt(0.5).all()) else ((), (2,))
            views += [torch.flip(area, d) if d else area for d in flips]
            owner += [i] * len(flips)
        height = _bucket(max(v.shape[1] for v in views), self.cfg.size)
        width = _bucket(max(v.shape[2] for v in views), self.cfg.size)
        batch = torch.zeros((len(views), 2, height, width))
        for k, v in enumerate(views):
            batch[k, :, :v.shape[1], :v.shape[2]] = v
        outs = [self.net.embed(chunk.to(self.device)) for chunk in batch.split(256)]  # bounded memory
        logits, s, pooled = (torch.cat([o[j] for o in outs]) for j in range(3))
        owner = torch.tensor(owner, device=self.device)
        n = int(owner.max()) + 1
        count = torch.zeros(n, device=self.device).index_add_(0, owner, torch.ones_like(s))
        probs = torch.zeros(n, logits.shape[1], device=self.device).index_add_(0, owner, torch.softmax(logits, 1))
        s_share = torch.zeros(n, device=self.device).index_add_(0, owner, s)
        if not features:
            return probs / count[:, None], s_share / count
        feats = torch.zeros(n, pooled.shape[1], device=self.device).index_add_(0, owner, pooled)
        return probs / count[:, None], s_share / count, feats / count[:, None]

    def classify(self, image: np.ndarray, pixel_size_nm: float, *,
                 line_spacing_nm: float | None = None) -> TipVerdict:
        """Verdict on ``image`` (lines, pixels; NaN rows = not scanned yet)."""
        return self.classify_many([image], pixel_size_nm, line_spacing_nm=line_spacing_nm)[0]

    def classify_many(self, images: list, pixel_size_nm: float, *,
                      line_spacing_nm: float | None = None) -> list[TipVerdict]:
        """Verdicts on several images of one scan (e.g. the lines since a change and the
        latest few), in one pass through the network."""
        x = [_prepare(im, pixel_size_nm, self.cfg, line_spacing_nm) for im in images]
        if self.domain is None:
            probs, s = self.predict(x)
            scores = class_scores = limits = np.full(len(x), np.nan)
        else:
            probs, s, feats = self.predict(x, features=True)
            scores, class_scores, limits = self.domain.judge(feats.cpu().numpy(), x, self.cfg.pixel_size_nm,
                                                             probs.argmax(1).cpu().numpy())
        threshold = np.nan if self.domain is None else self.domain.threshold
        verdicts = []
        for p, si, score, own, limit in zip(probs.cpu().numpy(), s.cpu().numpy(), scores, class_scores, limits):
            # NaN features (never seen; a NaN score) count as outside: unknown is the safe side
            inside = self.domain is None or bool(score <= threshold)
            verdicts.append(TipVerdict(label=TIP_CLASSES[int(p.argmax())] if inside else UNKNOWN,
                                       s_fraction=float(si),
                                       probabilities={c: float(v) for c, v in zip(TIP_CLASSES, p)},
                                       in_domain=inside, domain_score=float(score),
                                       domain_threshold=float(threshold), class_score=float(own),
                                       action_limit=float(limit)))
        return verdicts

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device, domain=None) -> "TipClassifier":
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = json.loads(state["config"])
        cfg = TipNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        net = TipNet(cfg)
        net.load_state_dict(state["model"])
        return cls(net, device, domain)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tip_classifier(device: str | None = "auto", path=None, *, domain="auto") -> TipClassifier:
    """The tip classifier from ``path`` (default: shipped weights), verified by SHA-256, with
    its domain model (:mod:`stm_live.models.tipdomain`), which turns frames outside what the
    classifier knows into "unknown" verdicts.

    The hash lives beside the checkpoint as ``<name>.sha256``. ``domain``: "auto" = the
    statistics beside the checkpoint (``tipdomain.domain_path``), required; a path; or None
    for the bare network (training and evaluation only: every frame then counts as inside).
    Raises ``FileNotFoundError`` when a file is missing and ``ValueError`` when a hash does
    not match, a file is unreadable, or the domain statistics belong to another checkpoint.
    """
    p = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(
            f"tip classifier weights not found at {p}; train them with "
            "`stm-live train --model tipstate`")
    h = p.with_suffix(p.suffix + ".sha256")
    if not h.is_file():
        raise ValueError(f"tip classifier: hash file {h} is missing; cannot verify {p}")
    want = h.read_text().split()[0].strip()
    got = _sha256(p)
    if got != want:
        raise ValueError(f"tip classifier: checkpoint {p} is corrupt (sha256 {got[:12]}..., expected {want[:12]}...)")
    model = None
    if domain is not None:
        from stm_live.models.tipdomain import domain_path, load_domain

        model = load_domain(domain_path(p) if domain == "auto" else Path(domain), classifier=p,
                            classifier_sha256=got)
    try:
        return TipClassifier.from_checkpoint(p, _pick_device(device), model)
    except Exception as exc:  # unreadable / wrong layout
        raise ValueError(f"tip classifier: cannot load {p}: {exc}") from exc


# --------------------------------------------------------------------------- training
def _save(path: Path, net: TipNet, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
             "config": json.dumps(asdict(net.cfg))}
    state.update(extra)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    path.with_suffix(path.suffix + ".sha256").write_text(f"{_sha256(path)}  {path.name}\n")


def build_bank(n: int, seed: int, cfg: TipNetConfig = TipNetConfig(), *, quiet: bool = False,
               scenery: bool = False) -> list[Render]:
    """``n`` renders from the training recipe (``scenery``: the broadened one), deterministic
    in ``seed``. Rendering is the
    costly part (constant current solves per pixel), so training renders once and draws fresh
    noise, artifacts, flips and partial cuts from this bank at every step."""
    rng = np.random.default_rng([seed, 10**9])
    t0, bank = time.perf_counter(), []
    for i in range(n):
        bank.append(render_sample(rng, cfg, scenery=scenery))
        if not quiet and ((i + 1) % 2000 == 0 or i + 1 == n):
            print(f"rendered {i + 1}/{n} training frames ({time.perf_counter() - t0:.0f} s)", flush=True)
    return bank


def train_main(steps: int = 6000, out=None, device: str = "auto", seed: int = 0, resume: bool = False,
               batch: int = 32, lr: float = 2e-3, threads: int = 1, bank_size: int = 12000,
               init: Path | None = None, broad_recipe: bool = False) -> Path:
    """Train on a bank of simulated renders (:func:`build_bank`; ``broad_recipe``: the broadened
    one) with fresh noise, artifacts, flips and partial cuts per step; checkpoints every 100
    steps; writes the model card.
    ``init``: warm start from a (hash-verified) classifier checkpoint of the same architecture;
    the new checkpoint and card record the lineage (``init_sha256``, ``total_steps``)."""
    if bank_size < 1:
        raise ValueError(f"bank_size must be at least 1 rendered frame, got {bank_size}")
    torch.set_num_threads(threads)  # shared machines: 1 thread by default
    torch.manual_seed(seed)
    out = Path(out) if out is not None else DEFAULT_WEIGHTS
    dev = _pick_device(device)
    cfg = TipNetConfig()
    net = TipNet(cfg).to(dev)
    lineage = {"total_steps": steps}
    if init is not None:
        parent = load_tip_classifier("cpu", init, domain=None)
        if parent.cfg != cfg:
            raise ValueError(f"--init: {init} has architecture {asdict(parent.cfg)}, not {asdict(cfg)}")
        net.load_state_dict(parent.net.state_dict())
        st = torch.load(init, map_location="cpu", weights_only=True)
        parent_steps = int(st.get("total_steps", st.get("steps", 0)))
        lineage = {"init_sha256": _sha256(Path(init)), "init_steps": parent_steps, "total_steps": parent_steps + steps}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start, wall_before = 0, 0.0
    ckpt = out.with_suffix(".ckpt")
    out.parent.mkdir(parents=True, exist_ok=True)  # the resume state is written there from step 100
    if resume:
        if not ckpt.is_file():
            raise ValueError(f"--resume: no training state at {ckpt}; start without --resume")
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        if int(st["steps"]) != steps:
            raise ValueError(f"--resume: saved run was for --steps {int(st['steps'])}, not {steps}")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        sched.load_state_dict(st["sched"])
        start, wall_before = int(st["step"]), float(st["wall_s"])
        print(f"resumed from step {start}")
    t0 = time.perf_counter()
    bank = build_bank(min(bank_size, steps * batch), seed, cfg, scenery=broad_recipe)  # a short run draws fewer
    run_acc, run_loss = 0.0, 0.0
    for step in range(start, steps):
        net.train()
        rng = np.random.default_rng([seed, step])  # each step's batch depends on (seed, step) only
        picks = rng.integers(len(bank), size=batch)
        x = np.stack([finish(bank[i], rng, cfg, flip=True) for i in picks])
        y = np.array([bank[i].label for i in picks], np.int64)
        s = np.array([bank[i].s_fraction for i in picks], np.float32)
        x, y, s = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), torch.from_numpy(s).to(dev)
        logits, s_hat = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.02) + 2.0 * F.mse_loss(s_hat, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run_loss = 0.95 * run_loss + 0.05 * loss.item() if step > start else loss.item()
        acc = float((logits.argmax(1) == y).float().mean())
        run_acc = 0.95 * run_acc + 0.05 * acc if step > start else acc
        if (step + 1) % 100 == 0 or step + 1 == steps:
            el = wall_before + time.perf_counter() - t0
            print(f"step {step + 1}/{steps} loss {run_loss:.3f} acc {run_acc:.3f} ({el:.0f} s)", flush=True)
            torch.save({"model": net.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "steps": steps, "wall_s": el}, ckpt)
    wall = wall_before + time.perf_counter() - t0
    _save(out, net.cpu(), {"steps": steps, "seed": seed, **lineage})
    ckpt.unlink(missing_ok=True)  # the resume state is not shipped
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KiB) after {wall:.0f} s; its domain statistics are "
          "fitted by `stm-live train --model tipdomain` (the classifier does not load without them)")
    # the new weights have no domain statistics yet (`stm-live train --model tipdomain` fits them)
    report = evaluate_report(load_tip_classifier("cpu", out, domain=None), samples=min(40, max(2, steps // 100)))
    print(format_report(report))
    # The card goes beside whichever checkpoint was written, shipped or not.
    card = MODEL_CARD if out.resolve() == DEFAULT_WEIGHTS.resolve() else out.with_name(out.stem + "_MODEL_CARD.md")
    _write_card(card, steps=steps, seed=seed, batch=batch, lr=lr, bank_size=len(bank), wall=wall,
                threads=threads, device=str(dev), report=report, lineage=lineage, broad=broad_recipe)
    return out


# --------------------------------------------------------------------------- evaluation
def evaluate(clf: TipClassifier, samples: int = 20, seed: int = 1234, *, partial: bool = False,
             rows: int | None = None, middle: bool = False, mode: str | None = None, coarse: bool = False,
             scenery: bool = False) -> dict:
    """Fresh held-out simulated set (own seed, never a training stream): ``samples`` x 7
    frames, classes drawn uniformly, at the training pixel size unless ``coarse`` (every frame
    a coarser scan, :func:`finish`). Full frames unless ``partial`` (the training mix of
    partial frames) or ``rows`` (every frame cut to that many of S rows, from the top or the
    ``middle`` of the frame); ``scenery``: the broadened recipe (metal terraces, adsorbates,
    small molecules) instead of the default one. Class metrics score the network's most probable class; with a
    domain model, ``unknown_share`` is the share of these in-domain frames it calls unknown
    (NaN without one)."""
    rng = np.random.default_rng([seed, 10_000_019, rows or 0, len(mode or "")] + ([1] if scenery else []))
    n = samples * len(TIP_CLASSES)
    x, y, s = make_batch(n, rng, clf.cfg, partial=partial, rows=rows, middle=middle, mode=mode, coarse=coarse,
                         scenery=scenery)
    unknown = float("nan")
    if getattr(clf, "domain", None) is None:
        probs, s_hat = clf.predict(torch.from_numpy(x))
    else:  # the seven classes are scored as before; the gate's "unknown" share on the side
        probs, s_hat, feats = clf.predict(torch.from_numpy(x), features=True)
        scores = clf.domain.score_inputs(feats.cpu().numpy(), x, clf.cfg.pixel_size_nm)
        unknown = float(np.mean(~(scores <= clf.domain.threshold)))
    pred = probs.argmax(1).cpu().numpy()
    k = len(TIP_CLASSES)
    conf = np.zeros((k, k), np.int64)
    for t, p in zip(y, pred):
        conf[t, p] += 1
    good = np.array([TIP_CLASSES.index(c) for c in GOOD_CLASSES])
    gb_true, gb_pred = np.isin(y, good), np.isin(pred, good)
    f1 = []
    for c in range(k):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c, :].sum() - conf[c, c]
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"n": int(n), "accuracy": float((pred == y).mean()), "good_vs_bad": float((gb_true == gb_pred).mean()),
            "macro_f1": float(np.mean(f1)), "per_class_f1": dict(zip(TIP_CLASSES, map(float, f1))),
            "s_fraction_mae": float(np.abs(s_hat.cpu().numpy() - s).mean()), "confusion": conf.tolist(),
            "unknown_share": unknown}


def evaluate_report(clf: TipClassifier, samples: int = 40, seed: int = 1234) -> dict:
    """The evaluation the card and benchmark print: full frames (headline; the recipe's mix of
    constant height and current), each imaging mode alone, the same frames scanned coarser,
    frames cut to fewer rows, and half frames from the middle (a window that starts mid-scene,
    as the monitor judges the lines since a tip change)."""
    size = clf.cfg.size
    report = {"full frames": evaluate(clf, samples, seed),
              "broadened recipe (metal terraces, adsorbates, small molecules)": evaluate(clf, samples, seed,
                                                                                         scenery=True)}
    for mode in ("height", "current"):
        report[f"{mode} only"] = evaluate(clf, samples, seed, mode=mode)
    report[f"coarser scans ({clf.cfg.pixel_size_nm}-{COARSEST_NM} nm)"] = evaluate(clf, samples, seed, coarse=True)
    for rows in (size // 4, size // 2, 3 * size // 4):
        report[f"first {rows}/{size} rows"] = evaluate(clf, samples, seed, rows=rows)
    report[f"middle {size // 2}/{size} rows"] = evaluate(clf, samples, seed, rows=size // 2, middle=True)
    return report


def _format_metrics(m: dict) -> str:
    lines = [f"n={m['n']}  accuracy {m['accuracy']:.3f}  good-vs-bad "
             f"{m['good_vs_bad']:.3f}  macro-F1 {m['macro_f1']:.3f}  s-share MAE {m['s_fraction_mae']:.3f}",
             "confusion (rows true, cols predicted):",
             " " * 12 + " ".join(f"{c[:7]:>7}" for c in TIP_CLASSES)]
    for c, row in zip(TIP_CLASSES, m["confusion"]):
        lines.append(f"{c:>12}" + " ".join(f"{v:7d}" for v in row))
    return "\n".join(lines)


def report_table(report: dict) -> list[str]:
    """Markdown rows: one per evaluation set of :func:`evaluate_report`."""
    gated = any(np.isfinite(m.get("unknown_share", np.nan)) for m in report.values())
    rows = ["| set | n | good-vs-bad | macro-F1 | accuracy | s-share MAE |" + (" called unknown |" if gated else ""),
            "|---|---|---|---|---|---|" + ("---|" if gated else "")]
    rows += [f"| {name} | {m['n']} | {m['good_vs_bad']:.3f} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} | "
             f"{m['s_fraction_mae']:.3f} |" + (f" {m['unknown_share']:.3f} |" if gated else "")
             for name, m in report.items()]
    return rows


def format_report(report: dict) -> str:
    full = report["full frames"]
    return "\n".join(["held-out simulated set, full frames: " + _format_metrics(full), "", *report_table(report)])


def evaluate_main(device: str = "auto", samples: int = 40, seed: int = 1234) -> dict:
    """`stm-live evaluate --model tipstate`: print metrics on held-out simulated sets."""
    clf = load_tip_classifier(device)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    report = evaluate_report(clf, samples=samples, seed=seed)
    print(format_report(report))
    return report


def _write_card(card: Path, *, steps, seed, batch, lr, bank_size, wall, threads, device, report,
                lineage: dict, broad: bool = False) -> None:
    import platform

    from stm_live.models.training import card_command

    cfg = TipNetConfig()
    full = report["full frames"]
    card.write_text("\n".join([
        "# Tip-state classifier (`tipstate.pt`)",
        "",
        f"CNN ({len(cfg.widths)} conv stages of widths {', '.join(map(str, cfg.widths))}, masked mean+max "
        "pooling, class + s-share heads), "
        f"{sum(p.numel() for p in TipNet().parameters()):,} parameters; classes {', '.join(TIP_CLASSES)}; "
        f"good = {', '.join(GOOD_CLASSES)}.",
        "",
        f"- Command: `{card_command()}`",
        *([f"- Warm start: from the checkpoint with sha256 `{lineage['init_sha256']}` ({lineage['init_steps']} "
           f"steps; its card is in the project history), {lineage['total_steps']} steps in all"]
          if "init_sha256" in lineage else []),
        f"- Data recipe (`stm_live.models.tipstate.render_sample` + `finish`): {bank_size} simulated frames "
        f"rendered once (`build_bank`), {cfg.size}x{cfg.size} px at {cfg.pixel_size_nm} nm/px: 1-3 random "
        "library molecules (HOMO or LUMO side, the first near the centre, random rotation, none overlapping "
        "another: `scatter_molecules`) on an optional NaCl-like substrate (corrugation 0-0.1)"
        + ((f" or, in {METAL_SHARE:.0%} of frames, a Au(111) or Cu(111) terrace (broadened recipe, "
            "`simulators.scenery`: herringbone ridges 0.01-0.025 nm on 80 % of Au frames, surface-state standing "
            f"waves around every scatterer, and on {STEP_SHARE:.0%} of the metal constant-current frames 1-2 "
            f"monatomic step edges); in {SMALL_THINGS_SHARE:.0%} of frames 1-4 adsorbates and small molecules "
            "beside them (adatoms, polyenes, random closed-shell polyhexes of 1-4 rings); molecules, lattices, "
            "tip tilts and second apexes at random angles to the scan lines (a rotated frame is inside); "
            f"constant height z 0.45-0.8 nm ({LOW_TIP_SHARE:.0%} of them at bond-resolving heights 0.3-0.45 nm)")
           if broad else "; constant height z 0.45-0.8 nm")
        + " (2/3) or constant current "
        "(1/3, setpoint 0.3-0.9 of the constant-height peak, Z map through `current_from_z`); per class a "
        "tip preset with jitter (CO s share 5-22 %, 30 % of CO tips coherent; mixed s 32-60 %; tilt "
        "15-35 deg or p imbalance 0.68-0.85; second apex 0.35-0.9 nm away at strength 0.4-1; blunt "
        "width x0.8-1.6). Every step draws random flips, a coarser scan of the same area for "
        f"{COARSE_SHARE:.0%} of frames (pixel and line spacing each {cfg.pixel_size_nm}-{COARSEST_NM} nm, "
        "resampled back as at inference; "
        f"{FINE_SHARE:.0%} of the others finer, {FINEST_NM}-{cfg.pixel_size_nm} nm), fresh white + per-line "
        "noise, 'unstable' artifacts (mid-frame "
        f"tip change, line jumps, streaks) and partial frames ({PARTIAL_SHARE:.0%}, >= a quarter of the rows; "
        f"{WINDOW_SHARE:.0%} of them windows that start mid-frame).",
        f"- Steps: {steps}, batch {batch}, AdamW lr {lr} one-cycle, seed {seed}",
        f"- Wall time: {wall / 60:.1f} min (rendering the bank included) on {device}, "
        f"{platform.machine()} {platform.processor() or ''}, {threads} torch thread(s), torch {torch.__version__}",
        "",
        "## Held-out metrics",
        "",
        "Fresh frames from the same recipe with their own seed (`stm-live evaluate --model tipstate`, "
        f"{full['n'] // len(TIP_CLASSES)} per class, seed 1234). "
        "Targets: good-vs-bad >= 0.99, macro-F1 >= 0.95 on full frames.",
        "",
        *report_table(report),
        "",
        "Per-class F1 (full frames): " + ", ".join(f"{k} {v:.2f}" for k, v in full["per_class_f1"].items()),
        "",
        "Limits: trained and scored on simulation only; a partial frame whose rows hold no molecule "
        "carries little tip information, which the rows curve shows. Real-tip validation pending.",
        "",
    ]))
