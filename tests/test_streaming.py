"""0MQ streaming: msgpack serializer, worker process round trip, worker restart mid-run
(journal catch-up), CURVE-authenticated links."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest

from stm_live.app.worker import run_worker
from stm_live.streaming import (
    DocumentProxy,
    ResultReceiver,
    ResultSender,
    SerializationError,
    deserializer,
    generate_curve_keys,
    make_publisher,
    serializer,
)

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from test_live import BoxBlur, frame_docs  # noqa: E402


def test_serializer_round_trip_with_arrays():
    doc = {
        "uid": "u",
        "time": 1.5,
        "seq_num": np.int64(3),
        "flag": np.bool_(True),
        "data": {
            "img": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],  # non-contiguous
            "be": np.arange(3, dtype=">i2"),
            "c": np.array([1 + 2j]),
            "t": (1, 2),
            "empty": np.zeros((0, 5)),
            "nested": [{"x": np.float64(2.5)}],
        },
    }
    out = deserializer(serializer(doc))
    np.testing.assert_array_equal(out["data"]["img"], doc["data"]["img"])
    assert out["data"]["img"].dtype == np.float32 and out["data"]["img"].flags.writeable
    assert out["data"]["be"].dtype == np.dtype(">i2") and out["data"]["c"][0] == 1 + 2j
    assert out["seq_num"] == 3 and out["flag"] is True and out["data"]["t"] == [1, 2]
    assert out["data"]["empty"].shape == (0, 5) and out["data"]["nested"][0]["x"] == 2.5


def test_serializer_refuses_pickle_and_other_payloads():
    with pytest.raises(SerializationError, match="not msgpack"):
        deserializer(pickle.dumps({"uid": "x"}))
    with pytest.raises(SerializationError, match="not a document"):
        deserializer(msgpack.packb([1, 2]))
    with pytest.raises(SerializationError, match="ext type 7"):
        deserializer(msgpack.packb({"a": msgpack.ExtType(7, b"")}))
    with pytest.raises(SerializationError, match="dtype"):
        deserializer(msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(["|O", [1], b"\0" * 8]))}))
    with pytest.raises(SerializationError, match="object"):
        serializer({"a": np.array([object()])})
    with pytest.raises(SerializationError, match="type set|Thread"):
        serializer({"a": threading.Thread()})
    with pytest.raises(SerializationError, match="must be bytes"):
        deserializer("text")


# --------------------------------------------------------------------------- helpers
class Link:
    """Acquisition side of the 0MQ wiring: journal, proxy, publisher, result receiver."""

    def __init__(self, data_dir: Path, curve_keys=None):
        from stm_live.store import JournalWriter

        self.journal = JournalWriter(data_dir, fsync=False)
        self.proxy = DocumentProxy(curve_keys=curve_keys)
        self.publisher = make_publisher(self.proxy.in_address)
        self.receiver = ResultReceiver(curve_keys=curve_keys)

    def __call__(self, name, doc):  # as subscribed to the RunEngine: journal first
        self.journal(name, doc)
        self.publisher(name, doc)

    def close(self):
        self.publisher.close()
        self.receiver.close()
        self.proxy.stop()
        self.journal.close()


def start_worker(link: Link, data_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    cmd = [
        sys.executable,
        "-m",
        "stm_live.app.worker",
        "--connect",
        link.proxy.out_address,
        "--results",
        link.receiver.address,
        "--journal",
        str(data_dir),
        "--reconstructor",
        "test_live:BoxBlur",
        "--band-margin",
        "8",
        "--no-tip-monitor",
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen, sig=signal.SIGTERM) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out.decode(errors="replace")


LINES, PIXELS = 48, 32


@pytest.mark.timeout(60)
def test_worker_process_results_come_back_and_survive_a_restart(tmp_path):
    rng = np.random.default_rng(5)
    link = Link(tmp_path)
    procs = [start_worker(link, tmp_path)]
    try:
        assert link.receiver.wait_ready(1, timeout=30), stop_worker(procs[0])
        # run A: results come back over 0MQ, final equals the offline reconstruction
        image_a = rng.random((LINES, PIXELS), dtype=np.float32)
        docs_a = frame_docs(image_a)
        for name, doc in docs_a:
            link(name, doc)
        final = link.receiver.wait_final(docs_a[0][1]["uid"], timeout=20)
        assert final is not None, "no final reconstruction came back"
        np.testing.assert_allclose(final, BoxBlur().reconstruct(image_a, 1.0), rtol=1e-6)
        assert link.publisher.failed == 0

        # run B: the worker dies mid-run; lines keep coming; a new worker catches up
        image_b = rng.random((LINES, PIXELS), dtype=np.float32)
        docs_b = frame_docs(image_b)
        uid_b = docs_b[0][1]["uid"]
        for name, doc in docs_b[: 2 + 16]:
            link(name, doc)
        assert link.receiver.wait_for(lambda r: r.latest and r.latest["run"] == uid_b, timeout=20)
        stop_worker(procs[0], signal.SIGKILL)
        for name, doc in docs_b[2 + 16 : 2 + 30]:  # published while no worker listens
            link(name, doc)
        procs.append(start_worker(link, tmp_path))
        assert link.receiver.wait_ready(2, timeout=30), stop_worker(procs[1])
        for name, doc in docs_b[2 + 30 :]:
            link(name, doc)
        final = link.receiver.wait_final(uid_b, timeout=20)
        log = stop_worker(procs[1])
        assert final is not None, log
        assert "catching up from journal" in log
        np.testing.assert_allclose(final, BoxBlur().reconstruct(image_b, 1.0), rtol=1e-6)
        final_events = [
            d
            for s, n, d in link.receiver.history()
            if n == "event" and d["data"].get("final") and d["data"]["lines_done"] == LINES
        ]
        assert len(final_events) == 2
    finally:
        for proc in procs:
            stop_worker(proc, signal.SIGKILL)
        link.close()


@pytest.mark.timeout(30)
def test_curve_links_authenticate_and_carry_results(tmp_path):
    keys = generate_curve_keys(tmp_path / "keys")
    assert oct((tmp_path / "keys" / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    link = Link(tmp_path, curve_keys=keys)
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker,
        kwargs=dict(
            connect=link.proxy.out_address,
            results=link.receiver.address,
            curve_keys=tmp_path / "keys",
            reconstructor=BoxBlur(),
            tip_monitor=False,
            stop_event=stop,
        ),
        daemon=True,
    )
    worker.start()
    try:
        assert link.receiver.wait_ready(1, timeout=15)
        image = np.random.default_rng(6).random((16, 16), dtype=np.float32)
        docs = frame_docs(image)
        for name, doc in docs:
            link(name, doc)
        final = link.receiver.wait_final(docs[0][1]["uid"], timeout=15)
        assert final is not None
        np.testing.assert_allclose(final, BoxBlur().reconstruct(image, 1.0), rtol=1e-6)
        # a sender without the client key cannot talk to the receiver
        rogue = ResultSender(link.receiver.address, source="rogue", send_timeout_ms=200)
        rogue.send("hello", {"worker": "rogue"})
        assert not link.receiver.wait_for(lambda r: any(s == "rogue" for s, _, _ in r.history()), timeout=1.0)
        assert "rogue" not in link.receiver.ready
        rogue.close(linger_ms=0)
    finally:
        stop.set()
        worker.join(20)
        link.close()
    assert not worker.is_alive()


def test_addresses_stay_on_loopback_unless_asked():
    with pytest.raises(ValueError, match="not loopback"):
        ResultReceiver("tcp://0.0.0.0:0")
    with pytest.raises(ValueError, match="not loopback"):
        run_worker("tcp://10.0.0.1:5578", "tcp://127.0.0.1:5580", reconstructor=BoxBlur())
    with pytest.raises(TimeoutError, match="no 0MQ proxy subscribed"):
        make_publisher("tcp://127.0.0.1:9", wait_subscribed_s=0.3)
