"""Molecule library, Hückel π molecular orbitals, orbitals from cube files, and their vacuum
tails.

Geometry
    Benzenoids are built on a hexagonal lattice (C–C 0.140 nm) from a list of ring
    centres; azulene from a regular heptagon and pentagon sharing an edge; porphine,
    phthalocyanine (h2pc) and naphthalocyanine (h2nc) from four pyrrole pentagons around
    the centre joined by meso carbons (porphine) or aza nitrogens (Pc, Nc) with benzo /
    2,3-naphtho rings fused outward; PTCDA is perylene with an anhydride hexagon
    peri-fused at each end. Every molecule is centred and, when it has one, its long
    axis lies along x. Hydrogens carry no π orbital and are omitted.

Hückel model
    H_ii = α + h_X β, H_ij = k_XY β for bonded neighbours (d < 0.165 nm), α = 0,
    β = −2.7 eV. Heteroatom parameters from Streitwieser, "Molecular Orbital Theory for
    Organic Chemists" (1961): pyridine-type N h=0.5 k=1.0, pyrrole-type N(H) h=1.5 k=0.8
    (two π electrons), carbonyl O h=1.0 k=1.0, ether/anhydride O h=2.0 k=0.8 (two π
    electrons). Orbitals whose energies agree within ``DEGENERACY_TOL_EV`` form one level;
    an image of a degenerate level is the incoherent sum over its partners.

Radial form (why not a Slater p_z)
    STM probes the orbital several Å above the plane, where only its vacuum tail matters.
    A Slater 2p_z (ζ ≈ 1.6 /Å) decays far too steeply. We use the exact l = 1 solution of
    the vacuum Schrödinger equation (∇² − κ²)φ = 0 (the asymptotic form used by Tersoff &
    Hamann, PRB 31, 805 (1985), and by Chen's derivative rule):
        φ(r) = z e^{−κρ} (κ/ρ² + 1/ρ³),   ρ = sqrt(r² + a²)
    i.e. cos θ · k₁(κρ) up to a constant, with κ = sqrt(2 m φ_w)/ħ for a 5 eV work function
    (11.46 /nm, ``vacuum.KAPPA_PER_NM``). The regularisation a = 0.07 nm only matters within
    an atom's core, far below any tip height used here. Because ψ is then a sum of vacuum
    solutions, its lateral Fourier components decay as exp(−sqrt(κ² + q²) z), so the
    p-channel share of a CO-tip image falls with height, as measured.

Cube orbitals
    An orbital from a cube file (``io.cube``, e.g. DFT) is sampled by ``CubeOrbital`` as the
    Hückel orbitals are. In a Gaussian (or any localised) basis it decays far too steeply a
    few Å above the molecule, where the tip is: :func:`extend_into_vacuum` keeps the cube up
    to a plane close to the molecule and continues it above with the same vacuum solution
    (∇² − κ²)ψ = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from scipy import ndimage

from stm_live.io.cube import Cube
from stm_live.simulators.vacuum import KAPPA_PER_NM

CC_BOND_NM = 0.140
CORE_REGULARISATION_NM = 0.07
HUCKEL_BETA_EV = -2.7
DEGENERACY_TOL_EV = 1e-3
BOND_CUTOFF_NM = 0.165

# Streitwieser heteroatom parameters: atom type -> (h_X, k_CX, π electrons contributed)
HUCKEL_PARAMETERS: dict[str, tuple[float, float, int]] = {
    "C": (0.0, 1.0, 1),
    "N_pyridine": (0.5, 1.0, 1),
    "N_pyrrole": (1.5, 0.8, 2),
    "O_carbonyl": (1.0, 1.0, 1),
    "O_ether": (2.0, 0.8, 2),
}


@dataclass(frozen=True, eq=False)  # identity hash: arrays inside
class Molecule:
    """A planar π-conjugated molecule; every listed atom carries one p_z orbital."""

    name: str
    symbols: tuple[str, ...]
    xyz_nm: np.ndarray  # (N, 3), plane z = 0
    pi_atoms: tuple[int, ...]  # indices into symbols/xyz_nm
    pi_types: tuple[str, ...]  # Hückel atom type per π atom (keys of HUCKEL_PARAMETERS)

    @property
    def pi_electrons(self) -> int:
        return sum(HUCKEL_PARAMETERS[t][2] for t in self.pi_types)

    @property
    def radius_nm(self) -> float:
        return float(np.max(np.hypot(self.xyz_nm[:, 0], self.xyz_nm[:, 1])))


@dataclass(frozen=True, eq=False)
class OrbitalLevel:
    """One (possibly degenerate) Hückel level: coefficients (k, n_pi) of its partners."""

    molecule: Molecule
    label: str
    energy: float  # eV relative to α
    partners: np.ndarray  # (k, n_pi) real coefficients, each row normalised

    @property
    def degeneracy(self) -> int:
        return int(self.partners.shape[0])


# ---------------------------------------------------------------------------- geometry

_SQ3 = math.sqrt(3.0)


def _hexagon_vertices(center: np.ndarray, side: float, start_deg: float = 30.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 60.0 * np.arange(6))
    return center + side * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _dedupe(points: np.ndarray, tol: float = 0.02) -> np.ndarray:
    kept: list[np.ndarray] = []
    for p in points:
        if not any(np.hypot(*(p - q)) < tol for q in kept):
            kept.append(p)
    return np.array(kept)


def benzenoid(rings: list[tuple[int, int]]) -> np.ndarray:
    """Carbon positions of fused hexagons with centres i*a1 + j*a2 (pointy-top hexagons)."""
    a1 = np.array([_SQ3 * CC_BOND_NM, 0.0])
    a2 = np.array([_SQ3 * CC_BOND_NM / 2, 1.5 * CC_BOND_NM])
    verts = np.concatenate([_hexagon_vertices(i * a1 + j * a2, CC_BOND_NM) for i, j in rings])
    return _dedupe(verts)


def _polygon(center: np.ndarray, side: float, n: int, start_rad: float) -> np.ndarray:
    radius = side / (2 * math.sin(math.pi / n))
    angles = start_rad + 2 * math.pi * np.arange(n) / n
    return center + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _azulene() -> tuple[np.ndarray, list[str]]:
    d = CC_BOND_NM
    hept = _polygon(np.array([-d / (2 * math.tan(math.pi / 7)), 0.0]), d, 7, math.pi / 7)
    pent = _polygon(np.array([d / (2 * math.tan(math.pi / 5)), 0.0]), d, 5, math.pi + math.pi / 5)
    xy = _dedupe(np.concatenate([hept, pent]))
    return xy, ["C"] * len(xy)


def _tetrapyrrole(kind: str) -> tuple[np.ndarray, list[str]]:
    """Porphine ("porphine"), phthalocyanine ("pc") or naphthalocyanine ("nc")."""
    side = 0.138
    r_inner_n = 0.205 if kind == "porphine" else 0.195
    r_bridge = 0.342 if kind == "porphine" else 0.335
    r5 = side / (2 * math.sin(math.pi / 5))
    pts: list[np.ndarray] = []
    types: list[str] = []
    for quadrant in range(4):
        theta = quadrant * math.pi / 2
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        centre = np.array([r_inner_n + r5, 0.0])
        pent = _polygon(centre, side, 5, math.pi)  # vertex 0 = inner N
        local = [pent[0], pent[1], pent[4], pent[2], pent[3]]  # N, Cα, Cα, Cβ, Cβ
        # free base: the N–H pair sits on opposite pyrroles (x axis)
        local_types = ["N_pyrrole" if quadrant % 2 == 0 else "N_pyridine", "C", "C", "C", "C"]
        if kind in ("pc", "nc"):
            hex_c = np.array([pent[2][0] + side * _SQ3 / 2, 0.0])
            benzo = _hexagon_vertices(hex_c, side)
            local += [benzo[0], benzo[1], benzo[4], benzo[5]]  # the four outer benzo carbons
            local_types += ["C"] * 4
            if kind == "nc":
                naph = _hexagon_vertices(hex_c + np.array([_SQ3 * side, 0.0]), side)
                local += [naph[0], naph[1], naph[4], naph[5]]
                local_types += ["C"] * 4
        pts += [rot @ p for p in local]
        types += local_types
        bridge_angle = theta + math.pi / 4
        pts.append(r_bridge * np.array([math.cos(bridge_angle), math.sin(bridge_angle)]))
        types.append("C" if kind == "porphine" else "N_pyridine")
    return np.array(pts), types


def _ptcda() -> tuple[np.ndarray, list[str]]:
    perylene_rings = [(0, 0), (0, 1), (-1, 1), (0, -1), (1, -1)]
    carbons = benzenoid(perylene_rings)
    a1 = np.array([_SQ3 * CC_BOND_NM, 0.0])
    a2 = np.array([_SQ3 * CC_BOND_NM / 2, 1.5 * CC_BOND_NM])
    pts = [c for c in carbons]
    types = ["C"] * len(carbons)
    for i, j in [(-1, 2), (1, -2)]:  # anhydride rings peri-fused at both ends (long axis = y here)
        centre = i * a1 + j * a2
        for v in _hexagon_vertices(centre, CC_BOND_NM):
            if min(np.hypot(*(v - c)) for c in carbons) < 0.02:
                continue
            if abs(v[0]) < 0.02:  # on the long axis: the bridging anhydride O
                pts.append(v)
                types.append("O_ether")
            else:  # carbonyl C with its O pointing radially out of the anhydride ring
                pts.append(v)
                types.append("C")
                out = (v - centre) / np.hypot(*(v - centre))
                pts.append(v + 0.121 * out)
                types.append("O_carbonyl")
    return np.array(pts), types


_BENZENOID_RINGS: dict[str, list[tuple[int, int]]] = {
    "benzene": [(0, 0)],
    "naphthalene": [(0, 0), (1, 0)],
    "anthracene": [(i, 0) for i in range(3)],
    "tetracene": [(i, 0) for i in range(4)],
    "pentacene": [(i, 0) for i in range(5)],
    "pyrene": [(0, 0), (1, 0), (0, 1), (1, -1)],
    "perylene": [(0, 0), (0, 1), (-1, 1), (0, -1), (1, -1)],
    "coronene": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (-1, 1), (1, -1)],
    "triphenylene": [(0, 0), (1, 0), (-1, 1), (0, -1)],
}

MOLECULE_NAMES: tuple[str, ...] = (
    "benzene",
    "naphthalene",
    "anthracene",
    "tetracene",
    "pentacene",
    "pyrene",
    "perylene",
    "coronene",
    "triphenylene",
    "azulene",
    "ptcda",
    "porphine",
    "h2pc",
    "h2nc",
)

_ELEMENT = {"C": "C", "N_pyridine": "N", "N_pyrrole": "N", "O_carbonyl": "O", "O_ether": "O"}


def _align_long_axis(xy: np.ndarray) -> np.ndarray:
    """Centre, and rotate the largest principal axis onto x when the molecule has one."""
    xy = xy - xy.mean(axis=0)
    evals, evecs = np.linalg.eigh(xy.T @ xy)
    if evals[1] > 1.05 * evals[0]:
        major = evecs[:, 1]
        angle = math.atan2(major[1], major[0])
        c, s = math.cos(-angle), math.sin(-angle)
        xy = xy @ np.array([[c, s], [-s, c]])
    xy[np.abs(xy) < 1e-12] = 0.0
    return xy


def molecule(name: str) -> Molecule:
    """The library molecule ``name`` (see ``MOLECULE_NAMES``; case-insensitive), one shared object."""
    if not isinstance(name, str) or name.lower() not in MOLECULE_NAMES:
        raise ValueError(f"unknown molecule {name!r}; valid names: {', '.join(MOLECULE_NAMES)}")
    return _build_molecule(name.lower())


@cache
def _build_molecule(key: str) -> Molecule:
    if key in _BENZENOID_RINGS:
        xy = benzenoid(_BENZENOID_RINGS[key])
        types = ["C"] * len(xy)
    elif key == "azulene":
        xy, types = _azulene()
    elif key == "ptcda":
        xy, types = _ptcda()
    else:
        xy, types = _tetrapyrrole({"porphine": "porphine", "h2pc": "pc", "h2nc": "nc"}[key])
    xy = _align_long_axis(np.asarray(xy, dtype=float))
    xyz = np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)
    xyz.setflags(write=False)
    return Molecule(
        name=key,
        symbols=tuple(_ELEMENT[t] for t in types),
        xyz_nm=xyz,
        pi_atoms=tuple(range(len(types))),
        pi_types=tuple(types),
    )


def _as_molecule(mol: str | Molecule) -> Molecule:
    return mol if isinstance(mol, Molecule) else molecule(mol)


# ----------------------------------------------------------------------------- Hückel


def huckel_matrix(mol: str | Molecule) -> np.ndarray:
    """Hückel matrix in units of β: A_ii = h_X, A_ij = k_XY for bonded π atoms (Streitwieser)."""
    m = _as_molecule(mol)
    xy = m.xyz_nm[list(m.pi_atoms), :2]
    h = np.array([HUCKEL_PARAMETERS[t][0] for t in m.pi_types])
    k = np.array([HUCKEL_PARAMETERS[t][1] for t in m.pi_types])
    dist = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=-1)
    bonded = (dist < BOND_CUTOFF_NM) & (dist > 1e-6)
    # k_XY for a C–X bond is the heteroatom's k; X–X bonds (none in the library) take the product
    matrix = np.where(bonded, k[:, None] * k[None, :], 0.0)
    np.fill_diagonal(matrix, h)
    return matrix


@lru_cache(maxsize=64)
def huckel_levels(m: Molecule) -> tuple[np.ndarray, list[np.ndarray], int, int]:
    """Grouped levels of ``m`` (energy ascending, eV), their coefficient blocks, the HOMO's
    level index and the LUMO's."""
    name = m.name
    x, vecs = np.linalg.eigh(huckel_matrix(m))
    energies = HUCKEL_BETA_EV * x  # E = α + xβ with α = 0, β < 0
    order = np.argsort(energies)
    energies, vecs = energies[order], vecs[:, order]
    groups: list[list[int]] = [[0]]
    for i in range(1, len(energies)):
        if energies[i] - energies[groups[-1][-1]] < DEGENERACY_TOL_EV:
            groups[-1].append(i)
        else:
            groups.append([i])
    n_occupied = m.pi_electrons // 2
    if m.pi_electrons % 2:
        raise ValueError(f"{name}: odd π electron count {m.pi_electrons}")
    homo_orbital = n_occupied - 1
    level_of = {i: g for g, members in enumerate(groups) for i in members}
    homo_level, lumo_level = level_of[homo_orbital], level_of[n_occupied]
    if homo_level == lumo_level:
        raise ValueError(f"{name}: open-shell degenerate HOMO; label levels are ambiguous")
    level_energies = np.array([energies[g[0]] for g in groups])
    blocks = [vecs[:, g].T.copy() for g in groups]
    return level_energies, blocks, homo_level, lumo_level


def _parse_label(label: str) -> tuple[str, int]:
    text = str(label).strip().upper().replace(" ", "")
    for base, sign in (("HOMO", "-"), ("LUMO", "+")):
        if text == base:
            return base, 0
        if text.startswith(base + sign) and text[len(base) + 1 :].isdigit():
            return base, int(text[len(base) + 1 :])
    raise ValueError(f"bad orbital label {label!r}; use HOMO, LUMO, HOMO-n or LUMO+n")


def orbital_level(mol: str | Molecule, label: str = "HOMO") -> OrbitalLevel:
    """The degenerate level ``label`` ("HOMO", "LUMO", "HOMO-2", "LUMO+1") of ``mol``."""
    m = _as_molecule(mol)
    base, n = _parse_label(label)
    energies, blocks, homo, lumo = huckel_levels(m)
    index = homo - n if base == "HOMO" else lumo + n
    lowest, highest = (0, homo) if base == "HOMO" else (lumo, len(energies) - 1)
    if not lowest <= index <= highest:
        raise ValueError(
            f"orbital {label!r} out of range for {m.name}: it has {homo + 1} occupied and "
            f"{len(energies) - lumo} unoccupied levels"
        )
    canonical = base if n == 0 else f"{base}{'-' if base == 'HOMO' else '+'}{n}"
    return OrbitalLevel(molecule=m, label=canonical, energy=float(energies[index]), partners=blocks[index])


# ------------------------------------------------------------------------ real space


def _chunk_size(n_atoms: int) -> int:
    return max(1024, 2_000_000 // max(n_atoms, 1))


def orbital_fields(level: OrbitalLevel, x_nm, y_nm, z_nm, *, kappa_per_nm: float = KAPPA_PER_NM) -> np.ndarray:
    """ψ, ∂ψ/∂x, ∂ψ/∂y, ∂ψ/∂z of each partner at points (x, y, z) in the molecule frame.

    Returns ``(k, 4, *x.shape)`` float64. ``z_nm`` may be a scalar or an array broadcastable
    to ``x_nm``; it must be positive (above the molecular plane). Derivatives are analytic.
    """
    return levels_fields([level], x_nm, y_nm, z_nm, kappa_per_nm=kappa_per_nm)[0]


def levels_fields(levels, x_nm, y_nm, z_nm, *, kappa_per_nm: float = KAPPA_PER_NM) -> list[np.ndarray]:
    """``orbital_fields`` of several levels of ONE molecule, sharing the atomic basis work."""
    levels = list(levels)
    if not levels or any(lv.molecule is not levels[0].molecule for lv in levels):
        raise ValueError("levels must be a non-empty list of levels of one molecule")
    x = np.asarray(x_nm, dtype=float)
    y = np.asarray(y_nm, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x_nm shape {x.shape} and y_nm shape {y.shape} differ")
    z = np.broadcast_to(np.asarray(z_nm, dtype=float), x.shape)
    if not np.all(np.isfinite(z)) or np.any(z <= 0):
        raise ValueError("z_nm must be a positive height above the molecular plane")
    if x.size == 0:
        raise ValueError("empty grid: x_nm has no points")
    m = levels[0].molecule
    atoms = m.xyz_nm[list(m.pi_atoms)]
    coeffs = np.concatenate([lv.partners for lv in levels])  # (Σk, N)
    flat_x, flat_y, flat_z = x.ravel(), y.ravel(), z.ravel()
    out = np.empty((coeffs.shape[0], 4, flat_x.size))
    kappa, a2 = kappa_per_nm, CORE_REGULARISATION_NM**2
    step = _chunk_size(len(atoms))
    for start in range(0, flat_x.size, step):
        sl = slice(start, start + step)
        dx = flat_x[None, sl] - atoms[:, 0:1]
        dy = flat_y[None, sl] - atoms[:, 1:2]
        dz = flat_z[None, sl] - atoms[:, 2:3]
        rho = np.sqrt(dx * dx + dy * dy + dz * dz + a2)
        inv = 1.0 / rho
        decay_inv2 = np.exp(-kappa * rho) * inv * inv
        # φ = z e^{−κρ}(κ/ρ² + 1/ρ³): l=1 vacuum solution (∇² − κ²)φ = 0, cos θ · k₁(κρ)
        radial = decay_inv2 * (kappa + inv)
        # f'(ρ) = −e^{−κρ}(κ²/ρ² + 3κ/ρ³ + 3/ρ⁴); ∂φ/∂x_i = z f'(ρ) x_i/ρ (+ f for i = z)
        common = -decay_inv2 * inv * (kappa**2 + inv * (3 * kappa + 3 * inv)) * dz
        # einsum, not BLAS: multithreaded BLAS on these thin products is 10x slower on a busy machine
        out[:, 0, sl] = np.einsum("kn,np->kp", coeffs, dz * radial)
        out[:, 1, sl] = np.einsum("kn,np->kp", coeffs, common * dx)
        out[:, 2, sl] = np.einsum("kn,np->kp", coeffs, common * dy)
        out[:, 3, sl] = np.einsum("kn,np->kp", coeffs, radial + common * dz)
    split = np.cumsum([lv.partners.shape[0] for lv in levels])[:-1]
    return [part.reshape(part.shape[0], 4, *x.shape) for part in np.split(out, split)]


def molecule_info(name: str) -> dict:
    """Summary used by reports: atom count, π electrons, HOMO/LUMO energies and degeneracies."""
    m = molecule(name)
    homo, lumo = orbital_level(m, "HOMO"), orbital_level(m, "LUMO")
    return {
        "name": m.name,
        "pi_atoms": len(m.pi_atoms),
        "pi_electrons": m.pi_electrons,
        "homo_eV": homo.energy,
        "lumo_eV": lumo.energy,
        "homo_degeneracy": homo.degeneracy,
        "lumo_degeneracy": lumo.degeneracy,
    }


# ---------------------------------------------------------------------- cube orbitals

# Height above the molecular plane from which a cube is continued into vacuum by default:
# outside the atoms' cores, below any tip height used for orbital imaging (>= 0.25 nm).
VACUUM_FROM_NM = 0.2


def _derivative(volume: np.ndarray, axis: int) -> np.ndarray:
    """d/d(index) along ``axis``: 4th-order central differences (error ~h^4 f^(5)/30, so
    a cube at the usual 0.1-0.2 bohr spacing gives gradients as good as its values),
    2nd-order one-sided at the two outermost planes."""
    d = np.gradient(volume, axis=axis, edge_order=2)
    v = np.moveaxis(volume, axis, 0)
    dm = np.moveaxis(d, axis, 0)  # a view: writing into it fills d
    dm[2:-2] = (v[:-4] - 8 * v[1:-3] + 8 * v[3:-1] - v[4:]) / 12.0
    return d


def extend_into_vacuum(
    cube: Cube,
    *,
    mo: int = 0,
    plane_z_nm: float | None = None,
    from_nm: float = VACUUM_FROM_NM,
    top_nm: float = 1.2,
    step_nm: float = 0.02,
    kappa_per_nm: float | None = None,
) -> Cube:
    """One orbital of ``cube`` on a regular ``step_nm`` grid from the molecular plane to
    ``top_nm`` above it: sampled from the cube up to ``from_nm`` (rounded to the grid), and
    above it the cube's plane at that height propagated into vacuum, each lateral Fourier component
    ψ(q) decaying as exp(−sqrt(κ² + q²) Δz) (the solution of (∇² − κ²)ψ = 0 above a plane).

    The cube's axes must be aligned with x, y, z (as cubegen and most codes write them);
    the plane defaults to the atoms' mean z. The returned cube holds the one orbital.
    """
    kappa = KAPPA_PER_NM if kappa_per_nm is None else float(kappa_per_nm)
    if not 0 <= mo < cube.data.shape[0]:
        raise ValueError(f"mo index {mo} out of range: cube holds {cube.data.shape[0]} orbital(s)")
    if not np.allclose(cube.axes_nm, np.diag(np.diag(cube.axes_nm)), atol=1e-9) or np.any(np.diag(cube.axes_nm) <= 0):
        raise ValueError(
            "extend_into_vacuum needs a cube whose voxel axes run along +x, +y, +z; "
            f"this one has axes (nm) {cube.axes_nm.tolist()}"
        )
    if not 0 < from_nm < top_nm or step_nm <= 0 or min(cube.shape[:2]) < 2:
        raise ValueError(
            f"need 0 < from_nm < top_nm, step_nm > 0 and >= 2 voxels along x and y, got "
            f"from_nm={from_nm}, top_nm={top_nm}, step_nm={step_nm}, cube grid {cube.shape}"
        )
    atoms_z = cube.atoms_nm[:, 2].mean() if len(cube.atoms_nm) else 0.0
    plane = float(atoms_z if plane_z_nm is None else plane_z_nm)
    steps = np.diag(cube.axes_nm)
    lo, hi = cube.origin_nm, cube.origin_nm + (np.asarray(cube.shape) - 1) * steps
    n_source = max(1, round(from_nm / step_nm))  # the plane propagated from: from_nm on the grid
    zs = plane + step_nm * np.arange(max(n_source + 2, round(top_nm / step_nm) + 1))
    if not lo[2] <= zs[n_source] <= hi[2]:
        raise ValueError(
            f"the cube spans z {lo[2]:.3f}..{hi[2]:.3f} nm; it must hold the plane "
            f"{from_nm} nm above the molecule (z = {zs[n_source]:.3f} nm)"
        )
    nx, ny = (int(np.floor((hi[i] - lo[i]) / step_nm)) + 1 for i in (0, 1))
    xs, ys = lo[0] + step_nm * np.arange(nx), lo[1] + step_nm * np.arange(ny)
    # Below the source plane: the cube's own values on the new grid (cubic spline).
    gx, gy, gz = np.meshgrid(xs, ys, np.clip(zs[: n_source + 1], lo[2], hi[2]), indexing="ij")
    index = (np.stack([gx, gy, gz]) - lo[:, None, None, None]) / steps[:, None, None, None]
    below = ndimage.map_coordinates(cube.data[mo], index.reshape(3, -1), order=3, mode="nearest")
    below = below.reshape(gx.shape)
    # Above it: zero-padded to twice the box, so the periodic FFT folds no tail back in.
    px, py = 2 * nx, 2 * ny
    spectrum = np.fft.rfft2(below[..., -1], s=(px, py))
    qx = 2 * np.pi * np.fft.fftfreq(px, d=step_nm)
    qy = 2 * np.pi * np.fft.rfftfreq(py, d=step_nm)
    decay = np.sqrt(kappa**2 + qx[:, None] ** 2 + qy[None, :] ** 2)
    above = [
        np.fft.irfft2(spectrum * np.exp(-decay * (z - zs[n_source])), s=(px, py))[:nx, :ny] for z in zs[n_source + 1 :]
    ]
    volume = np.concatenate([below, np.stack(above, axis=-1)], axis=-1)
    return Cube(
        cube.comment,
        cube.atomic_numbers,
        cube.atoms_nm,
        np.array([xs[0], ys[0], zs[0]]),
        np.eye(3) * step_nm,
        volume[None],
        (cube.mo_indices[mo],) if cube.mo_indices else (),
    )


class CubeOrbital:
    """A cube orbital sampled like :func:`orbital_fields`.

    ``fields(x_nm, y_nm, z_nm)`` returns ``(1, 4, *x.shape)``: ψ, ∂ψ/∂x, ∂ψ/∂y, ∂ψ/∂z.
    x, y are relative to the molecule's centre (atoms' mean x, y); z is the height above
    the molecular plane (atoms' mean z unless ``plane_z_nm`` is given, in cube
    coordinates). Points outside the cube's box read 0 (the orbital has decayed there
    for a box that holds its tails; check ``cube`` bounds for tall tip heights).
    ``vacuum_from_nm``: continue the orbital into vacuum above that height
    (:func:`extend_into_vacuum`, 1.2 nm above the plane); None samples the cube as it is.
    """

    def __init__(
        self, cube: Cube, *, plane_z_nm: float | None = None, mo: int = 0, vacuum_from_nm: float | None = None
    ):
        if not 0 <= mo < cube.data.shape[0]:
            raise ValueError(f"mo index {mo} out of range: cube holds {cube.data.shape[0]} orbital(s)")
        if vacuum_from_nm is not None:
            cube, mo = extend_into_vacuum(cube, mo=mo, plane_z_nm=plane_z_nm, from_nm=vacuum_from_nm), 0
        if min(cube.shape) < 4:
            raise ValueError(f"cube grid {cube.shape} too small for cubic interpolation (need >= 4 voxels per axis)")
        self.cube = cube
        self.center_nm = cube.atoms_nm.mean(axis=0) if len(cube.atoms_nm) else np.zeros(3)
        self.plane_z_nm = float(self.center_nm[2] if plane_z_nm is None else plane_z_nm)
        # r = origin + A^T i  =>  i = M (r - origin), M = inv(A^T); grad_r = M^T grad_i.
        self._to_index = np.linalg.inv(cube.axes_nm.T)
        volume = cube.data[mo]
        grad_i = [_derivative(volume, axis) for axis in range(3)]
        grad_r = np.einsum("ji,j...->i...", self._to_index, np.stack(grad_i))
        # Spline coefficients once, so each fields() call is a cheap prefilter=False lookup.
        self._coeffs = [ndimage.spline_filter(v, order=3, mode="nearest") for v in (volume, *grad_r)]

    def fields(self, x_nm, y_nm, z_nm) -> np.ndarray:
        x, y, z = np.broadcast_arrays(
            np.asarray(x_nm, dtype=np.float64), np.asarray(y_nm, dtype=np.float64), np.asarray(z_nm, dtype=np.float64)
        )
        shape = x.shape
        r = np.stack([x.ravel() + self.center_nm[0], y.ravel() + self.center_nm[1], z.ravel() + self.plane_z_nm])
        idx = self._to_index @ (r - self.cube.origin_nm[:, None])
        upper = np.asarray(self.cube.shape, dtype=np.float64)[:, None] - 1
        inside = np.all((idx >= 0) & (idx <= upper), axis=0)
        out = np.zeros((1, 4, r.shape[1]), dtype=np.float64)
        for k, coeffs in enumerate(self._coeffs):
            out[0, k] = ndimage.map_coordinates(coeffs, idx, order=3, mode="nearest", prefilter=False)
        out[..., ~inside] = 0.0
        return out.reshape(1, 4, *shape)
