"""Nanonis .sxm read/write: orientation, round trip, nanonispy compatibility, bad files."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from stm_live.io.sxm import SxmError, SxmScan, read_sxm, scan_from_frames, write_sxm


def _frames(lines=6, pixels=8, scanned=4):
    """Asymmetric frames (a ramp), so any flip or transpose changes the values."""
    rng = np.random.default_rng(1)
    ramp = np.arange(lines * pixels, dtype=np.float32).reshape(lines, pixels)
    z = ramp * 1e-11
    cur = (rng.random((lines, pixels)) * 1e-10).astype(np.float32)
    z[scanned:] = np.nan
    cur[scanned:] = np.nan
    return {"Z": {"forward": z, "backward": z + 1e-12}, "Current": {"forward": cur, "backward": cur * 0.5}}


def _scan(**kw):
    args = dict(
        units={"Z": "m", "Current": "A"},
        center_x_m=1.5e-9,
        center_y_m=-2.25e-9,
        width_m=2e-8,
        height_m=1.5e-8,
        angle_deg=12.5,
        direction="up",
        bias_V=-0.1,
        setpoint_A=1e-10,
        acq_time_s=12.0,
        comment="stm-live test",
        signal_indexes={"Z": 30, "Current": 0},
        recorded_at=dt.datetime(2026, 11, 24, 12, 0, 0),
    )
    args.update(kw)
    return scan_from_frames(_frames(), **args)


def test_round_trip_keeps_arrays_geometry_and_metadata(tmp_path):
    scan = _scan()
    path = write_sxm(tmp_path / "a.sxm", scan)
    back = read_sxm(path)
    assert (back.pixels, back.lines) == (8, 6)
    assert back.range_m == (2e-8, 1.5e-8) and back.offset_m == (1.5e-9, -2.25e-9)
    assert back.angle_deg == 12.5 and back.direction == "up" and back.bias_V == -0.1
    assert back.units == {"Z": "m", "Current": "A"}
    assert back.setpoint_A == pytest.approx(1e-10) and back.feedback_on is True
    assert back.comment == "stm-live test"
    assert back.line_time_s == pytest.approx(12.0 / 6)
    assert back.pixel_size_nm == pytest.approx(2.5)
    assert back.lines_scanned == 4
    for name, dirs in scan.channels.items():
        for d, arr in dirs.items():
            got = back.channels[name][d]
            assert got.dtype == np.float32 and got.shape == (6, 8)
            np.testing.assert_array_equal(got, arr)  # NaN rows included
    # DATA_INFO keeps the signal indexes; writing the read scan again is byte-identical.
    assert "\t30\tZ\tm\tboth" in back.header["DATA_INFO"]
    again = write_sxm(tmp_path / "b.sxm", back)
    assert again.read_bytes() == path.read_bytes()


def test_file_layout_is_acquisition_order_with_mirrored_backward(tmp_path):
    scan = _scan()
    raw = write_sxm(tmp_path / "a.sxm", scan).read_bytes()
    head, data = raw.split(b"\x1a\x04", 1)
    assert head.startswith(b":NANONIS_VERSION:\n2\n")
    assert head.endswith(b"\n\n:SCANIT_END:\n\n\n")
    blocks = np.frombuffer(data, dtype=">f4").reshape(4, 6, 8)
    z = scan.channels["Z"]
    np.testing.assert_array_equal(blocks[0], z["forward"])  # row 0 = first line
    np.testing.assert_array_equal(blocks[1], z["backward"][:, ::-1])  # stored mirrored


def test_nanonispy_reads_our_files(tmp_path, monkeypatch):
    read = pytest.importorskip("nanonispy.read")
    # nanonispy 1.1 still uses the np.float / np.int aliases that numpy 1.24 removed.
    monkeypatch.setattr(np, "float", float, raising=False)
    monkeypatch.setattr(np, "int", int, raising=False)
    scan = _scan()
    path = write_sxm(tmp_path / "a.sxm", scan)
    theirs = read.Scan(str(path))
    assert list(theirs.header["scan_pixels"]) == [8, 6]
    np.testing.assert_allclose(theirs.header["scan_range"], [2e-8, 1.5e-8])
    np.testing.assert_allclose(theirs.header["scan_offset"], [1.5e-9, -2.25e-9])
    assert theirs.header["bias"] == -0.1 and theirs.header["scan_dir"] == "up"
    assert theirs.header["data_info"]["Name"] == ("Z", "Current")
    for name in ("Z", "Current"):
        # nanonispy returns file order: forward as is, backward still mirrored.
        np.testing.assert_array_equal(theirs.signals[name]["forward"], scan.channels[name]["forward"])
        np.testing.assert_array_equal(theirs.signals[name]["backward"], scan.channels[name]["backward"][:, ::-1])


def test_unknown_header_keys_and_single_direction_channels_round_trip(tmp_path):
    scan = _scan()
    scan.header["Bias>Calibration (V/V)"] = "1E+0"
    scan.header["Scan>channels"] = "Current (A);Z (m)"
    scan.channels["Current"].pop("backward")
    back = read_sxm(write_sxm(tmp_path / "a.sxm", scan))
    assert back.header["Bias>Calibration (V/V)"] == "1E+0"
    assert back.header["Scan>channels"] == "Current (A);Z (m)"
    assert set(back.channels["Current"]) == {"forward"}
    assert "\t0\tCurrent\tA\tforward" in back.header["DATA_INFO"]
    np.testing.assert_array_equal(back.image("Current"), scan.channels["Current"]["forward"])
    with pytest.raises(KeyError, match="no 'backward' data"):
        back.image("Current", "backward")


def test_plain_dataclass_construction_as_other_parts_use_it(tmp_path):
    img = np.ones((3, 5), np.float32)
    scan = SxmScan(
        header={"COMMENT": "run x"},
        channels={"Z": {"forward": img}},
        pixels=5,
        lines=3,
        range_m=(1e-8, 6e-9),
        offset_m=(0.0, 0.0),
        angle_deg=0.0,
        direction="down",
        bias_V=0.5,
        units={"Z": "m"},
    )
    back = read_sxm(write_sxm(tmp_path / "p.sxm", scan))
    assert back.comment == "run x" and back.bias_V == 0.5
    np.testing.assert_array_equal(back.image("Z"), img)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b.replace(b":SCANIT_END:", b":SCANIT_XXX:"), "no :SCANIT_END:"),
        (lambda b: b.replace(b"\x1a\x04", b"\x00\x00", 1), "missing the"),
        (lambda b: b[:-10], "file truncated"),
        (lambda b: b.replace(b"         8         6", b"         8       abc"), "bad SCAN_PIXELS"),
        (lambda b: b.replace(b"         8         6", b"         8         9"), "header promises"),
        (lambda b: b"hello" + b, "not a Nanonis .sxm"),
    ],
)
def test_damaged_files_raise_sxm_error_naming_file_and_problem(tmp_path, damage, message):
    good = write_sxm(tmp_path / "good.sxm", _scan()).read_bytes()
    bad = tmp_path / "bad.sxm"
    bad.write_bytes(damage(good))
    with pytest.raises(SxmError, match=message) as info:
        read_sxm(bad)
    assert "bad.sxm" in str(info.value)


def test_writer_refuses_inconsistent_scans(tmp_path):
    scan = _scan()
    scan.channels["Z"]["forward"] = np.zeros((5, 8), np.float32)
    with pytest.raises(SxmError, match=r"'Z' forward has shape \(5, 8\), expected"):
        write_sxm(tmp_path / "x.sxm", scan)
    assert not (tmp_path / "x.sxm").exists()
    with pytest.raises(ValueError, match="no units given for channel"):
        scan_from_frames(
            _frames(), units={"Z": "m"}, center_x_m=0, center_y_m=0, width_m=1e-8, height_m=1e-8, bias_V=0.1
        )


def test_reads_a_file_laid_out_as_nanonis_writes_it(tmp_path):
    """Independent of our writer: a header in Nanonis' own layout, data built by hand."""
    header = (
        b":NANONIS_VERSION:\n2\n:SCANIT_TYPE:\n              FLOAT            MSBFIRST\n"
        b":REC_DATE:\n 21.11.2019\n:REC_TIME:\n15:35:09\n:REC_TEMP:\n      290.0000000000\n"
        b":ACQ_TIME:\n       409.6\n:SCAN_PIXELS:\n         4         3\n"
        b":SCAN_FILE:\nC:\\data\\img001.sxm\n"
        b":SCAN_TIME:\n             8.000E-1             8.000E-1\n"
        b":SCAN_RANGE:\n           2.000000E-8           1.500000E-8\n"
        b":SCAN_OFFSET:\n             1.000000E-9         -3.000000E-9\n"
        b":SCAN_ANGLE:\n            0.000E+0\n:SCAN_DIR:\nup\n:BIAS:\n            1.000E-1\n"
        b":Z-CONTROLLER:\n\tName\ton\tSetpoint\tP-gain\tI-gain\tT-const\n"
        b"\tlog Current\t0\t1.000E-10 A\t6.000E-12 m\t1.000E-7 m/s\t6.000E-5 s\n"
        b":COMMENT:\n\n:Bias>Bias (V):\n1E-1\n"
        b":DATA_INFO:\n\tChannel\tName\tUnit\tDirection\tCalibration\tOffset\n"
        b"\t14\tZ\tm\tboth\t9.000E-9\t0.000E+0\n\t0\tCurrent\tA\tforward\t1.000E-9\t0.000E+0\n"
        b"\n:SCANIT_END:\n\n\n"
    )
    z_fwd = np.arange(12, dtype=np.float32).reshape(3, 4)
    z_bwd_file = 100 + z_fwd  # as the tip acquired it: column 0 = right edge
    cur = -np.arange(12, dtype=np.float32).reshape(3, 4)
    cur[2] = np.nan  # last line never scanned
    data = np.stack([z_fwd, z_bwd_file, cur]).astype(">f4").tobytes()
    path = tmp_path / "img001.sxm"
    path.write_bytes(header + b"\x1a\x04" + data)

    scan = read_sxm(path)
    assert (scan.pixels, scan.lines, scan.direction) == (4, 3, "up")
    assert scan.range_m == (2e-8, 1.5e-8) and scan.offset_m == (1e-9, -3e-9)
    assert scan.bias_V == 0.1 and scan.feedback_on is False and scan.setpoint_A == 1e-10
    assert scan.line_time_s == pytest.approx(1.6)
    assert scan.header["SCAN_FILE"] == "C:\\data\\img001.sxm"
    assert scan.header["Bias>Bias (V)"] == "1E-1" and scan.comment == ""
    np.testing.assert_array_equal(scan.image("Z"), z_fwd)
    np.testing.assert_array_equal(scan.image("Z", "backward"), z_bwd_file[:, ::-1])
    assert set(scan.channels["Current"]) == {"forward"} and scan.units["Current"] == "A"
    assert scan.lines_scanned == 3  # Z has all rows; Current's NaN row is kept as NaN
    assert np.isnan(scan.image("Current")[2]).all()
