"""Tip policy: what happens when the tip monitor says the tip went bad (issue 7).

Policies (``Profile.tip_policy``):

``off``
    verdicts are only recorded.
``prompt``
    the operator is asked through ``ask(message) -> bool`` (the message names the verdict
    and the proposed action); no answer within ``ask_timeout_s`` means *don't act*. A yes
    runs the same reconditioning as ``auto``.
``auto``
    a Bluesky suspender (:class:`TipSuspender`, a :class:`bluesky.suspenders.SuspenderBase`
    driven by the monitor's verdict signal) suspends the frame at its last checkpoint. Its
    ``pre_plan`` (:meth:`TipReconditioner.recondition_plan`) stops the paused scan, runs
    :func:`stm_live.plans.recondition_tip` at the profile's clean site (never inside the
    imaged frame; bias and poke depth checked against the profile's limits) with the
    escalating action list, then verifies: the interrupted frame is restarted and its first
    ``verify_lines`` lines are classified. A good verdict releases the suspender and the
    frame resumes from its checkpoint (the restarted scan delivers the remaining lines; any
    the old tip had scanned ahead of the RunEngine are dropped and scanned again);
    otherwise the next action is tried, up to ``max_attempts``. Then it gives up: the
    RunEngine is paused with ``RE.pause_msg`` saying why; resuming (after fixing the tip by
    hand) restarts the scan and finishes the frame.

A stalled or dropped link does not break the loop: every step's controller calls reconnect and
re-send on their own (reads and absolute moves; a scan start only if the scan is not running;
a pulse or poke whose reply was lost is not repeated, the verification judges the tip), and
the time the link was down does not count against the verification's deadline.

A verdict "unknown" (the frame is outside what the classifier knows, ``tipdomain``) is neither
good nor bad, and no policy reconditions on it: ``off`` and ``auto`` record it once per frame
with the domain score and threshold; ``prompt`` asks the operator once per frame, saying so
(a yes is the operator's decision). It resets the count of bad verdicts, and lines an
"unknown" verdict judged never carry a later bad verdict: only one judged wholly on later lines
(a new tip's segment, the latest lines) may act. An "unknown" verification verdict stops the
escalation: the RunEngine is paused for the operator, as when reconditioning gives up.

Every step is recorded in the frame's run, stream ``tip_recondition`` (attempt, action,
parameters, verdict, outcome); each action's controller commands are also a
``recondition_tip`` run of their own (``run_key="recondition"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.run_engine import PAUSE_MSG
from bluesky.suspenders import SuspenderBase
from ophyd import Component as Cpt
from ophyd import Device, Signal

from stm_live.devices.signals import run_in_thread
from stm_live.interpret import CONSTANT_CURRENT, CONSTANT_HEIGHT, network_input
from stm_live.models import load_tip_classifier

# at import, not in the verdict callback: the first verdict must not wait for torch to load
from stm_live.models.tipstate import MIN_VERDICT_HEIGHT_NM, bad_probability, is_held_back, is_known_bad, is_unknown
from stm_live.plans import check_recondition, recondition_tip
from stm_live.suspenders import put_on_loop

log = logging.getLogger(__name__)

__all__ = ["TipSuspender", "TipReconditioner", "RECORD_STREAM", "POLICIES", "Attempt"]

POLICIES = ("off", "prompt", "auto")
RECORD_STREAM = "tip_recondition"
# Default escalation when no profile is given: gentle pulses first, then deeper pokes.
DEFAULT_ACTIONS = (
    ("bias_pulse", {"bias_V": 2.0, "width_s": 0.05}),
    ("bias_pulse", {"bias_V": 3.0, "width_s": 0.1}),
    ("poke", {"depth_m": 3.0e-10, "bias_V": 0.05, "lift_time_s": 0.1}),
    ("poke", {"depth_m": 1.2e-9, "bias_V": 0.05, "lift_time_s": 0.1}),
)


def _nearest(record: dict) -> str:
    probs = record.get("probabilities") or {}
    return max(probs, key=probs.get) if probs else "?"


def _domain_why(record: dict) -> str:
    """Why a verdict is not acted on: 'domain score 812 > threshold 410', or for a bad
    verdict held back 'class score 260 > blunt's action limit 240' (or what is known of it)."""
    held = is_held_back(record)
    keys = ("class_score", "action_limit") if held else ("domain_score", "domain_threshold")
    score, limit = (record.get(k, float("nan")) for k in keys)
    try:
        if held:
            return f"class score {float(score):.0f} > {record.get('label')}'s action limit {float(limit):.0f}"
        return f"domain score {float(score):.0f} > threshold {float(limit):.0f}"
    except (TypeError, ValueError):
        return "outside the classifier's domain"


class TipSuspender(SuspenderBase):
    """Suspends while the watched signal reads ``"bad"``; resumes when it reads anything else.

    The signal is :attr:`TipReconditioner.state` (``"good"`` / ``"bad"``), put by the tip
    policy from the monitor's verdicts; ``pre_plan`` does the reconditioning.
    """

    def __init__(self, signal, **kwargs):
        super().__init__(signal, **kwargs)
        self.justification = ""

    def _should_suspend(self, value):
        return value == "bad"

    def _should_resume(self, value):
        return value != "bad"

    def _get_justification(self):
        return self.justification or "tip monitor: tip went bad"


class _Record(Device):
    """What the frame's ``tip_recondition`` stream records for each step."""

    step = Cpt(Signal, value="", kind="hinted")
    attempt = Cpt(Signal, value=0)
    action = Cpt(Signal, value="")
    params = Cpt(Signal, value="{}")
    site_x = Cpt(Signal, value=0.0)
    site_y = Cpt(Signal, value=0.0)
    verdict = Cpt(Signal, value="")
    probabilities = Cpt(Signal, value="{}")
    good = Cpt(Signal, value=False)
    message = Cpt(Signal, value="")


class _Job:
    """Run a blocking function off the RunEngine loop; ``trigger()`` returns its Status."""

    def __init__(self, name: str, fn: Callable[[], Any]):
        self.name, self.parent, self._fn = name, None, fn
        self.result: Any = None

    def trigger(self):
        return run_in_thread(self, lambda: setattr(self, "result", self._fn()))


@dataclass
class Attempt:
    attempt: int
    action: str
    params: dict
    verdict: str
    good: bool
    probabilities: dict = field(default_factory=dict)


class TipReconditioner:
    """Tip policy + suspender + automatic reconditioning loop.

    Parameters
    ----------
    stm : NanonisSTM
        The microscope (its ``profile`` gives limits, clean site, actions, attempts).
    policy : {"off", "prompt", "auto"}, optional
        Default: ``stm.profile.tip_policy`` (or ``"prompt"``).
    classifier : object with ``classify(image, pixel_size_nm)``, optional
        For the verification frame (default: the shipped tip classifier).
    ask : callable(str) -> bool, optional
        The operator prompt (``prompt`` policy); called on a helper thread.
    ask_timeout_s : float
        No answer by then means "don't act".
    site, actions, max_attempts : optional
        Override the profile's ``recondition`` block (site in m, actions as
        ``(kind, params)``).
    verify_lines : int
        Lines of the restarted frame the classifier judges after each action (the frame's
        first lines: the same molecules the frame started with).
    consecutive : int
        Bad verdicts in a row needed to act.
    min_bad_probability : float
        A verdict counts as bad only if the bad classes together have at least this
        probability (an unsure classifier does not stop a frame).
    monitor : TipMonitor, optional
        Told where the new tip starts, so stale lines do not re-trip the policy.
    """

    def __init__(
        self,
        stm,
        *,
        policy: str | None = None,
        classifier=None,
        ask: Callable[[str], bool] | None = None,
        ask_timeout_s: float = 30.0,
        site: tuple[float, float] | None = None,
        actions=None,
        max_attempts: int | None = None,
        verify_lines: int = 32,
        verify_timeout_s: float = 60.0,
        consecutive: int = 1,
        min_bad_probability: float = 0.6,
        monitor=None,
    ):
        profile = getattr(stm, "profile", None)
        policy = policy or (profile.tip_policy if profile is not None else "prompt")
        if policy not in POLICIES:
            raise ValueError(f"tip policy must be one of {POLICIES}, got {policy!r}")
        rec = profile.recondition if profile is not None else None
        if site is None:
            if rec is None:
                raise ValueError("TipReconditioner needs a clean site: pass site=(x_m, y_m) or a profile")
            site = rec.clean_site_m
        if actions is None:
            actions = [(a.kind, dict(a.params)) for a in rec.actions] if rec is not None else list(DEFAULT_ACTIONS)
        actions = [(str(k), dict(p)) for k, p in actions]
        if not actions:
            raise ValueError("TipReconditioner: the action list is empty")
        for kind, params in actions:
            if kind not in ("bias_pulse", "poke"):
                raise ValueError(f"recondition action kind must be bias_pulse or poke, got {kind!r}")
            if profile is not None and "bias_V" in params:
                profile.check_bias(params["bias_V"])  # refuse a bad profile before any scan
        self.stm = stm
        self.policy = policy
        self.site = (float(site[0]), float(site[1]))
        self.actions = actions
        self.max_attempts = int(
            max_attempts if max_attempts is not None else (rec.max_attempts if rec is not None else len(actions))
        )
        self._classifier = classifier
        self.ask = ask
        self.ask_timeout_s = float(ask_timeout_s)
        self.verify_lines = int(verify_lines)
        self.verify_timeout_s = float(verify_timeout_s)
        self.consecutive = max(1, int(consecutive))
        self.min_bad_probability = float(min_bad_probability)
        self.monitor = monitor
        self.state = Signal(name="tip_state", value="good")
        self.suspender = TipSuspender(self.state, pre_plan=self.recondition_plan)
        self.record = _Record(name="tip_recondition")
        self.attempts: list[Attempt] = []
        self.events: list[dict] = []  # everything the policy did, in order
        self.give_up_reason: str | None = None
        self.RE = None
        self._lock = threading.Lock()
        self._busy = False
        self._bad_in_row = 0
        self._trigger_verdict: dict | None = None
        self._floor: tuple[str | None, int] = (None, -1)  # (run uid, first line of the new tip)
        self._rescanned = 0  # lines the old tip had scanned ahead of the RunEngine (last repair)
        self._open_run: str | None = None
        self._unknown_runs: set = set()  # frames whose "unknown" verdict was noted (or asked)
        self._unknown_upto: dict = {}  # frame run uid -> last line an "unknown" verdict judged
        self._token = None

    # ------------------------------------------------------------------ wiring
    @property
    def classifier(self):
        if self._classifier is None:
            self._classifier = load_tip_classifier()
        return self._classifier

    def install(self, RE) -> None:
        """Install the suspender on ``RE`` (policies ``prompt`` and ``auto``)."""
        self.RE = RE
        self._token = RE.subscribe(self._track_runs)
        if self.policy != "off":
            RE.install_suspender(self.suspender)

    def _track_runs(self, name: str, doc: dict) -> None:
        """Remember the open live-frame run: verdicts about any other run are stale."""
        if name == "start" and "stm_live" in doc:
            self._open_run = doc["uid"]
        elif name == "stop" and doc.get("run_start") == self._open_run:
            self._open_run = None

    def remove(self) -> None:
        if self.RE is not None:
            self.RE.unsubscribe(self._token)
            if self.policy != "off":
                self.RE.remove_suspender(self.suspender)

    def _note(self, what: str, **info) -> None:
        entry = {"time": time.time(), "what": what, **info}
        self.events.append(entry)
        log.info("tip policy: %s %s", what, info)

    # ------------------------------------------------------------------ verdicts in
    def on_verdict(self, record: dict) -> None:
        """Feed a TipMonitor verdict (``TipMonitor(on_verdict=rec.on_verdict)``)."""

        with self._lock:
            uid, first = self._floor
            if uid is not None and record.get("run_uid") == uid and record.get("first_line", 0) < first:
                return  # judged lines taken before the tip was reconditioned
            # outside what the classifier knows, or a bad verdict beyond its class's action limit:
            # never acted on
            unknown = is_unknown(record) or is_held_back(record)
            if unknown:
                self._bad_in_row = 0
                ask = self._unknown(record)
            elif (
                not is_known_bad(record) or bad_probability(record.get("probabilities", {})) < self.min_bad_probability
            ):
                self._bad_in_row = 0
                return
        if unknown:
            if ask:
                threading.Thread(
                    target=self._prompt, args=(record, self._unknown_message(record)), name="tip-prompt", daemon=True
                ).start()
            return
        with self._lock:
            # "end of frame; the latest 20 lines" is an end-of-frame verdict too
            if (
                self._busy
                or str(record.get("reason", "")).startswith("end of frame")
                or (self.RE is not None and record.get("run_uid") != self._open_run)
            ):
                # Already handling it, or the verdict's frame is over: a suspend between
                # runs would record into a closed run.
                return
            judged_unknown = self._unknown_upto.get(record.get("run_uid"), -1)
            if record.get("first_line", 0) <= judged_unknown:
                # These lines were judged outside the domain before: a verdict on them that slips
                # under the threshold is no evidence to act on. Lines after them (a new tip's
                # segment, the latest lines) may still show a bad tip.
                log.debug(
                    "tip policy: bad verdict at line %s rests on lines judged unknown (to line %s)",
                    record.get("line"),
                    judged_unknown,
                )
                return
            self._bad_in_row += 1
            if self._bad_in_row < self.consecutive:
                return
            if self.policy == "off":
                self._note("bad tip (policy off: no action)", verdict=record["label"], line=record.get("line"))
                self._bad_in_row = 0
                return
            self._busy = True
        kind, params = self.actions[0]
        msg = (
            f"Tip looks {record['label']!r} (p = {record['probabilities'][record['label']]:.2f}, "
            f"s share {record['s_fraction']:.2f}) at line {record.get('line')}. Proposed: suspend the "
            f"frame and recondition at the clean site ({self.site[0]:.3g}, {self.site[1]:.3g}) m, "
            f"starting with {kind} {params}. Recondition now?"
        )
        if self.policy == "auto":
            self._trip(record, "auto")
        else:
            threading.Thread(target=self._prompt, args=(record, msg), name="tip-prompt", daemon=True).start()

    def _unknown(self, record: dict) -> bool:
        """An "unknown" verdict (lock held): recorded once per frame, and under ``prompt``
        the operator is asked once per frame; no policy acts on it. True: ask now."""
        run = record.get("run_uid")
        self._unknown_upto[run] = max(self._unknown_upto.get(run, -1), int(record.get("line", 0)))
        if run in self._unknown_runs:
            log.debug("tip policy: unknown verdict at line %s (already noted for this frame)", record.get("line"))
            return False
        self._unknown_runs.add(run)
        why = _domain_why(record)
        over = str(record.get("reason", "")).startswith("end of frame")
        if self.policy == "prompt" and not self._busy and not over and (self.RE is None or run == self._open_run):
            self._busy = True
            return True
        held = is_held_back(record)
        kind = "held-back bad verdict" if held else "unknown verdict"
        never = (
            "auto never acts on a bad verdict beyond its class's action limit"
            if held
            else "auto never acts outside the classifier's domain"
        )
        what = {
            "off": f"{kind} (policy off: recorded)",
            "auto": f"{kind}: no action ({never})",
            "prompt": f"{kind}: not asked (busy, or the frame is over)",
        }[self.policy]
        self._note(what, verdict=record.get("label"), nearest=_nearest(record), line=record.get("line"), why=why)
        return False

    def _unknown_message(self, record: dict) -> str:
        kind, params = self.actions[0]
        if is_held_back(record):
            doubt = (
                f"the tip looks {record.get('label')!r}, but the frame lies farther from that class's "
                f"training frames than it acts on ({_domain_why(record)})"
            )
        else:
            doubt = (
                f"the frame is outside what it knows ({_domain_why(record)}), so its probabilities "
                f"(nearest class {_nearest(record)!r}) cannot be trusted"
            )
        return (
            f"The tip classifier cannot judge the tip at line {record.get('line')}: {doubt}, and nothing "
            f"is done automatically. Recondition anyway at the clean site ({self.site[0]:.3g}, {self.site[1]:.3g}) m, "
            f"starting with {kind} {params}?"
        )

    def _prompt(self, record: dict, msg: str) -> None:
        answer: list = []
        done = threading.Event()

        def ask():
            try:
                answer.append(bool(self.ask(msg)) if self.ask is not None else False)
            except Exception as exc:
                log.warning("operator prompt failed: %s", exc)
                answer.append(False)
            done.set()

        threading.Thread(target=ask, name="tip-ask", daemon=True).start()
        answered = done.wait(self.ask_timeout_s)
        yes = answered and answer and answer[0]
        self._note("prompt", message=msg, answer=("yes" if yes else "no" if answered else "timeout (no action)"))
        if yes:
            self._trip(record, "operator")
        else:
            with self._lock:
                self._busy = False
                self._bad_in_row = 0

    def _trip(self, record: dict, by: str) -> None:
        self._trigger_verdict = record
        self.suspender.justification = (
            f"tip monitor: tip {record['label']!r} at line {record.get('line')} "
            f"(change at line {record.get('change_line')}); reconditioning ({by})"
        )
        self._note("suspend", verdict=record["label"], line=record.get("line"), by=by)
        put_on_loop(self.RE, self.state, "bad")  # called from the monitor's thread

    # ------------------------------------------------------------------ the plan
    def _write(self, **values) -> None:
        for k, v in values.items():
            getattr(self.record, k).put(v)

    def _rec(self, step: str, **values):
        defaults = {
            "attempt": 0,
            "action": "",
            "params": "{}",
            "verdict": "",
            "probabilities": "{}",
            "good": False,
            "message": "",
            "site_x": self.site[0],
            "site_y": self.site[1],
        }
        defaults.update(values)
        self._write(step=step, **defaults)
        if self._open_run is None and self.RE is not None:  # the frame's run already closed
            return (yield from bps.null())
        yield from bps.trigger_and_read([self.record], name=RECORD_STREAM)

    def _geometry(self) -> dict:
        """Frame, buffer and scan direction of the interrupted scan (blocking; job thread)."""
        stm = self.stm
        with self._client() as c:
            f = c.scan_frame_get()
            b = c.scan_buffer_get()
            z_on = bool(c.z_ctrl_on_off_get())
            z_m = float(c.z_ctrl_z_pos_get())
            bias = float(c.bias_get())
        return {
            "z_on": z_on,
            "z_m": z_m,
            "bias_V": bias,
            "frame": (f.center_x, f.center_y, f.width, f.height, f.angle_deg),
            "channels": list(b.channel_indexes),
            "pixels": int(b.pixels),
            "lines": int(b.lines),
            "direction": stm.scan_direction.get(),
            "resume_line": int(stm.lines.resume_line),
        }

    @contextlib.contextmanager
    def _client(self):
        """The device's command connection (the controller takes 4 connections at most, and
        the line follower holds two more), serialised with the device's own calls."""
        with getattr(self.stm, "_lock", contextlib.nullcontext()):
            yield self.stm.client

    @staticmethod
    def _restore(c, geo: dict) -> None:
        """Put back the frame's bias and Z mode (and height, at constant height):
        reconditioning leaves the Z controller on."""
        c.bias_set(geo["bias_V"])
        if not geo["z_on"]:
            c.z_ctrl_on_off_set(False)
            c.z_ctrl_z_pos_set(geo["z_m"])
        else:
            c.z_ctrl_on_off_set(True)

    def _verify(self, geo: dict):
        """Restart the interrupted frame; classify its first ``verify_lines`` lines, and at
        least ``tipstate.MIN_VERDICT_HEIGHT_NM`` of it (job thread)."""

        channel = 30 if geo["z_on"] else 0
        if channel not in geo["channels"]:
            channel = geo["channels"][0]
        line_nm = geo["frame"][3] / geo["lines"] * 1e9
        n = min(max(self.verify_lines, int(np.ceil(MIN_VERDICT_HEIGHT_NM / line_nm))), geo["lines"])
        link = self.stm.link
        deadline = time.monotonic() + self.verify_timeout_s
        down_before = link.outage_total_s
        self._restart(geo)
        while True:
            # the client rides through a stall or drop on its own (a grab is a read, sent again)
            with self._client() as c:
                data = c.scan_frame_data_grab(channel, forward=True, shape=(geo["lines"], geo["pixels"])).data
            done = np.isfinite(data).all(axis=1)
            if done[:n].all():
                break
            # time the link was down is the link's, not a slow verification's
            if time.monotonic() > deadline + link.outage_total_s - down_before + link.outage_s:
                raise TimeoutError(f"tip verification: fewer than {n} lines within {self.verify_timeout_s} s")
            time.sleep(0.02)
        # Rows past the n-th count as not scanned, as in the live frames the monitor judges: a crop
        # ending at its last row would show a molecule cut there as a jump between lines.
        image = data.astype(np.float64)
        image[n:] = np.nan
        pixel_nm = geo["frame"][2] / geo["pixels"] * 1e9
        # read as every other frame is (stm_live.interpret): Z levelled and converted, |I|
        net_in = network_input(
            image,
            channel="Z" if channel == 30 else "Current",
            mode=CONSTANT_CURRENT if channel == 30 else CONSTANT_HEIGHT,
            unit="m" if channel == 30 else "A",
            pixel_size_nm=pixel_nm,
            line_spacing_nm=line_nm,
        )
        self.last_verify_image = net_in.image[:n]  # for the record / viewer
        return self.classifier.classify(net_in.image, pixel_nm, line_spacing_nm=line_nm)

    def _restart(self, geo: dict) -> None:
        """Restart the interrupted frame's scan. Lines buffered from the checkpoint on are the
        old tip's (or a failed attempt's): the device forgets them, the new scan resends them."""
        self._rescanned = max(self._rescanned, self.stm.lines.rescan_from_cursor())
        with self._client() as c:
            self._restore(c, geo)
            c.scan_action("start", direction=geo["direction"])

    def _stop_scan(self):
        yield from bps.mv(self.stm.scan_action, "stop")

    def recondition_plan(self):
        """The suspender's pre-plan: recondition, verify, retry, resume or give up.

        Whatever ends it (success, give-up then resume, or an abort while paused), the
        suspender is released and the policy re-armed.
        """
        return (yield from bpp.finalize_wrapper(self._recondition(), self._rearm()))

    def _rearm(self):

        if self.RE is not None and self.give_up_reason and self.RE.pause_msg == self.give_up_reason:
            self.RE.pause_msg = PAUSE_MSG
        with self._lock:
            self._busy = False
            self._bad_in_row = 0
        self.state.put("good")
        yield from bps.null()

    def _recondition(self):

        verdict = self._trigger_verdict or {}
        self._rescanned = 0
        job = _Job("geometry", self._geometry)
        yield from bps.trigger(job, wait=True)
        geo = job.result
        cx, cy, w, h, ang = geo["frame"]
        yield from self._rec(
            "suspended",
            verdict=str(verdict.get("label", "")),
            probabilities=json.dumps(verdict.get("probabilities", {})),
            message=self.suspender.justification,
        )
        yield from self._stop_scan()

        success, stopped, attempt = False, "", 0
        for attempt in range(1, self.max_attempts + 1):
            kind, params = self.actions[min(attempt - 1, len(self.actions) - 1)]
            self._note("action", attempt=attempt, kind=kind, params=params)
            action = dict(site=self.site, method=kind, frame_to_avoid=(cx, cy, w, h, ang), **params)
            try:
                check_recondition(self.stm, **action)
            except ValueError as exc:  # a limit refuses the action: record it, try the next
                self.attempts.append(Attempt(attempt, kind, params, "", False))
                yield from self._rec(
                    "refused", attempt=attempt, action=kind, params=json.dumps(params), message=f"refused: {exc}"
                )
                continue
            yield from bpp.set_run_key_wrapper(
                recondition_tip(self.stm, md={"purpose": "tip reconditioning", "attempt": attempt}, **action),
                "recondition",
            )
            job = _Job("verify", lambda: self._verify(geo))
            yield from bps.trigger(job, wait=True)
            v = job.result
            self.attempts.append(Attempt(attempt, kind, params, v.label, v.good, dict(v.probabilities)))
            unknown = is_unknown(v) or v.held_back
            detail = (
                f"unknown: the verification frame is outside what the classifier knows "
                f"({_domain_why(v.to_dict())}; nearest {v.nearest} {v.confidence:.2f})"
                if is_unknown(v)
                else f"{v.label} ({v.confidence:.2f}), held back: {_domain_why(v.to_dict())}"
                if unknown
                else f"{v.label} ({v.confidence:.2f})"
            )
            yield from self._rec(
                "verified",
                attempt=attempt,
                action=kind,
                params=json.dumps(params),
                verdict=v.label,
                probabilities=json.dumps(v.probabilities),
                good=v.good,
                message=f"{kind} then verify: {detail}",
            )
            self._note("verify", attempt=attempt, verdict=v.label, good=v.good)
            if v.good:
                success = True
                break
            yield from self._stop_scan()
            if unknown:  # no verdict to act on: no further action, the operator decides
                stopped = detail
                break
        if not success:
            tried = ", ".join(f"{a.action}->{a.verdict or 'refused'}" for a in self.attempts[-attempt:])
            if stopped:
                reason = (
                    f"Tip reconditioning stopped after attempt {attempt} ({tried}): {stopped}, so it cannot "
                    f"tell whether the tip is good, and no further action is taken on that. Check the tip "
                    f"by hand, then RE.resume() to finish the frame (or RE.abort())."
                )
            else:
                reason = (
                    f"Tip reconditioning gave up after {self.max_attempts} attempts ({tried}); the tip is "
                    f"still bad. Fix the tip by hand, then RE.resume() to finish the frame "
                    f"(or RE.abort())."
                )
            self.give_up_reason = reason
            self._note("give up", reason=reason)
            yield from self._rec("gave up", message=reason)
            if self.RE is not None:
                self.RE.pause_msg = reason
            yield from bps.pause()
            # the operator resumed: restart the frame so the remaining lines arrive
            job = _Job("restart", lambda: self._restart(geo))
            yield from bps.trigger(job, wait=True)
            yield from self._rec("operator resumed", message="resumed after manual tip repair")
        # The scan was restarted while suspended, so lines may have arrived meanwhile:
        # re-assert the device's pause (scan paused, cursor back on the last triggered
        # line) so the RunEngine's replay re-delivers exactly the interrupted line.
        lines = getattr(self.stm, "lines", None)
        if lines is not None and hasattr(lines, "pause"):
            lines.pause()
        uid = self._run_uid()
        with self._lock:
            self._floor = (uid, geo["resume_line"])
            self._bad_in_row = 0
            self._busy = False
        if self.monitor is not None:
            self.monitor.set_segment_floor(geo["resume_line"])
        rescanned = self._rescanned
        rescan = f"; {rescanned} lines the old tip had scanned ahead are scanned again" if rescanned else ""
        yield from self._rec("resumed", message=f"frame resumes; new tip from line {geo['resume_line']}{rescan}")
        self._note("resume", from_line=geo["resume_line"], success=success, rescanned_lines=rescanned)
        self.state.put("good")  # releases the suspender: the frame rewinds to its checkpoint

    def _run_uid(self) -> str | None:
        v = self._trigger_verdict or {}
        return v.get("run_uid")
