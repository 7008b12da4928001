"""stm_live.interpret: the one place that decides what a frame means to the networks."""

from __future__ import annotations

import numpy as np
import pytest
from sxm_files import scene, write_raw_sxm

from stm_live.interpret import (
    CONSTANT_CURRENT,
    CONSTANT_HEIGHT,
    SIGNAL,
    choose_channel,
    classifier_scope,
    from_scan,
    network_input,
    plane_level,
    stmnet_scope,
)
from stm_live.io.sxm import read_sxm
from stm_live.simulators.vacuum import current_from_z


def test_constant_current_picks_z_constant_height_picks_current():
    names = ["Current", "Z", "LI_Demod_1_X"]
    units = {"Current": "A", "Z": "m", "LI_Demod_1_X": "A"}
    assert choose_channel(names, feedback_on=True, units=units)[:2] == ("Z", CONSTANT_CURRENT)
    assert choose_channel(names, feedback_on=False, units=units)[:2] == ("Current", CONSTANT_HEIGHT)
    # the user's channel wins, matched without case or unit suffix
    assert choose_channel(names, feedback_on=True, units=units, requested="li demod 1 x")[:2] == (
        "LI_Demod_1_X",
        SIGNAL,
    )
    assert choose_channel(["Current (A)", "Z (m)"], feedback_on=True)[0] == "Z (m)"


def test_unrecorded_controller_state_is_judged_by_the_z_data():
    names = ["Current", "Z"]
    flat = np.full((8, 8), 1e-9) + np.random.default_rng(0).normal(0, 1e-13, (8, 8))
    varied = flat + np.linspace(0, 50e-12, 8)[None, :]
    name, mode, why = choose_channel(names, feedback_on=None, z_data=flat)
    assert (name, mode) == ("Current", CONSTANT_HEIGHT) and "flat" in why
    assert choose_channel(names, feedback_on=None, z_data=varied)[:2] == ("Z", CONSTANT_CURRENT)


def test_the_other_mode_s_channel_is_refused_not_used():
    with pytest.raises(ValueError, match="feedback error"):
        choose_channel(["Current", "Bias"], feedback_on=True)
    with pytest.raises(ValueError, match="'Current' channel"):
        choose_channel(["Z"], feedback_on=False)
    with pytest.raises(ValueError, match="'Bias' not in the frame; channels: Current, Z"):
        choose_channel(["Current", "Z"], feedback_on=True, requested="Bias")


def test_current_sign_does_not_change_the_network_input():
    current, _ = scene("current", pixels=48, lines=40, range_m=(4e-9, 4e-9), bias_V=-1.0)
    assert np.nansum(current) < 0  # negative bias: negative tunnelling current
    a = network_input(current, channel="Current", mode=CONSTANT_HEIGHT, unit="A", bias_V=-1.0, pixel_size_nm=0.1)
    b = network_input(-current, channel="Current", mode=CONSTANT_HEIGHT, unit="A", bias_V=-1.0, pixel_size_nm=0.1)
    np.testing.assert_array_equal(a.image, b.image)
    assert np.nanmin(a.image) >= 0 and any("-I" in n for n in a.notes)
    assert any("opposite to the bias" in n for n in b.notes)


def test_tilted_z_is_levelled_before_the_conversion():
    yy, xx = np.mgrid[0:64, 0:64]
    bump = 80e-12 * np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / 60.0)
    tilt = 8e-12 * xx + 5e-12 * yy  # 0.5 nm across the frame: e^11 without levelling
    levelled = plane_level(bump + tilt)
    assert np.ptp(levelled[:8, :8]) < 2e-12 and abs(levelled[0, 0] - levelled[-1, -1]) < 2e-12
    image = network_input(bump + tilt, channel="Z", mode=CONSTANT_CURRENT, unit="m", pixel_size_nm=0.1).image
    flat = current_from_z(bump)
    # every corner keeps the background level, as on the untilted frame
    assert np.allclose([image[0, 0], image[-1, -1], image[0, -1]], flat[0, 0], rtol=0.05)


def test_scope_bounds_pitch_and_size_and_says_which_tool():
    assert stmnet_scope((256, 256), 0.05).ok and stmnet_scope((256, 256), 0.02).ok
    coarse = stmnet_scope((256, 256), 0.8)
    assert not coarse.ok and "coarser" in coarse.reason and "Gwyddion" in coarse.reason
    overview = stmnet_scope((2048, 2048), 0.1)  # 205 nm
    assert not overview.ok and "larger than a molecule" in overview.reason
    assert not stmnet_scope((64, 64), 0.05, 0.3).ok  # coarse lines alone are enough
    assert not classifier_scope((64, 4096), 0.08).ok  # 328 nm wide
    assert classifier_scope((64, 64), 0.08).ok


def test_from_scan_reads_geometry_and_names_the_file_on_bad_ranges(tmp_path):
    z, _ = scene("z", pixels=32, lines=16, range_m=(4e-9, 3e-9))
    path = write_raw_sxm(
        tmp_path / "ns.sxm", channels={"Z": (14, "m", z, z)}, range_m=(4e-9, 3e-9), direction="up", feedback_on=True
    )
    net_in = from_scan(read_sxm(path), name=path.name)
    assert (net_in.channel, net_in.mode, net_in.scan_direction) == ("Z", CONSTANT_CURRENT, "up")
    assert net_in.pixel_size_nm == pytest.approx(0.125) and net_in.line_spacing_nm == pytest.approx(0.1875)
    assert "non-square" in net_in.describe()
    bad = write_raw_sxm(tmp_path / "zero.sxm", channels={"Z": (14, "m", z, z)}, range_m=(4e-9, 0.0))
    with pytest.raises(ValueError, match=r"zero\.sxm: SCAN_RANGE height is 0\.0 m"):
        from_scan(read_sxm(bad), name=bad.name)


def test_current_from_z_units_and_direction():
    from stm_live.simulators.vacuum import KAPPA_PER_NM

    z_nm = np.array([[0.0, 0.05, 0.1]])
    a = current_from_z(z_nm * 1e-9)  # metres, as Nanonis stores Z
    b = current_from_z(z_nm, unit="nm")
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a.dtype == np.float32 and a.max() == pytest.approx(1.0)
    # tip retracted by 0.1 nm <-> current-like value larger by exp(2 kappa 0.1 nm)
    assert a[0, 2] / a[0, 0] == pytest.approx(np.exp(2 * KAPPA_PER_NM * 0.1), rel=1e-4)
    with pytest.raises(ValueError, match="unit"):
        current_from_z(z_nm, unit="pm")
