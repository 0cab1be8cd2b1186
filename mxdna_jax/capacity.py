"""Compact-mode capacity: run at a static token capacity, re-run larger on overflow.

A jitted compact forward cannot raise, so it reports `overflow` (some sequence has more tokens
than the capacity). The host checks the flag and re-runs the same call at a larger capacity, up
to the padded length, where overflow is impossible. Units are never silently dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class CapacityOverflowError(RuntimeError):
    pass


def grow(capacity: int, length: int, factor: float = 1.5) -> int:
    return min(length, max(capacity + 1, math.ceil(capacity * factor)))


def call_with_capacity(fn: Callable[[int], tuple[Any, Any]], capacity: int, length: int, *, retry: bool = True,
                       factor: float = 1.5) -> tuple[Any, int]:
    """fn(capacity) -> (result, overflow flag). Returns (result, capacity that held)."""
    while True:
        result, overflow = fn(capacity)
        if not bool(overflow):
            return result, capacity
        if not retry:
            raise CapacityOverflowError(
                f"a sequence has more tokens than the compact capacity {capacity}; raise "
                f"model.token_capacity_fraction or allow retries")
        if capacity >= length:  # cannot happen: L rows always hold every token
            raise CapacityOverflowError(f"overflow at full capacity {capacity} (length {length})")
        new = grow(capacity, length, factor)
        log.warning("compact token capacity %d overflowed; re-running at %d", capacity, new)
        capacity = new
