"""NanonisSTM components against the simulated controller over TCP."""

from __future__ import annotations

import numpy as np
import pytest

from stm_live.config import LimitError, ProfileError, load_profile
from stm_live.devices.stm import NanonisSTM
from stm_live.plans import live_frame


@pytest.fixture()
def stm(sim_server):
    device = NanonisSTM(sim_server.host, sim_server.port, name="stm", profile=load_profile("sim"))
    yield device
    device.stop_scan()
    device.close()


@pytest.fixture()
def wire(stm, monkeypatch):
    """Every command name the device's main connection sends."""
    sent = []
    real = stm.client.call

    def call(name, *args, **kwargs):
        sent.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(stm.client, "call", call)
    return sent


def test_signals_are_controller_values_with_si_units(stm, sim_server):
    ctrl = sim_server.controller
    stm.bias.put(-0.7)
    assert ctrl.bias_V == pytest.approx(-0.7)
    assert stm.bias.get() == pytest.approx(-0.7)
    desc = stm.describe()
    assert desc["stm_bias"]["units"] == "V" and desc["stm_bias"]["dtype"] == "number"
    assert desc["stm_current"]["units"] == "A"
    assert desc["stm_tip_x"]["units"] == "m"
    reading = stm.read()
    assert reading["stm_bias"]["value"] == pytest.approx(-0.7)
    config = stm.read_configuration()
    assert "stm_frame_width" in config and "stm_bias" not in config
    assert stm.describe_configuration()["stm_frame_angle"]["units"] == "deg"
    # one frame field changes, the others stay (read-modify-write under the lock)
    cx = stm.frame.center_x.get()
    stm.frame.width.put(7e-9)
    assert ctrl.frame[2] == pytest.approx(7e-9, rel=1e-6)
    assert ctrl.frame[0] == pytest.approx(cx, abs=1e-15)
    stm.buffer.set(([0, 30], 48, 8)).wait(5)
    assert stm.buffer.pixels.get() == 48 and list(stm.buffer.channels.get()) == [0, 30]
    stm.z_controller.put(0)
    assert ctrl.z_ctrl_on is False
    stm.z_controller.put(1)


def test_unsafe_values_are_refused_before_anything_is_sent(RE, stm, sim_server, wire):
    ctrl = sim_server.controller
    bias = ctrl.bias_V
    with pytest.raises(LimitError, match="max_abs_bias_V"):
        stm.bias.put(12.0)
    with pytest.raises(LimitError, match="max_abs_bias_V"):
        stm.bias.set(-12.0)
    with pytest.raises(LimitError, match="max_setpoint_A"):
        stm.setpoint.put(5e-6)
    with pytest.raises(LimitError, match="max_frame_size_m"):
        stm.frame.set((0.0, 0.0, 1e-3, 1e-3, 0.0))
    with pytest.raises(LimitError, match="max_abs_bias_V"):
        stm.bias_pulse.put((0.01, 9.0))
    docs = []
    RE.subscribe(lambda name, doc: docs.append(name))
    with pytest.raises(LimitError, match="max_abs_bias_V"):
        RE(live_frame(stm, frame=(0, 0, 4e-9, 4e-9), pixels=16, lines=2, bias=20.0))
    assert wire == [] and docs == []
    assert ctrl.bias_V == bias


def test_malformed_profile_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = load_profile("sim").source.read_text().replace("max_abs_bias_V: 5.0", "max_abs_bias_V: lots")
    bad.write_text(text)
    with pytest.raises(ProfileError, match="max_abs_bias_V"):
        load_profile(bad)


def test_line_reader_streams_lines_outside_a_plan(stm, sim_server):
    lines = stm.lines
    lines.configure({"channels": ["Current"], "pixels": 16, "lines": 5})
    desc = lines.describe()
    assert desc["stm_current_bwd"] == {**desc["stm_current_bwd"], "dtype": "array", "shape": [16], "units": "A"}
    with pytest.raises(RuntimeError, match="not staged"):
        lines.trigger().wait(1)
    stm.frame.set((0.0, 0.0, 3e-9, 3e-9, 0.0)).wait(5)
    stm.buffer.set(([0], 16, 5)).wait(5)
    lines.stage()
    try:
        stm.scan_action.put("start")
        got = []
        for _ in range(5):
            lines.trigger().wait(10)
            reading = lines.read()
            got.append(reading["stm_line_index"]["value"])
            assert reading["stm_current_fwd"]["value"].shape == (16,)
            assert np.isfinite(reading["stm_current_bwd"]["value"]).all()
        assert got == [0, 1, 2, 3, 4] and lines.frame_complete
        with pytest.raises(RuntimeError, match="already delivered"):
            lines.trigger().wait(1)
    finally:
        lines.unstage()


def test_pause_resume_redelivers_the_last_triggered_line(stm, sim_server):
    """What a RunEngine rewind relies on: after pause()/resume() the next trigger gives
    the line of the last trigger again (the one after the last checkpoint)."""
    lines = stm.lines
    lines.configure({"channels": ["Current"], "pixels": 16, "lines": 6})
    stm.frame.set((0.0, 0.0, 3e-9, 3e-9, 0.0)).wait(5)
    stm.buffer.set(([0], 16, 6)).wait(5)
    lines.stage()
    try:
        stm.scan_action.put("start")
        for _ in range(3):
            lines.trigger().wait(10)
        first = lines.read()
        assert first["stm_line_index"]["value"] == 2
        lines.pause()
        assert sim_server.controller.state == "paused"
        lines.resume()
        assert sim_server.controller.state == "scanning"
        lines.trigger().wait(10)
        again = lines.read()
        assert again["stm_line_index"]["value"] == 2
        np.testing.assert_array_equal(again["stm_current_fwd"]["value"], first["stm_current_fwd"]["value"])
        lines.trigger().wait(10)
        assert lines.read()["stm_line_index"]["value"] == 3
    finally:
        lines.unstage()


def test_a_trigger_pending_at_a_suspend_does_not_skip_its_line(stm, sim_server):
    """A suspend while the RunEngine waits for line k: the stale trigger completes when k
    arrives, and the replayed trigger must still deliver k, not k + 1 (a lost line)."""
    lines = stm.lines
    lines.configure({"channels": ["Current"], "pixels": 16, "lines": 6})
    stm.frame.set((0.0, 0.0, 3e-9, 3e-9, 0.0)).wait(5)
    stm.buffer.set(([0], 16, 6)).wait(5)
    lines.stage()
    try:
        stm.scan_action.put("start")
        lines.trigger().wait(10)
        assert lines.read()["stm_line_index"]["value"] == 0
        stale = lines.trigger()  # waiting for line 1 ...
        lines.pause()  # ... when the suspender trips
        lines.resume()
        stale.wait(10)  # line 1 arrives and completes the stale trigger
        lines.trigger().wait(10)  # the RunEngine replays from its checkpoint
        assert lines.read()["stm_line_index"]["value"] == 1
        lines.trigger().wait(10)
        assert lines.read()["stm_line_index"]["value"] == 2
    finally:
        lines.unstage()


def test_unstage_fails_a_current_trigger_but_leaves_one_a_pause_abandoned(stm, sim_server):
    """An abort after a pause unstages with the pre-pause trigger still pending: the
    RunEngine's rewind abandoned it, and failing it would turn the abort into FailedStatus.
    A trigger issued since the pause is still waited on, and must fail with the reason."""
    lines = stm.lines
    lines.configure({"channels": ["Current"], "pixels": 16, "lines": 6})
    stm.buffer.set(([0], 16, 6)).wait(5)
    lines.stage()  # the scan is never started: no line comes, nothing races the triggers
    stale = lines.trigger()
    lines.pause()
    current = lines.trigger()
    lines.unstage()
    assert current.done and not current.success
    assert "unstaged before the line came" in str(current.exception())
    assert not stale.done
