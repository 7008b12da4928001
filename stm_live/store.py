"""Durable per-run journal and tiled ingestion.

The journal is the ground truth: every Bluesky document of a run is appended to
``data_dir/journal/<start uid>.journal`` and fsync'ed inside the RunEngine callback, i.e.
before the RunEngine asks the controller for the next line. A ``kill -9`` therefore loses
at most the record being written, which :func:`read_journal` drops (it keeps the good
prefix; damage followed by intact records is an error, never taken for a crash). tiled is a
*derived* copy in the BlueskyRun layout, the journal's documents fed through bluesky's
``TiledWriter`` off the RunEngine loop, and re-ingestable after a crash.

Record layout (no pickle anywhere)::

    u32 big-endian payload length | u32 big-endian crc32(payload) | payload

``payload`` is msgpack of ``[name, doc]``; numpy arrays are msgpack ext type 1 whose data
is msgpack of ``[dtype.str, shape, raw bytes]`` (C order).

tiled, bluesky's TiledWriter and h5py (0.3 s, 2 s and 0.2 s to import) are imported where a run
meets tiled: the journal alone (acquisition's first consumer, the viewer, ``runs list``) never
pays for them.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from event_model import sanitize_doc

from stm_live.io.sxm import scan_from_frames
from stm_live.packing import PackingError, pack, unpack

logger = logging.getLogger(__name__)

__all__ = [
    "Journal",
    "JournalWriter",
    "JournalError",
    "RunData",
    "read_journal",
    "run_data",
    "TiledIngestor",
    "open_tiled",
    "EmbeddedTiled",
    "ingest_journal",
    "run_documents",
    "run_from_tiled",
    "derived_runs",
    "journals_to_ingest",
    "migrate_old_layout",
    "journal_dir",
    "find_journal",
    "find_tiled_run",
    "scan_from_run",
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
            os.fdatasync(self._fh.fileno()) if hasattr(os, "fdatasync") else os.fsync(self._fh.fileno())
        self.records += 1

    def close(self) -> None:
        if not self._fh.closed:
            if self._fsync:
                os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> Journal:
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

    def __init__(self, data_dir: str | os.PathLike, *, fsync: bool = True, on_stop: Iterable = ()):
        self.directory = Path(data_dir) / "journal"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._runs: dict[str, Journal] = {}  # start uid -> journal
        self._descriptors: dict[str, str] = {}  # descriptor uid -> start uid
        self.on_stop = list(on_stop)
        self.last_path: Path | None = None

    def path_for(self, start_uid: str) -> Path:
        return self.directory / f"{start_uid}.journal"

    @property
    def open_runs(self) -> list[str]:
        """Start uids of the runs being written (not to be ingested yet)."""
        return list(self._runs)

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
# A record's payload is msgpack of [name, doc]: a 2-array whose first item is a short string.
_PAYLOAD_START = re.compile(rb"\x92[\xa0-\xbf]")


def read_journal(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """All intact documents of a journal, in order.

    A cut-off last record (the process died mid-write) is dropped with a one-line warning;
    everything before it is returned. A record that is not intact while intact records
    follow it (a damaged length field, a failed checksum) is damage, not a crash signature,
    and raises :class:`JournalError`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc}") from exc
    docs: list[tuple[str, dict]] = []
    pos = 0
    while pos < len(data):
        defect = None
        if len(data) - pos < _HEADER.size:
            defect = f"a record header of {len(data) - pos} of {_HEADER.size} bytes"
        else:
            length, crc = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if length > _MAX_RECORD or end > len(data):
                defect = f"a record of {len(data) - pos - _HEADER.size} of its {length} bytes"
            else:
                payload = data[pos + _HEADER.size : end]
                if zlib.crc32(payload) != crc:
                    defect = "a record whose checksum fails"
        if defect:
            # A crash tears only the last record: an intact one after it means damage.
            if _intact_record_after(data, pos + 1):
                raise JournalError(
                    f"{path}: record {len(docs)} at byte {pos} is damaged ({defect}), and intact records follow it"
                )
            logger.warning(
                "%s: ends in %s at byte %d (cut off while being written); kept %d documents",
                path,
                defect,
                pos,
                len(docs),
            )
            break
        try:
            name, doc = unpack(payload)
        except (PackingError, ValueError) as exc:
            raise JournalError(f"{path}: record {len(docs)} at byte {pos}: {exc}") from exc
        docs.append((name, doc))
        pos = end
    return docs


def _intact_record_after(data: bytes, start: int) -> bool:
    """Whether an intact record (its checksum right) begins anywhere from ``start``."""
    for match in _PAYLOAD_START.finditer(data, start + _HEADER.size):
        at = match.start() - _HEADER.size
        length, crc = _HEADER.unpack_from(data, at)
        end = match.start() + length
        if end <= len(data) and zlib.crc32(data[match.start() : end]) == crc:
            return True
    return False


@dataclass
class RunData:
    """One run's frame assembled from its documents (interfaces.md layout)."""

    start: dict
    stop: dict | None
    images: dict[str, np.ndarray] = field(default_factory=dict)  # data key -> (lines, pixels)
    lines_read: list[int] = field(default_factory=list)  # line indexes, in order
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
# Runs land in tiled in the BlueskyRun layout bluesky's TiledWriter writes, which tiled clients,
# bluesky-tiled-plugins and tiled viewers read: a container per run (metadata "start" and "stop",
# spec BlueskyRun), in it a container per stream (metadata: the descriptor) with one array per
# data key, a row per event in event order. TiledWriter's event tables take scalars and 1-D
# arrays (a scan line); the images derived runs carry (the live reconstruction, its check maps)
# go to an HDF5 file per stream and key under ``data_dir/assets`` and are referenced the way a
# detector's files are (StreamResource/StreamDatum documents), so the tiled server must be able
# to read that folder (the embedded one does; a lab's server needs it in its readable storage).

ASSETS = "assets"
# run metadata beside "start"/"stop": the size of the journal the run was ingested from, so an
# ingestion that a crash or a down server left behind is found and done again
INGESTED_FROM = "stm_live_journal"
# metadata keys of the layout stm-live wrote before it used TiledWriter
_OLD_LAYOUT_KEYS = ("lines_read", "journal_bytes", "exit_status")


def open_tiled(data_dir: str | os.PathLike | None = None, tiled_uri: str | None = None):
    """A writable tiled client: ``tiled_uri`` if given, else an embedded server.

    Returns ``(client, server)``; ``server`` is None for an external URI, otherwise the embedded
    server (:class:`EmbeddedTiled`: stored in ``data_dir/tiled``, loopback only, able to read
    ``data_dir/assets``) that the caller closes.
    """
    from tiled.client import from_uri  # noqa: PLC0415 - heavy: see the module's note

    if tiled_uri:
        return from_uri(tiled_uri), None
    if data_dir is None:
        raise ValueError("open_tiled needs data_dir or tiled_uri")
    server = EmbeddedTiled(Path(data_dir) / "tiled", [Path(data_dir) / ASSETS])
    return from_uri(server.uri), server


class EmbeddedTiled:
    """tiled's ``SimpleTiledServer`` in a process of its own: its request handling and storage
    work never hold the acquiring interpreter's GIL (in-process, a write stalled the RunEngine
    for a third of a second). It ends with this process: it exits when its stdin closes.
    ``uri`` (with the API key), ``close()``."""

    _CODE = (
        "import sys; from tiled.server import SimpleTiledServer; "
        "s = SimpleTiledServer(directory=sys.argv[1], readable_storage=sys.argv[2:]); "
        "print('URI', s.uri, flush=True); sys.stdin.read(); s.close()"
    )

    def __init__(self, directory: Path, readable: list[Path], *, timeout_s: float = 120.0):
        for folder in (directory, *readable):
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.log = Path(directory) / "server.log"
        with open(self.log, "ab") as log:  # its access log: a file, never a pipe nobody drains
            # its own session: a Ctrl-C at the terminal is for the acquisition, which ends it in order
            self._proc = subprocess.Popen(
                [sys.executable, "-c", self._CODE, str(directory), *map(str, readable)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        found: list[str] = []
        reader = threading.Thread(
            target=lambda: found.extend(line.split()[1] for line in self._proc.stdout if line.startswith("URI ")),
            daemon=True,
        )
        reader.start()
        deadline = time.monotonic() + timeout_s
        while not found and self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not found:
            self.close()
            last = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise OSError(
                f"embedded tiled server in {directory} did not start within {timeout_s:.0f} s "
                f"({last[0]}; see {self.log})"
            )
        self.uri = found[0]

    def close(self, timeout: float = 10.0) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types for tiled metadata (event_model.sanitize_doc, plus tuples)."""
    return sanitize_doc(obj)


def ingest_journal(client, path: str | os.PathLike, *, assets: str | os.PathLike | None = None) -> str:
    """Write one journal's run into tiled through bluesky's TiledWriter; returns its uid.

    Idempotent: an existing node of that uid is replaced, so a journal can be ingested again
    after a crash. A run the journal holds no stop for (the process was killed) is written
    without one, as TiledWriter leaves a run still open. ``assets``: where the run's images go
    (default ``<data_dir>/assets``, beside the journal folder).
    """
    path = Path(path)
    size = path.stat().st_size
    docs = read_journal(path)
    if not docs or docs[0][0] != "start":
        raise JournalError(f"{path}: does not begin with a start document")
    uid = docs[0][1]["uid"]
    assets = Path(assets) if assets is not None else path.parent.parent / ASSETS
    _write_run(client, docs, assets / uid, {INGESTED_FROM: {"bytes": size}})
    return uid


def _write_run(client, docs: list[tuple[str, dict]], assets: Path, metadata: dict) -> None:
    from bluesky.callbacks.tiled_writer import TiledWriter  # noqa: PLC0415 - heavy: see the module's note

    uid = docs[0][1]["uid"]
    if uid in client:
        client.delete_contents(uid, recursive=True, external_only=False)
    # TiledWriter writes a stream's table at the run's stop; without one, row by row. Its
    # normalizer re-validates every document, and jsonschema formats each array of an event in
    # full doing so (90 % of the time); the journal holds documents the RunEngine or
    # event-model's composers validated, in the current schema, so they go to it directly.
    writer = TiledWriter(client, normalizer=None, **({} if docs[-1][0] == "stop" else {"batch_size": 1}))
    external = []
    for name, doc in _writer_documents(docs, assets):
        writer(name, doc)
        if name == "stream_resource":
            external.append(doc["data_key"])
    node = client[uid]
    node.update_metadata(metadata={**dict(node.metadata), **metadata}, drop_revision=True)
    for stream in node if external else ():  # a server that cannot read the files says so only when read
        for key in set(external) & set(node[stream]):
            try:
                node[stream][key][:1]
            except Exception as exc:
                raise JournalError(
                    f"run {uid}: the tiled server cannot read {assets} ({exc}); add that folder to its readable storage"
                ) from exc


def _image_keys(docs) -> dict[str, dict[str, tuple[list[int], str]]]:
    """descriptor uid -> {data key: (shape, dtype)} of the event data that are images."""
    found: dict[str, dict[str, tuple[list[int], str]]] = {}
    for name, doc in docs:
        if name == "event":
            for key, value in doc["data"].items():
                if isinstance(value, np.ndarray) and value.ndim >= 2:
                    found.setdefault(doc["descriptor"], {})[key] = (list(value.shape), value.dtype.str)
    return found


def _writer_documents(docs, assets: Path):
    """The run's documents as TiledWriter takes them: images moved from the events to HDF5
    files in ``assets`` (one per stream and key), referenced by StreamResource/StreamDatum."""
    images = _image_keys(docs)
    if not images:
        yield from docs
        return
    import h5py  # noqa: PLC0415 - heavy: see the module's note

    run_uid = docs[0][1]["uid"]
    resources: dict[str, dict[str, str]] = {}  # descriptor uid -> {key: stream resource uid}
    rows: dict[str, int] = {}
    for name, doc in docs:
        keys = images.get(doc.get("descriptor") if name == "event" else doc.get("uid"))
        if name == "descriptor" and keys:
            data_keys = {k: dict(v) for k, v in doc["data_keys"].items()}
            for key, (shape, dtype) in keys.items():
                data_keys[key].update(external="STREAM:", shape=shape, dtype_numpy=dtype)
            yield name, {**doc, "data_keys": data_keys}
            resources[doc["uid"]], rows[doc["uid"]] = {}, 0
            for key, (shape, dtype) in keys.items():
                stack = [d["data"][key] for n, d in docs if n == "event" and d["descriptor"] == doc["uid"]]
                try:
                    stack = np.stack(stack).astype(dtype, copy=False)
                except ValueError as exc:
                    raise JournalError(
                        f"run {run_uid}: {doc['name']} events' {key!r} images differ in shape ({exc})"
                    ) from exc
                assets.mkdir(parents=True, exist_ok=True)
                file = assets / f"{doc['name']}_{key}_{doc['uid'][:8]}.h5"
                with h5py.File(file, "w") as h5:
                    h5.create_dataset("data", data=stack)
                resource = {
                    "uid": str(uuid.uuid4()),
                    "run_start": run_uid,
                    "data_key": key,
                    "mimetype": "application/x-hdf5",
                    "uri": file.resolve().as_uri(),
                    "parameters": {
                        "dataset": "/data",
                        "chunk_shape": [1, *shape],
                        "join_method": "stack",
                        "swmr": False,
                    },
                }
                resources[doc["uid"]][key] = resource["uid"]
                yield "stream_resource", resource
        elif name == "event" and keys:
            yield (
                name,
                {
                    **doc,
                    **{
                        part: {k: v for k, v in doc.get(part, {}).items() if k not in keys}
                        for part in ("data", "timestamps", "filled")
                    },
                },
            )
            row, seq = rows[doc["descriptor"]], doc["seq_num"]
            rows[doc["descriptor"]] = row + 1
            for _key, resource in resources[doc["descriptor"]].items():
                yield (
                    "stream_datum",
                    {
                        "uid": f"{resource}/{row}",
                        "stream_resource": resource,
                        "descriptor": doc["descriptor"],
                        "indices": {"start": row, "stop": row + 1},
                        "seq_nums": {"start": seq, "stop": seq + 1},
                    },
                )
        else:
            yield name, doc


def run_documents(node) -> list[tuple[str, dict]]:
    """One run's documents read back from the BlueskyRun layout (``client[uid]``): start,
    each stream's descriptor and events (in event order; arrays and images as numpy arrays),
    stop if the run has one. What :func:`run_data` and the viewer take."""
    metadata = node.metadata
    start = dict(metadata["start"])
    docs: list[tuple[str, dict]] = [("start", start)]
    for stream in node:
        table = node[stream]
        meta = dict(table.metadata)
        data_keys = {
            k: {f: v for f, v in key.items() if f != "external"} for k, key in meta.get("data_keys", {}).items()
        }
        docs.append(("descriptor", {**meta, "name": stream, "run_start": start["uid"], "data_keys": data_keys}))
        columns = set(table)
        if "seq_num" not in columns:
            continue  # a stream without events
        values = {key: table[key].read() for key in ("seq_num", "time", *data_keys) if key in columns}
        stamps = {key: table[f"ts_{key}"].read() for key in data_keys if f"ts_{key}" in columns}
        for i, seq in enumerate(values["seq_num"]):
            data = {key: _item(values[key][i]) for key in data_keys if key in values}
            docs.append(
                (
                    "event",
                    {
                        "uid": f"{meta['uid']}/{int(seq)}",
                        "descriptor": meta["uid"],
                        "seq_num": int(seq),
                        "time": float(values["time"][i]),
                        "data": data,
                        "timestamps": {
                            k: float(stamps[k][i]) if k in stamps else float(values["time"][i]) for k in data
                        },
                        "filled": {},
                    },
                )
            )
    if metadata.get("stop"):
        docs.append(("stop", dict(metadata["stop"])))
    return docs


def _item(value):
    """A table cell as the event had it: a numpy array, or a plain scalar."""
    if isinstance(value, np.ndarray):
        return value
    return value.item() if isinstance(value, np.generic) else value


def run_from_tiled(client, uid: str) -> RunData:
    """One run's frame assembled from its BlueskyRun node (as :func:`run_data` from a journal)."""
    return run_data(run_documents(client[uid]))


def derived_runs(client, uid: str) -> dict[str, str]:
    """The derived runs (reconstruction, tip verdicts) of acquisition run ``uid``: kind -> uid."""
    from tiled.queries import Key  # noqa: PLC0415 - heavy: see the module's note

    found = {}
    for key, node in client.search(Key("start.parent_uid") == uid).items():
        start = node.metadata["start"]
        kind = start.get("stm_live_derived")
        kind = kind.get("kind") if isinstance(kind, dict) else kind
        found[kind or ("tip" if start.get("purpose") == "tip_verdicts" else "derived")] = key
    return found


def journals_to_ingest(client, data_dir: str | os.PathLike, skip: Iterable[str] = ()) -> list[Path]:
    """Journals whose tiled copy is missing or stale (e.g. the process was killed before
    the run's stop, or tiled was down): the crash-recovery list. ``skip``: start uids of
    runs still being written."""
    out = []
    skip = set(skip)
    for path in sorted(journal_dir(data_dir).glob("*.journal"), key=lambda p: p.stat().st_mtime):
        if path.stem in skip:
            continue
        if (
            path.stem not in client
            or (client[path.stem].metadata.get(INGESTED_FROM) or {}).get("bytes") != path.stat().st_size
        ):
            out.append(path)
    return out


def _old_layout(node) -> bool:
    return all(k in node.metadata for k in _OLD_LAYOUT_KEYS) and not any(
        spec.name == "BlueskyRun" for spec in node.specs
    )


def migrate_old_layout(client, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rewrite, once, the runs stm-live stored in its own layout (an array per data key plus
    ``stm_line_index``) in the BlueskyRun layout; returns their uids (none the second time).

    From the run's journal where ``data_dir`` has it (every document, exactly), else from the
    stored arrays: the lines in the order they were read, the last reading of each.
    """
    from tiled.queries import Key  # noqa: PLC0415 - heavy: see the module's note

    migrated = []
    for uid, node in list(client.search(Key("journal_bytes") >= 0).items()):
        if not _old_layout(node):
            continue
        journal = journal_dir(data_dir) / f"{uid}.journal" if data_dir is not None else None
        if journal is not None and journal.exists():
            ingest_journal(client, journal)
        else:
            docs = _old_layout_documents(node)
            assets = Path(data_dir) / ASSETS / uid if data_dir is not None else Path(ASSETS) / uid
            _write_run(client, docs, assets, {INGESTED_FROM: {"migrated": "stm-live layout 1"}})
        migrated.append(uid)
    if migrated:
        logger.warning(
            "tiled: %d run(s) stored in stm-live's own layout rewritten once in the BlueskyRun layout (%s)",
            len(migrated),
            ", ".join(u[:8] for u in migrated),
        )
    return migrated


def _old_layout_documents(node) -> list[tuple[str, dict]]:
    """Documents of a run stored in the old layout, rebuilt from its metadata and arrays."""
    start, stop = dict(node.metadata["start"]), node.metadata.get("stop")
    docs: list[tuple[str, dict]] = [("start", start)]
    meta = start.get("stm_live")
    if meta and "stm_line_index" in node:
        line_key = meta.get("line_key", "stm_line_index")
        images = {k: node[k].read() for k in node if k != "stm_line_index"}
        desc = {
            "uid": str(uuid.uuid4()),
            "run_start": start["uid"],
            "name": "primary",
            "time": start["time"],
            "configuration": {},
            "hints": {},
            "object_keys": {},
            "data_keys": {
                line_key: {"source": "stm-live", "dtype": "integer", "shape": []},
                **{
                    k: {"source": "stm-live", "dtype": "array", "shape": [int(v.shape[1])], "dtype_numpy": v.dtype.str}
                    for k, v in images.items()
                },
            },
        }
        docs.append(("descriptor", desc))
        for seq, row in enumerate(node["stm_line_index"].read().tolist(), 1):
            data = {line_key: int(row), **{k: v[row] for k, v in images.items()}}
            docs.append(
                (
                    "event",
                    {
                        "uid": str(uuid.uuid4()),
                        "descriptor": desc["uid"],
                        "seq_num": seq,
                        "time": start["time"],
                        "data": data,
                        "filled": {},
                        "timestamps": dict.fromkeys(data, start["time"]),
                    },
                )
            )
    if stop:
        docs.append(("stop", dict(stop)))
    return docs


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


# --------------------------------------------------------------------------- finding runs
def journal_dir(data_dir) -> Path:
    """Where ``data_dir`` keeps its run journals."""
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
    directory = journal_dir(data_dir)
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
        raise JournalError(f"run {run!r} matches {len(matches)} runs in {directory}; give more of the uid")
    return matches[0]


def find_tiled_run(client, run: str) -> str:
    """The uid of ``run`` in tiled, found as :func:`find_journal` finds a journal: a uid or
    unique prefix, ``latest``, or -1/-2... (acquired frames, most recent first)."""
    from tiled.queries import Key  # noqa: PLC0415 - heavy: see the module's note

    if run == "latest":
        run = "-1"
    if run.lstrip("-").isdigit() and run.startswith("-"):
        frames = client.search(Key("start.stm_live.lines") > 0).sort(("start.time", -1))
        uids = list(frames.keys()[: -int(run)])
        if len(uids) < -int(run):
            raise JournalError(f"run {run}: only {len(uids)} frame runs in tiled at {client.uri}")
        return uids[-1]
    if run in client:
        return run
    matches = [uid for uid in client.keys() if uid.startswith(run)]
    if len(matches) != 1:
        raise JournalError(f"run {run!r} matches {len(matches)} runs in tiled at {client.uri}; give more of the uid")
    return matches[0]


def scan_from_run(data: RunData, *, comment: str | None = None):
    """One journaled frame run as an :class:`~stm_live.io.sxm.SxmScan`: geometry, bias,
    setpoint, Z-controller mode, and each channel under the signal index it was acquired
    from, so the file replays under the controller's own indexes."""
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
        channels,
        units=units,
        **meta["frame"],
        direction=meta["scan_direction"],
        bias_V=meta["bias_V"],
        setpoint_A=meta.get("setpoint_A"),
        z_controller=meta.get("z_controller", "constant_current"),
        comment=comment or f"stm-live run {data.uid}",
        signal_indexes=indexes,
    )
