"""SSIM / PSNR and the classical baseline (stm_live.models.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from stm_live.models.metrics import chen_tikhonov, psnr, ssim


def _blobs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n]
    img = np.zeros((n, n))
    for _ in range(5):
        cx, cy, w = rng.uniform(10, n - 10, 2).tolist() + [rng.uniform(2, 6)]
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * w**2))
    return img.astype(np.float32)


def test_identical_images_score_perfectly():
    a = _blobs()
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    assert psnr(a, a) == np.inf


def test_metrics_are_invariant_to_affine_scale():
    a, b = _blobs(seed=1), _blobs(seed=2)
    assert ssim(3.0 * a + 7.0, b) == pytest.approx(ssim(a, b), abs=1e-6)
    assert psnr(a, 0.5 * b - 1.0) == pytest.approx(psnr(a, b), abs=1e-5)


def test_psnr_matches_known_mse():
    a = np.zeros((32, 32), np.float32)
    a[0, 0] = 1.0  # min 0, max 1 fixed
    b = a.copy()
    b[10:20, 10:20] = 0.1  # MSE = 100 * 0.01 / 1024
    assert psnr(b, a) == pytest.approx(10 * np.log10(1024 / 1.0), abs=1e-6)


def test_ssim_drops_with_noise_and_stacks_work():
    a = _blobs()
    rng = np.random.default_rng(0)
    noisy = [a + rng.normal(0, s, a.shape).astype(np.float32) for s in (0.01, 0.05, 0.2)]
    scores = ssim(np.stack(noisy), np.stack([a] * 3))
    assert scores.shape == (3,)
    assert scores[0] > scores[1] > scores[2]
    assert psnr(noisy[0], a) > psnr(noisy[2], a) + 10


def test_metric_errors_name_the_problem():
    a = _blobs()
    with pytest.raises(ValueError, match="shape mismatch"):
        ssim(a, a[:32])
    with pytest.raises(ValueError, match="finite"):
        bad = a.copy()
        bad[3] = np.nan
        psnr(bad, a)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:8, :8], a[:8, :8])


def test_classical_baseline_is_identity_for_an_s_tip_and_sharpens_otherwise():
    a = _blobs()
    same = chen_tikhonov(a, 0.05, w_s=1.0, w_p=0.0)
    assert same.shape == a.shape and same.dtype == np.float32 and (same >= 0).all()
    assert ssim(same, a) > 0.999
    sharp = chen_tikhonov(a, 0.05)
    assert np.isfinite(sharp).all() and (sharp >= 0).all()
    assert ssim(sharp, a) < 0.999  # the p-channel model does change the image
    with pytest.raises(ValueError, match="pixel_size_nm"):
        chen_tikhonov(a, 0.0)


def test_evaluation_cells_are_fixed_imaging_renders_of_the_right_molecules():
    from stm_live.models.metrics import eval_cells, make_eval_pairs
    from stm_live.simulators.pairs import HELD_OUT_MOLECULES, TRAIN_MOLECULES

    held, seen = eval_cells("held-out"), eval_cells("in-distribution")
    assert {c["molecule"] for c in held} == set(HELD_OUT_MOLECULES)
    assert {c["molecule"] for c in seen} <= set(TRAIN_MOLECULES)
    assert {c["mode"] for c in held} == {"height", "current"}
    current = next(c for c in held if c["mode"] == "current")
    a, b = make_eval_pairs(current, 2, size=48), make_eval_pairs(current, 2, size=48)
    np.testing.assert_array_equal(a[0], b[0])  # fixed seeds
    assert a[0].shape == a[1].shape == (2, 48, 48) and np.isfinite(a[0]).all()
    np.testing.assert_allclose(a[1].max(axis=(1, 2)), 1.0, rtol=1e-6)
    clean, noisy = make_eval_pairs(held[0], 2, size=48), make_eval_pairs(held[0], 2, size=48, noise=0.1)
    assert np.mean(ssim(noisy[0], noisy[1])) < np.mean(ssim(clean[0], clean[1]))
    with pytest.raises(ValueError, match="split"):
        eval_cells("training")
