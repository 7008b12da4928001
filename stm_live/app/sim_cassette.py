"""``stm-live sim serve --cassette SESSION.nrec [--cassette-only]``: the simulated controller
answering from a session recording first (``simulators.cassette.Cassette``).

Without ``--cassette-only`` the physics simulator answers what the recording never saw;
with it such a request gets a Nanonis-style error reply. The server speaks the recorded
controller's release unless ``--nanonis-release`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["serve"]


def serve(cassette: Path, *, only: bool = False, nanonis_release: int | None = None, **serve_options) -> None:
    """``server.serve_forever`` with the recording in front; ``nanonis_release`` None: the
    recording's (the default release when no client asked for it while recording)."""
    from stm_live.devices import protocol as P
    from stm_live.simulators.cassette import Cassette
    from stm_live.simulators.server import serve_forever

    tape = Cassette(cassette, fallback=not only, release=nanonis_release)
    if not len(tape):
        raise ValueError(f"{cassette}: the recording holds no replies")
    serve_forever(nanonis_release=nanonis_release or tape.recording.nanonis_release or P.DEFAULT_RELEASE,
                  cassette=tape, **serve_options)
