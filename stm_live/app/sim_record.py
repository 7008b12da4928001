"""``stm-live sim record``: record a session between any client and a controller.

A transparent proxy (:mod:`stm_live.simulators.record`): clients connect to it instead of
the controller, every byte is forwarded unchanged, and each request/reply pair goes to a
session recording (``.nrec``) as it passes. Runs until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

__all__ = ["main"]


def main(upstreams: list[str], listen: str, out: Path, faults: str | None = None) -> None:
    """Record until interrupted; one line when listening, one when stopped."""
    from stm_live.simulators.record import open_proxy, parse_address

    ups = [parse_address(u, "--upstream") for u in upstreams]
    host, port = parse_address(listen, "--listen")
    if port and port + len(ups) > 65536:
        raise ValueError(f"--listen {listen}: {len(ups)} ports from {port} run past 65535")
    armed = ()
    if faults is not None:
        from stm_live.simulators.scenario import load_scenario

        armed = load_scenario(faults).faults
        if not armed:
            raise ValueError(f"--faults {faults}: the scenario has no faults: section")

    async def run() -> None:
        proxy = await open_proxy(ups, out, host=host, port=port, faults=armed)
        links = ", ".join(f"{host}:{p} -> {h}:{u}" for p, (h, u) in zip(proxy.ports, ups))
        print(f"recording {links} into {out}{f' ({len(armed)} faults armed)' if armed else ''}; "
              "Ctrl-C stops", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            await stop.wait()
        finally:
            await proxy.close()
        failed = proxy.writer.error
        print(f"stopped: {proxy.pairs} request/reply pairs on {proxy.writer.records} records in {out}"
              + (f"; recording failed: {failed}" if failed else ""), flush=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
