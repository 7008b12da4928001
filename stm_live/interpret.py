"""What a recorded frame means to the networks: channel, sign, levelling, geometry, scope.

One place decides it, and every reader of frames goes through it: ``stm-live reconstruct``,
``stm-live classify``, replay, live reconstruction, the tip monitor and the viewer.

- **Channel.** On a constant-current scan (Z controller on) the image is Z; Current is then
  only the feedback error. On a constant-height scan it is Current. A file that does not
  record the controller state is judged by its data: a Z channel flat to within
  :data:`FLAT_Z_M` was recorded at constant height. A channel the user names wins (a lock-in
  dI/dV map, say).
- **Sign.** Orbital images are non-negative. The tunnelling current takes the sign of the bias
  (negative at the negative bias of occupied orbitals), so a current-like channel is taken as
  |I|: negated when its values are negative in sum. The note says so, and says when the sign
  disagrees with the bias (an inverting preamplifier).
- **Levelling.** A Z map is plane-levelled before Z -> current (I ∝ exp(2κz)): a sample tilt of
  a few tenths of a nm across the frame otherwise leaves all but the highest corner black.
- **Geometry.** Pixel pitch along the fast axis and line spacing along the slow axis are kept
  apart (non-square pixels); row 0 is the first scanned line (docs/interfaces.md).
- **Scope.** The sizes and pitches where each network applies; outside them the caller skips
  the network with :attr:`Scope.reason` (one line saying why and what to use instead), so no
  frame a Nanonis can record leads to an unbounded allocation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from stm_live.simulators.vacuum import current_from_z

__all__ = [
    "NetworkInput",
    "Scope",
    "choose_channel",
    "classifier_scope",
    "from_block",
    "from_scan",
    "network_input",
    "plane_level",
    "scan_pitch",
    "stmnet_scope",
]

CONSTANT_CURRENT, CONSTANT_HEIGHT, SIGNAL = "constant_current", "constant_height", "signal"
# A Z channel whose 1-99 % spread is below this was recorded with the Z controller off.
FLAT_Z_M = 5e-12

# STM-Net: trained at 0.05 nm/px (models/training.py takes it from here). Coarser than 3x that, the nodal planes
# the network separates (~0.1-0.2 nm apart) are not sampled; larger than 1024 network pixels
# per side (51 nm), a frame is an overview, not an orbital image.
STMNET_PIXEL_NM = 0.05
STMNET_MAX_PITCH_NM = 0.15
STMNET_MAX_SIDE_PX = 1024
STMNET_MIN_SIDE_NM = 0.8
# Tip classifier: trained at 0.08-0.15 nm/px on 5 nm frames (models/tipstate.py).
CLASSIFIER_PIXEL_NM = 0.08
CLASSIFIER_MAX_PITCH_NM = 0.15
CLASSIFIER_MAX_SIDE_PX = 512
MIN_LINES = 3


@dataclass(frozen=True)
class Scope:
    """Whether a network applies to a frame; ``reason`` says why not (one line)."""

    ok: bool
    reason: str = ""


@dataclass
class NetworkInput:
    """A frame as the networks take it, with what was done to get there."""

    image: np.ndarray  # float32 (lines, pixels), current-like, non-negative contrast; NaN unscanned
    channel: str
    direction: str  # data direction used: "forward" | "backward"
    mode: str  # CONSTANT_CURRENT | CONSTANT_HEIGHT | SIGNAL
    pixel_size_nm: float
    line_spacing_nm: float
    scan_direction: str = "down"  # "up" | "down": where row 0 (the first line) lies
    bias_V: float = float("nan")
    unit: str = ""
    notes: list[str] = field(default_factory=list)
    scope: Scope = Scope(True)

    @property
    def width_nm(self) -> float:
        return self.image.shape[1] * self.pixel_size_nm

    @property
    def height_nm(self) -> float:
        return self.image.shape[0] * self.line_spacing_nm

    def describe(self) -> str:
        """One line: channel, geometry and what was done."""
        geometry = (
            f"{self.image.shape[1]}x{self.image.shape[0]} px, {self.width_nm:.3g} x "
            f"{self.height_nm:.3g} nm, {_pitch(self.pixel_size_nm, self.line_spacing_nm)}"
        )
        return f"{self.channel} {self.direction} ({geometry}); " + "; ".join(self.notes)

    def caption(self, name: str) -> str:
        """A picture's caption: what the frame is and how it was read."""
        bias = f"bias {self.bias_V:+.3g} V; " if math.isfinite(self.bias_V) else ""
        return f"{name}; {bias}{self.mode.replace('_', ' ')}; scan {self.scan_direction}; " + self.describe()


# ----------------------------------------------------------------------------- channel
def _base(name: str) -> str:
    """'Z (m)', 'LI_Demod_1_X' -> 'z', 'li demod 1 x': unit dropped, underscores as spaces."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", name).replace("_", " ").strip().lower()


def _is_z(name: str, unit: str) -> bool:
    return _base(name) == "z"


def _is_current(name: str, unit: str) -> bool:
    return _base(name) == "current" or (_base(name).startswith("current") and unit == "A")


def _mode_of(name: str, unit: str) -> str:
    if _is_z(name, unit):
        return CONSTANT_CURRENT
    if _is_current(name, unit):
        return CONSTANT_HEIGHT
    return SIGNAL


def choose_channel(
    names: Sequence[str],
    *,
    feedback_on: bool | None,
    units: Mapping[str, str] | None = None,
    requested: str | None = None,
    z_data: np.ndarray | None = None,
) -> tuple[str, str, str]:
    """The channel that holds the orbital image: ``(name, mode, why)``.

    ``requested`` (case and unit suffix ignored) wins; otherwise Z when the Z controller was
    on, Current when it was off, and when the file does not say, Current if the Z data
    (``z_data``) are flat to within :data:`FLAT_Z_M`, else Z.
    """
    units = dict(units or {})
    names = list(names)
    if not names:
        raise ValueError("the frame has no channels")
    if requested is not None:
        want = _base(requested)
        pick = next((n for n in names if _base(n) == want), None)
        if pick is None:
            raise ValueError(f"channel {requested!r} not in the frame; channels: {', '.join(names)}")
        return pick, _mode_of(pick, units.get(pick, "")), "as asked"
    z = next((n for n in names if _is_z(n, units.get(n, ""))), None)
    current = next((n for n in names if _is_current(n, units.get(n, ""))), None)
    if z is None and current is None:
        raise ValueError(f"no Current or Z channel; channels: {', '.join(names)}; name one with --channel")
    # The other channel is no image in each mode (the feedback error; a flat Z): refuse it
    # rather than return noise, unless the user names it.
    if feedback_on is True:
        if z is None:
            raise ValueError(
                f"constant-current frame has no 'Z' channel (Current is only the feedback "
                f"error there); channels: {', '.join(names)}; name one to use it anyway"
            )
        return z, CONSTANT_CURRENT, "Z controller on: Z is the image (Current is the feedback error)"
    if feedback_on is False:
        if current is None:
            raise ValueError(
                f"constant-height frame has no 'Current' channel (Z is flat there); "
                f"channels: {', '.join(names)}; name one to use it anyway"
            )
        return current, CONSTANT_HEIGHT, "Z controller off: constant height, Current"
    if z is not None and current is not None and z_data is not None:
        finite = np.asarray(z_data, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size:
            lo, hi = np.percentile(finite, [1, 99])
            if hi - lo < FLAT_Z_M:
                return (
                    current,
                    CONSTANT_HEIGHT,
                    (
                        f"Z controller state not recorded; Z flat within "
                        f"{(hi - lo) * 1e12:.2g} pm: constant height, Current"
                    ),
                )
            return (
                z,
                CONSTANT_CURRENT,
                (f"Z controller state not recorded; Z varies by {(hi - lo) * 1e12:.3g} pm: constant current, Z"),
            )
    if z is not None:
        return z, CONSTANT_CURRENT, "Z controller state not recorded: Z"
    return current, CONSTANT_HEIGHT, "Z controller state not recorded: Current"


# ----------------------------------------------------------------------------- physics
def plane_level(z: np.ndarray, *, iterations: int = 3, keep: float = 60.0) -> np.ndarray:
    """``z`` minus its background plane a + b·x + c·y, fitted by least squares to the lower
    ``keep`` % of residuals each iteration (molecules and adsorbates stand above the plane)."""
    z = np.asarray(z, dtype=np.float64)
    rows, cols = np.nonzero(np.isfinite(z))
    if rows.size < 3:
        return z.copy()
    step = max(1, rows.size // 65536)  # a subsample fixes three numbers just as well
    r, c = rows[::step].astype(np.float64), cols[::step].astype(np.float64)
    v = z[rows[::step], cols[::step]]
    design = np.stack([np.ones_like(r), c, r], axis=1)
    use = np.ones(v.size, dtype=bool)
    coef = np.zeros(3)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(design[use], v[use], rcond=None)
        residual = v - design @ coef
        use = residual <= np.percentile(residual, keep)
        if use.sum() < 3:
            break
    yy, xx = np.mgrid[0 : z.shape[0], 0 : z.shape[1]]
    return z - (coef[0] + coef[1] * xx + coef[2] * yy)


def network_input(
    raw: np.ndarray,
    *,
    channel: str,
    mode: str,
    unit: str = "",
    bias_V: float = float("nan"),
    pixel_size_nm: float,
    line_spacing_nm: float | None = None,
    direction: str = "forward",
    scan_direction: str = "down",
    notes: Sequence[str] = (),
) -> NetworkInput:
    """One channel's raw data -> the current-like, non-negative image the networks take.

    Z (metres): plane-levelled, then ``current_from_z`` (I ∝ exp(2κz), Chen 1993). Current
    and other signals: taken as |I| by the sign of their sum (orbital images are
    non-negative; the current has the sign of the bias).
    """
    image = np.asarray(raw, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"{channel}: image must be 2-D (lines, pixels), got shape {image.shape}")
    line_spacing_nm = pixel_size_nm if line_spacing_nm is None else line_spacing_nm
    for what, value in (("pixel size", pixel_size_nm), ("line spacing", line_spacing_nm)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{channel}: {what} must be a positive number of nm, got {value!r}")
    notes = list(notes)
    finite = np.isfinite(image)
    geometry = dict(
        channel=channel,
        direction=direction,
        mode=mode,
        unit=unit,
        pixel_size_nm=float(pixel_size_nm),
        line_spacing_nm=float(line_spacing_nm),
        scan_direction=scan_direction,
        bias_V=float(bias_V),
    )
    if not finite.any():
        return NetworkInput(
            image=np.full(image.shape, np.nan, np.float32),
            notes=notes,
            scope=Scope(False, f"{channel}: no scanned line yet"),
            **geometry,
        )
    if mode == CONSTANT_CURRENT:
        out = current_from_z(plane_level(image), unit="nm" if unit.strip() == "nm" else "m")
        notes.append("Z plane-levelled, converted to current (I ∝ exp(2κz))")
    else:
        total = float(np.sum(image[finite]))
        out = image.astype(np.float32)
        if total < 0:
            out = -out
            notes.append("values negative: taken as -" + ("I" if mode == CONSTANT_HEIGHT else channel))
        # the current has the bias's sign; a lock-in's dI/dV is positive at either sign
        if mode == CONSTANT_HEIGHT and math.isfinite(bias_V) and bias_V != 0 and (total < 0) != (bias_V < 0):
            notes.append(f"sign opposite to the bias ({bias_V:+.3g} V): inverting preamplifier?")
    out = np.asarray(out, dtype=np.float32)
    out[~finite] = np.nan
    return NetworkInput(
        image=out, notes=notes, scope=stmnet_scope(out.shape, pixel_size_nm, line_spacing_nm), **geometry
    )


# ----------------------------------------------------------------------------- scope
def _pitch(pixel_nm: float, line_nm: float) -> str:
    if abs(pixel_nm - line_nm) <= 1e-6 * max(pixel_nm, line_nm):
        return f"{pixel_nm:.3g} nm/px"
    return f"{pixel_nm:.3g} x {line_nm:.3g} nm/px (non-square)"


def _scope(
    shape,
    pixel_nm: float,
    line_nm: float,
    *,
    network: str,
    trained_nm: float,
    max_pitch_nm: float,
    max_side_px: int,
    min_side_nm: float,
) -> Scope:
    lines, pixels = int(shape[0]), int(shape[1])
    width, height = pixels * pixel_nm, lines * line_nm
    coarsest = max(pixel_nm, line_nm)
    if coarsest > max_pitch_nm:
        return Scope(
            False,
            f"{_pitch(pixel_nm, line_nm)} is coarser than {network} resolves "
            f"(<= {max_pitch_nm} nm/px; trained at {trained_nm}): an overview, not an "
            "orbital image; view it as it is (e.g. Gwyddion) or scan one molecule finer",
        )
    side_px = round(max(width, height) / trained_nm)  # as the network resamples it
    if side_px > max_side_px:
        return Scope(
            False,
            f"frame {width:.3g} x {height:.3g} nm is far larger than a molecule "
            f"({network} takes up to {max_side_px * trained_nm:.3g} nm); scan or crop "
            "a smaller frame around the molecules",
        )
    if min(width, height) < min_side_nm or min(lines, pixels) < 4:
        return Scope(
            False,
            f"frame {width:.3g} x {height:.3g} nm ({pixels}x{lines} px) is smaller than "
            f"{network} takes (>= {min_side_nm} nm and 4 px a side)",
        )
    return Scope(True)


def stmnet_scope(shape, pixel_size_nm: float, line_spacing_nm: float | None = None) -> Scope:
    """Whether STM-Net applies to a frame of ``shape`` (lines, pixels) at these pitches."""
    line = pixel_size_nm if line_spacing_nm is None else line_spacing_nm
    return _scope(
        shape,
        pixel_size_nm,
        line,
        network="STM-Net",
        trained_nm=STMNET_PIXEL_NM,
        max_pitch_nm=STMNET_MAX_PITCH_NM,
        max_side_px=STMNET_MAX_SIDE_PX,
        min_side_nm=STMNET_MIN_SIDE_NM,
    )


def classifier_scope(shape, pixel_size_nm: float, line_spacing_nm: float | None = None) -> Scope:
    """Whether the tip classifier applies (its input is bounded the same way)."""
    line = pixel_size_nm if line_spacing_nm is None else line_spacing_nm
    return _scope(
        shape,
        pixel_size_nm,
        line,
        network="the tip classifier",
        trained_nm=CLASSIFIER_PIXEL_NM,
        max_pitch_nm=CLASSIFIER_MAX_PITCH_NM,
        max_side_px=CLASSIFIER_MAX_SIDE_PX,
        min_side_nm=MIN_LINES * CLASSIFIER_PIXEL_NM,
    )


# ----------------------------------------------------------------------------- readers
def scan_pitch(scan, *, name: str = "") -> tuple[float, float]:
    """(pixel pitch, line spacing) in nm from the header's SCAN_RANGE and SCAN_PIXELS;
    ValueError naming the file and the field when the range is not positive."""
    values = []
    for field_name, range_m, count in (
        ("width", scan.range_m[0], scan.pixels),
        ("height", scan.range_m[1], scan.lines),
    ):
        range_m = float(range_m)
        if not (math.isfinite(range_m) and range_m > 0):
            raise ValueError(
                f"{name + ': ' if name else ''}SCAN_RANGE {field_name} is {range_m!r} m; a "
                "frame needs a positive scan range to know its pixel size"
            )
        values.append(range_m / count * 1e9)
    return values[0], values[1]


def from_scan(
    scan, channel: str | None = None, direction: str | None = None, *, name: str = "", lines: int | None = None
) -> NetworkInput:
    """An :class:`~stm_live.io.sxm.SxmScan` -> :class:`NetworkInput` (``name`` prefixes errors;
    ``lines``: read only the first that many lines, as a frame still being scanned)."""
    where = f"{name}: " if name else ""
    pixel_nm, line_nm = scan_pitch(scan, name=name)
    names = list(scan.channels)
    z_name = next((n for n in names if _is_z(n, scan.units.get(n, ""))), None)
    z_data = _first_direction(scan.channels[z_name])[1] if z_name else None
    try:
        pick, mode, why = choose_channel(
            names, feedback_on=scan.feedback_on, units=scan.units, requested=channel, z_data=z_data
        )
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None
    dirs = scan.channels[pick]
    if direction is None:
        direction, data = _first_direction(dirs)
    elif direction in dirs:
        data = dirs[direction]
    else:
        raise ValueError(f"{where}channel {pick!r} has no {direction} data; has {', '.join(dirs)}")
    if lines is not None:
        data = np.array(data, dtype=np.float32)
        data[lines:] = np.nan
    try:
        return network_input(
            data,
            channel=pick,
            mode=mode,
            unit=scan.units.get(pick, ""),
            bias_V=scan.bias_V,
            pixel_size_nm=pixel_nm,
            line_spacing_nm=line_nm,
            direction=direction,
            scan_direction=scan.direction,
            notes=[why],
        )
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


def _first_direction(dirs: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """Forward data when recorded, else backward (a backward-only channel)."""
    for d in ("forward", "backward"):
        if d in dirs:
            return d, dirs[d]
    raise ValueError(f"channel has no forward or backward data ({', '.join(dirs)})")


def from_block(block: Mapping, frames: Mapping[tuple[str, str], np.ndarray]) -> NetworkInput:
    """A live run's frames (``FrameAssembler.frames``) and its start document's ``stm_live``
    block -> :class:`NetworkInput`. The plan states the Z controller mode, so the channel
    follows from it as it does for a file."""
    channels = {name: {d: frames[(name, d)] for (n, d) in frames if n == name} for name, _ in frames}
    units = {c["name"]: c.get("units", "") for c in block.get("channels", [])}
    mode = block["z_controller"]
    pick, mode, why = choose_channel(
        list(channels), feedback_on=mode == CONSTANT_CURRENT, units=units, requested=block.get("source_channel")
    )
    direction, data = _first_direction(channels[pick])
    frame = block.get("frame", {})
    lines = int(block["lines"])
    int(block["pixels"])  # not used (the frames carry the width), but a block must state it
    pixel_nm = float(block["pixel_size_nm"])
    try:
        line_nm = float(frame["height_m"]) / lines * 1e9
    except (KeyError, TypeError, ValueError):
        line_nm = pixel_nm
    if not (math.isfinite(line_nm) and line_nm > 0):
        line_nm = pixel_nm
    return network_input(
        data,
        channel=pick,
        mode=mode,
        unit=units.get(pick, ""),
        bias_V=float(block.get("bias_V", float("nan"))),
        pixel_size_nm=pixel_nm,
        line_spacing_nm=line_nm,
        direction=direction,
        scan_direction=block.get("scan_direction", "down"),
        notes=[why],
    )
