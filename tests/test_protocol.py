"""The codec: byte-exact worked examples of NANONIS_PROTOCOL.md §2.5, round trips of every
command in the table, and clear errors for malformed bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from stm_live.devices import protocol as P


def hexbytes(text: str) -> bytes:
    """Bytes from a hex dump: offsets (first token of each line) and quoted notes dropped."""
    out = []
    for line in text.strip().splitlines():
        tokens = line.split('"')[0].split()[1:]
        out.extend(t for t in tokens if len(t) == 2)
    return bytes.fromhex("".join(out))


# ----------------------------------------------------------------- §2.5 worked examples

FOLME_REQUEST = hexbytes("""
0000  46 6F 6C 4D 65 2E 58 59 50 6F 73 47 65 74 00 00
0010  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0020  00 00 00 04 00 01 00 00 00 00 00 01
""")

FOLME_RESPONSE = hexbytes("""
0000  46 6F 6C 4D 65 2E 58 59 50 6F 73 47 65 74 00 00
0010  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0020  00 00 00 18 00 00 00 00 3E 4A D7 F2 9A BC AF 48
0030  BE 29 C5 11 DC 3A 41 DF 00 00 00 00 00 00 00 00
""")

FRAMEGET_ERROR = hexbytes("""
0000  53 63 61 6E 2E 46 72 61 6D 65 47 65 74 00 00 00
0010  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0020  00 00 00 2A 00 00 00 00 00 00 00 00 00 00 00 00
0030  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01
0040  00 00 00 0E 4E 6F 20 73 63 61 6E 20 6D 6F 64 75
0050  6C 65
""")

NAMES_BODY = hexbytes("""
0000  00 00 00 1B 00 00 00 02 00 00 00 08 42 69 61 73
0010  20 28 56 29 00 00 00 0B 43 75 72 72 65 6E 74 20
0020  28 41 29 00 00 00 00 00 00 00 00
""")

GRAB_BODY = hexbytes("""
0000  00 00 00 01 5A 00 00 00 02 00 00 00 03 3F 80 00
0010  00 40 00 00 00 7F C0 00 00 7F C0 00 00 7F C0 00
0020  00 7F C0 00 00 00 00 00 01 00 00 00 00 00 00 00
0030  00
""")


def test_folme_request_bytes_exact():
    assert len(FOLME_REQUEST) == 44
    assert P.pack_request("FolMe.XYPosGet", {"wait_newest": 1}) == FOLME_REQUEST
    assert P.encode_request("FolMe.XYPosGet", 1) == FOLME_REQUEST
    name, size, want = P.parse_request_header(FOLME_REQUEST[:40])
    assert (name, size, want) == ("FolMe.XYPosGet", 4, True)
    assert P.decode_request_body(name, FOLME_REQUEST[40:]) == {"wait_newest": 1}


def test_folme_response_bytes_exact():
    assert len(FOLME_RESPONSE) == 64
    assert P.pack_response("FolMe.XYPosGet", (12.5e-9, -3e-9)) == FOLME_RESPONSE
    name, size = P.parse_response_header(FOLME_RESPONSE[:40])
    assert (name, size) == ("FolMe.XYPosGet", 24)
    values, status, desc = P.decode_response_body(name, FOLME_RESPONSE[40:])
    assert values == {"x": 12.5e-9, "y": -3e-9} and status == 0 and desc == ""


def test_manual_float_example():
    # The manual encodes 5 nm as 3E35 798E E230 8C3A.
    body = P.pack_response("FolMe.XYPosGet", (5e-9, 0.0))[40:48]
    assert body.hex().upper() == "3E35798EE2308C3A"


def test_frameget_error_fills_fields_bytes_exact():
    assert P.pack_response("Scan.FrameGet", None, error="No scan module") == FRAMEGET_ERROR
    name, values, status, desc = P.decode_response(FRAMEGET_ERROR)
    assert name == "Scan.FrameGet" and status == 1 and desc == "No scan module"
    assert values == dict.fromkeys(("center_x", "center_y", "width", "height", "angle"), 0.0)


def test_string_array_body_bytes_exact():
    rsp = P.pack_response("Signals.NamesGet", {"names": ["Bias (V)", "Current (A)"]})
    assert rsp[40:] == NAMES_BODY
    values, status, _ = P.decode_response_body("Signals.NamesGet", NAMES_BODY)
    assert values["names"] == ["Bias (V)", "Current (A)"] and status == 0


def test_frame_data_grab_2d_bytes_exact():
    data = np.array([[1.0, 2.0, np.nan], [np.nan] * 3], np.float32)
    rsp = P.pack_response("Scan.FrameDataGrab", ("Z", data, 1))
    assert rsp[40:] == GRAB_BODY
    values, status, _ = P.decode_response_body("Scan.FrameDataGrab", GRAB_BODY)
    out = values["data"]
    assert out.dtype == np.float32 and out.shape == (2, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, data)
    assert values["channel_name"] == "Z" and values["scan_direction"] == 1


def test_fixed_sizes_match_quick_size_table():
    # §3.10 sizes of the fixed-layout commands (request, response without error section).
    table = {
        "Bias.Set": (4, 0),
        "Bias.Get": (0, 4),
        "Bias.Pulse": (16, 0),
        "Current.Get": (0, 4),
        "ZCtrl.OnOffSet": (4, 0),
        "ZCtrl.OnOffGet": (0, 4),
        "ZCtrl.SetpntSet": (4, 0),
        "ZCtrl.SetpntGet": (0, 4),
        "ZCtrl.ZPosSet": (4, 0),
        "ZCtrl.ZPosGet": (0, 4),
        "ZCtrl.Withdraw": (8, 0),
        "ZCtrl.Home": (0, 0),
        "Scan.Action": (6, 0),
        "Scan.StatusGet": (0, 4),
        "Scan.WaitEndOfLine": (4, 14),
        "Scan.FrameSet": (20, 0),
        "Scan.FrameGet": (0, 20),
        "Scan.SpeedSet": (22, 0),
        "Scan.SpeedGet": (0, 22),
        "Scan.Save": (8, 4),
        "FolMe.XYPosSet": (20, 0),
        "FolMe.XYPosGet": (4, 16),
        "FolMe.SpeedSet": (8, 0),
        "FolMe.SpeedGet": (0, 8),
        "TipShaper.Start": (8, 0),
        "TipShaper.PropsSet": (44, 0),
        "TipShaper.PropsGet": (0, 44),
        "Signals.ValGet": (8, 4),
        "Motor.StartMove": (14, 0),
        "Motor.PosGet": (8, 24),
    }
    for name, (req, rsp) in table.items():
        cmd = P.COMMANDS[name]
        assert len(P.pack_request(name, [_sample(f) for f in cmd.request])) - 40 == req, name
        assert len(P.pack_response(name, [_sample(f) for f in cmd.response])) - 48 == rsp, name


# ----------------------------------------------------------------- round trips


def _sample(f: P.Field):
    if f.count_of is not None:  # arrays sharing a count: as long as the first one
        return {
            "f32[]": np.array([1.0, -2.5, 3.0], np.float32),
            "u32[]": np.array([1, 2, 3], np.uint32),
            "i32[]": np.array([4, 5, 6], np.int32),
            "f64[]": np.array([1e-9, 2.0, 3.0]),
            "strs": ["a", "", "é"],
        }[f.type]
    return {
        "u16": 7,
        "u32": 1,
        "i32": -5,
        "f32": 1.5,
        "f64": -2.25e-9,
        "str": "abc é",
        "strarr": ["Z", "Current (A)", ""],
        "i32[]": np.array([0, 24, 30], np.int32),
        "f32[]": np.array([1.0, -2.5, 0.5], np.float32),
        "f32_2d": np.arange(12, dtype=np.float32).reshape(3, 4),
        "u32[]": np.array([1, 2, 3], np.uint32),
        "f64[]": np.array([0.5, 1.5, 2.5]),
        "strcnt": ["x", "yz"],
        "strbytes": ["Bias (V)", ""],
        "str_2d": [["a", "b"], ["c", ""]],
    }[f.type]


def _assert_same(a, b, what):
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        assert a == b, what


ALL_SECTION_3 = {
    "Bias.Set",
    "Bias.Get",
    "Bias.Pulse",
    "Current.Get",
    "ZCtrl.OnOffSet",
    "ZCtrl.OnOffGet",
    "ZCtrl.SetpntSet",
    "ZCtrl.SetpntGet",
    "ZCtrl.ZPosSet",
    "ZCtrl.ZPosGet",
    "ZCtrl.Withdraw",
    "ZCtrl.Home",
    "Scan.Action",
    "Scan.StatusGet",
    "Scan.WaitEndOfScan",
    "Scan.WaitEndOfLine",
    "Scan.FrameSet",
    "Scan.FrameGet",
    "Scan.BufferSet",
    "Scan.BufferGet",
    "Scan.PropsSet",
    "Scan.PropsGet",
    "Scan.SpeedSet",
    "Scan.SpeedGet",
    "Scan.FrameDataGrab",
    "Scan.Save",
    "FolMe.XYPosSet",
    "FolMe.XYPosGet",
    "FolMe.SpeedSet",
    "FolMe.SpeedGet",
    "TipShaper.Start",
    "TipShaper.PropsSet",
    "TipShaper.PropsGet",
    "Signals.NamesGet",
    "Signals.ValGet",
    "Signals.ValsGet",
    "Motor.StartMove",
    "Motor.PosGet",
    "Util.VersionGet",
}


def test_table_covers_every_documented_command():
    assert ALL_SECTION_3 <= set(P.COMMANDS)
    assert len(P.COMMANDS) == 246  # NANONIS_PROTOCOL_EXT.md §4: 246 commands of 19 modules
    modules = {n.split(".")[0] for n in P.COMMANDS}
    assert len(modules) == 19


ALL_LAYOUTS = [(name, i) for name, layouts in sorted(P.LAYOUTS.items()) for i in range(len(layouts))]


@pytest.mark.parametrize("name,i", ALL_LAYOUTS)
def test_round_trip_every_command(name, i):
    cmd = P.LAYOUTS[name][i]
    req = {f.name: _sample(f) for f in cmd.request}
    msg = P.pack_request(name, req, command=cmd)
    got_name, size, want = P.parse_request_header(msg[:40])
    assert size == len(msg) - 40
    got_req = P.decode_request_body(name, msg[40:], command=cmd)
    assert got_name == name and want is True and set(got_req) == set(req)
    for k, v in req.items():
        _assert_same(got_req[k], v, f"{name} request {k}")
    rsp = {f.name: _sample(f) for f in cmd.response}
    got_name, got_rsp, status, desc = P.decode_response(P.pack_response(name, rsp, command=cmd), cmd)
    assert (got_name, status, desc) == (name, 0, "")
    for k, v in rsp.items():
        _assert_same(got_rsp[k], v, f"{name} response {k}")
    # A failed reply keeps the documented layout (§2.3 [ours]) and decodes.
    _, empty, status, desc = P.decode_response(P.pack_response(name, None, error="boom", command=cmd), cmd)
    assert status == 1 and desc == "boom" and set(empty) == set(rsp)


def test_props_get_extended_layout_round_trip():
    vals = (1, 0, 2, "series", "note", ["Z-Controller", "Bias"], 3)
    msg = P.pack_response("Scan.PropsGet", vals, command=P.PROPS_GET_EXTENDED)
    _, got, status, _ = P.decode_response(msg, P.PROPS_GET_EXTENDED)
    assert got["modules"] == ["Z-Controller", "Bias"] and got["autopaste"] == 3 and status == 0
    # The R13742 decoder must notice the surplus, not silently accept it.
    with pytest.raises(P.ProtocolError, match="error section"):
        P.decode_response(msg)


def test_props_set_autopaste_optional_and_read_if_present():
    base = (1, 2, 3, "s", "c", ["Bias"])
    r13742 = P.pack_request("Scan.PropsSet", base)
    newer = P.pack_request("Scan.PropsSet", base + (1,))
    assert len(newer) == len(r13742) + 4
    assert P.decode_request(r13742)[1]["autopaste"] == 0
    assert P.decode_request(newer)[1]["autopaste"] == 1


def test_request_strarr_parsed_by_count_not_total_bytes():
    # nanonis_spm writes total_bytes = 4 x count (wrong); the count and lengths rule.
    body = struct.pack(">III", 1, 1, 3) + struct.pack(">i", 1) + b"a" + struct.pack(">i", 0)
    body += struct.pack(">ii", 4, 1) + struct.pack(">i", 4) + b"Bias"
    assert P.decode_request_body("Scan.PropsSet", body)["modules"] == ["Bias"]


def test_short_request_uses_known_defaults_and_surplus_is_ignored():
    assert P.decode_request_body("Motor.PosGet", b"") == {"group": 0, "timeout_ms": 500}
    assert P.decode_request_body("Bias.Set", struct.pack(">f", 0.5) + b"\x00" * 4) == {"bias": 0.5}


def test_shared_count_arrays():
    cmd = P.Command("Pattern.CloudSet", P._f("x:f32[] y:f32[]@x"))
    msg = P.pack_request("Pattern.CloudSet", ([1, 2], [3, 4]), command=cmd)
    assert len(msg) == 40 + 4 + 16  # one count for both arrays
    got = P.decode_request_body("Pattern.CloudSet", msg[40:], command=cmd)
    np.testing.assert_array_equal(got["y"], [3, 4])
    with pytest.raises(ValueError, match="differs"):
        P.pack_request("Pattern.CloudSet", ([1, 2], [3]), command=cmd)


# ----------------------------------------------------------------- malformed input


def test_short_header_refused():
    with pytest.raises(P.ProtocolError, match="40 bytes"):
        P.parse_request_header(FOLME_REQUEST[:36])
    with pytest.raises(P.ProtocolError, match="40 bytes"):
        P.parse_response_header(FOLME_RESPONSE[:20])


def test_oversize_and_negative_body_refused():
    huge = struct.pack(">32siHH", b"Scan.FrameDataGrab", 2_000_000_000, 1, 0)
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.parse_request_header(huge)
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.parse_response_header(struct.pack(">32si4x", b"Scan.FrameDataGrab", P.MAX_BODY_BYTES + 1))
    with pytest.raises(P.ProtocolError, match="negative"):
        P.parse_request_header(struct.pack(">32siHH", b"Bias.Get", -4, 1, 0))


def test_garbled_name_refused():
    with pytest.raises(P.ProtocolError, match="ASCII"):
        P.parse_request_header(b"\xff" * 32 + struct.pack(">iHH", 0, 1, 0))
    with pytest.raises(P.ProtocolError, match="command name"):
        P.parse_request_header(b"\x00" * 32 + struct.pack(">iHH", 0, 1, 0))


def test_wrong_body_size_refused():
    with pytest.raises(P.ProtocolError, match="announces 4 body bytes, message has 3"):
        P.decode_request(FOLME_REQUEST[:-1])
    with pytest.raises(P.ProtocolError, match="'bias'"):
        P.decode_request_body("Bias.Set", b"\x00\x00")
    with pytest.raises(P.ProtocolError, match="announces"):
        P.decode_response(FOLME_RESPONSE + b"\x00")
    # A response whose error section does not end the body exactly is malformed.
    bad = FOLME_RESPONSE[40:] + b"junk"
    with pytest.raises(P.ProtocolError, match="description size"):
        P.decode_response_body("FolMe.XYPosGet", bad)
    # A 2-D array claiming more data than the body holds.
    lying = struct.pack(">i", 1) + b"Z" + struct.pack(">ii", 1000, 1000) + b"\x00" * 16
    with pytest.raises(P.ProtocolError, match="'data'"):
        P.decode_response_body("Scan.FrameDataGrab", lying)


def test_unknown_command():
    with pytest.raises(KeyError):
        P.decode_request_body("Nope.Get", b"")
    with pytest.raises(P.UnknownCommandError, match="Unknown command: Nope.Get"):
        P.pack_request("Nope.Get")
    msg = P.pack_response("Nope.Get", None, error="Unknown command: Nope.Get")
    assert len(msg) == 40 + 8 + len("Unknown command: Nope.Get")
    assert P.decode_response(msg)[1:] == ({}, 1, "Unknown command: Nope.Get")


def test_error_only_reply_for_known_command_decodes():
    # A server that drops the return fields on error: still a clean NanonisError path.
    msg = struct.pack(">32si4x", b"Bias.Get", 12) + struct.pack(">Ii", 1, 4) + b"fail"
    assert P.decode_response(msg)[1:] == ({}, 1, "fail")


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="'status'"):
        P.pack_request("ZCtrl.OnOffSet", {"status": -1})
    with pytest.raises(ValueError, match="missing value for field 'bias'"):
        P.pack_request("Bias.Set", {})
    with pytest.raises(ValueError, match="unknown field"):
        P.pack_request("Bias.Set", {"bias": 1.0, "volts": 2})
    with pytest.raises(ValueError, match="'data'.*2-D"):
        P.pack_response("Scan.FrameDataGrab", ("Z", np.zeros(3), 1))
    with pytest.raises(ValueError, match="command name"):
        P.pack_response("X" * 33, None, error="too long")
    with pytest.raises(ValueError, match="'names'.*under 256 bytes, got 300"):
        P.pack_response("Signals.NamesGet", {"names": ["ok", "x" * 300]})


FIXED_SIZES_EXT = {  # NANONIS_PROTOCOL_EXT.md §3.20 (R13742 layout; R14573 for commands new there)
    "AutoApproach.OnOffGet": (0, 2),
    "AutoApproach.OnOffSet": (2, 0),
    "AutoApproach.Open": (0, 0),
    "Bias.CalibrGet": (0, 8),
    "Bias.CalibrSet": (8, 0),
    "Bias.RangeSet": (2, 0),
    "BiasSpectr.AdvPropsGet": (0, 8),
    "BiasSpectr.AdvPropsSet": (8, 0),
    "BiasSpectr.AltZCtrlGet": (0, 10),
    "BiasSpectr.AltZCtrlSet": (10, 0),
    "BiasSpectr.DigSyncGet": (0, 2),
    "BiasSpectr.DigSyncSet": (2, 0),
    "BiasSpectr.LimitsGet": (0, 8),
    "BiasSpectr.LimitsSet": (8, 0),
    "BiasSpectr.MLSLockinPerSegGet": (0, 4),
    "BiasSpectr.MLSLockinPerSegSet": (4, 0),
    "BiasSpectr.Open": (0, 0),
    "BiasSpectr.PropsSet": (20, 0),
    "BiasSpectr.PulseSeqSyncGet": (0, 6),
    "BiasSpectr.PulseSeqSyncSet": (6, 0),
    "BiasSpectr.SafeCond1Get": (0, 12),
    "BiasSpectr.SafeCond1Set": (12, 0),
    "BiasSpectr.SafeCond2Get": (0, 14),
    "BiasSpectr.SafeCond2Set": (14, 0),
    "BiasSpectr.StatusGet": (0, 4),
    "BiasSpectr.Stop": (0, 0),
    "BiasSpectr.TTLSyncGet": (0, 12),
    "BiasSpectr.TTLSyncSet": (12, 0),
    "BiasSpectr.TimingGet": (0, 32),
    "BiasSpectr.TimingSet": (32, 0),
    "BiasSpectr.ZOffRevertGet": (0, 2),
    "BiasSpectr.ZOffRevertSet": (2, 0),
    "Current.100Get": (0, 4),
    "Current.BEEMGet": (0, 4),
    "Current.CalibrGet": (4, 16),
    "Current.CalibrSet": (20, 0),
    "Current.GainSet": (8, 0),
    "FolMe.OversamplGet": (0, 8),
    "FolMe.OversamplSet": (4, 0),
    "FolMe.PSExpSet": (2, 0),
    "FolMe.PSOnOffGet": (0, 4),
    "FolMe.PSOnOffSet": (4, 0),
    "FolMe.Stop": (0, 0),
    "LockIn.DemodHPFilterGet": (4, 8),
    "LockIn.DemodHPFilterSet": (12, 0),
    "LockIn.DemodHarmonicGet": (4, 4),
    "LockIn.DemodHarmonicSet": (8, 0),
    "LockIn.DemodLPFilterGet": (4, 8),
    "LockIn.DemodLPFilterSet": (12, 0),
    "LockIn.DemodPhasGet": (4, 4),
    "LockIn.DemodPhasRegGet": (4, 4),
    "LockIn.DemodPhasRegSet": (8, 0),
    "LockIn.DemodPhasSet": (8, 0),
    "LockIn.DemodRTSignalsGet": (4, 4),
    "LockIn.DemodRTSignalsSet": (8, 0),
    "LockIn.DemodSignalGet": (4, 4),
    "LockIn.DemodSignalSet": (8, 0),
    "LockIn.DemodSyncFilterGet": (4, 4),
    "LockIn.DemodSyncFilterSet": (8, 0),
    "LockIn.ModAmpGet": (4, 4),
    "LockIn.ModAmpSet": (8, 0),
    "LockIn.ModHarmonicGet": (4, 4),
    "LockIn.ModHarmonicSet": (8, 0),
    "LockIn.ModOnOffGet": (4, 4),
    "LockIn.ModOnOffSet": (8, 0),
    "LockIn.ModPhasFreqGet": (4, 8),
    "LockIn.ModPhasFreqSet": (12, 0),
    "LockIn.ModPhasGet": (4, 4),
    "LockIn.ModPhasRegGet": (4, 4),
    "LockIn.ModPhasRegSet": (8, 0),
    "LockIn.ModPhasSet": (8, 0),
    "LockIn.ModSignalGet": (4, 4),
    "LockIn.ModSignalSet": (8, 0),
    "Marks.LineDraw": (20, 0),
    "Marks.LinesErase": (4, 0),
    "Marks.LinesVisibleSet": (6, 0),
    "Marks.PointsErase": (4, 0),
    "Marks.PointsVisibleSet": (6, 0),
    "Motor.FreqAmpGet": (2, 8),
    "Motor.FreqAmpSet": (10, 0),
    "Motor.StartClosedLoop": (36, 0),
    "Motor.StepCounterGet": (12, 12),
    "Motor.StopMove": (0, 0),
    "Osci2T.ChsGet": (0, 8),
    "Osci2T.ChsSet": (8, 0),
    "Osci2T.OversamplGet": (0, 2),
    "Osci2T.OversamplSet": (2, 0),
    "Osci2T.Run": (0, 0),
    "Osci2T.TimebaseSet": (2, 0),
    "Osci2T.TrigGet": (0, 30),
    "Osci2T.TrigSet": (30, 0),
    "Pattern.ExpOpen": (0, 0),
    "Pattern.ExpPause": (4, 0),
    "Pattern.ExpStart": (2, 0),
    "Pattern.ExpStatusGet": (0, 4),
    "Pattern.ExpStop": (0, 0),
    "Pattern.GridGet": (0, 28),
    "Pattern.GridSet": (36, 0),
    "Pattern.LineGet": (0, 20),
    "Pattern.LineSet": (28, 0),
    "Piezo.CalibrGet": (0, 12),
    "Piezo.DriftCompGet": (0, 32),
    "Piezo.DriftCompSet": (20, 0),
    "Piezo.HVAInfoGet": (0, 28),
    "Piezo.HVAStatusLEDGet": (0, 16),
    "Piezo.HystOnOffGet": (0, 4),
    "Piezo.HystOnOffSet": (4, 0),
    "Piezo.RangeGet": (0, 12),
    "Piezo.RangeSet": (12, 0),
    "Piezo.SensGet": (0, 12),
    "Piezo.SensSet": (12, 0),
    "Piezo.TiltGet": (0, 8),
    "Piezo.TiltSet": (8, 0),
    "Piezo.XYZLimitsGet": (0, 26),
    "Piezo.XYZLimitsSet": (26, 0),
    "SafeTip.OnOffGet": (0, 2),
    "SafeTip.OnOffSet": (2, 0),
    "SafeTip.PropsGet": (0, 8),
    "SafeTip.PropsSet": (8, 0),
    "SafeTip.SignalGet": (0, 4),
    "Scan.BackgroundDelete": (12, 4),
    "Scan.BackgroundPaste": (8, 4),
    "Scan.XYPosGet": (4, 8),
    "Signals.AddRTSet": (8, 0),
    "Signals.CalibrGet": (4, 8),
    "Signals.InSlotSet": (8, 0),
    "Signals.RangeGet": (4, 8),
    "TipRec.BufferClear": (0, 0),
    "TipRec.BufferSizeGet": (0, 4),
    "TipRec.BufferSizeSet": (4, 0),
    "UserOut.CalcSignalConfigGet": (4, 6),
    "UserOut.CalcSignalConfigSet": (10, 0),
    "UserOut.CalibrSet": (12, 0),
    "UserOut.ModeGet": (4, 2),
    "UserOut.ModeSet": (6, 0),
    "UserOut.MonitorChGet": (4, 4),
    "UserOut.MonitorChSet": (8, 0),
    "UserOut.ValSet": (8, 0),
    "Util.AcqPeriodGet": (0, 4),
    "Util.AcqPeriodSet": (4, 0),
    "Util.Lock": (0, 0),
    "Util.RTFreqGet": (0, 4),
    "Util.RTFreqSet": (4, 0),
    "Util.RTOversamplGet": (0, 4),
    "Util.RTOversamplSet": (4, 0),
    "Util.UnLock": (0, 0),
    "ZCtrl.ActiveCtrlSet": (4, 0),
    "ZCtrl.GainGet": (0, 12),
    "ZCtrl.GainSet": (12, 0),
    "ZCtrl.HomePropsGet": (0, 6),
    "ZCtrl.HomePropsSet": (6, 0),
    "ZCtrl.LimitsEnabledGet": (0, 4),
    "ZCtrl.LimitsEnabledSet": (4, 0),
    "ZCtrl.LimitsGet": (0, 8),
    "ZCtrl.LimitsSet": (8, 0),
    "ZCtrl.StatusGet": (0, 2),
    "ZCtrl.SwitchOffDelayGet": (0, 4),
    "ZCtrl.SwitchOffDelaySet": (4, 0),
    "ZCtrl.TipLiftGet": (0, 4),
    "ZCtrl.TipLiftSet": (4, 0),
    "ZCtrl.WithdrawRateGet": (0, 4),
    "ZCtrl.WithdrawRateSet": (4, 0),
}


@pytest.mark.parametrize("name", sorted(FIXED_SIZES_EXT))
def test_fixed_sizes_match_reference_3_20(name):
    req, rsp = FIXED_SIZES_EXT[name]
    assert P.COMMANDS[name].fixed_sizes() == (req, rsp), name


@pytest.mark.parametrize(
    "name,release,req,rsp",
    [
        # §2.1 layouts by release: (request, response) fixed sizes or None (variable)
        ("Current.GainSet", 12202, 2, 0),
        ("Current.GainSet", 13172, 8, 0),
        ("Current.CalibrSet", 13172, 16, 0),
        ("Current.CalibrSet", 13742, 20, 0),
        ("Current.CalibrGet", 13172, 0, 16),
        ("Current.CalibrGet", 13742, 4, 16),
        ("Motor.StartClosedLoop", 13172, 32, 0),
        ("Motor.StartClosedLoop", 13742, 36, 0),
        ("Motor.PosGet", 13172, 0, 24),
        ("Motor.FreqAmpGet", 13172, 0, 8),
        ("Motor.FreqAmpGet", 14718, 2, 8),
        ("Piezo.DriftCompSet", 10862, 16, 0),
        ("Piezo.DriftCompSet", 12202, 20, 0),
        ("Piezo.DriftCompGet", 10862, 0, 28),
        ("Piezo.DriftCompGet", 14718, 0, 32),
        ("UserOut.LimitsSet", 13742, 12, 0),
        ("UserOut.LimitsSet", 14254, 16, 0),
        ("UserOut.LimitsGet", 13742, 4, 8),
        ("UserOut.LimitsGet", 14254, 8, 8),
        ("BiasSpectr.TTLSyncSet", 13172, 14, 0),
        ("BiasSpectr.TTLSyncSet", 13742, 12, 0),
    ],
)
def test_release_layouts(name, release, req, rsp):
    assert P.command_for(name, release).fixed_sizes() == (req, rsp)


def test_commands_absent_from_a_release_are_unknown():
    for name, release in (
        ("Util.VersionGet", 13172),
        ("Signals.InSlotsGet", 12202),
        ("Scan.XYPosGet", 13172),
        ("Piezo.XYZLimitsGet", 14254),
        ("Util.SessionPathSet", 10862),
    ):
        with pytest.raises(P.UnknownCommandError, match="not in release"):
            P.command_for(name, release)
    assert P.command_for("Signals.InSlotsGet", 10862).response[0].name == "names"


def test_scan_props_layouts_by_release():
    assert [f.name for f in P.command_for("Scan.PropsSet", 13172).request][-1] == "comment"
    assert [f.name for f in P.command_for("Scan.PropsGet", 14254).response][-1] == "comment"
    r14573 = P.command_for("Scan.PropsGet", 14573)
    vals = {
        "continuous": 1,
        "bouncy": 0,
        "autosave": 1,
        "series_name": "s",
        "comment": "c",
        "modules": ["Bias", "Z-Controller"],
        "module_param_counts": np.array([1, 0], np.int32),
        "module_params": [["Bias>Bias (V)"], [""]],
        "autopaste": 3,
    }
    msg = P.pack_response("Scan.PropsGet", vals, command=r14573)
    # a decoder expecting another release's layout falls back to the one that fits exactly
    _, got, status, _ = P.decode_response(msg, P.command_for("Scan.PropsGet", 13742))
    assert status == 0 and got["module_params"] == [["Bias>Bias (V)"], [""]] and got["autopaste"] == 3


def test_strict_request_decoding_picks_the_layout_by_length():
    cmd, args = P.decode_request_strict("Current.GainSet", struct.pack(">H", 3), 14718)
    assert cmd.until == 12202 and args == {"gain_index": 3}
    cmd, args = P.decode_request_strict("Current.GainSet", struct.pack(">ii", 2, -1), 12202)
    assert cmd.since == 13172 and args == {"gain_index": 2, "filter_index": -1}
    with pytest.raises(P.ProtocolError, match="5 bytes"):
        P.decode_request_strict("Piezo.TiltSet", b"\x00" * 5)
    with pytest.raises(P.ProtocolError):  # surplus bytes are refused here (not by decode_request_body)
        P.decode_request_strict("Bias.Set", struct.pack(">f", 0.5) + b"\x00" * 4)


def test_marks_points_draw_accepts_documented_and_nanonis_spm_forms():
    pts = struct.pack(">i", 2) + struct.pack(">2f", 0, 1e-9) + struct.pack(">2f", 0, 2e-9)
    texts = struct.pack(">i", 1) + b"A" + struct.pack(">i", 1) + b"B"
    colours = struct.pack(">2I", 1, 2)
    documented = pts + struct.pack(">i", 2) + texts + colours
    spm = pts + struct.pack(">ii", 8, 2) + texts + colours
    old = pts + texts + colours
    for body, release in ((documented, 14718), (spm, 14718), (old, 12202), (old, 14718)):
        _, args = P.decode_request_strict("Marks.PointsDraw", body, release)
        assert args["texts"] == ["A", "B"]


def test_safe_flags():
    assert all(P.COMMANDS[n].safe for n in P.COMMANDS if n.endswith("Get") and n != "Motor.StepCounterGet")
    for name in (
        "Motor.StartMove",
        "Bias.Pulse",
        "Scan.Action",
        "TipShaper.Start",
        "Marks.LinesErase",
        "ZCtrl.Withdraw",
        "Scan.Save",
        "Motor.StepCounterGet",
        "ZCtrl.HomePropsSet",
    ):
        assert not P.COMMANDS[name].safe, name
    assert P.COMMANDS["Scan.WaitEndOfLine"].safe and P.COMMANDS["Bias.Set"].safe


def test_release_profile_of_a_reported_release():
    assert P.release_profile(14718) == 14718 and P.release_profile(99999999) == 14718
    assert P.release_profile(13900) == 13742 and P.release_profile(5000) == 10862
