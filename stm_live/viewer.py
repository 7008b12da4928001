"""The live viewer: a page on 127.0.0.1 that shows a scan as it happens.

It shows the raw channel, the live STM-Net reconstruction with its self-consistency check
(agreement, fitted tip s share, residual map, symmetry-view spread as the uncertainty map;
``stm_live.models.consistency``), the tip-state verdict with its domain score and timeline,
and the line progress. ``ViewerState`` is fed Bluesky documents: in-process as a
RunEngine subscriber (``--view`` on demo/scan/replay), or, from another process, by
``JournalFollower`` tailing the run journals that acquisition writes (so the viewer works
whichever process acquires and wherever the GPU worker runs: results it sends back are
journaled beside the raw lines). A run stored in tiled is shown from its BlueskyRun layout
(``show_stored_run``: its documents and its derived runs' read back through a tiled client).
``stm-live view`` serves it on its own (:mod:`stm_live.app.view`).

The page polls ``state.json`` and fetches ``raw.png``/``recon.png``/``residual.png``/
``spread.png`` when their versions change; nothing but the standard library's HTTP server is
needed. Every key a newer callback adds (the check, the domain score) is optional: documents
of older runs and of stand-in reconstructors show what they have.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from event_model import unpack_event_page

from stm_live.callbacks.frames import FrameAssembler, FrameError
from stm_live.callbacks.live import CHECK_STREAM
from stm_live.report import display_rows, png_bytes
from stm_live.store import derived_runs, find_tiled_run, read_journal, run_documents

logger = logging.getLogger(__name__)

PAGE = (Path(__file__).with_name("viewer_page.html")).read_bytes()
MAX_TIMELINE = 400  # cells kept on the page
MAX_RESULTS = 4  # scans whose derived results are kept (they may arrive before or after the scan's start)
IMAGES = ("raw", "recon", "residual", "spread")
_CMAPS = {"raw": "gray", "recon": "afmhot", "residual": "viridis", "spread": "viridis"}
NOT_ORBITAL = "not a CO-tip orbital image"


def _png_bytes(image: np.ndarray | None, cmap: str, scan_direction: str = "down") -> bytes:
    """The image in display orientation (an up-scan flipped: the frame's top at the top)."""
    if image is None:  # nothing yet: a small grey (NaN) placeholder tile
        image = np.full((8, 8), np.nan, dtype=np.float32)
    return png_bytes(display_rows(image, scan_direction), cmap=cmap)


def _geometry(block: dict) -> dict[str, Any]:
    """Scan direction and physical frame size from a start document's ``stm_live`` block
    (page layout only: a missing or odd value falls back, it never stops the viewer)."""
    direction = block.get("scan_direction", "down")
    if direction not in ("down", "up"):
        logger.warning(
            "start['stm_live']['scan_direction'] = %r; expected 'down' or 'up'; drawing the frame as a down-scan",
            direction,
        )
        direction = "down"
    try:
        frame = block["frame"]
        width_nm, height_nm = float(frame["width_m"]) * 1e9, float(frame["height_m"]) * 1e9
        if not (width_nm > 0 and height_nm > 0 and np.isfinite(width_nm + height_nm)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        width_nm = float(block.get("pixel_size_nm", 0.0)) * int(block.get("pixels", 0))
        height_nm = width_nm * int(block.get("lines", 0)) / max(1, int(block.get("pixels", 1)))
    return {"scan_direction": direction, "frame_nm": [width_nm, height_nm]}


def json_number(value) -> float | None:
    """A finite float, else None (JSON has no NaN: one NaN would stop the page's parser)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _json_safe(obj):
    """``obj`` with every non-finite float as None (strict JSON for the browser)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return json_number(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _image(value) -> np.ndarray | None:
    """A 2-D float32 array, or None for a missing or malformed one."""
    if value is None:
        return None
    try:
        image = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    return image if image.ndim == 2 and image.size else None


def _colour_range(image: np.ndarray | None) -> list[float] | None:
    """[1 %, 99 %] percentiles of the finite values: what the page's colours span (report.image_to_rgb)."""
    if image is None or not np.isfinite(image).any():
        return None
    return [float(v) for v in np.percentile(image[np.isfinite(image)], [1, 99])]


def not_orbital_text(reason: str) -> str:
    """'not a CO-tip orbital image: <reason>' (the check's reasons mostly carry the prefix)."""
    reason = str(reason or "").strip()
    if reason.startswith(NOT_ORBITAL):
        return reason
    return f"{NOT_ORBITAL}: {reason}" if reason else NOT_ORBITAL


class _Results:
    """What the derived runs of one scan said: the live reconstruction, its per-update
    self-consistency scalars, the final check (live.CHECK_STREAM) and why the derived run
    stopped, if it said."""

    def __init__(self) -> None:
        self.recon: np.ndarray | None = None
        self.recon_line: int | None = None
        self.updates = 0
        self.live: dict[str, Any] | None = None  # agreement, w_s, orbital of the newest update
        self.check: dict[str, Any] | None = None  # scalars of the final check
        self.residual: np.ndarray | None = None
        self.spread: np.ndarray | None = None
        self.note = ""  # the derived run's stop reason (e.g. out of STM-Net's scope)
        self.ranges: dict[str, list[float] | None] = {}  # colour range of each check map

    def check_summary(self) -> dict[str, Any] | None:
        """The page's self-consistency line: the final check, else the newest update's."""
        if self.check is not None:
            c = self.check
            if c["orbital"] is None:
                text = ""
            else:
                text = "a CO-tip orbital image" if c["orbital"] else not_orbital_text(c["reason"])
            return {**c, "final": True, "text": text, "line": self.recon_line}
        if self.live is not None:
            c = self.live
            orbital = c["orbital"]
            if c["agreement"] is None:  # NaN until enough lines are in
                text, orbital = "not checked yet (too few lines)", None
            elif orbital is None:
                text = ""
            else:
                text = (
                    "a CO-tip orbital image so far"
                    if orbital
                    else f"{NOT_ORBITAL} so far (agreement below the threshold)"
                )
            return {
                "agreement": c["agreement"],
                "w_s": c["w_s"],
                "orbital": orbital,
                "spread": None,
                "explained": None,
                "reason": "",
                "final": False,
                "text": text,
                "line": self.recon_line,
            }
        return None


class ViewerState:
    """What the page shows, updated from documents; thread-safe.

    Raw lines come from the acquisition run (start document with a ``stm_live`` block);
    reconstructions and tip verdicts come from the derived runs that name it as their
    ``parent_uid`` (see ``stm_live.callbacks.live`` and ``stm_live.callbacks.tipmonitor``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames = FrameAssembler()
        self.run: str | None = None
        self.status = "idle"
        self.raw_version = -1
        self.recon_version = -1
        self.check_version = -1
        self._results: dict[str, _Results] = {}  # scan uid -> its derived results
        self.verdict: dict | None = None
        self.timeline: list[dict] = []
        self.actions: list[str] = []
        self._derived: dict[str, tuple[str, str]] = {}  # derived run uid -> (kind, scan uid)
        self._derived_descriptors: dict[str, tuple[str, str]] = {}  # descriptor uid -> (kind, scan uid)
        self._tip_classes: list[str] = []
        self._png_cache: dict[str, tuple[int, bytes]] = {}
        self.geometry: dict[str, Any] = {"scan_direction": "down", "frame_nm": None}

    # ------------------------------------------------------------------ documents
    def __call__(self, name: str, doc: dict) -> None:
        with self._lock:
            handler = getattr(self, f"_on_{name}", None)
            if handler is not None:
                handler(doc)

    def _on_start(self, doc: dict) -> None:
        if "stm_live" in doc:
            try:
                self._frames.start(doc)
            except FrameError:
                return
            self.run = doc["uid"]
            self.geometry = _geometry(doc["stm_live"])
            self.status = "scanning"
            self.raw_version += 1
            self.recon_version += 1
            self.check_version += 1
            self._result(self.run)
            return
        parent = doc.get("parent_uid")
        if not parent:
            return
        if doc.get("stm_live_derived") == "reconstruction":
            self._derived[doc["uid"]] = ("reconstruction", parent)
        elif doc.get("purpose") == "tip_verdicts":
            self._derived[doc["uid"]] = ("tip", parent)
            self._tip_classes = list(doc.get("tip_classes", []))

    def _on_descriptor(self, doc: dict) -> None:
        self._frames.descriptor(doc)
        if doc.get("run_start") in self._derived:
            kind, parent = self._derived[doc["run_start"]]
            if kind == "reconstruction" and doc.get("name") == CHECK_STREAM:
                kind = "check"
            self._derived_descriptors[doc["uid"]] = (kind, parent)
        elif doc.get("name") == "tip_recondition":  # reconditioning steps, in the frame's run
            self._derived_descriptors[doc["uid"]] = ("action", doc.get("run_start", ""))

    def _on_event(self, doc: dict) -> None:
        kind, parent = self._derived_descriptors.get(doc.get("descriptor"), (None, ""))
        if kind == "reconstruction":
            self._on_reconstruction_event(parent, doc["data"])
        elif kind == "check":
            self._on_check_event(parent, doc["data"])
        elif kind == "tip":
            self._on_tip_event(parent, doc["data"])
        elif kind == "action":
            self._on_action_event(doc["data"])
        elif self._frames.event(doc) is not None:
            self.raw_version += 1

    def _result(self, scan_uid: str) -> _Results:
        """The derived results of scan ``scan_uid`` (created; the oldest others dropped)."""
        if scan_uid not in self._results:
            self._results[scan_uid] = _Results()
            for old in [u for u in self._results if u not in (scan_uid, self.run)][: -MAX_RESULTS or None]:
                del self._results[old]
        return self._results[scan_uid]

    def _current(self) -> _Results:
        return self._results.get(self.run) or _Results()

    def _on_event_page(self, doc: dict) -> None:
        for event in unpack_event_page(doc):
            self._on_event(event)

    def _on_stop(self, doc: dict) -> None:
        if doc.get("run_start") == self.run:
            self.status = doc.get("exit_status", "done")
        kind, parent = self._derived.get(doc.get("run_start"), (None, ""))
        if kind == "reconstruction" and doc.get("reason"):
            self._result(parent).note = str(doc["reason"])
            self.check_version += 1

    def _on_reconstruction_event(self, parent: str, data: dict) -> None:
        image = _image(data.get("reconstruction"))
        if image is None:
            return
        result = self._result(parent)
        result.recon = image
        result.recon_line = int(data.get("lines_done", data.get("line", -1)))
        result.updates += 1
        if "agreement" in data:  # per-update self-consistency (absent in older runs)
            orbital = data.get("orbital")
            result.live = {
                "agreement": json_number(data.get("agreement")),
                "w_s": json_number(data.get("w_s")),
                "orbital": None if orbital is None else bool(orbital),
            }
            self.check_version += 1
        self.recon_version += 1

    def _on_check_event(self, parent: str, data: dict) -> None:
        result = self._result(parent)
        orbital = data.get("orbital")
        result.check = {
            **{k: json_number(data.get(k)) for k in ("agreement", "w_s", "spread", "explained")},
            "orbital": None if orbital is None else bool(orbital),
            "reason": str(data.get("reason") or ""),
        }
        result.residual = _image(data.get("residual"))
        spread = _image(data.get("view_spread"))
        # a reconstructor without symmetry views sends an all-NaN map: nothing to show
        result.spread = spread if spread is not None and np.isfinite(spread).any() else None
        result.ranges = {"residual": _colour_range(result.residual), "spread": _colour_range(result.spread)}
        self.check_version += 1

    def _on_action_event(self, data: dict) -> None:
        # Keys are the recording device's: tip_recondition_step, ..._action, ..._message.
        def field(name):
            return str(data.get(f"tip_recondition_{name}", "") or "")

        text = " ".join(part for part in (field("step"), field("action"), field("message")) if part)
        self.actions = [*self.actions, text][-12:]

    def _on_tip_event(self, parent: str, data: dict) -> None:
        label = data.get("label")
        if label is None:
            return
        probabilities = data.get("probabilities")
        if isinstance(probabilities, str):
            probabilities = json.loads(probabilities)
        if not isinstance(probabilities, dict):  # an array in the order of the start's tip_classes
            probabilities = dict(zip(self._tip_classes, np.asarray(probabilities, float).tolist()))
        # in_domain / domain_score / domain_threshold (and the action limit): absent for a classifier
        # without a domain model
        in_domain = data.get("in_domain")
        self.verdict = {
            "label": str(label),
            "probabilities": {str(k): float(v) for k, v in dict(probabilities).items()},
            "s_fraction": json_number(data.get("s_fraction")),
            "good": bool(data.get("good", False)),
            "in_domain": None if in_domain is None else bool(in_domain),
            "domain_score": json_number(data.get("domain_score")),
            "domain_threshold": json_number(data.get("domain_threshold")),
            # a bad verdict with class_score > action_limit is held back: nothing acts on it
            "class_score": json_number(data.get("class_score")),
            "action_limit": json_number(data.get("action_limit")),
        }
        self.timeline.append({"run": parent or self.run or "", "line": int(data.get("line", -1)), "label": str(label)})
        self.timeline = self.timeline[-MAX_TIMELINE:]

    # ------------------------------------------------------------------ page data
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            frames = self._frames
            started = frames.run_uid is not None
            result = self._current()
            return {
                "run": self.run,
                "status": self.status,
                "lines_done": int(frames.acquired.size) if started else 0,
                "lines_total": frames.lines if started else 0,
                "channel": frames.source[0] if started else None,
                "scan_direction": self.geometry["scan_direction"],
                "frame_nm": self.geometry["frame_nm"],
                "raw_version": self.raw_version,
                "recon_version": self.recon_version,
                "recon_line": result.recon_line,
                "recon_updates": result.updates,
                "recon_note": result.note,
                "check_version": self.check_version,
                "check": result.check_summary(),
                # which check maps the page can fetch (residual.png, spread.png)
                "maps": {"residual": result.residual is not None, "spread": result.spread is not None},
                "map_ranges": {"residual": result.ranges.get("residual"), "spread": result.ranges.get("spread")},
                "verdict": self.verdict,
                "timeline": list(self.timeline),
                "actions": list(self.actions),
            }

    def png(self, which: str) -> bytes:
        """One of :data:`IMAGES` as PNG, in display orientation (a grey tile when absent)."""
        if which not in IMAGES:
            raise ValueError(f"no image {which!r}; valid: {', '.join(IMAGES)}")
        with self._lock:
            version = {"raw": self.raw_version, "recon": self.recon_version}.get(which, self.check_version)
            cached = self._png_cache.get(which)
            if cached and cached[0] == version:
                return cached[1]
            result = self._current()
            if which == "raw":
                image = self._frames.source_image() if self._frames.run_uid else None
            else:
                image = {"recon": result.recon, "residual": result.residual, "spread": result.spread}[which]
                image = None if image is None else image.copy()
            direction = self.geometry["scan_direction"]
        data = _png_bytes(image, _CMAPS[which], direction)
        with self._lock:
            self._png_cache[which] = (version, data)
        return data


class JournalFollower(threading.Thread):
    """Feed a ``ViewerState`` from the newest journals in ``data_dir/journal``.

    Polls (bounded interval) rather than using inotify so it works on any filesystem; a
    journal is re-read from the last record seen, and a newer journal is followed when it
    appears, so the viewer follows new runs by itself.
    """

    def __init__(self, data_dir: str | Path, state: ViewerState, *, interval_s: float = 0.3):
        super().__init__(daemon=True, name="stm-live-journal-follower")
        self.journal_dir = Path(data_dir) / "journal"
        self.state = state
        self.interval_s = interval_s
        self._seen: dict[Path, int] = {}
        self._stop = threading.Event()

    def poll_once(self) -> None:
        if not self.journal_dir.is_dir():
            return
        paths = sorted(self.journal_dir.glob("*.journal"), key=lambda p: p.stat().st_mtime)
        if not self._seen:
            paths = paths[-3:]  # on first look, only the latest runs (raw and derived)
        for path in paths:
            try:
                records = read_journal(path)
            except (OSError, ValueError):
                continue
            done = self._seen.get(path, 0)
            for name, doc in records[done:]:
                self.state(name, doc)
            self._seen[path] = len(records)

    def run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()


def _handler_for(state: ViewerState):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", PAGE)
            elif path == "/state.json":
                body = json.dumps(_json_safe(state.snapshot()), allow_nan=False).encode()
                self._send(200, "application/json", body)
            elif path.endswith(".png") and path[1:-4] in IMAGES:
                self._send(200, "image/png", state.png(path[1:-4]))
            else:
                self._send(404, "text/plain", b"not found")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # keep the terminal for progress bars
            pass

    return Handler


class Viewer:
    """The HTTP server in a daemon thread; ``url`` is where to point a browser."""

    def __init__(self, state: ViewerState | None = None, *, port: int = 0, host: str = "127.0.0.1"):
        self.state = state or ViewerState()
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, kwargs={"poll_interval": 0.2}, name="stm-live-viewer"
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def show_stored_run(state: ViewerState, client, run: str = "latest") -> str:
    """Feed ``state`` one run stored in tiled (BlueskyRun layout) and its derived runs
    (reconstruction, tip verdicts), as their documents came; returns the run's uid."""
    uid = find_tiled_run(client, run)
    for key in [uid, *derived_runs(client, uid).values()]:
        for name, doc in run_documents(client[key]):
            state(name, doc)
    return uid
