"""Live STM-Net reconstruction while the frame is being scanned.

``LiveReconstruction`` is a Bluesky callback. Its ``__call__`` runs on the RunEngine's
loop, so it only copies the new line into a ``FrameAssembler`` and wakes a worker thread;
STM-Net runs on that thread. When the network is slower than the line rate, updates are
coalesced (all lines that arrived meanwhile go into the next update) and no raw line is
ever dropped.

Cost per update is bounded as the frame grows: an intermediate update reconstructs only a
band — the new rows plus ``band_margin`` rows of context above them — and splices it into
the running image, mapped from the band's percentile normalisation (which ``reconstruct``
applies to each input) onto the acquired frame's. On simulated 192² frames the live image
just before stop correlates 0.93-0.98 with the final one at ``band_margin=32``. At stop,
the whole frame is reconstructed once, so the final image equals
``reconstructor.reconstruct(final_frame, pixel_size_nm)``.

Results are a derived run (``event_model.compose_run``, ``parent_uid`` = the scan's start
uid) with one stream, ``"reconstruction"``; each event holds the running image, the lines
it newly includes and their latency. The documents go to ``emit(name, doc)``, called from
the worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from event_model import DocumentRouter, compose_run, unpack_event_page

from stm_live.callbacks.frames import FrameAssembler
from stm_live.interpret import stmnet_scope
from stm_live.models.consistency import check_reconstruction

logger = logging.getLogger(__name__)

__all__ = ["CHECK_STREAM", "LiveReconstruction", "STREAM", "percentile_ms"]

STREAM = "reconstruction"
CHECK_STREAM = "consistency"  # one event at the end: residual, view spread, fitted tip s share
_MIN_BAND = 8  # rows; Reconstructor needs >= 4 and the U-Net pads to 2**depth anyway


def percentile_ms(latencies, q: float) -> float:
    """Percentile ``q`` of latencies given in seconds, in ms (NaN when empty)."""
    values = np.asarray(list(latencies), dtype=float)
    return float(np.percentile(values, q) * 1e3) if values.size else float("nan")


class _Run:
    """State of one scan being reconstructed."""

    def __init__(self, start: dict, assembler: FrameAssembler):
        self.start = start
        self.uid: str = start["uid"]
        self.asm = assembler
        self.pending: set[int] = set()  # rows arrived since the last update
        self.arrivals: dict[int, float] = {}  # row -> perf_counter at arrival
        self.stop_doc: dict | None = None
        self.announced = False
        self.done = False
        self.image = np.full((assembler.lines, assembler.pixels), np.nan, np.float32)
        self.covered = np.zeros(assembler.lines, dtype=bool)  # rows with a reconstruction
        self.last_update = -np.inf
        self.updates = 0
        self.bundle = None
        self.event = None  # compose_event of the derived stream
        self.check_event = None  # compose_event of the consistency stream
        self.final: np.ndarray | None = None
        self.in_scope, self.scope_reason = True, ""  # STM-Net applies (set at announce)


class LiveReconstruction(DocumentRouter):
    """Reconstruct the frame being scanned, line by line, off the RunEngine loop.

    Parameters
    ----------
    reconstructor : object with ``.reconstruct(image, pixel_size_nm, line_spacing_nm=...)``, optional
        Default: ``stm_live.models.load_stmnet(device)`` (the shipped checkpoint).
    device : str
        Torch device for the default reconstructor ("auto": CUDA when present).
    min_interval_s : float
        Minimum time between intermediate updates of one run (0: as fast as the
        network allows). The final reconstruction is never delayed.
    emit : callable(name, doc), optional
        Receives the derived run's documents, from the worker thread.
    snapshot_every : int or None
        Every N-th intermediate update reconstructs the whole partial frame instead of a
        band, re-synchronising the spliced image. None: only the final one is full.
    band_margin : int or None
        Rows of context above the new rows in a band update. None: every update is a
        full-frame reconstruction (the right choice when the network is cheap, e.g. GPU).
    stream : str
        The scan's event stream holding the lines.
    """

    def __init__(
        self,
        reconstructor=None,
        *,
        device: str = "auto",
        min_interval_s: float = 0.0,
        emit: Callable[[str, dict], Any] | None = None,
        snapshot_every: int | None = None,
        band_margin: int | None = 32,
        stream: str = "primary",
        history: int = 100_000,
    ):
        super().__init__()  # emit handled here: DocumentRouter keeps only a weak reference
        if reconstructor is None:
            from stm_live.models import load_stmnet  # noqa: PLC0415 - torch: the viewer imports this module

            reconstructor = load_stmnet(device=device)
        if not callable(getattr(reconstructor, "reconstruct", None)):
            raise ValueError("reconstructor must have a .reconstruct(image, pixel_size_nm) method")
        if emit is not None and not callable(emit):
            raise ValueError("emit must be callable as emit(name, doc)")
        if snapshot_every is not None and int(snapshot_every) < 1:
            raise ValueError(f"snapshot_every must be >= 1 or None, got {snapshot_every!r}")
        if band_margin is not None and int(band_margin) < 0:
            raise ValueError(f"band_margin must be >= 0 or None, got {band_margin!r}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s!r}")
        self.reconstructor = reconstructor
        self.min_interval_s = float(min_interval_s)
        self.snapshot_every = snapshot_every
        self.band_margin = band_margin
        self.stream = stream
        self._emitters: list[Callable[[str, dict], Any]] = [emit] if emit is not None else []
        self._runs: dict[str, _Run] = {}
        self._by_descriptor: dict[str, _Run] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self.latest: dict | None = None  # the newest update, for viewers
        self.history: deque[tuple[int, float]] = deque(maxlen=history)  # (line, latency s)
        self.finals: dict[str, np.ndarray] = {}  # scan uid -> final reconstruction (last 8)
        self.final_inputs: dict[str, np.ndarray] = {}  # scan uid -> the frame it was made from
        self.errors: deque[str] = deque(maxlen=100)  # newest problems, for the operator
        self.lines_received = 0
        self.updates = 0
        self.orphan_events = 0  # events of runs whose start we never saw
        self._thread = threading.Thread(target=self._work, name="live-reconstruction", daemon=True)
        self._thread.start()

    def subscribe(self, emit: Callable[[str, dict], Any]) -> None:
        """Also send the derived documents to ``emit(name, doc)`` (called on the worker thread)."""
        self._emitters.append(emit)

    # ------------------------------------------------------------ RunEngine side
    def __call__(self, name: str, doc: dict, validate: bool = False):
        # Never let a problem here stop the acquisition: log it and keep the raw data flowing.
        try:
            return super().__call__(name, doc, validate)
        except Exception as exc:
            msg = f"live reconstruction ignored a {name} document: {exc}"
            logger.error(msg)
            self.errors.append(msg)
            return name, doc

    def start(self, doc):
        asm = FrameAssembler(self.stream)
        if "stm_live" not in doc:
            return None  # not a live-frame run (e.g. a recondition plan): nothing to do
        asm.start(doc)  # raises FrameError, logged by __call__
        with self._cond:
            self._runs[doc["uid"]] = _Run(doc, asm)
            self._cond.notify_all()
        return None

    def descriptor(self, doc):
        with self._cond:
            run = self._runs.get(doc.get("run_start"))
            if run is not None:
                run.asm.descriptor(doc)
                self._by_descriptor[doc["uid"]] = run
        return None

    def event(self, doc):
        now = time.perf_counter()
        with self._cond:
            run = self._by_descriptor.get(doc.get("descriptor"))
            if run is None:
                self.orphan_events += 1
                return None
            row = run.asm.event(doc)
            if row is None:
                return None
            self.lines_received += 1
            run.pending.add(row)
            run.arrivals[row] = now
            self._cond.notify_all()
        return None

    def event_page(self, doc):

        for event in unpack_event_page(doc):
            self.event(event)
        return None

    def stop(self, doc):
        with self._cond:
            run = self._runs.get(doc.get("run_start"))
            if run is not None:
                run.stop_doc = doc
                self._cond.notify_all()
        return None

    # ------------------------------------------------------------ public helpers
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every stopped run has its final reconstruction and nothing is
        pending; True if so within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                busy = self._busy or any(
                    r.pending or (r.stop_doc is not None and not r.done) for r in self._runs.values()
                )
                if not busy:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def stats(self) -> dict:
        with self._cond:  # the worker appends to history
            lat = [latency for _, latency in self.history]
        return {
            "lines": self.lines_received,
            "updates": self.updates,
            "p50_ms": percentile_ms(lat, 50),
            "p99_ms": percentile_ms(lat, 99),
            "errors": len(self.errors),
        }

    def frame(self, scan_uid: str) -> np.ndarray:
        """The reconstruction input of scan ``scan_uid``: as assembled so far while it runs,
        the final frame after its stop (the last 8 runs)."""
        with self._cond:
            if scan_uid in self._runs:
                return self._runs[scan_uid].asm.source_image()
            if scan_uid in self.final_inputs:
                return self.final_inputs[scan_uid].copy()
        raise KeyError(f"no live frame for run {scan_uid!r}")

    # ------------------------------------------------------------ worker thread
    def _next_job(self) -> tuple[str, _Run | None, float]:
        """(kind, run, wait_s) under the lock; kind "" means wait up to ``wait_s``."""
        now = time.perf_counter()
        wait = 0.5  # bounded idle wait; wakes on notify anyway
        for run in list(self._runs.values()):
            if run.done:
                continue
            if not run.announced:
                return "announce", run, 0.0
            if run.stop_doc is not None:
                return "final", run, 0.0  # pending lines are coalesced into the final image
            if run.pending:
                due = run.last_update + self.min_interval_s - now
                if due <= 0:
                    return "update", run, 0.0
                wait = min(wait, due)
        return "", None, wait

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
                kind, run, wait = self._next_job()
                if not kind:
                    self._cond.wait(wait)
                    continue
                self._busy = True
            try:
                getattr(self, "_" + kind)(run)
            except Exception as exc:  # a failed update must not kill the worker
                msg = f"live reconstruction {kind} failed for run {run.uid[:8]}: {exc}"
                logger.error(msg)
                self.errors.append(msg)
                if kind in ("final", "announce"):  # never retry these: no busy loop
                    try:
                        self._finish(run, exit_status="fail", reason=str(exc))
                    except Exception as exc2:
                        logger.error("could not close the derived run: %s", exc2)
                        with self._cond:
                            run.done = True
                            self._runs.pop(run.uid, None)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, name: str, doc: dict) -> None:
        for emit in list(self._emitters):
            try:
                emit(name, doc)
            except Exception as exc:  # one broken consumer must not stop the others
                logger.error("live reconstruction emit(%s) failed: %s", name, exc)
                self.errors.append(f"emit {name}: {exc}")

    def _announce(self, run: _Run) -> None:
        asm = run.asm
        channel, direction = asm.source
        # Out of STM-Net's scope (an overview, a 7x7 lattice at 0.2 nm/px): the derived run
        # says why and holds no reconstruction, rather than an unbounded network pass.
        net_in = asm.network_input()
        scope = stmnet_scope(net_in.image.shape, net_in.pixel_size_nm, net_in.line_spacing_nm)
        run.in_scope, run.scope_reason = scope.ok, scope.reason
        if not scope.ok:
            logger.info("live reconstruction of run %s skipped: %s", run.uid[:8], scope.reason)
        run.bundle = compose_run(
            metadata={
                "parent_uid": run.uid,
                "plan_name": "live_reconstruction",
                "stm_live_derived": "reconstruction",
                "reconstruction": {
                    "source_channel": channel,
                    "source_direction": direction,
                    "z_controller": asm.z_controller,
                    "pixel_size_nm": asm.pixel_size_nm,
                    "lines": asm.lines,
                    "pixels": asm.pixels,
                    "band_margin": self.band_margin,
                    "line_spacing_nm": net_in.line_spacing_nm,
                    "in_scope": scope.ok,
                    "scope_reason": scope.reason,
                    "notes": net_in.notes,
                },
            }
        )
        source = "stm_live.live"
        data_keys = {
            "reconstruction": {
                "dtype": "array",
                "shape": [asm.lines, asm.pixels],
                "dtype_numpy": "<f4",
                "source": source,
                "units": "a.u.",
                "dims": ["line", "pixel"],
            },
            "lines": {"dtype": "array", "shape": [None], "dtype_numpy": "<i8", "source": source},
            "lines_done": {"dtype": "integer", "shape": [], "source": source},
            "row_start": {"dtype": "integer", "shape": [], "source": source},
            "row_stop": {"dtype": "integer", "shape": [], "source": source},
            "latency_s": {"dtype": "number", "shape": [], "source": source, "units": "s"},
            "compute_s": {"dtype": "number", "shape": [], "source": source, "units": "s"},
            "full_frame": {"dtype": "boolean", "shape": [], "source": source},
            "final": {"dtype": "boolean", "shape": [], "source": source},
            # self-consistency of each update (models/consistency.py): NaN before enough lines
            "agreement": {"dtype": "number", "shape": [], "source": source},
            "w_s": {"dtype": "number", "shape": [], "source": source},
            "orbital": {"dtype": "boolean", "shape": [], "source": source},
        }
        desc = run.bundle.compose_descriptor(name=STREAM, data_keys=data_keys)
        run.event = desc.compose_event
        image_key = {
            "dtype": "array",
            "shape": [asm.lines, asm.pixels],
            "dtype_numpy": "<f4",
            "source": source,
            "units": "a.u.",
            "dims": ["line", "pixel"],
        }
        check_keys = {
            "residual": image_key,
            "view_spread": image_key,
            **{
                k: {"dtype": "number", "shape": [], "source": source}
                for k in ("spread", "agreement", "w_s", "explained")
            },
            "orbital": {"dtype": "boolean", "shape": [], "source": source},
            "reason": {"dtype": "string", "shape": [], "source": source},
        }
        check_desc = run.bundle.compose_descriptor(name=CHECK_STREAM, data_keys=check_keys)
        run.check_event = check_desc.compose_event
        run.announced = True
        self._send("start", run.bundle.start_doc)
        self._send("descriptor", desc.descriptor_doc)
        self._send("descriptor", check_desc.descriptor_doc)

    def _take(self, run: _Run) -> tuple[list[int], np.ndarray, np.ndarray, dict[int, float]]:
        with self._cond:
            rows = sorted(run.pending)
            run.pending.clear()
            arrivals = {r: run.arrivals[r] for r in rows}
            return rows, run.asm.network_input(), run.asm.acquired_mask, arrivals

    def _reconstruct(self, net_in, rows: slice = slice(None)) -> np.ndarray:
        """STM-Net on ``net_in``'s image (or a band of its rows) at the frame's pitches."""
        return np.asarray(
            self.reconstructor.reconstruct(
                net_in.image[rows], net_in.pixel_size_nm, line_spacing_nm=net_in.line_spacing_nm
            ),
            np.float32,
        )

    def _update(self, run: _Run) -> None:
        rows, net_in, acquired, arrivals = self._take(run)
        if not rows or not run.in_scope:
            return
        t0 = time.perf_counter()
        # A backlog (worker behind, or catching up) makes the band as big as the frame:
        # then one full-frame pass costs about the same and has all the context.
        backlog = rows[-1] - rows[0] + 1 + (self.band_margin or 0) > run.asm.lines // 2
        full = (
            self.band_margin is None
            or backlog
            or (self.snapshot_every is not None and (run.updates + 1) % self.snapshot_every == 0)
        )
        if full:
            run.image = self._reconstruct(net_in)
            run.covered = acquired.copy()
            start, stop = 0, run.asm.lines
        else:
            start, stop = self._splice_band(run, net_in, rows)
        check = self._check(net_in, run.image)
        run.last_update = time.perf_counter()
        self._publish(
            run, rows, arrivals, start, stop, full=full, final=False, check=check, compute_s=run.last_update - t0
        )

    def _splice_band(self, run: _Run, net_in, rows: list[int]) -> tuple[int, int]:
        """Reconstruct the new rows plus context above them; splice into ``run.image``."""
        lines = run.asm.lines
        first, last = rows[0], rows[-1] + 1
        margin = int(self.band_margin)
        start = max(0, first - margin)
        stop = min(lines, max(last, start + _MIN_BAND))
        start = max(0, min(start, stop - _MIN_BAND))
        image = net_in.image
        band = self._reconstruct(net_in, slice(start, stop))
        # The band's top rows lack context above: replace only rows >= keep, except rows
        # never reconstructed before.
        keep = max(start, first - margin // 2) if start > 0 else 0
        band = _to_frame_scale(band, image[start:stop], image)
        take = np.arange(start, stop)
        take = (take >= keep) | ~run.covered[start:stop]
        run.image[start:stop][take] = band[take]
        run.covered[start:stop] |= np.isfinite(band).any(axis=1)
        return start, stop

    def _final(self, run: _Run) -> None:
        rows, net_in, acquired, arrivals = self._take(run)
        image = net_in.image
        t0 = time.perf_counter()
        if not run.in_scope:
            self._finish(run, exit_status="abort", reason=f"not reconstructed: {run.scope_reason}")
        elif acquired.any():
            detailed = getattr(self.reconstructor, "reconstruct_detailed", None)  # STM-Net has it
            network = None
            if detailed is not None:
                rec = detailed(image, net_in.pixel_size_nm, line_spacing_nm=net_in.line_spacing_nm)
                run.image, spread = np.asarray(rec.image, np.float32), np.asarray(rec.view_spread, np.float32)
                spread_summary, network = float(rec.spread), getattr(rec, "network", None)
            else:
                run.image = self._reconstruct(net_in)
                spread, spread_summary = np.full_like(run.image, np.nan), float("nan")
            check = self._check(net_in, run.image, network)
            run.covered = acquired
            run.final = run.image.copy()
            for store, value in ((self.finals, run.final), (self.final_inputs, image)):
                store[run.uid] = value
                while len(store) > 8:
                    store.pop(next(iter(store)))
            self._publish(
                run,
                rows,
                arrivals,
                0,
                run.asm.lines,
                full=True,
                final=True,
                check=check,
                compute_s=time.perf_counter() - t0,
            )
            summary = check.summary()
            data = {
                "residual": check.residual,
                "view_spread": spread,
                "spread": spread_summary,
                "agreement": summary["agreement"],
                "w_s": summary["w_s"],
                "explained": summary["explained"],
                "orbital": bool(check.in_scope),
                "reason": check.reason,
            }
            now = time.time()
            self._send("event", run.check_event(data=data, timestamps={k: now for k in data}))
            reason = "" if check.in_scope else check.reason  # it says "not a CO-tip orbital image"
            self._finish(run, exit_status=run.stop_doc.get("exit_status", "success"), reason=reason)
        else:
            self._finish(run, exit_status="fail", reason="no scan line arrived")

    @staticmethod
    def _check(net_in, image: np.ndarray, network=None):
        """Whether the reconstruction predicts the measured CO-tip image (models/consistency.py);
        ``network``: the reconstruction on the network's finer grid, where there is one."""

        return check_reconstruction(net_in.image, image, net_in.pixel_size_nm, net_in.line_spacing_nm, network=network)

    def _publish(self, run: _Run, rows, arrivals, start, stop, *, full, final, check, compute_s) -> None:
        done = time.perf_counter()
        latencies = [(r, done - arrivals[r]) for r in rows]
        with self._cond:
            self.history.extend(latencies)
        image = run.image.copy()
        n_lines = int(run.covered.sum())
        data = {
            "reconstruction": image,
            "lines": np.asarray(rows, dtype=np.int64),
            "lines_done": n_lines,
            "row_start": int(start),
            "row_stop": int(stop),
            "latency_s": float(max((lat for _, lat in latencies), default=0.0)),
            "compute_s": float(compute_s),
            "full_frame": bool(full),
            "final": bool(final),
            "agreement": float(check.agreement),
            "w_s": float(check.w_s),
            "orbital": bool(check.in_scope),
        }
        now = time.time()
        event = run.event(data=data, timestamps={k: now for k in data})
        run.updates += 1
        self.updates += 1
        self.latest = {
            "run": run.uid,
            "image": image,
            "lines": list(rows),
            "lines_done": n_lines,
            "latency_s": data["latency_s"],
            "final": final,
            "time": now,
        }
        self._send("event", event)

    def _finish(self, run: _Run, *, exit_status: str, reason: str = "") -> None:
        if run.bundle is not None:
            self._send("stop", run.bundle.compose_stop(exit_status=exit_status, reason=reason))
        with self._cond:
            run.done = True
            # Keep the finished run only as its final image; drop the frames.
            self._runs.pop(run.uid, None)
            self._by_descriptor = {k: v for k, v in self._by_descriptor.items() if v is not run}
            self._cond.notify_all()


def _to_frame_scale(out: np.ndarray, band_input: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Map a band's output from the band's own normalisation to the frame's.

    ``reconstruct`` scales its input by robust percentiles (0.5 %, 99.5 %); the band's
    differ from the acquired frame's. Mapping each band independently onto the frame's
    scale keeps the spliced image consistent without chaining band-to-band corrections.
    """
    fin = frame[np.isfinite(frame)]
    bin_ = band_input[np.isfinite(band_input)]
    if fin.size < 16 or bin_.size < 16:
        return out
    step = max(1, fin.size // 65536)  # a subsample is plenty for two percentiles
    g_lo, g_hi = np.percentile(fin[::step], [0.5, 99.5])
    b_lo, b_hi = np.percentile(bin_, [0.5, 99.5])
    if g_hi <= g_lo or b_hi <= b_lo:
        return out
    scale = (b_hi - b_lo) / (g_hi - g_lo)
    return (out * scale + (b_lo - g_lo) / (g_hi - g_lo)).astype(np.float32)
