"""Scan artifacts and report pictures."""

import numpy as np
import pytest
from PIL import Image

from stm_live import report
from stm_live.simulators import artifacts

FLAT = np.zeros((64, 64), np.float32)


def _blob():
    rows, cols = np.mgrid[0:64, 0:64]
    return np.exp(-((rows - 32.0) ** 2 + (cols - 32.0) ** 2) / 20.0).astype(np.float32)


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: artifacts.white_noise(FLAT, 0.1, rng),
        lambda rng: artifacts.pink_noise(FLAT, 0.1, rng),
        lambda rng: artifacts.line_offsets(FLAT, 0.1, rng),
        lambda rng: artifacts.spikes(FLAT, 0.01, 1.0, rng),
    ],
)
def test_random_artifacts_are_seeded_and_reproducible(make):
    first, again, other = make(np.random.default_rng(7)), make(np.random.default_rng(7)), make(8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == FLAT.dtype and first.shape == FLAT.shape
    assert not FLAT.any()  # the input is never modified


def test_white_noise_has_the_requested_sigma():
    noisy = artifacts.white_noise(FLAT, 0.2, 1)
    assert noisy.std() == pytest.approx(0.2, rel=0.05)


def test_pink_noise_power_falls_as_one_over_f():
    series = artifacts.pink_noise(np.zeros((256, 256)), 1.0, 3).ravel()
    power = np.abs(np.fft.rfft(series)) ** 2
    freq = np.fft.rfftfreq(series.size)
    low = power[(freq > 1e-4) & (freq < 2e-4)].mean()
    high = power[(freq > 1e-2) & (freq < 2e-2)].mean()
    assert 30 < low / high < 300  # one decade per decade of frequency: 100x over 100x in f


def test_line_offsets_are_constant_along_each_line():
    shifted = artifacts.line_offsets(FLAT, 0.5, 2)
    assert np.all(shifted.std(axis=1) < 1e-6)
    assert shifted[:, 0].std() > 0.2


def test_drift_moves_features_down_the_frame():
    blob = _blob()
    drifted = artifacts.drift(blob, (0.2, 0.0))
    top_peak = np.argmax(drifted[20])
    bottom_peak = np.argmax(drifted[44])
    assert bottom_peak < top_peak  # the sample slides right, so later lines see it further left
    np.testing.assert_allclose(artifacts.drift(blob, (0.0, 0.0)), blob, atol=1e-6)


def test_creep_decays_over_the_first_lines():
    stripes = np.tile(np.cos(np.arange(64) / 3.0), (64, 1))
    crept = artifacts.creep(stripes, 5.0, 4.0)
    np.testing.assert_allclose(crept[60:, :-1], stripes[60:, :-1], atol=1e-3)
    shift = np.abs(crept[:4] - stripes[:4]).max(axis=1)
    assert shift[0] > shift[3] > 0.1


def test_spikes_hit_about_the_requested_fraction():
    spiky = artifacts.spikes(FLAT, 0.01, 1.0, 4)
    hit = np.count_nonzero(spiky) / spiky.size
    assert 0.01 < hit < 0.04  # 1 % of pixels start a spike of 1–3 pixels


def test_tip_change_switches_rows_from_the_line_on():
    before, after = np.zeros((10, 4)), np.ones((10, 4))
    changed = artifacts.tip_change(before, after, 6)
    assert not changed[:6].any() and changed[6:].all()
    with pytest.raises(ValueError, match="line"):
        artifacts.tip_change(before, after, 11)
    with pytest.raises(ValueError, match="differ in shape"):
        artifacts.tip_change(before, np.ones((9, 4)), 3)


def test_bad_artifact_input_raises():
    with pytest.raises(ValueError, match="sigma"):
        artifacts.white_noise(FLAT, -1.0, 0)
    with pytest.raises(ValueError, match="rng"):
        artifacts.white_noise(FLAT, 1.0, "seed")
    with pytest.raises(ValueError, match="2-D"):
        artifacts.line_offsets(np.zeros(5), 1.0, 0)
    with pytest.raises(ValueError, match="tau_lines"):
        artifacts.creep(FLAT, 1.0, 0.0)


def test_save_png_writes_a_readable_png(tmp_path):
    image = _blob()
    image[3] = np.nan
    path = report.save_png(tmp_path / "sub" / "blob.png", image)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (64, 64) and png.mode == "RGB"
        pixels = np.asarray(png)
    assert tuple(pixels[3, 0]) == report.NAN_GREY
    assert tuple(pixels[32, 32]) == (255, 255, 255)  # the peak maps to the top of afmhot
    assert tuple(pixels[0, 0]) == (0, 0, 0)


def test_colormaps_montage_and_errors():
    rgb = report.image_to_rgb(np.arange(12.0).reshape(3, 4), cmap="viridis")
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 4, 3)
    sheet = report.montage([("a", _blob()), ("b", _blob()), ("c", rgb)], ncols=2, tile=64)
    assert sheet.shape[1] == 128 and sheet.shape[0] >= 128 and sheet.dtype == np.uint8
    with pytest.raises(ValueError, match="colormap"):
        report.image_to_rgb(_blob(), cmap="jet")
    with pytest.raises(ValueError, match="at least one"):
        report.montage([])


def test_gallery_sheet_is_written(tmp_path):
    from stm_live.gallery import GALLERY_SCENES, GALLERY_TIPS, render_gallery

    path = render_gallery(tmp_path, pixels=24)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (160 * (2 + len(GALLERY_TIPS)), (160 + 16) * len(GALLERY_SCENES))
        assert np.asarray(png).std() > 10  # not a blank sheet
