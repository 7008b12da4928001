"""ophyd (v1) devices for a Nanonis-controlled STM.

Every component is a real value on the controller: a small :class:`NanonisSignal` whose
``get``/``put`` are client calls (SI units, as Nanonis speaks). Profile limits are checked
in ``put``/``set`` *before* anything is sent. Structured settings (scan frame, buffer,
speed, tip shaper) are read-modify-write under the device's client lock, so a ``bps.mv``
that moves several fields at once cannot interleave two writes.

Line streaming is :class:`ScanLines` (``stm.lines``): ``trigger()`` returns a Status that
completes when the next scan line has finished on the controller; a background thread
(its own connections, via :class:`~stm_live.devices.client.LineFollower`) does all the
waiting, so nothing blocks the RunEngine loop.

Link faults. Every connection of the device (commands, line waits, grabs) reconnects on its
own and reports to one :class:`~stm_live.devices.client.LinkState`, ``stm.link``, for at most
``max_outage_s`` per outage (the profile's ``link.max_outage_s``). The lines the controller
scans meanwhile stay in its buffer and are taken from the next grab; a scan that stopped
during the outage is started again (the lines already delivered are kept). A
:class:`stm_live.suspenders.LinkSuspender` suspends the run while the link is down. When
the budget is spent the frame fails with :class:`ControllerLost` naming the line.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus, Kind, Signal

from stm_live.devices.client import (
    DEFAULT_MAX_OUTAGE_S,
    ActionUnconfirmed,
    ConnectionLost,
    LineFollower,
    LinkState,
    NanonisClient,
    NanonisError,
)
from stm_live.devices.signals import DIRECTION_SUFFIX, NanonisSignal, channel_key, run_in_thread
from stm_live.devices.spectroscopy import BiasSpectroscopy

logger = logging.getLogger(__name__)

__all__ = [
    "NanonisSTM",
    "NanonisSignal",
    "ScanLines",
    "ControllerLost",
    "LineTimeout",
    "STANDARD_CHANNELS",
    "channel_key",
]

# Usual Nanonis RT signal indexes (interfaces.md); a profile may override them.
STANDARD_CHANNELS = {"Current": 0, "Bias": 24, "Z": 30}
_STANDARD_UNITS = {"Current": "A", "Bias": "V", "Z": "m"}


class ControllerLost(ConnectionError):
    """The controller dropped (or stopped the scan) while a line was awaited."""


class LineTimeout(TimeoutError):
    """No scan line arrived within the line timeout while the scan was running."""


def _client_call(method: str, *args):
    return lambda stm: getattr(stm.client, method)(*args)


def _struct_field(getter: str, setter: str, field: str, cast=float, check=None, splat: bool = True):
    """read/write for one field of a structured Nanonis setting (read-modify-write).

    ``check(profile, new_struct)`` runs on the whole new setting before it is sent.
    """

    def read(stm):
        return getattr(getattr(stm.client, getter)(), field)

    def write(stm, value):
        new = dataclasses.replace(getattr(stm.client, getter)(), **{field: cast(value)})
        if check is not None and stm.profile is not None:
            check(stm.profile, new)
        send = getattr(stm.client, setter)
        send(*dataclasses.astuple(new)) if splat else send(new)

    return read, write


def _field_cpt(getter, setter, field, units, cast=float, check=None, splat=True, **kw):
    read, write = _struct_field(getter, setter, field, cast, check, splat)
    return Cpt(NanonisSignal, read=read, write=write, units=units, kind=Kind.config, **kw)


def _check_frame(profile, f) -> None:
    profile.check_frame(f.center_x, f.center_y, f.width, f.height)


def _check_shaper(profile, p) -> None:
    profile.check_bias(p.bias)
    profile.check_bias(p.bias_lift)


def _frame_cpt(field, units):
    return _field_cpt("scan_frame_get", "scan_frame_set", field, units, check=_check_frame)


def _shaper_cpt(field, units):
    return _field_cpt("tip_shaper_props_get", "tip_shaper_props_set", field, units, check=_check_shaper, splat=False)


class ScanFrame(Device):
    """Scan frame (Scan.FrameSet/Get): centre, size and angle, SI."""

    center_x = _frame_cpt("center_x", "m")
    center_y = _frame_cpt("center_y", "m")
    width = _frame_cpt("width", "m")
    height = _frame_cpt("height", "m")
    angle = _frame_cpt("angle_deg", "deg")

    def set(self, value) -> DeviceStatus:
        """Whole frame at once: ``(center_x, center_y, width, height, angle_deg)``, SI."""
        cx, cy, w, h, angle = (float(v) for v in value)
        stm = self.root
        if stm.profile is not None:
            stm.profile.check_frame(cx, cy, w, h)  # before anything is sent
        return run_in_thread(self, lambda: stm.client.scan_frame_set(cx, cy, w, h, angle))


class ScanBuffer(Device):
    """Scan buffer (Scan.BufferSet/Get): recorded channel indexes, pixels, lines."""

    channels = _field_cpt(
        "scan_buffer_get", "scan_buffer_set", "channel_indexes", "", cast=lambda v: tuple(int(i) for i in v)
    )
    pixels = _field_cpt("scan_buffer_get", "scan_buffer_set", "pixels", "", cast=int)
    lines = _field_cpt("scan_buffer_get", "scan_buffer_set", "lines", "", cast=int)

    def set(self, value) -> DeviceStatus:
        """Whole buffer at once: ``(channel_indexes, pixels, lines)``."""
        channels, pixels, lines = value
        channels = [int(c) for c in channels]
        stm = self.root
        if stm.profile is not None:
            stm.profile.check_pixels(int(pixels), int(lines))
        return run_in_thread(self, lambda: stm.client.scan_buffer_set(channels, int(pixels), int(lines)))


class ScanSpeed(Device):
    """Scan speed (Scan.SpeedSet/Get)."""

    forward_speed = _field_cpt("scan_speed_get", "scan_speed_set", "fwd_speed", "m/s")
    backward_speed = _field_cpt("scan_speed_get", "scan_speed_set", "bwd_speed", "m/s")
    forward_time = _field_cpt("scan_speed_get", "scan_speed_set", "fwd_time", "s")
    backward_time = _field_cpt("scan_speed_get", "scan_speed_set", "bwd_time", "s")


class TipShaper(Device):
    """Tip shaper settings (TipShaper.PropsSet/Get)."""

    switch_off_delay = _shaper_cpt("switch_off_delay", "s")
    bias = _shaper_cpt("bias", "V")
    tip_lift = _shaper_cpt("tip_lift", "m")
    lift_time_1 = _shaper_cpt("lift_time_1", "s")
    bias_lift = _shaper_cpt("bias_lift", "V")
    lift_height = _shaper_cpt("lift_height", "m")
    lift_time_2 = _shaper_cpt("lift_time_2", "s")
    end_wait_time = _shaper_cpt("end_wait_time", "s")


class TipPosition(Device):
    """Tip position in the scan plane (FolMe.XYPosSet/Get); setting moves the tip."""

    x = Cpt(
        NanonisSignal,
        read=lambda s: s.client.folme_xy_pos_get()[0],
        write=lambda s, v: s.client.folme_xy_pos_set(float(v), s.client.folme_xy_pos_get()[1], wait=True),
        units="m",
    )
    y = Cpt(
        NanonisSignal,
        read=lambda s: s.client.folme_xy_pos_get()[1],
        write=lambda s, v: s.client.folme_xy_pos_set(s.client.folme_xy_pos_get()[0], float(v), wait=True),
        units="m",
    )

    def set(self, value) -> DeviceStatus:
        """Move the tip to ``(x, y)`` (m) and wait until it arrives (FolMe, wait=True)."""
        x, y = (float(v) for v in value)
        stm = self.root
        if stm.profile is not None:
            stm.profile.check_site(x, y)
        return run_in_thread(self, lambda: stm.client.folme_xy_pos_set(x, y, wait=True))


class ScanActionSignal(NanonisSignal):
    """Write "start"/"stop"/"pause"/"resume": Scan.Action in ``stm.scan_direction``.

    Reads back the scan status (1 = scanning).
    """

    def __init__(self, **kwargs):
        super().__init__(read=lambda stm: int(stm.client.scan_status_get()), write=self._act, **kwargs)

    @staticmethod
    def _act(stm, action):
        if action == "stop":
            stm.stop_scan()
        else:
            stm.client.scan_action(action, direction=stm.scan_direction.get())

    def check_value(self, value):
        if value not in ("start", "stop", "pause", "resume"):
            raise ValueError(f"scan action must be start/stop/pause/resume, not {value!r}")


# --------------------------------------------------------------------------- line stream
class ScanLines(Device):
    """The scan, line by line: trigger → next finished line; read → that line.

    ``configure({"channels": {name: index}, "pixels": n, "lines": m})`` sets what a line
    carries; ``stage()`` starts the follower thread (before the scan is started, so no line
    is missed; rows missed between two WaitEndOfLine replies are recovered from a frame
    grab); ``unstage()`` stops it.

    Re-delivery after a rewind: every line is kept (by index) until unstage. The cursor
    is the next index to deliver; ``pause()`` (called by the RunEngine on pause and
    suspend) moves the cursor back to the line of the most recent trigger, i.e. the line
    right after the last checkpoint in :func:`stm_live.plans.live_frame`, so the replayed
    trigger delivers that line index; or to the line after it if that line's event already
    went out (the RunEngine was interrupted between the event and the next checkpoint; the
    plan subscribes :meth:`note_document`), so no line is delivered twice. Only a rewind
    after the frame's last event repeats one (same index, same data); consumers keep the
    last. After a tip repair, :meth:`rescan_from_cursor` forgets the lines from the cursor
    on that the old tip took, so the restarted scan delivers them anew.
    """

    # Restarts of a scan that stopped while the link was down, per frame.
    MAX_RESTARTS = 3

    def __init__(self, *args, line_timeout: float = 30.0, poll_s: float = 0.2, use_wait: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.line_timeout = line_timeout  # without a new line while the link is up
        # Scan.WaitEndOfLine on its own connection; False (or a controller refusing the
        # command) polls FrameDataGrab instead.
        self.use_wait = use_wait
        self._poll_s = poll_s
        self._channels: dict[str, int] = {}
        self._units: dict[str, str] = {}
        self._pixels = 0
        self._n_lines = 0
        self._directions = ("forward", "backward")
        self._cond = threading.Condition()
        self._reset_stream()
        self._thread: threading.Thread | None = None
        self._follower: LineFollower | None = None
        self._stop_evt = threading.Event()

    def _reset_stream(self):
        self._lines: dict[int, tuple[float, dict[str, np.ndarray]]] = {}
        self._cursor = 0
        self._last_triggered = 0
        self._delivered: int | None = None
        self._pending: list[tuple[DeviceStatus, int, int]] = []  # (status, row, rewind epoch)
        self._epoch = 0  # bumped by every pause(): triggers from before it are stale
        self._error: BaseException | None = None
        self._paused = False
        self._scan_paused = False  # pause() paused the controller's scan (resume() resumes it)
        self._finished = False
        self._emitted: set[int] = set()  # lines whose events went out (note_document)
        self._triggered = False  # a trigger since stage: the run is past its first checkpoint

    # -- configuration ------------------------------------------------------------
    @property
    def keys(self) -> dict[str, dict[str, str]]:
        """channel name -> {direction: data key}"""
        name = self.root.name
        return {ch: {d: channel_key(name, ch, d) for d in self._directions} for ch in self._channels}

    @property
    def line_key(self) -> str:
        return f"{self.root.name}_line_index"

    def configure(self, d: Mapping[str, Any]):
        old = self.read_configuration()
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: cannot reconfigure while staged")
        channels = d.get("channels", self._channels)
        if not isinstance(channels, Mapping):
            known = dict(STANDARD_CHANNELS)
            if self.root.profile is not None:
                known.update(self.root.profile.channel_indexes)
            missing = [c for c in channels if c not in known]
            if missing:
                raise ValueError(f"unknown channel(s) {missing}; known: {sorted(known)}")
            channels = {c: known[c] for c in channels}
        self._channels = {str(k): int(v) for k, v in channels.items()}
        self._pixels = int(d.get("pixels", self._pixels))
        self._n_lines = int(d.get("lines", self._n_lines))
        self._directions = tuple(d.get("directions", self._directions))
        for direction in self._directions:
            if direction not in DIRECTION_SUFFIX:
                raise ValueError(f"direction must be forward/backward, not {direction!r}")
        self._units = {ch: self.root.channel_units(ch, idx) for ch, idx in self._channels.items()}
        return old, self.read_configuration()

    def channel_info(self) -> list[dict]:
        """The ``channels`` list of the start document's ``stm_live`` block."""
        return [
            {"name": ch, "index": idx, "units": self._units.get(ch, ""), "keys": self.keys[ch]}
            for ch, idx in self._channels.items()
        ]

    def describe(self):
        src = f"nanonis://{self.root.host}:{self.root.port}/Scan.FrameDataGrab"
        out = {self.line_key: {"source": src, "dtype": "integer", "shape": [], "dtype_numpy": np.dtype(np.int64).str}}
        for ch, keys in self.keys.items():
            for direction, key in keys.items():
                out[key] = {
                    "source": f"{src}/{self._channels[ch]}/{direction}",
                    "dtype": "array",
                    "shape": [self._pixels],
                    "dtype_numpy": np.dtype(np.float32).str,
                    "units": self._units.get(ch, ""),
                }
        return out

    def read(self):
        if self._delivered is None:
            raise RuntimeError(f"{self.name}: read before any line was triggered")
        timestamp, data = self._lines[self._delivered]
        out = {self.line_key: {"value": self._delivered, "timestamp": timestamp}}
        for key, value in data.items():
            out[key] = {"value": value, "timestamp": timestamp}
        return out

    def read_configuration(self):
        return {}

    def describe_configuration(self):
        return {}

    # -- follower thread ----------------------------------------------------------
    def stage(self):
        if not self._channels or not self._pixels or not self._n_lines:
            raise RuntimeError(f"{self.name}: configure channels, pixels and lines first")
        staged = super().stage()
        with self._cond:
            self._reset_stream()
        self._stop_evt.clear()
        self._start_follower()
        return staged

    def _start_follower(self) -> None:
        self._thread = threading.Thread(target=self._follow, name=f"{self.name}-follower", daemon=True)
        self._thread.start()

    def unstage(self):
        self._stop_evt.set()
        if self._thread is not None:
            self._thread.join(timeout=self._poll_s + 2)
            if self._thread.is_alive() and self._follower is not None:
                self._follower.close()  # stuck in a long reply or reconnecting: give up on it
                self._thread.join(timeout=self.root.timeout + 2)
            self._thread = None
        with self._cond:
            pending, self._pending = self._pending, []
            epoch = self._epoch
        for status, _, status_epoch in pending:
            # A trigger from before a pause was abandoned by the RunEngine's rewind; when the
            # plan is then aborted, failing it would turn the abort into a FailedStatus.
            if status_epoch == epoch:
                status.set_exception(RuntimeError(f"{self.name} unstaged before the line came"))
        return super().unstage()

    def _follow(self):
        stm = self.root
        keys = self.keys
        link = stm.link
        follower = None

        def take(line) -> None:
            self._store(
                line.index,
                {
                    keys[ch][d]: np.asarray(line.data[(idx, d)], dtype=np.float32)
                    for ch, idx in self._channels.items()
                    for d in self._directions
                },
            )

        def make_follower(use_wait: bool) -> LineFollower:
            self._follower = LineFollower(
                stm.host,
                stm.port,
                list(self._channels.values()),
                directions=self._directions,
                use_wait=use_wait,
                shape=(self._n_lines, self._pixels),
                **stm.client_options(),
            )
            return self._follower

        try:
            follower = make_follower(self.use_wait)
            seen_running = False
            outages = link.outages  # outages so far when the scan was last seen running
            restarts = 0
            last_progress = time.monotonic()
            while not self._stop_evt.is_set() and not self._finished:
                try:
                    line = follower.next_line(timeout_s=self._poll_s)
                except NanonisError as exc:
                    if not (follower.use_wait and exc.command == "Scan.WaitEndOfLine"):
                        raise
                    # controller without WaitEndOfLine: poll the frame buffer instead
                    logger.warning("%s: %s; polling the scan buffer instead", self.name, exc)
                    follower.close()
                    follower = make_follower(False)
                    continue
                now = time.monotonic()
                last_progress = max(last_progress, link.back_at)  # an outage is not a stalled scan
                if line is not None:
                    seen_running = True
                    last_progress = now
                    take(line)
                    continue
                if self._paused:
                    last_progress = now  # a paused scan is not a stalled one
                    continue
                running = follower.scan_running()
                if running:
                    seen_running, outages = True, link.outages
                elif seen_running:
                    # The scan ended: collect rows finished since the last reply.
                    while (line := follower.next_line(timeout_s=0)) is not None:
                        take(line)
                    if self._finished:
                        return
                    if link.outages > outages and restarts < self.MAX_RESTARTS:
                        # It stopped while the link was down (the controller restarted, say):
                        # scan the frame again; the lines already in are kept, the rest come.
                        restarts += 1
                        logger.warning(
                            "%s: the scan on %s:%s stopped during the link outage at line %d of "
                            "%d; scanning the frame again",
                            self.name,
                            stm.host,
                            stm.port,
                            self._cursor,
                            self._n_lines,
                        )
                        follower.client.scan_action("start", direction=stm.scan_direction.get())
                        seen_running, outages, last_progress = False, link.outages, now
                        continue
                    self._fail(
                        ControllerLost(
                            f"controller {stm.host}:{stm.port} stopped the scan after "
                            f"{len(self._lines)} of {self._n_lines} lines"
                        )
                    )
                    return
                if now - last_progress > self.line_timeout:
                    self._fail(
                        LineTimeout(
                            f"no scan line from {stm.host}:{stm.port} within "
                            f"{self.line_timeout:.1f} s (line {self._cursor} of {self._n_lines})"
                        )
                    )
                    return
        except Exception as exc:  # connection lost past the budget, protocol error, ...
            if not self._stop_evt.is_set():
                self._fail(self._dropped(exc))
        finally:
            if follower is not None:
                try:
                    follower.close()
                except Exception:
                    pass

    def _dropped(self, exc: Exception) -> ControllerLost:
        stm = self.root
        where = f"controller {stm.host}:{stm.port} dropped"
        if isinstance(exc, ConnectionLost) and stm.link.state == "lost":
            return ControllerLost(
                f"{where} at line {self._cursor} of {self._n_lines} and was not back "
                f"within link.max_outage_s = {stm.max_outage_s:g} s ({stm.link.reason})"
            )
        return ControllerLost(
            f"{where} while waiting for line {self._cursor} of {self._n_lines}: {type(exc).__name__}: {exc}"
        )

    def _store(self, row: int, data: dict[str, np.ndarray]):
        with self._cond:
            if row in self._lines or not 0 <= row < self._n_lines:
                return
            self._lines[row] = (time.time(), data)
            if len(self._lines) == self._n_lines:
                self._finished = True
            self._serve_pending()

    def _fail(self, exc: BaseException):
        logger.error("%s", exc)
        with self._cond:
            self._error = exc
            pending, self._pending = self._pending, []
        for status, _, _ in pending:
            status.set_exception(exc)

    def _serve_pending(self):
        # caller holds self._cond. Every status waiting for an arrived row completes —
        # also one from before a rewind, which the RunEngine may still be waiting on. Only
        # a current trigger moves the cursor: a stale one advancing it would make the
        # replayed trigger skip its row (a lost line); at worst a line is delivered twice,
        # and consumers keep the last copy.
        waiting = []
        for status, row, epoch in self._pending:
            if row in self._lines:
                self._delivered = row
                if epoch == self._epoch:
                    self._cursor = max(self._cursor, row + 1)
                status.set_finished()
            else:
                waiting.append((status, row, epoch))
        self._pending = waiting

    # -- bluesky interface --------------------------------------------------------
    def trigger(self) -> DeviceStatus:
        status = DeviceStatus(self)
        with self._cond:
            if self._thread is None:
                status.set_exception(RuntimeError(f"{self.name} is not staged"))
                return status
            if self._cursor >= self._n_lines:
                status.set_exception(RuntimeError(f"{self.name}: all {self._n_lines} lines were already delivered"))
                return status
            if self._error is not None and self._cursor not in self._lines:
                status.set_exception(self._error)
                return status
            self._last_triggered = self._cursor
            self._triggered = True
            self._pending.append((status, self._cursor, self._epoch))
            self._serve_pending()
        return status

    @property
    def frame_complete(self) -> bool:
        """Every line of the frame was delivered."""
        return self._delivered is not None and self._delivered == self._n_lines - 1

    @property
    def done(self) -> bool:
        """The present triggers have delivered the frame's last line (the plan stops)."""
        return self._cursor >= self._n_lines

    @property
    def in_frame(self) -> bool:
        """Lines are being delivered: staged, triggered since (so the run has a checkpoint to
        rewind to), and lines left whose events have not gone out."""
        return self._thread is not None and self._triggered and len(self._emitted) < self._n_lines

    def note_document(self, name: str, doc: dict) -> None:
        """RunEngine document subscriber: remember which lines' events went out."""
        if name == "event" and self.line_key in doc.get("data", {}):
            with self._cond:
                self._emitted.add(int(doc["data"][self.line_key]))

    @property
    def lines_received(self) -> int:
        return len(self._lines)

    @property
    def resume_line(self) -> int:
        """The line a replay after ``pause()`` delivers first (the interrupted line)."""
        return self._cursor

    def rescan_from_cursor(self) -> int:
        """Forget the buffered lines at or after the cursor, for a scan about to restart after
        a tip repair: it delivers them anew. A controller that runs ahead of the RunEngine
        may have scanned the rest of the frame with the old tip; those lines were never
        delivered (the cursor had not reached them). Returns how many were forgotten."""
        with self._cond:
            stale = [row for row in self._lines if row >= self._cursor]
            for row in stale:
                del self._lines[row]
            restart = bool(stale) and self._finished
            self._finished = self._finished and not stale
        if restart and self._thread is not None:
            # the follower stops once every line is in: follow the rescan with a new one
            self._thread.join(timeout=self.root.timeout + self._poll_s + 2)
            self._start_follower()
        return len(stale)

    def pause(self):
        """RunEngine pause/suspend: pause the controller scan, rewind the cursor.

        Over a link that is down there is nothing to pause: the controller scans on and
        its buffer keeps the lines for the next grab."""
        with self._cond:
            self._paused = True
            # The RunEngine replays the trigger after the last checkpoint: the same line
            # again, or the next if that line's event already went out.
            row = self._last_triggered
            if row in self._emitted and row + 1 < self._n_lines:
                row += 1
            self._cursor = row
            self._epoch += 1
        if self._thread is not None and not self._finished and self.root.link.up.is_set():
            self._scan_paused = self._scan_call(self.root.scan_pause, "pause")

    def resume(self):
        if self._thread is not None and not self._finished and self._scan_paused:
            self._scan_call(self.root.scan_resume, "resume")
        self._scan_paused = False
        with self._cond:
            self._paused = False

    def _scan_call(self, fn, what: str) -> bool:
        # A controller that is gone cannot be paused; the follower thread reports the
        # loss on the pending line, so the run fails with that error rather than here.
        try:
            fn()
            return True
        except (ConnectionError, OSError) as exc:
            logger.error("%s: could not %s the scan: %s", self.name, what, exc)
            return False


# --------------------------------------------------------------------------- device
class NanonisSTM(Device):
    """A Nanonis-controlled STM over the Nanonis TCP protocol.

    Parameters
    ----------
    host, port : str, int
        The controller's TCP interface (127.0.0.1:6501 for the simulator's default).
    name : str
        Prefix of every data key (``stm`` gives ``stm_current_fwd``).
    profile : stm_live.config.Profile, optional
        Limits checked before any value is sent (bias, setpoint, frame, tip shaper).
    timeout : float
        Socket timeout of every controller call, seconds.
    max_outage_s : float, optional
        How long an outage of the link may last while the device reconnects (default: the
        profile's ``link.max_outage_s``, else 30 s; 0 never reconnects).

    ``stm.link`` (:class:`~stm_live.devices.client.LinkState`) is the link's state, shared by
    every connection the device opens.
    """

    bias = Cpt(
        NanonisSignal,
        read=_client_call("bias_get"),
        write=lambda s, v: s.client.bias_set(float(v)),
        units="V",
        check="check_bias",
    )
    current = Cpt(NanonisSignal, read=_client_call("current_get"), units="A", kind=Kind.hinted)
    setpoint = Cpt(
        NanonisSignal,
        read=_client_call("z_ctrl_setpoint_get"),
        write=lambda s, v: s.client.z_ctrl_setpoint_set(float(v)),
        units="A",
        check="check_setpoint",
        kind=Kind.config,
    )
    z_controller = Cpt(
        NanonisSignal,
        read=lambda s: int(s.client.z_ctrl_on_off_get()),
        write=lambda s, v: s.client.z_ctrl_on_off_set(bool(v)),
        units="",
        kind=Kind.config,
    )
    z = Cpt(
        NanonisSignal,
        read=_client_call("z_ctrl_z_pos_get"),
        write=lambda s, v: s.client.z_ctrl_z_pos_set(float(v)),
        units="m",
    )
    frame = Cpt(ScanFrame, kind=Kind.config)
    buffer = Cpt(ScanBuffer, kind=Kind.config)
    speed = Cpt(ScanSpeed, kind=Kind.config)
    scan_direction = Cpt(Signal, value="down", kind=Kind.config)
    scan_action = Cpt(ScanActionSignal, units="", kind=Kind.omitted)
    tip = Cpt(TipPosition, kind=Kind.normal)
    tip_shaper = Cpt(TipShaper, kind=Kind.config)
    # Actions: writing runs the controller action and waits for it to finish.
    withdraw = Cpt(
        NanonisSignal,
        read=lambda s: 0,
        write=lambda s, v: s.client.z_ctrl_withdraw(wait=True, timeout_s=10.0),
        kind=Kind.omitted,
    )
    bias_pulse = Cpt(
        NanonisSignal,
        read=lambda s: 0,
        write=lambda s, v: s._unrepeated(s.client.bias_pulse, float(v[0]), float(v[1]), wait=True),
        check="check_pulse",
        kind=Kind.omitted,
        doc="write (width_s, bias_V): Bias.Pulse with Z held",
    )
    tip_shaper_start = Cpt(
        NanonisSignal,
        read=lambda s: 0,
        write=lambda s, v: s._unrepeated(s.client.tip_shaper_start, wait=True, timeout_s=30.0),
        kind=Kind.omitted,
    )
    last_action = Cpt(
        Signal, value="", kind=Kind.normal, doc="what the plan just did on the controller (for the record)"
    )
    lines = Cpt(ScanLines, kind=Kind.omitted)  # triggered on its own by the plans
    spectroscopy = Cpt(BiasSpectroscopy, kind=Kind.omitted)  # triggered on its own by grid_spectroscopy

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6501,
        *,
        name: str = "stm",
        profile=None,
        timeout: float = 5.0,
        max_outage_s: float | None = None,
        **kwargs,
    ):
        self.host, self.port, self.profile, self.timeout = host, int(port), profile, timeout
        if max_outage_s is None:
            max_outage_s = profile.link.max_outage_s if profile is not None else DEFAULT_MAX_OUTAGE_S
        self.max_outage_s = float(max_outage_s)
        self.link = LinkState(f"{host}:{int(port)}")
        self._lock = threading.RLock()
        self._signal_names: list[str] | None = None
        self.client = NanonisClient(host, int(port), **self.client_options())
        self.client.negotiate()  # speak the controller's release (Scan.PropsGet differs by release)
        super().__init__(name=name, **kwargs)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of every connection the device opens: one link state, one budget."""
        return {"timeout": self.timeout, "max_outage_s": self.max_outage_s, "link": self.link}

    def _unrepeated(self, action: Callable, *args, **kwargs) -> None:
        """An action whose effect cannot be read back (a pulse, the tip shaper): after a lost
        reply it is not sent again; what follows it (a verification scan) judges the tip."""
        try:
            action(*args, **kwargs)
        except ActionUnconfirmed as exc:
            logger.warning("%s; not repeated: the verification that follows judges the tip", exc)

    def channel_units(self, channel: str, index: int) -> str:
        """SI unit of a recorded channel: the profile's, else the controller's signal name
        ("Current (A)" -> "A"), else the usual Nanonis unit."""
        if self.profile is not None and channel in self.profile.channels:
            return self.profile.channels[channel].units
        return self.signal_units(index) or _STANDARD_UNITS.get(channel, "")

    def signal_units(self, index: int) -> str:
        """Unit of RT signal ``index`` from its controller name ("Current (A)" -> "A")."""
        if self._signal_names is None:
            with self._lock:
                self._signal_names = list(self.client.signals_names_get())
        if 0 <= index < len(self._signal_names):
            match = re.search(r"\(([^)]*)\)\s*$", self._signal_names[index])
            return match.group(1) if match else ""
        return ""

    def scan_pause(self):
        with self._lock:
            self.client.scan_action("pause", direction=self.scan_direction.get())

    def scan_resume(self):
        with self._lock:
            self.client.scan_action("resume", direction=self.scan_direction.get())

    def stop_scan(self):
        """Stop the controller scan (plans' cleanup; safe when not scanning).

        Reconnects once if the command connection broke; if the controller is gone
        there is no scan to stop, so that is logged rather than raised (cleanup must not
        mask the error that ended the run).
        """
        with self._lock:
            try:
                self.client.scan_action("stop", direction=self.scan_direction.get())
            except ConnectionError:
                try:
                    self.client.reconnect()
                    self.client.scan_action("stop", direction=self.scan_direction.get())
                except ConnectionError as exc:
                    logger.error("could not stop the scan on %s:%s: %s", self.host, self.port, exc)

    def close(self):
        self.client.close()

    def __repr__(self):
        return f"NanonisSTM({self.host!r}, {self.port}, name={self.name!r})"
