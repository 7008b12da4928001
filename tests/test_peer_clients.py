"""The simulated controller driven by the two public Python clients, unmodified:
nanonisTCP 1.1.5 and SPECS' nanonis_spm 1.0.9 (NANONIS_PROTOCOL.md §6).

Neither client sets socket timeouts, so each test sets one on the client's socket before
every call (nanonis_spm resets its own to 1000 s after each reply), and pytest-timeout
bounds the whole test.
"""

from __future__ import annotations

import contextlib
import io
import socket

import numpy as np
import pytest

from stm_live.devices.client import NanonisClient, NanonisError

nanonisTCP_mod = pytest.importorskip("nanonisTCP")
nanonis_spm = pytest.importorskip("nanonis_spm")

pytestmark = pytest.mark.timeout(60)

PEER_TIMEOUT_S = 10.0


@pytest.fixture()
def ours(sim_server):
    with NanonisClient(sim_server.host, sim_server.port, timeout=5) as c:
        yield c


@pytest.fixture()
def ntcp(sim_server):
    """nanonisTCP with its default (newest-release) settings."""
    from nanonisTCP import nanonisTCP

    conn = nanonisTCP(sim_server.host, sim_server.port)
    conn.s.settimeout(PEER_TIMEOUT_S)  # it never sets one; nothing else touches it
    yield conn
    conn.close_connection()


class SpmPeer:
    """nanonis_spm.Nanonis with a bounded read per call and printed output captured."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=PEER_TIMEOUT_S)
        self.nanonis = nanonis_spm.Nanonis(self.sock)
        self.printed = io.StringIO()

    def __call__(self, method, *args):
        self.sock.settimeout(PEER_TIMEOUT_S)  # undo its settimeout(1000) from the last reply
        with contextlib.redirect_stdout(self.printed):
            out = getattr(self.nanonis, method)(*args)
        assert out, f"nanonis_spm {method} returned nothing (printed: {self.printed.getvalue()!r})"
        error, _raw, values = out
        return error, values

    def close(self):
        self.sock.close()


@pytest.fixture()
def spm(sim_server):
    peer = SpmPeer(sim_server.host, sim_server.port)
    yield peer
    peer.close()


# ----------------------------------------------------------------- nanonisTCP


def test_nanonistcp_bias_and_z_controller(ntcp, ours):
    from nanonisTCP.Bias import Bias
    from nanonisTCP.ZController import ZController

    bias, zc = Bias(ntcp), ZController(ntcp)
    bias.Set(0.42)
    assert bias.Get() == pytest.approx(0.42, abs=1e-6)
    assert ours.bias_get() == pytest.approx(0.42, abs=1e-6)
    zc.OnOffSet(True)
    assert zc.OnOffGet() in (1, True)
    zc.SetpntSet(2e-11)
    assert zc.SetpntGet() == pytest.approx(2e-11, rel=1e-5)
    assert np.isfinite(zc.ZPosGet())


def test_nanonistcp_scan_frame_buffer_action_status(ntcp, ours):
    from nanonisTCP.Scan import Scan

    scan = Scan(ntcp)
    scan.Action("stop")
    scan.FrameSet(2e-9, 1e-9, 5e-9, 5e-9, 0)
    x, y, w, h, angle = scan.FrameGet()
    assert (x, y, w, h) == pytest.approx((2e-9, 1e-9, 5e-9, 5e-9), rel=1e-5)
    scan.BufferSet([0, 30], 32, 8)  # it calls BufferGet first to fill gaps
    n, idx, pixels, lines = scan.BufferGet()
    assert (n, idx, pixels, lines) == (2, [0, 30], 32, 8)
    assert scan.StatusGet() is False
    scan.Action("start", "down")
    assert scan.StatusGet() is True
    assert ours.scan_status_get() is True
    scan.Action("stop")


def test_nanonistcp_frame_data_grab_equals_ours(ntcp, ours):
    from nanonisTCP.Scan import Scan

    ours.scan_action("stop")
    ours.scan_buffer_set([0, 30], 16, 8)
    ours.scan_action("start", "down")
    ev = None
    with NanonisClient(ours.host, ours.port, timeout=5) as waiter:
        for _ in range(10):  # let a few lines finish so the grab holds data and NaN
            ev = waiter.scan_wait_end_of_line(3.0)
            if not ev.timed_out and ev.line >= 2:
                break
    ours.scan_action("pause")  # freeze the buffer so both grabs see the same frame
    try:
        name, data, direction = Scan(ntcp).FrameDataGrab(30, 1)
        mine = ours.scan_frame_data_grab(30, forward=True)
    finally:
        ours.scan_action("stop")
    assert name == mine.name and direction == ("up" if mine.scan_up else "down")
    assert data.shape == mine.data.shape == (8, 16)
    np.testing.assert_array_equal(data.astype(np.float32), mine.data)
    assert np.isfinite(mine.data[0]).all()


def test_nanonistcp_wait_end_of_line(ntcp, ours):
    from nanonisTCP.Scan import Scan

    ours.scan_action("stop")
    ours.scan_buffer_set([0], 16, 8)
    ours.scan_action("start", "down")
    try:
        timed_out, line, movement, _pass = Scan(ntcp).WaitEndOfLine(5000)
    finally:
        ours.scan_action("stop")
    assert timed_out is False and movement in ("forward", "backward", "start", "center")
    assert 0 <= line < 8


def test_nanonistcp_tip_shaper(ntcp, ours):
    from nanonisTCP.TipShaper import TipShaper

    ts = TipShaper(ntcp)
    ts.PropsSet(Tip_lift=-1.5e-9, Change_bias=2, Restore_feedback=1)  # PropsGet, then Set
    props = ts.PropsGet()
    assert props[3] == pytest.approx(-1.5e-9, rel=1e-5)
    assert props[1] == 0 and props[10] == 1  # Get enums shifted: 0 = no, 1 = yes
    ts.Start(1, 5000)
    assert ours.tip_shaper_props_get().tip_lift == pytest.approx(-1.5e-9, rel=1e-5)


def test_nanonistcp_sees_controller_errors(ntcp, ours):
    from nanonisTCP.ZController import ZController

    zc = ZController(ntcp)
    ours.z_ctrl_on_off_set(True)
    # nanonisTCP raises a bare Exception, its message's start garbled by its own parser (§6.1)
    with pytest.raises(Exception, match="while the Z-controller is off"):
        zc.ZPosSet(1e-9)  # refused by the controller while the Z loop is on
    with pytest.raises(NanonisError):
        ours.z_ctrl_z_pos_set(1e-9)
    assert zc.OnOffGet() in (1, True)  # and the connection stays in step


def test_nanonistcp_props_and_motor_against_extended_layout():
    """nanonisTCP (default settings) needs the extended PropsGet layout (§5) and sends
    Motor.PosGet with an empty body (§3.8)."""
    from nanonisTCP import nanonisTCP
    from nanonisTCP.Motor import Motor
    from nanonisTCP.Scan import Scan

    from stm_live.simulators.server import start_server_thread

    with start_server_thread(seed=0, time_scale=20.0, props_layout="extended") as server:
        conn = nanonisTCP(server.host, server.port)
        conn.s.settimeout(PEER_TIMEOUT_S)
        try:
            Scan(conn).PropsSet(
                continuous_scan=1,
                bouncy_scan=2,
                autosave=3,
                series_name="peer",
                comment="c",
                modules_names=["Bias"],
                autopaste="next",
            )
            cont, bouncy, autosave, name, comment, modules, _autopaste = Scan(conn).PropsGet()
            x, y, z = Motor(conn).PosGet()
        finally:
            conn.close_connection()
        assert (cont, bouncy, autosave, name, comment, modules) == (1, 0, 2, "peer", "c", ["Bias"])
        assert np.isfinite([x, y, z]).all()


# ----------------------------------------------------------------- nanonis_spm


def test_spm_bias_z_controller(spm, ours):
    err, _ = spm("Bias_Set", -0.8)
    assert err == ""
    err, (bias,) = spm("Bias_Get")
    assert err == "" and bias == pytest.approx(-0.8, abs=1e-6)
    assert ours.bias_get() == pytest.approx(-0.8, abs=1e-6)
    spm("ZCtrl_OnOffSet", 1)
    err, (status,) = spm("ZCtrl_OnOffGet")
    assert err == "" and status == 1


def test_spm_scan_frame_buffer_action_status(spm, ours):
    spm("Scan_Action", 1, 0)
    err, _ = spm("Scan_FrameSet", 0.0, 0.0, 6e-9, 6e-9, 0.0)
    assert err == ""
    err, frame = spm("Scan_FrameGet")
    assert frame[2] == pytest.approx(6e-9, rel=1e-5)
    err, _ = spm("Scan_BufferSet", [0, 30], 16, 8)
    assert err == ""
    err, (n, idx, pixels, lines) = spm("Scan_BufferGet")
    assert (n, np.ravel(idx).tolist(), pixels, lines) == (2, [0, 30], 16, 8)
    spm("Scan_Action", 0, 0)
    err, (running,) = spm("Scan_StatusGet")
    assert running == 1 and ours.scan_status_get() is True
    spm("Scan_Action", 1, 0)
    assert ours.scan_status_get() is False


def test_spm_frame_data_grab_and_wait_end_of_line(spm, ours):
    ours.scan_action("stop")
    ours.scan_buffer_set([0, 30], 16, 8)
    ours.scan_action("start", "down")
    try:
        # No wrapper in 1.0.9: the generic quickSend with the documented layout (§5).
        err, values = spm("quickSend", "Scan.WaitEndOfLine", [5000], ["i"], ["I", "i", "H", "i"])
        timed_out, line, movement, _pass = values
        assert err == "" and timed_out == 0 and movement in (0, 1, 2, 3) and 0 <= line < 8
        ours.scan_action("pause")
        err, values = spm("Scan_FrameDataGrab", 0, 1)
        mine = ours.scan_frame_data_grab(0, forward=True)
    finally:
        ours.scan_action("stop")
    assert err == ""
    _size, name, rows, cols, data, direction = values
    assert (name, rows, cols, direction) == (mine.name, 8, 16, int(mine.scan_up))
    np.testing.assert_array_equal(np.asarray(data, np.float32), mine.data)


def test_spm_tip_shaper(spm, ours):
    err, _ = spm("TipShaper_PropsSet", 0.1, 1, -2.0, -1e-9, 0.05, 1.0, 0.01, 2e-9, 0.05, 0.02, 2)
    assert err == ""
    err, props = spm("TipShaper_PropsGet")
    assert err == "" and props[1] == 1 and props[10] == 0 and props[2] == pytest.approx(-2.0)
    err, _ = spm("TipShaper_Start", 1, 5000)
    assert err == ""
    assert ours.tip_shaper_props_get().change_bias is True
