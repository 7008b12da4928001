"""stm-live under bluesky-queueserver: Redis and the RE Manager started as `stm-live queue start`
starts them, plans queued and controlled through the queue server's own API against the
simulated controller, runs read back from tiled; the prompt tip policy's pause."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import yaml

from stm_live.store import read_journal, run_data

pytest.importorskip("bluesky_queueserver", reason="the queue extra is not installed: pip install -e '.[queue]'")
pytest.importorskip("bluesky_queueserver_api", reason="the queue extra is not installed: pip install -e '.[queue]'")
needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not found (Debian's redis-server; .ci/run installs it)"
)

LINES, PIXELS = 40, 32


def _until(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@pytest.fixture(scope="module")
def controller():
    """The simulated controller, a line every 0.1 s: a frame lasts long enough to pause in it."""
    from stm_live.simulators.server import start_server_thread

    server = start_server_thread(seed=0, time_scale=2.0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def queue(controller, tmp_path_factory):
    """Redis, tiled and the RE Manager on free loopback ports, the environment open."""
    from stm_live.app.queue import QueueServices
    from stm_live.config import PROFILE_DIR

    folder = tmp_path_factory.mktemp("queue")
    profile = yaml.safe_load((PROFILE_DIR / "sim.yaml").read_text())
    profile["ports"] = [controller.port]
    (folder / "lab.yaml").write_text(yaml.safe_dump(profile))
    services = QueueServices(
        folder / "lab.yaml",
        data_dir=folder / "data",
        control_port=0,
        info_port=0,
        live=False,
        tip_policy="off",
        timeout_s=90.0,
    )
    services.start()
    RM = services.api()
    try:
        RM.environment_open()
        RM.wait_for_idle(timeout=120)
        assert RM.status()["worker_environment_exists"], services.log_path.read_text()[-3000:]
        yield services, RM
    finally:
        RM.close()
        problems = services.stop()
        assert not problems, problems


def _frame_journals(data_dir):
    out = []
    for path in sorted((data_dir / "journal").glob("*.journal"), key=lambda p: p.stat().st_mtime):
        docs = read_journal(path)
        if docs and "stm_live" in docs[0][1]:
            out.append(docs)
    return out


@needs_redis
def test_invalid_parameter_is_refused_before_the_controller_hears_of_it(queue, controller):
    from bluesky_queueserver_api import BPlan
    from bluesky_queueserver_api.comm_base import RequestFailedError

    services, RM = queue
    frame_before = controller.controller.scan_end_count, controller.server.connections
    for kwargs, says in (
        (dict(pixels=5000), r"(?s)key='pixels'.*5000 is out of range \[1, 1024\]"),
        (dict(direction="sideways"), r"(?s)direction\n.*should be 'down' or 'up'"),
        (dict(width_m="wide"), r"(?s)width_m\n.*valid number"),
    ):
        with pytest.raises(RequestFailedError, match=says):
            RM.item_add(BPlan("survey", grid=[[0.0, 0.0]], **{"width_m": 4e-9, "lines": 16, **kwargs}))
    assert RM.queue_get()["items"] == []
    assert (controller.controller.scan_end_count, controller.server.connections) == frame_before


@needs_redis
def test_survey_paused_and_resumed_mid_frame_lands_in_tiled(queue, controller):
    from bluesky_queueserver_api import BPlan
    from tiled.client import from_uri

    services, RM = queue
    data_dir = services.data_dir
    RM.item_add(BPlan("survey", grid=[[0.0, 0.0], [3e-9, 0.0]], width_m=4e-9, pixels=PIXELS, lines=LINES))
    RM.queue_start()

    def first_frame_lines():
        journals = _frame_journals(data_dir)
        return journals and sum(n == "event" for n, _ in journals[0]) >= 6

    _until(first_frame_lines, 90, "the first frame's sixth line")
    RM.re_pause(option="immediate")
    RM.wait_for_idle_or_paused(timeout=60)
    status = RM.status()
    assert status["re_state"] == "paused" and status["manager_state"] == "paused"
    assert RM.send_request(method="re_metadata")["re_metadata"]["stm_live_paused"] == "paused on request"
    _until(lambda: controller.controller.state == "paused", 10, "the controller's scan paused")
    (docs,) = _frame_journals(data_dir)
    lines_at_pause = {d["data"]["stm_line_index"] for n, d in docs if n == "event"}
    assert 6 <= len(lines_at_pause) < LINES  # mid-frame
    RM.re_resume()
    RM.wait_for_idle(timeout=180)
    assert "stm_live_paused" not in RM.send_request(method="re_metadata")["re_metadata"]
    item = RM.history_get()["items"][-1]
    assert item["name"] == "survey" and item["result"]["exit_status"] == "completed", item["result"]
    uids = item["result"]["run_uids"]
    assert len(uids) == 2
    client = from_uri(services.tiled_uri)
    _until(
        lambda: all(u in client and client[u].metadata.get("stop") for u in uids),
        90,
        "both runs in tiled with their stop documents",
    )
    for k, uid in enumerate(uids):
        journal = read_journal(data_dir / "journal" / f"{uid}.journal")
        expected = run_data(journal)
        run = client[uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        assert run.metadata["start"]["survey_index"] == k
        lines = run["primary"]["stm_line_index"].read().tolist()
        assert set(lines) == set(range(LINES)), f"frame {k}: lines {sorted(set(lines))}"
        events = [d for n, d in journal if n == "event"]
        for key in ("stm_current_fwd", "stm_z_fwd", "stm_z_bwd"):
            np.testing.assert_array_equal(run["primary"][key].read(), np.stack([e["data"][key] for e in events]))
            assert not np.isnan(expected.images[key]).any()


class _Truth:
    """The simulated tip's own state as the verification's verdict (the classifier has tests of
    its own): this test is about the pause, the answer and the reconditioning that follows."""

    def __init__(self, controller):
        self.controller = controller

    def classify(self, image, pixel_size_nm, line_spacing_nm=None):
        from stm_live.models.tipstate import TIP_CLASSES, TipVerdict

        label = self.controller.tip_label if self.controller.tip_label in TIP_CLASSES else "unstable"
        return TipVerdict(label, {c: 0.94 if c == label else 0.01 for c in TIP_CLASSES}, 0.2)


def test_prompt_policy_pauses_the_plan_says_why_and_resume_reconditions(RE, tmp_path):
    """Under the queue server the prompt policy's question pauses the plan (the reason in the
    RunEngine's metadata, where `qserver re metadata` reads it); resuming answers yes: the tip
    suspender runs the reconditioning and the frame finishes. The worker's RunEngine, in-process."""
    import dataclasses

    from bluesky.utils import RunEngineInterrupted

    from stm_live.config import load_profile
    from stm_live.devices.stm import NanonisSTM
    from stm_live.models.tipstate import TIP_CLASSES  # the policy's own import: not mid-frame
    from stm_live.plans import live_frame
    from stm_live.queueserver.environment import PAUSED_KEY, OperatorPrompt, PauseReasons
    from stm_live.reconditioning import TipReconditioner
    from stm_live.session import AcquisitionSession
    from stm_live.simulators.scenario import load_scenario, parse_scenario
    from stm_live.simulators.server import start_server_thread

    base = load_scenario("default")
    repair = parse_scenario({"tip": {"preset": "co", "recondition": {"pulse": {"repair": 1.0}}}}, source="t.yaml")
    said: list[str] = []
    reasons = PauseReasons(RE, said.append)
    with start_server_thread(
        scenario=dataclasses.replace(base, evolution=repair.evolution), seed=3, time_scale=5.0
    ) as server:
        stm = NanonisSTM(server.host, server.port, name="stm", profile=load_profile("sim"))
        stm.lines.line_timeout = 20.0
        session = AcquisitionSession(tmp_path, RE=RE)  # the journal
        # the verdicts come from the test, not a monitor: exactly one question
        policy = TipReconditioner(
            stm,
            policy="prompt",
            classifier=_Truth(server.controller),
            ask=OperatorPrompt(RE, reasons),
            ask_timeout_s=120.0,
            verify_lines=32,
        )
        policy.install(RE)
        asked = threading.Event()

        def bad_tip_at_line_10(name, doc):  # the verdict a monitor would give: a double tip
            if name == "event" and doc["data"].get("stm_line_index") == 10 and not asked.is_set():
                asked.set()
                server.controller.set_tip("double", cause="test")
                probabilities = {c: 0.94 if c == "double" else 0.01 for c in TIP_CLASSES}
                threading.Thread(
                    target=policy.on_verdict,
                    daemon=True,
                    args=(
                        {
                            "run_uid": doc_run[0],
                            "line": 10,
                            "first_line": 0,
                            "change_line": 9,
                            "label": "double",
                            "probabilities": probabilities,
                            "s_fraction": 0.2,
                            "good": False,
                            "reason": "test",
                        },
                    ),
                ).start()

        doc_run: list[str] = []
        RE.subscribe(lambda n, d: doc_run.append(d["uid"]) if n == "start" and "stm_live" in d else None)
        RE.subscribe(bad_tip_at_line_10)
        try:
            with pytest.raises(RunEngineInterrupted):
                RE(live_frame(stm, frame=(0, 0, 7e-9, 7e-9, 0), pixels=64, lines=48, z_controller="constant_height"))
            assert RE.state == "paused"
            assert "'double'" in RE.md[PAUSED_KEY] and "Resume the plan to recondition" in RE.md[PAUSED_KEY]
            assert said and said[-1].startswith("paused: Tip looks 'double'")
            RE.resume()  # the operator's yes
            assert PAUSED_KEY not in RE.md
            assert session.wait(60)
        finally:
            policy.remove()
            session.close()
            stm.stop_scan()
            stm.close()
    answers = [e["answer"] for e in policy.events if e["what"] == "prompt"]
    assert answers == ["yes"]
    assert policy.attempts and policy.attempts[-1].good and server.controller.recondition_log
    docs = read_journal(tmp_path / "journal" / f"{doc_run[0]}.journal")
    data = run_data(docs)
    assert data.exit_status == "success" and set(data.lines_read) == set(range(48))
    steps = [d["data"]["tip_recondition_step"] for n, d in docs if n == "event" and "tip_recondition_step" in d["data"]]
    assert steps[0] == "suspended" and steps[-1] == "resumed"
