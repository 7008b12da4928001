"""Serve a recording through the simulated controller (``--replay FILE``): a .sxm scan
(``ReplaySource``) or a .3ds grid (``GridReplaySource``); ``open_replay`` tells them apart.

The controller takes frame (centre, SCAN_RANGE width x height, SCAN_ANGLE), buffer
(pixels, lines, channels), scan direction, bias, Z-controller state and line time from the
file, and its scan clock fills the buffer with the recorded rows at the recorded pace
(SCAN_TIME, else ACQ_TIME / lines, scaled by ``time_scale``), so Scan.FrameDataGrab
returns the recorded float32 values bit for bit in wire orientation.

Every channel is served under the signal index the file declares in DATA_INFO's Channel
column (Z at 14, a lock-in at 86, ... as on the instrument that recorded it), and
Signals.NamesGet shows the file's "name (unit)" there; Scan.BufferGet lists those indexes
in DATA_INFO order. Only where that index is unusable (missing, not an integer, outside
0..127, or already taken by an earlier channel; logged) does a channel fall back to the
simulator's own index for its name ("Current" -> 0, "Z" -> 30, ...) or a free internal
index (40+). A simulator name that would then appear twice is renamed "Internal N".

A partial recording (NaN rows at the end) ends the scan after its last recorded line; one
stopped during a backward sweep (last row: forward data, backward NaN) ends after that
row's forward half; a single-direction recording serves NaN rows for the missing direction.

A grid is served point by point: the Pattern grid, scan frame, BiasSpectr limits, points,
channels and timing come from the file, and BiasSpectr.Start with the tip at a grid point
(within a quarter of the grid's pitch) answers that point's recorded sweep, every channel
under its recorded name, the file's experiment parameters as its parameters. Elsewhere, or
at a point the recording never reached, it answers an error naming the nearest point.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stm_live.io.spectroscopy import SpectroscopyFileError, read_3ds, split_unit
from stm_live.io.sxm import SxmError, parse_data_info, read_sxm
from stm_live.simulators.modules import ControllerError

__all__ = ["GridReplaySource", "ReplayError", "ReplaySource", "is_grid", "not_a_scan", "open_replay"]

log = logging.getLogger(__name__)

DEFAULT_LINE_TIME_S = 0.2  # forward + backward, when the file records no timing
_FIRST_FREE_INDEX = 40
N_SIGNALS = 128  # Nanonis RT signal indexes 0..127


class ReplayError(ValueError):
    """A recording that cannot be replayed; the message names the file."""


# Other Nanonis formats, told apart by their first bytes (then by suffix): what a user may
# give replay by mistake deserves its name, not "not a Nanonis .sxm".
_OTHER_FORMATS = (
    ((b"Grid dim=", b":HEADER_END:"), ".3ds", "a Nanonis grid-spectroscopy file (.3ds)"),
    ((b"Experiment\t", b"[DATA]"), ".dat", "a Nanonis spectroscopy file (.dat)"),
    ((b"[ParCount]", b"[SPEC_DATA]"), ".nsp", "a Nanonis long-term spectrum (.nsp)"),
)
_SNIFF_BYTES = 4096


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_SNIFF_BYTES)


def is_grid(path) -> bool:
    """Whether ``path`` is a .3ds file holding a Nanonis grid (replayed by ``GridReplaySource``);
    a grid saved under another suffix stays a file given by mistake."""
    path = Path(path)
    try:
        return path.suffix.lower() == ".3ds" and _head(path).startswith(b"Grid dim=")
    except OSError:
        return False


def open_replay(source):
    """The replay of ``source``: a ReplaySource / GridReplaySource as given, a .3ds grid, or a .sxm scan."""
    if isinstance(source, (ReplaySource, GridReplaySource)):
        return source
    return GridReplaySource.from_file(source) if is_grid(source) else ReplaySource.from_file(source)


def not_a_scan(path) -> str | None:
    """One line saying why ``path`` is not a .sxm scan (naming the Nanonis format it is),
    or None when it looks like one (the .sxm reader then judges its contents)."""
    path = Path(path)
    try:
        head = _head(path)
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
    if head.lstrip().startswith(b":NANONIS_VERSION:"):
        return None
    suffix = path.suffix.lower()
    for marks, ext, what in _OTHER_FORMATS:
        if any(m in head for m in marks) or suffix == ext:
            return f"{path}: {what}; replay takes .sxm scans"
    if suffix != ".sxm":
        return f"{path}: not a .sxm scan (suffix {suffix or 'none'!r}); replay takes .sxm scans"
    return None


class ReplaySource:
    """A recorded scan, ready to be served line by line."""

    def __init__(self, scan, name: str = "<scan>"):
        self.scan = scan
        self.name = name
        if scan.pixels < 1 or scan.lines < 1 or not scan.channels:
            raise ReplayError(
                f"{name}: recording has no data (pixels={scan.pixels}, lines={scan.lines}, "
                f"channels={list(scan.channels)})"
            )
        self.lines_recorded = int(scan.lines_scanned)
        if self.lines_recorded == 0:
            raise ReplayError(f"{name}: recording holds no scanned line (every row is NaN)")
        line_time = scan.line_time_s
        if line_time is None:
            log.warning("%s records no SCAN_TIME/ACQ_TIME; replaying at %.3g s per line", name, DEFAULT_LINE_TIME_S)
            line_time = DEFAULT_LINE_TIME_S
        st = scan.scan_time_s
        if st is not None and st[0] > 0 and st[1] > 0:
            self.t_fwd, self.t_bwd = float(st[0]), float(st[1])
        else:
            self.t_fwd = self.t_bwd = line_time / 2.0
        self.index_of: dict[str, int] = {}
        self.halves_recorded = 2 * self.lines_recorded
        self._data: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_file(cls, path) -> ReplaySource:
        path = Path(path)
        why = not_a_scan(path)
        if why is not None:
            raise ReplayError(why)
        try:
            scan = read_sxm(path)
        except SxmError as exc:
            msg = str(exc)
            raise ReplayError(msg if str(path) in msg or path.name in msg else f"{path}: {msg}") from None
        except OSError as exc:
            raise ReplayError(f"{path}: cannot read recording ({exc.strerror or exc})") from None
        return cls(scan, name=str(path))

    def declared_indexes(self) -> dict[str, int]:
        """Channel name -> the usable signal index DATA_INFO declares for it; every
        unusable one is logged with the reason and left to the name-based fallback."""
        table = self.scan.header.get("DATA_INFO", "")
        if not table.strip():
            log.warning("%s: no DATA_INFO table; serving channels %s by name", self.name, list(self.scan.channels))
            return {}
        try:
            rows = parse_data_info(Path(self.name), table)
        except SxmError as exc:
            log.warning("%s; serving every channel by name", exc)
            return {}
        out: dict[str, int] = {}
        owner: dict[int, str] = {}
        for row in rows:
            name, raw = row["Name"], row["Channel"].strip()
            if name not in self.scan.channels or name in out:
                continue
            why = None
            try:
                idx = int(raw)
            except ValueError:
                why = f"Channel {raw!r} is not an integer"
            else:
                if not 0 <= idx < N_SIGNALS:
                    why = f"Channel {idx} is outside 0..{N_SIGNALS - 1}"
                elif idx in owner:
                    why = f"Channel {idx} is already declared for {owner[idx]!r}"
            if why:
                log.warning("%s: DATA_INFO %s for %r; serving it by name instead", self.name, why, name)
                continue
            out[name], owner[idx] = idx, name
        listed = {r["Name"] for r in rows}
        missing = [n for n in self.scan.channels if n not in listed]
        if missing:
            log.warning("%s: DATA_INFO declares no index for %s; serving by name", self.name, missing)
        return out

    def configure(self, controller) -> None:
        """Put the recording's frame, buffer, timing and channel names into ``controller``."""
        s = self.scan
        names = list(controller.signal_names)
        defaults = list(names)
        declared = self.declared_indexes()
        used = set(declared.values())
        by_base = {split_unit(n)[0].lower(): i for i, n in enumerate(names)}
        index_of: dict[str, int] = {}
        for ch in s.channels:  # DATA_INFO order, as Scan.BufferGet lists them
            idx = declared.get(ch)
            if idx is None:
                idx = _index_by_name(ch, by_base, defaults, used, self.name)
            used.add(idx)
            index_of[ch] = idx
        _rename(names, {ch: (idx, s.units.get(ch, "")) for ch, idx in index_of.items()}, used)
        for ch, idx in index_of.items():
            dirs = s.channels[ch]
            nan = np.full((s.lines, s.pixels), np.nan, np.float32)
            fwd = np.asarray(dirs.get("forward", nan), np.float32)
            bwd = np.asarray(dirs.get("backward", nan), np.float32)
            if fwd.shape != (s.lines, s.pixels) or bwd.shape != (s.lines, s.pixels):
                raise ReplayError(
                    f"{self.name}: channel {ch!r} has shape {fwd.shape}/{bwd.shape}, header says {(s.lines, s.pixels)}"
                )
            self._data[idx] = (fwd, bwd)
        self.index_of = index_of
        self.halves_recorded = self._halves_recorded()
        controller.signal_names = names
        w, h = s.range_m
        cx, cy = s.offset_m
        controller.frame = (float(cx), float(cy), float(w), float(h), float(s.angle_deg))
        controller.pixels, controller.lines = int(s.pixels), int(s.lines)
        controller.channel_indexes = list(self._data)
        controller.direction = s.direction
        if s.bias_V:
            controller.bias_V = float(s.bias_V)
        if s.feedback_on is not None:
            controller.z_ctrl_on = bool(s.feedback_on)
        if s.setpoint_A:
            controller.setpoint_A = float(s.setpoint_A)
        controller._t_fwd, controller._t_bwd = self.t_fwd, self.t_bwd
        controller._keep_time = True

    def _halves_recorded(self) -> int:
        """End-of-line events the recording holds: two per recorded line, one fewer when
        the scan was stopped during the last line's backward sweep (no backward data in
        that row for any channel that records backward)."""
        last = self.lines_recorded - 1
        backward = [b for _f, b in self._data.values() if np.isfinite(b).any()]
        if backward and not any(np.isfinite(b[last]).any() for b in backward):
            return 2 * self.lines_recorded - 1
        return 2 * self.lines_recorded

    @property
    def direction(self) -> str:
        return self.scan.direction

    def rows(self, line: int, channels) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Recorded row ``line`` (internal orientation) of each channel, both directions."""
        return {c: (self._data[c][0][line], self._data[c][1][line]) for c in channels if c in self._data}


def _index_by_name(base: str, by_base: dict[str, int], defaults, used: set[int], source: str) -> int:
    """The simulator's own signal index for a channel named ``base`` ("Current" -> 0), or
    (unknown, or taken) a free internal index (40+)."""
    idx = by_base.get(base.lower())
    if idx is None or idx in used:
        free = [i for i in range(_FIRST_FREE_INDEX, N_SIGNALS) if defaults[i].startswith("Internal ") and i not in used]
        if not free:
            raise ReplayError(f"{source}: too many channels to map onto {N_SIGNALS} signals")
        idx = free[0]
    return idx


def _rename(names: list[str], served: dict[str, tuple[int, str]], used: set[int]) -> None:
    """Signals.NamesGet shows each replayed channel, ``{base: (index, unit)}``, at its index as
    "base (unit)"; a client that looks channels up by name must find each one once, so
    another signal of the same name becomes "Internal N"."""
    for base, (idx, unit) in served.items():
        names[idx] = f"{base} ({unit})" if unit else base
    replayed = {base.lower() for base in served}
    for i, n in enumerate(names):
        if i not in used and split_unit(n)[0].lower() in replayed:
            names[i] = f"Internal {i} (V)"


class GridReplaySource:
    """A recorded .3ds grid, served point by point (see the module docstring)."""

    def __init__(self, grid, name: str = "<grid>"):
        self.grid, self.name = grid, name
        try:
            self.sweep = grid.sweep.astype(np.float64)  # raises for a grid with no measured point
            xs, ys = grid.parameter("X").astype(np.float64), grid.parameter("Y").astype(np.float64)
        except SpectroscopyFileError as exc:
            raise ReplayError(str(exc)) from None
        # where each point is: recorded X/Y where measured, the grid's geometry where not
        ny, nx = grid.shape
        cx, cy = grid.center_m
        w, h = grid.size_m
        u = (np.arange(nx) + 0.5) / nx * w - w / 2
        v = -h / 2 + (np.arange(ny) + 0.5) / ny * h
        if grid.direction == "down":
            v = v[::-1]
        uu, vv = np.meshgrid(u, v)
        a = np.radians(grid.angle_deg)  # clockwise positive
        gx, gy = cx + uu * np.cos(a) + vv * np.sin(a), cy - uu * np.sin(a) + vv * np.cos(a)
        done = grid.measured
        self.x, self.y = np.where(done, xs, gx), np.where(done, ys, gy)
        pitch = [d / k for d, k in ((w, nx), (h, ny)) if d > 0 and k > 1]
        self.tolerance_m = 0.25 * min(pitch) if pitch else 1e-11
        self.fixed = tuple(grid.fixed_parameters)
        self.forward = [n for n in grid.channels if "[" not in split_unit(n)[0]]  # not [bwd], [AVG], ...
        self.split = split_unit

    @classmethod
    def from_file(cls, path) -> GridReplaySource:
        path = Path(path)
        try:
            grid = read_3ds(path)
        except SpectroscopyFileError as exc:
            raise ReplayError(str(exc)) from None
        return cls(grid, name=str(path))

    def configure(self, controller) -> None:
        """Put the grid's geometry, sweep, channels and timing into ``controller``."""
        g, m = self.grid, controller.modules
        ny, nx = g.shape
        geometry = [*g.center_m, *g.size_m, g.angle_deg]
        if g.size_m[0] > 0 and g.size_m[1] > 0:
            controller.frame = tuple(float(v) for v in geometry)
        m.pattern["grid"], m.pattern["active"] = [nx, ny, *geometry], 1
        m.plain["bs.limits"].update(start=float(self.sweep[0]), end=float(self.sweep[-1]))
        m.plain["bs.mls_mode"]["mode"] = "Linear"
        m.bs["points"] = len(self.sweep)
        m.bs["backward"] = int(any("[bwd]" in n for n in g.channels))
        names = list(controller.signal_names)
        defaults = list(names)
        by_base = {self.split(n)[0].lower(): i for i, n in enumerate(names)}
        used: set[int] = set()
        served = {}
        for full in self.forward:
            base, unit = self.split(full)
            idx = _index_by_name(base, by_base, defaults, used, self.name)
            used.add(idx)
            served[base] = (idx, unit)
        _rename(names, served, used)
        controller.signal_names = names
        m.bs["channels"] = [idx for idx, _unit in served.values()]
        iy, ix = np.argwhere(g.measured)[0]
        timing = m.plain["bs.timing"]
        for key, param in (("settling", "Settling time (s)"), ("integration", "Integration time (s)")):
            if param in g.parameters and np.isfinite(g.parameters[param][iy, ix]):
                timing[key] = float(g.parameters[param][iy, ix])
        for attr, key in (("bias_V", "Bias>Bias (V)"), ("setpoint_A", "Z-Controller>Setpoint")):
            try:
                value = float(g.header.get(key, "nan"))
            except ValueError:
                continue
            if np.isfinite(value) and (attr == "bias_V" or value > 0):
                setattr(controller, attr, value)
        controller.folme_xy = (float(self.x[iy, ix]), float(self.y[iy, ix]))

    def sweep_at(self, x_m: float, y_m: float):
        """(sweep V, {channel name: values}, {experiment parameter: value}) recorded at the grid
        point under the tip; ControllerError when there is none, or it was not measured."""
        d = np.hypot(self.x - x_m, self.y - y_m)
        iy, ix = np.unravel_index(int(np.argmin(d)), d.shape)
        near = f"({self.x[iy, ix] * 1e9:.4g}, {self.y[iy, ix] * 1e9:.4g}) nm"
        if d[iy, ix] > self.tolerance_m:
            raise ControllerError(
                f"replaying {self.name}: no grid point under the tip at ({x_m * 1e9:.4g}, "
                f"{y_m * 1e9:.4g}) nm; the nearest is point ({ix}, {iy}) at {near}"
            )
        if not self.grid.measured[iy, ix]:
            raise ControllerError(
                f"replaying {self.name}: grid point ({ix}, {iy}) at {near} was not measured "
                "(the recording stopped before it)"
            )
        channels = {name: values[iy, ix] for name, values in self.grid.channels.items()}
        params = {
            name: float(values[iy, ix]) for name, values in self.grid.parameters.items() if name not in self.fixed
        }
        return self.sweep, channels, params
