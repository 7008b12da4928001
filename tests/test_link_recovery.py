"""Stalls, drops and refusals: the client reconnects within its budget, re-sends only what is
safe, and a frame rides through an outage with every line journaled once (issue 21).

Faults are real: a scripted loopback peer for the client, and for the device a TCP relay
(:class:`FaultyLink`) between it and the simulated controller that holds replies back,
closes every connection or refuses new ones, as a busy controller PC or a network does.
Waits are on events, with generous bounds (a loaded 2-core machine).
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from stm_live.devices import protocol as P
from stm_live.devices.client import (
    ActionUnconfirmed,
    ConnectionLost,
    LinkState,
    NanonisClient,
    ReplyTimeout,
)

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------- scripted peer


class Peer:
    """A loopback controller stand-in answering ``reply(name, args, conn) -> bytes | None |
    "close"`` (None: say nothing; "close": drop the connection without a reply). ``conn``
    counts connections from 1; ``accepted`` holds when each came."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[tuple[int, str, dict]] = []
        self.accepted: list[float] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _recv(self, conn, n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = conn.recv(n - len(buf))
            except TimeoutError:
                if self._stop.is_set():
                    raise ConnectionError from None
                continue
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self, conn, number):
        conn.settimeout(0.1)
        with conn:
            while True:
                try:
                    name, size, _ = P.parse_request_header(self._recv(conn, 40))
                    args = P.decode_request_body(name, self._recv(conn, size))
                except (ConnectionError, P.ProtocolError, OSError):
                    return
                self.requests.append((number, name, args))
                out = self.reply(name, args, number)
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
            self.accepted.append(time.monotonic())
            threading.Thread(target=self._serve, args=(conn, len(self.accepted)), daemon=True).start()

    def names(self):
        return [name for _, name, _ in self.requests]

    def stop(self):
        self._stop.set()
        self.listener.close()


@pytest.fixture()
def peer():
    peers = []

    def make(reply):
        peers.append(Peer(reply))
        return peers[-1]

    yield make
    for p in peers:
        p.stop()


def _events(link: LinkState) -> list:
    seen = []
    link.subscribe(seen.append)
    return seen


# ----------------------------------------------------------------- client


def test_a_read_is_sent_again_after_a_drop(peer):
    # the first connection drops while Bias.Get waits for its reply; the next answers
    p = peer(lambda name, args, conn: "close" if conn == 1 and name == "Bias.Get" else P.pack_response(name, (0.25,)))
    with NanonisClient("127.0.0.1", p.port, timeout=2, max_outage_s=10) as c:
        events = _events(c.link)
        assert c.bias_get() == 0.25
        assert [(n, name) for n, name, _ in p.requests] == [(1, "Bias.Get"), (2, "Bias.Get")]
        assert [e.kind for e in events] == ["down", "back"] and c.link.state == "up"
        assert "closed the connection" in events[0].reason and events[1].attempts == 1
        assert c.link.outages == 1 and c.link.up.is_set()


def test_a_stalled_read_is_sent_again_on_a_fresh_connection(peer):
    # a controller busy past the deadline: the reply never comes on that connection
    p = peer(lambda name, args, conn: None if conn == 1 else P.pack_response(name, (0.5,)))
    with NanonisClient("127.0.0.1", p.port, timeout=0.3, max_outage_s=10) as c:
        events = _events(c.link)
        assert c.current_get() == 0.5
        assert [n for n, _, _ in p.requests] == [1, 2]
        assert [e.kind for e in events] == ["down", "back"]
        assert "Current.Get: no reply from" in events[0].reason and "call reconnect" not in events[0].reason


def test_a_scan_start_that_arrived_is_not_sent_again(peer):
    scanning = {"on": False}

    def reply(name, args, conn):
        if name == "Scan.Action":
            scanning["on"] = True  # the controller started the scan ...
            return "close"  # ... and the link dropped before the reply
        if name == "Scan.StatusGet":
            return P.pack_response(name, (int(scanning["on"]),))
        return P.pack_response(name, None)

    p = peer(reply)
    with NanonisClient("127.0.0.1", p.port, timeout=2, max_outage_s=10) as c:
        c.scan_action("start")
        assert p.names() == ["Scan.Action", "Scan.StatusGet"]  # asked, not started twice


def test_a_scan_start_that_was_lost_is_sent_again(peer):
    def reply(name, args, conn):
        if name == "Scan.Action" and conn == 1:
            return "close"  # lost before the controller acted on it
        if name == "Scan.StatusGet":
            return P.pack_response(name, (0,))
        return P.pack_response(name, None)

    p = peer(reply)
    with NanonisClient("127.0.0.1", p.port, timeout=2, max_outage_s=10) as c:
        c.scan_action("start")
        assert p.names() == ["Scan.Action", "Scan.StatusGet", "Scan.Action"]


def test_a_pulse_is_never_doubled(peer):
    p = peer(lambda name, args, conn: "close" if conn == 1 else P.pack_response(name, (0.5,)))
    with NanonisClient("127.0.0.1", p.port, timeout=2, max_outage_s=10) as c:
        with pytest.raises(ActionUnconfirmed, match="Bias.Pulse.*not sent again"):
            c.bias_pulse(0.05, 2.0)
        assert p.names() == ["Bias.Pulse"]  # not sent again
        assert c.bias_get() == 0.5 and c.link.state == "up"  # what follows (a verification) goes through
        assert p.names() == ["Bias.Pulse", "Bias.Get"] and len(p.accepted) == 2


def test_backoff_is_bounded_and_a_spent_budget_raises_connection_lost(peer):
    # every connection is accepted and closed at once: a controller that restarts and restarts
    budget = 4.0
    p = peer(lambda name, args, conn: "close")
    with NanonisClient("127.0.0.1", p.port, timeout=1, max_outage_s=budget) as c:
        events = _events(c.link)
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost, match=r"not back within max_outage_s = 4 s") as info:
            c.bias_get()
        took = time.monotonic() - t0
    assert not isinstance(info.value, ReplyTimeout)
    assert budget <= took < budget + 3.0
    gaps = np.diff(p.accepted)
    # at once, then waits doubling from 50 ms, never past 2 s: a handful of attempts, not a flood
    assert 6 <= len(p.accepted) <= 12, p.accepted
    assert gaps.max() < 2.0 + 0.5 and gaps[:3].min() < 0.5
    assert [e.kind for e in events] == ["down", "spent"] and c.link.state == "lost"


def test_a_stall_past_the_budget_raises_reply_timeout_and_refused_connects_are_outages(peer):
    p = peer(lambda name, args, conn: None)
    with NanonisClient("127.0.0.1", p.port, timeout=0.3, max_outage_s=1.0) as c:
        with pytest.raises(ReplyTimeout, match="Bias.Get.*not back within"):
            c.bias_get()
        assert c.link.state == "lost"
        # a spent outage does not start over on the next call: one attempt, then the error
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            c.bias_get()
        assert time.monotonic() - t0 < 1.5
        c.link.rearm()  # a new frame: a fresh budget
        assert c.link.state == "up"
    # nothing listening at all: connection refused, attempt after attempt
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    c = NanonisClient("127.0.0.1", port, timeout=1, max_outage_s=0.8)
    s.close()
    with pytest.raises(ConnectionLost, match="not back within"):
        c.z_ctrl_setpoint_get()
    assert c.link.attempts >= 3
    c.close()


def test_deadline_scales_with_the_bytes_a_reply_carries(peer):
    frame = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)

    def reply(name, args, conn):
        time.sleep(0.8)  # longer than the 0.2 s base deadline
        if name == "Scan.FrameDataGrab":
            return P.pack_response(name, {"channel_name": "Z (m)", "data": frame, "scan_direction": 0})
        return P.pack_response(name, (1.0,))

    p = peer(reply)
    # 16 kB at 10 kB/s: 1.6 s more than the base deadline
    with NanonisClient("127.0.0.1", p.port, timeout=0.2, max_outage_s=0, link_rate=1e4) as c:
        got = c.scan_frame_data_grab(30, shape=(64, 64))
        np.testing.assert_array_equal(got.data, frame)
        with pytest.raises(ReplyTimeout, match="Bias.Get"):
            c.bias_get()  # a few bytes: the base deadline
    assert p.names() == ["Scan.FrameDataGrab", "Bias.Get"]


def test_closing_a_client_ends_its_reconnecting_at_once(peer):
    p = peer(lambda name, args, conn: "close")
    c = NanonisClient("127.0.0.1", p.port, timeout=1, max_outage_s=60)
    failed = []

    def call():
        try:
            c.bias_get()
        except ConnectionLost as exc:
            failed.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while c.link.attempts < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    c.close()
    t.join(10)
    assert not t.is_alive() and "closed" in str(failed[0])


def test_the_outage_budget_is_a_profile_setting(tmp_path, sim_server):
    from stm_live.config import PROFILE_DIR, ProfileError, load_profile
    from stm_live.devices.stm import NanonisSTM

    assert load_profile("sim").link.max_outage_s == 30.0
    text = (PROFILE_DIR / "sim.yaml").read_text()
    assert "max_outage_s: 30.0" in text

    def variant(old, new):
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(text.replace(old, new))
        return path

    for bad, message in (
        ("max_outage_s: -1", r"link.max_outage_s: -1 outside the allowed range \[0, 3600\]"),
        ("max_outage_s: soon", "link.max_outage_s: expected a number, got 'soon'"),
        ("max_outages: 5", "link.max_outages: unknown key"),
    ):
        with pytest.raises(ProfileError, match=message):
            load_profile(variant("max_outage_s: 30.0", bad))
    no_block = variant("link:\n  max_outage_s: 30.0", "")
    assert load_profile(no_block).link.max_outage_s == 30.0  # optional, with the default
    profile = load_profile(variant("max_outage_s: 30.0", "max_outage_s: 2.5"))
    stm = NanonisSTM(sim_server.host, sim_server.port, profile=profile)
    try:
        assert stm.max_outage_s == 2.5 and stm.client.max_outage_s == 2.5 and stm.client.link is stm.link
    finally:
        stm.close()


# ----------------------------------------------------------------- a faulty link


class FaultyLink:
    """A TCP relay from the device to the simulated controller that holds replies back (a
    busy controller PC), drops every connection, or refuses new ones for a while (a network
    glitch, a controller restarting)."""

    def __init__(self, port: int):
        self.upstream = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.replies = threading.Event()  # cleared: replies are held back
        self.replies.set()
        self.accepting = threading.Event()
        self.accepting.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                self.accepting.wait(0.05)
                continue
            try:
                listener.settimeout(0.05)
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._socks += [conn, up]
                self.connections += 1
            threading.Thread(target=self._pump, args=(conn, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, self.replies), daemon=True).start()

    def _pump(self, src, dst, gate):
        src.settimeout(0.05)
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    break
                while gate is not None and not gate.wait(0.05):
                    if self._stop.is_set():
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _shut(s)

    def drop(self):
        """Close every connection at once, as a network that drops does."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _shut(s)

    def outage(self, seconds: float):
        """Drop every connection and refuse new ones for ``seconds`` (connection refused)."""
        self.accepting.clear()
        listener, self._listener = self._listener, None
        listener.close()
        self.drop()

        def reopen():
            time.sleep(seconds)
            self._listener = socket.create_server(("127.0.0.1", self.port))
            self.accepting.set()

        threading.Thread(target=reopen, daemon=True).start()

    def stall(self, seconds: float):
        """Hold every reply back for ``seconds``, then let them through."""
        self.replies.clear()
        threading.Timer(seconds, self.replies.set).start()

    def close(self):
        self._stop.set()
        self.replies.set()
        self.accepting.wait(30)
        if self._listener is not None:
            self._listener.close()
        self.drop()


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


# ----------------------------------------------------------------- device, plans, session

PIXELS = 32
FRAME = {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 4e-9, "height_m": 4e-9, "angle_deg": 0.0}


@pytest.fixture()
def relayed():
    """The simulated controller (0.1 s per line) behind a FaultyLink."""
    from stm_live.simulators.server import start_server_thread

    server = start_server_thread(seed=3, time_scale=2.0)
    relay = FaultyLink(server.port)
    yield server, relay
    relay.close()
    server.stop()


def _device(relay, max_outage_s):
    from stm_live.devices.stm import NanonisSTM

    stm = NanonisSTM("127.0.0.1", relay.port, name="stm", timeout=1.0, max_outage_s=max_outage_s)
    stm.lines.line_timeout = 60.0  # a slow, loaded machine is not a stalled scan
    return stm


def _session(RE, tmp_path, stm):
    from stm_live.session import AcquisitionSession

    said: list[str] = []
    session = AcquisitionSession(tmp_path, RE=RE)
    session.watch(stm, say=said.append)
    RE.record_interruptions = True  # the suspensions, as events of the run
    return session, said


def _at_line(RE, line: int, fault):
    """Run ``fault()`` (off the RunEngine loop) once the event of ``line`` went out."""
    fired = threading.Event()

    def watch(name, doc):
        if name == "event" and doc["data"].get("stm_line_index") == line and not fired.is_set():
            fired.set()
            threading.Thread(target=fault, daemon=True).start()

    RE.subscribe(watch)
    return fired


def _journaled(tmp_path, uid):
    from stm_live.store import read_journal, run_data

    docs = read_journal(tmp_path / "journal" / f"{uid}.journal")
    interruptions = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "interruptions"}
    suspended = [d["data"]["interruption"] for n, d in docs if n == "event" and d["descriptor"] in interruptions]
    return run_data(docs), suspended


def _controller_frame(server, channel=0):
    with NanonisClient(server.host, server.port, timeout=10) as c:
        fwd = c.scan_frame_data_grab(channel, forward=True).data
        bwd = c.scan_frame_data_grab(channel, forward=False).data
    return fwd, bwd[:, ::-1]


def test_a_frame_rides_through_a_drop_and_a_refusal_with_every_line_once(RE, relayed, tmp_path):
    from stm_live.plans import live_frame

    server, relay = relayed
    stm = _device(relay, max_outage_s=30.0)
    session, said = _session(RE, tmp_path, stm)
    lines = 40
    refused = _at_line(RE, 6, lambda: relay.outage(1.5))  # dropped, then refused for 1.5 s
    dropped = _at_line(RE, 22, relay.drop)  # dropped, accepted again at once
    try:
        (uid,) = session(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=lines, channels=["Current"]))
    finally:
        session.close()
        stm.close()
    assert refused.is_set() and dropped.is_set()
    run, suspended = _journaled(tmp_path, uid)
    assert run.exit_status == "success", run.stop
    assert sorted(run.lines_read) == list(range(lines))  # every line once: none lost, none doubled
    fwd, bwd = _controller_frame(server)
    np.testing.assert_array_equal(run.images["stm_current_fwd"], fwd)
    np.testing.assert_array_equal(run.images["stm_current_bwd"], bwd)
    assert stm.link.outages >= 1 and stm.link.state == "up"
    assert any("link to 127.0.0.1" in s for s in suspended)  # the run was suspended meanwhile
    lost = [s for s in said if " lost at line " in s]
    assert lost and all(s.endswith("reconnecting…") and "of frame 1" in s for s in lost), said
    assert any(s.startswith("link back after ") and "frame 1 resumes at line" in s for s in said), said


def test_a_frame_rides_through_a_stall_longer_than_the_deadline(RE, relayed, tmp_path):
    from stm_live.plans import live_frame

    server, relay = relayed
    stm = _device(relay, max_outage_s=30.0)  # replies are due within 1 s (+ their size)
    session, said = _session(RE, tmp_path, stm)
    lines = 24
    _at_line(RE, 8, lambda: relay.stall(3.0))  # a controller PC busy for 3 s
    try:
        (uid,) = session(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=lines, channels=["Current"]))
    finally:
        session.close()
        stm.close()
    run, suspended = _journaled(tmp_path, uid)
    assert run.exit_status == "success", run.stop
    assert sorted(run.lines_read) == list(range(lines))
    fwd, bwd = _controller_frame(server)
    np.testing.assert_array_equal(run.images["stm_current_fwd"], fwd)
    assert stm.link.outages >= 1 and suspended
    assert any("no reply from" in s and "within" in s for s in said if " lost at line " in s), said


def test_a_scan_stopped_during_the_outage_is_scanned_again(RE, relayed, tmp_path):
    from stm_live.plans import live_frame

    server, relay = relayed
    stm = _device(relay, max_outage_s=30.0)
    session, said = _session(RE, tmp_path, stm)
    lines = 24

    def controller_restarts():
        relay.outage(1.5)
        server.controller.scan_action("stop")  # its scan is gone with it

    _at_line(RE, 8, controller_restarts)
    try:
        (uid,) = session(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=lines, channels=["Current"]))
    finally:
        session.close()
        stm.close()
    run, _ = _journaled(tmp_path, uid)
    assert run.exit_status == "success", run.stop
    assert sorted(run.lines_read) == list(range(lines))
    # the lines after the outage are the new scan's (those before were kept, not rescanned)
    fwd, _ = _controller_frame(server)
    last_old = max(i for i, row in enumerate(run.lines_read) if row <= 8)
    later = sorted(run.lines_read[last_old + 1 :])
    assert later and later[-1] == lines - 1
    np.testing.assert_array_equal(run.images["stm_current_fwd"][later], fwd[later])


def test_an_outage_past_the_limit_fails_the_frame_and_the_next_one_succeeds(RE, relayed, tmp_path):
    from stm_live.plans import live_frame

    server, relay = relayed
    stm = _device(relay, max_outage_s=1.5)
    session, said = _session(RE, tmp_path, stm)
    _at_line(RE, 5, lambda: relay.outage(6.0))
    try:
        with pytest.raises(Exception, match="not back within link.max_outage_s = 1.5 s"):
            session(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=30, channels=["Current"]))
        assert relay.accepting.wait(60)  # the controller answers again
        (uid,) = session(live_frame(stm, frame=FRAME, pixels=PIXELS, lines=12, channels=["Current"]))
    finally:
        session.close()
        stm.close()
    failed_uid = next(p.stem for p in (tmp_path / "journal").glob("*.journal") if p.stem != uid)
    failed, _ = _journaled(tmp_path, failed_uid)
    assert failed.exit_status == "fail"
    reason = failed.stop["reason"]
    assert f"127.0.0.1:{relay.port}" in reason and "dropped at line" in reason and "of 30" in reason
    kept = sorted(failed.lines_read)
    assert kept == list(range(len(kept))) and len(kept) >= 6  # what came before is kept, once
    assert any("not back within 1.5 s" in s and 'ends "fail"' in s for s in said), said
    run, _ = _journaled(tmp_path, uid)
    assert run.exit_status == "success" and sorted(run.lines_read) == list(range(12))


def test_reconditioning_rides_through_stalls_and_never_doubles_a_pulse(RE, relayed, tmp_path, caplog):
    from stm_live.plans import recondition_tip
    from stm_live.reconditioning import TipReconditioner

    server, relay = relayed
    stm = _device(relay, max_outage_s=30.0)
    session, said = _session(RE, tmp_path, stm)
    pulses = len(server.controller.recondition_log)

    def at_clean_site(name, doc):  # the pulse comes next: hold its reply back past its deadline
        if name == "event" and doc["data"].get("stm_last_action") == "at clean site":
            relay.stall(3.0)

    RE.subscribe(at_clean_site)
    verify = {"frame": FRAME, "pixels": 16, "lines": 12, "channels": ["Current"]}
    _at_line(RE, 3, relay.drop)  # and the verification frame loses its link
    try:
        uids = session(
            recondition_tip(
                stm, site=(20e-9, 20e-9), method="bias_pulse", bias_V=1.5, width_s=0.01, verify_frame=verify
            )
        )
        # the policy's own verification scan (a grab loop) stalls longer than its deadline
        rec = TipReconditioner(
            stm, policy="auto", classifier=_Verdict(), site=(20e-9, 20e-9), verify_lines=8, verify_timeout_s=5.0
        )
        geo = rec._geometry()
        stalled = threading.Timer(0.2, relay.stall, args=(7.0,))
        stalled.start()
        t0 = time.monotonic()
        assert rec._verify(geo) is _Verdict.good
        assert time.monotonic() - t0 > 5.0  # longer than its deadline: the outage did not count
        stalled.join()
    finally:
        session.close()
        stm.stop_scan()
        stm.close()
    assert len(server.controller.recondition_log) == pulses + 1  # the lost reply's pulse ran once
    assert any("Bias.Pulse" in r.getMessage() and "not repeated" in r.getMessage() for r in caplog.records)
    for uid in uids:
        run, _ = _journaled(tmp_path, uid)
        assert run.exit_status == "success", run.stop
    frame, _ = _journaled(tmp_path, uids[-1])
    assert sorted(frame.lines_read) == list(range(12))
    assert stm.link.outages >= 3 and stm.link.state == "up"


class _Verdict:
    """Stands in for the tip classifier: the verification is what is tested, not the verdict."""

    good = object()

    def classify(self, image, pixel_size_nm, line_spacing_nm=None):
        assert np.isfinite(image[:8]).all()
        return self.good


def test_console_keeps_suspension_chatter_and_tracebacks_off_the_terminal(tmp_path, capsys):
    import logging

    import bluesky.run_engine as bre

    from stm_live.console import LogFile, quiet_suspensions

    with LogFile(tmp_path) as log, quiet_suspensions():
        bre.print("Suspending....To get prompt hit Ctrl-C twice to pause.")
        bre.print("Justification for this suspension:\nlink to 127.0.0.1:1 lost at line 3")
        bre.print("Pausing...")  # what is not suspension chatter still prints
        try:
            raise ConnectionLost("link to 127.0.0.1:1 lost")
        except ConnectionLost:
            logging.getLogger("stm_live.app.demo").exception("frame 2 failed")
    assert "print" not in vars(bre)  # restored: bluesky prints as before
    out = capsys.readouterr()
    assert out.out == "Pausing...\n" and "Traceback" not in out.err
    text = log.path.read_text()
    assert log.path == tmp_path / "stm-live.log"
    assert "Traceback" in text and "frame 2 failed" in text and "Justification for this suspension" in text
