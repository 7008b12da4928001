"""TipMonitor: verdict documents from live-frame documents, off the RunEngine thread."""

from __future__ import annotations

import threading

import numpy as np

from stm_live.callbacks.frames import frame_documents
from stm_live.callbacks.tipmonitor import VERDICT_STREAM, TipMonitor
from stm_live.models import load_tip_classifier
from stm_live.models.tipdata import simulate_scan
from stm_live.models.tipstate import MIN_VERDICT_HEIGHT_NM, TIP_CLASSES

N = 96


def _frame_docs(image, pixel_size_nm):
    return frame_documents(image, pixel_size_nm, bias_V=-0.5)


def test_monitor_emits_verdict_run_and_timeline():
    clf = load_tip_classifier("cpu")
    seed, change = 1, None
    before = simulate_scan(np.random.default_rng(seed), "co", pixels=N, lines=N, noise=0.0)
    after = simulate_scan(np.random.default_rng(seed), "double", pixels=N, lines=N, noise=0.0)
    rows = np.sqrt(((after.astype(float) - before) ** 2).mean(1)) > 0.3 * before.std()
    change = int(np.flatnonzero(rows[24:])[0]) + 24
    image = simulate_scan(np.random.default_rng(seed), "co", tip_after="double", change_line=change, pixels=N, lines=N)
    out, threads, verdicts = [], set(), []

    def on_verdict(rec):
        verdicts.append(rec)
        threads.add(threading.current_thread().name)

    mon = TipMonitor(clf, every_n_lines=16, on_verdict=on_verdict)
    mon.subscribe(lambda n, d: out.append((n, d)))
    frame_uid = None
    for name, doc in _frame_docs(image, 7.0 / N):
        frame_uid = frame_uid or doc["uid"]
        mon(name, doc)
    assert mon.flush(60)
    mon.close()
    names = [n for n, _ in out]
    assert names[0] == "start" and names[1] == "descriptor" and names[-1] == "stop"
    start = out[0][1]
    assert start["parent_uid"] == frame_uid and start["purpose"] == "tip_verdicts"
    assert out[1][1]["name"] == VERDICT_STREAM
    events = [d for n, d in out if n == "event"]
    assert len(events) == len(mon.timeline) == len(verdicts) >= 4
    # the first verdict waits for MIN_VERDICT_HEIGHT_NM of frame (7 nm over N lines)
    assert verdicts[0]["line"] + 1 == int(np.ceil(MIN_VERDICT_HEIGHT_NM / (7.0 / N)))
    for e in events:
        assert e["data"]["label"] in TIP_CLASSES and len(e["data"]["probabilities"]) == len(TIP_CLASSES)
    # the change was located within 3 lines and a verdict followed it
    changed = [e for e in events if e["data"]["change_line"] >= 0]
    assert changed and abs(changed[0]["data"]["change_line"] - change) <= 3
    assert any(v["reason"].startswith("tip change detected") for v in verdicts)
    assert verdicts[-1]["reason"] == "end of frame" and verdicts[-1]["first_line"] >= change - 3
    assert threads == {"TipMonitor"}  # never on the caller's (RunEngine's) thread
    assert not mon.errors


class _NeverAlarms:
    """A change detector that misses every change (as TipWatch misses a new second apex)."""

    def update(self, line, index):
        return None


class _MarkerClassifier:
    """'double' when most of the lines it is shown carry the marker value, else 'co_sharp'."""

    def classify(self, image, pixel_size_nm, *, line_spacing_nm=None):
        from stm_live.models.tipstate import TipVerdict

        bad = float(np.mean(image[np.isfinite(image).all(axis=1), 0] > 5.0)) > 0.5
        label = "double" if bad else "co_sharp"
        return TipVerdict(label, {c: float(c == label) for c in TIP_CLASSES}, 0.1)


def test_latest_lines_reveal_a_change_the_detector_missed():
    image = np.random.default_rng(0).random((N, N))
    change = 40
    image[change:] += 10.0  # the marker: the tip is bad from this line on
    mon = TipMonitor(_MarkerClassifier(), every_n_lines=8, watch_factory=_NeverAlarms)
    for name, doc in _frame_docs(image, 7.0 / N):
        mon(name, doc)
    assert mon.flush(30)
    mon.close()
    need = int(np.ceil(MIN_VERDICT_HEIGHT_NM / (7.0 / N)))
    first_bad = next(v for v in mon.timeline if not v["good"])
    # the lines since the frame's start are still mostly good: the latest lines carried it
    assert first_bad["first_line"] == first_bad["line"] + 1 - need > 0
    assert "latest" in first_bad["reason"]
    assert first_bad["line"] < change + need  # not left to the end of the frame
    before = [v for v in mon.timeline if v["line"] < change]
    assert before and all(v["good"] for v in before)
    assert not mon.errors


class _UnknownMarker:
    """'unknown' (outside the domain; nearest class 'double') when most of the lines it is shown
    carry the marker value, else 'co_sharp' inside the domain."""

    def classify(self, image, pixel_size_nm, *, line_spacing_nm=None):
        from stm_live.models.tipstate import UNKNOWN, TipVerdict

        odd = float(np.mean(image[np.isfinite(image).all(axis=1), 0] > 5.0)) > 0.5
        probs = {c: 0.01 for c in TIP_CLASSES}
        probs["double" if odd else "co_sharp"] = 0.94
        return TipVerdict(
            UNKNOWN if odd else "co_sharp",
            probs,
            0.1,
            in_domain=not odd,
            domain_score=900.0 if odd else 100.0,
            domain_threshold=400.0,
        )


def test_unknown_latest_lines_never_count_as_the_worse_verdict():
    """The latest lines replace the segment's verdict only when they show a bad tip inside the
    classifier's domain: lines it does not know leave the segment's verdict standing until
    they are most of it, and then the verdict is "unknown", with its domain score recorded."""
    image = np.random.default_rng(0).random((N, N))
    image[40:] += 10.0  # from here on, lines the classifier does not know
    out = []
    mon = TipMonitor(_UnknownMarker(), every_n_lines=8, watch_factory=_NeverAlarms)
    mon.subscribe(lambda n, d: out.append((n, d)))
    for name, doc in _frame_docs(image, 7.0 / N):
        mon(name, doc)
    assert mon.flush(30)
    mon.close()
    assert not any("latest" in v["reason"] for v in mon.timeline)
    for v in mon.timeline:
        odd_share = (v["line"] + 1 - 40) / (v["line"] + 1 - v["first_line"])
        assert v["label"] == ("unknown" if odd_share > 0.5 else "co_sharp"), v
        assert v["in_domain"] == (v["label"] != "unknown") and v["domain_threshold"] == 400.0
    assert mon.timeline[-1]["label"] == "unknown" and not mon.timeline[-1]["good"]
    events = [d for n, d in out if n == "event"]
    assert events[-1]["data"]["in_domain"] is False and events[-1]["data"]["domain_score"] == 900.0
    descriptor = next(d for n, d in out if n == "descriptor")
    assert {"in_domain", "domain_score", "domain_threshold"} <= set(descriptor["data_keys"])
    assert not mon.errors
