"""Tip policy: prompt with timeout, auto reconditioning end to end, give-up pauses."""

from __future__ import annotations

import threading
import time

import pytest

from stm_live.config import LimitError, load_profile

FRAME = {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 7e-9, "height_m": 7e-9, "angle_deg": 0.0}
PIXELS, LINES = 64, 48


def _bad(line=20, label="double"):
    probs = {c: 0.01 for c in ("co_sharp", "metal_s", "mixed", "asymmetric", "double", "blunt", "unstable")}
    probs[label] = 0.94
    return {"run_uid": "r1", "line": line, "first_line": 0, "change_line": 17, "label": label,
            "probabilities": probs, "s_fraction": 0.2, "good": False, "reason": "test"}


class _FakeSTM:
    profile = load_profile("sim")
    host, port, timeout = "127.0.0.1", 1, 1.0


def _rec(policy, **kw):
    from stm_live.reconditioning import TipReconditioner

    return TipReconditioner(_FakeSTM(), policy=policy, classifier=object(), **kw)


def test_prompt_timeout_means_no_action():
    asked, release = [], threading.Event()

    def slow_operator(msg):
        asked.append(msg)
        release.wait(5)
        return True  # too late

    rec = _rec("prompt", ask=slow_operator, ask_timeout_s=0.3)
    rec.on_verdict(_bad())
    deadline = time.monotonic() + 5
    while not any(e["what"] == "prompt" for e in rec.events) and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    (prompt,) = [e for e in rec.events if e["what"] == "prompt"]
    assert prompt["answer"] == "timeout (no action)"
    assert rec.state.get() == "good"  # nothing suspended
    assert "'double'" in asked[0] and "bias_pulse" in asked[0] and "clean site" in asked[0]


def test_prompt_yes_trips_suspender_and_off_only_records():
    rec = _rec("prompt", ask=lambda msg: True, ask_timeout_s=2.0)
    rec.on_verdict(_bad())
    deadline = time.monotonic() + 5
    while rec.state.get() != "bad" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.state.get() == "bad" and "double" in rec.suspender.justification
    off = _rec("off")
    off.on_verdict(_bad())
    assert off.state.get() == "good" and off.events[0]["what"].startswith("bad tip (policy off")


def test_actions_outside_limits_are_refused():
    with pytest.raises(LimitError, match="max_abs_bias_V"):
        _rec("auto", actions=[("bias_pulse", {"bias_V": 9.0, "width_s": 0.1})])
    with pytest.raises(ValueError, match="tip policy"):
        _rec("sometimes")


def _scenario(recondition):
    from stm_live.simulators.scenario import load_scenario, parse_scenario
    import dataclasses

    base = load_scenario("default")
    sc = parse_scenario({"tip": {"preset": "co", "recondition": recondition}}, source="test.yaml")
    return dataclasses.replace(base, evolution=sc.evolution)


def _degrade_at(ctrl, tip, line):
    def run():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cur = ctrl._current_line() if ctrl.scanning else None
            if cur is not None and cur >= line:
                ctrl.set_tip(tip, cause="test")
                return
            time.sleep(0.002)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


@pytest.fixture()
def rig(request):
    from stm_live.callbacks.tipmonitor import TipMonitor
    from stm_live.devices.stm import NanonisSTM
    from stm_live.models import load_tip_classifier
    from stm_live.simulators.server import start_server_thread

    recondition = request.param
    server = start_server_thread(scenario=_scenario(recondition), seed=3, time_scale=20.0)
    stm = NanonisSTM(server.host, server.port, name="stm", profile=load_profile("sim"))
    stm.lines.line_timeout = 20.0
    clf = load_tip_classifier("cpu")
    yield server, stm, clf, TipMonitor
    stm.stop_scan()
    stm.close()
    server.stop()


def _wire(RE, stm, clf, TipMonitor, **kw):
    from stm_live.reconditioning import TipReconditioner

    rec = TipReconditioner(stm, policy="auto", classifier=clf, verify_lines=32, **kw)
    mon = TipMonitor(clf, every_n_lines=8, on_verdict=rec.on_verdict)
    rec.monitor = mon
    docs = []
    RE.subscribe(lambda n, d: docs.append((n, d)))
    RE.subscribe(mon)
    rec.install(RE)
    return rec, mon, docs


@pytest.mark.parametrize("rig", [{"pulse": {"repair": 1.0}, "poke": {"co": 1.0}, "shaper": {"co": 1.0}}],
                         indirect=True)
def test_auto_suspends_reconditions_and_resumes(RE, rig):
    from stm_live.plans import live_frame

    server, stm, clf, TipMonitor = rig
    rec, mon, docs = _wire(RE, stm, clf, TipMonitor)
    _degrade_at(server.controller, "double", 16)
    RE(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=LINES, z_controller="constant_height"))
    mon.flush(20)
    frame_start = next(d for n, d in docs if n == "start" and "stm_live" in d)
    stops = {d["run_start"]: d for n, d in docs if n == "stop"}
    assert stops[frame_start["uid"]]["exit_status"] == "success"
    descs = {d["uid"]: d["name"] for n, d in docs if n == "descriptor" and d["run_start"] == frame_start["uid"]}
    lines = {d["data"]["stm_line_index"] for n, d in docs if n == "event" and descs.get(d["descriptor"]) == "primary"}
    assert lines == set(range(LINES))  # the frame completed
    steps = [d["data"]["tip_recondition_step"] for n, d in docs
             if n == "event" and descs.get(d["descriptor"]) == "tip_recondition"]
    assert steps[0] == "suspended" and "verified" in steps and steps[-1] == "resumed"
    assert rec.attempts and rec.attempts[-1].good and rec.give_up_reason is None
    # the actions ran on the controller, at the clean site, and were recorded as runs of their own
    log = server.controller.recondition_log
    assert log and log[0]["action"] == "pulse" and log[0]["before"] == "double"
    assert server.controller.tip_label in ("co_sharp", "metal_s", "mixed")
    rec_runs = [d for n, d in docs if n == "start" and d.get("plan_name") == "recondition_tip"]
    assert rec_runs and rec_runs[0]["plan_args"]["site"] == list(load_profile("sim").recondition.clean_site_m)


@pytest.mark.parametrize("rig", [{"pulse": {"repair": 1.0}, "poke": {"co": 1.0}, "shaper": {"co": 1.0}}],
                         indirect=True)
def test_resumed_frame_rescans_the_lines_the_old_tip_took_ahead(RE, rig):
    """Slow callbacks make the RunEngine lag the controller, which finishes the frame with the
    bad tip before the suspension. After the repair the frame resumes at its checkpoint with
    lines the controller scanned after the repair, not the buffered old-tip ones."""
    from stm_live.plans import live_frame

    server, stm, clf, TipMonitor = rig
    rec, mon, docs = _wire(RE, stm, clf, TipMonitor)
    RE.subscribe(lambda name, doc: time.sleep(0.05) if name == "event" else None)
    _degrade_at(server.controller, "double", 16)
    RE(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=LINES, z_controller="constant_height"))
    mon.flush(20)
    suspended_at = next(e["time"] for e in rec.events if e["what"] == "suspend")
    resume = next(e for e in rec.events if e["what"] == "resume")
    assert resume["success"] and resume["rescanned_lines"] > 0, rec.events
    frame_start = next(d for n, d in docs if n == "start" and "stm_live" in d)
    primary = {d["uid"] for n, d in docs if n == "descriptor" and d["run_start"] == frame_start["uid"]
               and d["name"] == "primary"}
    acquired = {}  # line -> when its last delivered copy left the controller
    for n, d in docs:
        if n == "event" and d["descriptor"] in primary:
            acquired[d["data"]["stm_line_index"]] = d["timestamps"]["stm_line_index"]
    assert sorted(acquired) == list(range(LINES))
    first_new = resume["from_line"]
    assert 0 < first_new < LINES
    assert all(acquired[i] < suspended_at for i in range(first_new))
    assert all(acquired[i] > suspended_at for i in range(first_new, LINES)), (first_new, acquired)


@pytest.mark.parametrize("rig", [{"pulse": {"blunt": 1.0}, "poke": {"blunt": 1.0}, "shaper": {"blunt": 1.0}}],
                         indirect=True)
def test_gives_up_and_pauses_with_reason(RE, rig):
    from bluesky.utils import RunEngineInterrupted

    from stm_live.plans import live_frame

    server, stm, clf, TipMonitor = rig
    rec, mon, docs = _wire(RE, stm, clf, TipMonitor, max_attempts=2)
    _degrade_at(server.controller, "blunt", 16)
    with pytest.raises(RunEngineInterrupted, match="gave up after 2 attempts"):
        RE(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=LINES, z_controller="constant_height"))
    assert RE.state == "paused"
    assert "gave up" in rec.give_up_reason and len(rec.attempts) == 2
    assert not any(a.good for a in rec.attempts)
    steps = [d["data"].get("tip_recondition_step") for n, d in docs if n == "event"]
    assert "gave up" in steps
    RE.abort("operator: the tip needs hands-on work")
    mon.close()
    frame_start = next(d for n, d in docs if n == "start" and "stm_live" in d)
    (stop,) = [d for n, d in docs if n == "stop" and d["run_start"] == frame_start["uid"]]
    assert stop["exit_status"] == "abort", stop

