"""Settings that change what the simulated tip sees, over TCP (our client and nanonisTCP
1.1.5's module classes): coarse moves reach another area of the sample, the piezo tilt
correction is a plane in Z at constant current and a current gradient at constant height,
Z-loop gains below the defaults lag along the fast axis, the oscilloscope shows the tip's
signals with the scenario's noise, and Scan.PropsGet (R14573+) lists the header parameters
of the modules chosen. Default settings keep today's images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stm_live.devices.client import NanonisClient
from stm_live.simulators.scenario import ScenarioError, load_scenario, parse_scenario
from stm_live.simulators.server import start_server_thread
from stm_live.simulators.vacuum import KAPPA_PER_NM

nanonisTCP_mod = pytest.importorskip("nanonisTCP")

pytestmark = pytest.mark.timeout(180)
TIMEOUT_S = 10.0
FRAME_TIMEOUT_S = 60.0  # a small frame takes well under a second; the machine may be busy


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _frame(c: NanonisClient, channel: int = 30):
    """Scan one frame; (forward, backward) images of ``channel``, both left to right."""
    c.scan_action("start", "down")
    timed_out, _ = c.scan_wait_end_of_scan(FRAME_TIMEOUT_S)
    assert not timed_out
    fwd = c.scan_frame_data_grab(channel, True).data.astype(np.float64)
    bwd = c.scan_frame_data_grab(channel, False).data[:, ::-1].astype(np.float64)  # wire rows are mirrored
    assert np.isfinite(fwd).all() and np.isfinite(bwd).all()
    return fwd, bwd


@pytest.fixture()
def ntcp_factory():
    """nanonisTCP at its default (newest-release) settings, with a bounded socket."""
    from nanonisTCP import nanonisTCP

    conns = []

    def connect(srv):
        conn = nanonisTCP(srv.host, srv.port)
        conn.s.settimeout(TIMEOUT_S)  # it never sets one
        conns.append(conn)
        return conn

    yield connect
    for conn in conns:
        conn.close_connection()


# ------------------------------------------------------------------ coarse motion and sample areas


def test_areas_section_parses_and_names_bad_keys():
    sc = load_scenario("areas")
    assert [a.name for a in sc.areas] == ["home", "east", "north"]
    east = sc.areas[1]
    placed = sc.molecules[len(sc.areas[0].molecules)]  # the scene holds every area's, in sample coordinates
    assert (placed.x_nm, placed.y_nm) == (east.x_nm + east.molecules[0].x_nm, east.y_nm + east.molecules[0].y_nm)
    assert load_scenario("default").areas == ()  # no areas: the one area of `molecules`
    one = {"molecule": "pentacene"}
    for bad, where in (
        ({"areas": [{"x_nm": 1e3}]}, "areas[0].molecules: missing"),
        ({"areas": [{"molecules": [one]}, {"name": "area0", "molecules": [one]}]}, "areas[1].name"),
        ({"areas": [{"molecules": [{"molecule": "nope"}]}]}, "areas[0].molecules[0].molecule"),
        ({"molecules": [one], "areas": [{"molecules": [one]}]}, "molecules: with areas"),
        ({"areas": [{"molecules": [one], "z_nm": 1}]}, "areas[0].z_nm: unknown key"),
    ):
        with pytest.raises(ScenarioError, match=r"^areas\.yaml: " + where.replace("[", r"\[").replace("]", r"\]")):
            parse_scenario(bad, source="areas.yaml")


def _area_image(scenario, area: str, pixels: int, width_nm: float) -> np.ndarray:
    """What the forward model alone gives for a frame centred on ``area`` (no noise)."""
    from stm_live.simulators.imaging import ScanFrame, Substrate, constant_current_image
    from stm_live.simulators.tip import tip_preset

    a = next(a for a in scenario.areas if a.name == area)
    placed = [m for m in scenario.molecules if math.hypot(m.x_nm - a.x_nm, m.y_nm - a.y_nm) < 100]
    frame = ScanFrame(a.x_nm, a.y_nm, width_nm, width_nm, pixels=pixels, lines=pixels)
    return constant_current_image(
        placed,
        frame,
        tip_preset(scenario.tip),
        setpoint_A=scenario.setpoint_A,
        bias_V=scenario.bias_V,
        substrate=Substrate(**scenario.substrate),
    )


def test_coarse_moves_image_another_area_and_come_back(ntcp_factory):
    from nanonisTCP.Motor import Motor

    with (
        start_server_thread(scenario="areas", seed=1, time_scale=200.0) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT_S) as c,
    ):
        motor = Motor(ntcp_factory(srv))
        sc = srv.controller.scenario
        c.scan_buffer_set([0, 30], 32, 32)
        c.scan_frame_set(0.0, 0.0, 6e-9, 6e-9, 0.0)
        c.z_ctrl_on_off_set(True)
        motor.StepCounterGet(True, True, True)

        def moved(direction, steps):  # withdraw, step, approach: as a survey does
            c.z_ctrl_withdraw()
            motor.StartMove(direction, steps, wait_until_finished=True, group=1)
            c.z_ctrl_on_off_set(True)
            return _frame(c)[0]

        home = _frame(c)[0]
        east = moved("X+", 10)  # 10 steps of 100 nm: the area 1 um east
        assert motor.StepCounterGet() == [10, 0, 0]
        assert c.motor_pos_get()[0] == pytest.approx(1e-6)
        mid = moved("X-", 5)  # half way back: bare NaCl
        back = moved("X-", 5)
        assert motor.StepCounterGet() == [0, 0, 0]
        assert _corr(east, _area_image(sc, "east", 32, 6.0)) > 0.9
        assert _corr(east, _area_image(sc, "home", 32, 6.0)) < 0.5
        assert _corr(home, _area_image(sc, "home", 32, 6.0)) > 0.9
        assert np.ptp(mid) < 0.2 * np.ptp(home)
        assert _corr(home, back) > 0.95

        # a step's length follows the amplitude; closed-loop moves count their steps too
        c.z_ctrl_withdraw()
        motor.FreqAmpSet(1000.0, 50.0, axis=0)
        motor.StartMove("Y+", 20, wait_until_finished=True, group=1)  # 20 x 50 nm
        assert c.motor_pos_get()[1] == pytest.approx(1e-6)
        c.call("Motor.StartClosedLoop", {"mode": 1, "x": 0.0, "y": 0.0, "z": 0.0, "wait": 1, "group": 0})
        assert motor.StepCounterGet() == [0, 0, 0] and c.motor_pos_get() == pytest.approx((0.0, 0.0, 0.0))


# ------------------------------------------------------------------ piezo tilt correction


def _plane(image):
    """Least-squares plane a x + b y + c of an image (x: column, y: row, in pixels)."""
    rows, cols = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    design = np.c_[cols.ravel(), rows.ravel(), np.ones(image.size)]
    coef, *_ = np.linalg.lstsq(design, image.ravel(), rcond=None)
    return coef, image.ravel() - design @ coef


def test_tilt_is_a_plane_in_z_and_a_current_gradient_at_constant_height(ntcp_factory):
    from nanonisTCP.Piezo import Piezo

    px_m, pixels, tilt_deg = 6e-9 / 32, 32, 2.0
    slope = math.tan(math.radians(tilt_deg))
    quiet = parse_scenario({"artifacts": {}, "substrate": {"corrugation": 0.05}})  # noise would hide the far rows
    with (
        start_server_thread(scenario=quiet, seed=2, time_scale=200.0) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT_S) as c,
    ):
        piezo = Piezo(ntcp_factory(srv))
        c.scan_buffer_set([0, 30], pixels, pixels)
        c.scan_frame_set(0.0, 0.0, 6e-9, 6e-9, 0.0)
        c.z_ctrl_on_off_set(True)
        flat = _frame(c)[0]
        piezo.TiltSet(tilt_deg, 0.0)
        assert piezo.TiltGet()[0] == pytest.approx(tilt_deg)
        tilted = _frame(c)[0]
        # constant current: the loop takes the correction's plane x tan(tilt) out of Z
        (a, b, _c), residual = _plane(tilted - flat)
        assert a == pytest.approx(-slope * px_m, rel=0.05) and abs(b) < 0.05 * abs(a)
        assert residual.std() < 0.05 * abs(a) * pixels

        # constant height: the tip follows the plane, so the current falls where it rises
        c.call("Piezo.TiltSet", {"tilt_x": 0.0, "tilt_y": 0.0})  # (nanonisTCP would keep a 0 as "no change")
        c.z_ctrl_on_off_set(False)
        untilted_h = _frame(c, 0)[0]

        def ln_ratio():  # ln I(y = -2.5 nm) / I(y = +2.5 nm), point values (no noise)
            c.folme_xy_pos_set(0.0, -2.5e-9)
            low = c.current_get()
            c.folme_xy_pos_set(0.0, 2.5e-9)
            return math.log(low / c.current_get())

        before = ln_ratio()
        c.call("Piezo.TiltSet", {"tilt_x": 0.0, "tilt_y": tilt_deg})
        assert ln_ratio() - before == pytest.approx(2 * KAPPA_PER_NM * slope * 5.0, rel=0.01)
        tilted_h = _frame(c, 0)[0]
        # each row sits at its own height y tan(tilt): its mean current scales by about
        # e^{-2κ y tan} (exactly over the substrate; orbital tails fall a little faster)
        y_nm = 3.0 - (np.arange(pixels) + 0.5) * 6.0 / pixels  # row 0 at the top (a down scan)
        fit = np.polyfit(y_nm, np.log(tilted_h.mean(1) / untilted_h.mean(1)), 1)
        assert fit[0] == pytest.approx(-2 * KAPPA_PER_NM * slope, rel=0.25)


# ------------------------------------------------------------------ Z-loop gains


def _phase(fwd, bwd, k: int = 1) -> float:
    """Phase (rad) of the forward rows against the backward ones at spatial frequency k."""
    w = np.hanning(fwd.shape[1])
    f = np.fft.fft((fwd - fwd.mean(1, keepdims=True)) * w, axis=1)[:, k]
    b = np.fft.fft((bwd - bwd.mean(1, keepdims=True)) * w, axis=1)[:, k]
    return float(-np.angle(np.sum(f * b.conj())))


def test_z_gains_below_the_defaults_lag_along_the_fast_axis(ntcp_factory):
    """A first-order lag of τ = T/P beyond the default loop's 1 ms delays forward rows to the
    right and backward ones to the left: at spatial frequency k their phases differ by
    2 atan(2πk/N · τ/dt). The default gains keep today's images (no lag)."""
    from nanonisTCP.ZController import ZController

    pixels, t_line = 64, 0.1
    dt = t_line / pixels
    with (
        start_server_thread(seed=3, time_scale=200.0) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT_S) as c,
    ):
        zc = ZController(ntcp_factory(srv))
        c.scan_buffer_set([0, 30], pixels, 32)
        c.scan_frame_set(0.0, 0.0, 6e-9, 6e-9, 0.0)
        c.z_ctrl_on_off_set(True)
        p0, t0, i0 = zc.GainGet()
        assert i0 == pytest.approx(p0 / t0, rel=1e-5)
        default = _frame(c)
        error0 = _frame(c, 0)[0].std()
        assert abs(_phase(*default)) < 0.05

        phases = []
        for p in (0.01, 0.005):
            zc.GainSet(p, t0)
            assert zc.GainGet()[2] == pytest.approx(p / t0, rel=1e-5)
            lagged = _frame(c)
            lag_s = t0 / p - t0 / p0
            phases.append(_phase(*lagged))
            assert phases[-1] == pytest.approx(2 * math.atan(2 * math.pi / pixels * lag_s / dt), rel=0.25)
            assert _frame(c, 0)[0].std() > 2 * error0  # the current's tracking error at the edges
        assert phases[1] > phases[0]

        zc.GainSet(p0, t0)
        again = _frame(c)
        assert abs(_phase(*again)) < 0.05 and _corr(again[0], default[0]) > 0.99


# ------------------------------------------------------------------ oscilloscope


def _traces(c, which=0):
    d = c.call("Osci2T.DataGet", {"which": which})
    return d["t0"], d["dt"], np.asarray(d["a"]), np.asarray(d["b"])


def test_oscilloscope_traces_follow_the_tip_and_the_scenario_noise(ntcp_factory):
    from nanonisTCP.Osci2T import Osci2T

    sc = load_scenario("default")
    white, pink = sc.artifacts.white_noise, sc.artifacts.pink_noise
    with start_server_thread(seed=4, time_scale=20.0) as srv, NanonisClient(srv.host, srv.port, timeout=TIMEOUT_S) as c:
        osci = Osci2T(ntcp_factory(srv))
        osci.ChsSet(0, 30)  # current, Z
        osci.Run()
        c.z_ctrl_on_off_set(True)
        t0, dt, current, z = _traces(c)
        index = c.call("Osci2T.TimebaseGet")
        assert dt * len(current) == pytest.approx(index["timebases"][index["index"]], rel=1e-6)
        # constant current: the preamplifier's white noise (averaged over 50 samples a point)
        # in the current, the junction's 1/f noise in Z through the loop
        assert current.mean() == pytest.approx(c.z_ctrl_setpoint_get(), rel=0.01)
        assert current.std() / current.mean() == pytest.approx(white / math.sqrt(50), rel=0.5)
        assert z.mean() == pytest.approx(c.z_ctrl_z_pos_get(), abs=5e-12)
        assert z.std() == pytest.approx(pink / (2 * KAPPA_PER_NM) * 1e-9, rel=0.5)
        ntcp_t0, ntcp_dt, ntcp_a, _b = osci.DataGet(0)  # nanonisTCP reads channel A right
        assert ntcp_dt == pytest.approx(dt) and ntcp_a.mean() == pytest.approx(current.mean(), rel=0.01)

        c.call("Osci2T.OversamplSet", {"index": 5})  # one sample a point: the full white noise
        assert _traces(c)[2].std() / c.z_ctrl_setpoint_get() == pytest.approx(white, rel=0.5)

        # constant height, the lock-in modulating the bias: the bias trace carries the sine,
        # the current its A dI/dV
        c.z_ctrl_on_off_set(False)
        osci.ChsSet(0, 24)
        amplitude = 0.05
        c.call("LockIn.ModPhasFreqSet", {"modulator": 1, "frequency": 7.0})
        c.call("LockIn.ModAmpSet", {"modulator": 1, "amplitude": amplitude})
        c.call("LockIn.ModSignalSet", {"modulator": 1, "signal": 24})
        still = _traces(c)
        assert still[3] == pytest.approx(np.full(len(still[3]), c.bias_get()))  # modulator off: flat
        assert still[2].mean() == pytest.approx(c.current_get(), rel=0.05)
        c.call("LockIn.ModOnOffSet", {"modulator": 1, "on": 1})
        _t0, _dt, current, bias = _traces(c)
        assert np.ptp(bias) == pytest.approx(2 * amplitude, rel=0.05)
        assert abs(_corr(current, bias)) > 0.7

    quiet = parse_scenario({"artifacts": {}})
    with (
        start_server_thread(scenario=quiet, seed=4, time_scale=20.0) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT_S) as c,
    ):
        c.call("Osci2T.Run")
        _t0, _dt, current, z = _traces(c)
        assert np.ptp(current) == 0 and np.ptp(z) == 0  # a scenario without noise: clean traces


# ------------------------------------------------------------------ Scan.PropsGet module parameters


@pytest.mark.parametrize("release", [14573, 14718])
def test_props_get_lists_the_header_parameters_of_the_chosen_modules(release):
    from stm_live.simulators.modules import HEADER_PARAMETERS

    with (
        start_server_thread(seed=0, time_scale=20.0, nanonis_release=release) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT_S) as c,
    ):
        c.scan_props_set(modules=["Bias", "Z-Controller"])
        props = c.call("Scan.PropsGet")
    assert props["modules"] == ["Bias", "Z-Controller"]
    assert list(props["module_param_counts"]) == [3, len(HEADER_PARAMETERS["Z-Controller"])]
    bias, zctrl = props["module_params"]
    assert bias[:3] == ["Bias (V)", "Calibration (V/V)", "Offset (V)"] and set(bias[3:]) <= {""}
    assert zctrl == list(HEADER_PARAMETERS["Z-Controller"])
