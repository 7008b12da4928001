"""A Bluesky suspender fed by the link to the controller.

:class:`LinkSuspender` suspends the run while the device's link (``stm.link``, a
:class:`~stm_live.devices.client.LinkState`) is down in the middle of a frame, and releases
it when the link is back, or when the outage outlived ``link.max_outage_s``: then the
rewound trigger fails with the device's error and the run ends "fail" with that reason. On
suspension the RunEngine calls ``stm.lines.pause()`` (the cursor goes back to the line after
the last checkpoint, or the one after it if its event already went out); on release
``resume()``, and the replayed trigger delivers that line from the lines the controller kept
scanning meanwhile (or from the scan started again, if it stopped).

Only a frame that has a checkpoint to rewind to is suspended: a suspender tripped before it
(or inside another suspender's pre-plan, which is not rewindable) would abort the plan; there
the client's own reconnecting rides through the outage.
"""

from __future__ import annotations

from bluesky.suspenders import SuspenderBase
from ophyd import Signal

__all__ = ["LinkSuspender", "put_on_loop"]

# LinkEvent.kind -> the value the suspender watches
_VALUES = {"down": "down", "back": "up", "spent": "lost", "closed": "lost"}


def put_on_loop(RE, signal, value) -> None:
    """``signal.put(value)`` on the RunEngine's loop (at once without one).

    For a suspender's signal put from another thread: bluesky makes the suspension event at
    once on its loop, whereas from another thread it waits 0.1 s for the loop, which a
    loaded machine can miss (the suspension then fails with "Could not create the suspender
    event")."""
    if RE is None:
        signal.put(value)
    else:
        RE.loop.call_soon_threadsafe(signal.put, value)


class LinkSuspender(SuspenderBase):
    """Suspends while ``stm.link`` is down mid-frame; resumes when it is up or lost.

    Parameters
    ----------
    stm : NanonisSTM
        The device whose link is watched (``stm.link``, ``stm.lines``).
    **kwargs
        As :class:`bluesky.suspenders.SuspenderBase` (``sleep``, ``pre_plan``, ...).
    """

    def __init__(self, stm, **kwargs):
        self.stm = stm
        super().__init__(Signal(name=f"{stm.name}_link", value=stm.link.state), **kwargs)
        self._watching = False

    def install(self, RE, *, event_type=None):
        super().install(RE, event_type=event_type)
        if not self._watching:
            self.stm.link.subscribe(self._on_link)
            self._watching = True

    def remove(self):
        self.stm.link.unsubscribe(self._on_link)
        self._watching = False
        super().remove()

    def _on_link(self, event) -> None:
        if self.RE is not None:
            put_on_loop(self.RE, self._sig, _VALUES[event.kind])

    def _should_suspend(self, value):
        RE = self.RE
        return value == "down" and RE is not None and RE.rewindable and self.stm.lines.in_frame

    def _should_resume(self, value):
        return value != "down"

    def _get_justification(self):
        link = self.stm.link
        return (
            f"link to {link.address} lost at line {self.stm.lines.resume_line} ({link.reason}); "
            f"reconnecting for up to {self.stm.max_outage_s:g} s"
        )
