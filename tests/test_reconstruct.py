"""`stm-live reconstruct` on files shaped like real recordings (written by tests/sxm_files.py,
not by our own codec): channel, sign, scope, folders, bad input; the shipped network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sxm_files import write_raw_sxm
from typer.testing import CliRunner

from stm_live.app.reconstruct import reconstruct_files
from stm_live.cli import app
from stm_live.io.sxm import read_sxm
from stm_live.models import load_stmnet
from stm_live.simulators.imaging import (
    Placement,
    ScanFrame,
    Substrate,
    constant_current_image,
    constant_height_image,
)
from stm_live.simulators.tip import tip_preset

torch.set_num_threads(2)
runner = CliRunner()
PIXELS, PITCH_NM = 80, 0.05
MOLECULE = [Placement("perylene", 0.1, -0.05, 20.0, "HOMO")]


@pytest.fixture(scope="module")
def net():
    return load_stmnet(device="cpu")


@pytest.fixture(scope="module")
def frames():
    """Perylene HOMO under a CO tip at -1 V: constant-height current (negative, as a Nanonis
    records it at negative bias) and a constant-current Z map (metres) of the same scene."""
    frame = ScanFrame(0.0, 0.0, PIXELS * PITCH_NM, PIXELS * PITCH_NM, pixels=PIXELS, lines=PIXELS)
    current = -constant_height_image(MOLECULE, frame, tip_preset("co"), z_nm=0.4, bias_V=-1.0)
    z_nm = constant_current_image(
        MOLECULE, frame, tip_preset("co"), setpoint_A=2e-11, bias_V=-1.0, substrate=Substrate()
    )
    return current.astype(np.float32), (z_nm * 1e-9).astype(np.float32)


def _write(
    path,
    channels,
    *,
    feedback_on,
    bias_V=-1.0,
    pixels=PIXELS,
    lines=PIXELS,
    range_m=(PIXELS * PITCH_NM * 1e-9,) * 2,
    **kw,
):
    return write_raw_sxm(
        path,
        channels={k: (i, u, a, a) for k, (i, u, a) in channels.items()},
        range_m=range_m,
        bias_V=bias_V,
        feedback_on=feedback_on,
        **kw,
    )


def _rms(a, b):
    a, b = a / np.nanmax(a), b / np.nanmax(b)
    return float(np.sqrt(np.nanmean((a - b) ** 2)))


def test_constant_current_file_is_reconstructed_from_z_not_the_feedback_error(tmp_path, frames, net):
    current, z = frames
    error = np.random.default_rng(0).normal(2e-11, 1e-13, z.shape).astype(np.float32)
    src = _write(tmp_path / "cc.sxm", {"Current": (0, "A", error), "Z": (14, "m", z)}, feedback_on=True)
    seen = []
    [res] = reconstruct_files([src], tmp_path / "cc.npy", report=seen.append, load=lambda: net)
    assert res.status == "ok" and seen == [res]
    assert "self-consistency: agreement" in res.message and "a CO-tip orbital image" in res.message
    assert res.extra["consistency"]["in_scope"] and 0 <= res.extra["consistency"]["w_s"] <= 1
    assert np.load(tmp_path / "cc_residual.npy").shape == np.load(tmp_path / "cc_spread.npy").shape == z.shape
    assert "Z forward" in res.message and "Z controller on" in res.message and "0.05 nm/px" in res.message
    via_z = np.load(tmp_path / "cc.npy")
    [named] = reconstruct_files([src], tmp_path / "z.npy", channel="Z", load=lambda: net)
    np.testing.assert_array_equal(via_z, np.load(named.output))
    # the Z result shows the same orbital as the constant-height frame of the scene
    [ch] = reconstruct_files(
        [_write(tmp_path / "ch.sxm", {"Current": (0, "A", current)}, feedback_on=False)],
        tmp_path / "ch.npy",
        load=lambda: net,
    )
    assert np.corrcoef(via_z.ravel(), np.load(ch.output).ravel())[0, 1] > 0.8


def test_result_is_unchanged_when_the_current_sign_flips(tmp_path, frames, net):
    current, _ = frames
    neg = _write(tmp_path / "neg.sxm", {"Current": (0, "A", current)}, feedback_on=False, bias_V=-1.0)
    pos = _write(tmp_path / "pos.sxm", {"Current": (0, "A", -current)}, feedback_on=False, bias_V=-1.0)
    results = reconstruct_files([neg, pos], tmp_path / "out", fmt="npy", load=lambda: net)
    assert [r.status for r in results] == ["ok", "ok"]
    assert "taken as -I" in results[0].message and "opposite to the bias" in results[1].message
    a, b = (np.load(r.output) for r in results)
    assert _rms(a, b) <= 0.01
    assert np.corrcoef(a.ravel(), np.abs(current).ravel())[0, 1] > 0.5  # molecules bright, not dark


def test_overview_is_skipped_in_one_line_without_loading_the_network(tmp_path):
    big = np.random.default_rng(1).normal(2e-9, 1e-10, (256, 256)).astype(np.float32)
    src = _write(
        tmp_path / "overview.sxm", {"Z": (14, "m", big)}, feedback_on=True, pixels=256, lines=256, range_m=(2e-6, 2e-6)
    )

    def never():
        raise AssertionError("the network must not be loaded for an out-of-scope frame")

    [res] = reconstruct_files([src], tmp_path / "o.png", load=never)
    assert res.status == "skipped" and res.output is None and not (tmp_path / "o.png").exists()
    assert res.message.startswith("overview.sxm: ") and "\n" not in res.message
    assert "7.81 nm/px" in res.message and "overview" in res.message
    out = runner.invoke(app, ["reconstruct", str(src), "-o", str(tmp_path / "o.png")])
    assert out.exit_code == 1 and "skipped" in out.output and "Traceback" not in out.output


def test_folder_goes_on_past_bad_files_and_sxm_output_keeps_every_channel(tmp_path, frames, net):
    current, z = frames
    folder = tmp_path / "scans"
    folder.mkdir()
    _write(folder / "a.sxm", {"Current": (0, "A", current), "Z": (14, "m", z)}, feedback_on=False)
    (folder / "b.sxm").write_bytes((folder / "a.sxm").read_bytes()[:-100])  # truncated
    _write(folder / "c.sxm", {"Z": (14, "m", z)}, feedback_on=True, range_m=(4e-9, 0.0))
    (folder / "grid.3ds").write_text('Grid dim="2 x 2"\n')
    results = reconstruct_files([folder], tmp_path / "out", fmt="sxm", load=lambda: net)
    by_name = {r.source.name: r for r in results}
    assert set(by_name) == {"a.sxm", "b.sxm", "c.sxm", "grid.3ds"}  # a folder is read for its scans and grids
    assert by_name["grid.3ds"].status == "failed" and by_name["grid.3ds"].message.startswith("grid.3ds: ")
    assert by_name["a.sxm"].status == "ok"
    assert by_name["b.sxm"].status == "failed" and "truncated" in by_name["b.sxm"].message
    assert "c.sxm: SCAN_RANGE height is 0.0 m" in by_name["c.sxm"].message
    back = read_sxm(by_name["a.sxm"].output)
    assert set(back.channels) == {"Current", "Z", "STM-Net", "STM-Net residual", "STM-Net spread"}
    (folder / "point.dat").write_text("Experiment\tbias spectroscopy\n")
    [spectrum] = reconstruct_files([folder / "point.dat"], tmp_path / "g.npy", load=lambda: net)
    assert spectrum.status == "failed" and "point.dat: a point spectrum has no image" in spectrum.message


def test_impossible_devices_and_bad_options_are_one_line(tmp_path, frames):
    current, _ = frames
    src = _write(tmp_path / "a.sxm", {"Current": (0, "A", current)}, feedback_on=False)
    for device, expected in (("tpu", "not a device stm-live runs on"), ("cuda", "no GPU visible|CPU-only")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        out = runner.invoke(app, ["reconstruct", str(src), "--device", device, "-o", str(tmp_path / "x.npy")])
        assert out.exit_code == 2 and "Traceback" not in out.output
        assert len(out.output.strip().splitlines()) == 1
        import re

        assert re.search(expected, out.output)
    for command in (["evaluate"], ["train", "--steps", "1"], ["worker"]):  # refused before any load
        out = runner.invoke(app, [*command, "--device", "tpu"])
        assert out.exit_code == 2 and out.output.strip().startswith("error: --device 'tpu'")
    missing = runner.invoke(app, ["reconstruct", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "no such file or folder" in missing.output


def test_png_is_annotated_and_up_scans_are_drawn_as_the_instrument_shows_them(tmp_path, frames, net):
    from PIL import Image

    current, _ = frames
    down = _write(tmp_path / "down.sxm", {"Current": (0, "A", current)}, feedback_on=False)
    up = _write(tmp_path / "up.sxm", {"Current": (0, "A", current[::-1])}, feedback_on=False, direction="up")
    results = reconstruct_files([down, up], tmp_path / "png", load=lambda: net)
    pictures = [Image.open(r.output) for r in results]
    caption = pictures[0].text["Description"]
    assert "bias -1 V" in caption and "Current forward" in caption and "0.05 nm/px" in caption
    assert min(pictures[0].size) >= 256  # 80 px frames are shown large enough to read
    a, b = (np.asarray(p.convert("RGB"), dtype=float) for p in pictures)
    # the same scene scanned up is drawn like the down scan: the frame's top at the top
    # (raw panel pixel-equal below the captions; the reconstructions of the two data
    # orientations agree closely, and would be mirror images if up-scans were drawn as stored)
    quarter = a.shape[1] // 4  # raw | reconstruction | residual | view spread
    below_caption, raw, recon = slice(a.shape[0] // 4, None), slice(0, quarter - 20), slice(quarter, 2 * quarter - 20)
    np.testing.assert_array_equal(a[below_caption, raw], b[below_caption, raw])
    ra, rb = a[below_caption, recon].ravel(), b[below_caption, recon].ravel()
    assert np.corrcoef(ra, rb)[0, 1] > 0.95
    assert np.corrcoef(ra, b[below_caption, recon][::-1].ravel())[0, 1] < 0.9


def test_grid_maps_are_reconstructed_at_each_bias_and_match_the_s_wave_images(tmp_path, net):
    """A simulated dI/dV grid (.3ds) over pentacene under a CO tip: the map at each sweep
    point is reconstructed into a stack with its biases; at the HOMO and LUMO resonances the
    reconstruction is the s-wave image of that orbital, and the PNG shows the resonances."""
    from stm_live.io.spectroscopy import make_grid, write_3ds
    from stm_live.simulators import spectra
    from stm_live.simulators.imaging import s_wave_image

    scene = [Placement("pentacene", 0.0, 0.0, 10.0)]
    points, pitch, z = 48, 0.06, 0.4
    frame = ScanFrame(0.0, 0.0, points * pitch, points * pitch, pixels=points, lines=points)
    sweep = np.round(np.linspace(-3.0, 3.0, 61), 6)
    sim = spectra.simulate(scene, tip_preset("co"), frame, sweep, z_nm=z)
    x, y = frame.grid()
    grid = make_grid(
        {"LI Demod 1 X (A)": sim.didv_A_per_V, "Current (A)": sim.current_A},
        sweep=sweep,
        center_m=(0.0, 0.0),
        size_m=(points * pitch * 1e-9,) * 2,
        parameters={"X (m)": x * 1e-9, "Y (m)": y * 1e-9, "Z (m)": np.full(x.shape, z * 1e-9)},
    )
    path = write_3ds(tmp_path / "Grid Spectroscopy001.3ds", grid)

    (result,) = reconstruct_files([path], tmp_path / "out", load=lambda: net)
    assert result.status == "ok", result.message
    assert "LI Demod 1 X (A), 61 map(s) of 48x48 points" in result.message
    stack = np.load(result.output)
    assert stack["reconstruction"].shape == (61, points, points)
    np.testing.assert_allclose(stack["bias_V"], sweep, atol=1e-6)
    levels = spectra.level_energies("pentacene")
    for label in ("HOMO", "LUMO"):
        k = int(np.argmin(np.abs(sweep - levels[label])))
        truth = s_wave_image(
            [Placement("pentacene", 0.0, 0.0, 10.0, label)], frame, z_nm=z, bias_V=-1.0 if label == "HOMO" else 1.0
        )
        assert _rms(stack["reconstruction"][k], truth) < 0.1, label
        assert stack["agreement"][k] > 0.35, label
    png = result.output.with_suffix(".png")
    assert png.is_file()
    from PIL import Image

    caption = Image.open(png).text["Description"]
    assert "grid 48x48 points x 61 biases" in caption

    # chosen biases only; a bad channel is one line naming the channels there are
    (chosen,) = reconstruct_files([path], tmp_path / "chosen.png", load=lambda: net, biases=[levels["HOMO"]])
    assert chosen.status == "ok" and np.load(chosen.output)["reconstruction"].shape[0] == 1
    (bad,) = reconstruct_files([path], tmp_path / "bad", load=lambda: net, channel="Frequency shift")
    assert bad.status == "failed" and "Frequency shift" in bad.message and "\n" not in bad.message
