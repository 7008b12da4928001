"""Every command of the table served by the simulator, through our codec, nanonisTCP 1.1.5 at
release settings on both sides of 14000, nanonis_spm 1.0.9, and one scripted session
(NANONIS_PROTOCOL_EXT.md §2-§4). One server per release for the whole module."""

from __future__ import annotations

import contextlib
import io
import math
import socket
import struct

import numpy as np
import pytest

from stm_live.devices import protocol as P
from stm_live.simulators import modules as M
from stm_live.simulators.server import start_server_thread

pytestmark = pytest.mark.timeout(120)
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    out = {}
    for release in (13742, 14718):
        out[release] = start_server_thread(
            seed=0, time_scale=50.0, nanonis_release=release, save_dir=tmp_path_factory.mktemp(f"session{release}")
        )
    yield out
    for s in out.values():
        s.stop()


class Raw:
    """Our codec over a plain socket: (values, status, text) per call."""

    def __init__(self, server, release):
        self.sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT_S)
        self.release = release

    def call(self, name, values=None, *, body=None):
        try:
            cmd = P.command_for(name, self.release)
        except P.UnknownCommandError:  # not in this release: send it anyway
            cmd = P.Command(name)
        msg = (
            P.pack_request(name, values, command=cmd)
            if body is None
            else (struct.pack(">32siHH", name.encode(), len(body), 1, 0) + body)
        )
        self.sock.sendall(msg)
        head = self._read(40)
        _, size = P.parse_response_header(head)
        return P.decode_response_body(name, self._read(size), cmd)

    def ok(self, name, values=None):
        vals, status, text = self.call(name, values)
        assert status == 0, f"{name}: {text}"
        return vals

    def _read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "server closed the connection"
            buf += chunk
        return buf

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module", params=[13742, 14718])
def raw(request, servers):
    r = Raw(servers[request.param], request.param)
    yield r
    r.close()


def _sample(f: P.Field, n=2):
    return {
        "u16": 1,
        "u32": 1,
        "i32": 1,
        "f32": 1e-9,
        "f64": 1e-9,
        "str": "",
        "strarr": ["a"],
        "i32[]": np.arange(n, dtype=np.int32),
        "u32[]": np.ones(n, np.uint32),
        "f32[]": np.full(n, 1e-9, np.float32),
        "f64[]": np.zeros(n),
        "strs": ["a"] * n,
        "strcnt": ["a"] * n,
        "strbytes": ["a"] * n,
        "str_2d": [["a"]],
        "f32_2d": np.zeros((1, 1), np.float32),
    }[f.type]


ACTIONS_SKIPPED = {"Util.Quit"}  # closes the connection (tested below)


def test_table_has_every_reference_command_and_safe_flags():
    assert len(P.COMMANDS) == 246  # NANONIS_PROTOCOL_EXT.md §4 total
    assert P.COMMANDS["Bias.Get"].safe and P.COMMANDS["ZCtrl.LimitsSet"].safe
    for name in (
        "Bias.Pulse",
        "Motor.StartMove",
        "ZCtrl.Withdraw",
        "Scan.Action",
        "Marks.PointDraw",
        "TipShaper.Start",
        "Motor.StepCounterGet",
        "Util.Quit",
    ):
        assert not P.COMMANDS[name].safe, name


@pytest.mark.parametrize("name", sorted(P.LAYOUTS))
def test_every_command_answered(raw, name):
    """No command of the release is unknown or crashes the handler; a refused one says why."""
    if name in ACTIONS_SKIPPED:
        return
    try:
        cmd = P.command_for(name, raw.release)
    except P.UnknownCommandError:  # not in this release: the reply says so
        _, status, text = raw.call(name, body=b"")
        assert status == 1 and "Unknown command" in text
        return
    values = {f.name: _sample(f) for f in cmd.request}
    if "timeout_ms" in values:
        values["timeout_ms"] = 50
    _vals, status, text = raw.call(name, values)
    assert "internal error" not in text and "Unknown" not in text, f"{name}: {text}"
    if status:
        assert text, name


PLAIN_SETS = sorted(n for n in M.PLAIN if n.endswith("Set") and n[:-3] + "Get" in M.PLAIN)


def _perturb(group, field, old):
    rule = M.CHECKS.get(group, {}).get(field)
    if isinstance(old, np.ndarray):
        return (old + 1).astype(old.dtype)
    if isinstance(old, str):
        return "MLS" if rule else "renamed"
    if rule == "shift":
        return old + 2  # stored as old + 1
    if rule in ("nc12", "nc2"):
        return 1 if old != 1 else 2
    if isinstance(rule, tuple) and not isinstance(rule[0], str):
        lo, hi = rule
        if isinstance(old, int):
            return hi if old != hi else lo
        return (lo + hi) / 2 if not math.isclose(old, (lo + hi) / 2) else lo
    return old + 1 if isinstance(old, int) else old * 0.5 + 0.25


@pytest.mark.parametrize("set_name", PLAIN_SETS)
def test_plain_set_changes_get(raw, set_name):
    group = M.PLAIN[set_name]
    get_name = set_name[:-3] + "Get"
    try:
        set_cmd, get_cmd = P.command_for(set_name, raw.release), P.command_for(get_name, raw.release)
    except P.UnknownCommandError:  # newer than this release: refused as unknown
        assert "Unknown command" in raw.call(set_name, body=b"")[2]
        return
    index = {f.name: 1 for f in get_cmd.request}
    before = raw.ok(get_name, index)
    values = dict(index)
    for f in set_cmd.request:
        if f.name not in values:
            values[f.name] = _perturb(group, f.name, before[f.name])
    raw.ok(set_name, values)
    after = raw.ok(get_name, index)
    changed = [k for k in after if not np.array_equal(np.asarray(after[k]), np.asarray(before[k]))]
    assert changed, f"{set_name} changed nothing that {get_name} reports"


@pytest.mark.parametrize(
    "name,values,match",
    [
        ("ZCtrl.SwitchOffDelaySet", {"delay": -1.0}, "outside"),
        ("LockIn.ModAmpSet", {"modulator": 9, "amplitude": 0.1}, "modulator 9"),
        ("Piezo.RangeSet", {"range_x": -1.0, "range_y": 1e-6, "range_z": 1e-7}, "piezo ranges"),
        ("Motor.FreqAmpSet", {"frequency": 0.0, "amplitude": 10.0, "axis": 0}, "frequency"),
        (
            "Pattern.GridSet",
            {
                "make_active": 1,
                "points_x": 0,
                "points_y": 5,
                "use_scan_frame": 0,
                "center_x": 0,
                "center_y": 0,
                "width": 1e-8,
                "height": 1e-8,
                "angle": 0,
            },
            "points",
        ),
        ("Bias.RangeSet", {"range_index": 7}, "bias range"),
        ("SafeTip.OnOffSet", {"on": 5}, "no change"),
    ],
)
def test_out_of_range_values_get_error_replies(raw, name, values, match):
    _, status, text = raw.call(name, values)
    assert status == 1 and match in text


def test_bad_bodies_get_error_replies_and_other_connections_live(raw, servers):
    _, status, text = raw.call("Piezo.TiltSet", body=b"\x00" * 5)  # wrong size
    assert status == 1 and "Piezo.TiltSet" in text
    _, status, text = raw.call("Pattern.CloudSet", body=struct.pack(">Ii", 1, 1000))  # count past the end
    assert status == 1 and "truncated" in text
    _, status, text = raw.call("Marks.PointDraw", body=struct.pack(">ffi", 0, 0, -4))  # negative length
    assert status == 1
    other = Raw(servers[raw.release], raw.release)
    try:
        assert other.ok("Bias.Get")["bias"] == pytest.approx(raw.ok("Bias.Get")["bias"])
    finally:
        other.close()


def test_release_layouts_and_version(raw):
    v = raw.ok("Util.VersionGet")
    assert v["host_release"] == raw.release
    props = raw.ok("Scan.PropsGet")
    assert ("autopaste" in props) == (raw.release >= 14573)
    # older client forms are accepted by body length (§2.3)
    assert raw.call("Current.GainSet", body=struct.pack(">H", 2))[1] == 0
    assert raw.ok("Current.GainsGet")["gain_index"] == 2
    assert raw.call("Motor.PosGet", body=b"")[1] == 0
    assert raw.call("UserOut.LimitsGet", body=struct.pack(">i", 1))[1] == 0


def test_state_wired_to_physics(raw):
    raw.ok("Bias.Set", {"bias": 0.3})
    assert raw.ok("Signals.ValGet", {"index": 24, "wait_newest": 0})["value"] == pytest.approx(0.3)
    raw.ok("ZCtrl.OnOffSet", {"status": 1})
    assert raw.ok("ZCtrl.StatusGet")["status"] == 2
    raw.ok("ZCtrl.Withdraw", {"wait": 1, "timeout_ms": 1000})
    assert raw.ok("ZCtrl.StatusGet")["status"] == 1
    raw.ok("ZCtrl.HomePropsSet", {"mode": 1, "home_position": 2e-9})
    raw.ok("ZCtrl.Home")
    assert raw.ok("ZCtrl.ZPosGet")["z"] == pytest.approx(2e-9)
    raw.ok("Piezo.RangeSet", {"range_x": 5e-6, "range_y": 5e-6, "range_z": 1e-7})
    assert raw.ok("Piezo.SensGet")["sens_z"] == pytest.approx(1e-7 / 150, rel=1e-5)
    assert raw.ok("ZCtrl.LimitsGet")["high"] == pytest.approx(1e-7)  # limits off: the piezo range
    raw.ok("AutoApproach.OnOffSet", {"on": 1})
    assert raw.ok("ZCtrl.OnOffGet")["status"] == 1
    fx, fy = raw.ok("FolMe.XYPosGet", {"wait_newest": 0}).values()
    sx, sy = raw.ok("Scan.XYPosGet", {"wait_newest": 0}).values()
    assert (sx, sy) == pytest.approx((fx, fy), abs=1e-12)


def test_motor_counters_and_closed_loop(raw):
    raw.ok("Motor.StepCounterGet", {"reset_x": 1, "reset_y": 1, "reset_z": 1})
    raw.ok("Motor.StartMove", {"direction": 0, "steps": 10, "group": 0, "wait": 1})
    raw.ok("Motor.StartMove", {"direction": 3, "steps": 4, "group": 0, "wait": 1})
    assert list(raw.ok("Motor.StepCounterGet", {"reset_x": 0, "reset_y": 0, "reset_z": 0}).values()) == [10, -4, 0]
    raw.ok("ZCtrl.OnOffSet", {"status": 1})
    _, status, text = raw.call("Motor.StartClosedLoop", {"mode": 1, "x": 0, "y": 0, "z": 0, "wait": 1, "group": 0})
    assert status == 1 and "withdrawn" in text
    raw.ok("ZCtrl.Withdraw", {"wait": 1, "timeout_ms": 1000})
    raw.ok("Motor.StartClosedLoop", {"mode": 1, "x": 1e-6, "y": 2e-6, "z": 0, "wait": 1, "group": 0})
    assert raw.ok("Motor.PosGet", {"group": 0, "timeout_ms": 100})["y"] == pytest.approx(2e-6)


def test_marks_and_pattern_lists(raw):
    raw.ok("Marks.PointsErase", {"index": -1})
    raw.ok("Marks.PointDraw", {"x": 1e-9, "y": 2e-9, "text": "A", "color": 0xFF0000})
    raw.ok("Marks.PointsDraw", {"x": [0.0, 1e-9], "y": [0.0, 1e-9], "texts": ["B", "C"], "colors": [1, 2]})
    raw.ok("Marks.PointsVisibleSet", {"index": 1, "hide": 1})
    pts = raw.ok("Marks.PointsGet")
    assert pts["texts"] == ["A", "B", "C"] and list(pts["visible"]) == [1, 0, 1]
    raw.ok("Pattern.CloudSet", {"make_active": 1, "x": [1e-9, 2e-9], "y": [3e-9, 4e-9]})
    np.testing.assert_allclose(raw.ok("Pattern.CloudGet")["y"], [3e-9, 4e-9], rtol=1e-6)


def test_drift_compensation_enum_follows_release(raw):
    on = 1
    raw.ok("Piezo.DriftCompSet", {"on": on, "vx": 1e-10, "vy": 0.0, "vz": 0.0, "saturation_limit": 10.0})
    assert raw.ok("Piezo.DriftCompGet")["on"] == 1
    nc = 0 if raw.release >= 14254 else -1
    raw.ok("Piezo.DriftCompSet", {"on": nc, "vx": 0.0, "vy": 0.0, "vz": 0.0, "saturation_limit": 10.0})
    assert raw.ok("Piezo.DriftCompGet")["on"] == 1  # "no change" kept it on
    off = 2 if raw.release >= 14254 else 0
    raw.ok("Piezo.DriftCompSet", {"on": off, "vx": 0.0, "vy": 0.0, "vz": 0.0, "saturation_limit": 10.0})
    assert raw.ok("Piezo.DriftCompGet")["on"] == 0


def test_quit_closes_only_that_connection(servers):
    r = Raw(servers[14718], 14718)
    assert r.call("Util.Quit", {"use_stored": 0, "settings_name": "", "layout_name": "", "save_signals": 0})[1] == 0
    assert r.sock.recv(1) == b""
    r.close()
    other = Raw(servers[14718], 14718)
    assert other.ok("Util.VersionGet")["host_release"] == 14718
    other.close()


# ------------------------------------------------------------------ nanonisTCP 1.1.5

ntcp_mod = pytest.importorskip("nanonisTCP")

# (module class, method, args, check on the returned value or None)
NTCP_CALLS = [
    ("Bias", "Set", (0.5,), None),
    ("Bias", "Get", (), lambda v: v == pytest.approx(0.5)),
    ("Current", "Get", (), None),
    ("Current", "BEEMGet", (), None),
    ("ZController", "GainSet", (0.2, 1e-3), None),
    ("ZController", "GainGet", (), lambda v: v[0] == pytest.approx(0.2)),
    ("ZController", "SwitchOffDelaySet", (0.1,), None),
    ("ZController", "SwitchOffDelayGet", (), lambda v: v == pytest.approx(0.1)),
    ("ZController", "TipLiftSet", (1e-10,), None),
    ("ZController", "TipLiftGet", (), None),
    ("ZController", "HomePropsGet", (), None),
    ("ZController", "CtrlListGet", (), None),
    ("ZController", "WithdrawRateSet", (2e-7,), None),
    ("ZController", "WithdrawRateGet", (), lambda v: v == pytest.approx(2e-7)),
    ("ZController", "LimitsEnabledSet", (1,), None),
    ("ZController", "LimitsSet", (5e-8, 1e-9), None),
    ("ZController", "LimitsGet", (), None),
    ("ZController", "StatusGet", (), None),
    ("Piezo", "RangeGet", (), lambda v: v[0] > 0),
    ("Piezo", "TiltSet", (1.0, 2.0), None),
    ("Piezo", "TiltGet", (), lambda v: list(v) == pytest.approx([1.0, 2.0])),
    ("Piezo", "DriftCompGet", (), None),
    ("FolMe", "OversamplSet", (4,), None),
    ("FolMe", "OversamplGet", (), None),
    ("FolMe", "PSOnOffSet", (1,), None),
    ("FolMe", "PSOnOffGet", (), None),
    ("FolMe", "Stop", (), None),
    ("Motor", "FreqAmpSet", (800.0, 50.0), None),
    ("Motor", "FreqAmpGet", (), None),
    ("Motor", "StepCounterGet", (), None),
    ("Motor", "PosGet", (), None),
    ("Motor", "StopMove", (), None),
    ("AutoApproach", "Open", (), None),
    ("AutoApproach", "OnOffGet", (), None),
    ("Pattern", "GridSet", (7, 9, 1e-9, 2e-9, 2e-8, 3e-8, 0.0), None),
    ("Pattern", "GridGet", (), None),
    ("Pattern", "LineSet", (11, 0.0, 0.0, 1e-8, 1e-8), None),
    ("Pattern", "LineGet", (), None),
    ("Pattern", "CloudSet", ([1e-9, 2e-9], [1e-9, 3e-9]), None),
    ("Pattern", "CloudGet", (), None),
    ("Pattern", "PropsSet", ("Bias Spectroscopy ASCII", "grid", 0.1), None),
    ("Pattern", "PropsGet", (), None),
    ("Pattern", "ExpStatusGet", (), None),
    ("Marks", "PointDraw", ([1e-9, 1e-9], "x"), None),
    ("Marks", "LineDraw", ([0, 0], [1e-9, 1e-9]), None),
    ("Marks", "PointsErase", (), None),
    ("Marks", "LinesErase", (), None),
    ("SafeTip", "OnOffSet", (1,), None),
    ("SafeTip", "OnOffGet", (), None),
    ("SafeTip", "SignalGet", (), None),
    ("SafeTip", "PropsSet", (1, 0, 2e-8), None),
    ("SafeTip", "PropsGet", (), None),
    ("TipRec", "BufferSizeSet", (500,), None),
    ("TipRec", "BufferSizeGet", (), lambda v: v == 500),
    ("TipRec", "BufferClear", (), None),
    ("TipRec", "DataGet", (), None),
    ("UserOut", "ModeSet", (1, 1), None),
    ("UserOut", "ModeGet", (1,), lambda v: v == 1),
    ("UserOut", "MonitorChSet", (1, 30), None),
    ("UserOut", "MonitorChGet", (1,), lambda v: v == 30),
    ("UserOut", "ValSet", (1, 0.5), None),
    ("UserOut", "CalibrSet", (1, 2.0, 0.1), None),
    ("UserOut", "CalcSignalNameSet", (1, "sum"), None),
    ("UserOut", "CalcSignalNameGet", (1,), None),
    ("UserOut", "CalcSignalConfigSet", (1, 0, 1, 24), None),
    ("UserOut", "CalcSignalConfigGet", (1,), None),
    ("UserOut", "LimitsSet", (1, 5.0, -5.0), None),
    ("UserOut", "LimitsGet", (1,), None),
    ("Util", "SessionPathGet", (), None),
    ("Osci2T", "ChsSet", (0, 24), None),
    ("Osci2T", "ChsGet", (), None),
    ("Osci2T", "TimebaseGet", (), None),
    ("Osci2T", "OversamplSet", (2,), None),
    ("Osci2T", "OversamplGet", (), None),
    ("Osci2T", "TrigSet", (1, 0, 1, 0.0, 0.0, 0.0), None),
    ("Osci2T", "TrigGet", (), None),
    ("Osci2T", "Run", (), None),
    ("LockIn", "ModAmpSet", (1, 0.02), None),
    ("LockIn", "ModAmpGet", (1,), lambda v: v == pytest.approx(0.02)),
    ("LockIn", "DemodHPFilterSet", (1, 2, 10.0), None),
    ("LockIn", "ModPhasFreqGet", (1,), None),
    ("Signals", "CalibrGet", (0,), None),
    ("Signals", "RangeGet", (30,), None),
    ("Bias", "RangeGet", (), lambda v: list(v[0]) == ["+-10 V", "+-1 V"]),
    ("Bias", "RangeSet", (1,), None),
    ("Bias", "CalibrSet", (0.5, 0.01), None),
    ("Bias", "CalibrGet", (), lambda v: v[0] == pytest.approx(0.5)),
    ("Bias", "RangeSet", (0,), None),
    ("Bias", "Pulse", (0.01, 1.0, 1, 0, True), None),
    ("Current", "GainSet", (2,), None),
    ("Current", "GainsGet", (), None),
    ("Current", "Get100", (), None),
    ("Current", "CalibrSet", (2e-8, 0.0), None),
    ("Current", "CalibrGet", (), None),
    ("ZController", "ActiveCtrlSet", (1,), None),
    ("ZController", "LimitsEnabledGet", (), lambda v: v == 1),
    ("ZController", "HomePropsSet", (1, 3e-9), None),
    ("ZController", "OnOffGet", (), None),
    ("ZController", "SetpntSet", (5e-11,), None),
    ("ZController", "SetpntGet", (), None),
    ("ZController", "OnOffSet", (False,), None),
    ("ZController", "ZPosSet", (5e-9,), None),
    ("ZController", "ZPosGet", (), lambda v: v == pytest.approx(5e-9)),
    ("ZController", "Withdraw", (True, 2), None),
    ("Motor", "StartMove", ("X+", 3), None),
    ("Motor", "StartClosedLoop", (0, 1e-7, 0.0, 0.0, True), None),
    ("AutoApproach", "OnOffSet", (1,), None),
    ("ZController", "OnOffSet", (True,), None),
    ("Piezo", "RangeSet", (8e-6, 8e-6, 2e-7), None),
    ("Piezo", "DriftCompSet", (True, 0.0, 0.0, 0.0, 10.0), None),
    ("Pattern", "ExpOpen", (), None),
    ("Pattern", "ExpStart", (1,), None),
    ("Pattern", "ExpPause", (1,), None),
    ("Pattern", "ExpStop", (), None),
    ("FolMe", "SpeedSet", (2e-8, True), None),
    ("FolMe", "SpeedGet", (), None),
    ("FolMe", "XYPosSet", (1e-9, 1e-9, True), None),
    ("FolMe", "XYPosGet", (True,), None),
    ("Scan", "BufferSet", ([0, 30], 16, 16), None),
    ("Scan", "BufferGet", (), None),
    ("Scan", "FrameSet", (0.0, 0.0, 2e-9, 2e-9), None),
    ("Scan", "FrameGet", (), None),
    ("Scan", "SpeedSet", (), None),
    ("Scan", "SpeedGet", (), None),
    ("Scan", "PropsSet", (), None),
    ("Scan", "PropsGet", (), None),
    ("Scan", "Start", (), None),
    ("Scan", "Pause", (), None),
    ("Scan", "Resume", (), None),
    ("Scan", "Stop", (), None),
    ("Scan", "WaitEndOfScan", (10,), None),
    ("Scan", "Action", ("stop",), None),
    ("Scan", "StatusGet", (), None),
    ("Scan", "WaitEndOfLine", (10,), None),
    ("Scan", "FrameDataGrab", (30, 1), None),
    ("ZController", "Home", (), None),
    ("TipShaper", "PropsSet", (), None),
    ("Signals", "NamesGet", (), None),
    ("Signals", "ValGet", (24,), None),
    ("Signals", "InSlotSet", (0, 24), None),
    ("Signals", "InSlotsGet", (), None),
    ("TipRec", "DataSave", ("tiprec", True), None),
    ("Util", "SessionPathSet", ("/nonexistent/folder",), None),
    ("Osci2T", "TimebaseSet", (1,), None),
    ("Osci2T", "DataGet", (0,), None),
    ("TipShaper", "PropsGet", (), None),
    ("TipShaper", "Start", (True, 5000), None),
    ("BiasSpectr", "Open", (), None),
    ("BiasSpectr", "ChsSet", ([0, 30],), None),
    ("BiasSpectr", "ChsGet", (), None),
    ("BiasSpectr", "PropsSet", (0, 2, 0, 64, 0, 2, 2), None),
    ("BiasSpectr", "PropsGet", (), None),
    ("BiasSpectr", "AdvPropsSet", (1, 1, 2, 2), None),
    ("BiasSpectr", "AdvPropsGet", (), None),
    ("BiasSpectr", "LimitsSet", (-0.5, 0.5), None),
    ("BiasSpectr", "LimitsGet", (), None),
    ("BiasSpectr", "TimingSet", (0.1, 0.0, 0.01, 10.0, 0.001, 0.01, 0.01, 0.1), None),
    ("BiasSpectr", "TimingGet", (), None),
    ("BiasSpectr", "AltZCtrlSet", (1, 1e-10, 0.1), None),
    ("BiasSpectr", "AltZCtrlGet", (), None),
    ("BiasSpectr", "MLSLockinPerSegSet", (1,), None),
    ("BiasSpectr", "MLSLockinPerSegGet", (), None),
    ("BiasSpectr", "MLSModeSet", ("MLS",), None),
    # nanonisTCP decodes the rest of the body (the error section too) as the text
    ("BiasSpectr", "MLSModeGet", (), lambda v: v.rstrip("\x00") == "MLS"),
    ("BiasSpectr", "MLSValsSet", ([-1.0], [1.0], [0.01], [0.001], [0.01], [64], [0]), None),
    ("BiasSpectr", "MLSValsGet", (), None),
    ("BiasSpectr", "StatusGet", (), None),
    ("BiasSpectr", "Start", (1,), None),
    ("BiasSpectr", "Stop", (), None),
    *[
        ("LockIn", f"Mod{w}Set", (1, a), None)
        for w, a in (("OnOff", 1), ("Signal", 24), ("PhasReg", 2), ("Harmonic", 2), ("Phas", 10.0), ("PhasFreq", 500.0))
    ],
    *[("LockIn", f"Mod{w}Get", (1,), None) for w in ("OnOff", "Signal", "PhasReg", "Harmonic", "Phas")],
    *[
        ("LockIn", f"Demod{w}Set", (1, *a), None)
        for w, a in (
            ("Signal", (0,)),
            ("Harmonic", (2,)),
            ("LPFilter", (4, 50.0)),
            ("PhasReg", (2,)),
            ("Phas", (5.0,)),
            ("SyncFilter", (1,)),
            ("RTSignals", (1,)),
        )
    ],
    *[
        ("LockIn", f"Demod{w}Get", (1,), None)
        for w in ("Signal", "Harmonic", "HPFilter", "LPFilter", "PhasReg", "Phas", "SyncFilter", "RTSignals")
    ],
]

# nanonisTCP 1.1.5 deviations (NANONIS_PROTOCOL_EXT.md §1.2, §2.2, §4): calls that raise in
# the client although the server answers as the manuals say, by nanonisTCP version
NTCP_RAISES = {
    ("Scan", "StatusGet"): lambda version: version < 14000,  # refused before sending
    ("Current", "GainsGet"): lambda version: version <= 14000,  # counts the error section as surplus
    ("Signals", "InSlotSet"): lambda version: version > 14000,  # R10862 only: error reply (garbled)
    ("Signals", "InSlotsGet"): lambda version: True,  # error-only reply (Scanbot falls back)
    ("Util", "SessionPathSet"): lambda version: version > 14000,  # refused: the folder does not exist
}


@pytest.mark.parametrize("release,version", [(13742, 13742), (14718, 99999999)])
def test_nanonistcp_modules(servers, release, version):
    import importlib

    from nanonisTCP import nanonisTCP

    srv = servers[release]
    conn = nanonisTCP(srv.host, srv.port, version=version)
    conn.s.settimeout(TIMEOUT_S)
    failures = []
    try:
        for module, method, args, check in NTCP_CALLS:
            cls = getattr(importlib.import_module(f"nanonisTCP.{module}"), module)
            raises = NTCP_RAISES.get((module, method), lambda v: False)(version)
            try:
                out = getattr(cls(conn), method)(*args)
            except Exception as exc:  # collect, so one run reports every broken call
                if not raises:
                    failures.append(f"{module}.{method}{args}: {type(exc).__name__}: {exc}")
                continue
            if raises:
                failures.append(f"{module}.{method}{args} was expected to raise in nanonisTCP {version}")
                continue
            if check is not None and not check(out):
                failures.append(f"{module}.{method}{args} returned {out!r}")
    finally:
        conn.close_connection()
    assert not failures, "\n".join(failures)


def test_every_nanonistcp_wrapper_is_exercised():
    import importlib
    import inspect

    covered = {(m, f) for m, f, _, _ in NTCP_CALLS}
    missing = []
    for module in {m for m, _, _, _ in NTCP_CALLS}:
        cls = getattr(importlib.import_module(f"nanonisTCP.{module}"), module)
        for name, _ in inspect.getmembers(cls, inspect.isfunction):
            # _v0/_v1: the per-version bodies its wrappers dispatch to
            if not name.startswith("_") and not name.endswith(("_v0", "_v1")) and (module, name) not in covered:
                missing.append(f"{module}.{name}")
    assert not missing and len({m for m, _, _, _ in NTCP_CALLS}) == 19, missing


def test_nanonistcp_scan_props_by_release(servers):
    from nanonisTCP import nanonisTCP
    from nanonisTCP.Scan import Scan

    for release, version in ((13742, 13742), (14718, 99999999)):
        srv = servers[release]
        conn = nanonisTCP(srv.host, srv.port, version=version)
        conn.s.settimeout(TIMEOUT_S)
        try:
            Scan(conn).PropsSet(series_name="surv_")
            props = Scan(conn).PropsGet()
            assert props[3] == "surv_"  # Scanbot reads the series name as [3]
        finally:
            conn.close_connection()


# ------------------------------------------------------------------ nanonis_spm 1.0.9

nanonis_spm = pytest.importorskip("nanonis_spm")

SPM_CALLS = [
    ("Piezo_RangeGet", ()),
    ("Piezo_SensGet", ()),
    ("Piezo_CalibrGet", ()),
    ("Piezo_HVAInfoGet", ()),
    ("Piezo_XYZLimitsGet", ()),
    ("Piezo_HystOnOffGet", ()),
    ("Scan_XYPosGet", (np.uint32(0),)),
    ("FolMe_PSExpGet", ()),
    ("FolMe_PSPropsGet", ()),
    ("Marks_PointsGet", ()),
    ("Marks_LinesGet", ()),
    ("Signals_MeasNamesGet", ()),
    ("Signals_AddRTGet", ()),
    ("Util_RTFreqGet", ()),
    ("Util_AcqPeriodGet", ()),
    ("Util_RTOversamplGet", ()),
    ("Current_GainsGet", ()),
    ("Current_CalibrGet", (np.int32(-1),)),
    ("UserOut_LimitsGet", (np.int32(1), np.uint32(0))),
    ("Motor_FreqAmpGet", (np.uint16(1),)),
    ("BiasSpectr_LimitsGet", ()),
    ("BiasSpectr_TimingGet", ()),
    ("LockIn_DemodLPFilterGet", (np.int32(1),)),
]


def test_nanonis_spm_wrappers(servers):
    srv = servers[14718]
    sock = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT_S)
    nan = nanonis_spm.Nanonis(sock)
    printed = io.StringIO()
    failures = []
    try:
        for method, args in SPM_CALLS:
            sock.settimeout(TIMEOUT_S)
            with contextlib.redirect_stdout(printed):
                out = getattr(nan, method)(*args)
            if not out or out[0]:
                failures.append(f"{method}: {out!r}")
        sock.settimeout(TIMEOUT_S)
        with contextlib.redirect_stdout(printed):  # an error arrives intact
            err, _, _ = nan.Piezo_TiltSet(np.float32(90.0), np.float32(0.0))
        assert "tilt_x" in err
    finally:
        sock.close()
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ scripted automation session


def test_scripted_survey_session(servers, tmp_path):
    """What automation programs do: grid settings, bias series with frames, area moves,
    a tip-shaping action — through nanonisTCP at its default settings."""
    from nanonisTCP import nanonisTCP
    from nanonisTCP.Bias import Bias
    from nanonisTCP.Motor import Motor
    from nanonisTCP.Pattern import Pattern
    from nanonisTCP.Piezo import Piezo
    from nanonisTCP.Scan import Scan
    from nanonisTCP.TipShaper import TipShaper
    from nanonisTCP.Util import Util
    from nanonisTCP.ZController import ZController

    srv = servers[14718]
    conn = nanonisTCP(srv.host, srv.port)
    conn.s.settimeout(30)
    try:
        util, scan, bias, zc = Util(conn), Scan(conn), Bias(conn), ZController(conn)
        util.SessionPathSet(str(tmp_path))
        assert util.SessionPathGet() == str(tmp_path)
        assert Piezo(conn).RangeGet()[0] > 0
        pattern = Pattern(conn)
        pattern.GridSet(4, 4, 0.0, 0.0, 5e-9, 5e-9, 0.0)
        assert pattern.GridGet()[:2] == [4, 4] or tuple(pattern.GridGet()[:2]) == (4, 4)
        scan.BufferSet(channel_indexes=[0, 30], pixels=32, lines=32)
        scan.FrameSet(0.0, 0.0, 4e-9, 4e-9, 0.0)
        scan.PropsSet(continuous_scan=2, bouncy_scan=2, autosave=1, series_name="survey_")
        paths = []
        for _area, v in enumerate((0.5, -0.5)):
            bias.Set(v)
            zc.OnOffSet(True)
            scan.Action("start", "down")
            timed_out, _size, path = scan.WaitEndOfScan(timeout=20000)
            assert not timed_out and path.endswith(".sxm")
            paths.append(path)
            zc.Withdraw(True, timeout=2)
            Motor(conn).FreqAmpSet(1000.0, 80.0)
            Motor(conn).StartMove("X+", 5, wait_until_finished=True)
            zc.Home()
        ts = TipShaper(conn)
        ts.PropsSet(Tip_lift=-1e-9)
        zc.OnOffSet(True)
        ts.Start(wait_until_finished=True, timeout=5000)
        assert len(set(paths)) == 2
        from sxm_files import nanonispy_scan

        from stm_live.io.sxm import read_sxm

        assert [p.rsplit("/", 1)[1] for p in paths] == ["survey_001.sxm", "survey_002.sxm"]  # Nanonis naming
        for p in paths:
            assert p.startswith(str(tmp_path))  # the session folder set through Util.SessionPathSet
            assert read_sxm(p).image("Z", "forward").shape == (32, 32)
            nanonispy_scan(p)  # the independent reader opens it too
        assert srv.controller.modules.motor_counters[0] >= 10
    finally:
        conn.close_connection()


# ------------------------------------------------------------------ sample area and drift in images


def _frame(r, timeout_ms=20000):
    r.ok("Scan.Action", {"action": 0, "direction": 0})
    assert r.ok("Scan.WaitEndOfScan", {"timeout_ms": timeout_ms})["timed_out"] == 0
    return r.ok("Scan.FrameDataGrab", {"channel_index": 30, "data_direction": 1})["data"].astype(np.float64)


def _shift_px(a, b):
    """Integer (row, col) shift of b relative to a by Hann-windowed FFT cross-correlation."""
    w = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    fa, fb = np.fft.fft2((a - a.mean()) * w), np.fft.fft2((b - b.mean()) * w)
    cc = np.fft.ifft2(fa.conj() * fb).real
    i, j = np.unravel_index(np.argmax(cc), cc.shape)
    n, m = cc.shape
    return (i if i <= n // 2 else i - n, j if j <= m // 2 else j - m)


def test_motor_moves_reach_another_area_and_drift_compensation_moves_the_image():
    with start_server_thread(seed=3, time_scale=200.0) as srv:
        r = Raw(srv, 14718)
        try:
            r.ok("Scan.BufferSet", {"channel_indexes": [0, 30], "pixels": 48, "lines": 48})
            r.ok("Scan.FrameSet", {"center_x": 0.0, "center_y": 0.0, "width": 6e-9, "height": 6e-9, "angle": 0.0})
            r.ok("ZCtrl.OnOffSet", {"status": 1})
            first = _frame(r)
            r.ok("Motor.StartMove", {"direction": 0, "steps": 1, "group": 0, "wait": 1})  # X+ one step
            moved = _frame(r)
            r.ok("Motor.StartMove", {"direction": 1, "steps": 1, "group": 0, "wait": 1})  # and back
            back = _frame(r)
            corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]  # noqa: E731
            assert corr(first, back) > 0.9 > corr(first, moved)
            # compensation moving the tip at v: the next frame shows the sample displaced by
            # v (t - t0) (x(t) = x0 + v t), i.e. features move to -x in the image
            v, px = 1e-10, 6e-9 / 48
            r.ok("Piezo.DriftCompSet", {"on": 1, "vx": v, "vy": 0.0, "vz": 0.0, "saturation_limit": 50.0})
            drifted = _frame(r)
            # mean displacement over the frame: the offset when it started plus v * T/2
            start_x = srv.controller._scan["shift"][0]
            expected = (start_x + v * 48 * sum(srv.controller.line_times_s) / 2) / px
            di, dj = _shift_px(back, drifted)
            assert 3 < expected < 16 and di == 0 and abs(-dj - expected) <= 1.5, (di, dj, expected)
            comp = r.ok("Piezo.DriftCompGet")
            assert comp["on"] == 1 and comp["vx"] == pytest.approx(v) and comp["sat_x"] == 0
        finally:
            r.close()


def test_error_replies_follow_the_manuals_and_what_each_client_makes_of_them(servers):
    """Our client and nanonis_spm read the documented section intact; nanonisTCP 1.1.5 with its
    default version reads an undocumented error-code field and loses the first 4 characters
    (NANONIS_PROTOCOL_EXT.md §1.3): the README says so."""
    from nanonisTCP import nanonisTCP
    from nanonisTCP.Piezo import Piezo

    from stm_live.devices.client import NanonisClient, NanonisError

    srv = servers[14718]
    with NanonisClient(srv.host, srv.port, timeout=5) as ours:
        with pytest.raises(NanonisError) as info:
            ours.call("Piezo.TiltSet", {"tilt_x": 90.0, "tilt_y": 0.0})
    text = info.value.description
    assert text == "tilt_x: 90.0 outside [-45.0, 45.0]"
    conn = nanonisTCP(srv.host, srv.port)  # default version 99999999
    conn.s.settimeout(TIMEOUT_S)
    try:
        with pytest.raises(Exception) as garbled:
            Piezo(conn).TiltSet(90.0, 0.0)
    finally:
        conn.close_connection()
    assert str(garbled.value) == text[4:]


def _spm_args(method):
    """Arguments for a nanonis_spm wrapper from its quickSend type codes: a count (i) before
    arrays is 2, other ints 1 (1-based units), unsigned 0, floats 1e-9, strings empty."""
    import inspect
    import re

    src = inspect.getsource(method)
    found = re.search(r'quickSend\(\s*"[^"]+"\s*,\s*\[.*?\]\s*,\s*\[(.*?)\]\s*,', src, re.S)
    codes = re.findall(r'"([^"]*)"', found.group(1))
    args = []
    for k, code in enumerate(codes):
        nxt = codes[k + 1] if k + 1 < len(codes) else ""
        if code == "i":
            args.append(np.int32(2 if nxt.startswith("*") else 1))
        elif code in ("I", "H", "h"):
            args.append({"I": np.uint32, "H": np.uint16, "h": np.int16}[code](0))
        elif code in ("f", "d"):
            args.append({"f": np.float32, "d": np.float64}[code](1e-9))
        elif code == "+*c":
            args.append("")
        elif code in ("*f", "*i", "*I"):
            args.append(np.ones(2, {"*f": np.float32, "*i": np.int32, "*I": np.uint32}[code]))
        elif code == "+*i":
            args.append(np.array([0, 30], np.int32))
        else:
            raise AssertionError(f"{method.__name__}: type code {code!r}")
    return args


# nanonis_spm 1.0.9 deviations (NANONIS_PROTOCOL_EXT.md §4 and base §5): wrappers that send
# another command's name, or cannot parse the documented reply
SPM_BROKEN = {
    "Osci2T.TimebaseSet",
    "Osci2T.TimebaseGet",
    "Osci2T.OversamplGet",  # send other names
    "Scan.PropsGet",
    "Util.VersionGet",  # parsers fail on every layout
    "Osci2T.TrigGet",
}  # sends TrigSet's 6 fields as the request (refused: 30 bytes, needs 0)
SPM_SKIP = {"Util.Quit"}  # closes the connection (tested above)


def test_every_nanonis_spm_wrapper_against_r14718(servers):
    srv = servers[14718]
    sock = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT_S)
    nan = nanonis_spm.Nanonis(sock)
    printed, failures, called = io.StringIO(), [], 0
    try:
        for name in sorted(P.LAYOUTS):
            method = getattr(nan, name.replace(".", "_"), None)
            if method is None or name in SPM_SKIP or name in SPM_BROKEN:
                continue
            try:
                P.command_for(name, 14718)
            except P.UnknownCommandError:
                continue
            args = _spm_args(method)
            if name == "Marks.PointsDraw":
                args[3] = ["a", "b"]
            sock.settimeout(TIMEOUT_S)
            try:
                with contextlib.redirect_stdout(printed):
                    out = method(*args)
            except Exception as exc:
                failures.append(f"{name}{tuple(args)}: {type(exc).__name__}: {exc}")
                continue
            called += 1
            error = out[0] if out else "no reply"
            if "Unknown" in error or "internal" in error or "needs" in error and "bytes" in error:
                failures.append(f"{name}: {error}")
    finally:
        sock.close()
    assert not failures, "\n".join(failures)
    assert called >= 220


def test_user_outputs_safe_tip_z_limits_and_tip_recorder_act_on_the_controller():
    with start_server_thread(seed=0, time_scale=50.0) as srv:
        r = Raw(srv, 14718)
        try:
            r.ok("UserOut.ValSet", {"output": 2, "value": 1.25})
            assert r.ok("Signals.ValGet", {"index": 9, "wait_newest": 0})["value"] == pytest.approx(1.25)
            r.ok("ZCtrl.OnOffSet", {"status": 1})
            r.ok("SafeTip.PropsSet", {"auto_recovery": 0, "auto_pause_scan": 0, "threshold": 1e-15})
            assert r.ok("ZCtrl.StatusGet")["status"] == 2  # safe tip off
            r.ok("SafeTip.OnOffSet", {"on": 1})
            assert r.ok("ZCtrl.StatusGet")["status"] == 5  # current above the threshold
            r.ok("ZCtrl.OnOffSet", {"status": 0})
            r.ok("ZCtrl.LimitsEnabledSet", {"enabled": 1})
            r.ok("ZCtrl.LimitsSet", {"high": 2e-8, "low": 1e-9})
            _, status, text = r.call("ZCtrl.ZPosSet", {"z": 5e-8})
            assert status == 1 and "Z limits" in text
            r.ok("ZCtrl.ZPosSet", {"z": 5e-9})
            r.ok("TipRec.BufferSizeSet", {"size": 2})
            for x in (1e-9, 2e-9, 3e-9):
                r.ok("FolMe.XYPosSet", {"x": x, "y": 0.0, "wait": 0})
            rec = r.ok("TipRec.DataGet")
            assert list(rec["channel_indexes"]) == [0, 30] and rec["data"].shape == (2, 2)
            np.testing.assert_allclose(rec["data"][:, 1], 5e-9, rtol=1e-6)  # Z column
        finally:
            r.close()
