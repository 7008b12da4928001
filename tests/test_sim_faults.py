"""Fault injection between the simulated controller and its clients (simulators/faults.py),
and rendering off the serving loop (simulators/renderer.py), observed over real TCP."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from wire import ok_values

from stm_live.devices import protocol as P
from stm_live.devices.client import ConnectionLost, NanonisClient
from stm_live.simulators.controller import SimulatedController
from stm_live.simulators.faults import Fault
from stm_live.simulators.scenario import ScenarioError, TipEvent, load_scenario, parse_faults, parse_scenario
from stm_live.simulators.server import start_server_thread

TIMEOUT = 10.0  # generous: every wait below ends on an event long before


def _scenario(*, pixels=32, lines=16, line_s=0.05):
    sc = load_scenario("default")
    return replace(sc, frame=replace(sc.frame, pixels=pixels, lines=lines), time_per_line_s=line_s)


def _served(*faults, **scene):
    return start_server_thread(scenario=_scenario(**scene), seed=0, faults=list(faults))


def _fired(srv, kind, count=1, within=TIMEOUT):
    """The first ``count`` entries of ``kind`` in the fault log, once there (bounded)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        hits = [f for f in srv.server.faults.fired if f["kind"] == kind]
        if len(hits) >= count:
            return hits
        time.sleep(0.01)
    raise AssertionError(f"no {count} {kind} fault(s) fired within {within} s: {srv.server.faults.fired}")


def _connect(srv):
    return socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)


def _through(client, fn):
    """``fn(client)`` across a fault: a client that recovers on its own answers; one that does
    not raises ConnectionLost and answers after ``reconnect()``. Anything else fails."""
    try:
        return fn(client)
    except ConnectionLost:
        client.reconnect()
        return fn(client)


def _scan_done(client, within=60.0):
    deadline = time.monotonic() + within
    while client.scan_status_get():
        assert time.monotonic() < deadline, "the frame did not finish"
        time.sleep(0.02)


# ---------------------------------------------------------------------- delay


def test_delay_holds_every_kth_reply_of_a_command():
    fault = Fault("delay", commands=("Bias.Get",), seconds=0.4, every=2)
    with _served(fault) as srv, NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c:
        c.bias_set(0.25)
        took = []
        for _ in range(4):
            t0 = time.monotonic()
            assert c.bias_get() == pytest.approx(0.25)
            took.append(time.monotonic() - t0)
        assert [f["call"] for f in srv.server.faults.fired] == [2, 4]
        assert took[1] >= 0.4 and took[3] >= 0.4  # a delay is never shorter than asked
        assert srv.server.faults.accepted == 1  # late, not lost: the connection stayed


def test_delay_of_the_nth_call_counts_over_connections_raw():
    fault = Fault("delay", commands=("Current.Get", "Scan.StatusGet"), seconds=0.3, nth=3)
    with _served(fault) as srv:
        a, b = _connect(srv), _connect(srv)
        try:
            for sock in (a, b, a):
                ok_values(sock, "Current.Get")
            t0 = time.monotonic()
            ok_values(b, "Scan.StatusGet")  # each command counted on its own: its 1st call
            ok_values(b, "Scan.StatusGet")
            ok_values(a, "Scan.StatusGet")
            assert time.monotonic() - t0 >= 0.3
        finally:
            a.close()
            b.close()
        assert [(f["call"], f["connections"]) for f in srv.server.faults.fired] == [(3, [0]), (3, [0])]


# ---------------------------------------------------------------------- stall


def test_stall_holds_the_end_of_line_reply_of_line_k_once_per_frame():
    fault = Fault("stall", line=4, seconds=1.0, frame=0)
    with (
        _served(fault) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as ctl,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c,
    ):
        ctl.scan_action("start")
        for _ in range(100):
            t0 = time.monotonic()
            ev = c.scan_wait_end_of_line(TIMEOUT)
            took = time.monotonic() - t0
            if ev.movement in ("forward", "backward") and ev.line >= 4:
                break
        assert ev.line == 4 and took >= 1.0
        (stall,) = _fired(srv, "stall")
        assert (stall["frame"], stall["line"]) == (0, 4)
        # the scan went on during the stall: the rows are there for a grab to catch up
        rows = np.isfinite(ctl.scan_frame_data_grab(30).data[:, 0])
        assert rows.sum() >= 4 + 3 and rows[: rows.sum()].all()
        _scan_done(ctl)
        ctl.scan_action("start")  # frame 1: no stall
        _scan_done(ctl)
        assert len(_fired(srv, "stall")) == 1


# ---------------------------------------------------------------------- drop


def test_drop_resets_every_connection_at_line_k_of_every_frame_raw():
    with _served(Fault("drop", line=3)) as srv:
        for frame in (0, 1):
            follower, idle = _connect(srv), _connect(srv)
            try:
                ok_values(follower, "Scan.Action", 0, 0)  # start
                with pytest.raises(ConnectionResetError):  # RST, as a dropped link resets
                    for _ in range(200):
                        ev = ok_values(follower, "Scan.WaitEndOfLine", int(TIMEOUT * 1000))
                        assert ev["timed_out"] == 0 and ev["line"] < 3 + 2
                drop = _fired(srv, "drop", frame + 1)[frame]
                assert (drop["frame"], drop["line"]) == (frame, 3) and len(drop["connections"]) == 2
                with pytest.raises(ConnectionResetError):
                    idle.recv(1)
            finally:
                follower.close()
                idle.close()
            with _connect(srv) as fresh:  # new connections are taken; the scan went on
                deadline = time.monotonic() + 60
                while ok_values(fresh, "Scan.StatusGet")["status"]:
                    assert time.monotonic() < deadline, "the frame did not finish"
                    time.sleep(0.02)
                assert np.isfinite(ok_values(fresh, "Scan.FrameDataGrab", 30, 1)["data"]).all()


def test_drop_of_one_connection_leaves_the_others_up():
    with (
        _served(Fault("drop", line=2, frame=0, connection=1)) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as ctl,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as follower,
    ):
        ctl.scan_action("start")
        (drop,) = _fired(srv, "drop")
        assert drop["connections"] == [1]
        assert ctl.bias_get() == pytest.approx(-0.5)
        assert srv.server.faults.accepted == 2  # connection 0 answered on its own connection
        ev = _through(follower, lambda c: c.scan_wait_end_of_line(TIMEOUT))
        assert ev.line >= 2 or ev.timed_out
        assert srv.server.faults.accepted == 3  # the follower lost its connection and made another
        _scan_done(ctl)
        assert np.isfinite(ctl.scan_frame_data_grab(30).data).all()  # no line lost at the source


# ---------------------------------------------------------------------- refuse


@pytest.mark.parametrize("trigger", [{"line": 2, "frame": 0}, {"at_s": 0.2}])
def test_refuse_turns_connections_away_for_t_seconds(trigger):
    with (
        _served(Fault("refuse", seconds=3.0, **trigger)) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as ctl,
    ):
        if "line" in trigger:
            ctl.scan_action("start")
        (refuse,) = _fired(srv, "refuse")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
        with pytest.raises(ConnectionLost):
            NanonisClient(srv.host, srv.port, timeout=TIMEOUT)
        assert ctl.bias_get() == pytest.approx(-0.5)  # open connections stay up
        deadline = time.monotonic() + 30
        while True:  # the listener comes back on the same port
            try:
                with NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as late:
                    assert late.bias_get() == pytest.approx(-0.5)
                break
            except ConnectionLost:
                assert time.monotonic() < deadline, "still refused after 30 s"
                time.sleep(0.05)
        assert len(srv.server.faults.fired) == 1


# ---------------------------------------------------------------------- close mid-reply


def test_close_mid_reply_sends_part_of_the_reply_then_closes_raw():
    fault = Fault("close_mid_reply", commands=("Scan.FrameDataGrab",), nth=2, bytes=100)
    with _served(fault) as srv:
        with _connect(srv) as sock:
            full = ok_values(sock, "Scan.FrameDataGrab", 30, 1)
            assert full["data"].shape == (16, 32)
            sock.sendall(P.pack_request("Scan.FrameDataGrab", (30, 1)))
            got = b""
            while chunk := sock.recv(4096):  # then EOF: closed, not reset
                got += chunk
            assert len(got) == 100
            name, size = P.parse_response_header(got[: P.HEADER_SIZE])
            assert name == "Scan.FrameDataGrab" and size > 100 - P.HEADER_SIZE
        with _connect(srv) as sock:  # the 3rd call is whole again
            assert ok_values(sock, "Scan.FrameDataGrab", 30, 1)["data"].shape == (16, 32)
        assert [(f["call"], f["bytes"]) for f in srv.server.faults.fired] == [(2, 100)]


def test_close_mid_reply_through_the_client():
    fault = Fault("close_mid_reply", commands=("Scan.BufferGet",), nth=1)
    with _served(fault) as srv, NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c:
        cfg = _through(c, lambda c: c.scan_buffer_get())
        assert (cfg.pixels, cfg.lines) == (32, 16)
        (cut,) = _fired(srv, "close_mid_reply")
        assert cut["call"] == 1 and 0 < cut["bytes"]
        assert srv.server.faults.accepted == 2  # the cut reply cost the connection


# ---------------------------------------------------------------------- scenario section


def test_faults_from_a_scenario_file_arm_the_server(tmp_path):
    path = tmp_path / "flaky.yaml"
    path.write_text(
        "name: flaky\nframe: {pixels: 32, lines: 8}\n"
        "faults:\n  - {kind: delay, command: [Bias.Get], seconds: 0.2, nth: 1}\n"
        "  - {kind: drop, line: 5, frame: 2, connection: 0}\n",
        encoding="utf-8",
    )
    sc = load_scenario(path)
    assert sc.faults == (
        Fault("delay", commands=("Bias.Get",), seconds=0.2, nth=1),
        Fault("drop", line=5, frame=2, connection=0),
    )
    with start_server_thread(scenario=path, seed=0) as srv, NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c:
        c.bias_get()
        assert _fired(srv, "delay")[0]["call"] == 1
    assert len(load_scenario("flaky_link").faults) == 5  # the shipped example stays valid


@pytest.mark.parametrize(
    "faults, message",
    [
        ("drop", "faults: expected a list of faults"),
        ([3], "faults[0]: expected a mapping"),
        ([{"line": 3}], "faults[0].kind: missing (one of: delay, stall, drop, refuse, close_mid_reply)"),
        ([{"kind": "cable_cut", "line": 3}], "faults[0].kind: unknown value 'cable_cut'"),
        ([{"kind": "drop"}], "faults[0].line: missing (a drop fault needs line)"),
        (
            [{"kind": "drop", "line": 3, "seconds": 2}],
            "faults[0].seconds: unknown key (allowed: kind, line, frame, connection)",
        ),
        ([{"kind": "delay", "command": "Bias.Gte", "seconds": 1}], "faults[0].command: unknown command 'Bias.Gte'"),
        ([{"kind": "delay", "command": ["Bias.Get", 7], "seconds": 1}], "faults[0].command[1]: expected a string"),
        (
            [{"kind": "delay", "command": [], "seconds": 1}],
            "faults[0].command: expected a command name or a non-empty list",
        ),
        (
            [{"kind": "delay", "command": "Bias.Get"}],
            "faults[0].seconds: missing (a delay fault needs command, seconds)",
        ),
        ([{"kind": "delay", "command": "Bias.Get", "seconds": 0}], "faults[0].seconds: must be > 0.0, got 0"),
        (
            [{"kind": "delay", "command": "Bias.Get", "seconds": 1, "nth": 1, "every": 2}],
            "faults[0]: give nth or every",
        ),
        ([{"kind": "delay", "command": "Bias.Get", "seconds": 1, "nth": 0}], "faults[0].nth: must be >= 1, got 0"),
        ([{"kind": "stall", "line": 3, "seconds": "5 s"}], "faults[0].seconds: expected a number, got '5 s'"),
        ([{"kind": "stall", "line": -1, "seconds": 5}], "faults[0].line: must be >= 0, got -1"),
        ([{"kind": "refuse", "seconds": 10}], "faults[0]: a refuse fault starts at a line (line: K) or a time"),
        ([{"kind": "refuse", "seconds": 10, "line": 3, "at_s": 1}], "faults[0]: give line or at_s, not both"),
        ([{"kind": "refuse", "seconds": 10, "at_s": 1, "frame": 0}], "faults[0].frame: only with line: K"),
        ([{"kind": "close_mid_reply", "command": "Scan.FrameDataGrab", "bytes": 0}], "faults[0].bytes: must be >= 1"),
    ],
)
def test_fault_section_errors_name_the_key(faults, message):
    with pytest.raises(ScenarioError) as err:
        parse_scenario({"faults": faults}, source="flaky.yaml")
    assert str(err.value).startswith("flaky.yaml: ") and message in str(err.value)


def test_no_faults_section_means_no_faults():
    assert parse_scenario({}).faults == () and parse_faults(None) == ()


# ---------------------------------------------------------------------- rendering off the loop


def test_commands_answer_while_a_512px_frame_is_rendering():
    """A render of the second block is held until the commands have answered: if any of
    them waited on rendering, it would never answer."""
    with start_server_thread(seed=0, time_scale=1.0) as srv, NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c:
        renderer = srv.controller.renderer
        render, rendering, release = renderer.render_block, threading.Event(), threading.Event()

        def held(g, tip, *, rows, **kw):
            if rows[0] > 0 and not release.is_set():
                rendering.set()
                release.wait(120)
            return render(g, tip, rows=rows, **kw)

        renderer.render_block = held
        try:
            c.scan_buffer_set([0, 30], 512, 512)
            c.scan_speed_set(1e-6, 1e-6, 0.002, 0.002, keep_constant="time")
            c.scan_action("start")
            assert rendering.wait(60)
            assert c.bias_get() == pytest.approx(-0.5)
            assert c.current_get() > 0
            assert c.scan_status_get()
            assert np.isfinite(c.signals_vals_get([0, 24, 30])).all()
            # the line clock waits for the rows it needs: nothing past the first block
            size = renderer.block_lines({"pixels": 512, "lines": 512})
            ev = c.scan_wait_end_of_line(0.3)
            assert ev.line < size
            data = c.scan_frame_data_grab(30).data
            assert data.shape == (512, 512) and np.isnan(data[size:]).all()
            assert rendering.is_set() and not release.is_set()  # still rendering all along
        finally:
            release.set()
        for _ in range(1000):  # the rows land, and the scan goes on past them
            ev = c.scan_wait_end_of_line(TIMEOUT)
            if ev.line > size:
                break
        assert ev.line > size
        c.scan_action("stop")


@pytest.mark.parametrize("scene", ["tip change", "drift"])
def test_rows_rendered_ahead_equal_rows_rendered_inline(scene):
    """Same seed and scenario: the server's frame (rendered ahead, in the background) is the
    directly driven controller's (rendered inline), pixel for pixel."""
    sc = _scenario(pixels=48, lines=40)
    if scene == "tip change":  # blocks rendered ahead for the old tip are dropped
        sc = replace(sc, evolution=replace(sc.evolution, events=(TipEvent(0, 21, "double"),)))
    else:  # whole-frame blocks
        sc = replace(sc, artifacts=replace(sc.artifacts, drift=0.5, creep=0.3))
    with (
        start_server_thread(scenario=sc, seed=5, time_scale=4.0) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c,
    ):
        c.scan_action("start")
        _scan_done(c)
        served = {(ch, fwd): c.scan_frame_data_grab(ch, fwd).data for ch in (0, 30) for fwd in (True, False)}

    clock = [0.0]
    ref = SimulatedController(sc, seed=5, clock=lambda: clock[0])
    ref.scan_action("start")
    for _ in range(10_000):
        clock[0] += 0.05
        ref.advance()
        if not ref.scanning:
            break
    assert [h["line"] for h in ref.tip_history] == ([21] if scene == "tip change" else [])
    for (ch, fwd), data in served.items():
        np.testing.assert_array_equal(data, ref.frame_data(ch, fwd)[1])
