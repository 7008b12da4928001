"""Raw Nanonis TCP round trips, for tests that must see the wire with no client of ours in
between (the simulated controller, the recording proxy, faults injected between them)."""

from __future__ import annotations

from stm_live.devices import protocol as P


def recv_exact(sock, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ConnectionError when the peer closes first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_reply(sock, name: str):
    """``(values, status, description)`` of the reply to ``name`` waiting on ``sock``."""
    rname, size = P.parse_response_header(recv_exact(sock, P.HEADER_SIZE))
    assert rname == name
    return P.decode_response_body(name, recv_exact(sock, size))


def round_trip(sock, name: str, *args):
    """Send ``name(*args)`` and read its reply: ``(values, status, description)``."""
    sock.sendall(P.pack_request(name, args))
    return read_reply(sock, name)


def ok_values(sock, name: str, *args):
    """:func:`round_trip` of a command that must succeed: its values."""
    values, status, desc = round_trip(sock, name, *args)
    assert status == 0, desc
    return values
