"""Orbital resonances: point spectra, dI/dV maps and grids (simulators.spectra)."""

import math

import numpy as np
import pytest

from stm_live.simulators.imaging import (
    CURRENT_SCALE_A_PER_V,
    CubePlacement,
    Placement,
    ScanFrame,
    Substrate,
    constant_current_image,
    constant_height_image,
)
from stm_live.simulators.orbitals import orbital_fields, orbital_level
from stm_live.simulators.spectra import (
    CHARGING_V,
    GAP_SCALE,
    LEVEL_WEIGHT_V,
    MIDGAP_V,
    SpectralModel,
    level_energies,
    lineshape,
    resonances,
    simulate,
)
from stm_live.simulators.tip import tip_preset

STEP_V = 0.02
SWEEP = np.arange(-3.8, 3.0 + STEP_V / 2, STEP_V)


def _peaks(v, didv):
    """Biases of the local maxima standing above 1 % of the spectrum's range."""
    floor = didv.min() + 0.01 * np.ptp(didv)
    inner = (didv[1:-1] > didv[:-2]) & (didv[1:-1] >= didv[2:]) & (didv[1:-1] > floor)
    return v[1:-1][inner]


def test_default_level_energies_follow_the_documented_mapping():
    # the anchor: pentacene on NaCl(2ML)/Cu(111), HOMO -2.4 V and LUMO +1.7 V (Repp et al. 2005)
    pentacene = level_energies("pentacene")
    assert pentacene["HOMO"] == pytest.approx(-2.4, abs=0.02) and pentacene["LUMO"] == pytest.approx(1.7, abs=0.02)
    for name in ("h2pc", "coronene", "azulene"):
        huckel = {label: orbital_level(name, label).energy for label in ("HOMO", "LUMO", "HOMO-1", "LUMO+1")}
        mapped = level_energies(name)
        assert list(mapped) == ["HOMO-1", "HOMO", "LUMO", "LUMO+1"]  # ascending
        # the gap is the Hückel gap scaled, opened by the charging energy; midgap at MIDGAP_V
        assert mapped["LUMO"] - mapped["HOMO"] == pytest.approx(
            GAP_SCALE * (huckel["LUMO"] - huckel["HOMO"]) + CHARGING_V
        )
        assert (mapped["LUMO"] + mapped["HOMO"]) / 2 == pytest.approx(MIDGAP_V)
        # spacings within the occupied and within the empty levels are the scaled Hückel ones
        assert mapped["HOMO"] - mapped["HOMO-1"] == pytest.approx(GAP_SCALE * (huckel["HOMO"] - huckel["HOMO-1"]))
        assert mapped["LUMO+1"] - mapped["LUMO"] == pytest.approx(GAP_SCALE * (huckel["LUMO+1"] - huckel["LUMO"]))
    assert list(level_energies("benzene", SpectralModel(levels_each_side=3))) == ["HOMO-1", "HOMO", "LUMO", "LUMO+1"]


def test_energies_are_overridable_per_molecule_and_per_placement():
    model = SpectralModel(energies={"pentacene": {"HOMO": -2.0, "homo-2": -4.1}, 1: {"LUMO": 1.1}})
    assert model.level_energies("pentacene")["HOMO"] == -2.0 and model.level_energies("pentacene")["HOMO-2"] == -4.1
    scene = [Placement("pentacene", -2.0), Placement("pentacene", 2.0)]
    found = {(r.placement, r.label): r.energy_V for r in resonances(scene, model)}
    assert found[(0, "HOMO")] == found[(1, "HOMO")] == -2.0
    assert found[(0, "LUMO")] == level_energies("pentacene")["LUMO"] and found[(1, "LUMO")] == 1.1
    with pytest.raises(ValueError, match="unknown molecule 'pentacen'"):
        SpectralModel(energies={"pentacen": {"HOMO": -2.0}})
    with pytest.raises(ValueError, match="orbital 'LUMO\\+30' out of range for pentacene"):
        SpectralModel(energies={"pentacene": {"LUMO+30": 4.0}})
    with pytest.raises(ValueError, match=r"energies\['pentacene'\]\['HOMO'\] must be a finite number"):
        SpectralModel(energies={"pentacene": {"HOMO": "low"}})
    with pytest.raises(ValueError, match="width_V must be a positive width"):
        SpectralModel(width_V=0.0)
    with pytest.raises(ValueError, match="width_V must be a finite number, got 'wide'"):
        SpectralModel(width_V="wide")
    with pytest.raises(ValueError, match="shape must be one of lorentzian, gaussian"):
        SpectralModel(shape="voigt")


def test_lineshapes_have_unit_area_and_the_stated_width():
    e = np.linspace(-200.0, 200.0, 400001)
    for shape in ("lorentzian", "gaussian"):
        model = SpectralModel(shape=shape, width_V=0.3)
        peak = lineshape(e, model)
        assert np.trapezoid(peak, e) == pytest.approx(1.0, abs=2e-3)
        assert lineshape(0.15, model) == pytest.approx(lineshape(0.0, model) / 2)  # FWHM 0.3 V
        np.testing.assert_allclose(
            np.diff(lineshape(e[::1000], model, cumulative=True)),
            [np.trapezoid(peak[i : i + 1001], e[i : i + 1001]) for i in range(0, 400000, 1000)],
            atol=1e-6,
        )


@pytest.mark.parametrize("name, tip", [("pentacene", "s"), ("pentacene", "co"), ("h2pc", "co")])
def test_spectrum_over_a_molecule_peaks_at_its_levels(name, tip):
    placement = Placement(name, 0.3, -0.2, 25.0)
    model = SpectralModel(width_V=0.1)  # h2pc's LUMO and LUMO+1 are 0.35 V apart: tails must not shift peaks
    levels = level_energies(name, model)
    frame = ScanFrame(0.3, -0.2, 3.0, 3.0, pixels=40, lines=40)
    x, y = frame.grid()
    # over the brightest spot of each level's own image (a level is dark on its nodal planes)
    spots = []
    for label in levels:
        image = constant_height_image(Placement(name, 0.3, -0.2, 25.0, orbital=label), frame, tip, z_nm=0.5, bias_V=1.0)
        k = np.unravel_index(np.argmax(image), image.shape)
        spots.append((x[k], y[k]))
    spectra = simulate(placement, tip, np.array(spots), SWEEP, z_nm=0.5, model=model, substrate=Substrate())
    assert spectra.didv_A_per_V.shape == (len(levels), len(SWEEP)) and spectra.z_nm.shape == (len(levels),)
    energies = np.array(list(levels.values()))
    for (label, energy), didv in zip(levels.items(), spectra.didv_A_per_V):
        found = _peaks(SWEEP, didv)
        assert np.min(np.abs(found - energy)) <= STEP_V, (label, energy, found)  # its own peak
        for peak in found:  # and no peak that is not a level
            assert np.min(np.abs(energies - peak)) <= STEP_V, (label, peak, energies)


def test_bare_substrate_is_featureless_and_is_imagings_background():
    scene = [Placement("pentacene"), Placement("coronene", 3.0, 1.0)]
    far = (25.0, -20.0)
    substrate = Substrate(corrugation=0.4)
    spectrum = simulate(scene, "co", far, SWEEP, z_nm=0.45, substrate=substrate)
    didv = spectrum.didv_A_per_V
    assert didv.min() > 0 and np.ptp(didv) <= 1e-9 * didv.max()  # flat: no peak, no step
    np.testing.assert_allclose(spectrum.current_A, SWEEP * didv, rtol=1e-9)  # ohmic
    # the same background imaging adds to a current image: I = C |V| S_sub
    point = ScanFrame(far[0], far[1], 1e-3, 1e-3, pixels=1, lines=1)
    image = constant_height_image(scene, point, "co", z_nm=0.45, bias_V=1.0, substrate=substrate)
    assert didv[0] == pytest.approx(float(image[0, 0]), rel=1e-6)
    # no substrate given at constant height: none (as imaging); the molecules' fields have died out
    assert simulate(scene, "co", far, SWEEP, z_nm=0.45).didv_A_per_V.max() < 1e-30


def test_current_is_the_signed_integral_of_didv_from_zero():
    v = np.linspace(-3.0, 2.5, 2751)  # 2 mV steps
    spectrum = simulate(Placement("h2pc"), "co", (0.4, 0.2), v, z_nm=0.5, substrate=Substrate())
    didv, current = spectrum.didv_A_per_V, spectrum.current_A
    zero = int(np.argmin(np.abs(v)))
    assert abs(v[zero]) < 1e-12 and current[zero] == 0.0
    integral = np.concatenate([[0.0], np.cumsum((didv[1:] + didv[:-1]) / 2 * np.diff(v))])
    integral -= integral[zero]
    assert np.max(np.abs(current - integral)) < 2e-3 * np.max(np.abs(current))
    assert current[0] < 0 < current[-1]  # negative sample bias, negative current


@pytest.mark.parametrize("tip", ["s", "co", "tilted_co", "double", "blunt"])
def test_didv_map_at_the_homo_is_the_homo_image(tip):
    """With a Gaussian lineshape no other level reaches the HOMO: the map is the HOMO image
    (to the float32 image's precision). With Lorentzian tails it stays within 3 % of the
    peak for pentacene (HOMO-1 1.1 V away, the LUMO 4.1 V)."""
    placement = Placement("pentacene", 0.2, -0.1, 20.0)
    frame = ScanFrame(0.0, 0.0, 4.0, 3.0, angle_deg=15.0, pixels=48, lines=36)
    for shape, tolerance in (("gaussian", 1e-5), ("lorentzian", 0.03)):
        model = SpectralModel(shape=shape)
        homo = level_energies("pentacene", model)["HOMO"]
        didv = simulate(placement, tip, frame, homo, z_nm=0.5, model=model).didv_A_per_V
        image = constant_height_image(
            Placement("pentacene", 0.2, -0.1, 20.0, orbital="HOMO"), frame, tip, z_nm=0.5, bias_V=homo
        )
        assert didv.shape == image.shape
        on_resonance = CURRENT_SCALE_A_PER_V * LEVEL_WEIGHT_V * lineshape(0.0, model)
        reference = image / (CURRENT_SCALE_A_PER_V * abs(homo))
        deviation = np.max(np.abs(didv / on_resonance - reference)) / reference.max()
        assert deviation < tolerance, (shape, deviation)


def test_maps_between_resonances_show_the_tails():
    placement = Placement("pentacene")
    frame = ScanFrame(0.0, 0.0, 3.0, 2.0, pixels=48, lines=32)
    levels = level_energies("pentacene")
    own = {
        label: constant_height_image(Placement("pentacene", orbital=label), frame, "s", z_nm=0.5, bias_V=1.0).ravel()
        for label in ("HOMO", "LUMO")
    }

    def didv_map(bias, shape="lorentzian"):
        return simulate(placement, "s", frame, bias, z_nm=0.5, model=SpectralModel(shape=shape)).didv_A_per_V.ravel()

    peak = didv_map(levels["HOMO"]).max()
    for bias, nearer in ((levels["HOMO"] + 0.9, "HOMO"), (levels["LUMO"] - 0.9, "LUMO")):
        tails = didv_map(bias)
        assert tails.max() > 1e-3 * peak  # visible, as in real maps between resonances
        assert np.corrcoef(tails, own[nearer])[0, 1] > 0.95
        other = "LUMO" if nearer == "HOMO" else "HOMO"
        assert np.corrcoef(tails, own[nearer])[0, 1] > np.corrcoef(tails, own[other])[0, 1]
        # a Gaussian lineshape has no such tails
        assert didv_map(bias, "gaussian").max() < 1e-12 * peak


def test_grid_is_the_spectra_at_its_points_and_the_maps_at_its_biases():
    scene = [Placement("naphthalene", -0.8, 0.3, 40.0), Placement("pyrene", 1.2, -0.4)]
    grid_frame = ScanFrame(0.2, 0.0, 4.0, 2.4, angle_deg=-20.0, pixels=6, lines=4, direction="up")
    v = np.linspace(-4.0, 3.5, 31)
    grid = simulate(scene, "co", grid_frame, v, z_nm=0.55, substrate=Substrate())
    assert grid.didv_A_per_V.shape == grid.current_A.shape == (4, 6, 31) and grid.z_nm.shape == (4, 6)
    x, y = grid_frame.grid()
    points = simulate(scene, "co", np.stack([x.ravel(), y.ravel()], axis=1), v, z_nm=0.55, substrate=Substrate())
    np.testing.assert_allclose(points.didv_A_per_V.reshape(4, 6, 31), grid.didv_A_per_V, rtol=1e-12)
    np.testing.assert_allclose(points.current_A.reshape(4, 6, 31), grid.current_A, rtol=1e-12, atol=1e-30)
    k = 7
    one = simulate(scene, "co", grid_frame, float(v[k]), z_nm=0.55, substrate=Substrate())
    np.testing.assert_allclose(one.didv_A_per_V, grid.didv_A_per_V[..., k], rtol=1e-12)
    assert one.bias_V.shape == () and float(one.bias_V) == v[k]


def test_lock_in_map_at_a_scans_own_heights():
    # a constant-current scan has its Z image; its dI/dV channel is the map at those heights
    scene = [Placement("pentacene", -0.5, 0.2, 10.0)]
    frame = ScanFrame(0.0, 0.0, 3.0, 2.0, pixels=24, lines=16)
    z_map = constant_current_image(scene, frame, "co", setpoint_A=5e-12, bias_V=-2.4)
    lock_in = simulate(scene, "co", frame, -2.4, z_nm=z_map, substrate=Substrate())
    np.testing.assert_array_equal(lock_in.z_nm, z_map)
    x, y = frame.grid()
    for k in [(0, 0), (8, 9), (15, 23)]:
        one = simulate(scene, "co", (x[k], y[k]), -2.4, z_nm=float(z_map[k]), substrate=Substrate())
        assert float(one.didv_A_per_V) == pytest.approx(lock_in.didv_A_per_V[k], rel=1e-9)
    with pytest.raises(ValueError, match=r"z_nm of shape \(16, 23\) does not fit the points' shape \(16, 24\)"):
        simulate(scene, "co", frame, -2.4, z_nm=z_map[:, 1:])


def test_constant_current_map_holds_the_setpoint():
    scene = [Placement("pentacene", -1.0, 0.0), Placement("coronene", 1.6, 0.2)]
    frame = ScanFrame(0.3, 0.0, 5.0, 3.0, pixels=30, lines=18)
    homo = level_energies("pentacene")["HOMO"]
    held = simulate(scene, "co", frame, homo, setpoint_A=2e-12)
    assert held.z_nm.shape == (18, 30) and np.ptp(held.z_nm) > 0.02  # the molecules lift the tip
    np.testing.assert_allclose(np.abs(held.current_A), 2e-12, rtol=1e-3)
    # points on their own find the same heights as the frame
    again = simulate(scene, "co", np.stack([a.ravel() for a in frame.grid()], axis=1)[:5], homo, setpoint_A=2e-12)
    np.testing.assert_allclose(again.z_nm, held.z_nm.ravel()[:5], atol=2e-5)
    # a sweep with the loop opened at a setpoint bias: I(setpoint bias) is the setpoint
    v = np.linspace(-3.0, -1.0, 41)
    sweep = simulate(scene, "co", (-1.0, 0.1), v, setpoint_A=5e-12, setpoint_bias_V=-2.5)
    assert float(np.interp(-2.5, v, sweep.current_A)) == pytest.approx(-5e-12, rel=1e-3)


def test_a_cube_orbital_needs_and_takes_an_energy():
    level = orbital_level("naphthalene", "HOMO")

    class HomoCube:  # stands in for a cube file's orbital (orbitals.CubeOrbital's interface)
        @staticmethod
        def fields(x_nm, y_nm, z_nm):
            return orbital_fields(level, x_nm, y_nm, z_nm)

    cube = CubePlacement(HomoCube(), 0.3, 0.1, 30.0)
    with pytest.raises(ValueError, match=r"placement 0 is a cube orbital with no energy: .*energies=\{0: V\}"):
        simulate([cube], "co", (0.0, 0.0), SWEEP, z_nm=0.5)
    model = SpectralModel(energies={0: -1.8})
    spectrum = simulate([cube], "co", (0.6, 0.3), SWEEP, z_nm=0.5, model=model)
    assert [r.energy_V for r in spectrum.resonances] == [-1.8]
    assert np.abs(_peaks(SWEEP, spectrum.didv_A_per_V) + 1.8).min() <= STEP_V
    # the same as the library molecule with its HOMO put there
    library = Placement("naphthalene", 0.3, 0.1, 30.0)
    same = simulate(
        [library], "co", (0.6, 0.3), -1.8, z_nm=0.5, model=SpectralModel(shape="gaussian", energies={0: {"HOMO": -1.8}})
    )
    cube_only = simulate(
        [cube], "co", (0.6, 0.3), -1.8, z_nm=0.5, model=SpectralModel(shape="gaussian", energies={0: -1.8})
    )
    assert float(cube_only.didv_A_per_V) == pytest.approx(float(same.didv_A_per_V), rel=1e-9)


def test_bad_input_gets_one_clear_line():
    scene = Placement("pentacene")
    cases = [
        (dict(at=np.zeros((0, 2)), bias_V=SWEEP, z_nm=0.5), "empty grid: at has no points"),
        (dict(at=(0.0, 0.0), bias_V=[1.2], z_nm=0.5), "a sweep needs at least 2 biases, got 1"),
        (dict(at=(0.0, 0.0), bias_V=[], z_nm=0.5), "a sweep needs at least 2 biases, got 0"),
        (dict(at=(0.0, 0.0), bias_V=[[1.0, 2.0]], z_nm=0.5), r"bias_V must be a number \(a map\) or a 1-D sweep"),
        (dict(at=(0.0, 0.0), bias_V=[1.0, math.nan], z_nm=0.5), "bias_V must be finite"),
        (dict(at=(0.0, 0.0), bias_V=1.0), "give the tip height z_nm .* or setpoint_A"),
        (dict(at=(0.0, 0.0), bias_V=1.0, z_nm=0.5, setpoint_A=1e-12), "not both"),
        (dict(at=(0.0, 0.0), bias_V=SWEEP, setpoint_A=1e-12), "a sweep under feedback needs setpoint_bias_V"),
        (dict(at=(0.0, 0.0), bias_V=0.0, setpoint_A=1e-12), "bias_V must be a non-zero finite voltage"),
        (dict(at=(0.0, 0.0), bias_V=1.0, z_nm=-0.1), "z_nm must be a positive height"),
        (dict(at=np.zeros((3, 3)), bias_V=1.0, z_nm=0.5), r"at must be a ScanFrame, an \(x_nm, y_nm\) point"),
        (dict(at=(math.inf, 0.0), bias_V=1.0, z_nm=0.5), "point coordinates must be finite"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            simulate(scene, tip_preset("co"), **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="placements is empty"):
        simulate([], "co", (0.0, 0.0), 1.0, z_nm=0.5)
    with pytest.raises(ValueError, match="unknown tip preset 'sharp'"):
        simulate(scene, "sharp", (0.0, 0.0), 1.0, z_nm=0.5)
