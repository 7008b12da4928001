"""Runs in tiled in the standard BlueskyRun layout (bluesky's TiledWriter), read back with a
plain tiled client; the derived runs found from their parent; the old layout migrated once."""

from __future__ import annotations

import numpy as np
import pytest
from test_live import BoxBlur
from test_store import _frame_docs

from stm_live.store import JournalWriter, derived_runs, migrate_old_layout, read_journal, run_data, run_from_tiled

PIXELS, LINES = 32, 16


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A tiled server standing for a lab's: it reads the tests' data folders (their assets)."""
    from tiled.server import SimpleTiledServer

    server = SimpleTiledServer(
        directory=tmp_path_factory.mktemp("tiled_server"), readable_storage=[tmp_path_factory.getbasetemp()]
    )
    yield server
    server.close()


def _events(docs, stream="primary"):
    descriptors = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream}
    return [d for n, d in docs if n == "event" and d["descriptor"] in descriptors]


def test_tcp_run_reads_back_as_a_bluesky_run_with_its_reconstruction(tiled, sim_server, tmp_path):
    """Real path: NanonisSTM over TCP to the simulated controller, RunEngine, journal, live
    reconstruction, ingestion through TiledWriter off the loop; read with a plain client."""
    from tiled.client import from_uri
    from tiled.queries import Key

    from stm_live.app.runs import runs_export, runs_list
    from stm_live.devices.stm import NanonisSTM
    from stm_live.plans import live_frame
    from stm_live.session import AcquisitionSession

    stm = NanonisSTM(sim_server.host, sim_server.port, name="stm")
    try:
        with AcquisitionSession(tmp_path, tiled_uri=tiled.uri, live=True, reconstructor=BoxBlur()) as session:
            (uid,) = session(
                live_frame(stm, frame=(0, 0, 4e-9, 2e-9, 0), pixels=PIXELS, lines=LINES, channels=["Current", "Z"])
            )
            assert session.wait(120), "consumers or ingestion did not finish within 120 s"
            assert not session.ingestor.errors, session.ingestor.errors
            final = session.collector.finals[uid]
    finally:
        stm.close()
    docs = read_journal(tmp_path / "journal" / f"{uid}.journal")
    client = from_uri(tiled.uri)  # a plain client: nothing of stm-live's
    run = client[uid]
    assert [spec.name for spec in run.specs] == ["BlueskyRun"]
    assert run.metadata["start"]["uid"] == uid and run.metadata["start"]["stm_live"]["lines"] == LINES
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run.metadata["stop"]["num_events"]["primary"] == len(_events(docs))
    primary = run["primary"]
    (descriptor,) = [d for n, d in docs if n == "descriptor" and d["name"] == "primary"]
    assert primary.metadata["uid"] == descriptor["uid"]
    events = _events(docs)
    for key in descriptor["data_keys"]:  # every array, as the journal's lines, in event order
        expected = np.stack([np.asarray(e["data"][key]) for e in events])
        got = primary[key].read()
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert got.tobytes() == expected.tobytes(), key
    assert primary["seq_num"].read().tolist() == [e["seq_num"] for e in events]
    assert sorted(primary["stm_line_index"].read().tolist()) == list(range(LINES))
    # the derived reconstruction run, found from the acquisition run, with the final image
    found = {key: node.metadata["start"] for key, node in client.search(Key("start.parent_uid") == uid).items()}
    (recon_uid,) = [k for k, start in found.items() if start.get("stm_live_derived") == "reconstruction"]
    assert derived_runs(client, uid)["reconstruction"] == recon_uid
    images = client[recon_uid]["reconstruction"]["reconstruction"].read()
    assert images.shape[1:] == (LINES, PIXELS) and client[recon_uid]["reconstruction"]["final"].read()[-1]
    np.testing.assert_array_equal(images[-1], final)
    # stm-live's own readers go through the same layout
    assert run_from_tiled(client, uid).images.keys() == run_data(docs).images.keys()
    for key, image in run_data(docs).images.items():
        assert run_from_tiled(client, uid).images[key].tobytes() == image.tobytes()
    rows = runs_list(data_dir=tmp_path, tiled_uri=tiled.uri)
    assert {"uid": uid, "lines_read": LINES, "exit_status": "success"}.items() <= next(
        r for r in rows if r["uid"] == uid
    ).items()
    from stm_live.io.sxm import read_sxm

    out = runs_export(uid[:8], sxm=tmp_path / "from_tiled.sxm", data_dir=tmp_path, tiled_uri=tiled.uri)
    np.testing.assert_array_equal(read_sxm(out).channels["Z"]["forward"], run_data(docs).images["stm_z_fwd"])


def test_viewer_shows_a_run_stored_in_tiled(tiled, tmp_path):
    """The viewer reads a stored run and its derived reconstruction through the standard layout."""
    from event_model import compose_run
    from tiled.client import from_uri

    from stm_live.store import ingest_journal
    from stm_live.viewer import ViewerState, show_stored_run

    docs = _frame_docs(np.random.default_rng(11))
    docs[0][1]["stm_live"]["z_controller"] = "constant_height"  # its one channel is Current
    uid = docs[0][1]["uid"]
    image = np.arange(6 * 16, dtype=np.float32).reshape(6, 16)
    derived = compose_run(metadata={"parent_uid": uid, "stm_live_derived": "reconstruction"})
    desc = derived.compose_descriptor(
        name="reconstruction",
        data_keys={
            "reconstruction": {"source": "test", "dtype": "array", "shape": [6, 16], "dtype_numpy": "<f4"},
            "lines_done": {"source": "test", "dtype": "integer", "shape": []},
        },
    )
    docs_derived = [
        ("start", derived.start_doc),
        ("descriptor", desc.descriptor_doc),
        (
            "event",
            desc.compose_event(
                data={"reconstruction": image, "lines_done": 6}, timestamps={"reconstruction": 0.0, "lines_done": 0.0}
            ),
        ),
        ("stop", derived.compose_stop()),
    ]
    for run_docs in (docs, docs_derived):
        writer = JournalWriter(tmp_path)
        for name, doc in run_docs:
            writer(name, doc)
        ingest_journal(from_uri(tiled.uri), writer.last_path)
    state = ViewerState()
    assert show_stored_run(state, from_uri(tiled.uri), uid[:10]) == uid
    snap = state.snapshot()
    assert snap["run"] == uid and snap["status"] == "success"
    assert snap["lines_done"] == 6 and snap["recon_line"] == 6 and snap["recon_updates"] == 1


def _old_layout_ingest(client, path):
    """What stm-live's ingestion wrote before the BlueskyRun layout (kept here to make such runs)."""
    from event_model import sanitize_doc

    data = run_data(read_journal(path))
    node = client.create_container(
        data.uid,
        metadata={
            "start": sanitize_doc(data.start),
            "stop": sanitize_doc(data.stop),
            "exit_status": data.exit_status,
            "lines_read": len(data.lines_read),
            "journal_bytes": path.stat().st_size,
        },
    )
    for key, image in data.images.items():
        node.write_array(image, key=key, dims=["line", "pixel"])
    node.write_array(np.asarray(data.lines_read, dtype=np.int64), key="stm_line_index")
    return data


def test_old_layout_runs_migrate_once(tiled, tmp_path, caplog):
    from tiled.client import from_uri

    client = from_uri(tiled.uri)
    rng = np.random.default_rng(12)
    stored = {}
    for _ in range(2):
        writer = JournalWriter(tmp_path)
        for name, doc in _frame_docs(rng, lines_to_emit=5, resend=1):
            writer(name, doc)
        stored[writer.last_path.stem] = _old_layout_ingest(client, writer.last_path)
    first, second = stored
    (tmp_path / "journal" / f"{second}.journal").unlink()  # this one only in tiled now
    with caplog.at_level("WARNING", logger="stm_live.store"):
        assert sorted(migrate_old_layout(client, tmp_path)) == sorted(stored)
    assert "rewritten once in the BlueskyRun layout" in caplog.text
    for uid, before in stored.items():
        run = client[uid]
        assert [spec.name for spec in run.specs] == ["BlueskyRun"]
        after = run_from_tiled(client, uid)
        assert after.exit_status == before.exit_status == "success"
        assert sorted(set(after.lines_read)) == sorted(set(before.lines_read)) == list(range(5))
        for key, image in before.images.items():
            assert after.images[key].tobytes() == image.tobytes()
    # from its journal: every document, the re-sent line twice, as acquired
    assert run_from_tiled(client, first).lines_read == [0, 1, 2, 3, 4, 1]
    assert migrate_old_layout(client, tmp_path) == []  # a second migration does nothing
