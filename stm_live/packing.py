"""msgpack with numpy arrays: the one binary form of documents, on disk and on the wire.

The journal (``store.py``) and the 0MQ links (``streaming.py``) both use it. Arrays travel
as msgpack ext type 1 holding msgpack ``[dtype.str, shape, raw bytes]`` (C order); only
plain numeric/bool dtypes are accepted, so nothing ever needs pickle.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

EXT_NDARRAY = 1
ARRAY_KINDS = "biufc"  # bool, int, uint, float, complex


class PackingError(ValueError):
    """An object that cannot be packed, or bytes that are not a packed object."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ARRAY_KINDS:
            raise PackingError(f"cannot pack numpy array of dtype {obj.dtype} (only {ARRAY_KINDS})")
        arr = np.ascontiguousarray(obj)
        return msgpack.ExtType(EXT_NDARRAY, msgpack.packb([arr.dtype.str, list(arr.shape), arr.tobytes()]))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise PackingError(f"cannot pack object of type {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != EXT_NDARRAY:
        raise PackingError(f"unknown msgpack ext type {code}")
    try:
        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        dt = np.dtype(dtype)
    except Exception as exc:
        raise PackingError(f"malformed ndarray payload: {exc}") from exc
    if dt.kind not in ARRAY_KINDS:
        raise PackingError(f"refusing array of dtype {dtype!r}")
    try:
        return np.frombuffer(raw, dtype=dt).reshape(shape).copy()  # writable, owns its memory
    except Exception as exc:
        raise PackingError(f"malformed ndarray payload: {exc}") from exc


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (dicts, lists, scalars, strings, numpy arrays)."""
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except PackingError:
        raise
    except Exception as exc:
        raise PackingError(f"cannot pack: {exc}") from exc


def unpack(data: bytes | bytearray | memoryview, *, strict_map_key: bool = False) -> Any:
    """The object packed in ``data``; ``PackingError`` for anything else."""
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=strict_map_key)
    except PackingError:
        raise
    except Exception as exc:
        raise PackingError(f"not msgpack ({type(exc).__name__}: {exc}); starts {bytes(data[:16])!r}") from exc
