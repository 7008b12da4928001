"""The live viewer in a real headless browser, fed the documents a live frame produces."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from event_model import compose_run

from browser import dump_dom, find_chromium, screenshot
from stm_live.viewer import JournalFollower, Viewer, ViewerState

PIXELS = LINES = 32


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on this machine and none could be installed (.ci/run installs it)")
    return path


class FakeFrame:
    """Documents of one live frame plus its derived reconstruction and tip runs, composed
    with event-model exactly as the acquisition and the callbacks compose them."""

    def __init__(self):
        block = {"frame": {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 3.2e-9, "height_m": 3.2e-9,
                           "angle_deg": 0.0},
                 "pixels": PIXELS, "lines": LINES, "pixel_size_nm": 0.1, "scan_direction": "down",
                 "bias_V": -1.0, "setpoint_A": 1e-10, "z_controller": "constant_height",
                 "line_key": "stm_line_index",
                 "channels": [{"name": "Current", "index": 0, "units": "A",
                               "keys": {"forward": "stm_current_fwd", "backward": "stm_current_bwd"}}]}
        self.raw = compose_run(metadata={"stm_live": block})
        keys = {"stm_line_index": {"source": "sim", "dtype": "integer", "shape": []}}
        for key in ("stm_current_fwd", "stm_current_bwd"):
            keys[key] = {"source": "sim", "dtype": "array", "shape": [PIXELS]}
        self.raw_desc = self.raw.compose_descriptor(name="primary", data_keys=keys)
        parent = self.raw.start_doc["uid"]
        self.recon = compose_run(metadata={"parent_uid": parent, "stm_live_derived": "reconstruction"})
        self.recon_desc = self.recon.compose_descriptor(name="reconstruction", data_keys={
            "reconstruction": {"source": "stmnet", "dtype": "array", "shape": [LINES, PIXELS]},
            "lines_done": {"source": "stmnet", "dtype": "integer", "shape": []}})
        # The tip monitor's layout: probabilities in the order of the start's tip_classes.
        self.tip = compose_run(metadata={"parent_uid": parent, "purpose": "tip_verdicts",
                                         "tip_classes": ["co_sharp", "double"]})
        self.tip_desc = self.tip.compose_descriptor(name="tip", data_keys={
            k: {"source": "tipmonitor", "dtype": "string", "shape": []}
            for k in ("label", "probabilities", "s_fraction", "line")})
        yy, xx = np.mgrid[:LINES, :PIXELS]
        self.image = (np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / 40.0) * 1e-10).astype(np.float32)

    def opening(self):
        yield "start", self.raw.start_doc
        yield "descriptor", self.raw_desc.descriptor_doc
        yield "start", self.recon.start_doc
        yield "descriptor", self.recon_desc.descriptor_doc
        yield "start", self.tip.start_doc
        yield "descriptor", self.tip_desc.descriptor_doc

    def lines(self, rows):
        for row in rows:
            data = {"stm_line_index": row, "stm_current_fwd": self.image[row],
                    "stm_current_bwd": self.image[row]}
            yield "event", self.raw_desc.compose_event(data=data, timestamps={k: 0.0 for k in data})

    def results(self, lines_done):
        recon = np.full((LINES, PIXELS), np.nan, np.float32)
        recon[:lines_done] = self.image[:lines_done] ** 2
        data = {"reconstruction": recon, "lines_done": lines_done}
        yield "event", self.recon_desc.compose_event(data=data, timestamps={k: 0.0 for k in data})
        verdict = {"label": "double", "probabilities": np.array([0.1, 0.9]),
                   "s_fraction": 0.2, "line": lines_done}
        yield "event", self.tip_desc.compose_event(data=verdict, timestamps={k: 0.0 for k in verdict})


def test_page_follows_the_scan_and_shows_both_images(chromium, tmp_path):
    frame = FakeFrame()
    state = ViewerState()
    with Viewer(state) as viewer:
        for doc in frame.opening():
            state(*doc)
        for doc in frame.lines(range(10)):
            state(*doc)
        page = dump_dom(chromium, viewer.url)
        assert re.search(r'id="lines">10<', page), "page did not show 10 lines done"
        assert re.search(r'id="total">32<', page)

        for doc in [*frame.lines(range(10, LINES)), *frame.results(LINES)]:
            state(*doc)
        page = dump_dom(chromium, viewer.url)
        assert re.search(r'id="lines">32<', page), "page did not follow the new lines"
        assert re.search(r'id="verdict"[^>]*>double<', page), "tip verdict missing"
        # Both images decoded in the browser at the frame's size.
        assert re.search(r'id="raw"[^>]*data-size="32x32"', page), "raw image not rendered"
        assert re.search(r'id="recon"[^>]*data-size="32x32"', page), "reconstruction not rendered"

        shot = screenshot(chromium, viewer.url, tmp_path / "viewer.png")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    r, g, b = pixels.T
    grey_ramp = (abs(r - g) < 4) & (abs(g - b) < 4) & (r > 40) & (r < 250)
    hot = (r - b > 80) & (r > 120)  # the afmhot reconstruction
    assert len(np.unique(r[grey_ramp])) > 10, "screenshot shows no grey raw image"
    assert hot.sum() > 2000, "screenshot shows no reconstruction"


def test_journal_follower_feeds_the_page_from_another_process_files(tmp_path):
    from stm_live.store import JournalWriter

    frame = FakeFrame()
    writer = JournalWriter(tmp_path)
    for doc in [*frame.opening(), *frame.lines(range(5))]:
        writer(*doc)
    state = ViewerState()
    follower = JournalFollower(tmp_path, state)
    follower.poll_once()
    assert state.snapshot()["lines_done"] == 5
    for doc in [*frame.lines(range(5, 12)), *frame.results(12)]:
        writer(*doc)
    follower.poll_once()
    snap = state.snapshot()
    assert snap["lines_done"] == 12
    assert snap["recon_line"] == 12 and snap["verdict"]["label"] == "double"
    writer.close()


def test_viewer_follows_a_real_live_scan(chromium, tmp_path):
    """The real path: simulated controller over TCP -> NanonisSTM -> RunEngine ->
    live reconstruction (shipped STM-Net) -> viewer, read by the browser mid-scan and
    after the frame."""
    import threading

    from stm_live.devices.stm import NanonisSTM
    from stm_live.models import load_stmnet
    from stm_live.plans import live_frame
    from stm_live.session import Consumers
    from stm_live.session import AcquisitionSession
    from stm_live.simulators.server import start_server_thread

    state = ViewerState()
    with start_server_thread(seed=0, time_scale=2.0) as server, Viewer(state) as viewer:
        stm = NanonisSTM(server.host, server.port, name="stm")
        consumers = Consumers(tmp_path, worker=None, reconstructor=load_stmnet(device="cpu"),
                              classifier=None, viewer_state=state, tip_monitor=False)
        try:
            mid: list[str] = []

            def read_page_mid_scan():  # the RunEngine owns the main thread (SIGINT handler)
                for _ in range(400):  # bounded: until a few lines are in
                    if state.snapshot()["lines_done"] >= 8:
                        break
                    time.sleep(0.025)
                mid.append(dump_dom(chromium, viewer.url))

            reader = threading.Thread(target=read_page_mid_scan, daemon=True)
            reader.start()
            with AcquisitionSession(tmp_path, inline_callbacks=consumers.inline) as session:
                session(live_frame(stm, frame=(0.0, 0.0, 6e-9, 6e-9, 0.0), pixels=48, lines=48,
                                   channels=["Current", "Z"]))
                session.wait()
            reader.join(timeout=60)
        finally:
            consumers.close()
            stm.close()
        for _ in range(100):  # the final reconstruction is computed off the RunEngine loop
            if state.snapshot()["recon_line"] == 48:
                break
            time.sleep(0.05)
        done = dump_dom(chromium, viewer.url)
    lines_mid = int(re.search(r'id="lines">(\d+)<', mid[0]).group(1))
    assert 8 <= lines_mid < 48, f"mid-scan page showed {lines_mid} lines"
    assert re.search(r'id="lines">48<', done) and re.search(r'id="total">48<', done)
    assert re.search(r'id="recon-line">48<', done), "final reconstruction not shown"
    assert re.search(r'id="raw"[^>]*data-size="48x48"', done)
    assert re.search(r'id="recon"[^>]*data-size="48x48"', done)
