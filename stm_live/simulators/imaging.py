"""Forward model: molecules + tip + height/mode -> STM image in internal orientation.

Images are ``(lines, pixels)`` float32, row 0 = first scanned line (``"down"`` scans start
at the +y edge of the frame), columns left→right in frame coordinates. Frame angles are
clockwise positive (Nanonis); molecule rotations (``Placement.rotation_deg``) are
counter-clockwise positive in the lab frame.

Current scale: I = CURRENT_SCALE_A_PER_V · |V| · S, with S the dimensionless tip signal of
``tip.tip_signal`` (ψ from normalised Hückel coefficients and the κ-decay p_z tails of
``orbitals``). CURRENT_SCALE_A_PER_V is chosen so the pentacene HOMO seen by an s tip at
z = 0.45 nm and |V| = 1 V peaks at ≈ 100 pA (≈ 20 pA at 0.5 nm, a few nA at 0.35 nm),
the range of orbital imaging on NaCl(2ML) (Repp et al., PRL 94, 026803 (2005)).
A substrate adds a weak background S_sub = SUBSTRATE_SIGNAL · e^{−2κz} (1 + c · pattern)
so that constant-current feedback has something to hold on to off the molecule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from stm_live.simulators.orbitals import OrbitalLevel, molecule, orbital_fields, orbital_level
from stm_live.simulators.tip import TipState, as_tip, tip_signal
from stm_live.simulators.vacuum import KAPPA_PER_NM

CURRENT_SCALE_A_PER_V = 2.2e-7
# substrate background signal at z = 0 (dimensionless, same units as the tip signal)
SUBSTRATE_SIGNAL = 0.3
Z_MIN_NM = 0.10
Z_MAX_NM = 2.5


@dataclass(frozen=True)
class ScanFrame:
    """A scan frame: centre, size, clockwise angle (deg), pixels per line, lines, direction."""

    center_x_nm: float
    center_y_nm: float
    width_nm: float
    height_nm: float
    angle_deg: float = 0.0
    pixels: int = 128
    lines: int = 128
    direction: str = "down"

    def __post_init__(self):
        for key in ("center_x_nm", "center_y_nm", "width_nm", "height_nm", "angle_deg"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"ScanFrame.{key} must be finite, got {getattr(self, key)}")
        if self.width_nm <= 0 or self.height_nm <= 0:
            raise ValueError(f"ScanFrame size must be positive, got {self.width_nm} x {self.height_nm} nm")
        if int(self.pixels) != self.pixels or self.pixels < 1:
            raise ValueError(f"ScanFrame.pixels must be a positive integer, got {self.pixels}")
        if int(self.lines) != self.lines or self.lines < 1:
            raise ValueError(f"ScanFrame.lines must be a positive integer, got {self.lines}")
        if self.direction not in ("down", "up"):
            raise ValueError(f"ScanFrame.direction must be 'down' or 'up', got {self.direction!r}")

    @property
    def pixel_size_nm(self) -> float:
        return self.width_nm / self.pixels

    @property
    def line_spacing_nm(self) -> float:
        return self.height_nm / self.lines

    @classmethod
    def from_si(
        cls, center_x_m, center_y_m, width_m, height_m, angle_deg=0.0, pixels=128, lines=128, direction="down"
    ) -> ScanFrame:
        return cls(
            center_x_m * 1e9,
            center_y_m * 1e9,
            width_m * 1e9,
            height_m * 1e9,
            float(angle_deg),
            int(pixels),
            int(lines),
            direction,
        )

    def local_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Frame-axis coordinates (u right, v up) of pixel centres, internal orientation."""
        u = (np.arange(self.pixels) + 0.5) / self.pixels * self.width_nm - self.width_nm / 2
        v = self.height_nm / 2 - (np.arange(self.lines) + 0.5) / self.lines * self.height_nm
        if self.direction == "up":
            v = v[::-1]
        return np.meshgrid(u, v)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Lab (x, y) of every pixel centre, each (lines, pixels), internal orientation."""
        u, v = self.local_grid()
        a = math.radians(self.angle_deg)  # clockwise positive
        x = self.center_x_nm + u * math.cos(a) + v * math.sin(a)
        y = self.center_y_nm - u * math.sin(a) + v * math.cos(a)
        return x, y


@dataclass(frozen=True)
class Placement:
    """A molecule at (x, y) nm, rotated counter-clockwise; orbital None picks by bias sign."""

    molecule: str
    x_nm: float = 0.0
    y_nm: float = 0.0
    rotation_deg: float = 0.0
    orbital: str | None = None

    def __post_init__(self):
        molecule(self.molecule)  # raises a clear error for an unknown name
        if self.orbital is not None:
            orbital_level(self.molecule, self.orbital)

    def level(self, bias_V: float) -> OrbitalLevel:
        return orbital_level(self.molecule, self.orbital or orbital_for_bias(bias_V))

    def local_fields(self, x_nm, y_nm, z_nm, bias_V: float) -> np.ndarray:
        """(k, 4, ...) ψ and gradient per partner in the molecule's own frame."""
        return orbital_fields(self.level(bias_V), x_nm, y_nm, z_nm)


@dataclass(frozen=True)
class CubePlacement:
    """An orbital from a cube file (``orbitals.CubeOrbital``, e.g. from DFT) at (x, y) nm,
    rotated counter-clockwise; it is imaged whatever the bias sign, as the one orbital given.
    ``amplitude`` multiplies ψ (cube values have their own units; see :func:`cube_amplitude`)."""

    orbital: object  # anything with CubeOrbital's .fields(x_nm, y_nm, z_nm) -> (1, 4, ...)
    x_nm: float = 0.0
    y_nm: float = 0.0
    rotation_deg: float = 0.0
    amplitude: float = 1.0

    def __post_init__(self):
        if not callable(getattr(self.orbital, "fields", None)):
            raise ValueError(f"CubePlacement.orbital must be a CubeOrbital, got {type(self.orbital).__name__}")
        if not (math.isfinite(self.amplitude) and self.amplitude > 0):
            raise ValueError(f"CubePlacement.amplitude must be a positive number, got {self.amplitude}")

    def local_fields(self, x_nm, y_nm, z_nm, bias_V: float) -> np.ndarray:
        fields = self.orbital.fields(x_nm, y_nm, z_nm)
        return fields if self.amplitude == 1.0 else self.amplitude * fields


# Clearance between the atoms' bounding discs of two molecules in a random scene: adsorbed
# molecules do not overlap, and the gap leaves room for the orbitals' tails.
MOLECULE_GAP_NM = 0.35


def clear_of_others(name: str, x_nm: float, y_nm: float, others) -> bool:
    """Whether molecule ``name`` centred at (x, y) keeps :data:`MOLECULE_GAP_NM` from each
    ``(name, x_nm, y_nm)`` in ``others`` (random scenes place molecules with this test)."""
    r = molecule(name).radius_nm
    return all(
        math.hypot(x_nm - x, y_nm - y) > r + molecule(other).radius_nm + MOLECULE_GAP_NM for other, x, y in others
    )


def scatter_molecules(
    rng: np.random.Generator, names, half_extent_nm, *, orbital: str | None = None, tries: int = 12
) -> list[Placement]:
    """Placements of ``names`` at random rotations, the i-th uniform within ±``half_extent_nm(i)``
    (x and y half widths, nm), each clear of those before it (:func:`clear_of_others`); a
    molecule that finds no room in ``tries`` draws is left out."""
    placed: list[Placement] = []
    for i, name in enumerate(names):
        rotation = float(rng.uniform(0, 360))
        hx, hy = half_extent_nm(i)
        for _ in range(tries):
            x, y = float(rng.uniform(-hx, hx)), float(rng.uniform(-hy, hy))
            if clear_of_others(name, x, y, [(p.molecule, p.x_nm, p.y_nm) for p in placed]):
                placed.append(Placement(name, x, y, rotation, orbital))
                break
    return placed


@dataclass(frozen=True)
class Substrate:
    """Weak NaCl(100)-like background: square Cl lattice of period ``lattice_nm``."""

    corrugation: float = 0.0
    lattice_nm: float = 0.398
    angle_deg: float = 0.0

    def __post_init__(self):
        if not 0 <= self.corrugation <= 1:
            raise ValueError(f"Substrate.corrugation must be in [0, 1], got {self.corrugation}")
        if self.lattice_nm <= 0:
            raise ValueError(f"Substrate.lattice_nm must be positive, got {self.lattice_nm}")

    def signal(self, x_nm, y_nm, z_nm) -> np.ndarray:
        # Tersoff–Hamann background: S ∝ e^{−2κz}(1 + c · ½(cos 2πu/a + cos 2πv/a))
        a = math.radians(self.angle_deg)
        u = x_nm * math.cos(a) + y_nm * math.sin(a)
        v = -x_nm * math.sin(a) + y_nm * math.cos(a)
        k = 2 * math.pi / self.lattice_nm
        pattern = 0.5 * (np.cos(k * u) + np.cos(k * v))
        return SUBSTRATE_SIGNAL * np.exp(-2 * KAPPA_PER_NM * z_nm) * (1 + self.corrugation * pattern)


def orbital_for_bias(bias_V: float) -> str:
    """Negative sample bias images the occupied HOMO, positive the empty LUMO."""
    if not math.isfinite(bias_V) or bias_V == 0:
        raise ValueError(f"bias_V must be a non-zero finite voltage, got {bias_V}")
    return "HOMO" if bias_V < 0 else "LUMO"


def check_placements(placements) -> list[Placement]:
    """``placements`` (one, or an iterable of them) as a non-empty list; ValueError otherwise."""
    if isinstance(placements, (Placement, CubePlacement)):
        return [placements]
    items = list(placements)
    if not items:
        raise ValueError("placements is empty: give at least one Placement")
    for p in items:
        if not isinstance(p, (Placement, CubePlacement)):
            raise ValueError(f"placements must be Placement or CubePlacement objects, got {type(p).__name__}")
    return items


def check_height(z_nm) -> None:
    """ValueError unless every height in ``z_nm`` is finite and positive."""
    if not np.all(np.isfinite(z_nm)) or np.any(np.asarray(z_nm) <= 0):
        raise ValueError(f"z_nm must be a positive height in nm, got {z_nm}")


def placement_fields(placement: Placement | CubePlacement, x_nm, y_nm, z_nm, bias_V: float) -> np.ndarray:
    """Lab-frame (ψ, ∂x, ∂y, ∂z) per partner of a placed molecule, shape (k, 4, *x.shape)."""
    theta = math.radians(placement.rotation_deg)
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = np.asarray(x_nm) - placement.x_nm, np.asarray(y_nm) - placement.y_nm
    local = placement.local_fields(c * dx + s * dy, -s * dx + c * dy, z_nm, bias_V)
    gx, gy = local[:, 1].copy(), local[:, 2].copy()
    local[:, 1] = c * gx - s * gy  # rotate the gradient back into the lab frame
    local[:, 2] = s * gx + c * gy
    return local


def _scene_signal(placements, x, y, z, tip: TipState, bias_V: float) -> np.ndarray:
    ox, oy = tip.apex_offset_nm()
    total = np.zeros(np.shape(x))
    for p in placements:
        total += tip_signal(placement_fields(p, x + ox, y + oy, z, bias_V), tip)
        if tip.double_strength > 0:
            dx, dy = tip.double_offset_nm
            total += tip.double_strength * tip_signal(placement_fields(p, x + ox + dx, y + oy + dy, z, bias_V), tip)
    return total


def _blur(image: np.ndarray, frame: ScanFrame, tip: TipState) -> np.ndarray:
    if tip.apex_width_nm <= 0:
        return image
    sigma = (tip.apex_width_nm / frame.line_spacing_nm, tip.apex_width_nm / frame.pixel_size_nm)
    return gaussian_filter(image, sigma=sigma, mode="nearest")


def signal_image(
    placements, frame: ScanFrame, tip: TipState, *, z_nm, bias_V: float, substrate: Substrate | None = None
) -> np.ndarray:
    """Dimensionless tunnelling signal S (float64) at height z_nm (scalar or per pixel)."""
    items = check_placements(placements)
    check_height(z_nm)
    tip = as_tip(tip)
    x, y = frame.grid()
    total = _scene_signal(items, x, y, z_nm, tip, bias_V)
    if substrate is not None:
        ox, oy = tip.apex_offset_nm()
        total += substrate.signal(x + ox, y + oy, z_nm)
        if tip.double_strength > 0:
            dx, dy = tip.double_offset_nm
            total += tip.double_strength * substrate.signal(x + ox + dx, y + oy + dy, z_nm)
    return _blur(total, frame, tip)


def constant_height_image(
    placements, frame: ScanFrame, tip: TipState, *, z_nm: float, bias_V: float, substrate: Substrate | None = None
) -> np.ndarray:
    """Tunnelling current (A) at constant tip height ``z_nm`` above the molecular plane."""
    orbital_for_bias(bias_V)
    signal = signal_image(placements, frame, tip, z_nm=z_nm, bias_V=bias_V, substrate=substrate)
    return (CURRENT_SCALE_A_PER_V * abs(bias_V) * signal).astype(np.float32)


def constant_current_image(
    placements,
    frame: ScanFrame,
    tip: TipState,
    *,
    setpoint_A: float,
    bias_V: float,
    substrate: Substrate | None = None,
    tol_nm: float = 1e-5,
    max_iter: int = 30,
) -> np.ndarray:
    """Tip height z (nm) of the isocurrent surface I(x, y, z) = setpoint_A.

    Solved per pixel by Newton–secant iterations on ln I(z) with the exact field
    re-evaluated each step (ln I is nearly linear in z, slope ≈ −2κ). ``substrate=None``
    uses a flat ``Substrate()``: a feedback loop needs a conducting background.
    """
    orbital_for_bias(bias_V)
    if not math.isfinite(setpoint_A) or setpoint_A <= 0:
        raise ValueError(f"setpoint_A must be a positive current in A, got {setpoint_A}")
    items = check_placements(placements)
    tip = as_tip(tip)
    substrate = substrate or Substrate()
    scale = CURRENT_SCALE_A_PER_V * abs(bias_V)
    target = math.log(setpoint_A)

    def log_current(z):
        return np.log(scale * signal_image(items, frame, tip, z_nm=z, bias_V=bias_V, substrate=substrate))

    z_prev = np.full((frame.lines, frame.pixels), 0.5)
    f_prev = log_current(z_prev) - target
    z = np.clip(z_prev + f_prev / (2 * KAPPA_PER_NM), Z_MIN_NM, Z_MAX_NM)
    for _ in range(max_iter):
        f = log_current(z) - target
        dz = z - z_prev
        slope = np.where(np.abs(dz) > 1e-9, (f - f_prev) / np.where(dz == 0, 1, dz), -2 * KAPPA_PER_NM)
        slope = np.minimum(slope, -0.2 * KAPPA_PER_NM)  # ln I must fall with z; guard flat secants
        z_new = np.clip(z - f / slope, Z_MIN_NM, Z_MAX_NM)
        z_prev, f_prev, z = z, f, z_new
        if np.max(np.abs(z - z_prev)) < tol_nm:
            break
    return z.astype(np.float32)


def s_wave_image(placements, frame: ScanFrame, *, z_nm: float, bias_V: float) -> np.ndarray:
    """Pristine Σ|ψ|² at height z_nm (s-wave tip, no substrate): the network's target."""
    orbital_for_bias(bias_V)
    return signal_image(placements, frame, TipState(1.0, 0.0, 0.0, 0.0, name="s"), z_nm=z_nm, bias_V=bias_V).astype(
        np.float32
    )


# Where library molecules and cube orbitals are put on one current scale (the calibration of
# CURRENT_SCALE_A_PER_V above): an s tip 0.45 nm over the pentacene HOMO.
CALIBRATION_HEIGHT_NM = 0.45


def cube_amplitude(orbital) -> float:
    """The ψ multiplier that puts a cube orbital on the library's current scale: an s tip
    :data:`CALIBRATION_HEIGHT_NM` above it sees the same peak |ψ|² as over the pentacene HOMO
    (so a scene can mix both, and the constant-current feedback and substrate keep their
    meaning)."""

    def peak(placement, radius_nm):  # on a 0.04 nm grid over the molecule and 0.5 nm around it
        n = int(round((radius_nm + 0.5) / 0.02))
        frame = ScanFrame(0.0, 0.0, n * 0.04, n * 0.04, pixels=n, lines=n)
        return float(s_wave_image([placement], frame, z_nm=CALIBRATION_HEIGHT_NM, bias_V=-1.0).max())

    reference = peak(Placement("pentacene", orbital="HOMO"), molecule("pentacene").radius_nm)
    atoms_xy = np.asarray(orbital.cube.atoms_nm)[:, :2] - np.asarray(orbital.center_nm)[:2]
    own = peak(CubePlacement(orbital), float(np.hypot(*atoms_xy.T).max(initial=0.0)))
    if not own > 0:
        raise ValueError(
            f"the cube orbital is zero {CALIBRATION_HEIGHT_NM} nm above its plane: it cannot be scaled "
            "(does the cube reach that height, or continue it into vacuum?)"
        )
    return math.sqrt(reference / own)
