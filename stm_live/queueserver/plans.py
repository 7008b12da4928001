"""The plans the queue server exposes, with parameters it checks before a plan is queued.

Each wraps a plan of :mod:`stm_live.plans` on the microscope the profile describes, so an item
names no device: ``{"name": "survey", "kwargs": {"grid": [[0, 0], [6e-9, 0]], "width_m": 5e-9}}``.
Types, the choices of strings (scan direction, Z mode, channels, reconditioning method) and the
ranges of numbers (the profile's limits: pixels, frame size and centre, bias, setpoint) are in
each plan's annotation, so the RE Manager refuses a bad item when it is added, with a message
naming the parameter, before anything reaches the controller. The plans check the limits again
exactly (an x range and a y range, say, where the annotation holds one range for both).
"""

from __future__ import annotations

import typing
from collections.abc import Callable

from bluesky_queueserver import parameter_annotation_decorator

from stm_live import plans as _plans
from stm_live.config import ACTION_KINDS

__all__ = ["queue_plans"]

_DEFAULT_CHANNELS = ["Current", "Z"]


def queue_plans(profile, microscope: Callable[[], object]) -> dict[str, Callable]:
    """Name -> plan, for the startup namespace. ``microscope()`` returns the ``NanonisSTM``
    (called only when a plan runs: the lists of plans are written without a controller)."""
    limits = profile.limits
    centre = (
        min(limits.center_x_range_m[0], limits.center_y_range_m[0]),
        max(limits.center_x_range_m[1], limits.center_y_range_m[1]),
    )
    size = {"min": 0.0, "max": limits.max_frame_size_m}
    count = {"min": 1, "max": limits.max_pixels}
    bias = {"min": -limits.max_abs_bias_V, "max": limits.max_abs_bias_V}
    setpoint = {"min": 0.0, "max": limits.max_setpoint_A}
    channel_names = list(profile.channels) or list(_DEFAULT_CHANNELS)
    channels = {"annotation": "typing.List[Channel]", "enums": {"Channel": channel_names}}
    direction = {"annotation": "Direction", "enums": {"Direction": ["down", "up"]}}
    z_mode = {"annotation": "ZMode", "enums": {"ZMode": list(_plans.Z_MODES)}}
    xy = {"min": centre[0], "max": centre[1]}
    frame_parameters = {
        "center_x_m": xy,
        "center_y_m": xy,
        "width_m": size,
        "height_m": size,
        "pixels": count,
        "lines": count,
        "channels": channels,
        "direction": direction,
    }

    @parameter_annotation_decorator(
        {
            "description": "One live frame: a run with an event per scan line.",
            "parameters": {**frame_parameters, "z_controller": z_mode, "bias_V": bias, "setpoint_A": setpoint},
        }
    )
    def live_frame(
        width_m: float,
        pixels: int = 128,
        lines: int = 128,
        center_x_m: float = 0.0,
        center_y_m: float = 0.0,
        height_m: float | None = None,
        angle_deg: float = 0.0,
        channels: list[str] = _DEFAULT_CHANNELS,
        direction: str = "down",
        z_controller: str = "constant_current",
        bias_V: float | None = None,
        setpoint_A: float | None = None,
        md: dict[str, typing.Any] | None = None,
    ):
        """One live frame: one run, an event per finished scan line.

        Parameters
        ----------
        width_m : float
            Frame width (m).
        pixels, lines : int
            Points per line, lines per frame.
        center_x_m, center_y_m : float
            Frame centre (m).
        height_m : float, optional
            Frame height (m); default the width.
        angle_deg : float
            Frame angle (deg, clockwise).
        channels : list of str
            Recorded channels (the profile's names).
        direction : str
            "down" starts at the top edge, "up" at the bottom.
        z_controller : str
            "constant_current" (Z controller on) or "constant_height".
        bias_V, setpoint_A : float, optional
            Set before the scan.
        md : dict, optional
            Extra start-document metadata.
        """
        return (
            yield from _plans.live_frame(
                microscope(),
                frame=(center_x_m, center_y_m, width_m, height_m or width_m, angle_deg),
                pixels=pixels,
                lines=lines,
                channels=list(channels),
                direction=direction,
                z_controller=z_controller,
                bias=bias_V,
                setpoint=setpoint_A,
                md=md,
            )
        )

    @parameter_annotation_decorator(
        {
            "description": "A grid of live frames, one run each.",
            "parameters": {
                "grid": xy,
                **{k: frame_parameters[k] for k in ("width_m", "height_m", "pixels", "lines", "channels", "direction")},
            },
        }
    )
    def survey(
        grid: list[list[float]],
        width_m: float,
        pixels: int = 128,
        lines: int = 128,
        height_m: float | None = None,
        channels: list[str] = _DEFAULT_CHANNELS,
        direction: str = "down",
        md: dict[str, typing.Any] | None = None,
    ):
        """A grid of live frames, one run each (the whole grid is checked before the first).

        Parameters
        ----------
        grid : list of [center_x_m, center_y_m]
            Frame centres (m), in acquisition order.
        width_m : float
            Frame width (m).
        pixels, lines : int
            Points per line, lines per frame.
        height_m : float, optional
            Frame height (m); default the width.
        channels : list of str
            Recorded channels.
        direction : str
            "down" or "up".
        md : dict, optional
            Extra metadata for every frame.
        """
        for centre_xy in grid:
            if len(centre_xy) != 2:
                raise ValueError(f"survey grid: each centre is [x_m, y_m], got {list(centre_xy)}")
        return (
            yield from _plans.survey(
                microscope(),
                grid,
                width_m=width_m,
                height_m=height_m,
                pixels=pixels,
                lines=lines,
                channels=list(channels),
                direction=direction,
                md=md,
            )
        )

    def action_range(name: str) -> dict:
        lo, hi = (
            min(r[name][1][0] for r in ACTION_KINDS.values() if name in r),
            max(r[name][1][1] for r in ACTION_KINDS.values() if name in r),
        )
        return {"min": lo, "max": hi}

    @parameter_annotation_decorator(
        {
            "description": "Recondition the tip at a clean site and come back.",
            "parameters": {
                "method": {"annotation": "Method", "enums": {"Method": list(ACTION_KINDS)}},
                "site_x_m": xy,
                "site_y_m": xy,
                "bias_V": bias,
                "width_s": action_range("width_s"),
                "depth_m": action_range("depth_m"),
                "lift_time_s": action_range("lift_time_s"),
            },
        }
    )
    def recondition_tip(
        method: str = "bias_pulse",
        site_x_m: float | None = None,
        site_y_m: float | None = None,
        bias_V: float | None = None,
        width_s: float | None = None,
        depth_m: float | None = None,
        lift_time_s: float | None = None,
        md: dict[str, typing.Any] | None = None,
    ):
        """Recondition the tip: a bias pulse or a poke at a clean site, then back.

        Parameters
        ----------
        method : str
            "bias_pulse" or "poke".
        site_x_m, site_y_m : float, optional
            The clean site (m); default the profile's.
        bias_V, width_s : float, optional
            Pulse bias and width (bias_pulse); default the profile's first action of the method.
        depth_m, lift_time_s : float, optional
            Poke depth and lift time (poke), likewise.
        md : dict, optional
            Extra start-document metadata.
        """
        params = next((dict(a.params) for a in profile.recondition.actions if a.kind == method), {})
        given = {"bias_V": bias_V, "width_s": width_s, "depth_m": depth_m, "lift_time_s": lift_time_s}
        params.update({k: v for k, v in given.items() if v is not None and k in ACTION_KINDS[method]})
        site = profile.recondition.clean_site_m
        site = (site[0] if site_x_m is None else site_x_m, site[1] if site_y_m is None else site_y_m)
        return (yield from _plans.recondition_tip(microscope(), site=site, method=method, md=md, **params))

    found = {"live_frame": live_frame, "survey": survey, "recondition_tip": recondition_tip}
    if hasattr(_plans, "bias_series"):

        @parameter_annotation_decorator(
            {
                "description": "Frames of one area at a list of biases, one run each.",
                "parameters": {
                    **frame_parameters,
                    "biases": bias,
                    "z_controller": z_mode,
                    "source_channel": {"annotation": "typing.Optional[Channel]", "enums": {"Channel": channel_names}},
                    "setpoint_A": setpoint,
                },
            }
        )
        def bias_series(
            biases: list[float],
            width_m: float,
            pixels: int = 128,
            lines: int = 128,
            center_x_m: float = 0.0,
            center_y_m: float = 0.0,
            height_m: float | None = None,
            channels: list[str] = _DEFAULT_CHANNELS,
            source_channel: str | None = None,
            direction: str = "down",
            z_controller: str = "constant_current",
            setpoint_A: float | None = None,
            md: dict[str, typing.Any] | None = None,
        ):
            """Frames of one area at a list of biases, one live frame run each.

            Parameters
            ----------
            biases : list of float
                Sample biases (V), in acquisition order.
            width_m : float
                Frame width (m).
            pixels, lines : int
                Points per line, lines per frame.
            center_x_m, center_y_m : float
                Frame centre (m).
            height_m : float, optional
                Frame height (m); default the width.
            channels : list of str
                Recorded channels.
            source_channel : str, optional
                The channel the live reconstruction takes.
            direction, z_controller : str
                As live_frame.
            setpoint_A : float, optional
                Set before the first frame.
            md : dict, optional
                Extra metadata for every frame.
            """
            return (
                yield from _plans.bias_series(
                    microscope(),
                    biases,
                    frame=(center_x_m, center_y_m, width_m, height_m or width_m, 0.0),
                    pixels=pixels,
                    lines=lines,
                    channels=list(channels),
                    source_channel=source_channel,
                    direction=direction,
                    z_controller=z_controller,
                    setpoint=setpoint_A,
                    md=md,
                )
            )

        found["bias_series"] = bias_series
    if hasattr(_plans, "grid_spectroscopy"):

        @parameter_annotation_decorator(
            {
                "description": "Bias spectroscopy over a grid: one run, an event per point.",
                "parameters": {
                    "center_x_m": xy,
                    "center_y_m": xy,
                    "width_m": size,
                    "height_m": size,
                    "nx": count,
                    "ny": count,
                    "sweep_start_V": bias,
                    "sweep_end_V": bias,
                    "sweep_points": {"min": 2, "max": 65536},
                    "sweeps": {"min": 1, "max": 1000},
                },
            }
        )
        def grid_spectroscopy(
            width_m: float,
            nx: int,
            ny: int,
            center_x_m: float = 0.0,
            center_y_m: float = 0.0,
            height_m: float | None = None,
            sweep_start_V: float | None = None,
            sweep_end_V: float | None = None,
            sweep_points: int | None = None,
            channels: list[str] | None = None,
            backward: bool | None = None,
            sweeps: int | None = None,
            md: dict[str, typing.Any] | None = None,
        ):
            """Bias spectroscopy over a grid of nx x ny points: one run, an event per point.

            Parameters
            ----------
            width_m : float
                Grid frame width (m).
            nx, ny : int
                Points in x and y.
            center_x_m, center_y_m : float
                Grid centre (m).
            height_m : float, optional
                Grid frame height (m); default the width.
            sweep_start_V, sweep_end_V : float, optional
                The sweep (all three of start, end and points, or none: the controller's).
            sweep_points : int, optional
                Points per sweep.
            channels : list of str, optional
                Recorded channels (the controller's names); default the controller's.
            backward : bool, optional
                Sweep back too.
            sweeps : int, optional
                Sweeps averaged per point.
            md : dict, optional
                Extra start-document metadata.
            """
            sweep = (sweep_start_V, sweep_end_V, sweep_points)
            if any(v is None for v in sweep) and any(v is not None for v in sweep):
                raise ValueError("grid_spectroscopy: give sweep_start_V, sweep_end_V and sweep_points, or none of them")
            return (
                yield from _plans.grid_spectroscopy(
                    microscope(),
                    frame=(center_x_m, center_y_m, width_m, height_m or width_m, 0.0),
                    shape=(nx, ny),
                    sweep=None if sweep[0] is None else sweep,
                    channels=channels,
                    backward=backward,
                    sweeps=sweeps,
                    md=md,
                )
            )

        found["grid_spectroscopy"] = grid_spectroscopy
    return found
