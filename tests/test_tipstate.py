"""Tip classifier (shipped checkpoint) and the line-level change detector."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stm_live.callbacks.tipwatch import TipWatch, detect_changes
from stm_live.models.tipdata import make_batch, simulate_scan
from stm_live.models.tipstate import DEFAULT_WEIGHTS, GOOD_CLASSES, TIP_CLASSES, load_tip_classifier


@pytest.fixture(scope="module")
def clf():
    return load_tip_classifier("cpu")


def test_good_vs_bad_on_fixed_simulated_set(clf):
    import torch

    x, y, _ = make_batch(70, np.random.default_rng(2024), clf.cfg, partial=False)
    probs, s = clf.predict(torch.from_numpy(x))
    pred = probs.argmax(1).numpy()
    good = [TIP_CLASSES.index(c) for c in GOOD_CLASSES]
    acc = np.mean(np.isin(pred, good) == np.isin(y, good))
    assert acc >= 0.85, f"good-vs-bad accuracy {acc:.2f} on the fixed set"
    assert ((s >= 0) & (s <= 1)).all()


def test_constant_current_frames_are_judged_like_constant_height(clf):
    """The monitor feeds Z maps through current_from_z; the classifier must read them as well."""
    from stm_live.models.tiptrain import evaluate

    m = evaluate(clf, samples=6, seed=77, mode="current")  # the shipped checkpoint: 0.93 / 0.93
    assert m["accuracy"] >= 0.85 and m["good_vs_bad"] >= 0.85, m


def test_classify_partial_frame_and_other_pixel_size(clf):
    rng = np.random.default_rng(5)
    img = simulate_scan(rng, "s", pixels=64, lines=64)  # 0.109 nm/px, resampled inside
    img[40:] = np.nan  # rows not yet scanned
    v = clf.classify(img, 7.0 / 64)
    assert v.label in TIP_CLASSES and set(v.probabilities) == set(TIP_CLASSES)
    assert sum(v.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= v.s_fraction <= 1.0
    with pytest.raises(ValueError, match="pixel_size_nm"):
        clf.classify(img, 0.0)
    with pytest.raises(ValueError, match="fewer than 3 scanned lines"):
        clf.classify(np.full((10, 10), np.nan), 0.1)


@pytest.mark.parametrize("tip, want_good", [("co", True), ("double", False)])
def test_short_non_square_verification_frame(clf, tip, want_good):
    """What reconditioning verifies on: the first 32 of 48 lines of a restarted 7 x 7 nm frame
    (0.109 nm pixels, 0.146 nm lines), the rest not scanned yet."""
    right = 0
    for seed in range(8):
        img = simulate_scan(np.random.default_rng(seed), tip, pixels=64, lines=48, height_nm=7.0)
        img[32:] = np.nan
        right += clf.classify(img, 7.0 / 64, line_spacing_nm=7.0 / 48).good == want_good
    assert right >= 7, f"{tip}: {right}/8 verdicts right"


def test_warm_start_records_the_lineage(tmp_path):
    import torch

    from stm_live.models.checkpoint import sha256_of as _sha256
    from stm_live.models.tiptrain import train_main

    parent = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    out = tmp_path / "child.pt"
    train_main(steps=2, out=out, device="cpu", seed=3, batch=4, bank_size=8, init=DEFAULT_WEIGHTS)
    child = torch.load(out, map_location="cpu", weights_only=True)
    assert child["init_sha256"] == _sha256(DEFAULT_WEIGHTS)
    assert child["total_steps"] == int(parent.get("total_steps", parent["steps"])) + 2
    assert "Warm start: from the checkpoint with sha256" in (tmp_path / "child_MODEL_CARD.md").read_text()
    assert load_tip_classifier("cpu", out, domain=None).cfg == load_tip_classifier("cpu").cfg
    # new weights have no domain statistics yet: the classifier refuses to load without them
    with pytest.raises(FileNotFoundError, match="stm-live train --model tipdomain"):
        load_tip_classifier("cpu", out)
    with pytest.raises(FileNotFoundError, match="stm-live train --model tipstate"):
        train_main(steps=1, out=tmp_path / "x.pt", device="cpu", init=tmp_path / "none.pt")


def test_missing_and_corrupt_weights_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="stm-live train --model tipstate"):
        load_tip_classifier("cpu", tmp_path / "none.pt")
    bad = tmp_path / "tipstate.pt"
    shutil.copy(DEFAULT_WEIGHTS, bad)
    shutil.copy(DEFAULT_WEIGHTS.with_suffix(".pt.sha256"), tmp_path / "tipstate.pt.sha256")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_tip_classifier("cpu", bad)


def test_change_detector_flags_within_3_lines():
    # clear changes: at the line the two tips image most differently (the benchmark reports
    # the rate over all visible changes, and the detector misses some on a molecule's flank)
    hits = 0
    for a, b, seed in (("co", "double", 1), ("co", "s", 5), ("s", "double", 3), ("co", "blunt", 4)):
        before = simulate_scan(np.random.default_rng(seed), a, pixels=128, lines=128, noise=0.0)
        after = simulate_scan(np.random.default_rng(seed), b, pixels=128, lines=128, noise=0.0)
        rows = np.sqrt(((after.astype(float) - before) ** 2).mean(1)) / before.std()
        c = int(np.argmax(rows[20:-10])) + 20
        assert rows[c] > 0.5
        img = simulate_scan(np.random.default_rng(seed), a, tip_after=b, change_line=c, pixels=128, lines=128)
        alarms = [x for x in detect_changes(img) if x.flagged_at >= c]
        assert alarms, f"{a}->{b} at line {c} not flagged"
        assert alarms[0].flagged_at - c <= 3 and abs(alarms[0].line - c) <= 2
        hits += 1
    assert hits == 4


def test_change_detector_quiet_on_clean_frames():
    rng = np.random.default_rng(99)
    alarms = sum(
        len(detect_changes(simulate_scan(rng, tip, pixels=128, lines=128)))
        for tip in ("co", "s", "mixed", "co", "double", "co")
    )
    assert alarms == 0


def test_tipwatch_rejects_bad_lines_and_handles_rewind():
    w = TipWatch()
    with pytest.raises(ValueError, match="line 0 has 2 pixels"):
        w.update(np.zeros(2), 0)
    rng = np.random.default_rng(0)
    for i in range(10):
        w.update(rng.normal(size=32), i)
    w.update(rng.normal(size=32), 5)  # re-sent after a rewind: history from 5 on is dropped
    assert max(w._lines) == 5


def test_predict_pads_views_without_changing_the_verdict(clf):
    """Frames of different sizes batched together (so padded further) get the verdicts they
    get alone: padding is outside the scanned area, which the pooling ignores; only the
    network's border cells see how much of it there is."""
    rng = np.random.default_rng(5)
    images = [
        simulate_scan(rng, tip, pixels=p, lines=n_lines)[:rows]
        for tip, p, n_lines, rows in (("co", 64, 64, 64), ("double", 80, 48, 30), ("blunt", 100, 100, 70))
    ]
    together = clf.classify_many(images, 0.1)
    for image, verdict in zip(images, together):
        alone = clf.classify(image, 0.1)
        assert alone.label == verdict.label
        for c in TIP_CLASSES:
            assert abs(alone.probabilities[c] - verdict.probabilities[c]) < 0.05
