"""TipMonitor: watch the tip while a frame is scanned.

A Bluesky callback that consumes live-frame documents (docs/interfaces.md), and on a worker
thread (never on the RunEngine's loop) runs the line-level change detector
(:mod:`stm_live.callbacks.tipwatch`) on every line and the tip classifier every ``every_n_lines``
lines, right after a detected change, and at the end of the frame. The classifier sees the
lines scanned since the last detected change (once there are ``min_rows`` of them), so a
verdict describes the *current* tip.

Verdicts go out three ways:

- as Bluesky documents of their own run, linked to the frame's run by ``parent_uid``
  (start key ``purpose="tip_verdicts"``), stream ``tip_verdict``: ``label`` (a class, or
  "unknown" for a frame outside what the classifier knows), ``probabilities`` (in
  ``TIP_CLASSES`` order), ``s_fraction``, ``good``, ``in_domain``, ``domain_score``,
  ``domain_threshold``, ``class_score`` and ``action_limit`` (``tipdomain``: a bad verdict
  with a class score above its limit is held back, nothing acts on it), ``line`` (last line seen), ``change_line`` (line
  where a change was detected, -1 if none), ``reason``; subscribe with
  :meth:`TipMonitor.subscribe`;
- to ``on_verdict(record)`` (called on the worker thread; a dict like a timeline entry);
- appended to ``.timeline`` (list of dicts) for the demo and the viewer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from event_model import compose_run, unpack_event_page

from stm_live.callbacks.frames import FrameAssembler
from stm_live.callbacks.tipwatch import TipWatch
from stm_live.interpret import classifier_scope
from stm_live.models import load_tip_classifier
from stm_live.models.tipstate import MIN_VERDICT_HEIGHT_NM, TIP_CLASSES, bad_probability, is_known_bad, is_unknown

log = logging.getLogger(__name__)

__all__ = ["TipMonitor", "VERDICT_STREAM"]

VERDICT_STREAM = "tip_verdict"
_STOP = object()


class TipMonitor:
    """Bluesky callback: tip verdicts for live frames.

    Parameters
    ----------
    classifier:
        object with ``classify(image, pixel_size_nm) -> TipVerdict``; ``None`` loads the
        shipped one (``stm_live.models.load_tip_classifier``) on the worker thread.
    every_n_lines:
        classify every this many lines (plus after a change and at the end of the frame).
    min_rows:
        fewest lines the classifier is given.
    min_height_nm:
        ...and the fewest nanometres of frame height (default
        ``tipstate.MIN_VERDICT_HEIGHT_NM``, where it says why). Frames shorter than this
        are judged at their end.
    on_verdict:
        ``callable(record: dict)``, called on the worker thread for every verdict.
    watch_factory:
        makes the per-frame change detector (default ``TipWatch``).
    """

    def __init__(
        self,
        classifier=None,
        *,
        every_n_lines: int = 16,
        min_rows: int = 16,
        min_height_nm: float | None = None,
        on_verdict: Callable[[dict], Any] | None = None,
        stream: str = "primary",
        watch_factory: Callable[[], TipWatch] = TipWatch,
        device: str = "auto",
    ):
        if every_n_lines < 1:
            raise ValueError(f"TipMonitor: every_n_lines must be >= 1, got {every_n_lines}")
        self._classifier = classifier
        self._device = device
        self.every_n_lines = int(every_n_lines)
        self.min_rows = int(min_rows)

        self.min_height_nm = float(MIN_VERDICT_HEIGHT_NM if min_height_nm is None else min_height_nm)
        self.on_verdict = on_verdict
        self.stream = stream
        self._watch_factory = watch_factory
        self.timeline: list[dict] = []
        self.errors: list[str] = []
        self._subs: list[Callable[[str, dict], Any]] = []
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="TipMonitor", daemon=True)
        self._thread.start()
        # per-run state (worker thread only)
        self._asm: FrameAssembler | None = None
        self._watch: TipWatch | None = None
        self._compose = None
        self._segment_start = 0
        self._last_classified = -1
        self._last_change = -1
        self._floor_request: int | None = None  # set_segment_floor's line, taken up by the worker
        self._pending_change: int | None = None  # a detected change still waiting for its verdict
        self._warm = False

    # ------------------------------------------------------------ RunEngine side (cheap)
    def __call__(self, name: str, doc: dict) -> None:
        """Queue the document; never blocks the RunEngine."""
        self._q.put((name, doc))

    def subscribe(self, callback: Callable[[str, dict], Any]) -> None:
        """Receive the verdict run's documents ``(name, doc)`` (called on the worker thread)."""
        self._subs.append(callback)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued document is processed; True if done in time."""
        done = threading.Event()
        self._q.put((None, done))
        return done.wait(timeout)

    def close(self) -> None:
        self._q.put((_STOP, None))
        self._thread.join(timeout=5)

    @property
    def classifier(self):
        if self._classifier is None:
            self._classifier = load_tip_classifier(device=self._device)
        return self._classifier

    def _warm_up(self, asm) -> None:
        """One throw-away verdict, on a frame of the first run's shape, while its first lines
        are scanned: the first inference costs about twice a later one (allocations)."""
        if self._warm:
            return
        self._warm = True
        try:
            rows = np.random.default_rng(0).random((asm.lines, asm.pixels))
            rows[self._rows_needed() :] = np.nan
            self.classifier.classify(rows, asm.pixel_size_nm, line_spacing_nm=self._line_spacing_nm())
        except Exception as exc:  # the real verdicts report problems
            log.debug("TipMonitor warm-up: %s", exc)

    # ------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            name, doc = self._q.get()
            if name is _STOP:
                return
            if name is None:
                doc.set()
                continue
            try:
                getattr(self, f"_on_{name}", lambda d: None)(doc)
            except Exception as exc:  # a bad document must not kill the monitor
                msg = f"{name}: {type(exc).__name__}: {exc}"
                log.warning("TipMonitor: %s", msg)
                self.errors.append(msg)

    def _emit(self, name: str, doc: dict) -> None:
        for cb in list(self._subs):
            try:
                cb(name, doc)
            except Exception as exc:
                log.warning("TipMonitor subscriber failed on %s: %s", name, exc)

    def _on_start(self, doc: dict) -> None:
        # Other runs (a recondition_tip run opened during a suspension, derived runs) can
        # start while the frame is still open: they must not drop the frame being watched.
        if "stm_live" not in doc:
            return

        asm = FrameAssembler(self.stream)
        asm.start(doc)
        self._asm = asm
        self._watch = self._watch_factory()
        # A frame outside what the classifier takes (an overview, a 7x7 lattice at 0.2 nm/px)
        # gets no verdicts: the network never sees it, so its input stays bounded.
        self._scope = classifier_scope((asm.lines, asm.pixels), asm.pixel_size_nm, self._line_spacing_nm())
        if not self._scope.ok:
            log.info("TipMonitor: no verdicts for run %s: %s", doc["uid"][:8], self._scope.reason)
        else:
            self._warm_up(asm)
        self._segment_start, self._last_classified, self._last_change = 0, -1, -1
        self._floor_request, self._pending_change = None, None
        run = compose_run(
            metadata={
                "purpose": "tip_verdicts",
                "parent_uid": doc["uid"],
                "tip_classes": list(TIP_CLASSES),
                "in_scope": self._scope.ok,
                "scope_reason": self._scope.reason,
            }
        )
        self._compose = run
        self._emit("start", run.start_doc)
        desc = run.compose_descriptor(
            name=VERDICT_STREAM,
            data_keys={
                "label": {"source": "TipMonitor", "dtype": "string", "shape": []},
                "probabilities": {"source": "TipMonitor", "dtype": "array", "shape": [len(TIP_CLASSES)]},
                "s_fraction": {"source": "TipMonitor", "dtype": "number", "shape": []},
                "good": {"source": "TipMonitor", "dtype": "boolean", "shape": []},
                "in_domain": {"source": "TipMonitor", "dtype": "boolean", "shape": []},
                "domain_score": {"source": "TipMonitor", "dtype": "number", "shape": []},
                "domain_threshold": {"source": "TipMonitor", "dtype": "number", "shape": []},
                "class_score": {"source": "TipMonitor", "dtype": "number", "shape": []},
                "action_limit": {"source": "TipMonitor", "dtype": "number", "shape": []},
                "line": {"source": "TipMonitor", "dtype": "integer", "shape": []},
                "change_line": {"source": "TipMonitor", "dtype": "integer", "shape": []},
                "reason": {"source": "TipMonitor", "dtype": "string", "shape": []},
            },
        )
        self._desc = desc
        self._emit("descriptor", desc.descriptor_doc)

    def _on_descriptor(self, doc: dict) -> None:
        if self._asm is not None:
            self._asm.descriptor(doc)

    def _on_event_page(self, doc: dict) -> None:

        for ev in unpack_event_page(doc):
            self._on_event(ev)

    def _on_event(self, doc: dict) -> None:
        if self._asm is None:
            return
        row = self._asm.event(doc)
        if row is None:
            return
        image = self._image()
        if row <= self._last_classified:  # rewind: lines re-sent from a checkpoint
            self._last_classified = row - 1
        if row < self._segment_start:
            self._segment_start = 0
        floor = self._floor_request
        if floor is not None and row >= floor and self._segment_start < floor:
            self._segment_start = floor
            self._last_classified = max(self._last_classified, floor - 1)
        change = self._watch.update(image[row], row) if np.isfinite(image[row]).sum() >= 4 else None
        if change is not None:
            self._last_change = change.line
            self._segment_start = change.line
            self._pending_change = change.line
        seg = row + 1 - self._segment_start
        due = row - self._last_classified >= self.every_n_lines
        need = self._rows_needed()
        if self._pending_change is not None and seg >= need:
            self._classify(row, reason=f"tip change detected at line {self._pending_change}")
            self._pending_change = None
        elif due and row + 1 >= need:
            self._classify(row, reason="periodic")

    def _line_spacing_nm(self) -> float | None:
        try:
            line_nm = float(self._asm.block["frame"]["height_m"]) / int(self._asm.block["lines"]) * 1e9
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        return line_nm if np.isfinite(line_nm) and line_nm > 0 else None

    def _rows_needed(self) -> int:
        """Lines the classifier is given: min_rows, and at least min_height_nm of frame."""
        line_nm = self._line_spacing_nm()
        if line_nm is None:
            return self.min_rows
        return max(self.min_rows, int(np.ceil(self.min_height_nm / line_nm)))

    def _on_stop(self, doc: dict) -> None:
        if self._asm is None or self._compose is None or doc.get("run_start") != self._asm.run_uid:
            return
        acquired = self._asm.acquired
        if acquired.size >= 3:
            self._classify(int(acquired.max()), reason="end of frame")
        self._emit("stop", self._compose.compose_stop(exit_status="success"))
        self._asm, self._compose = None, None

    def _image(self) -> np.ndarray:
        """Classifier input, read through stm_live.interpret like every other frame."""
        return self._asm.network_input().image

    def _verdicts(self, crops: list) -> list:
        pixel_nm, line_nm = self._asm.pixel_size_nm, self._line_spacing_nm()
        clf = self.classifier
        if hasattr(clf, "classify_many"):
            return clf.classify_many(crops, pixel_nm, line_spacing_nm=line_nm)
        try:
            return [clf.classify(c, pixel_nm, line_spacing_nm=line_nm) for c in crops]
        except TypeError:  # a classifier without the keyword
            return [clf.classify(c, pixel_nm) for c in crops]

    def set_segment_floor(self, line: int) -> None:
        """Judge only lines >= ``line`` from now on (the tip was reconditioned there)."""
        self._floor_request = int(line)

    def _classify(self, row: int, *, reason: str) -> None:
        if not self._scope.ok:
            return
        image = self._image()
        need = self._rows_needed()
        start = self._segment_start if row + 1 - self._segment_start >= need else max(0, row + 1 - need)
        crops = [(start, image[start : row + 1])]
        if row + 1 - start >= need + self.every_n_lines:
            # The line detector misses changes that alter the image without a jump in line
            # statistics (a second apex, a tilt): the latest lines alone show the tip now.
            crops.append((row + 1 - need, image[row + 1 - need : row + 1]))
        crops = [(first, c) for first, c in crops if np.isfinite(c).all(axis=1).sum() >= 3]
        if not crops:
            return

        verdicts = self._verdicts([c for _, c in crops])
        start, verdict = crops[0][0], verdicts[0]
        # The latest lines win when they show a bad tip the whole segment does not: only a bad
        # verdict inside the classifier's domain counts, and "unknown" is never the worse one.
        if (
            len(crops) == 2
            and is_known_bad(verdicts[1])
            and (
                is_unknown(verdict)
                or bad_probability(verdicts[1].probabilities) > bad_probability(verdict.probabilities)
            )
        ):
            start, verdict = crops[1][0], verdicts[1]
            reason = f"{reason}; the latest {row + 1 - start} lines"
        self._last_classified = row

        # A classifier without a domain model (a test double, an old one) says nothing of it.
        gate = {
            "in_domain": bool(getattr(verdict, "in_domain", True)),
            **{
                key: float(getattr(verdict, key, float("nan")))
                for key in ("domain_score", "domain_threshold", "class_score", "action_limit")
            },
        }
        record = {
            "run_uid": self._asm.run_uid,
            "time": time.time(),
            "line": int(row),
            "first_line": int(start),
            "change_line": int(self._last_change),
            "label": verdict.label,
            "probabilities": dict(verdict.probabilities),
            "s_fraction": float(verdict.s_fraction),
            "good": bool(verdict.good),
            "reason": reason,
            **gate,
        }
        with self._lock:
            self.timeline.append(record)
        data = {
            "label": verdict.label,
            "probabilities": [float(verdict.probabilities[c]) for c in TIP_CLASSES],
            "s_fraction": float(verdict.s_fraction),
            "good": bool(verdict.good),
            **gate,
            "line": int(row),
            "change_line": int(self._last_change),
            "reason": reason,
        }
        self._emit("event", self._desc.compose_event(data=data, timestamps={k: record["time"] for k in data}))
        if self.on_verdict is not None:
            try:
                self.on_verdict(record)
            except Exception as exc:
                log.warning("TipMonitor on_verdict failed: %s", exc)
                self.errors.append(f"on_verdict: {exc}")
