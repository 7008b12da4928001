"""The live viewer: a page on 127.0.0.1 that shows a scan as it happens.

It shows the raw channel, the live STM-Net reconstruction, the tip-state verdict with its
timeline, and the line progress. ``ViewerState`` is fed Bluesky documents: in-process as a
RunEngine subscriber (``--view`` on demo/scan/replay), or, from another process, by
``JournalFollower`` tailing the run journals that acquisition writes (so the viewer works
whichever process acquires and wherever the GPU worker runs: results it sends back are
journaled beside the raw lines).

The page polls ``state.json`` and fetches ``raw.png``/``recon.png`` when their versions
change; nothing but the standard library's HTTP server is needed.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from stm_live.callbacks.frames import FrameAssembler, FrameError

PAGE = (Path(__file__).with_name("viewer_page.html")).read_bytes()
MAX_TIMELINE = 400  # cells kept on the page


def _png_bytes(image: np.ndarray | None, cmap: str) -> bytes:
    from stm_live.report import png_bytes

    if image is None:  # nothing yet: a small grey (NaN) placeholder tile
        image = np.full((8, 8), np.nan, dtype=np.float32)
    return png_bytes(image, cmap=cmap)


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
        self.recon_line: int | None = None
        self.recon_updates = 0
        self._recon: np.ndarray | None = None
        self.verdict: dict | None = None
        self.timeline: list[dict] = []
        self.actions: list[str] = []
        self._derived: dict[str, str] = {}  # derived run uid -> kind ("reconstruction" | "tip")
        self._derived_descriptors: dict[str, str] = {}
        self._tip_classes: list[str] = []
        self._png_cache: dict[str, tuple[int, bytes]] = {}

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
            self.status = "scanning"
            self.raw_version += 1
            self._recon = None
            self.recon_line = None
            self.recon_updates = 0
            self.recon_version += 1
            return
        if not doc.get("parent_uid"):
            return
        if doc.get("stm_live_derived") == "reconstruction":
            self._derived[doc["uid"]] = "reconstruction"
        elif doc.get("purpose") == "tip_verdicts":
            self._derived[doc["uid"]] = "tip"
            self._tip_classes = list(doc.get("tip_classes", []))

    def _on_descriptor(self, doc: dict) -> None:
        self._frames.descriptor(doc)
        if doc.get("run_start") in self._derived:
            self._derived_descriptors[doc["uid"]] = self._derived[doc["run_start"]]
        elif doc.get("name") == "tip_recondition":  # reconditioning steps, in the frame's run
            self._derived_descriptors[doc["uid"]] = "action"

    def _on_event(self, doc: dict) -> None:
        kind = self._derived_descriptors.get(doc.get("descriptor"))
        if kind == "reconstruction":
            self._on_reconstruction_event(doc["data"])
        elif kind == "tip":
            self._on_tip_event(doc["data"])
        elif kind == "action":
            self._on_action_event(doc["data"])
        elif self._frames.event(doc) is not None:
            self.raw_version += 1

    def _on_event_page(self, doc: dict) -> None:
        from event_model import unpack_event_page

        for event in unpack_event_page(doc):
            self._on_event(event)

    def _on_stop(self, doc: dict) -> None:
        if doc.get("run_start") == self.run:
            self.status = doc.get("exit_status", "done")

    def _on_reconstruction_event(self, data: dict) -> None:
        image = data.get("reconstruction")
        if image is None:
            return
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            return
        self._recon = image
        self.recon_line = int(data.get("lines_done", data.get("line", -1)))
        self.recon_updates += 1
        self.recon_version += 1

    def _on_action_event(self, data: dict) -> None:
        # Keys are the recording device's: tip_recondition_step, ..._action, ..._message.
        def field(name):
            return str(data.get(f"tip_recondition_{name}", "") or "")

        text = " ".join(part for part in (field("step"), field("action"), field("message")) if part)
        self.actions = [*self.actions, text][-12:]

    def _on_tip_event(self, data: dict) -> None:
        label = data.get("label")
        if label is None:
            return
        probabilities = data.get("probabilities")
        if isinstance(probabilities, str):
            probabilities = json.loads(probabilities)
        if not isinstance(probabilities, dict):  # an array in the order of the start's tip_classes
            probabilities = dict(zip(self._tip_classes, np.asarray(probabilities, float).tolist()))
        self.verdict = {
            "label": str(label),
            "probabilities": {str(k): float(v) for k, v in dict(probabilities).items()},
            "s_fraction": float(data.get("s_fraction", float("nan"))),
        }
        self.timeline.append({"run": self.run or "", "line": int(data.get("line", -1)),
                              "label": str(label)})
        self.timeline = self.timeline[-MAX_TIMELINE:]

    # ------------------------------------------------------------------ page data
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            frames = self._frames
            started = frames.run_uid is not None
            return {
                "run": self.run,
                "status": self.status,
                "lines_done": int(frames.acquired.size) if started else 0,
                "lines_total": frames.lines if started else 0,
                "channel": frames.source[0] if started else None,
                "raw_version": self.raw_version,
                "recon_version": self.recon_version,
                "recon_line": self.recon_line,
                "recon_updates": self.recon_updates,
                "verdict": self.verdict,
                "timeline": list(self.timeline),
                "actions": list(self.actions),
            }

    def png(self, which: str) -> bytes:
        with self._lock:
            version = self.raw_version if which == "raw" else self.recon_version
            cached = self._png_cache.get(which)
            if cached and cached[0] == version:
                return cached[1]
            if which == "raw":
                image = self._frames.source_image() if self._frames.run_uid else None
            else:
                image = None if self._recon is None else self._recon.copy()
        data = _png_bytes(image, "gray" if which == "raw" else "afmhot")
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
        from stm_live.store import read_journal

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
                self._send(200, "application/json", json.dumps(state.snapshot()).encode())
            elif path in ("/raw.png", "/recon.png"):
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
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.2}, name="stm-live-viewer")
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "Viewer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_viewer(*, port: int = 8765, data_dir: str | Path = "stm_live_data") -> None:
    """``stm-live view``: serve the page and follow the journals in ``data_dir``."""
    state = ViewerState()
    follower = JournalFollower(data_dir, state)
    follower.start()
    viewer = Viewer(state, port=port)
    print(f"stm-live viewer at {viewer.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        follower.stop()
        viewer.close()
