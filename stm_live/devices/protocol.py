"""Nanonis TCP protocol codec: framing, typed bodies and the error section.

ONE table (:data:`COMMANDS`) describes every command of NANONIS_PROTOCOL.md §3 as data:
its name, request fields and response fields with wire types. Both ends are driven from
it: the client (``devices/client.py``) and the simulated server's dispatcher.

Wire types (all big-endian):

``u16 u32 i32 f32 f64``  scalars (Python int / float)
``str``                  i32 byte length + bytes (Python str; bytes accepted on encode)
``strarr``               i32 total_bytes + i32 count + count x str (list[str]);
                         total_bytes = sum(4 + len) on encode, ignored on decode;
                         elements must be under 256 bytes (nanonis_spm, §6.2)
``f32_2d``               i32 rows + i32 cols + row-major f32 (2-D float32 ndarray)
``i32[]`` ``f32[]``      i32 element count + elements (1-D ndarray); a field with
                         ``count_of="other"`` has no count of its own and shares the
                         length of the earlier array field ``other``

How a server uses it::

    name, size, want_reply = parse_request_header(header40)   # ProtocolError if malformed
    body = recv_exactly(size)
    try:
        args = decode_request_body(name, body)                 # dict field -> value
    except KeyError:        # unknown command (UnknownCommandError is a KeyError)
        reply = pack_response(name, {}, error=f"Unknown command: {name}")
    except ProtocolError as exc:                               # short/garbled body
        reply = pack_response(name, {}, error=str(exc))
    else:
        try:
            reply = pack_response(name, handler(**args))       # dict or sequence
        except SomeControllerError as exc:
            reply = pack_response(name, {}, error=str(exc))   # fields zero-filled (§2.3)
    if want_reply:
        sock.sendall(reply)                                    # header + body, one write

``pack_response`` always appends the error section and fills every documented return
field (missing ones get zero/empty defaults when ``error`` is set). Scan.PropsGet has two
layouts: pass ``command=PROPS_GET_EXTENDED`` to ``pack_response`` for nanonisTCP clients.

A client does the reverse: ``pack_request`` -> ``parse_response_header`` ->
``decode_response_body`` (returns ``(values, status, description)``).

Field names per command are listed in :data:`COMMANDS`; :func:`describe` prints them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

HEADER_SIZE = 40
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 4096x4096 f32 frame is 64 MiB; anything larger is garbage
MAX_NAME_BYTES = 32
MAX_STRARR_ITEM = 256  # string-array elements must be shorter (nanonis_spm parses lengths < 256 only)

_REQ_HEADER = struct.Struct(">32siHH")
_RSP_HEADER = struct.Struct(">32si4x")
_ERR = struct.Struct(">Ii")
_I32 = struct.Struct(">i")
_I32x2 = struct.Struct(">ii")

_SCALARS: dict[str, struct.Struct] = {
    "u16": struct.Struct(">H"),
    "u32": struct.Struct(">I"),
    "i32": struct.Struct(">i"),
    "f32": struct.Struct(">f"),
    "f64": struct.Struct(">d"),
}
_ARRAYS: dict[str, np.dtype] = {
    "i32[]": np.dtype(">i4"),
    "u32[]": np.dtype(">u4"),
    "f32[]": np.dtype(">f4"),
    "f64[]": np.dtype(">f8"),
    "u8[]": np.dtype("u1"),
}
_NATIVE = {"i32[]": np.int32, "u32[]": np.uint32, "f32[]": np.float32, "f64[]": np.float64, "u8[]": np.uint8}
TYPES = frozenset(_SCALARS) | frozenset(_ARRAYS) | {"str", "strarr", "f32_2d"}

# Readable enum values (index = wire value) shared by client and server.
SCAN_ACTIONS = ("start", "stop", "pause", "resume", "freeze", "unfreeze", "center")
MOVEMENT_TYPES = ("forward", "backward", "center", "start")  # Scan.WaitEndOfLine
MOTOR_DIRECTIONS = ("X+", "X-", "Y+", "Y-", "Z+", "Z-")


class ProtocolError(ValueError):
    """Bytes that do not follow the Nanonis framing or a command's layout."""


class UnknownCommandError(ProtocolError, KeyError):
    """A command name that is not in :data:`COMMANDS`."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return ValueError.__str__(self)


class NanonisError(Exception):
    """The controller reported an error (status != 0) for ``command``."""

    def __init__(self, command: str, description: str):
        super().__init__(f"{command}: {description}")
        self.command = command
        self.description = description


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    count_of: str | None = None  # array sharing the element count of an earlier array

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"field {self.name!r}: unknown wire type {self.type!r}")
        if self.count_of is not None and self.type not in _ARRAYS:
            raise ValueError(f"field {self.name!r}: count_of only applies to 1-D arrays")


@dataclass(frozen=True)
class Command:
    name: str
    request: tuple[Field, ...] = ()
    response: tuple[Field, ...] = ()
    # Values used when a request body ends early (Motor.PosGet from nanonisTCP) and when
    # an encoder is not given the field.
    request_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Trailing request fields that an encoder leaves out unless given (Scan.PropsSet
    # autopaste: newer releases only).
    request_optional: frozenset[str] = frozenset()

    def __post_init__(self):
        if len(self.name.encode("ascii")) > MAX_NAME_BYTES:
            raise ValueError(f"command name {self.name!r} longer than {MAX_NAME_BYTES} bytes")


def _f(spec: str) -> tuple[Field, ...]:
    """'a:u32 b:f32 c:f32[]@a' -> Fields (``@x`` = shares x's count)."""
    out = []
    for item in spec.split():
        fname, ftype = item.split(":")
        count_of = None
        if "@" in ftype:
            ftype, count_of = ftype.split("@")
        out.append(Field(fname, ftype, count_of))
    return tuple(out)


def _cmd(name, req="", rsp="", **kw) -> Command:
    return Command(name, _f(req), _f(rsp), **kw)


_FRAME = "center_x:f32 center_y:f32 width:f32 height:f32 angle:f32"
_BUFFER = "channel_indexes:i32[] pixels:i32 lines:i32"
_PROPS_GET = "continuous:u32 bouncy:u32 autosave:u32 series_name:str comment:str"
_SPEED = "fwd_speed:f32 bwd_speed:f32 fwd_time:f32 bwd_time:f32 keep_constant:u16 speed_ratio:f32"
_TIPSHAPER = (
    "switch_off_delay:f32 change_bias:u32 bias:f32 tip_lift:f32 lift_time_1:f32 bias_lift:f32 "
    "bias_settling_time:f32 lift_height:f32 lift_time_2:f32 end_wait_time:f32 restore_feedback:u32"
)

_TABLE = [
    # Bias (§3.1)
    _cmd("Bias.Set", "bias:f32"),
    _cmd("Bias.Get", "", "bias:f32"),
    _cmd("Bias.Pulse", "wait:u32 width:f32 bias:f32 z_hold:u16 abs_rel:u16"),
    # Current (§3.2)
    _cmd("Current.Get", "", "current:f32"),
    # Z-controller (§3.3)
    _cmd("ZCtrl.OnOffSet", "status:u32"),
    _cmd("ZCtrl.OnOffGet", "", "status:u32"),
    _cmd("ZCtrl.SetpntSet", "setpoint:f32"),
    _cmd("ZCtrl.SetpntGet", "", "setpoint:f32"),
    _cmd("ZCtrl.ZPosSet", "z:f32"),
    _cmd("ZCtrl.ZPosGet", "", "z:f32"),
    _cmd("ZCtrl.Withdraw", "wait:u32 timeout_ms:i32"),
    _cmd("ZCtrl.Home"),
    # Scan (§3.4)
    _cmd("Scan.Action", "action:u16 direction:u32"),
    _cmd("Scan.StatusGet", "", "status:u32"),
    _cmd("Scan.WaitEndOfScan", "timeout_ms:i32", "timed_out:u32 path:str"),
    _cmd("Scan.WaitEndOfLine", "timeout_ms:i32", "timed_out:u32 line:i32 movement:u16 pass_number:i32"),
    _cmd("Scan.FrameSet", _FRAME),
    _cmd("Scan.FrameGet", "", _FRAME),
    _cmd("Scan.BufferSet", _BUFFER),
    _cmd("Scan.BufferGet", "", _BUFFER),
    _cmd(
        "Scan.PropsSet",
        "continuous:u32 bouncy:u32 autosave:u32 series_name:str comment:str modules:strarr autopaste:u32",
        request_defaults={"autopaste": 0},
        request_optional=frozenset({"autopaste"}),
    ),
    _cmd("Scan.PropsGet", "", _PROPS_GET),
    _cmd("Scan.SpeedSet", _SPEED),
    _cmd("Scan.SpeedGet", "", _SPEED),
    _cmd("Scan.FrameDataGrab", "channel_index:u32 data_direction:u32", "channel_name:str data:f32_2d scan_direction:u32"),
    _cmd("Scan.Save", "wait:u32 timeout_ms:i32", "timed_out:u32"),
    # Follow Me (§3.5)
    _cmd("FolMe.XYPosSet", "x:f64 y:f64 wait:u32"),
    _cmd("FolMe.XYPosGet", "wait_newest:u32", "x:f64 y:f64"),
    _cmd("FolMe.SpeedSet", "speed:f32 custom:u32"),
    _cmd("FolMe.SpeedGet", "", "speed:f32 custom:u32"),
    # Tip shaper (§3.6)
    _cmd("TipShaper.Start", "wait:u32 timeout_ms:i32"),
    _cmd("TipShaper.PropsSet", _TIPSHAPER),
    _cmd("TipShaper.PropsGet", "", _TIPSHAPER),
    # Signals (§3.7)
    _cmd("Signals.NamesGet", "", "names:strarr"),
    _cmd("Signals.ValGet", "index:i32 wait_newest:u32", "value:f32"),
    _cmd("Signals.ValsGet", "indexes:i32[] wait_newest:u32", "values:f32[]"),
    # Motor (§3.8); nanonisTCP sends PosGet with an empty body
    _cmd("Motor.StartMove", "direction:u32 steps:u16 group:u32 wait:u32"),
    _cmd("Motor.PosGet", "group:u32 timeout_ms:u32", "x:f64 y:f64 z:f64", request_defaults={"group": 0, "timeout_ms": 500}),
    # Version (§3.9)
    _cmd("Util.VersionGet", "", "product:str version:str host_release:u32 rt_release:u32"),
]

COMMANDS: dict[str, Command] = {c.name: c for c in _TABLE}

# nanonisTCP (version > 14000) layout of Scan.PropsGet (§5): R13742 fields + modules + autopaste.
PROPS_GET_EXTENDED = _cmd("Scan.PropsGet", "", _PROPS_GET + " modules:strarr autopaste:i32")


def describe() -> str:
    """One line per command: name, request fields, response fields."""
    def fmt(fields):
        return ", ".join(f"{f.name}:{f.type}" for f in fields) or "-"

    return "\n".join(f"{c.name:22s} req({fmt(c.request)}) -> ({fmt(c.response)})" for c in _TABLE)


def get_command(name: str) -> Command:
    try:
        return COMMANDS[name]
    except KeyError:
        raise UnknownCommandError(f"Unknown command: {name}") from None


# ---------------------------------------------------------------- encoding


def _enc_str(value) -> bytes:
    if isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise ValueError(f"expected str or bytes, got {type(value).__name__}")
    return _I32.pack(len(raw)) + raw


def _enc_field(f: Field, value, out: list, counts: dict) -> None:
    t = f.type
    try:
        if t in _SCALARS:
            if t[0] in "ui":
                value = int(value)  # bool/np.int -> int; struct range-checks it
            out.append(_SCALARS[t].pack(value))
        elif t == "str":
            out.append(_enc_str(value))
        elif t == "strarr":
            if isinstance(value, (str, bytes)):
                raise ValueError("expected a sequence of strings, got one string")
            items = [_enc_str(v) for v in value]
            long = [len(i) - 4 for i in items if len(i) - 4 >= MAX_STRARR_ITEM]
            if long:  # nanonis_spm misreads element lengths >= 256 (NANONIS_PROTOCOL.md §6.2)
                raise ValueError(f"string-array elements must be under {MAX_STRARR_ITEM} bytes, got {long[0]}")
            out.append(_I32x2.pack(sum(len(i) for i in items), len(items)))
            out.extend(items)
        elif t in _ARRAYS:
            arr = np.asarray(value)
            if arr.ndim != 1:
                raise ValueError(f"expected a 1-D array, got shape {arr.shape}")
            if arr.dtype.kind == "f" and t[0] in "iu":
                raise ValueError("expected integers, got floats")
            if f.count_of is None:
                out.append(_I32.pack(arr.size))
            elif counts.get(f.count_of) != arr.size:
                raise ValueError(f"length {arr.size} differs from {f.count_of!r} ({counts.get(f.count_of)})")
            counts[f.name] = arr.size
            out.append(arr.astype(_ARRAYS[t], copy=False).tobytes())
        elif t == "f32_2d":
            arr = np.asarray(value)
            if arr.ndim != 2:
                raise ValueError(f"expected a 2-D array, got shape {arr.shape}")
            out.append(_I32x2.pack(*arr.shape))
            # a flat byte view, not tobytes(): the final join is the only copy
            if arr.size:
                out.append(memoryview(np.ascontiguousarray(arr, dtype=">f4")).cast("B"))
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"field {f.name!r} ({t}): bad value {_short(value)}: {exc}") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_mapping(fields: Sequence[Field], values, what: str) -> Mapping:
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return values
    values = tuple(values)
    if len(values) > len(fields):
        raise ValueError(f"{what}: {len(values)} values given for {len(fields)} fields")
    return {f.name: v for f, v in zip(fields, values)}


def _default(f: Field):
    if f.type in _SCALARS:
        return 0.0 if f.type[0] == "f" else 0
    if f.type == "str":
        return ""
    if f.type == "strarr":
        return []
    if f.type in _ARRAYS:
        return np.zeros(0, _NATIVE[f.type])
    return np.zeros((0, 0), np.float32)


def encode_body(fields: Sequence[Field], values: Mapping, *, defaults: Mapping = None,
                optional: frozenset = frozenset(), fill_missing: bool = False, what: str = "") -> bytes:
    """Body bytes for ``fields`` from ``values`` (a mapping by field name)."""
    return b"".join(_encode_parts(fields, values, defaults=defaults, optional=optional,
                                  fill_missing=fill_missing, what=what))


def _encode_parts(fields, values, *, defaults=None, optional=frozenset(), fill_missing=False,
                  what="") -> list[bytes]:
    defaults = defaults or {}
    unknown = set(values) - {f.name for f in fields}
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {sorted(unknown)}; expected {[f.name for f in fields]}")
    out: list[bytes] = []
    counts: dict[str, int] = {}
    for f in fields:
        if f.name in values:
            value = values[f.name]
        elif f.name in optional:
            continue
        elif f.name in defaults:
            value = defaults[f.name]
        elif fill_missing:
            value = _default(f)
            if f.count_of is not None:
                value = np.zeros(counts.get(f.count_of, 0), _NATIVE[f.type])
        else:
            raise ValueError(f"{what}: missing value for field {f.name!r}")
        _enc_field(f, value, out, counts)
    return out


def _name_bytes(name: str) -> bytes:
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"command name {name!r} is not ASCII") from None
    if not raw or len(raw) > MAX_NAME_BYTES or b"\x00" in raw:
        raise ValueError(f"command name {name!r} must be 1-{MAX_NAME_BYTES} ASCII characters without NUL")
    return raw


def pack_request(name: str, values=None, want_reply: bool = True, *, command: Command | None = None) -> bytes:
    """Header + body of a request; ``values`` is a mapping or a sequence in field order."""
    cmd = command or get_command(name)
    vals = _as_mapping(cmd.request, values, name)
    parts = _encode_parts(cmd.request, vals, defaults=cmd.request_defaults, optional=cmd.request_optional,
                          what=f"{name} request")
    size = sum(len(p) for p in parts)
    return b"".join([_REQ_HEADER.pack(_name_bytes(name), size, 1 if want_reply else 0, 0), *parts])


def error_section(error: str | bytes | None) -> bytes:
    if error is None:
        return _ERR.pack(0, 0)
    raw = error.encode("utf-8", "replace") if isinstance(error, str) else bytes(error)
    return _ERR.pack(1, len(raw)) + raw


def pack_response(name: str, values=None, error: str | None = None, command: Command | None = None) -> bytes:
    """Header + return fields + error section in one bytes object.

    With ``error`` set, every return field not given is zero/empty-filled (§2.3 [ours]).
    An unknown command (not in the table, no ``command``) gets the error section only.
    """
    cmd = command or COMMANDS.get(name)
    if cmd is None:
        if error is None:
            raise UnknownCommandError(f"Unknown command: {name}")
        parts = [error_section(error)]
    else:
        vals = _as_mapping(cmd.response, values, name)
        parts = _encode_parts(cmd.response, vals, fill_missing=error is not None, what=f"{name} response")
        parts.append(error_section(error))
    size = sum(len(p) for p in parts)
    if size > MAX_BODY_BYTES:
        raise ValueError(f"{name} response body of {size} bytes exceeds {MAX_BODY_BYTES}")
    # One join: a 1 MiB frame is copied once here, not once per concatenation.
    return b"".join([_RSP_HEADER.pack(_name_bytes(name), size), *parts])


# ---------------------------------------------------------------- decoding


def _name_from(raw: bytes) -> str:
    raw = raw.split(b"\x00", 1)[0]
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"command name is not ASCII: {raw[:32]!r}") from None
    if not name or not name.isprintable():
        raise ProtocolError(f"bad command name in header: {raw[:32]!r}")
    return name


def _check_header(b, kind: str) -> None:
    if len(b) != HEADER_SIZE:
        raise ProtocolError(f"{kind} header must be {HEADER_SIZE} bytes, got {len(b)}")


def _check_size(name: str, size: int) -> None:
    if size < 0:
        raise ProtocolError(f"{name}: negative body size {size}")
    if size > MAX_BODY_BYTES:
        raise ProtocolError(f"{name}: body size {size} exceeds the {MAX_BODY_BYTES}-byte limit")


def parse_request_header(b: bytes) -> tuple[str, int, bool]:
    """(name, body_size, want_reply) from a 40-byte request header."""
    _check_header(b, "request")
    raw, size, flag, _reserved = _REQ_HEADER.unpack(b)
    name = _name_from(raw)
    _check_size(name, size)
    return name, size, flag != 0


def parse_response_header(b: bytes) -> tuple[str, int]:
    """(name, body_size) from a 40-byte response header; the body includes the error section."""
    _check_header(b, "response")
    raw, size = _RSP_HEADER.unpack(b)
    name = _name_from(raw)
    _check_size(name, size)
    if size < 8:
        raise ProtocolError(f"{name}: response body of {size} bytes cannot hold the 8-byte error section")
    return name, size


class _Short(Exception):
    pass


def _need(body, pos: int, n: int, f: Field):
    if n < 0 or pos + n > len(body):
        raise _Short(f"{f.name!r} ({f.type}) needs {n} bytes at offset {pos}, body has {len(body)}")


def _dec_str(body, pos: int, f: Field) -> tuple[str, int]:
    _need(body, pos, 4, f)
    (n,) = _I32.unpack_from(body, pos)
    pos += 4
    _need(body, pos, n, f)
    return bytes(body[pos:pos + n]).decode("utf-8", "replace"), pos + n


def decode_fields(fields: Sequence[Field], body, pos: int = 0, *, defaults: Mapping = None,
                  what: str = "") -> tuple[dict, int]:
    """Decode ``fields`` from ``body`` starting at ``pos``; returns (values, end offset).

    A body ending exactly before a field that has a default takes the default; any other
    shortfall raises ProtocolError naming the field.
    """
    defaults = defaults or {}
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for f in fields:
        t = f.type
        if pos >= len(body) and f.name in defaults:
            out[f.name] = defaults[f.name]
            continue
        try:
            if t in _SCALARS:
                st = _SCALARS[t]
                _need(body, pos, st.size, f)
                (out[f.name],) = st.unpack_from(body, pos)
                pos += st.size
            elif t == "str":
                out[f.name], pos = _dec_str(body, pos, f)
            elif t == "strarr":
                _need(body, pos, 8, f)
                _total, count = _I32x2.unpack_from(body, pos)  # total_bytes ignored (§2.4)
                pos += 8
                if count < 0:
                    raise _Short(f"{f.name!r}: negative element count {count}")
                _need(body, pos, 4 * count, f)  # bounds count before looping
                items = []
                for _ in range(count):
                    s, pos = _dec_str(body, pos, f)
                    items.append(s)
                out[f.name] = items
            elif t in _ARRAYS:
                if f.count_of is None:
                    _need(body, pos, 4, f)
                    (n,) = _I32.unpack_from(body, pos)
                    pos += 4
                else:
                    n = counts[f.count_of]
                if n < 0:
                    raise _Short(f"{f.name!r}: negative element count {n}")
                dt = _ARRAYS[t]
                _need(body, pos, n * dt.itemsize, f)
                out[f.name] = np.frombuffer(body, dt, n, pos).astype(_NATIVE[t])
                counts[f.name] = n
                pos += n * dt.itemsize
            elif t == "f32_2d":
                _need(body, pos, 8, f)
                rows, cols = _I32x2.unpack_from(body, pos)
                pos += 8
                if rows < 0 or cols < 0:
                    raise _Short(f"{f.name!r}: negative shape {rows}x{cols}")
                _need(body, pos, 4 * rows * cols, f)
                out[f.name] = (
                    np.frombuffer(body, ">f4", rows * cols, pos).reshape(rows, cols).astype(np.float32)
                )
                pos += 4 * rows * cols
        except _Short as exc:
            raise ProtocolError(f"{what}: truncated body: {exc}") from None
    return out, pos


def decode_request_body(name: str, body, *, command: Command | None = None) -> dict:
    """Request arguments as a dict. Surplus bytes are ignored (newer clients append
    fields); a short body uses the command's defaults or raises ProtocolError."""
    cmd = command or get_command(name)
    values, _ = decode_fields(cmd.request, body, defaults=cmd.request_defaults, what=f"{name} request")
    return values


def parse_error_section(body, pos: int) -> tuple[int, str]:
    """(status, description) of the error section at ``pos``, which must end the body."""
    if len(body) - pos < 8:
        raise ProtocolError(f"error section needs 8 bytes at offset {pos}, {len(body) - pos} left")
    status, n = _ERR.unpack_from(body, pos)
    if n < 0 or pos + 8 + n != len(body):
        raise ProtocolError(
            f"error section at offset {pos}: description size {n} does not match the "
            f"{len(body) - pos - 8} bytes left"
        )
    return status, bytes(body[pos + 8:]).decode("utf-8", "replace")


def is_error_section(body, pos: int) -> bool:
    """True when the bytes from ``pos`` are exactly one well-formed error section."""
    try:
        parse_error_section(body, pos)
    except ProtocolError:
        return False
    return True


def decode_response_body(name: str, body, command: Command | None = None) -> tuple[dict, int, str]:
    """(values, error_status, error_description) of a response body.

    The return fields must be followed by exactly one error section. A failed reply that
    carries only the error section (unknown command, or a server that drops the fields)
    gives ``({}, status, description)``.
    """
    cmd = command or COMMANDS.get(name)
    fields = cmd.response if cmd is not None else ()
    try:
        values, pos = decode_fields(fields, body, what=f"{name} response")
        status, desc = parse_error_section(body, pos)
        return values, status, desc
    except ProtocolError as exc:
        if fields and is_error_section(body, 0):
            status, desc = parse_error_section(body, 0)
            if status != 0:
                return {}, status, desc
        raise ProtocolError(f"{name} response: {exc}") from None


# ------------------------------------------- convenience forms named in docs/interfaces.md


def encode_request(name: str, *args, want_reply: bool = True) -> bytes:
    """``pack_request`` with positional arguments in field order."""
    return pack_request(name, args, want_reply)


def decode_request(message: bytes) -> tuple[str, dict, bool]:
    """(name, arguments, want_reply) of a whole request message (header + body)."""
    name, size, want_reply = parse_request_header(bytes(message[:HEADER_SIZE]))
    body = message[HEADER_SIZE:]
    if len(body) != size:
        raise ProtocolError(f"{name}: header announces {size} body bytes, message has {len(body)}")
    return name, decode_request_body(name, body), want_reply


def encode_response(name: str, *values, error: str | None = None) -> bytes:
    """``pack_response`` with positional return values in field order."""
    return pack_response(name, values, error)


def decode_response(message: bytes, command: Command | None = None) -> tuple[str, dict, int, str]:
    """(name, values, error_status, error_description) of a whole response message."""
    name, size = parse_response_header(bytes(message[:HEADER_SIZE]))
    body = message[HEADER_SIZE:]
    if len(body) != size:
        raise ProtocolError(f"{name}: header announces {size} body bytes, message has {len(body)}")
    values, status, desc = decode_response_body(name, body, command)
    return name, values, status, desc
