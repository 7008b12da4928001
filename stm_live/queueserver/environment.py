"""The queue server's worker environment: the microscope a YAML profile describes, the RunEngine,
the session's consumers (:func:`stm_live.session.build_consumers`, as every command wires them)
and what tells the operator why a plan paused.

The RE Manager imports :mod:`stm_live.queueserver.startup` in its worker process each time the
environment opens; ``stm-live queue start`` hands it the settings in ``STM_LIVE_QUEUE`` (JSON).

Why a plan paused goes where the queue server's clients look: ``qserver status`` (or
``REManagerAPI.status()``) says ``re_state: paused``, and while it is paused the RunEngine's
metadata holds the reason under ``stm_live_paused`` (``qserver re metadata``,
``REManagerAPI.send_request(method="re_metadata")``); the worker's console (published by the
RE Manager) has it in one line too. The ``prompt`` tip policy asks its question that way: the
plan pauses at the next line, and ``re resume`` answers yes (the proposed reconditioning runs,
then the frame goes on), ``re stop`` or ``re abort`` no.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["QueueSettings", "QueueEnvironment", "PauseReasons", "OperatorPrompt", "SETTINGS_ENV", "PAUSED_KEY"]

SETTINGS_ENV = "STM_LIVE_QUEUE"
PAUSED_KEY = "stm_live_paused"
# Under the queue server nobody answers at a keyboard: the question waits for the operator.
ASK_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class QueueSettings:
    """What ``stm-live queue start`` passes to the worker environment."""

    profile: str
    data_dir: str = "stm_live_data"
    tiled_uri: str | None = None
    live: bool = True  # live STM-Net reconstruction in the worker
    tip_policy: str | None = None  # None: the profile's
    device: str = "auto"

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> QueueSettings:
        text = environ.get(SETTINGS_ENV)
        if not text:
            raise ValueError(
                f"{SETTINGS_ENV} is not set: start the RE Manager with `stm-live queue start --profile FILE`"
            )
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{SETTINGS_ENV}: not stm-live queue settings ({exc})") from None


class PauseReasons:
    """Keeps why the RunEngine is paused in ``RE.md[PAUSED_KEY]`` while it is (a state hook),
    and says it in one line. ``reason`` set before a pause names it; otherwise the RunEngine's
    own pause message (the tip policy's give-up sets it), else "paused on request"."""

    def __init__(self, RE, say: Callable[[str], Any]):
        from bluesky.run_engine import PAUSE_MSG

        self.RE, self.say, self.reason = RE, say, None
        self._default = PAUSE_MSG
        self._changed = threading.Condition()
        self._watchers: list[list[tuple[str, str]]] = []
        self._previous = RE.state_hook
        RE.state_hook = self

    def __call__(self, new: str, old: str) -> None:
        if self._previous is not None:
            self._previous(new, old)
        if new == "paused":
            reason = self.reason or (self.RE.pause_msg if self.RE.pause_msg != self._default else "paused on request")
            self.RE.md[PAUSED_KEY] = reason
            self.say(f"paused: {reason}")
        elif old == "paused":
            self.RE.md.pop(PAUSED_KEY, None)
            self.reason = None
        with self._changed:
            for seen in self._watchers:
                seen.append((str(old), str(new)))
            self._changed.notify_all()

    def wait(self, done: Callable[[list[tuple[str, str]]], Any], start: Callable[[], Any]):
        """Call ``start``, then wait until ``done(transitions since)`` is true; return it. A
        state hook, not polling: an operator who answers within milliseconds is not missed."""
        seen: list[tuple[str, str]] = []
        with self._changed:
            self._watchers.append(seen)
        try:
            start()
            with self._changed:
                return self._changed.wait_for(lambda: done(seen))
        finally:
            with self._changed:
                self._watchers.remove(seen)


class OperatorPrompt:
    """The ``prompt`` policy's ``ask`` under the queue server: pause the plan at its next
    checkpoint, saying why, and wait for the operator. True when the plan is resumed (do what
    was proposed), False when it is stopped or aborted, or ended first."""

    def __init__(self, RE, reasons: PauseReasons):
        self.RE, self.reasons = RE, reasons

    def __call__(self, question: str) -> bool:
        from bluesky.utils import TransitionError

        self.reasons.reason = (
            f"{question} Resume the plan to recondition as proposed; stop or abort it to end the frame."
        )

        def answer(seen):  # the first way out of the pause; or the plan ended unpaused
            left = [new for old, new in seen if old == "paused"]
            return left[:1] or ([None] if any(new == "idle" for _, new in seen) else [])

        try:  # at the next line: the frame keeps what it has
            (state,) = self.reasons.wait(answer, lambda: self.RE.request_pause(defer=True))
        except TransitionError:  # not running: nothing to ask about
            state = None
        if state is None:
            self.reasons.reason = None
        return state == "running"


class QueueEnvironment:
    """The microscope, RunEngine and consumers of one worker environment, and its plans.

    Parameters
    ----------
    settings : QueueSettings
    say : callable(str)
        One-line notes (link faults, pauses); the startup module passes ``print``, which the
        RE Manager captures and publishes.
    RE : RunEngine, optional
    """

    def __init__(self, settings: QueueSettings, *, say: Callable[[str], Any] = logger.info, RE=None):
        from bluesky.run_engine import RunEngine

        from stm_live.config import load_profile
        from stm_live.devices.stm import NanonisSTM
        from stm_live.queueserver.plans import queue_plans
        from stm_live.session import AcquisitionSession

        self.settings = settings
        self.profile = load_profile(settings.profile)
        self.RE = RE if RE is not None else RunEngine({})
        self.reasons = PauseReasons(self.RE, say)
        self.stm = NanonisSTM(
            self.profile.host, self.profile.port, name="stm", profile=self.profile, timeout=self.profile.timeout_s
        )
        try:
            self.session = AcquisitionSession(
                settings.data_dir,
                RE=self.RE,
                tiled=True,
                tiled_uri=settings.tiled_uri,
                live=settings.live,
                device=settings.device,
                stm=self.stm,
                tip_policy=settings.tip_policy or self.profile.tip_policy,
                policy_options={"ask": OperatorPrompt(self.RE, self.reasons), "ask_timeout_s": ASK_TIMEOUT_S},
                say=say,
            )
            # a stall or drop: the frame is suspended, reconnected, resumed; one line each
            self.session.watch(self.stm, say=say)
        except BaseException:
            self.stm.close()
            raise
        self.plans = queue_plans(self.profile, lambda: self.stm)

    def close(self, timeout: float = 60.0) -> None:
        """Let the consumers finish (the last run into tiled), then let go of the controller."""
        t0 = time.monotonic()
        try:
            self.session.close(timeout)
        finally:
            self.stm.close()
            logger.info("queue environment closed in %.1f s", time.monotonic() - t0)
