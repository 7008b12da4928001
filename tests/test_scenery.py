"""The broadened tip-classifier recipe: metal surfaces and small things beside the molecules."""

import math

import numpy as np
import pytest

from stm_live.models import tipdata, tipstate
from stm_live.simulators import scenery
from stm_live.simulators.imaging import CubePlacement, ScanFrame, constant_height_image
from stm_live.simulators.orbitals import orbital_level
from stm_live.simulators.tip import tip_preset
from stm_live.simulators.vacuum import KAPPA_PER_NM


def _dominant_period_nm(profile: np.ndarray, pitch_nm: float) -> float:
    spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
    k = int(np.argmax(spectrum[1:])) + 1
    return len(profile) * pitch_nm / k


def test_herringbone_has_two_ridges_per_period():
    pitch = 0.02
    x = np.arange(0, 10 * scenery.HERRINGBONE_PERIOD_NM, pitch)
    h = scenery.herringbone(x, np.zeros_like(x), angle_deg=90.0)  # ridges along y: the profile runs along x
    shift = round(scenery.HERRINGBONE_PERIOD_NM / pitch)
    assert np.allclose(h[shift:], h[:-shift], atol=1e-6)  # periodic in 6.3 nm
    assert not np.allclose(h[shift // 2 :], h[: -(shift // 2)], atol=0.1)  # and not in half of it
    peaks = np.flatnonzero((h[1:-1] > h[:-2]) & (h[1:-1] >= h[2:]) & (h[1:-1] > 0.5)) + 1
    gaps = np.diff(x[peaks])
    assert sorted({round(g, 1) for g in gaps}) == [
        round(scenery.HERRINGBONE_PAIR_NM, 1),
        round(scenery.HERRINGBONE_PERIOD_NM - scenery.HERRINGBONE_PAIR_NM, 1),
    ]


@pytest.mark.parametrize("metal", ["cu111", "au111"])
def test_standing_waves_beside_a_step_have_half_the_fermi_wavelength(metal):
    pitch = 0.01
    x = np.arange(0.5, 12.0, pitch)  # on the upper terrace, away from the edge's own profile
    surface = scenery.MetalSurface(metal=metal, steps=((0.0, 0.0, 1),), wave_amplitude=0.2, coherence_nm=50.0)
    h = surface.apparent_height_nm(x, np.zeros_like(x)) - scenery.STEP_HEIGHT_NM[metal]
    assert np.abs(h).max() < 0.01  # waves are an LDOS ripple, far below a step
    assert _dominant_period_nm(h, pitch) == pytest.approx(scenery.FERMI_WAVELENGTH_NM[metal] / 2, rel=0.08)


def test_step_raises_the_terrace_by_a_monatomic_height():
    surface = scenery.MetalSurface(metal="au111", steps=((0.0, 0.0, -1),))
    far = surface.apparent_height_nm(np.array([-3.0, 3.0]), np.zeros(2))
    assert far[0] - far[1] == pytest.approx(scenery.STEP_HEIGHT_NM["au111"], rel=1e-3)


def test_surface_rejects_unknown_metal():
    with pytest.raises(ValueError, match="metal must be one of"):
        scenery.MetalSurface(metal="ag100")


def test_random_polyhex_is_closed_shell_and_fused():
    rng = np.random.default_rng(3)
    for rings in (1, 2, 3, 4):
        mol = scenery.random_polyhex(rng, rings)
        assert mol.pi_electrons % 2 == 0
        level = orbital_level(mol, "HOMO")
        assert np.allclose((level.partners**2).sum(axis=1), 1.0)
        # every carbon has a neighbour at the C-C bond length: one fused piece
        d = np.hypot(*(mol.xyz_nm[:, None, :2] - mol.xyz_nm[None, :, :2]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        assert np.allclose(d.min(axis=1), 0.14, atol=0.01)


def test_small_things_image_through_the_tip_like_library_molecules():
    """A placed polyene through CubePlacement is imaged by the same tip physics: a CO tip
    sees it differently from an s tip, and the image is finite and positive."""
    thing = scenery.LevelOrbital(orbital_level(scenery.polyene(6), "HOMO"))
    frame = ScanFrame(center_x_nm=0.0, center_y_nm=0.0, width_nm=2.0, height_nm=2.0, pixels=32, lines=32)
    place = [CubePlacement(thing, 0.0, 0.0, 30.0, 1.0)]
    co = constant_height_image(place, frame, tip_preset("co"), z_nm=0.5, bias_V=-1.0)
    s = constant_height_image(place, frame, tip_preset("s"), z_nm=0.5, bias_V=-1.0)
    assert np.isfinite(co).all() and co.max() > 0 and s.max() > 0
    corr = np.corrcoef(co.ravel(), s.ravel())[0, 1]
    assert corr < 0.9


def test_recipe_applies_the_surface_as_exp_2kappa_h(monkeypatch):
    """At constant height the metal terrace multiplies the current by exp(2κh): the recipe's
    frame is the molecules' own image times that factor."""
    from stm_live.simulators import imaging

    seen = {}
    real_image, real_surface = imaging.constant_height_image, scenery.random_surface

    def image(*args, **kwargs):
        seen["frame"], seen["image"] = args[1], real_image(*args, **kwargs)
        return seen["image"]

    def surface(*args, **kwargs):
        seen["surface"] = real_surface(*args, **kwargs)
        return seen["surface"]

    monkeypatch.setattr(tipdata, "constant_height_image", image)
    monkeypatch.setattr(scenery, "random_surface", surface)
    rng = np.random.default_rng(11)
    for _ in range(40):
        seen.clear()
        r = tipdata.render_sample(rng, tipstate.TipNetConfig(), mode="height", scenery=True)
        if "surface" in seen and tipstate.TIP_CLASSES[r.label] != "unstable":
            break
    else:
        pytest.fail("no metal frame in 40 draws: METAL_SHARE is wrong")
    h = seen["surface"].apparent_height_nm(*seen["frame"].grid())
    assert np.ptp(h) > 0.005
    np.testing.assert_allclose(r.image, seen["image"] * np.exp(2 * KAPPA_PER_NM * h), rtol=1e-5)


def test_old_recipe_has_no_metal_and_no_small_things():
    cfg = tipstate.TipNetConfig()
    rng = np.random.default_rng(5)
    for _ in range(30):
        place, _, _, _, surface = tipdata._scene(rng, cfg, scenery=False)
        assert surface is None
        assert all(not isinstance(p, CubePlacement) for p in place)


def test_broadened_recipe_draws_every_new_kind():
    cfg = tipstate.TipNetConfig()
    rng = np.random.default_rng(7)
    metal = steps = small = 0
    for _ in range(200):
        place, _, _, _, surface = tipdata._scene(rng, cfg, scenery=True, steps=True)
        metal += surface is not None
        steps += surface is not None and bool(surface.steps)
        small += any(isinstance(p, CubePlacement) for p in place)
    assert metal / 200 == pytest.approx(tipdata.METAL_SHARE, abs=0.1)
    assert steps == metal
    assert small / 200 == pytest.approx(tipdata.SMALL_THINGS_SHARE, abs=0.12)  # some draws find no room


def test_finer_scans_keep_the_network_input_shape():
    cfg = tipstate.TipNetConfig()
    rng = np.random.default_rng(2)
    r = tipdata.render_sample(rng, cfg, scenery=True)
    for _ in range(20):
        x = tipdata.finish(r, rng, cfg, flip=True)
        assert x.shape == (2, cfg.size, cfg.size) and np.isfinite(x).all()
    assert math.isclose(tipdata.FINEST_NM, 0.02)
