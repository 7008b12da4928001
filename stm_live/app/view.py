"""``stm-live view``: the live viewer (:mod:`stm_live.viewer`) on 127.0.0.1 until Ctrl-C,
following the runs journaled in a data folder, or showing one run stored in tiled."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from stm_live.viewer import JournalFollower, Viewer, ViewerState, show_stored_run

__all__ = ["run_viewer"]


def run_viewer(
    *, port: int = 8765, data_dir: str | Path = "stm_live_data", tiled_uri: str | None = None, run: str = "latest"
) -> None:
    """``stm-live view``: serve the page and follow the journals in ``data_dir``; given
    ``tiled_uri``, show ``run`` as stored in that tiled server instead."""
    state = ViewerState()
    follower = None
    if tiled_uri:
        from tiled.client import from_uri  # noqa: PLC0415 - 0.3 s: only to show a run stored in tiled

        shown = show_stored_run(state, from_uri(tiled_uri), run)
        what = f"run {shown} from tiled at {tiled_uri.split('?')[0]}"
    else:
        follower = JournalFollower(data_dir, state)
        follower.start()
        what = f"following {Path(data_dir) / 'journal'}"
    viewer = Viewer(state, port=port)
    # Ctrl-C stops it even when started with SIGINT ignored (from a script's background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"stm-live viewer at {viewer.url}: {what} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if follower is not None:
            follower.stop()
        viewer.close()
