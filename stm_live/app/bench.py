"""``stm-live bench``: the benchmarks in ``benchmarks/`` (packaged beside ``stm_live``), each
printing its table; ``make bench`` runs the same (``python -m benchmarks``)."""

from __future__ import annotations

from benchmarks.__main__ import run_all

__all__ = ["main"]


def main(only: str | None = None, argv: list[str] | None = None) -> int:
    """Run the benchmarks whose name contains ``only`` (all by default), handing them ``argv``;
    returns how many failed."""
    return run_all(only=only, argv=argv or None)
