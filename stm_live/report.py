"""Pictures for reports: colour-mapped images, annotated frame PNGs, titled montages (Pillow only).

Colormaps are small lookup tables of anchor colours interpolated to 256 entries, so no
plotting library is needed. Every picture of a frame is drawn in display orientation
(:func:`display_rows`: the picture's top is the frame's top, as Nanonis and Gwyddion show
it); :func:`save_frame_png` adds a scale bar, colour bars, a caption and physical aspect.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

# anchor colours (position 0..1, RGB) of each colormap
_ANCHORS: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "gray": [(0.0, (0, 0, 0)), (1.0, (255, 255, 255))],
    # afmhot: r = 2x, g = 2x − 0.5, b = 2x − 1, clipped (the classic STM "gold")
    "afmhot": [
        (0.0, (0, 0, 0)),
        (0.25, (128, 0, 0)),
        (0.5, (255, 128, 0)),
        (0.75, (255, 255, 128)),
        (1.0, (255, 255, 255)),
    ],
    "viridis": [
        (0.0, (68, 1, 84)),
        (0.13, (71, 44, 122)),
        (0.25, (59, 81, 139)),
        (0.38, (44, 113, 142)),
        (0.5, (33, 144, 141)),
        (0.63, (39, 173, 129)),
        (0.75, (92, 200, 99)),
        (0.88, (170, 220, 50)),
        (1.0, (253, 231, 37)),
    ],
}
NAN_GREY = (128, 128, 128)


def _lut(cmap: str) -> np.ndarray:
    if cmap not in _ANCHORS:
        raise ValueError(f"unknown colormap {cmap!r}; valid: {', '.join(_ANCHORS)}")
    pos = np.array([p for p, _ in _ANCHORS[cmap]])
    rgb = np.array([c for _, c in _ANCHORS[cmap]], dtype=float)
    x = np.linspace(0, 1, 256)
    return np.stack([np.interp(x, pos, rgb[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)


def image_to_rgb(image, cmap: str = "afmhot", *, vrange: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) array -> uint8 (H, W, 3), NaN shown grey. Values are scaled from ``vrange``
    (lo, hi), by default the robust 1–99 % percentiles of the finite values."""
    a = np.asarray(image, dtype=float)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    lut = _lut(cmap)
    finite = np.isfinite(a)
    out = np.empty(a.shape + (3,), np.uint8)
    out[:] = NAN_GREY
    if finite.any():
        lo, hi = np.percentile(a[finite], [1, 99]) if vrange is None else vrange
        if hi <= lo:
            hi = lo + 1.0
        index = np.clip((a[finite] - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
        out[finite] = lut[index]
    return out


def png_bytes(image, *, cmap: str = "afmhot") -> bytes:
    """``image`` encoded as PNG: a 2-D array is colour-mapped, an (H, W, 3) uint8 array as is."""
    a = np.asarray(image)
    rgb = a if (a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8) else image_to_rgb(a, cmap)
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path, image, *, cmap: str = "afmhot") -> Path:
    """Write ``image`` as a PNG file (see :func:`png_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, cmap=cmap))
    return path


def montage(panels, *, ncols: int = 4, tile: int = 192, cmap: str = "afmhot") -> np.ndarray:
    """Titled tiles of ``(title, image)`` panels -> uint8 RGB sheet (images resized to ``tile``)."""
    panels = list(panels)
    if not panels:
        raise ValueError("montage needs at least one (title, image) panel")
    if ncols < 1 or tile < 16:
        raise ValueError(f"ncols must be >= 1 and tile >= 16, got ncols={ncols}, tile={tile}")
    font = ImageFont.load_default()
    title_h = 16
    nrows = -(-len(panels) // ncols)
    sheet = Image.new("RGB", (ncols * tile, nrows * (tile + title_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (title, image) in enumerate(panels):
        a = np.asarray(image)
        rgb = a if (a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8) else image_to_rgb(a, cmap)
        h, w = rgb.shape[:2]
        scale = tile / max(h, w)
        thumb = Image.fromarray(rgb).resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST if scale >= 1 else Image.BILINEAR
        )
        col, row = k % ncols, k // ncols
        x0, y0 = col * tile, row * (tile + title_h)
        draw.text((x0 + 3, y0 + 2), str(title)[: tile // 6], fill=(0, 0, 0), font=font)
        sheet.paste(thumb, (x0 + (tile - thumb.width) // 2, y0 + title_h + (tile - thumb.height) // 2))
    return np.asarray(sheet)


# ---------------------------------------------------------------- annotated frames

SCAN_DIRECTIONS = ("down", "up")
MIN_DISPLAY_PX = 256  # shorter side of a panel at least this (small frames are upscaled)
MAX_DISPLAY_PX = 2048  # longer side of a panel at most this (bounded memory for any frame)
_MARGIN = 10
_GAP = 14  # between a panel's colour bar labels and the next panel
_BAR_W = 14  # colour bar width
_SCALE_BAR_H = 5  # scale bar thickness
_FONT_SIZE = 13
_INK = (0, 0, 0)
_PAPER = (255, 255, 255)
# SI units that take a prefix in labels (a value in A is shown in pA, nA ...)
_SI_UNITS = {"A", "V", "m", "S", "s", "Hz", "N", "W", "F", "Ohm"}
_PREFIXES = (
    (1e-15, "f"),
    (1e-12, "p"),
    (1e-9, "n"),
    (1e-6, "u"),
    (1e-3, "m"),
    (1.0, ""),
    (1e3, "k"),
    (1e6, "M"),
    (1e9, "G"),
)
# The bundled font has ASCII glyphs only; common symbols are spelled out.
_ASCII = {
    "µ": "u",
    "μ": "u",
    "ψ": "psi",
    "Ψ": "Psi",
    "²": "^2",
    "³": "^3",
    "×": "x",
    "Å": "A",
    "−": "-",
    "±": "+/-",
    "°": " deg",
    "Ω": "Ohm",
    "κ": "kappa",
    "·": ".",
    "–": "-",
    "—": "-",
}


def display_rows(image, scan_direction: str = "down") -> np.ndarray:
    """Rows of ``image`` in display order: the picture's top is the frame's top.

    Data keep row 0 = first scanned line (docs/interfaces.md). A down-scan starts at the
    frame's top edge, so it is shown as is; an up-scan starts at the bottom edge and is
    flipped, as Nanonis and Gwyddion show it. For display only: returns a view, the data
    are not changed. Works on (lines, pixels) and (lines, pixels, 3) arrays.
    """
    if scan_direction not in SCAN_DIRECTIONS:
        raise ValueError(f"scan_direction must be 'down' or 'up', got {scan_direction!r}")
    a = np.asarray(image)
    if a.ndim < 2:
        raise ValueError(f"image must have at least 2 dimensions (lines, pixels), got shape {a.shape}")
    return a[::-1] if scan_direction == "up" else a


@dataclass(frozen=True)
class PanelLayout:
    """Where one panel went in an annotated frame picture (pixel boxes are x0, y0, x1, y1
    with x1/y1 exclusive, in the PNG's coordinates)."""

    title: str
    units: str
    cmap: str
    image_box: tuple[int, int, int, int]
    colorbar_box: tuple[int, int, int, int]
    vmin: float  # data value at the colour bar's bottom (1 % percentile; below: clipped), NaN if no data
    vmax: float  # data value at the colour bar's top (99 % percentile)
    data_min: float  # the panel's finite extremes (NaN if no data)
    data_max: float
    labels: tuple[str, str, str]  # colour bar: top value, bottom value, units


@dataclass(frozen=True)
class FrameLayout:
    """The numbers an annotated frame picture was drawn with (returned for callers and tests)."""

    size: tuple[int, int]  # PNG (width, height)
    panels: tuple[PanelLayout, ...]
    pixel_size_nm: float  # fast-axis pitch of the data
    line_spacing_nm: float  # slow-axis pitch of the data
    scan_direction: str
    display_shape: tuple[int, int]  # (height, width) of each panel's image in the PNG
    px_per_nm: tuple[float, float]  # display pixels per nm along x and y (equal to < 1 px per side)
    scale_bar_nm: float
    scale_bar_px: int
    scale_bar_box: tuple[int, int, int, int]
    scale_bar_label: str
    caption: str
    caption_lines: tuple[str, ...]  # as drawn (ASCII, wrapped to the picture's width)
    path: Path | None = None


def _ascii_text(text: str) -> str:
    text = "".join(_ASCII.get(ch, ch) for ch in str(text))
    return unicodedata.normalize("NFKD", text).encode("ascii", "replace").decode("ascii")


def _font():
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_w(font, text: str) -> int:
    return int(math.ceil(font.getlength(text)))


def _nearest_index(n_src: int, n_dst: int) -> np.ndarray:
    """Source index of each of ``n_dst`` display pixels (nearest centre).

    Ties go toward the middle, which makes the map mirror-symmetric
    (index[n_dst-1-k] == n_src-1-index[k]), so a flipped frame draws exactly flipped.
    Integer arithmetic: the source coordinate of display pixel y is ((2y+1)·n_src − n_dst)/(2·n_dst).
    """
    k = 2 * np.arange(n_dst, dtype=np.int64) + 1
    lower = (k * n_src) // (2 * n_dst)  # floor(t + 1/2)
    upper = -((2 * n_dst - k * n_src) // (2 * n_dst))  # ceil(t - 1/2)
    return np.clip(np.where(k <= n_dst, lower, upper), 0, n_src - 1)


def _display_shape(
    lines: int, pixels: int, pixel_size_nm: float, line_spacing_nm: float, min_px: int, max_px: int
) -> tuple[int, int]:
    """(height, width) in display pixels: the same nm per display pixel on both axes; the
    finer axis at least at its native sampling; shorter side >= min_px, longer <= max_px."""
    width_nm, height_nm = pixels * pixel_size_nm, lines * line_spacing_nm
    scale = 1.0 / min(pixel_size_nm, line_spacing_nm)  # display px per nm
    short, long = min(width_nm, height_nm), max(width_nm, height_nm)
    if short * scale < min_px:
        scale = min_px / short
    if long * scale > max_px:
        scale = max_px / long
    height, width = max(1, round(height_nm * scale)), max(1, round(width_nm * scale))
    if lines % 2 == 0 and height % 2 == 1:
        # an odd display height of an even number of lines puts the middle display row
        # exactly between two lines: no choice would draw an up-scan exactly flipped
        height += 1 if height < max_px else -1
    return height, width


def _scale_bar_nm(width_nm: float) -> float:
    """A round length (1, 2 or 5 × 10^k nm) of about a fifth to a half of the frame width."""
    target = width_nm * 0.3
    exponent = math.floor(math.log10(target))
    best = 10.0**exponent
    for mantissa in (1.0, 2.0, 5.0, 10.0):
        if mantissa * 10.0**exponent <= target * 1.5:
            best = mantissa * 10.0**exponent
    return best


def _format_nm(value_nm: float) -> str:
    return f"{value_nm:.{max(0, -math.floor(math.log10(value_nm)))}f} nm"


def _value_labels(units: str, lo: float, hi: float) -> tuple[str, str, str]:
    """Colour bar labels (top, bottom, units): SI units get one prefix for both values, and
    enough decimals that top and bottom differ."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no data", "", _ascii_text(units)
    unit = _ascii_text(units)
    factor, prefix = 1.0, ""
    if units in _SI_UNITS:
        magnitude = max(abs(lo), abs(hi))
        for f, p in _PREFIXES:
            if magnitude >= f:
                factor, prefix = f, p
        if magnitude < _PREFIXES[0][0]:
            factor, prefix = _PREFIXES[0]
        unit = prefix + unit
        span = (hi - lo) / factor
        decimals = 3 if span <= 0 else int(np.clip(math.ceil(-math.log10(span)) + 1, 0, 6))
        return f"{hi / factor:.{decimals}f}", f"{lo / factor:.{decimals}f}", unit
    return f"{hi:.3g}", f"{lo:.3g}", unit


def _colour_range(a: np.ndarray) -> tuple[float, float, float, float]:
    """(1 % and 99 % percentiles, min, max) of the finite values; the percentiles are what
    the colours span (as :func:`image_to_rgb`). All NaN when nothing is finite."""
    values = a[np.isfinite(a)]
    if values.size == 0:
        return (float("nan"),) * 4
    lo, hi = np.percentile(values, [1, 99])
    # lo == hi for a flat image: drawn in the colormap's bottom colour
    return float(lo), float(hi), float(values.min()), float(values.max())


def _wrap_words(font, text: str, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and _text_w(font, trial) > width:
            out.append(line)
            line = word
        else:
            line = trial
    return [*out, line]


def _wrap(font, text: str, width: int) -> list[str]:
    """Lines of at most ``width`` pixels, broken after "; " where possible, else between words."""
    out: list[str] = []
    for paragraph in text.split("\n"):
        parts = paragraph.split("; ")
        parts = [part + ";" for part in parts[:-1]] + parts[-1:]
        line = ""
        for part in parts:
            trial = f"{line} {part}" if line else part
            if line and _text_w(font, trial) > width:
                out.extend(_wrap_words(font, line, width))
                line = part
            else:
                line = trial
        out.extend(_wrap_words(font, line, width))
    return out


def render_frame(
    panels,
    *,
    pixel_size_nm: float,
    line_spacing_nm: float | None = None,
    scan_direction: str = "down",
    units=None,
    caption: str = "",
    cmap="afmhot",
    min_display_px: int = MIN_DISPLAY_PX,
    max_display_px: int = MAX_DISPLAY_PX,
) -> tuple[np.ndarray, FrameLayout]:
    """Annotated picture of one frame's panels; see :func:`save_frame_png`.
    Returns (uint8 RGB array, layout)."""
    panels = [(str(t), np.asarray(a)) for t, a in panels]
    if not panels:
        raise ValueError("save_frame_png needs at least one (title, image) panel")
    shape = panels[0][1].shape
    for title, a in panels:
        if a.ndim != 2 or a.size == 0:
            raise ValueError(f"panel {title!r}: image must be a non-empty 2-D array, got shape {a.shape}")
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise ValueError(f"panel {title!r}: image must be real numbers, got dtype {a.dtype}")
        if a.shape != shape:
            raise ValueError(
                f"panel {title!r} has shape {a.shape}, the first panel {shape}; all panels must show the same frame"
            )
    pixel_size_nm = float(pixel_size_nm)
    line_spacing_nm = pixel_size_nm if line_spacing_nm is None else float(line_spacing_nm)
    for name, value in (("pixel_size_nm", pixel_size_nm), ("line_spacing_nm", line_spacing_nm)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if scan_direction not in SCAN_DIRECTIONS:
        raise ValueError(f"scan_direction must be 'down' or 'up', got {scan_direction!r}")
    n = len(panels)
    units = [""] * n if units is None else [str(u) for u in ([units] if isinstance(units, str) else units)]
    cmaps = [cmap] * n if isinstance(cmap, str) else list(cmap)
    for name, values in (("units", units), ("cmap", cmaps)):
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} panels")
    for c in cmaps:
        _lut(c)  # unknown colormap: fail before drawing
    if int(min_display_px) < 1 or int(max_display_px) < int(min_display_px):
        raise ValueError(f"need 1 <= min_display_px <= max_display_px, got {min_display_px}, {max_display_px}")

    lines, pixels = shape
    dh, dw = _display_shape(lines, pixels, pixel_size_nm, line_spacing_nm, int(min_display_px), int(max_display_px))
    rows, cols = _nearest_index(lines, dh), _nearest_index(pixels, dw)
    width_nm, height_nm = pixels * pixel_size_nm, lines * line_spacing_nm
    px_per_nm = (dw / width_nm, dh / height_nm)
    bar_nm = _scale_bar_nm(width_nm)
    bar_px = max(1, round(bar_nm * px_per_nm[0]))
    bar_label = _format_nm(bar_nm)

    font = _font()
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line_h = ascent + descent + 2
    ranges = [_colour_range(a) for _, a in panels]
    labels = [_value_labels(u, lo, hi) for u, (lo, hi, _, _) in zip(units, ranges)]
    label_w = [max(_text_w(font, s) for s in lab) for lab in labels]
    block_w = [dw + 6 + _BAR_W + 4 + lw for lw in label_w]
    content_w = sum(block_w) + _GAP * (n - 1)
    caption_text = _ascii_text(caption)
    text_w = max(content_w, 420)
    caption_lines = _wrap(font, caption_text, text_w) if caption_text else []
    width = 2 * _MARGIN + max(content_w, max([_text_w(font, s) for s in caption_lines], default=0))
    top = _MARGIN + line_h * len(caption_lines) + (4 if caption_lines else 0)
    image_top = top + line_h
    bar_top = image_top + dh + 8
    height = bar_top + _SCALE_BAR_H + 4 + line_h + _MARGIN

    canvas = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(caption_lines):
        draw.text((_MARGIN, _MARGIN + k * line_h), text, fill=_INK, font=font)
    layouts = []
    x = _MARGIN
    for (title, a), unit, c, (lo, hi, dmin, dmax), lab, bw in zip(panels, units, cmaps, ranges, labels, block_w):
        # resample first, then colour: memory scales with the picture, not the frame
        shown = display_rows(a, scan_direction)[rows][:, cols].astype(np.float32)
        canvas.paste(Image.fromarray(image_to_rgb(shown, c, vrange=(lo, hi))), (x, image_top))
        title_text = _ascii_text(title)
        while title_text and _text_w(font, title_text) > bw:
            title_text = title_text[:-1]
        draw.text((x, top), title_text, fill=_INK, font=font)
        # colour bar: top = vmax, bottom = vmin, the panel's height
        cx = x + dw + 6
        ramp = _lut(c)[np.linspace(255, 0, dh).round().astype(int)]
        canvas.paste(
            Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None, :], _BAR_W, axis=1))), (cx, image_top)
        )
        draw.rectangle([cx - 1, image_top - 1, cx + _BAR_W, image_top + dh], outline=_INK)
        tx = cx + _BAR_W + 4
        draw.text((tx, image_top), lab[0], fill=_INK, font=font)
        draw.text((tx, image_top + dh - line_h + 2), lab[1], fill=_INK, font=font)
        if dh >= 3 * line_h:
            draw.text((tx, image_top + (dh - line_h) // 2), lab[2], fill=_INK, font=font)
        layouts.append(
            PanelLayout(
                title=str(title),
                units=unit,
                cmap=c,
                image_box=(x, image_top, x + dw, image_top + dh),
                colorbar_box=(cx, image_top, cx + _BAR_W, image_top + dh),
                vmin=lo,
                vmax=hi,
                labels=lab,
                data_min=dmin,
                data_max=dmax,
            )
        )
        x += bw + _GAP
    # scale bar under the first panel, in the paper strip (not over the data)
    x0 = layouts[0].image_box[0]
    draw.rectangle([x0, bar_top, x0 + bar_px - 1, bar_top + _SCALE_BAR_H - 1], fill=_INK)
    draw.text((x0, bar_top + _SCALE_BAR_H + 3), bar_label, fill=_INK, font=font)
    layout = FrameLayout(
        size=(width, height),
        panels=tuple(layouts),
        pixel_size_nm=pixel_size_nm,
        line_spacing_nm=line_spacing_nm,
        scan_direction=scan_direction,
        display_shape=(dh, dw),
        px_per_nm=px_per_nm,
        scale_bar_nm=bar_nm,
        scale_bar_px=bar_px,
        scale_bar_box=(x0, bar_top, x0 + bar_px, bar_top + _SCALE_BAR_H),
        scale_bar_label=bar_label,
        caption=str(caption),
        caption_lines=tuple(caption_lines),
    )
    return np.asarray(canvas), layout


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def frame_png_bytes(panels, **kwargs) -> tuple[bytes, FrameLayout]:
    """:func:`render_frame` encoded as PNG; the caption and the layout numbers are also
    stored as PNG text chunks ("Description", "stm-live")."""
    rgb, layout = render_frame(panels, **kwargs)
    info = PngInfo()
    info.add_itxt("Description", layout.caption)
    info.add_text("Software", "stm-live")
    meta = {
        "pixel_size_nm": layout.pixel_size_nm,
        "line_spacing_nm": layout.line_spacing_nm,
        "scan_direction": layout.scan_direction,
        "scale_bar_nm": layout.scale_bar_nm,
        "scale_bar_px": layout.scale_bar_px,
        "px_per_nm": list(layout.px_per_nm),
        "panels": [
            {
                "title": p.title,
                "units": p.units,
                "vmin": _finite_or_none(p.vmin),
                "vmax": _finite_or_none(p.vmax),
                "data_min": _finite_or_none(p.data_min),
                "data_max": _finite_or_none(p.data_max),
            }
            for p in layout.panels
        ],
    }
    info.add_itxt("stm-live", json.dumps(meta))
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue(), layout


def save_frame_png(
    path,
    panels,
    *,
    pixel_size_nm: float,
    line_spacing_nm: float | None = None,
    scan_direction: str = "down",
    units=None,
    caption: str = "",
    cmap="afmhot",
    min_display_px: int = MIN_DISPLAY_PX,
    max_display_px: int = MAX_DISPLAY_PX,
) -> FrameLayout:
    """Write one frame's panels side by side as an annotated PNG; return the layout used.

    Parameters
    ----------
    path : path
        PNG file to write (folders are created).
    panels : list of (title, image)
        Images of the same frame, each ``(lines, pixels)`` in data orientation (row 0 = first
        scanned line); NaN (unscanned) is drawn grey.
    pixel_size_nm : float
        Fast-axis pitch (frame width / pixels).
    line_spacing_nm : float, optional
        Slow-axis pitch (frame height / lines); default ``pixel_size_nm``. Rows are resampled
        so that a nm has the same length on both axes.
    scan_direction : {"down", "up"}
        Up-scans are flipped for display (:func:`display_rows`).
    units : str or list of str, optional
        Units per panel (e.g. ``["m", "a.u."]``); SI units get a prefix on the colour bar.
    caption : str
        Caption line(s) above the panels (channel, bias, direction, pixel size ...); also
        stored in the PNG's "Description" text chunk.
    cmap : str or list of str
        Colormap for all panels or per panel ("afmhot", "gray", "viridis").
    min_display_px, max_display_px : int
        Shorter panel side at least / longer side at most this many pixels (nearest-neighbour).

    Each panel gets a colour bar labelled with its units and the values at its ends (the
    1–99 % percentiles, as coloured); a scale bar of a round length in nm is drawn under the
    first panel.
    """
    data, layout = frame_png_bytes(
        panels,
        pixel_size_nm=pixel_size_nm,
        line_spacing_nm=line_spacing_nm,
        scan_direction=scan_direction,
        units=units,
        caption=caption,
        cmap=cmap,
        min_display_px=min_display_px,
        max_display_px=max_display_px,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return dataclasses.replace(layout, path=path)
