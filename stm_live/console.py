"""One-line reports of expected problems, shared by every command.

An expected fault (a bad file, a partial frame, a controller that refuses a command, a link
that drops) is one line naming what was wrong, never a traceback. Exceptions from deep in
the stack arrive wrapped (``FailedStatus`` from a RunEngine says only which status failed),
so :func:`describe` reports the innermost cause. Chains are followed with a seen-set: an
exception may be its own context's context, and an unguarded walk never ends.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["caused_by", "chain", "describe"]


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
