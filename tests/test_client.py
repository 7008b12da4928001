"""NanonisClient and LineFollower: failure handling against a scripted loopback peer, and
behaviour against the simulated controller (``sim_server`` fixture)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

from stm_live.devices import protocol as P
from stm_live.devices.client import (
    ConnectionLost,
    LineFollower,
    NanonisClient,
    NanonisError,
    ReplyTimeout,
    TipShaperProps,
)

pytestmark = pytest.mark.timeout(30)


# ----------------------------------------------------------------- scripted peer


class ScriptedPeer:
    """A loopback server answering each request with ``reply(name, args) -> bytes | None``
    (None = say nothing; the string "close" = drop the connection)."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[tuple[str, dict]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _recv(self, conn, n):
        buf = b""
        while len(buf) < n and not self._stop.is_set():
            try:
                chunk = conn.recv(n - len(buf))
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self, conn):
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    name, size, _ = P.parse_request_header(self._recv(conn, 40))
                    args = P.decode_request_body(name, self._recv(conn, size))
                except (ConnectionError, P.ProtocolError, OSError):
                    return
                self.requests.append((name, args))
                out = self.reply(name, args)
                if out == "close":
                    return
                if out is not None:
                    conn.sendall(out)

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def stop(self):
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=2)


@pytest.fixture()
def peer_factory():
    peers = []

    def make(reply):
        peers.append(ScriptedPeer(reply))
        return peers[-1]

    yield make
    for p in peers:
        p.stop()


def test_controller_error_raises_with_description(peer_factory):
    peer = peer_factory(lambda n, a: P.pack_response(n, None, error="Z-controller is on"))
    with NanonisClient("127.0.0.1", peer.port, timeout=2) as c:
        with pytest.raises(NanonisError) as info:
            c.z_ctrl_z_pos_set(1e-9)
        assert info.value.command == "ZCtrl.ZPosSet"
        assert info.value.description == "Z-controller is on"
        # The connection stays usable after a controller error.
        with pytest.raises(NanonisError):
            c.bias_get()


def test_silent_peer_times_out_and_reconnects(peer_factory):
    # max_outage_s=0: no reconnecting on its own (tests/test_link_recovery.py covers that)
    answer = {"on": False}
    peer = peer_factory(lambda n, a: P.pack_response(n, (0.25,)) if answer["on"] else None)
    c = NanonisClient("127.0.0.1", peer.port, timeout=0.3, max_outage_s=0)
    t0 = time.monotonic()
    with pytest.raises(ReplyTimeout, match="Bias.Get.*reconnect"):
        c.bias_get()
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert not c.connected
    with pytest.raises(ConnectionLost, match="not connected"):
        c.bias_get()
    answer["on"] = True
    c.reconnect()
    assert c.bias_get() == 0.25
    c.close()


def test_dropped_connection_is_a_connection_error(peer_factory):
    peer = peer_factory(lambda n, a: "close")
    with NanonisClient("127.0.0.1", peer.port, timeout=2, max_outage_s=0) as c:
        with pytest.raises(ConnectionLost, match="closed the connection"):
            c.current_get()
        assert isinstance(ConnectionLost("x"), ConnectionError)


def test_connect_refused_is_clear():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionLost, match=f"127.0.0.1:{port}"):
        NanonisClient("127.0.0.1", port, timeout=1)


def test_blocking_wait_gets_longer_read_timeout(peer_factory):
    def reply(name, args):
        time.sleep(args["timeout_ms"] / 1000)  # the controller honours its own timeout
        return P.pack_response(name, (1, 0, 0, 0))

    peer = peer_factory(reply)
    with NanonisClient("127.0.0.1", peer.port, timeout=0.3) as c:
        ev = c.scan_wait_end_of_line(0.5)  # longer than the client's 0.3 s base timeout
        assert ev.timed_out and peer.requests[-1] == ("Scan.WaitEndOfLine", {"timeout_ms": 500})


def test_wrong_echoed_name_is_protocol_error(peer_factory):
    peer = peer_factory(lambda n, a: P.pack_response("Bias.Get", (1.0,)))
    with NanonisClient("127.0.0.1", peer.port, timeout=1) as c:
        with pytest.raises(P.ProtocolError, match="reply to Current.Get names 'Bias.Get'"):
            c.current_get()


def test_oversize_reply_refused(peer_factory):
    peer = peer_factory(lambda n, a: struct.pack(">32si4x", n.encode(), 2_000_000_000))
    with NanonisClient("127.0.0.1", peer.port, timeout=1) as c:
        with pytest.raises(P.ProtocolError, match="exceeds"):
            c.scan_frame_data_grab(0)
        assert not c.connected


@pytest.mark.parametrize("extended", [False, True])
def test_props_get_both_layouts(peer_factory, extended):
    vals = (1, 0, 1, "img", "hello", ["Bias", "Z-Controller"], 2)
    cmd = P.PROPS_GET_EXTENDED if extended else None
    peer = peer_factory(lambda n, a: P.pack_response(n, vals if extended else vals[:5], command=cmd))
    with NanonisClient("127.0.0.1", peer.port, timeout=1) as c:
        p = c.scan_props_get()
    assert (p.continuous, p.bouncy, p.autosave, p.series_name, p.comment) == (True, False, "next", "img", "hello")
    if extended:
        assert p.modules == ("Bias", "Z-Controller") and p.autopaste == "off"
    else:
        assert p.modules is None and p.autopaste is None


def test_set_get_enum_shift_on_the_wire(peer_factory):
    peer = peer_factory(lambda n, a: P.pack_response(n, {}))
    with NanonisClient("127.0.0.1", peer.port, timeout=1) as c:
        c.scan_props_set(continuous=False, autosave="off", modules=["Bias"])
        c.scan_speed_set(1e-8, 1e-8, 0.1, 0.1, keep_constant="time")
        c.bias_pulse(0.01, 2.0, z_hold=False, relative=True)
        c.scan_action("stop", "up")
    args = dict(peer.requests)
    assert args["Scan.PropsSet"]["continuous"] == 2 and args["Scan.PropsSet"]["bouncy"] == 0
    assert args["Scan.PropsSet"]["autosave"] == 3
    assert args["Scan.SpeedSet"]["keep_constant"] == 2
    assert (args["Bias.Pulse"]["z_hold"], args["Bias.Pulse"]["abs_rel"]) == (2, 1)
    assert args["Scan.Action"] == {"action": 1, "direction": 1}


def test_bad_arguments_name_the_problem(peer_factory):
    peer = peer_factory(lambda n, a: P.pack_response(n, {}))
    with NanonisClient("127.0.0.1", peer.port, timeout=1) as c:
        with pytest.raises(ValueError, match="scan action"):
            c.scan_action("jump")
        with pytest.raises(ValueError, match="bias: must be finite"):
            c.bias_set(float("nan"))
        with pytest.raises(ValueError, match="channel index"):
            c.scan_frame_data_grab(200)
        with pytest.raises(ValueError, match="motor direction"):
            c.motor_start_move("W", 3)
    assert peer.requests == []  # nothing bad reached the wire


# ----------------------------------------------------------------- simulated controller


@pytest.fixture(scope="module")
def client(sim_server):
    with NanonisClient(sim_server.host, sim_server.port, timeout=5) as c:
        yield c


def test_sim_bias_and_z_controller(client):
    client.bias_set(-0.35)
    assert client.bias_get() == pytest.approx(-0.35, abs=1e-6)
    client.z_ctrl_on_off_set(True)
    assert client.z_ctrl_on_off_get() is True
    client.z_ctrl_setpoint_set(5e-11)
    assert client.z_ctrl_setpoint_get() == pytest.approx(5e-11, rel=1e-5)
    assert isinstance(client.current_get(), float)
    assert np.isfinite(client.z_ctrl_z_pos_get())


def test_sim_frame_buffer_and_signals(client):
    client.scan_frame_set(1e-9, -2e-9, 4e-9, 4e-9, 0.0)
    f = client.scan_frame_get()
    assert (f.center_x, f.width) == pytest.approx((1e-9, 4e-9), rel=1e-5)
    client.scan_buffer_set([0, 30], 50, 40)
    b = client.scan_buffer_get()
    assert b.channel_indexes == (0, 30) and b.pixels == 48  # coerced to a multiple of 16
    names = client.signals_names_get()
    assert names[0].startswith("Current") and names[24].startswith("Bias") and names[30].startswith("Z")
    vals = client.signals_vals_get([24, 0])
    assert vals.shape == (2,) and vals[0] == pytest.approx(client.bias_get(), abs=1e-6)
    v = client.util_version_get()
    assert v.host_release > 13000 and v.product


def test_sim_unknown_channel_grab_is_nanonis_error(client):
    client.scan_buffer_set([0, 30], 32, 32)
    with pytest.raises(NanonisError) as info:
        client.scan_frame_data_grab(5)
    assert info.value.command == "Scan.FrameDataGrab" and info.value.description


def test_sim_tip_shaper_props_round_trip(client):
    props = TipShaperProps(0.05, True, -1.0, -2e-9, 0.1, 1.5, 0.01, 3e-9, 0.1, 0.05, False)
    client.tip_shaper_props_set(props)
    got = client.tip_shaper_props_get()
    assert got.change_bias is True and got.restore_feedback is False
    assert got.tip_lift == pytest.approx(-2e-9, rel=1e-5)


def _start_small_scan(c: NanonisClient, pixels=32, lines=16):
    c.scan_action("stop")
    c.scan_buffer_set([0, 30], pixels, lines)
    c.scan_speed_set(1e-8, 1e-8, 0.2, 0.2, keep_constant="time", speed_ratio=1.0)
    c.scan_props_set(continuous=False)
    c.scan_action("start", "down")


def test_line_follower_matches_final_grab(sim_server):
    with NanonisClient(sim_server.host, sim_server.port, timeout=5) as ctl:
        _start_small_scan(ctl, 32, 16)
        with LineFollower(sim_server.host, sim_server.port, [0, 30], timeout=5) as lf:
            seen = []
            for _ in range(40):
                line = lf.next_line(3.0)
                if line is None:
                    break
                seen.append(line.index)
                assert line.data[(0, "forward")].shape == (32,)
                if len(seen) == 16:
                    break
            assert seen == list(range(16))  # every row once, in order, none lost
            fwd = ctl.scan_frame_data_grab(30, forward=True).data
            bwd = ctl.scan_frame_data_grab(30, forward=False).data
            np.testing.assert_array_equal(lf.frame(30, "forward"), fwd)
            np.testing.assert_array_equal(lf.frame(30, "backward"), bwd[:, ::-1])  # flipped
        ctl.scan_action("stop")


def test_line_follower_polling_fallback(sim_server):
    with NanonisClient(sim_server.host, sim_server.port, timeout=5) as ctl:
        _start_small_scan(ctl, 16, 8)
        with LineFollower(
            sim_server.host, sim_server.port, [0], directions=("forward",), use_wait=False, timeout=5
        ) as lf:
            rows = []
            for _ in range(20):
                line = lf.next_line(3.0)
                if line is None:
                    break
                rows.append(line.index)
                assert np.isfinite(line.data[(0, "forward")]).all()
                if len(rows) == 8:
                    break
            assert rows == list(range(8))
        ctl.scan_action("stop")


def test_sim_remaining_commands_round_trip(client, sim_server, tmp_path):
    client.scan_action("stop")
    client.scan_props_set(continuous=True, bouncy=False, autosave="off", series_name="t_", comment="hi")
    p = client.scan_props_get()
    assert (p.continuous, p.bouncy, p.autosave, p.series_name, p.comment) == (True, False, "off", "t_", "hi")
    assert p.modules == ()  # the default release (R14718) carries the module list
    client.scan_props_set(continuous=False)
    client.scan_speed_set(0, 0, 0.05, 0.05, keep_constant="time", speed_ratio=2.0)
    s = client.scan_speed_get()
    assert s.keep_constant == "time" and s.fwd_time == pytest.approx(0.05) and s.bwd_time == pytest.approx(0.025)
    client.folme_speed_set(2e-8, custom=True)
    assert client.folme_speed_get() == (pytest.approx(2e-8), True)
    client.folme_xy_pos_set(1e-9, 2e-9, wait=True)
    assert client.folme_xy_pos_get() == pytest.approx((1e-9, 2e-9), abs=1e-11)
    client.bias_set(0.3)
    assert client.signals_val_get(24) == pytest.approx(0.3, abs=1e-6)
    client.bias_pulse(0.01, 1.0, wait=True)
    z0 = client.motor_pos_get()[2]
    client.motor_start_move("Z+", 3, wait=True)
    assert client.motor_pos_get()[2] > z0
    assert client.scan_wait_end_of_scan(0.05) == (True, "")  # nothing running: times out
    client.z_ctrl_withdraw(wait=True, timeout_s=2.0)
    assert client.z_ctrl_on_off_get() is False
    client.z_ctrl_home()
    # Save: an error without a folder, a file with one.
    client.scan_buffer_set([0, 30], 16, 4)
    client.scan_action("start")
    with NanonisClient(sim_server.host, sim_server.port, timeout=5) as waiter:
        timed_out, _ = waiter.scan_wait_end_of_scan(20.0)
    assert not timed_out
    sim_server.controller.save_dir = None
    with pytest.raises(NanonisError, match="save folder"):
        client.scan_save(wait=True, timeout_s=2.0)
    sim_server.controller.save_dir = tmp_path
    assert client.scan_save(wait=True, timeout_s=2.0) is False
    assert list(tmp_path.glob("*.sxm"))


def test_sim_extended_props_layout():
    from stm_live.simulators.server import start_server_thread

    with start_server_thread(seed=0, time_scale=20.0, props_layout="extended") as server:
        with NanonisClient(server.host, server.port, timeout=5) as c:
            c.scan_props_set(continuous=True, modules=["Bias"], autopaste="next")
            p = c.scan_props_get()
    assert p.continuous is True and p.modules == ("Bias",) and p.autopaste == "next"


def test_line_follower_skips_a_finished_frame_then_follows_the_next(sim_server):
    with NanonisClient(sim_server.host, sim_server.port, timeout=5) as ctl:
        _start_small_scan(ctl, 16, 4)
        assert ctl.scan_wait_end_of_scan(20.0)[0] is False  # frame complete, scan stopped
        with LineFollower(sim_server.host, sim_server.port, [0], timeout=5) as lf:
            assert lf.next_line(0.2) is None  # the old frame's rows are not new lines
            ctl.scan_action("start", "down")
            rows = []
            for _ in range(12):
                line = lf.next_line(3.0)
                if line is None:
                    break
                rows.append(line.index)
                if len(rows) == 4:
                    break
        assert rows == [0, 1, 2, 3]


def test_line_follower_regrabs_when_the_buffer_changes_between_grabs(peer_factory):
    """A grab of channel 0 from the old frame and channel 30 from a new one (the buffer was
    reconfigured in between) must not be mixed: the follower grabs again."""
    grabs = {"n": 0}
    new = np.full((3, 16), np.nan, np.float32)
    new[0] = 1.0

    def reply(name, args):
        if name == "Scan.StatusGet":
            return P.pack_response(name, (1,))
        grabs["n"] += 1
        data = np.zeros((4, 16), np.float32) if grabs["n"] == 1 else new  # first: stale shape
        return P.pack_response(name, (f"ch{args['channel_index']}", data, 0))

    peer = peer_factory(reply)
    with LineFollower("127.0.0.1", peer.port, [0, 30], directions=("forward",), use_wait=False, timeout=2) as lf:
        line = lf.next_line(1.0)
        assert line is not None and line.index == 0 and lf.next_line(0.05) is None
        np.testing.assert_array_equal(line.data[(30, "forward")], np.ones(16, np.float32))
        assert lf.frame(0, "forward").shape == (3, 16)
    assert grabs["n"] >= 3  # the mixed pair was discarded


@pytest.mark.parametrize("release", [13742, 14718])
def test_client_negotiates_the_release_and_reads_its_scan_props(release):
    from stm_live.simulators.server import start_server_thread

    server = start_server_thread(seed=0, time_scale=20.0, nanonis_release=release)
    try:
        with NanonisClient(server.host, server.port) as c:
            assert c.release == P.BASE_RELEASE and c.negotiate() == release
            c.scan_props_set(continuous=False, autosave="off", series_name="neg_", comment="r")
            props = c.scan_props_get()  # the layout of this release, decoded as this release's
            assert (props.continuous, props.autosave, props.series_name) == (False, "off", "neg_")
            assert (props.modules is None) == (release < 14573)
    finally:
        server.stop()
