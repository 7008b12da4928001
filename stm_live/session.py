"""An acquisition session: RunEngine + durable journal + callbacks + tiled + progress.

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

from stm_live.store import JournalWriter, TiledIngestor, journals_to_ingest, open_tiled

logger = logging.getLogger(__name__)

__all__ = ["AcquisitionSession", "ThreadedCallback", "LineProgress", "run_scan"]

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
            target=self._work, name=name or f"cb-{getattr(callback, '__name__', 'callback')}",
            daemon=True)
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
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self._tasks: dict[str, int] = {}          # frame run uid -> progress task
        self._line_keys: dict[str, str] = {}      # frame run uid -> line index key
        self._lines: dict[str, set[int]] = {}     # frame run uid -> distinct lines seen
        self._streams: dict[str, str] = {}        # primary descriptor uid -> frame run uid
        self._started = False

    def __call__(self, name: str, doc: dict) -> None:
        # Follows every frame run by its own documents: other runs (reconditioning) may open
        # meanwhile, and a rewind re-sends a line, which counts once.
        if name == "start" and doc.get("stm_live"):
            meta = doc["stm_live"]
            if not self._started:
                self.progress.start()
                self._started = True
            self._tasks[doc["uid"]] = self.progress.add_task(
                f"frame {doc['uid'][:8]}", total=meta["lines"])
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
            self.progress.update(task, description=f"frame {doc['run_start'][:8]} "
                                                   f"{doc['exit_status']}")

    def close(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False


class AcquisitionSession:
    """RunEngine wired for durable live acquisition.

    Parameters
    ----------
    data_dir : path
        Journal in ``data_dir/journal``; embedded tiled in ``data_dir/tiled``.
    callbacks : iterable of callables ``(name, doc)``
        Extra consumers (live reconstruction, tip monitor, ...). Each runs on its own
        thread (:class:`ThreadedCallback`), in document order.
    inline_callbacks : iterable of callables
        Consumers that must see documents on the RunEngine loop (fast ones only).
    tiled : bool
        Ingest each finished run into tiled (background thread).
    tiled_uri : str, optional
        An existing tiled server; default is an embedded one in ``data_dir/tiled``.
    progress : bool
        Show a rich progress bar per frame.
    RE : RunEngine, optional
        Use this RunEngine instead of making one.
    """

    def __init__(self, data_dir: str | os.PathLike, *, callbacks: Iterable[Callback] = (),
                 inline_callbacks: Iterable[Callback] = (), tiled: bool = False,
                 tiled_uri: str | None = None, progress: bool = False,
                 RE: RunEngine | None = None, fsync: bool = True):
        self.data_dir = Path(data_dir)
        self.RE = RE if RE is not None else RunEngine({})
        self.journal = JournalWriter(self.data_dir, fsync=fsync, on_stop=[self._run_finished])
        # subscribed first: every consumer sees a document only once it is on disk
        self._tokens = [self.RE.subscribe(self.journal)]
        self.threaded = [ThreadedCallback(cb) for cb in callbacks]
        for cb in list(inline_callbacks) + self.threaded:
            self._tokens.append(self.RE.subscribe(cb))
        self.progress = LineProgress() if progress else None
        if self.progress:
            self._tokens.append(self.RE.subscribe(self.progress))
        self.ingestor: TiledIngestor | None = None
        self.tiled_server = None
        self._tiled_ready = threading.Event()
        self._tiled_error: Exception | None = None
        self._waiting: list[Path] = []
        self.recovered: list[str] = []  # uids re-ingested from earlier sessions' journals
        self._lock = threading.Lock()
        if tiled or tiled_uri:
            # Starting tiled takes seconds: do it beside the first frame, not before it.
            threading.Thread(target=self._start_tiled, args=(tiled_uri,), name="tiled-start",
                             daemon=True).start()
        else:
            self._tiled_ready.set()  # nothing to wait for

    def _start_tiled(self, tiled_uri):
        try:
            client, self.tiled_server = open_tiled(self.data_dir, tiled_uri)
            ingestor = TiledIngestor(client)
        except Exception as exc:
            logger.error("tiled unavailable (%s); runs stay in the journal", exc)
            self._tiled_error = exc
            self._tiled_ready.set()
            return
        with self._lock:
            self.ingestor = ingestor
            # crash recovery: journals of earlier sessions that never reached tiled
            try:
                recover = journals_to_ingest(client, self.data_dir,
                                             skip=list(self.journal._runs) +
                                             [p.stem for p in self._waiting])
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

    @property
    def tiled_error(self) -> Exception | None:
        """Why tiled could not be used (runs then stay in the journal only)."""
        return self._tiled_error

    @property
    def tiled_client(self):
        return self.ingestor.client if self.ingestor else None

    def __call__(self, plan, *args, **kwargs):
        """Run a plan; returns the RunEngine's result (the run uids)."""
        return self.RE(plan, *args, **kwargs)

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait for threaded callbacks and tiled ingestion to catch up."""
        ok = all(cb.join(timeout) for cb in self.threaded)
        if self._tiled_ready.wait(timeout) and self.ingestor is not None:
            ok = self.ingestor.join(timeout) and ok
        return ok

    def close(self, timeout: float = 60.0) -> None:
        self.wait(timeout)
        for token in self._tokens:
            self.RE.unsubscribe(token)
        for cb in self.threaded:
            cb.close(timeout)
        if self.progress:
            self.progress.close()
        self.journal.close()
        if self.ingestor is not None:
            self.ingestor.close(timeout)
        if self.tiled_server is not None:
            self.tiled_server.close()

    def __enter__(self) -> "AcquisitionSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------- live consumers
class DerivedCollector:
    """Reads derived documents (live reconstruction, tip verdicts) by parent scan uid.

    Works on the documents alone, so the in-process callbacks and a remote worker's
    results (``streaming.ResultReceiver``) are summarised the same way. Accepts the
    derived start documents of docs/interfaces.md and the variants the callbacks emit
    today (``stm_live_derived`` as a dict with ``kind``; ``purpose="tip_verdicts"``).
    """

    def __init__(self) -> None:
        import threading

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
            raise ValueError(f"--worker {address!r}: expected "
                             "tcp://127.0.0.1:PORT[,tcp://127.0.0.1:PORT]")
        results = f"{host}:{int(port) + 2}"
    elif "://" not in results:
        results = "tcp://" + results.strip()
    return out, results.strip()


class Consumers:
    """The live consumers of acquired documents: in-process (LiveReconstruction +
    TipMonitor on their own threads) or a remote worker over 0MQ. Derived documents are
    journaled and collected. Used by ``stm-live replay`` and ``stm-live scan``.

    ``tip_monitor=False`` leaves the tip to a caller that runs its own monitor (the scan's
    reconditioning policy)."""

    def __init__(self, data_dir: Path, *, worker: str | None, reconstructor, classifier,
                 viewer_state=None, worker_wait_s: float = 60.0, tip_monitor: bool = True):
        from stm_live.store import JournalWriter

        self.collector = DerivedCollector()
        self.inline: list[Callable] = []
        self._closers: list[Callable[[], Any]] = []
        self.remote = worker is not None
        if viewer_state is not None:
            self.inline.append(viewer_state)
        if worker is None:
            from stm_live.callbacks.live import LiveReconstruction
            from stm_live.callbacks.tipmonitor import TipMonitor

            # Each emitter calls from its own thread, so each gets its own journal writer.
            self.live = LiveReconstruction(reconstructor, emit=fan_out(
                JournalWriter(data_dir), self.collector, viewer_state))
            # Both only copy/queue on the RunEngine loop; the work is on their threads.
            self.inline.append(self.live)
            self._closers.append(self._close_live)
            if tip_monitor:
                self.tip = TipMonitor(classifier)
                self.tip.subscribe(fan_out(JournalWriter(data_dir), self.collector, viewer_state))
                self.inline.append(self.tip)
                self._closers.append(self.tip.close)
        else:
            from stm_live.streaming import DocumentProxy, ResultReceiver, make_publisher

            out, results = parse_worker(worker)
            self.proxy = DocumentProxy(out_address=out)
            self._closers.append(self.proxy.stop)
            self.receiver = ResultReceiver(results)
            self._closers.insert(0, self.receiver.close)
            # The receiver calls subscribers on one thread: one journal writer suffices.
            self.receiver.subscribe(fan_out(JournalWriter(data_dir), self.collector,
                                             viewer_state))
            print(f"waiting up to {worker_wait_s:.0f} s for a worker: stm-live worker "
                  f"--connect {self.proxy.out_address} --results {self.receiver.address}",
                  flush=True)
            if not self.receiver.wait_ready(1, timeout=worker_wait_s):
                self.close()
                raise ValueError(
                    f"--worker {worker}: no worker said hello on {self.receiver.address} within "
                    f"{worker_wait_s:.0f} s; start one with: stm-live worker --connect "
                    f"{self.proxy.out_address} --results {self.receiver.address}")
            self.publisher = make_publisher(self.proxy.in_address)
            self._closers.insert(0, self.publisher.close)
            self.inline.append(self.publisher)

    def _close_live(self) -> None:
        """Finish the queued work first: the last frame's final reconstruction and its check
        are often still queued when the acquisition ends."""
        self.live.flush(120.0)
        self.live.close()

    def close(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception as exc:
                logger.error("closing %r failed: %s", close, exc)
        self._closers.clear()



def run_scan(*, profile: str = "sim", host: str | None = None, port: int | None = None,
             width_nm: float = 5.0, pixels: int = 128, lines: int = 128,
             direction: str = "down", frames: int = 1,
             data_dir: str | os.PathLike = "stm_live_data", tiled_uri: str | None = None,
             tip_policy: str = "prompt", worker: str | None = None, view: bool = False,
             callbacks: Iterable[Callback] = ()) -> list[str]:
    """``stm-live scan``: acquire ``frames`` live frames centred where the controller's
    frame is, journaled and ingested into tiled. Returns the run uids.

    ``tip_policy`` other than "off" runs the tip monitor (shipped classifier) and the
    reconditioning policy (:mod:`stm_live.reconditioning`); ``worker`` publishes the
    documents to a 0MQ proxy (:mod:`stm_live.streaming`); ``view`` serves the live viewer.
    """
    from stm_live.config import load_profile
    from stm_live.devices.stm import NanonisSTM
    from stm_live.plans import live_frame

    if tip_policy not in ("off", "prompt", "auto"):
        raise ValueError(f"tip_policy must be off, prompt or auto, not {tip_policy!r}")
    if direction not in ("down", "up"):
        raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
    prof = load_profile(profile)
    host = host or prof.host
    port = int(port or prof.port)
    width_m = float(width_nm) * 1e-9
    prof.check_pixels(pixels, lines)
    stm = NanonisSTM(host, port, name="stm", profile=prof, timeout=prof.timeout_s)
    inline: list[Callback] = []
    threaded: list[Callback] = list(callbacks)
    closers: list[Callable[[], Any]] = []
    policy = None
    uids: list[str] = []
    try:
        if view:
            from stm_live.viewer import Viewer, ViewerState

            state = ViewerState()
            viewer = Viewer(state)
            print(f"viewer: {viewer.url}", flush=True)
            closers.append(viewer.close)  # the consumers below feed the viewer's state
        else:
            state = None
        # Live reconstruction: in-process on its own thread, or on a remote worker over
        # 0MQ (whose results are journaled here); the same consumers as `stm-live replay`.
        from stm_live.models import load_stmnet

        consumers = Consumers(Path(data_dir), worker=worker,
                              reconstructor=None if worker else load_stmnet(),
                              classifier=None, viewer_state=state, tip_monitor=False)
        inline.extend(consumers.inline)
        closers.append(consumers.close)
        if tip_policy != "off":
            from stm_live.callbacks.tipmonitor import TipMonitor
            from stm_live.reconditioning import TipReconditioner

            policy = TipReconditioner(stm, policy=tip_policy)
            tip = TipMonitor(on_verdict=policy.on_verdict)
            policy.monitor = tip
            inline.append(tip)  # TipMonitor hands classification to its own thread
            closers.append(tip.close)
        centre = stm.client.scan_frame_get()
        with AcquisitionSession(data_dir, callbacks=threaded, inline_callbacks=inline,
                                tiled=True, tiled_uri=tiled_uri, progress=True) as session:
            if policy is not None:
                policy.install(session.RE)
                closers.insert(0, policy.remove)
            for _ in range(frames):
                uids += session(live_frame(
                    stm, frame=(centre.center_x, centre.center_y, width_m, width_m,
                                centre.angle_deg),
                    pixels=pixels, lines=lines, channels=list(prof.channel_indexes)[:2],
                    direction=direction, md={"tip_policy": tip_policy}))
            session.wait()
            if worker:  # bounded: the worker's final reconstructions, before closing the link
                for uid in uids:
                    if consumers.receiver.wait_final(uid, timeout=60.0) is None:
                        print(f"run {uid}: no final reconstruction from the worker within 60 s; "
                              "the raw lines are in the journal", flush=True)
            if session.tiled_error is not None:
                print(f"tiled unavailable ({session.tiled_error}); runs are in the journal",
                      flush=True)
    finally:
        for close in closers:
            try:
                close()
            except Exception:  # cleanup of one part must not hide the others
                logger.exception("closing %r failed", close)
        stm.close()
    for uid in uids:
        print(f"run {uid}: journal {Path(data_dir) / 'journal' / (uid + '.journal')}")
    return uids
