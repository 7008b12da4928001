"""`stm-live replay`: recorded .sxm -> simulated controller -> NanonisSTM over TCP ->
RunEngine -> journal + live reconstruction + tip monitor, checked against the file."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from stm_live.io.sxm import read_sxm, scan_from_frames, write_sxm
from stm_live.replay_cli import ReplayFailed, run_replay
from stm_live.store import read_journal, run_data

LINES, PIXELS = 24, 32
TIME_SCALE = 20.0  # recorded 0.2 s per line -> 10 ms per line


def _recording(direction: str = "up"):
    """Constant-height Current + Z frame with a molecule-like blob; backward data differ
    from forward (and are not mirror-symmetric), so any orientation slip shows."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:LINES, 0:PIXELS].astype(np.float64)
    blob = np.exp(-((xx - 11) ** 2 + (yy - 9) ** 2) / 20.0) + 0.5 * np.exp(
        -((xx - 22) ** 2 + (yy - 16) ** 2) / 8.0)
    current = (2e-11 * blob + 2e-13 * rng.standard_normal(blob.shape)).astype(np.float32)
    z = (5e-11 * blob + xx * 1e-13).astype(np.float32)
    channels = {
        "Current": {"forward": current, "backward": (current * 1.02 + 1e-13).astype(np.float32)},
        "Z": {"forward": z, "backward": (z + 3e-12).astype(np.float32)},
    }
    return scan_from_frames(channels, units={"Current": "A", "Z": "m"}, center_x_m=1e-9,
                            center_y_m=-2e-9, width_m=3.2e-9, height_m=2.4e-9,
                            direction=direction, bias_V=-0.5, setpoint_A=5e-12,
                            z_controller="constant_height", acq_time_s=LINES * 0.2,
                            signal_indexes={"Current": 0, "Z": 30})


def _replay(tmp_path, files, worker=None, **kw):
    return run_replay(files=files, time_scale=TIME_SCALE, worker=worker,
                      data_dir=tmp_path / "data", out=tmp_path / "out", view=False, **kw)


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
    parents = {docs[0][1].get("parent_uid") for docs in
               (read_journal(p) for p in (tmp_path / "data" / "journal").glob("*.journal"))}
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
    assert run.images["stm_current_fwd"][:15].tobytes() == stopped.channels["Current"][
        "forward"][:15].tobytes()
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

    from stm_live.streaming import run_worker

    connect = f"tcp://127.0.0.1:{_free_port()}"
    results = f"tcp://127.0.0.1:{_free_port()}"
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, daemon=True, kwargs=dict(
        connect=connect, results=results, stop_event=stop))
    worker.start()
    try:
        path = write_sxm(tmp_path / "remote.sxm", _recording("down"))
        (result,) = _replay(tmp_path, [path], worker=f"{connect},{results}",
                            worker_wait_s=30.0)
    finally:
        stop.set()
        worker.join(15)
    assert result.status == "ok", result.message
    assert result.frame_identical and result.reconstruction_matches
    assert result.tip_verdicts >= 1
    # the worker's derived runs were journaled by the acquisition side
    parents = {docs[0][1].get("parent_uid") for docs in
               (read_journal(p) for p in (tmp_path / "data" / "journal").glob("*.journal"))}
    assert result.run_uid in parents
