"""Serve a recorded .sxm scan through the simulated controller (``--replay FILE.sxm``).

The controller takes frame, buffer (pixels, lines, channels), scan direction, bias,
Z-controller state and line time from the file, and its scan clock fills the buffer with
the recorded rows at the recorded pace (SCAN_TIME, else ACQ_TIME / lines, scaled by
``time_scale``), so Scan.FrameDataGrab returns the recorded float32 values bit for bit in
wire orientation. Channels map to signal indexes by name ("Current" -> 0, "Z" -> 30,
"Bias" -> 24, ...); names the controller does not know get free internal indexes (40+)
and appear under that name in Signals.NamesGet. A partial recording (NaN rows at the end)
ends the scan after its last recorded line; a single-direction recording serves NaN rows
for the missing direction.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["ReplayError", "ReplaySource"]

log = logging.getLogger(__name__)

DEFAULT_LINE_TIME_S = 0.2  # forward + backward, when the file records no timing
_FIRST_FREE_INDEX = 40


class ReplayError(ValueError):
    """A recording that cannot be replayed; the message names the file."""


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
        self._data: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_file(cls, path) -> "ReplaySource":
        from stm_live.io.sxm import SxmError, read_sxm

        path = Path(path)
        try:
            scan = read_sxm(path)
        except SxmError as exc:
            msg = str(exc)
            raise ReplayError(msg if str(path) in msg or path.name in msg else f"{path}: {msg}") from None
        except OSError as exc:
            raise ReplayError(f"{path}: cannot read recording ({exc.strerror or exc})") from None
        return cls(scan, name=str(path))

    def configure(self, controller) -> None:
        """Put the recording's frame, buffer, timing and channel names into ``controller``."""
        from stm_live.simulators.controller import _split_name

        s = self.scan
        names = list(controller.signal_names)
        by_base = {_split_name(n)[0].lower(): i for i, n in enumerate(names)}
        for ch in s.channels:
            idx = by_base.get(ch.lower())
            if idx is None or idx in self._data:
                free = [i for i in range(_FIRST_FREE_INDEX, 128)
                        if names[i].startswith("Internal ") and i not in self._data]
                if not free:
                    raise ReplayError(f"{self.name}: too many channels to map onto 128 signals")
                idx = free[0]
                unit = s.units.get(ch, "")
                names[idx] = f"{ch} ({unit})" if unit else ch
            self.index_of[ch] = idx
            dirs = s.channels[ch]
            nan = np.full((s.lines, s.pixels), np.nan, np.float32)
            fwd = np.asarray(dirs.get("forward", nan), np.float32)
            bwd = np.asarray(dirs.get("backward", nan), np.float32)
            if fwd.shape != (s.lines, s.pixels) or bwd.shape != (s.lines, s.pixels):
                raise ReplayError(f"{self.name}: channel {ch!r} has shape {fwd.shape}/{bwd.shape}, "
                                  f"header says {(s.lines, s.pixels)}")
            self._data[idx] = (fwd, bwd)
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

    @property
    def direction(self) -> str:
        return self.scan.direction

    def rows(self, line: int, channels) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Recorded row ``line`` (internal orientation) of each channel, both directions."""
        return {c: (self._data[c][0][line], self._data[c][1][line]) for c in channels if c in self._data}
