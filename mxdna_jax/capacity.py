"""Compact-mode token capacity: one policy (initial, growth, maximum) for training, evaluation,
inference and the benchmarks.

A jitted compact forward cannot raise, so it reports `overflow` (some sequence has more tokens
than the capacity). The host checks the flag and re-runs the same call at a larger capacity, up
to the padded length, where overflow is impossible. Units are never silently dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class CapacityOverflowError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class CapacityPolicy:
    """`initial` token rows per sequence (None: the model has no capacity, e.g. 'original' mode),
    multiplied by `growth` after an overflow, never above `maximum` (the padded length)."""

    initial: int | None
    maximum: int | None
    growth: float = 1.5

    @classmethod
    def for_model(cls, cfg, length: int, *, growth: float = 1.5, fraction: float | None = None) -> CapacityPolicy:
        """The policy of a model config at padded length `length` (incl. [CLS]/[SEP]);
        `fraction` overrides cfg.token_capacity_fraction (benchmarks)."""
        if cfg.mode != "compact":
            return cls(None, None, growth)
        if fraction is not None:
            cfg = cfg.replace(token_capacity_fraction=fraction)
        return cls(cfg.token_capacity(length), length, growth)

    @property
    def enabled(self) -> bool:
        return self.initial is not None

    def grow(self, capacity: int) -> int:
        """The next capacity after an overflow at `capacity`."""
        if not self.enabled:
            raise CapacityOverflowError("overflow reported by a call that has no token capacity")
        if capacity >= self.maximum:  # cannot happen: L rows always hold every token
            raise CapacityOverflowError(f"overflow at the full length {capacity}: the call reports overflow "
                                        "where none is possible")
        return min(self.maximum, max(capacity + 1, math.ceil(capacity * self.growth)))

    def run(self, fn: Callable[[int | None], tuple[Any, Any]], capacity: int | None = None, *,
            on_retry: Callable[[int, int], None] | None = None, retry: bool = True) -> tuple[Any, int | None]:
        """`fn(capacity) -> (result, overflow)` at `capacity` (default: `initial`), re-run at the
        next capacity until it fits. Returns (result, the capacity that held)."""
        capacity = self.initial if capacity is None else capacity
        while True:
            result, overflow = fn(capacity)
            if not bool(overflow):
                return result, capacity
            if not retry:
                raise CapacityOverflowError(
                    f"a sequence has more tokens than the compact capacity {capacity}; raise "
                    "model.token_capacity_fraction or allow retries")
            new = self.grow(capacity)
            log.warning("compact token capacity %d overflowed; re-running at %d", capacity, new)
            if on_retry is not None:
                on_retry(capacity, new)
            capacity = new


def call_with_capacity(fn: Callable[[int], tuple[Any, Any]], capacity: int, length: int, *, retry: bool = True,
                       factor: float = 1.5) -> tuple[Any, int]:
    """`CapacityPolicy(capacity, length, factor).run(fn)`: for a call outside the trainer."""
    return CapacityPolicy(capacity, length, factor).run(fn, retry=retry)
