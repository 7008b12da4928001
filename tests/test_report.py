"""Annotated frame pictures: display orientation, scale bar, colour bars, physical aspect,
minimum size, caption, NaN rows (stm_live.report)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from stm_live import report
from stm_live.report import NAN_GREY, display_rows, frame_png_bytes, save_frame_png
from stm_live.simulators.imaging import Placement, ScanFrame, constant_height_image
from stm_live.simulators.tip import tip_preset

WHITE = (255, 255, 255)


def _decode(data: bytes) -> tuple[np.ndarray, dict]:
    with Image.open(io.BytesIO(data)) as png:
        png.load()
        return np.asarray(png.convert("RGB")), dict(png.text)


def _box(rgb: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return rgb[y0:y1, x0:x1]


def _scene(direction: str, *, lines: int = 24, pixels: int = 32) -> np.ndarray:
    """A pentacene HOMO under a CO tip at constant height, scanned in ``direction``; an
    off-centre molecule, so that up and down differ on the page if drawn wrongly."""
    frame = ScanFrame(0.0, 0.0, 3.2, 2.4, pixels=pixels, lines=lines, direction=direction)
    return constant_height_image(
        Placement("pentacene", x_nm=0.3, y_nm=0.5, orbital="HOMO"), frame, tip_preset("co"), z_nm=0.45, bias_V=-2.0
    )


def test_display_rows_flips_up_scans_only_and_leaves_the_data():
    a = np.arange(12.0).reshape(4, 3)
    before = a.copy()
    assert np.array_equal(display_rows(a, "down"), a)
    assert np.array_equal(display_rows(a, "up"), a[::-1])
    assert np.array_equal(a, before)
    rgb = np.zeros((4, 3, 3), np.uint8)
    rgb[0] = 7
    assert display_rows(rgb, "up")[-1, 0, 0] == 7
    with pytest.raises(ValueError, match="scan_direction"):
        display_rows(a, "left")


def test_up_scan_png_equals_down_scan_png_of_the_same_scene():
    down, up = _scene("down"), _scene("up")
    # the same scene: up-scan data are the down-scan's rows in reverse (row 0 = first line)
    np.testing.assert_allclose(up, down[::-1], rtol=1e-5, atol=0)
    assert not np.allclose(up, down, rtol=1e-3, atol=0), "scene is symmetric: the test could not fail"
    kwargs = dict(pixel_size_nm=0.1, units=["A"], caption="pentacene HOMO")
    png_down, lay_down = frame_png_bytes([("I", down)], scan_direction="down", **kwargs)
    png_up, lay_up = frame_png_bytes([("I", up)], scan_direction="up", **kwargs)
    rgb_down, rgb_up = _decode(png_down)[0], _decode(png_up)[0]
    box = lay_down.panels[0].image_box
    assert box == lay_up.panels[0].image_box
    np.testing.assert_array_equal(_box(rgb_up, box), _box(rgb_down, box))

    # the same array drawn as an up-scan is the down-scan picture flipped, pixel for pixel
    png_flip, lay_flip = frame_png_bytes([("I", down)], scan_direction="up", **kwargs)
    rgb_flip = _decode(png_flip)[0]
    np.testing.assert_array_equal(_box(rgb_flip, box), _box(rgb_down, box)[::-1])
    assert not np.array_equal(_box(rgb_flip, box), _box(rgb_down, box))


@pytest.mark.parametrize("lines, pixels, line_spacing_nm", [(256, 256, 0.15), (7, 30, 0.1), (64, 48, 0.4)])
def test_any_geometry_is_drawn_exactly_flipped_for_up_scans(lines, pixels, line_spacing_nm):
    """Resampling must not break the mirror symmetry (256 lines shown 384 high put display
    rows exactly between two data rows)."""
    image = np.random.default_rng(0).normal(size=(lines, pixels))
    kwargs = dict(pixel_size_nm=0.1, line_spacing_nm=line_spacing_nm)
    data_down, layout = frame_png_bytes([("I", image)], scan_direction="down", **kwargs)
    data_up = frame_png_bytes([("I", image)], scan_direction="up", **kwargs)[0]
    box = layout.panels[0].image_box
    np.testing.assert_array_equal(_box(_decode(data_up)[0], box), _box(_decode(data_down)[0], box)[::-1])


@pytest.mark.parametrize("pixel_size_nm", [0.05, 0.8])
def test_scale_bar_is_as_long_as_the_nm_it_claims(pixel_size_nm):
    pixels = 64
    image = np.add.outer(np.linspace(0, 1, 40), np.sin(np.linspace(0, 9, pixels)))
    data, layout = frame_png_bytes(
        [("Z", image)], pixel_size_nm=pixel_size_nm, cmap="viridis", units="m", caption="scale"
    )
    rgb, _ = _decode(data)
    width_nm = pixels * pixel_size_nm
    # a round length: 1, 2 or 5 x 10^k nm, a sizeable part of the frame
    mantissa = layout.scale_bar_nm / 10 ** np.floor(np.log10(layout.scale_bar_nm))
    assert np.isclose(mantissa, [1, 2, 5]).any(), layout.scale_bar_nm
    assert 0.1 * width_nm <= layout.scale_bar_nm <= 0.5 * width_nm
    assert layout.scale_bar_label == f"{layout.scale_bar_nm:g} nm"
    # measured on the decoded PNG: the image's width (viridis has no white) and the bar's
    x0, y0, x1, y1 = layout.panels[0].image_box
    row = rgb[(y0 + y1) // 2]
    image_px = int(np.argmax(np.all(row[x0:] == WHITE, axis=1)))  # first paper pixel after x0
    bar_row = rgb[(layout.scale_bar_box[1] + layout.scale_bar_box[3]) // 2]
    bar_px = int(np.argmax(np.any(bar_row[x0:] != (0, 0, 0), axis=1)))  # first non-black pixel
    assert np.all(bar_row[x0 : x0 + bar_px] == 0) and bar_px == layout.scale_bar_px
    px_per_nm = image_px / width_nm
    assert abs(bar_px - layout.scale_bar_nm * px_per_nm) <= 1.0, (bar_px, px_per_nm)


@pytest.mark.parametrize("line_spacing_nm", [0.2, 0.3, 0.05])
def test_non_square_pixels_are_drawn_with_their_physical_aspect(line_spacing_nm):
    lines, pixels, pixel_size_nm = 32, 64, 0.1
    image = np.random.default_rng(1).normal(size=(lines, pixels))
    data, layout = frame_png_bytes(
        [("I", image)], pixel_size_nm=pixel_size_nm, cmap="viridis", line_spacing_nm=line_spacing_nm
    )
    rgb, _ = _decode(data)
    x0, y0, x1, y1 = layout.panels[0].image_box
    column = rgb[y0:, (x0 + x1) // 2]
    shown_h = int(np.argmax(np.all(column == WHITE, axis=1)))
    row = rgb[(y0 + y1) // 2, x0:]
    shown_w = int(np.argmax(np.all(row == WHITE, axis=1)))
    physical = (lines * line_spacing_nm) / (pixels * pixel_size_nm)
    assert abs(shown_h - physical * shown_w) <= 1.0, (shown_h, shown_w, physical)
    assert (shown_h, shown_w) == layout.display_shape[0:2]


def test_small_frames_are_upscaled_and_huge_frames_bounded():
    tiny = np.random.default_rng(2).normal(size=(9, 16))
    layout = frame_png_bytes([("I", tiny)], pixel_size_nm=0.1)[1]
    h, w = layout.display_shape
    assert min(h, w) >= report.MIN_DISPLAY_PX and abs(w / h - 16 / 9) < 0.01
    # nearest-neighbour: each data row becomes one band of equal display rows
    rgb, _ = _decode(frame_png_bytes([("I", tiny)], pixel_size_nm=0.1)[0])
    shown = _box(rgb, layout.panels[0].image_box)
    bands = 1 + int(np.any(shown[1:] != shown[:-1], axis=(1, 2)).sum())
    assert bands == 9
    big = np.zeros((2500, 2500), np.float32)
    big[::7] = 1.0
    layout = frame_png_bytes([("Z", big)], pixel_size_nm=0.8)[1]
    assert max(layout.display_shape) == report.MAX_DISPLAY_PX


def test_caption_colour_bars_and_metadata(tmp_path):
    image = np.linspace(10e-12, 200e-12, 48 * 48).reshape(48, 48)
    caption = "frame0: Current forward, bias -1.50 V, scan up, 0.10 x 0.10 nm/px"
    layout = save_frame_png(
        tmp_path / "sub" / "f.png",
        [("raw", image), ("STM-Net", image**2)],
        pixel_size_nm=0.1,
        scan_direction="up",
        units=["A", "a.u."],
        caption=caption,
    )
    assert layout.path.is_file() and layout.caption == caption
    rgb, text = _decode(layout.path.read_bytes())
    assert rgb.shape[1::-1] == layout.size
    assert text["Description"] == caption
    meta = json.loads(text["stm-live"])
    assert meta["scan_direction"] == "up" and meta["scale_bar_nm"] == layout.scale_bar_nm
    # the caption is drawn above the panels, wrapped at "; " to the picture's width
    long = caption + "; " + "; ".join(f"note {k}: a line of text" for k in range(12))
    wrapped = frame_png_bytes([("raw", image)], pixel_size_nm=0.1, caption=long)[1]
    assert len(wrapped.caption_lines) > 1 and " ".join(wrapped.caption_lines) == long
    assert layout.caption_lines == (caption,)
    assert (rgb[: layout.panels[0].image_box[1] - 16] != 255).any()
    blank = frame_png_bytes([("raw", image)], pixel_size_nm=0.1)[1]
    assert blank.panels[0].image_box[1] < layout.panels[0].image_box[1]
    # colour bars: units with an SI prefix, top/bottom values as coloured (1-99 % percentiles)
    raw, recon = layout.panels
    top, bottom, unit = raw.labels
    assert unit == "pA" and abs(float(top) - 198.1) < 0.2 and abs(float(bottom) - 11.9) < 0.2
    assert recon.labels[2] == "a.u." and recon.vmax > recon.vmin
    for panel in layout.panels:
        bar = _box(rgb, panel.colorbar_box)
        assert tuple(bar[0, 2]) == WHITE and tuple(bar[-1, 2]) == (0, 0, 0)  # afmhot top / bottom
        assert panel.colorbar_box[3] - panel.colorbar_box[1] == panel.image_box[3] - panel.image_box[1]
    assert raw.colorbar_box[2] < recon.image_box[0], "panels overlap"


@pytest.mark.parametrize("direction", ["down", "up"])
def test_unscanned_rows_are_grey_at_the_end_of_the_scan(direction):
    image = np.random.default_rng(3).normal(size=(20, 20))
    image[15:] = np.nan  # a partial frame: the last 5 lines are not scanned yet
    data, layout = frame_png_bytes([("I", image)], pixel_size_nm=0.2, scan_direction=direction)
    shown = _box(_decode(data)[0], layout.panels[0].image_box)
    h = shown.shape[0]
    grey = np.all(shown == NAN_GREY, axis=(1, 2))
    # down-scan: the last lines are at the bottom; up-scan: at the top
    expected = np.arange(h) >= h * 15 / 20 if direction == "down" else np.arange(h) < h * 5 / 20
    np.testing.assert_array_equal(grey, expected)


def test_bad_input_is_refused_naming_the_field():
    a = np.zeros((8, 8))
    with pytest.raises(ValueError, match="at least one"):
        frame_png_bytes([], pixel_size_nm=0.1)
    with pytest.raises(ValueError, match="pixel_size_nm"):
        frame_png_bytes([("a", a)], pixel_size_nm=0.0)
    with pytest.raises(ValueError, match="line_spacing_nm"):
        frame_png_bytes([("a", a)], pixel_size_nm=0.1, line_spacing_nm=float("nan"))
    with pytest.raises(ValueError, match="'b' has shape"):
        frame_png_bytes([("a", a), ("b", np.zeros((4, 8)))], pixel_size_nm=0.1)
    with pytest.raises(ValueError, match="units has 1 entries for 2 panels"):
        frame_png_bytes([("a", a), ("b", a)], pixel_size_nm=0.1, units=["A"])
    with pytest.raises(ValueError, match="scan_direction"):
        frame_png_bytes([("a", a)], pixel_size_nm=0.1, scan_direction="sideways")
    with pytest.raises(ValueError, match="colormap"):
        frame_png_bytes([("a", a)], pixel_size_nm=0.1, cmap="jet")


def test_nearest_index_is_nearest_and_mirror_symmetric():
    for n_src in range(1, 41):
        for n_dst in range(1, 101):
            idx = report._nearest_index(n_src, n_dst)
            centre = (np.arange(n_dst) + 0.5) * n_src / n_dst - 0.5  # source coordinate
            assert np.all(np.abs(idx - centre) <= 0.5 + 1e-9), (n_src, n_dst)
            if not (n_src % 2 == 0 and n_dst % 2 == 1):  # _display_shape avoids that pairing
                np.testing.assert_array_equal(idx[::-1], n_src - 1 - idx, err_msg=f"{n_src} -> {n_dst}")


def test_flat_and_empty_panels_are_labelled_sensibly():
    flat = np.full((8, 8), -3.2e-9)
    empty = np.full((8, 8), np.nan)
    data, layout = frame_png_bytes([("flat Z", flat), ("nothing yet", empty)], pixel_size_nm=0.1, units=["m", "a.u."])
    flat_panel, empty_panel = layout.panels
    assert flat_panel.labels == ("-3.200", "-3.200", "nm")
    assert flat_panel.data_min == flat_panel.data_max == -3.2e-9
    assert empty_panel.labels[0] == "no data" and np.isnan(empty_panel.vmin)
    shown = _box(_decode(data)[0], empty_panel.image_box)
    assert np.all(shown == NAN_GREY)
    meta = json.loads(_decode(data)[1]["stm-live"])
    assert meta["panels"][1]["vmin"] is None and meta["panels"][0]["data_max"] == -3.2e-9
