"""Serve a recorded .sxm scan through the simulated controller (``--replay FILE.sxm``).

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
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["ReplayError", "ReplaySource", "not_a_scan"]

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


def not_a_scan(path) -> str | None:
    """One line saying why ``path`` is not a .sxm scan (naming the Nanonis format it is),
    or None when it looks like one (the .sxm reader then judges its contents)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
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
            raise ReplayError(f"{name}: recording has no data (pixels={scan.pixels}, lines={scan.lines}, "
                              f"channels={list(scan.channels)})")
        self.lines_recorded = int(scan.lines_scanned)
        if self.lines_recorded == 0:
            raise ReplayError(f"{name}: recording holds no scanned line (every row is NaN)")
        line_time = scan.line_time_s
        if line_time is None:
            log.warning("%s records no SCAN_TIME/ACQ_TIME; replaying at %.3g s per line", name,
                        DEFAULT_LINE_TIME_S)
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
    def from_file(cls, path) -> "ReplaySource":
        from stm_live.io.sxm import SxmError, read_sxm

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
        from stm_live.io.sxm import SxmError, _parse_data_info

        table = self.scan.header.get("DATA_INFO", "")
        if not table.strip():
            log.warning("%s: no DATA_INFO table; serving channels %s by name", self.name,
                        list(self.scan.channels))
            return {}
        try:
            rows = _parse_data_info(Path(self.name), table)
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
                log.warning("%s: DATA_INFO %s for %r; serving it by name instead",
                            self.name, why, name)
                continue
            out[name], owner[idx] = idx, name
        listed = {r["Name"] for r in rows}
        missing = [n for n in self.scan.channels if n not in listed]
        if missing:
            log.warning("%s: DATA_INFO declares no index for %s; serving by name", self.name,
                        missing)
        return out

    def configure(self, controller) -> None:
        """Put the recording's frame, buffer, timing and channel names into ``controller``."""
        from stm_live.simulators.controller import _split_name

        s = self.scan
        names = list(controller.signal_names)
        defaults = list(names)
        declared = self.declared_indexes()
        used = set(declared.values())
        by_base = {_split_name(n)[0].lower(): i for i, n in enumerate(names)}
        index_of: dict[str, int] = {}
        for ch in s.channels:  # DATA_INFO order, as Scan.BufferGet lists them
            idx = declared.get(ch)
            if idx is None:
                idx = by_base.get(ch.lower())
                if idx is None or idx in used:
                    free = [i for i in range(_FIRST_FREE_INDEX, N_SIGNALS)
                            if defaults[i].startswith("Internal ") and i not in used]
                    if not free:
                        raise ReplayError(f"{self.name}: too many channels to map onto "
                                          f"{N_SIGNALS} signals")
                    idx = free[0]
            used.add(idx)
            index_of[ch] = idx
        for ch, idx in index_of.items():
            unit = s.units.get(ch, "")
            names[idx] = f"{ch} ({unit})" if unit else ch
        # A client that looks channels up by name must find each replayed one once.
        replayed = {ch.lower() for ch in index_of}
        for i, n in enumerate(names):
            if i not in used and _split_name(n)[0].lower() in replayed:
                names[i] = f"Internal {i} (V)"
        for ch, idx in index_of.items():
            dirs = s.channels[ch]
            nan = np.full((s.lines, s.pixels), np.nan, np.float32)
            fwd = np.asarray(dirs.get("forward", nan), np.float32)
            bwd = np.asarray(dirs.get("backward", nan), np.float32)
            if fwd.shape != (s.lines, s.pixels) or bwd.shape != (s.lines, s.pixels):
                raise ReplayError(f"{self.name}: channel {ch!r} has shape {fwd.shape}/{bwd.shape}, "
                                  f"header says {(s.lines, s.pixels)}")
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
