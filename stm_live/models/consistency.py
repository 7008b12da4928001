"""Reconstruction self-consistency: does a reconstruction ρ predict the image it came from?

Physics
    For a real orbital ψ, ρ = |ψ|² fixes the p-channel image: ψ = ±√ρ, so
    |∇∥ψ|² = |∇∥√ρ|² wherever ρ > 0. A reconstruction therefore predicts its own CO-tip
    image in the forward model's convention (``simulators.tip.tip_signal``: every gradient
    divided by κ, one weight per tip channel, weights summing to 1):

        I_pred = a · (w_s ρ + (1 − w_s) G) + b,   G = ½ |∇∥√ρ|² / κ²

    G is the image of "one p_xy channel": the CO presets split the p weight equally between
    p_x and p_y (``TIP_PRESETS["co"]`` = 0.13 s + 0.435 p_x + 0.435 p_y), so the p part is
    w_x|∂xψ/κ|² + w_y|∂yψ/κ|² = (1 − w_s) · ½|∇∥ψ|²/κ² for w_x = w_y. (Without the ½ the
    fitted s share of the CO preset would come out as 0.23, not 0.13.) The tip's s share w_s,
    the scale a ≥ 0 and the offset b are fitted to the measured image by least squares: for
    fixed w_s the model is linear in (a w_s, a (1 − w_s), b), so one non-negative linear
    least-squares problem on the basis maps ρ, G and a constant gives all three.

p_z, the coherent s–p_z term and tilted tips
    Over a vacuum tail each lateral Fourier component q of ψ decays as e^{−√(κ²+q²) z}, so
    ∂zψ̂ = −√(κ²+q²) ψ̂ and, by Parseval, ∫|∂zψ/κ|² = ∫(|ψ|² + |∇∥ψ|²/κ²) exactly: a p_z
    channel sees ψ scaled by an effective (κ_eff/κ)² = 1 + 2⟨G⟩/⟨ρ⟩ (plane averages), and
    locally its image looks like ρ, not like G (fits of forward-model images confirm it). So
    p_z has no basis map of its own: it folds into the s term with the factor
    f = 1 + 2⟨G⟩/⟨ρ⟩ (``ConsistencyResult.pz_factor``, ≈ 1.6-2.5 for the library orbitals at
    0.3-0.6 nm), and a coherent tip's |√w_s ψ + √w_z ∂zψ/κ|² ≈ (√w_s − √(f w_z))² ρ
    (destructive: ψ and ∂zψ have opposite signs above the molecule). The fitted w_s is thus
    the tip's *effective* s share, :func:`effective_s_share` (compare the classifier's s share
    through it, not directly: for ``coherent_co`` it is ≈ 0, not 0.13).
    A tilted tip mixes p_z into its p_x/p_y axes. Its cross terms ∂xψ ∂zψ (and s–p_x for a
    coherent tilted tip) become, with ∂zψ ≈ −κψ, multiples of ψ ∂xψ = ½ ∂xρ: two more basis
    maps ∂xρ/κ, ∂yρ/κ with free signs take them up. The tilted apex also sits
    ``tip.CO_PIVOT_NM``·sin(tilt) off axis, displacing the whole image: the fit moves ρ and G
    by the lateral shift (≤ ``MAX_SHIFT_NM``) that best matches the measured image.

Degenerate levels
    For ρ = Σ_i ψ_i² (degenerate partners add incoherently) Cauchy–Schwarz gives
    |∇√ρ|² = |Σ ψ_i ∇ψ_i|² / ρ ≤ Σ |∇ψ_i|²: the p term from √ρ is a lower bound on the
    true p image (short by Σ_{i<j} |ψ_i∇ψ_j − ψ_j∇ψ_i|²/ρ), so a degenerate level's image is
    under-predicted where the partners' nodes do not coincide and its agreement is lower
    (triphenylene's HOMO and LUMO are the low tail of the held-out set).

Gradients of √ρ
    √ρ = |ψ| has a kink at every nodal line, exactly where a CO tip is brightest, so plain
    finite differences of √ρ fail there (a centred difference across a node underestimates
    |∇ψ| by up to 100 %). Along each axis the signs of the four neighbours in a 5-point
    stencil are chosen among "no node", "node beside the centre" and "node one pixel
    further" by the smallest summed |second difference| (ψ is smooth, |ψ| is not), then a
    4th-order centred difference is taken; NaN neighbours (unscanned lines) fall back to
    3- and 2-point differences. On exact ρ at 0.05 nm pixels this reproduces |∇∥ψ|² to
    ≈ 0.5 % (RMS) of its peak; single pixels where two nodes fall within the stencil err by
    up to ≈ 20 % (≈ 6 % at 0.025 nm). Coarser pitches under-resolve the p image on the
    measured grid itself, so when STM-Net ran on a finer grid (``network``) the prediction is
    made there and point-sampled at the measured pixels, as the tip samples the surface:
    median agreement on held-out molecules 0.67 at 0.05 nm, 0.72 / 0.69 / 0.62 at 0.08 /
    0.1 / 0.13 nm (0.26 / 0.09 / 0.00 on the measured grid). The live band updates, which
    have no whole-frame network grid, check on the measured grid; the final check does not.

Scores
    ``explained``: R² of the full fit (measured vs predicted), clipped to [0, 1].
    ``explained_s``: R² of ρ alone (a ρ + ∂ρ terms + b: what an s tip would see).
    ``agreement`` (the score, in [0, 1]): the partial R² of the p image,
    1 − SS(CO-tip fit) / SS(ρ-alone fit): the share of the contrast that |ψ|² alone leaves
    unexplained which the reconstruction's own predicted p-channel image accounts for. This
    is the claim a CO-tip reconstruction makes (what it removed from the image is the p
    channel of ψ = ±√ρ), so it tests exactly that. Plain R² does not: a smooth frame with no
    orbital (a step, a cluster, a 7×7 lattice) comes back from the network almost unchanged
    and ρ alone explains 80-95 % of it, so R² is as high as for molecules (ROC AUC against
    held-out molecules, all out-of-scope families pooled: 0.68 for R², 0.98 for the partial
    R²; ``python -m benchmarks stmnet_consistency``). The partial R² is 0 when ρ alone explains the
    image: no p contrast (an s-like tip, or no orbital) is "not a CO-tip orbital image" too.

Limits
    The check tests the physics of one image, not the presence of a molecule: any frame that
    some non-negative ρ explains through the CO-tip model passes. Isolated s-like atoms
    (adatoms ≳ 0.8 nm apart) seen by a metal tip sometimes do: the network sharpens each
    bump and "sharp s state + its p ring" reproduces the broad bump; a smooth step edge
    sometimes does when the network's edge profile is off by what a p ring would add. About
    13 % of held-out molecule frames fall below the threshold: degenerate levels (triphenylene)
    and s-rich tips (little p contrast) score lower. Tilted tips are fitted to first order.
    The check is numpy on the CPU: ≈ 11-14 ms per 256² frame, ≈ 15 % of STM-Net's 2-thread
    CPU inference on an idle machine (benchmark), but more than a GPU inference takes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage
from scipy.ndimage import minimum_filter

from stm_live.simulators.vacuum import KAPPA_PER_NM, current_from_z

# Agreement below which a reconstruction is "not a CO-tip orbital image": the 5th percentile
# (0.356, rounded down) of the shipped STM-Net's agreement on 297 in-distribution frames
# (training molecules, HOMO/LUMO, every evaluation tip, constant height and current;
# ``benchmarks.bench_stmnet_consistency.calibrate()``). No out-of-scope frame set it.
AGREEMENT_THRESHOLD = 0.35
# Largest lateral image shift fitted: the apex offset of a CO tip tilted by 30 degrees
# (tip.CO_PIVOT_NM · sin 30°; training tilts reach 25°).
MAX_SHIFT_NM = 0.15
# ... and kept only when it cuts the residual by this share on the same pixels (a tiny shift
# would otherwise just trade the frame's edge pixels for a slightly better score)
SHIFT_GAIN = 0.05
MIN_PIXELS = 16
# ρ alone explaining this share of the image: "no p-channel contrast" in the reason
S_LIKE_EXPLAINED = 0.95


@dataclass
class ConsistencyResult:
    """Outcome of :func:`check_reconstruction`; arrays have the measured image's shape.

    Scalars are NaN when nothing could be fitted (fewer than ``MIN_PIXELS`` usable pixels).
    """

    agreement: float  # the score in [0, 1]: partial R² of the predicted p image (module docstring)
    explained: float  # R² of the whole CO-tip model, in [0, 1]
    explained_s: float  # R² of ρ alone (what an s tip would see), in [0, 1]
    w_s: float  # fitted effective s share of the tip, in [0, 1]; NaN when a = 0
    a: float  # scale (>= 0), measured-image units per unit of ρ
    b: float  # offset, measured-image units
    shift_nm: tuple[float, float]  # (x, y) nm the prediction was moved by: +x = later pixels, +y = later lines
    pz_factor: float  # (κ_eff/κ)² = 1 + 2⟨G⟩/⟨ρ⟩: how a p_z channel folds into s (effective_s_share)
    predicted: np.ndarray  # float32 predicted image; NaN where the measured image or ρ is NaN
    residual: np.ndarray  # float32 measured − predicted; NaN where either is NaN
    in_scope: bool  # agreement >= threshold
    reason: str  # "" when in scope, else one line saying why
    pixels: int  # pixels the fit used (a fitted shift leaves the frame's outer pixels out)

    def summary(self) -> dict:
        """The scalars as plain Python values (float, bool, str, list; NaN stays NaN, so
        sanitise before strict JSON)."""
        return {
            "agreement": self.agreement,
            "explained": self.explained,
            "explained_s": self.explained_s,
            "w_s": self.w_s,
            "a": self.a,
            "b": self.b,
            "shift_nm": [float(v) for v in self.shift_nm],
            "pz_factor": self.pz_factor,
            "in_scope": bool(self.in_scope),
            "reason": self.reason,
            "pixels": self.pixels,
        }

    def line(self) -> str:
        """One line for a terminal or a report."""
        if math.isnan(self.agreement):
            return f"self-consistency: {self.reason}"
        head = (
            f"self-consistency: agreement {self.agreement:.2f}, fitted tip s share {self.w_s:.2f}, "
            f"{100 * self.explained:.0f} % of the image explained"
        )
        return f"{head}; {self.reason}" if self.reason else f"{head}; a CO-tip orbital image"


# ------------------------------------------------------------------------------ gradients


def _abs_derivative(s: np.ndarray, h: float, axis: int) -> np.ndarray:
    """|∂ψ/∂axis| from s = |ψ| (module docstring: sign choice on a 5-point stencil, then a
    4th-order centred difference; 3- and 2-point fallbacks next to NaN and the edges)."""
    q = np.moveaxis(s, axis, 0)
    n = q.shape[0]
    pad = np.full((n + 4,) + q.shape[1:], np.nan, dtype=q.dtype)
    pad[2:-2] = q
    l2, l1, c, r1, r2 = (pad[k : k + n] for k in range(5))
    # |second differences| of the stencil under each sign pattern (the centre is +):
    # inner (at l1, c, r1) and outer variants with l2 / r2 flipped
    a_keep, a_out = np.abs(l2 - 2 * l1 + c), np.abs(l2 + 2 * l1 - c)
    c_keep, c_out = np.abs(c - 2 * r1 + r2), np.abs(r2 + 2 * r1 - c)
    b_keep = np.abs(l1 - 2 * c + r1)
    # no node beside the centre (a node one pixel further may flip l2 or r2) ...
    keep = b_keep + np.minimum(a_keep, a_out) + np.minimum(c_keep, c_out)
    # ... or a node between the centre and l1 (l1, l2 flip) or r1 (r1, r2 flip)
    flip_l = np.abs(2 * l1 + c - l2) + np.abs(r1 - l1 - 2 * c) + c_keep
    flip_r = a_keep + np.abs(l1 - r1 - 2 * c) + np.abs(c + 2 * r1 - r2)
    flip = np.minimum(flip_l, flip_r) < keep
    sl = np.where(a_out < a_keep, -l2, l2)  # outer neighbours' signs when no inner node
    sr = np.where(c_out < c_keep, -r2, r2)
    d5 = np.where(flip, 8 * (l1 + r1) - (l2 + r2), 8 * (r1 - l1) - (sr - sl))  # 4th-order centred
    d5 = np.abs(d5) / (12 * h)
    # 3-point fallback where an outer neighbour is missing: same node test, inner stencil only
    flip3 = np.abs(np.abs(r1 - l1) - 2 * c) < b_keep
    d3 = np.where(flip3, r1 + l1, np.abs(r1 - l1)) / (2 * h)
    d2 = np.where(np.isfinite(r1), np.abs(r1 - c), np.abs(c - l1)) / h  # one-sided at edges
    out = np.where(np.isfinite(d5), d5, np.where(np.isfinite(d3), d3, d2))
    return np.moveaxis(out, 0, axis)


def p_basis(
    rho, pixel_size_nm: float, line_spacing_nm: float | None = None, *, kappa_per_nm: float = KAPPA_PER_NM
) -> np.ndarray:
    """G = ½ |∇∥√ρ|² / κ² (float64): the image one p_x/p_y channel sees of ψ = ±√ρ.

    Gradients use the physical pitch of each axis (columns: ``pixel_size_nm``; rows:
    ``line_spacing_nm``, default the same). NaN where ρ is NaN or has no finite neighbour
    along an axis (a lone scanned line has no known y gradient)."""
    r = np.asarray(rho, dtype=np.float64)
    peak = float(np.nanmax(r)) if np.isfinite(r).any() else 0.0
    if not peak > 0:
        return np.where(np.isfinite(r), 0.0, np.nan)
    # ψ up to sign, in float32 scaled to a peak of 1 (speed); negative ρ from a network is noise
    s = np.sqrt(np.clip(r / peak, 0.0, None)).astype(np.float32)
    dy = _abs_derivative(s, line_spacing_nm or pixel_size_nm, 0)
    dx = _abs_derivative(s, pixel_size_nm, 1)
    # Chen: p_x, p_y see ∂ψ/κ; ½ per channel (the CO presets split p equally)
    return (0.5 * peak / kappa_per_nm**2) * (dx * dx + dy * dy).astype(np.float64)


def _signed_derivative(r: np.ndarray, h: float, axis: int) -> np.ndarray:
    """∂r/∂axis: centred difference, one-sided next to NaN and at the edges."""
    if np.isfinite(r).all():
        return np.gradient(r, h, axis=axis)
    q = np.moveaxis(r, axis, 0)
    pad = np.full((q.shape[0] + 2,) + q.shape[1:], np.nan)
    pad[1:-1] = q
    left, right = pad[:-2], pad[2:]
    centred = (right - left) / (2 * h)
    one_sided = np.where(np.isfinite(right), right - q, q - left) / h
    return np.moveaxis(np.where(np.isfinite(centred), centred, one_sided), 0, axis)


def _check_image(name: str, value, shape=None) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image (lines, pixels), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} shape {arr.shape} differs from the measured image's {shape}")
    return arr.astype(np.float64)


def _check_pitch(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in nm, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and > 0 nm, got {value!r}")
    return v


def predicted_image(
    rho,
    w_s: float,
    pixel_size_nm: float,
    line_spacing_nm: float | None = None,
    *,
    kappa_per_nm: float = KAPPA_PER_NM,
    a: float = 1.0,
    b: float = 0.0,
) -> np.ndarray:
    """The CO-tip image ρ predicts: a·(w_s ρ + (1 − w_s)·½|∇∥√ρ|²/κ²) + b (float64).

    Chen 1990 / ``tip.tip_signal`` with ψ = ±√ρ, the p weight split equally over p_x and
    p_y (an untilted tip; p_z counted as s, see the module docstring). Gradients use the
    physical pitch of each axis. NaN where ρ is NaN or its gradient unknown (:func:`p_basis`)."""
    r = _check_image("rho", rho)
    if not (math.isfinite(w_s) and 0.0 <= w_s <= 1.0):
        raise ValueError(f"w_s must be in [0, 1], got {w_s!r}")
    px = _check_pitch("pixel_size_nm", pixel_size_nm)
    ls = px if line_spacing_nm is None else _check_pitch("line_spacing_nm", line_spacing_nm)
    g = p_basis(r, px, ls, kappa_per_nm=kappa_per_nm)
    return a * (w_s * r + (1.0 - w_s) * g) + b


def _nnls(gram: np.ndarray, rhs: np.ndarray, mm: float, cols: list[int], nonneg: list[int]):
    """Least squares on centred columns ``cols`` (Gram matrix, right-hand side), the ones in
    ``nonneg`` constrained >= 0: exact, by trying every set of them pinned at 0 (at most 4).
    Returns (coefficients over all columns, residual sum of squares)."""
    best = (np.zeros(len(rhs)), mm)
    for pinned in itertools.product((False, True), repeat=len(nonneg)):
        free = [c for c in cols if not (c in nonneg and pinned[nonneg.index(c)])]
        if not free:
            continue
        sub = gram[np.ix_(free, free)]
        if abs(np.linalg.det(sub)) <= 1e-12 * np.prod(np.diag(sub)):
            continue  # a column that is (nearly) zero or a copy of another: skip this set
        c = np.linalg.solve(sub, rhs[free])
        if any(c[free.index(k)] < 0 for k in nonneg if k in free):
            continue
        ss = mm - float(c @ rhs[free])  # residual at the least-squares optimum
        if ss < best[1]:
            full = np.zeros(len(rhs))
            full[free] = c
            best = (full, ss)
    return best[0], max(best[1], 0.0)


def _fit(m: np.ndarray, bases: list[np.ndarray]):
    """Fit m ≈ Σ c_k basis_k + b (1-D finite arrays): bases ρ, G (c >= 0) and optionally
    ∂xρ/κ, ∂yρ/κ (free sign). Returns (coefficients, offset b, SS of the CO-tip fit, SS of the
    fit without G, total SS about the mean)."""
    rows = np.stack([*bases, m])
    mean = rows.mean(axis=1)
    rows -= mean[:, None]
    # einsum, not BLAS: multithreaded BLAS on these thin products is slow on a busy machine
    moments = np.einsum("in,jn->ij", rows, rows)
    gram, rhs, mm = moments[:-1, :-1], moments[:-1, -1], float(moments[-1, -1])
    k = list(range(len(bases)))
    coef, ss_co = _nnls(gram, rhs, mm, k, [0, 1])
    _, ss_s = _nnls(gram, rhs, mm, [i for i in k if i != 1], [0])
    offset = float(mean[-1] - coef @ mean[:-1])
    return coef, offset, ss_co, ss_s, max(mm, 0.0)


def _lag_window(corr: np.ndarray, max_lag: tuple[int, int]) -> tuple[float, float]:
    """Sub-pixel (row, col) lag of the largest value of a circular cross-correlation within
    ±max_lag; parabolic interpolation through the peak and its neighbours on each axis."""
    ly, lx = max_lag
    rows = np.arange(-ly, ly + 1) % corr.shape[0]
    cols = np.arange(-lx, lx + 1) % corr.shape[1]
    win = corr[np.ix_(rows, cols)]
    i, j = np.unravel_index(int(np.argmax(win)), win.shape)

    def vertex(v0, v1, v2):  # parabola through 3 points: offset of its apex from the middle
        curv = v0 - 2 * v1 + v2
        return 0.5 * (v0 - v2) / curv if curv < 0 else 0.0

    di = vertex(*win[i - 1 : i + 2, j]) if 0 < i < win.shape[0] - 1 else 0.0
    dj = vertex(*win[i, j - 1 : j + 2]) if 0 < j < win.shape[1] - 1 else 0.0
    return i - ly + di, j - lx + dj


def _shift_bases(meas, r, g, ok, c_r: float, c_g: float, max_lag):
    """(ρ, G, fit mask, (row, col) lag in px) with ρ and G moved to best match ``meas``.

    The lag maximises the cross-correlation of the measured image with the prediction
    c_r ρ + c_g G (FFT, NaN filled with the mean); the bases move by the Fourier shift
    theorem (f(x − d) ↔ e^{−i k·d} f̂). Pixels within ⌈|d|⌉ + 1 of the frame edge or of a NaN
    are left out of the refit (circular wrap and fill)."""
    shape = meas.shape

    def centred(a):
        return np.where(ok, a - a[ok].mean(), 0.0).astype(np.float32)

    fm, fr, fg = (fft.rfft2(centred(a)) for a in (meas, r, g))
    corr = fft.irfft2(fm * np.conj(c_r * fr + c_g * fg), s=shape)
    dy, dx = _lag_window(corr, max_lag)
    ky = 2 * np.pi * np.fft.fftfreq(shape[0])[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(shape[1])[None, :]
    phase = np.exp(-1j * (ky * dy + kx * dx)).astype(np.complex64)
    r_s = fft.irfft2(fr * phase, s=shape).astype(np.float64) + r[ok].mean()
    g_s = fft.irfft2(fg * phase, s=shape).astype(np.float64) + g[ok].mean()
    reach = (2 * int(math.ceil(abs(dy))) + 3, 2 * int(math.ceil(abs(dx))) + 3)
    src = ok.astype(np.uint8)
    good = minimum_filter(src, size=reach, mode="constant", cval=0).astype(bool)  # erode, edges too
    return r_s, g_s, good, (dy, dx)


def sample_at(fine: np.ndarray, shape) -> np.ndarray:
    """Point samples of ``fine`` at the pixel centres of a ``shape`` grid over the same area,
    as the tip samples the surface at each pixel (bilinear between the fine pixels)."""
    h, w = fine.shape
    yy = (np.arange(shape[0]) + 0.5) * h / shape[0] - 0.5
    xx = (np.arange(shape[1]) + 0.5) * w / shape[1] - 0.5
    return ndimage.map_coordinates(
        np.asarray(fine, np.float64), np.meshgrid(yy, xx, indexing="ij"), order=1, mode="nearest"
    )


def _on_finer_grid(r: np.ndarray, px: float, ls: float, network, kappa_per_nm: float):
    """(ρ, G) point-sampled at the measured pixels from ρ on the network's finer grid: at
    coarse pitches (≳ 0.07 nm) |∇√ρ| on the measured grid itself under-resolves the p image
    (agreement on held-out molecules falls from 0.67 at 0.05 nm to 0.09 at 0.1 nm)."""
    fine, fine_px, fine_ls = network
    fine = np.asarray(fine, np.float64)
    if not (fine_px < 0.99 * px or fine_ls < 0.99 * ls) or fine.ndim != 2:
        return r, p_basis(r, px, ls, kappa_per_nm=kappa_per_nm)
    g = sample_at(p_basis(fine, fine_px, fine_ls, kappa_per_nm=kappa_per_nm), r.shape)
    rs = sample_at(fine, r.shape)
    unknown = ~np.isfinite(r)
    rs[unknown] = np.nan
    g[unknown] = np.nan
    return rs, g


def check_reconstruction(
    measured,
    rho,
    pixel_size_nm: float,
    line_spacing_nm: float | None = None,
    *,
    kappa_per_nm: float = KAPPA_PER_NM,
    threshold: float = AGREEMENT_THRESHOLD,
    max_shift_nm: float = MAX_SHIFT_NM,
    network=None,
) -> ConsistencyResult:
    """Fit the CO-tip image ρ predicts to ``measured`` and score the agreement.

    ``measured``: the current-like image the network was given (``interpret.NetworkInput.
    image``: any scale and offset; NaN = not scanned). ``rho``: the reconstruction of it
    (same shape; NaN where unknown). Model (module docstring): measured ≈ c_s ρ + c_p G +
    d_x ∂xρ/κ + d_y ∂yρ/κ + b with c_s, c_p >= 0, after moving ρ and G by the lateral shift
    (≤ ``max_shift_nm``; 0 disables it) that best matches; a = c_s + c_p, w_s = c_s / a.
    ``threshold``: the agreement below which the frame is out of scope. ``network``: (ρ on the
    network's grid, its pixel pitch, its line pitch) (``stmnet.Reconstruction.network``):
    where that grid is finer than the measured one, ρ and its p image are computed there and
    point-sampled at the measured pixels.
    """
    meas = _check_image("measured", measured)
    r = _check_image("rho", rho, meas.shape)
    px = _check_pitch("pixel_size_nm", pixel_size_nm)
    ls = px if line_spacing_nm is None else _check_pitch("line_spacing_nm", line_spacing_nm)
    if not (math.isfinite(max_shift_nm) and max_shift_nm >= 0):
        raise ValueError(f"max_shift_nm must be >= 0 nm, got {max_shift_nm!r}")
    if not (math.isfinite(threshold) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if network is not None:
        r, g = _on_finer_grid(r, px, ls, network, kappa_per_nm)
    else:
        g = p_basis(r, px, ls, kappa_per_nm=kappa_per_nm)
    ok = np.isfinite(meas) & np.isfinite(r) & np.isfinite(g)
    known = ok.copy()  # where a prediction is shown (the fit may use fewer pixels)
    if ok.sum() < MIN_PIXELS:
        nan_img = np.full(meas.shape, np.nan, np.float32)
        reason = f"too few scanned pixels to check the reconstruction ({int(ok.sum())} < {MIN_PIXELS})"
        return ConsistencyResult(
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            (0.0, 0.0),
            math.nan,
            nan_img,
            nan_img.copy(),
            False,
            reason,
            int(ok.sum()),
        )
    # Parseval: ∫|∂zψ/κ|² = ∫ρ + 2∫G for a vacuum solution
    pz_factor = float(1.0 + 2.0 * g[ok].mean() / r[ok].mean()) if r[ok].mean() > 0 else math.nan
    # 1. the untilted model, whose prediction is the template for the shift
    coef, _, ss_co, _, mm = _fit(meas[ok], [r[ok], g[ok]])
    shift = (0.0, 0.0)
    max_lag = (int(max_shift_nm / ls), int(max_shift_nm / px))
    if coef.sum() > 0 and max(max_lag) > 0:
        r_s, g_s, ok_s, lag = _shift_bases(meas, r, g, ok, coef[0], coef[1], max_lag)
        if ok_s.sum() >= MIN_PIXELS and lag != (0.0, 0.0):
            moved = _fit(meas[ok_s], [r_s[ok_s], g_s[ok_s]])
            still = _fit(meas[ok_s], [r[ok_s], g[ok_s]])  # the same pixels, unshifted
            if moved[2] < (1 - SHIFT_GAIN) * still[2]:  # a shift must earn its place
                r, g, ok, shift = r_s, g_s, ok_s, (float(lag[1] * px), float(lag[0] * ls))
    # 2. with the tilt's first-order cross terms ∂ρ/κ
    dx = _signed_derivative(r, px, 1) / kappa_per_nm
    dy = _signed_derivative(r, ls, 0) / kappa_per_nm
    ok = ok & np.isfinite(dx) & np.isfinite(dy)
    bases = (r, g, dx, dy)
    coef, offset, ss_co, ss_s, ss_tot = _fit(meas[ok], [v[ok] for v in bases])
    scale = float(coef[0] + coef[1])
    w_s = float(coef[0] / scale) if scale > 0 else math.nan
    predicted = sum(c * v for c, v in zip(coef, bases)) + offset
    predicted[~known] = np.nan
    residual = meas - predicted
    explained = 1.0 - ss_co / ss_tot if ss_tot > 0 else 0.0
    explained_s = 1.0 - ss_s / ss_tot if ss_tot > 0 else 0.0
    # partial R² of the p image: what it removes of what ρ alone leaves (Scores, module docstring)
    flat = not np.ptp(meas[ok]) > 0
    agreement = float(np.clip(1.0 - ss_co / ss_s, 0.0, 1.0)) if ss_s > 1e-12 * ss_tot and not flat else 0.0
    reason = ""
    if flat:
        reason = "not a CO-tip orbital image: the measured image has no contrast"
    elif not scale > 0:
        reason = "not a CO-tip orbital image: the reconstruction predicts none of the measured contrast"
    elif agreement < threshold:
        if explained_s >= S_LIKE_EXPLAINED:
            why = (
                f"the image shows no p-channel contrast, |psi|^2 alone explains {100 * explained_s:.0f} % of it "
                "(an s-like tip, or no orbital in the frame)"
            )
        else:
            why = (
                f"its predicted p-channel image accounts for {100 * agreement:.0f} % of the contrast |psi|^2 "
                f"alone leaves (< {100 * threshold:.0f} %; {100 * explained:.0f} % of the image explained)"
            )
        reason = f"not a CO-tip orbital image: {why}"
    return ConsistencyResult(
        agreement,
        float(np.clip(explained, 0.0, 1.0)),
        float(np.clip(explained_s, 0.0, 1.0)),
        w_s,
        scale,
        offset,
        shift,
        pz_factor,
        predicted.astype(np.float32),
        residual.astype(np.float32),
        not reason,
        reason,
        int(ok.sum()),
    )


def effective_s_share(tip, pz_factor: float = 1.0) -> float:
    """The s share the check should fit for ``tip`` (a ``simulators.tip.TipState``).

    Lab-frame quadratic form Q = Tᵀ D T of the tip (tilt included, as ``pairs`` builds it);
    p_z folds into s with ∂zψ/κ ≈ −√f ψ, f = ``pz_factor`` (pass ``ConsistencyResult.
    pz_factor``; 1 is the leading order): c_s = Q_ss + f Q_zz − 2√f Q_sz, and the p term is
    c_p = Q_xx + Q_yy (the tilt's cross terms go to the ∂ρ basis maps). Returns
    c_s / (c_s + c_p). Untilted tips match the fit on exact |ψ|² to ≈ 0.03; tilted ones only
    to ≈ 0.1 (first-order tilt model)."""
    if not (math.isfinite(pz_factor) and pz_factor > 0):
        raise ValueError(f"pz_factor must be a positive number, got {pz_factor!r}")
    t = np.eye(4)
    t[1:, 1:] = tip.p_frame().T  # tip-frame gradient = Rᵀ lab gradient
    q = t.T @ tip.channel_matrix() @ t
    c_s = q[0, 0] + pz_factor * q[3, 3] - 2 * math.sqrt(pz_factor) * q[0, 3]
    c_p = q[1, 1] + q[2, 2]
    return float(c_s / (c_s + c_p))


# ------------------------------------------------------------------------------ probes
# Out-of-scope frames with no molecule, fixed before the threshold was calibrated and never
# used to calibrate it (tests and ``benchmarks.bench_stmnet_consistency.py`` measure the check on them).
PROBES = ("noise", "adatoms", "step")


def _probe_grid(size: int, pixel_size_nm: float):
    axis = (np.arange(size) + 0.5 - size / 2) * pixel_size_nm
    return np.meshgrid(axis, -axis)  # (x right, y up), rows = lines


def _with_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White noise and line offsets relative to the image's 1-99 % spread."""
    spread = float(np.percentile(image, 99) - np.percentile(image, 1)) or 1.0
    out = image + rng.normal(0.0, rng.uniform(0.005, 0.03) * spread, image.shape)
    return out + rng.normal(0.0, rng.uniform(0.0, 0.02) * spread, (image.shape[0], 1))


def scope_probe(name: str, rng: np.random.Generator, *, size: int = 96, pixel_size_nm: float = 0.05) -> np.ndarray:
    """A current-like frame (size, size) float32 with no molecule in it.

    - ``noise``: a constant current plus white or 1/f^β noise (β 0.5-2) and line offsets.
    - ``adatoms``: a hexagonal or square lattice (period 0.3-1.0 nm, 10 % vacancies) of
      adatoms with s-like states, seen by a metal (s) tip 0.3-0.6 nm above them:
      I ∝ Σ_i |ψ_i|², ψ_i = e^{−κd}/(κd) (l = 0 vacuum solution, Tersoff–Hamann 1985).
    - ``step``: constant-current Z of one or two monatomic steps (0.1-0.25 nm, smoothed over
      0.15-0.4 nm) with a weak atomic corrugation, as the current-like image I ∝ e^{2κz}.
    """
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; choose one of {', '.join(PROBES)}")
    x, y = _probe_grid(int(size), float(pixel_size_nm))
    if name == "noise":
        white = rng.normal(size=x.shape)
        if rng.random() < 0.5:
            f = np.hypot(np.fft.fftfreq(x.shape[0])[:, None], np.fft.rfftfreq(x.shape[1])[None, :])
            f[0, 0] = 1.0
            white = np.fft.irfft2(np.fft.rfft2(white) / f ** (rng.uniform(0.5, 2.0) / 2), s=x.shape)
            white /= white.std() or 1.0
        image = 1.0 + 0.2 * white + rng.normal(0.0, rng.uniform(0.0, 0.05), (x.shape[0], 1))
        return image.astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    u = math.cos(angle) * x + math.sin(angle) * y
    v = -math.sin(angle) * x + math.cos(angle) * y
    if name == "adatoms":
        period = rng.uniform(0.3, 1.0)
        a2 = (0.5, math.sqrt(3) / 2) if rng.random() < 0.5 else (0.0, 1.0)
        reach = float(np.hypot(u, v).max()) + 1.0
        n = int(reach / (period * 0.8)) + 1
        i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
        sites = period * np.stack([i.ravel() + a2[0] * j.ravel(), a2[1] * j.ravel()], axis=1)
        sites = sites + rng.uniform(0, period, 2) + rng.normal(0, 0.02, sites.shape)
        sites = sites[(np.hypot(*sites.T) < reach) & (rng.random(len(sites)) > 0.1)]
        z = rng.uniform(0.3, 0.6)
        d = np.sqrt((u[..., None] - sites[:, 0]) ** 2 + (v[..., None] - sites[:, 1]) ** 2 + z * z)
        image = np.sum(np.exp(-2 * KAPPA_PER_NM * d) / (KAPPA_PER_NM * d) ** 2, axis=-1)  # Σ|ψ_i|², s-wave
        return _with_noise(image / image.max(), rng).astype(np.float32)
    edges = np.sort(rng.uniform(u.min() * 0.7, u.max() * 0.7, int(rng.integers(1, 3))))
    width = rng.uniform(0.15, 0.4)
    z = rng.uniform(0.1, 0.25) * sum(0.5 * (1 + np.tanh((u - e) / width)) for e in edges)
    k = 2 * np.pi / rng.uniform(0.25, 0.4)
    z = z + rng.uniform(0.002, 0.01) * 0.5 * (np.cos(k * u) + np.cos(k * v))
    z = z + rng.normal(0.0, rng.uniform(0.001, 0.004), z.shape)
    return current_from_z(z, unit="nm")


__all__ = [
    "AGREEMENT_THRESHOLD",
    "MAX_SHIFT_NM",
    "PROBES",
    "ConsistencyResult",
    "check_reconstruction",
    "effective_s_share",
    "p_basis",
    "predicted_image",
    "scope_probe",
]
