"""Bad input never takes the simulated controller down: each case checks that another
connection keeps working and that resources are released."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from wire import read_reply, recv_exact, round_trip

from stm_live.devices import protocol as P
from stm_live.simulators.server import start_server_thread

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def server():
    srv = start_server_thread(seed=0, time_scale=10.0, read_timeout_s=0.3)
    yield srv
    srv.stop()


def _connect(server):
    return socket.create_connection((server.host, server.port), timeout=TIMEOUT)


def _closed_by_server(sock, within=3.0):
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def _wait_idle(server, expected=0, within=3.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.server.connections == expected:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture()
def other(server):
    """A well-behaved connection opened before the bad one."""
    sock = _connect(server)
    yield sock
    sock.close()
    assert _wait_idle(server), "connections were not released"


def _still_works(sock):
    values, status, _ = round_trip(sock, "Bias.Get")
    assert status == 0 and values["bias"] == pytest.approx(-0.5)


def test_random_bytes_close_only_that_connection(server, other):
    bad = _connect(server)
    bad.sendall(os.urandom(16) + b"\xff" * 24 + os.urandom(100))
    assert _closed_by_server(bad)
    _still_works(other)


def test_truncated_header_then_disconnect(server, other):
    bad = _connect(server)
    bad.sendall(b"Bias.Get\x00\x00\x00")
    bad.close()
    _still_works(other)


def test_two_gigabyte_body_is_refused(server, other):
    bad = _connect(server)
    bad.sendall(struct.pack(">32siHH", b"Bias.Set", 2**31 - 1, 1, 0))
    assert _closed_by_server(bad)
    _still_works(other)


def test_never_finished_body_times_out(server, other):
    bad = _connect(server)
    bad.sendall(struct.pack(">32siHH", b"Bias.Set", 4, 1, 0) + b"\x00")
    t0 = time.monotonic()
    _still_works(other)  # served while the bad one hangs
    assert _closed_by_server(bad, within=3.0)
    assert 0.25 <= time.monotonic() - t0 < 3.0


def test_disconnect_mid_body(server, other):
    bad = _connect(server)
    bad.sendall(P.pack_request("Scan.BufferSet", ([0, 30], 64, 64))[:-5])
    bad.close()
    _still_works(other)


def test_unknown_command_and_short_body_get_error_replies(server, other):
    other.sendall(struct.pack(">32siHH", b"Nope.DoesNotExist", 3, 1, 0) + b"abc")
    values, status, desc = read_reply(other, "Nope.DoesNotExist")
    assert status == 1 and desc == "Unknown command: Nope.DoesNotExist" and values == {}
    other.sendall(struct.pack(">32siHH", b"Bias.Set", 2, 1, 0) + b"\x00\x00")
    header = recv_exact(other, 40)
    name, size = P.parse_response_header(header)
    body = recv_exact(other, size)
    assert name == "Bias.Set" and size == len(body)
    assert P.parse_error_section(body, 0)[0] == 1 and "bias" in body.decode("latin-1")
    _still_works(other)  # same connection keeps going


def test_surplus_body_bytes_and_no_reply_flag(server, other):
    # Scan.PropsSet with the newer autopaste field appended (nanonisTCP, nanonis_spm)
    values, status, desc = round_trip(other, "Scan.PropsSet", 2, 2, 3, "s_", "c", ["Bias"], 3)
    assert status == 0, desc
    other.sendall(P.pack_request("Bias.Set", (0.25,), want_reply=False))  # no reply at all
    values, status, _ = round_trip(other, "Bias.Get")
    assert values["bias"] == pytest.approx(0.25)
    round_trip(other, "Bias.Set", -0.5)


def test_fifth_connection_is_refused_then_slot_frees(server, other):
    extra = [_connect(server) for _ in range(3)]  # other + 3 = 4
    for s in extra:
        _still_works(s)
    fifth = _connect(server)
    assert _closed_by_server(fifth)
    assert server.server.refused >= 1
    extra.pop().close()
    assert _wait_idle(server, expected=3)
    again = _connect(server)
    _still_works(again)
    again.close()
    for s in extra:
        s.close()


def test_blocking_wait_does_not_stall_other_connections(server, other):
    waiter = _connect(server)
    waiter.sendall(P.pack_request("Scan.WaitEndOfScan", (1500,)))  # nothing is scanning
    time.sleep(0.05)
    t0 = time.monotonic()
    for _ in range(20):
        _still_works(other)
    assert time.monotonic() - t0 < 1.0
    values, status, _ = read_reply(waiter, "Scan.WaitEndOfScan")
    assert status == 0 and values["timed_out"] == 1
    waiter.close()


def test_client_gone_during_wait_releases_connection(server, other):
    waiter = _connect(server)
    waiter.sendall(P.pack_request("Scan.WaitEndOfLine", (300,)))
    waiter.close()
    time.sleep(0.4)  # the wait ends; the reply goes nowhere
    _still_works(other)


def test_abandoned_endless_wait_frees_its_slot(server, other):
    waiter = _connect(server)
    waiter.sendall(P.pack_request("Scan.WaitEndOfScan", (-1,)))  # wait forever, nothing scans
    time.sleep(0.1)
    assert server.server.connections == 2
    waiter.close()
    assert _wait_idle(server, expected=1, within=3.0)  # noticed the hang-up, slot released
    _still_works(other)
