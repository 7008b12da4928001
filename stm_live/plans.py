"""Bluesky plans for a Nanonis STM: live frames, tip reconditioning, surveys.

Document layout: see ``docs/interfaces.md`` ("Bluesky documents"). One run per frame;
the start document carries the frame geometry in its ``stm_live`` block; the primary
stream has one Event per finished scan line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import FailedStatus, MsgGenerator

from stm_live.devices.spectroscopy import grid_points
from stm_live.devices.stm import NanonisSTM

__all__ = ["live_frame", "recondition_tip", "survey", "bias_series", "grid_spectroscopy", "frame_tuple", "Z_MODES"]

Z_MODES = ("constant_current", "constant_height")
_FRAME_KEYS = ("center_x_m", "center_y_m", "width_m", "height_m", "angle_deg")


def frame_tuple(frame: Mapping[str, float] | Sequence[float]) -> tuple[float, ...]:
    """``(center_x_m, center_y_m, width_m, height_m, angle_deg)`` from a mapping with
    those keys (angle optional) or a 4/5-sequence. Raises ValueError naming the problem."""
    if isinstance(frame, Mapping):
        missing = [k for k in _FRAME_KEYS[:4] if k not in frame]
        if missing:
            raise ValueError(f"frame is missing {missing}; expected keys {list(_FRAME_KEYS)}")
        values = [frame[k] for k in _FRAME_KEYS[:4]] + [frame.get("angle_deg", 0.0)]
    else:
        values = list(frame)
        if len(values) == 4:
            values.append(0.0)
        if len(values) != 5:
            raise ValueError(f"frame must have 4 or 5 values {_FRAME_KEYS}, got {len(values)}")
    out = tuple(float(v) for v in values)
    if out[2] <= 0 or out[3] <= 0:
        raise ValueError(f"frame width and height must be positive, got {out[2]} x {out[3]} m")
    return out


def _status_cause(exc: Exception) -> MsgGenerator[None]:
    """Re-raise a failed line Status as its cause, so the stop document's ``reason``
    says what happened ("controller ... dropped while waiting for line 7 of 64")."""
    if isinstance(exc, FailedStatus) and exc.__cause__ is not None:
        raise exc.__cause__
    yield from bps.null()


def _stop_scan(stm: NanonisSTM) -> MsgGenerator[None]:
    """Cleanup: stop the controller scan (no-op when it already ended)."""
    yield from bps.mv(stm.scan_action, "stop")


def live_frame(
    stm: NanonisSTM,
    *,
    frame: Mapping[str, float] | Sequence[float],
    pixels: int,
    lines: int,
    channels: Sequence[str] | Mapping[str, int] = ("Current", "Z"),
    direction: str = "down",
    z_controller: str = "constant_current",
    bias: float | None = None,
    setpoint: float | None = None,
    md: dict[str, Any] | None = None,
) -> MsgGenerator[int]:
    """Acquire one frame live: one Bluesky run, one Event per finished scan line.

    Parameters
    ----------
    stm : NanonisSTM
        The microscope.
    frame : mapping or sequence
        ``{"center_x_m", "center_y_m", "width_m", "height_m", "angle_deg"}`` or the same
        five values in that order (SI; angle optional).
    pixels, lines : int
        Points per line and lines per frame.
    channels : sequence of names or mapping name -> RT signal index
        Recorded channels; names are resolved through the profile (or the usual Nanonis
        indexes: Current 0, Bias 24, Z 30).
    direction : {"down", "up"}
        Scan direction; "down" starts at the top (+y) edge.
    z_controller : {"constant_current", "constant_height"}
        Z controller on (constant current) or off (constant height).
    bias, setpoint : float, optional
        Set before the scan (V, A); checked against the profile limits first.
    md : dict, optional
        Extra start-document metadata.

    Yields
    ------
    msg : Msg
        Configuration, then the run: per line ``checkpoint`` then ``trigger_and_read``.

    Returns
    -------
    lines : int
        Distinct lines received (== ``lines`` for a complete frame).

    Notes
    -----
    RunEngine pause/resume pauses/resumes the controller scan (``stm.lines.pause``);
    a suspender rewind re-delivers the line acquired after the last checkpoint unless its
    Event already went out (only a rewind after the last line repeats one: consumers keep
    the last); abort or an exception stops the scan. A link that stays down past
    ``stm.max_outage_s`` ends the run "fail", its reason naming the controller and line.

    See Also
    --------
    recondition_tip, survey
    """
    cx, cy, width, height, angle = frame_tuple(frame)
    if direction not in ("down", "up"):
        raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
    if z_controller not in Z_MODES:
        raise ValueError(f"z_controller must be one of {Z_MODES}, not {z_controller!r}")
    pixels, lines = int(pixels), int(lines)
    if pixels < 1 or lines < 1:
        raise ValueError(f"pixels and lines must be >= 1, got {pixels} x {lines}")
    profile = stm.profile
    if profile is not None:  # refuse before anything is sent
        profile.check_frame(cx, cy, width, height)
        profile.check_pixels(pixels, lines)
        if bias is not None:
            profile.check_bias(bias)
        if setpoint is not None:
            profile.check_setpoint(setpoint)

    stm.link.rearm()  # an outage that ended the last frame does not shorten this one's budget
    # a scan the last frame's cleanup could not reach (its link was lost) would refuse the buffer
    yield from _stop_scan(stm)
    # configuration: each one round trip, off the RunEngine loop (Status in a thread)
    yield from bps.configure(stm.lines, {"channels": channels, "pixels": pixels, "lines": lines})
    indexes = [c["index"] for c in stm.lines.channel_info()]
    yield from bps.mv(stm.scan_direction, direction)
    yield from bps.mv(stm.frame, (cx, cy, width, height, angle))
    yield from bps.mv(stm.buffer, (indexes, pixels, lines))
    yield from bps.mv(stm.z_controller, int(z_controller == "constant_current"))
    if bias is not None:
        yield from bps.mv(stm.bias, bias)
    if setpoint is not None:
        yield from bps.mv(stm.setpoint, setpoint)

    # what the controller actually holds (float32 on the wire) goes into the start doc
    got = []
    for sig in (stm.frame.center_x, stm.frame.center_y, stm.frame.width, stm.frame.height, stm.frame.angle):
        got.append(float((yield from bps.rd(sig))))
    bias_V = float((yield from bps.rd(stm.bias)))
    setpoint_A = float((yield from bps.rd(stm.setpoint)))
    block = {
        "frame": dict(zip(_FRAME_KEYS, got)),
        "pixels": pixels,
        "lines": lines,
        "pixel_size_nm": got[2] / pixels * 1e9,
        "scan_direction": direction,
        "bias_V": bias_V,
        "setpoint_A": setpoint_A,
        "z_controller": z_controller,
        "line_key": stm.lines.line_key,
        "channels": stm.lines.channel_info(),
    }
    _md = {
        "plan_name": "live_frame",
        "detectors": [stm.name],
        "plan_args": {
            "frame": list(got),
            "pixels": pixels,
            "lines": lines,
            "channels": [c["name"] for c in block["channels"]],
            "direction": direction,
            "z_controller": z_controller,
        },
        "controller": f"{stm.host}:{stm.port}",
        "stm_live": block,
    }
    _md.update(md or {})

    def scan_lines() -> MsgGenerator[int]:
        yield from bps.mv(stm.scan_action, "start")
        while not stm.lines.done:
            yield from bps.checkpoint()
            # After a rewind the reading is the interrupted line's; the device knows which
            # line the replay delivered, so it, not the reading, says when the frame is done.
            yield from bps.trigger_and_read([stm.lines])
        return stm.lines.lines_received

    @bpp.stage_decorator([stm.lines])  # follower up before the scan starts
    @bpp.run_decorator(md=_md)
    def acquire() -> MsgGenerator[int]:
        return (yield from bpp.contingency_wrapper(scan_lines(), except_plan=_status_cause))

    # the device learns which lines' events went out, so a rewind does not send one twice
    return (
        yield from bpp.subs_wrapper(
            bpp.finalize_wrapper(acquire(), _stop_scan(stm)), {"event": [stm.lines.note_document]}
        )
    )


def check_recondition(
    stm: NanonisSTM,
    *,
    site: Sequence[float],
    method: str = "bias_pulse",
    frame_to_avoid: Mapping[str, float] | Sequence[float] | None = None,
    **params: float,
) -> None:
    """Raise ValueError if :func:`recondition_tip` with these arguments would be refused
    (site inside the imaged frame or outside the scan area, bias beyond the profile's limits,
    unknown method or parameters). Plain function: callers decide before yielding a plan."""
    _recondition_action(stm, site, method, frame_to_avoid, params)


def _recondition_action(stm, site, method, frame_to_avoid, params):
    """Checked site (m), the frame to avoid (cx, cy, w, h) and the action's plan."""
    x, y = (float(v) for v in site)
    avoid = None
    if frame_to_avoid is not None:
        cx, cy, w, h, _ = frame_tuple(frame_to_avoid)
        avoid = (cx, cy, w, h)
    if stm.profile is not None:
        stm.profile.check_site(x, y, away_from=avoid)
    elif avoid is not None and abs(x - avoid[0]) <= avoid[2] / 2 and abs(y - avoid[1]) <= avoid[3] / 2:
        raise ValueError(f"site ({x:g}, {y:g}) m lies inside the imaged frame {avoid}")
    if method in ("bias_pulse", "pulse"):
        unknown = set(params) - {"bias_V", "width_s"}
        if unknown or {"bias_V", "width_s"} - set(params):
            raise ValueError(f"bias_pulse takes bias_V and width_s, got {sorted(params)}")
        if stm.profile is not None:
            stm.profile.check_bias(params["bias_V"])
        action_plan = _pulse(stm, params["width_s"], params["bias_V"])
    elif method in ("poke", "tip_shaper"):
        shaper = _shaper_settings(stm, params)
        if stm.profile is not None:
            for key in ("bias", "bias_lift"):
                if key in shaper:
                    stm.profile.check_bias(shaper[key])
        action_plan = _poke(stm, shaper)
    else:
        raise ValueError(f"method must be 'bias_pulse' or 'poke', not {method!r}")

    return x, y, avoid, action_plan


def recondition_tip(
    stm: NanonisSTM,
    *,
    site: Sequence[float],
    method: str = "bias_pulse",
    frame_to_avoid: Mapping[str, float] | Sequence[float] | None = None,
    verify_frame: Mapping[str, Any] | None = None,
    md: dict[str, Any] | None = None,
    **params: float,
) -> MsgGenerator[None]:
    """Recondition the tip at a clean site, come back, and (optionally) verify.

    Parameters
    ----------
    stm : NanonisSTM
        The microscope.
    site : (x, y)
        Clean substrate position (m). Refused if inside ``frame_to_avoid`` or outside
        the profile's scan area.
    method : {"bias_pulse", "poke"}
        ``bias_pulse``: Bias.Pulse with Z held (params ``bias_V``, ``width_s``).
        ``poke``: TipShaper (params ``depth_m``, ``bias_V``, ``lift_time_s``, or any
        TipShaper field by name, e.g. ``tip_lift``).
    frame_to_avoid : frame, optional
        The imaged region (same forms as :func:`live_frame`'s ``frame``).
    verify_frame : dict, optional
        Keyword arguments of :func:`live_frame` for a short verification frame.
    md : dict, optional
        Extra start-document metadata.
    **params
        Method parameters (see ``method``).

    Yields
    ------
    msg : Msg
        One run ``recondition_tip`` whose primary stream has one Event per action
        (``stm_last_action``, tip position, bias), then the verification frame's run.

    See Also
    --------
    live_frame
    """
    x, y, avoid, action_plan = _recondition_action(stm, site, method, frame_to_avoid, params)
    stm.link.rearm()  # a fresh outage budget, as for a frame
    _md = {
        "plan_name": "recondition_tip",
        "detectors": [stm.name],
        "plan_args": {
            "site": [x, y],
            "method": method,
            "params": dict(params),
            "frame_to_avoid": list(avoid) if avoid else None,
        },
        "controller": f"{stm.host}:{stm.port}",
    }
    _md.update(md or {})
    record = [stm.last_action, stm.tip, stm.bias, stm.z_controller]

    def step(label: str) -> MsgGenerator[None]:
        yield from bps.mv(stm.last_action, label)
        yield from bps.trigger_and_read(record)

    @bpp.run_decorator(md=_md)
    def act() -> MsgGenerator[None]:
        yield from step("start")
        home = ((yield from bps.rd(stm.tip.x)), (yield from bps.rd(stm.tip.y)))
        yield from bps.mv(stm.withdraw, 1)
        yield from step("withdrawn")
        yield from bps.mv(stm.tip, (x, y))
        yield from bps.mv(stm.z_controller, 1)  # approach on the clean site
        yield from step("at clean site")
        yield from action_plan
        yield from step(method)
        yield from bps.mv(stm.withdraw, 1)
        yield from bps.mv(stm.tip, home)
        yield from bps.mv(stm.z_controller, 1)
        yield from step("returned")

    # Whatever happens, leave the Z controller on (the tip is never left withdrawn
    # over an unknown spot without feedback deciding its height).
    yield from bpp.finalize_wrapper(act(), bps.mv(stm.z_controller, 1))
    if verify_frame:
        yield from live_frame(stm, **{"md": {"purpose": "tip verification"}, **verify_frame})


def _pulse(stm: NanonisSTM, width_s: float, bias_V: float) -> MsgGenerator[None]:
    yield from bps.mv(stm.bias_pulse, (float(width_s), float(bias_V)))


_SHAPER_ALIASES = {
    "depth_m": ("tip_lift", lambda v: -abs(float(v))),
    "bias_V": ("bias", float),
    "lift_time_s": ("lift_time_1", float),
}


def _shaper_settings(stm: NanonisSTM, params: Mapping[str, float]) -> dict[str, float]:
    fields = set(stm.tip_shaper.component_names)
    out = {}
    for key, value in params.items():
        if key in _SHAPER_ALIASES:
            name, cast = _SHAPER_ALIASES[key]
            out[name] = cast(value)
        elif key in fields:
            out[key] = float(value)
        else:
            raise ValueError(f"unknown tip shaper parameter {key!r}; use {sorted(_SHAPER_ALIASES)} or {sorted(fields)}")
    return out


def _poke(stm: NanonisSTM, settings: Mapping[str, float]) -> MsgGenerator[None]:
    for name, value in settings.items():  # one at a time: each is a read-modify-write
        yield from bps.mv(getattr(stm.tip_shaper, name), value)
    yield from bps.mv(stm.tip_shaper_start, 1)


def survey(
    stm: NanonisSTM,
    grid: Iterable[Sequence[float]],
    *,
    width_m: float,
    height_m: float | None = None,
    pixels: int,
    lines: int,
    channels: Sequence[str] | Mapping[str, int] = ("Current", "Z"),
    direction: str = "down",
    md: dict[str, Any] | None = None,
) -> MsgGenerator[None]:
    """A grid of live frames, one run each.

    Parameters
    ----------
    stm : NanonisSTM
        The microscope.
    grid : iterable of (center_x_m, center_y_m)
        Frame centres, in acquisition order.
    width_m, height_m : float
        Frame size (height defaults to width).
    pixels, lines, channels, direction
        As :func:`live_frame`.
    md : dict, optional
        Extra metadata for every frame; ``survey_index`` and ``survey_size`` are added.

    Yields
    ------
    msg : Msg
        The messages of each :func:`live_frame`.

    See Also
    --------
    live_frame
    """
    centres = [tuple(float(v) for v in c) for c in grid]
    height_m = width_m if height_m is None else height_m
    if stm.profile is not None:  # refuse the whole survey before the first frame
        for cx, cy in centres:
            stm.profile.check_frame(cx, cy, width_m, height_m)
    for i, (cx, cy) in enumerate(centres):
        yield from live_frame(
            stm,
            frame=(cx, cy, width_m, height_m, 0.0),
            pixels=pixels,
            lines=lines,
            channels=channels,
            direction=direction,
            md={**(md or {}), "survey_index": i, "survey_size": len(centres)},
        )


# --------------------------------------------------------------------------- spectroscopy


def bias_series(
    stm: NanonisSTM,
    biases: Sequence[float],
    *,
    frame: Mapping[str, float] | Sequence[float],
    pixels: int,
    lines: int,
    channels: Sequence[str] | Mapping[str, int] = ("Current", "Z"),
    source_channel: str | None = None,
    direction: str = "down",
    z_controller: str = "constant_current",
    setpoint: float | None = None,
    md: dict[str, Any] | None = None,
) -> MsgGenerator[int]:
    """Frames of one area at a list of biases (a resonance series), one :func:`live_frame`
    run each, so each gets its live reconstruction.

    Parameters
    ----------
    stm : NanonisSTM
    biases : sequence of float
        Sample biases (V), in acquisition order; all checked against the profile first.
    frame, pixels, lines, channels, direction, z_controller, setpoint
        As :func:`live_frame`.
    source_channel : str, optional
        The recorded channel the live reconstruction takes (a lock-in dI/dV map, say): the
        start document's ``stm_live`` block names it as ``source_channel``. None: the frame's
        own (Z at constant current, Current at constant height).
    md : dict, optional
        Extra metadata for every frame; ``bias_series_index`` and ``bias_series_V`` are added.

    Returns
    -------
    frames : int
        Frames acquired.
    """
    biases = [float(v) for v in biases]
    if not biases:
        raise ValueError("bias_series needs at least one bias")
    if stm.profile is not None:  # refuse the whole series before the first frame
        for v in biases:
            stm.profile.check_bias(v)
    names = list(channels)
    if source_channel is not None and source_channel not in names:
        raise ValueError(f"source_channel {source_channel!r} is not among the recorded channels {names}")

    def name_source(msg):
        if msg.command != "open_run" or "stm_live" not in msg.kwargs:
            return msg
        return msg._replace(
            kwargs={**msg.kwargs, "stm_live": {**msg.kwargs["stm_live"], "source_channel": source_channel}}
        )

    for i, v in enumerate(biases):
        frame_plan = live_frame(
            stm,
            frame=frame,
            pixels=pixels,
            lines=lines,
            channels=channels,
            direction=direction,
            z_controller=z_controller,
            bias=v,
            setpoint=setpoint,
            md={**(md or {}), "bias_series_index": i, "bias_series_V": biases},
        )
        yield from (bpp.msg_mutator(frame_plan, name_source) if source_channel is not None else frame_plan)
    return len(biases)


def grid_spectroscopy(
    stm: NanonisSTM,
    spectroscopy=None,
    *,
    frame: Mapping[str, float] | Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    sweep: Sequence[float] | None = None,
    channels: Sequence[str] | Mapping[str, int] | None = None,
    backward: bool | None = None,
    sweeps: int | None = None,
    md: dict[str, Any] | None = None,
) -> MsgGenerator[int]:
    """Bias spectroscopy over a grid: one run, one Event per point (its sweep and channels).

    Parameters
    ----------
    stm : NanonisSTM
        Moves the tip (``stm.tip``) to each point.
    spectroscopy : stm_live.devices.spectroscopy.BiasSpectroscopy, optional
        The sweeps (default ``stm.spectroscopy``).
    frame, shape : grid frame (as :func:`live_frame`'s) and (points in x, points in y)
        Points at the grid cells' centres, the first row at the bottom, x fastest, as a
        Nanonis grid experiment measures them (``spectroscopy.grid_points``).
    points : sequence of (x_m, y_m), optional
        Instead of ``frame``/``shape``: the points, in acquisition order.
    sweep : (start_V, end_V, points), optional
        The sweep; None keeps the controller's.
    channels : names or mapping name -> RT index, optional
        Recorded channels (names as the profile or the controller's Signals.NamesGet spell
        them, unit optional: "Current", "LI Demod 1 X"); None keeps the controller's.
    backward, sweeps : optional
        Sweep back too; sweeps averaged per point. None keeps the controller's.
    md : dict, optional
        Extra start-document metadata.

    Returns
    -------
    points : int
        Points measured.

    Notes
    -----
    The start document's ``spectroscopy`` block holds the geometry (``frame``, ``shape``,
    ``positions_m``), the sweep and the channels; a checkpoint before each point means a
    suspended run measures the interrupted point again (consumers keep the last event of a
    ``point_index``).
    """

    spec = spectroscopy if spectroscopy is not None else stm.spectroscopy
    geometry = None
    if points is not None:
        if frame is not None or shape is not None:
            raise ValueError("give points, or frame and shape, not both")
        positions = np.asarray(points, dtype=float).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    elif frame is None or shape is None:
        raise ValueError("grid_spectroscopy needs frame and shape (points in x, y), or points")
    else:
        geometry = frame_tuple(frame)
        positions = grid_points(geometry, shape).reshape(-1, 2)
    if not len(positions):
        raise ValueError("empty grid: no points to measure")
    if not np.all(np.isfinite(positions)):
        raise ValueError("grid points must be finite positions in m")
    if sweep is not None:
        if len(sweep) != 3:
            raise ValueError(f"sweep must be (start_V, end_V, points), got {tuple(sweep)}")
        start, end, n = float(sweep[0]), float(sweep[1]), int(sweep[2])
        if n < 2:
            raise ValueError(f"a bias sweep needs at least 2 points, got {n}")
    if stm.profile is not None:  # refuse the whole grid before anything is sent
        for x, y in positions:
            stm.profile.check_site(float(x), float(y))
        if sweep is not None:
            stm.profile.check_bias(start)
            stm.profile.check_bias(end)
    indexes = spec.channel_indexes(channels) if channels is not None else None

    stm.link.rearm()
    if sweep is not None:
        yield from bps.mv(spec.points, n)
        yield from bps.mv(spec.sweep_start, start)
        yield from bps.mv(spec.sweep_end, end)
    if indexes is not None:
        yield from bps.mv(spec.channels, list(indexes.values()))
    if backward is not None:
        yield from bps.mv(spec.backward, bool(backward))
    if sweeps is not None:
        yield from bps.mv(spec.sweeps, int(sweeps))
    got = []
    for sig in (spec.sweep_start, spec.sweep_end, spec.points):  # what the controller holds (float32)
        got.append(float((yield from bps.rd(sig))))
    block = {
        "frame": dict(zip(_FRAME_KEYS, geometry)) if geometry is not None else None,
        "shape": [int(shape[0]), int(shape[1])] if geometry is not None else None,
        "positions_m": positions.tolist(),
        "sweep_V": {"start": got[0], "end": got[1], "points": int(got[2])},
        "channels": {k: int(v) for k, v in (indexes or {}).items()},
        "point_key": spec.point_index.name,
        "bias_V": float((yield from bps.rd(stm.bias))),
        "setpoint_A": float((yield from bps.rd(stm.setpoint))),
    }
    _md = {
        "plan_name": "grid_spectroscopy",
        "detectors": [spec.name],
        "plan_args": {"points": len(positions), "shape": block["shape"], "sweep": list(sweep) if sweep else None},
        "controller": f"{stm.host}:{stm.port}",
        "spectroscopy": block,
    }
    _md.update(md or {})

    @bpp.run_decorator(md=_md)
    def measure() -> MsgGenerator[int]:
        for i, (x, y) in enumerate(positions):
            yield from bps.checkpoint()
            yield from bps.mv(stm.tip, (float(x), float(y)))
            yield from bps.mv(spec.point_index, i)
            yield from bps.trigger_and_read([spec])
        return len(positions)

    # the device itself, not its root (stage_decorator stages the root: the whole microscope)
    yield from bps.stage(spec)
    return (yield from bpp.finalize_wrapper(measure(), bps.unstage(spec)))
