"""Fault injection: one layer between a Nanonis-protocol server and its clients.

A real link stalls and drops (the Nanonis PC is busy in LabVIEW, a network glitches); the
simulated controller reproduces that on purpose, from a scenario's ``faults:`` section or a
list of :class:`Fault` given to the server. The layer acts on what crosses a connection
(request and reply frames, the connection itself, the listener), never inside the
controller, so a proxy forwarding bytes to a real controller can put the same layer in
front of its clients. Its host (the server, or such a proxy) calls:

* ``start(refuse)`` once its loop runs; ``refuse(seconds)`` stops accepting connections for
  that long (the host closes its listener: clients get "connection refused");
* ``connected(writer, task)`` for each accepted connection (-> :class:`Link`) and
  ``closed(link)`` when it ends;
* ``request(link, name)`` for each request read (-> the call, to pass to ``reply``);
* ``await reply(link, call, data)`` to send each reply: the layer writes it, late, partly or
  not at all; False means the connection is gone;
* ``scan_event(frame, line, movement)`` for each end-of-line event it learns of (a proxy:
  from the Scan.WaitEndOfLine replies it forwards).

Every fault fires at a trigger that does not depend on timing, so tests are deterministic:
the n-th (or every k-th) call of a command, counted from the server's start over all
connections (each command counted on its own); or the first end-of-line event (or
Scan.WaitEndOfLine reply) at or past line K of a frame (every frame, or frame F only). Only
``refuse`` also takes a time (``at_s`` seconds after the start). Kinds:

``delay``            the reply of the matching calls leaves ``seconds`` late.
``stall``            the Scan.WaitEndOfLine reply reporting line K (or the first past it)
                     is held ``seconds``; the scan goes on meanwhile.
``drop``             at line K, the connections (all, or the ``connection``-th accepted,
                     0-based) are reset as a dropped link resets them (RST, no goodbye).
``refuse``           from line K (or ``at_s``), connections are refused for ``seconds``.
``close_mid_reply``  the matching calls get the first ``bytes`` of their reply (default
                     half), then the connection closes.

``fired`` records each fault that fired (kind, fault index, frame, line, call number,
connections, time), and each is logged at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stm_live.devices import protocol as P

__all__ = ["FAULT_KEYS", "FAULT_KINDS", "Fault", "FaultLayer", "Link"]

log = logging.getLogger(__name__)

# Each kind's keys in a scenario's ``faults:`` entry, (required, optional); ``command`` (a
# name or a list) fills ``Fault.commands``.
FAULT_KEYS = {
    "delay": (("command", "seconds"), ("nth", "every")),
    "stall": (("line", "seconds"), ("frame",)),
    "drop": (("line",), ("frame", "connection")),
    "refuse": (("seconds",), ("line", "frame", "at_s")),
    "close_mid_reply": (("command",), ("nth", "every", "bytes")),
}
FAULT_KINDS = tuple(FAULT_KEYS)
_LINE_EVENTS = (0, 1)  # forward and backward ends of a line (not "moved to start/centre")


@dataclass(frozen=True)
class Fault:
    """One injected fault (see the module docstring for each kind's fields)."""

    kind: str
    commands: tuple[str, ...] = ()  # delay, close_mid_reply
    seconds: float = 0.0  # delay, stall, refuse
    nth: int | None = None  # the n-th call (1-based) of each command
    every: int | None = None  # every k-th call
    line: int | None = None  # stall, drop, refuse
    frame: int | None = None  # only this frame (None: every frame)
    at_s: float | None = None  # refuse: seconds after the layer started
    connection: int | None = None  # drop: the n-th connection accepted (0-based); None: all
    bytes: int | None = None  # close_mid_reply: bytes sent before closing (None: half)

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r}: choose from {', '.join(FAULT_KINDS)}")

    def matches_call(self, name: str, n: int) -> bool:
        if name not in self.commands:
            return False
        if self.nth is not None:
            return n == self.nth
        return self.every is None or n % self.every == 0

    def matches_line(self, frame: int, line: int) -> bool:
        return self.line is not None and line >= self.line and self.frame in (None, frame)


class Link:
    """One client connection as the layer sees it."""

    def __init__(self, index: int, writer: asyncio.StreamWriter, task: asyncio.Task | None):
        self.index, self.writer, self.task = index, writer, task
        self.gone = False  # reset or closed by a fault

    def reset(self) -> None:
        """Drop the connection as a failed link does: RST, unsent data discarded."""
        self.gone = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:  # already closed
                pass
        self.writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # frees the host's connection slot now, not at its next read


class FaultLayer:
    """The faults of one server (or proxy), applied to its connections; see the module
    docstring for the host's calls. ``clock``: monotonic seconds (injectable)."""

    def __init__(self, faults: Sequence[Fault] = (), *, clock: Callable[[], float] = time.monotonic):
        self.faults = tuple(faults)
        self.fired: list[dict] = []
        self._clock = clock
        self._t0 = clock()
        self._calls: Counter[str] = Counter()
        self._links: list[Link] = []
        self._accepted = 0
        self._frame = 0  # the frame of the latest scan event
        self._done: set[tuple[int, int]] = set()  # (fault index, frame) of line faults that fired
        self._refuse: Callable[[float], None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._stalls = [(i, f) for i, f in enumerate(self.faults) if f.kind == "stall"]

    def __bool__(self) -> bool:
        return bool(self.faults)

    @property
    def accepted(self) -> int:
        """Connections accepted so far (the next one's index)."""
        return self._accepted

    # ------------------------------------------------------------------ host calls

    def start(self, refuse: Callable[[float], None]) -> None:
        """Arm the faults (on the host's running loop); ``refuse(seconds)`` closes the
        host's listener for that long."""
        self._refuse = refuse
        self._t0 = self._clock()
        loop = asyncio.get_running_loop()
        for i, f in enumerate(self.faults):
            if f.kind == "refuse" and f.at_s is not None:
                self._timers.append(loop.call_later(f.at_s, self._refuse_now, i, None, None))

    def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def connected(self, writer: asyncio.StreamWriter, task: asyncio.Task | None = None) -> Link:
        link = Link(self._accepted, writer, task)
        self._accepted += 1
        self._links.append(link)
        return link

    def closed(self, link: Link) -> None:
        if link in self._links:
            self._links.remove(link)

    def request(self, link: Link, name: str) -> tuple[str, int]:
        """Count a request; returns the call (name, n-th call of that command)."""
        self._calls[name] += 1
        return name, self._calls[name]

    def scan_event(self, frame: int, line: int, movement: int) -> None:
        """The scan reached ``line`` of ``frame`` (fires drop and refuse faults)."""
        self._frame = frame
        if movement not in _LINE_EVENTS:
            return
        for i, f in enumerate(self.faults):
            if f.kind in ("drop", "refuse") and f.matches_line(frame, line) and (i, frame) not in self._done:
                self._done.add((i, frame))
                if f.kind == "drop":
                    self._drop(i, frame, line)
                else:
                    self._refuse_now(i, frame, line)

    async def reply(self, link: Link, call: tuple[str, int], data: bytes) -> bool:
        """Send ``data`` (one whole reply) on ``link`` through the faults; False when the
        connection is gone (closed by a fault, or by the client)."""
        name, n = call
        cut = None
        for i, f in enumerate(self.faults):
            if f.kind == "delay" and f.matches_call(name, n):
                self._record(i, call=n, connections=[link.index])
                await asyncio.sleep(f.seconds)
            elif f.kind == "close_mid_reply" and f.matches_call(name, n) and cut is None:
                cut = (i, len(data) // 2 if f.bytes is None else f.bytes)
        if name == "Scan.WaitEndOfLine" and self._stalls:
            await self._stall(link, data)
        if link.gone:
            return False
        try:
            if cut is None:
                link.writer.write(data)  # header + body: one write
                await link.writer.drain()
                return True
            i, size = cut
            size = max(1, min(size, len(data) - 1))
            self._record(i, call=n, connections=[link.index], bytes=size)
            link.writer.write(data[:size])
            await link.writer.drain()
        except ConnectionError:  # the client left while we worked
            return False
        link.gone = True
        link.writer.close()
        return False

    # ------------------------------------------------------------------ faults

    async def _stall(self, link: Link, data: bytes) -> None:
        values, status, _ = P.decode_response_body("Scan.WaitEndOfLine", data[P.HEADER_SIZE :])
        if status or values["timed_out"] or values["movement"] not in _LINE_EVENTS:
            return
        for i, f in self._stalls:
            if f.matches_line(self._frame, values["line"]) and (i, self._frame) not in self._done:
                self._done.add((i, self._frame))
                self._record(i, frame=self._frame, line=values["line"], connections=[link.index])
                await asyncio.sleep(f.seconds)

    def _drop(self, i: int, frame: int, line: int) -> None:
        f = self.faults[i]
        links = [k for k in self._links if f.connection in (None, k.index)]
        self._record(i, frame=frame, line=line, connections=[k.index for k in links])
        for k in links:
            self.closed(k)
            k.reset()

    def _refuse_now(self, i: int, frame: int | None, line: int | None) -> None:
        self._record(i, frame=frame, line=line)
        if self._refuse is not None:
            self._refuse(self.faults[i].seconds)

    def _record(self, i: int, **what) -> None:
        f = self.faults[i]
        entry = {"kind": f.kind, "fault": i, "time_s": round(self._clock() - self._t0, 4), **what}
        self.fired.append(entry)
        log.info("fault injected: %s", ", ".join(f"{k}={v}" for k, v in entry.items()))
