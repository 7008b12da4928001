"""The pieces every Nanonis ophyd device here is built from: a controller value as a
Signal, a blocking call run off the RunEngine loop, and the data key of a channel."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from ophyd import DeviceStatus, Signal

__all__ = ["DIRECTION_SUFFIX", "NanonisSignal", "channel_key", "run_in_thread"]

DIRECTION_SUFFIX = {"forward": "fwd", "backward": "bwd"}


def channel_key(device_name: str, channel: str, direction: str) -> str:
    """Data key of one channel/direction: ``stm_current_fwd`` for ("stm", "Current")."""
    slug = re.sub(r"[^0-9a-z]+", "_", channel.lower()).strip("_")
    return f"{device_name}_{slug}_{DIRECTION_SUFFIX[direction]}"


def run_in_thread(obj, fn: Callable[[], Any]) -> DeviceStatus:
    """Run a blocking controller call off the RunEngine loop; its Status reports the end."""
    status = DeviceStatus(obj)

    def _run():
        try:
            fn()
        except Exception as exc:
            status.set_exception(exc)
        else:
            status.set_finished()

    threading.Thread(target=_run, name=f"{obj.name}-set", daemon=True).start()
    return status


class NanonisSignal(Signal):
    """One controller value: ``get`` calls ``read``, ``put`` calls ``write``.

    Parameters
    ----------
    read, write : callable(device) / callable(device, value)
        Client calls, given the root :class:`NanonisSTM`.
    units : str
        SI unit written into ``describe()``.
    check : str, optional
        Name of the ``Profile.check_*`` method guarding ``put``.
    """

    def __init__(
        self,
        *,
        read: Callable,
        write: Callable | None = None,
        units: str = "",
        check: str | None = None,
        shape: Sequence[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._read_fn, self._write_fn = read, write
        self._units, self._check, self._shape = units, check, shape

    @property
    def write_access(self):
        return self._write_fn is not None

    def get(self, **kwargs):
        stm = self.root
        with stm._lock:
            value = self._read_fn(stm)
        if isinstance(value, (list, tuple)):
            value = np.asarray(value)
        self._readback = value
        self._metadata["timestamp"] = time.time()
        return value

    def check_value(self, value):
        stm = self.root
        if self._check and stm.profile is not None:
            if self._check == "check_pulse":
                stm.profile.check_bias(value[1])
            else:
                getattr(stm.profile, self._check)(value)

    def put(self, value, **kwargs):
        if not self.write_access:
            raise PermissionError(f"{self.name} is read-only")
        self.check_value(value)  # limits first: an unsafe value never reaches the wire
        stm = self.root
        with stm._lock:
            self._write_fn(stm, value)
        old, self._readback = self._readback, value
        self._run_subs(sub_type=self.SUB_VALUE, old_value=old, value=value, timestamp=time.time())

    def set(self, value, **kwargs):
        # Refuse synchronously (the plan sees LimitError at once), then write in a thread.
        self.check_value(value)
        return run_in_thread(self, lambda: self.put(value))

    def describe(self):
        desc = super().describe()
        desc[self.name]["units"] = self._units
        desc[self.name]["source"] = f"nanonis://{self.root.host}:{self.root.port}/{self.name}"
        return desc
