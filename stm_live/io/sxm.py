"""Nanonis .sxm scans: read, write, and build from live frames.

File layout (as Nanonis writes it, and as nanonispy/gwyddion/pySPM read it):

    :KEY:\\n<value lines>\\n ... :DATA_INFO:\\n<table>\\n\\n:SCANIT_END:\\n\\n\\n\\x1a\\x04<data>

Data are big-endian float32, one (lines, pixels) block per channel and direction, in
DATA_INFO order, forward before backward. Rows are in acquisition order (row 0 = first
scanned line, whatever SCAN_DIR says); backward rows are stored mirrored (column 0 = the
right edge). ``SxmScan`` holds arrays in the internal orientation of docs/interfaces.md:
forward unchanged, backward flipped back to left-to-right. Unscanned rows are NaN.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SxmError", "SxmScan", "read_sxm", "write_sxm", "scan_from_frames", "nanonis_float", "parse_data_info"]

DIRECTIONS = ("forward", "backward")
_MARKER = b"\x1a\x04"
_END_TAG = b":SCANIT_END:"
_MAGIC = b":NANONIS_VERSION:"
# Keys regenerated from SxmScan's typed fields on write; the header copies are ignored.
_STRUCTURED = ("SCAN_PIXELS", "SCAN_RANGE", "SCAN_OFFSET", "SCAN_ANGLE", "SCAN_DIR", "BIAS", "DATA_INFO")
# Nanonis' own key order; unknown keys follow these, DATA_INFO always comes last.
_ORDER = (
    "NANONIS_VERSION",
    "SCANIT_TYPE",
    "REC_DATE",
    "REC_TIME",
    "REC_TEMP",
    "ACQ_TIME",
    "SCAN_PIXELS",
    "SCAN_FILE",
    "SCAN_TIME",
    "SCAN_RANGE",
    "SCAN_OFFSET",
    "SCAN_ANGLE",
    "SCAN_DIR",
    "BIAS",
    "Z-CONTROLLER",
    "COMMENT",
)
_DIR_WORDS = {
    "both": DIRECTIONS,
    "forward": ("forward",),
    "fwd": ("forward",),
    "backward": ("backward",),
    "bwd": ("backward",),
}
_DTYPES = {("FLOAT", "MSBFIRST"): ">f4", ("FLOAT", "LSBFIRST"): "<f4"}


class SxmError(ValueError):
    """A .sxm file that cannot be read or a scan that cannot be written."""


@dataclass
class SxmScan:
    """One Nanonis scan; arrays ``(lines, pixels)`` float32 in internal orientation.

    ``header`` maps tag names (no colons) to their raw text, multi-line values joined with
    ``\\n``; tags this class does not interpret round-trip through it unchanged.
    """

    channels: dict[str, dict[str, np.ndarray]]
    pixels: int
    lines: int
    range_m: tuple[float, float]
    offset_m: tuple[float, float] = (0.0, 0.0)
    angle_deg: float = 0.0
    direction: str = "down"
    bias_V: float = 0.0
    units: dict[str, str] = field(default_factory=dict)
    header: dict[str, str] = field(default_factory=dict)

    @property
    def pixel_size_nm(self) -> float:
        """Fast-axis pixel pitch (width / pixels) in nm."""
        return float(self.range_m[0]) / int(self.pixels) * 1e9

    @property
    def acq_time_s(self) -> float | None:
        """Total acquisition time of the frame (ACQ_TIME), or None if not recorded."""
        return _float_or_none(self.header.get("ACQ_TIME"))

    @property
    def scan_time_s(self) -> tuple[float, float] | None:
        """Time of one forward and one backward line (SCAN_TIME), or None."""
        parts = self.header.get("SCAN_TIME", "").split()
        try:
            return (float(parts[0]), float(parts[1])) if len(parts) >= 2 else None
        except ValueError:
            return None

    @property
    def line_time_s(self) -> float | None:
        """Time from one finished line to the next: forward + backward SCAN_TIME, else
        ACQ_TIME / lines; None when the file records neither."""
        st = self.scan_time_s
        if st is not None and sum(st) > 0:
            return float(sum(st))
        acq = self.acq_time_s
        if acq is not None and acq > 0 and self.lines > 0:
            return acq / self.lines
        return None

    @property
    def z_controller(self) -> dict[str, str]:
        """The Z-CONTROLLER table as {column: value} (empty if absent)."""
        rows = [r for r in self.header.get("Z-CONTROLLER", "").split("\n") if r.strip()]
        if len(rows) < 2:
            return {}
        keys = rows[0].strip("\t").split("\t")
        values = rows[1].strip("\t").split("\t")
        return dict(zip(keys, values))

    @property
    def feedback_on(self) -> bool | None:
        """Whether the Z controller was on (constant current), None if not recorded."""
        on = self.z_controller.get("on")
        return None if on is None else on.strip() not in ("0", "OFF", "off", "FALSE")

    @property
    def setpoint_A(self) -> float | None:
        """Z-controller setpoint (first number of the Setpoint column), or None."""
        value = self.z_controller.get("Setpoint") or self.header.get("Z-CONTROLLER>Setpoint")
        return _float_or_none(value.split()[0]) if value and value.split() else None

    @property
    def comment(self) -> str:
        return self.header.get("COMMENT", "")

    @property
    def lines_scanned(self) -> int:
        """Number of rows (from the first) holding any finite value in any channel."""
        done = np.zeros(self.lines, dtype=bool)
        for dirs in self.channels.values():
            for arr in dirs.values():
                done |= np.isfinite(np.asarray(arr)).any(axis=1)
        return int(np.flatnonzero(done)[-1] + 1) if done.any() else 0

    def image(self, name: str, direction: str = "forward") -> np.ndarray:
        """One channel/direction as float32 (lines, pixels); errors list what exists."""
        if name not in self.channels:
            raise KeyError(f"no channel {name!r} in scan; channels: {sorted(self.channels)}")
        dirs = self.channels[name]
        if direction not in dirs:
            raise KeyError(f"channel {name!r} has no {direction!r} data; has {sorted(dirs)}")
        return np.asarray(dirs[direction], dtype=np.float32)


# ----------------------------------------------------------------------------- reading


def read_sxm(path: str | os.PathLike) -> SxmScan:
    """Read a Nanonis .sxm file into an :class:`SxmScan` (internal orientation).

    Raises :class:`SxmError` naming the file and the problem for a truncated or
    corrupted file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SxmError(f"{path}: cannot read .sxm file: {exc}") from exc
    if not raw.lstrip().startswith(_MAGIC):
        raise SxmError(f"{path}: not a Nanonis .sxm file (does not start with :NANONIS_VERSION:)")
    end = raw.find(_END_TAG)
    if end < 0:
        raise SxmError(f"{path}: header has no :SCANIT_END: tag (file truncated or corrupted)")
    marker = raw.find(_MARKER, end)
    if marker < 0 or raw[end + len(_END_TAG) : marker].strip():
        raise SxmError(f"{path}: missing the \\x1a\\x04 data marker after :SCANIT_END:")
    try:
        text = raw[:end].decode("utf-8")
    except UnicodeDecodeError:
        text = raw[:end].decode("latin-1")  # older Nanonis versions write ANSI comments
    header = _parse_header(text)

    def need(key: str) -> str:
        if key not in header:
            raise SxmError(f"{path}: header has no :{key}: entry")
        return header[key]

    def floats(key: str, n: int) -> list[float]:
        parts = need(key).split()
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise SxmError(f"{path}: bad {key} {need(key).strip()!r}: expected {n} numbers")
        return values

    parts = need("SCAN_PIXELS").split()
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SxmError(
            f"{path}: bad SCAN_PIXELS {need('SCAN_PIXELS').strip()!r}: expected two positive integers (pixels lines)"
        )
    pixels, lines = int(parts[0]), int(parts[1])
    range_m = floats("SCAN_RANGE", 2)
    offset_m = floats("SCAN_OFFSET", 2) if "SCAN_OFFSET" in header else [0.0, 0.0]
    angle = floats("SCAN_ANGLE", 1)[0] if header.get("SCAN_ANGLE", "").strip() else 0.0
    bias = floats("BIAS", 1)[0] if header.get("BIAS", "").strip() else float("nan")
    direction = header.get("SCAN_DIR", "down").strip() or "down"
    if direction not in ("up", "down"):
        raise SxmError(f"{path}: bad SCAN_DIR {direction!r}: expected 'up' or 'down'")
    dtype = _DTYPES.get(tuple(header.get("SCANIT_TYPE", "FLOAT MSBFIRST").split()))
    if dtype is None:
        raise SxmError(
            f"{path}: unsupported SCANIT_TYPE {header['SCANIT_TYPE'].strip()!r}; "
            "only FLOAT MSBFIRST/LSBFIRST are supported"
        )
    info = parse_data_info(path, need("DATA_INFO"))

    blocks = [(row["Name"], d) for row in info for d in _DIR_WORDS[row["Direction"]]]
    n_block = pixels * lines
    promised = len(blocks) * n_block * 4
    data = raw[marker + len(_MARKER) :]
    if len(data) < promised:
        raise SxmError(
            f"{path}: data holds {len(data)} bytes but the header promises {promised} "
            f"({len(blocks)} channel-directions x {lines} lines x {pixels} pixels float32); "
            "file truncated"
        )
    if len(data) > promised:
        raise SxmError(
            f"{path}: data holds {len(data)} bytes, more than the {promised} the "
            "header promises (SCAN_PIXELS or DATA_INFO corrupted)"
        )
    values = np.frombuffer(data, dtype=dtype).reshape(len(blocks), lines, pixels)

    channels: dict[str, dict[str, np.ndarray]] = {}
    for k, (name, d) in enumerate(blocks):
        block = values[k].astype(np.float32)
        channels.setdefault(name, {})[d] = np.ascontiguousarray(block[:, ::-1] if d == "backward" else block)
    units = {row["Name"]: row["Unit"] for row in info}
    return SxmScan(
        channels=channels,
        pixels=pixels,
        lines=lines,
        range_m=(range_m[0], range_m[1]),
        offset_m=(offset_m[0], offset_m[1]),
        angle_deg=angle,
        direction=direction,
        bias_V=bias,
        units=units,
        header=header,
    )


def _parse_header(text: str) -> dict[str, str]:
    header: dict[str, str] = {}
    key: str | None = None
    values: list[str] = []

    def flush() -> None:
        if key is not None:
            while values and not values[-1].strip():
                values.pop()  # the blank line Nanonis puts before :SCANIT_END:
            header[key] = "\n".join(values)

    for line in text.replace("\r\n", "\n").split("\n"):
        stripped = line.strip()
        if len(stripped) > 2 and stripped[0] == ":" and stripped[-1] == ":":
            flush()
            key, values = stripped[1:-1], []
        elif key is not None:
            values.append(line.rstrip("\r"))
    flush()
    return header


def parse_data_info(path: Path, table: str) -> list[dict[str, str]]:
    """The rows of a DATA_INFO table as {column: text} (Channel, Name, Unit, Direction,
    Calibration, Offset); a malformed table raises SxmError naming ``path``."""
    rows = [r for r in table.split("\n") if r.strip()]
    cols = ["Channel", "Name", "Unit", "Direction", "Calibration", "Offset"]
    if not rows or rows[0].split()[:6] != cols:
        raise SxmError(f"{path}: DATA_INFO table lacks the columns {' '.join(cols)}")
    out = []
    for i, row in enumerate(rows[1:], start=1):
        fields = row.strip().split("\t")
        if len(fields) < 6:
            fields = row.split()
        if len(fields) < 6:
            raise SxmError(f"{path}: DATA_INFO row {i} {row.strip()!r} has fewer than 6 fields")
        entry = dict(zip(cols, (f.strip() for f in fields)))
        if entry["Direction"] not in _DIR_WORDS:
            raise SxmError(
                f"{path}: DATA_INFO row {i} has unknown Direction "
                f"{entry['Direction']!r} (expected both, forward or backward)"
            )
        out.append(entry)
    if not out:
        raise SxmError(f"{path}: DATA_INFO lists no channels")
    return out


# ----------------------------------------------------------------------------- writing


def write_sxm(path: str | os.PathLike, scan: SxmScan) -> Path:
    """Write ``scan`` as a Nanonis .sxm file (readable by nanonispy, gwyddion, Nanonis).

    The file is written beside the target and renamed into place, so a failed write never
    leaves a half-written .sxm. Returns the path.
    """
    path = Path(path)
    pixels, lines = int(scan.pixels), int(scan.lines)
    if pixels <= 0 or lines <= 0:
        raise SxmError(f"{path}: cannot write scan with pixels={scan.pixels}, lines={scan.lines}")
    if scan.direction not in ("up", "down"):
        raise SxmError(f"{path}: scan direction {scan.direction!r} must be 'up' or 'down'")
    if not scan.channels:
        raise SxmError(f"{path}: scan has no channels to write")

    old_info = {}
    try:
        old_info = {r["Name"]: r for r in parse_data_info(path, scan.header.get("DATA_INFO", ""))}
    except SxmError:
        pass  # no (usable) table from a previous read: generate everything
    info_rows, blocks = [], []
    for i, (name, dirs) in enumerate(scan.channels.items()):
        if not isinstance(name, str) or not name or any(c in name for c in "\t\n"):
            raise SxmError(f"{path}: bad channel name {name!r}")
        present = [d for d in DIRECTIONS if d in dirs]
        unknown = set(dirs) - set(DIRECTIONS)
        if unknown or not present:
            raise SxmError(
                f"{path}: channel {name!r} has directions {sorted(dirs)}; expected 'forward' and/or 'backward'"
            )
        for d in present:
            arr = np.asarray(dirs[d], dtype=np.float64)
            if arr.shape != (lines, pixels):
                raise SxmError(
                    f"{path}: channel {name!r} {d} has shape {arr.shape}, "
                    f"expected (lines, pixels) = ({lines}, {pixels})"
                )
            # File rows store backward lines mirrored, as the tip acquired them.
            blocks.append(arr[:, ::-1] if d == "backward" else arr)
        word = "both" if len(present) == 2 else present[0]
        old = old_info.get(name, {})
        info_rows.append(
            "\t".join(
                [
                    "",
                    old.get("Channel", str(i)),
                    name,
                    scan.units.get(name, old.get("Unit", "")) or "a.u.",
                    word,
                    old.get("Calibration", "1.000E+0"),
                    old.get("Offset", "0.000E+0"),
                ]
            )
        )

    now = _dt.datetime.now()
    generated = {
        "NANONIS_VERSION": "2",
        "SCANIT_TYPE": "              FLOAT            MSBFIRST",
        "REC_DATE": now.strftime(" %d.%m.%Y"),
        "REC_TIME": now.strftime("%H:%M:%S"),
        "ACQ_TIME": "0.0",
        "SCAN_TIME": _cols([0.0, 0.0], 21, 3),
        "COMMENT": "",
    }
    header = {k: v for k, v in scan.header.items() if k not in _STRUCTURED}
    header["SCANIT_TYPE"] = generated["SCANIT_TYPE"]  # we always write big-endian float32
    header.update(
        {
            "SCAN_PIXELS": f"{pixels:>10d}{lines:>10d}",
            "SCAN_RANGE": _cols(scan.range_m, 22),
            "SCAN_OFFSET": _cols(scan.offset_m, 22),
            "SCAN_ANGLE": _cols([scan.angle_deg], 20, 3),
            "SCAN_DIR": scan.direction,
            "BIAS": _cols([scan.bias_V], 20),
        }
    )
    for k, v in generated.items():
        header.setdefault(k, v)
    ordered = [k for k in _ORDER if k in header] + [k for k in header if k not in _ORDER]

    out = []
    for k in ordered:
        if any(c in k for c in ":\n"):
            raise SxmError(f"{path}: header key {k!r} may not contain ':' or a newline")
        out.append(f":{k}:\n{header[k]}\n")
    out.append(":DATA_INFO:\n\tChannel\tName\tUnit\tDirection\tCalibration\tOffset\n")
    out.append("".join(r + "\n" for r in info_rows))
    out.append("\n:SCANIT_END:\n\n\n")
    payload = np.stack(blocks).astype(">f4").tobytes()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write("".join(out).encode("utf-8"))
        fh.write(_MARKER)
        fh.write(payload)
    os.replace(tmp, path)
    return path


def scan_from_frames(
    channels: Mapping[str, Mapping[str, np.ndarray]],
    *,
    units: Mapping[str, str],
    center_x_m: float,
    center_y_m: float,
    width_m: float,
    height_m: float,
    angle_deg: float = 0.0,
    direction: str = "down",
    bias_V: float,
    setpoint_A: float | None = None,
    z_controller: str = "constant_current",
    acq_time_s: float | None = None,
    comment: str = "",
    signal_indexes: Mapping[str, int] | None = None,
    recorded_at: _dt.datetime | None = None,
) -> SxmScan:
    """Build an :class:`SxmScan` from internal-orientation frames.

    ``channels`` is ``{name: {"forward"|"backward": (lines, pixels) array}}``; the frame
    keywords match the start document's ``stm_live["frame"]`` keys, so ``**frame`` works.
    ``signal_indexes`` fills DATA_INFO's Channel column (the Nanonis signal index).
    """
    if not channels:
        raise ValueError("scan_from_frames: no channels given")
    if z_controller not in ("constant_current", "constant_height"):
        raise ValueError(
            f"scan_from_frames: z_controller {z_controller!r} must be 'constant_current' or 'constant_height'"
        )
    shapes = {np.shape(a) for dirs in channels.values() for a in dirs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"scan_from_frames: all frames must share one 2-D shape, got {shapes}")
    lines, pixels = next(iter(shapes))
    missing = [n for n in channels if n not in units]
    if missing:
        raise ValueError(f"scan_from_frames: no units given for channel(s) {missing}")
    frames = {n: {d: np.asarray(a, dtype=np.float32) for d, a in dirs.items()} for n, dirs in channels.items()}
    when = recorded_at or _dt.datetime.now()
    header = {
        "NANONIS_VERSION": "2",
        "REC_DATE": when.strftime(" %d.%m.%Y"),
        "REC_TIME": when.strftime("%H:%M:%S"),
    }
    if acq_time_s is not None:
        header["ACQ_TIME"] = f"{float(acq_time_s):>12.6G}"
        per_dir = acq_time_s / lines / 2.0  # forward and backward take equal time
        header["SCAN_TIME"] = _cols([per_dir, per_dir], 21, 6, exact=False)
    on = "1" if z_controller == "constant_current" else "0"
    sp = "" if setpoint_A is None else f"{nanonis_float(setpoint_A, 3)} A"
    header["Z-CONTROLLER"] = f"\tName\ton\tSetpoint\n\tlog Current\t{on}\t{sp}"
    header["COMMENT"] = comment.replace("\r", "").replace("\n", " ")
    if signal_indexes:
        header["DATA_INFO"] = "\tChannel\tName\tUnit\tDirection\tCalibration\tOffset\n" + "\n".join(
            f"\t{int(signal_indexes[n])}\t{n}\t{units[n]}\tboth\t1.000E+0\t0.000E+0"
            for n in channels
            if n in signal_indexes
        )
    return SxmScan(
        channels=frames,
        pixels=int(pixels),
        lines=int(lines),
        range_m=(float(width_m), float(height_m)),
        offset_m=(float(center_x_m), float(center_y_m)),
        angle_deg=float(angle_deg),
        direction=direction,
        bias_V=float(bias_V),
        units=dict(units),
        header=header,
    )


# ----------------------------------------------------------------------------- helpers

_EXP = re.compile(r"E([+-])0*(\d)")


def nanonis_float(x: float, digits: int = 6, exact: bool = True) -> str:
    """Nanonis-style exponent ('2.000000E-8'); with ``exact``, more digits when needed
    for the value to read back identical."""
    x = float(x)
    for d in (digits, 9, 16):
        s = _EXP.sub(r"E\1\2", f"{x:.{d}E}")
        if not exact or float(s) == x or not math.isfinite(x):
            return s
    return s


def _cols(values, width: int, digits: int = 6, exact: bool = True) -> str:
    """Right-aligned columns as Nanonis writes them, always at least one space apart."""
    return "".join(" " + nanonis_float(v, digits, exact).rjust(width - 1) for v in values)


def _float_or_none(value: Any) -> float | None:
    try:
        return float(str(value).split()[0])
    except (ValueError, IndexError):
        return None
