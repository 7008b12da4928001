"""The vacuum gap: its decay constant κ and the current it sets.

Above a surface the sample's states solve the vacuum Schrödinger equation (∇² − κ²)ψ = 0
with κ = sqrt(2 m φ_w)/ħ for a work function φ_w (5 eV: 11.46 /nm), so the tunnelling
current falls as e^{−2κd} with the gap d (Tersoff & Hamann, PRB 31, 805 (1985)). Every
piece of the physics takes κ from here: the orbitals' tails (``orbitals``), the imaging
model, the current-height relation (:func:`current_from_height`) and the reading of a
constant-current Z map as a current (:func:`current_from_z`).
Only numpy: ``interpret`` imports this on the way to every network input.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["KAPPA_PER_NM", "WORK_FUNCTION_EV", "current_from_height", "current_from_z", "height_from_current"]

HBAR_J_S = 1.054571817e-34
ELECTRON_MASS_KG = 9.1093837015e-31
ELECTRON_VOLT_J = 1.602176634e-19
WORK_FUNCTION_EV = 5.0
# κ = sqrt(2 m φ)/ħ, vacuum decay constant of the tunnelling wavefunction (Tersoff–Hamann)
KAPPA_PER_NM: float = math.sqrt(2 * ELECTRON_MASS_KG * WORK_FUNCTION_EV * ELECTRON_VOLT_J) / HBAR_J_S * 1e-9


def current_from_height(
    z_nm, *, current_ref_A: float = 1e-10, z_ref_nm: float = 0.0, kappa_per_nm: float = KAPPA_PER_NM
) -> np.ndarray:
    """I = I_ref · exp(−2κ (z − z_ref)): Tersoff–Hamann vacuum decay of the current."""
    return current_ref_A * np.exp(-2 * kappa_per_nm * (np.asarray(z_nm, dtype=float) - z_ref_nm))


def height_from_current(
    current_A, *, current_ref_A: float = 1e-10, z_ref_nm: float = 0.0, kappa_per_nm: float = KAPPA_PER_NM
) -> np.ndarray:
    """Inverse of ``current_from_height``: z = z_ref − ln(I / I_ref) / (2κ)."""
    current = np.asarray(current_A, dtype=float)
    if np.any(current <= 0):
        raise ValueError("current_A must be positive to convert to a height")
    return z_ref_nm - np.log(current / current_ref_A) / (2 * kappa_per_nm)


def current_from_z(z, kappa_per_nm: float = KAPPA_PER_NM, *, unit: str = "m") -> np.ndarray:
    """Constant-current tip height -> current-like map ``exp(2κ(z - max z))``, in (0, 1].

    I ∝ exp(-2κd) with d the gap (Tersoff-Hamann); along a constant-current contour the tip
    retracts by z where the LDOS is higher, so the LDOS at a fixed height scales as
    exp(+2κz). ``z`` is the Nanonis "Z" channel (larger = further from the surface), in
    metres (``unit="m"``, as .sxm files store it) or nm; NaN stays NaN.
    """
    if unit not in ("m", "nm"):
        raise ValueError(f"unit must be 'm' or 'nm', got {unit!r}")
    z_nm = np.asarray(z, dtype=np.float64) * (1e9 if unit == "m" else 1.0)
    if not np.isfinite(z_nm).any():
        raise ValueError("current_from_z: z has no finite values")
    return np.exp(2.0 * kappa_per_nm * (z_nm - np.nanmax(z_nm))).astype(np.float32)
