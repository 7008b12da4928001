"""The simulated Nanonis controller: a state machine in SI units.

It holds what a Nanonis controller holds (bias, Z controller, scan frame/buffer/props/speed,
tip position, tip shaper, coarse motor) and a scan clock driven by real time x
``time_scale``. ``server.py`` puts it on the wire; tests and benchmarks may also drive it
directly. All public methods are thread-safe (one re-entrant lock); the server calls them
from a worker thread so rendering never blocks its event loop.

Semantics chosen where the manual is silent (NANONIS_PROTOCOL.md §8), recorded in
docs/interfaces.md:

* A scan line is a forward pass then a backward pass; each pass ends with an end-of-line
  event ``(line, movement, pass_number)`` with ``line`` the 0-based row in acquisition
  order, movement 0 = forward, 1 = backward (3 = moved to the frame start, raised when a
  scan starts; 2 = moved to the centre). ``pass_number`` is always 0 (no MultiPass).
* Scan.StatusGet reports 1 while a scan is running or paused/frozen; 0 once stopped or
  finished. Stop raises no end-of-scan event, and pause halts the clock, so a pending wait
  simply times out (its timeout is the only way out, as the manual advises).
* ZCtrl.ZPosSet while the Z controller is on is refused with an error.
* The frame buffer is kept in WIRE orientation (rows in acquisition order, backward rows
  mirrored), NaN until a row is scanned.
* Scan.FrameSet during a scan takes effect at the next frame; Scan.BufferSet during a scan
  is refused; FolMe.XYPosSet is refused while the scan moves the tip (allowed when paused).

Tip evolution (issue 7): scheduled tip changes and per-line hazards from the scenario are
applied at the start of each scanned line; a tip that changes mid-frame switches the image
from that row on (the rule of ``artifacts.tip_change``). ``tip``, ``tip_label``, ``tip_history`` and
``recondition_log`` expose the truth to tests and benchmarks; ``set_tip`` sets it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from stm_live.simulators.scenario import (
    TIP_HAZARDS,
    Scenario,
    load_scenario,
)
from stm_live.validation import finite

__all__ = [
    "BIAS_INDEX",
    "CURRENT_INDEX",
    "SIGNAL_NAMES",
    "X_INDEX",
    "Y_INDEX",
    "Z_INDEX",
    "ControllerError",
    "LineEventInfo",
    "SimulatedController",
]

CURRENT_INDEX, BIAS_INDEX, X_INDEX, Y_INDEX, Z_INDEX = 0, 24, 25, 26, 30


def _signal_names() -> list[str]:
    names = [f"Internal {i} (V)" for i in range(128)]
    names[0] = "Current (A)"
    for i in range(1, 8):
        names[i] = f"Input {i + 1} (V)"
    for i in range(8, 16):
        names[i] = f"Output {i - 7} (V)"
    for i in range(16, 24):
        names[i] = f"Output {i - 15} Monitor (V)"
    names[BIAS_INDEX] = "Bias (V)"
    names[X_INDEX] = "X (m)"
    names[Y_INDEX] = "Y (m)"
    names[27] = "Z Ctrl Setpoint (A)"
    names[28] = "Z Ctrl Error (A)"
    names[29] = "Bias Monitor (V)"
    names[Z_INDEX] = "Z (m)"
    names[31] = "Phase (deg)"
    names[32] = "Amplitude (m)"
    names[33] = "Frequency Shift (Hz)"
    names[34] = "Excitation (V)"
    names[35] = "LI Demod 1 X (A)"
    names[36] = "LI Demod 1 Y (A)"
    names[37] = "Time (s)"
    return names


SIGNAL_NAMES: tuple[str, ...] = tuple(_signal_names())

# Tip presets -> the tip classifier's classes (models/tipstate.py TIP_CLASSES).
_LABELS = {"co": "co_sharp", "coherent_co": "co_sharp", "s": "metal_s", "mixed": "mixed",
           "tilted_co": "asymmetric", "asymmetric": "asymmetric", "double": "double", "blunt": "blunt"}
_GOOD_TIPS = ("co", "coherent_co", "s", "mixed")
# Used when a scenario leaves reconditioning unspecified.
DEFAULT_RECONDITION = {
    "pulse": {"repair": 0.5, "blunt": 0.05},
    "shaper": {"repair": 0.6, "co": 0.1, "blunt": 0.05},
    "poke": {"co": 0.5, "s": 0.25, "blunt": 0.2},
}
Z_TOP_M = 200e-9  # top of the simulated piezo range (withdrawn)
WITHDRAW_TIME_S = 0.05
MOTOR_STEP_M = 100e-9
MAX_PIXELS = 2048
MAX_LINES = 2048
MAX_BUFFER_BYTES = 256 << 20  # all channels, both directions


class ControllerError(ValueError):
    """A command the controller refuses; its text goes into the reply's error section."""


@dataclass(frozen=True)
class LineEventInfo:
    seq: int  # increases by one per event
    line: int
    movement: int  # 0 fwd, 1 bwd, 2 centre, 3 start
    pass_number: int = 0


class SimulatedController:
    """State machine of a Nanonis controller with a physics-backed (or replayed) surface.

    Parameters
    ----------
    scenario : Scenario, str, path or None
        Scene, tip and initial settings (``None``: the shipped ``default``).
    replay : ReplaySource, str, path or None
        Serve a recorded .sxm scan instead of synthesised images.
    seed : int
        Seeds every random choice (noise, tip hazards, reconditioning outcomes).
    time_scale : float
        Simulated seconds per real second (> 0); tests use large values.
    clock : callable
        Real-time source in seconds (monotonic); injectable for tests.
    """

    def __init__(self, scenario=None, *, replay=None, seed: int = 0, time_scale: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if not (isinstance(time_scale, (int, float)) and math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        self._lock = threading.RLock()
        self._clock = clock
        self._t0 = clock()
        self.time_scale = float(time_scale)
        self.seed = int(seed)
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1]))
        self._frame_seed = np.random.SeedSequence([self.seed, 2])
        self.on_event: Callable[[], None] | None = None  # set by the server; called after events

        if replay is not None:
            from stm_live.simulators.replay import ReplaySource

            self.replay = replay if isinstance(replay, ReplaySource) else ReplaySource.from_file(replay)
            self.scenario = load_scenario(scenario) if scenario is not None else Scenario(name="replay")
        else:
            self.replay = None
            self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        sc = self.scenario
        self._model = None if self.replay is not None else _PhysicsModel(sc)
        self.signal_names: list[str] = list(SIGNAL_NAMES)

        # Bias / Z controller
        self.bias_V = float(sc.bias_V)
        self.setpoint_A = float(sc.setpoint_A)
        self.z_ctrl_on = bool(sc.z_controller)
        self.z_home_m = sc.z_nm * 1e-9
        self._z_m = self.z_home_m  # used while the controller is off
        # Scan settings (SI)
        f = sc.frame
        self.frame = (f.center_x_nm * 1e-9, f.center_y_nm * 1e-9, f.width_nm * 1e-9,
                      f.height_nm * 1e-9, f.angle_deg)
        self.channel_indexes: list[int] = list(sc.channels)
        self.pixels, self.lines = f.pixels, f.lines
        self.direction = f.direction
        self.props = {"continuous": 0, "bouncy": 0, "autosave": 2, "series_name": "stm_live_",
                      "comment": "", "modules": [], "autopaste": 2}
        self._keep_time = True  # keep time per line constant
        self._t_fwd = self._t_bwd = float(sc.time_per_line_s)
        self._speed_ratio = 1.0
        self.folme_xy = (self.frame[0], self.frame[1])
        self.folme_speed = (50e-9, 0)
        self.tip_shaper_props = {
            "switch_off_delay": 0.05, "change_bias": 0, "bias": -1.0, "tip_lift": -0.3e-9,
            "lift_time_1": 0.1, "bias_lift": 2.0, "bias_settling_time": 0.05, "lift_height": 1.0e-9,
            "lift_time_2": 0.1, "end_wait_time": 0.05, "restore_feedback": 1}
        self.motor_position = [0.0, 0.0, 0.0]

        if self.replay is not None:
            self.replay.configure(self)

        # Tip
        from stm_live.simulators.tip import tip_preset

        self._tip_preset = tip_preset
        self.tip_name = sc.tip
        self.tip = tip_preset(sc.tip)
        self._last_good = sc.tip if sc.tip in _GOOD_TIPS else "co"  # what "repair" restores
        self.unstable_lines_left = 0
        self.tip_history: list[dict[str, Any]] = []
        self.recondition_log: list[dict[str, Any]] = []

        # Scan clock and buffers
        self._state = "idle"  # idle | scanning | paused
        self._elapsed = 0.0  # simulated seconds into the current frame (while not running)
        self._ref_real = 0.0  # real time when the clock last (re)started
        self.frame_index = -1  # frames started so far - 1
        self._halves_done = 0  # end-of-line events of this frame processed
        self._scan = None  # geometry of the running/last frame
        self._blocks: dict[int, tuple[int, dict]] = {}  # rendered rows for _blocks_key
        self._blocks_key = None
        self._noise = None  # per-frame additive noise fields {channel: (fwd, bwd)}
        self._spread: dict[int, float] = {}
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.last_event = LineEventInfo(0, 0, 3)
        self.scan_end_count = 0
        self.last_scan_path = ""
        self._save_counter: dict[str, int] = {}  # series name -> last file number written
        self.frames_completed = 0

    # ------------------------------------------------------------------ clock / state

    @property
    def sim_time_s(self) -> float:
        """Simulated seconds since the controller was created."""
        return (self._clock() - self._t0) * self.time_scale

    def _frame_elapsed(self) -> float:
        if self._state == "scanning":
            return self._elapsed + (self._clock() - self._ref_real) * self.time_scale
        return self._elapsed

    @property
    def line_times_s(self) -> tuple[float, float]:
        return self._t_fwd, self._t_bwd

    @property
    def scanning(self) -> bool:
        return self._state in ("scanning", "paused")

    @property
    def state(self) -> str:
        return self._state

    def _event(self, line: int, movement: int) -> None:
        self.last_event = LineEventInfo(self.last_event.seq + 1, int(line), int(movement), 0)

    def _notify(self) -> None:
        cb = self.on_event
        if cb is not None:
            cb()

    # ------------------------------------------------------------------ bias / current / Z

    def bias_set(self, bias_V: float) -> None:
        bias_V = _finite(bias_V, "bias")
        if abs(bias_V) > 10.0:
            raise ControllerError(f"bias {bias_V} V outside the +-10 V output range")
        with self._lock:
            self.bias_V = bias_V

    def bias_get(self) -> float:
        return self.bias_V

    def current_get(self) -> float:
        with self._lock:
            if self.z_ctrl_on:
                noise = 0.02 * self._rng.standard_normal()
                return float(self.setpoint_A * (1.0 + noise))
            return self._point_current(self._z_m)

    def z_ctrl_on_off_set(self, on: bool) -> None:
        with self._lock:
            on = bool(on)
            if self.z_ctrl_on and not on:
                self._z_m = self.z_pos_get()  # the loop freezes Z where it was
            self.z_ctrl_on = on

    def z_ctrl_setpoint_set(self, value: float) -> None:
        value = _finite(value, "setpoint")
        if not (0.0 < value <= 1e-6):
            raise ControllerError(f"setpoint {value} A outside (0, 1 uA]")
        with self._lock:
            self.setpoint_A = value

    def z_pos_set(self, z_m: float) -> None:
        z_m = _finite(z_m, "Z position")
        with self._lock:
            if self.z_ctrl_on:
                raise ControllerError("Z position can only be set while the Z-controller is off")
            if not (0.05e-9 <= z_m <= Z_TOP_M):
                raise ControllerError(f"Z position {z_m} m outside [5e-11, {Z_TOP_M}] m")
            self._z_m = z_m

    def z_pos_get(self) -> float:
        with self._lock:
            if not self.z_ctrl_on:
                return float(self._z_m)
            if self._model is None:
                return float(self._z_m)
            x, y = self._sample_point()
            return float(self._model.point_height_nm(x, y, self.tip, self.bias_V, self.setpoint_A) * 1e-9)

    def withdraw(self) -> float:
        """Switch the loop off and retract; returns the simulated duration (s)."""
        with self._lock:
            self.z_ctrl_on = False
            self._z_m = Z_TOP_M
        return WITHDRAW_TIME_S

    def home(self) -> None:
        with self._lock:
            self._z_m = self.z_home_m

    @property
    def withdrawn(self) -> bool:
        return not self.z_ctrl_on and self._z_m >= Z_TOP_M

    def _point_current(self, z_m: float) -> float:
        if self._model is None:
            return 0.0
        x, y = self._sample_point()
        return float(self._model.point_current(x, y, self.tip, self.bias_V, z_m * 1e9))

    def sample_shift_m(self) -> tuple[float, float]:
        """Where the piezo origin sits on the sample (m): the coarse motor's X/Y plus the
        drift compensation's accumulated displacement (Piezo.DriftCompSet), so motor moves
        reach another area and compensation moves the image."""
        mods = getattr(self, "modules", None)
        dx = dy = 0.0
        if mods is not None:
            from stm_live.simulators.modules import drift_offset

            dx, dy, _ = drift_offset(mods, self.sim_time_s)
        return (self.motor_position[0] + dx, self.motor_position[1] + dy)

    def _drift_velocity(self) -> tuple[float, float]:
        mods = getattr(self, "modules", None)
        if mods is None or not mods.drift["on"]:
            return (0.0, 0.0)
        return (mods.drift["v"][0], mods.drift["v"][1])

    def _sample_point(self) -> tuple[float, float]:
        x, y = self.tip_position()
        sx, sy = self.sample_shift_m()
        return x + sx, y + sy

    # ------------------------------------------------------------------ positions

    def tip_position(self) -> tuple[float, float]:
        """Tip (x, y) in m: FolMe position, or where the running scan has the tip."""
        with self._lock:
            if self._state != "scanning" or self._scan is None:
                return self.folme_xy
            g = self._scan
            t = self._frame_elapsed()
            period = g["t_fwd"] + g["t_bwd"]
            line = min(int(t // period), g["lines"] - 1)
            tau = t - line * period
            if tau < g["t_fwd"]:  # u: -0.5 .. 0.5 along the fast axis, then back
                u = tau / g["t_fwd"] - 0.5
            else:
                u = 0.5 - min((tau - g["t_fwd"]) / g["t_bwd"], 1.0)
            v = 0.5 - (line + 0.5) / g["lines"]
            if g["direction"] == "up":
                v = -v
            cx, cy, w, h, ang = g["frame"]
            a = math.radians(-ang)  # clockwise positive
            dx, dy = u * w, v * h
            return (cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a))

    def folme_xy_set(self, x_m: float, y_m: float) -> float:
        """Move the tip; returns the simulated travel time (s)."""
        x_m, y_m = _finite(x_m, "X"), _finite(y_m, "Y")
        if max(abs(x_m), abs(y_m)) > 1e-5:
            raise ControllerError(f"position ({x_m}, {y_m}) m outside the +-10 um scan range")
        with self._lock:
            # Paused/frozen scans allow it (reconditioning elsewhere mid-frame); resume
            # continues the frame where it stopped.
            if self._state == "scanning":
                raise ControllerError("cannot move the tip with Follow Me while a scan is running; "
                                      "pause or stop it first")
            x0, y0 = self.tip_position()
            self.folme_xy = (x_m, y_m)
            speed = self.folme_speed[0] if self.folme_speed[1] else self.frame[2] / self._t_fwd
            return math.hypot(x_m - x0, y_m - y0) / max(speed, 1e-12)

    def folme_speed_set(self, speed: float, custom: int) -> None:
        speed = _finite(speed, "speed")
        if speed <= 0:
            raise ControllerError(f"Follow Me speed must be > 0, got {speed}")
        with self._lock:
            self.folme_speed = (speed, 1 if custom else 0)

    # ------------------------------------------------------------------ scan settings

    def frame_set(self, cx, cy, w, h, angle) -> None:
        vals = [_finite(v, n) for v, n in zip((cx, cy, w, h, angle), ("centre X", "centre Y", "width", "height", "angle"))]
        if vals[2] <= 0 or vals[3] <= 0 or vals[2] > 1e-5 or vals[3] > 1e-5:
            raise ControllerError(f"frame size {vals[2]} x {vals[3]} m must be in (0, 10 um]")
        with self._lock:
            self._replay_fixed("Scan.FrameSet")
            self.frame = tuple(vals)

    def buffer_set(self, channel_indexes, pixels: int, lines: int) -> None:
        chans = [int(c) for c in channel_indexes]
        bad = [c for c in chans if not 0 <= c < 128]
        if bad:
            raise ControllerError(f"channel indexes {bad} outside 0..127")
        if not chans:
            raise ControllerError("at least one channel is needed in the scan buffer")
        with self._lock:
            if self.scanning:
                raise ControllerError("the scan buffer cannot change while a scan is running")
            self._replay_fixed("Scan.BufferSet")
            pixels = int(pixels)
            if pixels <= 0:
                pixels = self.pixels
            # Nanonis sends scan data in 16-pixel packets: nearest multiple of 16.
            pixels = max(16, min(MAX_PIXELS, int(round(pixels / 16.0)) * 16))
            lines = int(lines)
            if lines <= 0:  # keep the frame's aspect ratio
                lines = max(1, int(round(pixels * self.frame[3] / self.frame[2])))
            if lines > MAX_LINES:
                raise ControllerError(f"{lines} lines exceed the {MAX_LINES}-line limit")
            chans = list(dict.fromkeys(chans))
            size = len(chans) * pixels * lines * 2 * 4  # float32, forward + backward
            if size > MAX_BUFFER_BYTES:
                raise ControllerError(f"scan buffer of {len(chans)} channels x {pixels} x {lines} needs "
                                      f"{size >> 20} MiB; the simulator allows {MAX_BUFFER_BYTES >> 20} MiB")
            self.channel_indexes = chans
            self.pixels, self.lines = pixels, lines

    def props_set(self, continuous: int, bouncy: int, autosave: int, series_name: str, comment: str,
                  modules, autopaste: int = 0) -> None:
        with self._lock:
            p = self.props
            if continuous in (1, 2):
                p["continuous"] = 1 if continuous == 1 else 0
            if bouncy in (1, 2):
                p["bouncy"] = 1 if bouncy == 1 else 0
            if autosave in (1, 2, 3):
                p["autosave"] = autosave - 1  # Set 1/2/3 -> Get 0/1/2 (§4)
            if autopaste in (1, 2, 3):
                p["autopaste"] = autopaste - 1
            if series_name:
                p["series_name"] = series_name
            p["comment"] = comment
            p["modules"] = list(modules)

    def speed_set(self, fwd_speed, bwd_speed, fwd_time, bwd_time, keep_constant, speed_ratio) -> None:
        with self._lock:
            keep_time = self._keep_time if keep_constant == 0 else keep_constant == 2
            ratio = float(speed_ratio) if speed_ratio and speed_ratio > 0 else self._speed_ratio
            width = self.frame[2]
            if keep_time:
                tf = float(fwd_time) if fwd_time and fwd_time > 0 else self._t_fwd
            else:
                if not (fwd_speed and fwd_speed > 0):
                    raise ControllerError("keep linear speed needs a forward speed > 0")
                tf = width / float(fwd_speed)
            if not (1e-4 <= tf <= 1e3 and 0.01 <= ratio <= 100):
                raise ControllerError(f"time per line {tf:g} s or speed ratio {ratio:g} out of range")
            self._keep_time, self._speed_ratio = keep_time, ratio
            self._t_fwd, self._t_bwd = tf, tf / ratio

    def speed_get(self) -> dict:
        w = self.frame[2]
        return {"fwd_speed": w / self._t_fwd, "bwd_speed": w / self._t_bwd, "fwd_time": self._t_fwd,
                "bwd_time": self._t_bwd, "keep_constant": 1 if self._keep_time else 0,
                "speed_ratio": self._speed_ratio}

    def _replay_fixed(self, what: str) -> None:
        if self.replay is not None:
            raise ControllerError(f"{what}: replaying {self.replay.name}; frame and buffer come from the recording")

    # ------------------------------------------------------------------ scan actions

    def scan_action(self, action: str, direction: str = "down") -> None:
        with self._lock:
            if action == "start":
                self._start_frame(direction)
            elif action == "stop":
                if self._state == "scanning":
                    self.folme_xy = self.tip_position()  # the tip stays where the scan left it
                    self._elapsed = self._frame_elapsed()
                self._state = "idle"
            elif action in ("pause", "freeze"):
                if self._state == "scanning":
                    self.folme_xy = self.tip_position()
                    self._elapsed = self._frame_elapsed()
                    self._state = "paused"
            elif action in ("resume", "unfreeze"):
                if self._state == "paused":
                    self._ref_real = self._clock()
                    self._state = "scanning"
            elif action == "center":
                self._state = "idle"
                self.folme_xy = (self.frame[0], self.frame[1])
                self._event(0, 2)
                self._notify()
            else:
                raise ControllerError(f"unknown scan action {action!r}")

    def _start_frame(self, direction: str) -> None:
        if direction not in ("up", "down"):
            raise ControllerError(f"scan direction must be 'up' or 'down', got {direction!r}")
        if self.replay is not None:  # rows come in the recording's order
            direction = self.replay.direction
        self.direction = direction
        self.frame_index += 1
        self._scan = {"frame": tuple(self.frame), "pixels": self.pixels, "lines": self.lines,
                      "direction": direction, "channels": list(self.channel_indexes),
                      "t_fwd": self._t_fwd, "t_bwd": self._t_bwd, "frame_index": self.frame_index,
                      "shift": self.sample_shift_m(), "drift_v": self._drift_velocity()}
        self._buffers = {c: (np.full((self.lines, self.pixels), np.nan, np.float32),
                             np.full((self.lines, self.pixels), np.nan, np.float32))
                         for c in self._scan["channels"]}
        self._blocks, self._blocks_key, self._noise, self._spread = {}, None, None, {}
        self._rows(0)  # first block now, so the first line is never late
        self._halves_done = 0
        self._elapsed = 0.0
        self._ref_real = self._clock()
        self._state = "scanning"
        self._event(0, 3)
        self._notify()

    def next_event_delay(self) -> float | None:
        """Real seconds until the next end-of-line event (None if the scan is not running)."""
        with self._lock:
            if self._state != "scanning":
                return None
            g = self._scan
            k = self._halves_done
            t_next = (k // 2) * (g["t_fwd"] + g["t_bwd"]) + (g["t_fwd"] if k % 2 == 0 else g["t_fwd"] + g["t_bwd"])
            return max(0.0, (t_next - self._frame_elapsed()) / self.time_scale)

    def advance(self) -> int:
        """Process every end-of-line event due by now; returns how many happened.

        Bounded: one frame's worth of events per call (the rest on the next call).
        """
        with self._lock:
            if self._state != "scanning":
                return 0
            g = self._scan
            t = self._frame_elapsed()
            period = g["t_fwd"] + g["t_bwd"]
            total = self._halves_to_scan()
            done_lines = int(t // period)
            due = 2 * done_lines + (1 if t - done_lines * period >= g["t_fwd"] else 0)
            due = min(due, total)
            n = 0
            while self._halves_done < due:
                k = self._halves_done
                line, backward = k // 2, k % 2
                if not backward:
                    self._begin_line(line)
                self._fill_row(line, backward)
                self._halves_done += 1
                self._event(line, backward)
                n += 1
            if self._halves_done >= total:
                self._end_frame()
                n += 1
        if n:
            self._notify()
        return n

    def _lines_to_scan(self) -> int:
        if self.replay is not None:
            return self.replay.lines_recorded
        return self._scan["lines"]

    def _halves_to_scan(self) -> int:
        """End-of-line events in this frame (a replay stopped mid backward sweep has one
        fewer than two per line)."""
        if self.replay is not None:
            return self.replay.halves_recorded
        return 2 * self._scan["lines"]

    def _end_frame(self) -> None:
        self.frames_completed += 1
        self.scan_end_count += 1
        self.last_scan_path = ""
        if self.props["autosave"] in (0, 1) and self.save_dir is not None:
            self.last_scan_path = str(self.save())
            if self.props["autosave"] == 1:  # "Next": only this one
                self.props["autosave"] = 2
        if self.props["continuous"]:
            d = self._scan["direction"]
            if self.props["bouncy"]:
                d = "up" if d == "down" else "down"
            self._start_frame(d)
        else:
            self._elapsed = self._frame_elapsed()
            self._state = "idle"

    save_dir = None  # set to a folder to enable Scan.Save / autosave (.sxm)

    def save(self):
        """Write the current buffer as .sxm into ``save_dir``; returns the path."""
        from pathlib import Path

        from stm_live.io.sxm import scan_from_frames, write_sxm

        with self._lock:
            if self.save_dir is None:
                raise ControllerError("no save folder configured for the simulator")
            if self._scan is None:
                raise ControllerError("nothing scanned yet")
            g = self._scan
            channels, units, idx = {}, {}, {}
            for c, (fw, bw) in self._buffers.items():
                name, unit = _split_name(self.signal_names[c])
                channels[name] = {"forward": fw.copy(), "backward": bw[:, ::-1].copy()}
                units[name], idx[name] = unit, c
            cx, cy, w, h, ang = g["frame"]
            scan = scan_from_frames(channels, units=units, center_x_m=cx, center_y_m=cy, width_m=w,
                                    height_m=h, angle_deg=ang, direction=g["direction"], bias_V=self.bias_V,
                                    setpoint_A=self.setpoint_A,
                                    z_controller="constant_current" if self.z_ctrl_on else "constant_height",
                                    acq_time_s=g["lines"] * (g["t_fwd"] + g["t_bwd"]),
                                    comment=self.props["comment"], signal_indexes=idx)
            # Nanonis naming: series name + a 3-digit counter from 001 that never
            # overwrites a file already in the session folder
            folder = Path(self.save_dir)
            base = self.props["series_name"]
            n = self._save_counter.get(base, 0) + 1
            while (folder / f"{base}{n:03d}.sxm").exists():
                n += 1
            self._save_counter[base] = n
            return write_sxm(folder / f"{base}{n:03d}.sxm", scan)

    # ------------------------------------------------------------------ images

    def _render_settings(self):
        return (self.tip, self.bias_V, self.z_ctrl_on, self.setpoint_A, round(self._z_m, 15))

    def _rows(self, line: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Channel -> (forward, backward) row ``line`` in internal orientation, noise added.

        The model renders lazily in blocks of rows for the present settings, so a scan
        starts after one block (not a whole 256x256 frame) and a tip or bias change
        mid-frame switches the rows from that line on (what ``artifacts.tip_change`` does
        to whole images).
        """
        g = self._scan
        if self.replay is not None:
            return self.replay.rows(line, g["channels"])
        key = self._render_settings()
        if self._blocks_key != key:
            self._blocks, self._blocks_key = {}, key
        size = self._model.block_lines(g, self.tip)
        b = line // size
        if b not in self._blocks:
            r0, r1 = b * size, min(g["lines"], (b + 1) * size)
            block = self._model.render_block(g, self.tip, bias_V=self.bias_V, z_on=self.z_ctrl_on,
                                             setpoint_A=self.setpoint_A, z_nm=self._z_m * 1e9,
                                             rows=(r0, r1), seed=np.random.SeedSequence(
                                                 [self.seed, 3, g["frame_index"], b]))
            if self._noise is None:
                self._noise, self._spread = self._model.noise_fields(g, block, np.random.SeedSequence(
                    [self.seed, 4, g["frame_index"]]), z_on=self.z_ctrl_on)
            for c, (fw, bw) in block.items():
                nf, nb = self._noise.get(c, (None, None))
                if nf is not None:
                    fw = fw + nf[r0:r1]
                    bw = bw + nb[r0:r1]
                block[c] = (fw.astype(np.float32), bw.astype(np.float32))
            self._blocks[b] = (r0, block)
        r0, block = self._blocks[b]
        return {c: (fw[line - r0], bw[line - r0]) for c, (fw, bw) in block.items()}

    def prefetch(self) -> None:
        """Render the block holding the next line ahead of time (called between events)."""
        with self._lock:
            if self._state == "scanning" and self._scan is not None:
                line = min(self._halves_done // 2 + 1, self._lines_to_scan() - 1)
                if line >= 0:
                    self._rows(line)

    def _begin_line(self, line: int) -> None:
        if self.replay is None:
            self._evolve_tip(line)

    def _fill_row(self, line: int, backward: int) -> None:
        rows = self._rows(line)
        jump = None
        if self.unstable_lines_left > 0 and self.replay is None:
            jump = self._rng.standard_normal() * self.scenario.evolution.instability_jump
            if backward:
                self.unstable_lines_left -= 1
        for c, bufs in self._buffers.items():
            if c not in rows:
                continue
            row = np.array(rows[c][backward], dtype=np.float32)
            if jump is not None and c in (CURRENT_INDEX, Z_INDEX):
                spread = self._spread.get(c, 0.0)
                row += np.float32(jump * spread)
                row += (0.3 * spread * self._rng.standard_normal(row.shape)).astype(np.float32)
            # Wire orientation: backward rows are stored in acquisition order (mirrored).
            bufs[backward][line] = row[::-1] if backward else row

    # ------------------------------------------------------------------ frame data

    def frame_data(self, channel_index: int, forward: bool) -> tuple[str, np.ndarray, str]:
        """(signal name, (lines, pixels) wire-orientation copy, scan direction)."""
        with self._lock:
            if channel_index not in self.channel_indexes and channel_index not in self._buffers:
                raise ControllerError(f"channel {channel_index} is not in the scan buffer "
                                      f"{self.channel_indexes}")
            if channel_index not in self._buffers:  # configured, not yet scanned
                data = np.full((self.lines, self.pixels), np.nan, np.float32)
            else:
                data = self._buffers[channel_index][0 if forward else 1].copy()
            name = self.signal_names[channel_index]
            return name, data, self.direction

    # ------------------------------------------------------------------ signals

    def signal_value(self, index: int) -> float:
        if not 0 <= index < 128:
            raise ControllerError(f"signal index {index} outside 0..127")
        with self._lock:
            if index == CURRENT_INDEX:
                return self.current_get()
            if index in (BIAS_INDEX, 29):
                return self.bias_V
            if index == Z_INDEX:
                return self.z_pos_get()
            if index in (X_INDEX, Y_INDEX):
                return self.tip_position()[index - X_INDEX]
            if index == 27:
                return self.setpoint_A
            if index == 37:
                return self.sim_time_s
            mods = getattr(self, "modules", None)
            if mods is not None and 8 <= index < 16:  # Output 1-8: the User Output values
                return float(mods.plain["userout"][index - 7]["value"])
            return 0.0

    # ------------------------------------------------------------------ motor

    def motor_move(self, direction: int, steps: int) -> float:
        if not 0 <= direction <= 5:
            raise ControllerError(f"motor direction {direction} outside 0..5 (X+ X- Y+ Y- Z+ Z-)")
        with self._lock:
            axis, sign = direction // 2, (1 if direction % 2 == 0 else -1)
            self.motor_position[axis] += sign * steps * MOTOR_STEP_M
        return steps * 1e-3

    # ------------------------------------------------------------------ tip

    @property
    def tip_label(self) -> str:
        """The tip classifier's class for the true tip (``unstable`` during an episode)."""
        if self.unstable_lines_left > 0:
            return "unstable"
        return _LABELS.get(self.tip_name, self.tip_name)

    def set_tip(self, name_or_state, *, cause: str = "set_tip") -> None:
        """Set the tip directly: a preset name, ``"unstable"`` (an episode), or a TipState."""
        with self._lock:
            self._set_tip(name_or_state, cause)

    def _set_tip(self, to, cause: str, line: int | None = None) -> None:
        before = self.tip_label
        if isinstance(to, str) and to == "unstable":
            self.unstable_lines_left = self.scenario.evolution.instability_lines
        elif isinstance(to, str):
            self.tip = self._tip_preset(to)
            self.tip_name = to
            self.unstable_lines_left = 0
        else:
            self.tip = to
            self.tip_name = getattr(to, "name", "") or "custom"
            self.unstable_lines_left = 0
        if self.tip_name in _GOOD_TIPS and self.unstable_lines_left == 0:
            self._last_good = self.tip_name
        self.tip_history.append({
            "sim_time_s": self.sim_time_s, "frame": self.frame_index,
            "line": line, "before": before, "after": self.tip_label, "cause": cause})

    def _evolve_tip(self, line: int) -> None:
        ev = self.scenario.evolution
        for e in ev.events:
            if e.frame == self.frame_index and e.line == line:
                self._set_tip(e.to, "scheduled", line)
        for hazard, p in ev.hazards.items():
            if p > 0 and self._rng.random() < p:
                target = TIP_HAZARDS[hazard]
                if target is None:
                    self._set_tip("unstable", f"hazard:{hazard}", line)
                elif target != self.tip_name:
                    self._set_tip(target, f"hazard:{hazard}", line)

    def _recondition(self, action: str) -> dict:
        probs = self.scenario.evolution.recondition.get(action, DEFAULT_RECONDITION[action])
        u = self._rng.random()
        outcome, acc = "unchanged", 0.0
        for name, p in probs.items():
            acc += p
            if u < acc:
                outcome = name
                break
        before = self.tip_label
        line = self._current_line()
        if outcome == "repair":
            bad = self.unstable_lines_left > 0 or self.tip_name not in _GOOD_TIPS
            if bad:
                self._set_tip(self._last_good, action, line)
            else:
                outcome = "unchanged"
        elif outcome != "unchanged":
            self._set_tip(outcome, action, line)
        record = {"sim_time_s": self.sim_time_s, "action": action, "outcome": outcome,
                  "before": before, "after": self.tip_label}
        self.recondition_log.append(record)
        return record

    def _current_line(self) -> int | None:
        return self._halves_done // 2 if self.scanning else None

    def bias_pulse(self, width_s: float, bias_V: float, z_hold: int, abs_rel: int) -> float:
        """Apply a bias pulse (may change the tip); returns its duration in simulated s."""
        width_s, bias_V = _finite(width_s, "pulse width"), _finite(bias_V, "pulse bias")
        if not (0 < width_s <= 10):
            raise ControllerError(f"pulse width {width_s} s outside (0, 10] s")
        with self._lock:
            v = self.bias_V + bias_V if abs_rel == 1 else bias_V
            if abs(v) > 10:
                raise ControllerError(f"pulse bias {v} V outside the +-10 V output range")
            if not self.withdrawn:  # a withdrawn tip sees no field at the apex
                self._recondition("pulse")
        return width_s

    def tip_shaper_props_set(self, **props) -> None:
        with self._lock:
            p = self.tip_shaper_props
            for k, v in props.items():
                if k in ("change_bias", "restore_feedback"):
                    if v in (1, 2):
                        p[k] = 1 if v == 1 else 0  # Set 1/2 -> Get 1/0 (§4)
                else:
                    p[k] = _finite(v, k)

    def tip_shaper_start(self) -> float:
        """Run the tip shaper (a poke when |tip lift| reaches the scenario's threshold)."""
        with self._lock:
            p = self.tip_shaper_props
            if self.withdrawn:
                raise ControllerError("tip shaper: the tip is withdrawn; approach first")
            depth = abs(p["tip_lift"])  # how far the apex is driven towards the surface
            action = "poke" if depth >= self.scenario.evolution.poke_threshold_m else "shaper"
            self._recondition(action)
            if not p["restore_feedback"]:
                self.z_ctrl_on = False
            return sum(max(0.0, p[k]) for k in ("switch_off_delay", "lift_time_1", "bias_settling_time",
                                                 "lift_time_2", "end_wait_time"))


# ---------------------------------------------------------------------- physics glue


class _PhysicsModel:
    """Scenario -> images through the physics engineer's forward model."""

    def __init__(self, scenario: Scenario):
        from stm_live.simulators.imaging import Substrate

        self.scenario = scenario
        self.placements = list(scenario.molecules)
        self.substrate = Substrate(**scenario.substrate) if scenario.substrate else None
        self._point_cache: dict = {}

    def _frame(self, g):
        from stm_live.simulators.imaging import ScanFrame

        cx, cy, w, h, ang = g["frame"]
        return ScanFrame.from_si(cx, cy, w, h, ang, g["pixels"], g["lines"], g["direction"])

    def block_lines(self, g, tip) -> int:
        """Rows rendered at once: the whole frame when drift/creep resample it."""
        a = self.scenario.artifacts
        if a.drift > 0 or a.creep > 0:
            return g["lines"]
        return max(8, 4096 // max(g["pixels"], 1))  # ~16 rows at 256 px

    def _sub_frame(self, g, r0: int, r1: int, margin: int):
        """The ScanFrame whose rows are rows r0-margin .. r1+margin of the full frame."""
        from stm_live.simulators.imaging import ScanFrame

        cx, cy, w, h, ang = g["frame"]
        lines = g["lines"]
        a0, a1 = max(0, r0 - margin), min(lines, r1 + margin)
        dv = h / lines
        # local v (up) of the block's centre; "up" scans start at the bottom
        v_mid = h / 2 - (a0 + a1) / 2 * dv
        if g["direction"] == "up":
            v_mid = -v_mid
        t = math.radians(ang)  # clockwise positive, as ScanFrame.grid
        x = cx + v_mid * math.sin(t)
        y = cy + v_mid * math.cos(t)
        # The sample under the piezo frame: coarse/compensation shift at frame start, plus the
        # compensation's drift v*t up to this block's middle row (x(t) = x0 + v t).
        sx, sy = g.get("shift", (0.0, 0.0))
        vx, vy = g.get("drift_v", (0.0, 0.0))
        t_mid = (a0 + a1) / 2 * (g["t_fwd"] + g["t_bwd"])
        shift = (sx + vx * t_mid, sy + vy * t_mid)
        frame = ScanFrame.from_si(x + shift[0], y + shift[1], w, (a1 - a0) * dv, ang, g["pixels"], a1 - a0,
                                  g["direction"])
        return frame, r0 - a0, r1 - a0, shift

    def render_block(self, g, tip, *, bias_V, z_on, setpoint_A, z_nm, rows, seed):
        """Noise-free rows ``rows`` = (r0, r1) per channel, (forward, backward), float64."""
        from stm_live.simulators import imaging
        from stm_live.simulators.orbitals import KAPPA_PER_NM

        r0, r1 = rows
        if bias_V == 0:  # the model needs a bias sign; 1 mV stands in for 0 V
            bias_V = 1e-3
        margin = 0
        if tip.apex_width_nm > 0 and r1 - r0 < g["lines"]:  # blur needs neighbouring rows
            margin = int(math.ceil(3 * tip.apex_width_nm / (g["frame"][3] * 1e9 / g["lines"])))
        frame, i0, i1, (shift_x, shift_y) = self._sub_frame(g, r0, r1, margin)
        n = r1 - r0
        if z_on:
            z = imaging.constant_current_image(self.placements, frame, tip, setpoint_A=setpoint_A,
                                               bias_V=bias_V, substrate=self.substrate).astype(np.float64)
            z = self._geometric(z, seed)[i0:i1]
            cur = {}
            for d, lag in ((0, 1), (1, -1)):
                # The loop lags a pixel behind the topography: I = I_set exp(2κ(z - z_lagged)).
                zl = np.roll(z, lag, axis=1)
                edge = 0 if lag > 0 else -1
                zl[:, edge] = z[:, edge]
                cur[d] = setpoint_A * np.exp(np.clip(2 * KAPPA_PER_NM * (z - zl), -5, 5))
            zimg = {0: z * 1e-9, 1: z * 1e-9}
        else:
            z_eval = min(max(z_nm, imaging.Z_MIN_NM), imaging.Z_MAX_NM)
            i = imaging.constant_height_image(self.placements, frame, tip, z_nm=z_eval, bias_V=bias_V,
                                              substrate=self.substrate).astype(np.float64)
            # beyond the model's range the current just keeps decaying: e^{-2κΔz}
            i = self._geometric(i, seed)[i0:i1] * math.exp(-2 * KAPPA_PER_NM * max(0.0, z_nm - z_eval))
            cur = {0: i, 1: i}
            zimg = {0: np.full((n, g["pixels"]), z_nm * 1e-9), 1: np.full((n, g["pixels"]), z_nm * 1e-9)}
        x_nm, y_nm = frame.grid()
        xg, yg = x_nm[i0:i1] * 1e-9 - shift_x, y_nm[i0:i1] * 1e-9 - shift_y  # piezo coordinates
        out = {}
        for c in g["channels"]:
            pair = []
            for d in (0, 1):
                if c == CURRENT_INDEX:
                    img = cur[d]
                elif c == Z_INDEX:
                    img = zimg[d]
                elif c in (BIAS_INDEX, 29):
                    img = np.full((n, g["pixels"]), bias_V)
                elif c == X_INDEX:
                    img = xg
                elif c == Y_INDEX:
                    img = yg
                elif c == 27:
                    img = np.full((n, g["pixels"]), setpoint_A)
                else:
                    img = np.zeros((n, g["pixels"]))
                pair.append(np.asarray(img, dtype=np.float64))
            out[c] = tuple(pair)
        return out

    def _geometric(self, img, seed):
        """Drift and creep (whole-frame renders only): resample the image."""
        from stm_live.simulators import artifacts

        a = self.scenario.artifacts
        if a.drift > 0:  # nm per frame, in a seeded random direction
            rng = np.random.default_rng(seed)
            lines, pixels = img.shape
            px_nm = self.scenario.frame.width_nm / pixels
            ang = rng.uniform(0, 2 * math.pi)
            v = a.drift / px_nm / max(lines, 1)
            img = artifacts.drift(img, (v * math.cos(ang), v * math.sin(ang)))
        if a.creep > 0:
            px_nm = self.scenario.frame.width_nm / img.shape[1]
            img = artifacts.creep(img, a.creep / px_nm, max(1.0, img.shape[0] / 8))
        return img

    def noise_fields(self, g, block, seed, *, z_on):
        """Per-frame additive noise {channel: (fwd, bwd)} scaled to the first block's spread."""
        from stm_live.simulators import artifacts

        a = self.scenario.artifacts
        shape = (g["lines"], g["pixels"])
        noisy = [CURRENT_INDEX] + ([Z_INDEX] if z_on else [])
        fields, spread = {}, {}
        seeds = iter(seed.spawn(2 * len(noisy)))
        for c in noisy:
            if c not in block:
                continue
            ref = block[c][0]
            s = float(np.std(ref)) or abs(float(np.mean(ref))) * 0.05 or 1e-12
            spread[c] = s
            pair = []
            for _d in (0, 1):
                rng = np.random.default_rng(next(seeds))
                f = np.zeros(shape)
                if a.white_noise > 0:
                    f = artifacts.white_noise(f, a.white_noise * s, rng)
                if a.pink_noise > 0:
                    f = artifacts.pink_noise(f, a.pink_noise * s, rng)
                if a.line_offsets > 0:
                    f = artifacts.line_offsets(f, a.line_offsets * s, rng)
                if a.spikes > 0:
                    f = artifacts.spikes(f, a.spikes, 5 * s, rng)
                pair.append(f)
            fields[c] = tuple(pair)
        return fields, spread

    def point_current(self, x_m, y_m, tip, bias_V, z_nm) -> float:
        from stm_live.simulators import imaging

        key = ("I", round(x_m, 13), round(y_m, 13), tip, bias_V, round(z_nm, 6))
        if key not in self._point_cache:
            img = imaging.constant_height_image(self.placements, self._point_frame(x_m, y_m), tip, z_nm=z_nm,
                                                bias_V=bias_V, substrate=self.substrate)
            self._remember(key, float(np.mean(img)))
        return self._point_cache[key]

    def point_height_nm(self, x_m, y_m, tip, bias_V, setpoint_A) -> float:
        from stm_live.simulators import imaging

        key = ("Z", round(x_m, 13), round(y_m, 13), tip, bias_V, setpoint_A)
        if key not in self._point_cache:
            img = imaging.constant_current_image(self.placements, self._point_frame(x_m, y_m), tip,
                                                 setpoint_A=setpoint_A, bias_V=bias_V, substrate=self.substrate)
            self._remember(key, float(np.mean(img)))
        return self._point_cache[key]

    def _remember(self, key, value):
        if len(self._point_cache) > 4096:  # bounded memory
            self._point_cache.clear()
        self._point_cache[key] = value

    @staticmethod
    def _point_frame(x_m, y_m):
        from stm_live.simulators.imaging import ScanFrame

        return ScanFrame(center_x_nm=x_m * 1e9, center_y_nm=y_m * 1e9, width_nm=0.02, height_nm=0.02,
                         pixels=2, lines=2)


def _split_name(signal: str) -> tuple[str, str]:
    """"Current (A)" -> ("Current", "A")."""
    if signal.endswith(")") and " (" in signal:
        name, unit = signal[:-1].rsplit(" (", 1)
        return name, unit
    return signal, ""


def _finite(value, what: str) -> float:
    return finite(what, value, ControllerError)
