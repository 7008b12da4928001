"""Plans end to end: ophyd device -> TCP -> simulated controller, real RunEngine."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from bluesky.suspenders import SuspendBoolHigh
from bluesky.utils import RunEngineInterrupted
from ophyd import Signal

from stm_live.devices.client import NanonisClient
from stm_live.devices.stm import NanonisSTM
from stm_live.plans import check_recondition, live_frame, recondition_tip, survey
from stm_live.store import JournalWriter, read_journal, run_data

PIXELS, LINES = 32, 12
FRAME = {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 4e-9, "height_m": 4e-9, "angle_deg": 0.0}
START_KEYS = {
    "frame",
    "pixels",
    "lines",
    "pixel_size_nm",
    "scan_direction",
    "bias_V",
    "setpoint_A",
    "z_controller",
    "line_key",
    "channels",
}


@pytest.fixture()
def stm(sim_server):
    device = NanonisSTM(sim_server.host, sim_server.port, name="stm")
    device.lines.line_timeout = 10.0
    yield device
    device.stop_scan()
    device.close()


def _collect(RE, tmp_path):
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    journal = JournalWriter(tmp_path)
    RE.subscribe(journal)
    return docs, journal


def _pause_soon(RE):
    # request_pause blocks on the RunEngine loop, so it cannot be called from a callback
    threading.Thread(target=RE.request_pause, kwargs={"defer": False}, daemon=True).start()


def test_full_frame_every_line_and_start_doc(RE, stm, sim_server, tmp_path):
    docs, journal = _collect(RE, tmp_path)
    (uid,) = RE(
        live_frame(
            stm,
            frame=FRAME,
            pixels=PIXELS,
            lines=LINES,
            channels=["Current", "Z"],
            bias=-0.8,
            md={"sample": "pentacene"},
        )
    )
    start = docs[0][1]
    meta = start["stm_live"]
    assert set(meta) == START_KEYS and start["sample"] == "pentacene"
    assert meta["pixels"] == PIXELS and meta["lines"] == LINES
    assert meta["pixel_size_nm"] == pytest.approx(4.0 / PIXELS, rel=1e-6)
    assert meta["bias_V"] == pytest.approx(-0.8) and meta["z_controller"] == "constant_current"
    assert meta["line_key"] == "stm_line_index"
    assert meta["channels"][0] == {
        "name": "Current",
        "index": 0,
        "units": "A",
        "keys": {"forward": "stm_current_fwd", "backward": "stm_current_bwd"},
    }
    assert meta["channels"][1]["keys"]["backward"] == "stm_z_bwd"
    (desc,) = [d for n, d in docs if n == "descriptor"]
    assert desc["data_keys"]["stm_current_fwd"]["shape"] == [PIXELS]
    assert desc["data_keys"]["stm_current_fwd"]["units"] == "A"
    events = [d for n, d in docs if n == "event"]
    assert [e["data"]["stm_line_index"] for e in events] == list(range(LINES))
    for e in events:
        for key in ("stm_current_fwd", "stm_current_bwd", "stm_z_fwd", "stm_z_bwd"):
            assert e["data"][key].dtype == np.float32 and e["data"][key].shape == (PIXELS,)
            assert np.isfinite(e["data"][key]).all()
    assert docs[-1][1]["exit_status"] == "success"
    # the events are the controller's frame (forward as on the wire, backward flipped)
    with NanonisClient(sim_server.host, sim_server.port) as client:
        fwd = client.scan_frame_data_grab(0, forward=True).data
        bwd = client.scan_frame_data_grab(0, forward=False).data
    got = run_data(read_journal(tmp_path / "journal" / f"{uid}.journal"))
    np.testing.assert_array_equal(got.images["stm_current_fwd"], fwd)
    np.testing.assert_array_equal(got.images["stm_current_bwd"], bwd[:, ::-1])


def test_polling_fallback_gets_every_line(RE, stm, tmp_path):
    docs, _ = _collect(RE, tmp_path)
    stm.lines.use_wait = False  # as for a controller without Scan.WaitEndOfLine
    RE(live_frame(stm, frame=FRAME, pixels=16, lines=6, channels=["Current"]))
    lines = [d["data"]["stm_line_index"] for n, d in docs if n == "event"]
    assert lines == list(range(6)) and docs[-1][1]["exit_status"] == "success"


def test_pause_pauses_controller_and_resume_completes(RE, stm, sim_server, tmp_path):
    docs, _ = _collect(RE, tmp_path)
    ctrl = sim_server.controller

    def pause_after_three(name, doc):
        if name == "event" and doc["seq_num"] == 3:
            _pause_soon(RE)

    RE.subscribe(pause_after_three)
    with pytest.raises(RunEngineInterrupted):
        RE(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=LINES, channels=["Current"]))
    assert RE.state == "paused"
    assert ctrl.state == "paused"
    held = ctrl._halves_done
    time.sleep(0.15)  # >10 line times at this time scale
    assert ctrl._halves_done == held  # the controller really stopped scanning
    RE.resume()
    lines = [d["data"]["stm_line_index"] for n, d in docs if n == "event"]
    assert set(lines) == set(range(LINES)) and lines[-1] == LINES - 1
    assert docs[-1][1]["exit_status"] == "success"


def test_abort_mid_frame_stops_controller_scan(RE, stm, sim_server, tmp_path):
    docs, _ = _collect(RE, tmp_path)

    def pause_after_two(name, doc):
        if name == "event" and doc["seq_num"] == 2:
            _pause_soon(RE)

    RE.subscribe(pause_after_two)
    with pytest.raises(RunEngineInterrupted):
        RE(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=LINES, channels=["Current"]))
    assert sim_server.controller.scanning
    RE.abort(reason="operator")
    assert not sim_server.controller.scanning
    with NanonisClient(sim_server.host, sim_server.port) as client:
        assert client.scan_status_get() is False
    assert docs[-1][0] == "stop" and docs[-1][1]["exit_status"] == "abort"


def test_suspender_rewind_redelivers_the_checkpoint_line(RE, stm, sim_server, tmp_path):
    docs, _ = _collect(RE, tmp_path)
    flag = Signal(name="beam_dump", value=0)
    RE.install_suspender(SuspendBoolHigh(flag, sleep=0.05))

    during = []

    def release():
        deadline = time.monotonic() + 5  # the RunEngine suspends at its next message
        while sim_server.controller.state != "paused" and time.monotonic() < deadline:
            time.sleep(0.005)
        during.append(sim_server.controller.state)
        time.sleep(0.05)
        flag.put(0)

    def trip(name, doc):
        if name == "event" and doc["seq_num"] == 4:
            flag.put(1)
            threading.Thread(target=release, daemon=True).start()

    RE.subscribe(trip)
    RE(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=LINES, channels=["Current"]))
    assert during == ["paused"]  # suspending paused the controller scan
    lines = [d["data"]["stm_line_index"] for n, d in docs if n == "event"]
    # a rewind may re-send the checkpoint line; keeping the last, every line is there once
    assert list(dict.fromkeys(lines)) == list(range(LINES))
    assert docs[-1][1]["exit_status"] == "success"


def test_controller_dropped_mid_scan_fails_run_and_keeps_lines(RE, tmp_path):
    from stm_live.simulators.server import start_server_thread

    server = start_server_thread(seed=1, time_scale=5.0)
    # the controller does not come back: the frame fails once the outage outlives 1 s
    device = NanonisSTM(server.host, server.port, name="stm", max_outage_s=1.0)
    device.lines.line_timeout = 5.0
    docs, journal = _collect(RE, tmp_path)

    def drop(name, doc):
        if name == "event" and doc["seq_num"] == 3:
            threading.Thread(target=server.stop).start()

    RE.subscribe(drop)
    try:
        with pytest.raises(Exception) as info:
            RE(live_frame(device, frame=FRAME, pixels=PIXELS, lines=LINES, channels=["Current"]))
    finally:
        server.stop()
        device.close()
    assert "dropped" in str(info.value) or "stopped the scan" in str(info.value)
    stop = docs[-1][1]
    assert docs[-1][0] == "stop" and stop["exit_status"] == "fail"
    assert "127.0.0.1" in stop["reason"]
    read = [d["data"]["stm_line_index"] for n, d in docs if n == "event"]
    assert len(read) >= 3
    got = run_data(read_journal(journal.path_for(docs[0][1]["uid"])))
    assert got.lines_read == read and got.exit_status == "fail"


def test_check_recondition_refuses_what_the_plan_refuses_before_any_plan_runs(stm, sim_server):
    before = len(sim_server.controller.recondition_log)
    with pytest.raises(ValueError, match="inside the imaged frame"):
        check_recondition(stm, site=(1e-9, 0.0), frame_to_avoid=FRAME, bias_V=1.5, width_s=0.01)
    with pytest.raises(ValueError, match="takes bias_V and width_s"):
        check_recondition(stm, site=(20e-9, 20e-9), frame_to_avoid=FRAME, bias_V=1.5)
    with pytest.raises(ValueError, match="method must be"):
        check_recondition(stm, site=(20e-9, 20e-9), method="zap")
    check_recondition(stm, site=(20e-9, 20e-9), frame_to_avoid=FRAME, bias_V=1.5, width_s=0.01)
    assert len(sim_server.controller.recondition_log) == before  # checking acts on nothing


def test_recondition_refuses_site_in_frame_and_records_actions(RE, stm, sim_server, tmp_path):
    docs, _ = _collect(RE, tmp_path)
    with pytest.raises(ValueError, match="inside the imaged frame"):
        RE(recondition_tip(stm, site=(1e-9, 0.0), method="bias_pulse", frame_to_avoid=FRAME, bias_V=1.5, width_s=0.01))
    assert docs == []
    before = len(sim_server.controller.recondition_log)
    RE(
        recondition_tip(
            stm,
            site=(20e-9, 20e-9),
            method="bias_pulse",
            frame_to_avoid=FRAME,
            bias_V=1.5,
            width_s=0.01,
            verify_frame={"frame": FRAME, "pixels": 16, "lines": 4, "channels": ["Current"]},
        )
    )
    assert len(sim_server.controller.recondition_log) == before + 1
    starts = [d for n, d in docs if n == "start"]
    assert [s["plan_name"] for s in starts] == ["recondition_tip", "live_frame"]
    actions = [d["data"]["stm_last_action"] for n, d in docs if n == "event" and d["descriptor"] == docs[1][1]["uid"]]
    assert actions == ["start", "withdrawn", "at clean site", "bias_pulse", "returned"]
    tip_at_pulse = [d["data"] for n, d in docs if n == "event"][3]
    assert tip_at_pulse["stm_tip_x"] == pytest.approx(20e-9, abs=1e-12)


def test_survey_runs_one_frame_per_grid_point(RE, stm, tmp_path):
    docs, _ = _collect(RE, tmp_path)
    uids = RE(survey(stm, [(0.0, 0.0), (5e-9, 0.0)], width_m=3e-9, pixels=16, lines=3, channels=["Current"]))
    assert len(uids) == 2
    starts = [d for n, d in docs if n == "start"]
    assert [s["survey_index"] for s in starts] == [0, 1]
    assert starts[1]["stm_live"]["frame"]["center_x_m"] == pytest.approx(5e-9, rel=1e-5)
