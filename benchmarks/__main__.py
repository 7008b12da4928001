"""Run every benchmarks/bench_*.py module's ``main()`` and print its table.

``make bench`` and ``stm-live bench`` both land here. ``python -m benchmarks NAME ARGS...``
runs the benchmarks whose name contains NAME and hands them ARGS (e.g. ``gpu --smoke``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def run_all(only: str | None = None, argv: list[str] | None = None) -> int:
    here = Path(__file__).parent
    failures = 0
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if not info.name.startswith("bench_") or (only and only not in info.name):
            continue
        print(f"\n=== {info.name} ===", flush=True)
        started = time.perf_counter()
        try:
            main = importlib.import_module(f"benchmarks.{info.name}").main
            main(argv) if argv else main()
        except Exception as exc:  # one broken benchmark must not hide the others
            failures += 1
            print(f"FAILED: {type(exc).__name__}: {exc}")
        print(f"({time.perf_counter() - started:.1f} s)", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if run_all(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]) else 0)
