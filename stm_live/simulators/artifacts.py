"""Scan artifacts as pure functions: ``f(image, ..., rng) -> new image``.

Images are in internal orientation (row 0 = first scanned line), so "time" runs down the
rows and along each row. Amplitudes are in the image's own units (A or nm); pass a
``numpy.random.Generator`` or an int seed as ``rng``; inputs are never modified.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import map_coordinates


def _image(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    return a


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _amplitude(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value}")
    return float(value)


def white_noise(image, sigma: float, rng) -> np.ndarray:
    """Add Gaussian white noise of standard deviation ``sigma`` (preamplifier noise)."""
    a = _image(image)
    noise = _rng(rng).standard_normal(a.shape) * _amplitude("sigma", sigma)
    return (a + noise).astype(a.dtype)


def pink_noise(image, sigma: float, rng, *, exponent: float = 1.0) -> np.ndarray:
    """Add 1/f^exponent noise along the acquisition time axis (row-major), rms ``sigma``.

    Power spectrum S(f) ∝ f^−exponent of the pixel time series (flicker noise of the
    junction and feedback), synthesised by shaping white noise in Fourier space.
    """
    a = _image(image)
    n = a.size
    spectrum = np.fft.rfft(_rng(rng).standard_normal(n))
    freq = np.fft.rfftfreq(n)
    freq[0] = freq[1] if n > 1 else 1.0
    series = np.fft.irfft(spectrum * freq ** (-exponent / 2), n)
    series -= series.mean()
    std = series.std()
    series = series / std if std > 0 else series
    return (a + _amplitude("sigma", sigma) * series.reshape(a.shape)).astype(a.dtype)


def line_offsets(image, sigma: float, rng) -> np.ndarray:
    """Add a random constant offset to every scan line (feedback/tip jumps between lines)."""
    a = _image(image)
    offsets = _rng(rng).standard_normal((a.shape[0], 1)) * _amplitude("sigma", sigma)
    return (a + offsets).astype(a.dtype)


def drift(image, velocity_px_per_line: tuple[float, float], rng=None) -> np.ndarray:
    """Thermal drift: line r sees the sample shifted by r·(vx, vy) pixels (bilinear resample).

    ``rng`` is accepted for a uniform signature; drift is deterministic.
    """
    a = _image(image)
    vx, vy = (float(v) for v in velocity_px_per_line)
    if not (math.isfinite(vx) and math.isfinite(vy)):
        raise ValueError(f"velocity_px_per_line must be finite, got {velocity_px_per_line}")
    rows, cols = np.meshgrid(np.arange(a.shape[0], dtype=float), np.arange(a.shape[1], dtype=float), indexing="ij")
    coords = np.stack([rows + vy * rows, cols + vx * rows])
    return map_coordinates(a.astype(float), coords, order=1, mode="nearest").astype(a.dtype)


def creep(image, amplitude_px: float, tau_lines: float, rng=None) -> np.ndarray:
    """Piezo creep after a frame move: x shift A·exp(−r/τ) decaying over the first lines.

    Logarithmic-in-time creep is well approximated by one exponential over a frame.
    """
    a = _image(image)
    if not math.isfinite(amplitude_px):
        raise ValueError(f"amplitude_px must be finite, got {amplitude_px}")
    if not tau_lines > 0:
        raise ValueError(f"tau_lines must be positive, got {tau_lines}")
    rows, cols = np.meshgrid(np.arange(a.shape[0], dtype=float), np.arange(a.shape[1], dtype=float), indexing="ij")
    shift = amplitude_px * np.exp(-rows / tau_lines)
    coords = np.stack([rows, cols + shift])
    return map_coordinates(a.astype(float), coords, order=1, mode="nearest").astype(a.dtype)


def spikes(image, rate: float, amplitude: float, rng) -> np.ndarray:
    """Add spikes (current bursts) at a fraction ``rate`` of pixels, each 1–3 px long."""
    a = _image(image)
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be a fraction in [0, 1], got {rate}")
    gen = _rng(rng)
    out = np.array(a, copy=True)
    count = gen.binomial(a.size, rate)
    starts = gen.integers(0, a.size, count)
    lengths = gen.integers(1, 4, count)
    heights = _amplitude("amplitude", amplitude) * (0.5 + gen.random(count))
    flat = out.reshape(-1)
    for start, length, h in zip(starts, lengths, heights):
        flat[start : start + length] += h
    return out


def tip_change(before, after, line: int) -> np.ndarray:
    """Rows ``line`` onward come from ``after``: the tip changed while scanning that line."""
    b, c = _image(before), _image(after)
    if b.shape != c.shape:
        raise ValueError(f"before {b.shape} and after {c.shape} images differ in shape")
    if int(line) != line or not 0 <= line <= b.shape[0]:
        raise ValueError(f"line must be a row index in [0, {b.shape[0]}], got {line}")
    out = np.array(b, copy=True)
    out[int(line) :] = c[int(line) :]
    return out
