"""Nanonis spectroscopy files: grids (.3ds) and spectra (.dat), read and written.

.3ds (grid spectroscopy), as Nanonis writes it (and nanonispy, SpmGrids, SIDAM read it)::

    Grid dim="64 x 64"\\r\\n
    Grid settings=<centre x>;<centre y>;<width>;<height>;<angle deg>\\r\\n      (m, m, m, m, deg)
    Filetype=Linear\\r\\n                                                  (newer versions)
    Sweep Signal="Bias (V)"\\r\\n
    Fixed parameters="Sweep Start;Sweep End"\\r\\n
    Experiment parameters="X (m);Y (m);Z (m);Z offset (m);Settling time (s);..."\\r\\n
    # Parameters (4 byte)=10\\r\\n                                        (fixed + experiment)
    Experiment size (bytes)=2048\\r\\n                                    (4 · points · channels)
    Points=256\\r\\n                                                      (sweep points)
    Channels="Current (A);LI Demod 1 X (A);Current [bwd] (A)"\\r\\n
    Delay before measuring (s)=0.000000E+0\\r\\n
    Experiment="Grid Spectroscopy"\\r\\n
    Start time="05.03.2024 14:07:31"\\r\\n  End time=...\\r\\n  User=\\r\\n  Comment=\\r\\n
    Bias>Bias (V)=...\\r\\n  Lock-in>Amplitude=...\\r\\n ...                (module settings)
    :HEADER_END:\\r\\n<data>

Values with spaces are quoted. Data: big-endian float32, one block per grid point in
acquisition order (x fastest; the first row is the bottom one for an "up" grid, as
Nanonis records by default, the top one for "down"): the parameters, then each channel's
``Points`` values. Sweep values are not stored: a linear sweep runs from the point's Sweep
Start to its Sweep End. A grid stopped early ends after its last measured point; missing
points, and points written as all zeros or all NaN, read as not measured (NaN here).

.dat (one spectrum): tab-separated text, CRLF lines ``key<TAB>value<TAB>`` (Experiment,
Date, User, X (m), Y (m), Z (m), Z offset (m), Settling time (s), Integration time (s),
Z-Ctrl hold, Final Z (m), Filter type, Order, Cutoff frq, then ``Module>Setting`` keys),
a blank line, ``[DATA]``, a line of column names (the sweep signal first, e.g.
"Bias calc (V)"; backward sweeps as "Current [bwd] (A)", averages "[AVG]", filtered
"(A) [filt]"), then one row per sweep point.

Every problem with a file raises :class:`SpectroscopyFileError` (a ValueError) whose one
line names the file and what was wrong.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stm_live.io.sxm import nanonis_float

__all__ = [
    "SpectroscopyFileError",
    "Grid",
    "Spectrum",
    "read_3ds",
    "write_3ds",
    "make_grid",
    "read_dat",
    "write_dat",
    "make_spectrum",
    "split_unit",
]

_END = ":HEADER_END:"
_DATA = "[DATA]"
# Header keys the typed fields of Grid regenerate on write (not kept in Grid.header).
_GRID_STRUCTURE = (
    "Grid dim",
    "Grid settings",
    "Sweep Signal",
    "Fixed parameters",
    "Experiment parameters",
    "# Parameters (4 byte)",
    "Experiment size (bytes)",
    "Points",
    "Channels",
)
# Nanonis' order of the general keys; module settings ("Bias>Bias (V)", ...) follow.
_GRID_ORDER = (
    "Grid dim",
    "Grid settings",
    "Filetype",
    "Sweep Signal",
    "Fixed parameters",
    "Experiment parameters",
    "# Parameters (4 byte)",
    "Experiment size (bytes)",
    "Points",
    "Channels",
    "Delay before measuring (s)",
    "Experiment",
    "Start time",
    "End time",
    "User",
    "Comment",
)
_ALWAYS_QUOTED = (
    "Grid dim",
    "Sweep Signal",
    "Fixed parameters",
    "Experiment parameters",
    "Channels",
    "Experiment",
    "Start time",
    "End time",
)
_TIME_FORMAT = "%d.%m.%Y %H:%M:%S"
_UNIT = re.compile(r"^(.*?)\s*\(([^()]*)\)((?:\s*\[[^\]]*\])*)$")


class SpectroscopyFileError(ValueError):
    """A .3ds or .dat file that cannot be read, or data that cannot be written."""


def split_unit(name: str) -> tuple[str, str]:
    """ "Current [bwd] (A)" -> ("Current [bwd]", "A"); "Current (A) [filt]" -> ("Current [filt]", "A");
    no unit: (name, "")."""
    m = _UNIT.match(name)
    if not m:
        return name, ""
    return (m.group(1) + m.group(3)).strip(), m.group(2)


def _lookup(path, names, name: str, what: str) -> str:
    """The one of ``names`` that ``name`` means: exact, else the same without its unit."""
    if name in names:
        return name
    hits = [n for n in names if split_unit(n)[0] == name]
    if len(hits) == 1:
        return hits[0]
    raise SpectroscopyFileError(f"{path or '<memory>'}: unknown {what} {name!r}; {what}s: {', '.join(names)}")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # older Nanonis versions write the header in ANSI


def _write_atomically(path: Path, payload: bytes) -> Path:
    """Written beside the target and renamed into place: a failed write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return path


def _check_text(path, what: str, text: str, forbidden: str) -> str:
    text = str(text)
    if any(c in text for c in forbidden):
        raise SpectroscopyFileError(f"{path}: {what} {text!r} may not contain {forbidden!r}")
    return text


# ------------------------------------------------------------------------------ .3ds


@dataclass(eq=False)  # arrays inside: compare fields with numpy
class Grid:
    """A Nanonis grid-spectroscopy experiment.

    ``channels``: name as Nanonis writes it ("Current (A)") -> ``(ny, nx, points)`` float32
    in file order (row 0 = first recorded row, see ``direction``), NaN at points not
    measured. ``parameters``: fixed then experiment parameters, name -> ``(ny, nx)``
    float32, NaN where not measured. ``header``: every other header entry (quotes
    removed), in file order; the structural ones are regenerated from the fields on write.
    """

    channels: dict[str, np.ndarray]
    parameters: dict[str, np.ndarray]
    fixed_parameters: tuple[str, ...]
    center_m: tuple[float, float]
    size_m: tuple[float, float]
    angle_deg: float = 0.0
    sweep_signal: str = "Bias (V)"
    header: dict[str, str] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(points in y, points in x)."""
        return tuple(next(iter(self.parameters.values())).shape)

    @property
    def points(self) -> int:
        """Sweep points per grid point."""
        return int(next(iter(self.channels.values())).shape[-1])

    @property
    def experiment_parameters(self) -> tuple[str, ...]:
        return tuple(k for k in self.parameters if k not in self.fixed_parameters)

    @property
    def measured(self) -> np.ndarray:
        """(ny, nx) bool: the points that hold a measurement."""
        return np.isfinite(np.stack(list(self.parameters.values()))).any(axis=0)

    @property
    def sweep(self) -> np.ndarray:
        """The sweep values (float64, ``points``): Sweep Start to Sweep End of the first
        measured point, linear (Filetype Linear, or older files without one)."""
        where = self.path or "<memory>"
        kind = self.header.get("Filetype", "Linear")
        if kind != "Linear":
            raise SpectroscopyFileError(f"{where}: sweep of Filetype {kind!r} not supported (only Linear)")
        names = [_lookup(where, list(self.parameters), n, "parameter") for n in ("Sweep Start", "Sweep End")]
        done = np.argwhere(self.measured)
        if not len(done):
            raise SpectroscopyFileError(f"{where}: no grid point was measured: the sweep is unknown")
        iy, ix = done[0]
        start, end = (float(self.parameters[n][iy, ix]) for n in names)
        return np.linspace(start, end, self.points)

    @property
    def direction(self) -> str:
        """ "up" when the first row is the bottom of the grid (Nanonis' default), "down" when
        it is the top: from the points' X (m), Y (m) parameters ("up" when not recorded)."""
        try:
            xs, ys = (self.parameter(n) for n in ("X", "Y"))
        except SpectroscopyFileError:
            return "up"
        a = math.radians(self.angle_deg)  # clockwise positive, so "up" in the frame is (sin a, cos a)
        v = (xs - self.center_m[0]) * math.sin(a) + (ys - self.center_m[1]) * math.cos(a)
        rows = [r for r in v if np.isfinite(r).any()]
        if len(rows) < 2:
            return "up"
        return "down" if np.nanmean(rows[0]) > np.nanmean(rows[-1]) else "up"

    def channel_name(self, name: str) -> str:
        """The full name ("Current (A)") of channel ``name``, given with or without the unit."""
        return _lookup(self.path, list(self.channels), name, "channel")

    def channel(self, name: str) -> np.ndarray:
        """One channel by its name, with or without the unit ("Current" or "Current (A)")."""
        return self.channels[self.channel_name(name)]

    def parameter(self, name: str) -> np.ndarray:
        return self.parameters[_lookup(self.path, list(self.parameters), name, "parameter")]

    def map(self, name: str, value: float) -> tuple[np.ndarray, float]:
        """Channel ``name`` at the sweep point nearest ``value``: ((ny, nx), that sweep value)."""
        sweep = self.sweep
        k = int(np.argmin(np.abs(sweep - float(value))))
        return self.channel(name)[..., k], float(sweep[k])


def make_grid(
    channels: Mapping[str, np.ndarray],
    *,
    sweep,
    center_m,
    size_m,
    angle_deg: float = 0.0,
    parameters: Mapping[str, np.ndarray],
    measured=None,
    sweep_signal: str = "Bias (V)",
    header: Mapping[str, str] | None = None,
    start: _dt.datetime | None = None,
    end: _dt.datetime | None = None,
) -> Grid:
    """A :class:`Grid` from arrays, as the simulator or a plan has them.

    ``channels``: name (with unit, "Current (A)") -> ``(ny, nx, len(sweep))``; ``sweep``
    linear; ``parameters``: the experiment parameters, name -> ``(ny, nx)``, at least
    "X (m)", "Y (m)", "Z (m)" (every reader expects them); Sweep Start and Sweep End are
    added as the fixed parameters. ``measured``: (ny, nx) bool, the points done (default
    all); the others become NaN. ``header``: module settings and the like
    ("Bias>Bias (V)": "-2E+0", "Lock-in>Amplitude": "1E-2", "Comment": ...).
    """
    sweep = np.asarray(sweep, dtype=float)
    if sweep.ndim != 1 or len(sweep) < 2 or not np.all(np.isfinite(sweep)):
        raise SpectroscopyFileError(f"grid sweep must be >= 2 finite values, got {sweep!r}")
    if not np.allclose(np.diff(sweep), (sweep[-1] - sweep[0]) / (len(sweep) - 1), rtol=1e-6, atol=1e-12):
        raise SpectroscopyFileError("grid sweep must be linear (Nanonis stores only its start and end)")
    if not channels:
        raise SpectroscopyFileError("grid has no channels")
    missing = [n for n in ("X (m)", "Y (m)", "Z (m)") if n not in parameters]
    if missing:
        raise SpectroscopyFileError(f"grid parameters lack {missing}: every grid records X (m), Y (m), Z (m)")
    arrays = {n: np.array(a, dtype=np.float32) for n, a in channels.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != len(sweep):
        raise SpectroscopyFileError(f"grid channels must share one (ny, nx, {len(sweep)}) shape, got {shapes}")
    ny, nx = next(iter(shapes))[:2]
    if ny * nx == 0:
        raise SpectroscopyFileError("empty grid: no points")
    params = {
        "Sweep Start": np.full((ny, nx), sweep[0], np.float32),
        "Sweep End": np.full((ny, nx), sweep[-1], np.float32),
    }
    for n, a in parameters.items():
        params[n] = np.broadcast_to(np.asarray(a, dtype=np.float32), (ny, nx)).copy()
    done = np.ones((ny, nx), bool) if measured is None else np.asarray(measured, dtype=bool)
    if done.shape != (ny, nx):
        raise SpectroscopyFileError(f"measured mask has shape {done.shape}, expected {(ny, nx)}")
    for a in (*arrays.values(), *params.values()):
        a[~done] = np.nan
    now = _dt.datetime.now()
    head = {
        "Filetype": "Linear",
        "Delay before measuring (s)": "0.000000E+0",
        "Experiment": "Grid Spectroscopy",
        "Start time": (start or now).strftime(_TIME_FORMAT),
        "End time": (end or now).strftime(_TIME_FORMAT),
        "User": "",
        "Comment": "",
    }
    head.update(header or {})
    return Grid(
        channels=arrays,
        parameters=params,
        fixed_parameters=("Sweep Start", "Sweep End"),
        center_m=tuple(map(float, center_m)),
        size_m=tuple(map(float, size_m)),
        angle_deg=float(angle_deg),
        sweep_signal=sweep_signal,
        header=dict(head),
    )


def _grid_header(path: Path, text: str) -> list[tuple[str, str]]:
    """The header's (key, value) pairs, quotes removed, up to :HEADER_END:."""
    pairs = []
    for i, line in enumerate(text.split("\n")):
        line = line.rstrip("\r")
        if line.strip() == _END:
            return pairs
        if not line.strip():
            continue
        if "=" not in line:
            raise SpectroscopyFileError(f"{path}: header line {i + 1} {line[:60]!r} is not 'key=value'")
        key, value = line.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        pairs.append((key, value))
    raise SpectroscopyFileError(f"{path}: header has no {_END} line (file truncated or not a .3ds)")


def read_3ds(path: str | os.PathLike) -> Grid:
    """Read a Nanonis .3ds grid (all channels, parameters and header, partial grids too)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpectroscopyFileError(f"{path}: cannot read .3ds file: {exc}") from exc
    if not raw.startswith(b"Grid dim="):
        raise SpectroscopyFileError(f"{path}: not a Nanonis .3ds grid (does not start with 'Grid dim=')")
    tag = raw.find(_END.encode())
    if tag < 0:
        raise SpectroscopyFileError(f"{path}: header has no {_END} line (file truncated or not a .3ds)")
    data_at = raw.find(b"\n", tag)
    if data_at < 0:
        raise SpectroscopyFileError(f"{path}: file ends at {_END}: no data")
    pairs = _grid_header(path, _decode(raw[: data_at + 1]))
    head = dict(pairs)

    def need(key: str) -> str:
        if key not in head:
            raise SpectroscopyFileError(f"{path}: header has no '{key}' entry")
        return head[key]

    def integer(key: str, lo: int) -> int:
        text = need(key).strip()
        if not text.isdigit() or int(text) < lo:
            raise SpectroscopyFileError(f"{path}: bad '{key}' {text!r}: expected an integer >= {lo}")
        return int(text)

    dims = [p.strip() for p in need("Grid dim").split("x")]
    if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise SpectroscopyFileError(f"{path}: bad 'Grid dim' {head['Grid dim']!r}: expected 'NX x NY'")
    nx, ny = int(dims[0]), int(dims[1])
    try:
        settings = [float(v) for v in need("Grid settings").split(";")]
    except ValueError:
        settings = []
    if len(settings) != 5 or not all(math.isfinite(v) for v in settings):
        raise SpectroscopyFileError(
            f"{path}: bad 'Grid settings' {head['Grid settings']!r}: expected centre x;centre y;width;height;angle"
        )
    fixed = [n for n in need("Fixed parameters").split(";") if n]
    experiment = [n for n in need("Experiment parameters").split(";") if n]
    n_params = integer("# Parameters (4 byte)", 0)
    if n_params != len(fixed) + len(experiment):
        raise SpectroscopyFileError(
            f"{path}: '# Parameters (4 byte)' is {n_params} but {len(fixed)} fixed and "
            f"{len(experiment)} experiment parameters are named"
        )
    names = fixed + experiment
    if len(set(names)) != len(names) or not names:
        raise SpectroscopyFileError(f"{path}: parameter names {names} must be non-empty and distinct")
    points = integer("Points", 1)
    channels = [n for n in need("Channels").split(";") if n]
    if not channels or len(set(channels)) != len(channels):
        raise SpectroscopyFileError(f"{path}: 'Channels' {head['Channels']!r} must name distinct channels")
    if "Experiment size (bytes)" in head and integer("Experiment size (bytes)", 0) != 4 * points * len(channels):
        raise SpectroscopyFileError(
            f"{path}: 'Experiment size (bytes)' {head['Experiment size (bytes)']} is not "
            f"4 x {points} points x {len(channels)} channels"
        )

    body = raw[data_at + 1 :]
    per_point = n_params + points * len(channels)
    if len(body) % 4:
        raise SpectroscopyFileError(f"{path}: data of {len(body)} bytes is not whole float32 values (truncated)")
    values = np.frombuffer(body, dtype=">f4").astype(np.float32)
    whole, rest = divmod(len(values), per_point)
    if rest:
        raise SpectroscopyFileError(
            f"{path}: truncated inside grid point {whole + 1} of {nx * ny} ({rest} of its {per_point} values)"
        )
    if whole > nx * ny:
        raise SpectroscopyFileError(f"{path}: data holds {whole} points but 'Grid dim' is {nx} x {ny}")
    # A grid stopped early ends after its last point; the rest were never measured.
    grid = np.full((nx * ny, per_point), np.nan, np.float32)
    grid[:whole] = values.reshape(whole, per_point)
    unmeasured = np.all(grid == 0, axis=1) | np.all(np.isnan(grid), axis=1)
    grid[unmeasured] = np.nan
    grid = grid.reshape(ny, nx, per_point)
    return Grid(
        channels={
            c: grid[:, :, n_params + i * points : n_params + (i + 1) * points].copy() for i, c in enumerate(channels)
        },
        parameters={n: grid[:, :, i].copy() for i, n in enumerate(names)},
        fixed_parameters=tuple(fixed),
        center_m=(settings[0], settings[1]),
        size_m=(settings[2], settings[3]),
        angle_deg=settings[4],
        sweep_signal=need("Sweep Signal"),
        header={k: v for k, v in pairs if k not in _GRID_STRUCTURE},
        path=path,
    )


def write_3ds(path: str | os.PathLike, grid: Grid) -> Path:
    """Write ``grid`` as a Nanonis .3ds (readable by nanonispy and Nanonis); the points
    after the last measured one are left out, as Nanonis leaves a stopped grid."""
    path = Path(path)
    if not grid.channels or not grid.parameters:
        raise SpectroscopyFileError(f"{path}: grid needs at least one channel and one parameter")
    ny, nx = grid.shape
    points = grid.points
    unknown = [n for n in grid.fixed_parameters if n not in grid.parameters]
    if unknown:
        raise SpectroscopyFileError(f"{path}: fixed parameters {unknown} have no values")
    order = list(grid.fixed_parameters) + list(grid.experiment_parameters)
    columns = []  # per point: the parameters (fixed first), then each channel's sweep
    for what, arrays, names, shape in (
        ("parameter", grid.parameters, order, (ny, nx)),
        ("channel", grid.channels, list(grid.channels), (ny, nx, points)),
    ):
        for name in names:
            _check_text(path, what, name, ';"\r\n=')
            if np.shape(arrays[name]) != shape:
                raise SpectroscopyFileError(
                    f"{path}: {what} {name!r} has shape {np.shape(arrays[name])}, expected {shape}"
                )
            columns.append(np.asarray(arrays[name], dtype=np.float32).reshape(ny * nx, -1))
    data = np.concatenate(columns, axis=1)
    done = np.flatnonzero(grid.measured.reshape(-1))
    data = data[: done[-1] + 1] if len(done) else data[:0]

    head = {
        "Grid dim": f"{nx} x {ny}",
        "Grid settings": ";".join(nanonis_float(v) for v in (*grid.center_m, *grid.size_m, grid.angle_deg)),
        "Sweep Signal": grid.sweep_signal,
        "Fixed parameters": ";".join(grid.fixed_parameters),
        "Experiment parameters": ";".join(grid.experiment_parameters),
        "# Parameters (4 byte)": str(len(order)),
        "Experiment size (bytes)": str(4 * points * len(grid.channels)),
        "Points": str(points),
        "Channels": ";".join(grid.channels),
    }
    now = _dt.datetime.now().strftime(_TIME_FORMAT)
    for key, value in {
        "Delay before measuring (s)": "0.000000E+0",
        "Experiment": "Grid Spectroscopy",
        "Start time": now,
        "End time": now,
        "User": "",
        "Comment": "",
    }.items():
        head[key] = grid.header.get(key, value)
    for key, value in grid.header.items():
        if key in _GRID_STRUCTURE:
            raise SpectroscopyFileError(f"{path}: header key {key!r} comes from the grid's fields; drop it")
        head.setdefault(key, value)
    keys = [k for k in _GRID_ORDER if k in head] + [k for k in head if k not in _GRID_ORDER]
    lines = []
    for key in keys:
        _check_text(path, "header key", key, "=\r\n")
        value = _check_text(path, f"header value of {key!r}", head[key], '\r\n"')
        quote = value and (key in _ALWAYS_QUOTED or " " in value)
        lines.append(f'{key}="{value}"' if quote else f"{key}={value}")
    text = "\r\n".join(lines + [_END, ""])
    try:
        encoded = text.encode("latin-1")  # Nanonis writes its headers in ANSI
    except UnicodeEncodeError as exc:
        raise SpectroscopyFileError(f"{path}: header text {exc.object[exc.start : exc.end]!r} is not latin-1") from None
    return _write_atomically(path, encoded + data.astype(">f4").tobytes())


# ------------------------------------------------------------------------------ .dat


@dataclass(eq=False)
class Spectrum:
    """One Nanonis spectrum (.dat): ``data`` maps each column name to its values (float64),
    in file order, the sweep signal first; ``header`` every entry before [DATA], in order."""

    data: dict[str, np.ndarray]
    header: dict[str, str] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    @property
    def sweep_signal(self) -> str:
        return next(iter(self.data))

    @property
    def sweep(self) -> np.ndarray:
        return self.data[self.sweep_signal]

    @property
    def channels(self) -> tuple[str, ...]:
        """The recorded channels (every column but the sweep)."""
        return tuple(self.data)[1:]

    @property
    def experiment(self) -> str:
        return self.header.get("Experiment", "")

    @property
    def position_m(self) -> tuple[float | None, float | None, float | None]:
        """X (m), Y (m), Z (m) of the header (None where not recorded or not a number)."""

        def number(key):
            try:
                return float(self.header[key])
            except (KeyError, ValueError):
                return None

        return number("X (m)"), number("Y (m)"), number("Z (m)")

    def channel(self, name: str) -> np.ndarray:
        """One column by its name, with or without the unit."""
        return self.data[_lookup(self.path, list(self.data), name, "channel")]


def make_spectrum(
    sweep,
    channels: Mapping[str, np.ndarray],
    *,
    position_m,
    sweep_signal: str = "Bias calc (V)",
    experiment: str = "bias spectroscopy",
    header: Mapping[str, str] | None = None,
    date: _dt.datetime | None = None,
) -> Spectrum:
    """A bias-spectroscopy :class:`Spectrum` with the general header Nanonis writes.

    ``channels``: name with unit ("Current (A)", "LI Demod 1 X (A)") -> values at each sweep
    point; ``position_m``: the tip's (x, y, z); ``header``: module settings and the like
    ("Bias Spectroscopy>Sweep Start (V)": ..., "Z-Controller>Setpoint": ...), added after them.
    """
    sweep = np.asarray(sweep, dtype=float)
    if sweep.ndim != 1 or len(sweep) < 2:
        raise SpectroscopyFileError(f"a spectrum needs a sweep of >= 2 points, got shape {sweep.shape}")
    if not channels:
        raise SpectroscopyFileError("a spectrum needs at least one channel")
    data = {sweep_signal: sweep}
    for name, values in channels.items():
        values = np.asarray(values, dtype=float)
        if values.shape != sweep.shape:
            raise SpectroscopyFileError(f"channel {name!r} has shape {values.shape}, the sweep {sweep.shape}")
        data[name] = values
    x, y, z = (nanonis_float(v) for v in position_m)
    head = {
        "Experiment": experiment,
        "Date": (date or _dt.datetime.now()).strftime(_TIME_FORMAT),
        "User": "",
        "X (m)": x,
        "Y (m)": y,
        "Z (m)": z,
        "Z offset (m)": "0E+0",
        "Settling time (s)": "0E+0",
        "Integration time (s)": "0E+0",
        "Z-Ctrl hold": "TRUE",
        "Final Z (m)": "N/A",
        "Filter type": "None",
        "Order": "",
        "Cutoff frq": "",
    }
    head.update(header or {})
    return Spectrum(data=data, header=head)


def read_dat(path: str | os.PathLike) -> Spectrum:
    """Read a Nanonis .dat spectrum (bias or Z spectroscopy, sweeper): every column and
    every header entry."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpectroscopyFileError(f"{path}: cannot read .dat file: {exc}") from exc
    lines = _decode(raw).splitlines()
    if not lines or not lines[0].startswith("Experiment\t"):
        raise SpectroscopyFileError(
            f"{path}: not a Nanonis spectrum file (.dat): it does not start with 'Experiment<TAB>'"
        )
    try:
        at = next(i for i, line in enumerate(lines) if line.strip() == _DATA)
    except StopIteration:
        raise SpectroscopyFileError(f"{path}: no {_DATA} line (file truncated or not a .dat)") from None
    header = {}
    for i, line in enumerate(lines[:at]):
        if not line.strip():
            continue
        if "\t" not in line:
            raise SpectroscopyFileError(f"{path}: header line {i + 1} {line[:60]!r} is not 'key<TAB>value'")
        key, value = line.split("\t", 1)
        header[key] = value[:-1] if value.endswith("\t") else value
    if at + 1 >= len(lines) or not lines[at + 1].strip():
        raise SpectroscopyFileError(f"{path}: no column names after {_DATA} (file truncated)")
    columns = lines[at + 1].rstrip("\t").split("\t")
    if len(set(columns)) != len(columns) or not all(columns):
        raise SpectroscopyFileError(f"{path}: column names {columns} must be non-empty and distinct")
    rows = []
    for i, line in enumerate(lines[at + 2 :], start=at + 3):
        if not line.strip():
            continue
        cells = line.rstrip("\t").split("\t")
        if len(cells) != len(columns):
            raise SpectroscopyFileError(
                f"{path}: data line {i} has {len(cells)} values, expected {len(columns)} (file truncated?)"
            )
        try:
            rows.append([float(c) for c in cells])
        except ValueError:
            raise SpectroscopyFileError(f"{path}: data line {i} holds a value that is not a number") from None
    if not rows:
        raise SpectroscopyFileError(f"{path}: no data rows after the column names")
    table = np.array(rows, dtype=float)
    return Spectrum(data={c: table[:, k].copy() for k, c in enumerate(columns)}, header=header, path=path)


def write_dat(path: str | os.PathLike, spectrum: Spectrum) -> Path:
    """Write ``spectrum`` as a Nanonis .dat (CRLF, tab-separated; readable by nanonispy),
    the header in its own order."""
    path = Path(path)
    if len(spectrum.data) < 2:
        raise SpectroscopyFileError(f"{path}: a spectrum needs its sweep and at least one channel")
    lengths = {np.shape(v) for v in spectrum.data.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1 or not next(iter(lengths))[0]:
        raise SpectroscopyFileError(f"{path}: columns must be 1-D and equally long, got shapes {lengths}")
    if "Experiment" not in spectrum.header:
        raise SpectroscopyFileError(f"{path}: header needs an 'Experiment' entry (readers identify .dat files by it)")
    out = []
    for key in spectrum.header:
        _check_text(path, "header key", key, "\t\r\n")
        value = _check_text(path, f"header value of {key!r}", spectrum.header[key], "\r\n")
        out.append(f"{key}\t{value}\t")
    out += ["", _DATA, "\t".join(_check_text(path, "column name", c, "\t\r\n") for c in spectrum.data)]
    table = np.stack([np.asarray(v, dtype=float) for v in spectrum.data.values()], axis=1)
    out += [
        "\t".join(
            nanonis_float(v) if math.isfinite(v) else ("NaN" if math.isnan(v) else ("Inf" if v > 0 else "-Inf"))
            for v in row
        )
        for row in table
    ]
    try:
        encoded = ("\r\n".join(out) + "\r\n").encode("latin-1")
    except UnicodeEncodeError as exc:
        raise SpectroscopyFileError(f"{path}: text {exc.object[exc.start : exc.end]!r} is not latin-1") from None
    return _write_atomically(path, encoded)
