"""Tips, the imaging forward model and the fast pair sampler."""

import numpy as np
import pytest

from stm_live.simulators.imaging import (
    CURRENT_SCALE_A_PER_V,
    MOLECULE_GAP_NM,
    Placement,
    ScanFrame,
    Substrate,
    constant_current_image,
    constant_height_image,
    placement_fields,
    s_wave_image,
    scatter_molecules,
)
from stm_live.simulators.pairs import HELD_OUT_MOLECULES, TRAIN_MOLECULES, PairSampler
from stm_live.simulators.tip import TIP_PRESETS, TipState, tip_preset, tip_signal
from stm_live.simulators.vacuum import KAPPA_PER_NM, current_from_height, height_from_current

S_TIP = TipState(1.0, 0.0, 0.0, 0.0)
P_TIP = TipState(0.0, 1.0, 1.0, 0.0)  # weights normalise to 0.5 p_x + 0.5 p_y


def test_tip_presets_and_errors():
    assert set(TIP_PRESETS) >= {"s", "co", "mixed", "tilted_co", "double", "blunt"}
    assert tip_preset("co").s_fraction == pytest.approx(0.13)
    assert tip_preset("s").s_fraction == 1.0
    assert tip_preset("co").with_(s=0.87 / 2).s_fraction == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown tip preset 'sharp'.*tilted_co"):
        tip_preset("sharp")
    with pytest.raises(ValueError, match="unknown TipState field"):
        tip_preset("co").with_(q=1)
    with pytest.raises(ValueError, match="non-negative"):
        TipState(-0.1, 1.0, 1.0, 0.0)


def test_s_image_is_psi_squared_and_p_image_is_lateral_gradient_squared():
    # a rotated molecule off-centre, on a fine grid, so finite differences of ψ are accurate
    placement = Placement("naphthalene", x_nm=0.1, y_nm=-0.05, rotation_deg=30.0, orbital="HOMO")
    frame = ScanFrame(0.0, 0.0, 1.6, 1.6, pixels=321, lines=321)
    x, y = frame.grid()
    psi = placement_fields(placement, x, y, 0.35, -1.0)[0, 0]
    step = frame.pixel_size_nm
    d_row, d_col = np.gradient(psi, step)
    dpsi_dx, dpsi_dy = d_col, -d_row  # "down" scan: rows run towards −y
    scale = CURRENT_SCALE_A_PER_V * 1.0
    s_img = constant_height_image(placement, frame, S_TIP, z_nm=0.35, bias_V=-1.0) / scale
    np.testing.assert_allclose(s_img, psi**2, rtol=1e-5, atol=1e-6 * psi.max() ** 2)
    np.testing.assert_allclose(
        s_wave_image(placement, frame, z_nm=0.35, bias_V=-1.0), psi**2, rtol=1e-5, atol=1e-6 * psi.max() ** 2
    )
    p_img = constant_height_image(placement, frame, P_TIP, z_nm=0.35, bias_V=-1.0) / scale
    expected = 0.5 * (dpsi_dx**2 + dpsi_dy**2) / KAPPA_PER_NM**2
    inner = (slice(2, -2), slice(2, -2))  # np.gradient is first order at the border
    assert np.max(np.abs(p_img[inner] - expected[inner])) < 0.01 * expected.max()


def test_bias_sign_selects_homo_or_lumo():
    frame = ScanFrame(0, 0, 2.0, 2.0, pixels=48, lines=48)
    homo = s_wave_image(Placement("pentacene", orbital="HOMO"), frame, z_nm=0.4, bias_V=1.0)
    lumo = s_wave_image(Placement("pentacene", orbital="LUMO"), frame, z_nm=0.4, bias_V=-1.0)
    np.testing.assert_array_equal(s_wave_image(Placement("pentacene"), frame, z_nm=0.4, bias_V=-1.0), homo)
    np.testing.assert_array_equal(s_wave_image(Placement("pentacene"), frame, z_nm=0.4, bias_V=1.0), lumo)
    assert not np.allclose(homo, lumo)


def test_current_scale_and_proportional_to_bias():
    frame = ScanFrame(0, 0, 2.0, 2.0, pixels=64, lines=64)
    one = constant_height_image(Placement("pentacene"), frame, S_TIP, z_nm=0.45, bias_V=-1.0)
    two = constant_height_image(Placement("pentacene"), frame, S_TIP, z_nm=0.45, bias_V=-2.0)
    assert 20e-12 < one.max() < 500e-12
    np.testing.assert_allclose(two, 2 * one, rtol=1e-6)


@pytest.mark.parametrize("tip", ["co", "coherent_co"])
@pytest.mark.parametrize("name", ["benzene", "coronene", "pentacene", "h2pc"])
def test_symmetric_molecules_give_symmetric_images(name, tip):
    # a coherent CO tip mixes s with p_z only, both symmetric about its axis: no lopsided image
    frame = ScanFrame(0, 0, 3.0, 3.0, pixels=60, lines=60)
    img = constant_height_image(Placement(name), frame, tip_preset(tip), z_nm=0.4, bias_V=-1.0)
    tol = 1e-5 * img.max()
    assert np.max(np.abs(img - img[:, ::-1])) < tol
    assert np.max(np.abs(img - img[::-1, :])) < tol


def test_degenerate_level_is_rotation_invariant():
    # the HOMO pair of coronene summed incoherently has the full six-fold symmetry
    frame = ScanFrame(0, 0, 2.4, 2.4, pixels=40, lines=40)
    base = s_wave_image(Placement("coronene"), frame, z_nm=0.4, bias_V=-1.0)
    turned = s_wave_image(Placement("coronene", rotation_deg=60.0), frame, z_nm=0.4, bias_V=-1.0)
    np.testing.assert_allclose(turned, base, rtol=1e-4, atol=1e-5 * base.max())
    one_partner = placement_fields(Placement("coronene"), *frame.grid(), 0.4, -1.0)[0, 0] ** 2
    assert not np.allclose(one_partner[:, ::-1].T, one_partner, atol=1e-3 * one_partner.max())


def test_coherent_tip_adds_the_s_pz_interference_term():
    frame = ScanFrame(0, 0, 2.5, 2.5, pixels=40, lines=40)
    fields = placement_fields(Placement("pentacene"), *frame.grid(), 0.4, -1.0)
    coherent = tip_preset("coherent_co")
    w = coherent.weights
    psi, dz = fields[:, 0], fields[:, 3] / KAPPA_PER_NM
    cross = 2 * np.sqrt(w[0] * w[3]) * np.sum(psi * dz, axis=0)
    incoherent = tip_signal(fields, coherent.with_(coherent=False))
    np.testing.assert_allclose(tip_signal(fields, coherent), incoherent + cross, rtol=1e-9, atol=1e-12)
    assert np.abs(cross).max() > 0.05 * incoherent.max()
    d = coherent.channel_matrix()
    np.testing.assert_allclose(d, d.T)
    assert np.count_nonzero(d - np.diag(np.diag(d))) == 2  # only s–p_z off the diagonal


def test_p_share_of_a_co_tip_image_falls_with_height():
    frame = ScanFrame(0, 0, 2.5, 2.5, pixels=50, lines=50)
    x, y = frame.grid()
    shares = []
    for z in (0.3, 0.45, 0.6):
        fields = placement_fields(Placement("pentacene"), x, y, z, -1.0)
        co = tip_preset("co")
        s_part = co.weights[0] * tip_signal(fields, S_TIP)  # w_s |ψ|²
        total = tip_signal(fields, co)
        shares.append(1 - s_part.sum() / total.sum())
    assert shares[0] > shares[1] > shares[2]


def test_frame_orientation_direction_and_angle():
    top = Placement("benzene", x_nm=0.0, y_nm=1.0)
    down = ScanFrame(0, 0, 3.0, 3.0, pixels=30, lines=30, direction="down")
    up = ScanFrame(0, 0, 3.0, 3.0, pixels=30, lines=30, direction="up")
    img_down = s_wave_image(top, down, z_nm=0.4, bias_V=-1.0)
    assert np.argmax(img_down.sum(axis=1)) < 15  # first scanned lines are at the top
    np.testing.assert_array_equal(s_wave_image(top, up, z_nm=0.4, bias_V=-1.0), img_down[::-1])
    # frame turned 90° clockwise: its +u axis points along lab −y
    turned = ScanFrame(0, 0, 3.0, 3.0, angle_deg=90.0, pixels=30, lines=30)
    img = s_wave_image(Placement("benzene", x_nm=0.0, y_nm=-1.0), turned, z_nm=0.4, bias_V=-1.0)
    assert np.argmax(img.sum(axis=0)) > 15
    assert ScanFrame.from_si(1e-9, 0, 4e-9, 2e-9, 0.0, 64, 32, "down").pixel_size_nm == pytest.approx(4 / 64)


def test_constant_current_and_constant_height_are_consistent():
    frame = ScanFrame(0, 0, 3.0, 3.0, pixels=40, lines=40)
    substrate = Substrate(corrugation=0.1)
    tip = tip_preset("co")
    placement = Placement("pentacene", rotation_deg=20.0)
    z_map = constant_current_image(placement, frame, tip, setpoint_A=20e-12, bias_V=-1.0, substrate=substrate)
    current = constant_height_image(placement, frame, tip, z_nm=z_map.astype(float), bias_V=-1.0, substrate=substrate)
    np.testing.assert_allclose(current, 20e-12, rtol=1e-3)
    assert np.ptp(z_map) > 0.05  # the molecule stands out of the substrate
    # far from the molecule a 10x setpoint brings the tip closer by ln(10) / 2κ
    z_high = constant_current_image(placement, frame, tip, setpoint_A=200e-12, bias_V=-1.0, substrate=substrate)
    corner = (slice(0, 3), slice(0, 3))
    shift = float(np.mean(z_map[corner] - z_high[corner]))
    assert shift == pytest.approx(np.log(10) / (2 * KAPPA_PER_NM), rel=0.02)


def test_height_current_helpers_invert():
    z = np.array([0.3, 0.5, 0.8])
    current = current_from_height(z, current_ref_A=1e-10, z_ref_nm=0.5)
    assert current[1] == pytest.approx(1e-10)
    assert current[0] / current[1] == pytest.approx(np.exp(2 * KAPPA_PER_NM * 0.2))
    np.testing.assert_allclose(height_from_current(current, current_ref_A=1e-10, z_ref_nm=0.5), z)


def test_double_and_blunt_tips_change_the_image():
    frame = ScanFrame(0, 0, 3.0, 3.0, pixels=48, lines=48)
    co = constant_height_image(Placement("naphthalene"), frame, tip_preset("co"), z_nm=0.4, bias_V=-1.0)
    double = constant_height_image(Placement("naphthalene"), frame, tip_preset("double"), z_nm=0.4, bias_V=-1.0)
    blunt = constant_height_image(Placement("naphthalene"), frame, tip_preset("blunt"), z_nm=0.4, bias_V=-1.0)
    assert double.sum() > 1.4 * co.sum()  # a second, weaker copy
    lap = lambda a: np.abs(np.diff(a, 2, axis=1)).sum() / a.sum()  # noqa: E731
    assert lap(blunt) < 0.5 * lap(co)  # smoother


def test_bad_imaging_input_raises():
    with pytest.raises(ValueError, match="pixels"):
        ScanFrame(0, 0, 2, 2, pixels=0)
    with pytest.raises(ValueError, match="direction"):
        ScanFrame(0, 0, 2, 2, direction="sideways")
    with pytest.raises(ValueError, match="unknown molecule"):
        Placement("graphene")
    with pytest.raises(ValueError, match="out of range"):
        Placement("benzene", orbital="LUMO+7")
    frame = ScanFrame(0, 0, 2, 2, pixels=8, lines=8)
    with pytest.raises(ValueError, match="z_nm"):
        constant_height_image(Placement("benzene"), frame, S_TIP, z_nm=-0.1, bias_V=-1.0)
    with pytest.raises(ValueError, match="bias_V"):
        constant_height_image(Placement("benzene"), frame, S_TIP, z_nm=0.4, bias_V=0.0)
    with pytest.raises(ValueError, match="setpoint_A"):
        constant_current_image(Placement("benzene"), frame, S_TIP, setpoint_A=-1e-12, bias_V=1.0)
    with pytest.raises(ValueError, match="tip must be a TipState"):
        constant_height_image(Placement("benzene"), frame, 0.13, z_nm=0.4, bias_V=1.0)
    with pytest.raises(ValueError, match="placements is empty"):
        s_wave_image([], frame, z_nm=0.4, bias_V=1.0)


# ------------------------------------------------------------------------------ pairs


def test_held_out_molecules_are_never_trained_on():
    assert set(HELD_OUT_MOLECULES) >= {"perylene", "triphenylene", "h2nc"}
    assert not set(HELD_OUT_MOLECULES) & set(TRAIN_MOLECULES)


def test_pair_sampler_shapes_meta_and_reproducibility():
    kwargs = dict(size=32, pixel_size_nm=(0.05, 0.07), max_molecules=2, heights=(0.4, 0.45))
    batch = PairSampler(["benzene", "naphthalene"], seed=5, **kwargs).sample(6)
    inputs, targets = batch
    assert inputs.shape == targets.shape == (6, 32, 32)
    assert inputs.dtype == targets.dtype == np.float32
    assert np.all(np.isfinite(inputs)) and np.all(np.isfinite(targets))
    np.testing.assert_allclose(targets.max(axis=(1, 2)), 1.0, rtol=1e-6)
    for item, image in zip(batch.meta, inputs):
        assert set(item["molecules"]) <= {"benzene", "naphthalene"}
        assert 0.0 <= item["s_fraction"] <= 0.6
        assert item["mode"] in ("height", "current")
        if item["mode"] == "current":
            assert 0.1 < image.mean() < 1.5  # a tip height in nm
        else:
            assert image.max() < 1e-6  # a current in A
    again = PairSampler(["benzene", "naphthalene"], seed=5, **kwargs).sample(6)
    np.testing.assert_array_equal(again.inputs, inputs)


def test_pair_sampler_matches_the_forward_model():
    sampler = PairSampler(["naphthalene"], size=48, pixel_size_nm=0.05, seed=0)
    placed = [("naphthalene", "HOMO", 0.3, -0.2, 35.0)]
    frame = ScanFrame(0, 0, 48 * 0.05, 48 * 0.05, pixels=48, lines=48)
    placement = Placement("naphthalene", 0.3, -0.2, 35.0, "HOMO")
    for tip in (
        tip_preset("co"),
        tip_preset("tilted_co"),
        tip_preset("coherent_co"),
        tip_preset("double"),
        tip_preset("blunt"),
    ):
        fast = sampler._render(placed, tip, [0.4], 0.05)[0]
        exact = constant_height_image(placement, frame, tip, z_nm=0.4, bias_V=-1.0) / CURRENT_SCALE_A_PER_V
        assert np.max(np.abs(fast - exact)) < 0.05 * exact.max(), tip.name
    target = sampler._render(placed, tip_preset("co"), [0.4], 0.05, target=True)[0]
    exact = s_wave_image(placement, frame, z_nm=0.4, bias_V=-1.0)
    assert np.max(np.abs(target - exact)) < 0.05 * exact.max()


def test_pair_sampler_current_mode_holds_the_setpoint():
    sampler = PairSampler(
        ["benzene", "naphthalene"],
        size=32,
        pixel_size_nm=0.06,
        seed=2,
        modes=("current",),
        noise=0.0,
        substrate_prob=0.0,
        heights=(0.4, 0.4),
    )
    batch = sampler.sample(2)
    for item, z_map in zip(batch.meta, batch.inputs):
        assert item["mode"] == "current" and item["z_nm"] == pytest.approx(0.4)
        side = 32 * item["pixel_size_nm"]
        frame = ScanFrame(0, 0, side, side, pixels=32, lines=32)
        placements = [
            Placement(m, x, y, r, o)
            for m, o, (x, y), r in zip(item["molecules"], item["orbitals"], item["positions_nm"], item["rotations_deg"])
        ]
        tip = TipState(**item["tip_state"])
        exact = constant_current_image(
            placements, frame, tip, setpoint_A=item["setpoint_A"], bias_V=item["bias_V"], substrate=Substrate()
        )
        # the cached, interpolated fields put the isocurrent surface within 0.01 nm of the exact one
        assert np.max(np.abs(z_map - exact)) < 0.01
        current = constant_height_image(
            placements, frame, tip, z_nm=z_map.astype(float), bias_V=item["bias_V"], substrate=Substrate()
        )
        assert np.median(np.abs(current / item["setpoint_A"] - 1)) < 0.03
        assert np.ptp(z_map) > 0.02


def test_tilted_tip_breaks_the_mirror_symmetry_and_shifts_the_apex():
    frame = ScanFrame(0, 0, 3.0, 3.0, pixels=60, lines=60)
    tilted = tip_preset("co").with_(tilt_deg=20.0, tilt_azimuth_deg=0.0)
    img = constant_height_image(Placement("pentacene"), frame, tilted, z_nm=0.4, bias_V=-1.0)
    assert np.max(np.abs(img - img[:, ::-1])) > 0.05 * img.max()
    np.testing.assert_allclose(img, img[::-1, :], rtol=1e-4, atol=1e-6 * img.max())  # tilt along x keeps y-mirror
    assert tilted.apex_offset_nm()[0] == pytest.approx(0.3 * np.sin(np.radians(20.0)))


def test_scattered_molecules_never_overlap_and_one_without_room_is_left_out():
    from stm_live.simulators.orbitals import molecule

    names = ["pentacene", "h2pc", "coronene", "ptcda"]
    for seed in range(20):
        placed = scatter_molecules(np.random.default_rng(seed), names, lambda i: (2.0, 2.0), orbital="HOMO")
        kept = {p.molecule for p in placed}
        assert [p.molecule for p in placed] == [n for n in names if n in kept]  # in order; some may be left out
        for i, a in enumerate(placed):
            assert abs(a.x_nm) <= 2.0 and abs(a.y_nm) <= 2.0 and a.orbital == "HOMO"
            for b in placed[:i]:
                gap = (
                    np.hypot(a.x_nm - b.x_nm, a.y_nm - b.y_nm)
                    - molecule(a.molecule).radius_nm
                    - molecule(b.molecule).radius_nm
                )
                assert gap > MOLECULE_GAP_NM
    again = scatter_molecules(np.random.default_rng(3), names, lambda i: (2.0, 2.0))
    assert again == scatter_molecules(np.random.default_rng(3), names, lambda i: (2.0, 2.0))
    # a box the size of one molecule holds only the first
    assert [p.molecule for p in scatter_molecules(np.random.default_rng(0), names, lambda i: (0.1, 0.1))] == [
        "pentacene"
    ]
