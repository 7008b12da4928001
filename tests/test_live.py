"""Live reconstruction: frame assembly, coalescing under a slow network, derived documents,
and end to end against the simulated controller with the shipped STM-Net checkpoint."""

from __future__ import annotations

import time

import numpy as np
import pytest
from event_model import DocumentNames, compose_run, schema_validators

from stm_live.callbacks.frames import FrameAssembler, FrameError
from stm_live.callbacks.live import STREAM, LiveReconstruction

LINES, PIXELS = 32, 24
PITCH_NM = 0.1  # inside STM-Net's scope (stm_live.interpret.stmnet_scope)


class BoxBlur:
    """A deterministic stand-in network for the machinery tests: normalise, 3x3 box blur,
    NaN rows stay NaN (as the Reconstructor does). ``delay_s`` makes it slow."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.calls: list[tuple[int, int]] = []

    def reconstruct(self, image, pixel_size_nm, line_spacing_nm=None):
        assert pixel_size_nm > 0
        self.calls.append(image.shape)
        if self.delay_s:
            time.sleep(self.delay_s)
        img = np.asarray(image, np.float32)
        nan = ~np.isfinite(img)
        x = np.where(nan, np.nanmedian(img), img)
        x = (x - x.min()) / (np.ptp(x) or 1.0)
        p = np.pad(x, 1, mode="edge")
        out = sum(p[i : i + x.shape[0], j : j + x.shape[1]] for i in range(3) for j in range(3)) / 9
        out = out.astype(np.float32)
        out[nan] = np.nan
        return out


def frame_docs(image: np.ndarray, *, mode="constant_height", order=None, rewind_at=None, z=None, pitch_nm=PITCH_NM):
    """Documents of a live frame as the RunEngine emits them (interfaces.md layout)."""
    lines, pixels = image.shape
    block = {
        "frame": {
            "center_x_m": 0.0,
            "center_y_m": 0.0,
            "width_m": pixels * pitch_nm * 1e-9,
            "height_m": lines * pitch_nm * 1e-9,
            "angle_deg": 0.0,
        },
        "pixels": pixels,
        "lines": lines,
        "pixel_size_nm": pitch_nm,
        "scan_direction": "down",
        "bias_V": -2.5,
        "setpoint_A": 1e-11,
        "z_controller": mode,
        "line_key": "stm_line_index",
        "channels": [
            {
                "name": "Current",
                "index": 0,
                "units": "A",
                "keys": {"forward": "stm_current_fwd", "backward": "stm_current_bwd"},
            },
            {"name": "Z", "index": 30, "units": "m", "keys": {"forward": "stm_z_fwd", "backward": "stm_z_bwd"}},
        ],
    }
    run = compose_run(metadata={"plan_name": "live_frame", "stm_live": block})
    keys = {"stm_line_index": {"dtype": "integer", "shape": [], "source": "sim"}}
    for k in ("stm_current_fwd", "stm_current_bwd", "stm_z_fwd", "stm_z_bwd"):
        keys[k] = {"dtype": "array", "shape": [pixels], "source": "sim"}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    zimg = z if z is not None else np.zeros_like(image)
    seq = 0
    for row in order if order is not None else range(lines):
        seq += 1
        if rewind_at is not None and row == rewind_at[0]:
            seq -= rewind_at[1]  # a rewind re-sends seq_nums
        data = {
            "stm_line_index": row,
            "stm_current_fwd": image[row].copy(),
            "stm_current_bwd": image[row, ::-1].copy(),
            "stm_z_fwd": zimg[row].copy(),
            "stm_z_bwd": zimg[row, ::-1].copy(),
        }
        docs.append(("event", desc.compose_event(data=data, timestamps={k: 0.0 for k in data}, seq_num=seq)))
    docs.append(("stop", run.compose_stop()))
    return docs


def test_assembler_rewind_keeps_last_line_and_picks_the_source_channel():
    rng = np.random.default_rng(0)
    image = rng.random((LINES, PIXELS), dtype=np.float32)
    docs = frame_docs(image)
    # a suspender rewind: line 10 arrives again with new data and a repeated seq_num
    redo = dict(
        docs[2 + 10][1],
        uid="redo",
        seq_num=11,
        data=dict(docs[2 + 10][1]["data"], stm_current_fwd=np.full(PIXELS, 7.0, np.float32)),
    )
    docs.insert(2 + 11, ("event", redo))
    asm = FrameAssembler()
    for name, doc in docs[:-1]:
        getattr(asm, name)(doc)
    expected = image.copy()
    expected[10] = 7.0
    np.testing.assert_array_equal(asm.source_image(), expected)
    assert asm.source == ("Current", "forward") and asm.complete and asm.resent_lines == 1
    np.testing.assert_array_equal(asm.frame("Current", "backward"), image[:, ::-1])


def test_assembler_constant_current_uses_z_and_bad_starts_name_the_problem():
    from stm_live.interpret import plane_level
    from stm_live.simulators.vacuum import current_from_z

    z = np.random.default_rng(1).normal(1e-10, 2e-11, (LINES, PIXELS)).astype(np.float32)
    docs = frame_docs(np.zeros((LINES, PIXELS), np.float32), mode="constant_current", z=z, order=range(5))
    asm = FrameAssembler()
    for name, doc in docs[:-1]:
        getattr(asm, name)(doc)
    assert asm.source == ("Z", "forward")
    partial = np.full_like(z, np.nan)
    partial[:5] = z[:5]
    # Z is plane-levelled before the conversion (stm_live.interpret)
    np.testing.assert_allclose(asm.source_image(), current_from_z(plane_level(partial)), rtol=1e-6)
    assert np.isnan(asm.source_image()[5:]).all()

    start = dict(docs[0][1])
    start["stm_live"] = dict(start["stm_live"], channels=[start["stm_live"]["channels"][0]])
    with pytest.raises(FrameError, match="'Z' channel"):
        FrameAssembler().start(start)
    with pytest.raises(FrameError, match="pixel_size_nm"):
        FrameAssembler().start({"uid": "x", "stm_live": dict(docs[0][1]["stm_live"], pixel_size_nm=0)})
    with pytest.raises(FrameError, match="no 'stm_live' block"):
        FrameAssembler().start({"uid": "x"})


def _run_live(live, docs, pause_s=0.0):
    for name, doc in docs:
        live(name, doc)
        if pause_s and name == "event":
            time.sleep(pause_s)
    assert live.flush(timeout=20)


def test_final_equals_offline_and_documents_are_valid_and_linked():
    image = np.random.default_rng(2).random((LINES, PIXELS), dtype=np.float32)
    got = []
    net = BoxBlur()
    live = LiveReconstruction(net, emit=lambda n, d: got.append((n, d)), band_margin=6)
    try:
        docs = frame_docs(image)
        _run_live(live, docs, pause_s=0.003)
    finally:
        live.close()
    names = [n for n, _ in got]
    assert names[0] == "start" and names[1] == "descriptor" and names[-1] == "stop"
    for name, doc in got:
        schema_validators[DocumentNames[name]].validate(doc)
    start, desc = got[0][1], got[1][1]
    assert start["parent_uid"] == docs[0][1]["uid"] and desc["name"] == STREAM
    events = [d for n, d in got if n == "event" and "reconstruction" in d["data"]]
    final = events[-1]["data"]
    assert final["final"] and final["lines_done"] == LINES
    np.testing.assert_allclose(final["reconstruction"], net.reconstruct(image, PITCH_NM), rtol=1e-6)
    # every line appears in exactly one update; band updates stay small
    included = sorted(int(r) for e in events for r in e["data"]["lines"])
    assert included == list(range(LINES))
    band_rows = [e["data"]["row_stop"] - e["data"]["row_start"] for e in events if not e["data"]["full_frame"]]
    assert band_rows and max(band_rows) < LINES
    assert got[-1][1]["exit_status"] == "success" and got[-1][1]["num_events"][STREAM] == len(events)
    assert len(live.history) == LINES and live.latest["final"]
    np.testing.assert_array_equal(live.frame(docs[0][1]["uid"]), image)


def test_slow_network_coalesces_updates_and_keeps_every_raw_line():
    image = np.random.default_rng(3).random((LINES, PIXELS), dtype=np.float32)
    net = BoxBlur(delay_s=0.05)
    events = []
    live = LiveReconstruction(
        net, emit=lambda n, d: events.append(d) if n == "event" and "reconstruction" in d["data"] else None
    )
    try:
        docs = frame_docs(image)
        worst = 0.0
        for name, doc in docs:
            t0 = time.perf_counter()
            live(name, doc)  # what the RunEngine loop pays
            worst = max(worst, time.perf_counter() - t0)
            if name == "event":
                time.sleep(0.005)  # lines at 200/s, the network runs at < 20 updates/s
        assert live.flush(timeout=20)
    finally:
        live.close()
    assert worst < 0.02, f"__call__ blocked the RunEngine for {worst * 1e3:.1f} ms"
    assert len(events) < LINES / 2, "updates were not coalesced"
    assert sorted(int(r) for e in events for r in e["data"]["lines"]) == list(range(LINES))
    assert live.lines_received == LINES
    np.testing.assert_allclose(events[-1]["data"]["reconstruction"], BoxBlur().reconstruct(image, 1.0), rtol=1e-6)
    # latency of a line includes its wait behind the slow network
    assert max(lat for _, lat in live.history) >= 0.05


def test_a_rewound_line_replaces_the_first_copy_in_the_live_result():
    image = np.random.default_rng(4).random((LINES, PIXELS), dtype=np.float32)
    docs = frame_docs(image)
    redo = dict(docs[2 + 10][1], uid="redo", data=dict(docs[2 + 10][1]["data"]))  # same seq_num
    redo["data"]["stm_current_fwd"] = np.full(PIXELS, 3.0, np.float32)
    docs.insert(2 + 12, ("event", redo))
    events = []
    live = LiveReconstruction(
        BoxBlur(), emit=lambda n, d: events.append(d) if n == "event" and "reconstruction" in d["data"] else None
    )
    try:
        _run_live(live, docs, pause_s=0.002)
    finally:
        live.close()
    expected = image.copy()
    expected[10] = 3.0
    np.testing.assert_allclose(events[-1]["data"]["reconstruction"], BoxBlur().reconstruct(expected, 1.0), rtol=1e-6)
    assert live.lines_received == LINES + 1 and events[-1]["data"]["lines_done"] == LINES


def test_a_failing_network_does_not_break_acquisition():
    class Broken:
        def reconstruct(self, image, pixel_size_nm, line_spacing_nm=None):
            raise RuntimeError("GPU fell off")

    got = []
    live = LiveReconstruction(Broken(), emit=lambda n, d: got.append((n, d)))
    try:
        _run_live(live, frame_docs(np.ones((8, 8), np.float32)))
    finally:
        live.close()
    assert live.lines_received == 8 and any("GPU fell off" in e for e in live.errors)
    assert got[-1][0] == "stop" and got[-1][1]["exit_status"] == "fail"
    with pytest.raises(ValueError, match="reconstruct"):
        LiveReconstruction(object())


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def stmnet():
    from stm_live.models.stmnet import DEFAULT_CHECKPOINT, load_stmnet

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"shipped STM-Net checkpoint not trained yet ({DEFAULT_CHECKPOINT.name})")
    return load_stmnet(device="cpu")


@pytest.mark.timeout(60)
def test_live_reconstruction_during_a_simulated_scan(RE, sim_server, stmnet):
    from stm_live.devices.stm import NanonisSTM
    from stm_live.plans import live_frame

    docs = []
    RE.subscribe(lambda n, d: docs.append((n, d)))
    derived = []
    live = LiveReconstruction(stmnet, emit=lambda n, d: derived.append((n, d)))
    RE.subscribe(live)
    stm = NanonisSTM(sim_server.host, sim_server.port, name="stm")
    try:
        stm.wait_for_connection(timeout=10) if hasattr(stm, "wait_for_connection") else None
        (uid,) = RE(
            live_frame(
                stm,
                frame=(0.0, 0.0, 4e-9, 4e-9, 0.0),
                pixels=64,
                lines=64,
                channels=("Current", "Z"),
                z_controller="constant_height",
            )
        )
        assert live.flush(timeout=30)
    finally:
        live.close()
        if hasattr(stm, "destroy"):
            stm.destroy()
    asm = FrameAssembler()
    for name, doc in docs:
        if name in ("start", "descriptor", "event"):
            getattr(asm, name)(doc)
    assert asm.complete, f"only {asm.acquired.size} of 64 lines acquired"
    offline = stmnet.reconstruct(asm.source_image(), asm.pixel_size_nm)
    events = [d for n, d in derived if n == "event" and "reconstruction" in d["data"]]
    assert derived[0][1]["parent_uid"] == uid and events[-1]["data"]["final"]
    np.testing.assert_allclose(events[-1]["data"]["reconstruction"], offline, rtol=1e-5, atol=1e-6)
    assert len(events) > 1, "no intermediate update during the scan"
    assert live.lines_received >= 64 and len(live.history) >= 64


@pytest.mark.timeout(60)
def test_constant_current_scan_reconstructs_the_converted_z_map(RE, sim_server):
    """Same path with the Z channel (constant current) feeding the network; the stand-in
    network keeps this independent of the checkpoint."""
    from stm_live.devices.stm import NanonisSTM
    from stm_live.interpret import plane_level
    from stm_live.plans import live_frame
    from stm_live.simulators.vacuum import current_from_z

    docs, derived = [], []
    RE.subscribe(lambda n, d: docs.append((n, d)))
    live = LiveReconstruction(BoxBlur(), emit=lambda n, d: derived.append((n, d)), band_margin=8)
    RE.subscribe(live)
    stm = NanonisSTM(sim_server.host, sim_server.port, name="stm")
    try:
        RE(
            live_frame(
                stm,
                frame=(0.0, 0.0, 4e-9, 4e-9, 0.0),
                pixels=32,
                lines=32,
                channels=("Current", "Z"),
                z_controller="constant_current",
            )
        )
        assert live.flush(timeout=30)
    finally:
        live.close()
        if hasattr(stm, "destroy"):
            stm.destroy()
    z = np.stack([d["data"]["stm_z_fwd"] for n, d in docs if n == "event"])
    rows = [d["data"]["stm_line_index"] for n, d in docs if n == "event"]
    frame = np.full((32, 32), np.nan, np.float32)
    frame[rows] = z
    assert np.isfinite(frame).all() and np.ptp(frame) > 0
    final = [d for n, d in derived if n == "event" and "reconstruction" in d["data"]][-1]["data"]
    np.testing.assert_allclose(
        final["reconstruction"], BoxBlur().reconstruct(current_from_z(plane_level(frame)), 1.0), rtol=1e-5
    )
    assert final["lines_done"] == 32 and derived[-1][1]["exit_status"] == "success"


@pytest.mark.timeout(60)
def test_live_image_before_stop_tracks_the_final_one(stmnet):
    """The band-spliced running image is a faithful preview of the final reconstruction."""
    from stm_live.simulators.pairs import PairSampler

    sampler = PairSampler(size=128, pixel_size_nm=(stmnet.pixel_size_nm,) * 2, seed=3, modes=("height",))
    image = sampler.sample(1).inputs[0]
    docs = frame_docs(image.astype(np.float32), pitch_nm=stmnet.pixel_size_nm)
    events, checks = [], []
    live = LiveReconstruction(
        stmnet,
        band_margin=32,
        emit=lambda n, d: n == "event" and (events if "reconstruction" in d["data"] else checks).append(d),
    )
    try:
        _run_live(live, docs[:-1], pause_s=0.004)
        before = events[-1]["data"]["reconstruction"].copy()
        _run_live(live, docs[-1:])
    finally:
        live.close()
    final = events[-1]["data"]["reconstruction"]
    assert any(not e["data"]["full_frame"] for e in events[:-1]), "no band update happened"
    corr = np.corrcoef(before.ravel(), final.ravel())[0, 1]
    assert corr > 0.85, f"live image before stop vs final: correlation {corr:.3f}"
    # each update carries the self-consistency scalars; the end, the residual and view spread
    assert all("agreement" in e["data"] and "w_s" in e["data"] for e in events)
    [check] = checks
    assert check["data"]["residual"].shape == check["data"]["view_spread"].shape == image.shape
    assert check["data"]["orbital"] and check["data"]["agreement"] == events[-1]["data"]["agreement"]
    assert np.nanmax(check["data"]["view_spread"]) > 0  # STM-Net's two symmetry views disagree somewhere


def test_frame_outside_stmnet_scope_is_not_reconstructed_and_says_why():
    image = np.random.default_rng(5).random((LINES, PIXELS), dtype=np.float32)
    got = []
    net = BoxBlur()
    live = LiveReconstruction(net, emit=lambda n, d: got.append((n, d)))
    try:
        _run_live(live, frame_docs(image, pitch_nm=0.5))  # 0.5 nm/px: an overview
    finally:
        live.close()
    assert not net.calls and not [d for n, d in got if n == "event"]
    start, stop = got[0][1], got[-1][1]
    assert not start["reconstruction"]["in_scope"] and "coarser" in start["reconstruction"]["scope_reason"]
    assert stop["exit_status"] == "abort" and stop["reason"].startswith("not reconstructed: 0.5 nm/px")
