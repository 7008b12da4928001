"""The tip classifier's training data: a recipe of simulated frames, one per tip class.

Each sample is :func:`render_sample` (a class, its tip: :func:`class_tip`, and a scene of
library molecules imaged at constant height or constant current) then :func:`finish`
(flips, coarser or finer scans, partial frames, noise and artifacts, prepared as at
inference); :func:`make_batch` draws fresh batches and :func:`build_bank` renders a bank
once for training. :func:`simulate_scan` renders a frame as the simulated controller does
(tests, benchmarks, the domain statistics). All physics is ``stm_live.simulators``.

Progress of :func:`build_bank` goes to this module's logger at INFO; a command shows it with
``stm_live.models.console_progress()``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from stm_live.models.tipstate import TIP_CLASSES, TipNetConfig, prepare
from stm_live.simulators import artifacts as art
from stm_live.simulators import scenery as sc
from stm_live.simulators.imaging import (
    CubePlacement,
    ScanFrame,
    Substrate,
    constant_current_image,
    constant_height_image,
    scatter_molecules,
)
from stm_live.simulators.orbitals import MOLECULE_NAMES, molecule
from stm_live.simulators.tip import tip_preset
from stm_live.simulators.vacuum import KAPPA_PER_NM, current_from_z

__all__ = [
    "Render",
    "render_sample",
    "finish",
    "make_batch",
    "build_bank",
    "simulate_scan",
    "class_tip",
    "CURRENT_SHARE",
    "METAL_SHARE",
    "STEP_SHARE",
    "SMALL_THINGS_SHARE",
    "LOW_TIP_SHARE",
    "COARSE_SHARE",
    "COARSEST_NM",
    "FINE_SHARE",
    "FINEST_NM",
    "PARTIAL_SHARE",
    "WINDOW_SHARE",
]

logger = logging.getLogger(__name__)


def class_tip(label: str, rng: np.random.Generator):
    """A TipState for one class: a tip.py preset with jitter."""

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
            return co().with_(
                tilt_deg=float(rng.uniform(15, 35)), tilt_azimuth_deg=float(rng.uniform(0, 360)), name="tilted_co"
            )
        sf, big = float(rng.uniform(0.05, 0.22)), float(rng.uniform(0.68, 0.85))
        px, py = (1 - sf) * big, (1 - sf) * (1 - big)
        if rng.random() < 0.5:
            px, py = py, px
        return tip_preset("asymmetric").with_(s=sf, px=px, py=py)
    if label == "double":
        r, a = float(rng.uniform(0.35, 0.9)), float(rng.uniform(0, 2 * np.pi))
        base = co() if rng.random() < 0.6 else tip_preset("s")
        return base.with_(
            double_offset_nm=(r * np.cos(a), r * np.sin(a)), double_strength=float(rng.uniform(0.4, 1.0)), name="double"
        )
    if label == "blunt":
        t = tip_preset("blunt")
        return t.with_(apex_width_nm=float(t.apex_width_nm * rng.uniform(0.8, 1.6)), s=float(rng.uniform(0.4, 0.8)))
    raise ValueError(f"unknown tip class {label!r}")


def _scene(rng: np.random.Generator, cfg: TipNetConfig, *, scenery: bool = False, steps: bool = False):
    """Random scene: 1-3 library molecules (one orbital side for the frame, random position
    and rotation, the first near the centre, none overlapping another) on an optional
    NaCl-like substrate, in a frame of cfg.size pixels at cfg.pixel_size_nm. With ``scenery``
    (the broadened recipe, :mod:`stm_live.simulators.scenery`) some frames put them on a
    Au(111)/Cu(111) terrace instead (with ``steps``: 1-2 step edges) and add adsorbates and
    small molecules beside them. Returns (placements, frame, bias, substrate, surface)."""
    span = cfg.size * cfg.pixel_size_nm
    frame = ScanFrame(center_x_nm=0.0, center_y_nm=0.0, width_nm=span, height_nm=span, pixels=cfg.size, lines=cfg.size)
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
                a[r, c0 : c0 + int(rng.integers(3, a.shape[1] // 2))] += rng.uniform(0.5, 2.0) * scale
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


def render_sample(
    rng: np.random.Generator, cfg: TipNetConfig = TipNetConfig(), *, mode: str | None = None, scenery: bool = False
) -> Render:
    """A random class (uniform), its tip (:func:`class_tip`) and scene (:func:`_scene`), imaged
    at constant height (z 0.45-0.8 nm; with ``scenery`` :data:`LOW_TIP_SHARE` at 0.3-0.45 nm)
    or at constant current (setpoint 0.3-0.9 of the constant-height peak at that z); Z maps
    become current-like with ``current_from_z``, as the TipMonitor does. A metal surface's
    apparent height h multiplies the current by exp(2κh) (raises Z by h). 'unstable' uses a
    random stable tip and a second render after a tip change. ``scenery=False`` (default, the
    shipped checkpoint's recipe): library molecules on a NaCl-like film or none;
    ``scenery=True``: the broadened recipe (``stm-live train --model tipstate --broad-recipe``)."""
    k = int(rng.integers(len(TIP_CLASSES)))
    unstable = TIP_CLASSES[k] == "unstable"
    tip = class_tip(TIP_CLASSES[int(rng.integers(len(TIP_CLASSES) - 1))] if unstable else TIP_CLASSES[k], rng)
    after = class_tip(TIP_CLASSES[int(rng.integers(len(TIP_CLASSES) - 1))], rng) if unstable else None
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
        return current_from_z(
            constant_current_image(place, frame, t, setpoint_A=setpoint, bias_V=bias, substrate=sub) + h, unit="nm"
        )

    return Render(
        np.asarray(image(tip), np.float32),
        None if after is None else np.asarray(image(after), np.float32),
        k,
        float(tip.s_fraction),
        mode,
    )


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


def finish(
    r: Render,
    rng: np.random.Generator,
    cfg: TipNetConfig = TipNetConfig(),
    *,
    partial: bool = True,
    rows: int | None = None,
    middle: bool = False,
    flip: bool = False,
    coarse: bool | None = None,
) -> np.ndarray:
    """Render -> (2, S, S) network input: optional random flips (labels are flip-invariant;
    flips keep rows as scan lines), a coarser scan (``coarse``; None = :data:`COARSE_SHARE` of
    frames; else :data:`FINE_SHARE` of frames a finer one), a partial frame (``rows`` of S
    scanned, from the top or the ``middle`` of the frame; or with ``partial``
    :data:`PARTIAL_SHARE` of frames cut to >= S/4 rows, some of them windows from mid-frame),
    fresh noise and artifacts (:func:`_degrade`) at the scan's own pixels, resampled back to the
    training pixel size as at inference (``tipstate.prepare``)."""
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
        img = img[first : first + rows]
        other = None if other is None else other[first : first + rows]
    img = _degrade(img, rng, TIP_CLASSES[r.label] == "unstable", other)
    n = img.shape[0]
    if rows is not None and rows < n:
        img = img.copy()
        img[rows:] = np.nan
    return _fit(prepare(img, pixel_nm, cfg, line_nm), cfg.size)


def _fit(x: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad (mask 0 = not scanned) a prepared (2, h, w) input to (2, size, size)."""
    out = np.zeros((2, size, size), np.float32)
    h, w = min(size, x.shape[1]), min(size, x.shape[2])
    out[:, :h, :w] = x[:, :h, :w]
    return out


def simulate_scan(
    rng: np.random.Generator,
    tip,
    *,
    tip_after=None,
    change_line: int | None = None,
    pixels: int = 64,
    lines: int = 64,
    width_nm: float = 7.0,
    height_nm: float | None = None,
    z_nm: float = 0.5,
    molecules: int = 3,
    noise: float = 1.0,
    bias_V: float = -0.5,
) -> np.ndarray:
    """A simulator-like constant-height frame (current, A), as the simulated controller
    renders its default scene: ``molecules`` random library molecules on NaCl-like substrate
    (corrugation 0.05), white/pink noise and line offsets (0.03/0.02/0.01 of the image std,
    times ``noise``). Lines are square with pixels unless ``height_nm`` is given. With
    ``tip_after`` the tip changes at ``change_line`` (``artifacts.tip_change``). Tips are
    TipStates or preset names.
    """

    def as_tip(t):
        return tip_preset(t) if isinstance(t, str) else t

    if height_nm is None:
        height_nm = width_nm * lines / pixels
    frame = ScanFrame(
        center_x_nm=0.0, center_y_nm=0.0, width_nm=width_nm, height_nm=height_nm, pixels=pixels, lines=lines
    )
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


def make_batch(
    n: int,
    rng: np.random.Generator,
    cfg: TipNetConfig = TipNetConfig(),
    *,
    partial: bool = True,
    rows: int | None = None,
    middle: bool = False,
    mode: str | None = None,
    coarse: bool | None = None,
    scenery: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh simulated batch: inputs (n, 2, S, S), labels (n,), s-fraction targets (n,).

    Each sample is :func:`render_sample` then :func:`finish` (see those for the recipe).
    """
    xs = np.zeros((n, 2, cfg.size, cfg.size), np.float32)
    ys = np.zeros(n, np.int64)
    sf = np.zeros(n, np.float32)
    for i in range(n):
        r = render_sample(rng, cfg, mode=mode, scenery=scenery)
        xs[i] = finish(r, rng, cfg, partial=partial, rows=rows, middle=middle, coarse=coarse)
        ys[i], sf[i] = r.label, r.s_fraction
    return xs, ys, sf


def build_bank(
    n: int, seed: int, cfg: TipNetConfig = TipNetConfig(), *, quiet: bool = False, scenery: bool = False
) -> list[Render]:
    """``n`` renders from the training recipe (``scenery``: the broadened one), deterministic
    in ``seed``. Rendering is the
    costly part (constant current solves per pixel), so training renders once and draws fresh
    noise, artifacts, flips and partial cuts from this bank at every step."""
    rng = np.random.default_rng([seed, 10**9])
    t0, bank = time.perf_counter(), []
    for i in range(n):
        bank.append(render_sample(rng, cfg, scenery=scenery))
        if not quiet and ((i + 1) % 2000 == 0 or i + 1 == n):
            logger.info("rendered %d/%d training frames (%.0f s)", i + 1, n, time.perf_counter() - t0)
    return bank
