"""ophyd device for bias spectroscopy (the Nanonis BiasSpectr module).

``BiasSpectroscopy`` is small and composable: as a component of a microscope device
(``spectroscopy = Cpt(BiasSpectroscopy, kind=Kind.omitted)`` in ``NanonisSTM``) it speaks
through the microscope's client, under its lock; on its own it takes that device,
``BiasSpectroscopy(stm=stm, name="spec")``. Its settings are real values on the controller
(``NanonisSignal``, limits checked before anything is sent); ``trigger()`` runs one
BiasSpectr.Start off the RunEngine loop (the reply follows the sweep), and ``read()`` gives
the sweep and every channel it returned.

Data keys (device ``spec``): ``spec_bias`` (the sweep, V), one array per channel and sweep
direction as the scan lines name them (``spec_current_fwd``, ``spec_li_demod_1_x_bwd``),
and the tip position of the sweep ``spec_x``, ``spec_y``, ``spec_z`` (m, the controller's
parameters). ``grid_points`` places a grid's points as Nanonis does (cell centres, the first
row at the bottom, x fastest).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus, Kind, Signal

from stm_live.devices.signals import NanonisSignal, channel_key, run_in_thread

__all__ = ["BiasSpectroscopy", "SweepSettings", "grid_points", "SWEEP_SIGNAL"]

SWEEP_SIGNAL = "Bias calc (V)"  # the sweep's row in a BiasSpectr.Start reply
_BWD = re.compile(r"\s*\[bwd\]", re.IGNORECASE)


def grid_points(frame: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """(ny, nx, 2) positions (m) of a Nanonis grid: ``frame`` = (centre x, centre y, width,
    height, angle deg clockwise), ``shape`` = (points in x, points in y). Points sit at the
    centres of the grid's cells; row 0 is the bottom row (Nanonis grids go up), x fastest:
    the order a grid experiment measures them in."""
    cx, cy, w, h, angle = (float(v) for v in frame)
    nx, ny = (int(n) for n in shape)
    if nx < 1 or ny < 1:
        raise ValueError(f"empty grid: {nx} x {ny} points")
    u = (np.arange(nx) + 0.5) / nx * w - w / 2
    v = -h / 2 + (np.arange(ny) + 0.5) / ny * h
    uu, vv = np.meshgrid(u, v)
    a = math.radians(angle)
    return np.stack([cx + uu * math.cos(a) + vv * math.sin(a), cy - uu * math.sin(a) + vv * math.cos(a)], -1)


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """BiasSpectr.PropsSet's fields (the controller's read-modify-write unit)."""

    save_all: int
    sweeps: int
    backward: int
    points: int
    z_offset: float
    autosave: int
    show_dialog: int


def _props(stm) -> SweepSettings:
    r = stm.client.call("BiasSpectr.PropsGet")
    z_offset = stm.client.call("BiasSpectr.TimingGet")["z_offset"]  # PropsGet does not return it
    get = r.get
    return SweepSettings(
        get("save_all", 0), r["sweeps"], r["backward"], r["points"], z_offset, get("autosave", 0), get("show_dialog", 0)
    )


def _props_set(stm, **changes) -> None:
    new = dataclasses.replace(_props(stm), **changes)
    # PropsSet: 1 = on, 2 = off for the flags; 0 = no change for counts
    flag = {
        "save_all": 1 + (not new.save_all),
        "backward": 1 + (not new.backward),
        "autosave": 1 + (not new.autosave),
        "show_dialog": 1 + (not new.show_dialog),
    }
    stm.client.call(
        "BiasSpectr.PropsSet",
        (
            flag["save_all"],
            int(new.sweeps),
            flag["backward"],
            int(new.points),
            float(new.z_offset),
            flag["autosave"],
            flag["show_dialog"],
        ),
    )


def _limit(field: str):
    def read(stm):
        return stm.client.call("BiasSpectr.LimitsGet")[field]

    def write(stm, value):
        limits = dict(stm.client.call("BiasSpectr.LimitsGet"), **{field: float(value)})
        stm.client.call("BiasSpectr.LimitsSet", (limits["start"], limits["end"]))

    return read, write


def _timing(field: str):
    def read(stm):
        return stm.client.call("BiasSpectr.TimingGet")[field]

    def write(stm, value):
        timing = dict(stm.client.call("BiasSpectr.TimingGet"), **{field: float(value)})
        stm.client.call("BiasSpectr.TimingSet", tuple(timing.values()))

    return read, write


def _points(stm, value) -> None:
    if int(value) < 2:
        raise ValueError(f"a bias sweep needs at least 2 points, got {value}")
    _props_set(stm, points=int(value))


def _cpt(read, write, units="", **kw):
    return Cpt(NanonisSignal, read=read, write=write, units=units, kind=Kind.config, **kw)


class BiasSpectroscopy(Device):
    """Bias spectroscopy at the tip (BiasSpectr): trigger → one sweep, read → its channels.

    Parameters
    ----------
    stm : NanonisSTM, optional
        The microscope whose client (and lock, limits) this uses; default: the device this
        one is a component of.
    """

    sweep_start = _cpt(*_limit("start"), units="V", check="check_bias")
    sweep_end = _cpt(*_limit("end"), units="V", check="check_bias")
    points = _cpt(lambda s: _props(s).points, _points)
    sweeps = _cpt(lambda s: _props(s).sweeps, lambda s, v: _props_set(s, sweeps=max(1, int(v))))
    backward = _cpt(lambda s: bool(_props(s).backward), lambda s, v: _props_set(s, backward=int(bool(v))))
    z_offset = _cpt(lambda s: _props(s).z_offset, lambda s, v: _props_set(s, z_offset=float(v)), units="m")
    settling = _cpt(*_timing("settling"), units="s")
    integration = _cpt(*_timing("integration"), units="s")
    channels = _cpt(
        lambda s: tuple(int(i) for i in s.client.call("BiasSpectr.ChsGet")["channel_indexes"]),
        lambda s, v: s.client.call("BiasSpectr.ChsSet", ([int(i) for i in v],)),
    )
    point_index = Cpt(Signal, value=-1, kind=Kind.hinted, doc="which point of a grid the sweep is (plans set it)")

    def __init__(self, prefix: str = "", *, stm=None, name: str, **kwargs):
        self._stm = stm
        super().__init__(prefix, name=name, **kwargs)
        self._data: dict[str, Any] | None = None
        self._layout: dict | None = None  # data key -> (shape, units) of the last sweep
        self._described: dict | None = None  # ... as describe() announced it to this run
        self._names: list[str] | None = None  # the controller's Signals.NamesGet
        self.reply_timeout_s: float | None = None  # None: estimated from the timing settings

    # -- the microscope this speaks through ------------------------------------------
    @property
    def stm(self):
        return self._stm if self._stm is not None else self.root

    # NanonisSignal speaks through its root: standalone, that is this device
    client = property(lambda self: self.stm.client)
    profile = property(lambda self: self.stm.profile)
    host = property(lambda self: self.stm.host)
    port = property(lambda self: self.stm.port)
    _lock = property(lambda self: self.stm._lock)

    # -- channels ------------------------------------------------------------------------
    def signal_names(self) -> list[str]:
        if self._names is None:
            with self.stm._lock:
                self._names = list(self.stm.client.signals_names_get())
        return self._names

    def channel_indexes(self, channels: Sequence[str] | Mapping[str, int]) -> dict[str, int]:
        """Channel names (the profile's, or the controller's signal names, unit optional,
        case ignored) -> RT signal indexes; ValueError naming an unknown one."""
        if isinstance(channels, Mapping):
            return {str(k): int(v) for k, v in channels.items()}
        known = {} if self.stm.profile is None else dict(self.stm.profile.channel_indexes)
        by_name = {_base(n).lower(): i for i, n in enumerate(self.signal_names())}
        out = {}
        for name in channels:
            if name in known:
                out[name] = known[name]
            elif _base(name).lower() in by_name:
                out[name] = by_name[_base(name).lower()]
            else:
                raise ValueError(
                    f"unknown channel {name!r}; the controller's signals include "
                    f"{', '.join(n for n in self.signal_names() if not n.startswith('Internal'))}"
                )
        return out

    # -- bluesky interface -------------------------------------------------------------
    def stage(self):
        self._layout = self._described = None
        return super().stage()

    def unstage(self):
        self._layout = self._described = None
        return super().unstage()

    def _expected_layout(self) -> dict:
        stm = self.stm
        with stm._lock:
            props = _props(stm)
            indexes = stm.client.call("BiasSpectr.ChsGet")["channel_indexes"]
            mls = stm.client.call("BiasSpectr.MLSModeGet")["mode"].rstrip("\x00") == "MLS"
            points = int(sum(stm.client.call("BiasSpectr.MLSValsGet")["steps"])) if mls else props.points
        names = [self.signal_names()[int(i)] for i in indexes]
        names += [_backward(n) for n in names] if props.backward else []
        return self._keys([SWEEP_SIGNAL, *names], points)

    def _keys(self, names: Sequence[str], points: int) -> dict[str, tuple[list[int], str]]:
        """Data key -> (shape, units) of sweeps returning channels ``names`` (the sweep first)."""
        out = {f"{self.name}_bias": ([points], "V")}
        for n in names[1:]:
            out[self.data_key(n)] = ([points], _unit(n))
        for p in ("x", "y", "z"):
            out[f"{self.name}_{p}"] = ([], "m")
        return out

    def data_key(self, channel: str) -> str:
        """The data key of a returned channel ("Current [bwd] (A)" -> ``spec_current_bwd``)."""
        direction = "backward" if _BWD.search(channel) else "forward"
        return channel_key(self.name, _base(_BWD.sub("", channel)), direction)

    def _estimate_s(self) -> float:
        """An upper bound on one sweep's duration (s): the controller's timing settings."""
        with self.stm._lock:
            t = self.stm.client.call("BiasSpectr.TimingGet")
            props = _props(self.stm)
        per_point = t["settling"] + t["integration"]
        return (
            t["z_avg_time"]
            + t["initial_settling"]
            + t["end_settling"]
            + t["z_control_time"]
            + 2.0
            + props.sweeps * (1 + props.backward) * props.points * per_point
        )

    def trigger(self) -> DeviceStatus:
        """Run one bias spectroscopy (BiasSpectr.Start, data returned) in a thread."""
        stm = self.stm
        timeout = stm.timeout + (self.reply_timeout_s if self.reply_timeout_s is not None else 2 * self._estimate_s())

        def run():
            with stm._lock:
                reply = stm.client.call("BiasSpectr.Start", (1, ""), read_timeout=timeout)
                params = stm.client.call("BiasSpectr.PropsGet")
            names, data = list(reply["channel_names"]), np.asarray(reply["data"])
            if not names or names[0] != SWEEP_SIGNAL or data.shape[0] != len(names):
                raise RuntimeError(
                    f"{self.name}: BiasSpectr.Start returned channels {names} for data of shape "
                    f"{data.shape}; expected {SWEEP_SIGNAL!r} first, one row each"
                )
            values = dict(zip([*params["fixed_parameters"], *params["parameters"]], map(float, reply["params"])))
            now = time.time()
            out = {f"{self.name}_bias": data[0].astype(np.float64)}
            for name, row in zip(names[1:], data[1:]):
                out[self.data_key(name)] = row.astype(np.float32)
            for p in ("X", "Y", "Z"):
                out[f"{self.name}_{p.lower()}"] = values.get(f"{p} (m)", math.nan)
            layout = self._keys(names, data.shape[1])
            if self._described is not None and layout != self._described:
                raise RuntimeError(
                    f"{self.name}: the sweep returned {sorted(layout)} ({data.shape[1]} points), not "
                    f"the {sorted(self._described)} of the run's first sweep; do not change the "
                    "sweep's channels or points within a run"
                )
            self._layout = layout
            self._data = {k: {"value": v, "timestamp": now} for k, v in out.items()}

        return run_in_thread(self, run)

    def read(self):
        out = super().read()  # point_index
        if self._data is None:
            raise RuntimeError(f"{self.name}: read before a sweep was triggered")
        out.update(self._data)
        return out

    def describe(self):
        out = super().describe()
        layout = self._layout if self._layout is not None else self._expected_layout()
        self._described = layout  # the run's events must keep to it
        src = f"nanonis://{self.stm.host}:{self.stm.port}/BiasSpectr.Start"
        bias = f"{self.name}_bias"
        for key, (shape, units) in layout.items():
            dtype = np.float64 if not shape or key == bias else np.float32
            out[key] = {
                "source": src,
                "dtype": "array" if shape else "number",
                "shape": shape,
                "dtype_numpy": np.dtype(dtype).str,
                "units": units,
            }
        return out


def _base(name: str) -> str:
    """ "Current (A)" -> "Current"."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", name).strip()


def _unit(name: str) -> str:
    """ "Current [bwd] (A)" -> "A"."""
    m = re.search(r"\(([^()]*)\)\s*$", name)
    return m.group(1) if m else ""


def _backward(name: str) -> str:
    """ "Current (A)" -> "Current [bwd] (A)"."""
    m = re.match(r"^(.*?)\s*(\([^()]*\))\s*$", name)
    return f"{m.group(1)} [bwd] {m.group(2)}" if m else f"{name} [bwd]"
