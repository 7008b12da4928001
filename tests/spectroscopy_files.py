"""Raw Nanonis .3ds and .dat files for tests, written byte by byte WITHOUT stm_live.io.

A codec tested only against itself proves nothing, so this module lays the files out from
the format as Nanonis writes it (and nanonispy, SpmGrids and SIDAM read it):

.3ds: CRLF ``key=value`` header lines (values with spaces quoted), ``:HEADER_END:``, then
big-endian float32, one block per grid point (x fastest, first row first): the fixed and
experiment parameters, then ``Points`` values of each channel in turn. A grid stopped
early simply ends after its last point (``stop_after``); ``fill`` writes the points not
measured as zeros or NaN instead.

.dat: CRLF ``key<TAB>value<TAB>`` header lines, a blank line, ``[DATA]``, the tab-separated
column names (sweep first), one row per sweep point.

:func:`real_iv_dat` writes an excerpt of a real Nanonis bias spectrum shipped as test data
by the nanonis-xarray package (tests/data/i_v.dat: the whole header, the first four and
the last of its 201 rows), under that package's licence:

    MIT License -- Copyright (c) 2025 Angelo Peronio

    Permission is hereby granted, free of charge, to any person obtaining a copy of this
    software and associated documentation files (the "Software"), to deal in the Software
    without restriction, including without limitation the rights to use, copy, modify,
    merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
    permit persons to whom the Software is furnished to do so, subject to the following
    conditions:

    The above copyright notice and this permission notice shall be included in all copies
    or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
    INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
    PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT
    HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
    CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
    THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from sxm_files import _numpy_aliases

__all__ = [
    "write_raw_3ds",
    "write_raw_dat",
    "grid_scene",
    "real_iv_dat",
    "nanonispy_grid",
    "nanonispy_spec",
    "REAL_IV_ROWS",
    "REAL_IV_HEADER_ENTRIES",
]

EXPERIMENT_PARAMETERS = (
    "X (m)",
    "Y (m)",
    "Z (m)",
    "Z offset (m)",
    "Settling time (s)",
    "Integration time (s)",
    "Z-Ctrl hold",
    "Final Z (m)",
)


def _nanonis(x: float) -> str:
    """Nanonis' number style: 6 decimals, exponent without padding (1.500000E-9)."""
    mant, exp = f"{float(x):.6E}".split("E")
    return f"{mant}E{int(exp):+d}"


def grid_scene(nx: int = 4, ny: int = 3, points: int = 16, *, seed: int = 0):
    """Plausible grid data: {channel: (ny, nx, points)}, the sweep (V) and {parameter: (ny, nx)}
    of an "up" grid 2 nm wide centred at (1 nm, -2 nm)."""
    rng = np.random.default_rng(seed)
    v = np.linspace(-2.0, 1.5, points)
    peak = 1.0 / (1.0 + ((v + 1.2) / 0.2) ** 2)
    amp = rng.uniform(0.5, 1.5, (ny, nx, 1))
    channels = {
        "Current (A)": (1e-11 * v + 5e-11 * amp * np.arctan((v + 1.2) / 0.2)).astype(np.float32),
        "LI Demod 1 X (A)": (2e-12 + 8e-12 * amp * peak).astype(np.float32),
        "Current [bwd] (A)": (1e-11 * v + 4e-11 * amp * np.arctan((v + 1.2) / 0.2)).astype(np.float32),
    }
    x = 1e-9 + (np.arange(nx) + 0.5) / nx * 2e-9 - 1e-9
    y = -2e-9 + (np.arange(ny) + 0.5) / ny * 1.5e-9 - 0.75e-9  # row 0 at the bottom
    xx, yy = np.meshgrid(x, y)
    params = {
        "X (m)": xx,
        "Y (m)": yy,
        "Z (m)": 1.2e-9 + 1e-11 * rng.standard_normal((ny, nx)),
        "Z offset (m)": np.zeros((ny, nx)),
        "Settling time (s)": np.full((ny, nx), 2e-3),
        "Integration time (s)": np.full((ny, nx), 1e-3),
        "Z-Ctrl hold": np.ones((ny, nx)),
        "Final Z (m)": np.full((ny, nx), np.nan),
    }
    return channels, v, {k: np.asarray(a, np.float32) for k, a in params.items()}


def write_raw_3ds(
    path,
    *,
    channels,
    sweep,
    parameters,
    center_m=(1e-9, -2e-9),
    size_m=(2e-9, 1.5e-9),
    angle_deg: float = 0.0,
    stop_after: int | None = None,
    fill: str | None = None,
    extra_header=(),
    drop=(),
    replace=None,
    cut_bytes: int = 0,
    newline: str = "\r\n",
) -> Path:
    """A .3ds as Nanonis writes it. ``channels``: {name: (ny, nx, points)}; ``parameters``:
    {name: (ny, nx)} experiment parameters (Sweep Start/End are added from ``sweep``).
    ``stop_after``: the grid stopped after that many points; ``fill`` ("zero" or "nan")
    then writes the rest so instead of ending the file. ``drop`` / ``replace`` leave out or
    change header lines by key; ``cut_bytes`` truncates the data."""
    names = list(channels)
    ny, nx, points = np.shape(channels[names[0]])
    exp = list(parameters)
    head = [
        ("Grid dim", f'"{nx} x {ny}"'),
        ("Grid settings", ";".join(_nanonis(v) for v in (*center_m, *size_m, angle_deg))),
        ("Filetype", "Linear"),
        ("Sweep Signal", '"Bias (V)"'),
        ("Fixed parameters", '"Sweep Start;Sweep End"'),
        ("Experiment parameters", f'"{";".join(exp)}"'),
        ("# Parameters (4 byte)", str(2 + len(exp))),
        ("Experiment size (bytes)", str(4 * points * len(names))),
        ("Points", str(points)),
        ("Channels", f'"{";".join(names)}"'),
        ("Delay before measuring (s)", "0.000000E+0"),
        ("Experiment", '"Grid Spectroscopy"'),
        ("Start time", '"05.03.2024 14:07:31"'),
        ("End time", '"05.03.2024 16:12:02"'),
        ("User", ""),
        ("Comment", '"CO tip, NaCl(2ML)/Cu(111)"'),
        ("Bias>Bias (V)", "-2.5E+0"),
        ("Z-Controller>Setpoint", "5E-12"),
        ("Lock-in>Amplitude", "10E-3"),
        ("Lock-in>Modulated signal", '"Bias (V)"'),
        *extra_header,
    ]
    replace = replace or {}
    lines = [f"{k}={replace.get(k, v)}" for k, v in head if k not in drop]
    rows = []
    for iy in range(ny):
        for ix in range(nx):
            rows.append(
                np.concatenate(
                    [[sweep[0], sweep[-1]], [parameters[p][iy, ix] for p in exp], *[channels[c][iy, ix] for c in names]]
                )
            )
    data = np.array(rows, dtype=">f4")
    if stop_after is not None:
        if fill is None:
            data = data[:stop_after]
        else:
            data[stop_after:] = 0.0 if fill == "zero" else np.nan
    body = data.tobytes()
    if cut_bytes:
        body = body[:-cut_bytes]
    path = Path(path)
    path.write_bytes((newline.join(lines) + newline + ":HEADER_END:" + newline).encode("latin-1") + body)
    return path


def write_raw_dat(path, *, columns, header=None, newline: str = "\r\n", cut_last_row: bool = False) -> Path:
    """A bias-spectroscopy .dat: ``columns`` {name: values}, the sweep first."""
    header = header or [
        ("Experiment", "bias spectroscopy"),
        ("Date", "05.03.2024 14:07:31"),
        ("User", ""),
        ("X (m)", "1.25E-9"),
        ("Y (m)", "-500E-12"),
        ("Z (m)", "1.2E-9"),
        ("Z offset (m)", "0E+0"),
        ("Settling time (s)", "2E-3"),
        ("Integration time (s)", "1E-3"),
        ("Z-Ctrl hold", "TRUE"),
        ("Final Z (m)", "N/A"),
        ("Filter type", "None"),
        ("Order", ""),
        ("Cutoff frq", ""),
        ("Bias Spectroscopy>Channels", "Current (A);LI Demod 1 X (A)"),
        ("Lock-in>Amplitude", "10E-3"),
    ]
    names = list(columns)
    table = np.stack([np.asarray(columns[n], float) for n in names], axis=1)
    rows = ["\t".join(f"{v:.9E}" for v in row) for row in table]
    if cut_last_row:
        rows[-1] = rows[-1][: len(rows[-1]) // 2].rsplit("\t", 1)[0]
    text = newline.join([f"{k}\t{v}\t" for k, v in header] + ["", "[DATA]", "\t".join(names)] + rows) + newline
    path = Path(path)
    path.write_bytes(text.encode("latin-1"))
    return path


def nanonispy_grid(path):
    """nanonispy's reading of a .3ds (header dict, signals: channels (ny, nx, points), params)."""
    import nanonispy.read as nap

    with _numpy_aliases(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nap.Grid(str(path))


def nanonispy_spec(path):
    """nanonispy's reading of a .dat (header dict, signals: column -> values)."""
    import nanonispy.read as nap

    with _numpy_aliases(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nap.Spec(str(path))


def real_iv_dat(path, *, newline: str = "\r\n") -> Path:
    """The real spectrum excerpt (see the module docstring), with Nanonis' CRLF line ends
    (the package's copy has LF ends; ``newline="\\n"`` writes those)."""
    path = Path(path)
    path.write_bytes((newline.join(_IV_DAT_LINES) + newline).encode("latin-1"))
    return path


_IV_DAT_LINES = (
    "Experiment\tbias spectroscopy\t",
    "Date\t14.09.2017 10:37:39\t",
    "User\t\t",
    "X (m)\t33.767E-9\t",
    "Y (m)\t297.15E-9\t",
    "Z (m)\t-65.6494E-9\t",
    "Z offset (m)\t0E+0\t",
    "Settling time (s)\t5E-3\t",
    "Integration time (s)\t200E-3\t",
    "Z-Ctrl hold\tTRUE\t",
    "Final Z (m)\t-65.6559E-9\t",
    "Filter type\tNone\t",
    "Order\t\t",
    "Cutoff frq\t\t",
    "Bias>Bias (V)\t-8E-3\t",
    "Bias>Calibration (V/V)\t9.68091E-3\t",
    "Bias>Offset (V)\t-102.064E-6\t",
    "Bias Spectroscopy>Sweep Start (V)\t-8E-3\t",
    "Bias Spectroscopy>Sweep End (V)\t8E-3\t",
    "Bias Spectroscopy>Num Pixel\t201\t",
    "Bias Spectroscopy>Z Avg time (s)\t500E-3\t",
    "Bias Spectroscopy>Z offset (m)\t0E+0\t",
    "Bias Spectroscopy>1st Settling time (s)\t100E-3\t",
    "Bias Spectroscopy>Settling time (s)\t5E-3\t",
    "Bias Spectroscopy>Integration time (s)\t200E-3\t",
    "Bias Spectroscopy>End Settling time (s)\t5E-3\t",
    "Bias Spectroscopy>Z control time (s)\t500E-3\t",
    "Bias Spectroscopy>Max Slew rate (V/s)\tInf\t",
    "Bias Spectroscopy>backward sweep\tTRUE\t",
    "Bias Spectroscopy>Z-controller hold\tTRUE\t",
    "Bias Spectroscopy>Number of sweeps\t1\t",
    "Bias Spectroscopy>Channels\tCurrent (A);Phase (deg);Amplitude (m);Frequency Shift (Hz);Excitation (V);"
    "LIX 1 omega (A);LIY 1 omega (A)\t",
    "Bias Spectroscopy>Reset Bias\tTRUE\t",
    "Bias Spectroscopy>Record final Z\tTRUE\t",
    "Bias Spectroscopy>Lock-In run\tTRUE\t",
    "Bias Spectroscopy>Sweep mode\tLinear\t",
    "Bias Spectroscopy>MultiLine Settings : Segment Start (V), Segment End (V), Settling (s), Integration (s), "
    "Steps (xn)\t-1E+0,1E+0,100E-6,100E-6,256\t",
    "Current>Current (A)\t-100.106E-12\t",
    "Current>Calibration (A/V)\t999.99900E-12\t",
    "Current>Offset (A)\t-455.455E-15\t",
    "Current>Gain\tLN 10^9\t",
    "Ext. VI 1>Temperature controller ID\tLSCI,MODEL331S,372810,120407\t",
    "Ext. VI 1>Microscope temperature (K)\t+04.366\t",
    "Lock-in>Lock-in status\tOFF\t",
    "Lock-in>Modulated signal\tBias (V)\t",
    "Lock-in>Frequency (Hz)\t600E+0\t",
    "Lock-in>Amplitude\t150E-6\t",
    "Lock-in>Demodulated signal\tCurrent (A)\t",
    "Lock-in>Harmonic\t2\t",
    "Lock-in>Reference phase (deg)\t-124.461E+0\t",
    "NanonisMain>Session Path\tD:\\omicron-data\\nanonis-sessions\\2017\\2017-09-14\t",
    "NanonisMain>SW Version\tGeneric 4\t",
    "NanonisMain>UI Release\t7303\t",
    "NanonisMain>RT Release\t7303\t",
    "NanonisMain>RT Frequency (Hz)\t10E+3\t",
    "NanonisMain>Signals Oversampling\t10\t",
    "NanonisMain>Animations Period (s)\t20E-3\t",
    "NanonisMain>Indicators Period (s)\t300E-3\t",
    "NanonisMain>Measurements Period (s)\t500E-3\t",
    "Oscillation Control>differential input\tFALSE\t",
    "Oscillation Control>input 1/10\tFALSE\t",
    "Oscillation Control>Input Calibration (m/V)\t12.9071E-9\t",
    "Oscillation Control>Input Range (m)\t1E-9\t",
    "Oscillation Control>Center Frequency (Hz)\t46.5974E+3\t",
    "Oscillation Control>Range (Hz)\t305.176E+0\t",
    "Oscillation Control>Reference Phase (deg)\t-139.974E+0\t",
    "Oscillation Control>Cut off frq (Hz)\t389\t",
    "Oscillation Control>Harmonic\t1\t",
    "Oscillation Control>Phase P gain (Hz/rad)\t872.665E-3\t",
    "Oscillation Control>Phase I gain (Hz/rad/s)\t264.864E-3\t",
    "Oscillation Control>Phase controller on\tTRUE\t",
    "Oscillation Control>FrequencyShift (Hz)\t-42.6432E+0\t",
    "Oscillation Control>Amplitude Setpoint (m)\t500E-12\t",
    "Oscillation Control>Amplitude P gain (V/nm)\t6.02386E+9\t",
    "Oscillation Control>Amplitude I gain (V/nm/s)\t1.82831E+9\t",
    "Oscillation Control>Amplitude controller on\tTRUE\t",
    "Oscillation Control>Excitation (V)\t2.67854E-3\t",
    "Oscillation Control>output divider\t0.01\t",
    "Oscillation Control>output off\tFALSE\t",
    "Oscillation Control>output add\tFALSE\t",
    "Oscillation Control>PLL-Setup Q-Factor\t482.321E+3\t",
    "Oscillation Control>PLL-Setup Demod. Bandwidth Amp (Hz)\t50E+0\t",
    "Oscillation Control>PLL-Setup Demod. Bandwidth Pha (Hz)\t50E+0\t",
    "Oscillation Control>PLL-Setup amplitude/excitation (m/V)\t171.83E-9\t",
    "Piezo Calibration>Active Calib.\tAlex-2017-02.02\t",
    "Piezo Calibration>Calib. X (m/V)\t7.5E-9\t",
    "Piezo Calibration>Calib. Y (m/V)\t7.5E-9\t",
    "Piezo Calibration>Calib. Z (m/V)\t1.27E-9\t",
    "Piezo Calibration>HV Gain X\t15\t",
    "Piezo Calibration>HV Gain Y\t15\t",
    "Piezo Calibration>HV Gain Z\t15\t",
    "Piezo Calibration>Tilt X (deg)\t-1.87969\t",
    "Piezo Calibration>Tilt Y (deg)\t0.848198\t",
    "Piezo Calibration>Curvature radius X (m)\tInf\t",
    "Piezo Calibration>Curvature radius Y (m)\tInf\t",
    "Piezo Calibration>2nd order corr X (V/m^2)\t0E+0\t",
    "Piezo Calibration>2nd order corr Y (V/m^2)\t0E+0\t",
    "Piezo Calibration>Drift X (m/s)\t0E+0\t",
    "Piezo Calibration>Drift Y (m/s)\t0E+0\t",
    "Piezo Calibration>Drift Z (m/s)\t159.014E-15\t",
    "Piezo Calibration>Drift correction status (on/off)\tTRUE\t",
    "Scan>Scanfield\t68.7668E-9;332.152E-9;70E-9;70E-9;0E+0\t",
    "Scan>series name\t%Y-%m-%d-NbSe2-\t",
    "Scan>channels\tCurrent (A);Z (m);Phase (deg);Amplitude (m);Frequency Shift (Hz);Excitation (V);"
    "LIX 1 omega (A);LIY 1 omega (A)\t",
    "Scan>pixels/line\t128\t",
    "Scan>lines\t128\t",
    "Scan>speed forw. (m/s)\t24.7455E-9\t",
    "Scan>speed backw. (m/s)\t24.7455E-9\t",
    "Z-Controller>Z (m)\t-65.6572E-9\t",
    "Z-Controller>Controller name\tlog I + df SafeTip\t",
    "Z-Controller>Controller status\tON\t",
    "Z-Controller>Setpoint\t100E-12\t",
    "Z-Controller>Setpoint unit\tA\t",
    "Z-Controller>P gain\t40E-12\t",
    "Z-Controller>I gain\t66.6667E-9\t",
    "Z-Controller>Time const (s)\t600E-6\t",
    "Z-Controller>TipLift (m)\t0E+0\t",
    "Z-Controller>Switch off delay (s)\t500E-3\t",
    "",
    "[DATA]",
    "Bias calc (V)\tCurrent (A)\tPhase (deg)\tAmplitude (m)\tFrequency Shift (Hz)\tExcitation (V)\t"
    "LIX 1 omega (A)\tLIY 1 omega (A)\tCurrent [bwd] (A)\tPhase [bwd] (deg)\tAmplitude [bwd] (m)\t"
    "Frequency Shift [bwd] (Hz)\tExcitation [bwd] (V)\tLIX 1 omega [bwd] (A)\tLIY 1 omega [bwd] (A)",
    "-8.00000E-3\t-100.161E-12\t-13.1916E-3\t499.990E-12\t-42.6245E+0\t2.74404E-3\t1.67642E-12\t-8.73963E-15\t-84.7701E-12\t-9.73443E-3\t500.034E-12\t-42.2059E+0\t2.57979E-3\t1.48302E-12\t-21.1698E-15",
    "-7.92000E-3\t-97.4837E-12\t38.5418E-3\t499.993E-12\t-42.5785E+0\t2.68167E-3\t1.71979E-12\t27.6054E-15\t-83.5469E-12\t-15.7121E-3\t499.923E-12\t-42.2099E+0\t2.70377E-3\t1.44486E-12\t3.93200E-15",
    "-7.84000E-3\t-97.8944E-12\t283.085E-6\t500.031E-12\t-42.6115E+0\t2.77395E-3\t1.72239E-12\t22.1481E-15\t-84.1223E-12\t-39.6820E-3\t500.035E-12\t-42.2293E+0\t2.65245E-3\t1.49314E-12\t-315.950E-18",
    "-7.76000E-3\t-96.2848E-12\t27.1090E-3\t500.045E-12\t-42.5871E+0\t2.62041E-3\t1.68557E-12\t40.0668E-15\t-82.3548E-12\t-15.4589E-3\t499.983E-12\t-42.2069E+0\t2.72068E-3\t1.44051E-12\t21.8301E-15",
    "8.00000E-3\t99.2272E-12\t63.6295E-3\t500.037E-12\t-41.9487E+0\t2.48191E-3\t1.71964E-12\t5.99400E-15\t99.8420E-12\t50.0142E-3\t500.106E-12\t-41.9576E+0\t2.43244E-3\t1.69979E-12\t-9.97417E-15",
)
REAL_IV_ROWS = len(_IV_DAT_LINES) - _IV_DAT_LINES.index("[DATA]") - 2  # data rows in the excerpt
REAL_IV_HEADER_ENTRIES = _IV_DAT_LINES.index("")  # header lines before the blank line and [DATA]
