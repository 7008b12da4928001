"""Nanonis TCP protocol, client and ophyd devices.

``NanonisSTM`` is imported lazily so the protocol and client load without ophyd.
"""


def __getattr__(name):
    if name == "NanonisSTM":
        from stm_live.devices.stm import NanonisSTM  # noqa: PLC0415 - see the docstring

        return NanonisSTM
    raise AttributeError(name)
