"""Spectroscopy through the simulated controller, over TCP: BiasSpectr sweeps, the lock-in
channel in the scan buffer, Pattern grids saved as .3ds, grid replay, the ophyd device and
the bias_series / grid_spectroscopy plans through a real RunEngine."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stm_live.devices.client import NanonisClient, NanonisError
from stm_live.devices.spectroscopy import BiasSpectroscopy, grid_points
from stm_live.devices.stm import NanonisSTM
from stm_live.io.spectroscopy import read_3ds, read_dat
from stm_live.plans import bias_series, grid_spectroscopy
from stm_live.simulators.imaging import CURRENT_SCALE_A_PER_V, Placement, ScanFrame, Substrate, constant_height_image
from stm_live.simulators.scenario import ScenarioError, parse_scenario
from stm_live.simulators.server import start_server_thread
from stm_live.simulators.spectra import LEVEL_WEIGHT_V, SpectralModel, lineshape, simulate
from stm_live.simulators.tip import tip_preset
from stm_live.store import JournalWriter, read_journal

pytestmark = pytest.mark.timeout(180)

HOMO_V, LUMO_V = -2.1, 1.6  # the scenario's own level energies (not the Hückel defaults)
SCENE = {
    "name": "spectroscopy",
    "molecules": [
        {
            "molecule": "pentacene",
            "x_nm": 0.0,
            "y_nm": 0.0,
            "rotation_deg": 0.0,
            "energies": {"HOMO": HOMO_V, "LUMO": LUMO_V},
        }
    ],
    "tip": "co",  # no substrate: none at constant height, a flat one under feedback (as imaging)
    "artifacts": {},  # noise-free: spectra are compared with the physics exactly
    "spectra": {"width_V": 0.1, "shape": "gaussian", "levels_each_side": 1},
    "frame": {"width_nm": 4.0, "height_nm": 4.0, "pixels": 32, "lines": 32},
    "bias_V": -0.5,
    "setpoint_A": 5e-12,
    "z_nm": 0.5,
    "z_controller": True,
}
MODEL = SpectralModel(width_V=0.1, shape="gaussian", levels_each_side=1)
START, END, STEP = -3.0, 2.5, 0.02
POINTS = int(round((END - START) / STEP)) + 1
TIMEOUT = 20.0


def _scenario(**changes):
    return parse_scenario({**SCENE, **changes}, source="spectroscopy.yaml")


@pytest.fixture()
def server(tmp_path):
    (tmp_path / "session").mkdir()
    srv = start_server_thread(scenario=_scenario(), seed=0, time_scale=200.0, save_dir=tmp_path / "session")
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with NanonisClient(server.host, server.port, timeout=TIMEOUT) as c:
        yield c


def _sweep(client, *, channels=(0, 30, 35), points=POINTS, start=START, end=END, backward=False, sweeps=1):
    client.call("BiasSpectr.ChsSet", (list(channels),))
    client.call("BiasSpectr.LimitsSet", (start, end))
    client.call("BiasSpectr.PropsSet", (0, sweeps, 1 if backward else 2, points, 0.0, 1, 2))
    client.call("BiasSpectr.AdvPropsSet", (0, 0, 0, 1))  # the lock-in runs during the sweep


def _start(client) -> dict[str, np.ndarray]:
    reply = client.call("BiasSpectr.Start", (1, ""), read_timeout=60.0)
    return dict(zip(reply["channel_names"], reply["data"])), reply["params"]


def _peaks(v, didv):
    """Biases of the local maxima standing above 1 % of the spectrum's range."""
    floor = didv.min() + 0.01 * np.ptp(didv)
    inner = (didv[1:-1] > didv[:-2]) & (didv[1:-1] >= didv[2:]) & (didv[1:-1] > floor)
    return v[1:-1][inner]


def _bright_spot():
    """(x, y) m where both the HOMO and the LUMO image are bright (neither on a nodal plane)."""
    frame = ScanFrame(0.0, 0.0, 3.0, 2.0, pixels=60, lines=40)
    images = [
        constant_height_image(Placement("pentacene", orbital=label), frame, "co", z_nm=0.5, bias_V=1.0)
        for label in ("HOMO", "LUMO")
    ]
    both = np.minimum(*(im / im.max() for im in images))
    k = np.unravel_index(np.argmax(both), both.shape)
    x, y = frame.grid()
    return x[k] * 1e-9, y[k] * 1e-9


def test_spectrum_over_a_molecule_peaks_at_the_scenario_levels_and_bare_substrate_is_flat(server, client):
    _sweep(client)
    client.folme_xy_pos_set(*_bright_spot())
    data, params = _start(client)
    assert list(data) == ["Bias calc (V)", "Current (A)", "Z (m)", "LI Demod 1 X (A)"]
    v, didv = data["Bias calc (V)"].astype(np.float64), data["LI Demod 1 X (A)"].astype(np.float64)
    assert len(v) == POINTS and v[0] == START and v[-1] == pytest.approx(END)
    found = _peaks(v, didv)
    for level in (HOMO_V, LUMO_V):  # each level has its peak, within the sweep's step
        assert np.min(np.abs(found - level)) <= STEP, (level, found)
    for peak in found:  # and there is no peak that is not a level
        assert min(abs(peak - HOMO_V), abs(peak - LUMO_V)) <= STEP, (peak, found)
    # the loop was opened at the present bias and setpoint: |I(-0.5 V)| is the setpoint (I has the bias sign)
    k = int(np.argmin(np.abs(v + 0.5)))
    assert data["Current (A)"][k] == pytest.approx(-5e-12, rel=2e-3)
    z = data["Z (m)"]
    assert np.ptp(z) == 0 and params[4] == pytest.approx(z[0], rel=1e-6)  # fixed 2, then X, Y, Z

    # saved as Nanonis names it, the same numbers
    saved = read_dat(server.controller.modules.bs["last_path"])
    assert saved.path.name == "Bias-Spectroscopy001.dat" and saved.sweep_signal == "Bias calc (V)"
    for name in ("Current (A)", "LI Demod 1 X (A)"):
        np.testing.assert_allclose(saved.channel(name), data[name], rtol=1e-6)

    # bare substrate, far from the molecule: featureless
    client.folme_xy_pos_set(6e-9, -6e-9)
    data, _ = _start(client)
    flat = data["LI Demod 1 X (A)"].astype(np.float64)
    # no peak, no step: what varies is float32 rounding, far below the molecule's peaks
    assert flat.min() > 0 and np.ptp(flat) <= 1e-5 * flat.max() and np.ptp(flat) < 1e-5 * np.ptp(didv)
    assert (server.controller.save_dir / "Bias-Spectroscopy002.dat").is_file()


def test_sweep_timing_averaging_and_backward_sweep(tmp_path):
    with (
        start_server_thread(scenario=_scenario(artifacts={"white_noise": 0.05}), seed=3, time_scale=10.0) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c,
    ):
        _sweep(c, channels=(0, 35), points=41, start=-2.5, end=-1.7, backward=True)
        c.call("BiasSpectr.TimingSet", (0.1, 0.0, 0.05, 0.0, 0.01, 0.04, 0.05, 0.1))  # 50 ms a point
        c.folme_xy_pos_set(*_bright_spot())
        # duration: Z averaging 0.1 + 1st settling 0.05 + 2 x 41 x 0.05 + end 0.05 + Z control 0.1 = 4.4 s
        t0 = time.monotonic()
        data, _ = _start(c)
        waited = time.monotonic() - t0
        assert 4.4 / 10.0 * 0.9 <= waited < 4.4 / 10.0 + 5.0
        assert list(data)[1:] == ["Current (A)", "LI Demod 1 X (A)", "Current [bwd] (A)", "LI Demod 1 X [bwd] (A)"]
        # noise averages down with the number of sweeps: two measurements differ less
        spreads = []
        for sweeps in (1, 16):
            _sweep(c, channels=(35,), points=41, start=-2.5, end=-1.7, sweeps=sweeps)
            c.call("BiasSpectr.TimingSet", (0.0, 0.0, 0.0, 0.0, 0.0, 1e-4, 0.0, 0.0))
            a, b = (_start(c)[0]["LI Demod 1 X (A)"].astype(np.float64) for _ in range(2))
            spreads.append(np.std(a - b))
        assert spreads[1] < spreads[0] / 2.5, spreads  # 1/sqrt(16) = 1/4


def test_a_running_sweep_leaves_the_other_connections_served_and_stop_ends_it(server, client):
    """The sweep's duration is waited out off the controller thread: another connection sees
    BiasSpectr.StatusGet report it running, and BiasSpectr.Stop ends the wait early."""
    import threading

    _sweep(client, channels=(0,), points=41, start=-2.5, end=-1.7)
    client.call("BiasSpectr.TimingSet", (0.0, 0.0, 0.0, 0.0, 0.0, 100.0, 0.0, 0.0))  # 41 x 100 s simulated
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (_start(client), done.set()), daemon=True)
    t0 = time.monotonic()
    waiter.start()
    with NanonisClient(server.host, server.port, timeout=TIMEOUT) as other:
        deadline = time.monotonic() + TIMEOUT
        while other.call("BiasSpectr.StatusGet")["running"] != 1:
            assert time.monotonic() < deadline, "the sweep never showed as running"
            time.sleep(0.01)
        assert not done.is_set()
        other.call("BiasSpectr.Stop")
    assert done.wait(TIMEOUT)
    assert time.monotonic() - t0 < 4100.0 / 200.0  # ended before the sweep's 20.5 s at time scale 200


def test_lockin_map_at_the_homo_is_the_homo_image(server, client):
    """Constant height at the HOMO resonance: LI Demod 1 X = A dI/dV, and with a Gaussian
    lineshape (the LUMO 3.7 V away contributes nothing) and no substrate dI/dV is the
    HOMO's own image, to float32 precision (1e-5 of its peak). At constant current the
    channel is dI/dV at the scan's own Z image (a flat substrate under feedback)."""
    amplitude = 0.02
    client.call("LockIn.ModOnOffSet", (1, 1))
    client.call("LockIn.ModAmpSet", (1, amplitude))
    client.scan_frame_set(0.0, 0.0, 4e-9, 4e-9, 0.0)
    client.scan_buffer_set([0, 30, 35], 32, 32)
    frame = ScanFrame(0.0, 0.0, 4.0, 4.0, pixels=32, lines=32)
    tip = tip_preset("co")

    def scan():
        client.scan_action("start", "down")
        timed_out, _path = client.scan_wait_end_of_scan(TIMEOUT)
        assert not timed_out
        return (client.scan_frame_data_grab(i, forward=True).data.astype(np.float64) for i in (30, 35))

    client.bias_set(HOMO_V)
    client.z_ctrl_on_off_set(False)
    client.z_ctrl_z_pos_set(0.5e-9)
    _, li = scan()
    homo = constant_height_image([Placement("pentacene", orbital="HOMO")], frame, tip, z_nm=0.5, bias_V=HOMO_V)
    reference = homo / (CURRENT_SCALE_A_PER_V * abs(HOMO_V))  # the HOMO's tunnelling signal S(r)
    on_resonance = amplitude * CURRENT_SCALE_A_PER_V * LEVEL_WEIGHT_V * lineshape(0.0, MODEL)
    deviation = np.max(np.abs(li / on_resonance - reference)) / reference.max()
    assert deviation < 1e-5, deviation

    client.bias_set(-1.8)  # between resonances, under feedback: the tail of the HOMO at the scan's heights
    client.z_ctrl_on_off_set(True)
    z, li = scan()
    expected = (
        amplitude
        * simulate(
            [Placement("pentacene")], tip, frame, -1.8, z_nm=z * 1e9, model=MODEL, substrate=Substrate()
        ).didv_A_per_V
    )
    np.testing.assert_allclose(li, expected, rtol=1e-4)
    assert client.signals_val_get(35) > 0  # the point value is there too


def _journal(RE, tmp_path):
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    journal = JournalWriter(tmp_path / "data")
    RE.subscribe(journal)
    return docs, journal


def test_bias_series_frames_each_with_its_live_reconstruction(RE, server, tmp_path):
    from stm_live.callbacks.live import LiveReconstruction

    class Blur:  # a cheap stand-in network: the machinery, not STM-Net, is under test
        def reconstruct(self, image, pixel_size_nm, line_spacing_nm=None):
            img = np.asarray(image, np.float32)
            return np.where(np.isfinite(img), img / np.nanmax(np.abs(img)), np.nan).astype(np.float32)

    docs, journal = _journal(RE, tmp_path)
    derived = []
    live = LiveReconstruction(Blur(), emit=lambda n, d: derived.append((n, d)))
    RE.subscribe(live)
    stm = NanonisSTM(server.host, server.port, name="stm")
    stm.lines.line_timeout = 30.0
    frame = (0.0, 0.0, 4e-9, 4e-9, 0.0)
    try:
        RE(
            bias_series(
                stm,
                [HOMO_V, LUMO_V],
                frame=frame,
                pixels=32,
                lines=8,
                channels=["Current", "Z"],
                z_controller="constant_height",
                md={"sample": "pentacene"},
            )
        )
        assert live.flush(60)
        with NanonisClient(server.host, server.port, timeout=TIMEOUT) as c:  # the lock-in's own map
            c.call("LockIn.ModOnOffSet", (1, 1))
        RE(
            bias_series(
                stm,
                [HOMO_V],
                frame=frame,
                pixels=32,
                lines=8,
                channels={"Current": 0, "LI Demod 1 X": 35},
                source_channel="LI Demod 1 X",
                z_controller="constant_height",
            )
        )
    finally:
        live.close()
        stm.stop_scan()
        stm.close()
    starts = [d for n, d in docs if n == "start"]
    assert [s["stm_live"]["bias_V"] for s in starts] == pytest.approx([HOMO_V, LUMO_V, HOMO_V], abs=1e-6)
    assert [s["bias_series_index"] for s in starts] == [0, 1, 0] and starts[0]["sample"] == "pentacene"
    for start in starts:  # every line of every frame journaled
        lines = [d["data"]["stm_line_index"] for n, d in read_journal(journal.path_for(start["uid"])) if n == "event"]
        assert sorted(lines) == list(range(8))
    # the first two frames each have their live reconstruction, of the frame's own channel
    recon = {d["parent_uid"]: d["reconstruction"] for n, d in derived if n == "start" and "reconstruction" in d}
    for start in starts[:2]:
        assert recon[start["uid"]]["source_channel"] == "Current"
    assert "source_channel" not in starts[0]["stm_live"]
    # the lock-in frame names its chosen channel for the live reconstruction, and holds the map
    assert starts[2]["stm_live"]["source_channel"] == "LI Demod 1 X"
    events = [d for n, d in read_journal(journal.path_for(starts[2]["uid"])) if n == "event"]
    li = np.array([e["data"]["stm_li_demod_1_x_fwd"] for e in events])
    assert np.isfinite(li).all() and li.max() > 0
    with pytest.raises(ValueError, match="source_channel 'Z' is not among the recorded channels"):
        RE(bias_series(stm, [1.0], frame=frame, pixels=32, lines=8, channels=["Current"], source_channel="Z"))


def test_grid_spectroscopy_through_the_device_matches_the_simulators_grid_and_its_3ds(RE, server, client, tmp_path):
    """grid_spectroscopy (RunEngine -> BiasSpectroscopy -> TCP) visits the points a Nanonis
    grid experiment measures, in its order: every point is journaled, and each sweep equals
    the one the simulator's own Pattern grid saved in its .3ds, which reads back equal."""
    from spectroscopy_files import nanonispy_grid

    docs, journal = _journal(RE, tmp_path)
    stm = NanonisSTM(server.host, server.port, name="stm")
    spec = BiasSpectroscopy(stm=stm, name="spec")
    frame, shape, sweep = (0.2e-9, -0.1e-9, 3e-9, 2e-9, 10.0), (4, 3), (-2.5, 2.0, 46)
    client.call("BiasSpectr.AdvPropsSet", (0, 0, 0, 1))
    try:
        (uid,) = RE(
            grid_spectroscopy(
                stm, spec, frame=frame, shape=shape, sweep=sweep, channels=["Current", "LI Demod 1 X"], backward=True
            )
        )
    finally:
        stm.close()
    start = docs[0][1]
    assert start["plan_name"] == "grid_spectroscopy" and start["spectroscopy"]["shape"] == [4, 3]
    events = [d for n, d in read_journal(journal.path_for(uid)) if n == "event"]
    assert [e["data"]["spec_point_index"] for e in events] == list(range(12))
    positions = grid_points(frame, shape).reshape(-1, 2)
    got_xy = np.array([[e["data"]["spec_x"], e["data"]["spec_y"]] for e in events])
    np.testing.assert_allclose(got_xy, positions, rtol=1e-6, atol=1e-15)
    assert set(events[0]["data"]) >= {
        "spec_bias",
        "spec_current_fwd",
        "spec_current_bwd",
        "spec_li_demod_1_x_fwd",
        "spec_li_demod_1_x_bwd",
        "spec_z",
    }

    # the same grid as a Pattern experiment of the simulator: a .3ds in its session folder
    client.call("Pattern.GridSet", (1, 4, 3, 0, *frame))
    client.call("Pattern.ExpOpen")
    client.call("Pattern.ExpStart", (1,))
    deadline = time.monotonic() + 60
    while client.call("Pattern.ExpStatusGet")["running"]:
        assert time.monotonic() < deadline, "grid experiment did not end"
        time.sleep(0.05)
    mods = server.controller.modules
    grid = read_3ds(mods.last_experiment_path)
    assert grid.path.name == "Grid001.3ds" and grid.shape == (3, 4) and grid.direction == "up"
    assert list(grid.channels) == ["Current (A)", "LI Demod 1 X (A)", "Current [bwd] (A)", "LI Demod 1 X [bwd] (A)"]
    np.testing.assert_allclose(grid.sweep, np.linspace(*sweep[:2], 46), atol=1e-6)
    for k, event in enumerate(events):
        iy, ix = divmod(k, 4)
        for name, key in (("Current (A)", "spec_current_fwd"), ("LI Demod 1 X [bwd] (A)", "spec_li_demod_1_x_bwd")):
            # the plan's single-point feedback and the grid rows' converge to 1e-5 nm: 2 kappa dz < 1e-3
            np.testing.assert_allclose(grid.channels[name][iy, ix], event["data"][key], rtol=1e-3)
        np.testing.assert_allclose(
            [grid.parameter("X")[iy, ix], grid.parameter("Y")[iy, ix]], positions[k], rtol=1e-6, atol=1e-15
        )
    # what the simulator wrote reads back equal, by our reader and by an independent one
    written = mods.last_experiment_grid
    for name, values in written.channels.items():
        np.testing.assert_array_equal(grid.channels[name], values)
    for name, values in written.parameters.items():
        np.testing.assert_array_equal(grid.parameters[name], values)
    assert {k: grid.header[k] for k in written.header} == written.header
    other = nanonispy_grid(mods.last_experiment_path)
    np.testing.assert_array_equal(np.asarray(other.signals["Current (A)"]), grid.channels["Current (A)"])


def test_the_device_composes_into_the_microscope(RE, server, client, tmp_path):
    """As a component of the microscope device (``NanonisSTM.spectroscopy``), the device
    speaks through its client, and grid_spectroscopy finds it there."""
    docs, journal = _journal(RE, tmp_path)
    stm = NanonisSTM(server.host, server.port, name="stm")
    try:
        assert stm.spectroscopy.client is stm.client and stm.spectroscopy.root is stm
        stm.spectroscopy.points.put(24)
        assert client.call("BiasSpectr.PropsGet")["points"] == 24
        (uid,) = RE(grid_spectroscopy(stm, points=[(0.0, 0.0), (1e-9, 0.0)], channels=["Current"]))
        assert not any(k.startswith("stm_spectroscopy") for k in stm.read())  # omitted from its readings
    finally:
        stm.close()
    events = [d for n, d in read_journal(journal.path_for(uid)) if n == "event"]
    assert [np.shape(e["data"]["stm_spectroscopy_current_fwd"]) for e in events] == [(24,), (24,)]


def test_a_stopped_grid_saves_the_points_done(client, server):
    client.call("BiasSpectr.PropsSet", (0, 1, 2, 32, 0.0, 1, 2))
    client.call("BiasSpectr.TimingSet", (0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0))  # 64 s a point: 0.32 s real
    client.call("Pattern.GridSet", (1, 5, 5, 0, 0.0, 0.0, 2e-9, 2e-9, 0.0))
    client.call("Pattern.ExpOpen")
    client.call("Pattern.ExpStart", (1,))
    with pytest.raises(NanonisError, match="Pattern experiment runs"):
        client.folme_xy_pos_set(0.0, 0.0)
    ctrl = server.controller

    def done():
        with ctrl._lock:  # the controller thread harvests the measured points
            exp = ctrl.modules.experiment
            return 25 if exp is None else exp.points_done(ctrl.sim_time_s)

    deadline = time.monotonic() + 60
    while done() < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.call("Pattern.ExpStop")
    assert not client.call("Pattern.ExpStatusGet")["running"]
    grid = read_3ds(server.controller.modules.last_experiment_path)
    done = int(grid.measured.sum())
    assert 3 <= done < 25 and grid.measured.reshape(-1)[:done].all()
    x, y = client.folme_xy_pos_get()  # the tip stays at the last point measured
    iy, ix = divmod(done - 1, 5)
    assert (x, y) == pytest.approx((grid.parameter("X")[iy, ix], grid.parameter("Y")[iy, ix]), abs=1e-15)


def _raw_grid(tmp_path, **kw):
    from spectroscopy_files import grid_scene, write_raw_3ds

    channels, sweep, params = grid_scene(nx=4, ny=3, points=16)
    return write_raw_3ds(tmp_path / "recorded.3ds", channels=channels, sweep=sweep, parameters=params, **kw)


def test_replay_of_a_3ds_answers_the_recorded_sweeps(tmp_path):
    from nanonisTCP import nanonisTCP
    from nanonisTCP.BiasSpectr import BiasSpectr

    path = _raw_grid(tmp_path, stop_after=7)  # Nanonis' layout by an independent writer; stopped early
    grid = read_3ds(path)
    with (
        start_server_thread(replay=path, time_scale=100.0) as srv,
        NanonisClient(srv.host, srv.port, timeout=TIMEOUT) as c,
    ):
        assert c.call("BiasSpectr.ChsGet")["channel_names"] == ["Current (A)", "LI Demod 1 X (A)"]
        for k in range(7):
            iy, ix = divmod(k, 4)
            c.folme_xy_pos_set(float(grid.parameter("X")[iy, ix]), float(grid.parameter("Y")[iy, ix]))
            data, params = _start(c)
            np.testing.assert_allclose(data["Bias calc (V)"], grid.sweep, rtol=1e-6)
            for name, values in grid.channels.items():
                assert data[name].tobytes() == values[iy, ix].tobytes(), (k, name)
            assert params[2] == grid.parameter("X")[iy, ix]
        # the first point never measured: where the grid's geometry puts it (as grid_points does)
        where = grid_points((*grid.center_m, *grid.size_m, grid.angle_deg), (4, 3))[1, 3]
        c.folme_xy_pos_set(*map(float, where))
        with pytest.raises(NanonisError, match=r"grid point \(3, 1\) at \(1.75, -2\) nm was not measured"):
            _start(c)
        with pytest.raises(NanonisError, match="no grid point under the tip"):
            c.folme_xy_pos_set(5e-9, 5e-9)
            _start(c)
        with pytest.raises(NanonisError, match="a grid: there is no scan to replay"):
            c.scan_action("start")
        # an independent client reads the same sweep (nanonisTCP's BiasSpectr module class)
        c.folme_xy_pos_set(float(grid.parameter("X")[0, 1]), float(grid.parameter("Y")[0, 1]))
        peer = nanonisTCP(srv.host, srv.port)
        peer.s.settimeout(TIMEOUT)
        try:
            out = BiasSpectr(peer).Start(get_data=1)
        finally:
            peer.close_connection()
        np.testing.assert_array_equal(out["data_dict"]["LI Demod 1 X (A)"], grid.channels["LI Demod 1 X (A)"][0, 1])


def test_stm_live_replay_of_a_3ds_runs_the_grid_through_the_pipeline(tmp_path):
    from rich.console import Console

    from stm_live.app.replay import run_replay

    whole = _raw_grid(tmp_path)
    (result,) = run_replay(
        [whole],
        time_scale=200.0,
        data_dir=tmp_path / "data",
        out=tmp_path / "out",
        console=Console(width=300, file=open(tmp_path / "console.txt", "w")),
    )
    assert result.status == "ok", result.message
    assert result.lines == 12 and "replayed 12 grid points x 16 sweep points, 3 channels, bit for bit" in result.message
    events = [d for n, d in read_journal(result.journal) if n == "event"]
    assert len(events) == 12


def test_scenario_places_levels_by_molecule_and_by_placement():
    scenario = _scenario(
        molecules=[
            {"molecule": "pentacene", "x_nm": -2.0},
            {"molecule": "pentacene", "x_nm": 2.0, "energies": {"HOMO": -1.9}},
        ],
        spectra={"width_V": 0.15, "energies": {"pentacene": {"LUMO": 1.2}}},
    )
    model = scenario.spectra
    assert model.width_V == 0.15 and model.shape == "lorentzian"  # the section's defaults otherwise
    levels = [{label: v for label, v, _ in model.placement_levels(p, i)} for i, p in enumerate(scenario.molecules)]
    assert levels[0]["LUMO"] == levels[1]["LUMO"] == 1.2  # by molecule name
    assert levels[1]["HOMO"] == -1.9 and levels[0]["HOMO"] == pytest.approx(-2.4, abs=0.02)  # by placement


def test_bad_input_gets_one_clear_line(RE, server, client):
    stm = NanonisSTM(server.host, server.port, name="stm")
    spec = BiasSpectroscopy(stm=stm, name="spec")
    try:
        problems = []
        for plan, match in (
            (grid_spectroscopy(stm, spec, points=[]), "empty grid: no points to measure"),
            (grid_spectroscopy(stm, spec, frame=(0, 0, 1e-9, 1e-9), shape=(0, 3)), r"empty grid: 0 x 3 points"),
            (
                grid_spectroscopy(stm, spec, points=[(0, 0)], sweep=(-1, 1, 1)),
                "a bias sweep needs at least 2 points, got 1",
            ),
            (
                grid_spectroscopy(stm, spec, points=[(0, 0)], channels=["Current", "Frequency drift"]),
                r"unknown channel 'Frequency drift'; the controller's signals include Current \(A\)",
            ),
        ):
            with pytest.raises(ValueError, match=match) as info:
                RE(plan)
            problems.append(str(info.value))
        with pytest.raises(ValueError, match="a bias sweep needs at least 2 points, got 1"):
            spec.points.put(1)
    finally:
        stm.close()
    # the controller's own answers: one line each
    client.call("BiasSpectr.PropsSet", (0, 0, 0, 1, 0.0, 0, 0))
    with pytest.raises(NanonisError, match=r"a bias sweep needs at least 2 points, got 1") as err:
        _start(client)
    problems.append(str(err.value))
    client.call("Pattern.CloudSet", (1, np.zeros(0, np.float32), np.zeros(0, np.float32)))
    client.call("BiasSpectr.PropsSet", (0, 0, 0, 16, 0.0, 0, 0))
    client.call("Pattern.ExpOpen")
    with pytest.raises(NanonisError, match="empty pattern: the point cloud has no points") as err:
        client.call("Pattern.ExpStart", (3,))
    problems.append(str(err.value))
    for bad, match in (
        ({"spectra": {"width_V": -0.1}}, "spectroscopy.yaml: spectra.width_V: must be > 0.0"),
        (
            {"spectra": {"energies": {"pentacene": {"HOMO-40": -4.0}}}},
            r"spectra.energies.pentacene.HOMO-40: orbital 'HOMO-40' out of range",
        ),
        ({"molecules": [{"molecule": "h2pc", "energy_V": 1.0}]}, r"molecules\[0\].energy_V: only for a cube"),
    ):
        with pytest.raises(ScenarioError, match=match) as err:
            _scenario(**bad)
        problems.append(str(err.value))
    assert all("\n" not in p for p in problems), problems
