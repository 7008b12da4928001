"""Orbital resonances: point spectra, dI/dV maps and grids from the imaging forward model.

One function, :func:`simulate`, gives all three: a spectrum at a point (a sweep of biases),
a dI/dV map over a frame at one bias (constant height, or constant current with the
setpoint held at the map's bias), and a grid (every point of a frame times a sweep).

Physics
    Each orbital level n of a molecule is a resonance at the sample bias E_n (in V: the
    level's energy relative to the Fermi level, divided by e), broadened by a lineshape L of
    unit area. The tip sees the local density of states

        LDOS(r, E) = Σ_n S_n(r) L(E − E_n)

    where S_n(r) is the level's tunnelling signal *exactly as images have it*: Σ over the
    degenerate partners of fᵀ D f through the tip's channels (Chen's derivative rule),
    with the apex offset, double apex and blur of ``imaging.signal_image``, which computes
    it. dI/dV(V) ∝ LDOS(eV) (Tersoff–Hamann), and I(V) = ∫₀^V dI/dV dV', with sign (negative
    at negative sample bias). Each level carries ``LEVEL_WEIGHT_V`` volts of area, so the
    current past one resonance equals imaging's I = CURRENT_SCALE_A_PER_V · 1 V · S_n.
    The substrate (``imaging.Substrate``) adds an energy-independent dI/dV, so bare substrate
    has a flat spectrum and I = CURRENT_SCALE_A_PER_V · V · S_sub: imaging's own background.
    κ, and so the height dependence, is taken energy independent, as in the images.

Level energies (default mapping of the Hückel energies, per molecule overridable)
    Hückel levels E (relative to α, β = −2.7 eV) sit symmetrically about midgap
    E_mid = (E_HOMO + E_LUMO)/2. On a surface the transport gap exceeds the single-particle
    gap by the charging energy U (the electron added or removed costs U beyond the orbital
    energy), so a level's bias is

        V_n = V_mid + s (E_n − E_mid) − U/2   (occupied: E_n ≤ E_HOMO)
        V_n = V_mid + s (E_n − E_mid) + U/2   (empty)

    with gap scale s = ``GAP_SCALE``, U = ``CHARGING_V`` and the midgap ``MIDGAP_V``
    chosen so that pentacene on NaCl(2ML)/Cu(111) has its HOMO at −2.4 V and LUMO at +1.7 V
    (Repp et al., PRL 94, 026803 (2005)). Other molecules follow from their Hückel gaps
    (h2pc: −2.3 / +1.6 V; naphthalene: −3.5 / +2.8 V). ``SpectralModel.energies``
    overrides any level of a molecule by name, or of one placement by its index (a cube
    orbital has no Hückel energy: give it one by index).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
from scipy.special import erf

from stm_live.simulators import imaging
from stm_live.simulators.imaging import CubePlacement, Placement, ScanFrame, Substrate
from stm_live.simulators.orbitals import huckel_levels, molecule, orbital_level
from stm_live.simulators.tip import as_tip

__all__ = [
    "CHARGING_V",
    "GAP_SCALE",
    "LEVEL_WEIGHT_V",
    "MIDGAP_V",
    "LINESHAPES",
    "Resonance",
    "SpectralModel",
    "Spectra",
    "level_energies",
    "lineshape",
    "resonances",
    "simulate",
]

MIDGAP_V = -0.35
GAP_SCALE = 1.0
CHARGING_V = 2.9
LEVEL_WEIGHT_V = 1.0
LINESHAPES = ("lorentzian", "gaussian")
_FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


@dataclass(frozen=True, eq=False)  # identity hash: a mapping inside
class SpectralModel:
    """Where each molecule's levels sit and how they are broadened.

    ``width_V``: full width at half maximum of each resonance, for either ``shape``.
    ``levels_each_side``: occupied (HOMO, HOMO-1, ...) and empty (LUMO, LUMO+1, ...) levels
    of each library molecule included by default; ``energies`` adds or moves levels:
    ``{"pentacene": {"HOMO": -2.2, "HOMO-2": -3.9}, 3: {"LUMO": 1.1}, 4: -1.8}`` (molecule
    name -> {label: V}; placement index -> {label: V}, or a number for a cube orbital).
    A placement index wins over its molecule's name. A placement's ``orbital`` (imaging's
    bias-independent choice) plays no part here: spectroscopy tells levels by energy.
    """

    width_V: float = 0.2
    shape: str = "lorentzian"
    midgap_V: float = MIDGAP_V
    gap_scale: float = GAP_SCALE
    charging_V: float = CHARGING_V
    levels_each_side: int = 2
    energies: Mapping = field(default_factory=dict)

    def __post_init__(self):
        for key in ("width_V", "midgap_V", "gap_scale", "charging_V"):
            object.__setattr__(self, key, _finite(getattr(self, key), key))
        if self.width_V <= 0:
            raise ValueError(f"SpectralModel.width_V must be a positive width in V, got {self.width_V}")
        if self.shape not in LINESHAPES:
            raise ValueError(f"SpectralModel.shape must be one of {', '.join(LINESHAPES)}, got {self.shape!r}")
        if self.gap_scale <= 0 or self.charging_V < 0:
            raise ValueError(
                f"SpectralModel.gap_scale must be > 0 and charging_V >= 0, got {self.gap_scale} and {self.charging_V}"
            )
        if int(self.levels_each_side) != self.levels_each_side or self.levels_each_side < 1:
            raise ValueError(f"SpectralModel.levels_each_side must be a positive integer, got {self.levels_each_side}")
        checked = {}
        for key, value in dict(self.energies).items():
            if isinstance(key, str):
                name = molecule(key).name  # a clear error for an unknown molecule
                checked[name] = _check_labels(name, value, f"energies[{key!r}]")
            elif isinstance(key, int) and not isinstance(key, bool) and key >= 0:
                checked[key] = (
                    _finite(value, f"energies[{key}]")
                    if not isinstance(value, Mapping)
                    else _check_labels(None, value, f"energies[{key}]")
                )
            else:
                raise ValueError(f"SpectralModel.energies keys are molecule names or placement indexes, got {key!r}")
        object.__setattr__(self, "energies", MappingProxyType(checked))

    def level_energies(self, mol: str) -> dict[str, float]:
        """Bias (V) of each included level of library molecule ``mol``, by label, ascending."""
        name = molecule(mol).name
        return _sorted({**_default_levels(self, name), **self.energies.get(name, {})})

    def placement_levels(self, placement, index: int) -> list[tuple[str, float, object]]:
        """(label, bias V, imaging placement of that one level) for ``placement``, the
        ``index``-th of a scene."""
        own = self.energies.get(index)
        if isinstance(placement, CubePlacement):
            if own is None:
                raise ValueError(
                    f"placement {index} is a cube orbital with no energy: give it one in "
                    f"SpectralModel(energies={{{index}: V}})"
                )
            if isinstance(own, Mapping):
                if len(own) != 1:
                    raise ValueError(f"energies[{index}]: a cube orbital is one level; give one number")
                ((label, volts),) = own.items()
                return [(label, volts, placement)]
            return [("MO", own, placement)]
        if not isinstance(placement, Placement):
            raise ValueError(f"placements must be Placement or CubePlacement objects, got {type(placement).__name__}")
        if own is not None and not isinstance(own, Mapping):
            raise ValueError(f"energies[{index}]: {placement.molecule} has several levels; give {{label: V}}")
        levels = self.level_energies(placement.molecule)
        if own:
            levels = _sorted({**levels, **_check_labels(placement.molecule, own, f"energies[{index}]")})
        return [(label, volts, replace(placement, orbital=label)) for label, volts in levels.items()]


def _finite(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"SpectralModel.{where} must be a finite number, got {value!r}")
    return number


def _check_labels(name, value, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"SpectralModel.{where} must map orbital labels to biases in V, got {value!r}")
    out = {}
    for label, volts in value.items():
        canonical = orbital_level(name, label).label if name else str(label)
        out[canonical] = _finite(volts, f"{where}[{label!r}]")
    return out


def _sorted(levels: dict[str, float]) -> dict[str, float]:
    return dict(sorted(levels.items(), key=lambda kv: kv[1]))


def _default_levels(model: SpectralModel, name: str) -> dict[str, float]:
    energies, _blocks, homo, lumo = huckel_levels(molecule(name))
    mid = 0.5 * (energies[homo] + energies[lumo])
    out = {}
    for base, index, sign, step in (("HOMO", homo, -1, -1), ("LUMO", lumo, +1, +1)):
        for n in range(model.levels_each_side):
            i = index + step * n
            if not 0 <= i < len(energies) or (base == "HOMO" and i > homo) or (base == "LUMO" and i < lumo):
                break
            label = base if n == 0 else f"{base}{'-' if base == 'HOMO' else '+'}{n}"
            # V_n = V_mid + s (E_n − E_mid) ∓ U/2: scaled Hückel levels, gap opened by the charging energy
            out[label] = float(model.midgap_V + model.gap_scale * (energies[i] - mid) + sign * model.charging_V / 2)
    return out


def level_energies(mol: str, model: SpectralModel | None = None) -> dict[str, float]:
    """Bias (V) of each level ``simulate`` includes for library molecule ``mol`` (label -> V)."""
    return (model or SpectralModel()).level_energies(mol)


@dataclass(frozen=True)
class Resonance:
    """One level of one placement of a scene: its index, orbital label and bias (V)."""

    placement: int
    label: str
    energy_V: float


def resonances(placements, model: SpectralModel | None = None) -> tuple[Resonance, ...]:
    """Every level ``simulate`` includes for a scene, in placement order."""
    model = model or SpectralModel()
    return tuple(
        Resonance(i, label, volts)
        for i, p in enumerate(imaging.check_placements(placements))
        for label, volts, _item in model.placement_levels(p, i)
    )


def lineshape(e_V, model: SpectralModel | None = None, *, cumulative: bool = False) -> np.ndarray:
    """L(E) of unit area (1/V), or with ``cumulative`` its integral from −∞ to E."""
    model = model or SpectralModel()
    e = np.asarray(e_V, dtype=float)
    if model.shape == "lorentzian":
        half = model.width_V / 2
        if cumulative:
            return 0.5 + np.arctan(e / half) / math.pi  # ∫ Lorentzian = 1/2 + arctan(E/(Γ/2))/π
        return (half / math.pi) / (e * e + half * half)  # L = (Γ/2)/π / (E² + (Γ/2)²), Γ = FWHM
    sigma = model.width_V / _FWHM_PER_SIGMA
    if cumulative:
        return 0.5 * (1 + erf(e / (sigma * math.sqrt(2))))  # ∫ Gaussian = ½(1 + erf(E/(σ√2)))
    return np.exp(-0.5 * (e / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))  # L = e^{−E²/2σ²}/(σ√2π)


@dataclass(frozen=True)
class Spectra:
    """What :func:`simulate` returns; ``points`` is the shape of ``at`` (frame: (lines,
    pixels) in internal orientation; one (x, y): (); n points: (n,)).

    ``didv_A_per_V`` and ``current_A``: ``(*points, len(bias_V))`` for a sweep, ``points``
    for one bias (a map). ``z_nm``: the tip height at each point (``points``).
    """

    bias_V: np.ndarray
    didv_A_per_V: np.ndarray
    current_A: np.ndarray
    z_nm: np.ndarray
    resonances: tuple[Resonance, ...]


class _Fields:
    """A placed level's own-frame fields, in the form CubePlacement takes (so that its
    ``amplitude`` can weight the level in imaging's constant-current solver)."""

    def __init__(self, item):
        self.item = item

    def fields(self, x_nm, y_nm, z_nm):
        return self.item.local_fields(x_nm, y_nm, z_nm, 1.0)


class _Bare:
    """No orbital: imaging then gives the substrate alone, through its own apex offset,
    double apex and blur."""

    @staticmethod
    def fields(x_nm, y_nm, z_nm):
        return np.zeros((1, 4, *np.shape(x_nm)))


def _frames(at) -> tuple[list[ScanFrame], tuple[int, ...]]:
    """The frames to render ``at`` on, and the shape of the points."""
    if isinstance(at, ScanFrame):
        return [at], (at.lines, at.pixels)
    pts = np.asarray(at, dtype=float)
    if pts.ndim == 1 and pts.shape == (2,):
        pts, shape = pts[None], ()
    elif pts.ndim == 2 and pts.shape[1] == 2:
        shape = (len(pts),)
    else:
        raise ValueError(
            f"at must be a ScanFrame, an (x_nm, y_nm) point or an (n, 2) array of points, got shape {pts.shape}"
        )
    if not len(pts):
        raise ValueError("empty grid: at has no points")
    if not np.all(np.isfinite(pts)):
        raise ValueError("point coordinates must be finite")
    # one pixel centred on each point (a 1x1 frame's pixel centre is its centre)
    return [ScanFrame(float(x), float(y), 1e-3, 1e-3, pixels=1, lines=1) for x, y in pts], shape


def _biases(bias_V) -> tuple[np.ndarray, bool]:
    v = np.asarray(bias_V, dtype=float)
    if v.ndim == 0:
        sweep = False
        v = v[None]
    elif v.ndim == 1:
        sweep = True
        if len(v) < 2:
            raise ValueError(f"a sweep needs at least 2 biases, got {len(v)}; give a number for a map at one bias")
    else:
        raise ValueError(f"bias_V must be a number (a map) or a 1-D sweep, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("bias_V must be finite")
    return v, sweep


def simulate(
    placements,
    tip,
    at,
    bias_V,
    *,
    z_nm: float | None = None,
    setpoint_A: float | None = None,
    setpoint_bias_V: float | None = None,
    model: SpectralModel | None = None,
    substrate: Substrate | None = None,
) -> Spectra:
    """dI/dV and I of a scene at points ``at`` for biases ``bias_V``.

    ``at``: a ``ScanFrame`` (a map or a grid: every pixel centre; a Nanonis grid is a frame
    with ``pixels`` = points in x, ``lines`` = points in y, ``direction="up"``), one
    ``(x_nm, y_nm)`` point, or an ``(n, 2)`` array of points. ``bias_V``: one bias (a map)
    or a sweep of at least two. The tip height is either ``z_nm`` (constant height; or one
    height per point, e.g. a constant-current scan's Z image, for its lock-in channel) or the
    one where I(``setpoint_bias_V``) = ``setpoint_A`` at each point (the feedback loop
    opened there, as Nanonis does before a sweep; for a map, ``setpoint_bias_V`` defaults
    to the map's bias: a constant-current dI/dV map). ``substrate=None``: none at constant
    height, a flat ``Substrate()`` under feedback (as imaging does).
    """
    items = imaging.check_placements(placements)
    tip = as_tip(tip)
    model = model or SpectralModel()
    volts, sweep = _biases(bias_V)
    frames, shape = _frames(at)
    if (z_nm is None) == (setpoint_A is None):
        raise ValueError("give the tip height z_nm (constant height) or setpoint_A (constant current), not both")

    # One imaging item per (placement, level); levels at one energy share a render.
    groups: dict[float, list] = {}
    found = []
    for i, p in enumerate(items):
        for label, energy, item in model.placement_levels(p, i):
            groups.setdefault(energy, []).append(item)
            found.append(Resonance(i, label, energy))
    energies = np.array(list(groups), dtype=float)

    if setpoint_A is not None:
        if setpoint_bias_V is None:
            if sweep:
                raise ValueError("a sweep under feedback needs setpoint_bias_V (where the loop was opened)")
            setpoint_bias_V = float(volts[0])
        imaging.orbital_for_bias(setpoint_bias_V)  # a clear error for 0 V: no current to hold
        substrate = substrate or Substrate()
        # I(V_s) = C (Σ_n W |F(V_s − E_n) − F(−E_n)| S_n + |V_s| S_sub): as imaging's C |V_s| Σ S with
        # each level's fields weighted by sqrt(W |ΔF| / |V_s|)
        weights = (
            LEVEL_WEIGHT_V
            * np.abs(
                lineshape(setpoint_bias_V - energies, model, cumulative=True)
                - lineshape(-energies, model, cumulative=True)
            )
            / abs(setpoint_bias_V)
        )
        held = [
            CubePlacement(_Fields(item), item.x_nm, item.y_nm, item.rotation_deg, math.sqrt(w))
            for w, group in zip(weights, groups.values())
            if w > 0
            for item in group
        ]
        heights = [
            imaging.constant_current_image(
                held or [CubePlacement(_Bare())],
                f,
                tip,
                setpoint_A=setpoint_A,
                bias_V=setpoint_bias_V,
                substrate=substrate,
            ).astype(float)
            for f in frames
        ]
    else:
        imaging.check_height(z_nm)
        try:
            z_all = np.broadcast_to(np.asarray(z_nm, dtype=float), shape).reshape(len(frames), -1)
        except ValueError:
            raise ValueError(f"z_nm of shape {np.shape(z_nm)} does not fit the points' shape {shape}") from None
        heights = [z.reshape(f.lines, f.pixels) for f, z in zip(frames, z_all)]

    # S_n(r) per level group and S_sub(r), each through imaging's own composition
    signals = np.empty((len(energies), *np.shape(np.concatenate(heights))))
    background = np.zeros(signals.shape[1:])
    for f, z, rows in zip(frames, heights, _row_slices(heights)):
        for g, (_energy, group) in enumerate(groups.items()):
            signals[g, rows] = imaging.signal_image(group, f, tip, z_nm=z, bias_V=1.0)
        if substrate is not None:
            background[rows] = imaging.signal_image(
                [CubePlacement(_Bare())], f, tip, z_nm=z, bias_V=1.0, substrate=substrate
            )

    # dI/dV(V) = C (Σ_n W L(V − E_n) S_n + S_sub): LDOS at E = eV through the tip (Tersoff–Hamann)
    de = volts[None, :] - energies[:, None]  # (levels, biases)
    didv = np.einsum("g...,gb->...b", signals, LEVEL_WEIGHT_V * lineshape(de, model)) + background[..., None]
    # I(V) = ∫₀^V dI/dV = C (Σ_n W [F(V − E_n) − F(−E_n)] S_n + V S_sub), F the lineshape's integral
    area = lineshape(de, model, cumulative=True) - lineshape(-energies, model, cumulative=True)[:, None]
    current = np.einsum("g...,gb->...b", signals, LEVEL_WEIGHT_V * area) + background[..., None] * volts
    scale = imaging.CURRENT_SCALE_A_PER_V

    def points(a):  # rows of stacked frames -> the shape of ``at`` (+ bias axis for a sweep)
        a = a.reshape(*shape, *a.shape[2:]) if not isinstance(at, ScanFrame) else a
        return a if sweep else a[..., 0]

    return Spectra(
        bias_V=volts if sweep else np.asarray(volts[0]),
        didv_A_per_V=points(scale * didv),
        current_A=points(scale * current),
        z_nm=np.concatenate(heights).reshape(shape),
        resonances=tuple(found),
    )


def _row_slices(heights) -> list[slice]:
    """Each frame's rows in the stacked (Σ lines, pixels) arrays."""
    edges = np.cumsum([0] + [len(h) for h in heights])
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
