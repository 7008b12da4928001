"""Frame assembly from Bluesky documents.

A live frame arrives as one Event per finished scan line (see docs/interfaces.md, "Bluesky
documents"). ``FrameAssembler`` turns the start document's ``stm_live`` block and those
events back into ``(lines, pixels)`` float32 images, NaN where no line has arrived yet, and
knows which channel feeds the networks, as ``stm_live.interpret`` decides for every frame.

Not thread-safe on its own; ``LiveReconstruction`` guards it with a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from event_model import compose_run, unpack_event_page

from stm_live.interpret import choose_channel, from_block

DIRECTIONS = ("forward", "backward")


class FrameError(ValueError):
    """A start document or event that does not describe a live frame as documented."""


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    index: int
    units: str
    keys: dict[str, str]  # direction -> event data key


def _require(block: dict, key: str, where: str = "start['stm_live']") -> Any:
    if key not in block:
        raise FrameError(f"{where} has no {key!r}; see docs/interfaces.md")
    return block[key]


class FrameAssembler:
    """Per-channel, per-direction frames of one run, rebuilt line by line.

    Parameters
    ----------
    stream : str
        Event stream that carries the scan lines.

    Notes
    -----
    A suspender rewind re-acquires lines: the stream may then hold two events with the
    same ``seq_num`` or line index. The later one wins, as the design asks.
    """

    def __init__(self, stream: str = "primary") -> None:
        self.stream = stream
        self.run_uid: str | None = None
        self.block: dict[str, Any] = {}
        self.channels: list[ChannelSpec] = []
        self.frames: dict[tuple[str, str], np.ndarray] = {}
        self._descriptors: set[str] = set()
        self._acquired: np.ndarray = np.zeros(0, dtype=bool)
        self.events_seen = 0
        self.resent_lines = 0  # events whose line was already in the frame (rewinds)
        self.last_seq_num: dict[int, int] = {}  # line -> seq_num of the event kept

    # ----------------------------------------------------------------- documents
    def start(self, doc: dict) -> None:
        block = doc.get("stm_live")
        if not isinstance(block, dict):
            raise FrameError("start document has no 'stm_live' block; not a live frame run")
        lines = int(_require(block, "lines"))
        pixels = int(_require(block, "pixels"))
        if lines <= 0 or pixels <= 0:
            raise FrameError(f"start['stm_live'] has lines={lines}, pixels={pixels}; both must be > 0")
        pixel_size = float(_require(block, "pixel_size_nm"))
        if not np.isfinite(pixel_size) or pixel_size <= 0:
            raise FrameError(f"start['stm_live']['pixel_size_nm'] = {pixel_size!r} must be > 0")
        mode = _require(block, "z_controller")
        if mode not in ("constant_current", "constant_height"):
            raise FrameError(
                f"start['stm_live']['z_controller'] = {mode!r}; expected 'constant_current' or 'constant_height'"
            )
        channels = []
        for i, ch in enumerate(_require(block, "channels")):
            where = f"start['stm_live']['channels'][{i}]"
            keys = dict(_require(ch, "keys", where))
            channels.append(
                ChannelSpec(str(_require(ch, "name", where)), int(ch.get("index", -1)), str(ch.get("units", "")), keys)
            )
        if not channels:
            raise FrameError("start['stm_live']['channels'] is empty")
        self.run_uid = doc.get("uid")
        self.block = block
        self.channels = channels
        self.frames = {
            (ch.name, d): np.full((lines, pixels), np.nan, dtype=np.float32)
            for ch in channels
            for d in DIRECTIONS
            if d in ch.keys
        }
        self._acquired = np.zeros(lines, dtype=bool)
        self._descriptors.clear()
        self.events_seen = 0
        self.resent_lines = 0
        self.last_seq_num = {}
        _ = self.source  # validate now, so a bad run fails at start, not at the first line

    def descriptor(self, doc: dict) -> None:
        if doc.get("name") == self.stream and doc.get("run_start") == self.run_uid:
            self._descriptors.add(doc["uid"])

    def event(self, doc: dict) -> int | None:
        """Copy one line into the frames; return its row, or None if not a scan line."""
        if doc.get("descriptor") not in self._descriptors:
            return None
        data = doc["data"]
        line_key = self.block.get("line_key", "stm_line_index")
        if line_key not in data:
            raise FrameError(f"event {doc.get('seq_num')} has no line index key {line_key!r}")
        row = int(data[line_key])
        if not 0 <= row < self.lines:
            raise FrameError(f"event {doc.get('seq_num')}: line index {row} outside 0..{self.lines - 1}")
        for (name, direction), frame in self.frames.items():
            key = self._key(name, direction)
            if key not in data:
                continue
            values = np.asarray(data[key], dtype=np.float32).reshape(-1)
            if values.size != self.pixels:
                raise FrameError(
                    f"event {doc.get('seq_num')}: {key!r} has {values.size} values, the frame has {self.pixels} pixels"
                )
            frame[row] = values
        self.events_seen += 1
        if self._acquired[row]:
            self.resent_lines += 1
        self._acquired[row] = True
        self.last_seq_num[row] = int(doc.get("seq_num", -1))
        return row

    def event_page(self, doc: dict) -> list[int]:

        rows = [self.event(ev) for ev in unpack_event_page(doc)]
        return [r for r in rows if r is not None]

    # ----------------------------------------------------------------- geometry
    @property
    def lines(self) -> int:
        return int(self.block["lines"])

    @property
    def pixels(self) -> int:
        return int(self.block["pixels"])

    @property
    def pixel_size_nm(self) -> float:
        return float(self.block["pixel_size_nm"])

    @property
    def z_controller(self) -> str:
        return str(self.block["z_controller"])

    @property
    def acquired(self) -> np.ndarray:
        """Rows received so far (sorted int array)."""
        return np.flatnonzero(self._acquired)

    @property
    def acquired_mask(self) -> np.ndarray:
        """Copy of the per-row "has arrived" flags."""
        return self._acquired.copy()

    @property
    def complete(self) -> bool:
        return bool(self._acquired.all())

    # ----------------------------------------------------------------- channels
    def _key(self, name: str, direction: str) -> str:
        for ch in self.channels:
            if ch.name == name:
                return ch.keys[direction]
        raise KeyError(name)

    @property
    def source(self) -> tuple[str, str]:
        """(channel name, direction) that feeds the networks, as :mod:`stm_live.interpret`
        chooses it: the plan's ``source_channel`` if it named one (e.g. a lock-in channel),
        else Z on constant current, Current on constant height."""

        names = [c.name for c in self.channels if "forward" in c.keys or "backward" in c.keys]
        units = {c.name: c.units for c in self.channels}
        try:
            name, _, _ = choose_channel(
                names,
                feedback_on=self.z_controller == "constant_current",
                units=units,
                requested=self.block.get("source_channel"),
            )
        except ValueError as exc:
            raise FrameError(f"live reconstruction: {exc}") from None
        keys = next(c.keys for c in self.channels if c.name == name)
        return name, "forward" if "forward" in keys else "backward"

    def frame(self, name: str, direction: str = "forward") -> np.ndarray:
        try:
            return self.frames[(name, direction)]
        except KeyError:
            raise FrameError(f"no frame for channel {name!r} {direction}; have {sorted(self.frames)}") from None

    def network_input(self):
        """The frame as the networks take it (:func:`stm_live.interpret.from_block`: channel,
        sign, levelling, pitch, scope), on a copy of the acquired data."""

        name, direction = self.source
        return from_block(self.block, {(name, direction): self.frame(name, direction).copy()})

    def source_image(self) -> np.ndarray:
        """The networks' input image (see :meth:`network_input`)."""
        return self.network_input().image


def frame_documents(
    image: np.ndarray,
    pixel_size_nm: float,
    line_spacing_nm: float | None = None,
    *,
    bias_V: float = 0.5,
    units: str = "A",
):
    """The documents of one constant-height frame of ``image`` (lines, pixels) in the layout
    ``FrameAssembler`` reads (as ``plans.live_frame`` emits it; channel "Current", the same
    line both directions, one event per line): ``(name, doc)`` pairs, for feeding the live
    callbacks with frames that did not come from a controller (benchmarks, tests)."""
    lines, pixels = image.shape
    line_spacing_nm = pixel_size_nm if line_spacing_nm is None else line_spacing_nm
    keys = ("stm_line_index", "stm_current_fwd", "stm_current_bwd")
    run = compose_run(
        metadata={
            "stm_live": {
                "frame": {
                    "center_x_m": 0,
                    "center_y_m": 0,
                    "width_m": pixels * pixel_size_nm * 1e-9,
                    "height_m": lines * line_spacing_nm * 1e-9,
                    "angle_deg": 0,
                },
                "pixels": pixels,
                "lines": lines,
                "pixel_size_nm": pixel_size_nm,
                "scan_direction": "down",
                "bias_V": bias_V,
                "setpoint_A": 5e-12,
                "z_controller": "constant_height",
                "line_key": keys[0],
                "channels": [
                    {"name": "Current", "index": 0, "units": units, "keys": {"forward": keys[1], "backward": keys[2]}}
                ],
            }
        }
    )
    yield "start", run.start_doc
    desc = run.compose_descriptor(
        name="primary",
        data_keys={
            keys[0]: {"source": "stm_live", "dtype": "integer", "shape": []},
            keys[1]: {"source": "stm_live", "dtype": "array", "shape": [pixels]},
            keys[2]: {"source": "stm_live", "dtype": "array", "shape": [pixels]},
        },
    )
    yield "descriptor", desc.descriptor_doc
    for i, row in enumerate(image):
        yield "event", desc.compose_event(data=dict(zip(keys, (i, row, row))), timestamps=dict.fromkeys(keys, 0.0))
    yield "stop", run.compose_stop()
