"""``stm-live worker``: live reconstruction and the tip monitor in a process of their own
(a GPU machine), on documents from the acquisition's 0MQ proxy; results go back over 0MQ.

The consumers are wired by :func:`stm_live.session.build_consumers`, as in-process; the links
(dispatcher, result sender, journal catch-up) are :mod:`stm_live.streaming`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable

from stm_live.callbacks.tipmonitor import TipMonitor
from stm_live.models import load_stmnet
from stm_live.session import build_consumers
from stm_live.streaming import LOOPBACK, JournalCatchUp, ResultSender, check_loopback, make_dispatcher

logger = logging.getLogger(__name__)

__all__ = ["run_worker", "main"]


def _default_tip_monitor(emit, device: str = "auto"):
    """The tip monitor; None (logged) when it cannot start (e.g. no classifier checkpoint)."""
    try:
        monitor = TipMonitor(device=device)
        monitor.subscribe(emit)
        return monitor
    except Exception as exc:  # a monitor that cannot start must not stop reconstruction
        logger.error("tip monitor unavailable in the worker: %s", exc)
        return None


def run_worker(
    connect: str = f"{LOOPBACK}:5578",
    results: str = f"{LOOPBACK}:5580",
    device: str = "auto",
    curve_keys=None,
    *,
    journal: str | os.PathLike | None = None,
    reconstructor=None,
    tip_monitor: bool | Callable = True,
    live_options: dict | None = None,
    allow_remote: bool = False,
    stop_event: threading.Event | None = None,
) -> int:
    """Run live reconstruction (and the tip monitor) on documents from a 0MQ proxy.

    Parameters
    ----------
    connect : str
        The proxy's outbound address.
    results : str
        Where to PUSH result documents (a ``ResultReceiver``).
    device : str
        Torch device for STM-Net ("auto": CUDA when present). On CUDA the default STM-Net runs
        the fast path (``stmnet.Acceleration``: views batched, bf16, CUDA graphs; warmed up
        before the worker says hello) and every live update is a full-frame pass, which costs
        a GPU little and needs no band splicing (``band_margin=None`` unless ``live_options``
        says otherwise).
    curve_keys : folder or CurveKeys, optional
        Authenticate and encrypt both links (see ``generate_curve_keys``).
    journal : folder, optional
        ``data_dir`` of the acquisition's journal: lets this worker join or restart
        mid-run and still reconstruct every line.
    reconstructor : object with ``.reconstruct``, optional
        Default: the shipped STM-Net checkpoint.
    tip_monitor : bool or callable(emit, device=) -> callback
        True: ``stm_live.callbacks.tipmonitor.TipMonitor`` with the shipped classifier.
    live_options : dict
        Extra ``LiveReconstruction`` keyword arguments.
    stop_event : threading.Event, optional
        Set it to stop the worker (in-process use); SIGTERM/SIGINT also stop it.

    Returns
    -------
    int
        0 on a clean stop.
    """
    for address, what in ((connect, "worker connect"), (results, "worker results")):
        check_loopback(address, what, allow_remote)
    worker_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    sender = ResultSender(results, source="live", curve_keys=curve_keys, allow_remote=allow_remote)
    try:
        if reconstructor is None:
            reconstructor = load_stmnet(device=device)
        options = dict(live_options or {})
        if str(getattr(reconstructor, "device", "cpu")).startswith("cuda"):
            options.setdefault("band_margin", None)
        factory = tip_monitor if callable(tip_monitor) else _default_tip_monitor

        def emit(kind):  # results go back over 0MQ, tagged with the consumer that made them
            return sender if kind == "live" else lambda name, doc: sender.send(name, doc, source=kind)

        consumers = build_consumers(
            None,
            journal=False,
            live=True,
            reconstructor=reconstructor,
            device=device,
            live_options=options,
            emit=emit,
            tip=(lambda sink: factory(sink, device=device)) if tip_monitor else False,
        )
    except BaseException:  # e.g. no checkpoint: say so, leave no socket behind
        sender.close(linger_ms=0)
        raise
    callbacks = consumers.inline
    feeder = JournalCatchUp(callbacks, journal)
    dispatcher = make_dispatcher(connect, curve_keys=curve_keys)
    dispatcher.subscribe(feeder)
    dispatcher.on_ready = lambda: sender.send(
        "hello",
        {"worker": worker_id, "pid": os.getpid(), "callbacks": [type(c).__name__ for c in callbacks]},
        source="worker",
    )
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: dispatcher.request_stop())
    if stop_event is not None:

        def _watch():
            # Repeat the request: one made before the dispatcher's task exists is a no-op.
            while not dispatcher.closed:
                if stop_event.wait(0.2):
                    dispatcher.request_stop()

        threading.Thread(target=_watch, name="worker-stop", daemon=True).start()
    logger.info("worker %s: documents from %s, results to %s", worker_id, connect, results)
    try:
        dispatcher.start()
    except asyncio.CancelledError:
        pass
    finally:
        consumers.close(30.0)  # finish what was acquired before leaving
        sender.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m stm_live.app.worker``: the worker with every option (the CLI's
    ``stm-live worker`` exposes the common ones)."""
    parser = argparse.ArgumentParser(
        prog="python -m stm_live.app.worker", description=run_worker.__doc__.splitlines()[0]
    )
    parser.add_argument("--connect", default=f"{LOOPBACK}:5578")
    parser.add_argument("--results", default=f"{LOOPBACK}:5580")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--curve-keys", default=None)
    parser.add_argument("--journal", default=None, help="acquisition data_dir (journal catch-up)")
    parser.add_argument(
        "--reconstructor",
        default=None,
        help="module:factory returning an object with .reconstruct (default: shipped STM-Net)",
    )
    parser.add_argument(
        "--band-margin",
        type=int,
        default=None,
        help="-1: full-frame updates (default: full-frame on CUDA, else 32 rows)",
    )
    parser.add_argument("--no-tip-monitor", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    reconstructor = None
    if args.reconstructor:
        module, _, attr = args.reconstructor.partition(":")
        reconstructor = getattr(importlib.import_module(module), attr)()
    return run_worker(
        args.connect,
        args.results,
        args.device,
        args.curve_keys,
        journal=args.journal,
        reconstructor=reconstructor,
        tip_monitor=not args.no_tip_monitor,
        live_options=None
        if args.band_margin is None
        else {"band_margin": None if args.band_margin < 0 else args.band_margin},
    )


if __name__ == "__main__":
    raise SystemExit(main())
