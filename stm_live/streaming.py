"""0MQ wiring: documents out to worker processes, results back. No pickle anywhere.

::

    RunEngine ── make_publisher ──► DocumentProxy ──► worker (make_dispatcher: RemoteDispatcher
        ▲         (XPUB, HWM)        (SUB → PUB)        → LiveReconstruction, TipMonitor)
        └──────────── ResultReceiver (PULL) ◄──── PUSH ──────┘

The worker process itself (``stm-live worker``) is :mod:`stm_live.app.worker`.

* ``serializer``/``deserializer``: msgpack with numpy arrays as ext type 1 holding
  msgpack ``[dtype.str, shape, raw bytes]`` (the journal's layout, ``store.py``). Anything
  that is not such a msgpack map is refused with ``ValueError``.
* bluesky's ``Publisher`` pickles by default and PUB sockets drop silently past the
  high-water mark. ``make_publisher`` passes the serializer, raises the HWM, swaps the PUB
  for an XPUB with ``XPUB_NODROP`` (a full queue is an error we count and log, never a
  silent drop) and waits until the proxy has subscribed (a PUB drops everything sent
  before that). The journal is the backstop: a worker that sees a run it does not know,
  or a gap in ``seq_num``, replays that run from the journal (``journal=``) and then
  follows live, deduplicating by event uid.
* Results go back over PUSH→PULL, which blocks rather than drops when the receiver is
  behind (bounded by a send timeout, then counted and logged).
* CURVE (``zmq.auth``): ``generate_curve_keys(folder)`` writes a server and a client key
  pair; with ``curve_keys=folder`` the proxy's outbound side and the result link are
  authenticated and encrypted (the Publisher→proxy hop stays on loopback inside the
  acquisition process).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth
from bluesky.callbacks.zmq import ClientCurve, Proxy, Publisher, RemoteDispatcher, ServerCurve
from zmq.auth.thread import ThreadAuthenticator

from stm_live.packing import PackingError, pack, unpack
from stm_live.store import read_journal

logger = logging.getLogger(__name__)

__all__ = [
    "serializer",
    "deserializer",
    "SerializationError",
    "make_publisher",
    "DocumentProxy",
    "ResultReceiver",
    "ResultSender",
    "make_dispatcher",
    "check_loopback",
    "generate_curve_keys",
    "CurveKeys",
    "JournalCatchUp",
]

LOOPBACK = "tcp://127.0.0.1"
DOC_HWM = 100_000  # messages; one line event of 4 x 512 float32 is ~8 kB
RESULT_HWM = 10_000
SEND_TIMEOUT_MS = 10_000


# One binary form for documents on disk and on the wire (see ``packing.py``).
SerializationError = PackingError


def serializer(doc: dict) -> bytes:
    """msgpack bytes of a document (numpy arrays included)."""
    return pack(doc)


def deserializer(payload: bytes) -> dict:
    """The document in ``payload``; ``SerializationError`` for anything else (e.g. pickle)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise SerializationError(f"payload must be bytes, got {type(payload).__name__}")
    doc = unpack(payload, strict_map_key=True)
    if not isinstance(doc, dict):
        raise SerializationError(f"payload is msgpack {type(doc).__name__}, not a document (map)")
    return doc


# --------------------------------------------------------------------------- CURVE keys
@dataclass(frozen=True)
class CurveKeys:
    """Key files in one folder: ``server.key[_secret]``, ``client.key[_secret]``, and
    ``authorized/`` holding the client public keys the servers accept."""

    folder: Path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CurveKeys:
        keys = cls(Path(folder))
        for p in (keys.server_secret, keys.server_public, keys.client_secret, keys.authorized):
            if not p.exists():
                raise ValueError(f"CURVE key folder {keys.folder} lacks {p.name}; create it with generate_curve_keys()")
        return keys

    server_public = property(lambda self: self.folder / "server.key")
    server_secret = property(lambda self: self.folder / "server.key_secret")
    client_secret = property(lambda self: self.folder / "client.key_secret")
    authorized = property(lambda self: self.folder / "authorized")

    def server_curve(self):
        return ServerCurve(secret_path=self.server_secret, client_public_keys=self.authorized, allow=None)

    def client_curve(self):
        return ClientCurve(secret_path=self.client_secret, server_public_key=self.server_public)


def generate_curve_keys(folder: str | os.PathLike) -> CurveKeys:
    """Create a server and a client CURVE key pair in ``folder`` (secrets mode 0600)."""
    if not zmq.has("curve"):
        raise ValueError("this libzmq has no CURVE support")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(folder, "server")
    zmq.auth.create_certificates(folder, "client")
    (folder / "authorized").mkdir(exist_ok=True)
    shutil.copy(folder / "client.key", folder / "authorized" / "client.key")
    for secret in folder.glob("*.key_secret"):
        secret.chmod(0o600)
    return CurveKeys.load(folder)


def _as_keys(curve_keys) -> CurveKeys | None:
    if curve_keys is None or isinstance(curve_keys, CurveKeys):
        return curve_keys
    return CurveKeys.load(curve_keys)


def _client_curve_opts(sock: zmq.Socket, keys: CurveKeys) -> None:
    public, secret = zmq.auth.load_certificate(keys.client_secret)
    server_public, _ = zmq.auth.load_certificate(keys.server_public)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public


def _server_curve_opts(ctx: zmq.Context, sock: zmq.Socket, keys: CurveKeys):
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    public, secret = zmq.auth.load_certificate(keys.server_secret)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True
    return auth


def check_loopback(address: str, what: str, allow_remote: bool) -> None:
    if not allow_remote and not address.startswith(("tcp://127.0.0.1", "tcp://localhost", "ipc://", "inproc://")):
        raise ValueError(f"{what} address {address!r} is not loopback; pass allow_remote=True (and use CURVE keys)")


# --------------------------------------------------------------------------- proxy
class DocumentProxy:
    """bluesky's 0MQ proxy (SUB in, PUB out) on a thread that can be stopped.

    Sockets come from ``bluesky.callbacks.zmq.Proxy.configure_server_socket`` (so CURVE is
    configured the bluesky way) on a context whose default HWM is raised, because bound
    sockets take their HWM at bind time. ``Proxy.start`` cannot be stopped, so the
    forwarding runs in ``zmq.proxy_steerable`` with a TERMINATE control socket.
    """

    def __init__(
        self,
        in_address: str = f"{LOOPBACK}:0",
        out_address: str = f"{LOOPBACK}:0",
        *,
        curve_keys=None,
        hwm: int = DOC_HWM,
        allow_remote: bool = False,
    ):
        check_loopback(in_address, "proxy inbound", False)
        check_loopback(out_address, "proxy outbound", allow_remote)
        keys = _as_keys(curve_keys)
        self._ctx = zmq.Context()
        self._ctx.setsockopt(zmq.SNDHWM, hwm)
        self._ctx.setsockopt(zmq.RCVHWM, hwm)
        self._ctx.setsockopt(zmq.LINGER, 0)
        in_addr, out_addr = _random_port(in_address), _random_port(out_address)
        self._front, self.in_address = Proxy.configure_server_socket(self._ctx, zmq.SUB, in_addr, None, bind=True)
        self._front.setsockopt(zmq.SUBSCRIBE, b"")
        self._back, self.out_address = Proxy.configure_server_socket(
            self._ctx, zmq.PUB, out_addr, keys.server_curve() if keys else None, bind=True
        )
        self._ctl_address = f"inproc://stm-live-proxy-{uuid.uuid4().hex}"
        self._ctl = self._ctx.socket(zmq.PAIR)
        self._ctl.bind(self._ctl_address)
        self._thread = threading.Thread(target=self._run, name="zmq-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ctl = self._ctx.socket(zmq.PAIR)
        ctl.connect(self._ctl_address)
        try:
            zmq.proxy_steerable(self._front, self._back, None, ctl)
        except zmq.ZMQError as exc:
            logger.info("proxy stopped: %s", exc)
        finally:
            ctl.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self._ctx.closed:
            return
        self._ctl.send(b"TERMINATE")
        self._thread.join(timeout)
        self._ctx.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _random_port(address: str) -> str:
    """bluesky treats a tcp address without a port as 'random'; accept ':0' too."""
    return address[:-2] if address.startswith("tcp://") and address.endswith(":0") else address


# --------------------------------------------------------------------------- publisher
def make_publisher(
    address: str,
    *,
    hwm: int = DOC_HWM,
    send_timeout_ms: int = SEND_TIMEOUT_MS,
    wait_subscribed_s: float = 5.0,
    prefix: bytes = b"",
):
    """bluesky ``Publisher`` to the proxy at ``address``, safe for live frames.

    The serializer is msgpack; the PUB socket is swapped for an XPUB (same send API)
    so that (1) ``XPUB_NODROP`` makes a full queue an error instead of a silent drop and
    (2) we can wait for the proxy's subscription before the first document.
    Returns a callable ``publisher(name, doc)`` that counts and logs failed sends
    (``.failed``) instead of raising into the RunEngine; the journal has every document.
    """
    check_loopback(address if "://" in address else "tcp://" + address, "publisher", False)
    pub = Publisher(address, serializer=serializer, prefix=prefix)
    pub._socket.close(linger=0)
    sock = pub._context.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(pub.address)
    pub._socket = sock
    if wait_subscribed_s and not sock.poll(int(wait_subscribed_s * 1000), zmq.POLLIN):
        pub.close()
        raise TimeoutError(f"no 0MQ proxy subscribed at {pub.address} within {wait_subscribed_s} s")
    if wait_subscribed_s:
        sock.recv()  # the subscription message
    return SafePublisher(pub)


class SafePublisher:
    """Wraps a bluesky Publisher: a send that fails (queue full past the timeout) is
    logged and counted, never raised into the RunEngine and never silent."""

    def __init__(self, publisher):
        self.publisher = publisher
        self.sent = 0
        self.failed = 0
        self.address = publisher.address

    def __call__(self, name: str, doc: dict) -> None:
        try:
            self.publisher(name, doc)
            self.sent += 1
        except zmq.ZMQError as exc:
            self.failed += 1
            logger.error("0MQ publish of %s failed (%s); workers will catch up from the journal", name, exc)

    def close(self) -> None:
        self.publisher.close()


# --------------------------------------------------------------------------- results
class ResultSender:
    """Thread-safe PUSH of result documents to a ``ResultReceiver``."""

    def __init__(
        self,
        address: str,
        *,
        source: str,
        curve_keys=None,
        hwm: int = RESULT_HWM,
        send_timeout_ms: int = SEND_TIMEOUT_MS,
        allow_remote: bool = False,
    ):
        check_loopback(address, "results", allow_remote)
        keys = _as_keys(curve_keys)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self._sock.setsockopt(zmq.LINGER, 5000)
        if keys:
            _client_curve_opts(self._sock, keys)
        self._sock.connect(address)
        self._lock = threading.Lock()  # 0MQ sockets are not thread-safe; emitters are
        self.source = source.encode()
        self.sent = 0
        self.failed = 0

    def send(self, name: str, doc: dict, *, source: str | None = None) -> bool:
        payload = serializer(doc)
        src = source.encode() if source else self.source
        with self._lock:
            try:
                self._sock.send_multipart([src, name.encode(), payload])
                self.sent += 1
                return True
            except zmq.ZMQError as exc:
                self.failed += 1
                logger.error("result %s not delivered (%s)", name, exc)
                return False

    def __call__(self, name: str, doc: dict) -> None:
        self.send(name, doc)

    def close(self, linger_ms: int = 5000) -> None:
        """Close; results still queued get ``linger_ms`` to reach the receiver."""
        with self._lock:
            self._sock.close(linger=linger_ms)
        self._ctx.term()


class ResultReceiver:
    """Acquisition side: bind a PULL socket, receive workers' result documents.

    Calls each subscriber ``cb(name, doc)`` on the receiving thread (add ``source=``
    to ``subscribe`` to filter, e.g. "live" or "tip"). Keeps ``latest`` (newest
    reconstruction event data) and ``finals`` (scan uid -> final reconstruction).
    """

    def __init__(
        self, address: str = f"{LOOPBACK}:0", *, curve_keys=None, hwm: int = RESULT_HWM, allow_remote: bool = False
    ):
        check_loopback(address, "result receiver", allow_remote)
        keys = _as_keys(curve_keys)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._auth = _server_curve_opts(self._ctx, self._sock, keys) if keys else None
        if address.startswith("tcp://") and address.endswith(":0"):
            port = self._sock.bind_to_random_port(address[:-2])
            self.address = f"{address[:-2]}:{port}"
        else:
            self._sock.bind(address)
            self.address = address
        self._subscribers: list[tuple[Callable, str | None]] = []
        self._cond = threading.Condition()
        self._parents: dict[str, str] = {}  # derived start uid -> scan uid
        self._descriptors: dict[str, str] = {}  # derived descriptor uid -> derived start uid
        self.latest: dict | None = None
        self.finals: dict[str, np.ndarray] = {}
        self.ready: set[str] = set()  # worker ids that said hello
        self.received = 0
        self.rejected = 0
        self.documents: deque[tuple[str, str, dict]] = deque(maxlen=10_000)  # (source, name, doc)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="result-receiver", daemon=True)
        self._thread.start()

    def subscribe(self, callback: Callable[[str, dict], Any], source: str | None = None) -> None:
        self._subscribers.append((callback, source))

    def _run(self) -> None:
        while not self._closing:
            try:
                if not self._sock.poll(200):
                    continue
                parts = self._sock.recv_multipart()
            except zmq.ZMQError:
                return
            try:
                if len(parts) != 3:
                    raise SerializationError(f"expected 3 frames (source, name, doc), got {len(parts)}")
                source, name, doc = parts[0].decode(), parts[1].decode(), deserializer(parts[2])
            except (SerializationError, UnicodeDecodeError) as exc:
                self.rejected += 1
                logger.error("result receiver refused a message: %s", exc)
                continue
            self._handle(source, name, doc)

    def _handle(self, source: str, name: str, doc: dict) -> None:
        with self._cond:
            self.received += 1
            self.documents.append((source, name, doc))
            if name == "hello":  # control message, not a document: not forwarded
                self.ready.add(doc.get("worker", "?"))
                self._cond.notify_all()
                return
            elif name == "start" and "parent_uid" in doc:
                self._parents[doc["uid"]] = doc["parent_uid"]
            elif name == "descriptor":
                self._descriptors[doc["uid"]] = doc["run_start"]
            elif name == "event" and "reconstruction" in doc.get("data", {}):
                parent = self._parents.get(self._descriptors.get(doc["descriptor"], ""), "")
                data = doc["data"]
                self.latest = {
                    "run": parent,
                    "image": data["reconstruction"],
                    "lines": list(data["lines"]),
                    "lines_done": data["lines_done"],
                    "final": data["final"],
                    "time": time.time(),
                }
                if data["final"]:
                    self.finals[parent] = data["reconstruction"]
                    while len(self.finals) > 16:
                        self.finals.pop(next(iter(self.finals)))
            self._cond.notify_all()
        for callback, want in list(self._subscribers):
            if want is None or want == source:
                try:
                    callback(name, doc)
                except Exception as exc:
                    logger.error("result subscriber %r failed on %s: %s", callback, name, exc)

    def history(self) -> list[tuple[str, str, dict]]:
        """A copy of the last 10 000 messages received, as (source, name, doc)."""
        with self._cond:
            return list(self.documents)

    def wait_ready(self, n: int = 1, timeout: float = 30.0) -> bool:
        """Wait until ``n`` workers have said hello."""
        return self._wait(lambda: len(self.ready) >= n, timeout)

    def wait_final(self, scan_uid: str, timeout: float = 30.0) -> np.ndarray | None:
        """The final reconstruction of scan ``scan_uid``, or None after ``timeout``."""
        ok = self._wait(lambda: scan_uid in self.finals, timeout)
        return self.finals.get(scan_uid) if ok else None

    def wait_for(self, predicate: Callable[[ResultReceiver], bool], timeout: float = 30.0) -> bool:
        return self._wait(lambda: predicate(self), timeout)

    def _wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def close(self) -> None:
        self._closing = True
        self._thread.join(5)
        self._sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- worker
class JournalCatchUp:
    """Feed documents to callbacks, filling gaps from the run's journal.

    A worker that starts (or restarts) mid-run sees documents of a run it never saw
    start; one whose link lost messages sees a jump in ``seq_num``. Either way it reads
    the run's journal (``store.read_journal``), which holds everything up to the live
    position because the RunEngine journals each document before emitting the next,
    replays it, then follows live. Documents are deduplicated by uid.
    """

    _RUN_DOCS = ("start", "descriptor", "event", "event_page", "stop")

    def __init__(self, callbacks: Iterable[Callable[[str, dict], Any]], journal_dir: str | os.PathLike | None):
        self.callbacks = list(callbacks)
        self.journal_dir = Path(journal_dir) / "journal" if journal_dir is not None else None
        self._runs: dict[str, dict] = {}  # start uid -> {"seen": set of uids, "max_seq": {descriptor: int}}
        self._descriptors: dict[str, str] = {}  # descriptor uid -> start uid
        self._finished: deque[str] = deque(maxlen=64)
        self.replayed = 0  # documents read from journals
        self.orphans = 0  # documents dropped: unknown run and no journal (logged)

    def __call__(self, name: str, doc: dict) -> None:
        if name not in self._RUN_DOCS:
            self._dispatch(name, doc)
            return
        run = self._run_of(name, doc)
        if run in self._finished:
            return
        if run is None or run not in self._runs and name != "start":
            if not self._catch_up(name, doc):
                self.orphans += 1
                logger.warning("%s document of a run this worker never saw, and no journal to catch up from", name)
                return
        elif name == "event" and self.journal_dir is not None:
            state = self._runs[run]
            last = state["max_seq"].get(doc["descriptor"], 0)
            if int(doc.get("seq_num", 0)) > last + 1:
                logger.warning("seq_num jumped %d -> %d; catching up from the journal", last, doc["seq_num"])
                self._replay(self.journal_dir / f"{run}.journal")
                # do not re-read the journal for every later event if it lacked the gap
                state["max_seq"][doc["descriptor"]] = max(
                    state["max_seq"].get(doc["descriptor"], 0), int(doc["seq_num"]) - 1
                )
        self._feed(name, doc)

    def _run_of(self, name: str, doc: dict) -> str | None:
        if name == "start":
            return doc["uid"]
        if name in ("descriptor", "stop"):
            return doc.get("run_start")
        return self._descriptors.get(doc.get("descriptor"))

    def _feed(self, name: str, doc: dict) -> None:
        if name == "start":
            self._runs.setdefault(doc["uid"], {"seen": set(), "max_seq": {}})
        elif name == "descriptor":
            self._descriptors[doc["uid"]] = doc["run_start"]
        run = self._run_of(name, doc)
        state = self._runs.get(run)
        if state is None:
            return
        if doc.get("uid") in state["seen"]:
            return
        state["seen"].add(doc.get("uid"))
        if name == "event":
            d = doc["descriptor"]
            state["max_seq"][d] = max(state["max_seq"].get(d, 0), int(doc.get("seq_num", 0)))
        self._dispatch(name, doc)
        if name == "stop":
            # Keep the finished run's uid and descriptors (bounded) so late duplicates of
            # its documents are recognised and dropped, not taken for a new run to catch up.
            del self._runs[run]
            self._finished.append(run)
            while len(self._descriptors) > 1024:
                self._descriptors.pop(next(iter(self._descriptors)))

    def _dispatch(self, name: str, doc: dict) -> None:
        for callback in self.callbacks:
            try:
                callback(name, doc)
            except Exception as exc:
                logger.error("worker callback %r failed on %s: %s", callback, name, exc)

    def _catch_up(self, name: str, doc: dict) -> bool:
        if self.journal_dir is None or not self.journal_dir.is_dir():
            return False
        path = self._find_journal(name, doc)
        if path is None:
            return False
        self._replay(path)
        return True

    def _find_journal(self, name: str, doc: dict) -> Path | None:
        if name in ("stop", "descriptor"):
            path = self.journal_dir / f"{doc.get('run_start')}.journal"
            return path if path.is_file() else None
        descriptor = doc.get("descriptor")
        # Newest first: the run being scanned is almost always the newest journal.
        paths = sorted(self.journal_dir.glob("*.journal"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in paths[:16]:
            if any(n == "descriptor" and d.get("uid") == descriptor for n, d in read_journal(path)):
                return path
        return None

    def _replay(self, path: Path) -> None:
        if not path.is_file():
            logger.error("journal %s not found; cannot fill the gap", path)
            return
        docs = read_journal(path)
        logger.info("catching up from journal %s (%d documents)", path.name, len(docs))
        self.replayed += len(docs)
        for n, d in docs:
            self._feed(n, d)


def make_dispatcher(address: str, *, curve_keys=None, hwm: int = DOC_HWM):
    """A ``RemoteDispatcher`` (msgpack) whose SUB gets a raised RCVHWM, that can be stopped
    from another thread or a signal, and that calls ``on_ready`` once subscribed.
    ``curve_keys`` (folder or CurveKeys): authenticate and encrypt the link."""
    keys = _as_keys(curve_keys)

    class Dispatcher(RemoteDispatcher):
        on_ready: Callable[[], Any] | None = None

        async def _poll(self):
            # RemoteDispatcher connects before options can be set: reconnect with the HWM.
            self._socket.setsockopt(zmq.RCVHWM, hwm)
            self._socket.disconnect(self.address)
            self._socket.connect(self.address)
            if self.on_ready is not None:
                self.loop.call_later(0.3, self.on_ready)  # let the subscription reach the proxy
            await super()._poll()

        def request_stop(self):
            if self._task is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self._task.cancel)

    return Dispatcher(
        address,
        deserializer=deserializer,
        curve_config=keys.client_curve() if keys else None,
        loop=asyncio.new_event_loop(),
    )
