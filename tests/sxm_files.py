"""Raw Nanonis .sxm files for tests, written byte by byte WITHOUT stm_live.io.sxm.

A codec tested only against itself proves nothing, so this module lays out the header
text and the big-endian float32 blocks itself, as Nanonis instruments write them::

    :NANONIS_VERSION:\\n2\\n:SCANIT_TYPE:\\n              FLOAT            MSBFIRST\\n ...
    :DATA_INFO:\\n\\tChannel\\tName\\tUnit\\tDirection\\tCalibration\\tOffset\\n\\t14\\tZ\\tm\\tboth...\\n
    \\n:SCANIT_END:\\n\\n\\n\\x1a\\x04<data>

Data: one (lines, pixels) block per channel and recorded direction, in DATA_INFO order,
forward before backward; rows in acquisition order (row 0 = first scanned line, for up
and down scans alike); backward rows stored mirrored in x (column 0 = first pixel the tip
acquired on its way back, the right edge). Unscanned pixels are NaN.

Arrays given to :func:`write_raw_sxm` are in acquisition order with columns left to
right for both directions (what :func:`scene` returns); the writer mirrors backward rows.
:func:`nanonispy_scan` opens a file with nanonispy, the independent reader.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "write_raw_sxm",
    "scene",
    "stopped",
    "file_blocks",
    "nanonispy_scan",
    "quirky_files",
    "write_grid_3ds",
    "write_spectrum_dat",
]

CHANNEL_UNITS = {"z": "m", "current": "A", "lockin": "A", "df": "Hz"}


def _e(x: float, digits: int = 6) -> str:
    """Nanonis exponent style: 2.000000E-8, 0.000000E+0."""
    mant, exp = f"{float(x):.{digits}E}".split("E")
    return f"{mant}E{int(exp):+d}"


def _cols(values, width: int = 22, digits: int = 6) -> str:
    return "".join(_e(v, digits).rjust(width) for v in values)


def write_raw_sxm(
    path,
    *,
    channels: Mapping[str, tuple],
    range_m,
    offset_m=(0.0, 0.0),
    angle_deg: float = 0.0,
    direction: str = "down",
    bias_V: float = 0.1,
    feedback_on: bool | None = True,
    setpoint_A: float | None = 1e-10,
    scan_time_s: tuple[float, float] | None = (0.1, 0.1),
    acq_time_s: float | None = None,
    old_header: bool = False,
    comment: str = "",
    encoding: str = "utf-8",
    extra_header: Mapping[str, str] | None = None,
) -> Path:
    """Write a .sxm the way a Nanonis controller does; returns the path.

    ``channels`` maps name -> ``(index, unit, forward, backward)``: ``index`` goes into
    DATA_INFO's Channel column verbatim (an int, or any text to model a damaged table);
    ``forward``/``backward`` are (lines, pixels) arrays in acquisition order, columns left
    to right, or None when that direction was not recorded. ``old_header`` writes the
    pre-V5 layout: NANONIS_VERSION 1, no SCAN_TIME, no Z-CONTROLLER table.
    ``encoding="latin-1"`` writes the header in ANSI as older Nanonis versions do.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
    shapes = {np.shape(a) for _i, _u, f, b in channels.values() for a in (f, b) if a is not None}
    if len(shapes) != 1:
        raise ValueError(f"all arrays must share one (lines, pixels) shape, got {shapes}")
    lines, pixels = next(iter(shapes))
    lines_for_time = lines
    if acq_time_s is None and scan_time_s is not None:
        acq_time_s = lines_for_time * float(sum(scan_time_s))
    now = dt.datetime(2024, 3, 5, 14, 7, 31)

    rows: list[tuple[str, str]] = [
        ("NANONIS_VERSION", "1" if old_header else "2"),
        ("SCANIT_TYPE", "              FLOAT            MSBFIRST"),
        ("REC_DATE", now.strftime(" %d.%m.%Y")),
        ("REC_TIME", now.strftime("%H:%M:%S")),
        ("REC_TEMP", "      290.0000000000"),
    ]
    if acq_time_s is not None:
        rows.append(("ACQ_TIME", f"{acq_time_s:12.1f}"))
    rows += [("SCAN_PIXELS", f"{pixels:>10d}{lines:>10d}"), ("SCAN_FILE", "C:\\Data\\2024\\tests\\scan_001.sxm")]
    if scan_time_s is not None and not old_header:
        rows.append(("SCAN_TIME", _cols(scan_time_s, 21, 3)))
    rows += [
        ("SCAN_RANGE", _cols(range_m)),
        ("SCAN_OFFSET", _cols(offset_m)),
        ("SCAN_ANGLE", _cols([angle_deg], 20, 3)),
        ("SCAN_DIR", direction),
        ("BIAS", _cols([bias_V], 20, 3)),
    ]
    if feedback_on is not None and not old_header:
        sp = "" if setpoint_A is None else f"{_e(setpoint_A, 3)} A"
        rows.append(
            (
                "Z-CONTROLLER",
                "\tName\ton\tSetpoint\tP-gain\tI-gain\tT-const\n"
                f"\tlog Current\t{1 if feedback_on else 0}\t{sp}\t1.000E-11 m\t"
                "3.000E-8 m/s\t3.333E-4 s",
            )
        )
    rows.append(("COMMENT", comment))
    rows += [
        ("NanonisMain>Session Path", "C:\\Data\\2024"),
        ("NanonisMain>SW Version", "Generic 5e" if not old_header else "Generic 4"),
        ("Bias>Bias (V)", _e(bias_V, 3)),
        ("Scan>channels", ";".join(f"{n} ({c[1]})" for n, c in channels.items())),
    ]
    for key, value in (extra_header or {}).items():
        rows.append((key, value))

    info = ["\tChannel\tName\tUnit\tDirection\tCalibration\tOffset"]
    blocks = []
    for name, (index, unit, fwd, bwd) in channels.items():
        word = {(True, True): "both", (True, False): "forward", (False, True): "backward"}[
            (fwd is not None, bwd is not None)
        ]
        info.append(f"\t{index}\t{name}\t{unit}\t{word}\t1.000E-9\t0.000E+0")
        if fwd is not None:
            blocks.append(np.asarray(fwd, np.float32))
        if bwd is not None:
            blocks.append(np.asarray(bwd, np.float32)[:, ::-1])  # stored as acquired
    text = "".join(f":{k}:\n{v}\n" for k, v in rows)
    text += ":DATA_INFO:\n" + "\n".join(info) + "\n\n:SCANIT_END:\n\n\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding) + b"\x1a\x04" + b"".join(b.astype(">f4").tobytes() for b in blocks))
    return path


def file_blocks(forward, backward):
    """(forward, backward) as the file and the wire hold them: backward mirrored in x."""
    f = None if forward is None else np.asarray(forward, np.float32)
    b = None if backward is None else np.ascontiguousarray(np.asarray(backward, np.float32)[:, ::-1])
    return f, b


def scene(
    quantity: str = "z",
    *,
    pixels: int = 32,
    lines: int = 32,
    range_m=(5e-9, 5e-9),
    direction: str = "down",
    bias_V: float = 0.1,
    blobs=None,
    tilt=(0.02, -0.01),
    seed: int = 0,
    noise: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """A plausible (forward, backward) pair, float32, acquisition order, columns left to right.

    The surface is defined in frame coordinates (fractions of the frame, so the same scene
    at other pixel counts or an up scan is the same physical picture): Gaussian blobs
    ``(x_frac, y_frac, sigma_frac, amplitude)`` (y_frac from the top of the frame).
    ``quantity``: "z" (metres: 100 pm blobs on a tilted plane, ``tilt`` in m/m),
    "current" (amperes, 10-100 pA with the sign of ``bias_V``), "lockin" (A, dI/dV-like),
    "df" (Hz, negative frequency shift). Backward differs from forward by a small offset and
    independent noise, so orientation slips show.
    """
    if quantity not in CHANNEL_UNITS:
        raise ValueError(f"quantity must be one of {sorted(CHANNEL_UNITS)}, not {quantity!r}")
    rng = np.random.default_rng(seed)
    blobs = blobs if blobs is not None else [(0.3, 0.35, 0.08, 1.0), (0.7, 0.6, 0.06, 0.6), (0.45, 0.8, 0.05, 0.8)]
    x = (np.arange(pixels) + 0.5) / pixels
    v = (np.arange(lines) + 0.5) / lines  # fraction from the first scanned line
    y = v if direction == "down" else 1.0 - v  # fraction from the top of the frame
    xx, yy = np.meshgrid(x, y)
    aspect = range_m[1] / range_m[0]  # blobs round in physical space
    g = sum(a * np.exp(-((xx - bx) ** 2 + ((yy - by) * aspect) ** 2) / (2 * s * s)) for bx, by, s, a in blobs)
    w, h = range_m
    if quantity == "z":
        base = 2e-9 + tilt[0] * xx * w + tilt[1] * (1 - yy) * h + 1e-10 * g
        scale = 1e-10
    elif quantity == "current":
        base = np.sign(bias_V or 1.0) * (1e-11 + 9e-11 * g)
        scale = 1e-10
    elif quantity == "lockin":
        base = 2e-12 + 5e-12 * g
        scale = 5e-12
    else:
        base = -3.0 - 2.0 * g
        scale = 2.0
    fwd = base + noise * scale * rng.standard_normal(base.shape)
    bwd = base + 0.02 * scale + noise * scale * rng.standard_normal(base.shape)
    return fwd.astype(np.float32), bwd.astype(np.float32)


def stopped(forward, backward, lines_done: int, *, mid_backward: bool = False):
    """Copies of a (forward, backward) pair as a scan stopped after ``lines_done`` lines:
    later rows NaN. ``mid_backward``: stopped during the backward sweep of the last of
    them, so that row has forward data and a NaN backward row."""
    f = None if forward is None else np.array(forward, np.float32)
    b = None if backward is None else np.array(backward, np.float32)
    for arr in (f, b):
        if arr is not None:
            arr[lines_done:] = np.nan
    if mid_backward and b is not None:
        b[lines_done - 1] = np.nan
    return f, b


def write_grid_3ds(path, *, points: int = 8, grid=(2, 2)) -> Path:
    """A small Nanonis grid-spectroscopy (.3ds) file: CRLF key=value header, :HEADER_END:,
    then big-endian float32 per pixel (parameters, then the sweep)."""
    nx, ny = grid
    params = ["Sweep Start", "Sweep End", "X (m)", "Y (m)", "Z (m)"]
    header = "\r\n".join(
        [
            f'Grid dim="{nx} x {ny}"',
            "Grid settings=0.000000E+0;0.000000E+0;2.000000E-9;2.000000E-9;0.000000E+0",
            'Sweep Signal="Bias (V)"',
            'Fixed parameters="Sweep Start;Sweep End"',
            'Experiment parameters="X (m);Y (m);Z (m)"',
            f"# Parameters (4 byte)={len(params)}",
            f"Experiment size (bytes)={points * 4}",
            f"Points={points}",
            'Channels="Current (A)"',
            "Delay before measuring (s)=0.000000E+0",
            'Experiment="Grid Spectroscopy"',
            'Start time="05.03.2024 14:07:31"',
            'End time="05.03.2024 14:09:02"',
            'User=""',
            'Comment=""',
            ":HEADER_END:",
            "",
        ]
    )
    pixel = np.concatenate([[-1.0, 1.0, 0.0, 0.0, 2e-9], np.linspace(-1e-10, 1e-10, points)])
    data = np.tile(pixel, nx * ny).astype(">f4").tobytes()
    path = Path(path)
    path.write_bytes(header.encode("ascii") + data)
    return path


def write_spectrum_dat(path, *, points: int = 8) -> Path:
    """A small Nanonis bias-spectroscopy (.dat) file: tab-separated header, [DATA], columns."""
    v = np.linspace(-1.0, 1.0, points)
    rows = "".join(f"{a:.6E}\t{b:.6E}\r\n" for a, b in zip(v, 1e-10 * v))
    text = (
        "Experiment\tbias spectroscopy\r\nDate\t05.03.2024 14:07:31\r\n"
        "User\t\r\nX (m)\t0.000000E+0\r\nY (m)\t0.000000E+0\r\nZ (m)\t2.000000E-9\r\n"
        "\r\n[DATA]\r\nBias calc (V)\tCurrent (A)\r\n" + rows
    )
    path = Path(path)
    path.write_text(text, encoding="ascii")
    return path


@contextlib.contextmanager
def _numpy_aliases():
    # nanonispy 1.1 still uses np.float / np.int, removed in numpy 1.24.
    added = [n for n in ("float", "int") if not hasattr(np, n)]
    for n in added:
        setattr(np, n, {"float": float, "int": int}[n])
    try:
        yield
    finally:
        for n in added:
            delattr(np, n)


def nanonispy_scan(path):
    """nanonispy's reading of ``path`` (header dict, signals in file orientation)."""
    import warnings

    import nanonispy.read as nap

    with _numpy_aliases(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on latin-1 headers
        return nap.Scan(str(path))


def quirky_files(folder) -> dict[str, dict]:
    """A set of small files with the quirks of real recordings.

    Returns name -> {"path", "channels" (as given to write_raw_sxm), "nanonispy" (whether
    nanonispy can read it: it needs both directions, SCAN_TIME and ACQ_TIME), plus the
    header geometry written}.
    """
    folder = Path(folder)
    out: dict[str, dict] = {}

    def add(name, *, quantities, nanonispy=True, stop=None, **kw):
        px, ln = kw.pop("pixels", 32), kw.pop("lines", 32)
        rng_m = kw.setdefault("range_m", (4e-9, 4e-9))  # 0.125 nm/px: STM-Net's range
        direction = kw.setdefault("direction", "down")
        bias = kw.setdefault("bias_V", 0.1)
        channels = {}
        for k, (ch, (index, quantity, dirs)) in enumerate(quantities.items()):
            f, b = scene(
                quantity, pixels=px, lines=ln, range_m=rng_m, direction=direction, bias_V=bias, seed=k + 7 * len(out)
            )
            if stop is not None:
                f, b = stopped(f, b, stop[0], mid_backward=stop[1])
            channels[ch] = (index, CHANNEL_UNITS[quantity], f if "f" in dirs else None, b if "b" in dirs else None)
        path = write_raw_sxm(folder / f"{name}.sxm", channels=channels, **kw)
        out[name] = dict(path=path, channels=channels, nanonispy=nanonispy, pixels=px, lines=ln, **kw)

    # New header, constant current, Z at 14 first (as Nanonis lists it), lock-in at 86.
    add(
        "cc_lockin_down",
        quantities={"Z": (14, "z", "fb"), "Current": (0, "current", "fb"), "LI Demod 1 X": (86, "lockin", "fb")},
        feedback_on=True,
        setpoint_A=1e-10,
        bias_V=0.5,
        comment="CO tip, Au(111)",
    )
    # Constant height at negative bias (negative current), up scan, rotated, AFM channel.
    add(
        "ch_negative_up_rotated",
        quantities={"Current": (0, "current", "fb"), "Z": (14, "z", "fb"), "OC M1 Freq. Shift": (73, "df", "fb")},
        feedback_on=False,
        setpoint_A=5e-11,
        bias_V=-0.8,
        direction="up",
        angle_deg=32.5,
        offset_m=(1.25e-8, -3.5e-9),
    )
    # Non-square pixels: 6 x 4 nm frame, 48 x 40 px (0.125 nm x 0.1 nm pitch).
    add(
        "non_square",
        quantities={"Z": (14, "z", "fb"), "Current": (0, "current", "fb")},
        pixels=48,
        lines=40,
        range_m=(6e-9, 4e-9),
        feedback_on=True,
    )
    # Old header (no Z-CONTROLLER, no SCAN_TIME), latin-1 comment, forward-only channel.
    add(
        "old_header_latin1",
        quantities={"Z": (14, "z", "fb"), "Current": (0, "current", "f")},
        old_header=True,
        feedback_on=None,
        scan_time_s=None,
        acq_time_s=6.4,
        comment="Probe \xe9tch\xe9e, 4.2 K, \xb5-scan",
        encoding="latin-1",
        nanonispy=False,
    )
    # A 2 um overview with 64 px, up scan, stopped after 40 lines.
    add(
        "overview_partial",
        quantities={"Z": (14, "z", "fb"), "Current": (0, "current", "fb")},
        pixels=64,
        lines=64,
        range_m=(2e-6, 2e-6),
        direction="up",
        stop=(40, False),
    )
    # Stopped during the backward sweep of line 20: that row has forward data only.
    add(
        "aborted_backward",
        quantities={"Z": (14, "z", "fb"), "Current": (0, "current", "fb")},
        stop=(20, True),
        feedback_on=True,
    )
    return out
