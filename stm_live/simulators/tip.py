"""Tip states and how a tip turns sample orbital fields into a tunnelling signal.

Chen's derivative rule (C. J. Chen, PRB 42, 8841 (1990)): a tip orbital s sees ψ, p_x /
p_y / p_z see ∂ψ/∂x, ∂ψ/∂y, ∂ψ/∂z. Dividing the derivatives by κ makes every channel
dimensionless and comparable. With channel weights w (normalised to sum 1 in the signal):

    incoherent:  I ∝ w_s |ψ|² + Σ_i w_i |∂_i ψ / κ|²
    coherent:    I ∝ |√w_s ψ + √w_z ∂_z ψ / κ|² + w_x |∂_x ψ / κ|² + w_y |∂_y ψ / κ|²

Only s and p_z interfere: about the tip axis they are symmetric while p_x, p_y are not, so
an axially symmetric tip carries them in different apex states, whose currents add. (An
s–p_x mixture would be a tip state pointing sideways: an asymmetric tip, not a CO one.)
Both forms are fᵀ D f with D = ``TipState.channel_matrix()``.
Degenerate partners always add incoherently. A tilted tip rotates its p frame by
``tilt_deg`` about the in-plane axis perpendicular to ``tilt_azimuth_deg``; the apex
then also sits ``CO_PIVOT_NM · sin(tilt)`` off-axis (the lateral shift is applied by
``imaging``, which owns the grid). A CO tip is ≈ 13 % s, 87 % p_xy (Gross et al.,
PRL 107, 086101 (2011)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from stm_live.simulators.vacuum import KAPPA_PER_NM

# distance from the tilt pivot (metal–C bond) to the O apex of a CO tip
CO_PIVOT_NM = 0.30


@dataclass(frozen=True)
class TipState:
    """Tip apex orbital weights and geometry; weights need not sum to one."""

    s: float
    px: float
    py: float
    pz: float
    coherent: bool = False
    tilt_deg: float = 0.0
    tilt_azimuth_deg: float = 0.0
    double_offset_nm: tuple[float, float] = (0.0, 0.0)
    double_strength: float = 0.0
    apex_width_nm: float = 0.0
    name: str = ""

    def __post_init__(self):
        weights = (self.s, self.px, self.py, self.pz)
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"tip weights must be non-negative with a positive sum, got {weights}")
        if not 0 <= self.tilt_deg < 90:
            raise ValueError(f"tilt_deg must be in [0, 90), got {self.tilt_deg}")
        if self.double_strength < 0:
            raise ValueError(f"double_strength must be >= 0, got {self.double_strength}")
        if self.apex_width_nm < 0:
            raise ValueError(f"apex_width_nm must be >= 0, got {self.apex_width_nm}")
        if len(tuple(self.double_offset_nm)) != 2:
            raise ValueError(f"double_offset_nm must be (dx, dy), got {self.double_offset_nm}")
        object.__setattr__(self, "double_offset_nm", tuple(float(v) for v in self.double_offset_nm))

    @property
    def weights(self) -> np.ndarray:
        """(s, px, py, pz) normalised to sum 1."""
        w = np.array([self.s, self.px, self.py, self.pz], dtype=float)
        return w / w.sum()

    @property
    def s_fraction(self) -> float:
        return float(self.weights[0])

    def with_(self, **changes) -> TipState:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown TipState field(s) {sorted(unknown)}; valid: {sorted(known)}")
        return replace(self, **changes)

    def channel_matrix(self) -> np.ndarray:
        """D (4×4) over the tip-frame channels (s, p_x, p_y, p_z): signal = fᵀ D f.

        diag(w), plus the s–p_z interference √(w_s w_z) off the diagonal for a coherent tip.
        """
        w = self.weights
        d = np.diag(w)
        if self.coherent:
            d[0, 3] = d[3, 0] = math.sqrt(w[0] * w[3])
        return d

    def apex_offset_nm(self) -> tuple[float, float]:
        """Lateral shift of the apex caused by the tilt (along the tilt azimuth)."""
        shift = CO_PIVOT_NM * math.sin(math.radians(self.tilt_deg))
        az = math.radians(self.tilt_azimuth_deg)
        return shift * math.cos(az), shift * math.sin(az)

    def p_frame(self) -> np.ndarray:
        """Rotation matrix R (3×3): column i is tip axis i (x, y, z) in the lab frame."""
        t, a = math.radians(self.tilt_deg), math.radians(self.tilt_azimuth_deg)
        axis = np.array([-math.sin(a), math.cos(a), 0.0])  # in-plane, ⟂ azimuth
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        # Rodrigues: R = I + sin t K + (1 − cos t) K²; tips the z axis towards the azimuth
        return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


TIP_PRESETS: dict[str, TipState] = {
    "s": TipState(1.0, 0.0, 0.0, 0.0, name="s"),
    "co": TipState(0.13, 0.435, 0.435, 0.0, name="co"),
    "mixed": TipState(0.45, 0.275, 0.275, 0.0, name="mixed"),
    "coherent_co": TipState(0.13, 0.40, 0.40, 0.07, coherent=True, name="coherent_co"),
    "tilted_co": TipState(0.13, 0.435, 0.435, 0.0, tilt_deg=20.0, tilt_azimuth_deg=30.0, name="tilted_co"),
    "asymmetric": TipState(0.13, 0.65, 0.22, 0.0, name="asymmetric"),
    "double": TipState(0.13, 0.435, 0.435, 0.0, double_offset_nm=(0.6, 0.25), double_strength=0.6, name="double"),
    "blunt": TipState(0.6, 0.2, 0.2, 0.0, apex_width_nm=0.25, name="blunt"),
}


# Each preset's class for the tip classifier (models/tipstate.py TIP_CLASSES): what the
# simulated controller reports and what the classifier's domain fit labels its scenes with.
PRESET_CLASSES: dict[str, str] = {
    "co": "co_sharp",
    "coherent_co": "co_sharp",
    "s": "metal_s",
    "mixed": "mixed",
    "tilted_co": "asymmetric",
    "asymmetric": "asymmetric",
    "double": "double",
    "blunt": "blunt",
}


def tip_preset(name: str) -> TipState:
    """A named tip preset (see ``TIP_PRESETS``)."""
    try:
        return TIP_PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tip preset {name!r}; valid names: {', '.join(TIP_PRESETS)}") from None


def as_tip(tip) -> TipState:
    """A TipState, or a preset name for convenience."""
    if isinstance(tip, str):
        return tip_preset(tip)
    if not isinstance(tip, TipState):
        raise ValueError(f"tip must be a TipState or a preset name, got {type(tip).__name__}")
    return tip


def tip_gradients(fields_lab: np.ndarray, tip: TipState) -> np.ndarray:
    """Rotate the lab-frame gradient channels (…, 4, …) into the tilted tip's p frame."""
    if tip.tilt_deg == 0.0:
        return fields_lab
    rot = tip.p_frame()
    out = fields_lab.copy()
    # ∂ψ along tip axis i = ∇ψ · (R e_i)
    out[:, 1:4] = np.einsum("ji,kj...->ki...", rot, fields_lab[:, 1:4])
    return out


def tip_signal(fields_lab: np.ndarray, tip: TipState, *, kappa_per_nm: float = KAPPA_PER_NM) -> np.ndarray:
    """Tunnelling signal of ``tip`` from fields (k, 4, …) = (ψ, ∂x, ∂y, ∂z) per partner.

    Chen 1990 derivative rule: Σ_k f_kᵀ D f_k with f = (ψ, ∂xψ/κ, ∂yψ/κ, ∂zψ/κ) in the tip's
    frame and D = ``tip.channel_matrix()``. Returns an array of the grid shape (…).
    """
    f = np.asarray(fields_lab)
    if f.ndim < 2 or f.shape[1] != 4:
        raise ValueError(f"fields must have shape (k, 4, ...), got {f.shape}")
    f = tip_gradients(f, tip)
    scale = np.array([1.0, 1 / kappa_per_nm, 1 / kappa_per_nm, 1 / kappa_per_nm]).reshape(1, 4, *([1] * (f.ndim - 2)))
    f = f * scale
    d = tip.channel_matrix()
    out = np.sum(np.diag(d).reshape(scale.shape) * f * f, axis=(0, 1))
    if d[0, 3]:  # D's one off-diagonal term: s–p_z interference of a coherent tip
        out += 2 * d[0, 3] * np.sum(f[:, 0] * f[:, 3], axis=0)
    return out
