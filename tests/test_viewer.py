"""The live viewer in a real headless browser, fed the documents a live frame produces."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from browser import dump_dom, find_chromium, screenshot
from event_model import compose_run

from stm_live.callbacks.live import CHECK_STREAM
from stm_live.viewer import IMAGES, JournalFollower, Viewer, ViewerState

PIXELS = LINES = 32


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on this machine and none could be installed (.ci/run installs it)")
    return path


NOT_ORBITAL_REASON = (
    "not a CO-tip orbital image: the image shows no p-channel contrast, |psi|^2 alone "
    "explains 97 % of it (an s-like tip, or no orbital in the frame)"
)


class FakeFrame:
    """Documents of one live frame plus its derived reconstruction and tip runs, composed
    with event-model exactly as the acquisition and the callbacks compose them.

    ``check``: None (an older run or a stand-in reconstructor: no self-consistency keys),
    "orbital" or "not_orbital" (per-update scalars and the final consistency event, as
    ``callbacks.live`` sends them). ``domain``: None (a classifier without a domain model),
    "in" or "out" (``in_domain``, ``domain_score``, ``domain_threshold``; label "unknown" out).
    """

    def __init__(
        self, direction: str = "down", height_m: float = 3.2e-9, *, check: str | None = None, domain: str | None = None
    ):
        self.check, self.domain = check, domain
        block = {
            "frame": {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 3.2e-9, "height_m": height_m, "angle_deg": 0.0},
            "pixels": PIXELS,
            "lines": LINES,
            "pixel_size_nm": 0.1,
            "scan_direction": direction,
            "bias_V": -1.0,
            "setpoint_A": 1e-10,
            "z_controller": "constant_height",
            "line_key": "stm_line_index",
            "channels": [
                {
                    "name": "Current",
                    "index": 0,
                    "units": "A",
                    "keys": {"forward": "stm_current_fwd", "backward": "stm_current_bwd"},
                }
            ],
        }
        self.raw = compose_run(metadata={"stm_live": block})
        keys = {"stm_line_index": {"source": "sim", "dtype": "integer", "shape": []}}
        for key in ("stm_current_fwd", "stm_current_bwd"):
            keys[key] = {"source": "sim", "dtype": "array", "shape": [PIXELS]}
        self.raw_desc = self.raw.compose_descriptor(name="primary", data_keys=keys)
        parent = self.raw.start_doc["uid"]
        self.recon = compose_run(metadata={"parent_uid": parent, "stm_live_derived": "reconstruction"})
        recon_keys = {
            "reconstruction": {"source": "stmnet", "dtype": "array", "shape": [LINES, PIXELS]},
            "lines_done": {"source": "stmnet", "dtype": "integer", "shape": []},
        }
        if check:
            recon_keys |= {k: {"source": "stmnet", "dtype": "number", "shape": []} for k in ("agreement", "w_s")}
            recon_keys["orbital"] = {"source": "stmnet", "dtype": "boolean", "shape": []}
            map_key = {"source": "stmnet", "dtype": "array", "shape": [LINES, PIXELS]}
            self.check_desc = self.recon.compose_descriptor(
                name=CHECK_STREAM,
                data_keys={
                    "residual": map_key,
                    "view_spread": map_key,
                    **{
                        k: {"source": "stmnet", "dtype": "number", "shape": []}
                        for k in ("spread", "agreement", "w_s", "explained")
                    },
                    "orbital": {"source": "stmnet", "dtype": "boolean", "shape": []},
                    "reason": {"source": "stmnet", "dtype": "string", "shape": []},
                },
            )
        self.recon_desc = self.recon.compose_descriptor(name="reconstruction", data_keys=recon_keys)
        # The tip monitor's layout: probabilities in the order of the start's tip_classes.
        self.tip = compose_run(
            metadata={"parent_uid": parent, "purpose": "tip_verdicts", "tip_classes": ["co_sharp", "double"]}
        )
        tip_keys = ("label", "probabilities", "s_fraction", "line") + (
            ("in_domain", "domain_score", "domain_threshold") if domain else ()
        )
        self.tip_desc = self.tip.compose_descriptor(
            name="tip", data_keys={k: {"source": "tipmonitor", "dtype": "string", "shape": []} for k in tip_keys}
        )
        yy, xx = np.mgrid[:LINES, :PIXELS]
        # off-centre blob (rows in the frame's top-to-bottom order); an up-scan records
        # the same scene bottom line first
        scene = np.exp(-((xx - 16) ** 2 + (yy - 10) ** 2) / 40.0) * 1e-10
        self.image = (scene if direction == "down" else scene[::-1]).astype(np.float32)

    def opening(self):
        yield "start", self.raw.start_doc
        yield "descriptor", self.raw_desc.descriptor_doc
        yield "start", self.recon.start_doc
        yield "descriptor", self.recon_desc.descriptor_doc
        if self.check:
            yield "descriptor", self.check_desc.descriptor_doc
        yield "start", self.tip.start_doc
        yield "descriptor", self.tip_desc.descriptor_doc

    def lines(self, rows):
        for row in rows:
            data = {"stm_line_index": row, "stm_current_fwd": self.image[row], "stm_current_bwd": self.image[row]}
            yield "event", self.raw_desc.compose_event(data=data, timestamps={k: 0.0 for k in data})

    def results(self, lines_done):
        recon = np.full((LINES, PIXELS), np.nan, np.float32)
        recon[:lines_done] = self.image[:lines_done] ** 2
        data = {"reconstruction": recon, "lines_done": lines_done}
        orbital = self.check == "orbital"
        if self.check:  # NaN until enough lines are in, as models.consistency reports it
            early = lines_done < 8
            data |= {
                "agreement": np.nan if early else (0.82 if orbital else 0.21),
                "w_s": np.nan if early else 0.13,
                "orbital": orbital and not early,
            }
        yield "event", self.recon_desc.compose_event(data=data, timestamps={k: 0.0 for k in data})
        verdict = {"label": "double", "probabilities": np.array([0.1, 0.9]), "s_fraction": 0.2, "line": lines_done}
        if self.domain:
            inside = self.domain == "in"
            verdict |= {
                "label": "double" if inside else "unknown",
                "in_domain": inside,
                "domain_score": 12.0 if inside else 41.0,
                "domain_threshold": 30.0,
            }
        yield "event", self.tip_desc.compose_event(data=verdict, timestamps={k: 0.0 for k in verdict})

    def final_check(self):
        """The consistency stream's one event, after the final reconstruction."""
        orbital = self.check == "orbital"
        xx = np.mgrid[:LINES, :PIXELS][1]
        # signed, left-right ramp residual; spread bright where the scene is (rows as scanned)
        residual = ((xx - PIXELS / 2) * 1e-12).astype(np.float32)
        spread = (0.05 * self.image**2).astype(np.float32)
        data = {
            "residual": residual,
            "view_spread": spread,
            "spread": 0.034,
            "agreement": 0.82 if orbital else 0.21,
            "w_s": 0.13,
            "explained": 0.97,
            "orbital": orbital,
            "reason": "" if orbital else NOT_ORBITAL_REASON,
        }
        yield "event", self.check_desc.compose_event(data=data, timestamps={k: 0.0 for k in data})


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
        assert re.search(r'id="geometry">3\.20 × 3\.20 nm, scan down<', page), "frame geometry missing"
        assert re.search(r'id="verdict"[^>]*>double<', page), "tip verdict missing"
        # Both images decoded in the browser at the frame's size.
        assert re.search(r'id="raw"[^>]*data-size="32x32"', page), "raw image not rendered"
        assert re.search(r'id="recon"[^>]*data-size="32x32"', page), "reconstruction not rendered"
        # A run without the self-consistency check or a domain model (older runs, stand-in
        # reconstructors): no check panels, dashes, nothing claimed.
        for which in ("residual", "spread"):
            assert re.search(rf'id="{which}-panel" hidden', page), f"{which} panel shown without a check"
        assert re.search(r'id="agreement">–<', page) and re.search(r'id="orbital"[^>]*>–<', page)
        assert re.search(r'id="domain">–<', page) and "not a CO-tip" not in page

        shot = screenshot(chromium, viewer.url, tmp_path / "viewer.png")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    r, g, b = pixels.T
    grey_ramp = (abs(r - g) < 4) & (abs(g - b) < 4) & (r > 40) & (r < 250)
    hot = (r - b > 80) & (r > 120)  # the afmhot reconstruction
    assert len(np.unique(r[grey_ramp])) > 10, "screenshot shows no grey raw image"
    assert hot.sum() > 2000, "screenshot shows no reconstruction"


def _decoded(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _fed(frame: FakeFrame, lines_done: int = LINES) -> ViewerState:
    state = ViewerState()
    final = frame.final_check() if frame.check and lines_done == LINES else ()
    for doc in [*frame.opening(), *frame.lines(range(lines_done)), *frame.results(lines_done), *final]:
        state(*doc)
    return state


def test_up_scan_is_drawn_with_the_frame_top_at_the_top():
    """The same scene scanned down and up looks the same on the page; the data keep row 0 =
    first scanned line (the up-scan's raw frame is the down-scan's flipped)."""
    down, up = _fed(FakeFrame("down", check="orbital")), _fed(FakeFrame("up", check="orbital"))
    np.testing.assert_array_equal(up._frames.frame("Current"), down._frames.frame("Current")[::-1])
    for which in IMAGES:
        np.testing.assert_array_equal(_decoded(up.png(which)), _decoded(down.png(which)), err_msg=which)
    # the pictures are not symmetric top/bottom, so drawing the up-scan unflipped would differ
    for which in ("raw", "recon", "spread"):
        image = _decoded(down.png(which))
        assert not np.array_equal(image, image[::-1]), which
    # the check's maps keep their columns: the residual ramps left to right
    residual = _decoded(down.png("residual")).astype(int)
    assert not np.array_equal(residual, residual[:, ::-1])
    assert up.snapshot()["scan_direction"] == "up" and down.snapshot()["scan_direction"] == "down"
    # a partial up-scan: its unscanned lines (the frame's top) are grey at the top
    partial = _decoded(_fed(FakeFrame("up"), lines_done=20).png("raw"))
    assert np.all(partial[: LINES - 20] == 128) and not np.any(np.all(partial[LINES - 20 :] == 128, axis=2))


def test_page_shows_non_square_frames_with_their_physical_aspect(chromium):
    state = _fed(FakeFrame("up", height_m=1.6e-9))
    assert state.snapshot()["frame_nm"] == [3.2, 1.6]
    with Viewer(state) as viewer:
        page = dump_dom(chromium, viewer.url)
    assert re.search(r'id="geometry">3\.20 × 1\.60 nm, scan up<', page)
    for which in ("raw", "recon"):  # (the check's panels follow in test_page_shows_the_check...)
        tag = re.search(rf'<img id="{which}"[^>]*>', page).group(0)
        assert "width: 384px" in tag and "height: 192px" in tag, tag


def _text(page: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', page)
    assert match, f"no element {element_id!r} on the page"
    return match.group(1)


@pytest.mark.parametrize("orbital", [True, False])
def test_page_shows_the_check_and_the_domain_score(chromium, orbital):
    """raw | reconstruction | residual | uncertainty, the agreement line and the tip verdict
    with its domain score; a frame outside the check's scope says why, and a frame outside
    the classifier's domain is "unknown", not a tip class."""
    frame = FakeFrame(height_m=1.6e-9, check="orbital" if orbital else "not_orbital", domain="in" if orbital else "out")
    with Viewer(_fed(frame)) as viewer:
        page = dump_dom(chromium, viewer.url)
    for which in IMAGES:
        tag = re.search(rf'<img id="{which}"[^>]*>', page).group(0)
        assert 'data-size="32x32"' in tag, f"{which} not rendered: {tag}"
        assert "width: 384px" in tag and "height: 192px" in tag, tag  # the frame's aspect, like raw
    for which in ("residual", "spread"):
        assert "hidden" not in re.search(rf'id="{which}-panel"[^>]*>', page).group(0), which
    assert _text(page, "check-when") == " (final)"
    assert _text(page, "agreement") == ("0.82" if orbital else "0.21")
    assert _text(page, "ws") == "0.13"
    assert _text(page, "spread-summary") == "3.4 % of the bright level"
    # the residual's colour bar in words: its 1-99 % range; the ramp's first and last columns
    # (-16 and +15 pA) each hold 1/32 > 1 % of the pixels
    assert _text(page, "residual-range") == "-1.60e-11 … 1.50e-11"
    if orbital:
        assert re.search(r'id="orbital" class="ok">a CO-tip orbital image<', page)
        assert _text(page, "verdict") == "double" and _text(page, "domain") == "12.0 (inside ≤ 30.0)"
    else:
        # the reason already carries the prefix: said once
        assert re.search(r'id="orbital" class="bad">', page)
        assert _text(page, "orbital") == NOT_ORBITAL_REASON.replace("&", "&amp;")
        assert re.search(r'id="verdict" class="unk">unknown \(outside what the classifier knows\)<', page)
        assert _text(page, "domain") == "41.0 (inside ≤ 30.0)"


def test_live_updates_show_the_running_check_and_nan_keeps_the_page_alive(chromium):
    """Before enough lines the per-update agreement is NaN: state.json stays strict JSON (the
    browser's parser rejects NaN) and the page says the check has not run yet."""
    import json
    import urllib.request

    frame = FakeFrame(check="not_orbital", domain="in")
    state = ViewerState()
    for doc in [*frame.opening(), *frame.lines(range(4)), *frame.results(4)]:
        state(*doc)
    with Viewer(state) as viewer:
        with urllib.request.urlopen(viewer.url + "state.json", timeout=10) as response:
            body = response.read().decode()

        def reject(constant):
            raise AssertionError(f"state.json holds {constant}")

        snap = json.loads(body, parse_constant=reject)
        assert snap["check"]["agreement"] is None and snap["check"]["final"] is False
        page = dump_dom(chromium, viewer.url)
        assert _text(page, "lines") == "4", "page stopped updating"
        assert _text(page, "agreement") == "–" and _text(page, "check-when") == " (live, line 4)"
        assert _text(page, "orbital") == "not checked yet (too few lines)"
        for doc in [*frame.lines(range(4, LINES)), *frame.results(LINES)]:
            state(*doc)
        page = dump_dom(chromium, viewer.url)
    assert _text(page, "agreement") == "0.21" and _text(page, "check-when") == " (live, line 32)"
    assert _text(page, "orbital") == "not a CO-tip orbital image so far (agreement below the threshold)"
    assert re.search(r'id="residual-panel" hidden', page), "no residual before the final check"


def test_results_of_an_earlier_scan_stay_with_that_scan():
    """A remote worker's final check of scan A can arrive after scan B started: it must not
    be shown as B's, and B's own results may arrive before B's start is seen."""
    a, b = FakeFrame(check="not_orbital"), FakeFrame(check="orbital")
    state = ViewerState()
    for doc in [*a.opening(), *a.lines(range(LINES)), *a.results(LINES)]:
        state(*doc)
    b_docs = list(b.opening())
    raw_start, derived = b_docs[:2], b_docs[2:]
    for doc in [*derived, *b.results(LINES)]:  # B's derived runs first (journal order can differ)
        state(*doc)
    assert state.snapshot()["check"]["agreement"] == 0.21, "scan A shows B's results"
    for doc in [*raw_start, *a.final_check()]:
        state(*doc)
    snap = state.snapshot()
    assert snap["run"] == b.raw.start_doc["uid"] and snap["recon_line"] == LINES
    assert snap["check"]["agreement"] == 0.82 and snap["check"]["final"] is False
    assert snap["maps"] == {"residual": False, "spread": False}, "A's maps shown on B"
    for doc in b.final_check():
        state(*doc)
    assert state.snapshot()["check"]["final"] is True and state.snapshot()["maps"]["residual"]


def test_an_out_of_scope_reconstruction_run_says_why():
    frame = FakeFrame()
    state = ViewerState()
    for doc in [*frame.opening(), *frame.lines(range(LINES))]:
        state(*doc)
    reason = "not reconstructed: 0.200 nm/px is coarser than STM-Net's scope"
    state("stop", frame.recon.compose_stop(exit_status="abort", reason=reason))
    snap = state.snapshot()
    assert snap["recon_note"] == reason and snap["check"] is None


def test_journal_follower_feeds_the_page_from_another_process_files(tmp_path):
    from stm_live.store import JournalWriter

    frame = FakeFrame(check="not_orbital", domain="out")
    writer = JournalWriter(tmp_path)
    for doc in [*frame.opening(), *frame.lines(range(5))]:
        writer(*doc)
    state = ViewerState()
    follower = JournalFollower(tmp_path, state)
    follower.poll_once()
    assert state.snapshot()["lines_done"] == 5
    for doc in [*frame.lines(range(5, LINES)), *frame.results(LINES), *frame.final_check()]:
        writer(*doc)
    follower.poll_once()
    snap = state.snapshot()
    assert snap["lines_done"] == LINES
    assert snap["recon_line"] == LINES and snap["verdict"]["label"] == "unknown"
    assert snap["verdict"]["in_domain"] is False and snap["verdict"]["domain_score"] == 41.0
    assert snap["check"]["final"] and snap["check"]["text"] == NOT_ORBITAL_REASON
    assert snap["maps"] == {"residual": True, "spread": True}
    # the maps survive the journal's encoding
    np.testing.assert_array_equal(_decoded(state.png("residual")), _decoded(_fed(frame).png("residual")))
    writer.close()


def test_viewer_follows_a_real_live_scan(chromium, tmp_path):
    """The real path: simulated controller over TCP -> NanonisSTM -> RunEngine ->
    live reconstruction (shipped STM-Net) -> viewer, read by the browser mid-scan and
    after the frame."""
    import threading

    from stm_live.devices.stm import NanonisSTM
    from stm_live.models import load_stmnet
    from stm_live.plans import live_frame
    from stm_live.session import AcquisitionSession
    from stm_live.simulators.server import start_server_thread

    state = ViewerState()
    with start_server_thread(seed=0, time_scale=2.0) as server, Viewer(state) as viewer:
        stm = NanonisSTM(server.host, server.port, name="stm")
        session = AcquisitionSession(tmp_path, live=True, reconstructor=load_stmnet(device="cpu"), viewer_state=state)
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
            session(live_frame(stm, frame=(0.0, 0.0, 6e-9, 6e-9, 0.0), pixels=48, lines=48, channels=["Current", "Z"]))
            # the final reconstruction and its check run off the RunEngine loop
            assert session.wait(120), "no final reconstruction within 120 s"
            reader.join(timeout=60)
        finally:
            session.close()
            stm.close()
        done = dump_dom(chromium, viewer.url)
    lines_mid = int(re.search(r'id="lines">(\d+)<', mid[0]).group(1))
    assert 8 <= lines_mid < 48, f"mid-scan page showed {lines_mid} lines"
    assert re.search(r'id="lines">48<', done) and re.search(r'id="total">48<', done)
    assert re.search(r'id="recon-line">48<', done), f"final reconstruction not shown: {state.snapshot()}"
    for which in IMAGES:  # raw | reconstruction | residual | uncertainty (STM-Net's symmetry views)
        assert re.search(rf'id="{which}"[^>]*data-size="48x48"', done), f"{which} not rendered"
    snap = state.snapshot()
    assert 0.0 <= snap["check"]["agreement"] <= 1.0 and snap["check"]["spread"] >= 0.0
    assert _text(done, "agreement") == f"{snap['check']['agreement']:.2f}"
    assert _text(done, "orbital").startswith(("a CO-tip orbital image", "not a CO-tip orbital image: "))
