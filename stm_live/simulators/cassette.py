"""Session recordings (``.nrec``): the file format, and answering requests from one.

``stm-live sim record`` (:mod:`stm_live.simulators.record`) writes what crossed a link
between a client and a controller; ``stm-live sim serve --cassette`` answers from it
(:class:`Cassette`, the simulated server's hook); ``stm-live sim inspect`` summarises and
redacts it; :func:`replay_test` turns it into a regression test.

File layout (big-endian; no pickle)::

    file header  b"NREC" | u16 format version (1) | u16 flags (0)            8 bytes
    record       u32 payload length | u32 crc32(payload) | payload           (the journal's framing)
    payload      msgpack array [kind, meta, *blobs]: kind str, meta map, blobs bin or nil

Record kinds (``t``: seconds since the recording started; ``conn``: connection, 0-based in
accept order):

``session``  first record. meta: format, started (Unix time), recorder, upstreams
             ("host:port" list), redacted (field names, only in a redacted copy)
``open``     a client connected. meta: conn, upstream (index into upstreams), t
``pair``     one request and its reply. meta: conn, t, name, reply_s (request sent to the
             controller -> whole reply read back; nil without a reply). blobs: the request
             and the reply, each a whole message (40-byte header + body) exactly as it
             crossed; the reply is nil when none was asked for or none came (link lost),
             the request when the controller sent a reply nobody asked for
``release``  the controller's Util.VersionGet reply, when a client asked. meta: conn, t,
             product, version, host_release, rt_release
``close``    a connection ended. meta: conn, t, by (client | upstream | fault | proxy), why
``raw``      bytes that are not a Nanonis message, forwarded as they were. meta: conn, t,
             direction (request | reply), why; blobs: the bytes

Records are appended as the link carries them, each written to the file within
milliseconds, so a crash loses at most the record being written: the reader drops a cut-off
last record with one warning. Damage anywhere else is an error naming the record.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import struct
import threading
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from stm_live.devices import protocol as P
from stm_live.simulators.server import start_server_thread

__all__ = [
    "CassetteError",
    "Cassette",
    "Pair",
    "Recording",
    "RecordingWriter",
    "REDACTED_FIELDS",
    "read_recording",
    "redact",
    "replay_test",
    "FORMAT_VERSION",
    "MAGIC",
]

log = logging.getLogger(__name__)

MAGIC = b"NREC"
FORMAT_VERSION = 1
_FILE_HEADER = struct.Struct(">4sHH")
_RECORD = struct.Struct(">II")  # as store.encode_record: length, crc32
_BIN32 = struct.Struct(">BI")  # msgpack bin 32 header: the blob is written as it is, never copied
_MAX_RECORD = 1 << 30  # a longer length field is damage, not a message
# A payload starts with a msgpack fixarray of 2-15 items, then the kind as a short fixstr.
_PAYLOAD_START = re.compile(rb"[\x92-\x9f][\xa1-\xb0][a-z]")
_SIZE = slice(32, 36)  # body size in both header layouts (request and reply)


class CassetteError(ValueError):
    """A file that is not a readable session recording (the message names file and place)."""


@dataclass(frozen=True)
class Pair:
    """One request and its reply, each a whole message as it crossed the link."""

    conn: int
    t: float
    name: str
    request: bytes | None  # None: a reply nobody asked for
    reply: bytes | None  # None: no reply asked for, or none came
    reply_s: float | None = None

    @property
    def wants_reply(self) -> bool:
        return self.request is not None and P.parse_request_header(self.request[: P.HEADER_SIZE])[2]


@dataclass
class Recording:
    """A read ``.nrec`` file; ``records`` keeps every record, in order, as (kind, meta, blobs)."""

    path: Path
    session: dict
    records: list[tuple[str, dict, list]]
    warning: str | None = None  # the cut-off last record that was dropped
    pairs: list[Pair] = field(default_factory=list)
    connections: dict[int, dict] = field(default_factory=dict)  # conn -> open meta + close meta
    release: dict | None = None

    def __post_init__(self):
        for kind, meta, blobs in self.records:
            if kind == "pair":
                self.pairs.append(Pair(meta["conn"], meta["t"], meta["name"], blobs[0], blobs[1], meta.get("reply_s")))
            elif kind == "open":
                self.connections[meta["conn"]] = dict(meta)
            elif kind == "close":
                self.connections.setdefault(meta["conn"], {}).update(
                    closed=meta["t"], by=meta["by"], why=meta.get("why", "")
                )
            elif kind == "release" and self.release is None:
                self.release = meta

    @property
    def nanonis_release(self) -> int | None:
        """The protocol release the recorded controller speaks (``protocol.release_profile``)."""
        return None if self.release is None else P.release_profile(self.release["host_release"])


# --------------------------------------------------------------------------- writing


def _payload(kind: str, meta: dict, blobs) -> list:
    """The payload as parts: msgpack of [kind, meta, *blobs] without copying the blobs (each
    bytes, or a list of buffers whose concatenation it is)."""
    parts = [bytes([0x92 + len(blobs)]), msgpack.packb(kind), msgpack.packb(meta, use_bin_type=True)]
    for blob in blobs:
        if blob is None:
            parts.append(b"\xc0")
        else:
            chunks = blob if isinstance(blob, list) else [blob]
            parts += [_BIN32.pack(0xC6, sum(map(len, chunks))), *chunks]
    return parts


class RecordingWriter:
    """Appends records to a new ``.nrec`` file on a thread of its own (the crc and the write
    of a 1 MiB reply take a millisecond, which the link must not wait for).

    ``path`` must not exist: a recording is never overwritten. The header and ``session``
    are on disk when the constructor returns. ``append`` queues one record; ``sync`` waits
    until the file holds every record queued before it. A failed write (disk full) is
    logged once and kept in ``error``; later records are dropped, the link goes on.
    """

    def __init__(self, path: str | os.PathLike, session: dict):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "xb", buffering=0)  # unbuffered: each record reaches the OS whole
        except FileExistsError:
            raise CassetteError(f"{self.path}: exists; a recording is never overwritten, choose another name") from None
        self.records = 0
        self.error: OSError | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._write([_FILE_HEADER.pack(MAGIC, FORMAT_VERSION, 0)])
        self._write_record(_payload("session", {"format": FORMAT_VERSION, **session}, ()))
        self._thread = threading.Thread(target=self._run, name=f"nrec-writer-{self.path.name}", daemon=True)
        self._thread.start()

    def append(self, kind: str, meta: dict, *blobs) -> None:
        """Queue a record; a blob is bytes, a list of buffers (written as one), or None."""
        self._queue.put(_payload(kind, meta, blobs))

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until every record appended so far is written; False on timeout."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._fh.closed:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._fh.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            elif self.error is None:
                try:
                    self._write_record(item)
                except OSError as exc:
                    self.error = exc
                    log.error("%s: recording stopped at record %d: %s", self.path, self.records + 1, exc)

    def _write_record(self, parts: list) -> None:
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)  # releases the GIL on large parts
        self._write([_RECORD.pack(sum(map(len, parts)), crc), *parts])
        self.records += 1

    def _write(self, parts: list) -> None:
        fd = self._fh.fileno()
        done, total = os.writev(fd, parts), sum(map(len, parts))
        if done < total:  # a partial write: the rest, in order
            rest = memoryview(b"".join(parts))[done:]
            while rest:
                rest = rest[os.write(fd, rest) :]

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- reading


def read_recording(path: str | os.PathLike) -> Recording:
    """Every intact record of ``path``. A cut-off last record (the recorder died while
    writing it) is dropped with one logged warning, also kept in ``Recording.warning``;
    anything else that is not intact raises :class:`CassetteError`."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise CassetteError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        head = fh.read(_FILE_HEADER.size)
        if len(head) < _FILE_HEADER.size or head[:4] != MAGIC:
            raise CassetteError(f"{path}: not a stm-live session recording (starts {head[:8]!r}, not {MAGIC!r})")
        _, version, _ = _FILE_HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise CassetteError(
                f"{path}: format version {version}; this stm-live reads version "
                f"{FORMAT_VERSION} (a newer stm-live wrote it)"
            )
        records, warning = _read_records(fh, path)
    if warning:
        log.warning("%s", warning)
    if not records:
        return Recording(path, {}, [], warning)
    if records[0][0] != "session":
        raise CassetteError(f"{path}: the first record is {records[0][0]!r}, not the session record")
    try:
        return Recording(path, records[0][1], records[1:], warning)
    except (KeyError, IndexError, TypeError) as exc:  # intact bytes, wrong content: another writer
        raise CassetteError(f"{path}: a record lacks a field the format requires ({exc!r})") from None


def _read_records(fh, path: Path) -> tuple[list, str | None]:
    records = []
    pos = _FILE_HEADER.size
    size = os.fstat(fh.fileno()).st_size
    while pos < size:
        head = fh.read(_RECORD.size)
        defect = None
        if len(head) < _RECORD.size:
            defect = f"a record header of {len(head)} of {_RECORD.size} bytes"
        else:
            length, crc = _RECORD.unpack(head)
            end = pos + _RECORD.size + length
            if not length:
                defect = "a record of length 0"
            elif length > _MAX_RECORD or end > size:
                defect = f"a record of {size - pos - _RECORD.size} of its {length} bytes"
            else:
                payload = fh.read(length)
                if zlib.crc32(payload) != crc:
                    defect = "a record whose checksum fails"
        if defect:
            # a crash leaves only a torn last record (and reserved space) behind it; a recorder
            # still writing leaves one at ``size`` too, with whole records after it by the time
            # this looks: only the bytes there were when reading began count
            if _intact_record_in(fh, pos + 1, size):
                raise CassetteError(
                    f"{path}: record {len(records)} at byte {pos} is damaged ({defect}), and intact records follow it"
                )
            return records, (
                f"{path}: ends in {defect} at byte {pos} (the recorder stopped while writing "
                f"it); dropped it, kept {len(records)} records"
            )
        try:
            kind, meta, *blobs = msgpack.unpackb(payload, raw=False)
            if not isinstance(kind, str) or not isinstance(meta, dict):
                raise TypeError("not [kind, meta, ...]")
        except Exception as exc:
            raise CassetteError(
                f"{path}: record {len(records)} at byte {pos} is not a session record ({type(exc).__name__}: {exc})"
            ) from None
        records.append((kind, meta, blobs))
        pos = end
    return records, None


def _intact_record_in(fh, start: int, end: int) -> bool:
    """Whether an intact record (its checksum right) starts anywhere in ``[start, end)``: then
    a length field that runs past the end is damage, not a record cut off by a crash."""
    fh.seek(start)
    rest = fh.read(max(end - start, 0))
    for m in _PAYLOAD_START.finditer(rest):
        at = m.start() - _RECORD.size
        if at < 0:
            continue
        length, crc = _RECORD.unpack_from(rest, at)
        if length <= len(rest) - m.start() and zlib.crc32(rest[m.start() : m.start() + length]) == crc:
            return True
    return False


# --------------------------------------------------------------------------- redaction

# String fields a lab may not want to share: session and file paths (Util.SessionPathGet/Set,
# Scan.WaitEndOfScan, settings, layouts, hysteresis files), scan comments (Scan.PropsGet/Set)
# and paths of the lab's own VIs (FolMe/Pattern PSProps).
REDACTED_FIELDS = frozenset({"path", "comment", "external_vi"})
_REDACTABLE = {
    name
    for name, layouts in P.LAYOUTS.items()
    if any(f.name in REDACTED_FIELDS for c in layouts for f in c.request + c.response)
}


def _blanked(name: str, message: bytes | None, side: str) -> tuple[bytes | None, list[str]]:
    """``message`` with its redacted string fields emptied, re-encoded in the layout that
    reads it exactly; (message, names of the fields emptied)."""
    if message is None or name not in _REDACTABLE:
        return message, []
    body = message[P.HEADER_SIZE :]
    layouts = P.LAYOUTS[name] + ((P.PROPS_GET_EXTENDED,) if name == "Scan.PropsGet" else ())
    for cmd in layouts:
        fields = getattr(cmd, side)
        # a request may leave out its trailing optional fields (Scan.PropsSet autopaste)
        for candidate in dict.fromkeys([fields, tuple(f for f in fields if f.name not in cmd.request_optional)]):
            try:
                values, end = P.decode_fields(candidate, body)
            except P.ProtocolError:
                continue
            if (end != len(body)) if side == "request" else not P.is_error_section(body, end):
                continue
            hit = [k for k in values if k in REDACTED_FIELDS and values[k]]
            if not hit:
                return message, []
            values.update(dict.fromkeys(hit, ""))
            new = P.encode_body(candidate, values) + body[end:]
            return message[: _SIZE.start] + struct.pack(">i", len(new)) + message[_SIZE.stop : P.HEADER_SIZE] + new, hit
    return message, []


def redact(recording: Recording, out: str | os.PathLike) -> Counter:
    """Write a copy of ``recording`` to ``out`` with the :data:`REDACTED_FIELDS` of every
    request and reply emptied; returns how many of each were emptied."""
    dropped: Counter = Counter()
    session = {k: v for k, v in recording.session.items() if k != "format"}
    session["redacted"] = sorted(REDACTED_FIELDS)
    with RecordingWriter(out, session) as writer:
        for kind, meta, blobs in recording.records:
            if kind == "pair":
                request, hit = _blanked(meta["name"], blobs[0], "request")
                reply, hit_reply = _blanked(meta["name"], blobs[1], "response")
                dropped.update(hit + hit_reply)
                blobs = [request, reply]
            writer.append(kind, meta, *blobs)
    return dropped


# --------------------------------------------------------------------------- answering


class Cassette:
    """Answers requests from a recording: the simulated server's hook
    (``SimServer(cassette=...)``), asked before its controller.

    A request gets, in this order: the first unused recorded reply to the same request
    bytes; else the last reply to them (a client that polls longer than it did while
    recorded); else the first unused reply of that command; else its last one. A command the
    recording never saw gets a Nanonis-style error reply, or with ``fallback`` the simulated
    controller's answer. ``counts`` says how each was answered (exact, repeated, command,
    simulator, missed); ``misses`` lists the unanswered command names.
    """

    HOW = ("exact", "repeated", "command", "simulator", "missed")

    def __init__(self, recording: Recording | str | os.PathLike, *, fallback: bool = False, release: int | None = None):
        self.recording = recording if isinstance(recording, Recording) else read_recording(recording)
        self.fallback = fallback
        self.release = release or self.recording.nanonis_release or P.DEFAULT_RELEASE
        # answerable pairs: a reply came, or none was asked for (answered with nothing)
        self._replies: list[bytes] = []
        self._by_request: dict[bytes, list[int]] = defaultdict(list)
        self._by_name: dict[str, list[int]] = defaultdict(list)
        for pair in self.recording.pairs:
            if pair.request is None or (pair.reply is None and pair.wants_reply):
                continue
            self._by_request[pair.request].append(len(self._replies))
            self._by_name[pair.name].append(len(self._replies))
            self._replies.append(pair.reply or b"")
        self._used = bytearray(len(self._replies))
        self._cursor: dict[Any, int] = defaultdict(int)  # per key: index of the first maybe-unused entry
        self.counts: Counter = Counter(dict.fromkeys(self.HOW, 0))
        self.misses: list[str] = []

    def __len__(self) -> int:
        return len(self._replies)

    def describe(self) -> str:
        rest = "the simulator answers the rest" if self.fallback else "nothing else"
        return f"cassette {self.recording.path.name}: {len(self)} replies to {len(self._by_name)} commands, {rest}"

    def _first_unused(self, key, index: list[int]) -> int | None:
        k = self._cursor[key]
        while k < len(index) and self._used[index[k]]:
            k += 1
        self._cursor[key] = k
        return index[k] if k < len(index) else None

    def answer(self, name: str, request: bytes) -> bytes | None:
        """The reply to ``request`` (a whole message), b"" for one that asks for none, or
        None for the simulator to answer."""
        same, mine = self._by_request.get(request), self._by_name.get(name)
        how, k = "missed", None
        if same:
            k = self._first_unused(request, same)
            how = "exact" if k is not None else "repeated"
            k = same[-1] if k is None else k
        elif mine:
            k = self._first_unused(name, mine)
            how = "command" if k is not None else "repeated"
            k = mine[-1] if k is None else k
        elif self.fallback:
            how = "simulator"
        self.counts[how] += 1
        if k is not None:
            self._used[k] = 1
            return self._replies[k]
        if how == "simulator":
            return None
        self.misses.append(name)
        log.warning("cassette %s: no recorded reply for %s", self.recording.path.name, name)
        try:
            command = P.command_for(name, self.release)
        except P.UnknownCommandError:
            command = P.Command(name)
        return P.pack_response(
            name,
            None,
            command=command,
            error=f"{name}: not in the recording {self.recording.path.name} (stm-live cassette)",
        )


@dataclass
class Replay:
    """What :func:`replay_test` saw: the client's return value and the cassette's counts."""

    result: Any
    counts: Counter
    misses: list[str]


def replay_test(
    path: str | os.PathLike, client: Callable[[str, int], Any], *, exact: bool = True, **server_options
) -> Replay:
    """Serve the recording ``path`` on 127.0.0.1 and run ``client(host, port)`` against it
    (a function driving any client library): a shared recording as a regression test.

    AssertionError unless every request was answered from the recording: with ``exact``
    (default) each by a recorded reply to the same bytes, as when the client replays the
    recorded session; otherwise by a reply of the same command. ``server_options`` go to
    ``start_server_thread`` (``faults=``, for one)."""
    cassette = Cassette(path)
    server_options.setdefault("nanonis_release", cassette.release)
    with start_server_thread(cassette=cassette, **server_options) as srv:
        result = client(srv.host, srv.port)
    c = cassette.counts
    wrong = c["missed"] + (c["repeated"] + c["command"] if exact else 0)
    if wrong:
        asked = sum(c.values())
        raise AssertionError(
            f"{Path(path).name}: {wrong} of {asked} requests not answered {'exactly ' if exact else ''}from the "
            f"recording ({', '.join(f'{k} {v}' for k, v in c.items() if v)}; not recorded: "
            f"{', '.join(sorted(set(cassette.misses))) or 'none'})"
        )
    return Replay(result, c, cassette.misses)
