"""Reconstruction self-consistency (stm_live.models.consistency) against the forward model
(simulators: orbitals + tip + imaging) and on the shipped STM-Net's reconstructions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stm_live.models.consistency import (
    AGREEMENT_THRESHOLD,
    PROBES,
    check_reconstruction,
    effective_s_share,
    p_basis,
    predicted_image,
    scope_probe,
)
from stm_live.simulators.imaging import (
    CURRENT_SCALE_A_PER_V,
    Placement,
    ScanFrame,
    constant_height_image,
    s_wave_image,
)
from stm_live.simulators.orbitals import orbital_level
from stm_live.simulators.tip import TipState, tip_preset

torch.set_num_threads(2)

# a non-degenerate level (|grad sqrt(rho)|^2 = |grad psi|^2 holds exactly)
PENTACENE_HOMO = [Placement("pentacene", 0.03, -0.02, 20.0, "HOMO")]


def _frame(pixels, lines, pixel_nm, line_nm=None):
    line_nm = pixel_nm if line_nm is None else line_nm
    return ScanFrame(0.0, 0.0, pixels * pixel_nm, lines * line_nm, pixels=pixels, lines=lines)


def _rendered(tip, frame, placements=PENTACENE_HOMO, z_nm=0.45, bias_V=-1.0):
    """(CO-tip constant-height current in A, exact |psi|^2 at the same height)."""
    image = constant_height_image(placements, frame, tip, z_nm=z_nm, bias_V=bias_V).astype(np.float64)
    rho = s_wave_image(placements, frame, z_nm=z_nm, bias_V=bias_V).astype(np.float64)
    return image, rho


@pytest.mark.parametrize(
    "pixel_nm, line_nm, rms_tol, max_tol",
    [
        (0.025, None, 0.003, 0.08),  # fine pitch: the finite-difference floor is small
        (0.05, None, 0.01, 0.25),  # STM-Net's training pitch
        (0.03, 0.045, 0.01, 0.20),  # non-square pixels: each axis its own pitch
    ],
)
def test_predicted_image_from_exact_density_is_the_forward_models_co_image(pixel_nm, line_nm, rms_tol, max_tol):
    """Tolerance (fraction of the image's peak): RMS and worst pixel, where two nodes in one
    5-point stencil make the sign choice of sqrt(rho) ambiguous."""
    assert orbital_level("pentacene", "HOMO").degeneracy == 1
    frame = _frame(int(round(4.8 / pixel_nm)), int(round(4.8 / (line_nm or pixel_nm))), pixel_nm, line_nm)
    co = tip_preset("co")
    image, rho = _rendered(co, frame)
    pred = predicted_image(
        rho, co.s_fraction, frame.pixel_size_nm, frame.line_spacing_nm, a=CURRENT_SCALE_A_PER_V * 1.0
    )  # imaging: I = scale |V| S
    assert pred.shape == image.shape and np.isfinite(pred).all()
    err = (pred - image) / image.max()
    assert np.sqrt(np.mean(err**2)) < rms_tol
    assert np.abs(err).max() < max_tol
    # the p term is what makes the difference: rho alone misses it by tens of %
    assert np.abs(CURRENT_SCALE_A_PER_V * rho * co.s_fraction - image).max() / image.max() > 0.3


def test_p_basis_is_the_p_channel_of_the_forward_model():
    """G = 1/2 |grad psi|^2 / kappa^2 is what one p_xy channel of unit weight sees."""
    frame = _frame(160, 160, 0.03)
    image, rho = _rendered(TipState(0.0, 0.5, 0.5, 0.0), frame)
    g = CURRENT_SCALE_A_PER_V * p_basis(rho, 0.03)
    assert np.sqrt(np.mean((g - image) ** 2)) / image.max() < 0.005
    # a plain centred difference of sqrt(rho) loses the nodal lines, where the p image is brightest
    gy, gx = np.gradient(np.sqrt(rho), 0.03)
    naive = CURRENT_SCALE_A_PER_V * 0.5 * (gx**2 + gy**2) / 11.46**2
    assert np.abs(naive - image).max() / image.max() > 3 * np.abs(g - image).max() / image.max()


def test_degenerate_level_p_term_from_sqrt_rho_is_a_lower_bound():
    """rho = sum psi_i^2: |grad sqrt(rho)|^2 <= sum |grad psi_i|^2 (Cauchy-Schwarz), so the
    predicted p image of a degenerate level falls short; a non-degenerate one is exact."""
    frame = _frame(160, 160, 0.03)
    p_tip = TipState(0.0, 0.5, 0.5, 0.0)
    for name, label, lo, hi in (("triphenylene", "HOMO", 0.3, 0.8), ("pentacene", "HOMO", 0.98, 1.02)):
        place = [Placement(name, 0.0, 0.0, 10.0, label)]
        image, rho = _rendered(p_tip, frame, place, z_nm=0.4)
        assert orbital_level(name, label).degeneracy == (2 if name == "triphenylene" else 1)
        ratio = CURRENT_SCALE_A_PER_V * p_basis(rho, 0.03).sum() / image.sum()
        assert lo < ratio < hi, name


@pytest.mark.parametrize("w_s", [0.0, 0.13, 0.3, 0.45, 0.6, 0.8])
def test_fitted_s_share_recovers_the_simulated_tip(w_s):
    frame = _frame(96, 96, 0.05)
    tip = TipState(w_s, (1 - w_s) / 2, (1 - w_s) / 2, 0.0)
    image, rho = _rendered(tip, frame)
    res = check_reconstruction(image, rho, 0.05)
    assert abs(res.w_s - w_s) < 0.05
    assert res.agreement > 0.9 and res.explained > 0.99 and res.in_scope and res.reason == ""
    assert res.shift_nm == (0.0, 0.0)  # an untilted tip needs no shift
    # scale and offset are fitted: a current in A, or a normalised image, give the same answer
    again = check_reconstruction(3.0 * image / image.max() + 0.7, rho, 0.05)
    assert again.w_s == pytest.approx(res.w_s, abs=1e-6) and again.agreement == pytest.approx(res.agreement, abs=1e-6)


@pytest.mark.parametrize(
    "tip",
    [
        TipState(0.13, 0.40, 0.40, 0.07, name="pz"),
        tip_preset("coherent_co"),
        TipState(0.3, 0.2, 0.2, 0.3, name="much_pz"),
        TipState(0.3, 0.3, 0.3, 0.1, coherent=True, name="coherent_s30"),
    ],
    ids=lambda t: t.name,
)
def test_p_z_and_coherent_tips_fit_their_effective_s_share(tip):
    """p_z images like s scaled by (kappa_eff/kappa)^2 = pz_factor; a coherent s-p_z tip cancels
    its s part (coherent_co: effective s share ~ 0 although 13 % of the tip is s)."""
    frame = _frame(96, 96, 0.05)
    for placements, z in ((PENTACENE_HOMO, 0.45), ([Placement("perylene", 0.0, 0.05, 70.0, "HOMO")], 0.3)):
        image, rho = _rendered(tip, frame, placements, z_nm=z)
        res = check_reconstruction(image, rho, 0.05)
        assert 1.5 < res.pz_factor < 2.6
        assert abs(res.w_s - effective_s_share(tip, res.pz_factor)) < 0.05
    assert effective_s_share(tip_preset("co")) == pytest.approx(0.13)
    assert effective_s_share(tip_preset("coherent_co"), 2.0) < 0.01


def test_tilted_tip_is_fitted_with_its_apex_shift():
    frame = _frame(96, 96, 0.05)
    tip = tip_preset("tilted_co")
    image, rho = _rendered(tip, frame)
    unshifted = check_reconstruction(image, rho, 0.05, max_shift_nm=0.0)
    res = check_reconstruction(image, rho, 0.05)
    # the tip at x images the scene at x + apex offset: the image moves by -offset (rows run
    # down, so lab +y is -row); the tilt's own cross terms shorten the apparent move a little
    ox, oy = tip.apex_offset_nm()
    expected = np.array([-ox, oy])
    got = np.array(res.shift_nm)
    assert got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)) > 0.9
    assert 0.3 < np.linalg.norm(got) / np.linalg.norm(expected) < 1.2
    assert res.agreement > 0.85 and res.explained > unshifted.explained + 0.1
    assert abs(res.w_s - effective_s_share(tip, res.pz_factor)) < 0.12  # first-order tilt model


def test_pure_s_tip_has_no_p_contrast_and_is_out_of_scope():
    frame = _frame(96, 96, 0.05)
    image, rho = _rendered(tip_preset("s"), frame)
    res = check_reconstruction(image, rho, 0.05)
    assert res.explained > 0.999 and res.agreement < 0.05
    assert not res.in_scope and "no p-channel contrast" in res.reason and "not a CO-tip orbital image" in res.reason


def test_partially_scanned_frame_keeps_nan_rows_and_still_fits():
    frame = _frame(96, 96, 0.05)
    image, rho = _rendered(tip_preset("co"), frame)
    full = check_reconstruction(image, rho, 0.05)
    image[60:] = np.nan  # lines not scanned yet: the network returns NaN there too
    rho[60:] = np.nan
    image[10, 5] = np.nan
    res = check_reconstruction(image, rho, 0.05)
    assert res.residual.shape == image.shape and res.residual.dtype == np.float32
    assert np.isnan(res.residual[60:]).all() and np.isnan(res.predicted[60:]).all() and np.isnan(res.residual[10, 5])
    assert np.isfinite(res.residual[:58]).sum() > 0.9 * 58 * 96
    assert abs(res.w_s - full.w_s) < 0.01 and res.in_scope
    assert np.sqrt(np.nanmean(res.residual**2)) < 0.01 * np.nanmax(image)
    # the prediction's gradients near the last scanned line are one-sided, not NaN
    assert np.isfinite(predicted_image(rho, 0.13, 0.05)[59]).all()
    # one line scanned: no y gradient, nothing to fit
    lone = np.full_like(image, np.nan)
    lone[0] = 1.0
    first = check_reconstruction(lone, lone, 0.05)
    assert math.isnan(first.agreement) and not first.in_scope and "too few scanned pixels" in first.reason


def test_flat_image_has_no_contrast_to_check():
    res = check_reconstruction(np.full((32, 32), 2e-10), np.random.default_rng(0).random((32, 32)), 0.05)
    assert res.agreement == 0.0 and not res.in_scope and "no contrast" in res.reason


def test_summary_is_json_ready():
    frame = _frame(64, 64, 0.05)
    image, rho = _rendered(tip_preset("co"), frame)
    res = check_reconstruction(image, rho, 0.05)
    back = json.loads(json.dumps(res.summary()))
    assert set(back) >= {
        "agreement",
        "explained",
        "explained_s",
        "w_s",
        "a",
        "b",
        "shift_nm",
        "pz_factor",
        "in_scope",
        "reason",
        "pixels",
    }
    assert isinstance(back["in_scope"], bool) and back["pixels"] > 0
    assert res.line().startswith("self-consistency: agreement") and "a CO-tip orbital image" in res.line()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_reconstruction(np.ones((8, 8)), np.ones((8, 9)), 0.05), "rho shape (8, 9) differs"),
        (lambda: check_reconstruction(np.ones(8), np.ones(8), 0.05), "measured must be a 2-D image"),
        (lambda: check_reconstruction(np.ones((8, 8)), np.ones((8, 8)), 0.0), "pixel_size_nm must be finite and > 0"),
        (lambda: check_reconstruction(np.ones((8, 8)), np.ones((8, 8)), 0.05, -1.0), "line_spacing_nm must be"),
        (lambda: check_reconstruction(np.ones((8, 8)), np.ones((8, 8)), 0.05, threshold=2.0), "threshold must be in"),
        (lambda: predicted_image(np.ones((8, 8)), 1.5, 0.05), "w_s must be in [0, 1]"),
        (lambda: scope_probe("cluster", np.random.default_rng(0)), "unknown probe 'cluster'"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        call()


# ---------------------------------------------------------------- the shipped STM-Net


@pytest.fixture(scope="module")
def rec():
    from stm_live.models import load_stmnet

    return load_stmnet(device="cpu")


def test_agreement_is_high_on_held_out_molecules_and_low_without_a_molecule(rec):
    """Held-out molecules (metrics.eval_cells) under every evaluation tip vs frames with no
    molecule (noise, an adatom lattice, step edges), all reconstructed by the shipped STM-Net."""
    from stm_live.models.metrics import eval_cells, make_eval_pairs

    px = 0.05
    molecules = []  # 12 frames: 3 molecules x 4 tips
    for cell in (c for c in eval_cells("held-out") if c["mode"] == "height" and c["orbital"] == "HOMO"):
        image = make_eval_pairs(cell, 1, seed=2024, size=96, pixel_size_nm=px)[0][0]
        molecules.append((cell, check_reconstruction(image, rec.reconstruct(image, px), px)))
    rng = np.random.default_rng(2024)
    probes = {name: [] for name in PROBES}
    for name in PROBES:
        for _ in range(6):
            image = scope_probe(name, rng, size=96, pixel_size_nm=px)
            probes[name].append(check_reconstruction(image, rec.reconstruct(image, px), px))

    good = [r.agreement for _, r in molecules]
    assert np.median(good) > 0.5
    assert sum(r.in_scope for _, r in molecules) >= len(molecules) - 2  # triphenylene's level is degenerate
    for name, results in probes.items():
        assert np.mean([r.agreement for r in results]) < AGREEMENT_THRESHOLD, name
    assert not any(r.in_scope for r in probes["noise"])
    assert all(r.reason.startswith("not a CO-tip orbital image") for r in probes["noise"])
    bad = [r.agreement for results in probes.values() for r in results]
    auc = np.mean(np.asarray(good)[:, None] > np.asarray(bad)[None, :])
    assert auc > 0.9
    # the fitted s share of the network's reconstruction tracks the tip
    by_tip = {cell["tip"]: r.w_s for cell, r in molecules if cell["molecule"] == "perylene"}
    assert abs(by_tip["co"] - 0.13) < 0.05 and abs(by_tip["co_s40"] - 0.4) < 0.1 and by_tip["coherent_co"] < 0.1


def test_coarse_scans_are_checked_on_the_networks_grid(rec):
    """At 0.1 nm pixels the p image is under-resolved on the measured grid; predicted on the
    network's 0.05 nm grid and sampled at the measured pixels, held-out molecules agree again
    while noise stays out of scope."""
    from stm_live.models.metrics import eval_cells, make_eval_pairs

    px = 0.1
    on_measured, on_network = [], []
    for cell in [c for c in eval_cells("held-out") if c["mode"] == "height" and c["orbital"] == "HOMO"][:6]:
        image = make_eval_pairs(cell, 1, seed=2024, size=48, pixel_size_nm=px)[0][0]
        detailed = rec.reconstruct_detailed(image, px)
        assert detailed.network is not None and detailed.network[0].shape == (96, 96)
        assert detailed.network[1] == pytest.approx(0.05)
        on_measured.append(check_reconstruction(image, detailed.image, px).agreement)
        on_network.append(check_reconstruction(image, detailed.image, px, network=detailed.network).agreement)
    assert np.median(on_network) > AGREEMENT_THRESHOLD > np.median(on_measured)
    noise = scope_probe("noise", np.random.default_rng(3), size=48, pixel_size_nm=px)
    detailed = rec.reconstruct_detailed(noise, px)
    assert not check_reconstruction(noise, detailed.image, px, network=detailed.network).in_scope
    # a frame at the network's own pitch has no finer grid: the check is the plain one
    assert rec.reconstruct_detailed(image[:, :], 0.05).network is None
