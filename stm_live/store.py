"""Durable per-run journal and tiled ingestion.

The journal is the ground truth: every Bluesky document of a run is appended to
``data_dir/journal/<start uid>.journal`` and fsync'ed inside the RunEngine callback, i.e.
before the RunEngine asks the controller for the next line. A ``kill -9`` therefore loses
at most the record being written, which :func:`read_journal` drops (it keeps the good
prefix). tiled is a *derived* copy, ingested from the journal off the RunEngine loop and
re-ingestable after a crash.

Record layout (no pickle anywhere)::

    u32 big-endian payload length | u32 big-endian crc32(payload) | payload

``payload`` is msgpack of ``[name, doc]``; numpy arrays are msgpack ext type 1 whose data
is msgpack of ``[dtype.str, shape, raw bytes]`` (C order).
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from stm_live.packing import PackingError, pack, unpack

logger = logging.getLogger(__name__)

__all__ = [
    "Journal", "JournalWriter", "JournalError", "RunData", "read_journal", "run_data",
    "TiledIngestor", "open_tiled", "ingest_journal", "read_run_from_tiled", "journals_to_ingest",
    "find_journal", "runs_list", "runs_show", "runs_export",
]

_HEADER = struct.Struct(">II")
# A record larger than this is certainly a corrupt length field, not a document.
_MAX_RECORD = 1 << 30


class JournalError(ValueError):
    """A journal file or run that cannot be read or found."""


def encode_record(name: str, doc: dict) -> bytes:
    """One journal record (header + payload) for document ``(name, doc)``."""
    payload = pack([name, doc])
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


# --------------------------------------------------------------------------- writing
class Journal:
    """Append-only journal file of one run; every append is flushed and fsync'ed.

    Parameters
    ----------
    path : Path
        The file; created (with parents) if missing, appended to otherwise.
    fsync : bool
        Durable appends (default). Off only for throw-away benchmarks.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered: one write() per record, then fsync — no Python-side buffer to lose
        self._fh = open(self.path, "ab", buffering=0)
        self._fsync = fsync
        self.records = 0

    def append(self, name: str, doc: dict) -> None:
        record = encode_record(name, doc)
        view = memoryview(record)
        while view:  # write() on a raw file may be partial
            n = self._fh.write(view)
            view = view[n:]
        if self._fsync:
            os.fdatasync(self._fh.fileno()) if hasattr(os, "fdatasync") else os.fsync(
                self._fh.fileno())
        self.records += 1

    def close(self) -> None:
        if not self._fh.closed:
            if self._fsync:
                os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JournalWriter:
    """RunEngine callback: journal every document of every run, durably.

    ``RE.subscribe(JournalWriter(data_dir))``. Runs the append on the RunEngine's thread
    on purpose: the fsync must finish before the next line is requested (≈ 0.1–2 ms on a
    local disk). ``on_stop(path)`` callbacks are called after a run's journal is closed
    (used to hand the journal to tiled ingestion on another thread).
    """

    def __init__(self, data_dir: str | os.PathLike, *, fsync: bool = True,
                 on_stop: Iterable = ()):
        self.directory = Path(data_dir) / "journal"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._runs: dict[str, Journal] = {}          # start uid -> journal
        self._descriptors: dict[str, str] = {}       # descriptor uid -> start uid
        self.on_stop = list(on_stop)
        self.last_path: Path | None = None

    def path_for(self, start_uid: str) -> Path:
        return self.directory / f"{start_uid}.journal"

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            journal = Journal(self.path_for(doc["uid"]), fsync=self._fsync)
            self._runs[doc["uid"]] = journal
            self.last_path = journal.path
            journal.append(name, doc)
            return
        if name == "descriptor":
            self._descriptors[doc["uid"]] = doc["run_start"]
            run = doc["run_start"]
        elif name in ("event", "event_page"):
            run = self._descriptors.get(doc["descriptor"])
        elif name in ("stop", "resource"):
            run = doc.get("run_start")
        elif name in ("datum", "datum_page", "stream_resource", "stream_datum"):
            run = doc.get("run_start") or next(iter(self._runs), None)
        else:
            run = None
        journal = self._runs.get(run) if run else None
        if journal is None:
            # Never drop silently: a document we cannot route is a bug somewhere upstream.
            raise JournalError(f"{name} document does not belong to an open run")
        journal.append(name, doc)
        if name == "stop":
            journal.close()
            del self._runs[run]
            self._descriptors = {k: v for k, v in self._descriptors.items() if v != run}
            for callback in self.on_stop:
                callback(journal.path)

    def close(self) -> None:
        for journal in self._runs.values():
            journal.close()
        self._runs.clear()


# --------------------------------------------------------------------------- reading
def read_journal(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """All intact documents of a journal, in order.

    A truncated or corrupt final record (the process died mid-write) is dropped with a
    warning; everything before it is returned. Corruption *followed* by more data is not
    a crash signature and raises :class:`JournalError`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc}") from exc
    docs: list[tuple[str, dict]] = []
    pos = 0
    while pos < len(data):
        bad = None
        if len(data) - pos < _HEADER.size:
            bad = "truncated record header"
        else:
            length, crc = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if length > _MAX_RECORD or end > len(data):
                bad = "truncated record"
            else:
                payload = data[pos + _HEADER.size:end]
                if zlib.crc32(payload) != crc:
                    bad = "checksum mismatch"
        if bad:
            # A crash can only tear the last record; anything else is real corruption.
            if bad == "checksum mismatch" and end < len(data):
                raise JournalError(f"{path}: {bad} in record {len(docs)} at byte {pos}")
            logger.warning("%s: %s at byte %d; keeping %d intact documents",
                           path, bad, pos, len(docs))
            break
        try:
            name, doc = unpack(payload)
        except PackingError as exc:
            raise JournalError(f"{path}: record {len(docs)} at byte {pos}: {exc}") from exc
        docs.append((name, doc))
        pos = end
    return docs


@dataclass
class RunData:
    """One run's frame assembled from its documents (interfaces.md layout)."""

    start: dict
    stop: dict | None
    images: dict[str, np.ndarray] = field(default_factory=dict)  # data key -> (lines, pixels)
    lines_read: list[int] = field(default_factory=list)          # line indexes, in order
    events: int = 0

    @property
    def uid(self) -> str:
        return self.start["uid"]

    @property
    def exit_status(self) -> str:
        return self.stop["exit_status"] if self.stop else "incomplete"


def run_data(docs: list[tuple[str, dict]]) -> RunData:
    """Assemble frames from one run's documents; a re-sent line replaces the earlier one."""
    if not docs or docs[0][0] != "start":
        raise JournalError("journal does not begin with a start document")
    start = docs[0][1]
    meta = start.get("stm_live") or {}
    lines, pixels = int(meta.get("lines", 0)), int(meta.get("pixels", 0))
    line_key = meta.get("line_key", "stm_line_index")
    keys = [k for ch in meta.get("channels", []) for k in ch["keys"].values()]
    result = RunData(start=start, stop=None)
    for key in keys:
        result.images[key] = np.full((lines, pixels), np.nan, dtype=np.float32)
    primary = set()
    for name, doc in docs[1:]:
        if name == "descriptor" and doc.get("name") == "primary":
            primary.add(doc["uid"])
        elif name == "event" and doc["descriptor"] in primary:
            data = doc["data"]
            if line_key not in data:
                continue
            row = int(data[line_key])
            result.events += 1
            result.lines_read.append(row)
            for key in keys:
                if key in data and 0 <= row < lines:
                    result.images[key][row] = np.asarray(data[key], dtype=np.float32)
        elif name == "stop":
            result.stop = doc
    return result


# --------------------------------------------------------------------------- tiled
def open_tiled(data_dir: str | os.PathLike | None = None, tiled_uri: str | None = None):
    """A writable tiled client: ``tiled_uri`` if given, else an embedded server.

    Returns ``(client, server)``; ``server`` is None for an external URI, otherwise the
    :class:`tiled.server.SimpleTiledServer` (stored in ``data_dir/tiled``, loopback only)
    that the caller closes.
    """
    from tiled.client import from_uri

    if tiled_uri:
        return from_uri(tiled_uri), None
    if data_dir is None:
        raise ValueError("open_tiled needs data_dir or tiled_uri")
    from tiled.server import SimpleTiledServer

    server = SimpleTiledServer(directory=Path(data_dir) / "tiled")
    return from_uri(server.uri), server


def _jsonable(obj: Any) -> Any:
    """Plain JSON types for tiled metadata (event_model.sanitize_doc, plus tuples)."""
    from event_model import sanitize_doc

    return sanitize_doc(obj)


def ingest_journal(client, path: str | os.PathLike) -> str:
    """Write one journal's run into tiled as container ``<start uid>``; returns the uid.

    Layout: metadata ``{"start", "stop", "lines_read"}``; one (lines, pixels) float32
    array per data key (NaN rows never read), plus ``stm_line_index`` (int64, the order
    lines were read). Idempotent: an existing node of that uid is replaced, so a journal
    can be re-ingested after a crash.
    """
    size = Path(path).stat().st_size
    data = run_data(read_journal(path))
    uid = data.uid
    if uid in client:
        client.delete_contents(uid, recursive=True, external_only=False)
    metadata = {"start": _jsonable(data.start), "stop": _jsonable(data.stop),
                "exit_status": data.exit_status, "lines_read": len(data.lines_read),
                "journal_bytes": size}
    node = client.create_container(uid, metadata=metadata)
    for key, image in data.images.items():
        node.write_array(image, key=key, dims=["line", "pixel"])
    node.write_array(np.asarray(data.lines_read, dtype=np.int64), key="stm_line_index")
    return uid


def journals_to_ingest(client, data_dir: str | os.PathLike,
                       skip: Iterable[str] = ()) -> list[Path]:
    """Journals whose tiled copy is missing or stale (e.g. the process was killed before
    the run's stop, or tiled was down): the crash-recovery list. ``skip``: start uids of
    runs still being written."""
    out = []
    skip = set(skip)
    for path in sorted(_journal_dir(data_dir).glob("*.journal"),
                       key=lambda p: p.stat().st_mtime):
        if path.stem in skip:
            continue
        if path.stem not in client or (
                client[path.stem].metadata.get("journal_bytes") != path.stat().st_size):
            out.append(path)
    return out


def read_run_from_tiled(client, uid: str) -> dict[str, np.ndarray]:
    """The arrays of one ingested run, by data key."""
    node = client[uid]
    return {key: node[key].read() for key in node}


class TiledIngestor:
    """Ingest journals into tiled on a background thread, never on the RunEngine loop.

    ``submit(path)`` queues a finished journal (``JournalWriter(on_stop=[ing.submit])``);
    ``join(timeout)`` waits for the queue to drain. Failures are logged and kept in
    ``errors``: the journal stays the durable copy and can be re-ingested.
    """

    def __init__(self, client):
        self.client = client
        self.ingested: list[str] = []
        self.errors: list[tuple[Path, Exception]] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="tiled-ingest", daemon=True)
        self._thread.start()

    def submit(self, path: str | os.PathLike) -> None:
        self._queue.put(Path(path))

    def _work(self) -> None:
        while True:
            path = self._queue.get()
            try:
                if path is None:
                    return
                self.ingested.append(ingest_journal(self.client, path))
            except Exception as exc:  # keep going; the journal is still on disk
                logger.error("tiled ingestion of %s failed: %s", path, exc)
                self.errors.append((path, exc))
            finally:
                self._queue.task_done()

    def join(self, timeout: float = 60.0) -> bool:
        """Wait until everything submitted is ingested; False on timeout."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 60.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


# --------------------------------------------------------------------------- runs CLI
def _journal_dir(data_dir) -> Path:
    return Path(data_dir) / "journal"


def _is_frame_journal(path: Path) -> bool:
    """Whether a journal's run is an acquired frame (its start has the stm_live block)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            length, _ = _HEADER.unpack(head)
            name, doc = unpack(f.read(length))
    except (OSError, struct.error, PackingError, ValueError):
        return False
    return name == "start" and "stm_live" in doc


def find_journal(run: str, data_dir: str | os.PathLike) -> Path:
    """The journal of ``run``: a start uid or unique uid prefix, ``latest``, or -1/-2...
    (most recent first; ``latest`` and -N count acquired frames only, not the derived
    reconstruction/verdict runs journaled beside them)."""
    directory = _journal_dir(data_dir)
    paths = sorted(directory.glob("*.journal"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise JournalError(f"no runs in {directory}")
    if run == "latest":
        run = "-1"
    if run.lstrip("-").isdigit() and run.startswith("-"):
        index = int(run)
        paths = [p for p in paths if _is_frame_journal(p)]
        if -index > len(paths):
            raise JournalError(f"run {run}: only {len(paths)} runs in {directory}")
        return paths[index]
    matches = [p for p in paths if p.stem.startswith(run)]
    if len(matches) != 1:
        raise JournalError(
            f"run {run!r} matches {len(matches)} runs in {directory}; give more of the uid")
    return matches[0]


def runs_list(*, data_dir: str | os.PathLike = "stm_live_data") -> list[dict]:
    """Print and return a summary of every journaled run (oldest first)."""
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    rows = []
    directory = _journal_dir(data_dir)
    for path in sorted(directory.glob("*.journal"), key=lambda p: p.stat().st_mtime):
        try:
            data = run_data(read_journal(path))
        except JournalError as exc:
            rows.append({"uid": path.stem, "error": str(exc)})
            continue
        meta = data.start.get("stm_live", {})
        rows.append({
            "uid": data.uid,
            "time": datetime.fromtimestamp(data.start["time"]).isoformat(timespec="seconds"),
            "plan": data.start.get("plan_name", ""),
            "size": f"{meta.get('pixels', '?')}x{meta.get('lines', '?')}",
            "lines_read": len(set(data.lines_read)),
            "exit_status": data.exit_status,
        })
    table = Table(title=f"runs in {directory}")
    for column in ("uid", "time", "plan", "size", "lines_read", "exit_status"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c, row.get("error", ""))) for c in
                        ("uid", "time", "plan", "size", "lines_read", "exit_status")))
    Console().print(table)
    return rows


def runs_show(run: str, *, data_dir: str | os.PathLike = "stm_live_data") -> RunData:
    """Print one run's start metadata, exit status and line coverage; return its data."""
    import json

    from rich.console import Console

    path = find_journal(run, data_dir)
    data = run_data(read_journal(path))
    console = Console()
    console.print(f"[bold]{data.uid}[/bold]  {path}")
    console.print(json.dumps(_jsonable(data.start.get("stm_live", {})), indent=1))
    meta = data.start.get("stm_live", {})
    console.print(f"exit_status: {data.exit_status}"
                  + (f" ({data.stop.get('reason')})" if data.stop and data.stop.get("reason")
                     else ""))
    console.print(f"lines read: {len(set(data.lines_read))}/{meta.get('lines', '?')}"
                  f" ({data.events} events)")
    return data


def scan_from_run(data: "RunData", *, comment: str | None = None):
    """One journaled frame run as an :class:`~stm_live.io.sxm.SxmScan`: geometry, bias,
    setpoint, Z-controller mode, and each channel under the signal index it was acquired
    from, so the file replays under the controller's own indexes."""
    from stm_live.io.sxm import scan_from_frames

    meta = data.start.get("stm_live")
    if not meta:
        raise JournalError(f"run {data.uid} has no stm_live frame metadata; not a frame run")
    channels, units, indexes = {}, {}, {}
    for ch in meta["channels"]:
        channels[ch["name"]] = {d: data.images[k] for d, k in ch["keys"].items()}
        units[ch["name"]] = ch.get("units", "")
        if int(ch.get("index", -1)) >= 0:
            indexes[ch["name"]] = int(ch["index"])
    return scan_from_frames(
        channels, units=units, **meta["frame"], direction=meta["scan_direction"],
        bias_V=meta["bias_V"], setpoint_A=meta.get("setpoint_A"),
        z_controller=meta.get("z_controller", "constant_current"),
        comment=comment or f"stm-live run {data.uid}", signal_indexes=indexes)


def runs_export(run: str, *, sxm: str | os.PathLike,
                data_dir: str | os.PathLike = "stm_live_data") -> Path:
    """Write one journaled run as a Nanonis .sxm file (via :mod:`stm_live.io.sxm`)."""
    from stm_live.io.sxm import write_sxm

    data = run_data(read_journal(find_journal(run, data_dir)))
    out = write_sxm(Path(sxm), scan_from_run(data))
    from rich.console import Console

    Console().print(f"wrote {out} ({len(set(data.lines_read))}/{data.start['stm_live']['lines']} lines, "
                    f"{data.exit_status})")
    return Path(out)
