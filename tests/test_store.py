"""Journal durability and tiled ingestion (no controller needed)."""

from __future__ import annotations

import numpy as np
import pytest
from event_model import compose_run

from stm_live.store import (
    JournalError,
    JournalWriter,
    find_journal,
    ingest_journal,
    journals_to_ingest,
    read_journal,
    run_data,
    run_from_tiled,
)

PIXELS, LINES = 16, 6


def _frame_docs(rng, *, lines_to_emit=LINES, stop=True, resend=None):
    """Documents shaped as interfaces.md says, built with event_model."""
    meta = {
        "frame": {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 5e-9, "height_m": 5e-9, "angle_deg": 0.0},
        "pixels": PIXELS,
        "lines": LINES,
        "pixel_size_nm": 5 / PIXELS,
        "scan_direction": "down",
        "bias_V": -1.0,
        "setpoint_A": 1e-11,
        "z_controller": "constant_current",
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
    run = compose_run(metadata={"plan_name": "live_frame", "stm_live": meta})
    docs = [("start", run.start_doc)]
    keys = {"stm_line_index": {"source": "sim", "dtype": "integer", "shape": []}}
    for k in ("stm_current_fwd", "stm_current_bwd"):
        keys[k] = {"source": "sim", "dtype": "array", "shape": [PIXELS], "units": "A", "dtype_numpy": "<f4"}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs.append(("descriptor", desc.descriptor_doc))
    order = list(range(lines_to_emit)) + ([resend] if resend is not None else [])
    for row in order:
        data = {
            "stm_line_index": row,
            "stm_current_fwd": rng.standard_normal(PIXELS).astype(np.float32),
            "stm_current_bwd": rng.standard_normal(PIXELS).astype(np.float32),
        }
        docs.append(("event", desc.compose_event(data=data, timestamps={k: 0.0 for k in data})))
    if stop:
        docs.append(("stop", run.compose_stop()))
    return docs


def test_journal_round_trip_keeps_arrays_exact(tmp_path):
    docs = _frame_docs(np.random.default_rng(1))
    writer = JournalWriter(tmp_path)
    for name, doc in docs:
        writer(name, doc)
    path = tmp_path / "journal" / f"{docs[0][1]['uid']}.journal"
    back = read_journal(path)
    assert [n for n, _ in back] == [n for n, _ in docs]
    for (_, a), (_, b) in zip(docs, back):
        if "data" in a:
            for key, value in a["data"].items():
                np.testing.assert_array_equal(b["data"][key], value)
                assert np.asarray(b["data"][key]).dtype == np.asarray(value).dtype
    data = run_data(back)
    assert data.exit_status == "success"
    assert data.images["stm_current_fwd"].shape == (LINES, PIXELS)
    assert not np.isnan(data.images["stm_current_bwd"]).any()
    assert find_journal(docs[0][1]["uid"][:8], tmp_path) == path


def test_truncated_tail_keeps_good_prefix(tmp_path):
    docs = _frame_docs(np.random.default_rng(2), stop=False)
    writer = JournalWriter(tmp_path)
    for name, doc in docs:
        writer(name, doc)
    path = writer.last_path
    writer.close()
    whole = path.read_bytes()
    for cut in (1, 7, 40):  # torn payload, torn header
        path.write_bytes(whole[:-cut])
        back = read_journal(path)
        assert len(back) == len(docs) - 1
        assert run_data(back).lines_read == list(range(LINES - 1))
    path.write_bytes(whole[:3])
    assert read_journal(path) == []


def test_cut_off_tail_is_one_warning_and_damage_in_the_middle_an_error(tmp_path, caplog):
    import struct

    docs = _frame_docs(np.random.default_rng(7))
    writer = JournalWriter(tmp_path)
    for name, doc in docs:
        writer(name, doc)
    path = writer.last_path
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the stop record cut off by a crash
    with caplog.at_level("WARNING", logger="stm_live.store"):
        assert [n for n, _ in read_journal(path)] == [n for n, _ in docs[:-1]]
    (warning,) = [r for r in caplog.records if r.name == "stm_live.store"]
    assert "cut off" in warning.getMessage() and "\n" not in warning.getMessage()
    # the third record's length field damaged: it runs past the end, but intact records follow
    starts, pos = [], 0
    while pos < len(whole):
        starts.append(pos)
        pos += 8 + struct.unpack_from(">I", whole, pos)[0]
    for length in (1 << 20, 3):  # longer than the file; shorter than the record
        raw = bytearray(whole)
        struct.pack_into(">I", raw, starts[2], length)
        path.write_bytes(bytes(raw))
        with pytest.raises(JournalError, match=r"record 2 at byte \d+ is damaged .*intact records follow"):
            read_journal(path)


def test_corruption_before_the_end_is_an_error(tmp_path):
    docs = _frame_docs(np.random.default_rng(3))
    writer = JournalWriter(tmp_path)
    for name, doc in docs:
        writer(name, doc)
    raw = bytearray(writer.last_path.read_bytes())
    raw[20] ^= 0xFF  # inside the start document's payload
    writer.last_path.write_bytes(bytes(raw))
    with pytest.raises(JournalError, match="checksum"):
        read_journal(writer.last_path)


def test_resent_line_keeps_last_and_unrouted_doc_is_refused(tmp_path):
    docs = _frame_docs(np.random.default_rng(4), resend=2)
    data = run_data(docs)
    assert data.lines_read.count(2) == 2
    np.testing.assert_array_equal(data.images["stm_current_fwd"][2], docs[-2][1]["data"]["stm_current_fwd"])
    writer = JournalWriter(tmp_path)
    with pytest.raises(JournalError, match="event document"):
        writer("event", docs[2][1])


@pytest.fixture(scope="module")
def tiled_server(tmp_path_factory):
    from stm_live.store import open_tiled

    client, server = open_tiled(tmp_path_factory.mktemp("data"))
    yield client, server
    server.close()


@pytest.fixture()
def tiled_client(tiled_server):
    return tiled_server[0]


def test_tiled_gives_the_frame_back_bit_for_bit_and_reingests(tmp_path, tiled_client):
    docs = _frame_docs(np.random.default_rng(5), lines_to_emit=LINES - 2, stop=False)
    writer = JournalWriter(tmp_path)
    for name, doc in docs:
        writer(name, doc)
    path = writer.last_path
    uid = ingest_journal(tiled_client, path)  # a crashed run: no stop document
    node = tiled_client[uid]
    assert [spec.name for spec in node.specs] == ["BlueskyRun"]
    assert node.metadata["start"]["uid"] == uid and node.metadata.get("stop") is None
    expected = run_data(read_journal(path)).images
    got = run_from_tiled(tiled_client, uid)
    assert got.exit_status == "incomplete"
    for key, image in expected.items():
        assert got.images[key].dtype == np.float32
        assert got.images[key].tobytes() == image.tobytes()  # NaN rows included
    # the run finishes later (or is recovered): re-ingesting replaces the node
    writer(
        "stop",
        {"uid": "s" * 32, "run_start": uid, "time": 0.0, "exit_status": "fail", "reason": "dropped", "num_events": {}},
    )
    ingest_journal(tiled_client, path)
    assert tiled_client[uid].metadata["stop"]["exit_status"] == "fail"
    assert tiled_client[uid]["primary"]["stm_line_index"].read().tolist() == list(range(LINES - 2))


def test_session_run_lands_in_tiled_and_exports_sxm(tiled_server, sim_server, tmp_path, capsys, monkeypatch):
    """Real path: device -> TCP -> sim, RunEngine, journal, tiled ingestion thread,
    runs list/show/export."""
    import nanonispy.read as nap

    from stm_live.app.runs import runs_export, runs_list, runs_show
    from stm_live.devices.stm import NanonisSTM
    from stm_live.io.sxm import read_sxm
    from stm_live.plans import live_frame
    from stm_live.session import AcquisitionSession

    client, server = tiled_server
    # a run from an earlier session that was killed before its stop: recovered at start
    crashed = JournalWriter(tmp_path)
    for name, doc in _frame_docs(np.random.default_rng(6), lines_to_emit=3, stop=False):
        crashed(name, doc)
    crashed_uid = crashed.last_path.stem
    seen = []
    stm = NanonisSTM(sim_server.host, sim_server.port, name="stm")
    try:
        with AcquisitionSession(tmp_path, tiled_uri=server.uri, callbacks=[lambda n, d: seen.append(n)]) as session:
            (uid,) = session(
                live_frame(stm, frame=(0, 0, 4e-9, 4e-9, 0), pixels=32, lines=6, channels=["Current", "Z"])
            )
            assert session.wait(30)
            assert sorted(session.ingestor.ingested) == sorted([uid, crashed_uid])
            assert session.recovered == [crashed_uid] and not session.ingestor.errors
    finally:
        stm.close()
    assert client[crashed_uid]["primary"]["stm_line_index"].read().tolist() == [0, 1, 2]
    assert journals_to_ingest(client, tmp_path) == []  # nothing stale left
    assert seen[0] == "start" and seen[-1] == "stop"  # threaded callback saw everything
    journal = run_data(read_journal(tmp_path / "journal" / f"{uid}.journal"))
    got = run_from_tiled(client, uid)
    for key, image in journal.images.items():
        assert not np.isnan(image).any()
        assert got.images[key].tobytes() == image.tobytes()
    rows = runs_list(data_dir=tmp_path)
    assert rows[-1]["uid"] == uid and rows[-1]["lines_read"] == 6
    assert runs_show(uid[:6], data_dir=tmp_path).exit_status == "success"
    assert uid in capsys.readouterr().out
    out = runs_export("-1", sxm=tmp_path / "frame.sxm", data_dir=tmp_path)
    back = read_sxm(out)
    np.testing.assert_array_equal(back.channels["Current"]["forward"], journal.images["stm_current_fwd"])
    # nanonispy 1.1 still uses the np.float / np.int aliases that numpy 1.24 removed.
    monkeypatch.setattr(np, "float", float, raising=False)
    monkeypatch.setattr(np, "int", int, raising=False)
    scan = nap.Scan(str(out))  # the reference reader opens it
    assert scan.signals["Current"]["forward"].shape == (6, 32)
    with pytest.raises(JournalError, match="matches 0 runs"):
        runs_show("zzzz", data_dir=tmp_path)


def test_run_scan_as_the_cli_calls_it(tiled_server, sim_server, tmp_path):
    from stm_live.app.scan import run_scan

    client, server = tiled_server
    uids = run_scan(
        profile="sim",
        host=sim_server.host,
        port=sim_server.port,
        width_nm=4.0,
        pixels=16,
        lines=4,
        direction="up",
        frames=2,
        data_dir=tmp_path,
        tiled_uri=server.uri,
        tip_policy="off",
        worker=None,
        view=False,
    )
    assert len(uids) == 2
    for uid in uids:
        data = run_data(read_journal(tmp_path / "journal" / f"{uid}.journal"))
        assert data.exit_status == "success" and data.start["stm_live"]["scan_direction"] == "up"
        # ingested before run_scan returned
        assert client[uid].metadata["stop"]["exit_status"] == "success"
        assert sorted(client[uid]["primary"]["stm_line_index"].read().tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="tip_policy"):
        run_scan(profile="sim", port=sim_server.port, tip_policy="sometimes", data_dir=tmp_path)
