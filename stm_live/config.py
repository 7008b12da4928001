"""Controller profiles: YAML -> validated, typed settings, and the safety limits.

``load_profile("sim")`` reads ``stm_live/profiles/sim.yaml``; a path reads that file. Every
problem raises :class:`ProfileError` naming the file and the key path, e.g.
``limits.max_abs_bias_V: expected a number, got 'ten'``. Requests outside the limits raise
:class:`LimitError` naming the limit and the value; plans check before commanding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stm_live.devices.client import DEFAULT_MAX_OUTAGE_S
from stm_live.validation import finite

__all__ = [
    "Profile",
    "Limits",
    "ChannelSpec",
    "Recondition",
    "ReconditionAction",
    "Link",
    "ProfileError",
    "LimitError",
    "load_profile",
    "profile_path",
    "PROFILE_DIR",
    "TIP_POLICIES",
    "ACTION_KINDS",
]

PROFILE_DIR = Path(__file__).parent / "profiles"
TIP_POLICIES = ("off", "prompt", "auto")
# Parameters each recondition action takes: name -> (required, allowed range).
ACTION_KINDS: dict[str, dict[str, tuple[bool, tuple[float, float]]]] = {
    # Bias.Pulse: a short voltage pulse with the feedback held.
    "bias_pulse": {"bias_V": (True, (-10.0, 10.0)), "width_s": (True, (1e-4, 5.0))},
    # TipShaper: approach by depth_m (into the surface) at bias_V, wait, retract.
    "poke": {"depth_m": (True, (0.0, 5e-9)), "bias_V": (False, (-10.0, 10.0)), "lift_time_s": (False, (0.0, 10.0))},
}


class ProfileError(ValueError):
    """A profile file that is missing, malformed or outside sane ranges."""


class LimitError(ValueError):
    """A requested value outside the profile's safety limits."""


@dataclass(frozen=True)
class ChannelSpec:
    index: int
    units: str


@dataclass(frozen=True)
class Limits:
    max_abs_bias_V: float
    max_setpoint_A: float
    max_frame_size_m: float
    max_pixels: int
    center_x_range_m: tuple[float, float]  # allowed frame-centre range (the scan area)
    center_y_range_m: tuple[float, float]


@dataclass(frozen=True)
class ReconditionAction:
    kind: str  # one of ACTION_KINDS
    params: dict[str, float]


@dataclass(frozen=True)
class Recondition:
    clean_site_m: tuple[float, float]
    actions: tuple[ReconditionAction, ...]  # escalating: gentlest first
    max_attempts: int


@dataclass(frozen=True)
class Link:
    """What the acquisition does when the link to the controller stalls or drops."""

    # How long one outage may last while every connection reconnects on its own; past it
    # the frame ends "fail" with the reason, and the next frame starts afresh. 0: never
    # reconnect.
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S


MAX_OUTAGE_LIMIT_S = 3600.0


@dataclass(frozen=True)
class Profile:
    name: str
    host: str
    ports: list[int]
    timeout_s: float
    channels: dict[str, ChannelSpec]
    limits: Limits
    tip_policy: str
    recondition: Recondition
    link: Link = field(default_factory=Link)
    source: Path | None = field(default=None, compare=False)

    @property
    def port(self) -> int:
        """The main command port (the first)."""
        return self.ports[0]

    @property
    def channel_indexes(self) -> dict[str, int]:
        return {name: spec.index for name, spec in self.channels.items()}

    # -- limits ---------------------------------------------------------------------
    def check_bias(self, bias_V: float) -> float:
        v = _finite("bias", bias_V)
        if abs(v) > self.limits.max_abs_bias_V:
            raise LimitError(
                f"bias {v:g} V exceeds limits.max_abs_bias_V = {self.limits.max_abs_bias_V:g} V (profile {self.name!r})"
            )
        return v

    def check_setpoint(self, setpoint_A: float) -> float:
        v = _finite("setpoint", setpoint_A)
        if v <= 0 or v > self.limits.max_setpoint_A:
            raise LimitError(
                f"setpoint {v:g} A outside (0, limits.max_setpoint_A = "
                f"{self.limits.max_setpoint_A:g} A] (profile {self.name!r})"
            )
        return v

    def check_frame(self, center_x: float, center_y: float, width: float, height: float) -> None:
        """Frame in metres: size within max_frame_size_m, centre inside the scan area."""
        for label, v in (("width", width), ("height", height)):
            v = _finite(f"frame {label}", v)
            if v <= 0 or v > self.limits.max_frame_size_m:
                raise LimitError(
                    f"frame {label} {v:g} m outside (0, limits.max_frame_size_m = "
                    f"{self.limits.max_frame_size_m:g} m] (profile {self.name!r})"
                )
        for label, v, (lo, hi) in (
            ("x", center_x, self.limits.center_x_range_m),
            ("y", center_y, self.limits.center_y_range_m),
        ):
            v = _finite(f"frame centre {label}", v)
            if not lo <= v <= hi:
                raise LimitError(
                    f"frame centre {label} {v:g} m outside "
                    f"limits.scan_area.{label}_m = [{lo:g}, {hi:g}] m "
                    f"(profile {self.name!r})"
                )

    def check_pixels(self, pixels: int, lines: int) -> None:
        for label, v in (("pixels", pixels), ("lines", lines)):
            if isinstance(v, bool) or int(v) != v or not 1 <= int(v) <= self.limits.max_pixels:
                raise LimitError(
                    f"{label} {v!r} outside [1, limits.max_pixels = {self.limits.max_pixels}] (profile {self.name!r})"
                )

    def check_site(self, x: float, y: float, *, away_from: tuple[float, float, float, float] | None = None) -> None:
        """A tip-conditioning site: inside the scan area and, given ``away_from`` =
        (center_x, center_y, width, height) of the imaged frame, outside that frame."""
        x, y = _finite("site x", x), _finite("site y", y)
        for label, v, (lo, hi) in (("x", x, self.limits.center_x_range_m), ("y", y, self.limits.center_y_range_m)):
            if not lo <= v <= hi:
                raise LimitError(
                    f"site {label} {v:g} m outside limits.scan_area.{label}_m = "
                    f"[{lo:g}, {hi:g}] m (profile {self.name!r})"
                )
        if away_from is not None:
            cx, cy, w, h = (float(a) for a in away_from)
            # Axis-aligned bound of the frame; a rotated frame fits inside its half-diagonal.
            if abs(x - cx) <= w / 2 and abs(y - cy) <= h / 2:
                raise LimitError(
                    f"site ({x:g}, {y:g}) m lies inside the imaged frame centred "
                    f"({cx:g}, {cy:g}) m, {w:g} x {h:g} m; poking there would "
                    "damage the area being measured"
                )


def _finite(label: str, value: Any) -> float:
    return finite(label, value, LimitError)


# ------------------------------------------------------------------------------ loading


def profile_path(path_or_name: str | os.PathLike) -> Path:
    """A bare name (no suffix, no slash) is a shipped profile; anything else a path."""
    text = os.fspath(path_or_name)
    if os.sep not in text and "/" not in text and not text.endswith((".yaml", ".yml")):
        return PROFILE_DIR / f"{text}.yaml"
    return Path(text)


def load_profile(path_or_name: str | os.PathLike = "sim") -> Profile:
    """Load and validate a profile. Raises :class:`ProfileError` naming file and key."""
    path = profile_path(path_or_name)
    if not path.is_file():
        shipped = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(
            f"profile {os.fspath(path_or_name)!r} not found (looked for {path}); shipped profiles: {shipped}"
        )
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    try:
        return _build(doc, path)
    except _Bad as exc:
        raise ProfileError(f"{path}: {exc}") from None


class _Bad(Exception):
    pass


def _where(key: str, msg: str) -> _Bad:
    return _Bad(f"{key}: {msg}" if key else msg)


def _mapping(value: Any, key: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise _where(key, f"expected a mapping, got {_show(value)}")
    unknown = set(value) - required - set(optional)
    if unknown:
        name = sorted(map(str, unknown))[0]
        allowed = ", ".join(sorted(required | set(optional)))
        raise _where(f"{key}.{name}" if key else name, f"unknown key (allowed: {allowed})")
    missing = required - set(value)
    if missing:
        name = sorted(missing)[0]
        raise _where(f"{key}.{name}" if key else name, "missing")
    return value


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _number(value: Any, key: str, lo: float | None = None, hi: float | None = None, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # PyYAML reads '1e-9' (no dot) as a string: accept what float() accepts.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _where(key, f"expected a number, got {value!r}") from None
        else:
            raise _where(key, f"expected a number, got {_show(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise _where(key, f"expected a finite number, got {v}")
    if positive and v <= 0:
        raise _where(key, f"must be > 0, got {v:g}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _where(key, f"{v:g} outside the allowed range [{lo:g}, {hi:g}]")
    return v


def _integer(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _where(key, f"expected an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise _where(key, f"{value} outside the allowed range [{lo}, {hi}]")
    return value


def _string(value: Any, key: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise _where(key, f"expected a non-empty string, got {_show(value)}")
    if choices is not None and value not in choices:
        raise _where(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _pair(value: Any, key: str, names: tuple[str, str], check: Callable) -> tuple:
    m = _mapping(value, key, set(names))
    return tuple(check(m[n], f"{key}.{n}") for n in names)


def _build(doc: Any, path: Path) -> Profile:
    top = _mapping(
        doc, "", {"name", "host", "ports", "channels", "limits", "recondition"}, {"timeout_s", "tip_policy", "link"}
    )
    name = _string(top["name"], "name")
    host = _string(top["host"], "host")
    ports = top["ports"]
    if not isinstance(ports, list) or not 1 <= len(ports) <= 4:
        raise _where("ports", f"expected a list of 1 to 4 port numbers, got {_show(ports)}")
    ports = [_integer(p, f"ports[{i}]", 1, 65535) for i, p in enumerate(ports)]
    if len(set(ports)) != len(ports):
        raise _where("ports", f"ports must differ, got {ports}")
    timeout_s = _number(top.get("timeout_s", 5.0), "timeout_s", 0.01, 600.0)

    chans = top["channels"]
    if not isinstance(chans, dict) or not chans:
        raise _where("channels", f"expected a non-empty mapping of name -> {{index, units}}, got {_show(chans)}")
    channels = {}
    for cname, spec in chans.items():
        key = f"channels.{cname}"
        spec = _mapping(spec, key, {"index", "units"})
        channels[str(cname)] = ChannelSpec(
            index=_integer(spec["index"], f"{key}.index", 0, 1023), units=_string(spec["units"], f"{key}.units")
        )
    indexes = [c.index for c in channels.values()]
    if len(set(indexes)) != len(indexes):
        raise _where("channels", f"two channels share a signal index: {indexes}")

    lim = _mapping(
        top["limits"], "limits", {"max_abs_bias_V", "max_setpoint_A", "max_frame_size_m", "max_pixels", "scan_area"}
    )
    area = _mapping(lim["scan_area"], "limits.scan_area", {"x_m", "y_m"})
    ranges = []
    for axis in ("x_m", "y_m"):
        key = f"limits.scan_area.{axis}"
        r = area[axis]
        if not isinstance(r, list) or len(r) != 2:
            raise _where(key, f"expected [min, max] in metres, got {_show(r)}")
        lo, hi = (_number(v, f"{key}[{i}]", -1e-3, 1e-3) for i, v in enumerate(r))
        if lo >= hi:
            raise _where(key, f"min {lo:g} must be below max {hi:g}")
        ranges.append((lo, hi))
    limits = Limits(
        max_abs_bias_V=_number(lim["max_abs_bias_V"], "limits.max_abs_bias_V", 0.0, 10.0, positive=True),
        max_setpoint_A=_number(lim["max_setpoint_A"], "limits.max_setpoint_A", 0.0, 1e-6, positive=True),
        max_frame_size_m=_number(lim["max_frame_size_m"], "limits.max_frame_size_m", 0.0, 1e-4, positive=True),
        max_pixels=_integer(lim["max_pixels"], "limits.max_pixels", 1, 16384),
        center_x_range_m=ranges[0],
        center_y_range_m=ranges[1],
    )

    tip_policy = _string(top.get("tip_policy", "prompt"), "tip_policy", TIP_POLICIES)

    rec = _mapping(top["recondition"], "recondition", {"clean_site", "actions", "max_attempts"})
    site = _pair(rec["clean_site"], "recondition.clean_site", ("x_m", "y_m"), lambda v, k: _number(v, k, -1e-3, 1e-3))
    for label, v, (lo, hi) in (("x_m", site[0], ranges[0]), ("y_m", site[1], ranges[1])):
        if not lo <= v <= hi:
            raise _where(
                f"recondition.clean_site.{label}", f"{v:g} m lies outside limits.scan_area.{label} [{lo:g}, {hi:g}]"
            )
    acts = rec["actions"]
    if not isinstance(acts, list) or not acts:
        raise _where("recondition.actions", f"expected a non-empty list, got {_show(acts)}")
    actions = []
    for i, act in enumerate(acts):
        key = f"recondition.actions[{i}]"
        if not isinstance(act, dict) or "kind" not in act:
            raise _where(key, f"expected a mapping with a 'kind', got {_show(act)}")
        kind = _string(act["kind"], f"{key}.kind", tuple(ACTION_KINDS))
        spec = ACTION_KINDS[kind]
        _mapping(
            act,
            key,
            {"kind"} | {p for p, (req, _) in spec.items() if req},
            {p for p, (req, _) in spec.items() if not req},
        )
        params = {p: _number(act[p], f"{key}.{p}", *spec[p][1]) for p in spec if p in act}
        if "bias_V" in params and abs(params["bias_V"]) > limits.max_abs_bias_V:
            raise _where(
                f"{key}.bias_V", f"{params['bias_V']:g} V exceeds limits.max_abs_bias_V = {limits.max_abs_bias_V:g} V"
            )
        actions.append(ReconditionAction(kind=kind, params=params))
    recondition = Recondition(
        clean_site_m=site,
        actions=tuple(actions),
        max_attempts=_integer(rec["max_attempts"], "recondition.max_attempts", 1, 100),
    )

    link = _mapping(top.get("link", {}), "link", set(), {"max_outage_s"})
    link = Link(
        max_outage_s=_number(link.get("max_outage_s", Link.max_outage_s), "link.max_outage_s", 0.0, MAX_OUTAGE_LIMIT_S)
    )

    return Profile(
        name=name,
        host=host,
        ports=ports,
        timeout_s=timeout_s,
        channels=channels,
        limits=limits,
        tip_policy=tip_policy,
        recondition=recondition,
        link=link,
        source=path,
    )
