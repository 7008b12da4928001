"""Shared fixtures: a RunEngine with its own event loop, and the simulated controller on
an ephemeral loopback port."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture()
def RE(request):
    """A RunEngine on a fresh event loop, torn down cleanly (as bluesky's own tests do)."""
    from bluesky.run_engine import RunEngine

    loop = asyncio.new_event_loop()
    loop.set_debug(False)
    engine = RunEngine({}, loop=loop)

    def clean_event_loop():
        if engine.state not in ("idle", "panicked"):
            try:
                engine.halt()
            except Exception:
                pass
        engine._loop.call_soon_threadsafe(engine._loop.stop)
        engine._th.join(timeout=5)
        loop.close()

    request.addfinalizer(clean_event_loop)
    return engine


@pytest.fixture(scope="module")
def sim_server():
    """The simulated controller with the default scenario, fast clock, one per module."""
    from stm_live.simulators.server import start_server_thread

    server = start_server_thread(seed=0, time_scale=20.0)
    yield server
    server.stop()
