"""One-line reports of expected problems, shared by every command.

An expected fault (a bad file, a partial frame, a controller that refuses a command, a link
that drops) is one line naming what was wrong, never a traceback. Exceptions from deep in
the stack arrive wrapped (``FailedStatus`` from a RunEngine says only which status failed),
so :func:`describe` reports the innermost cause. Chains are followed with a seen-set: an
exception may be its own context's context, and an unguarded walk never ends.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

__all__ = [
    "caused_by",
    "chain",
    "describe",
    "LinkReporter",
    "LogFile",
    "LOG_NAME",
    "migrated_note",
    "quiet_suspensions",
]

LOG_NAME = "stm-live.log"
logger = logging.getLogger(__name__)


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts, outermost first, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def caused_by(exc: BaseException | None, kind: type[BaseException] | tuple) -> bool:
    """Whether ``exc`` or anything in its chain is a ``kind``."""
    return any(isinstance(e, kind) for e in chain(exc))


def describe(exc: BaseException) -> str:
    """The innermost cause (not a ``FailedStatus``) as one line: its message alone for a
    ValueError (whose text names the problem), else ``Type: message``."""
    links = list(chain(exc))
    # A status failure only says which status failed, and may sit anywhere in a cycle with
    # its cause: report the innermost link that is something else.
    inner = next((e for e in reversed(links) if type(e).__name__ != "FailedStatus"), links[-1])
    text = " ".join(str(inner).split())
    if isinstance(inner, ValueError) and text:
        return text
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def table_console():
    """A rich console for wide tables: the terminal's width, or 150 columns when the output is
    not a terminal (a pipe or a file would cut the tables at 80)."""
    console = Console()
    return console if console.is_terminal else Console(width=150)


def migrated_note(uids) -> str:
    """The line saying runs stored in stm-live's old tiled layout were rewritten (once)."""
    return f"tiled: {len(uids)} run(s) stored in stm-live's own layout were rewritten in the BlueskyRun layout (once)"


class LinkReporter:
    """One line per link fault, saying what happened and what stm-live does about it.

    Subscribed to the device's link state (``stm.link``); ``say(text)`` prints. Given the
    RunEngine it counts the session's live frames (1-based, as the console numbers them)::

        link to 127.0.0.1:6501 lost at line 56 of frame 2 (...); reconnecting…
        link back after 3.2 s; frame 2 resumes at line 56
    """

    def __init__(self, stm, say: Callable[[str], object], *, RE=None):
        self.stm, self.say = stm, say
        self.frame = 0  # live frames started so far
        self._open: str | None = None  # the live frame's run uid while it is open
        self._RE, self._token = RE, None
        if RE is not None:
            self._token = RE.subscribe(self._documents)
        stm.link.subscribe(self)

    def _documents(self, name: str, doc: dict) -> None:
        if name == "start" and "stm_live" in doc:
            self.frame += 1
            self._open = doc["uid"]
        elif name == "stop" and doc.get("run_start") == self._open:
            self._open = None

    def _where(self) -> str:
        if self._open is None:
            return " (between frames)" if self._RE is not None else ""
        return f" at line {self.stm.lines.resume_line} of frame {self.frame}"

    def __call__(self, event) -> None:
        if event.kind == "down":
            self.say(f"link to {event.address} lost{self._where()} ({event.reason}); reconnecting…")
        elif event.kind == "back":
            resumes = (
                f"; frame {self.frame} resumes at line {self.stm.lines.resume_line}" if self._open is not None else ""
            )
            tries = "" if event.attempts == 1 else f", {event.attempts} attempts"
            self.say(f"link back after {event.outage_s:.1f} s{tries}{resumes}")
        elif event.kind == "spent":
            ends = (
                f': frame {self.frame} ends "fail" at line {self.stm.lines.resume_line}; the next frame '
                "starts when the controller answers"
                if self._open is not None
                else ""
            )
            self.say(
                f"link to {event.address} not back within {self.stm.max_outage_s:g} s (profile link.max_outage_s){ends}"
            )

    def close(self) -> None:
        self.stm.link.unsubscribe(self)
        if self._token is not None:
            self._RE.unsubscribe(self._token)
            self._token = None


class LogFile:
    """Log records of a session, tracebacks included, go to ``data_dir/stm-live.log``
    instead of the terminal (the console keeps the one-line reports); ``note`` is the line
    that says so. ``close()`` restores the logging set-up."""

    def __init__(self, data_dir: str | os.PathLike, *, name: str = LOG_NAME):
        self.path = Path(data_dir) / name
        self.note = f"log: {self.path} (details and tracebacks of anything that goes wrong)"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
        self._ours = logging.getLogger("stm_live")
        self._level = self._ours.level
        self._ours.setLevel(logging.INFO)  # stm-live's own notes too; others' warnings and errors
        logging.getLogger().addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        self._ours.setLevel(self._level)

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What bluesky prints around every suspension (RunEngine.request_suspend, SuspenderBase): five
# lines per fault, where stm-live's own reports (LinkReporter, the tip policy) say it in one.
_CHATTER = ("Suspending....", "Suspension occurred at ", "Justification for this suspension:")


def _quiet_print(*args, **kwargs) -> None:
    text = str(args[0]) if args else ""
    if text.startswith(_CHATTER) or (text.startswith("Suspender ") and "return to nominal" in text):
        logger.info("bluesky: %s", " ".join(text.split()))  # kept in the log file
        return
    builtins.print(*args, **kwargs)


@contextlib.contextmanager
def quiet_suspensions():
    """Within: bluesky's suspend/resume printout goes to the log instead of the terminal
    (its other messages still print). For console sessions that report faults themselves."""
    # here: bluesky (0.5 s) only for the sessions that run it, not for `stm-live reconstruct`
    import bluesky.run_engine  # noqa: PLC0415 - bluesky: 0.5 s that reconstruct does not need
    import bluesky.suspenders  # noqa: PLC0415 - bluesky: 0.5 s that reconstruct does not need

    modules = (bluesky.run_engine, bluesky.suspenders)
    saved = [m.__dict__.get("print") for m in modules]
    for m in modules:
        m.print = _quiet_print  # the module's global shadows the builtin for its own calls
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            if old is None:
                del m.print
            else:
                m.print = old
