"""The simulated controller over real TCP (raw sockets + the protocol codec)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from stm_live.devices import protocol as P
from stm_live.simulators.controller import SimulatedController
from stm_live.simulators.server import start_server_thread

TIMEOUT = 10.0


class Conn:
    """One raw connection: send a request, read exactly one reply."""

    def __init__(self, server):
        self.sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)

    def call(self, name, *args):
        self.sock.sendall(P.pack_request(name, args))
        header = self._exact(P.HEADER_SIZE)
        rname, size = P.parse_response_header(header)
        assert rname == name
        values, status, desc = P.decode_response_body(name, self._exact(size))
        return values, status, desc

    def ok(self, name, *args):
        values, status, desc = self.call(name, *args)
        assert status == 0, f"{name}: {desc}"
        return values

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    # 0.1 s per line in the scenario; x10 -> 20 ms per line (forward + backward)
    srv = start_server_thread(seed=1, time_scale=10.0)
    yield srv
    srv.stop()


@pytest.fixture()
def conns(server):
    a, b = Conn(server), Conn(server)
    a.ok("Scan.Action", 1, 0)  # stop whatever the previous test left running
    a.ok("ZCtrl.OnOffSet", 1)
    a.ok("Scan.BufferSet", [0, 30], 32, 16)
    yield a, b
    a.ok("Scan.Action", 1, 0)
    a.close()
    b.close()


def test_frame_scan_completes_with_every_line(conns, server):
    a, b = conns
    assert a.ok("Scan.BufferGet")["lines"] == 16
    a.ok("Scan.Action", 0, 0)
    assert a.ok("Scan.StatusGet")["status"] == 1
    r = b.ok("Scan.WaitEndOfScan", 10000)
    assert r["timed_out"] == 0
    assert a.ok("Scan.StatusGet")["status"] == 0
    last = server.controller.last_event
    assert (last.line, last.movement) == (15, 1)  # 0-based: line 15 backward is the last
    fwd = a.ok("Scan.FrameDataGrab", 30, 1)
    bwd = a.ok("Scan.FrameDataGrab", 30, 0)
    assert fwd["channel_name"] == "Z (m)" and fwd["scan_direction"] == 0
    assert fwd["data"].shape == (16, 32) and np.isfinite(fwd["data"]).all()
    assert np.isfinite(bwd["data"]).all()
    # wire orientation: backward rows mirrored, so un-mirroring matches forward
    f, bm = fwd["data"].ravel(), bwd["data"][:, ::-1].ravel()
    assert np.corrcoef(f, bm)[0, 1] > 0.9
    assert np.corrcoef(f, bwd["data"].ravel())[0, 1] < np.corrcoef(f, bm)[0, 1]
    assert 0.2e-9 < np.nanmean(fwd["data"]) < 2.5e-9  # isocurrent height in m


def test_rows_are_nan_until_scanned_and_pause_resume(conns):
    a, b = conns
    a.ok("Scan.BufferSet", [0, 30], 32, 64)
    a.ok("Scan.Action", 0, 0)
    e = b.ok("Scan.WaitEndOfLine", 5000)
    assert e["timed_out"] == 0
    assert a.call("FolMe.XYPosSet", 0.0, 0.0, 0)[1] == 1  # not while the scan moves the tip
    a.ok("Scan.Action", 2, 0)  # pause
    a.ok("FolMe.XYPosSet", 1e-9, 1e-9, 1)  # allowed while paused (e.g. to recondition)
    assert a.ok("Scan.StatusGet")["status"] == 1  # paused still counts as running
    data = a.ok("Scan.FrameDataGrab", 0, 1)["data"]
    done = np.isfinite(data).all(axis=1)
    m = int(done.sum())
    assert 1 <= m < 64
    assert done[:m].all() and np.isnan(data[m:]).all()  # rows in acquisition order
    # paused: nothing happens, a pending wait times out at its timeout
    t0 = time.monotonic()
    assert b.ok("Scan.WaitEndOfLine", 150)["timed_out"] == 1
    assert time.monotonic() - t0 >= 0.14
    assert np.array_equal(np.isfinite(a.ok("Scan.FrameDataGrab", 0, 1)["data"]).all(axis=1), done)
    a.ok("Scan.Action", 3, 0)  # resume
    e2 = b.ok("Scan.WaitEndOfLine", 5000)
    assert e2["timed_out"] == 0 and (e2["line"], e2["movement"]) >= (e["line"], e["movement"])
    assert b.ok("Scan.WaitEndOfScan", 10000)["timed_out"] == 0
    assert np.isfinite(a.ok("Scan.FrameDataGrab", 0, 1)["data"]).all()


def test_waits_return_on_the_next_event_and_honour_timeouts(conns):
    a, b = conns
    t0 = time.monotonic()
    r = b.ok("Scan.WaitEndOfLine", 200)  # no scan: nothing to wait for
    assert r["timed_out"] == 1 and 0.19 <= time.monotonic() - t0 < 2.0
    assert b.ok("Scan.WaitEndOfScan", 100)["timed_out"] == 1
    a.ok("Scan.BufferSet", [0], 32, 128)
    a.ok("Scan.Action", 0, 0)
    seen = []
    for _ in range(4):
        e = b.ok("Scan.WaitEndOfLine", 5000)
        assert e["timed_out"] == 0
        seen.append((e["line"], e["movement"]))
    assert seen == sorted(seen) and len(set(seen)) == 4  # each wait saw a newer event
    a.ok("Scan.Action", 1, 0)  # stop: no end-of-scan event, the wait times out
    assert a.ok("Scan.StatusGet")["status"] == 0
    assert b.ok("Scan.WaitEndOfScan", 200)["timed_out"] == 1


def test_z_controller_switches_channel_semantics(conns, server):
    a, b = conns
    sp = a.ok("ZCtrl.SetpntGet")["setpoint"]
    assert a.call("ZCtrl.ZPosSet", 0.5e-9)[1] == 1  # refused while the loop is on
    a.ok("Scan.Action", 0, 0)
    b.ok("Scan.WaitEndOfScan", 10000)
    z_on = a.ok("Scan.FrameDataGrab", 30, 1)["data"]
    i_on = a.ok("Scan.FrameDataGrab", 0, 1)["data"]
    assert np.ptp(z_on) > 0.02e-9  # topography in Z
    assert abs(np.median(i_on) / sp - 1) < 0.3  # current held at the setpoint

    a.ok("ZCtrl.OnOffSet", 0)
    assert a.ok("ZCtrl.OnOffGet")["status"] == 0
    values, status, desc = a.call("ZCtrl.ZPosSet", 0.45e-9)
    assert status == 0, desc
    assert a.ok("ZCtrl.ZPosGet")["z"] == pytest.approx(0.45e-9, rel=1e-6)
    a.ok("Scan.Action", 0, 0)
    b.ok("Scan.WaitEndOfScan", 10000)
    z_off = a.ok("Scan.FrameDataGrab", 30, 1)["data"]
    i_off = a.ok("Scan.FrameDataGrab", 0, 1)["data"]
    assert np.allclose(z_off, 0.45e-9)  # constant height
    assert np.ptp(i_off) > 0.5 * np.median(np.abs(i_off))  # the orbital contrast is in the current
    assert a.ok("Current.Get")["current"] > 0


def test_withdraw_home_and_signals(conns):
    a, _ = conns
    a.ok("ZCtrl.Withdraw", 1, 1000)
    assert a.ok("ZCtrl.OnOffGet")["status"] == 0
    assert a.ok("ZCtrl.ZPosGet")["z"] > 100e-9
    assert a.ok("Current.Get")["current"] < 1e-15
    a.ok("ZCtrl.Home")
    assert a.ok("ZCtrl.ZPosGet")["z"] < 5e-9
    names = a.ok("Signals.NamesGet")["names"]
    assert len(names) == 128 and names[0] == "Current (A)" and names[24] == "Bias (V)" and names[30] == "Z (m)"
    a.ok("Bias.Set", -0.7)
    vals = a.ok("Signals.ValsGet", [24, 30], 1)["values"]
    assert vals[0] == pytest.approx(-0.7) and vals[1] == pytest.approx(a.ok("ZCtrl.ZPosGet")["z"])
    assert a.ok("Signals.ValGet", 24, 0)["value"] == pytest.approx(-0.7)
    a.ok("Bias.Set", -0.5)
    v = a.ok("Util.VersionGet")
    assert v["host_release"] == P.DEFAULT_RELEASE and v["rt_release"] == P.DEFAULT_RELEASE
    a.ok("FolMe.XYPosSet", 1e-9, -2e-9, 1)
    xy = a.ok("FolMe.XYPosGet", 1)
    assert (xy["x"], xy["y"]) == pytest.approx((1e-9, -2e-9))
    a.ok("Motor.StartMove", 5, 3, 0, 1)
    assert a.ok("Motor.PosGet", 0, 500)["z"] == pytest.approx(-300e-9)


def test_buffer_coercion_and_bad_channel(conns):
    a, _ = conns
    a.ok("Scan.BufferSet", [0, 30], 70, 0)
    buf = a.ok("Scan.BufferGet")
    assert buf["pixels"] == 64 and buf["lines"] == 64  # nearest multiple of 16; aspect kept
    _, status, desc = a.call("Scan.BufferSet", list(range(64)), 2048, 2048)
    assert status == 1 and "MiB" in desc  # memory stays bounded
    assert a.ok("Scan.BufferGet")["pixels"] == 64  # unchanged
    values, status, desc = a.call("Scan.FrameDataGrab", 24, 1)
    assert status == 1 and "24" in desc and "buffer" in desc
    assert values["channel_name"] == "" and values["data"].shape == (0, 0)


def test_speed_sets_line_time(conns, server):
    a, _ = conns
    a.ok("Scan.SpeedSet", 0, 0, 0.2, 0, 2, 2.0)  # keep time per line, backward twice as fast
    s = a.ok("Scan.SpeedGet")
    assert s["keep_constant"] == 1 and s["fwd_time"] == pytest.approx(0.2) and s["bwd_time"] == pytest.approx(0.1)
    assert s["fwd_speed"] == pytest.approx(a.ok("Scan.FrameGet")["width"] / 0.2, rel=1e-5)
    a.ok("Scan.SpeedSet", 0, 0, 0.1, 0.1, 2, 1.0)


def test_props_layouts():
    with start_server_thread(seed=0, time_scale=10.0, props_layout="extended") as srv:
        c = Conn(srv)
        c.ok("Scan.PropsSet", 1, 2, 3, "series_", "hello", ["Bias", "Z-Controller"], 0)
        c.sock.sendall(P.pack_request("Scan.PropsGet"))
        name, size = P.parse_response_header(c._exact(40))
        values, status, _ = P.decode_response_body(name, c._exact(size), command=P.PROPS_GET_EXTENDED)
        assert status == 0 and values["continuous"] == 1 and values["autosave"] == 2
        assert values["modules"] == ["Bias", "Z-Controller"] and values["comment"] == "hello"
        c.close()


def test_tip_shaper_and_pulse_change_tip_state_seeded(conns, server):
    a, _ = conns
    ctrl = server.controller
    ctrl.set_tip("double")
    before = len(ctrl.recondition_log)
    for _ in range(8):
        a.ok("TipShaper.Start", 1, 2000)
    log = ctrl.recondition_log[before:]
    assert len(log) == 8 and all(r["action"] == "shaper" for r in log)
    assert any(r["after"] != "double" for r in log)  # 0.6 per try to repair: 8 misses ~ 7e-4
    a.ok("TipShaper.PropsSet", 0.05, 2, 0.0, -2e-9, 0.1, 1.0, 0.05, 2e-9, 0.1, 0.05, 1)
    a.ok("TipShaper.Start", 1, 2000)
    assert ctrl.recondition_log[-1]["action"] == "poke"
    a.ok("Bias.Pulse", 1, 0.05, 3.0, 1, 2)
    assert ctrl.recondition_log[-1]["action"] == "pulse"
    assert ctrl.tip_history[-1]["after"] == ctrl.tip_label

    # same seed, same actions -> same outcomes
    def outcomes(seed):
        c = SimulatedController(seed=seed, time_scale=10.0)
        c.set_tip("double")
        return [c._recondition(act)["outcome"] for act in ("pulse", "shaper", "poke") * 5]

    assert outcomes(7) == outcomes(7)
    assert len({tuple(outcomes(s)) for s in range(4)}) > 1


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run_frame(ctrl, clock, *, max_steps=10_000):
    ctrl.scan_action("start", "down")
    for _ in range(max_steps):
        clock.t += 0.05
        ctrl.advance()
        if not ctrl.scanning:
            return
    raise AssertionError("frame did not finish")


def test_scheduled_tip_change_mid_frame_switches_rows():
    from stm_live.simulators.scenario import load_scenario

    sc = load_scenario("degrading")
    from dataclasses import replace

    sc = replace(
        sc, evolution=replace(sc.evolution, hazards={}), frame=replace(sc.frame, pixels=32, lines=48), channels=(0, 30)
    )
    clock = FakeClock()
    ctrl = SimulatedController(sc, seed=3, time_scale=1.0, clock=clock)
    _run_frame(ctrl, clock)
    assert ctrl.tip_label == "double"
    ev = ctrl.tip_history[-1]
    assert (ev["frame"], ev["line"], ev["cause"], ev["before"]) == (0, 40, "scheduled", "co_sharp")
    z = ctrl.frame_data(30, True)[1]
    assert np.isfinite(z).all()
    # reference: the same frame scanned with the double tip from the start
    ref_ctrl = SimulatedController(
        replace(sc, tip="double", evolution=replace(sc.evolution, events=())), seed=3, time_scale=1.0, clock=clock
    )
    _run_frame(ref_ctrl, clock)
    z_ref = ref_ctrl.frame_data(30, True)[1]
    assert not np.allclose(z[:40], z_ref[:40], atol=2e-12)  # CO rows differ from double-tip rows
    assert np.allclose(z[41:], z_ref[41:], atol=5e-12)  # from the change on: the double-tip image


def test_hazards_degrade_the_tip_and_are_logged():
    from dataclasses import replace

    from stm_live.simulators.scenario import load_scenario

    sc = load_scenario("degrading")
    sc = replace(
        sc,
        evolution=replace(sc.evolution, events=(), hazards={"instability": 0.2, "co_loss": 0.05}),
        frame=replace(sc.frame, pixels=16, lines=40),
        channels=(0,),
    )
    clock = FakeClock()
    ctrl = SimulatedController(sc, seed=5, time_scale=1.0, clock=clock)
    _run_frame(ctrl, clock)
    causes = {h["cause"] for h in ctrl.tip_history}
    assert "hazard:instability" in causes
    assert all(h["frame"] == 0 and 0 <= h["line"] < 40 for h in ctrl.tip_history)


def test_replay_serves_the_recording_bit_for_bit(tmp_path):
    from stm_live.io.sxm import scan_from_frames, write_sxm

    rng = np.random.default_rng(0)
    lines, pixels = 12, 32
    z_f = rng.normal(1e-10, 3e-11, (lines, pixels)).astype(np.float32)
    z_b = rng.normal(1e-10, 3e-11, (lines, pixels)).astype(np.float32)
    cur = rng.normal(1e-11, 1e-12, (lines, pixels)).astype(np.float32)
    z_f[9:] = np.nan  # partial recording: 9 lines
    z_b[9:] = np.nan
    cur[9:] = np.nan
    scan = scan_from_frames(
        {"Z": {"forward": z_f, "backward": z_b}, "Current": {"forward": cur}},
        units={"Z": "m", "Current": "A"},
        center_x_m=1e-9,
        center_y_m=0.0,
        width_m=5e-9,
        height_m=2e-9,
        direction="up",
        bias_V=-0.3,
        acq_time_s=0.6,
        signal_indexes={"Z": 30, "Current": 0},
    )
    path = write_sxm(tmp_path / "rec.sxm", scan)
    with start_server_thread(replay=path, time_scale=20.0) as srv:
        c = Conn(srv)
        buf = c.ok("Scan.BufferGet")
        assert (buf["pixels"], buf["lines"]) == (pixels, lines)
        assert sorted(buf["channel_indexes"].tolist()) == [0, 30]
        assert c.ok("Scan.FrameGet")["width"] == pytest.approx(5e-9)
        c.ok("Scan.Action", 0, 0)
        assert c.ok("Scan.WaitEndOfScan", 10000)["timed_out"] == 0
        assert srv.controller.last_event.line == 8  # ends at the last recorded line
        zf = c.ok("Scan.FrameDataGrab", 30, 1)
        zb = c.ok("Scan.FrameDataGrab", 30, 0)["data"]
        assert zf["scan_direction"] == 1
        np.testing.assert_array_equal(zf["data"].view(np.uint32)[:9], z_f.view(np.uint32)[:9])
        np.testing.assert_array_equal(zb[:, ::-1].view(np.uint32)[:9], z_b.view(np.uint32)[:9])
        assert np.isnan(zf["data"][9:]).all()
        i_b = c.ok("Scan.FrameDataGrab", 0, 0)["data"]  # single-direction channel
        assert np.isnan(i_b).all()
        np.testing.assert_array_equal(c.ok("Scan.FrameDataGrab", 0, 1)["data"][:9], cur[:9])
        assert c.call("Scan.BufferSet", [0], 64, 64)[1] == 1  # fixed by the recording
        c.close()


def test_replay_bad_file_names_it(tmp_path):
    from stm_live.simulators.replay import ReplayError, ReplaySource

    bad = tmp_path / "broken.sxm"
    bad.write_bytes(b"not a nanonis file")
    with pytest.raises(ReplayError, match="broken.sxm"):
        ReplaySource.from_file(bad)
    with pytest.raises(ReplayError, match="missing.sxm"):
        ReplaySource.from_file(tmp_path / "missing.sxm")


def test_public_nanonistcp_client_interoperates():
    """nanonisTCP 1.1.5 (PyPI) as it is: extended PropsGet, empty Motor.PosGet body."""
    nt = pytest.importorskip("nanonisTCP")
    from nanonisTCP.Bias import Bias
    from nanonisTCP.Motor import Motor
    from nanonisTCP.Scan import Scan

    with start_server_thread(seed=0, time_scale=10.0, props_layout="extended") as srv:
        client = nt.nanonisTCP(srv.host, srv.port)
        client.s.settimeout(TIMEOUT)  # the package sets none
        try:
            bias, scan, motor = Bias(client), Scan(client), Motor(client)
            bias.Set(-0.25)
            assert bias.Get() == pytest.approx(-0.25)
            props = scan.PropsGet()
            assert props[:3] == [0, 0, 2] and props[5] == []
            scan.BufferSet(channel_indexes=[0, 30], pixels=16, lines=4)
            scan.Action("start", "down")
            assert scan.WaitEndOfScan(timeout=10000)[0] is False
            name, data, scan_up = scan.FrameDataGrab(30, 1)
            assert name == "Z (m)" and data.shape == (4, 16) and np.isfinite(data).all()
            assert motor.PosGet() == [0.0, 0.0, 0.0]
        finally:
            client.close_connection()


def test_autosave_and_save_write_readable_sxm(tmp_path):
    from stm_live.io.sxm import read_sxm

    with start_server_thread(seed=2, time_scale=10.0, save_dir=tmp_path) as srv:
        c = Conn(srv)
        c.ok("Scan.BufferSet", [0, 30], 16, 6)
        c.ok("Scan.PropsSet", 0, 0, 2, "auto_", "", [], 0)  # autosave "Next"
        c.ok("Scan.Action", 0, 1)  # up
        r = c.ok("Scan.WaitEndOfScan", 10000)
        assert r["timed_out"] == 0 and r["path"].endswith("auto_001.sxm")
        assert c.ok("Scan.PropsGet")["autosave"] == 2  # "Next" is used up
        rec = read_sxm(r["path"])
        wire_b = c.ok("Scan.FrameDataGrab", 30, 0)["data"]
        np.testing.assert_array_equal(rec.image("Z", "forward"), c.ok("Scan.FrameDataGrab", 30, 1)["data"])
        np.testing.assert_array_equal(rec.image("Z", "backward"), wire_b[:, ::-1])
        assert rec.direction == "up" and (rec.pixels, rec.lines) == (16, 6)
        assert c.ok("Scan.Save", 1, 1000)["timed_out"] == 0
        c.close()
    with start_server_thread(seed=2, time_scale=10.0) as srv:  # no folder: a clear error
        c = Conn(srv)
        c.ok("Scan.Action", 0, 0)
        _, status, desc = c.call("Scan.Save", 1, 1000)
        assert status == 1 and "save folder" in desc
        c.close()


def test_instability_episode_adds_line_jumps_for_its_lines():
    from dataclasses import replace

    from stm_live.simulators.scenario import TipEvent, load_scenario

    base = load_scenario("default")
    base = replace(base, frame=replace(base.frame, pixels=16, lines=24), channels=(0, 30))
    shaky = replace(base, evolution=replace(base.evolution, events=(TipEvent(0, 10, "unstable"),), instability_lines=5))
    frames = []
    for sc in (base, shaky):
        clock = FakeClock()
        ctrl = SimulatedController(sc, seed=4, clock=clock)
        _run_frame(ctrl, clock)
        frames.append(ctrl.frame_data(30, True)[1])
    assert ctrl.tip_label == "co_sharp"  # the episode is over
    differs = ~np.all(frames[0] == frames[1], axis=1)
    assert differs.tolist() == [10 <= r < 15 for r in range(24)]
