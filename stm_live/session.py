"""An acquisition session: RunEngine + durable journal + callbacks + tiled + progress.

:func:`build_consumers` is the one wiring of a session's consumers (journal, tiled ingestion,
live reconstruction or a remote worker over 0MQ, tip monitor and policy, viewer, progress):
demo, scan, replay, the remote worker and the queue server's profile all call it;
:func:`load_models` loads the networks its in-process consumers run (demo, replay).

Only the journal (an fsync per document, well under a millisecond to a few ms) and the
progress bar (a counter) run on the RunEngine's loop. Everything else — the callbacks
other parts plug in (live reconstruction, tip monitor) and tiled ingestion — runs on
worker threads, so a slow consumer never stalls acquisition.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.run_engine import RunEngine
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from stm_live.callbacks.live import LiveReconstruction
from stm_live.callbacks.tipmonitor import TipMonitor
from stm_live.console import LinkReporter
from stm_live.models import load_stmnet, load_tip_classifier
from stm_live.reconditioning import POLICIES, TipReconditioner
from stm_live.store import JournalWriter, TiledIngestor, journals_to_ingest, migrate_old_layout, open_tiled
from stm_live.streaming import DocumentProxy, ResultReceiver, make_publisher
from stm_live.suspenders import LinkSuspender

logger = logging.getLogger(__name__)

__all__ = [
    "AcquisitionSession",
    "Consumers",
    "build_consumers",
    "ThreadedCallback",
    "LineProgress",
    "DerivedCollector",
    "load_models",
]

Callback = Callable[[str, dict], Any]


class ThreadedCallback:
    """Deliver documents to ``callback`` on its own thread, in order.

    The RunEngine only pays for a queue put. ``join(timeout)`` waits until every
    document queued so far has been handled; errors are logged and kept in ``errors``
    (a failing consumer must not abort acquisition).
    """

    def __init__(self, callback: Callback, *, name: str | None = None):
        self.callback = callback
        self.errors: list[Exception] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(
            target=self._work, name=name or f"cb-{getattr(callback, '__name__', 'callback')}", daemon=True
        )
        self._thread.start()

    def __call__(self, name: str, doc: dict) -> None:
        self._queue.put((name, doc))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.callback(*item)
            except Exception as exc:
                logger.exception("callback %r failed on %s", self.callback, item[0])
                self.errors.append(exc)
            finally:
                self._queue.task_done()

    def join(self, timeout: float = 30.0) -> bool:
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


class LineProgress:
    """A rich progress bar: one task per frame, advanced per line (cheap on the loop)."""

    def __init__(self, console=None):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, int] = {}  # frame run uid -> progress task
        self._line_keys: dict[str, str] = {}  # frame run uid -> line index key
        self._lines: dict[str, set[int]] = {}  # frame run uid -> distinct lines seen
        self._streams: dict[str, str] = {}  # primary descriptor uid -> frame run uid
        self._started = False

    def __call__(self, name: str, doc: dict) -> None:
        # Follows every frame run by its own documents: other runs (reconditioning) may open
        # meanwhile, and a rewind re-sends a line, which counts once.
        if name == "start" and doc.get("stm_live"):
            meta = doc["stm_live"]
            if not self._started:
                self.progress.start()
                self._started = True
            self._tasks[doc["uid"]] = self.progress.add_task(f"frame {doc['uid'][:8]}", total=meta["lines"])
            self._line_keys[doc["uid"]] = meta.get("line_key", "stm_line_index")
            self._lines[doc["uid"]] = set()
        elif name == "descriptor" and doc.get("run_start") in self._tasks and doc.get("name") == "primary":
            self._streams[doc["uid"]] = doc["run_start"]
        elif name == "event" and doc.get("descriptor") in self._streams:
            run = self._streams[doc["descriptor"]]
            line = doc["data"].get(self._line_keys[run])
            if line is not None and line not in self._lines[run]:
                self._lines[run].add(line)
                self.progress.update(self._tasks[run], completed=len(self._lines[run]))
        elif name == "stop" and doc["run_start"] in self._tasks:
            task = self._tasks.pop(doc["run_start"])
            self.progress.update(task, description=f"frame {doc['run_start'][:8]} {doc['exit_status']}")

    def close(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False


# ----------------------------------------------------------------- live consumers
class DerivedCollector:
    """Reads derived documents (live reconstruction, tip verdicts) by parent scan uid.

    Works on the documents alone, so the in-process callbacks and a remote worker's
    results (``streaming.ResultReceiver``) are summarised the same way. Accepts the
    derived start documents of docs/interfaces.md and the variants the callbacks emit
    today (``stm_live_derived`` as a dict with ``kind``; ``purpose="tip_verdicts"``).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._kind: dict[str, tuple[str, str]] = {}  # derived start uid -> (kind, parent)
        self._desc: dict[str, tuple[str, str]] = {}  # descriptor uid -> (kind, parent)
        self.finals: dict[str, np.ndarray] = {}  # scan uid -> final reconstruction
        self.checks: dict[str, dict] = {}  # scan uid -> the final self-consistency check (live.CHECK_STREAM)
        self.latencies: dict[str, list[float]] = {}
        self.verdicts: dict[str, list[dict]] = {}  # scan uid -> verdict data, in order
        self.actions: dict[str, list[str]] = {}
        self.stopped: set[str] = set()  # (kind:parent) of derived runs that stopped
        self.snapshots: dict[str, list[tuple[int, np.ndarray]]] = {}

    @staticmethod
    def kind_of(doc: dict) -> str | None:
        kind = doc.get("stm_live_derived")
        if isinstance(kind, dict):
            kind = kind.get("kind")
        if kind is None and doc.get("purpose") == "tip_verdicts":
            kind = "tip"
        return kind if kind in ("reconstruction", "tip") else None

    def __call__(self, name: str, doc: dict) -> None:
        with self._cond:
            if name == "start" and doc.get("parent_uid"):
                kind = self.kind_of(doc)
                if kind:
                    self._kind[doc["uid"]] = (kind, doc["parent_uid"])
            elif name == "descriptor" and doc.get("run_start") in self._kind:
                self._desc[doc["uid"]] = self._kind[doc["run_start"]]
            elif name == "event" and doc.get("descriptor") in self._desc:
                kind, parent = self._desc[doc["descriptor"]]
                data = doc["data"]
                if kind == "reconstruction" and "reconstruction" in data:
                    image = np.asarray(data["reconstruction"], dtype=np.float32)
                    if "latency_s" in data:
                        self.latencies.setdefault(parent, []).append(float(data["latency_s"]))
                    if data.get("final"):
                        self.finals[parent] = image
                    else:
                        n = int(data.get("n_lines", data.get("lines_done", 0)))
                        self.snapshots.setdefault(parent, []).append((n, image))
                elif kind == "reconstruction" and "residual" in data:  # the final self-consistency check
                    self.checks[parent] = dict(data)
                elif kind == "tip":
                    if "action" in data:
                        self.actions.setdefault(parent, []).append(str(data["action"]))
                    elif "label" in data:
                        self.verdicts.setdefault(parent, []).append(dict(data))
            elif name == "stop" and doc.get("run_start") in self._kind:
                kind, parent = self._kind[doc["run_start"]]
                self.stopped.add(f"{kind}:{parent}")
            self._cond.notify_all()

    def wait_stopped(self, kind: str, parent: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while f"{kind}:{parent}" not in self.stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True


def fan_out(*callbacks: Callable[[str, dict], Any]) -> Callable[[str, dict], None]:
    """One emitter calling several consumers; one failing consumer does not stop the rest."""
    targets = [cb for cb in callbacks if cb is not None]

    def emit(name: str, doc: dict) -> None:
        for cb in targets:
            try:
                cb(name, doc)
            except Exception as exc:
                logger.error("derived-document consumer %r failed on %s: %s", cb, name, exc)

    return emit


def parse_worker(address: str) -> tuple[str, str]:
    """``--worker ADDR``: the proxy's outbound address the worker connects to, optionally
    ``,RESULTS`` (where the worker pushes results); default results port is ADDR's + 2
    (the ``stm-live worker`` defaults are 5578 and 5580)."""
    out, _, results = address.partition(",")
    out = out.strip()
    if "://" not in out:
        out = "tcp://" + out
    if not results:
        host, _, port = out.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"--worker {address!r}: expected tcp://127.0.0.1:PORT[,tcp://127.0.0.1:PORT]")
        results = f"{host}:{int(port) + 2}"
    elif "://" not in results:
        results = "tcp://" + results.strip()
    return out, results.strip()


# ----------------------------------------------------------------- the one wiring
class Consumers:
    """A session's consumers of documents, as :func:`build_consumers` wires them.

    ``attach(RE)`` subscribes them in order (the journal first, so every other consumer sees
    a document only once it is on disk) and installs the tip policy; in a process without a
    RunEngine (the remote worker) the object itself is the callback. ``wait`` lets the
    consumers catch up (final reconstructions, tiled ingestion), ``close`` ends them all.
    """

    def __init__(self, data_dir: Path | None) -> None:
        self.data_dir = data_dir
        self.journal: JournalWriter | None = None
        self.collector = DerivedCollector()
        self.inline: list[Callback] = []  # on the RunEngine's loop: fast ones only
        self.threaded: list[ThreadedCallback] = []
        self.live = self.tip = self.policy = self.progress = None
        self.proxy = self.receiver = self.publisher = None
        self.ingestor: TiledIngestor | None = None
        self.tiled_server = None
        self.tiled_error: Exception | None = None
        self.recovered: list[str] = []  # uids re-ingested from earlier sessions' journals
        self.migrated: list[str] = []  # uids rewritten from stm-live's old tiled layout
        self._writers: list[JournalWriter] = []  # every journal writer (open runs: not recovered)
        self._tiled_ready = threading.Event()
        self._tiled_ready.set()
        self._waiting: list[Path] = []
        self._lock = threading.Lock()
        self._closers: list[Callable[[], Any]] = []
        self._RE = None
        self._tokens: list[int] = []

    # -- journals and tiled ----------------------------------------------------------
    def journal_writer(self) -> JournalWriter:
        """A journal writer for one emitting thread, its finished runs handed to tiled."""
        writer = JournalWriter(self.data_dir, on_stop=[self._run_finished])
        self._writers.append(writer)
        return writer

    def start_tiled(self, tiled_uri: str | None) -> None:
        # Starting tiled takes seconds: do it beside the first frame, not before it.
        self._tiled_ready.clear()
        threading.Thread(target=self._start_tiled, args=(tiled_uri,), name="tiled-start", daemon=True).start()

    def _start_tiled(self, tiled_uri: str | None) -> None:
        try:
            client, self.tiled_server = open_tiled(self.data_dir, tiled_uri)
            ingestor = TiledIngestor(client)
        except Exception as exc:
            logger.error("tiled unavailable (%s); runs stay in the journal", exc)
            self.tiled_error = exc
            self._tiled_ready.set()
            return
        try:
            self.migrated = migrate_old_layout(client, self.data_dir)
        except Exception as exc:  # the old runs stay as they were; new ones are ingested
            logger.error("migrating runs from stm-live's old tiled layout failed: %s", exc)
        with self._lock:
            self.ingestor = ingestor
            # crash recovery: journals of earlier sessions that never reached tiled
            try:
                recover = journals_to_ingest(
                    client,
                    self.data_dir,
                    skip=[uid for w in self._writers for uid in w.open_runs] + [p.stem for p in self._waiting],
                )
            except Exception as exc:
                logger.error("cannot list journals to recover: %s", exc)
                recover = []
            self.recovered = [p.stem for p in recover]
            for path in recover + self._waiting:
                ingestor.submit(path)
            self._waiting.clear()
        self._tiled_ready.set()

    def _run_finished(self, path: Path) -> None:
        with self._lock:
            if self.ingestor is not None:
                self.ingestor.submit(path)
            else:
                self._waiting.append(path)

    # -- the RunEngine -------------------------------------------------------------------
    def callbacks(self) -> list[Callback]:
        """What a RunEngine subscribes, in order."""
        return ([self.journal] if self.journal is not None else []) + self.inline + self.threaded

    def attach(self, RE) -> Consumers:
        self._RE = RE
        self._tokens = [RE.subscribe(cb) for cb in self.callbacks()]
        if self.policy is not None:
            self.policy.install(RE)
        return self

    def detach(self) -> None:
        if self._RE is None:
            return
        if self.policy is not None:
            self.policy.remove()
        for token in self._tokens:
            self._RE.unsubscribe(token)
        self._RE, self._tokens = None, []

    def __call__(self, name: str, doc: dict) -> None:
        for cb in self.callbacks():
            cb(name, doc)

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait for the consumers to catch up: the final reconstruction and verdicts (their
        derived runs stop then), threaded callbacks, tiled ingestion. False on timeout."""
        ok = True
        for consumer in (self.live, self.tip):
            if callable(getattr(consumer, "flush", None)):
                ok = consumer.flush(timeout) and ok
        ok = all(cb.join(timeout) for cb in self.threaded) and ok
        if self._tiled_ready.wait(timeout) and self.ingestor is not None:
            ok = self.ingestor.join(timeout) and ok
        return ok

    def close(self, timeout: float = 60.0) -> None:
        self.wait(timeout)
        self.detach()
        for cb in self.threaded:
            cb.close(timeout)
        while self._closers:
            close = self._closers.pop()
            try:
                close()
            except Exception as exc:  # cleanup of one part must not hide the others
                logger.error("closing %r failed: %s", close, exc)
        for writer in self._writers:
            writer.close()
        if self.ingestor is not None:
            self.ingestor.close(timeout)
        if self.tiled_server is not None:
            self.tiled_server.close()
            self.tiled_server = None


def build_consumers(
    data_dir: str | os.PathLike | None,
    *,
    journal: bool = True,
    fsync: bool = True,
    tiled: bool = False,
    tiled_uri: str | None = None,
    live: bool = False,
    reconstructor=None,
    device: str = "auto",
    live_options: dict | None = None,
    worker: str | None = None,
    worker_wait_s: float = 60.0,
    tip: bool | Callable = False,
    classifier=None,
    tip_options: dict | None = None,
    on_verdict: Callable[[dict], Any] | None = None,
    stm=None,
    tip_policy: str = "off",
    policy_options: dict | None = None,
    emit: Callable[[str], Callback] | None = None,
    viewer_state=None,
    progress: bool | LineProgress = False,
    inline: Iterable[Callback] = (),
    callbacks: Iterable[Callback] = (),
    say: Callable[[str], Any] | None = None,
) -> Consumers:
    """The one wiring of a session's consumers; every command that acquires or reconstructs
    (demo, scan, replay, the remote worker, the queue server's profile) builds them here.

    Parameters
    ----------
    data_dir : path or None
        Journal (``data_dir/journal``, raw and derived runs), assets and embedded tiled. None
        only with ``journal=False`` and ``emit`` (the remote worker journals nothing).
    journal, fsync : bool
        Journal every document of the RunEngine, durably, before any other consumer sees it.
    tiled, tiled_uri
        Ingest every finished run (acquired and derived) into tiled through bluesky's
        TiledWriter, off the RunEngine loop: an embedded server in ``data_dir/tiled``, or the
        lab's server at ``tiled_uri``. Runs in stm-live's old layout are migrated once.
    live, reconstructor, device, live_options
        Live STM-Net reconstruction in this process (``LiveReconstruction``, work on its thread).
    worker, worker_wait_s
        Or: publish the documents over 0MQ to a remote worker (``stm-live worker``) and collect
        its results; waits up to ``worker_wait_s`` for it to say hello.
    tip, classifier, tip_options, on_verdict
        The tip monitor (``TipMonitor``); ``tip`` may be a factory ``(emit) -> callback``
        instead (None: unavailable). ``on_verdict(record)`` also sees every verdict.
    stm, tip_policy, policy_options
        With the microscope and a policy other than "off": the reconditioning policy
        (``TipReconditioner``), fed by the tip monitor (which it implies), installed on attach.
    emit : callable(kind) -> callback, optional
        Where derived documents of consumer ``kind`` ("live", "tip", "worker") go. Default: a
        journal writer of their own (ingested into tiled as their runs stop), the derived
        collector (``.collector``) and ``viewer_state``.
    viewer_state, progress, inline, callbacks
        The viewer's state and a progress bar (on the loop, cheap), extra consumers on the loop
        (``inline``) or each on a thread of its own (``callbacks``).
    say : callable(str), optional
        One-line notes for the operator (waiting for a worker); default: the log.
    """
    if tip_policy not in POLICIES:
        raise ValueError(f"tip_policy must be one of {', '.join(POLICIES)}, not {tip_policy!r}")
    say = say or logger.info
    c = Consumers(Path(data_dir) if data_dir is not None else None)
    if data_dir is None and (journal or emit is None or tiled or tiled_uri):
        raise ValueError("build_consumers needs data_dir for the journal and tiled")
    try:
        if journal:
            c.journal = JournalWriter(c.data_dir, fsync=fsync, on_stop=[c._run_finished])
            c._writers.append(c.journal)
        if emit is None:

            def emit(kind):  # each emitter calls from its own thread: a journal writer each
                return fan_out(c.journal_writer(), c.collector, viewer_state)

        c.inline.extend(inline)
        if viewer_state is not None:
            c.inline.append(viewer_state)
        if live:
            c.live = LiveReconstruction(reconstructor, device=device, emit=emit("live"), **(live_options or {}))
            c.inline.append(c.live)  # copies and queues on the loop; the work is on its thread
            c._closers.append(c.live.close)
        if worker is not None:
            _connect_worker(c, worker, emit("worker"), worker_wait_s, say)
        if stm is not None and tip_policy != "off":
            c.policy = TipReconditioner(stm, policy=tip_policy, classifier=classifier, **(policy_options or {}))
        if tip or c.policy is not None:
            if callable(tip):
                c.tip = tip(emit("tip"))
            else:
                listeners = [f for f in (on_verdict, c.policy and c.policy.on_verdict) if f]
                c.tip = TipMonitor(
                    classifier, on_verdict=_each(listeners) if listeners else None, **(tip_options or {})
                )
                c.tip.subscribe(emit("tip"))
            if c.tip is not None:
                c.inline.append(c.tip)  # hands classification to its own thread
                if callable(getattr(c.tip, "close", None)):
                    c._closers.append(c.tip.close)
                if c.policy is not None:
                    c.policy.monitor = c.tip  # told where the new tip starts
        if progress:
            c.progress = progress if isinstance(progress, LineProgress) else LineProgress()
            c.inline.append(c.progress)
            c._closers.append(c.progress.close)
        c.threaded = [ThreadedCallback(cb) for cb in callbacks]
        if tiled or tiled_uri:
            c.start_tiled(tiled_uri)
    except BaseException:
        c.close(timeout=5.0)
        raise
    return c


def load_models(device: str = "auto", *, tip: bool):
    """STM-Net (live reconstruction, and replay's offline check) and, given ``tip``, the tip
    classifier (else None); a missing checkpoint raises FileNotFoundError naming the fix."""
    return load_stmnet(device=device), load_tip_classifier(device=device) if tip else None


def _each(listeners: list[Callable[[dict], Any]]) -> Callable[[dict], None]:
    def call(record: dict) -> None:
        for listener in listeners:
            listener(record)

    return call


def _connect_worker(c: Consumers, worker: str, sink: Callback, wait_s: float, say) -> None:
    """Publish to a remote worker over 0MQ and collect its results into ``sink``."""
    out, results = parse_worker(worker)
    c.proxy = DocumentProxy(out_address=out)
    c._closers.append(c.proxy.stop)
    c.receiver = ResultReceiver(results)
    c._closers.append(c.receiver.close)
    c.receiver.subscribe(sink)  # called on one thread: one journal writer suffices
    say(
        f"waiting up to {wait_s:.0f} s for a worker: stm-live worker "
        f"--connect {c.proxy.out_address} --results {c.receiver.address}"
    )
    if not c.receiver.wait_ready(1, timeout=wait_s):
        raise ValueError(
            f"--worker {worker}: no worker said hello on {c.receiver.address} within "
            f"{wait_s:.0f} s; start one with: stm-live worker --connect "
            f"{c.proxy.out_address} --results {c.receiver.address}"
        )
    c.publisher = make_publisher(c.proxy.in_address)
    c._closers.append(c.publisher.close)
    c.inline.append(c.publisher)


class AcquisitionSession:
    """A RunEngine with a session's consumers attached (:func:`build_consumers`).

    Parameters
    ----------
    data_dir : path
        Journal in ``data_dir/journal``; embedded tiled in ``data_dir/tiled``.
    callbacks : iterable of callables ``(name, doc)``
        Extra consumers, each on its own thread (:class:`ThreadedCallback`), in document order.
    inline_callbacks : iterable of callables
        Consumers that must see documents on the RunEngine loop (fast ones only).
    RE : RunEngine, optional
        Use this RunEngine instead of making one (the queue server's).
    **options
        The rest of :func:`build_consumers`: ``tiled``, ``tiled_uri``, ``progress``, ``live``,
        ``worker``, ``tip``, ``stm`` and ``tip_policy``, ...
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        callbacks: Iterable[Callback] = (),
        inline_callbacks: Iterable[Callback] = (),
        RE: RunEngine | None = None,
        **options,
    ):
        self.data_dir = Path(data_dir)
        self.RE = RE if RE is not None else RunEngine({})
        self.consumers = build_consumers(self.data_dir, callbacks=callbacks, inline=inline_callbacks, **options).attach(
            self.RE
        )
        self._unwatch: list[Callable[[], Any]] = []  # undoes watch()

    def __getattr__(self, name: str):
        # the consumers' parts: journal, ingestor, live, tip, policy, collector, receiver,
        # recovered, migrated, tiled_error, progress, threaded
        if name in (
            "journal",
            "ingestor",
            "live",
            "tip",
            "policy",
            "collector",
            "receiver",
            "recovered",
            "migrated",
            "tiled_error",
            "progress",
            "threaded",
            "tiled_server",
        ):
            return getattr(self.__dict__["consumers"], name)
        raise AttributeError(name)

    @property
    def tiled_client(self):
        return self.ingestor.client if self.ingestor else None

    def __call__(self, plan, *args, **kwargs):
        """Run a plan; returns the RunEngine's result (the run uids)."""
        return self.RE(plan, *args, **kwargs)

    def watch(self, stm, *, say: Callable[[str], Any] | None = None):
        """Suspend frames while ``stm``'s link is down (a :class:`~stm_live.suspenders.LinkSuspender`
        on this RunEngine) and, given ``say``, report each link fault in one line
        (:class:`~stm_live.console.LinkReporter`). Undone by :meth:`close`. Returns the suspender."""
        suspender = LinkSuspender(stm)
        self.RE.install_suspender(suspender)
        self._unwatch.append(lambda: self.RE.remove_suspender(suspender))
        if say is not None:
            self._unwatch.append(LinkReporter(stm, say, RE=self.RE).close)
        return suspender

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait for the consumers and tiled ingestion to catch up."""
        return self.consumers.wait(timeout)

    def close(self, timeout: float = 60.0) -> None:
        self.consumers.wait(timeout)
        while self._unwatch:
            self._unwatch.pop()()
        self.consumers.close(timeout)

    def __enter__(self) -> AcquisitionSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
