"""STM-Net: the network, the Reconstructor, the shipped checkpoint."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

from stm_live.models import checkpoint, stmnet
from stm_live.models.inputs import normalise
from stm_live.models.metrics import make_eval_pairs, psnr, ssim
from stm_live.models.stmnet import STMNet, STMNetConfig, load_stmnet
from stm_live.models.training import TRAIN_PIXEL_SIZE_NM
from stm_live.simulators.imaging import Placement, ScanFrame, constant_height_image, s_wave_image
from stm_live.simulators.tip import tip_preset
from stm_live.simulators.vacuum import current_from_z

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def rec():
    return load_stmnet(device="cpu")


def _co_frame(placements, pixels, pixel_size_nm, z_nm=0.4, bias_V=-1.0):
    """(normalised CO-tip constant-height image, |psi|^2 target) from ``simulators.imaging``."""
    frame = ScanFrame(0.0, 0.0, pixels * pixel_size_nm, pixels * pixel_size_nm, pixels=pixels, lines=pixels)
    image = constant_height_image(placements, frame, tip_preset("co"), z_nm=z_nm, bias_V=bias_V)
    target = s_wave_image(placements, frame, z_nm=z_nm, bias_V=bias_V)
    return normalise(image), target / target.max()


@pytest.fixture(scope="module")
def perylene_pair():
    """A held-out molecule (perylene HOMO, CO tip, z = 0.4 nm), 96 x 96 at the training pixel size."""
    return _co_frame([Placement("perylene", 0.1, -0.05, 20.0, "HOMO")], 96, TRAIN_PIXEL_SIZE_NM)


def test_network_is_small_and_fully_convolutional():
    net = STMNet(STMNetConfig()).eval()
    assert sum(p.numel() for p in net.parameters()) < 2_000_000
    with torch.inference_mode():
        for shape in ((1, 1, 64, 64), (2, 1, 40, 72)):
            y = net(torch.rand(*shape))
            assert y.shape == shape and (y >= 0).all()


def test_reconstruct_shape_dtype_and_nonnegative(rec):
    img = np.random.default_rng(0).random((37, 53)) * 1e-10  # odd sizes, amperes
    out = rec.reconstruct(img, 0.07)
    assert out.shape == (37, 53) and out.dtype == np.float32
    assert np.isfinite(out).all() and (out >= 0).all()


def test_nan_rows_of_a_frame_in_progress_stay_nan(rec, perylene_pair):
    x, _ = perylene_pair
    partial = x.copy()
    partial[60:] = np.nan  # rows not scanned yet
    partial[10, 5] = np.nan  # a single dropped pixel
    out = rec.reconstruct(partial, TRAIN_PIXEL_SIZE_NM)
    assert np.isnan(out[60:]).all() and np.isnan(out[10, 5])
    assert np.isfinite(out[:60]).sum() == 60 * 96 - 1
    full = rec.reconstruct(x, TRAIN_PIXEL_SIZE_NM)
    assert ssim(out[11:50], full[11:50]) > 0.8  # scanned part largely unaffected


def test_same_physical_frame_at_two_pixel_sizes_gives_consistent_output(rec):
    place = [Placement("triphenylene", 0.0, 0.0, 30.0, "LUMO")]
    fine, _ = _co_frame(place, 96, 0.05, bias_V=1.0)  # 4.8 nm frame
    coarse, _ = _co_frame(place, 48, 0.10, bias_V=1.0)  # same frame, 2x pixels
    out_f = rec.reconstruct(fine, 0.05)
    out_c = rec.reconstruct(coarse, 0.10)
    down = torch.nn.functional.avg_pool2d(torch.from_numpy(out_f)[None, None], 2)[0, 0].numpy()
    assert ssim(out_c, down) > 0.95
    # ... and telling the Reconstructor the wrong pixel size gives a worse match
    wrong = rec.reconstruct(coarse, 0.05)
    assert ssim(wrong, down) < ssim(out_c, down)


def test_no_seam_where_the_old_512_px_tiles_met(rec):
    """A frame longer than the old 512 px tile, one molecule at one end, flat background: the
    old blend (tiles at 0 and 128, GroupNorm statistics per tile) drew lines at columns 128
    and 512 (gradient 3.2x the frame's mean there); one pass must not."""
    lines, pixels = 96, 640
    frame = ScanFrame(0.0, 0.0, pixels * TRAIN_PIXEL_SIZE_NM, lines * TRAIN_PIXEL_SIZE_NM, pixels=pixels, lines=lines)
    image = constant_height_image(
        [Placement("perylene", -14.0, 0.0, 20.0, "HOMO")], frame, tip_preset("co"), z_nm=0.4, bias_V=-1.0
    )
    out = rec.reconstruct(image, TRAIN_PIXEL_SIZE_NM)
    assert np.isfinite(out).all() and out.max() > 0.5
    step = np.abs(np.diff(out, axis=1)).mean(axis=0)  # mean |gradient| across each column boundary
    interior = np.ones(step.size, bool)
    for b in (128, 512):
        interior[b - 8 : b + 8] = False
    for b in (128, 512):
        assert step[b - 3 : b + 2].max() <= 1.5 * step[interior].mean(), b


def test_non_square_pixels_give_the_square_pixel_result(rec):
    """The same 4.8 nm scene at 96x96 px and at 96 px x 64 lines (and 64 px x 96 lines): with
    the line spacing given, the results agree within 1 % RMS (of the maximum) on the coarser
    grid; taking the pixels as square is clearly worse."""
    place = [Placement("perylene", 0.1, -0.05, 20.0, "HOMO")]

    def render(pixels, lines):
        frame = ScanFrame(0.0, 0.0, 4.8, 4.8, pixels=pixels, lines=lines)
        return constant_height_image(place, frame, tip_preset("co"), z_nm=0.4, bias_V=-1.0)

    square = rec.reconstruct(render(96, 96), 0.05)
    for pixels, lines in ((96, 64), (64, 96)):
        grid = torch.nn.functional.interpolate(
            torch.from_numpy(square)[None, None],
            size=(lines, pixels),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0, 0].numpy()
        image = render(pixels, lines)
        rms = lambda a, grid=grid: float(np.sqrt(np.mean((a - grid) ** 2)) / grid.max())  # noqa: E731
        good = rms(rec.reconstruct(image, 4.8 / pixels, 4.8 / lines))
        ignored = rms(rec.reconstruct(image, 4.8 / pixels))
        assert good <= 0.01 and ignored > 2 * good, (pixels, lines, good, ignored)


def test_network_frame_is_bounded_before_anything_is_allocated(rec):
    from stm_live.interpret import STMNET_MAX_SIDE_PX, STMNET_PIXEL_NM

    limit = stmnet.MAX_NETWORK_SIDE_PX
    assert limit == STMNET_MAX_SIDE_PX == 1024 and rec.pixel_size_nm == STMNET_PIXEL_NM  # scope and backstop agree
    assert rec.network_shape((limit, 64), TRAIN_PIXEL_SIZE_NM) == (limit, 64)
    assert rec.network_shape((100, 200), 0.1, 0.2) == (400, 400)
    with pytest.raises(ValueError, match=r"1025x64 px .*1024 px limit"):
        rec.network_shape((limit + 1, 64), TRAIN_PIXEL_SIZE_NM)
    # a 2 um overview, 512 px: resampling it would take 40000^2 floats (6.4 GB); it is refused at once
    overview = np.zeros((512, 512), np.float32)
    started = time.perf_counter()
    with pytest.raises(
        ValueError,
        match=r"frame of 512x512 px \(lines x pixels\) at 3\.90625 nm/px resamples to "
        r"40000x40000 px .*crop the frame.*coarser tool",
    ):
        rec.reconstruct(overview, 2000 / 512)
    with pytest.raises(ValueError, match=r"0\.05 nm/px, 1 nm line spacing resamples to 1280x64 px"):  # slow axis
        rec.reconstruct_detailed(np.zeros((64, 64)), TRAIN_PIXEL_SIZE_NM, line_spacing_nm=1.0)
    assert time.perf_counter() - started < 1.0


def test_view_spread_is_the_disagreement_of_the_symmetry_views(rec, perylene_pair):
    x, _ = perylene_pair
    detailed = rec.reconstruct_detailed(x, TRAIN_PIXEL_SIZE_NM)
    assert isinstance(detailed, stmnet.Reconstruction) and detailed.views == 2
    np.testing.assert_array_equal(detailed.image, rec.reconstruct(x, TRAIN_PIXEL_SIZE_NM))
    # two views: the std is half their difference (the network's output is a softplus, > 0, so
    # the single views below are not clipped; no resampling at the training pixel size)
    single = rec.with_views(1)
    ident = single.reconstruct(x, TRAIN_PIXEL_SIZE_NM)
    rotated = single.reconstruct(x[::-1, ::-1].copy(), TRAIN_PIXEL_SIZE_NM)[::-1, ::-1]
    assert detailed.view_spread.dtype == np.float32 and detailed.view_spread.shape == x.shape
    np.testing.assert_allclose(detailed.view_spread, np.abs(ident - rotated) / 2, atol=1e-5)
    # one view: zeros, NaN where the image is NaN
    partial = x.copy()
    partial[70:] = np.nan
    one = single.reconstruct_detailed(partial, TRAIN_PIXEL_SIZE_NM)
    assert one.spread == 0.0 and np.isnan(one.view_spread[70:]).all() and (one.view_spread[:70] == 0).all()
    with_nan = rec.reconstruct_detailed(partial, TRAIN_PIXEL_SIZE_NM)
    np.testing.assert_array_equal(np.isnan(with_nan.view_spread), np.isnan(with_nan.image))
    # the summary: low on a held-out molecule, high on noise the network knows nothing about
    noise = rec.reconstruct_detailed(np.random.default_rng(0).random((96, 96)), TRAIN_PIXEL_SIZE_NM)
    assert 0 < detailed.spread < 0.1 < 0.3 < noise.spread, (detailed.spread, noise.spread)
    # resampled frames map the spread back to the input grid too
    coarse = rec.reconstruct_detailed(x[::2, ::3], 0.1, 0.15)
    assert coarse.view_spread.shape == (48, 32) and np.isfinite(coarse.view_spread).all()


def test_symmetry_averaging_makes_the_output_equivariant(rec, perylene_pair):
    """Averaging over the 180-degree rotation (default) and the mirrors about x and y (4 views):
    rotating or mirroring the input then does the same to the output (up to float error); with
    one view it need not."""
    x, _ = perylene_pair  # 96 x 96: a multiple of the network's stride, so padding is symmetric
    four = rec.with_views(4)
    rotate, flip_left_right, flip_up_down = (lambda a: a[::-1, ::-1]), (lambda a: a[:, ::-1]), (lambda a: a[::-1])
    for r, views in ((rec, [rotate]), (four, [rotate, flip_left_right, flip_up_down])):
        y = r.reconstruct(x, TRAIN_PIXEL_SIZE_NM)
        for view in views:
            np.testing.assert_allclose(
                view(r.reconstruct(np.ascontiguousarray(view(x)), TRAIN_PIXEL_SIZE_NM)), y, atol=1e-5
            )
    single = rec.with_views(1)
    assert (
        np.abs(
            single.reconstruct(x[::-1, ::-1].copy(), TRAIN_PIXEL_SIZE_NM)[::-1, ::-1]
            - single.reconstruct(x, TRAIN_PIXEL_SIZE_NM)
        ).max()
        > 1e-3
    )
    with pytest.raises(ValueError, match="symmetry views must be one of"):
        rec.with_views(3)


def test_shipped_checkpoint_beats_identity_on_held_out_frames(rec):
    """Fixed held-out set: 2 molecules x HOMO/LUMO, CO tip, 3 frames each.

    The shipped checkpoint measures +15.6 dB mean PSNR gain and SSIM 0.991 here with its default
    2 symmetry views (+14.5 dB, 0.989 with one); the thresholds (>= 10 dB, > 0.98) leave
    headroom but fail the early, shorter-trained weights (+9.5 dB, 0.977)."""
    gains, ssims = [], []
    for mol in ("perylene", "triphenylene"):
        for orb in ("HOMO", "LUMO"):
            cell = {"molecule": mol, "orbital": orb, "tip": "co", "mode": "height"}
            inputs, targets = make_eval_pairs(cell, 3, seed=7, size=64)
            preds = np.stack([rec.reconstruct(x, TRAIN_PIXEL_SIZE_NM) for x in inputs])
            gains.append(np.mean(psnr(preds, targets) - psnr(inputs, targets)))
            ssims.append(np.mean(ssim(preds, targets)))
    assert np.mean(gains) >= 10.0, gains
    assert np.mean(ssims) > 0.98, ssims


@pytest.mark.parametrize(
    "image, px, match",
    [
        (np.zeros((4, 8, 8)), 0.05, "2-D"),
        (np.zeros(64), 0.05, "2-D"),
        (np.ones((16, 16)), 0.0, "pixel_size_nm"),
        (np.ones((16, 16)), -0.1, "pixel_size_nm"),
        (np.ones((16, 16)), float("nan"), "pixel_size_nm"),
        (np.full((16, 16), np.nan), 0.05, "all NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(rec, image, px, match):
    with pytest.raises(ValueError, match=match):
        rec.reconstruct(image, px)


@pytest.mark.parametrize("line_spacing", [0.0, -0.05, float("inf"), "a"])
def test_bad_line_spacing_is_named(rec, line_spacing):
    with pytest.raises(ValueError, match="line_spacing_nm"):
        rec.reconstruct(np.ones((16, 16)), 0.05, line_spacing)


def test_missing_and_corrupt_checkpoints_say_how_to_retrain(tmp_path):
    with pytest.raises(FileNotFoundError, match="stm-live train"):
        load_stmnet(device="cpu", path=tmp_path / "nope.pt")
    ckpt = tmp_path / "stmnet.pt"
    shutil.copy(stmnet.DEFAULT_CHECKPOINT, ckpt)
    shutil.copy(checkpoint.hash_path(stmnet.DEFAULT_CHECKPOINT), checkpoint.hash_path(ckpt))
    assert load_stmnet(device="cpu", path=ckpt).pixel_size_nm == pytest.approx(TRAIN_PIXEL_SIZE_NM)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt.*stm-live train"):
        load_stmnet(device="cpu", path=ckpt)
    checkpoint.hash_path(ckpt).unlink()
    with pytest.raises(ValueError, match="hash file missing"):
        load_stmnet(device="cpu", path=ckpt)


def test_training_batches_come_from_the_pair_sampler_without_held_out_molecules():
    from stm_live.models import training
    from stm_live.simulators.pairs import HELD_OUT_MOLECULES, PairSampler

    sampler = training.make_sampler(size=32, seed=3)
    assert isinstance(sampler, PairSampler) and sampler.pixel_size_nm == (TRAIN_PIXEL_SIZE_NM,) * 2
    used = {name for sign in (-1, 1) for name, _ in sampler.choices[sign]}
    assert used and not used & set(HELD_OUT_MOLECULES)
    x, t = training.sample_batch(sampler, [0, 5], 6)
    assert x.shape == t.shape == (6, 32, 32) and x.dtype == t.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1 and x.max() <= 3  # inputs.normalise range
    np.testing.assert_allclose(t.max(axis=(1, 2)), 1.0, rtol=1e-6)
    x2, t2 = training.sample_batch(training.make_sampler(size=32, seed=99), [0, 5], 6)
    np.testing.assert_array_equal(x, x2)  # a batch depends on (seed, step) only: --resume is exact
    np.testing.assert_array_equal(t, t2)


def test_constant_current_pairs_are_converted_with_current_from_z():
    from stm_live.models import training
    from stm_live.simulators.pairs import PairSampler

    sampler = PairSampler("naphthalene", size=32, pixel_size_nm=TRAIN_PIXEL_SIZE_NM, seed=1, modes="current", noise=0.0)
    batch = sampler.sample(2)
    z_nm = batch.inputs  # tip height maps in nm
    x = training.network_inputs(batch)
    for zi, xi in zip(z_nm, x):
        np.testing.assert_allclose(xi, normalise(current_from_z(zi, unit="nm")), atol=1e-6)


def test_warm_start_keeps_the_architecture_and_records_the_lineage(tmp_path):
    from stm_live.models.checkpoint import sha256_of
    from stm_live.models.stmnet import DEFAULT_CHECKPOINT, STMNetConfig, load_stmnet
    from stm_live.models.training import train_main

    parent = load_stmnet(device="cpu")
    out = tmp_path / "child.pt"
    train_main(
        steps=2,
        out=out,
        device="cpu",
        seed=3,
        init=DEFAULT_CHECKPOINT,
        threads=1,
        val_every=2,
        final_eval_samples=1,
        quiet=True,
    )
    child = load_stmnet(device="cpu", path=out)
    assert child.net.config == parent.net.config
    assert child.info["init_sha256"] == sha256_of(DEFAULT_CHECKPOINT)
    assert child.info["total_steps"] == int(parent.info.get("total_steps", parent.info["steps"])) + 2
    assert "warm start" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="architecture"):
        train_main(
            steps=1,
            out=tmp_path / "other.pt",
            device="cpu",
            init=DEFAULT_CHECKPOINT,
            config=STMNetConfig(channels=8),
            quiet=True,
        )
