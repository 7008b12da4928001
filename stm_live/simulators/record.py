"""A recording proxy: a transparent link between any Nanonis client and a controller that
writes what crosses it to a session recording (``.nrec``, :mod:`.cassette`).

``stm-live sim record --upstream HOST:PORT ... --listen 127.0.0.1:PORT --out SESSION.nrec``.

* One listening port per upstream (a controller has up to 4 TCP ports, customarily
  6501-6504): the i-th upstream is served on PORT + i (or an ephemeral port each for
  PORT 0). Each client connection gets its own connection to its upstream; at most 4 at
  once, as the controller (a fifth is closed at once).
* Every byte is forwarded unchanged, in both directions. Messages are framed with the
  protocol's headers (``protocol.parse_request_header`` / ``parse_response_header``) to pair
  each request with its reply (a controller answers the requests of one connection in
  order). Bytes that are not a Nanonis message are forwarded as they are, recorded as
  ``raw`` and forwarded raw from then on in that direction.
* Without faults the bytes of a reply go on to the client as they arrive (a 1 MiB frame
  is not held back until it is whole). Each pair is queued for the file as its reply
  completes, and reaches the file within milliseconds on the writer's thread
  (``cassette.RecordingWriter``), off the link's path.
* The upstream closing or resetting a connection closes the client's side cleanly (FIN);
  the requests still waiting are recorded without a reply. A client leaving closes its
  upstream connection.
* The client side runs through the simulator's fault layer (``faults.FaultLayer``), so a
  lab's client can meet delays, stalls, drops and refusals in front of a real controller.
  Line-triggered faults follow the Scan.WaitEndOfLine replies forwarded; frames are counted
  from the Scan.Action starts the controller accepted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stm_live import __version__
from stm_live.devices import protocol as P
from stm_live.simulators.cassette import RecordingWriter
from stm_live.simulators.faults import Fault, FaultLayer
from stm_live.simulators.server import MAX_CONNECTIONS, loop_in_thread, stop_loop_thread

__all__ = ["RecordingProxy", "RunningProxy", "open_proxy", "parse_address", "start_proxy_thread"]

log = logging.getLogger(__name__)

_RAW_CHUNK = 1 << 16
_CLIENT_BUFFER = 16 << 20  # unsent bytes to a client beyond which the controller's side waits
# Replies the proxy reads for itself: the release, frame starts, ends of lines (line faults).
_OBSERVED = frozenset({"Util.VersionGet", "Scan.Action", "Scan.WaitEndOfLine"})
_REOPEN_TRIES = 50  # after a refuse fault: tries to listen again, 0.2 s apart


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` -> (host, port); ValueError naming ``what`` otherwise."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:6501")
    return host.strip("[]"), int(port)


@dataclass
class _Pending:
    name: str
    request: bytes
    t: float  # when it was forwarded (monotonic)
    call: tuple[str, int]  # the fault layer's count of it


class _Conn:
    """One proxied connection: the client's streams, the controller side, what awaits a reply."""

    def __init__(self, index: int, upstream: int, reader, writer, link):
        self.index, self.upstream, self.reader, self.writer, self.link = index, upstream, reader, writer, link
        self.up: _Upstream | None = None
        self.pending: deque[_Pending] = deque()


class _Upstream(asyncio.Protocol):
    """The controller's side of one connection. Without faults each chunk of a reply goes
    on to the client as it arrives (a 1 MiB frame is not held back until it is whole), and
    the framing only serves the record; with faults each whole reply goes through the
    fault layer, in order, from ``send_replies``."""

    def __init__(self, proxy: RecordingProxy, c: _Conn):
        self.proxy, self.c = proxy, c
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.parts: list = []  # the reply being read: header, then body chunks (views, not copies)
        self.left = 0  # its body bytes still to come
        self.raw: str | None = None  # why the bytes stopped parsing as replies
        self.done = asyncio.get_running_loop().create_future()  # (by, why) once the controller side ends
        self.out: asyncio.Queue | None = asyncio.Queue() if proxy.faults else None
        self._resuming: asyncio.Future | None = None  # waits for a slow client to take its bytes

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.parts or self.head:  # a reply cut short: forwarded as far as it came
            self._raw(b"".join(self.parts) if self.parts else bytes(self.head), "a reply cut short by the controller")
        why = "closed the connection" if exc is None else f"connection failed: {exc}"
        if self.out is not None:
            self.out.put_nowait(None)
        if not self.done.done():
            self.done.set_result(("upstream", why))

    def data_received(self, data: bytes) -> None:
        c = self.c
        if self.out is None:
            c.writer.write(data)  # every byte as it came, before any bookkeeping
            if c.writer.transport.get_write_buffer_size() > _CLIENT_BUFFER:
                self.transport.pause_reading()  # a slow client: hold the controller back
                self._resuming = asyncio.ensure_future(self._resume())
        if self.raw:
            self._raw(data, "continued")
            return
        view = memoryview(data)
        while view:
            if not self.parts:  # in a header
                take = view[: P.HEADER_SIZE - len(self.head)]
                self.head += take
                view = view[len(take) :]
                if len(self.head) < P.HEADER_SIZE:
                    return
                try:
                    _, self.left = P.parse_response_header(bytes(self.head))
                except P.ProtocolError as exc:
                    self.raw = f"not a Nanonis reply ({exc})"
                    self._raw(bytes(self.head) + bytes(view), self.raw)
                    return
                self.parts, self.head = [bytes(self.head)], bytearray()
            take = view[: self.left]
            self.parts.append(take)
            self.left -= len(take)
            view = view[len(take) :]
            if not self.left:
                parts, self.parts = self.parts, []
                self.proxy._reply(c, parts)

    async def _resume(self) -> None:
        try:
            await self.c.writer.drain()
        except ConnectionError:
            pass
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def _raw(self, data: bytes, why: str) -> None:
        """Bytes that are not (whole) replies: recorded, and with faults forwarded from here
        (without, every byte has gone on already)."""
        if self.out is not None:
            self.out.put_nowait((None, data))  # in order, after the replies before it
        self.proxy.writer.append(
            "raw", {"conn": self.c.index, "t": self.proxy._t(), "direction": "reply", "why": why}, data
        )

    async def send_replies(self) -> tuple[str, str]:
        """With faults: each whole reply through the fault layer, in order."""
        while (item := await self.out.get()) is not None:
            call, reply = item
            if call is None:
                self.c.writer.write(reply)
            elif not await self.proxy.faults.reply(self.c.link, call, reply):
                return ("fault", "closed by an injected fault") if self.c.link.gone else ("client", "went away")
        return await self.done


class RecordingProxy:
    """The proxy of one recording; ``start`` listens, ``close`` stops (on the proxy's loop).

    ``upstreams``: (host, port) per controller port. ``writer``: where records go (closed by
    ``close``). ``faults``: a ``FaultLayer`` or ``Fault`` list for the client side.
    """

    def __init__(
        self,
        upstreams: Sequence[tuple[str, int]],
        writer: RecordingWriter,
        *,
        faults: FaultLayer | Sequence[Fault] = (),
        connect_timeout_s: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
    ):
        if not 1 <= len(upstreams) <= MAX_CONNECTIONS:
            raise ValueError(f"{len(upstreams)} upstreams: a controller has 1 to {MAX_CONNECTIONS} ports")
        self.upstreams = [tuple(u) for u in upstreams]
        self.writer = writer
        self.faults = faults if isinstance(faults, FaultLayer) else FaultLayer(faults)
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self.host = ""
        self.ports: list[int] = []
        self.connections = 0  # open now
        self.refused = 0
        self.pairs = 0
        self._frame = -1  # frames the controller started - 1 (for line-triggered faults)
        self._t0 = time.monotonic()
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._refusing = False
        self._reopen: asyncio.Task | None = None

    def _t(self, when: float | None = None) -> float:
        return round((time.monotonic() if when is None else when) - self._t0, 6)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._servers = await self._listen([port + i if port else 0 for i in range(len(self.upstreams))])
        self.ports = [s.sockets[0].getsockname()[1] for s in self._servers]
        self.faults.start(self._refuse)

    async def _listen(self, ports: list[int]) -> list:
        servers = []
        try:
            for i, port in enumerate(ports):
                servers.append(await asyncio.start_server(lambda r, w, i=i: self._accept(i, r, w), self.host, port))
        except OSError:
            for s in servers:
                s.close()
            raise
        return servers

    async def close(self) -> None:
        self._closing = True
        self.faults.stop()
        if self._reopen is not None:
            self._reopen.cancel()
        for s in self._servers:
            s.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self.writer.close()

    def _refuse(self, seconds: float) -> None:
        """A refuse fault: stop listening for ``seconds``; open connections stay."""
        if self._refusing or self._closing:
            return
        self._refusing = True
        for s in self._servers:
            s.close()
        self._reopen = asyncio.get_running_loop().create_task(self._listen_again(seconds))

    async def _listen_again(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
            for _ in range(_REOPEN_TRIES):
                try:
                    self._servers = await self._listen(self.ports)
                    return
                except OSError as exc:  # a port briefly taken
                    log.warning("cannot listen on %s:%s again yet: %s", self.host, self.ports, exc)
                    await asyncio.sleep(0.2)
            log.error("recording proxy could not listen on %s:%s again", self.host, self.ports)
        finally:
            self._reopen, self._refusing = None, False

    # ------------------------------------------------------------------ connections

    async def _accept(self, upstream: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections or self._closing:
            self.refused += 1
            log.warning(
                "refusing connection from %s: %d connections open (the limit)",
                writer.get_extra_info("peername"),
                self.connections,
            )
            writer.close()
            return
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        link = self.faults.connected(writer, task)
        c = _Conn(link.index, upstream, reader, writer, link)
        by, why = "proxy", "the proxy stopped"
        try:
            by, why = await self._relay(c)
        except asyncio.CancelledError:
            if link.gone:
                by, why = "fault", "dropped by an injected fault"
        except Exception as exc:  # a bug here must not take the other connections down
            log.exception("recording proxy: connection %d failed", c.index)
            by, why = "proxy", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self.connections -= 1
            self._tasks.discard(task)
            self.faults.closed(link)
            for p in c.pending:  # asked, never answered
                self._pair(c, p, None)
            self.writer.append("close", {"conn": c.index, "t": self._t(), "by": by, "why": why})
            writer.close()  # after what was written to it: a clean close (FIN)
            if c.up is not None and c.up.transport is not None:
                c.up.transport.close()

    async def _relay(self, c: _Conn) -> tuple[str, str]:
        host, port = self.upstreams[c.upstream]
        c.up = _Upstream(self, c)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(lambda: c.up, host, port), self.connect_timeout_s
            )
        except (TimeoutError, OSError) as exc:
            log.warning("recording proxy: cannot reach %s:%s: %s", host, port, exc)
            return "upstream", f"cannot connect to {host}:{port}: {exc or type(exc).__name__}"
        self.writer.append("open", {"conn": c.index, "upstream": c.upstream, "t": self._t()})
        ends = [
            asyncio.ensure_future(self._requests(c)),
            asyncio.ensure_future(c.up.send_replies()) if c.up.out is not None else c.up.done,
        ]
        try:
            done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for end in ends:
                end.cancel()
            await asyncio.wait(ends)

    async def _requests(self, c: _Conn) -> tuple[str, str]:
        up = c.up.transport
        while True:
            head = b""
            try:
                head = await c.reader.readexactly(P.HEADER_SIZE)  # idle between requests: no timeout
                name, size, want_reply = P.parse_request_header(head)
                body = await c.reader.readexactly(size) if size else b""
            except asyncio.IncompleteReadError as exc:
                if head or exc.partial:
                    return await self._raw_requests(c, head + exc.partial, "a request cut short by the client")
                return "client", "closed the connection"
            except P.ProtocolError as exc:
                return await self._raw_requests(c, head, f"not a Nanonis request ({exc})")
            except ConnectionError as exc:
                return "client", f"connection failed: {exc}"
            pending = _Pending(name, head + body, time.monotonic(), self.faults.request(c.link, name))
            if want_reply:
                c.pending.append(pending)  # before it leaves: the reply can only come after
            else:
                self._pair(c, pending, None)
            up.write(pending.request)

    async def _raw_requests(self, c: _Conn, data: bytes, why: str) -> tuple[str, str]:
        """Forward everything from here on from the client as it comes (not Nanonis messages)."""
        log.warning("recording proxy: connection %d: %s; forwarding its requests raw", c.index, why)
        while data:
            self.writer.append("raw", {"conn": c.index, "t": self._t(), "direction": "request", "why": why}, data)
            c.up.transport.write(data)
            why = "continued"
            data = await c.reader.read(_RAW_CHUNK)
        return "client", "closed the connection"

    def _reply(self, c: _Conn, parts: list) -> None:
        """A whole reply (header, body chunks) from the controller: pair it, learn from it, and
        with faults hand it to the fault layer."""
        name = P.parse_response_header(parts[0])[0]
        pending = c.pending.popleft() if c.pending else None
        if pending is None or pending.name != name:
            log.warning(
                "recording proxy: connection %d: a %s reply %s",
                c.index,
                name,
                "nobody asked for" if pending is None else f"to a {pending.name} request",
            )
            if pending is not None:
                self._pair(c, pending, None)
            pending = _Pending(name, b"", time.monotonic(), self.faults.request(c.link, name))
        self._pair(c, pending, parts)
        if name in _OBSERVED or c.up.out is not None:
            reply = b"".join(parts)  # small, or about to go through the faults whole
            self._observe(c, pending, reply)
            if c.up.out is not None:
                c.up.out.put_nowait((pending.call, reply))

    # ------------------------------------------------------------------ records

    def _pair(self, c: _Conn, p: _Pending, reply: list | None) -> None:
        self.pairs += 1
        meta = {
            "conn": c.index,
            "t": self._t(p.t),
            "name": p.name,
            "reply_s": None if reply is None else round(time.monotonic() - p.t, 6),
        }
        self.writer.append("pair", meta, p.request or None, reply)

    def _observe(self, c: _Conn, p: _Pending, reply: bytes) -> None:
        """What the controller's reply tells: its release, a frame start, a line's end."""
        if p.name not in _OBSERVED:
            return
        try:
            values, status, _ = P.decode_response_body(p.name, reply[P.HEADER_SIZE :])
            if status:
                return
            if p.name == "Util.VersionGet":
                self.writer.append("release", {"conn": c.index, "t": self._t(), **values})
            elif p.name == "Scan.Action":
                if p.request and P.decode_request_body(p.name, p.request[P.HEADER_SIZE :])["action"] == 0:
                    self._frame += 1
            elif not values["timed_out"]:
                self.faults.scan_event(max(self._frame, 0), values["line"], values["movement"])
        except P.ProtocolError as exc:  # forwarded all the same; only the bookkeeping misses it
            log.warning("recording proxy: cannot read a %s reply: %s", p.name, exc)


# ---------------------------------------------------------------------- running it


@dataclass
class RunningProxy:
    """A recording proxy served from a daemon thread (see ``start_proxy_thread``)."""

    proxy: RecordingProxy
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread

    @property
    def host(self) -> str:
        return self.proxy.host

    @property
    def ports(self) -> list[int]:
        return self.proxy.ports

    @property
    def port(self) -> int:
        return self.proxy.ports[0]

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listeners, write out the recording, join."""
        if not self._thread.is_alive():
            return
        stop_loop_thread(self.proxy.close, self._loop, self._thread, what="recording proxy", timeout=timeout)

    def __enter__(self) -> RunningProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def open_proxy(
    upstreams: Sequence[tuple[str, int]],
    out: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: FaultLayer | Sequence[Fault] = (),
) -> RecordingProxy:
    """A started proxy recording the links to ``upstreams`` into the new file ``out``,
    listening on ``host`` from ``port`` (0: ephemeral ports; ``.ports`` says where). A
    failure to listen leaves no file behind and raises OSError naming the address."""
    writer = RecordingWriter(
        out,
        {
            "started": time.time(),
            "recorder": f"stm-live {__version__}",
            "upstreams": [f"{h}:{p}" for h, p in upstreams],
        },
    )
    try:
        proxy = RecordingProxy(upstreams, writer, faults=faults)
        await proxy.start(host, port)
    except BaseException as exc:
        writer.close()
        Path(out).unlink(missing_ok=True)  # nothing recorded: the name stays free
        if isinstance(exc, OSError):
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        raise
    return proxy


def start_proxy_thread(
    upstreams: Sequence[tuple[str, int]],
    out: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: FaultLayer | Sequence[Fault] = (),
    startup_timeout_s: float = 30.0,
) -> RunningProxy:
    """``open_proxy`` served from a daemon thread (tests, benchmarks)."""
    started, loop, thread = loop_in_thread(
        lambda: open_proxy(upstreams, out, host=host, port=port, faults=faults),
        name="stm-live-record",
        what="recording proxy",
        startup_timeout_s=startup_timeout_s,
    )
    if isinstance(started, BaseException):
        raise started
    return RunningProxy(started, loop, thread)
