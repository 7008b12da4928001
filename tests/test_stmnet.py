"""STM-Net: the network, the Reconstructor, the shipped checkpoint, reconstruct_file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from stm_live.models import stmnet
from stm_live.models.metrics import psnr, ssim
from stm_live.models.stmnet import STMNet, STMNetConfig, current_from_z, load_stmnet
from stm_live.models.training import TRAIN_PIXEL_SIZE_NM, make_eval_pairs
from stm_live.simulators.imaging import Placement, ScanFrame, constant_height_image, s_wave_image
from stm_live.simulators.tip import tip_preset

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def rec():
    return load_stmnet(device="cpu")


def _co_frame(placements, pixels, pixel_size_nm, z_nm=0.4, bias_V=-1.0):
    """(normalised CO-tip constant-height image, |psi|^2 target) from ``simulators.imaging``."""
    frame = ScanFrame(0.0, 0.0, pixels * pixel_size_nm, pixels * pixel_size_nm, pixels=pixels, lines=pixels)
    image = constant_height_image(placements, frame, tip_preset("co"), z_nm=z_nm, bias_V=bias_V)
    target = s_wave_image(placements, frame, z_nm=z_nm, bias_V=bias_V)
    return stmnet.normalise(image), target / target.max()


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


def test_tiling_matches_single_pass(rec, perylene_pair):
    x, _ = perylene_pair
    whole = rec.reconstruct(x, TRAIN_PIXEL_SIZE_NM)
    tiled_rec = stmnet.Reconstructor(rec.net, rec.pixel_size_nm, device="cpu", tile=64, overlap=16)
    tiled = tiled_rec.reconstruct(x, TRAIN_PIXEL_SIZE_NM)
    assert psnr(tiled, whole) > 35


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
            np.testing.assert_allclose(view(r.reconstruct(np.ascontiguousarray(view(x)), TRAIN_PIXEL_SIZE_NM)), y,
                                       atol=1e-5)
    single = rec.with_views(1)
    assert np.abs(single.reconstruct(x[::-1, ::-1].copy(), TRAIN_PIXEL_SIZE_NM)[::-1, ::-1]
                  - single.reconstruct(x, TRAIN_PIXEL_SIZE_NM)).max() > 1e-3
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


def test_missing_and_corrupt_checkpoints_say_how_to_retrain(tmp_path):
    with pytest.raises(FileNotFoundError, match="stm-live train"):
        load_stmnet(device="cpu", path=tmp_path / "nope.pt")
    ckpt = tmp_path / "stmnet.pt"
    shutil.copy(stmnet.DEFAULT_CHECKPOINT, ckpt)
    shutil.copy(stmnet.hash_path(stmnet.DEFAULT_CHECKPOINT), stmnet.hash_path(ckpt))
    assert load_stmnet(device="cpu", path=ckpt).pixel_size_nm == pytest.approx(TRAIN_PIXEL_SIZE_NM)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt.*stm-live train"):
        load_stmnet(device="cpu", path=ckpt)
    stmnet.hash_path(ckpt).unlink()
    with pytest.raises(ValueError, match="hash file missing"):
        load_stmnet(device="cpu", path=ckpt)


def test_current_from_z_units_and_direction():
    z_nm = np.array([[0.0, 0.05, 0.1]])
    a = current_from_z(z_nm * 1e-9)  # metres, as Nanonis stores Z
    b = current_from_z(z_nm, unit="nm")
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a.dtype == np.float32 and a.max() == pytest.approx(1.0)
    # tip retracted by 0.1 nm <-> current-like value larger by exp(2 kappa 0.1 nm)
    assert a[0, 2] / a[0, 0] == pytest.approx(np.exp(2 * stmnet.KAPPA_PER_NM * 0.1), rel=1e-4)
    with pytest.raises(ValueError, match="unit"):
        current_from_z(z_nm, unit="pm")


def test_reconstruct_file_npy_and_png(tmp_path, perylene_pair):
    x, _ = perylene_pair
    src = tmp_path / "frame.npy"
    np.save(src, x)
    out = stmnet.reconstruct_file(src, tmp_path / "rec.npy", pixel_size_nm=TRAIN_PIXEL_SIZE_NM, device="cpu")
    arr = np.load(out)
    assert arr.shape == x.shape and arr.dtype == np.float32
    png = stmnet.reconstruct_file(src, tmp_path / "rec.png", pixel_size_nm=TRAIN_PIXEL_SIZE_NM, device="cpu")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="--pixel-size"):
        stmnet.reconstruct_file(src, tmp_path / "x.npy", pixel_size_nm=None, device="cpu")
    with pytest.raises(ValueError, match=r"\.npy, \.png or \.sxm"):
        stmnet.reconstruct_file(src, tmp_path / "x.tif", pixel_size_nm=0.05, device="cpu")


def test_reconstruct_file_sxm_roundtrip_reads_pixel_size_and_z_channel(tmp_path, perylene_pair):
    from stm_live.io.sxm import read_sxm, scan_from_frames, write_sxm

    x, _ = perylene_pair  # 96 px over 4.8 nm -> 0.05 nm/px read from the header
    z_m = (np.log(np.clip(x, 1e-3, None)) / (2 * stmnet.KAPPA_PER_NM) * 1e-9).astype(np.float32)
    scan = scan_from_frames({"Current": {"forward": x * 1e-10, "backward": x * 1e-10},
                             "Z": {"forward": z_m, "backward": z_m}},
                            units={"Current": "A", "Z": "m"}, center_x_m=0.0, center_y_m=0.0,
                            width_m=4.8e-9, height_m=4.8e-9, bias_V=-1.0)
    src = write_sxm(tmp_path / "in.sxm", scan)
    out = stmnet.reconstruct_file(src, tmp_path / "out.sxm", pixel_size_nm=None, channel=None, device="cpu")
    back = read_sxm(out)
    assert "STM-Net" in back.channels and "Current" in back.channels
    rec_sxm = back.channels["STM-Net"]["forward"]
    direct = load_stmnet(device="cpu").reconstruct(x, 0.05)
    assert psnr(rec_sxm, direct) > 40
    via_z = stmnet.reconstruct_file(src, tmp_path / "z.npy", pixel_size_nm=None, channel="Z", device="cpu")
    assert ssim(np.load(via_z), direct) > 0.8  # Z map -> current_from_z -> same orbital
    with pytest.raises(ValueError, match="not in the .sxm"):
        stmnet.reconstruct_file(src, tmp_path / "q.npy", channel="Bias", device="cpu")


def test_training_batches_come_from_the_pair_sampler_without_held_out_molecules():
    from stm_live.models import training
    from stm_live.simulators.pairs import HELD_OUT_MOLECULES, PairSampler

    sampler = training.make_sampler(size=32, seed=3)
    assert isinstance(sampler, PairSampler) and sampler.pixel_size_nm == (TRAIN_PIXEL_SIZE_NM,) * 2
    used = {name for sign in (-1, 1) for name, _ in sampler.choices[sign]}
    assert used and not used & set(HELD_OUT_MOLECULES)
    x, t = training.sample_batch(sampler, [0, 5], 6)
    assert x.shape == t.shape == (6, 32, 32) and x.dtype == t.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1 and x.max() <= 3  # stmnet.normalise range
    np.testing.assert_allclose(t.max(axis=(1, 2)), 1.0, rtol=1e-6)
    x2, t2 = training.sample_batch(training.make_sampler(size=32, seed=99), [0, 5], 6)
    np.testing.assert_array_equal(x, x2)  # a batch depends on (seed, step) only: --resume is exact
    np.testing.assert_array_equal(t, t2)


def test_constant_current_pairs_are_converted_with_current_from_z():
    from stm_live.models import training
    from stm_live.simulators.pairs import PairSampler

    sampler = PairSampler("naphthalene", size=32, pixel_size_nm=TRAIN_PIXEL_SIZE_NM, seed=1, modes="current",
                          noise=0.0)
    batch = sampler.sample(2)
    z_nm = batch.inputs  # tip height maps in nm
    x = training.network_inputs(batch)
    for zi, xi in zip(z_nm, x):
        np.testing.assert_allclose(xi, stmnet.normalise(current_from_z(zi, unit="nm")), atol=1e-6)


def test_warm_start_keeps_the_architecture_and_records_the_lineage(tmp_path):
    from stm_live.models.stmnet import DEFAULT_CHECKPOINT, STMNetConfig, load_stmnet, sha256_of
    from stm_live.models.training import train_main

    parent = load_stmnet(device="cpu")
    out = tmp_path / "child.pt"
    train_main(steps=2, out=out, device="cpu", seed=3, init=DEFAULT_CHECKPOINT, threads=1,
               val_every=2, final_eval_samples=1, quiet=True)
    child = load_stmnet(device="cpu", path=out)
    assert child.net.config == parent.net.config
    assert child.info["init_sha256"] == sha256_of(DEFAULT_CHECKPOINT)
    assert child.info["total_steps"] == int(parent.info.get("total_steps", parent.info["steps"])) + 2
    assert "warm start" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="architecture"):
        train_main(steps=1, out=tmp_path / "other.pt", device="cpu", init=DEFAULT_CHECKPOINT,
                   config=STMNetConfig(channels=8), quiet=True)
