"""Scenario files for the simulated controller: YAML -> validated, typed ``Scenario``.

A scenario says what is on the surface (molecules, substrate), which tip the microscope
starts with and how that tip evolves (scheduled changes, per-line hazards, how likely each
reconditioning action is to work), which artifacts the images carry, and the controller's
initial settings (frame, bias, setpoint, Z). Every problem raises ``ScenarioError`` naming
the file and the key path, e.g. ``default.yaml: molecules[2].x_nm: expected a number``.

A molecule is a library name (``{molecule: pentacene, orbital: HOMO, x_nm: ...}``) or an
orbital from a cube file, e.g. from DFT (``{cube: homo.cube, mo: 0, x_nm: ...}``, the path
relative to the scenario file), imaged through the same forward model.

Spectroscopy (``spectra.SpectralModel``: bias spectra, the lock-in's dI/dV, grids): a
``spectra:`` section sets the resonances, ``{width_V: 0.2, shape: lorentzian,
levels_each_side: 2, midgap_V: -0.35, gap_scale: 1.0, charging_V: 2.9, energies:
{pentacene: {HOMO: -2.2}}}`` (every key optional; energies by molecule name, label -> V),
and a molecule entry may place its own levels: ``energies: {HOMO: -2.0, LUMO: 1.5}`` (a
library molecule) or ``energy_V: -1.8`` (a cube orbital, which has no Hückel energy).

Sample areas: an ``areas:`` list puts several areas on the sample, each with its own
molecules placed around its centre, ``{name: east, x_nm: 2000, y_nm: 0, molecules: [...]}``;
the coarse motor (Motor.StartMove, StartClosedLoop) moves the sample under the piezo, so
after enough steps a frame images another area. Without ``areas:`` the top-level
``molecules`` are the one area, at the origin. ``Scenario.molecules`` holds every area's
molecules in sample coordinates (placement indexes, as in ``energies``, count over them all).

Frame and line numbers in ``tip.events`` and ``faults`` count from 0 (frame 0 = the first
frame scanned after the server starts; line = row in acquisition order).

``faults:`` lists link faults the server injects between itself and its clients
(``faults.FaultLayer``), e.g. ``{kind: delay, command: Scan.FrameDataGrab, seconds: 5, nth: 3}``,
``{kind: stall, line: 56, seconds: 5}``, ``{kind: drop, line: 40, frame: 1}``,
``{kind: refuse, seconds: 10, line: 40}`` or ``{..., at_s: 3}``,
``{kind: close_mid_reply, command: Scan.FrameDataGrab, nth: 2}``; ``faults.FAULT_KEYS`` lists
each kind's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from stm_live.devices.protocol import LAYOUTS
from stm_live.io.cube import read_cube
from stm_live.simulators.faults import FAULT_KEYS, FAULT_KINDS, Fault
from stm_live.simulators.imaging import CubePlacement, Placement, cube_amplitude
from stm_live.simulators.orbitals import MOLECULE_NAMES, VACUUM_FROM_NM, CubeOrbital, orbital_level
from stm_live.simulators.spectra import LINESHAPES, SpectralModel
from stm_live.simulators.tip import TIP_PRESETS

__all__ = [
    "ARTIFACT_NAMES",
    "RECONDITION_ACTIONS",
    "RECONDITION_OUTCOMES",
    "TIP_HAZARDS",
    "Area",
    "ArtifactSpec",
    "FrameSpec",
    "Scenario",
    "ScenarioError",
    "TipEvent",
    "TipEvolution",
    "load_scenario",
    "parse_faults",
    "parse_scenario",
    "scenario_names",
]

# Per-line hazards and what each turns the tip into ("instability" starts an episode of
# line jumps/noise instead of changing the tip shape).
TIP_HAZARDS = {"co_loss": "s", "double": "double", "blunt": "blunt", "instability": None}
# Reconditioning actions: a bias pulse, a gentle TipShaper run, and a poke (TipShaper whose
# |tip lift| reaches ``poke_threshold_m``: the apex is dipped into the surface).
RECONDITION_ACTIONS = ("pulse", "shaper", "poke")
# "repair" restores the last good tip (only when the tip is bad); the others set a preset.
RECONDITION_OUTCOMES = ("repair", "co", "s", "mixed", "blunt", "double")
ARTIFACT_NAMES = ("white_noise", "pink_noise", "line_offsets", "drift", "creep", "spikes")
MAX_FAULT_S = 3600.0
MAX_AREA_NM = 5e6  # the coarse motor's reach (Motor.StartClosedLoop: +-5 mm)


class ScenarioError(ValueError):
    """A scenario file or mapping is invalid; the message names the file and the key."""


# The scene of the shipped default.yaml; used when a scenario gives no ``molecules``.
DEFAULT_MOLECULES = (
    Placement("pentacene", -1.6, 1.7, 15.0),
    Placement("h2pc", 1.6, 1.3, 0.0),
    Placement("coronene", -1.5, -1.6, 0.0),
    Placement("naphthalene", 1.9, -1.9, 60.0),
)


@dataclass(frozen=True)
class FrameSpec:
    center_x_nm: float = 0.0
    center_y_nm: float = 0.0
    width_nm: float = 7.0
    height_nm: float = 7.0
    angle_deg: float = 0.0
    pixels: int = 128
    lines: int = 128
    direction: str = "down"


@dataclass(frozen=True)
class Area:
    """A sample area: its molecules placed around (x_nm, y_nm) of the sample."""

    name: str
    x_nm: float
    y_nm: float
    molecules: tuple[Placement | CubePlacement, ...]  # relative to the area's centre


@dataclass(frozen=True)
class TipEvent:
    frame: int
    line: int
    to: str


@dataclass(frozen=True)
class TipEvolution:
    events: tuple[TipEvent, ...] = ()
    hazards: dict[str, float] = field(default_factory=dict)  # per scanned line
    instability_lines: int = 12
    instability_jump: float = 0.3  # relative height of line jumps during an episode
    recondition: dict[str, dict[str, float]] = field(default_factory=dict)
    poke_threshold_m: float = 1.0e-9


@dataclass(frozen=True)
class ArtifactSpec:
    """Artifact levels, relative to the image's own spread (std) unless noted."""

    white_noise: float = 0.0
    pink_noise: float = 0.0
    line_offsets: float = 0.0
    drift: float = 0.0  # nm per frame
    creep: float = 0.0  # nm at the first line, decaying
    spikes: float = 0.0  # probability per pixel


@dataclass(frozen=True)
class Scenario:
    name: str = "default"
    description: str = ""
    molecules: tuple[Placement | CubePlacement, ...] = ()  # every area's, in sample coordinates
    areas: tuple[Area, ...] = ()  # the ``areas:`` section; empty: one area, ``molecules``
    substrate: dict[str, float] = field(default_factory=dict)
    tip: str = "co"
    evolution: TipEvolution = field(default_factory=TipEvolution)
    artifacts: ArtifactSpec = field(default_factory=ArtifactSpec)
    frame: FrameSpec = field(default_factory=FrameSpec)
    bias_V: float = -0.5
    setpoint_A: float = 5.0e-12
    z_nm: float = 0.65  # constant-height tip height above the molecular plane; also "home"
    z_controller: bool = True
    time_per_line_s: float = 0.1  # forward line; backward uses the same unless speed says
    channels: tuple[int, ...] = (0, 30)
    faults: tuple[Fault, ...] = ()
    spectra: SpectralModel = field(default_factory=SpectralModel)


# ---------------------------------------------------------------------------- validation


class _Ctx:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str):
        raise ScenarioError(f"{self.source}: {key}: {message}")

    def mapping(self, value, key: str, allowed: tuple[str, ...]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        for k in value:
            if k not in allowed:
                self.fail(f"{key}.{k}" if key != "<top>" else str(k), f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def number(self, value, key: str, *, lo=None, hi=None, lo_open=False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected a number, got {value!r}")
        v = float(value)
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(key, f"must be finite, got {value!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            self.fail(key, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
        if hi is not None and v > hi:
            self.fail(key, f"must be <= {hi}, got {value!r}")
        return v

    def integer(self, value, key: str, *, lo=None, hi=None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {value!r}")
        if lo is not None and value < lo:
            self.fail(key, f"must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            self.fail(key, f"must be <= {hi}, got {value!r}")
        return int(value)

    def string(self, value, key: str, choices=None) -> str:
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {value!r}")
        if choices is not None and value not in choices:
            self.fail(key, f"unknown value {value!r} (choose from: {', '.join(sorted(choices))})")
        return value

    def boolean(self, value, key: str) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r}")
        return value


def _cube_placement(c: _Ctx, m: dict, key: str, source: str, where: dict) -> CubePlacement:
    """A ``{cube: FILE, mo: K}`` entry: the cube's orbital K continued into vacuum and put on
    the library's current scale (``imaging.cube_amplitude``). FILE is relative to the
    scenario file's folder."""
    for other in ("molecule", "orbital"):
        if other in m:
            c.fail(f"{key}.{other}", "a cube entry names no library molecule or orbital: the cube holds its orbital")
    path = Path(c.string(m["cube"], f"{key}.cube"))
    if not path.is_absolute() and source != "<scenario>":
        path = Path(source).parent / path
    mo = c.integer(m.get("mo", 0), f"{key}.mo", lo=0)
    try:
        orbital = CubeOrbital(read_cube(path), mo=mo, vacuum_from_nm=VACUUM_FROM_NM)
        return CubePlacement(orbital, amplitude=cube_amplitude(orbital), **where)
    except (OSError, ValueError) as exc:
        c.fail(f"{key}.cube", str(exc))


def _probabilities(c: _Ctx, value, key: str, allowed: tuple[str, ...]) -> dict[str, float]:
    m = c.mapping(value, key, allowed)
    out = {k: c.number(v, f"{key}.{k}", lo=0.0, hi=1.0) for k, v in m.items()}
    if sum(out.values()) > 1.0 + 1e-9:
        c.fail(key, f"probabilities sum to {sum(out.values()):.3g} > 1")
    return out


def _fault(c: _Ctx, value, key: str) -> Fault:
    if not isinstance(value, dict):
        c.fail(key, f"expected a mapping such as {{kind: drop, line: 10}}, got {value!r}")
    raw = value
    if "kind" not in raw:
        c.fail(f"{key}.kind", f"missing (one of: {', '.join(FAULT_KINDS)})")
    kind = c.string(raw["kind"], f"{key}.kind", FAULT_KINDS)
    required, optional = FAULT_KEYS[kind]
    c.mapping(raw, key, ("kind",) + required + optional)
    for req in required:
        if req not in raw:
            c.fail(f"{key}.{req}", f"missing (a {kind} fault needs {', '.join(required)})")
    for a, b in (("nth", "every"), ("line", "at_s")):
        if a in raw and b in raw:
            c.fail(key, f"give {a} or {b}, not both")
    if kind == "refuse" and "line" not in raw and "at_s" not in raw:
        c.fail(key, "a refuse fault starts at a line (line: K) or a time (at_s: seconds)")
    if "frame" in raw and "line" not in raw:
        c.fail(f"{key}.frame", "only with line: K")
    f: dict[str, Any] = {"kind": kind}
    if "command" in raw:
        names = raw["command"] if isinstance(raw["command"], list) else [raw["command"]]
        if not names:
            c.fail(f"{key}.command", "expected a command name or a non-empty list of them")
        for i, n in enumerate(names):
            where = f"{key}.command" + (f"[{i}]" if isinstance(raw["command"], list) else "")
            if c.string(n, where) not in LAYOUTS:
                c.fail(where, f"unknown command {n!r} (names as the manual spells them, e.g. Scan.FrameDataGrab)")
        f["commands"] = tuple(names)
    if "seconds" in raw:
        f["seconds"] = c.number(raw["seconds"], f"{key}.seconds", lo=0.0, lo_open=True, hi=MAX_FAULT_S)
    if "at_s" in raw:
        f["at_s"] = c.number(raw["at_s"], f"{key}.at_s", lo=0.0, hi=MAX_FAULT_S)
    limits = {
        "nth": (1, None),
        "every": (1, None),
        "line": (0, 2047),  # frames have <= 2048 lines
        "frame": (0, None),
        "connection": (0, None),
        "bytes": (1, None),
    }
    for k, (lo, hi) in limits.items():
        if k in raw:
            f[k] = c.integer(raw[k], f"{key}.{k}", lo=lo, hi=hi)
    return Fault(**f)


def _energies(c: _Ctx, value, key: str, name: str | None) -> dict[str, float]:
    """{label: V} of one molecule's levels (``name``: its library molecule, which checks the labels)."""
    m = (
        value
        if isinstance(value, dict)
        else c.fail(key, f"expected a mapping of orbital labels to biases in V, e.g. {{HOMO: -2.2}}, got {value!r}")
    )
    if not m:
        c.fail(key, "expected at least one orbital label, e.g. {HOMO: -2.2}")
    out = {}
    for label, volts in m.items():
        where = f"{key}.{label}"
        if not isinstance(label, str):
            c.fail(where, f"expected an orbital label such as HOMO or LUMO+1, got {label!r}")
        if name is not None:
            try:
                orbital_level(name, label)
            except ValueError as exc:
                c.fail(where, str(exc))
        out[label] = c.number(volts, where, lo=-10.0, hi=10.0)
    return out


def _spectra(c: _Ctx, value, placed: dict) -> SpectralModel:
    """The ``spectra:`` section plus the molecules' own ``energies``/``energy_V`` (``placed``:
    placement index -> {label: V} or V)."""
    d = c.mapping(
        value, "spectra", ("width_V", "shape", "levels_each_side", "midgap_V", "gap_scale", "charging_V", "energies")
    )
    kw: dict[str, Any] = {}
    if "width_V" in d:
        kw["width_V"] = c.number(d["width_V"], "spectra.width_V", lo=0.0, lo_open=True, hi=10.0)
    if "shape" in d:
        kw["shape"] = c.string(d["shape"], "spectra.shape", LINESHAPES)
    if "levels_each_side" in d:
        kw["levels_each_side"] = c.integer(d["levels_each_side"], "spectra.levels_each_side", lo=1, hi=20)
    for k, lo, hi, opened in (
        ("midgap_V", -10.0, 10.0, False),
        ("gap_scale", 0.0, 10.0, True),
        ("charging_V", 0.0, 10.0, False),
    ):
        if k in d:
            kw[k] = c.number(d[k], f"spectra.{k}", lo=lo, hi=hi, lo_open=opened)
    energies: dict = {}
    raw = d.get("energies") or {}
    if not isinstance(raw, dict):
        c.fail("spectra.energies", f"expected a mapping of molecule names to {{label: V}}, got {raw!r}")
    for name, levels in raw.items():
        key = f"spectra.energies.{name}"
        name = c.string(name, key, MOLECULE_NAMES)
        energies[name] = _energies(c, levels, key, name)
    energies.update(placed)
    try:
        return SpectralModel(energies=energies, **kw)
    except ValueError as exc:  # what the per-key checks above cannot see
        c.fail("spectra", str(exc))


def _molecules(c: _Ctx, raw, list_key: str, source: str, placed: dict, first: int = 0) -> list:
    """The placements of a ``molecules:`` list (``list_key`` names it in errors); a molecule's
    own level energies go into ``placed`` under its index over the whole scene (``first`` +
    its position in this list)."""
    if not isinstance(raw, list):
        c.fail(list_key, f"expected a list, got {raw!r}")
    if not raw:
        c.fail(list_key, "at least one molecule is needed (the model images molecules)")
    out: list = []
    for i, m in enumerate(raw):
        key = f"{list_key}[{i}]"
        m = c.mapping(
            m, key, ("molecule", "x_nm", "y_nm", "rotation_deg", "orbital", "cube", "mo", "energies", "energy_V")
        )
        where = {k: c.number(m.get(k, 0.0), f"{key}.{k}", lo=-1e4, hi=1e4) for k in ("x_nm", "y_nm")}
        where["rotation_deg"] = c.number(m.get("rotation_deg", 0.0), f"{key}.rotation_deg")
        if "cube" in m:
            if "energies" in m:
                c.fail(f"{key}.energies", "a cube orbital is one level: give energy_V: V")
            if "energy_V" in m:
                placed[first + i] = c.number(m["energy_V"], f"{key}.energy_V", lo=-10.0, hi=10.0)
            out.append(_cube_placement(c, m, key, source, where))
            continue
        if "mo" in m:
            c.fail(f"{key}.mo", "only for a cube entry (cube: FILE)")
        if "energy_V" in m:
            c.fail(f"{key}.energy_V", "only for a cube entry; a library molecule takes energies: {HOMO: V, ...}")
        if "molecule" not in m:
            c.fail(f"{key}.molecule", "missing (or give cube: FILE)")
        name = c.string(m["molecule"], f"{key}.molecule", MOLECULE_NAMES)
        orbital = m.get("orbital")
        if orbital is not None:
            orbital = c.string(orbital, f"{key}.orbital")
            base = orbital.split("+")[0].split("-")[0]
            if base not in ("HOMO", "LUMO"):
                c.fail(f"{key}.orbital", f"expected HOMO, LUMO, HOMO-n or LUMO+n, got {orbital!r}")
            try:
                orbital_level(name, orbital)
            except ValueError as exc:
                c.fail(f"{key}.orbital", str(exc))
        if "energies" in m:
            placed[first + i] = _energies(c, m["energies"], f"{key}.energies", name)
        out.append(Placement(molecule=name, orbital=orbital, **where))
    return out


def _areas(c: _Ctx, raw, source: str, placed: dict) -> tuple[Area, ...]:
    """The ``areas:`` section: each area's name, centre on the sample and molecules."""
    if not isinstance(raw, list) or not raw:
        c.fail(
            "areas", f"expected a non-empty list such as [{{name: A, x_nm: 0, y_nm: 0, molecules: [...]}}], got {raw!r}"
        )
    areas: list[Area] = []
    first = 0
    for i, a in enumerate(raw):
        key = f"areas[{i}]"
        if not isinstance(a, dict):
            c.fail(key, f"expected a mapping such as {{name: A, x_nm: 0, y_nm: 0, molecules: [...]}}, got {a!r}")
        c.mapping(a, key, ("name", "x_nm", "y_nm", "molecules"))
        if "molecules" not in a:
            c.fail(f"{key}.molecules", "missing (each area lists its molecules)")
        name = c.string(a.get("name", f"area{i}"), f"{key}.name")
        if any(name == other.name for other in areas):
            c.fail(f"{key}.name", f"{name!r} already names an earlier area")
        x, y = (c.number(a.get(k, 0.0), f"{key}.{k}", lo=-MAX_AREA_NM, hi=MAX_AREA_NM) for k in ("x_nm", "y_nm"))
        mols = _molecules(c, a["molecules"], f"{key}.molecules", source, placed, first)
        first += len(mols)
        areas.append(Area(name, x, y, tuple(mols)))
    return tuple(areas)


def parse_faults(data: Any, *, source: str = "<faults>") -> tuple[Fault, ...]:
    """Validate a scenario's ``faults:`` list (as loaded from YAML) into ``Fault``s."""
    c = _Ctx(source)
    if data is None:
        return ()
    if not isinstance(data, list):
        c.fail("faults", f"expected a list of faults, got {data!r}")
    return tuple(_fault(c, f, f"faults[{i}]") for i, f in enumerate(data))


def parse_scenario(data: Any, *, source: str = "<scenario>") -> Scenario:
    """Validate a mapping (as loaded from YAML) into a ``Scenario``."""
    c = _Ctx(source)
    top_keys = (
        "name",
        "description",
        "molecules",
        "areas",
        "substrate",
        "tip",
        "artifacts",
        "frame",
        "bias_V",
        "setpoint_A",
        "z_nm",
        "z_controller",
        "time_per_line_s",
        "channels",
        "faults",
        "spectra",
    )
    d = c.mapping(data, "<top>", top_keys)
    defaults = Scenario()

    placed: dict[int, Any] = {}  # placement index (over every area) -> its own level energies
    areas: tuple[Area, ...] = ()
    if "areas" in d:
        if "molecules" in d:
            c.fail("molecules", "with areas: each area lists its molecules (areas[i].molecules)")
        areas = _areas(c, d["areas"], source, placed)
        molecules = [replace(m, x_nm=m.x_nm + a.x_nm, y_nm=m.y_nm + a.y_nm) for a in areas for m in a.molecules]
    elif "molecules" in d:
        molecules = _molecules(c, d["molecules"], "molecules", source, placed)
    else:
        molecules = list(DEFAULT_MOLECULES)

    sub = c.mapping(d.get("substrate"), "substrate", ("corrugation", "lattice_nm", "angle_deg"))
    substrate = {}
    if "corrugation" in sub:
        substrate["corrugation"] = c.number(sub["corrugation"], "substrate.corrugation", lo=0.0, hi=1.0)
    if "lattice_nm" in sub:
        substrate["lattice_nm"] = c.number(sub["lattice_nm"], "substrate.lattice_nm", lo=0.0, lo_open=True, hi=10.0)
    if "angle_deg" in sub:
        substrate["angle_deg"] = c.number(sub["angle_deg"], "substrate.angle_deg")

    tip_names = tuple(TIP_PRESETS)
    tip_raw = d.get("tip", {})
    if isinstance(tip_raw, str):  # shorthand: just a preset name
        tip_raw = {"preset": tip_raw}
    t = c.mapping(
        tip_raw,
        "tip",
        ("preset", "events", "hazards", "instability_lines", "instability_jump", "recondition", "poke_threshold_m"),
    )
    tip = c.string(t.get("preset", defaults.tip), "tip.preset", tip_names)
    events = []
    raw_events = t.get("events", [])
    if not isinstance(raw_events, list):
        c.fail("tip.events", f"expected a list, got {raw_events!r}")
    for i, e in enumerate(raw_events):
        key = f"tip.events[{i}]"
        e = c.mapping(e, key, ("frame", "line", "to"))
        for req in ("frame", "line", "to"):
            if req not in e:
                c.fail(f"{key}.{req}", "missing")
        to = c.string(e["to"], f"{key}.to", tip_names + ("unstable",))
        events.append(
            TipEvent(c.integer(e["frame"], f"{key}.frame", lo=0), c.integer(e["line"], f"{key}.line", lo=0), to)
        )
    hazards = _probabilities(c, t.get("hazards"), "tip.hazards", tuple(TIP_HAZARDS))
    recondition = {}
    rec = c.mapping(t.get("recondition"), "tip.recondition", RECONDITION_ACTIONS)
    for action, probs in rec.items():
        recondition[action] = _probabilities(c, probs, f"tip.recondition.{action}", RECONDITION_OUTCOMES)
    evolution = TipEvolution(
        events=tuple(sorted(events, key=lambda e: (e.frame, e.line))),
        hazards=hazards,
        instability_lines=c.integer(t.get("instability_lines", 12), "tip.instability_lines", lo=1, hi=100000),
        instability_jump=c.number(t.get("instability_jump", 0.3), "tip.instability_jump", lo=0.0, hi=100.0),
        recondition=recondition,
        poke_threshold_m=c.number(t.get("poke_threshold_m", 1e-9), "tip.poke_threshold_m", lo=0.0, hi=1e-6),
    )

    a = c.mapping(d.get("artifacts"), "artifacts", ARTIFACT_NAMES)
    artifacts = ArtifactSpec(**{k: c.number(v, f"artifacts.{k}", lo=0.0, hi=100.0) for k, v in a.items()})
    if artifacts.spikes > 1.0:
        c.fail("artifacts.spikes", f"is a probability per pixel, must be <= 1, got {artifacts.spikes}")

    f = c.mapping(d.get("frame"), "frame", tuple(FrameSpec.__dataclass_fields__))
    fd = FrameSpec()
    frame = FrameSpec(
        center_x_nm=c.number(f.get("center_x_nm", fd.center_x_nm), "frame.center_x_nm", lo=-1e4, hi=1e4),
        center_y_nm=c.number(f.get("center_y_nm", fd.center_y_nm), "frame.center_y_nm", lo=-1e4, hi=1e4),
        width_nm=c.number(f.get("width_nm", fd.width_nm), "frame.width_nm", lo=0.0, lo_open=True, hi=1e4),
        height_nm=c.number(f.get("height_nm", fd.height_nm), "frame.height_nm", lo=0.0, lo_open=True, hi=1e4),
        angle_deg=c.number(f.get("angle_deg", fd.angle_deg), "frame.angle_deg", lo=-360.0, hi=360.0),
        pixels=c.integer(f.get("pixels", fd.pixels), "frame.pixels", lo=16, hi=2048),
        lines=c.integer(f.get("lines", fd.lines), "frame.lines", lo=1, hi=2048),
        direction=c.string(f.get("direction", fd.direction), "frame.direction", ("up", "down")),
    )
    if frame.pixels % 16:
        c.fail("frame.pixels", f"must be a multiple of 16 (Nanonis scans in 16-pixel packets), got {frame.pixels}")

    channels = d.get("channels", list(defaults.channels))
    if not isinstance(channels, list) or not channels:
        c.fail("channels", f"expected a non-empty list of signal indexes, got {channels!r}")
    channels = tuple(c.integer(v, f"channels[{i}]", lo=0, hi=127) for i, v in enumerate(channels))

    return Scenario(
        name=c.string(d.get("name", Path(source).stem if source != "<scenario>" else "custom"), "name"),
        description=c.string(d.get("description", ""), "description"),
        molecules=tuple(molecules),
        areas=areas,
        substrate=substrate,
        tip=tip,
        evolution=evolution,
        artifacts=artifacts,
        frame=frame,
        bias_V=c.number(d.get("bias_V", defaults.bias_V), "bias_V", lo=-10.0, hi=10.0),
        setpoint_A=c.number(d.get("setpoint_A", defaults.setpoint_A), "setpoint_A", lo=0.0, lo_open=True, hi=1e-6),
        z_nm=c.number(d.get("z_nm", defaults.z_nm), "z_nm", lo=0.1, hi=100.0),
        z_controller=c.boolean(d.get("z_controller", defaults.z_controller), "z_controller"),
        time_per_line_s=c.number(
            d.get("time_per_line_s", defaults.time_per_line_s), "time_per_line_s", lo=1e-4, hi=1e3
        ),
        channels=channels,
        faults=parse_faults(d.get("faults"), source=source),
        spectra=_spectra(c, d.get("spectra"), placed),
    )


def scenario_names() -> tuple[str, ...]:
    """Names of the scenarios shipped in ``stm_live/simulators/scenarios``."""
    folder = resources.files("stm_live.simulators") / "scenarios"
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


def load_scenario(path_or_name: str | Path | None = None) -> Scenario:
    """Load a scenario by shipped name ("default", "degrading") or YAML path."""
    if path_or_name is None:
        path_or_name = "default"
    if isinstance(path_or_name, Scenario):
        return path_or_name
    text_path = Path(path_or_name)
    if text_path.suffix not in (".yaml", ".yml") and not text_path.exists():
        shipped = resources.files("stm_live.simulators") / "scenarios" / f"{path_or_name}.yaml"
        if not shipped.is_file():
            raise ScenarioError(
                f"unknown scenario {str(path_or_name)!r}: not a file and not one of "
                f"the shipped scenarios ({', '.join(scenario_names())})"
            )
        text, source = shipped.read_text(encoding="utf-8"), f"{path_or_name}.yaml"
    else:
        try:
            text = text_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"{text_path}: cannot read scenario file ({exc.strerror})") from None
        source = str(text_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: not valid YAML: {exc}") from None
    return parse_scenario(data, source=source)
