"""`stm-live replay`: recorded .sxm -> simulated controller -> NanonisSTM over TCP ->
RunEngine -> journal + live reconstruction + tip monitor, checked against the file."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import pytest
from rich.console import Console
from sxm_files import (
    file_blocks,
    nanonispy_scan,
    quirky_files,
    scene,
    write_grid_3ds,
    write_raw_sxm,  # raw .sxm writer, not stm_live.io
    write_spectrum_dat,
)

from stm_live.app.replay import ReplayFailed, run_replay
from stm_live.io.sxm import read_sxm, scan_from_frames, write_sxm
from stm_live.store import read_journal, run_data

LINES, PIXELS = 24, 32
TIME_SCALE = 20.0  # recorded 0.2 s per line -> 10 ms per line


def _recording(direction: str = "up"):
    """Constant-height Current + Z frame with a molecule-like blob; backward data differ
    from forward (and are not mirror-symmetric), so any orientation slip shows."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:LINES, 0:PIXELS].astype(np.float64)
    blob = np.exp(-((xx - 11) ** 2 + (yy - 9) ** 2) / 20.0) + 0.5 * np.exp(-((xx - 22) ** 2 + (yy - 16) ** 2) / 8.0)
    current = (2e-11 * blob + 2e-13 * rng.standard_normal(blob.shape)).astype(np.float32)
    z = (5e-11 * blob + xx * 1e-13).astype(np.float32)
    channels = {
        "Current": {"forward": current, "backward": (current * 1.02 + 1e-13).astype(np.float32)},
        "Z": {"forward": z, "backward": (z + 3e-12).astype(np.float32)},
    }
    return scan_from_frames(
        channels,
        units={"Current": "A", "Z": "m"},
        center_x_m=1e-9,
        center_y_m=-2e-9,
        width_m=3.2e-9,
        height_m=2.4e-9,
        direction=direction,
        bias_V=-0.5,
        setpoint_A=5e-12,
        z_controller="constant_height",
        acq_time_s=LINES * 0.2,
        signal_indexes={"Current": 0, "Z": 30},
    )


def _replay(tmp_path, files, worker=None, **kw):
    return run_replay(
        files=files,
        time_scale=TIME_SCALE,
        worker=worker,
        data_dir=tmp_path / "data",
        out=tmp_path / "out",
        view=False,
        **kw,
    )


def test_replay_is_bit_exact_and_matches_offline_reconstruction(tmp_path):
    from stm_live.models import load_stmnet

    path = write_sxm(tmp_path / "pentacene_up.sxm", _recording("up"))
    (result,) = _replay(tmp_path, [path])
    assert result.status == "ok", result.message
    assert result.lines == LINES and result.tip_verdicts >= 1 and result.tip_last
    # The journal holds the recording bit for bit, every channel and direction.
    run = run_data(read_journal(result.journal))
    meta = run.start["stm_live"]
    assert meta["scan_direction"] == "up" and meta["z_controller"] == "constant_height"
    assert sorted(run.lines_read) == list(range(LINES))
    recorded = read_sxm(path)
    for name, key in (("Current", "stm_current"), ("Z", "stm_z")):
        for direction, suffix in (("forward", "fwd"), ("backward", "bwd")):
            got = run.images[f"{key}_{suffix}"]
            want = recorded.image(name, direction)
            assert got.tobytes() == want.tobytes(), (name, direction)
    # The final live reconstruction equals `stm-live reconstruct` on the same channel.
    final = np.load(result.reconstruction_npy)
    offline = load_stmnet().reconstruct(recorded.image("Current"), recorded.pixel_size_nm)
    np.testing.assert_allclose(final, offline, rtol=1e-4, atol=1e-5 * np.abs(offline).max())
    assert result.reconstruction_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The derived runs are journaled beside the raw one, linked by parent_uid.
    parents = {
        docs[0][1].get("parent_uid")
        for docs in (read_journal(p) for p in (tmp_path / "data" / "journal").glob("*.journal"))
    }
    assert run.uid in parents


def test_batch_folder_reports_truncated_file_and_keeps_going(tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    write_sxm(folder / "a_good.sxm", _recording("down"))
    raw = write_sxm(folder / "b_truncated.sxm", _recording("down")).read_bytes()
    (folder / "b_truncated.sxm").write_bytes(raw[:-700])
    with pytest.raises(ReplayFailed) as info:
        _replay(tmp_path, [folder])
    good, bad = info.value.results
    assert good.status == "ok" and good.lines == LINES and good.frame_identical
    assert (tmp_path / "out" / "a_good_reconstruction.npy").is_file()
    assert bad.status == "failed"
    assert "b_truncated.sxm" in bad.message and "truncated" in bad.message
    assert "b_truncated.sxm" in str(info.value)
    table = capsys.readouterr().out
    assert "a_good.sxm" in table and "b_truncated.sxm" in table
    assert table.count("replay summary") == 1  # one table for the whole batch


def test_partial_and_single_direction_recordings(tmp_path):
    stopped = _recording("down")
    for dirs in stopped.channels.values():
        for image in dirs.values():
            image[15:] = np.nan  # the scan was stopped after 15 lines
    partial = write_sxm(tmp_path / "stopped.sxm", stopped)
    forward_only = copy.deepcopy(_recording("down"))
    for dirs in forward_only.channels.values():
        del dirs["backward"]
    single = write_sxm(tmp_path / "forward_only.sxm", forward_only)

    part, fwd = _replay(tmp_path, [partial, single])
    assert part.status == "partial" and part.lines == 15 and part.frame_identical
    assert "stopped.sxm" in part.message and "15 of 24" in part.message
    run = run_data(read_journal(part.journal))
    assert sorted(run.lines_read) == list(range(15))
    assert np.isnan(run.images["stm_current_fwd"][15:]).all()
    assert run.images["stm_current_fwd"][:15].tobytes() == stopped.channels["Current"]["forward"][:15].tobytes()
    final = np.load(part.reconstruction_npy)
    assert np.isfinite(final[:15]).all() and np.isnan(final[15:]).all()

    assert fwd.status == "ok" and fwd.lines == LINES and fwd.frame_identical
    run = run_data(read_journal(fwd.journal))
    assert set(run.images) == {"stm_current_fwd", "stm_z_fwd"}  # no invented backward data


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_replay_with_remote_worker(tmp_path):
    """`--worker`: documents go over 0MQ to a worker (here `run_worker` on a thread);
    its reconstruction and verdicts come back and are checked like in-process ones."""
    import threading

    from stm_live.app.worker import run_worker

    connect = f"tcp://127.0.0.1:{_free_port()}"
    results = f"tcp://127.0.0.1:{_free_port()}"
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker, daemon=True, kwargs=dict(connect=connect, results=results, stop_event=stop)
    )
    worker.start()
    try:
        path = write_sxm(tmp_path / "remote.sxm", _recording("down"))
        (result,) = _replay(tmp_path, [path], worker=f"{connect},{results}", worker_wait_s=30.0)
    finally:
        stop.set()
        worker.join(15)
    assert result.status == "ok", result.message
    assert result.frame_identical and result.reconstruction_matches
    assert result.tip_verdicts >= 1
    # the worker's derived runs were journaled by the acquisition side
    parents = {
        docs[0][1].get("parent_uid")
        for docs in (read_journal(p) for p in (tmp_path / "data" / "journal").glob("*.journal"))
    }
    assert result.run_uid in parents


# ----------------------------------------------------------------------------- real files
# Files written byte by byte by tests/sxm_files.py (not stm_live.io.sxm), checked against
# nanonispy, replayed through the real TCP server and asked for by the file's own indexes.

REPLAY_CLOCK = 1000.0  # recorded 0.2 s per line -> 0.2 ms per line


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    return quirky_files(tmp_path_factory.mktemp("quirky"))


def test_raw_writer_agrees_with_nanonispy(quirky):
    """The test files themselves: nanonispy, the independent reader, sees the arrays and
    header fields tests/sxm_files.py meant to write."""
    readable = [c for c in quirky.values() if c["nanonispy"]]
    assert len(readable) >= 4
    for case in readable:
        theirs = nanonispy_scan(case["path"])
        h = theirs.header
        assert list(h["scan_pixels"]) == [case["pixels"], case["lines"]]
        np.testing.assert_allclose(h["scan_range"], case["range_m"], rtol=1e-6)
        assert h["scan_dir"] == case["direction"] and h["bias"] == pytest.approx(case["bias_V"])
        assert h["z-controller"]["on"] == (("1",) if case.get("feedback_on", True) else ("0",))
        assert h["data_info"]["Channel"] == tuple(str(c[0]) for c in case["channels"].values())
        for name, (_i, _u, fwd, bwd) in case["channels"].items():
            want_f, want_b = file_blocks(fwd, bwd)
            got = theirs.signals[name]
            assert np.asarray(got["forward"], np.float32).tobytes() == want_f.tobytes()
            assert np.asarray(got["backward"], np.float32).tobytes() == want_b.tobytes()
    stopped_case = quirky["aborted_backward"]["channels"]["Z"]
    assert np.isfinite(stopped_case[2][19]).all() and np.isnan(stopped_case[3][19]).all()


def _run_to_end(client, timeout_s: float = 20.0) -> None:
    """Start the replayed scan and wait, on end-of-line events, until it stops."""
    from stm_live.devices.client import NanonisClient

    client.scan_action("start", "down")
    deadline = time.monotonic() + timeout_s
    with NanonisClient(client.host, client.port, timeout=5) as waiter:
        while client.scan_status_get():
            assert time.monotonic() < deadline, "replayed scan did not end"
            waiter.scan_wait_end_of_line(1.0)


def _expected_wire(case, name, path):
    """(forward, backward) as the file stores them, from nanonispy where it can read the
    file (both directions, new header), else from the arrays the generator wrote."""
    index, unit, fwd, bwd = case["channels"][name]
    if case["nanonispy"]:
        theirs = nanonispy_scan(path).signals[name]
        return (np.asarray(theirs["forward"], np.float32), np.asarray(theirs["backward"], np.float32))
    return file_blocks(fwd, bwd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name",
    [
        "cc_lockin_down",
        "ch_negative_up_rotated",
        "non_square",
        "old_header_latin1",
        "overview_partial",
        "aborted_backward",
    ],
)
def test_replay_serves_every_channel_under_its_declared_index(quirky, name):
    from nanonisTCP import nanonisTCP
    from nanonisTCP.Scan import Scan

    from stm_live.devices.client import NanonisClient
    from stm_live.simulators.server import start_server_thread

    case = quirky[name]
    path = case["path"]
    declared = {ch: spec[0] for ch, spec in case["channels"].items()}
    with (
        start_server_thread(replay=path, time_scale=REPLAY_CLOCK, seed=0) as server,
        NanonisClient(server.host, server.port, timeout=5) as ours,
    ):
        buffer = ours.scan_buffer_get()
        assert list(buffer.channel_indexes) == list(declared.values())  # DATA_INFO order
        assert (buffer.pixels, buffer.lines) == (case["pixels"], case["lines"])
        names = ours.signals_names_get()
        for ch, idx in declared.items():
            label = f"{ch} ({case['channels'][ch][1]})"
            assert names[idx] == label and names.count(label) == 1, (idx, names[idx])
        frame = ours.scan_frame_get()
        np.testing.assert_allclose(
            (frame.center_x, frame.center_y, frame.width, frame.height, frame.angle_deg),
            (*case.get("offset_m", (0.0, 0.0)), *case["range_m"], case.get("angle_deg", 0.0)),
            rtol=1e-6,
            atol=1e-15,
        )  # float32 on the wire

        _run_to_end(ours)
        peer = nanonisTCP(server.host, server.port)
        peer.s.settimeout(10.0)
        try:
            for ch, idx in declared.items():
                want = dict(zip(("forward", "backward"), _expected_wire(case, ch, path)))
                for direction, want_data in want.items():
                    grab = ours.scan_frame_data_grab(idx, forward=direction == "forward")
                    assert grab.scan_up == (case["direction"] == "up")
                    if want_data is None:  # direction not recorded: served as unscanned
                        assert np.isnan(grab.data).all()
                        continue
                    assert grab.data.dtype == np.float32
                    assert grab.data.tobytes() == want_data.tobytes(), (ch, idx, direction)
                    peer_name, peer_data, peer_dir = Scan(peer).FrameDataGrab(idx, 1 if direction == "forward" else 0)
                    assert peer_name == grab.name and peer_dir == case["direction"]
                    assert peer_data.astype(np.float32).tobytes() == want_data.tobytes()
        finally:
            peer.close_connection()


def test_replay_falls_back_by_name_only_for_unusable_indexes(tmp_path, caplog):
    from stm_live.simulators.controller import SimulatedController

    f, b = scene("z", pixels=16, lines=8)
    i, _ = scene("current", pixels=16, lines=8)
    path = write_raw_sxm(
        tmp_path / "damaged.sxm",
        range_m=(2e-9, 1e-9),
        channels={
            "Z": (14, "m", f, b),
            "Current": ("x", "A", i, i),
            "LI Demod 1 X": (200, "A", i, i),
            "Input 3": (14, "V", i, i),
            "Bias": (24, "V", i, None),
        },
    )
    with caplog.at_level(logging.WARNING, logger="stm_live.simulators.replay"):
        c = SimulatedController(replay=path, time_scale=REPLAY_CLOCK)
    index_of = c.replay.index_of
    assert index_of["Z"] == 14 and index_of["Bias"] == 24  # declared and usable
    assert index_of["Current"] == 0  # "x" is not an integer: its name's index
    assert index_of["LI Demod 1 X"] == 35  # 200 is out of range: its name's index
    assert index_of["Input 3"] == 2  # 14 is taken by Z
    assert c.channel_indexes == [14, 0, 35, 2, 24]
    log = caplog.text
    assert "'x' is not an integer" in log and "200 is outside 0..127" in log
    assert "14 is already declared for 'Z'" in log and "damaged.sxm" in log
    assert c.signal_names[14] == "Z (m)" and c.signal_names.count("Z (m)") == 1


@pytest.mark.timeout(10)
def test_cyclic_exception_chain_is_described_without_looping():
    """plans._status_cause re-raises a FailedStatus's cause inside its handler, so cause
    and context form a cycle; walking it must end (it looped at 100 % CPU)."""
    from bluesky.utils import FailedStatus

    from stm_live.console import caused_by, describe
    from stm_live.devices.stm import ControllerLost

    try:
        try:
            try:
                raise ControllerLost("controller stopped the scan after 19 of 32 lines")
            except ControllerLost as lost:
                raise FailedStatus("status failed") from lost
        except FailedStatus as failed:
            # no `from`: as in plans._status_cause, the context (not a cause) links back to the FailedStatus
            raise failed.__cause__  # noqa: B904
    except ControllerLost as exc:
        caught = exc
    assert caught.__context__.__cause__ is caught  # the cycle
    for exc in (caught, caught.__context__):
        assert caused_by(exc, ControllerLost) and not caused_by(exc, KeyError)
        assert describe(exc) == ("ControllerLost: controller stopped the scan after 19 of 32 lines")


@pytest.mark.timeout(90)
def test_frame_stopped_during_backward_sweep_ends_partial(tmp_path, quirky, capsys):
    case = quirky["aborted_backward"]
    t0 = time.perf_counter()
    (result,) = _replay(tmp_path, [case["path"]], console=Console(width=400))
    elapsed = time.perf_counter() - t0
    assert elapsed < 30.0, f"replay took {elapsed:.1f} s"
    assert result.status == "partial", result.message
    # row 19 has forward data only: not a finished line, so 19 lines were acquired
    assert result.lines == 19 and result.recorded_lines == 20 and result.frame_identical
    assert "aborted_backward.sxm" in result.message and "19 of 32 lines" in result.message
    assert "backward sweep" in result.message
    run = run_data(read_journal(result.journal))
    assert sorted(run.lines_read) == list(range(19))
    z_fwd = case["channels"]["Z"][2]
    assert run.images["stm_z_fwd"][:19].tobytes() == z_fwd[:19].tobytes()
    assert np.isnan(run.images["stm_z_fwd"][19:]).all()
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert (out.out + out.err).count("recording stopped mid-scan") == 1


@pytest.mark.timeout(120)
def test_folder_with_bad_files_replays_the_rest(tmp_path, quirky, capsys):
    folder = tmp_path / "session"
    folder.mkdir()
    good = folder / "a_good.sxm"
    good.write_bytes(quirky["cc_lockin_down"]["path"].read_bytes())
    raw = quirky["non_square"]["path"].read_bytes()
    (folder / "b_truncated.sxm").write_bytes(raw[: len(raw) // 2])
    write_grid_3ds(folder / "c_grid.3ds")
    write_spectrum_dat(folder / "d_spectrum.dat")
    write_grid_3ds(folder / "e_renamed_grid.sxm")  # a grid saved as .sxm
    (folder / "f_notes.txt").write_text("tip conditioned at 14:02\n")
    stray = write_spectrum_dat(tmp_path / "given_by_mistake.dat")
    with pytest.raises(ReplayFailed) as info:
        _replay(tmp_path, [stray, folder], console=Console(width=400))
    by_name = {r.file.name: r for r in info.value.results}
    assert set(by_name) == {"given_by_mistake.dat", "a_good.sxm", "b_truncated.sxm", "e_renamed_grid.sxm"}
    assert by_name["a_good.sxm"].status == "ok", by_name["a_good.sxm"].message
    assert by_name["a_good.sxm"].frame_identical
    trunc = by_name["b_truncated.sxm"]
    assert trunc.status == "failed" and "truncated" in trunc.message
    grid = by_name["e_renamed_grid.sxm"].message
    assert grid == f"{folder / 'e_renamed_grid.sxm'}: a Nanonis grid-spectroscopy file (.3ds); replay takes .sxm scans"
    assert by_name["given_by_mistake.dat"].message.endswith(
        "given_by_mistake.dat: a Nanonis spectroscopy file (.dat); replay takes .sxm scans"
    )
    out = capsys.readouterr().out
    assert "not a Nanonis .sxm" not in out and "Traceback" not in out
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "3 other file(s)" in skipped[0]
    assert all(n in skipped[0] for n in ("c_grid.3ds", "d_spectrum.dat", "f_notes.txt"))


def test_other_nanonis_formats_are_named(tmp_path):
    from stm_live.simulators.replay import ReplayError, ReplaySource

    grid = write_grid_3ds(tmp_path / "map.3ds")
    with pytest.raises(
        ReplayError,
        match=r"map\.3ds: a Nanonis grid-spectroscopy file \(\.3ds\); "
        r"replay takes \.sxm scans$",
    ):
        ReplaySource.from_file(grid)
