"""State of the Nanonis modules beyond bias / Z / scan / tip (NANONIS_PROTOCOL_EXT.md §3).

Two kinds of command live here:

* **Plain** Get/Set pairs of module settings (``PLAIN``: command -> state group). One
  mechanism serves all of them: a Set writes the request fields of the same name into the
  group (after the checks in ``CHECKS``: a range, or a "no change" enum shift), the Get
  returns them. Groups indexed by a 1-based unit (LockIn modulators, UserOut outputs) keep
  one dict per unit.
* **Handlers** (``HANDLERS``: command -> function(ctrl, state, **request) -> reply dict) for
  commands that touch the controller's physics (bias, Z, piezo range, motor, tip position)
  or keep lists (Marks, Pattern cloud, backgrounds).
* **Spectroscopy** (at the end): BiasSpectr.Start sweeps at the tip (``SweepPlan``: the
  settings, measured through ``spectra``; a .dat in the session folder), Pattern.ExpStart
  runs ``PatternExperiment`` (a sweep at each point, a .3ds at the end).

Everything runs on the server's controller thread under the controller lock, so handlers
may read and write controller attributes directly. Values out of range raise
``ControllerError``; its text is the reply's error section.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stm_live.io.spectroscopy import SpectroscopyFileError, make_grid, make_spectrum, split_unit, write_3ds, write_dat
from stm_live.io.sxm import nanonis_float
from stm_live.simulators import artifacts
from stm_live.simulators.imaging import ScanFrame
from stm_live.simulators.renderer import (
    BIAS_INDEX,
    CURRENT_INDEX,
    LI_X_INDEX,
    LI_Y_INDEX,
    X_INDEX,
    Y_INDEX,
    Z_INDEX,
    lockin_outputs,
    submit_or_run,
)
from stm_live.simulators.vacuum import KAPPA_PER_NM

log = logging.getLogger(__name__)

__all__ = [
    "CHECKS",
    "DEFAULTS",
    "FIXED_PARAMETERS",
    "HANDLERS",
    "HEADER_PARAMETERS",
    "PARAMETERS",
    "PLAIN",
    "SWEEP_SIGNAL",
    "Z_TOP_M",
    "ControllerError",
    "ModuleState",
    "PatternExperiment",
    "SweepPlan",
    "backward_name",
    "bias_spectr_start",
    "drift_offset",
    "experiment_tick",
    "header_parameters",
    "osci_traces",
    "sweep_plan",
]


class ControllerError(ValueError):
    """A command the controller refuses; its text goes into the reply's error section."""


# -------------------------------------------------------------- plain settings (data)

_MOD = {"on": 0, "signal": 24, "phase_register": 1, "harmonic": 1, "phase": 0.0, "amplitude": 0.01}
_DEMOD = {
    "signal": 0,
    "harmonic": 1,
    "order": 0,
    "cutoff": 100.0,
    "phase_register": 1,
    "phase": 0.0,
    "sync_filter": 0,
    "rt_signals": 0,
}
_USEROUT = {
    "mode": 0,
    "signal": 0,
    "value": 0.0,
    "calibration": 1.0,
    "offset": 0.0,
    "name": "",
    "signal_1": 0,
    "operation": 0,
    "signal_2": 0,
}
N_MODULATORS, N_DEMODULATORS, N_OUTPUTS = 2, 2, 8
Z_TOP_M = 200e-9  # top of the simulated piezo range (withdrawn)
Z_GAIN = (0.1, 1e-4)  # default Z-loop P gain and time constant (s): I = P/T; today's images
MOTOR_FREQUENCY_HZ, MOTOR_AMPLITUDE_V = 1000.0, 100.0  # default coarse step frequency and amplitude

DEFAULTS: dict[str, Any] = {
    "zctrl.switch_off_delay": {"delay": 0.0},
    "zctrl.tip_lift": {"tip_lift": 0.0},
    "zctrl.withdraw_rate": {"slew_rate": 1e-6},
    "zctrl.limits_enabled": {"enabled": 0},
    "folme.ps_on": {"enabled": 0},
    "folme.ps_props": {
        "auto_resume": 1,
        "own_basename": 0,
        "basename": "PointShoot",
        "external_vi": "",
        "pre_delay": 0.0,
    },
    "piezo.tilt": {"tilt_x": 0.0, "tilt_y": 0.0},
    "piezo.calibr": {"calib_x": 1e-9, "calib_y": 1e-9, "calib_z": 0.5e-9},
    "piezo.hva_info": {
        "gain_aux": 1.0,
        "gain_x": 15.0,
        "gain_y": 15.0,
        "gain_z": 15.0,
        "xy_enabled": 1,
        "z_enabled": 1,
        "aux_enabled": 0,
    },
    "piezo.hva_leds": {"overheated": 0, "hv_supply": 1, "high_temperature": 0, "output_connector": 1},
    "piezo.xyz_limits": {
        "enable": 0,
        "x_low": -10.0,
        "x_high": 10.0,
        "y_low": -10.0,
        "y_high": 10.0,
        "z_low": -10.0,
        "z_high": 10.0,
    },
    "piezo.hyst_on": {"on": 0},
    "piezo.hyst_vals": {k: np.zeros(0, np.float32) for k in ("fast_x", "fast_y", "slow_x", "slow_y")},
    "bs.adv": {"reset_bias": 1, "z_hold": 1, "record_final_z": 0, "lockin_run": 0},
    "bs.limits": {"start": -1.0, "end": 1.0},
    "bs.timing": {
        "z_avg_time": 0.1,
        "z_offset": 0.0,
        "initial_settling": 0.01,
        "max_slew_rate": 10.0,
        "settling": 0.002,
        "integration": 0.01,
        "end_settling": 0.01,
        "z_control_time": 0.1,
    },
    "bs.dig_sync": {"mode": 0},
    "bs.ttl": {"enable": 0, "line": 0, "polarity": 1, "time_to_on": 0.0, "on_duration": 0.001},
    "bs.pulse_seq": {"sequence": 1, "periods": 1},
    "bs.alt_z": {"enable": 0, "setpoint": 100e-12, "settling_time": 0.1},
    "bs.zoff_revert": {"revert": 1},
    "bs.mls_per_seg": {"per_segment": 0},
    "bs.mls_mode": {"mode": "Linear"},
    "bs.mls_vals": {
        "bias_start": np.array([-1.0], np.float32),
        "bias_end": np.array([1.0], np.float32),
        "initial_settling": np.array([0.01], np.float32),
        "settling": np.array([0.002], np.float32),
        "integration": np.array([0.01], np.float32),
        "steps": np.array([128], np.int32),
        "lockin_run": np.array([0], np.uint32),
    },
    "bs.safe1": {"action": 0, "threshold": 1e-8, "signal": 0, "comparison": 0},
    "bs.safe2": {"logic": 0, "threshold": 1e-8, "signal": 0, "comparison": 0},
    "signals.meas_names": {"names": ["Current (A)", "Bias (V)", "Z (m)", "LI Demod 1 X (A)", "LI Demod 1 Y (A)"]},
    "safetip.on": {"on": 0},
    "safetip.props": {"auto_recovery": 0, "auto_pause_scan": 1, "threshold": 50e-9},
    "util.rt_freq": {"frequency": 20000.0},
    "util.acq_period": {"period": 0.02},
    "util.rt_oversampl": {"oversampling": 10},
    "osci.chs": {"channel_a": 0, "channel_b": 30},
    "osci.oversampl": {"index": 0},
    "osci.trig": {"mode": 0, "channel": 0, "slope": 1, "level": 0.0, "hysteresis": 0.0, "position": 0.0},
    # indexed (1-based unit -> dict)
    "lockin.mod": {i: dict(_MOD) for i in range(1, N_MODULATORS + 1)},
    "lockin.demod": {i: dict(_DEMOD) for i in range(1, N_DEMODULATORS + 1)},
    "lockin.freq": {i: {"frequency": 973.0} for i in range(1, 9)},
    "userout": {i: dict(_USEROUT) for i in range(1, N_OUTPUTS + 1)},
}
INDEX_FIELDS = {
    "lockin.mod": "modulator",
    "lockin.demod": "demodulator",
    "lockin.freq": "modulator",
    "userout": "output",
}

# Set-side checks per field: (lo, hi) range; "nc12": 0 no change, 1 -> 1, 2 -> 0 (Set/Get shift);
# "shift": 0 no change, k -> k-1; "nc0": 0 no change; "nc-1": -1 no change; "ncnan": NaN no change;
# "nc2": 2 no change; a tuple of strings: allowed values.
_RT = (0, 127)
CHECKS: dict[str, dict[str, Any]] = {
    "zctrl.switch_off_delay": {"delay": (0.0, 10.0)},
    "zctrl.tip_lift": {"tip_lift": (-Z_TOP_M, Z_TOP_M)},
    "zctrl.withdraw_rate": {"slew_rate": (1e-12, 1e-3)},
    "zctrl.limits_enabled": {"enabled": (0, 1)},
    "folme.ps_on": {"enabled": (0, 1)},
    "folme.ps_props": {"auto_resume": "nc12", "own_basename": "nc12", "pre_delay": (0.0, 1e3)},
    "piezo.tilt": {"tilt_x": (-45.0, 45.0), "tilt_y": (-45.0, 45.0)},
    "piezo.xyz_limits": {"enable": "nc12", **{k: (-10.0, 10.0) for k in DEFAULTS["piezo.xyz_limits"] if k != "enable"}},
    "piezo.hyst_on": {"on": (0, 1)},
    "bs.adv": {k: "nc12" for k in DEFAULTS["bs.adv"]},
    "bs.limits": {"start": (-10.0, 10.0), "end": (-10.0, 10.0)},
    "bs.timing": {k: (-1e-6, 1e3) if k == "z_offset" else (0.0, 1e3) for k in DEFAULTS["bs.timing"]},
    "bs.dig_sync": {"mode": "shift"},
    "bs.ttl": {
        "enable": "nc12",
        "line": "shift",
        "polarity": "shift",
        "time_to_on": (0.0, 10.0),
        "on_duration": (0.0, 10.0),
    },
    "bs.pulse_seq": {"sequence": "nc0"},
    "bs.alt_z": {"enable": "nc12", "settling_time": (0.0, 1e3)},
    "bs.zoff_revert": {"revert": "nc12"},
    "bs.mls_per_seg": {"per_segment": (0, 1)},
    "bs.mls_mode": {"mode": ("Linear", "MLS")},
    "bs.safe1": {"action": "shift", "threshold": "ncnan", "signal": "nc-1", "comparison": "nc2"},
    "bs.safe2": {"logic": "nc-1", "threshold": "ncnan", "signal": "nc-1", "comparison": "nc2"},
    "safetip.on": {"on": "nc12"},
    "safetip.props": {"auto_recovery": (0, 1), "auto_pause_scan": (0, 1)},
    "util.rt_freq": {"frequency": (1e3, 1e6)},
    "util.acq_period": {"period": (1e-3, 10.0)},
    "util.rt_oversampl": {"oversampling": (1, 1000)},
    "osci.chs": {"channel_a": _RT, "channel_b": _RT},
    "osci.oversampl": {"index": (0, 5)},
    "osci.trig": {"mode": (0, 2), "channel": (0, 1), "slope": (0, 1), "position": (0.0, 10.0)},
    "lockin.mod": {
        "on": (0, 1),
        "signal": _RT,
        "phase_register": (1, 8),
        "harmonic": (1, 64),
        "amplitude": (0.0, 10.0),
    },
    "lockin.demod": {
        "signal": _RT,
        "harmonic": (1, 64),
        "order": (0, 8),
        "cutoff": (0.0, 1e6),
        "phase_register": (1, 8),
        "sync_filter": (0, 1),
        "rt_signals": (0, 1),
    },
    "lockin.freq": {"frequency": (0.0, 1e7)},
    "userout": {"mode": (0, 2), "signal": _RT, "signal_1": _RT, "operation": (0, 6), "signal_2": _RT},
}

_MLS_MAX = 16


def _plain_table() -> dict[str, str]:
    pairs = {
        "ZCtrl.SwitchOffDelay": "zctrl.switch_off_delay",
        "ZCtrl.TipLift": "zctrl.tip_lift",
        "ZCtrl.WithdrawRate": "zctrl.withdraw_rate",
        "ZCtrl.LimitsEnabled": "zctrl.limits_enabled",
        "FolMe.PSOnOff": "folme.ps_on",
        "FolMe.PSProps": "folme.ps_props",
        "Piezo.Tilt": "piezo.tilt",
        "Piezo.XYZLimits": "piezo.xyz_limits",
        "Piezo.HystOnOff": "piezo.hyst_on",
        "Piezo.HystVals": "piezo.hyst_vals",
        "BiasSpectr.AdvProps": "bs.adv",
        "BiasSpectr.Limits": "bs.limits",
        "BiasSpectr.Timing": "bs.timing",
        "BiasSpectr.DigSync": "bs.dig_sync",
        "BiasSpectr.TTLSync": "bs.ttl",
        "BiasSpectr.PulseSeqSync": "bs.pulse_seq",
        "BiasSpectr.AltZCtrl": "bs.alt_z",
        "BiasSpectr.ZOffRevert": "bs.zoff_revert",
        "BiasSpectr.MLSLockinPerSeg": "bs.mls_per_seg",
        "BiasSpectr.MLSMode": "bs.mls_mode",
        "BiasSpectr.MLSVals": "bs.mls_vals",
        "BiasSpectr.SafeCond1": "bs.safe1",
        "BiasSpectr.SafeCond2": "bs.safe2",
        "SafeTip.OnOff": "safetip.on",
        "SafeTip.Props": "safetip.props",
        "Util.RTFreq": "util.rt_freq",
        "Util.AcqPeriod": "util.acq_period",
        "Util.RTOversampl": "util.rt_oversampl",
        "Osci2T.Chs": "osci.chs",
        "Osci2T.Oversampl": "osci.oversampl",
        "Osci2T.Trig": "osci.trig",
        "LockIn.ModPhasFreq": "lockin.freq",
        "UserOut.Mode": "userout",
        "UserOut.MonitorCh": "userout",
        "UserOut.CalcSignalName": "userout",
        "UserOut.CalcSignalConfig": "userout",
    }
    for what in ("OnOff", "Signal", "PhasReg", "Harmonic", "Phas", "Amp"):
        pairs[f"LockIn.Mod{what}"] = "lockin.mod"
    for what in ("Signal", "Harmonic", "HPFilter", "LPFilter", "PhasReg", "Phas", "SyncFilter", "RTSignals"):
        pairs[f"LockIn.Demod{what}"] = "lockin.demod"
    out = {}
    for stem, group in pairs.items():
        out[stem + "Set"] = group
        out[stem + "Get"] = group
    # sets without a Get and read-only Gets
    out.update(
        {
            "UserOut.ValSet": "userout",
            "UserOut.CalibrSet": "userout",
            "Piezo.CalibrGet": "piezo.calibr",
            "Piezo.HVAInfoGet": "piezo.hva_info",
            "Piezo.HVAStatusLEDGet": "piezo.hva_leds",
            "Signals.MeasNamesGet": "signals.meas_names",
        }
    )
    return out


PLAIN: dict[str, str] = _plain_table()
# HPFilter / LPFilter share field names (order, cutoff) but are separate settings.
_FIELD_PREFIX = {"LockIn.DemodHPFilter": "hp_", "LockIn.DemodLPFilter": "lp_"}
for _u in DEFAULTS["lockin.demod"].values():
    _u.update(hp_order=0, hp_cutoff=1.0, lp_order=4, lp_cutoff=100.0)
for _k in ("order", "cutoff"):
    for _p in ("hp_", "lp_"):
        CHECKS["lockin.demod"][_p + _k] = CHECKS["lockin.demod"][_k]


def _check(group: str, field: str, value, old):
    """The value to store for a Set field, or ``old`` when the Set means "no change"."""
    rule = CHECKS.get(group, {}).get(field)
    if isinstance(value, float) and not math.isfinite(value) and rule != "ncnan":
        raise ControllerError(f"{field}: {value} is not a finite number")
    if rule is None:
        return value
    if rule == "nc12":
        if value not in (0, 1, 2):
            raise ControllerError(f"{field}: {value} outside 0 (no change), 1 (on), 2 (off)")
        return old if value == 0 else int(value == 1)
    if rule == "shift":
        if value < 0 or value > 8:
            raise ControllerError(f"{field}: {value} outside the documented values")
        return old if value == 0 else value - 1
    if rule == "nc0":
        return old if value == 0 else value
    if rule == "nc-1":
        return old if value == -1 else value
    if rule == "ncnan":
        return old if isinstance(value, float) and math.isnan(value) else value
    if rule == "nc2":
        if value not in (0, 1, 2):
            raise ControllerError(f"{field}: {value} outside 0, 1, 2 (no change)")
        return old if value == 2 else value
    if isinstance(rule, tuple) and rule and isinstance(rule[0], str):
        if value not in rule:
            raise ControllerError(f"{field}: {value!r} is not one of {list(rule)}")
        return value
    lo, hi = rule
    if not lo <= value <= hi:
        raise ControllerError(f"{field}: {value} outside [{lo}, {hi}]")
    return value


class ModuleState:
    """Module settings of one simulated controller (a deep copy of ``DEFAULTS`` plus lists)."""

    def __init__(self):
        self.plain: dict[str, Any] = copy.deepcopy(DEFAULTS)
        self.bias_ranges = ["+-10 V", "+-1 V"]
        self.bias_range = 0
        self.bias_calibr = [[1.0, 0.0], [0.1, 0.0]]  # per range
        self.gains = ["10^6", "10^7", "10^8", "10^9", "10^10"]
        self.gain_index = 3
        self.filters: list[str] = []  # only the Basel SP 983c has filters
        self.filter_index = 0
        self.current_calibr = [[10.0 ** -(6 + i), 0.0] for i in range(len(self.gains))]
        self.z_gain = list(Z_GAIN)  # P, time constant (I = P/T)
        self.z_home_mode = 0
        self.controllers = ["log Current", "Current"]
        self.active_controller = 0
        self.z_limits = [Z_TOP_M, 0.0]  # high, low (m)
        self.piezo_range = [10e-6, 10e-6, Z_TOP_M]
        self.piezo_gain = 15.0  # HV amplifier gain: range = sens * 10 V * gain
        self.drift = {"on": 0, "v": [0.0, 0.0, 0.0], "saturation_limit": 10.0, "since": 0.0, "offset": [0.0] * 3}
        self.motor_counters = [0, 0, 0]
        self.motor_freq_amp = {axis: [MOTOR_FREQUENCY_HZ, MOTOR_AMPLITUDE_V] for axis in (1, 2, 3)}
        self.approach = 0
        self.folme_oversampling = 1
        self.ps_experiment = 0
        # the experiment names nanonisTCP accepts (Pattern.PropsSet validates them client-side)
        self.experiments = [
            "Bias Spectroscopy ASCII",
            "Bias Spectroscopy BINARY",
            "Bias Sweep",
            "Generic Sweep",
            "Z Spectroscopy ASCII",
            "Z Spectroscopy BINARY",
            "Approach-Retract",
            "DIO Trigger",
            "External VI...",
        ]
        self.pattern = {
            "active": 1,
            "grid": [5, 5, 0.0, 0.0, 10e-9, 10e-9, 0.0],
            "line": [10, -5e-9, 0.0, 5e-9, 0.0],
            "cloud": (np.zeros(0, np.float32), np.zeros(0, np.float32)),
            "experiment": "Bias Spectroscopy ASCII",
            "basename": "Grid",
            "external_vi": "",
            "pre_delay": 0.0,
            "save_scan_channels": 0,
            "open": 0,
            "running": 0,
            "paused": 0,
        }
        self.points: list[list] = []  # x, y, text, colour, visible
        self.lines: list[list] = []  # x0, y0, x1, y1, colour, visible
        self.backgrounds: list[dict] = []
        self.bs = {
            "open": 0,
            "running": 0,
            "channels": [0],
            "save_all": 0,
            "sweeps": 1,
            "backward": 0,
            "points": 256,
            "autosave": 1,
            "show_dialog": 0,
            "basename": "Bias-Spectroscopy",
        }
        self.add_rt = [0, 1]
        self.add_rt_names = ["Internal 23 source: none", "LI Demod 1 R", "LI Demod 1 Phi", "Current (A)"]
        self.tiprec_size = 1000
        self.tiprec_channels = [0, 30]
        self.tiprec_data: list[list[float]] = []
        self.userout_limits = {(i, raw): [10.0, -10.0] for i in range(1, N_OUTPUTS + 1) for raw in (0, 1)}
        self.locked = 0
        self.osci_timebase = 3
        self.osci_running = 0
        self.settings_files: list[str] = []
        self.experiment: PatternExperiment | None = None  # the Pattern experiment under way
        self.experiments_started = 0
        self.last_experiment_path = ""  # the .3ds of the last experiment that ended
        self.last_experiment_grid = None  # ... and the io.spectroscopy.Grid written there

    # ----------------------------------------------------------------- plain Get/Set

    def plain_unit(self, group: str, args: dict) -> dict:
        data = self.plain[group]
        index_field = INDEX_FIELDS.get(group)
        if index_field is None:
            return data
        unit = args.pop(index_field)
        if unit not in data:
            raise ControllerError(f"{index_field} {unit} outside 1..{len(data)}")
        return data[unit]

    def plain_set(self, name: str, args: dict) -> None:
        group = PLAIN[name]
        unit = self.plain_unit(group, args)
        prefix = _FIELD_PREFIX.get(name[:-3], "")
        new = dict(unit)
        if group == "bs.mls_vals" and len(args["bias_start"]) > _MLS_MAX:  # extra segments ignored
            args = {k: v[:_MLS_MAX] for k, v in args.items()}
        for field, value in args.items():
            key = prefix + field
            new[key] = _check(group, key, value, unit.get(key))
        unit.update(new)  # all fields checked before any is stored

    def plain_get(self, name: str, args: dict, fields) -> dict:
        group = PLAIN[name]
        unit = self.plain_unit(group, dict(args))
        prefix = _FIELD_PREFIX.get(name[:-3], "")
        return {f.name: unit[prefix + f.name] for f in fields}


# -------------------------------------------------------------- handlers (state + physics)

Handler = Callable[..., Any]
HANDLERS: dict[str, Handler] = {}


def _h(fn: Handler) -> Handler:
    HANDLERS[fn.__name__[2:].replace("_", ".", 1)] = fn
    return fn


def _index(value: int, n: int, what: str) -> int:
    if not 0 <= value < n:
        raise ControllerError(f"{what} {value} outside 0..{n - 1}")
    return value


# Bias
@_h
def h_Bias_RangeSet(c, m, range_index):
    m.bias_range = _index(range_index, len(m.bias_ranges), "bias range index")


@_h
def h_Bias_RangeGet(c, m):
    return {"ranges": list(m.bias_ranges), "range_index": m.bias_range}


@_h
def h_Bias_CalibrSet(c, m, calibration, offset):
    if not (math.isfinite(calibration) and math.isfinite(offset)) or calibration == 0:
        raise ControllerError(f"bias calibration {calibration} / offset {offset} must be finite, calibration != 0")
    m.bias_calibr[m.bias_range] = [calibration, offset]


@_h
def h_Bias_CalibrGet(c, m):
    cal, off = m.bias_calibr[m.bias_range]
    return {"calibration": cal, "offset": off}


# Current
@_h
def h_Current_100Get(c, m):
    return {"current": c.current_get()}


@_h
def h_Current_BEEMGet(c, m):
    return {"current": 0.0}  # no BEEM hardware in the simulated system


@_h
def h_Current_GainSet(c, m, gain_index, filter_index=-1):
    if gain_index != -1:
        m.gain_index = _index(gain_index, len(m.gains), "gain index")
    if filter_index != -1 and m.filters:
        m.filter_index = _index(filter_index, len(m.filters), "filter index")


@_h
def h_Current_GainsGet(c, m):
    return {
        "gains": list(m.gains),
        "gain_index": m.gain_index,
        "filters": list(m.filters),
        "filter_index": m.filter_index,
    }


def _gain(m, gain_index):
    return m.gain_index if gain_index == -1 else _index(gain_index, len(m.gains), "gain index")


@_h
def h_Current_CalibrSet(c, m, calibration, offset, gain_index=-1):
    if not (math.isfinite(calibration) and math.isfinite(offset)):
        raise ControllerError("current calibration and offset must be finite")
    m.current_calibr[_gain(m, gain_index)] = [calibration, offset]


@_h
def h_Current_CalibrGet(c, m, gain_index=-1):
    cal, off = m.current_calibr[_gain(m, gain_index)]
    return {"calibration": cal, "offset": off}


# Z controller
@_h
def h_ZCtrl_GainSet(c, m, p_gain, time_constant, i_gain):
    # I = P/T (the manual sends all three); T is the independent one, as in the GUI
    if not (math.isfinite(p_gain) and p_gain >= 0 and math.isfinite(time_constant) and time_constant > 0):
        raise ControllerError(f"P gain {p_gain} must be >= 0 and time constant {time_constant} s > 0")
    m.z_gain = [p_gain, time_constant]


@_h
def h_ZCtrl_GainGet(c, m):
    p, t = m.z_gain
    return {"p_gain": p, "time_constant": t, "i_gain": p / t}


@_h
def h_ZCtrl_HomePropsSet(c, m, mode, home_position):
    if mode not in (0, 1, 2):
        raise ControllerError(f"home mode {mode} outside 0 (no change), 1 (absolute), 2 (relative)")
    if not math.isfinite(home_position):
        raise ControllerError("home position must be finite")
    if mode:
        m.z_home_mode = mode - 1
    base = c.z_pos_get() if m.z_home_mode == 1 else 0.0
    z = base + home_position
    if not 0.05e-9 <= z <= Z_TOP_M:
        raise ControllerError(f"home position {z} m outside [5e-11, {Z_TOP_M}] m")
    c.z_home_m = z


@_h
def h_ZCtrl_HomePropsGet(c, m):
    return {"mode": m.z_home_mode, "home_position": c.z_home_m}


@_h
def h_ZCtrl_ActiveCtrlSet(c, m, index):
    m.active_controller = _index(index, len(m.controllers), "controller index")


@_h
def h_ZCtrl_CtrlListGet(c, m):
    return {"controllers": list(m.controllers), "index": m.active_controller}


@_h
def h_ZCtrl_LimitsSet(c, m, high, low):
    if not (math.isfinite(high) and math.isfinite(low) and 0 <= low < high <= m.piezo_range[2]):
        raise ControllerError(
            f"Z limits high {high} m / low {low} m must satisfy 0 <= low < high <= {m.piezo_range[2]} m"
        )
    if m.plain["zctrl.limits_enabled"]["enabled"]:
        m.z_limits = [high, low]


@_h
def h_ZCtrl_LimitsGet(c, m):
    if not m.plain["zctrl.limits_enabled"]["enabled"]:
        return {"high": m.piezo_range[2], "low": 0.0}  # disabled: the piezo range
    return {"high": m.z_limits[0], "low": m.z_limits[1]}


@_h
def h_ZCtrl_StatusGet(c, m):
    # 1 off, 2 on, 5 safe-tip event (Safe Tip on and |I| above its threshold)
    if m.plain["safetip.on"]["on"] and abs(c.current_get()) > m.plain["safetip.props"]["threshold"]:
        return {"status": 5}
    return {"status": 2 if c.z_ctrl_on else 1}


# Scan
# What each module files in an image header, as .sxm headers name them (`:Bias>Bias (V):`):
# Scan.PropsGet (R14573+) lists them for the modules chosen with Scan.PropsSet.
HEADER_PARAMETERS = {
    "Bias": ("Bias (V)", "Calibration (V/V)", "Offset (V)"),
    "Current": ("Current (A)", "Calibration (A/V)", "Offset (A)", "Gain"),
    "Z-Controller": (
        "Z (m)",
        "Controller name",
        "Controller status",
        "Setpoint",
        "Setpoint unit",
        "P gain",
        "I gain",
        "Time const (s)",
        "TipLift (m)",
        "Switch off delay (s)",
    ),
    "Piezo Calibration": (
        "Calib. X (m/V)",
        "Calib. Y (m/V)",
        "Calib. Z (m/V)",
        "HV Gain X",
        "HV Gain Y",
        "HV Gain Z",
        "Tilt X (deg)",
        "Tilt Y (deg)",
        "Drift X (m/s)",
        "Drift Y (m/s)",
        "Drift Z (m/s)",
        "Drift correction status (on/off)",
    ),
    "Scan": ("Scanfield", "series name", "channels", "pixels/line", "lines", "speed forw. (m/s)", "speed backw. (m/s)"),
    "Lock-in": (
        "Lock-in status",
        "Modulated signal",
        "Frequency (Hz)",
        "Amplitude",
        "Demodulated signal",
        "Harmonic",
        "Reference phase (deg)",
    ),
}


def header_parameters(modules) -> dict:
    """Scan.PropsGet's R14573+ fields for ``modules`` (names as Scan.PropsSet chose them):
    the parameter count of each and one row of parameter names per module, padded with ""
    to the longest row (a module the simulator does not know files none)."""
    rows = [list(HEADER_PARAMETERS.get(name, ())) for name in modules]
    cols = max(map(len, rows), default=0)
    return {
        "module_param_counts": np.array([len(r) for r in rows], np.int32),
        "module_params": [r + [""] * (cols - len(r)) for r in rows],
    }


@_h
def h_Scan_XYPosGet(c, m, wait_newest):
    x, y = c.tip_position()
    return {"x": x, "y": y}


@_h
def h_Scan_BackgroundPaste(c, m, wait, timeout_ms):
    if not c._buffers:
        raise ControllerError("nothing scanned yet: no buffer to paste as background")
    m.backgrounds.append({k: (f.copy(), b.copy()) for k, (f, b) in c._buffers.items()})
    return {"timed_out": 0}


@_h
def h_Scan_BackgroundDelete(c, m, wait, timeout_ms, which):
    if which not in (0, 1):
        raise ControllerError(f"which {which} must be 0 (last) or 1 (all)")
    if which == 1:
        m.backgrounds.clear()
    elif m.backgrounds:
        m.backgrounds.pop()
    return {"timed_out": 0}


# Follow Me
@_h
def h_FolMe_OversamplSet(c, m, oversampling):
    if not 1 <= oversampling <= 10000:
        raise ControllerError(f"oversampling {oversampling} outside 1..10000")
    m.folme_oversampling = oversampling


@_h
def h_FolMe_OversamplGet(c, m):
    rt = m.plain["util.rt_freq"]["frequency"]
    return {"oversampling": m.folme_oversampling, "sample_rate": rt / m.folme_oversampling}


@_h
def h_FolMe_Stop(c, m):
    c.folme_xy = c.tip_position()  # the tip stays where it is


@_h
def h_FolMe_PSExpGet(c, m):
    return {"experiment": m.ps_experiment, "experiments": list(m.experiments)}


@_h
def h_FolMe_PSExpSet(c, m, experiment):
    m.ps_experiment = _index(experiment, len(m.experiments), "experiment index")


# Piezo: range = sensitivity x 10 V x HV gain (setting one rescales the other)
def _not_scanning(c, what):
    if c.scanning:
        raise ControllerError(f"{what} cannot change while a scan is running; stop it first")


@_h
def h_Piezo_RangeSet(c, m, range_x, range_y, range_z):
    _not_scanning(c, "the piezo range")
    vals = [range_x, range_y, range_z]
    if not all(math.isfinite(v) and 0 < v <= 1e-3 for v in vals):
        raise ControllerError(f"piezo ranges {vals} m must be in (0, 1 mm]")
    m.piezo_range = vals


@_h
def h_Piezo_RangeGet(c, m):
    rx, ry, rz = m.piezo_range
    return {"range_x": rx, "range_y": ry, "range_z": rz}


@_h
def h_Piezo_SensSet(c, m, sens_x, sens_y, sens_z):
    _not_scanning(c, "the piezo sensitivity")
    vals = [sens_x, sens_y, sens_z]
    if not all(math.isfinite(v) and 0 < v <= 1e-5 for v in vals):
        raise ControllerError(f"piezo sensitivities {vals} m/V must be in (0, 1e-5]")
    m.piezo_range = [v * 10.0 * m.piezo_gain for v in vals]


@_h
def h_Piezo_SensGet(c, m):
    sx, sy, sz = (r / (10.0 * m.piezo_gain) for r in m.piezo_range)
    return {"sens_x": sx, "sens_y": sy, "sens_z": sz}


@_h
def h_Piezo_DriftCompSet(c, m, on, vx, vy, vz, saturation_limit=None):
    d = m.drift
    release = getattr(c, "nanonis_release", 14718)
    if release >= 14254:
        table = {0: None, 1: 1, 2: 0}  # R14254+: 0 nc, 1 on, 2 off
    elif release >= 12202:
        table = {-1: None, 0: 0, 1: 1}
    else:
        table = {0: 0, 1: 1}
    if on not in table:
        raise ControllerError(f"drift compensation on/off {on} outside {sorted(table)} (release {release})")
    speeds = [vx, vy, vz]
    if not all(math.isfinite(v) and abs(v) <= 1e-6 for v in speeds):
        raise ControllerError(f"drift speeds {speeds} m/s must be finite and at most 1 um/s")
    if saturation_limit is not None and not 0 <= saturation_limit <= 100:
        raise ControllerError(f"saturation limit {saturation_limit} % outside 0..100")
    now = c.sim_time_s
    d["offset"] = drift_offset(m, now)
    d["since"] = now
    d["v"] = speeds
    if saturation_limit is not None:
        d["saturation_limit"] = saturation_limit
    if table[on] is not None:
        d["on"] = table[on]


def drift_offset(m, now: float) -> list[float]:
    """Compensated displacement (m) accumulated so far, each axis clipped at the saturation
    limit (% of that axis's range): x(t) = x0 + v (t - t0)."""
    d = m.drift
    if not d["on"]:
        return list(d["offset"])
    lim = [d["saturation_limit"] / 100.0 * r for r in m.piezo_range]
    return [float(np.clip(o + v * (now - d["since"]), -L, L)) for o, v, L in zip(d["offset"], d["v"], lim)]


@_h
def h_Piezo_DriftCompGet(c, m):
    d = m.drift
    off = drift_offset(m, c.sim_time_s)
    lim = [d["saturation_limit"] / 100.0 * r for r in m.piezo_range]
    sat = [int(d["on"] and abs(o) >= L) for o, L in zip(off, lim)]
    return {
        "on": d["on"],
        "vx": d["v"][0],
        "vy": d["v"][1],
        "vz": d["v"][2],
        "sat_x": sat[0],
        "sat_y": sat[1],
        "sat_z": sat[2],
        "saturation_limit": d["saturation_limit"],
    }


@_h
def h_Piezo_HystFileSave(c, m, path):
    p = Path(path)
    if p.suffix.lower() != ".csv" or not p.parent.is_dir():
        raise ControllerError(f"{path}: hysteresis tables go to a .csv file in an existing folder")
    v = m.plain["piezo.hyst_vals"]
    with p.open("w") as fh:
        for key in ("fast_x", "fast_y", "slow_x", "slow_y"):
            fh.write(key + "," + ",".join(repr(float(x)) for x in v[key]) + "\n")


@_h
def h_Piezo_HystFileLoad(c, m, path):
    p = Path(path)
    if not p.is_file():
        raise ControllerError(f"{path}: no such hysteresis file")
    vals = {}
    for line in p.read_text().splitlines():
        key, *nums = line.split(",")
        try:
            vals[key] = np.array([float(x) for x in nums if x], np.float32)
        except ValueError:
            raise ControllerError(f"{path}: row {key!r} has a value that is not a number") from None
    if set(vals) != {"fast_x", "fast_y", "slow_x", "slow_y"}:
        raise ControllerError(f"{path}: needs rows fast_x, fast_y, slow_x, slow_y")
    m.plain["piezo.hyst_vals"] = vals


# Motor
@_h
def h_Motor_StartClosedLoop(c, m, mode, x, y, z, wait, group=0):
    if mode not in (0, 1):
        raise ControllerError(f"closed-loop mode {mode} must be 0 (relative) or 1 (absolute)")
    if group > 5:
        raise ControllerError(f"motor group {group} outside 0..5")
    if not c.withdrawn:
        raise ControllerError("coarse motion needs the tip withdrawn (ZCtrl.Withdraw first)")
    target = [x, y, z] if mode == 1 else [p + d for p, d in zip(c.motor_position, (x, y, z))]
    if not all(math.isfinite(t) and abs(t) <= 5e-3 for t in target):
        raise ControllerError(f"closed-loop target {target} m outside +-5 mm")
    for axis, (old, new) in enumerate(zip(c.motor_position, target)):  # the steps it took
        m.motor_counters[axis] += round((new - old) / c.motor_step_m(axis))
    c.motor_position[:] = target


@_h
def h_Motor_StopMove(c, m):
    pass  # simulated moves complete at once; nothing is in motion


@_h
def h_Motor_StepCounterGet(c, m, reset_x, reset_y, reset_z):
    out = {"x": m.motor_counters[0], "y": m.motor_counters[1], "z": m.motor_counters[2]}
    for i, r in enumerate((reset_x, reset_y, reset_z)):
        if r:
            m.motor_counters[i] = 0
    return out


@_h
def h_Motor_FreqAmpGet(c, m, axis=0):
    if axis > 3:
        raise ControllerError(f"motor axis {axis} outside 0 (default), 1 X, 2 Y, 3 Z")
    f, a = m.motor_freq_amp[axis or 1]
    return {"frequency": f, "amplitude": a}


@_h
def h_Motor_FreqAmpSet(c, m, frequency, amplitude, axis):
    if axis > 3:
        raise ControllerError(f"motor axis {axis} outside 0 (all), 1 X, 2 Y, 3 Z")
    if not (
        math.isfinite(frequency) and 1 <= frequency <= 10000 and math.isfinite(amplitude) and 0 < amplitude <= 400
    ):  # a move lasts steps / frequency
        raise ControllerError(
            f"step frequency {frequency} Hz / amplitude {amplitude} V outside [1 Hz, 10 kHz] / (0, 400 V]"
        )
    for ax in (1, 2, 3) if axis == 0 else (axis,):
        m.motor_freq_amp[ax] = [frequency, amplitude]


# AutoApproach: ends at once with the loop closed at the setpoint ([ours])
@_h
def h_AutoApproach_Open(c, m):
    pass


@_h
def h_AutoApproach_OnOffSet(c, m, on):
    if on not in (0, 1):
        raise ControllerError(f"auto approach {on} must be 1 (start) or 0 (stop)")
    if on:
        c.home()
        c.z_ctrl_on_off_set(True)


@_h
def h_AutoApproach_OnOffGet(c, m):
    return {"on": 0}


# Pattern
@_h
def h_Pattern_ExpOpen(c, m):
    m.pattern["open"] = 1


@_h
def h_Pattern_ExpStart(c, m, pattern):
    if pattern > 3:
        raise ControllerError(f"pattern {pattern} outside 0 (no change), 1 grid, 2 line, 3 cloud")
    if not m.pattern["open"]:
        raise ControllerError("the experiment is not open: call Pattern.ExpOpen first")
    if m.experiment is not None:
        raise ControllerError("an experiment is running: Pattern.ExpStop it first")
    if pattern:
        m.pattern["active"] = pattern
    m.experiment = PatternExperiment(c, m)
    m.pattern["running"], m.pattern["paused"] = 1, 0


@_h
def h_Pattern_ExpPause(c, m, pause):
    if pause not in (0, 1):
        raise ControllerError(f"pause {pause} must be 1 (pause) or 0 (resume)")
    if m.experiment is not None:
        m.experiment.pause(bool(pause), c.sim_time_s)
    m.pattern["paused"] = pause


@_h
def h_Pattern_ExpStop(c, m):
    if m.experiment is not None:
        m.experiment.finish(c, m)
    m.pattern["running"] = 0


@_h
def h_Pattern_ExpStatusGet(c, m):
    experiment_tick(c, m)
    return {"running": m.pattern["running"]}


def _geometry(values, what):
    if not all(math.isfinite(v) for v in values):
        raise ControllerError(f"{what}: values must be finite")
    if any(abs(v) > 1e-5 for v in values[:4]):
        raise ControllerError(f"{what}: positions and sizes must be within the +-10 um scan range")


@_h
def h_Pattern_GridSet(c, m, make_active, points_x, points_y, use_scan_frame, center_x, center_y, width, height, angle):
    if not (1 <= points_x <= 4096 and 1 <= points_y <= 4096):
        raise ControllerError(f"grid of {points_x} x {points_y} points outside 1..4096 per axis")
    geo = list(c.frame) if use_scan_frame else [center_x, center_y, width, height, angle]
    _geometry(geo, "Pattern.GridSet")
    if geo[2] < 0 or geo[3] < 0:
        raise ControllerError("grid width and height must be >= 0")
    m.pattern["grid"] = [points_x, points_y, *geo]
    if make_active:
        m.pattern["active"] = 1


@_h
def h_Pattern_GridGet(c, m):
    g = m.pattern["grid"]
    return dict(zip(("points_x", "points_y", "center_x", "center_y", "width", "height", "angle"), g))


@_h
def h_Pattern_LineSet(c, m, make_active, points, use_scan_frame, p1_x, p1_y, p2_x, p2_y):
    if not 1 <= points <= 100000:
        raise ControllerError(f"line points {points} outside 1..100000")
    if use_scan_frame:  # the frame's diagonal
        cx, cy, w, h, _ = c.frame
        p1_x, p1_y, p2_x, p2_y = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    _geometry([p1_x, p1_y, p2_x, p2_y], "Pattern.LineSet")
    m.pattern["line"] = [points, p1_x, p1_y, p2_x, p2_y]
    if make_active:
        m.pattern["active"] = 2


@_h
def h_Pattern_LineGet(c, m):
    return dict(zip(("points", "p1_x", "p1_y", "p2_x", "p2_y"), m.pattern["line"]))


@_h
def h_Pattern_CloudSet(c, m, make_active, x, y):
    if len(x) and (not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)) or np.abs(np.r_[x, y]).max() > 1e-5):
        raise ControllerError("cloud points must be finite and within the +-10 um scan range")
    m.pattern["cloud"] = (np.asarray(x, np.float32).copy(), np.asarray(y, np.float32).copy())
    if make_active:
        m.pattern["active"] = 3


@_h
def h_Pattern_CloudGet(c, m):
    x, y = m.pattern["cloud"]
    return {"x": x, "y": y}


@_h
def h_Pattern_PropsSet(c, m, experiment, basename, external_vi, pre_delay, save_scan_channels):
    if experiment and experiment not in m.experiments:
        raise ControllerError(f"experiment {experiment!r} is not one of {m.experiments}")
    if not (math.isfinite(pre_delay) and 0 <= pre_delay <= 1e3) or save_scan_channels not in (0, 1):
        raise ControllerError(
            f"pre-measure delay {pre_delay} s outside [0, 1000] or save scan channels {save_scan_channels} not 0/1"
        )
    p = m.pattern
    if experiment:
        p["experiment"] = experiment
    if basename:
        p["basename"] = basename
    p.update(external_vi=external_vi, pre_delay=pre_delay, save_scan_channels=save_scan_channels)


@_h
def h_Pattern_PropsGet(c, m):
    p = m.pattern
    return {
        "experiments": list(m.experiments),
        "experiment": p["experiment"],
        "external_vi": p["external_vi"],
        "pre_delay": p["pre_delay"],
        "save_scan_channels": p["save_scan_channels"],
    }


# Marks: colour 0x00RRGGBB ([ours]); VisibleSet 0 = visible, Get 1 = visible
@_h
def h_Marks_PointDraw(c, m, x, y, text, color):
    m.points.append([x, y, text, color, 1])


@_h
def h_Marks_PointsDraw(c, m, x, y, texts, colors):
    if len(texts) != len(x):
        raise ControllerError(f"{len(texts)} texts for {len(x)} points")
    m.points.extend([float(a), float(b), t, int(col), 1] for a, b, t, col in zip(x, y, texts, colors))


@_h
def h_Marks_LineDraw(c, m, start_x, start_y, end_x, end_y, color):
    m.lines.append([start_x, start_y, end_x, end_y, color, 1])


@_h
def h_Marks_LinesDraw(c, m, start_x, start_y, end_x, end_y, colors):
    m.lines.extend(
        [float(a), float(b), float(p), float(q), int(col), 1]
        for a, b, p, q, col in zip(start_x, start_y, end_x, end_y, colors)
    )


def _erase(items, index, what):
    if index == -1:
        items.clear()
    else:
        del items[_index(index, len(items), f"{what} index")]


@_h
def h_Marks_PointsErase(c, m, index):
    _erase(m.points, index, "point mark")


@_h
def h_Marks_LinesErase(c, m, index):
    _erase(m.lines, index, "line mark")


def _visible(items, index, hide, what):
    if hide not in (0, 1):
        raise ControllerError(f"hide {hide} must be 0 (visible) or 1 (hidden)")
    targets = items if index == -1 else [items[_index(index, len(items), f"{what} index")]]
    for it in targets:
        it[-1] = 0 if hide else 1


@_h
def h_Marks_PointsVisibleSet(c, m, index, hide):
    _visible(m.points, index, hide, "point mark")


@_h
def h_Marks_LinesVisibleSet(c, m, index, hide):
    _visible(m.lines, index, hide, "line mark")


@_h
def h_Marks_PointsGet(c, m):
    cols = list(zip(*m.points)) or [[]] * 5
    return {
        "x": np.array(cols[0], np.float32),
        "y": np.array(cols[1], np.float32),
        "texts": list(cols[2]),
        "colors": np.array(cols[3], np.uint32),
        "visible": np.array(cols[4], np.uint32),
    }


@_h
def h_Marks_LinesGet(c, m):
    cols = list(zip(*m.lines)) or [[]] * 6
    names = ("start_x", "start_y", "end_x", "end_y")
    out = {n: np.array(cols[i], np.float32) for i, n in enumerate(names)}
    out.update(colors=np.array(cols[4], np.uint32), visible=np.array(cols[5], np.uint32))
    return out


# BiasSpectr: settings and state; Start sweeps (see "bias spectroscopy" below)
@_h
def h_BiasSpectr_Open(c, m):
    m.bs["open"] = 1


def bias_spectr_start(c, m, get_data, basename) -> tuple[dict, float]:
    """BiasSpectr.Start measured now: (its reply, the simulated seconds the reply waits)."""
    if basename:
        m.bs["basename"] = basename
    if c.replay is not None:
        names, sweep, rows, params, seconds = _replayed_sweep(c, m)
    else:
        names, sweep, rows, params, seconds = _sweep_here(c, m)
    if not get_data:
        return {"channel_names": [], "data": np.zeros((0, 0), np.float32), "params": np.zeros(0, np.float32)}, seconds
    return {
        "channel_names": [SWEEP_SIGNAL, *names],
        "data": np.stack([sweep, *rows]).astype(np.float32),
        "params": np.asarray(params, np.float32),
    }, seconds


@_h
def h_BiasSpectr_Stop(c, m):
    m.bs["running"] = 0


@_h
def h_BiasSpectr_StatusGet(c, m):
    return {"running": m.bs["running"]}


@_h
def h_BiasSpectr_ChsSet(c, m, channel_indexes):
    chans = [int(i) for i in channel_indexes]
    if not chans or any(not 0 <= i < 128 for i in chans):
        raise ControllerError(f"channel indexes {chans} must be 1+ RT indexes in 0..127")
    m.bs["channels"] = chans


@_h
def h_BiasSpectr_ChsGet(c, m):
    return {
        "channel_indexes": np.array(m.bs["channels"], np.int32),
        "channel_names": [c.signal_names[i] for i in m.bs["channels"]],
    }


@_h
def h_BiasSpectr_PropsSet(c, m, save_all, sweeps, backward, points, z_offset, autosave, show_dialog):
    b = m.bs
    new = {
        k: _check("bs.props", k, v, b[k])
        for k, v in (
            ("save_all", save_all),
            ("backward", backward),
            ("autosave", autosave),
            ("show_dialog", show_dialog),
        )
    }
    if sweeps < 0 or points < 0 or points > 100000 or not math.isfinite(z_offset) or abs(z_offset) > 1e-6:
        raise ControllerError(
            f"sweeps {sweeps}, points {points} must be >= 0 (points <= 100000), Z offset {z_offset} m within +-1 um"
        )
    b.update(new)
    if sweeps:
        b["sweeps"] = sweeps
    if points:
        b["points"] = points
    m.plain["bs.timing"]["z_offset"] = z_offset


CHECKS["bs.props"] = {k: "nc12" for k in ("save_all", "backward", "autosave", "show_dialog")}


@_h
def h_BiasSpectr_PropsGet(c, m):
    b = m.bs
    out = {
        "save_all": b["save_all"],
        "sweeps": b["sweeps"],
        "backward": b["backward"],
        "points": b["points"],
        "parameters": list(PARAMETERS),
        "fixed_parameters": list(FIXED_PARAMETERS),
        "autosave": b["autosave"],
        "show_dialog": b["show_dialog"],
    }
    if getattr(c, "nanonis_release", 14718) <= 13172:  # the channels moved out in R13742
        out["channels"] = [c.signal_names[i] for i in b["channels"]]
    return out


# Signals
def _signal(index):
    return _index(index, 128, "signal index")


@_h
def h_Signals_InSlotSet(c, m, slot, rt_index):
    _index(slot, 24, "slot")
    c.signal_slots = getattr(c, "signal_slots", list(range(24)))
    c.signal_slots[slot] = _signal(rt_index)


@_h
def h_Signals_InSlotsGet(c, m):
    slots = getattr(c, "signal_slots", list(range(24)))
    return {"names": [c.signal_names[i] for i in slots], "rt_indexes": np.array(slots, np.int32)}


@_h
def h_Signals_CalibrGet(c, m, index):
    _signal(index)
    return {"calibration": 1.0, "offset": 0.0}


@_h
def h_Signals_RangeGet(c, m, index):
    _signal(index)
    if index == 0:
        return {"maximum": 10.0 ** -(6 + m.gain_index) * 10, "minimum": -(10.0 ** -(6 + m.gain_index)) * 10}
    if index == 30:
        return {"maximum": m.piezo_range[2], "minimum": 0.0}
    return {"maximum": 10.0, "minimum": -10.0}


@_h
def h_Signals_AddRTGet(c, m):
    return {
        "available": list(m.add_rt_names),
        "internal_23": m.add_rt_names[m.add_rt[0]],
        "internal_24": m.add_rt_names[m.add_rt[1]],
    }


@_h
def h_Signals_AddRTSet(c, m, internal_23, internal_24):
    m.add_rt = [
        _index(internal_23, len(m.add_rt_names), "Internal 23 source"),
        _index(internal_24, len(m.add_rt_names), "Internal 24 source"),
    ]


# SafeTip: the live signal is the tunnelling current
@_h
def h_SafeTip_SignalGet(c, m):
    return {"value": c.current_get()}


# TipRec
def tiprec_record(c, m) -> None:
    """One sample of the recorded channels (called after each Follow-Me move)."""
    m.tiprec_data.append([c.signal_value(i) for i in m.tiprec_channels])
    del m.tiprec_data[: -m.tiprec_size]  # a ring buffer of ``size`` samples


@_h
def h_TipRec_BufferSizeSet(c, m, size):
    if not 1 <= size <= 1_000_000:
        raise ControllerError(f"buffer size {size} outside 1..1000000")
    m.tiprec_size = size
    m.tiprec_data = []


@_h
def h_TipRec_BufferSizeGet(c, m):
    return {"size": m.tiprec_size}


@_h
def h_TipRec_BufferClear(c, m):
    m.tiprec_data = []


@_h
def h_TipRec_DataGet(c, m):
    data = np.array(m.tiprec_data, np.float32).reshape(-1, len(m.tiprec_channels))
    return {"channel_indexes": np.array(m.tiprec_channels, np.int32), "data": data}


@_h
def h_TipRec_DataSave(c, m, clear, basename):
    folder = c.save_dir
    if folder is None:
        raise ControllerError("no session folder configured for the simulator (Util.SessionPathSet)")
    if basename:
        m.tiprec_basename = basename
    name = getattr(m, "tiprec_basename", "TipRec")
    path = Path(folder) / f"{name}{len(list(Path(folder).glob(name + '*.dat'))):03d}.dat"
    rows = m.tiprec_data
    path.write_text(
        "\t".join(c.signal_names[i] for i in m.tiprec_channels)
        + "\n"
        + "".join("\t".join(repr(v) for v in r) + "\n" for r in rows)
    )
    if clear:
        m.tiprec_data = []


# UserOut: Limits keep physical and raw limits apart
@_h
def h_UserOut_LimitsSet(c, m, output, upper, lower, raw=0):
    key = (output, raw)
    if key not in m.userout_limits:
        raise ControllerError(f"output {output} outside 1..{N_OUTPUTS} or raw flag {raw} not 0/1")
    if not (math.isfinite(upper) and math.isfinite(lower) and lower < upper):
        raise ControllerError(f"limits upper {upper} / lower {lower} must be finite with lower < upper")
    m.userout_limits[key] = [upper, lower]


@_h
def h_UserOut_LimitsGet(c, m, output, raw=0):
    key = (output, raw)
    if key not in m.userout_limits:
        raise ControllerError(f"output {output} outside 1..{N_OUTPUTS} or raw flag {raw} not 0/1")
    upper, lower = m.userout_limits[key]
    return {"upper": upper, "lower": lower}


# Util
@_h
def h_Util_SessionPathGet(c, m):
    return {"path": "" if c.save_dir is None else str(c.save_dir)}


@_h
def h_Util_SessionPathSet(c, m, path, save_previous=0):
    p = Path(path)
    if not path or not p.is_dir():
        raise ControllerError(f"session folder {path!r} does not exist")
    c.save_dir = str(p)


def _ini_path(c, path, use_session, kind):
    if use_session:
        if c.save_dir is None:
            raise ControllerError("no session folder configured (Util.SessionPathSet)")
        return Path(c.save_dir) / f"{kind}.ini"
    p = Path(path)
    if p.suffix.lower() != ".ini":
        raise ControllerError(f"{path!r}: {kind} files are .ini")
    return p


@_h
def h_Util_SettingsSave(c, m, path, use_session):
    p = _ini_path(c, path, use_session, "settings")
    if not p.parent.is_dir():
        raise ControllerError(f"{p.parent}: no such folder")
    lines = []
    for group, data in sorted(m.plain.items()):
        if group in INDEX_FIELDS or group in ("piezo.hyst_vals", "bs.mls_vals", "signals.meas_names"):
            continue
        lines += [f"{group}.{k}={v!r}" for k, v in data.items()]
    p.write_text("\n".join(lines) + "\n")


@_h
def h_Util_SettingsLoad(c, m, path, use_session):
    p = _ini_path(c, path, use_session, "settings")
    if not p.is_file():
        raise ControllerError(f"{p}: no such settings file")
    for n, line in enumerate(p.read_text().splitlines(), 1):
        key, _, raw = line.partition("=")
        group, _, field = key.rpartition(".")
        if group not in m.plain or field not in m.plain[group]:
            raise ControllerError(f"{p} line {n}: unknown setting {key!r}")
        try:
            m.plain[group][field] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ControllerError(f"{p} line {n}: {raw!r} is not a value") from None


@_h
def h_Util_LayoutSave(c, m, path, use_session):
    p = _ini_path(c, path, use_session, "layout")
    if not p.parent.is_dir():
        raise ControllerError(f"{p.parent}: no such folder")
    p.write_text("[layout]\nsimulator=stm-live\n")


@_h
def h_Util_LayoutLoad(c, m, path, use_session):
    p = _ini_path(c, path, use_session, "layout")
    if not p.is_file():
        raise ControllerError(f"{p}: no such layout file")


@_h
def h_Util_Lock(c, m):
    m.locked = 1


@_h
def h_Util_UnLock(c, m):
    m.locked = 0


# Osci2T
def _timebases(m) -> list[float]:
    """Timebases (s per screen) for the present RT frequency and oversampling."""
    rt = m.plain["util.rt_freq"]["frequency"] / m.plain["util.rt_oversampl"]["oversampling"]
    return [k * 128 / rt for k in (1, 2, 5, 10, 20, 50, 100, 200)]


@_h
def h_Osci2T_TimebaseSet(c, m, index):
    m.osci_timebase = _index(index, len(_timebases(m)), "timebase index")


@_h
def h_Osci2T_TimebaseGet(c, m):
    return {"index": m.osci_timebase, "timebases": np.array(_timebases(m), np.float32)}


@_h
def h_Osci2T_Run(c, m):
    m.osci_running = 1


OSCI_POINTS = 128  # points per trace
OSCI_SAMPLES = (50, 20, 10, 5, 2, 1)  # RT samples averaged per point, by oversampling index


@_h
def h_Osci2T_DataGet(c, m, which):
    if which > 2:
        raise ControllerError(f"data to get {which} outside 0 (current), 1 (next trigger), 2 (two triggers)")
    if not m.osci_running:
        raise ControllerError("the oscilloscope is not running (Osci2T.Run first)")
    dt = _timebases(m)[m.osci_timebase] / OSCI_POINTS
    # "as displayed" ends now; after a trigger the screen starts there (at once: [ours])
    t0 = c.sim_time_s - (OSCI_POINTS * dt if which == 0 else m.plain["osci.trig"]["position"])
    ch = m.plain["osci.chs"]
    a, b = osci_traces(c, m, (ch["channel_a"], ch["channel_b"]), t0 + dt * np.arange(OSCI_POINTS))
    return {"t0": t0, "dt": dt, "a": a, "b": b}


def osci_traces(c, m, channels, t) -> list[np.ndarray]:
    """What the channels (RT indexes) read at the tip at simulated times ``t`` (s).

    The tip stays where it is over the screen (a running scan's tip: where it is now).
    Noise (the scenario's, relative to the signal, the white part averaged over the
    oversampling): at constant current the preamplifier's white noise is in the current and
    the junction's 1/f noise is taken out by the loop, so it shows in Z (δz = δI/I / 2κ); at
    constant height both are in the current. The lock-in's bias modulation (modulator 1 on
    the bias) is in the bias and, as A dI/dV, in the current."""
    noise = c.scenario.artifacts
    n = len(t)
    white = noise.white_noise / math.sqrt(OSCI_SAMPLES[m.plain["osci.oversampl"]["index"]]) * c._rng.standard_normal(n)
    pink = artifacts.pink_noise(np.zeros((1, n)), noise.pink_noise, c._rng)[0] if noise.pink_noise > 0 else np.zeros(n)
    mod = m.plain["lockin.mod"][1]
    wave = np.zeros(n)
    if mod["on"] and mod["signal"] == BIAS_INDEX:
        f = m.plain["lockin.freq"][mod["phase_register"]]["frequency"]
        wave = mod["amplitude"] * np.sin(2 * np.pi * f * mod["harmonic"] * t)
    out = []
    for index in channels:
        if index == CURRENT_INDEX:
            if c.z_ctrl_on:
                values = c.setpoint_A * (1 + white)
            else:
                values = c._point_current(c._z_m + c._tilt_plane_m()) * (1 + white + pink)
            if wave.any() and c.renderer is not None:
                x, y = c._sample_point()
                z_nm = (c.z_pos_get() + c._tilt_plane_m()) * 1e9
                values = values + wave * c.renderer.point_didv(x, y, c.tip, c.bias_V, z_nm)
        elif index == Z_INDEX:
            values = c.z_pos_get() + (pink / (2 * KAPPA_PER_NM) * 1e-9 if c.z_ctrl_on else 0.0)
        elif index in (BIAS_INDEX, 29):
            values = c.bias_V + wave
        elif index == TIME_INDEX:
            values = t
        else:
            values = c.signal_value(index)
        out.append(np.broadcast_to(np.asarray(values, np.float64), (n,)).copy())
    return out


# -------------------------------------------------------------- bias spectroscopy (physics)
# A sweep at the tip (BiasSpectr.Start) and at every point of a Pattern experiment is one
# SweepPlan, measured through the renderer's spectra (simulators/spectra.py); a Pattern
# experiment measures its points on the render thread and saves a .3ds when it ends.

SWEEP_SIGNAL = "Bias calc (V)"  # the sweep's column in a spectrum, as Nanonis names it
PARAMETERS = (
    "X (m)",
    "Y (m)",
    "Z (m)",
    "Z offset (m)",
    "Settling time (s)",
    "Integration time (s)",
    "Z-Ctrl hold",
    "Final Z (m)",
)  # per sweep, after the fixed ones (.dat header, .3ds)
FIXED_PARAMETERS = ("Sweep Start (V)", "Sweep End (V)")
MAX_BLOCK_S = 60.0  # a reply waits at most this long (real seconds), as the server's blocking moves
TIME_INDEX = 37


def backward_name(name: str) -> str:
    """ "Current (A)" -> "Current [bwd] (A)": the backward sweep's column, as Nanonis names it."""
    base, unit = split_unit(name)
    return f"{base} [bwd] ({unit})" if unit else f"{base} [bwd]"


def _flag(on) -> str:
    return "TRUE" if on else "FALSE"


@dataclass(frozen=True, eq=False)  # arrays inside
class SweepPlan:
    """One bias spectroscopy's settings, taken from the modules when it starts, so that its
    sweeps can be measured anywhere (the tip's point on the controller thread, a Pattern
    experiment's points on the render thread) without the controller's state.

    The loop is opened where I(``bias_V``) = ``setpoint_A`` (None: the Z controller was off,
    the tip stays at ``z_m``), then the tip moves by ``z_offset_m``; ``sweeps`` sweeps of
    ``sweep`` (and back, with ``backward``) are averaged, each with the scenario's white noise
    (``noise``, relative to the channel's spread over the sweep)."""

    sweep: np.ndarray  # V, in the order swept
    point_s: np.ndarray  # settling + integration of each point (s)
    channels: tuple[tuple[int, str], ...]  # (RT index, "Current (A)")
    backward: bool
    sweeps: int
    lockin: tuple[float, float] | None  # (amplitude V, phase deg) when the lock-in runs
    noise: float
    tip: Any
    bias_V: float
    setpoint_A: float | None
    z_m: float
    z_offset_m: float
    constants: dict  # RT index -> its value through the sweep (channels the sweep leaves alone)
    t0_s: float  # simulated time at the start (the Time channel)
    duration_s: float  # the whole measurement: Z averaging, moves, settling, sweeps
    header: dict  # module settings, as Nanonis writes them into .dat and .3ds headers

    @property
    def names(self) -> list[str]:
        """The recorded channels: forward sweeps, then backward ones."""
        fwd = [name for _i, name in self.channels]
        return fwd + ([backward_name(n) for n in fwd] if self.backward else [])

    def parameters(self, xy_m, z_m) -> dict[str, np.ndarray]:
        """The per-sweep parameters (``PARAMETERS``) at points ``xy_m`` (k, 2), heights ``z_m`` (k,)."""
        k = len(z_m)
        settling = float(self.header["Bias Spectroscopy>Settling time (s)"])
        integration = float(self.header["Bias Spectroscopy>Integration time (s)"])
        return {
            "X (m)": xy_m[:, 0],
            "Y (m)": xy_m[:, 1],
            "Z (m)": z_m,
            "Z offset (m)": np.full(k, self.z_offset_m),
            "Settling time (s)": np.full(k, settling),
            "Integration time (s)": np.full(k, integration),
            "Z-Ctrl hold": np.full(k, float(self.setpoint_A is not None)),
            "Final Z (m)": z_m if self.header["_record_final_z"] else np.full(k, np.nan),
        }

    def measure(self, renderer, at, xy_m, rng) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Channel name -> (k, points) float64 and the tip heights (k,) (m) during the
        sweeps, at ``at`` (physics coordinates: an (x_nm, y_nm) point or a ScanFrame of k
        points) whose piezo positions are ``xy_m`` (k, 2)."""
        loop = self.setpoint_A is not None
        spectra = renderer.spectra_at(
            at,
            self.tip,
            self.sweep,
            z_nm=None if loop else self.z_m * 1e9,
            setpoint_A=self.setpoint_A,
            setpoint_bias_V=self.bias_V,
            z_offset_nm=self.z_offset_m * 1e9,
        )
        n = len(self.sweep)
        didv = spectra.didv_A_per_V.reshape(-1, n)
        z = spectra.z_nm.reshape(-1) * 1e-9
        k = len(z)
        li_x, li_y = lockin_outputs(didv, self.lockin)
        physics = {CURRENT_INDEX: spectra.current_A.reshape(-1, n), LI_X_INDEX: li_x, LI_Y_INDEX: li_y}
        # noise of the averaged sweeps: each channel's spread over the sweep, / sqrt(sweeps)
        spread = {c: np.std(a, axis=1, keepdims=True) for c, a in physics.items()}
        spread[LI_Y_INDEX] = spread[LI_X_INDEX]
        t_fwd = self.t0_s + np.cumsum(self.point_s)
        times = (t_fwd, t_fwd[-1] + np.cumsum(self.point_s[::-1])[::-1])  # the way back is swept after
        out = {}
        for direction in range(1 + self.backward):
            for index, name in self.channels:
                if index in physics:
                    scale = self.noise * spread[index] / math.sqrt(self.sweeps)
                    values = physics[index] + scale * rng.standard_normal((k, n))
                elif index in (BIAS_INDEX, 29):
                    values = self.sweep
                elif index == Z_INDEX:
                    values = z[:, None]
                elif index in (X_INDEX, Y_INDEX):
                    values = xy_m[:, index - X_INDEX, None]
                elif index == TIME_INDEX:
                    values = times[direction]
                else:
                    values = self.constants[index]
                out[backward_name(name) if direction else name] = np.broadcast_to(values, (k, n)).astype(np.float64)
        return out, z


def sweep_plan(c, m) -> SweepPlan:
    """The SweepPlan of the BiasSpectr settings now; ControllerError for a sweep that
    cannot run (tip withdrawn, a scan running, fewer than 2 points)."""
    if c.withdrawn:
        raise ControllerError("bias spectroscopy: the tip is withdrawn; approach first")
    if c.state == "scanning":
        raise ControllerError("bias spectroscopy: a scan is running; pause or stop it first")
    if c.renderer is None:
        raise ControllerError(
            f"bias spectroscopy: replaying {c.replay.name}, a scan: it holds no spectra "
            "(replay a .3ds grid to answer BiasSpectr.Start)"
        )
    timing, adv, b = m.plain["bs.timing"], m.plain["bs.adv"], m.bs
    if m.plain["bs.mls_mode"]["mode"] == "MLS":
        v = m.plain["bs.mls_vals"]
        steps = [int(n) for n in v["steps"]]
        if any(n < 1 for n in steps):
            raise ControllerError(f"MLS segments must have at least 1 step each, got {steps}")
        sweep = np.concatenate([np.linspace(a, e, n) for a, e, n in zip(v["bias_start"], v["bias_end"], steps)])
        point_s = np.concatenate([np.full(n, s + i) for s, i, n in zip(v["settling"], v["integration"], steps)])
        first_settling = float(v["initial_settling"][0])
    else:
        lim = m.plain["bs.limits"]
        sweep = np.linspace(lim["start"], lim["end"], b["points"])
        point_s = np.full(b["points"], timing["settling"] + timing["integration"])
        first_settling = timing["initial_settling"]
    if len(sweep) < 2:
        raise ControllerError(f"a bias sweep needs at least 2 points, got {len(sweep)} (BiasSpectr.PropsSet points)")
    sweep = sweep.astype(np.float64)
    loop = c.z_ctrl_on
    alt = m.plain["bs.alt_z"]
    setpoint = (alt["setpoint"] if alt["enable"] else c.setpoint_A) if loop else None
    if loop and c.bias_V == 0:
        raise ControllerError("bias spectroscopy: the feedback cannot hold a current at 0 V bias; set a bias first")
    slew = timing["max_slew_rate"]
    move = (
        0.0
        if not (slew > 0 and math.isfinite(slew))
        else (abs(sweep[0] - c.bias_V) + (abs(sweep[-1] - c.bias_V) if adv["reset_bias"] else 0.0)) / slew
    )
    backward = bool(b["backward"])
    duration = (
        (timing["z_avg_time"] + (alt["settling_time"] if alt["enable"] else 0.0) if loop else 0.0)
        + move
        + first_settling
        + b["sweeps"] * (1 + backward) * float(point_s.sum())
        + timing["end_settling"]
        + (timing["z_control_time"] if loop else 0.0)
    )
    channels = tuple((i, c.signal_names[i]) for i in b["channels"])
    handled = {CURRENT_INDEX, LI_X_INDEX, LI_Y_INDEX, BIAS_INDEX, 29, Z_INDEX, X_INDEX, Y_INDEX, TIME_INDEX}
    lockin = c.lockin(run=bool(adv["lockin_run"]))
    mod = m.plain["lockin.mod"][1]
    e = _number_text
    header = {
        "Bias>Bias (V)": e(c.bias_V),
        "Bias Spectroscopy>Channels": ";".join(n for _i, n in channels),
        "Bias Spectroscopy>Sweep Start (V)": e(sweep[0]),
        "Bias Spectroscopy>Sweep End (V)": e(sweep[-1]),
        "Bias Spectroscopy>Num Pixel": str(len(sweep)),
        "Bias Spectroscopy>Z Avg time (s)": e(timing["z_avg_time"]),
        "Bias Spectroscopy>Z offset (m)": e(timing["z_offset"]),
        "Bias Spectroscopy>1st Settling time (s)": e(first_settling),
        "Bias Spectroscopy>Settling time (s)": e(timing["settling"]),
        "Bias Spectroscopy>Integration time (s)": e(timing["integration"]),
        "Bias Spectroscopy>End Settling time (s)": e(timing["end_settling"]),
        "Bias Spectroscopy>Z control time (s)": e(timing["z_control_time"]),
        "Bias Spectroscopy>Max Slew rate (V/s)": e(slew),
        "Bias Spectroscopy>backward sweep": _flag(backward),
        "Bias Spectroscopy>Z-controller hold": _flag(loop),
        "Bias Spectroscopy>Number of sweeps": str(b["sweeps"]),
        "Z-Controller>Controller status": "ON" if loop else "OFF",
        "Z-Controller>Setpoint": e(c.setpoint_A),
        "Z-Controller>Setpoint unit": "A",
        "Lock-in>Lock-in status": "ON" if lockin else "OFF",
        "Lock-in>Modulated signal": c.signal_names[mod["signal"]],
        "Lock-in>Frequency (Hz)": e(m.plain["lockin.freq"][1]["frequency"]),
        "Lock-in>Amplitude": e(mod["amplitude"]),
        "_record_final_z": bool(adv["record_final_z"]),
    }
    return SweepPlan(
        sweep=sweep,
        point_s=point_s,
        channels=channels,
        backward=backward,
        sweeps=int(b["sweeps"]),
        lockin=lockin,
        noise=float(c.scenario.artifacts.white_noise),
        tip=c.tip,
        bias_V=c.bias_V,
        setpoint_A=setpoint,
        z_m=c.z_pos_get(),
        z_offset_m=float(timing["z_offset"]),
        constants={i: c.signal_value(i) for i, _n in channels if i not in handled},
        t0_s=c.sim_time_s,
        duration_s=duration,
        header=header,
    )


def _number_text(value) -> str:
    return nanonis_float(float(value)) if math.isfinite(float(value)) else ("Inf" if value > 0 else "NaN")


def _file_header(plan: SweepPlan) -> dict[str, str]:
    return {k: v for k, v in plan.header.items() if not k.startswith("_")}


def _sweep_here(c, m):
    """BiasSpectr.Start at the tip: (names, sweep, rows, params, simulated seconds); saves
    the .dat when autosave is on and the simulator has a session folder."""
    plan = sweep_plan(c, m)
    x, y = c.tip_position()
    sx, sy = c.sample_shift_m()
    xy = np.array([[x, y]])
    data, z = plan.measure(c.renderer, ((x + sx) * 1e9, (y + sy) * 1e9), xy, c._rng)
    params = plan.parameters(xy, z)
    if m.bs["autosave"] and c.save_dir is not None:
        e = _number_text
        final = params["Final Z (m)"][0]
        header = {
            "Z offset (m)": e(plan.z_offset_m),
            "Settling time (s)": e(params["Settling time (s)"][0]),
            "Integration time (s)": e(params["Integration time (s)"][0]),
            "Z-Ctrl hold": _flag(plan.setpoint_A is not None),
            "Final Z (m)": e(final) if math.isfinite(final) else "N/A",
            **_file_header(plan),
        }
        spectrum = make_spectrum(
            plan.sweep,
            {n: v[0] for n, v in data.items()},
            position_m=(x, y, z[0]),
            sweep_signal=SWEEP_SIGNAL,
            header=header,
        )
        m.bs["last_path"] = str(write_dat(c.next_save_path(m.bs["basename"], ".dat"), spectrum))
    if not m.plain["bs.adv"]["reset_bias"]:  # the bias stays where the sweep ended
        c.bias_V = float(plan.sweep[0] if plan.backward else plan.sweep[-1])
    rows = [data[n][0] for n in plan.names]
    return (
        plan.names,
        plan.sweep,
        rows,
        [plan.sweep[0], plan.sweep[-1], *(params[p][0] for p in PARAMETERS)],
        plan.duration_s,
    )


def _replayed_sweep(c, m):
    """BiasSpectr.Start while replaying: the recorded sweep at the grid point under the tip."""
    at = getattr(c.replay, "sweep_at", None)
    if at is None:
        sweep_plan(c, m)  # a scan recording: says why there is no spectrum
    x, y = c.tip_position()
    sweep, channels, params = at(x, y)
    timing = m.plain["bs.timing"]
    per_point = params.get("Settling time (s)", timing["settling"]) + params.get(
        "Integration time (s)", timing["integration"]
    )
    seconds = timing["initial_settling"] + len(sweep) * per_point + timing["end_settling"]
    return (
        list(channels),
        sweep,
        list(channels.values()),
        [sweep[0], sweep[-1], *params.values()],
        seconds if math.isfinite(seconds) else 0.0,
    )


class PatternExperiment:
    """A Pattern experiment under way (Pattern.ExpStart): the BiasSpectr sweep at each point
    of the active pattern (grid: row 0 at the bottom, x fastest, as Nanonis records; line: P1
    to P2; cloud: its points), one after the other in simulated time (the Follow-Me move,
    the pre-measure delay, the sweep). Points are measured on the render thread (grid rows,
    or single points), so no reply waits on them; the experiment's clock holds at a point
    not measured yet. When it ends, or is stopped, the points done are saved as a .3ds
    (``<basename>NNN.3ds``; a line or cloud as a grid of n x 1 points) in the session folder."""

    def __init__(self, c, m):
        if c.replay is not None:
            raise ControllerError(
                f"replaying {c.replay.name}: BiasSpectr.Start at its points answers the "
                "recorded sweeps; Pattern experiments are not replayed"
            )
        p = m.pattern
        if not p["experiment"].startswith("Bias Spectroscopy"):
            raise ControllerError(
                f"experiment {p['experiment']!r} is not simulated; choose Bias Spectroscopy "
                "ASCII or BINARY (Pattern.PropsSet)"
            )
        self.plan = plan = sweep_plan(c, m)
        sx, sy = c.sample_shift_m()
        if p["active"] == 1:
            nx, ny, cx, cy, w, h, angle = p["grid"]
            self.shape = (int(ny), int(nx))
            self.geometry = (cx, cy, w, h, angle)
            dv = h / ny
            a = math.radians(angle)
            ats = []
            for r in range(int(ny)):  # one row at a time; rows from the bottom (Nanonis' grids go up)
                v = -h / 2 + (r + 0.5) * dv
                ats.append(_physics_frame(cx + v * math.sin(a) + sx, cy + v * math.cos(a) + sy, w, dv, angle, nx))
            xy = np.concatenate([np.stack(f.grid(), -1).reshape(-1, 2) * 1e-9 for f in ats]) - (sx, sy)
            chunks = [(slice(r * int(nx), (r + 1) * int(nx)), f) for r, f in enumerate(ats)]
        else:
            if p["active"] == 2:
                n, x0, y0, x1, y1 = p["line"]
                xy = np.stack([np.linspace(x0, x1, int(n)), np.linspace(y0, y1, int(n))], -1)
            else:
                xy = np.stack([np.asarray(a, np.float64) for a in p["cloud"]], -1)
            if not len(xy):
                raise ControllerError("empty pattern: the point cloud has no points (Pattern.CloudSet)")
            self.shape = (1, len(xy))
            lo, hi = xy.min(0), xy.max(0)
            self.geometry = (*(lo + hi) / 2, *(hi - lo), 0.0)
            chunks = [(slice(i, i + 1), ((x + sx) * 1e9, (y + sy) * 1e9)) for i, (x, y) in enumerate(xy)]
        self.xy = xy
        n_points = len(xy)
        # simulated time of each point: the move there, the pre-measure delay, the sweep
        speed, custom = c.folme_speed
        speed = speed if custom else c.frame[2] / c.line_times_s[0]
        moves = np.hypot(*np.diff(np.vstack([c.tip_position(), xy]), axis=0).T) / max(speed, 1e-12)
        self.ends = np.cumsum(moves + p["pre_delay"] + plan.duration_s)
        self.t0, self.paused_since, self.paused_s = c.sim_time_s, None, 0.0
        self.basename, self.pre_delay = p["basename"], float(p["pre_delay"])
        self.started = dt.datetime.now()
        m.experiments_started += 1
        points = len(plan.sweep)
        self.data = {name: np.full((n_points, points), np.nan) for name in plan.names}
        self.z = np.full(n_points, np.nan)
        self.ready = 0  # points measured (in order: chunks are harvested in order)
        self.error: Exception | None = None  # a measurement failed: the experiment ends there
        seeds = np.random.SeedSequence([c.seed, 5, m.experiments_started]).spawn(len(chunks))
        renderer = c.renderer
        self._chunks = [
            (
                where,
                submit_or_run(
                    c.render_pool,
                    lambda at=at, xy=xy[where], s=s: plan.measure(renderer, at, xy, np.random.default_rng(s)),
                )[0],
            )
            for (where, at), s in zip(chunks, seeds)
        ]

    def _harvest(self) -> None:
        while self._chunks and self._chunks[0][1].done() and self.error is None:
            where, fut = self._chunks.pop(0)
            try:
                data, z = fut.result()
            except Exception as exc:  # the experiment ends at the points measured before it
                log.error("grid experiment: measuring points %d-%d failed: %s", where.start, where.stop - 1, exc)
                self.error = exc
                return
            for name, values in data.items():
                self.data[name][where] = values
            self.z[where] = z
            self.ready = where.stop

    def points_done(self, now: float) -> int:
        """Points finished by simulated time ``now`` (held at the first not yet measured)."""
        self._harvest()
        elapsed = (self.paused_since if self.paused_since is not None else now) - self.t0 - self.paused_s
        return min(int(np.searchsorted(self.ends, elapsed, side="right")), self.ready)

    def position(self, now: float) -> tuple[float, float]:
        """Where the tip is (piezo, m): the point being measured, or the last one."""
        k = min(self.points_done(now), len(self.xy) - 1)
        return float(self.xy[k, 0]), float(self.xy[k, 1])

    def pause(self, pause: bool, now: float) -> None:
        if pause and self.paused_since is None:
            self.paused_since = now
        elif not pause and self.paused_since is not None:
            self.paused_s += now - self.paused_since
            self.paused_since = None

    def finish(self, c, m) -> str:
        """End it (at its end, or stopped): the tip stays at the last point measured; the
        points done are saved as a .3ds (none done: no file). Returns the path or ""."""
        done = self.points_done(c.sim_time_s)
        for _where, fut in self._chunks:
            fut.cancel()
        m.experiment, m.pattern["running"], m.pattern["paused"] = None, 0, 0
        path = ""
        if done:
            c.folme_xy = tuple(self.xy[done - 1])
        if done and c.save_dir is not None:
            measured = np.zeros(len(self.xy), bool)
            measured[:done] = True
            ny, nx = self.shape
            plan = self.plan
            params = plan.parameters(self.xy, self.z)
            header = {
                **_file_header(plan),
                "Experiment": "Grid Spectroscopy",
                "Delay before measuring (s)": _number_text(self.pre_delay),
            }
            try:
                grid = make_grid(
                    {n: a.reshape(ny, nx, -1) for n, a in self.data.items()},
                    sweep=plan.sweep,
                    center_m=self.geometry[:2],
                    size_m=self.geometry[2:4],
                    angle_deg=self.geometry[4],
                    parameters={k: v.reshape(ny, nx) for k, v in params.items()},
                    measured=measured.reshape(ny, nx),
                    header=header,
                    start=self.started,
                    end=dt.datetime.now(),
                )
                path = str(write_3ds(c.next_save_path(self.basename, ".3ds"), grid))
                m.last_experiment_grid = grid
            except SpectroscopyFileError as exc:  # an MLS sweep of several segments: not one linear sweep
                log.warning("grid experiment not saved: %s", exc)
        m.last_experiment_path = path
        return path


def _physics_frame(cx, cy, w, h, angle, nx):
    """One grid row as the physics frame (nm) of its nx points (a zero-width grid still has a size)."""
    return ScanFrame.from_si(cx, cy, max(w, 1e-12), max(h, 1e-12), angle, int(nx), 1, "up")


def experiment_tick(c, m) -> None:
    """Ends the Pattern experiment once its last point is done (called by the scan clock and
    by Pattern.ExpStatusGet)."""
    exp = m.experiment
    if exp is not None and (exp.points_done(c.sim_time_s) >= len(exp.xy) or exp.error is not None):
        exp.finish(c, m)
