"""Recording a session through the proxy (simulators/record.py), the .nrec file
(simulators/cassette.py), answering from it, inspecting and redacting it: over real TCP to
the simulated controller, with stm-live's client and nanonisTCP 1.1.5 unmodified."""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from wire import ok_values, recv_exact, round_trip

from stm_live.cli import app
from stm_live.devices import protocol as P
from stm_live.devices.client import ConnectionLost, NanonisClient, NanonisError
from stm_live.simulators.cassette import Cassette, CassetteError, read_recording, replay_test
from stm_live.simulators.faults import Fault, FaultLayer
from stm_live.simulators.record import start_proxy_thread
from stm_live.simulators.scenario import load_scenario
from stm_live.simulators.server import start_server_thread

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 10.0  # generous: every wait below ends on an event long before
REPO = Path(__file__).resolve().parents[1]


def _scenario(*, pixels=32, lines=16, line_s=0.05):
    sc = load_scenario("default")
    return replace(sc, frame=replace(sc.frame, pixels=pixels, lines=lines), time_per_line_s=line_s)


class SentTap(FaultLayer):
    """The server's fault layer, keeping the bytes of every reply it sends, per connection."""

    def __init__(self, faults=()):
        super().__init__(faults)
        self.sent: dict[int, bytearray] = defaultdict(bytearray)

    async def reply(self, link, call, data):
        self.sent[link.index] += data
        return await super().reply(link, call, data)


class SocketTap:
    """A client's socket, keeping the bytes it sends and receives (peeks excluded)."""

    def __init__(self, sock):
        self._sock, self.sent, self.received = sock, bytearray(), bytearray()

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def send(self, data, *flags):
        n = self._sock.send(data, *flags)
        self.sent += data[:n]
        return n

    def sendall(self, data, *flags):
        self._sock.sendall(data, *flags)
        self.sent += data

    def recv(self, n, flags=0):
        data = self._sock.recv(n, flags)
        if not flags & socket.MSG_PEEK:
            self.received += data
        return data

    def recv_into(self, buf, n=0, flags=0):
        k = self._sock.recv_into(buf, n, flags)
        if not flags & socket.MSG_PEEK:
            self.received += memoryview(buf)[:k]
        return k


def _joined(blobs) -> bytes:
    return b"".join(b for b in blobs if b is not None)


def _fired(layer, kind, within=TIMEOUT):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        hits = [f for f in layer.fired if f["kind"] == kind]
        if hits:
            return hits
        time.sleep(0.01)
    raise AssertionError(f"no {kind} fault fired within {within} s: {layer.fired}")


def _closed(px, within=TIMEOUT):
    """Once the proxy has seen every client leave (bounded), its records written."""
    deadline = time.monotonic() + within
    while px.proxy.connections:
        assert time.monotonic() < deadline, "the proxy never saw the client leave"
        time.sleep(0.01)
    assert px.proxy.writer.sync(within)


# ---------------------------------------------------------------------- client sessions


def ours_session(host, port, taps: list):
    """stm-live's client: negotiation, settings, a scan followed line by line, a grab, an error."""
    with NanonisClient(host, port, timeout=TIMEOUT, max_outage_s=0) as c:
        c._sock = SocketTap(c._sock)
        taps.append(c._sock)
        c.negotiate()
        c.bias_set(0.25)
        bias = c.bias_get()
        c.scan_buffer_set([0, 30], 32, 16)
        c.scan_action("start")
        events = [c.scan_wait_end_of_line(TIMEOUT) for _ in range(4)]
        frame = c.scan_frame_data_grab(30).data
        c.scan_action("stop")
        with pytest.raises(NanonisError, match="outside"):
            c.bias_set(100.0)
        return bias, events, frame


def ntcp_session(host, port, taps: list):
    """nanonisTCP 1.1.5, unmodified, at its defaults."""
    from nanonisTCP import nanonisTCP
    from nanonisTCP.Bias import Bias
    from nanonisTCP.Current import Current
    from nanonisTCP.Scan import Scan

    conn = nanonisTCP(host, port)
    conn.s.settimeout(TIMEOUT)  # it never sets one
    conn.s = SocketTap(conn.s)
    taps.append(conn.s)
    try:
        Bias(conn).Set(-0.4)
        bias = Bias(conn).Get()
        current = Current(conn).Get()
        buffer = Scan(conn).BufferGet()
        grab = Scan(conn).FrameDataGrab(30, 1)
        return bias, current, buffer, np.asarray(grab[1], np.float32)
    finally:
        conn.close_connection()


@pytest.mark.parametrize("session", [ours_session, ntcp_session], ids=["stm-live", "nanonisTCP"])
def test_recorded_bytes_are_the_bytes_sent_and_the_cassette_replays_them(tmp_path, session):
    if session is ntcp_session:
        pytest.importorskip("nanonisTCP")
    path = tmp_path / "session.nrec"
    tap, taps = SentTap(), []
    with (
        start_server_thread(scenario=_scenario(), seed=0, faults=tap) as srv,
        start_proxy_thread([(srv.host, srv.port)], path) as px,
    ):
        result = session(px.host, px.port, taps)
        _closed(px)
        live = read_recording(path)  # flushed as it goes: readable while the proxy runs
    client = taps[0]
    assert list(tap.sent) == [0]  # one connection from the proxy to the controller
    assert bytes(tap.sent[0]) == bytes(client.received)  # what the controller sent, the client got
    rec = read_recording(path)
    assert rec.warning is None and len(rec.pairs) == len(live.pairs) > 3
    assert _joined(p.reply for p in rec.pairs) == bytes(client.received)
    assert _joined(p.request for p in rec.pairs) == bytes(client.sent)
    assert all(p.conn == 0 and p.reply is not None and p.reply_s >= 0 for p in rec.pairs)
    assert rec.connections[0]["by"] == "client"
    if session is ours_session:  # our client asks the controller for its release
        assert (rec.release["host_release"], rec.nanonis_release) == (P.DEFAULT_RELEASE, P.DEFAULT_RELEASE)

    replay_taps = []
    replay = replay_test(path, lambda host, port: session(host, port, replay_taps))
    assert replay.counts["exact"] == len(rec.pairs) and not replay.misses
    assert bytes(replay_taps[0].received) == bytes(client.received)  # the very same replies
    for got, want in zip(replay.result, result):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want


def test_replay_test_fails_on_a_request_the_recording_never_saw(tmp_path):
    path = tmp_path / "short.nrec"
    with (
        start_server_thread(seed=0) as srv,
        start_proxy_thread([(srv.host, srv.port)], path) as px,
        socket.create_connection((px.host, px.port), timeout=TIMEOUT) as sock,
    ):
        ok_values(sock, "Bias.Get")

    def script(host, port):
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            ok_values(sock, "Bias.Get")
            assert round_trip(sock, "Current.Get")[1] == 1

    with pytest.raises(AssertionError, match=r"1 of 2 requests .*not recorded: Current.Get"):
        replay_test(path, script)


# ---------------------------------------------------------------------- the cassette


def test_cassette_answers_exact_then_by_command_then_errors_or_falls_back(tmp_path):
    path = tmp_path / "bias.nrec"
    with (
        start_server_thread(seed=0) as srv,
        start_proxy_thread([(srv.host, srv.port)], path) as px,
        socket.create_connection((px.host, px.port), timeout=TIMEOUT) as sock,
    ):
        for v in (0.1, 0.2):
            ok_values(sock, "Bias.Set", v)
            assert ok_values(sock, "Bias.Get")["bias"] == pytest.approx(v)

    cassette = Cassette(path)
    with (
        start_server_thread(seed=0, cassette=cassette) as srv,
        socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock,
    ):
        ok_values(sock, "Bias.Set", 0.5)  # no such bytes: the first unused Bias.Set reply (0.1's)
        ok_values(sock, "Bias.Set", 0.1)  # its reply is used: the last reply to these bytes
        assert ok_values(sock, "Bias.Get")["bias"] == pytest.approx(0.1)  # exact, in recorded order
        assert ok_values(sock, "Bias.Get")["bias"] == pytest.approx(0.2)
        assert ok_values(sock, "Bias.Get")["bias"] == pytest.approx(0.2)  # polled once more than recorded
        _, status, text = round_trip(sock, "Current.Get")
        assert status == 1 and text == "Current.Get: not in the recording bias.nrec (stm-live cassette)"
        _, status, text = round_trip(sock, "Util.VersionGet")  # an error in the layout of its release
        assert status == 1 and "Util.VersionGet" in text
        assert srv.controller.bias_get() == pytest.approx(-0.5)  # the simulator was never asked
    assert dict(cassette.counts) == {"exact": 2, "repeated": 2, "command": 1, "simulator": 0, "missed": 2}
    assert cassette.misses == ["Current.Get", "Util.VersionGet"]

    with (
        start_server_thread(seed=0, cassette=Cassette(path, fallback=True)) as srv,
        socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock,
    ):
        assert ok_values(sock, "Bias.Get")["bias"] == pytest.approx(0.1)  # from the recording
        assert ok_values(sock, "Current.Get")["current"] != 0  # from the physics simulator
        assert ok_values(sock, "Scan.BufferGet")["pixels"] == srv.controller.pixels


def test_sim_serve_cassette_cli(tmp_path):
    path = tmp_path / "cli.nrec"
    with (
        start_server_thread(seed=0) as srv,
        start_proxy_thread([(srv.host, srv.port)], path) as px,
        NanonisClient(px.host, px.port, timeout=TIMEOUT) as c,
    ):
        c.negotiate()
        c.bias_set(0.125)
        c.bias_get()
    result = CliRunner().invoke(app, ["sim", "serve", "--port", "0", "--cassette-only"])
    assert result.exit_code == 2 and "--cassette-only needs --cassette" in result.output

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stm_live.cli",
            "sim",
            "serve",
            "--port",
            "0",
            "--cassette",
            str(path),
            "--cassette-only",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "cassette cli.nrec: 3 replies to 3 commands, nothing else" in line, line
        port = int(line.split("on 127.0.0.1:")[1].split()[0])
        with NanonisClient("127.0.0.1", port, timeout=TIMEOUT) as c:
            assert c.negotiate() == P.DEFAULT_RELEASE
            c.bias_set(0.125)
            assert c.bias_get() == pytest.approx(0.125)
            with pytest.raises(NanonisError, match="not in the recording"):
                c.current_get()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


# ---------------------------------------------------------------------- links and faults


def test_a_dropped_upstream_closes_the_client_cleanly_and_the_file_keeps_everything(tmp_path):
    path = tmp_path / "dropped.nrec"
    tap = SentTap([Fault("drop", line=3, frame=0)])  # the controller's side drops the link
    with (
        start_server_thread(scenario=_scenario(), seed=0, faults=tap) as srv,
        start_proxy_thread([(srv.host, srv.port)], path) as px,
    ):
        sock = SocketTap(socket.create_connection((px.host, px.port), timeout=TIMEOUT))
        try:
            ok_values(sock, "Scan.Action", 0, 0)
            for _ in range(100):  # bounded: the drop comes at line 3
                sock.sendall(P.pack_request("Scan.WaitEndOfLine", (int(TIMEOUT * 1000),)))
                head = sock.recv(P.HEADER_SIZE)  # a reset would raise here
                if not head:
                    break  # end of stream: closed cleanly (FIN)
                _, size = P.parse_response_header(head + recv_exact(sock, P.HEADER_SIZE - len(head)))
                assert P.decode_response_body("Scan.WaitEndOfLine", recv_exact(sock, size))[0]["line"] < 3
            else:
                pytest.fail("the link never dropped")
        finally:
            sock.close()
        _fired(tap, "drop")
        assert px.proxy.writer.sync(TIMEOUT)
        rec = read_recording(path)  # the proxy still runs: what the file holds now
    assert rec.warning is None
    *answered, last = rec.pairs
    assert (last.name, last.reply) == ("Scan.WaitEndOfLine", None)  # asked, never answered
    assert _joined(p.reply for p in answered) == bytes(sock.received) == bytes(tap.sent[0])
    assert _joined(p.request for p in rec.pairs) == bytes(sock.sent)
    assert rec.connections[0]["by"] == "upstream" and "failed" in rec.connections[0]["why"]


def test_faults_on_the_proxys_client_side(tmp_path):
    """The simulator's fault layer in front of the controller: a delay, then a drop at line 2."""
    path = tmp_path / "faulty.nrec"
    faults = [Fault("delay", commands=("Bias.Get",), seconds=0.4, nth=1), Fault("drop", line=2, frame=0)]
    with (
        start_server_thread(scenario=_scenario(), seed=0) as srv,
        start_proxy_thread([(srv.host, srv.port)], path, faults=faults) as px,
    ):
        with NanonisClient(px.host, px.port, timeout=TIMEOUT, max_outage_s=0) as c:
            t0 = time.monotonic()
            c.bias_get()
            assert time.monotonic() - t0 >= 0.4
            c.scan_action("start")
            with pytest.raises(ConnectionLost):
                for _ in range(100):
                    c.scan_wait_end_of_line(TIMEOUT)
            (drop,) = _fired(px.proxy.faults, "drop")
            assert (drop["frame"], drop["line"], drop["connections"]) == (0, 2, [0])
            assert srv.server.faults.fired == [] and srv.controller.scanning  # the controller saw none
            c.reconnect()
            assert c.scan_status_get()  # the proxy takes new connections, the scan goes on
        _closed(px)
    rec = read_recording(path)
    bias = next(p for p in rec.pairs if p.name == "Bias.Get")
    assert bias.reply_s < 0.4  # the controller's reply time; the delay was the proxy's
    assert rec.connections[0]["by"] == "fault" and rec.connections[1]["by"] == "client"
    lines = [
        P.decode_response_body(p.name, p.reply[P.HEADER_SIZE :])[0]["line"]
        for p in rec.pairs
        if p.name == "Scan.WaitEndOfLine" and p.reply
    ]
    assert max(lines) == 2  # recorded as the controller sent it, though the client never got it


def test_ports_map_to_upstreams_and_a_fifth_connection_is_closed(tmp_path):
    path = tmp_path / "two.nrec"
    with (
        start_server_thread(seed=0) as a,
        start_server_thread(seed=0) as b,
        start_proxy_thread([(a.host, a.port), (b.host, b.port)], path) as px,
    ):
        assert len(set(px.ports)) == 2
        socks = [socket.create_connection((px.host, port), timeout=TIMEOUT) for port in px.ports + px.ports]
        try:
            ok_values(socks[0], "Bias.Set", 0.3)
            ok_values(socks[1], "Bias.Set", -0.7)
            assert ok_values(socks[2], "Bias.Get")["bias"] == pytest.approx(0.3)
            assert ok_values(socks[3], "Bias.Get")["bias"] == pytest.approx(-0.7)
            assert (a.controller.bias_get(), b.controller.bias_get()) == pytest.approx((0.3, -0.7))
            with socket.create_connection((px.host, px.ports[0]), timeout=TIMEOUT) as fifth:
                assert fifth.recv(1) == b""  # closed at once, as the controller does
            assert px.proxy.refused == 1
        finally:
            for s in socks:
                s.close()
    rec = read_recording(path)
    assert rec.session["upstreams"] == [f"{a.host}:{a.port}", f"{b.host}:{b.port}"]
    assert sorted(c["upstream"] for c in rec.connections.values()) == [0, 0, 1, 1]


# ---------------------------------------------------------------------- the file


def _record_offsets(data: bytes) -> list[int]:
    """Where each record of a .nrec file starts (header, then length-prefixed records)."""
    pos, out = 8, []
    while pos < len(data):
        out.append(pos)
        pos += 8 + struct.unpack_from(">I", data, pos)[0]
    return out


@pytest.fixture()
def recorded(tmp_path):
    """A small recording: 8 request/reply pairs on one connection."""
    path = tmp_path / "small.nrec"
    with (
        start_server_thread(seed=0) as srv,
        start_proxy_thread([(srv.host, srv.port)], path) as px,
        socket.create_connection((px.host, px.port), timeout=TIMEOUT) as sock,
    ):
        for k in range(4):
            ok_values(sock, "Bias.Set", 0.1 * k)
            ok_values(sock, "Bias.Get")
    return path


@pytest.mark.parametrize("where", ["in its header", "in its payload"])
def test_a_recording_cut_off_mid_record_loads_with_one_warning(tmp_path, recorded, caplog, where):
    data = recorded.read_bytes()
    starts = _record_offsets(data)
    full = read_recording(recorded)
    kinds = [k for k, _, _ in full.records]
    k = max(i for i, kind in enumerate(kinds) if kind == "pair")  # the last pair's record
    start = starts[k + 1]  # +1: the session record
    cut = tmp_path / "cut.nrec"
    cut.write_bytes(data[: start + (5 if where == "in its header" else 20)])
    with caplog.at_level(logging.WARNING):
        rec = read_recording(cut)
    assert rec.records == full.records[:k]
    assert len(rec.pairs) == len(full.pairs) - 1
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage() == rec.warning and "\n" not in rec.warning
    assert f"at byte {start}" in rec.warning and f"kept {k + 1} records" in rec.warning


def test_sim_record_killed_keeps_what_it_forwarded(tmp_path):
    """kill -9 of `stm-live sim record` while 256x256 frames stream through it."""
    path = tmp_path / "killed.nrec"
    with start_server_thread(seed=0) as srv:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stm_live.cli",
                "sim",
                "record",
                "--upstream",
                f"{srv.host}:{srv.port}",
                "--listen",
                "127.0.0.1:0",
                "--out",
                str(path),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        grabs, stop = [0], threading.Event()
        try:
            line = proc.stdout.readline()
            port = int(line.split("recording 127.0.0.1:")[1].split()[0])
            with NanonisClient("127.0.0.1", port, timeout=TIMEOUT, max_outage_s=0) as c:
                c.scan_buffer_set([0, 30], 256, 256)

                def grab():
                    try:
                        while not stop.is_set():
                            c.scan_frame_data_grab(30)
                            grabs[0] += 1
                    except ConnectionLost:
                        pass

                t = threading.Thread(target=grab, daemon=True)
                t.start()
                deadline = time.monotonic() + 60

                # grabs only, as the replies counted below (the buffer setting is a pair too)
                def grabs_on_disk():
                    return sum(p.name == "Scan.FrameDataGrab" for p in read_recording(path).pairs)

                while (on_disk := grabs_on_disk()) < 20:  # on disk while the proxy runs
                    assert time.monotonic() < deadline and t.is_alive()
                    time.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)
                stop.set()
                t.join(TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
    rec = read_recording(path)  # a torn last record, if any, is dropped with a warning
    replies = [p.reply for p in rec.pairs if p.name == "Scan.FrameDataGrab"]
    assert len(replies) >= on_disk >= 20 and grabs[0] > 0
    for reply in replies:  # every kept reply is whole
        assert P.decode_response_body("Scan.FrameDataGrab", reply[P.HEADER_SIZE :])[0]["data"].shape == (256, 256)


def test_a_recording_read_while_it_is_written_ends_at_its_size_then(tmp_path, recorded, monkeypatch):
    """A recorder still writing: the reader saw the file end halfway through record 4, and by
    the time it looks past that point, whole records follow. What was there when reading
    began counts: records up to the half one, as after a crash, not "damaged"."""
    import stm_live.simulators.cassette as cassette

    data = recorded.read_bytes()
    at = _record_offsets(data)[4]
    seen = at + 20  # the size when reading began: record 4 half written
    real_fstat = os.fstat
    monkeypatch.setattr(
        cassette.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], seen, *real_fstat(fd)[7:]))
    )
    rec = read_recording(recorded)
    torn = tmp_path / "torn.nrec"  # the same bytes, as a recorder that died there leaves them
    torn.write_bytes(data[:seen])
    monkeypatch.undo()
    assert rec.pairs == read_recording(torn).pairs and len(rec.pairs) >= 2
    assert "dropped it, kept 4 records" in rec.warning


@pytest.mark.parametrize("damage", ["a byte of a payload", "a length field"])
def test_damage_inside_a_recording_is_one_clear_error(tmp_path, recorded, damage):
    data = bytearray(recorded.read_bytes())
    at = _record_offsets(bytes(data))[4]
    if damage == "a length field":
        struct.pack_into(">I", data, at, 1 << 24)
    else:
        data[at + 30] ^= 0x40
    bad = tmp_path / "bad.nrec"
    bad.write_bytes(bytes(data))
    with pytest.raises(CassetteError, match=rf"bad.nrec: record 4 at byte {at} is damaged .*intact records follow"):
        read_recording(bad)
    result = CliRunner().invoke(app, ["sim", "inspect", str(bad)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_not_a_recording_is_one_clear_error(tmp_path):
    other = tmp_path / "scan.sxm"
    other.write_bytes(b":NANONIS_VERSION:\n2\n")
    with pytest.raises(CassetteError, match="scan.sxm: not a stm-live session recording"):
        read_recording(other)
    with pytest.raises(CassetteError, match="missing.nrec: cannot read"):
        read_recording(tmp_path / "missing.nrec")


def test_a_recording_is_never_overwritten(recorded):
    before = recorded.read_bytes()
    with pytest.raises(CassetteError, match="exists"):
        start_proxy_thread([("127.0.0.1", 1)], recorded)
    assert recorded.read_bytes() == before


# ---------------------------------------------------------------------- inspect and redact


def test_inspect_and_redact(tmp_path):
    session_dir = tmp_path / "lab_session_2026"
    session_dir.mkdir()
    path, shared = tmp_path / "lab.nrec", tmp_path / "shared.nrec"
    secret = "sample 7 from the other group"
    with (
        start_server_thread(
            scenario=_scenario(pixels=16, lines=8, line_s=0.02), seed=0, save_dir=str(session_dir)
        ) as srv,
        start_proxy_thread([(srv.host, srv.port)], path) as px,
        NanonisClient(px.host, px.port, timeout=TIMEOUT) as c,
    ):
        c.negotiate()
        c.bias_set(0.2)
        with pytest.raises(NanonisError):
            c.bias_set(100.0)
        c.scan_props_set(autosave="all", series_name="probe", comment=secret)
        assert c.scan_props_get().comment == secret
        c.scan_action("start")
        timed_out, saved = c.scan_wait_end_of_scan(30.0)
        assert not timed_out and saved.startswith(str(session_dir))
        assert c.call("Util.SessionPathGet")["path"] == str(session_dir)
    raw = path.read_bytes()
    assert secret.encode() in raw and str(session_dir).encode() in raw

    result = CliRunner().invoke(app, ["sim", "inspect", str(path), "--redact", str(shared)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"release R{P.DEFAULT_RELEASE} (RT {P.DEFAULT_RELEASE}; Nanonis SPM Control Software" in out
    assert "8 requests on 1 connections" in out
    rows = {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("Bias.", "Scan.", "Util."))
    }
    assert rows["Bias.Set"][:3] == ["2", "0", "1"]  # calls, without reply, errors
    assert rows["Scan.WaitEndOfScan"][:3] == ["1", "0", "0"]
    assert all(float(r[3]) <= float(r[4]) for r in rows.values())  # median <= max
    assert "Bias.Set (1x): bias 100.0 V outside the +-10 V output range" in out
    assert "emptied 2 comment, 2 path" in out

    red = read_recording(shared)
    blob = shared.read_bytes()
    assert secret.encode() not in blob and str(session_dir).encode() not in blob
    assert red.session["redacted"] == ["comment", "external_vi", "path"]
    orig = read_recording(path)
    assert [p.name for p in red.pairs] == [p.name for p in orig.pairs]
    for a, b in zip(orig.pairs, red.pairs):
        name = a.name
        if name in ("Scan.PropsSet", "Scan.PropsGet", "Scan.WaitEndOfScan", "Util.SessionPathGet"):
            side = "request" if name == "Scan.PropsSet" else "reply"
            msg = getattr(b, side)
            if side == "request":
                values = P.decode_request_strict(name, msg[P.HEADER_SIZE :])[1]
            else:
                values, status, _ = P.decode_response_body(name, msg[P.HEADER_SIZE :])
                assert status == 0
            assert values.get("comment", values.get("path")) == ""
            assert values.get("series_name", "probe") == "probe"  # only the redacted fields go
        else:
            assert (a.request, a.reply) == (b.request, b.reply)
    again = CliRunner().invoke(app, ["sim", "inspect", str(shared)])
    assert again.exit_code == 0 and "; redacted" in again.output.splitlines()[0]
