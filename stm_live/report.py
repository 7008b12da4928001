"""Pictures for reports: colour-mapped images, PNG files and titled montages (Pillow only).

Colormaps are small lookup tables of anchor colours interpolated to 256 entries, so no
plotting library is needed.
"""

from __future__ import annotations

import io

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# anchor colours (position 0..1, RGB) of each colormap
_ANCHORS: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "gray": [(0.0, (0, 0, 0)), (1.0, (255, 255, 255))],
    # afmhot: r = 2x, g = 2x − 0.5, b = 2x − 1, clipped (the classic STM "gold")
    "afmhot": [(0.0, (0, 0, 0)), (0.25, (128, 0, 0)), (0.5, (255, 128, 0)), (0.75, (255, 255, 128)),
               (1.0, (255, 255, 255))],
    "viridis": [(0.0, (68, 1, 84)), (0.13, (71, 44, 122)), (0.25, (59, 81, 139)), (0.38, (44, 113, 142)),
                (0.5, (33, 144, 141)), (0.63, (39, 173, 129)), (0.75, (92, 200, 99)), (0.88, (170, 220, 50)),
                (1.0, (253, 231, 37))],
}
NAN_GREY = (128, 128, 128)


def _lut(cmap: str) -> np.ndarray:
    if cmap not in _ANCHORS:
        raise ValueError(f"unknown colormap {cmap!r}; valid: {', '.join(_ANCHORS)}")
    pos = np.array([p for p, _ in _ANCHORS[cmap]])
    rgb = np.array([c for _, c in _ANCHORS[cmap]], dtype=float)
    x = np.linspace(0, 1, 256)
    return np.stack([np.interp(x, pos, rgb[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)


def image_to_rgb(image, cmap: str = "afmhot") -> np.ndarray:
    """(H, W) array -> uint8 (H, W, 3), robust 1–99 % percentile scaling, NaN shown grey."""
    a = np.asarray(image, dtype=float)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    lut = _lut(cmap)
    finite = np.isfinite(a)
    out = np.empty(a.shape + (3,), np.uint8)
    out[:] = NAN_GREY
    if finite.any():
        lo, hi = np.percentile(a[finite], [1, 99])
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
        thumb = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST
                                            if scale >= 1 else Image.BILINEAR)
        col, row = k % ncols, k // ncols
        x0, y0 = col * tile, row * (tile + title_h)
        draw.text((x0 + 3, y0 + 2), str(title)[: tile // 6], fill=(0, 0, 0), font=font)
        sheet.paste(thumb, (x0 + (tile - thumb.width) // 2, y0 + title_h + (tile - thumb.height) // 2))
    return np.asarray(sheet)
