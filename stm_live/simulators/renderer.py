"""Rendering of the simulated controller's scan rows, off its serving loop.

``PhysicsRenderer`` turns a scenario into rows through the forward model
(``imaging``, ``artifacts``; the lock-in's dI/dV and bias sweeps through ``spectra``, the
scenario's ``SpectralModel``): a block of rows is a pure function of the frame geometry,
the settings in force (``RenderSettings``: tip, bias, Z loop, setpoint, height, lock-in,
piezo tilt, Z-loop lag) and a seed. ``FrameRows`` keeps
one frame's blocks: rendered when first needed (a controller driven directly), or on a
background executor ahead of the scan (the server's), so neither the server's loop nor the
controller's lock ever waits on a render. Same seed and scenario, same pixels, either way.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from scipy.signal import lfilter

from stm_live.simulators import artifacts, imaging, spectra
from stm_live.simulators.imaging import Z_MAX_NM, Z_MIN_NM, Placement, ScanFrame, Substrate
from stm_live.simulators.orbitals import molecule
from stm_live.simulators.scenario import Scenario
from stm_live.simulators.vacuum import KAPPA_PER_NM

__all__ = [
    "BIAS_INDEX",
    "CURRENT_INDEX",
    "LI_X_INDEX",
    "LI_Y_INDEX",
    "X_INDEX",
    "Y_INDEX",
    "Z_INDEX",
    "FrameRows",
    "PhysicsRenderer",
    "RenderSettings",
    "lockin_outputs",
    "submit_or_run",
]

# Signal indexes of the simulated controller (its Signals.NamesGet list).
CURRENT_INDEX, BIAS_INDEX, X_INDEX, Y_INDEX, Z_INDEX = 0, 24, 25, 26, 30
LI_X_INDEX, LI_Y_INDEX = 35, 36  # "LI Demod 1 X (A)", "LI Demod 1 Y (A)"
# Molecules farther than this from a frame's edge add nothing to its image (the orbitals'
# tails decay as e^{-κr}), so a scene of several sample areas renders only the near ones.
REACH_NM = 5.0


class RenderSettings(NamedTuple):
    """The controller settings a block of rows is rendered for (a block rendered for other
    settings is never served)."""

    tip: object  # TipState
    bias_V: float
    z_on: bool
    setpoint_A: float
    z_m: float  # tip height with the loop off
    lockin: tuple[float, float] | None  # (amplitude V, phase deg) while it modulates the bias
    tilt: tuple[float, float] = (0.0, 0.0)  # tan of the piezo tilt correction, X and Y
    loop_lag_s: float = 0.0  # the Z loop's lag beyond the default gains' (see _feedback)


def lockin_outputs(didv, lockin) -> tuple[np.ndarray, np.ndarray]:
    """Demodulator X and Y of an ideal lock-in for dI/dV ``didv`` (A/V).

    ``lockin``: ``(amplitude_V, phase_deg)`` of the bias modulation, or None (off: zeros).
    First harmonic, modulation small against the resonance widths: the current's component
    at the modulation frequency is A dI/dV in phase with the bias; the demodulator's
    reference phase φ rotates it, X = A dI/dV cos φ, Y = −A dI/dV sin φ."""
    didv = np.asarray(didv, dtype=np.float64)
    if lockin is None:
        return np.zeros_like(didv), np.zeros_like(didv)
    amplitude, phase = lockin
    a = math.radians(phase)
    return amplitude * didv * math.cos(a), -amplitude * didv * math.sin(a)


class PhysicsRenderer:
    """Scenario -> blocks of scan rows (and point values) through the forward model.

    Pure: a block depends only on its arguments, so it may render on any thread, ahead of
    the scan, and come out the same."""

    def __init__(self, scenario: Scenario):

        self.scenario = scenario
        self.placements = list(scenario.molecules)
        self._reach = [(p.x_nm, p.y_nm, _radius_nm(p) + REACH_NM) for p in self.placements]
        self.substrate = Substrate(**scenario.substrate) if scenario.substrate else None
        self.model = scenario.spectra  # level energies and widths (spectra.SpectralModel)
        self._point_cache: dict = {}

    def near(self, frame) -> list:
        """The placements that reach into ``frame`` (a ScanFrame): all of them, in order, for
        a frame over one area (so its image is the whole scene's), else the near ones, or
        the nearest one when none is (the model needs one; its tail adds nothing there)."""
        r = math.hypot(frame.width_nm, frame.height_nm) / 2
        d = [math.hypot(x - frame.center_x_nm, y - frame.center_y_nm) - reach - r for x, y, reach in self._reach]
        near = [p for p, gap in zip(self.placements, d) if gap < 0]
        if len(near) == len(self.placements):
            return self.placements
        return near or [self.placements[int(np.argmin(d))]]

    def block_lines(self, g) -> int:
        """Rows rendered at once: the whole frame when drift/creep resample it."""
        a = self.scenario.artifacts
        if a.drift > 0 or a.creep > 0:
            return g["lines"]
        return max(8, 4096 // max(g["pixels"], 1))  # ~16 rows at 256 px

    def _sub_frame(self, g, r0: int, r1: int, margin: int):
        """The ScanFrame whose rows are rows r0-margin .. r1+margin of the full frame."""

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
        frame = ScanFrame.from_si(
            x + shift[0], y + shift[1], w, (a1 - a0) * dv, ang, g["pixels"], a1 - a0, g["direction"]
        )
        return frame, r0 - a0, r1 - a0, shift

    def render_block(
        self, g, tip, *, bias_V, z_on, setpoint_A, z_nm, rows, seed, lockin=None, tilt=(0.0, 0.0), loop_lag_s=0.0
    ):
        """Noise-free rows ``rows`` = (r0, r1) per channel, (forward, backward), float64.

        ``lockin``: ``(amplitude_V, phase_deg)`` while the lock-in modulates the bias (its
        channels then carry dI/dV from ``spectra`` at the scan's own tip heights), else None.
        ``tilt``: tan of the piezo tilt correction (X, Y): the Z piezo adds the plane
        x tan + y tan (piezo coordinates), which the loop takes out of Z at constant current
        and the tip's height carries at constant height. ``loop_lag_s``: see ``_feedback``."""

        r0, r1 = rows
        if bias_V == 0:  # the model needs a bias sign; 1 mV stands in for 0 V
            bias_V = 1e-3
        margin = 0
        if tip.apex_width_nm > 0 and r1 - r0 < g["lines"]:  # blur needs neighbouring rows
            margin = int(math.ceil(3 * tip.apex_width_nm / (g["frame"][3] * 1e9 / g["lines"])))
        frame, i0, i1, (shift_x, shift_y) = self._sub_frame(g, r0, r1, margin)
        n = r1 - r0
        x_nm, y_nm = frame.grid()
        xg, yg = x_nm * 1e-9 - shift_x, y_nm * 1e-9 - shift_y  # piezo coordinates (m)
        plane = None if tilt == (0.0, 0.0) else (xg * tilt[0] + yg * tilt[1]) * 1e9  # nm
        placements = self.near(frame)
        wanted = {LI_X_INDEX, LI_Y_INDEX} & set(g["channels"])
        didv = None
        if z_on:
            z_raw = imaging.constant_current_image(
                placements, frame, tip, setpoint_A=setpoint_A, bias_V=bias_V, substrate=self.substrate
            ).astype(np.float64)
            if lockin is not None and wanted:  # dI/dV where the loop held the tip
                didv = self._didv(frame, tip, bias_V, z_raw, self.substrate or imaging.Substrate())
                didv = self._geometric(didv, seed)[i0:i1]
            z = self._geometric(z_raw, seed)[i0:i1]
            if plane is not None:  # the loop holds the gap: Z takes the correction's plane out
                z = z - plane[i0:i1]
            cur, zimg = _feedback(z, g, setpoint_A, loop_lag_s)
        else:
            z_tip = z_nm if plane is None else z_nm + plane
            z_eval, beyond = _model_height(z_tip)
            i = imaging.constant_height_image(
                placements, frame, tip, z_nm=z_eval, bias_V=bias_V, substrate=self.substrate
            ).astype(np.float64)
            i = self._geometric(i, seed) * beyond
            if lockin is not None and wanted:
                didv = self._geometric(self._didv(frame, tip, bias_V, z_eval, self.substrate), seed) * beyond
                didv = didv[i0:i1]
            i = i[i0:i1]
            cur = {0: i, 1: i}
            zimg = {0: np.full((n, g["pixels"]), z_nm * 1e-9), 1: np.full((n, g["pixels"]), z_nm * 1e-9)}
        xg, yg = xg[i0:i1], yg[i0:i1]
        li_x, li_y = lockin_outputs(np.zeros((n, g["pixels"])) if didv is None else didv, lockin)
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
                elif c == LI_X_INDEX:
                    img = li_x
                elif c == LI_Y_INDEX:
                    img = li_y
                else:
                    img = np.zeros((n, g["pixels"]))
                pair.append(np.asarray(img, dtype=np.float64))
            out[c] = tuple(pair)
        return out

    def _didv(self, frame, tip, bias_V, z_nm, substrate) -> np.ndarray:

        return spectra.simulate(
            self.placements, tip, frame, bias_V, z_nm=z_nm, model=self.model, substrate=substrate
        ).didv_A_per_V

    def spectra_at(
        self, at, tip, sweep_V, *, z_nm=None, setpoint_A=None, setpoint_bias_V=None, z_offset_nm: float = 0.0
    ):
        """Sweeps (``spectra.simulate``, ``sweep_V`` of >= 2 biases) over ``at`` (a ScanFrame of
        grid points, or an (x, y) nm point) for this scene, the tip at height ``z_nm`` (the loop
        off) or where the loop held it, I(``setpoint_bias_V``) = ``setpoint_A``, then moved by
        ``z_offset_nm`` (+ away from the surface) as a bias spectroscopy does. The substrate is
        the scan's: the scenario's, or a flat one under feedback (as imaging)."""

        substrate = self.substrate
        if setpoint_A is not None:
            if setpoint_bias_V == 0:  # the model needs a bias sign; 1 mV stands in for 0 V (as the scan)
                setpoint_bias_V = 1e-3
            substrate = substrate or imaging.Substrate()
            held = spectra.simulate(
                self.placements,
                tip,
                at,
                sweep_V,
                setpoint_A=setpoint_A,
                setpoint_bias_V=setpoint_bias_V,
                model=self.model,
                substrate=substrate,
            )
            if not z_offset_nm:
                return held
            z_nm = held.z_nm

        z_nm = np.asarray(z_nm, dtype=float) + z_offset_nm
        z_eval = np.clip(z_nm, imaging.Z_MIN_NM, imaging.Z_MAX_NM)
        out = spectra.simulate(self.placements, tip, at, sweep_V, z_nm=z_eval, model=self.model, substrate=substrate)
        # beyond the model's range the current just keeps decaying: e^{-2κΔz} (as the scan)
        beyond = np.broadcast_to(np.exp(-2 * KAPPA_PER_NM * np.maximum(0.0, z_nm - z_eval)), out.z_nm.shape)[..., None]
        return replace(
            out,
            didv_A_per_V=out.didv_A_per_V * beyond,
            current_A=out.current_A * beyond,
            z_nm=np.broadcast_to(z_nm, out.z_nm.shape).copy(),
        )

    def _geometric(self, img, seed):
        """Drift and creep (whole-frame renders only): resample the image."""

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

        a = self.scenario.artifacts
        shape = (g["lines"], g["pixels"])
        noisy = [CURRENT_INDEX] + ([Z_INDEX] if z_on else []) + [LI_X_INDEX]
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

        key = ("I", round(x_m, 13), round(y_m, 13), tip, bias_V, round(z_nm, 6))
        if key not in self._point_cache:
            frame = self._point_frame(x_m, y_m)
            img = imaging.constant_height_image(
                self.near(frame), frame, tip, z_nm=z_nm, bias_V=bias_V, substrate=self.substrate
            )
            self._remember(key, float(np.mean(img)))
        return self._point_cache[key]

    def point_height_nm(self, x_m, y_m, tip, bias_V, setpoint_A) -> float:

        key = ("Z", round(x_m, 13), round(y_m, 13), tip, bias_V, setpoint_A)
        if key not in self._point_cache:
            frame = self._point_frame(x_m, y_m)
            img = imaging.constant_current_image(
                self.near(frame), frame, tip, setpoint_A=setpoint_A, bias_V=bias_V, substrate=self.substrate
            )
            self._remember(key, float(np.mean(img)))
        return self._point_cache[key]

    def point_didv(self, x_m, y_m, tip, bias_V, z_nm) -> float:
        """dI/dV (A/V) at one point and tip height (the lock-in's input)."""
        key = ("dIdV", round(x_m, 13), round(y_m, 13), tip, bias_V, round(z_nm, 6))
        if key not in self._point_cache:
            if bias_V == 0:
                bias_V = 1e-3
            frame = self._point_frame(x_m, y_m)
            z_eval, beyond = _model_height(z_nm)
            self._remember(key, float(np.mean(self._didv(frame, tip, bias_V, z_eval, self.substrate))) * beyond)
        return self._point_cache[key]

    def _remember(self, key, value):
        if len(self._point_cache) > 4096:  # bounded memory
            self._point_cache.clear()
        self._point_cache[key] = value

    @staticmethod
    def _point_frame(x_m, y_m):

        return ScanFrame(center_x_nm=x_m * 1e9, center_y_nm=y_m * 1e9, width_nm=0.02, height_nm=0.02, pixels=2, lines=2)


def _radius_nm(placement) -> float:
    """How far a placement's atoms reach from its centre (a cube orbital: from its atoms)."""

    if isinstance(placement, Placement):
        return molecule(placement.molecule).radius_nm
    atoms = getattr(getattr(placement.orbital, "cube", None), "atoms_nm", None)
    if atoms is None:
        return math.inf  # nothing says how far it reaches: always rendered
    xy = np.asarray(atoms)[:, :2] - np.asarray(placement.orbital.center_nm)[:2]
    return float(np.hypot(*xy.T).max(initial=0.0))


def _model_height(z_nm):
    """(the height the model is evaluated at, the factor e^{-2κΔz} beyond its range): beyond
    the model's heights the current just keeps decaying. Scalar or per pixel."""

    if np.ndim(z_nm) == 0:
        z_eval = min(max(z_nm, Z_MIN_NM), Z_MAX_NM)
        return z_eval, math.exp(-2 * KAPPA_PER_NM * max(0.0, z_nm - z_eval))
    z_eval = np.clip(z_nm, Z_MIN_NM, Z_MAX_NM)
    return z_eval, np.exp(-2 * KAPPA_PER_NM * np.maximum(0.0, z_nm - z_eval))


def _feedback(z_nm, g, setpoint_A, loop_lag_s):
    """({direction: current (A)}, {direction: Z (m)}) of the Z loop holding ``setpoint_A``
    over the heights ``z_nm`` (rows) it is asked to follow, forward and backward.

    Model: the loop's Z follows its target through a first-order low-pass along the fast
    axis with time constant ``loop_lag_s`` (what gains below the defaults add), and the
    current is the setpoint times e^{2κ(target − Z)} with Z read one pixel behind (the
    default loop's lag: today's images at lag 0)."""

    cur, zimg = {}, {}
    for d, lag in ((0, 1), (1, -1)):
        zf = (
            z_nm
            if loop_lag_s <= 0
            else _low_pass(z_nm, g["t_bwd" if d else "t_fwd"] / g["pixels"] / loop_lag_s, reverse=bool(d))
        )
        zl = np.roll(zf, lag, axis=1)
        edge = 0 if lag > 0 else -1
        zl[:, edge] = zf[:, edge]
        cur[d] = setpoint_A * np.exp(np.clip(2 * KAPPA_PER_NM * (z_nm - zl), -5, 5))
        zimg[d] = zf * 1e-9
    return cur, zimg


def _low_pass(rows, dt_over_tau: float, *, reverse: bool) -> np.ndarray:
    """First-order low-pass of each row (y_k = a y_{k-1} + (1 - a) x_k, a = e^{-dt/τ}),
    starting settled on its first pixel; ``reverse``: along the row from its end."""

    x = rows[:, ::-1] if reverse else rows
    a = math.exp(-dt_over_tau)
    y, _ = lfilter([1 - a], [1, -a], x, axis=1, zi=a * x[:, :1])
    return y[:, ::-1] if reverse else y


def submit_or_run(executor: Executor | None, fn: Callable[[], object]) -> tuple[Future, bool]:
    """``fn`` on ``executor``, or here when there is none (or it was shut down: the server
    stopped): (its Future, whether it was queued). An error is raised by ``result()``."""
    if executor is not None:
        try:
            return executor.submit(fn), True
        except RuntimeError:
            pass
    fut: Future = Future()
    try:
        fut.set_result(fn())
    except Exception as exc:  # raised to whoever asks for the result
        fut.set_exception(exc)
    return fut, False


class FrameRows:
    """One frame's rows, in blocks rendered for the settings in force when each is needed,
    with the frame's noise added (float32, internal orientation).

    ``settings`` is a ``RenderSettings``; a block rendered for other settings is never
    served. The frame's noise fields are scaled to its first block
    (block 0 for the settings at the start), so that block is always rendered first.

    Without an executor a block renders when first asked for. With one (a single worker:
    blocks run in the order asked), it renders there: ``rows(..., wait=False)`` answers None
    until the block has landed, and ``on_ready`` is called from the worker when one lands.
    Only the owner's thread (under its lock) calls the methods; the worker only renders.
    """

    def __init__(
        self,
        model: PhysicsRenderer,
        g: dict,
        seed: int,
        settings: RenderSettings,
        *,
        executor: Executor | None = None,
        on_ready: Callable[[], None] | None = None,
    ):
        self.model, self.g, self.seed = model, g, seed
        self.size = model.block_lines(g)
        self.executor, self.on_ready = executor, on_ready
        self._first_settings = settings
        self._settings = settings
        self._blocks: dict[tuple[Hashable, int], Future] = {}
        self._noise_lock = threading.Lock()
        self._noise: dict | None = None
        self.spread: dict[int, float] = {}
        self._first = self._request(settings, 0)

    @property
    def first_ready(self) -> bool:
        """The frame's first block (and its noise) has rendered."""
        return self._first.done()

    def rows(self, line: int, settings: RenderSettings, *, wait: bool = True):
        """Channel -> (forward, backward) row ``line`` for ``settings``; None while its block
        renders in the background and ``wait`` is False. A render's error is raised here."""
        fut = self._request(settings, line // self.size)
        if not wait and not fut.done():
            return None
        r0, block = fut.result()
        return {c: (fw[line - r0], bw[line - r0]) for c, (fw, bw) in block.items()}

    def prefetch(self, first: int, last: int, settings: RenderSettings) -> None:
        """Ask for the blocks holding rows ``first`` .. ``last`` (inclusive) for ``settings``."""
        last = min(last, self.g["lines"] - 1)
        for b in range(first // self.size, last // self.size + 1):
            self._request(settings, b)

    def close(self) -> None:
        """Drop the renders not yet started (the frame is over)."""
        for fut in self._blocks.values():
            fut.cancel()
        self._blocks.clear()

    def _request(self, settings: RenderSettings, b: int) -> Future:
        fut = self._blocks.get((settings, b))
        if fut is not None and not fut.cancelled():
            return fut
        if settings != self._settings:  # tip/bias/Z changed: blocks for the old settings are waste
            for key in [k for k in self._blocks if k[0] != settings]:
                if self._blocks[key] is not self._first:  # the frame's noise comes from the first
                    self._blocks[key].cancel()
                del self._blocks[key]
            self._settings = settings
        fut, queued = submit_or_run(self.executor, lambda: self._render(settings, b))
        if queued and self.on_ready is not None:
            fut.add_done_callback(lambda _f: self.on_ready())
        self._blocks[(settings, b)] = fut
        return fut

    def _plain(self, settings: RenderSettings, b: int) -> tuple[int, dict]:
        s, g = settings, self.g
        r0, r1 = b * self.size, min(g["lines"], (b + 1) * self.size)
        block = self.model.render_block(
            g,
            s.tip,
            bias_V=s.bias_V,
            z_on=s.z_on,
            setpoint_A=s.setpoint_A,
            z_nm=s.z_m * 1e9,
            rows=(r0, r1),
            lockin=s.lockin,
            tilt=s.tilt,
            loop_lag_s=s.loop_lag_s,
            seed=np.random.SeedSequence([self.seed, 3, g["frame_index"], b]),
        )
        return r0, block

    def _frame_noise(self, first_block: dict | None = None) -> dict:
        """The frame's additive noise, scaled to its first block (rendered here if its own
        render was dropped, e.g. by an executor shut down before it ran)."""
        with self._noise_lock:
            if self._noise is None:
                if first_block is None:
                    first_block = self._plain(self._first_settings, 0)[1]
                self._noise, self.spread = self.model.noise_fields(
                    self.g,
                    first_block,
                    np.random.SeedSequence([self.seed, 4, self.g["frame_index"]]),
                    z_on=self._first_settings.z_on,
                )
            return self._noise

    def _render(self, settings: RenderSettings, b: int) -> tuple[int, dict]:
        r0, block = self._plain(settings, b)
        first = b == 0 and settings == self._first_settings
        noise = self._frame_noise(block if first else None)
        r1 = r0 + next(iter(block.values()))[0].shape[0]
        out = {}
        for c, (fw, bw) in block.items():
            nf, nb = noise.get(c, (None, None))
            if nf is not None:
                fw = fw + nf[r0:r1]
                bw = bw + nb[r0:r1]
            out[c] = (fw.astype(np.float32), bw.astype(np.float32))
        return r0, out
