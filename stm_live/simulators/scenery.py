"""What real frames of molecules show besides the library's molecules: the metal surfaces
they lie on and the small things that lie beside them.

The tip classifier's data recipe draws these so that its domain reaches the frames research
groups record (molecules on Au(111) and Cu(111), steps, adsorbates, small molecules of many
shapes). Surfaces act as an apparent height h(x, y) added to the tip's path: at constant
height the current scales by exp(2κh), at constant current the Z map rises by h; both are the
same factor once Z becomes current-like (``vacuum.current_from_z``). Standing waves are an
LDOS modulation, written as the apparent height that gives the same factor. The surface term
does not pass through the tip's orbitals (a double tip does not double a step): a background
the classifier must look past, not a tip signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import j0

from stm_live.simulators.orbitals import CC_BOND_NM, Molecule, OrbitalLevel, benzenoid, orbital_fields, orbital_level
from stm_live.simulators.vacuum import KAPPA_PER_NM

# Au(111) 22 x sqrt(3) reconstruction: pairs of soliton ridges 6.3 nm apart, 2.5 nm (the hcp
# stripe) within a pair, about 0.02 nm high (Barth et al., PRB 42, 9307 (1990)).
HERRINGBONE_PERIOD_NM, HERRINGBONE_PAIR_NM = 6.3, 2.5
# Surface-state Fermi wavelengths: Cu(111) 2.95 nm (Crommie, Lutz, Eigler, Nature 363, 524
# (1993)), Au(111) 3.6 nm; standing waves have half that period.
FERMI_WAVELENGTH_NM = {"cu111": 2.95, "au111": 3.6}
# Monatomic step heights (nm): Cu(111) 0.208, Au(111) 0.235.
STEP_HEIGHT_NM = {"cu111": 0.208, "au111": 0.235}


@dataclass(frozen=True)
class MetalSurface:
    """A (111) metal terrace scene: herringbone ridges (Au only), step edges and point
    scatterers (adsorbates, molecules) that ring with surface-state standing waves."""

    metal: str = "au111"
    herringbone_nm: float = 0.0  # ridge height; 0 = none
    herringbone_angle_deg: float = 0.0
    herringbone_phase_nm: float = 0.0
    steps: tuple[tuple[float, float, int], ...] = ()  # (edge offset nm, edge normal angle deg, +-1 up/down)
    wave_amplitude: float = 0.0  # standing-wave LDOS modulation, fraction of the terrace LDOS
    scatterers: tuple[tuple[float, float], ...] = ()  # (x, y) nm
    coherence_nm: float = 6.0  # decay length of the standing waves

    def __post_init__(self):
        if self.metal not in FERMI_WAVELENGTH_NM:
            raise ValueError(f"MetalSurface.metal must be one of {', '.join(FERMI_WAVELENGTH_NM)}, got {self.metal!r}")
        if not 0 <= self.wave_amplitude < 0.5:
            raise ValueError(f"MetalSurface.wave_amplitude must be in [0, 0.5), got {self.wave_amplitude}")

    def apparent_height_nm(self, x_nm, y_nm) -> np.ndarray:
        """h(x, y) in nm: herringbone + steps + standing waves as ln(1 + δρ/ρ)/(2κ)."""
        x, y = np.asarray(x_nm, float), np.asarray(y_nm, float)
        h = np.zeros(np.broadcast_shapes(x.shape, y.shape))
        if self.herringbone_nm:
            h += self.herringbone_nm * herringbone(x, y, self.herringbone_angle_deg, self.herringbone_phase_nm)
        k_f = 2 * math.pi / FERMI_WAVELENGTH_NM[self.metal]
        ldos = np.zeros_like(h)
        for offset, angle_deg, sign in self.steps:
            d = _along(x, y, angle_deg) - offset
            h += sign * STEP_HEIGHT_NM[self.metal] * step_profile(d)
            # ρ(d) ∝ 1 − J0(2 k_f d) on the terrace beside a step (Crommie et al. 1993)
            ldos -= j0(2 * k_f * np.abs(d)) * np.exp(-np.abs(d) / self.coherence_nm)
        for sx, sy in self.scatterers:
            r = np.hypot(x - sx, y - sy)
            # δρ ∝ −J0(2 k_f r) around a point scatterer: the 2-D Friedel oscillation's s-wave term
            ldos -= 0.5 * j0(2 * k_f * r) * np.exp(-r / self.coherence_nm)
        if self.wave_amplitude:
            h += np.log1p(np.clip(self.wave_amplitude * ldos, -0.9, None)) / (2 * KAPPA_PER_NM)
        return h


def _along(x, y, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return x * math.cos(a) + y * math.sin(a)


def step_profile(d_nm, width_nm: float = 0.15) -> np.ndarray:
    """0 below an edge at d = 0, 1 above it, over about ``width_nm`` (the tip's finite size)."""
    return 0.5 * (1 + np.tanh(np.asarray(d_nm, float) / width_nm))


def herringbone(x_nm, y_nm, angle_deg: float = 0.0, phase_nm: float = 0.0) -> np.ndarray:
    """Au(111) soliton ridges (height 1 on a ridge), two per 6.3 nm period, 0.35 nm wide
    (Gaussian σ), running along ``angle_deg``."""
    u = _along(x_nm, y_nm, angle_deg + 90.0) + phase_nm
    out = np.zeros(np.shape(u))
    for centre in (0.0, HERRINGBONE_PAIR_NM):
        d = np.mod(u - centre + HERRINGBONE_PERIOD_NM / 2, HERRINGBONE_PERIOD_NM) - HERRINGBONE_PERIOD_NM / 2
        out += np.exp(-(d**2) / (2 * 0.35**2))
    return out


def random_surface(rng: np.random.Generator, span_nm: float, scatterers=(), *, steps: bool = False) -> MetalSurface:
    """A random Au(111) (herringbone on most frames) or Cu(111) terrace of a ``span_nm``
    frame centred on 0, with standing waves around ``scatterers``; ``steps``: 1-2 edges."""
    metal = "au111" if rng.random() < 0.5 else "cu111"
    edges = ()
    if steps:
        edges = tuple(
            (float(rng.uniform(-0.4, 0.4) * span_nm), float(rng.uniform(0, 360)), int(rng.choice([-1, 1])))
            for _ in range(int(rng.integers(1, 3)))
        )
    return MetalSurface(
        metal=metal,
        herringbone_nm=float(rng.uniform(0.01, 0.025)) if metal == "au111" and rng.random() < 0.8 else 0.0,
        herringbone_angle_deg=float(rng.uniform(0, 180)),
        herringbone_phase_nm=float(rng.uniform(0, HERRINGBONE_PERIOD_NM)),
        steps=edges,
        wave_amplitude=float(rng.uniform(0.0, 0.25)),
        scatterers=tuple((float(x), float(y)) for x, y in scatterers),
        coherence_nm=float(rng.uniform(3.0, 10.0)),
    )


# --------------------------------------------------------------------------- small things
@dataclass(frozen=True, eq=False)
class LevelOrbital:
    """One Hückel level of a molecule outside the library, in the interface
    ``imaging.CubePlacement`` places (``fields(x, y, z) -> (k, 4, ...)``)."""

    level: OrbitalLevel

    def fields(self, x_nm, y_nm, z_nm) -> np.ndarray:
        return orbital_fields(self.level, x_nm, y_nm, z_nm)


def _molecule(name: str, xy: np.ndarray) -> Molecule:
    xy = np.asarray(xy, float) - np.mean(xy, axis=0)
    xyz = np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)
    xyz.setflags(write=False)
    n = len(xy)
    return Molecule(name=name, symbols=("C",) * n, xyz_nm=xyz, pi_atoms=tuple(range(n)), pi_types=("C",) * n)


# Axial neighbours of a hexagon in the (a1, a2) lattice of orbitals.benzenoid.
_HEX_NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, -1), (-1, 1))


def random_polyhex(rng: np.random.Generator, rings: int) -> Molecule:
    """A closed-shell fused-hexagon hydrocarbon of ``rings`` rings grown at random (shapes the
    library lacks: bent, branched, compact); redraws open-shell or odd-electron shapes."""
    for _ in range(50):
        cells = [(0, 0)]
        while len(cells) < rings:
            i, j = cells[int(rng.integers(len(cells)))]
            di, dj = _HEX_NEIGHBOURS[int(rng.integers(6))]
            if (i + di, j + dj) not in cells:
                cells.append((i + di, j + dj))
        mol = _molecule(f"polyhex{rings}", benzenoid(cells))
        try:
            orbital_level(mol, "HOMO")
            return mol
        except ValueError:  # odd π count or open shell: not a stable neutral molecule
            continue
    raise RuntimeError(f"no closed-shell polyhex of {rings} rings found in 50 draws")


def polyene(atoms: int) -> Molecule:
    """A zig-zag chain of ``atoms`` (even) sp2 carbons."""
    k = np.arange(atoms)
    xy = np.stack([k * CC_BOND_NM * math.cos(math.radians(30)), (k % 2) * CC_BOND_NM * 0.5], axis=1)
    return _molecule(f"polyene{atoms}", xy)


def adatom() -> OrbitalLevel:
    """A single p_z-like adsorbate (an adatom or a CO molecule seen by its π system)."""
    return OrbitalLevel(
        molecule=_molecule("adatom", np.zeros((1, 2))), label="HOMO", energy=0.0, partners=np.ones((1, 1))
    )


def random_small_thing(rng: np.random.Generator, orbital: str) -> tuple[LevelOrbital, float, float]:
    """(orbital, radius nm, amplitude): an adatom (weak, 45 %), a short polyene (20 %) or a
    random 1-4 ring polyhex (35 %), at the frame's orbital side."""
    draw = rng.random()
    if draw < 0.45:
        return LevelOrbital(adatom()), 0.1, float(rng.uniform(0.1, 0.35))
    mol = polyene(int(rng.choice([4, 6, 8]))) if draw < 0.65 else random_polyhex(rng, int(rng.integers(1, 5)))
    return LevelOrbital(orbital_level(mol, orbital)), mol.radius_nm, 1.0
