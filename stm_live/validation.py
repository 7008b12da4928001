"""Input checks shared by the profile, the client and the simulated controller."""

from __future__ import annotations

import math
from typing import Any


def finite(what: str, value: Any, error: type[Exception] = ValueError) -> float:
    """``value`` as a finite float, or ``error`` naming ``what`` and the bad value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{what}: must be finite, got {value!r}")
    return number
