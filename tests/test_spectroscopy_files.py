"""Nanonis .3ds grids and .dat spectra: round trips, nanonispy cross-reads, raw files written
from the format description, real data, partial grids and damaged files."""

import numpy as np
import pytest
from spectroscopy_files import (
    REAL_IV_HEADER_ENTRIES,
    REAL_IV_ROWS,
    grid_scene,
    nanonispy_grid,
    nanonispy_spec,
    real_iv_dat,
    write_raw_3ds,
    write_raw_dat,
)

from stm_live.io.spectroscopy import (
    SpectroscopyFileError,
    make_grid,
    make_spectrum,
    read_3ds,
    read_dat,
    split_unit,
    write_3ds,
    write_dat,
)


def _grid(measured=None, **kw):
    channels, v, params = grid_scene(**kw)
    return make_grid(
        channels,
        sweep=v,
        center_m=(1e-9, -2e-9),
        size_m=(2e-9, 1.5e-9),
        angle_deg=12.5,
        parameters=params,
        measured=measured,
        header={"Bias>Bias (V)": "-2.5E+0", "Comment": "CO tip; 4.3 K", "Lock-in>Amplitude": "10E-3"},
    )


def _assert_grids_equal(a, b):
    assert list(a.channels) == list(b.channels) and list(a.parameters) == list(b.parameters)
    for name in a.channels:
        np.testing.assert_array_equal(a.channels[name], b.channels[name])
    for name in a.parameters:
        np.testing.assert_array_equal(a.parameters[name], b.parameters[name])
    assert (a.fixed_parameters, a.sweep_signal, a.header) == (b.fixed_parameters, b.sweep_signal, b.header)
    np.testing.assert_allclose([*a.center_m, *a.size_m, a.angle_deg], [*b.center_m, *b.size_m, b.angle_deg], rtol=1e-15)


def test_grid_round_trip_and_nanonispy_reads_ours(tmp_path):
    grid = _grid()
    path = write_3ds(tmp_path / "grid.3ds", grid)
    back = read_3ds(path)
    _assert_grids_equal(grid, back)
    np.testing.assert_allclose(back.sweep, grid_scene()[1], rtol=1e-6)
    assert back.shape == (3, 4) and back.points == 16 and back.measured.all() and back.direction == "up"
    _assert_grids_equal(back, read_3ds(write_3ds(tmp_path / "again.3ds", back)))

    other = nanonispy_grid(path)  # the independent reader
    assert other.header["dim_px"] == [4, 3] and other.header["channels"] == list(grid.channels)
    assert other.header["num_parameters"] == 2 + 8 and other.header["Bias>Bias (V)"] == "-2.5E+0"
    np.testing.assert_allclose(
        [float(v) for v in other.header["pos_xy"] + other.header["size_xy"]], [1e-9, -2e-9, 2e-9, 1.5e-9], rtol=1e-6
    )
    for name, values in grid.channels.items():
        np.testing.assert_array_equal(other.signals[name], values)
    np.testing.assert_array_equal(other.signals["params"][:, :, 2], grid.parameters["X (m)"])
    np.testing.assert_array_equal(other.signals["topo"], grid.parameters["Z (m)"])
    np.testing.assert_allclose(other.signals["sweep_signal"], back.sweep, rtol=1e-6)


def test_raw_grid_reads_equal(tmp_path):
    channels, v, params = grid_scene(nx=5, ny=2, points=24, seed=3)
    grid = read_3ds(write_raw_3ds(tmp_path / "raw.3ds", channels=channels, sweep=v, parameters=params, angle_deg=-30.0))
    assert list(grid.channels) == list(channels)
    for name, values in channels.items():
        np.testing.assert_array_equal(grid.channel(name), values)
    assert grid.fixed_parameters == ("Sweep Start", "Sweep End")
    assert grid.experiment_parameters == tuple(params)
    for name, values in params.items():
        np.testing.assert_array_equal(grid.parameters[name], values)
    np.testing.assert_allclose(grid.sweep, v, rtol=1e-6)
    assert grid.center_m == (1e-9, -2e-9) and grid.size_m == (2e-9, 1.5e-9) and grid.angle_deg == -30.0
    assert grid.header["Comment"] == "CO tip, NaCl(2ML)/Cu(111)" and grid.header["Lock-in>Amplitude"] == "10E-3"
    assert grid.header["Lock-in>Modulated signal"] == "Bias (V)" and grid.header["User"] == ""
    assert "Grid dim" not in grid.header  # structure lives in the fields
    # by name without the unit; a map at one bias
    np.testing.assert_array_equal(grid.channel("LI Demod 1 X"), channels["LI Demod 1 X (A)"])
    image, at = grid.map("LI Demod 1 X", -1.2)
    k = int(np.argmin(np.abs(v + 1.2)))
    np.testing.assert_array_equal(image, channels["LI Demod 1 X (A)"][..., k])
    assert at == pytest.approx(v[k], rel=1e-6)
    with pytest.raises(SpectroscopyFileError, match=r"raw\.3ds: unknown channel 'dI/dV'; channels: Current \(A\)"):
        grid.channel("dI/dV")
    # LF line ends and no Filetype (older versions) read the same
    old = read_3ds(
        write_raw_3ds(
            tmp_path / "lf.3ds", channels=channels, sweep=v, parameters=params, newline="\n", drop=("Filetype",)
        )
    )
    np.testing.assert_array_equal(old.channels["Current (A)"], channels["Current (A)"])
    np.testing.assert_allclose(old.sweep, v, rtol=1e-6)


@pytest.mark.parametrize("fill", [None, "zero", "nan"])
def test_partial_grid(tmp_path, fill):
    channels, v, params = grid_scene(nx=4, ny=3, points=10)
    path = write_raw_3ds(
        tmp_path / "stopped.3ds", channels=channels, sweep=v, parameters=params, stop_after=6, fill=fill
    )
    grid = read_3ds(path)
    expected = np.arange(12).reshape(3, 4) < 6
    np.testing.assert_array_equal(grid.measured, expected)
    for name, values in channels.items():
        np.testing.assert_array_equal(grid.channels[name][expected], values[expected])
        assert np.isnan(grid.channels[name][~expected]).all()
    assert np.isnan(grid.parameters["Z (m)"][~expected]).all()
    np.testing.assert_allclose(grid.sweep, v, rtol=1e-6)
    # ours writes it as Nanonis leaves a stopped grid (ending after the last point) ...
    ours = write_3ds(tmp_path / "ours.3ds", grid)

    def data(p):
        raw = p.read_bytes()
        return raw[raw.index(b":HEADER_END:\r\n") + 14 :]

    written = data(path)[: len(data(ours))] if fill else data(path)
    assert data(ours) == written and len(data(ours)) == 6 * (2 + 8 + 3 * 10) * 4
    again = read_3ds(ours)
    _assert_grids_equal(grid, again)
    # ... and nanonispy reads that with zeros where nothing was measured
    other = nanonispy_grid(ours)
    np.testing.assert_array_equal(other.signals["Current (A)"][expected], channels["Current (A)"][expected])
    assert not other.signals["Current (A)"][~expected].any()


def test_partial_grid_with_a_hole_and_up_down(tmp_path):
    measured = np.ones((3, 4), bool)
    measured[1, 2] = False
    grid = _grid(measured=measured)
    back = read_3ds(write_3ds(tmp_path / "hole.3ds", grid))
    np.testing.assert_array_equal(back.measured, measured)
    _assert_grids_equal(grid, back)
    # a grid recorded top row first reads "down" from its points' positions (the frame rotated)
    channels, v, params = grid_scene()
    flipped = {k: a[::-1] for k, a in params.items()}
    down = read_3ds(write_raw_3ds(tmp_path / "down.3ds", channels=channels, sweep=v, parameters=flipped))
    assert down.direction == "down" and back.direction == "up"


def test_grid_from_the_other_hand_written_file(tmp_path):
    # tests/sxm_files.py has its own small .3ds writer (the replay tests use it): one channel, 5 parameters
    from sxm_files import write_grid_3ds

    grid = read_3ds(write_grid_3ds(tmp_path / "tiny.3ds", points=8, grid=(2, 2)))
    assert grid.shape == (2, 2) and list(grid.channels) == ["Current (A)"] and grid.measured.all()
    np.testing.assert_allclose(grid.sweep, np.linspace(-1, 1, 8))
    np.testing.assert_allclose(grid.channels["Current (A)"][1, 0], np.linspace(-1e-10, 1e-10, 8), rtol=1e-6)


@pytest.mark.parametrize(
    "damage, message",
    [
        (dict(cut_bytes=6), r"not whole float32 values \(truncated\)"),
        (dict(cut_bytes=8), r"truncated inside grid point 12 of 12 \(.* of its .* values\)"),
        (dict(drop=("Channels",)), r"header has no 'Channels' entry"),
        (dict(drop=("Points",)), r"header has no 'Points' entry"),
        (dict(replace={"Grid dim": '"4 by 3"'}), r"bad 'Grid dim' '4 by 3': expected 'NX x NY'"),
        (dict(replace={"Grid settings": "0;0;1E-9"}), r"bad 'Grid settings'"),
        (dict(replace={"# Parameters (4 byte)": "7"}), r"'# Parameters \(4 byte\)' is 7 but 2 fixed and 8 experiment"),
        (dict(replace={"Experiment size (bytes)": "100"}), r"'Experiment size \(bytes\)' 100 is not 4 x 16 points"),
        (dict(replace={"Points": "-3"}), r"bad 'Points' '-3'"),
    ],
)
def test_damaged_grid_one_clear_line(tmp_path, damage, message):
    channels, v, params = grid_scene()
    path = write_raw_3ds(tmp_path / "bad.3ds", channels=channels, sweep=v, parameters=params, **damage)
    with pytest.raises(SpectroscopyFileError, match=message) as info:
        read_3ds(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text


def test_grid_files_that_are_not_grids(tmp_path):
    (tmp_path / "scan.3ds").write_bytes(b":NANONIS_VERSION:\n2\n")
    with pytest.raises(SpectroscopyFileError, match=r"scan\.3ds: not a Nanonis \.3ds grid"):
        read_3ds(tmp_path / "scan.3ds")
    (tmp_path / "head.3ds").write_bytes(b'Grid dim="2 x 2"\r\nPoints=4\r\n')
    with pytest.raises(SpectroscopyFileError, match=r"head\.3ds: header has no :HEADER_END: line"):
        read_3ds(tmp_path / "head.3ds")
    (tmp_path / "junk.3ds").write_bytes(b'Grid dim="2 x 2"\r\nthis line has no equals sign\r\n:HEADER_END:\r\n')
    with pytest.raises(SpectroscopyFileError, match=r"junk\.3ds: header line 2 'this line has no equals sign'"):
        read_3ds(tmp_path / "junk.3ds")
    with pytest.raises(SpectroscopyFileError, match=r"missing\.3ds: cannot read \.3ds file"):
        read_3ds(tmp_path / "missing.3ds")
    channels, v, params = grid_scene()
    path = write_raw_3ds(
        tmp_path / "long.3ds", channels=channels, sweep=v, parameters=params, replace={"Grid dim": '"4 x 2"'}
    )
    with pytest.raises(SpectroscopyFileError, match=r"long\.3ds: data holds 12 points but 'Grid dim' is 4 x 2"):
        read_3ds(path)


def test_grid_writer_refuses_what_it_cannot_write(tmp_path):
    channels, v, params = grid_scene()
    with pytest.raises(SpectroscopyFileError, match=r"lack \['Z \(m\)'\]"):
        make_grid(
            channels,
            sweep=v,
            center_m=(0, 0),
            size_m=(1e-9, 1e-9),
            parameters={k: a for k, a in params.items() if k != "Z (m)"},
        )
    with pytest.raises(SpectroscopyFileError, match="sweep must be linear"):
        make_grid(channels, sweep=v**3, center_m=(0, 0), size_m=(1e-9, 1e-9), parameters=params)
    with pytest.raises(SpectroscopyFileError, match=r"empty grid: no points"):
        make_grid(
            {"Current (A)": np.zeros((0, 3, 16))},
            sweep=v,
            center_m=(0, 0),
            size_m=(1e-9, 1e-9),
            parameters={k: np.zeros((0, 3)) for k in params},
        )
    grid = _grid()
    grid.channels["Bad;name (A)"] = grid.channels["Current (A)"]
    with pytest.raises(SpectroscopyFileError, match=r"bad\.3ds: channel 'Bad;name \(A\)' may not contain"):
        write_3ds(tmp_path / "bad.3ds", grid)
    assert not (tmp_path / "bad.3ds").exists()
    grid = _grid()
    grid.header["Comment"] = "two\nlines"
    with pytest.raises(SpectroscopyFileError, match=r"header value of 'Comment'"):
        write_3ds(tmp_path / "comment.3ds", grid)


def _spectrum():
    v = np.linspace(-2.5, 2.0, 181)
    return make_spectrum(
        v,
        {
            "Current (A)": 1e-11 * np.arctan((v + 1.5) / 0.1),
            "LI Demod 1 X (A)": 1e-12 / (1 + ((v + 1.5) / 0.1) ** 2),
            "Current [bwd] (A)": np.where(v > 1.9, np.nan, 1e-11 * v),
        },
        position_m=(1.25e-9, -5e-10, 1.2e-9),
        header={"Bias Spectroscopy>Sweep Start (V)": "-2.5E+0", "Comment01": "CO tip, 5 K"},
    )


def test_spectrum_round_trip_and_nanonispy_reads_ours(tmp_path):
    spectrum = _spectrum()
    path = write_dat(tmp_path / "spec.dat", spectrum)
    back = read_dat(path)
    assert list(back.data) == list(spectrum.data) and back.header == spectrum.header
    for name, values in spectrum.data.items():
        np.testing.assert_array_equal(back.data[name], values)  # exact: written with enough digits
    assert back.sweep_signal == "Bias calc (V)" and back.channels == (
        "Current (A)",
        "LI Demod 1 X (A)",
        "Current [bwd] (A)",
    )
    assert back.experiment == "bias spectroscopy" and back.position_m == (1.25e-9, -5e-10, 1.2e-9)
    np.testing.assert_array_equal(back.channel("LI Demod 1 X"), spectrum.data["LI Demod 1 X (A)"])
    other = nanonispy_spec(path)
    assert other.header == spectrum.header
    for name, values in spectrum.data.items():
        np.testing.assert_array_equal(other.signals[name], values)
    assert path.read_bytes().count(b"\r\n") == len(spectrum.header) + 3 + 181


def test_raw_spectrum_reads_equal(tmp_path):
    v = np.linspace(1.0, -1.0, 41)  # a sweep may run downwards
    columns = {"Bias calc (V)": v, "Current (A)": 3e-11 * v**3, "LI Demod 1 X (A)": 1e-12 + 0 * v}
    spectrum = read_dat(write_raw_dat(tmp_path / "raw.dat", columns=columns))
    for name, values in columns.items():
        np.testing.assert_allclose(spectrum.data[name], values, rtol=1e-9, atol=0)
    assert spectrum.header["Bias Spectroscopy>Channels"] == "Current (A);LI Demod 1 X (A)"
    assert spectrum.header["User"] == "" and spectrum.position_m == (1.25e-9, -5e-10, 1.2e-9)
    lf = read_dat(write_raw_dat(tmp_path / "lf.dat", columns=columns, newline="\n"))
    np.testing.assert_array_equal(lf.data["Current (A)"], spectrum.data["Current (A)"])


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_real_nanonis_spectrum_reads_without_loss(tmp_path, newline):
    path = real_iv_dat(tmp_path / "i_v.dat", newline=newline)
    spectrum = read_dat(path)
    assert len(spectrum.header) == REAL_IV_HEADER_ENTRIES
    assert spectrum.experiment == "bias spectroscopy" and spectrum.sweep_signal == "Bias calc (V)"
    assert spectrum.header["Bias Spectroscopy>Num Pixel"] == "201"
    assert (
        spectrum.header[
            "Bias Spectroscopy>MultiLine Settings : Segment Start (V), Segment End (V), "
            "Settling (s), Integration (s), Steps (xn)"
        ]
        == "-1E+0,1E+0,100E-6,100E-6,256"
    )
    assert len(spectrum.channels) == 14 and all(len(a) == REAL_IV_ROWS for a in spectrum.data.values())
    assert split_unit(spectrum.channels[-1]) == ("LIY 1 omega [bwd]", "A")
    # every value and header entry as the independent reader has them (it needs CRLF)
    crlf = real_iv_dat(tmp_path / "crlf.dat")
    other = nanonispy_spec(crlf)
    assert other.header == spectrum.header and list(other.signals) == list(spectrum.data)
    for name, values in spectrum.data.items():
        np.testing.assert_array_equal(other.signals[name], values)
    again = read_dat(write_dat(tmp_path / "again.dat", spectrum))
    assert again.header == spectrum.header
    for name, values in spectrum.data.items():
        np.testing.assert_array_equal(again.data[name], values)


def test_split_unit():
    assert split_unit("Current (A)") == ("Current", "A")
    assert split_unit("Current [bwd] (A)") == ("Current [bwd]", "A")
    assert split_unit("Current (A) [filt]") == ("Current [filt]", "A")
    assert split_unit("Z-Ctrl hold") == ("Z-Ctrl hold", "")


def test_damaged_spectra_one_clear_line(tmp_path):
    v = np.linspace(-1, 1, 11)
    columns = {"Bias calc (V)": v, "Current (A)": 1e-11 * v}
    cases = {
        "cut.dat": (
            write_raw_dat(tmp_path / "cut.dat", columns=columns, cut_last_row=True),
            r"data line 30 has 1 values, expected 2 \(file truncated\?\)",
        ),  # 16 header + 3 + 11 rows
        "scan.dat": (tmp_path / "scan.dat", r"not a Nanonis spectrum file \(\.dat\): it does not start with"),
        "nodata.dat": (tmp_path / "nodata.dat", r"no \[DATA\] line \(file truncated or not a \.dat\)"),
        "nocols.dat": (tmp_path / "nocols.dat", r"no column names after \[DATA\]"),
        "norows.dat": (tmp_path / "norows.dat", r"no data rows after the column names"),
        "text.dat": (tmp_path / "text.dat", r"data line 5 holds a value that is not a number"),
        "missing.dat": (tmp_path / "missing.dat", r"cannot read \.dat file"),
    }
    head = b"Experiment\tbias spectroscopy\t\r\n"
    (tmp_path / "scan.dat").write_bytes(b":NANONIS_VERSION:\n2\n")
    (tmp_path / "nodata.dat").write_bytes(head + b"Date\t05.03.2024\t\r\n")
    (tmp_path / "nocols.dat").write_bytes(head + b"\r\n[DATA]\r\n")
    (tmp_path / "norows.dat").write_bytes(head + b"\r\n[DATA]\r\nBias calc (V)\tCurrent (A)\r\n")
    (tmp_path / "text.dat").write_bytes(head + b"\r\n[DATA]\r\nBias calc (V)\tCurrent (A)\r\n-1.0E+0\tlots\r\n")
    for name, (path, message) in cases.items():
        with pytest.raises(SpectroscopyFileError, match=message) as info:
            read_dat(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value), name
    with pytest.raises(SpectroscopyFileError, match=r"unknown channel 'Z'; channels: Bias calc \(V\), Current \(A\)"):
        read_dat(write_raw_dat(tmp_path / "ok.dat", columns=columns)).channel("Z")


def test_spectrum_writer_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(SpectroscopyFileError, match="sweep of >= 2 points"):
        make_spectrum([0.5], {"Current (A)": [1e-12]}, position_m=(0, 0, 0))
    with pytest.raises(SpectroscopyFileError, match=r"channel 'Current \(A\)' has shape \(3,\), the sweep \(2,\)"):
        make_spectrum([0.0, 1.0], {"Current (A)": [1, 2, 3]}, position_m=(0, 0, 0))
    spectrum = _spectrum()
    spectrum.header["Comment01"] = "tab\there"
    write_dat(tmp_path / "tab.dat", spectrum)  # a tab inside a value is kept (Nanonis multi-value lines)
    assert read_dat(tmp_path / "tab.dat").header["Comment01"] == "tab\there"
    spectrum.header["Comment01"] = "new\nline"
    with pytest.raises(SpectroscopyFileError, match=r"nl\.dat: header value of 'Comment01'"):
        write_dat(tmp_path / "nl.dat", spectrum)
    del spectrum.header["Experiment"]
    with pytest.raises(SpectroscopyFileError, match="needs an 'Experiment' entry"):
        write_dat(tmp_path / "noexp.dat", spectrum)


def test_simulated_grid_and_spectrum_files_read_back_equal(tmp_path):
    # what the simulator saves: a grid over a frame ("up", rotated) and a point spectrum
    from stm_live.simulators.imaging import Placement, ScanFrame, Substrate
    from stm_live.simulators.spectra import simulate

    scene = [Placement("pentacene", 0.4, -0.2, 30.0)]
    frame = ScanFrame(0.5, -0.3, 3.0, 2.0, angle_deg=25.0, pixels=8, lines=5, direction="up")
    sweep = np.linspace(-3.0, 2.5, 56)
    sim = simulate(scene, "co", frame, sweep, setpoint_A=5e-12, setpoint_bias_V=-2.5, substrate=Substrate())
    x, y = frame.grid()
    done = np.arange(40).reshape(5, 8) < 29  # stopped during the fourth row
    grid = make_grid(
        {"Current (A)": sim.current_A, "LI Demod 1 X (A)": 0.01 * sim.didv_A_per_V},
        sweep=sweep,
        center_m=(0.5e-9, -0.3e-9),
        size_m=(3e-9, 2e-9),
        angle_deg=25.0,
        parameters={"X (m)": x * 1e-9, "Y (m)": y * 1e-9, "Z (m)": sim.z_nm * 1e-9},
        measured=done,
        header={"Bias>Bias (V)": "-2.5E+0", "Z-Controller>Setpoint": "5E-12"},
    )
    back = read_3ds(write_3ds(tmp_path / "Grid Spectroscopy001.3ds", grid))
    _assert_grids_equal(grid, back)
    np.testing.assert_array_equal(back.measured, done)
    assert back.direction == "up"
    np.testing.assert_allclose(back.sweep, sweep, rtol=1e-6)
    np.testing.assert_allclose(back.channel("Current")[done], sim.current_A[done], rtol=1e-6)

    k = 17
    point = (float(x.flat[k]), float(y.flat[k]))
    one = simulate(scene, "co", point, sweep, setpoint_A=5e-12, setpoint_bias_V=-2.5, substrate=Substrate())
    spectrum = make_spectrum(
        sweep,
        {"Current (A)": one.current_A, "LI Demod 1 X (A)": 0.01 * one.didv_A_per_V},
        position_m=(point[0] * 1e-9, point[1] * 1e-9, float(one.z_nm) * 1e-9),
    )
    again = read_dat(write_dat(tmp_path / "Bias-Spectroscopy001.dat", spectrum))
    for name, values in spectrum.data.items():
        np.testing.assert_array_equal(again.data[name], values)
    # the point spectrum is the grid's spectrum at that point
    np.testing.assert_allclose(
        again.channel("LI Demod 1 X"), back.channel("LI Demod 1 X").reshape(40, -1)[k], rtol=1e-5
    )
