"""Nanonis TCP protocol codec: framing, typed bodies and the error section.

ONE table (``_TABLE``) describes every command of NANONIS_PROTOCOL.md §3 and
NANONIS_PROTOCOL_EXT.md §3 (246 commands of 19 modules) as data: name, request and
response fields with wire types, whether the request is safe to repeat (``Command.safe``:
reads and absolute sets yes, actions no; the reconnect logic reads it), and the releases
that document the layout (``since``/``until``). Commands whose bytes changed between
releases (ext §2.1) have one entry per layout. Both ends are driven from it: the client
(``devices/client.py``) and the simulated server's dispatcher.

* ``LAYOUTS[name]``: every layout of a command, oldest first.
* ``COMMANDS[name]``: one layout per command, the base reference's (R13742) where it
  documents the command, else the newest.
* ``command_for(name, release)``: the layout a given release speaks (``UnknownCommandError``
  when that release has no such command).
* ``decode_request_strict(name, body, release)``: the server side; the release's layout is
  tried first, then the other layouts of the command, and the one that consumes the body
  exactly wins (older and newer clients differ by body length, ext §2.3). Anything else is
  a ProtocolError naming the byte counts.
* ``decode_response_body`` falls back to another release's layout of the command when the
  expected one does not fit exactly (a client that assumed the wrong release).

Error section (ext §1): every release's manual documents status ``u32`` + size ``i32`` +
text and nothing else, and this codec writes exactly that. nanonisTCP 1.1.5 reads a
different section (an undocumented ``i32`` "error code" after the status with its default
``version`` > 14000, so error texts arrive with the first 4 characters cut or as a
ValueError; with ``version`` <= 14000 it reads a 2-byte status and never sees an error);
that is the client's deviation, not the protocol's. nanonis_spm 1.0.9 and our client read
the documented section.

Wire types (all big-endian):

``u16 u32 i32 f32 f64``  scalars (Python int / float)
``str``                  i32 byte length + bytes (Python str; bytes accepted on encode)
``strarr``               i32 total_bytes + i32 count + count x str (list[str]);
                         total_bytes = sum(4 + len) on encode, ignored on decode;
                         elements must be under 256 bytes (nanonis_spm, §6.2)
``strcnt``               i32 count + count x str (Marks.PointsDraw R13172+)
``strbytes``             i32 total bytes + str until they are used (BiasSpectr.ChsGet
                         R13742-R14254, Marks.PointsGet: no count)
``strs``                 str x the count of an earlier array (``count_of``), no prefix
``str_2d``               i32 rows + i32 cols + rows*cols str (Scan.PropsGet R14573+)
``f32_2d``               i32 rows + i32 cols + row-major f32 (2-D float32 ndarray)
``i32[] u32[] f32[] f64[]``  i32 element count + elements (1-D ndarray); a field with
                         ``count_of="other"`` has no count of its own and shares the
                         length of the earlier array field ``other``

How a server uses it::

    name, size, want_reply = parse_request_header(header40)   # ProtocolError if malformed
    body = recv_exactly(size)
    try:
        layout = command_for(name, release)                   # UnknownCommandError
        _, args = decode_request_strict(name, body, release)  # ProtocolError: wrong body
    except ProtocolError as exc:
        reply = pack_response(name, {}, error=str(exc), command=...)
    else:
        reply = pack_response(name, handler(**args), command=layout)
    if want_reply:
        sock.sendall(reply)                                    # header + body, one write

``pack_response`` always appends the error section and fills every documented return
field (missing ones get zero/empty defaults when ``error`` is set). ``PROPS_GET_EXTENDED``
is the Scan.PropsGet layout nanonisTCP 1.1.5 reads with ``version`` > 14000 (documented by
no release).

A client does the reverse: ``pack_request`` -> ``parse_response_header`` ->
``decode_response_body`` (returns ``(values, status, description)``).

Field names per command are listed in the table; :func:`describe` prints them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_SIZE = 40
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 4096x4096 f32 frame is 64 MiB; anything larger is garbage
MAX_NAME_BYTES = 32
MAX_STRARR_ITEM = 256  # string-array elements must be shorter (nanonis_spm parses lengths < 256 only)

_REQ_HEADER = struct.Struct(">32siHH")
_RSP_HEADER = struct.Struct(">32si4x")
_ERR = struct.Struct(">Ii")
_I32 = struct.Struct(">i")
_I32x2 = struct.Struct(">ii")

_SCALARS: dict[str, struct.Struct] = {
    "u16": struct.Struct(">H"),
    "u32": struct.Struct(">I"),
    "i32": struct.Struct(">i"),
    "f32": struct.Struct(">f"),
    "f64": struct.Struct(">d"),
}
_ARRAYS: dict[str, np.dtype] = {
    "i32[]": np.dtype(">i4"),
    "u32[]": np.dtype(">u4"),
    "f32[]": np.dtype(">f4"),
    "f64[]": np.dtype(">f8"),
    "u8[]": np.dtype("u1"),
}
_NATIVE = {"i32[]": np.int32, "u32[]": np.uint32, "f32[]": np.float32, "f64[]": np.float64, "u8[]": np.uint8}
# str_2d: i32 rows + i32 cols + rows*cols str (list of lists); strs: n str with the count of
# an earlier array (``count_of``); strcnt: i32 count + count x str; strbytes: i32 total
# bytes + str until those bytes are used (no count: BiasSpectr.ChsGet R13742, Marks.PointsGet)
_STRLISTS = {"strs", "strcnt", "strbytes"}
TYPES = frozenset(_SCALARS) | frozenset(_ARRAYS) | {"str", "strarr", "f32_2d", "str_2d"} | _STRLISTS

# Releases whose manuals the reference compares (NANONIS_PROTOCOL_EXT.md §0); the simulator
# emulates any of them, the newest by default.
RELEASES = (10862, 12202, 13172, 13742, 14254, 14573, 14718)
DEFAULT_RELEASE = 14718

# Readable enum values (index = wire value) shared by client and server.
SCAN_ACTIONS = ("start", "stop", "pause", "resume", "freeze", "unfreeze", "center")
MOVEMENT_TYPES = ("forward", "backward", "center", "start")  # Scan.WaitEndOfLine
MOTOR_DIRECTIONS = ("X+", "X-", "Y+", "Y-", "Z+", "Z-")


class ProtocolError(ValueError):
    """Bytes that do not follow the Nanonis framing or a command's layout."""


class UnknownCommandError(ProtocolError, KeyError):
    """A command name that is not in :data:`COMMANDS`."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return ValueError.__str__(self)


class NanonisError(Exception):
    """The controller reported an error (status != 0) for ``command``."""

    def __init__(self, command: str, description: str):
        super().__init__(f"{command}: {description}")
        self.command = command
        self.description = description


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    count_of: str | None = None  # array sharing the element count of an earlier array

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"field {self.name!r}: unknown wire type {self.type!r}")
        if self.count_of is not None and self.type not in _ARRAYS and self.type != "strs":
            raise ValueError(f"field {self.name!r}: count_of only applies to 1-D arrays")
        if self.type == "strs" and self.count_of is None:
            raise ValueError(f"field {self.name!r}: strs needs the array whose count it shares")


@dataclass(frozen=True)
class Command:
    name: str
    request: tuple[Field, ...] = ()
    response: tuple[Field, ...] = ()
    # Values used when a request body ends early (Motor.PosGet from nanonisTCP) and when
    # an encoder is not given the field.
    request_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Trailing request fields that an encoder leaves out unless given (Scan.PropsSet
    # autopaste: newer releases only).
    request_optional: frozenset[str] = frozenset()
    # True when sending the request twice leaves the controller as sending it once (reads,
    # absolute sets); the reconnect logic may repeat such a request after a lost reply.
    safe: bool = True
    # Releases that document this layout (inclusive); other layouts of the same name are
    # further entries of LAYOUTS (NANONIS_PROTOCOL_EXT.md §2).
    since: int = 0
    until: int = 10**9

    def __post_init__(self):
        if len(self.name.encode("ascii")) > MAX_NAME_BYTES:
            raise ValueError(f"command name {self.name!r} longer than {MAX_NAME_BYTES} bytes")

    def fixed_sizes(self) -> tuple[int | None, int | None]:
        """(request, response) body bytes without the error section; None if variable."""

        def size(fields):
            total = 0
            for f in fields:
                if f.type not in _SCALARS:
                    return None
                total += _SCALARS[f.type].size
            return total

        return size(self.request), size(self.response)


def _f(spec: str) -> tuple[Field, ...]:
    """'a:u32 b:f32 c:f32[]@a' -> Fields (``@x`` = shares x's count)."""
    out = []
    for item in spec.split():
        fname, ftype = item.split(":")
        count_of = None
        if "@" in ftype:
            ftype, count_of = ftype.split("@")
        out.append(Field(fname, ftype, count_of))
    return tuple(out)


# Reads and absolute sets are safe to repeat; actions (verbs not ending in Get/Set: Start,
# StartMove, Pulse, Withdraw, Action, *Draw, *Erase, Save, Quit ...) are not, nor these.
_SAFE_ACTIONS = {"Scan.WaitEndOfScan", "Scan.WaitEndOfLine", "Scan.FrameDataGrab"}  # reads that wait
_UNSAFE = {
    "Motor.StepCounterGet",  # may reset the counters
    "ZCtrl.HomePropsSet",  # mode 2 is relative to the present Z
    "TipRec.BufferSizeSet",  # clears the buffer
    "Util.SessionPathSet",
}  # may save settings into the old session


def _cmd(name, req="", rsp="", **kw) -> Command:
    verb = name.split(".", 1)[1]
    kw.setdefault("safe", name not in _UNSAFE and (verb.endswith(("Get", "Set")) or name in _SAFE_ACTIONS))
    return Command(name, _f(req), _f(rsp), **kw)


_FRAME = "center_x:f32 center_y:f32 width:f32 height:f32 angle:f32"
_BUFFER = "channel_indexes:i32[] pixels:i32 lines:i32"
_PROPS_GET = "continuous:u32 bouncy:u32 autosave:u32 series_name:str comment:str"
_SPEED = "fwd_speed:f32 bwd_speed:f32 fwd_time:f32 bwd_time:f32 keep_constant:u16 speed_ratio:f32"
_TIPSHAPER = (
    "switch_off_delay:f32 change_bias:u32 bias:f32 tip_lift:f32 lift_time_1:f32 bias_lift:f32 "
    "bias_settling_time:f32 lift_height:f32 lift_time_2:f32 end_wait_time:f32 restore_feedback:u32"
)

_LINE = "p1_x:f32 p1_y:f32 p2_x:f32 p2_y:f32"
_XYZ_LIMITS = "x_low:f32 x_high:f32 y_low:f32 y_high:f32 z_low:f32 z_high:f32"
_HYST = "fast_x:f32[] fast_y:f32[] slow_x:f32[] slow_y:f32[]"  # every array carries its own count
_ADVPROPS = "reset_bias:u16 z_hold:u16 record_final_z:u16 lockin_run:u16"
_TIMING = (
    "z_avg_time:f32 z_offset:f32 initial_settling:f32 max_slew_rate:f32 settling:f32 integration:f32 "
    "end_settling:f32 z_control_time:f32"
)
_MLS = (
    "bias_start:f32[] bias_end:f32[]@bias_start initial_settling:f32[]@bias_start "
    "settling:f32[]@bias_start integration:f32[]@bias_start steps:i32[]@bias_start "
    "lockin_run:u32[]@bias_start"
)
_TRIG = "mode:u16 channel:u16 slope:u16 level:f64 hysteresis:f64 position:f64"


def _lockin() -> list[Command]:
    """LockIn.Mod*/Demod* Set/Get pairs: a 1-based unit number, then the value(s)."""
    out = []
    for unit, items in (
        (
            "modulator",
            (
                "OnOff:on:u32",
                "Signal:signal:i32",
                "PhasReg:phase_register:i32",
                "Harmonic:harmonic:i32",
                "Phas:phase:f32",
                "Amp:amplitude:f32",
            ),
        ),
        (
            "demodulator",
            (
                "Signal:signal:i32",
                "Harmonic:harmonic:i32",
                "HPFilter:order:i32 cutoff:f32",
                "LPFilter:order:i32 cutoff:f32",
                "PhasReg:phase_register:i32",
                "Phas:phase:f32",
                "SyncFilter:sync_filter:u32",
                "RTSignals:rt_signals:u32",
            ),
        ),
    ):
        prefix = "LockIn.Mod" if unit == "modulator" else "LockIn.Demod"
        for item in items:
            what, fields = item.split(":", 1)
            out.append(_cmd(f"{prefix}{what}Set", f"{unit}:i32 {fields}"))
            out.append(_cmd(f"{prefix}{what}Get", f"{unit}:i32", fields))
    # the phase registers' frequencies (one per frequency generator, 1-8)
    out.append(_cmd("LockIn.ModPhasFreqSet", "modulator:i32 frequency:f64"))
    out.append(_cmd("LockIn.ModPhasFreqGet", "modulator:i32", "frequency:f64"))
    return out


_TABLE = [
    # Bias (base §3.1, ext §3.1)
    _cmd("Bias.Set", "bias:f32"),
    _cmd("Bias.Get", "", "bias:f32"),
    _cmd("Bias.RangeSet", "range_index:u16"),
    _cmd("Bias.RangeGet", "", "ranges:strarr range_index:u16"),
    _cmd("Bias.CalibrSet", "calibration:f32 offset:f32"),
    _cmd("Bias.CalibrGet", "", "calibration:f32 offset:f32"),
    _cmd("Bias.Pulse", "wait:u32 width:f32 bias:f32 z_hold:u16 abs_rel:u16"),
    # Current (base §3.2, ext §3.2)
    _cmd("Current.Get", "", "current:f32"),
    _cmd("Current.100Get", "", "current:f32"),
    _cmd("Current.BEEMGet", "", "current:f32"),
    _cmd("Current.GainSet", "gain_index:i32 filter_index:i32", since=13172),
    _cmd("Current.GainSet", "gain_index:u16", until=12202),
    _cmd("Current.GainsGet", "", "gains:strarr gain_index:i32 filters:strarr filter_index:i32", since=13172),
    _cmd("Current.GainsGet", "", "gains:strarr gain_index:u16", until=12202),
    _cmd("Current.CalibrSet", "gain_index:i32 calibration:f64 offset:f64", since=13742),
    _cmd("Current.CalibrSet", "calibration:f64 offset:f64", until=13172),
    _cmd("Current.CalibrGet", "gain_index:i32", "calibration:f64 offset:f64", since=13742),
    _cmd("Current.CalibrGet", "", "calibration:f64 offset:f64", until=13172),
    # Z-controller (base §3.3, ext §3.3)
    _cmd("ZCtrl.OnOffSet", "status:u32"),
    _cmd("ZCtrl.OnOffGet", "", "status:u32"),
    _cmd("ZCtrl.SetpntSet", "setpoint:f32"),
    _cmd("ZCtrl.SetpntGet", "", "setpoint:f32"),
    _cmd("ZCtrl.ZPosSet", "z:f32"),
    _cmd("ZCtrl.ZPosGet", "", "z:f32"),
    _cmd("ZCtrl.GainSet", "p_gain:f32 time_constant:f32 i_gain:f32"),
    _cmd("ZCtrl.GainGet", "", "p_gain:f32 time_constant:f32 i_gain:f32"),
    _cmd("ZCtrl.SwitchOffDelaySet", "delay:f32"),
    _cmd("ZCtrl.SwitchOffDelayGet", "", "delay:f32"),
    _cmd("ZCtrl.TipLiftSet", "tip_lift:f32"),
    _cmd("ZCtrl.TipLiftGet", "", "tip_lift:f32"),
    _cmd("ZCtrl.Home"),
    _cmd("ZCtrl.HomePropsSet", "mode:u16 home_position:f32"),
    _cmd("ZCtrl.HomePropsGet", "", "mode:u16 home_position:f32"),
    _cmd("ZCtrl.ActiveCtrlSet", "index:i32"),
    _cmd("ZCtrl.CtrlListGet", "", "controllers:strarr index:i32"),
    _cmd("ZCtrl.Withdraw", "wait:u32 timeout_ms:i32"),
    _cmd("ZCtrl.WithdrawRateSet", "slew_rate:f32"),
    _cmd("ZCtrl.WithdrawRateGet", "", "slew_rate:f32"),
    _cmd("ZCtrl.LimitsEnabledSet", "enabled:u32"),
    _cmd("ZCtrl.LimitsEnabledGet", "", "enabled:u32"),
    _cmd("ZCtrl.LimitsSet", "high:f32 low:f32"),
    _cmd("ZCtrl.LimitsGet", "", "high:f32 low:f32"),
    _cmd("ZCtrl.StatusGet", "", "status:u16"),
    # Scan (base §3.4, ext §3.4)
    _cmd("Scan.Action", "action:u16 direction:u32"),
    _cmd("Scan.StatusGet", "", "status:u32"),
    _cmd("Scan.WaitEndOfScan", "timeout_ms:i32", "timed_out:u32 path:str"),
    _cmd("Scan.WaitEndOfLine", "timeout_ms:i32", "timed_out:u32 line:i32 movement:u16 pass_number:i32", since=13742),
    _cmd("Scan.FrameSet", _FRAME),
    _cmd("Scan.FrameGet", "", _FRAME),
    _cmd("Scan.BufferSet", _BUFFER),
    _cmd("Scan.BufferGet", "", _BUFFER),
    # R13742+: module list; R14573+: autopaste (optional, so one entry serves both)
    _cmd(
        "Scan.PropsSet",
        "continuous:u32 bouncy:u32 autosave:u32 series_name:str comment:str modules:strarr autopaste:u32",
        request_defaults={"autopaste": 0},
        request_optional=frozenset({"autopaste"}),
        since=13742,
    ),
    _cmd("Scan.PropsSet", "continuous:u32 bouncy:u32 autosave:u32 series_name:str comment:str", until=13172),
    _cmd(
        "Scan.PropsGet",
        "",
        _PROPS_GET + " modules:strarr module_param_counts:i32[] module_params:str_2d autopaste:u32",
        since=14573,
    ),
    _cmd("Scan.PropsGet", "", _PROPS_GET, until=14254),
    _cmd("Scan.SpeedSet", _SPEED),
    _cmd("Scan.SpeedGet", "", _SPEED),
    _cmd(
        "Scan.FrameDataGrab", "channel_index:u32 data_direction:u32", "channel_name:str data:f32_2d scan_direction:u32"
    ),
    _cmd("Scan.XYPosGet", "wait_newest:u32", "x:f32 y:f32", since=13742),
    _cmd("Scan.Save", "wait:u32 timeout_ms:i32", "timed_out:u32", since=13742),
    _cmd("Scan.BackgroundPaste", "wait:u32 timeout_ms:i32", "timed_out:u32", since=13742),
    _cmd("Scan.BackgroundDelete", "wait:u32 timeout_ms:i32 which:u32", "timed_out:u32", since=13742),
    # Follow Me (base §3.5, ext §3.5)
    _cmd("FolMe.XYPosSet", "x:f64 y:f64 wait:u32"),
    _cmd("FolMe.XYPosGet", "wait_newest:u32", "x:f64 y:f64"),
    _cmd("FolMe.SpeedSet", "speed:f32 custom:u32"),
    _cmd("FolMe.SpeedGet", "", "speed:f32 custom:u32"),
    _cmd("FolMe.OversamplSet", "oversampling:i32"),
    _cmd("FolMe.OversamplGet", "", "oversampling:i32 sample_rate:f32"),
    _cmd("FolMe.Stop"),
    _cmd("FolMe.PSOnOffGet", "", "enabled:u32"),
    _cmd("FolMe.PSOnOffSet", "enabled:u32"),
    _cmd("FolMe.PSExpGet", "", "experiment:u16 experiments:strarr"),
    _cmd("FolMe.PSExpSet", "experiment:u16"),
    _cmd("FolMe.PSPropsGet", "", "auto_resume:u32 own_basename:u32 basename:str external_vi:str pre_delay:f32"),
    _cmd("FolMe.PSPropsSet", "auto_resume:u32 own_basename:u32 basename:str external_vi:str pre_delay:f32"),
    # Piezo (ext §3.6)
    _cmd("Piezo.TiltSet", "tilt_x:f32 tilt_y:f32"),
    _cmd("Piezo.TiltGet", "", "tilt_x:f32 tilt_y:f32"),
    _cmd("Piezo.RangeSet", "range_x:f32 range_y:f32 range_z:f32"),
    _cmd("Piezo.RangeGet", "", "range_x:f32 range_y:f32 range_z:f32"),
    _cmd("Piezo.SensSet", "sens_x:f32 sens_y:f32 sens_z:f32"),
    _cmd("Piezo.SensGet", "", "sens_x:f32 sens_y:f32 sens_z:f32"),
    # on/off enum: R12202-R13742 -1 nc, 0 off, 1 on; R14254+ 0 nc, 1 on, 2 off (same bytes)
    _cmd("Piezo.DriftCompSet", "on:i32 vx:f32 vy:f32 vz:f32 saturation_limit:f32", since=12202),
    _cmd("Piezo.DriftCompSet", "on:u32 vx:f32 vy:f32 vz:f32", until=10862),
    _cmd(
        "Piezo.DriftCompGet",
        "",
        "on:u32 vx:f32 vy:f32 vz:f32 sat_x:u32 sat_y:u32 sat_z:u32 saturation_limit:f32",
        since=12202,
    ),
    _cmd("Piezo.DriftCompGet", "", "on:u32 vx:f32 vy:f32 vz:f32 sat_x:u32 sat_y:u32 sat_z:u32", until=10862),
    _cmd("Piezo.CalibrGet", "", "calib_x:f32 calib_y:f32 calib_z:f32"),
    _cmd(
        "Piezo.HVAInfoGet",
        "",
        "gain_aux:f32 gain_x:f32 gain_y:f32 gain_z:f32 xy_enabled:u32 z_enabled:u32 aux_enabled:u32",
    ),
    _cmd("Piezo.HVAStatusLEDGet", "", "overheated:u32 hv_supply:u32 high_temperature:u32 output_connector:u32"),
    _cmd("Piezo.XYZLimitsSet", "enable:u16 " + _XYZ_LIMITS, since=14573),
    _cmd("Piezo.XYZLimitsGet", "", "enable:u16 " + _XYZ_LIMITS, since=14573),
    _cmd("Piezo.HystOnOffSet", "on:u32", since=14573),
    _cmd("Piezo.HystOnOffGet", "", "on:u32", since=14573),
    _cmd("Piezo.HystValsSet", _HYST, since=14573),
    _cmd("Piezo.HystValsGet", "", _HYST, since=14573),
    _cmd("Piezo.HystFileLoad", "path:str", since=14573),
    _cmd("Piezo.HystFileSave", "path:str", since=14573),
    # Motor (base §3.8, ext §3.7)
    _cmd("Motor.StartMove", "direction:u32 steps:u16 group:u32 wait:u32"),
    _cmd("Motor.StartClosedLoop", "mode:u32 x:f64 y:f64 z:f64 wait:u32 group:u32", since=13742),
    _cmd("Motor.StartClosedLoop", "mode:u32 x:f64 y:f64 z:f64 wait:u32", until=13172),
    _cmd("Motor.StopMove"),
    _cmd(
        "Motor.PosGet",
        "group:u32 timeout_ms:u32",
        "x:f64 y:f64 z:f64",
        request_defaults={"group": 0, "timeout_ms": 500},
        since=13742,
    ),
    _cmd("Motor.PosGet", "", "x:f64 y:f64 z:f64", until=13172),
    _cmd("Motor.StepCounterGet", "reset_x:u32 reset_y:u32 reset_z:u32", "x:i32 y:i32 z:i32"),
    _cmd("Motor.FreqAmpGet", "axis:u16", "frequency:f32 amplitude:f32", since=13742),
    _cmd("Motor.FreqAmpGet", "", "frequency:f32 amplitude:f32", until=13172),
    _cmd("Motor.FreqAmpSet", "frequency:f32 amplitude:f32 axis:u16"),
    # AutoApproach (ext §3.8)
    _cmd("AutoApproach.Open"),
    _cmd("AutoApproach.OnOffSet", "on:u16"),
    _cmd("AutoApproach.OnOffGet", "", "on:u16"),
    # Pattern (ext §3.9)
    _cmd("Pattern.ExpOpen"),
    _cmd("Pattern.ExpStart", "pattern:u16"),
    _cmd("Pattern.ExpPause", "pause:u32"),
    _cmd("Pattern.ExpStop"),
    _cmd("Pattern.ExpStatusGet", "", "running:u32"),
    _cmd("Pattern.GridSet", "make_active:u32 points_x:i32 points_y:i32 use_scan_frame:u32 " + _FRAME),
    _cmd("Pattern.GridGet", "", "points_x:i32 points_y:i32 " + _FRAME),
    _cmd("Pattern.LineSet", "make_active:u32 points:i32 use_scan_frame:u32 " + _LINE),
    _cmd("Pattern.LineGet", "", "points:i32 " + _LINE),
    _cmd("Pattern.CloudSet", "make_active:u32 x:f32[] y:f32[]@x"),
    _cmd("Pattern.CloudGet", "", "x:f32[] y:f32[]@x"),
    _cmd("Pattern.PropsSet", "experiment:str basename:str external_vi:str pre_delay:f32 save_scan_channels:u32"),
    _cmd(
        "Pattern.PropsGet", "", "experiments:strarr experiment:str external_vi:str pre_delay:f32 save_scan_channels:u32"
    ),
    # Marks (ext §3.10); PointsDraw: R13172+ a text count before the texts (nanonis_spm sends
    # a byte-size + count pair instead: the strarr variant)
    _cmd("Marks.PointDraw", "x:f32 y:f32 text:str color:u32"),
    _cmd("Marks.PointsDraw", "x:f32[] y:f32[]@x texts:strcnt colors:u32[]@x", since=13172),
    _cmd("Marks.PointsDraw", "x:f32[] y:f32[]@x texts:strarr colors:u32[]@x", until=-1),  # accepted only
    _cmd("Marks.PointsDraw", "x:f32[] y:f32[]@x texts:strs@x colors:u32[]@x", until=12202),
    _cmd("Marks.LineDraw", "start_x:f32 start_y:f32 end_x:f32 end_y:f32 color:u32"),
    _cmd(
        "Marks.LinesDraw",
        "start_x:f32[] start_y:f32[]@start_x end_x:f32[]@start_x end_y:f32[]@start_x colors:u32[]@start_x",
    ),
    _cmd("Marks.PointsErase", "index:i32"),
    _cmd("Marks.LinesErase", "index:i32"),
    _cmd("Marks.PointsVisibleSet", "index:i32 hide:u16"),
    _cmd("Marks.LinesVisibleSet", "index:i32 hide:u16"),
    _cmd("Marks.PointsGet", "", "x:f32[] y:f32[]@x texts:strbytes colors:u32[]@x visible:u32[]@x"),
    _cmd(
        "Marks.LinesGet",
        "",
        "start_x:f32[] start_y:f32[]@start_x end_x:f32[]@start_x end_y:f32[]@start_x "
        "colors:u32[]@start_x visible:u32[]@start_x",
    ),
    # BiasSpectr (ext §3.11): state only; the spectra come with the spectroscopy issue
    _cmd("BiasSpectr.Open"),
    _cmd("BiasSpectr.Start", "get_data:u32 basename:str", "channel_names:strarr data:f32_2d params:f32[]"),
    _cmd("BiasSpectr.Stop"),
    _cmd("BiasSpectr.StatusGet", "", "running:u32"),
    _cmd("BiasSpectr.ChsSet", "channel_indexes:i32[]"),
    _cmd("BiasSpectr.ChsGet", "", "channel_indexes:i32[] channel_names:strarr", since=14573),
    _cmd("BiasSpectr.ChsGet", "", "channel_indexes:i32[] channel_names:strbytes", since=13742, until=14254),
    _cmd("BiasSpectr.ChsGet", "", "channel_indexes:i32[]", until=13172),
    _cmd(
        "BiasSpectr.PropsSet",
        "save_all:u16 sweeps:i32 backward:u16 points:i32 z_offset:f32 autosave:u16 show_dialog:u16",
    ),
    _cmd(
        "BiasSpectr.PropsGet",
        "",
        "save_all:u16 sweeps:i32 backward:u16 points:i32 parameters:strarr "
        "fixed_parameters:strarr autosave:u16 show_dialog:u16",
        since=13742,
    ),
    _cmd(
        "BiasSpectr.PropsGet",
        "",
        "save_all:u16 sweeps:i32 backward:u16 points:i32 channels:strarr parameters:strarr fixed_parameters:strarr",
        until=13172,
    ),
    _cmd("BiasSpectr.AdvPropsSet", _ADVPROPS),
    _cmd("BiasSpectr.AdvPropsGet", "", _ADVPROPS),
    _cmd("BiasSpectr.LimitsSet", "start:f32 end:f32"),
    _cmd("BiasSpectr.LimitsGet", "", "start:f32 end:f32"),
    _cmd("BiasSpectr.TimingSet", _TIMING),
    _cmd("BiasSpectr.TimingGet", "", _TIMING),
    _cmd("BiasSpectr.DigSyncSet", "mode:u16", since=13742),
    _cmd("BiasSpectr.DigSyncGet", "", "mode:u16", since=13742),
    _cmd("BiasSpectr.TTLSyncSet", "line:u16 polarity:u16 time_to_on:f32 on_duration:f32", since=13742),
    _cmd("BiasSpectr.TTLSyncSet", "enable:u16 line:u16 polarity:u16 time_to_on:f32 on_duration:f32", until=13172),
    _cmd("BiasSpectr.TTLSyncGet", "", "line:u16 polarity:u16 time_to_on:f32 on_duration:f32", since=13742),
    _cmd("BiasSpectr.TTLSyncGet", "", "enable:u16 line:u16 polarity:u16 time_to_on:f32 on_duration:f32", until=13172),
    _cmd("BiasSpectr.PulseSeqSyncSet", "sequence:u16 periods:u32", since=13742),
    _cmd("BiasSpectr.PulseSeqSyncGet", "", "sequence:u16 periods:u32", since=13742),
    _cmd("BiasSpectr.AltZCtrlSet", "enable:u16 setpoint:f32 settling_time:f32"),
    _cmd("BiasSpectr.AltZCtrlGet", "", "enable:u16 setpoint:f32 settling_time:f32"),
    _cmd("BiasSpectr.ZOffRevertSet", "revert:u16", since=13172),
    _cmd("BiasSpectr.ZOffRevertGet", "", "revert:u16", since=13172),
    _cmd("BiasSpectr.MLSLockinPerSegSet", "per_segment:u32"),
    _cmd("BiasSpectr.MLSLockinPerSegGet", "", "per_segment:u32"),
    _cmd("BiasSpectr.MLSModeSet", "mode:str"),
    _cmd("BiasSpectr.MLSModeGet", "", "mode:str"),
    _cmd("BiasSpectr.MLSValsSet", _MLS),
    _cmd("BiasSpectr.MLSValsGet", "", _MLS),
    _cmd("BiasSpectr.SafeCond1Set", "action:u16 threshold:f32 signal:i32 comparison:u16", since=13742),
    _cmd("BiasSpectr.SafeCond1Get", "", "action:u16 threshold:f32 signal:i32 comparison:u16", since=13742),
    _cmd("BiasSpectr.SafeCond2Set", "logic:i32 threshold:f32 signal:i32 comparison:u16", since=13742),
    _cmd("BiasSpectr.SafeCond2Get", "", "logic:i32 threshold:f32 signal:i32 comparison:u16", since=13742),
    # LockIn (ext §3.12): per modulator / demodulator (1-based)
    *_lockin(),
    # Signals (base §3.7, ext §3.13)
    _cmd("Signals.NamesGet", "", "names:strarr"),
    _cmd("Signals.InSlotSet", "slot:i32 rt_index:i32", until=10862),
    _cmd("Signals.InSlotsGet", "", "names:strarr rt_indexes:i32[]", until=10862),
    _cmd("Signals.CalibrGet", "index:i32", "calibration:f32 offset:f32"),
    _cmd("Signals.RangeGet", "index:i32", "maximum:f32 minimum:f32"),
    _cmd("Signals.ValGet", "index:i32 wait_newest:u32", "value:f32"),
    _cmd("Signals.ValsGet", "indexes:i32[] wait_newest:u32", "values:f32[]"),
    _cmd("Signals.MeasNamesGet", "", "names:strarr"),
    _cmd("Signals.AddRTGet", "", "available:strarr internal_23:str internal_24:str"),
    _cmd("Signals.AddRTSet", "internal_23:i32 internal_24:i32"),
    # SafeTip (ext §3.14)
    _cmd("SafeTip.OnOffSet", "on:u16"),
    _cmd("SafeTip.OnOffGet", "", "on:u16"),
    _cmd("SafeTip.SignalGet", "", "value:f32"),
    _cmd("SafeTip.PropsSet", "auto_recovery:u16 auto_pause_scan:u16 threshold:f32"),
    _cmd("SafeTip.PropsGet", "", "auto_recovery:u16 auto_pause_scan:u16 threshold:f32"),
    # TipRec (ext §3.15)
    _cmd("TipRec.BufferSizeSet", "size:i32"),
    _cmd("TipRec.BufferSizeGet", "", "size:i32"),
    _cmd("TipRec.BufferClear"),
    _cmd("TipRec.DataGet", "", "channel_indexes:i32[] data:f32_2d"),
    _cmd("TipRec.DataSave", "clear:u32 basename:str"),
    # UserOut (ext §3.16); Limits*: R14254 appends a raw flag
    _cmd("UserOut.ModeSet", "output:i32 mode:u16"),
    _cmd("UserOut.ModeGet", "output:i32", "mode:u16"),
    _cmd("UserOut.MonitorChSet", "output:i32 signal:i32"),
    _cmd("UserOut.MonitorChGet", "output:i32", "signal:i32"),
    _cmd("UserOut.ValSet", "output:i32 value:f32"),
    _cmd("UserOut.CalibrSet", "output:i32 calibration:f32 offset:f32"),
    _cmd("UserOut.CalcSignalNameSet", "output:i32 name:str"),
    _cmd("UserOut.CalcSignalNameGet", "output:i32", "name:str"),
    _cmd("UserOut.CalcSignalConfigSet", "output:i32 signal_1:u16 operation:u16 signal_2:u16"),
    _cmd("UserOut.CalcSignalConfigGet", "output:i32", "signal_1:u16 operation:u16 signal_2:u16"),
    _cmd("UserOut.LimitsSet", "output:i32 upper:f32 lower:f32 raw:u32", since=14254),
    _cmd("UserOut.LimitsSet", "output:i32 upper:f32 lower:f32", until=13742),
    _cmd("UserOut.LimitsGet", "output:i32 raw:u32", "upper:f32 lower:f32", since=14254),
    _cmd("UserOut.LimitsGet", "output:i32", "upper:f32 lower:f32", until=13742),
    # Util (base §3.9, ext §3.17)
    _cmd("Util.SessionPathGet", "", "path:str"),
    _cmd("Util.SessionPathSet", "path:str save_previous:u32", since=12202),
    _cmd("Util.SettingsLoad", "path:str use_session:u32"),
    _cmd("Util.SettingsSave", "path:str use_session:u32"),
    _cmd("Util.LayoutLoad", "path:str use_session:u32"),
    _cmd("Util.LayoutSave", "path:str use_session:u32"),
    _cmd("Util.Lock"),
    _cmd("Util.UnLock"),
    _cmd("Util.RTFreqSet", "frequency:f32"),
    _cmd("Util.RTFreqGet", "", "frequency:f32"),
    _cmd("Util.AcqPeriodSet", "period:f32"),
    _cmd("Util.AcqPeriodGet", "", "period:f32"),
    _cmd("Util.RTOversamplSet", "oversampling:i32"),
    _cmd("Util.RTOversamplGet", "", "oversampling:i32"),
    _cmd("Util.Quit", "use_stored:u32 settings_name:str layout_name:str save_signals:u32"),
    _cmd("Util.VersionGet", "", "product:str version:str host_release:u32 rt_release:u32", since=13742),
    # Osci2T (ext §3.18); DataGet: R13172 repeats the count before channel B
    _cmd("Osci2T.ChsSet", "channel_a:i32 channel_b:i32"),
    _cmd("Osci2T.ChsGet", "", "channel_a:i32 channel_b:i32"),
    _cmd("Osci2T.TimebaseSet", "index:u16"),
    _cmd("Osci2T.TimebaseGet", "", "index:u16 timebases:f32[]"),
    _cmd("Osci2T.OversamplSet", "index:u16"),
    _cmd("Osci2T.OversamplGet", "", "index:u16"),
    _cmd("Osci2T.TrigSet", _TRIG),
    _cmd("Osci2T.TrigGet", "", _TRIG),
    _cmd("Osci2T.Run"),
    _cmd("Osci2T.DataGet", "which:u16", "t0:f64 dt:f64 a:f64[] b:f64[]", since=13172),
    _cmd("Osci2T.DataGet", "which:u16", "t0:f64 dt:f64 a:f64[] b:f64[]@a", until=12202),
    # Tip shaper (base §3.6)
    _cmd("TipShaper.Start", "wait:u32 timeout_ms:i32"),
    _cmd("TipShaper.PropsSet", _TIPSHAPER),
    _cmd("TipShaper.PropsGet", "", _TIPSHAPER),
]

# Every layout of every command, oldest release first.
LAYOUTS: dict[str, tuple[Command, ...]] = {}
for _c in _TABLE:
    LAYOUTS[_c.name] = tuple(sorted(LAYOUTS.get(_c.name, ()) + (_c,), key=lambda c: (c.since, c.until)))
BASE_RELEASE = 13742  # the release of NANONIS_PROTOCOL.md


def _base_layout(layouts) -> Command:
    documented = [c for c in layouts if c.until >= c.since]
    for c in documented:
        if c.since <= BASE_RELEASE <= c.until:
            return c
    return max(documented, key=lambda c: c.until)


# One layout per command: the base reference's release (R13742) where it documents the
# command, else the newest one that does. A server of another release uses command_for().
COMMANDS: dict[str, Command] = {name: _base_layout(layouts) for name, layouts in LAYOUTS.items()}


def command_for(name: str, release: int = DEFAULT_RELEASE) -> Command:
    """The layout of ``name`` that release ``release`` documents; UnknownCommandError if that
    release has no such command (Signals.InSlotsGet after R10862, Util.VersionGet before R13742)."""
    for c in LAYOUTS.get(name, ()):
        if c.since <= release <= c.until:
            return c
    if name in LAYOUTS:
        raise UnknownCommandError(f"Unknown command: {name} (not in release {release})")
    raise UnknownCommandError(f"Unknown command: {name}")


def release_profile(reported: int) -> int:
    """The covered release whose layouts a controller reporting ``reported`` (Util.VersionGet
    host release) speaks: the newest of RELEASES not after it (the oldest for older ones)."""
    older = [r for r in RELEASES if r <= int(reported)]
    return older[-1] if older else RELEASES[0]


def decode_request_strict(name: str, body, release: int = DEFAULT_RELEASE) -> tuple[Command, dict]:
    """(layout, arguments) of a request body that one known layout of ``name`` consumes exactly.

    The release's own layout is tried first, then the others (older and newer clients differ
    by body length, NANONIS_PROTOCOL_EXT.md §2.3). ProtocolError when none fits, naming the
    byte counts."""
    own = command_for(name, release)
    tried = [own] + [c for c in LAYOUTS[name] if c is not own]
    first_error = None
    for cmd in tried:
        try:
            values, end = decode_fields(cmd.request, body, defaults=cmd.request_defaults, what=f"{name} request")
        except ProtocolError as exc:
            first_error = first_error or exc
            continue
        if end == len(body):
            return cmd, values
    fixed = own.fixed_sizes()[0]
    if fixed is not None:
        fields = ", ".join(f"{f.name} {f.type}" for f in own.request)
        raise ProtocolError(f"{name}: request body of {len(body)} bytes; the layout ({fields}) needs {fixed}")
    raise first_error or ProtocolError(
        f"{name}: request body of {len(body)} bytes does not match any layout ({len(body) - end} surplus bytes)"
    )


# nanonisTCP (version > 14000) layout of Scan.PropsGet (§5): R13742 fields + modules + autopaste.
PROPS_GET_EXTENDED = _cmd("Scan.PropsGet", "", _PROPS_GET + " modules:strarr autopaste:i32")


def describe() -> str:
    """One line per command: name, request fields, response fields."""

    def fmt(fields):
        return ", ".join(f"{f.name}:{f.type}" for f in fields) or "-"

    def rel(c):
        if c.since == 0 and c.until == 10**9:
            return ""
        if c.until < c.since:
            return " [accepted only]"
        return f" [R{c.since or ''}..{'' if c.until == 10**9 else 'R' + str(c.until)}]"

    return "\n".join(
        f"{c.name:30s} req({fmt(c.request)}) -> ({fmt(c.response)}){'' if c.safe else ' (not safe to repeat)'}{rel(c)}"
        for c in _TABLE
    )


def get_command(name: str) -> Command:
    try:
        return COMMANDS[name]
    except KeyError:
        raise UnknownCommandError(f"Unknown command: {name}") from None


# ---------------------------------------------------------------- encoding


def _enc_str(value) -> bytes:
    if isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise ValueError(f"expected str or bytes, got {type(value).__name__}")
    return _I32.pack(len(raw)) + raw


def _enc_field(f: Field, value, out: list, counts: dict) -> None:
    t = f.type
    try:
        if t in _SCALARS:
            if t[0] in "ui":
                value = int(value)  # bool/np.int -> int; struct range-checks it
            out.append(_SCALARS[t].pack(value))
        elif t == "str":
            out.append(_enc_str(value))
        elif t == "strarr":
            if isinstance(value, (str, bytes)):
                raise ValueError("expected a sequence of strings, got one string")
            items = [_enc_str(v) for v in value]
            long = [len(i) - 4 for i in items if len(i) - 4 >= MAX_STRARR_ITEM]
            if long:  # nanonis_spm misreads element lengths >= 256 (NANONIS_PROTOCOL.md §6.2)
                raise ValueError(f"string-array elements must be under {MAX_STRARR_ITEM} bytes, got {long[0]}")
            out.append(_I32x2.pack(sum(len(i) for i in items), len(items)))
            out.extend(items)
        elif t in _STRLISTS or t == "str_2d":
            if isinstance(value, (str, bytes)):
                raise ValueError("expected a sequence of strings, got one string")
            if t == "str_2d":
                rows = [list(r) for r in value]
                cols = len(rows[0]) if rows else 0
                if any(len(r) != cols for r in rows):
                    raise ValueError("rows of different lengths")
                out.append(_I32x2.pack(len(rows), cols))
                out.extend(_enc_str(v) for r in rows for v in r)
                return
            items = [_enc_str(v) for v in value]
            if t == "strs":
                if counts.get(f.count_of) != len(items):
                    raise ValueError(f"{len(items)} strings differ from {f.count_of!r} ({counts.get(f.count_of)})")
            elif t == "strcnt":
                out.append(_I32.pack(len(items)))
            else:  # strbytes
                out.append(_I32.pack(sum(len(i) for i in items)))
            out.extend(items)
        elif t in _ARRAYS:
            arr = np.asarray(value)
            if arr.ndim != 1:
                raise ValueError(f"expected a 1-D array, got shape {arr.shape}")
            if arr.dtype.kind == "f" and t[0] in "iu":
                raise ValueError("expected integers, got floats")
            if f.count_of is None:
                out.append(_I32.pack(arr.size))
            elif counts.get(f.count_of) != arr.size:
                raise ValueError(f"length {arr.size} differs from {f.count_of!r} ({counts.get(f.count_of)})")
            counts[f.name] = arr.size
            out.append(arr.astype(_ARRAYS[t], copy=False).tobytes())
        elif t == "f32_2d":
            arr = np.asarray(value)
            if arr.ndim != 2:
                raise ValueError(f"expected a 2-D array, got shape {arr.shape}")
            out.append(_I32x2.pack(*arr.shape))
            # a flat byte view, not tobytes(): the final join is the only copy
            if arr.size:
                out.append(memoryview(np.ascontiguousarray(arr, dtype=">f4")).cast("B"))
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"field {f.name!r} ({t}): bad value {_short(value)}: {exc}") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_mapping(fields: Sequence[Field], values, what: str) -> Mapping:
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return values
    values = tuple(values)
    if len(values) > len(fields):
        raise ValueError(f"{what}: {len(values)} values given for {len(fields)} fields")
    return {f.name: v for f, v in zip(fields, values)}


def _default(f: Field):
    if f.type in _SCALARS:
        return 0.0 if f.type[0] == "f" else 0
    if f.type == "str":
        return ""
    if f.type == "strarr":
        return []
    if f.type in _ARRAYS:
        return np.zeros(0, _NATIVE[f.type])
    if f.type in _STRLISTS or f.type == "str_2d":
        return []
    return np.zeros((0, 0), np.float32)


def encode_body(
    fields: Sequence[Field],
    values: Mapping,
    *,
    defaults: Mapping = None,
    optional: frozenset = frozenset(),
    fill_missing: bool = False,
    what: str = "",
) -> bytes:
    """Body bytes for ``fields`` from ``values`` (a mapping by field name)."""
    return b"".join(
        _encode_parts(fields, values, defaults=defaults, optional=optional, fill_missing=fill_missing, what=what)
    )


def _encode_parts(fields, values, *, defaults=None, optional=frozenset(), fill_missing=False, what="") -> list[bytes]:
    defaults = defaults or {}
    unknown = set(values) - {f.name for f in fields}
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {sorted(unknown)}; expected {[f.name for f in fields]}")
    out: list[bytes] = []
    counts: dict[str, int] = {}
    for f in fields:
        if f.name in values:
            value = values[f.name]
        elif f.name in optional:
            continue
        elif f.name in defaults:
            value = defaults[f.name]
        elif fill_missing:
            value = _default(f)
            if f.count_of is not None:
                n = counts.get(f.count_of, 0)
                value = [""] * n if f.type == "strs" else np.zeros(n, _NATIVE[f.type])
        else:
            raise ValueError(f"{what}: missing value for field {f.name!r}")
        _enc_field(f, value, out, counts)
    return out


def _name_bytes(name: str) -> bytes:
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"command name {name!r} is not ASCII") from None
    if not raw or len(raw) > MAX_NAME_BYTES or b"\x00" in raw:
        raise ValueError(f"command name {name!r} must be 1-{MAX_NAME_BYTES} ASCII characters without NUL")
    return raw


def pack_request(name: str, values=None, want_reply: bool = True, *, command: Command | None = None) -> bytes:
    """Header + body of a request; ``values`` is a mapping or a sequence in field order."""
    cmd = command or get_command(name)
    vals = _as_mapping(cmd.request, values, name)
    parts = _encode_parts(
        cmd.request, vals, defaults=cmd.request_defaults, optional=cmd.request_optional, what=f"{name} request"
    )
    size = sum(len(p) for p in parts)
    return b"".join([_REQ_HEADER.pack(_name_bytes(name), size, 1 if want_reply else 0, 0), *parts])


def error_section(error: str | bytes | None) -> bytes:
    if error is None:
        return _ERR.pack(0, 0)
    raw = error.encode("utf-8", "replace") if isinstance(error, str) else bytes(error)
    return _ERR.pack(1, len(raw)) + raw


def pack_response(name: str, values=None, error: str | None = None, command: Command | None = None) -> bytes:
    """Header + return fields + error section in one bytes object.

    With ``error`` set, every return field not given is zero/empty-filled (§2.3 [ours]).
    An unknown command (not in the table, no ``command``) gets the error section only.
    """
    cmd = command or COMMANDS.get(name)
    if cmd is None:
        if error is None:
            raise UnknownCommandError(f"Unknown command: {name}")
        parts = [error_section(error)]
    else:
        vals = _as_mapping(cmd.response, values, name)
        parts = _encode_parts(cmd.response, vals, fill_missing=error is not None, what=f"{name} response")
        parts.append(error_section(error))
    size = sum(len(p) for p in parts)
    if size > MAX_BODY_BYTES:
        raise ValueError(f"{name} response body of {size} bytes exceeds {MAX_BODY_BYTES}")
    # One join: a 1 MiB frame is copied once here, not once per concatenation.
    return b"".join([_RSP_HEADER.pack(_name_bytes(name), size), *parts])


# ---------------------------------------------------------------- decoding


def _name_from(raw: bytes) -> str:
    raw = raw.split(b"\x00", 1)[0]
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"command name is not ASCII: {raw[:32]!r}") from None
    if not name or not name.isprintable():
        raise ProtocolError(f"bad command name in header: {raw[:32]!r}")
    return name


def _check_header(b, kind: str) -> None:
    if len(b) != HEADER_SIZE:
        raise ProtocolError(f"{kind} header must be {HEADER_SIZE} bytes, got {len(b)}")


def _check_size(name: str, size: int) -> None:
    if size < 0:
        raise ProtocolError(f"{name}: negative body size {size}")
    if size > MAX_BODY_BYTES:
        raise ProtocolError(f"{name}: body size {size} exceeds the {MAX_BODY_BYTES}-byte limit")


def parse_request_header(b: bytes) -> tuple[str, int, bool]:
    """(name, body_size, want_reply) from a 40-byte request header."""
    _check_header(b, "request")
    raw, size, flag, _reserved = _REQ_HEADER.unpack(b)
    name = _name_from(raw)
    _check_size(name, size)
    return name, size, flag != 0


def parse_response_header(b: bytes) -> tuple[str, int]:
    """(name, body_size) from a 40-byte response header; the body includes the error section."""
    _check_header(b, "response")
    raw, size = _RSP_HEADER.unpack(b)
    name = _name_from(raw)
    _check_size(name, size)
    if size < 8:
        raise ProtocolError(f"{name}: response body of {size} bytes cannot hold the 8-byte error section")
    return name, size


class _Short(Exception):
    pass


def _need(body, pos: int, n: int, f: Field):
    if n < 0 or pos + n > len(body):
        raise _Short(f"{f.name!r} ({f.type}) needs {n} bytes at offset {pos}, body has {len(body)}")


def _dec_str(body, pos: int, f: Field) -> tuple[str, int]:
    _need(body, pos, 4, f)
    (n,) = _I32.unpack_from(body, pos)
    pos += 4
    _need(body, pos, n, f)
    return bytes(body[pos : pos + n]).decode("utf-8", "replace"), pos + n


def decode_fields(
    fields: Sequence[Field], body, pos: int = 0, *, defaults: Mapping = None, what: str = ""
) -> tuple[dict, int]:
    """Decode ``fields`` from ``body`` starting at ``pos``; returns (values, end offset).

    A body ending exactly before a field that has a default takes the default; any other
    shortfall raises ProtocolError naming the field.
    """
    defaults = defaults or {}
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for f in fields:
        t = f.type
        if pos >= len(body) and f.name in defaults:
            out[f.name] = defaults[f.name]
            continue
        try:
            if t in _SCALARS:
                st = _SCALARS[t]
                _need(body, pos, st.size, f)
                (out[f.name],) = st.unpack_from(body, pos)
                pos += st.size
            elif t == "str":
                out[f.name], pos = _dec_str(body, pos, f)
            elif t == "strarr":
                _need(body, pos, 8, f)
                _total, count = _I32x2.unpack_from(body, pos)  # total_bytes ignored (§2.4)
                pos += 8
                if count < 0:
                    raise _Short(f"{f.name!r}: negative element count {count}")
                _need(body, pos, 4 * count, f)  # bounds count before looping
                items = []
                for _ in range(count):
                    s, pos = _dec_str(body, pos, f)
                    items.append(s)
                out[f.name] = items
            elif t in ("strs", "strcnt"):
                if t == "strs":
                    n = counts[f.count_of]
                else:
                    _need(body, pos, 4, f)
                    (n,) = _I32.unpack_from(body, pos)
                    pos += 4
                if n < 0:
                    raise _Short(f"{f.name!r}: negative element count {n}")
                _need(body, pos, 4 * n, f)
                items = []
                for _ in range(n):
                    item, pos = _dec_str(body, pos, f)
                    items.append(item)
                out[f.name] = items
            elif t == "strbytes":
                _need(body, pos, 4, f)
                (n,) = _I32.unpack_from(body, pos)
                pos += 4
                _need(body, pos, n, f)
                stop, items = pos + n, []
                while pos < stop:
                    item, pos = _dec_str(body[:stop], pos, f)
                    items.append(item)
                out[f.name] = items
            elif t == "str_2d":
                _need(body, pos, 8, f)
                rows, cols = _I32x2.unpack_from(body, pos)
                pos += 8
                if rows < 0 or cols < 0:
                    raise _Short(f"{f.name!r}: negative shape {rows}x{cols}")
                _need(body, pos, 4 * rows * cols, f)
                table = []
                for _ in range(rows):
                    row = []
                    for _ in range(cols):
                        item, pos = _dec_str(body, pos, f)
                        row.append(item)
                    table.append(row)
                out[f.name] = table
            elif t in _ARRAYS:
                if f.count_of is None:
                    _need(body, pos, 4, f)
                    (n,) = _I32.unpack_from(body, pos)
                    pos += 4
                else:
                    n = counts[f.count_of]
                if n < 0:
                    raise _Short(f"{f.name!r}: negative element count {n}")
                dt = _ARRAYS[t]
                _need(body, pos, n * dt.itemsize, f)
                out[f.name] = np.frombuffer(body, dt, n, pos).astype(_NATIVE[t])
                counts[f.name] = n
                pos += n * dt.itemsize
            elif t == "f32_2d":
                _need(body, pos, 8, f)
                rows, cols = _I32x2.unpack_from(body, pos)
                pos += 8
                if rows < 0 or cols < 0:
                    raise _Short(f"{f.name!r}: negative shape {rows}x{cols}")
                _need(body, pos, 4 * rows * cols, f)
                out[f.name] = np.frombuffer(body, ">f4", rows * cols, pos).reshape(rows, cols).astype(np.float32)
                pos += 4 * rows * cols
        except _Short as exc:
            raise ProtocolError(f"{what}: truncated body: {exc}") from None
    return out, pos


def decode_request_body(name: str, body, *, command: Command | None = None) -> dict:
    """Request arguments as a dict. Surplus bytes are ignored (newer clients append
    fields); a short body uses the command's defaults or raises ProtocolError."""
    cmd = command or get_command(name)
    values, _ = decode_fields(cmd.request, body, defaults=cmd.request_defaults, what=f"{name} request")
    return values


def parse_error_section(body, pos: int) -> tuple[int, str]:
    """(status, description) of the error section at ``pos``, which must end the body."""
    if len(body) - pos < 8:
        raise ProtocolError(f"error section needs 8 bytes at offset {pos}, {len(body) - pos} left")
    status, n = _ERR.unpack_from(body, pos)
    if n < 0 or pos + 8 + n != len(body):
        raise ProtocolError(
            f"error section at offset {pos}: description size {n} does not match the {len(body) - pos - 8} bytes left"
        )
    return status, bytes(body[pos + 8 :]).decode("utf-8", "replace")


def is_error_section(body, pos: int) -> bool:
    """True when the bytes from ``pos`` are exactly one well-formed error section."""
    try:
        parse_error_section(body, pos)
    except ProtocolError:
        return False
    return True


def decode_response_body(name: str, body, command: Command | None = None) -> tuple[dict, int, str]:
    """(values, error_status, error_description) of a response body.

    The return fields must be followed by exactly one error section. A failed reply that
    carries only the error section (unknown command, or a server that drops the fields)
    gives ``({}, status, description)``.
    """
    cmd = command or COMMANDS.get(name)
    fields = cmd.response if cmd is not None else ()
    try:
        values, pos = decode_fields(fields, body, what=f"{name} response")
        status, desc = parse_error_section(body, pos)
        return values, status, desc
    except ProtocolError as exc:
        if fields and is_error_section(body, 0):
            status, desc = parse_error_section(body, 0)
            if status != 0:
                return {}, status, desc
        # Another release's layout of the same command that fits exactly (a server of an
        # older or newer release than the client assumed, NANONIS_PROTOCOL_EXT.md §2).
        for other in LAYOUTS.get(name, ()):
            if other.response == fields:
                continue
            try:
                values, pos = decode_fields(other.response, body, what=f"{name} response")
                status, desc = parse_error_section(body, pos)
            except ProtocolError:
                continue
            return values, status, desc
        raise ProtocolError(f"{name} response: {exc}") from None


# ------------------------------------------- convenience forms named in docs/interfaces.md


def encode_request(name: str, *args, want_reply: bool = True) -> bytes:
    """``pack_request`` with positional arguments in field order."""
    return pack_request(name, args, want_reply)


def decode_request(message: bytes) -> tuple[str, dict, bool]:
    """(name, arguments, want_reply) of a whole request message (header + body)."""
    name, size, want_reply = parse_request_header(bytes(message[:HEADER_SIZE]))
    body = message[HEADER_SIZE:]
    if len(body) != size:
        raise ProtocolError(f"{name}: header announces {size} body bytes, message has {len(body)}")
    return name, decode_request_body(name, body), want_reply


def encode_response(name: str, *values, error: str | None = None) -> bytes:
    """``pack_response`` with positional return values in field order."""
    return pack_response(name, values, error)


def decode_response(message: bytes, command: Command | None = None) -> tuple[str, dict, int, str]:
    """(name, values, error_status, error_description) of a whole response message."""
    name, size = parse_response_header(bytes(message[:HEADER_SIZE]))
    body = message[HEADER_SIZE:]
    if len(body) != size:
        raise ProtocolError(f"{name}: header announces {size} body bytes, message has {len(body)}")
    values, status, desc = decode_response_body(name, body, command)
    return name, values, status, desc
