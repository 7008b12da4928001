"""Fast blocking client for the Nanonis TCP interface, and a line-by-line scan follower.

``NanonisClient`` holds one connection and sends one request at a time on it (the
controller serves each connection serially, NANONIS_PROTOCOL.md §1). Open several clients
for several connections (a blocking wait occupies its own connection, §7).

Deadlines and recovery. Every reply has a deadline scaled to what it carries: the base
``timeout``, plus a blocking command's own wait, plus the reply's bytes at a conservative
link rate (``link_rate``; a 512 x 512 grab is 1 MiB, not a ``Bias.Get``). A timeout or a
dropped connection closes the socket (a late reply would desynchronise the stream) and, while
``max_outage_s`` > 0, the client reconnects on its own: at once, then with exponential
back-off, for at most ``max_outage_s`` per outage. A request that is safe to repeat
(``protocol.Command.safe``: reads, absolute sets, waits) is then sent again; an action is not
sent blindly: its method reads the controller's state to learn whether it arrived (a
``Scan.Action`` start is re-sent only if the scan is not running), and an action whose effect
cannot be read (a bias pulse, the tip shaper) raises :class:`ActionUnconfirmed` once the
connection is open again. When the budget is spent, :class:`ConnectionLost` (:class:`ReplyTimeout` for a stall)
is raised. The clients of one controller share a :class:`LinkState` that others observe.

Wire encoding comes from the single command table in :mod:`stm_live.devices.protocol`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

import stm_live.devices.protocol as P  # by its path: the package's NanonisSTM import leads back here
from stm_live.devices.protocol import NanonisError, ProtocolError, UnknownCommandError
from stm_live.validation import finite

__all__ = [
    "NanonisClient",
    "LineFollower",
    "ScanLine",
    "LineEvent",
    "FrameSI",
    "BufferConfig",
    "ScanProps",
    "ScanSpeed",
    "FrameData",
    "TipShaperProps",
    "VersionInfo",
    "ConnectionLost",
    "ReplyTimeout",
    "ActionUnconfirmed",
    "LinkState",
    "LinkEvent",
    "NanonisError",
    "ProtocolError",
    "DEFAULT_MAX_OUTAGE_S",
    "LINK_RATE_BYTES_S",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_OUTAGE_S = 30.0  # a controller PC busy for a while, a network glitch
LINK_RATE_BYTES_S = 1.0e6  # conservative: a shared network to a busy controller PC
BACKOFF_S = (0.05, 2.0)  # first and longest wait between reconnect attempts


class ConnectionLost(ConnectionError):
    """The connection to the controller is closed or broken (and, when the client recovers
    on its own, did not come back within its outage budget)."""


class ReplyTimeout(ConnectionLost, TimeoutError):
    """No complete reply within the deadline (and none after reconnecting, within the budget)."""


class ActionUnconfirmed(ConnectionLost):
    """The link dropped before an action's reply came, and whether the action ran cannot be
    read back; it was not sent again (it may have run). The connection is open again."""


@dataclass(frozen=True)
class LinkEvent:
    kind: str  # "down" | "back" | "spent" (budget spent) | "closed" (recovery abandoned)
    address: str  # "host:port"
    outage_s: float  # since the outage began
    attempts: int  # reconnect attempts so far
    reason: str  # what went wrong first (one line)


class LinkState:
    """Whether the connections to one controller are up, shared by them and observable.

    ``state`` is "up", "down" (a connection is reconnecting) or "lost" (an outage outlived
    the budget, or its recovery was abandoned; it stays lost until a connection gets through
    or :meth:`rearm`). ``up`` is a :class:`threading.Event` set while the state is "up";
    ``down_since`` (``time.monotonic()``) and ``attempts`` describe the present outage,
    ``back_at`` is when the last one ended and ``outages`` counts them. ``subscribe(cb)``
    calls ``cb(LinkEvent)`` on every change, from the thread that noticed it.
    """

    def __init__(self, address: str):
        self.address = address
        self.up = threading.Event()
        self.up.set()
        self.state = "up"
        self.down_since: float | None = None
        self.attempts = 0
        self.reason = ""
        self.back_at = float("-inf")
        self.outages = 0
        self.outage_total_s = 0.0  # summed over ended outages
        self._down: set[int] = set()  # ids of connections that failed and did not get through yet
        self._lock = threading.Lock()
        self._subs: list[Callable[[LinkEvent], None]] = []

    def subscribe(self, callback: Callable[[LinkEvent], None]) -> Callable[[LinkEvent], None]:
        self._subs.append(callback)
        return callback

    def unsubscribe(self, callback) -> None:
        if callback in self._subs:
            self._subs.remove(callback)

    @property
    def outage_s(self) -> float:
        """Seconds since the present outage began (0 while up)."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def _event(self, kind: str) -> LinkEvent:
        return LinkEvent(kind, self.address, self.outage_s, self.attempts, self.reason)

    def _emit(self, event: LinkEvent) -> None:
        for callback in list(self._subs):
            try:
                callback(event)
            except Exception:  # an observer must not break the connection that reports
                logger.exception("link observer %r failed", callback)

    def _failed(self, conn, reason: str) -> float:
        """``conn`` lost its link; returns when this outage began."""
        with self._lock:
            self._down.add(id(conn))
            event = None
            if self.state == "up":
                self.state, self.down_since, self.attempts, self.reason = "down", time.monotonic(), 0, reason
                self.outages += 1
                self.up.clear()
                event = self._event("down")
            start = self.down_since
        if event is not None:
            self._emit(event)
        return start

    def _attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def _through(self, conn) -> None:
        """``conn`` completed a round trip: the outage ends once no connection is down (at
        once after a lost one: the controller answers again)."""
        if self.state == "up":
            return
        with self._lock:
            self._down.discard(id(conn))
            if self.state == "up" or (self._down and self.state == "down"):
                return
            event = self._event("back")
            self._end()
        self._emit(event)

    def _spent(self, conn) -> None:
        with self._lock:
            if self.state != "down":
                return
            self.state = "lost"
            event = self._event("spent")
        self._emit(event)

    def _forget(self, conn) -> None:
        """``conn`` was closed: it no longer waits to come back."""
        with self._lock:
            if id(conn) not in self._down:
                return
            self._down.discard(id(conn))
            if self._down or self.state != "down":
                return
            self.state = "lost"  # nobody is reconnecting: no "back" will come from this outage
            event = self._event("closed")
        self._emit(event)

    def _end(self) -> None:
        # lock held
        self.outage_total_s += self.outage_s
        self.state, self.down_since, self.back_at = "up", None, time.monotonic()
        self._down.clear()
        self.up.set()

    def rearm(self) -> None:
        """Give the next outage a fresh budget after one was spent (a new frame starts). The
        state is "up" until a connection fails again."""
        with self._lock:
            if self.state == "lost":
                self._end()

    def __repr__(self) -> str:
        return f"LinkState({self.address}, {self.state})"


@dataclass(frozen=True)
class LineEvent:
    timed_out: bool
    line: int
    movement: str  # "forward" | "backward" | "center" | "start" (P.MOVEMENT_TYPES)
    pass_number: int


@dataclass(frozen=True)
class FrameSI:
    center_x: float
    center_y: float
    width: float
    height: float
    angle_deg: float


@dataclass(frozen=True)
class BufferConfig:
    channel_indexes: tuple[int, ...]
    pixels: int
    lines: int


@dataclass(frozen=True)
class ScanProps:
    continuous: bool
    bouncy: bool
    autosave: str  # "all" | "next" | "off"
    series_name: str
    comment: str
    modules: tuple[str, ...] | None = None  # only in the extended (newer-release) layout
    autopaste: str | None = None


@dataclass(frozen=True)
class ScanSpeed:
    fwd_speed: float  # m/s
    bwd_speed: float
    fwd_time: float  # s per line
    bwd_time: float
    keep_constant: str  # "speed" | "time"
    speed_ratio: float


@dataclass(frozen=True)
class FrameData:
    name: str
    data: np.ndarray  # (rows, cols) float32, wire orientation (backward rows mirrored)
    scan_up: bool


@dataclass(frozen=True)
class TipShaperProps:
    switch_off_delay: float
    change_bias: bool | None  # None = no change (Set only)
    bias: float
    tip_lift: float
    lift_time_1: float
    bias_lift: float
    bias_settling_time: float
    lift_height: float
    lift_time_2: float
    end_wait_time: float
    restore_feedback: bool | None


@dataclass(frozen=True)
class VersionInfo:
    product: str
    version: str
    host_release: int
    rt_release: int


_AUTOSAVE = ("all", "next", "off")  # Get values 0..2; Set values 1..3 (0 = no change)
_KEEP = ("speed", "time")


_finite = finite  # ValueError naming the argument


def _repeat() -> bool:
    """``took_effect`` of an action that leaves the controller as sending it twice does."""
    return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _cause(exc: BaseException) -> str:
    """What went wrong, without the advice meant for a caller that does not reconnect."""
    return _one_line(exc).split("; connection closed")[0].removesuffix("; call reconnect()")


def _set_flag(what: str, value: bool | None) -> int:
    """Set-side tri-state: None = no change (0), True = 1, False = 2 (§4)."""
    if value is None:
        return 0
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be True, False or None, got {value!r}")
    return 1 if value else 2


def _timeout_ms(what: str, timeout_s: float | None) -> int:
    """Seconds -> ms for the wire; None or negative = wait forever (-1)."""
    if timeout_s is None or timeout_s < 0:
        return -1
    ms = _finite(what, timeout_s) * 1000.0
    if ms > 2**31 - 1:
        raise ValueError(f"{what} of {timeout_s} s is too long")
    return int(round(ms))


def _enum(what: str, value, names: Sequence[str]) -> int:
    if isinstance(value, str):
        key = value.lower()
        for i, n in enumerate(names):
            if n.lower() == key:
                return i
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(names):
        return int(value)
    raise ValueError(f"{what} must be one of {list(names)}, got {value!r}")


def _name_of(value: int, names: Sequence[str]) -> str:
    return names[value] if 0 <= value < len(names) else f"unknown({value})"


class NanonisClient:
    """One connection to a Nanonis controller (or the simulated one).

    Parameters
    ----------
    host, port : the controller's TCP programming interface (127.0.0.1:6501 by default).
    timeout : seconds for connecting and the base deadline of each reply.
    max_outage_s : how long one outage may last while the client reconnects on its own
        (0: never reconnect; a timeout or drop raises at once, call ``.reconnect()``).
    link : the :class:`LinkState` this connection reports to (shared by the connections to
        one controller); a new one by default.
    link_rate : bytes per second a reply is granted on top of the base deadline.

    The first connection is made at once and not retried: a controller that is not there
    is a configuration error, not an outage.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6501,
        *,
        timeout: float = 5.0,
        max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
        link: LinkState | None = None,
        link_rate: float = LINK_RATE_BYTES_S,
    ):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an integer 1-65535, got {port!r}")
        self.timeout = _finite("timeout", timeout)
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.max_outage_s = _finite("max_outage_s", max_outage_s)
        self.link_rate = _finite("link_rate", link_rate)
        if self.max_outage_s < 0 or self.link_rate <= 0:
            raise ValueError(f"max_outage_s must be >= 0 and link_rate > 0, got {max_outage_s}, {link_rate}")
        self.host, self.port = host, port
        self.link = link if link is not None else LinkState(f"{host}:{port}")
        self._lock = threading.RLock()  # re-entered by the state reads that decide about an action
        self._sock: socket.socket | None = None
        self._closed = False  # closed by its owner: no reconnecting until reconnect()
        self._wake = threading.Event()  # cuts a back-off wait short on close()
        self._hdr = bytearray(P.HEADER_SIZE)
        self._buf = bytearray(1 << 16)  # grown on demand; reused so big grabs do not reallocate
        self._reply_bytes: dict[str, int] = {}  # last reply size per command: the next deadline
        self._retries = 0  # reconnect attempts in this outage (back-off), since the last reply
        self._outage: float | None = None  # when the outage this connection is in began
        self.release = P.BASE_RELEASE  # until negotiate() asks the controller
        self.connect()

    # ------------------------------------------------------------ connection

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self) -> None:
        """Open the connection (one attempt); undoes :meth:`close`."""
        self._closed = False
        self._wake.clear()
        self._open(self.timeout)

    def _open(self, timeout: float) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise ConnectionLost(
                f"cannot connect to {self.address}: {exc} (is the controller's TCP "
                "interface, or `stm-live sim serve`, listening there?)"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    def _drop(self, shutdown: bool = False) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                if shutdown:  # wakes a thread blocked reading it
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close the connection (from any thread); a call in progress, or reconnecting,
        ends with ConnectionLost."""
        self._closed = True
        self._wake.set()
        self._drop(shutdown=True)
        self.link._forget(self)

    def negotiate(self) -> int:
        """Speak the layouts of the release the controller reports (Util.VersionGet); a
        release without that command (<= R13172) answers it with an error."""
        try:
            self.release = P.release_profile(int(self.call("Util.VersionGet")["host_release"]))
        except NanonisError:
            self.release = P.release_profile(13172)
        return self.release

    def reconnect(self) -> None:
        """Drop the present connection (if any) and open a fresh one (one attempt)."""
        with self._lock:
            self._drop()
            self.connect()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def recovers(self) -> bool:
        """Whether a timeout or drop is followed by reconnecting (``max_outage_s`` > 0)."""
        return self.max_outage_s > 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._sock else "closed"
        return f"NanonisClient({self.address}, {state})"

    def _stale(self) -> bool:
        """Whether the idle connection was closed by the peer (EOF or an error pending): then
        nothing was in flight, and it is replaced before a request is sent on it."""
        try:
            self._sock.settimeout(0.0)  # the round trip sets its own timeout again
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:  # nothing pending: open and idle
            return False
        except OSError:
            return True

    def _recover(self, name: str, cause: ConnectionLost) -> None:
        """Reconnect after ``cause`` (lock held): at once, then with exponential back-off
        (kept across the attempts of one outage), until the outage has lasted
        ``max_outage_s``; then raise (ReplyTimeout if it was a stall)."""
        self._drop()
        if self._closed:  # closed by its owner (another thread): not an outage
            raise ConnectionLost(f"{name}: connection to {self.address} closed") from cause
        start = self.link._failed(self, _cause(cause))
        if start != self._outage:  # a new outage: its first attempt is at once
            self._outage, self._retries = start, 0
        while True:
            left = start + self.max_outage_s - time.monotonic()
            if self._retries and left <= 0:
                self.link._spent(self)
                kind = ReplyTimeout if isinstance(cause, ReplyTimeout) else ConnectionLost
                raise kind(
                    f"{name}: link to {self.address} down for {time.monotonic() - start:.1f} s "
                    f"({self.link.attempts} reconnect attempts; first: {self.link.reason}); not back "
                    f"within max_outage_s = {self.max_outage_s:g} s; call reconnect()"
                ) from cause
            if self._retries:  # every attempt of an outage but its first waits
                self._wake.wait(min(BACKOFF_S[0] * 2 ** (self._retries - 1), BACKOFF_S[1], left))
            if self._closed:
                raise ConnectionLost(f"{name}: connection to {self.address} closed while reconnecting") from cause
            self._retries += 1
            self.link._attempt()
            try:
                self._open(min(self.timeout, max(left, 0.05)))
            except ConnectionLost:
                continue
            if self._closed:  # closed while connecting
                self._drop()
                raise ConnectionLost(f"{name}: connection to {self.address} closed while reconnecting") from cause
            return

    # ------------------------------------------------------------ transport

    def _recv_exact(self, sock: socket.socket, view: memoryview, deadline: float | None, name: str) -> None:
        got, n = 0, len(view)
        while got < n:
            if deadline is None:
                sock.settimeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionLost(f"{name}: controller closed the connection ({got} of {n} bytes read)")
            got += k

    def _roundtrip(self, name: str, request: bytes, read_timeout: float | None, expect: int) -> memoryview:
        """Send ``request``, read the reply; caller holds the lock. Returns the body view.

        The deadline is ``read_timeout`` plus ``expect`` bytes at the link rate, extended to
        the size the reply header announces."""
        sock = self._sock
        if sock is None:
            raise ConnectionLost(f"{name}: not connected to {self.address}; call reconnect()")
        t0 = time.monotonic()
        deadline = None if read_timeout is None else t0 + read_timeout + expect / self.link_rate
        try:
            sock.settimeout(self.timeout)
            sock.sendall(request)
            self._recv_exact(sock, memoryview(self._hdr), deadline, name)
            rname, size = P.parse_response_header(bytes(self._hdr))
            if rname != name:
                raise ProtocolError(f"reply to {name} names {rname!r}")
            if deadline is not None and size > expect:
                deadline = max(deadline, t0 + read_timeout + size / self.link_rate)
            if size > len(self._buf):
                self._buf = bytearray(max(size, 2 * len(self._buf)))
            body = memoryview(self._buf)[:size]
            self._recv_exact(sock, body, deadline, name)
            self._reply_bytes[name] = size
            return body
        except TimeoutError:
            self._drop()
            waited = "" if deadline is None else f" within {deadline - t0:.3g} s"
            raise ReplyTimeout(
                f"{name}: no reply from {self.address}{waited}; connection closed, call reconnect()"
            ) from None
        except (ProtocolError, ConnectionLost):
            self._drop()  # the stream position is unknown now
            raise
        except OSError as exc:
            self._drop()
            raise ConnectionLost(f"{name}: connection to {self.address} failed: {exc}") from exc

    def call(
        self,
        name: str,
        values=None,
        *,
        read_timeout: float | None = -1.0,
        decode=None,
        reply_bytes: int | None = None,
        took_effect: Callable[[], bool] | None = None,
    ) -> dict:
        """Send ``name`` with ``values``; return the decoded return fields.

        ``read_timeout``: seconds to wait for the reply beyond its transfer time; None =
        unlimited; -1 = ``self.timeout``. ``reply_bytes``: the reply's expected size (default:
        the last reply to this command). ``decode(body) -> (values, status, description)``
        replaces the table decoder (it runs while the reply buffer is still valid).

        A lost reply is followed by reconnecting (while ``max_outage_s`` > 0). A command safe
        to repeat is then sent again. Otherwise ``took_effect()``, a read of the controller's
        state, decides: True, the action arrived (returns {}); False, it is sent again; with
        no ``took_effect`` :class:`ActionUnconfirmed` is raised. Raises NanonisError on a
        controller error.
        """
        try:  # the layout of the release this controller speaks (negotiate)
            command = P.command_for(name, self.release)
        except UnknownCommandError:
            command = P.COMMANDS[name]
        request = P.pack_request(name, values, command=command)
        if read_timeout is not None and read_timeout < 0:
            read_timeout = self.timeout
        with self._lock:
            while True:
                if self._closed:
                    raise ConnectionLost(f"{name}: not connected to {self.address}; call reconnect()")
                try:
                    if self.recovers and (self._sock is None or self._stale()):
                        # Closed while idle (or after an outage): nothing was in flight, so a
                        # fresh connection is no outage; failing to open one is.
                        self._drop()
                        self._open(self.timeout)
                    expect = self._reply_bytes.get(name, 0) if reply_bytes is None else int(reply_bytes)
                    body = self._roundtrip(name, request, read_timeout, expect)
                except ConnectionLost as exc:
                    if not self.recovers:
                        raise
                    self._recover(name, exc)
                    if command.safe:
                        continue
                    if took_effect is None:
                        raise ActionUnconfirmed(
                            f"{name}: the link to {self.address} dropped before the reply ({_cause(exc)}); "
                            "not sent again, it may have run"
                        ) from exc
                    if took_effect():
                        return {}
                    continue
                self._retries = 0
                self.link._through(self)
                try:
                    result, status, desc = decode(body) if decode else P.decode_response_body(name, body, command)
                except ProtocolError:
                    self._drop()
                    raise
                break
        if status != 0:
            raise NanonisError(name, desc or f"error status {status}")
        return result

    def _blocking(self, timeout_ms: int) -> float | None:
        """Read timeout for a command that may block for ``timeout_ms`` (−1 = forever)."""
        return None if timeout_ms < 0 else timeout_ms / 1000.0 + self.timeout

    # ------------------------------------------------------------ Bias, Current

    def bias_set(self, V: float) -> None:
        self.call("Bias.Set", (_finite("bias", V),))

    def bias_get(self) -> float:
        return self.call("Bias.Get")["bias"]

    def bias_pulse(
        self, width_s: float, bias_V: float, *, wait: bool = True, z_hold: bool = True, relative: bool = False
    ) -> None:
        width = _finite("pulse width", width_s)
        if width < 0:
            raise ValueError(f"pulse width must be >= 0 s, got {width_s}")
        # No state tells whether a pulse ran: a lost reply raises ActionUnconfirmed.
        self.call(
            "Bias.Pulse",
            (int(bool(wait)), width, _finite("pulse bias", bias_V), 1 if z_hold else 2, 1 if relative else 2),
            read_timeout=width + self.timeout if wait else -1,
        )

    def current_get(self) -> float:
        return self.call("Current.Get")["current"]

    # ------------------------------------------------------------ Z controller

    def z_ctrl_on_off_set(self, on: bool) -> None:
        self.call("ZCtrl.OnOffSet", (int(bool(on)),))

    def z_ctrl_on_off_get(self) -> bool:
        return self.call("ZCtrl.OnOffGet")["status"] != 0

    def z_ctrl_setpoint_set(self, value: float) -> None:
        self.call("ZCtrl.SetpntSet", (_finite("setpoint", value),))

    def z_ctrl_setpoint_get(self) -> float:
        return self.call("ZCtrl.SetpntGet")["setpoint"]

    def z_ctrl_z_pos_set(self, m: float) -> None:
        self.call("ZCtrl.ZPosSet", (_finite("Z position", m),))

    def z_ctrl_z_pos_get(self) -> float:
        return self.call("ZCtrl.ZPosGet")["z"]

    def z_ctrl_withdraw(self, *, wait: bool = True, timeout_s: float | None = 5.0) -> None:
        ms = _timeout_ms("withdraw timeout", timeout_s)
        # withdrawing a withdrawn tip leaves it withdrawn: sent again after a lost reply
        self.call(
            "ZCtrl.Withdraw",
            (int(bool(wait)), ms),
            read_timeout=self._blocking(ms) if wait else -1,
            took_effect=_repeat,
        )

    def z_ctrl_home(self) -> None:
        self.call("ZCtrl.Home", took_effect=_repeat)  # an absolute position

    # ------------------------------------------------------------ Scan

    def scan_action(self, action: str, direction: str = "down") -> None:
        """After a lost reply: a start that arrived has the scan running (a second start
        would restart the frame), a stop that arrived has it stopped; pause, resume and the
        rest leave the scan as one does, so they are sent again."""
        code = _enum("scan action", action, P.SCAN_ACTIONS)
        up = _enum("scan direction", direction, ("down", "up"))  # wire: 1 = up, 0 = down
        arrived = {"start": self.scan_status_get, "stop": lambda: not self.scan_status_get()}
        self.call("Scan.Action", (code, up), took_effect=arrived.get(P.SCAN_ACTIONS[code], _repeat))

    def scan_status_get(self) -> bool:
        return self.call("Scan.StatusGet")["status"] != 0

    def scan_wait_end_of_scan(self, timeout_s: float | None) -> tuple[bool, str]:
        ms = _timeout_ms("wait timeout", timeout_s)
        r = self.call("Scan.WaitEndOfScan", (ms,), read_timeout=self._blocking(ms))
        return r["timed_out"] != 0, r["path"]

    def scan_wait_end_of_line(self, timeout_s: float | None) -> LineEvent:
        ms = _timeout_ms("wait timeout", timeout_s)
        r = self.call("Scan.WaitEndOfLine", (ms,), read_timeout=self._blocking(ms))
        return LineEvent(r["timed_out"] != 0, r["line"], _name_of(r["movement"], P.MOVEMENT_TYPES), r["pass_number"])

    def scan_frame_set(
        self, center_x: float, center_y: float, width: float, height: float, angle_deg: float = 0.0
    ) -> None:
        w, h = _finite("frame width", width), _finite("frame height", height)
        if w <= 0 or h <= 0:
            raise ValueError(f"frame width and height must be positive, got {width} x {height}")
        self.call(
            "Scan.FrameSet",
            (_finite("center x", center_x), _finite("center y", center_y), w, h, _finite("frame angle", angle_deg)),
        )

    def scan_frame_get(self) -> FrameSI:
        r = self.call("Scan.FrameGet")
        return FrameSI(r["center_x"], r["center_y"], r["width"], r["height"], r["angle"])

    def scan_buffer_set(self, channel_indexes: Iterable[int], pixels: int, lines: int) -> None:
        idx = [int(i) for i in channel_indexes]
        if not idx or any(not 0 <= i < 128 for i in idx):
            raise ValueError(f"channel indexes must be a non-empty list of RT indexes 0-127, got {idx}")
        if int(pixels) <= 0 or int(lines) < 0:
            raise ValueError(f"pixels must be > 0 and lines >= 0, got {pixels} x {lines}")
        self.call("Scan.BufferSet", (idx, int(pixels), int(lines)))

    def scan_buffer_get(self) -> BufferConfig:
        r = self.call("Scan.BufferGet")
        return BufferConfig(tuple(int(i) for i in r["channel_indexes"]), r["pixels"], r["lines"])

    def scan_props_set(
        self,
        *,
        continuous: bool | None = None,
        bouncy: bool | None = None,
        autosave: str | None = None,
        series_name: str = "",
        comment: str = "",
        modules: Sequence[str] = (),
        autopaste: str | None = None,
    ) -> None:
        """Set scan properties; None leaves a setting unchanged. ``autopaste`` (newer
        releases only) is sent only when given."""
        values = {
            "continuous": _set_flag("continuous", continuous),
            "bouncy": _set_flag("bouncy", bouncy),
            "autosave": 0 if autosave is None else _enum("autosave", autosave, _AUTOSAVE) + 1,
            "series_name": series_name,
            "comment": comment,
            "modules": list(modules),
        }
        if autopaste is not None:
            values["autopaste"] = _enum("autopaste", autopaste, _AUTOSAVE) + 1
        self.call("Scan.PropsSet", values)

    def scan_props_get(self) -> ScanProps:
        """Scan properties; accepts the R13742 layout and the extended one (§5) by checking
        whether the bytes after the comment are exactly the error section."""

        def decode(body):
            r13742 = P.COMMANDS["Scan.PropsGet"]
            try:
                _, pos = P.decode_fields(r13742.response, body, what="Scan.PropsGet response")
            except ProtocolError:  # e.g. an error-only reply: the table decoder handles it
                return P.decode_response_body("Scan.PropsGet", body, r13742)
            command = r13742 if P.is_error_section(body, pos) else P.PROPS_GET_EXTENDED
            return P.decode_response_body("Scan.PropsGet", body, command)

        r = self.call("Scan.PropsGet", decode=decode)
        modules = tuple(r["modules"]) if "modules" in r else None
        # R14573+ number autopaste as its Set does (1 All, 2 Next, 3 Off; reference §5.4)
        shift = 1 if "module_params" in r else 0
        autopaste = _name_of(r["autopaste"] - shift, _AUTOSAVE) if "autopaste" in r else None
        return ScanProps(
            r["continuous"] != 0,
            r["bouncy"] != 0,
            _name_of(r["autosave"], _AUTOSAVE),
            r["series_name"],
            r["comment"],
            modules,
            autopaste,
        )

    def scan_speed_set(
        self,
        fwd_speed: float,
        bwd_speed: float,
        fwd_time: float,
        bwd_time: float,
        keep_constant: str | None = None,
        speed_ratio: float = 1.0,
    ) -> None:
        keep = 0 if keep_constant is None else _enum("keep_constant", keep_constant, _KEEP) + 1
        self.call(
            "Scan.SpeedSet",
            (
                _finite("forward speed", fwd_speed),
                _finite("backward speed", bwd_speed),
                _finite("forward time per line", fwd_time),
                _finite("backward time per line", bwd_time),
                keep,
                _finite("speed ratio", speed_ratio),
            ),
        )

    def scan_speed_get(self) -> ScanSpeed:
        r = self.call("Scan.SpeedGet")
        return ScanSpeed(
            r["fwd_speed"],
            r["bwd_speed"],
            r["fwd_time"],
            r["bwd_time"],
            _name_of(r["keep_constant"], _KEEP),
            r["speed_ratio"],
        )

    def scan_frame_data_grab(
        self, channel_index: int, forward: bool = True, *, shape: tuple[int, int] | None = None
    ) -> FrameData:
        """The whole frame buffer of one channel and direction, as on the wire (row k =
        k-th acquired line, backward rows mirrored, NaN where not yet scanned).

        ``shape`` (lines, pixels), when known, sizes the reply's deadline before its first
        byte comes (else the last grab's size does)."""
        if not 0 <= int(channel_index) < 128:
            raise ValueError(f"channel index must be an RT index 0-127, got {channel_index}")
        expect = None if shape is None else 4 * int(shape[0]) * int(shape[1]) + 128
        r = self.call("Scan.FrameDataGrab", (int(channel_index), 1 if forward else 0), reply_bytes=expect)
        return FrameData(r["channel_name"], r["data"], r["scan_direction"] == 1)

    def scan_save(self, wait: bool = True, timeout_s: float | None = 5.0) -> bool:
        """Save the scan buffer; returns True if the controller timed out waiting."""
        ms = _timeout_ms("save timeout", timeout_s)
        r = self.call("Scan.Save", (int(bool(wait)), ms), read_timeout=self._blocking(ms) if wait else -1)
        return r["timed_out"] != 0

    # ------------------------------------------------------------ Follow Me

    def folme_xy_pos_set(self, x: float, y: float, wait: bool = True, *, timeout_s: float = 30.0) -> None:
        """Move the tip; with ``wait`` the reply comes when the move ends (read timeout ``timeout_s``)."""
        self.call(
            "FolMe.XYPosSet",
            (_finite("x", x), _finite("y", y), int(bool(wait))),
            read_timeout=_finite("timeout_s", timeout_s) if wait else -1,
        )

    def folme_xy_pos_get(self, wait_newest: bool = True) -> tuple[float, float]:
        r = self.call("FolMe.XYPosGet", (int(bool(wait_newest)),))
        return r["x"], r["y"]

    def folme_speed_set(self, speed: float, custom: bool = True) -> None:
        v = _finite("Follow-Me speed", speed)
        if v <= 0:
            raise ValueError(f"Follow-Me speed must be positive, got {speed}")
        self.call("FolMe.SpeedSet", (v, int(bool(custom))))

    def folme_speed_get(self) -> tuple[float, bool]:
        r = self.call("FolMe.SpeedGet")
        return r["speed"], r["custom"] != 0

    # ------------------------------------------------------------ Tip shaper

    def tip_shaper_start(self, wait: bool = True, timeout_s: float | None = 10.0) -> None:
        ms = _timeout_ms("tip shaper timeout", timeout_s)
        self.call("TipShaper.Start", (int(bool(wait)), ms), read_timeout=self._blocking(ms) if wait else -1)

    def tip_shaper_props_set(self, props: TipShaperProps) -> None:
        if not isinstance(props, TipShaperProps):
            raise ValueError(f"expected TipShaperProps, got {type(props).__name__}")
        values = {}
        for f in P.COMMANDS["TipShaper.PropsSet"].request:
            v = getattr(props, f.name)
            values[f.name] = _set_flag(f.name, v) if f.type == "u32" else _finite(f.name, v)
        self.call("TipShaper.PropsSet", values)

    def tip_shaper_props_get(self) -> TipShaperProps:
        r = self.call("TipShaper.PropsGet")
        r["change_bias"] = r["change_bias"] != 0  # Get: 0 = no, 1 = yes (shifted, §4)
        r["restore_feedback"] = r["restore_feedback"] != 0
        return TipShaperProps(**r)

    # ------------------------------------------------------------ Signals

    def signals_names_get(self) -> list[str]:
        return self.call("Signals.NamesGet")["names"]

    def signals_val_get(self, index: int, wait_newest: bool = True) -> float:
        if not 0 <= int(index) < 128:
            raise ValueError(f"signal index must be 0-127, got {index}")
        return self.call("Signals.ValGet", (int(index), int(bool(wait_newest))))["value"]

    def signals_vals_get(self, indexes: Iterable[int], wait_newest: bool = True) -> np.ndarray:
        idx = [int(i) for i in indexes]
        if any(not 0 <= i < 128 for i in idx):
            raise ValueError(f"signal indexes must be 0-127, got {idx}")
        return self.call("Signals.ValsGet", (idx, int(bool(wait_newest))))["values"]

    # ------------------------------------------------------------ Motor, Util

    def motor_start_move(
        self, direction, steps: int, group: int = 0, wait: bool = True, *, timeout_s: float = 30.0
    ) -> None:
        code = _enum("motor direction", direction, P.MOTOR_DIRECTIONS)
        if not 0 <= int(steps) < 65536:
            raise ValueError(f"steps must be 0-65535, got {steps}")
        if not 0 <= int(group) <= 5:
            raise ValueError(f"motor group must be 0-5, got {group}")
        self.call(
            "Motor.StartMove",
            (code, int(steps), int(group), int(bool(wait))),
            read_timeout=_finite("timeout_s", timeout_s) if wait else -1,
        )

    def motor_pos_get(self, group: int = 0, timeout_ms: int = 500) -> tuple[float, float, float]:
        if not 0 <= int(group) <= 5:
            raise ValueError(f"motor group must be 0-5, got {group}")
        if int(timeout_ms) < 0:
            raise ValueError(f"timeout_ms must be >= 0, got {timeout_ms}")
        r = self.call("Motor.PosGet", (int(group), int(timeout_ms)), read_timeout=self._blocking(int(timeout_ms)))
        return r["x"], r["y"], r["z"]

    def util_version_get(self) -> VersionInfo:
        r = self.call("Util.VersionGet")
        return VersionInfo(r["product"], r["version"], r["host_release"], r["rt_release"])


# ================================================================ line follower


@dataclass(frozen=True)
class ScanLine:
    index: int  # row in internal orientation (0 = first scanned line)
    data: dict  # {(channel_index, "forward"|"backward"): 1-D float32, forward orientation}


_DIRECTIONS = ("forward", "backward")


class LineFollower:
    """Follow a running scan line by line (NANONIS_PROTOCOL.md §7).

    One connection blocks in Scan.WaitEndOfLine; a second grabs the frame(s) after each
    data line. Rows are taken from the grab, so a line that finished between two waits is
    recovered from the next grab. Backward rows are flipped to forward orientation. With
    ``use_wait=False`` (controllers without WaitEndOfLine) the grab connection polls.

    Both connections reconnect on their own (``max_outage_s``, reporting to ``link``); the
    rows the controller scanned meanwhile come with the next grab. ``shape`` (lines, pixels)
    sizes the first grab's deadline.
    """

    def __init__(
        self,
        host: str,
        port: int,
        channel_indexes: Iterable[int],
        *,
        directions: Sequence[str] = ("forward", "backward"),
        timeout: float = 5.0,
        use_wait: bool = True,
        poll_interval_s: float = 0.02,
        max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
        link: LinkState | None = None,
        shape: tuple[int, int] | None = None,
    ):
        self.channels = tuple(int(c) for c in channel_indexes)
        if not self.channels:
            raise ValueError("channel_indexes must name at least one channel")
        bad = [d for d in directions if d not in _DIRECTIONS]
        if bad or not directions:
            raise ValueError(f"directions must be a non-empty subset of {_DIRECTIONS}, got {list(directions)}")
        self.directions = tuple(dict.fromkeys(directions))
        self.poll_interval_s = poll_interval_s
        self.use_wait = use_wait
        # both connections report to one link state and reconnect on their own
        options = dict(timeout=timeout, max_outage_s=max_outage_s, link=link)
        self._grab = NanonisClient(host, port, **options)
        self.link = self._grab.link
        options["link"] = self.link
        self._wait = NanonisClient(host, port, **options) if use_wait else None
        self._frames: dict[tuple[int, str], np.ndarray] = {}  # internal orientation
        self._next_row = 0  # first row not yet handed out
        self._pending: deque[ScanLine] = deque()
        self._last_event_line: int | None = None
        # the event that completes a row: the backward line when backward data is wanted
        self._row_done = "backward" if "backward" in self.directions else "forward"
        self._shape: tuple[int, int] | None = None
        self._expect = shape  # (lines, pixels) the grabs will carry, for their deadlines
        try:
            if not self._grab.scan_status_get():
                # No scan running: rows in the buffer are a finished frame's, not new lines.
                self._grab_rows(emit=False)
        except NanonisError:
            pass  # channels not in the buffer yet: nothing stale to skip
        except Exception:
            self.close()
            raise

    @property
    def client(self) -> NanonisClient:
        """The grab connection (between grabs it serves other calls of the following thread)."""
        return self._grab

    def scan_running(self) -> bool:
        """Scan.StatusGet on the grab connection (running or paused)."""
        return self._grab.scan_status_get()

    def close(self) -> None:
        self._grab.close()
        if self._wait is not None:
            self._wait.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def frame(self, channel_index: int, direction: str = "forward") -> np.ndarray:
        """(lines, pixels) float32 in internal orientation, NaN where not yet delivered."""
        key = (int(channel_index), direction)
        if key not in self._frames:
            raise KeyError(
                f"no data for channel {channel_index} {direction}; followed: "
                f"{[(c, d) for c in self.channels for d in self.directions]}"
            )
        return self._frames[key].copy()

    def reset(self) -> None:
        """Forget the frame (a new scan starts at row 0)."""
        self._frames.clear()
        self._pending.clear()
        self._next_row = 0
        self._shape = None
        self._last_event_line = None

    def _grab_rows(self, emit: bool = True) -> None:
        """Grab every followed channel/direction; queue rows completed since the last call
        (``emit=False``: only note them as already seen)."""
        for _attempt in range(3):
            wire = {}
            for c in self.channels:
                for d in self.directions:
                    wire[(c, d)] = self._grab.scan_frame_data_grab(
                        c, forward=(d == "forward"), shape=self._shape or self._expect
                    ).data
            shapes = {a.shape for a in wire.values()}
            if len(shapes) == 1:
                break
            # The buffer was reconfigured between two grabs (a new frame): grab again.
        else:
            return  # still changing; the next call retries
        (shape,) = shapes
        if shape[0] == 0 or shape[1] == 0:
            return
        # A row is complete when its last-acquired pixel (last column on the wire for both
        # directions) is present in every followed grab.
        done = np.logical_and.reduce([np.isfinite(a[:, -1]) for a in wire.values()])
        rows = np.flatnonzero(done)
        newest = int(rows[-1]) if rows.size else -1
        if shape != self._shape or newest < self._next_row - 1:  # a new frame (or first grab)
            self._frames = {k: np.full(shape, np.nan, np.float32) for k in wire}
            self._shape = shape
            self._next_row = 0
        if not emit:
            self._next_row = newest + 1
            return
        for k, a in wire.items():
            self._frames[k][:] = a if k[1] == "forward" else a[:, ::-1]
        for row in range(self._next_row, newest + 1):
            self._pending.append(ScanLine(row, {k: self._frames[k][row].copy() for k in wire}))
        self._next_row = max(self._next_row, newest + 1)

    def next_line(self, timeout_s: float = 5.0) -> ScanLine | None:
        """The next finished line, or None when none finished within ``timeout_s``."""
        if self._pending:
            return self._pending.popleft()
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        while not self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._wait is None:
                self._grab_rows()
                if not self._pending:
                    time.sleep(min(self.poll_interval_s, max(0.0, deadline - time.monotonic())))
                continue
            ev = self._wait.scan_wait_end_of_line(left)
            if ev.movement == "start" and not ev.timed_out:
                self._next_row = 0  # moved to the frame start: a new frame begins
                self._last_event_line = None
            if ev.timed_out or ev.movement not in _DIRECTIONS:
                continue  # moves to centre/start carry no data
            if self._last_event_line is not None and ev.line < self._last_event_line:
                self._next_row = 0  # line numbers went back: a new frame began
            self._last_event_line = ev.line
            if ev.movement == self._row_done:
                self._grab_rows()
        if not self._pending:
            # Nothing announced: recover rows that finished while no wait was pending.
            self._grab_rows()
        return self._pending.popleft() if self._pending else None
