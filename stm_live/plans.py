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
from bluesky.utils import FailedStatus, MsgGenerator

from stm_live.devices.stm import NanonisSTM

__all__ = ["live_frame", "recondition_tip", "survey", "frame_tuple", "Z_MODES"]

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
    a suspender rewind re-delivers the line acquired after the last checkpoint (an Event
    may repeat: consumers keep the last); abort or an exception stops the scan.

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

    # configuration: each one round trip, off the RunEngine loop (Status in a thread)
    yield from bps.configure(stm.lines, {"channels": channels, "pixels": pixels,
                                         "lines": lines})
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
    for sig in (stm.frame.center_x, stm.frame.center_y, stm.frame.width, stm.frame.height,
                stm.frame.angle):
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
        "plan_args": {"frame": list(got), "pixels": pixels, "lines": lines,
                      "channels": [c["name"] for c in block["channels"]],
                      "direction": direction, "z_controller": z_controller},
        "controller": f"{stm.host}:{stm.port}",
        "stm_live": block,
    }
    _md.update(md or {})

    def scan_lines() -> MsgGenerator[int]:
        yield from bps.mv(stm.scan_action, "start")
        while True:
            yield from bps.checkpoint()
            reading = yield from bps.trigger_and_read([stm.lines])
            if reading[stm.lines.line_key]["value"] >= lines - 1:
                break
        return stm.lines.lines_received

    @bpp.stage_decorator([stm.lines])  # follower up before the scan starts
    @bpp.run_decorator(md=_md)
    def acquire() -> MsgGenerator[int]:
        return (yield from bpp.contingency_wrapper(scan_lines(), except_plan=_status_cause))

    return (yield from bpp.finalize_wrapper(acquire(), _stop_scan(stm)))


def check_recondition(stm: NanonisSTM, *, site: Sequence[float], method: str = "bias_pulse",
                      frame_to_avoid: Mapping[str, float] | Sequence[float] | None = None, **params: float) -> None:
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
    elif avoid is not None and abs(x - avoid[0]) <= avoid[2] / 2 and abs(
            y - avoid[1]) <= avoid[3] / 2:
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
    _md = {"plan_name": "recondition_tip", "detectors": [stm.name],
           "plan_args": {"site": [x, y], "method": method, "params": dict(params),
                         "frame_to_avoid": list(avoid) if avoid else None},
           "controller": f"{stm.host}:{stm.port}"}
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


_SHAPER_ALIASES = {"depth_m": ("tip_lift", lambda v: -abs(float(v))),
                   "bias_V": ("bias", float), "lift_time_s": ("lift_time_1", float)}


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
            raise ValueError(f"unknown tip shaper parameter {key!r}; use "
                             f"{sorted(_SHAPER_ALIASES)} or {sorted(fields)}")
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
            stm, frame=(cx, cy, width_m, height_m, 0.0), pixels=pixels, lines=lines,
            channels=channels, direction=direction,
            md={**(md or {}), "survey_index": i, "survey_size": len(centres)})
