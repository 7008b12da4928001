"""The simulated Nanonis controller: a state machine in SI units.

It holds what a Nanonis controller holds (bias, Z controller, scan frame/buffer/props/speed,
tip position, tip shaper, coarse motor) and a scan clock driven by real time x
``time_scale``. ``server.py`` puts it on the wire; tests and benchmarks may also drive it
directly. All public methods are thread-safe (one re-entrant lock); the server calls them
from a worker thread. Rows are rendered by ``renderer.PhysicsRenderer``: inline when first
needed, or (``render_in_background``, as the server runs it) on a thread of their own ahead
of the scan, so no controller call waits on a render; the scan clock then holds at the frame
start until the first block is there, and an event waits for the rows it fills.

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
* Spectroscopy (BiasSpectr sweeps, the lock-in channels, Pattern experiments saved as .3ds)
  is in ``modules.py``; its physics is ``spectra.simulate`` through the renderer.

Tip evolution (issue 7): scheduled tip changes and per-line hazards from the scenario are
applied at the start of each scanned line; a tip that changes mid-frame switches the image
from that row on (the rule of ``artifacts.tip_change``). ``tip``, ``tip_label``, ``tip_history`` and
``recondition_log`` expose the truth to tests and benchmarks; ``set_tip`` sets it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stm_live.io.spectroscopy import split_unit
from stm_live.io.sxm import scan_from_frames, write_sxm
from stm_live.simulators.modules import (
    MOTOR_AMPLITUDE_V,
    Z_GAIN,
    Z_TOP_M,
    ControllerError,
    ModuleState,
    drift_offset,
    experiment_tick,
)
from stm_live.simulators.renderer import (
    BIAS_INDEX,
    CURRENT_INDEX,
    LI_X_INDEX,
    LI_Y_INDEX,
    X_INDEX,
    Y_INDEX,
    Z_INDEX,
    FrameRows,
    PhysicsRenderer,
    RenderSettings,
    lockin_outputs,
)
from stm_live.simulators.replay import open_replay
from stm_live.simulators.scenario import (
    TIP_HAZARDS,
    Scenario,
    load_scenario,
)
from stm_live.simulators.tip import PRESET_CLASSES, tip_preset
from stm_live.validation import finite

__all__ = [
    "BIAS_INDEX",
    "CURRENT_INDEX",
    "SIGNAL_NAMES",
    "X_INDEX",
    "Y_INDEX",
    "Z_INDEX",
    "LineEventInfo",
    "SimulatedController",
]


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

_GOOD_TIPS = ("co", "coherent_co", "s", "mixed")
# Used when a scenario leaves reconditioning unspecified.
DEFAULT_RECONDITION = {
    "pulse": {"repair": 0.5, "blunt": 0.05},
    "shaper": {"repair": 0.6, "co": 0.1, "blunt": 0.05},
    "poke": {"co": 0.5, "s": 0.25, "blunt": 0.2},
}
WITHDRAW_TIME_S = 0.05
MOTOR_STEP_M = 100e-9  # one coarse step at the default amplitude
MAX_PIXELS = 2048
MAX_LINES = 2048
MAX_BUFFER_BYTES = 256 << 20  # all channels, both directions
RENDER_AHEAD_S = 1.0  # background rendering keeps the rows of the next second of scan ready


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
    replay : ReplaySource, GridReplaySource, str, path or None
        Serve a recorded .sxm scan instead of synthesised images, or a .3ds grid's sweeps
        (BiasSpectr.Start at its points).
    seed : int
        Seeds every random choice (noise, tip hazards, reconditioning outcomes).
    time_scale : float
        Simulated seconds per real second (> 0); tests use large values.
    clock : callable
        Real-time source in seconds (monotonic); injectable for tests.
    """

    def __init__(
        self,
        scenario=None,
        *,
        replay=None,
        seed: int = 0,
        time_scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
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
        self.on_render: Callable[[], None] | None = None  # called from the render thread when rows land
        self._render_pool: ThreadPoolExecutor | None = None  # see render_in_background

        if replay is not None:
            self.replay = open_replay(replay)
            self.scenario = load_scenario(scenario) if scenario is not None else Scenario(name="replay")
        else:
            self.replay = None
            self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        sc = self.scenario
        self.renderer = None if self.replay is not None else PhysicsRenderer(sc)
        self.signal_names: list[str] = list(SIGNAL_NAMES)

        # Bias / Z controller
        self.bias_V = float(sc.bias_V)
        self.setpoint_A = float(sc.setpoint_A)
        self.z_ctrl_on = bool(sc.z_controller)
        self.z_home_m = sc.z_nm * 1e-9
        self._z_m = self.z_home_m  # used while the controller is off
        # Scan settings (SI)
        f = sc.frame
        self.frame = (f.center_x_nm * 1e-9, f.center_y_nm * 1e-9, f.width_nm * 1e-9, f.height_nm * 1e-9, f.angle_deg)
        self.channel_indexes: list[int] = list(sc.channels)
        self.pixels, self.lines = f.pixels, f.lines
        self.direction = f.direction
        self.props = {
            "continuous": 0,
            "bouncy": 0,
            "autosave": 2,
            "series_name": "stm_live_",
            "comment": "",
            "modules": [],
            "autopaste": 2,
        }
        self._keep_time = True  # keep time per line constant
        self._t_fwd = self._t_bwd = float(sc.time_per_line_s)
        self._speed_ratio = 1.0
        self.folme_xy = (self.frame[0], self.frame[1])
        self.folme_speed = (50e-9, 0)
        self.tip_shaper_props = {
            "switch_off_delay": 0.05,
            "change_bias": 0,
            "bias": -1.0,
            "tip_lift": -0.3e-9,
            "lift_time_1": 0.1,
            "bias_lift": 2.0,
            "bias_settling_time": 0.05,
            "lift_height": 1.0e-9,
            "lift_time_2": 0.1,
            "end_wait_time": 0.05,
            "restore_feedback": 1,
        }
        self.motor_position = [0.0, 0.0, 0.0]
        self.modules = ModuleState()  # the other modules' settings (simulators/modules.py)

        if self.replay is not None:
            self.replay.configure(self)

        # Tip
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
        self._line_begun = -1  # last line whose tip evolution has been applied
        self._held = False  # the clock waits at the frame start for the first rendered rows
        self._waiting_rows = False  # the next event waits for its rows (background rendering)
        self._scan = None  # geometry of the running/last frame
        self._frame_rows: FrameRows | None = None  # the running/last frame's rendered rows
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.last_event = LineEventInfo(0, 0, 3)
        self.scan_end_count = 0
        self.last_scan_path = ""
        self._save_counter: dict[tuple[str, str], int] = {}  # (base name, suffix) -> last number written
        self.frames_completed = 0

    # ------------------------------------------------------------------ clock / state

    @property
    def sim_time_s(self) -> float:
        """Simulated seconds since the controller was created."""
        return (self._clock() - self._t0) * self.time_scale

    def _frame_elapsed(self) -> float:
        if self._state == "scanning" and not self._held:
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
            return self._point_current(self._z_m + self._tilt_plane_m())

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
            if self.renderer is None:
                return float(self._z_m)
            x, y = self._sample_point()
            z = self.renderer.point_height_nm(x, y, self.tip, self.bias_V, self.setpoint_A) * 1e-9
            return float(z - self._tilt_plane_m())  # the loop takes the tilt correction out of Z

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
        if self.renderer is None:
            return 0.0
        x, y = self._sample_point()
        return float(self.renderer.point_current(x, y, self.tip, self.bias_V, z_m * 1e9))

    def lockin(self, *, run: bool = False) -> tuple[float, float] | None:
        """(amplitude V, phase deg) while lock-in modulator 1 modulates the bias and
        demodulator 1 demodulates the current at the first harmonic (what LI Demod 1 X/Y
        carry), else None. ``run``: a bias spectroscopy switches the modulator on for its
        sweep (BiasSpectr.AdvPropsSet lock-in run)."""
        mods = self.modules.plain
        mod, demod = mods["lockin.mod"][1], mods["lockin.demod"][1]
        if not (mod["on"] or run) or mod["signal"] != BIAS_INDEX or demod["signal"] != CURRENT_INDEX:
            return None
        if mod["harmonic"] != 1 or demod["harmonic"] != 1:  # [ours]: higher harmonics are not simulated
            return None
        return float(mod["amplitude"]), float(demod["phase"])

    def _point_lockin(self, index: int) -> float:
        lockin = self.lockin()
        if lockin is None or self.renderer is None:
            return 0.0
        x, y = self._sample_point()
        z_nm = (
            self.renderer.point_height_nm(x, y, self.tip, self.bias_V, self.setpoint_A)
            if self.z_ctrl_on
            else (self._z_m + self._tilt_plane_m()) * 1e9
        )
        didv = self.renderer.point_didv(x, y, self.tip, self.bias_V, z_nm)
        return float(lockin_outputs(didv, lockin)[index - LI_X_INDEX])

    def sample_shift_m(self) -> tuple[float, float]:
        """Where the piezo origin sits on the sample (m): the coarse motor's X/Y plus the
        drift compensation's accumulated displacement (Piezo.DriftCompSet), so motor moves
        reach another area and compensation moves the image."""
        dx, dy, _ = drift_offset(self.modules, self.sim_time_s)
        return (self.motor_position[0] + dx, self.motor_position[1] + dy)

    def _drift_velocity(self) -> tuple[float, float]:
        mods = self.modules
        if not mods.drift["on"]:
            return (0.0, 0.0)
        return (mods.drift["v"][0], mods.drift["v"][1])

    def tilt(self) -> tuple[float, float]:
        """tan of the piezo tilt correction (Piezo.TiltSet), X and Y: the Z piezo adds the
        plane x tan + y tan (piezo coordinates) to Z."""
        t = self.modules.plain["piezo.tilt"]
        return (math.tan(math.radians(t["tilt_x"])), math.tan(math.radians(t["tilt_y"])))

    def _tilt_plane_m(self) -> float:
        """The tilt correction's Z (m) where the tip is."""
        tx, ty = self.tilt()
        if tx == ty == 0.0:
            return 0.0
        x, y = self.tip_position()
        return x * tx + y * ty

    def loop_lag_s(self) -> float:
        """How much the Z loop lags (s) beyond the default gains' (ZCtrl.GainSet): its time
        constant is T/P = 1/I, and the default gains' (1 ms, about a pixel at the default
        speed) is in every image already (renderer._feedback). Faster gains track as the
        default ones do (the loop's ringing is not simulated)."""
        p, t = self.modules.z_gain
        tau = t / p if p > 0 else math.inf
        return max(0.0, tau - Z_GAIN[1] / Z_GAIN[0])

    def _sample_point(self) -> tuple[float, float]:
        x, y = self.tip_position()
        sx, sy = self.sample_shift_m()
        return x + sx, y + sy

    # ------------------------------------------------------------------ positions

    def tip_position(self) -> tuple[float, float]:
        """Tip (x, y) in m: FolMe position, or where the running scan has the tip."""
        with self._lock:
            experiment = self.modules.experiment
            if experiment is not None:  # a Pattern experiment moves the tip from point to point
                return experiment.position(self.sim_time_s)
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
                raise ControllerError(
                    "cannot move the tip with Follow Me while a scan is running; pause or stop it first"
                )
            if self.modules.experiment is not None:
                raise ControllerError(
                    "cannot move the tip with Follow Me while a Pattern experiment runs; Pattern.ExpStop it first"
                )
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
        vals = [
            _finite(v, n) for v, n in zip((cx, cy, w, h, angle), ("centre X", "centre Y", "width", "height", "angle"))
        ]
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
                raise ControllerError(
                    f"scan buffer of {len(chans)} channels x {pixels} x {lines} needs "
                    f"{size >> 20} MiB; the simulator allows {MAX_BUFFER_BYTES >> 20} MiB"
                )
            self.channel_indexes = chans
            self.pixels, self.lines = pixels, lines

    def props_set(
        self, continuous: int, bouncy: int, autosave: int, series_name: str, comment: str, modules, autopaste: int = 0
    ) -> None:
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
        return {
            "fwd_speed": w / self._t_fwd,
            "bwd_speed": w / self._t_bwd,
            "fwd_time": self._t_fwd,
            "bwd_time": self._t_bwd,
            "keep_constant": 1 if self._keep_time else 0,
            "speed_ratio": self._speed_ratio,
        }

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
                if self._frame_rows is not None:  # a stopped frame never resumes
                    self._frame_rows.close()
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
        if self.modules.experiment is not None:
            raise ControllerError("a Pattern experiment is running: Pattern.ExpStop it before scanning")
        if self.replay is not None and not hasattr(self.replay, "rows"):
            raise ControllerError(
                f"replaying {self.replay.name}, a grid: there is no scan to replay; "
                "BiasSpectr.Start at its points answers the recorded sweeps"
            )
        if self.replay is not None:  # rows come in the recording's order
            direction = self.replay.direction
        self.direction = direction
        self.frame_index += 1
        self._scan = {
            "frame": tuple(self.frame),
            "pixels": self.pixels,
            "lines": self.lines,
            "direction": direction,
            "channels": list(self.channel_indexes),
            "t_fwd": self._t_fwd,
            "t_bwd": self._t_bwd,
            "frame_index": self.frame_index,
            "shift": self.sample_shift_m(),
            "drift_v": self._drift_velocity(),
        }
        self._buffers = {
            c: (
                np.full((self.lines, self.pixels), np.nan, np.float32),
                np.full((self.lines, self.pixels), np.nan, np.float32),
            )
            for c in self._scan["channels"]
        }
        if self._frame_rows is not None:
            self._frame_rows.close()
        self._frame_rows = None
        # The first block renders now (or first, in the background: the clock holds until it
        # is there), so the first line is never late.
        if self.renderer is not None:
            self._frame_rows = FrameRows(
                self.renderer,
                self._scan,
                self.seed,
                self._render_settings(),
                executor=self._render_pool,
                on_ready=self._rows_landed,
            )
        self._held = self._frame_rows is not None and not self._frame_rows.first_ready
        self._halves_done = 0
        self._line_begun = -1
        self._waiting_rows = False
        self._elapsed = 0.0
        self._ref_real = self._clock()
        self._state = "scanning"
        self._event(0, 3)
        self._notify()

    def next_event_delay(self) -> float | None:
        """Real seconds until the next end-of-line event (None if the scan is not running, or
        waits on the renderer: ``on_render`` tells when the rows land)."""
        with self._lock:
            if self._state != "scanning" or self._held or self._waiting_rows:
                return None
            g = self._scan
            k = self._halves_done
            t_next = (k // 2) * (g["t_fwd"] + g["t_bwd"]) + (g["t_fwd"] if k % 2 == 0 else g["t_fwd"] + g["t_bwd"])
            return max(0.0, (t_next - self._frame_elapsed()) / self.time_scale)

    def advance(self) -> int:
        """Process every end-of-line event due by now; returns how many happened.

        Bounded: one frame's worth of events per call (the rest on the next call). With
        background rendering it stops at the first event whose rows have not landed yet.
        """
        with self._lock:
            if self.modules.experiment is not None:
                experiment_tick(self, self.modules)
            if self._state != "scanning":
                return 0
            if self._held:
                if not self._frame_rows.first_ready:
                    return 0
                self._held = False  # the clock starts with the first rows there
                self._ref_real = self._clock()
            g = self._scan
            t = self._frame_elapsed()
            period = g["t_fwd"] + g["t_bwd"]
            total = self._halves_to_scan()
            done_lines = int(t // period)
            due = 2 * done_lines + (1 if t - done_lines * period >= g["t_fwd"] else 0)
            due = min(due, total)
            n = 0
            self._waiting_rows = False
            while self._halves_done < due:
                k = self._halves_done
                line, backward = k // 2, k % 2
                if not backward and self._line_begun < line:
                    self._begin_line(line)
                    self._line_begun = line
                rows = self._rows(line)
                if rows is None:  # rendering in the background: on_render calls back
                    self._waiting_rows = True
                    break
                self._fill_row(line, backward, rows)
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
        with self._lock:
            if self.save_dir is None:
                raise ControllerError("no save folder configured for the simulator")
            if self._scan is None:
                raise ControllerError("nothing scanned yet")
            g = self._scan
            channels, units, idx = {}, {}, {}
            for c, (fw, bw) in self._buffers.items():
                name, unit = split_unit(self.signal_names[c])
                channels[name] = {"forward": fw.copy(), "backward": bw[:, ::-1].copy()}
                units[name], idx[name] = unit, c
            cx, cy, w, h, ang = g["frame"]
            scan = scan_from_frames(
                channels,
                units=units,
                center_x_m=cx,
                center_y_m=cy,
                width_m=w,
                height_m=h,
                angle_deg=ang,
                direction=g["direction"],
                bias_V=self.bias_V,
                setpoint_A=self.setpoint_A,
                z_controller="constant_current" if self.z_ctrl_on else "constant_height",
                acq_time_s=g["lines"] * (g["t_fwd"] + g["t_bwd"]),
                comment=self.props["comment"],
                signal_indexes=idx,
            )
            return write_sxm(self.next_save_path(self.props["series_name"], ".sxm"), scan)

    def next_save_path(self, base: str, suffix: str):
        """Nanonis naming: ``<base>NNN<suffix>`` in the session folder, a 3-digit counter per
        base and suffix from 001 that never overwrites a file already there."""
        if self.save_dir is None:
            raise ControllerError("no save folder configured for the simulator")
        folder = Path(self.save_dir)
        with self._lock:
            n = self._save_counter.get((base, suffix), 0) + 1
            while (folder / f"{base}{n:03d}{suffix}").exists():
                n += 1
            self._save_counter[(base, suffix)] = n
        return folder / f"{base}{n:03d}{suffix}"

    # ------------------------------------------------------------------ images

    def _render_settings(self) -> RenderSettings:
        return RenderSettings(
            self.tip,
            self.bias_V,
            self.z_ctrl_on,
            self.setpoint_A,
            round(self._z_m, 15),
            self.lockin(),
            self.tilt(),
            self.loop_lag_s(),
        )

    @property
    def render_pool(self) -> ThreadPoolExecutor | None:
        """The render thread (background rendering on), where long physics goes; None: inline."""
        return self._render_pool

    def render_in_background(self, enabled: bool = True) -> None:
        """Render rows on a thread of their own, ahead of the scan (the server's mode), or
        (False) inline when an event needs them, as a controller driven directly does."""
        with self._lock:
            if enabled and self._render_pool is None:
                self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="sim-render")
            elif not enabled and self._render_pool is not None:
                pool, self._render_pool = self._render_pool, None
                pool.shutdown(wait=False, cancel_futures=True)  # dropped blocks render inline
            if self._frame_rows is not None:
                self._frame_rows.executor = self._render_pool

    def _rows_landed(self) -> None:
        cb = self.on_render
        if cb is not None:
            cb()

    def _rows(self, line: int) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
        """Channel -> (forward, backward) row ``line`` in internal orientation, noise added;
        None while it renders in the background.

        The model renders in blocks of rows for the present settings, so a scan starts
        after one block (not a whole 256x256 frame) and a tip or bias change mid-frame
        switches the rows from that line on (what ``artifacts.tip_change`` does to whole
        images).
        """
        if self.replay is not None:
            return self.replay.rows(line, self._scan["channels"])
        return self._frame_rows.rows(line, self._render_settings(), wait=self._render_pool is None)

    def prefetch(self) -> None:
        """Render ahead (called between events): inline, the block of the next line; in the
        background, the blocks of the next ``RENDER_AHEAD_S`` of scan (at least two),
        stopping at the next scheduled tip change, which makes later rows for the present
        tip waste."""
        with self._lock:
            if self._state != "scanning" or self._frame_rows is None:
                return
            rows = self._frame_rows
            line = self._halves_done // 2
            if self._render_pool is None:
                rows.rows(min(line + 1, self._lines_to_scan() - 1), self._render_settings())
                return
            g = self._scan
            ahead = max(2 * rows.size, int(RENDER_AHEAD_S * self.time_scale / (g["t_fwd"] + g["t_bwd"])))
            last = line + ahead
            for e in self.scenario.evolution.events:
                if e.frame == self.frame_index and line < e.line <= last:
                    last = e.line
            rows.prefetch(line, last, self._render_settings())

    def _begin_line(self, line: int) -> None:
        if self.replay is None:
            self._evolve_tip(line)

    def _fill_row(self, line: int, backward: int, rows) -> None:
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
                spread = self._frame_rows.spread.get(c, 0.0)
                row += np.float32(jump * spread)
                row += (0.3 * spread * self._rng.standard_normal(row.shape)).astype(np.float32)
            # Wire orientation: backward rows are stored in acquisition order (mirrored).
            bufs[backward][line] = row[::-1] if backward else row

    # ------------------------------------------------------------------ frame data

    def frame_data(self, channel_index: int, forward: bool) -> tuple[str, np.ndarray, str]:
        """(signal name, (lines, pixels) wire-orientation copy, scan direction)."""
        with self._lock:
            if channel_index not in self.channel_indexes and channel_index not in self._buffers:
                raise ControllerError(f"channel {channel_index} is not in the scan buffer {self.channel_indexes}")
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
            if index in (LI_X_INDEX, LI_Y_INDEX):
                return self._point_lockin(index)
            if 8 <= index < 16:  # Output 1-8: the User Output values
                return float(self.modules.plain["userout"][index - 7]["value"])
            return 0.0

    # ------------------------------------------------------------------ motor

    def motor_move(self, direction: int, steps: int) -> float:
        """Step the coarse motor (the sample moves under the piezo: the next frame starts
        there); returns the move's simulated duration (s), steps / step frequency. A step is
        ``MOTOR_STEP_M`` at the default amplitude and scales with it (Motor.FreqAmpSet)."""
        if not 0 <= direction <= 5:
            raise ControllerError(f"motor direction {direction} outside 0..5 (X+ X- Y+ Y- Z+ Z-)")
        with self._lock:
            axis, sign = direction // 2, (1 if direction % 2 == 0 else -1)
            self.motor_position[axis] += sign * steps * self.motor_step_m(axis)
            return steps / self.modules.motor_freq_amp[axis + 1][0]

    def motor_step_m(self, axis: int) -> float:
        """One coarse step along ``axis`` (0 X, 1 Y, 2 Z) at its present amplitude (m)."""
        return MOTOR_STEP_M * self.modules.motor_freq_amp[axis + 1][1] / MOTOR_AMPLITUDE_V

    # ------------------------------------------------------------------ tip

    @property
    def tip_label(self) -> str:
        """The tip classifier's class for the true tip (``unstable`` during an episode)."""
        if self.unstable_lines_left > 0:
            return "unstable"
        return PRESET_CLASSES.get(self.tip_name, self.tip_name)

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
        self.tip_history.append(
            {
                "sim_time_s": self.sim_time_s,
                "frame": self.frame_index,
                "line": line,
                "before": before,
                "after": self.tip_label,
                "cause": cause,
            }
        )

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
        record = {
            "sim_time_s": self.sim_time_s,
            "action": action,
            "outcome": outcome,
            "before": before,
            "after": self.tip_label,
        }
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
            return sum(
                max(0.0, p[k])
                for k in ("switch_off_delay", "lift_time_1", "bias_settling_time", "lift_time_2", "end_wait_time")
            )


def _finite(value, what: str) -> float:
    return finite(what, value, ControllerError)
