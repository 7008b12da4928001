"""``stm-live scan``: live frames from a controller (real or simulated), journaled line by
line and ingested into tiled, with live reconstruction (in-process or on a remote worker),
the tip monitor and the reconditioning policy wired by :func:`stm_live.session.build_consumers`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from stm_live.config import load_profile
from stm_live.console import LogFile, describe, migrated_note, quiet_suspensions
from stm_live.devices.stm import ControllerLost, NanonisSTM
from stm_live.plans import live_frame
from stm_live.session import AcquisitionSession, Callback
from stm_live.viewer import Viewer, ViewerState

logger = logging.getLogger(__name__)

__all__ = ["run_scan"]


def run_scan(
    *,
    profile: str = "sim",
    host: str | None = None,
    port: int | None = None,
    width_nm: float = 5.0,
    pixels: int = 128,
    lines: int = 128,
    direction: str = "down",
    frames: int = 1,
    data_dir: str | os.PathLike = "stm_live_data",
    tiled_uri: str | None = None,
    tip_policy: str = "prompt",
    worker: str | None = None,
    view: bool = False,
    callbacks: Iterable[Callback] = (),
) -> list[str]:
    """``stm-live scan``: acquire ``frames`` live frames centred where the controller's
    frame is, journaled and ingested into tiled. Returns the run uids.

    ``tip_policy`` other than "off" runs the tip monitor (shipped classifier) and the
    reconditioning policy (:mod:`stm_live.reconditioning`); ``worker`` publishes the
    documents to a 0MQ proxy (:mod:`stm_live.streaming`); ``view`` serves the live viewer.
    """
    if tip_policy not in ("off", "prompt", "auto"):
        raise ValueError(f"tip_policy must be off, prompt or auto, not {tip_policy!r}")
    if direction not in ("down", "up"):
        raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
    prof = load_profile(profile)
    with LogFile(data_dir) as log, quiet_suspensions():
        print(log.note, flush=True)
        return _scan(
            prof,
            host=host,
            port=port,
            width_nm=width_nm,
            pixels=pixels,
            lines=lines,
            direction=direction,
            frames=frames,
            data_dir=data_dir,
            tiled_uri=tiled_uri,
            tip_policy=tip_policy,
            worker=worker,
            view=view,
            callbacks=callbacks,
        )


def _scan(
    prof,
    *,
    host,
    port,
    width_nm,
    pixels,
    lines,
    direction,
    frames,
    data_dir,
    tiled_uri,
    tip_policy,
    worker,
    view,
    callbacks,
) -> list[str]:
    """`stm-live scan` proper (see :func:`run_scan`)."""
    host = host or prof.host
    port = int(port or prof.port)
    width_m = float(width_nm) * 1e-9
    prof.check_pixels(pixels, lines)
    stm = NanonisSTM(host, port, name="stm", profile=prof, timeout=prof.timeout_s)
    viewer = state = None
    uids: list[str] = []
    lost: list[str] = []  # frames that failed because the link stayed down
    try:
        if view:
            state = ViewerState()
            viewer = Viewer(state)
            print(f"viewer: {viewer.url}", flush=True)
        centre = stm.client.scan_frame_get()
        # Live reconstruction in-process on its own thread, or on a remote worker over 0MQ
        # (its results journaled here); the tip monitor and policy in-process.
        with AcquisitionSession(
            data_dir,
            callbacks=callbacks,
            tiled=True,
            tiled_uri=tiled_uri,
            progress=True,
            live=worker is None,
            worker=worker,
            stm=stm,
            tip_policy=tip_policy,
            viewer_state=state,
            say=lambda text: print(text, flush=True),
        ) as session:
            # a stall or drop: the frame is suspended, reconnected, resumed; one line each
            session.watch(stm, say=lambda text: print(text, flush=True))
            for k in range(frames):
                try:
                    uids += session(
                        live_frame(
                            stm,
                            frame=(centre.center_x, centre.center_y, width_m, width_m, centre.angle_deg),
                            pixels=pixels,
                            lines=lines,
                            channels=list(prof.channel_indexes)[:2],
                            direction=direction,
                            md={"tip_policy": tip_policy},
                        )
                    )
                except ControllerLost as exc:
                    # the link stayed down past link.max_outage_s: that frame ends "fail" (its
                    # lines are journaled); the next one starts afresh. A controller that
                    # does not answer at a frame's start ends the scan (ConnectionLost).
                    logger.error("frame %d failed", k + 1, exc_info=exc)
                    lost.append(f"frame {k + 1}: {describe(exc)}")
                    print(f"frame {k + 1} failed: {describe(exc)}", flush=True)
            session.wait()
            if worker:  # bounded: the worker's final reconstructions, before closing the link
                for uid in uids:
                    if session.receiver.wait_final(uid, timeout=60.0) is None:
                        print(
                            f"run {uid}: no final reconstruction from the worker within 60 s; "
                            "the raw lines are in the journal",
                            flush=True,
                        )
            if session.tiled_error is not None:
                print(f"tiled unavailable ({session.tiled_error}); runs are in the journal", flush=True)
            if session.migrated:
                print(migrated_note(session.migrated), flush=True)
    finally:
        if viewer is not None:
            viewer.close()
        stm.close()
    for uid in uids:
        print(f"run {uid}: journal {Path(data_dir) / 'journal' / (uid + '.journal')}")
    if lost:
        raise ControllerLost(f"{len(lost)} of {frames} frames failed: {'; '.join(lost)}")
    return uids
