"""Argument checks shared by the library: one clear ``ValueError`` naming the setting and its range."""

from __future__ import annotations

import math
import numbers


def check_number(value, name: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    """``value`` as an int (``integer``) or a finite float within [low, high] (open ends with
    ``low_open`` / ``high_open``); ``ValueError`` naming ``name`` and the range otherwise."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    span = f"{lo or '(-inf, '}{hi or 'inf)'}"
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            (integer and not isinstance(value, numbers.Integral)):
        raise ValueError(f"{name} must be {kind} in {span}, got {value!r}")
    v = int(value) if integer else float(value)
    if not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) or \
            (high is not None and (v >= high if high_open else v > high)):
        raise ValueError(f"{name} must be {kind} in {span}, got {value!r}")
    return v
