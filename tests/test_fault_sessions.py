"""Whole sessions against the simulated controller's fault layer (issue 21).

The faults are the simulator's own (``simulators/faults.py``) on real TCP, fired at lines of
frames or at the n-th call of a command, never at a time, so each test meets the same faults
on a quiet or a loaded machine. The rest is what a session runs: the ophyd ``NanonisSTM``, the
``live_frame`` plan, a real RunEngine with the link suspender (``AcquisitionSession.watch``),
the journal, and the tip policy's reconditioning loop. The scan runs at a time scale that
keeps a frame to a second or two; every wait is bounded and ends on an event.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from stm_live.simulators.faults import Fault

pytestmark = pytest.mark.timeout(180)

PIXELS = 32
FRAME = {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 7e-9, "height_m": 7e-9, "angle_deg": 0.0}
TIME_SCALE = 4.0  # 0.2 s of simulated scan per line: 50 ms
TIMEOUT = 1.0  # the device's base reply deadline: a 3 s stall is well past it


@pytest.fixture()
def served():
    """``served(*faults, time_scale=...)``: the simulated controller (default scene, a stable CO
    tip) behind those faults; stopped at teardown."""
    from stm_live.simulators.server import start_server_thread

    servers = []

    def start(*faults, time_scale=TIME_SCALE):
        servers.append(start_server_thread(seed=2, time_scale=time_scale, faults=list(faults)))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _session(RE, tmp_path, server, **device):
    from stm_live.devices.stm import NanonisSTM
    from stm_live.session import AcquisitionSession

    stm = NanonisSTM(server.host, server.port, name="stm", timeout=TIMEOUT, **device)
    stm.lines.line_timeout = 60.0  # a loaded machine is not a stalled scan
    session = AcquisitionSession(tmp_path, RE=RE)
    said: list[str] = []
    session.watch(stm, say=said.append)
    RE.record_interruptions = True  # each suspension, as an event of the frame's run
    return stm, session, said


def _frame(stm, lines: int, **kw):
    from stm_live.plans import live_frame

    return live_frame(stm, frame=FRAME, pixels=PIXELS, lines=lines, channels=["Current"], **kw)


def _journaled(tmp_path, uid):
    """The run as journaled, and the justifications of its suspensions."""
    from stm_live.store import read_journal, run_data

    docs = read_journal(tmp_path / "journal" / f"{uid}.journal")
    streams = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    suspended = [
        d["data"]["interruption"] for n, d in docs if n == "event" and streams[d["descriptor"]] == "interruptions"
    ]
    return run_data(docs), suspended


def _controller_frame(server):
    """The controller's own buffer of channel 0, both directions in forward orientation."""
    ctrl = server.controller
    return ctrl.frame_data(0, True)[1], ctrl.frame_data(0, False)[1][:, ::-1]


def _assert_every_line_once(run, lines: int, controller_frame, rows=slice(None)):
    """A run that ended "success" with each line journaled once, equal to the controller's."""
    assert run.exit_status == "success", run.stop
    assert sorted(run.lines_read) == list(range(lines)), run.lines_read  # none lost, none doubled
    fwd, bwd = controller_frame
    np.testing.assert_array_equal(run.images["stm_current_fwd"][rows], fwd[rows])
    np.testing.assert_array_equal(run.images["stm_current_bwd"][rows], bwd[rows])


def _fired(server, kind: str) -> list[dict]:
    return [f for f in server.server.faults.fired if f["kind"] == kind]


def _wait_accepting(server, within: float = 60.0) -> None:
    """Until the controller takes connections again (a refusal ended); bounded."""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection((server.host, server.port), timeout=5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"still refused after {within} s"
            time.sleep(0.1)


def test_a_session_rides_through_stalls_drops_and_a_10_s_refusal(RE, tmp_path, served):
    # 2.4 s of scan a frame: should the 12th grab (3 s late, early in frame 0) hold the follower
    # back past the stall's line, the stall fires on the first reply after it, still in frame 0
    lines = 48
    faults = [
        # LabVIEW busy: the end-of-line reply of line 4 comes 3 s late, past its 1.2 s deadline
        Fault("stall", line=4, frame=0, seconds=3.0),
        Fault("drop", line=20, frame=1),  # the link goes, and stays down for 10 s
        Fault("refuse", line=20, frame=1, seconds=10.0),
        Fault("drop", line=30, frame=2),  # every connection reset, back at once
        Fault("delay", commands=("Scan.FrameDataGrab",), seconds=3.0, nth=12),  # a grab 3 s late
        Fault("close_mid_reply", commands=("Scan.FrameDataGrab",), nth=80),  # one cut off halfway
    ]
    server = served(*faults)
    stm, session, said = _session(RE, tmp_path, server, max_outage_s=30.0)
    uids, frames = [], []
    try:
        for _ in range(4):  # as the demo runs frames: one live_frame after the other
            (uid,) = session(_frame(stm, lines))
            uids.append(uid)
            frames.append(_controller_frame(server))  # before the next frame clears the buffer
    finally:
        session.close()
        stm.close()
    fired = server.server.faults.fired
    assert sorted(f["fault"] for f in fired) == list(range(len(faults))), fired  # each once
    for k, uid in enumerate(uids):
        run, suspended = _journaled(tmp_path, uid)
        _assert_every_line_once(run, lines, frames[k])
        if k < 3:  # the line faults of frames 0-2 come a second or more into them: each was suspended
            assert any(s.startswith("link to 127.0.0.1") for s in suspended), (k, suspended)
    lost = [s for s in said if " lost at line " in s]
    assert lost and all(s.endswith("reconnecting…") for s in lost), said
    assert any("Scan.WaitEndOfLine: no reply" in s and "of frame 1 " in s for s in lost), said  # the stall
    assert any("Scan.FrameDataGrab: no reply" in s for s in lost), said  # the delay
    assert any("Scan.FrameDataGrab: controller closed the connection" in s for s in lost), said
    # the refusal was felt: the outage it began outlasted it, and the session waited it out
    backs = [float(s.split()[3]) for s in said if s.startswith("link back after ")]
    assert max(backs) >= 9.0, said
    assert stm.link.state == "up"


def test_an_outage_past_the_limit_fails_that_frame_with_its_reason_and_the_next_succeeds(RE, tmp_path, served):
    server = served(Fault("drop", line=6, frame=0), Fault("refuse", line=6, frame=0, seconds=5.0))
    stm, session, said = _session(RE, tmp_path, server, max_outage_s=1.5)
    try:
        with pytest.raises(Exception, match=r"not back within link.max_outage_s = 1.5 s"):
            session(_frame(stm, 30))
        _wait_accepting(server)
        lost_frame = _controller_frame(server)  # its scan went on; the next frame clears it
        (uid,) = session(_frame(stm, 16))
        run, _ = _journaled(tmp_path, uid)
        _assert_every_line_once(run, 16, _controller_frame(server))
    finally:
        session.close()
        stm.close()
    (failed_uid,) = [p.stem for p in (tmp_path / "journal").glob("*.journal") if p.stem != uid]
    failed, suspended = _journaled(tmp_path, failed_uid)
    assert failed.exit_status == "fail"
    reason = failed.stop["reason"]
    assert f"controller 127.0.0.1:{server.port} dropped at line" in reason and "of 30" in reason, reason
    # what the device had before the link went is kept, once: at most the rows done before the
    # drop at line 6 (a loaded machine may not have fetched the last of them)
    kept = sorted(failed.lines_read)
    assert kept == list(range(len(kept))) and 1 <= len(kept) <= 6, kept
    np.testing.assert_array_equal(failed.images["stm_current_fwd"][kept], lost_frame[0][kept])
    assert suspended  # it waited for the link before giving up
    assert any('ends "fail"' in s and "not back within 1.5 s" in s for s in said), said


class _GoodTip:
    """Stands in for the tip classifier: the reconditioning loop is under test, not the verdict.
    Keeps the images it judged."""

    def __init__(self):
        self.judged: list[np.ndarray] = []

    def classify(self, image, pixel_size_nm, line_spacing_nm=None):
        from stm_live.models.tipstate import TIP_CLASSES, TipVerdict

        self.judged.append(np.array(image))
        probs = dict.fromkeys(TIP_CLASSES, 0.01)
        probs["co_sharp"] = 0.94
        return TipVerdict("co_sharp", probs, 0.2)


def test_reconditioning_rides_through_stalls_and_a_drop_during_its_verification(RE, tmp_path, served):
    """Frame 0 is the live frame; the tip policy stops it, reconditions, and verifies the tip:
    it puts the frame's Z height back (that reply comes 3 s late, past its deadline) and
    restarts the scan, frame 1, whose line-2 end-of-line reply stalls 3 s and whose line 13 drops
    every connection (the verification grabs on one of them), all before the 16 lines the
    verification needs are in (at 0.2 s a line). The frame then resumes from its checkpoint on
    that scan."""
    from stm_live.config import load_profile
    from stm_live.models.tipstate import TIP_CLASSES
    from stm_live.reconditioning import RECORD_STREAM, TipReconditioner
    from stm_live.store import read_journal

    lines, bad_at = 32, 8
    server = served(
        Fault("delay", commands=("ZCtrl.ZPosSet",), seconds=3.0, nth=1),
        Fault("stall", line=2, frame=1, seconds=3.0),
        Fault("drop", line=13, frame=1),
        time_scale=1.0,
    )
    stm, session, said = _session(RE, tmp_path, server, profile=load_profile("sim"))
    assert stm.max_outage_s == 30.0  # the profile's link.max_outage_s
    clf = _GoodTip()
    rec = TipReconditioner(
        stm,
        policy="auto",
        classifier=clf,
        verify_lines=16,
        max_attempts=1,
        actions=[("bias_pulse", {"bias_V": 2.0, "width_s": 0.05})],
    )
    rec.install(RE)

    def tip_goes_bad(name, doc):  # as the tip monitor reports a double tip at line 8
        if name == "event" and doc["data"].get("stm_line_index") == bad_at and rec._open_run:
            probs = dict.fromkeys(TIP_CLASSES, 0.01)
            probs["double"] = 0.94
            rec.on_verdict(
                {
                    "run_uid": rec._open_run,
                    "line": bad_at,
                    "first_line": 0,
                    "change_line": bad_at,
                    "label": "double",
                    "probabilities": probs,
                    "s_fraction": 0.2,
                    "good": False,
                    "reason": "test",
                }
            )

    RE.subscribe(tip_goes_bad)
    try:
        uid, recondition = session(_frame(stm, lines, z_controller="constant_height"))
    finally:
        rec.remove()
        session.close()
        stm.close()
    assert [(f["frame"], f["line"]) for f in _fired(server, "stall")] == [(1, 2)]
    assert [(f["frame"], f["line"]) for f in _fired(server, "drop")] == [(1, 13)]
    assert len(_fired(server, "delay")) == 1
    assert len(rec.attempts) == 1 and rec.attempts[0].good and rec.give_up_reason is None
    (judged,) = clf.judged
    assert np.isfinite(judged[:16]).all()  # the verification had its 16 lines in spite of all three
    resume = next(e for e in rec.events if e["what"] == "resume")
    assert resume["success"] and 0 < resume["from_line"] < lines
    # the frame: every line once; those from the checkpoint on are the verification scan's
    run, _ = _journaled(tmp_path, uid)
    _assert_every_line_once(run, lines, _controller_frame(server), rows=slice(resume["from_line"], None))
    steps = [
        d["data"][f"{RECORD_STREAM}_step"]
        for n, d in read_journal(tmp_path / "journal" / f"{uid}.journal")
        if n == "event" and f"{RECORD_STREAM}_step" in d["data"]
    ]
    assert steps[0] == "suspended" and "verified" in steps and steps[-1] == "resumed", steps
    lost = [s for s in said if " lost at line " in s]
    assert any("ZCtrl.ZPosSet: no reply" in s for s in lost), said  # the delay, re-sent (an absolute set)
    assert any("Scan.WaitEndOfLine: no reply" in s for s in lost), said  # the stall
    assert stm.link.state == "up"
    assert len(server.controller.recondition_log) == 1  # the pulse ran once
    assert _journaled(tmp_path, recondition)[0].exit_status == "success"
