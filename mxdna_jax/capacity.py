"""Compact-mode token capacity: one policy (initial, growth, maximum, bucket ladder) for training,
evaluation, inference and the benchmarks.

A jitted compact forward cannot raise, so it reports `overflow` (some sequence has more tokens
than the capacity). The host checks the flag and re-runs the same call at a larger capacity, up
to the padded length, where overflow is impossible. Units are never silently dropped.

A capacity that follows the data. A trained router makes ~1 token per 5 nt, so the default
initial capacity (0.5 x L) runs the token layers on ~2.4x the rows they need. Capacities are
taken from a fixed geometric ladder (`buckets`), so a run compiles a bounded set of shapes and
every one stays in jit's cache:
- inference knows the batch's token count before the token layers run (mxdna_jax.staged: the
  nucleotide layers and the tokenizer in one jitted call, the rest in another), so it runs at
  `bucket_for(count)` and never retries;
- training and loss evaluation run the whole step in one call, so the capacity is predicted from
  the counts already seen (`CapacityTracker`): the smallest bucket holding the recent maximum
  plus a margin; it grows at once when a batch comes close, shrinks only after `patience`
  consecutive batches that would fit a smaller bucket, and the overflow retry stays the net.
  (Counting first in training too would run the nucleotide layers' forward twice, ~+18% of a
  base train step at L = 1,024, more than the prediction's headroom costs in the token layers.)
A new capacity is a new compilation (seconds to a minute): `Rungs` lets an already compiled rung
a little above the wanted one serve until the wanted one keeps coming back, and a training run
with fewer than `min_remaining` steps left compiles no new capacity.
"""

from __future__ import annotations

import dataclasses
import functools
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
    multiplied by `growth` after an overflow, never above `maximum` (the padded length).

    `adaptive`: the capacity follows the observed token counts (`tracker`), and the capacities
    it picks, retries included, are rungs of the ladder `buckets`: geometric steps of
    `bucket_step`, rounded up to multiples of `bucket_multiple` (accelerator tiles), capped at
    `maximum`. Not adaptive: the fixed policy (initial, then x growth on overflow, unrounded)."""

    initial: int | None
    maximum: int | None
    growth: float = 1.5
    adaptive: bool = False
    margin: float = 0.05  # headroom over the recent maximum count (training)
    patience: int = 10  # consecutive batches fitting a smaller bucket before shrinking to it
    bucket_step: float = 0.0625
    bucket_multiple: int = 8
    reuse: float = 0.25  # an already compiled rung up to (1 + reuse) x the wanted one may serve ...
    compile_after: int = 3  # ... until the wanted one has come back this many times (`Rungs`)
    min_remaining: int = 100  # training: no new compilation to move to with fewer steps left

    @classmethod
    def for_model(cls, cfg, length: int, *, growth: float = 1.5, fraction: float | None = None,
                  **kw) -> CapacityPolicy:
        """The policy of a model config at padded length `length` (incl. [CLS]/[SEP]);
        `fraction` overrides cfg.token_capacity_fraction (benchmarks); `kw`: the adaptive fields."""
        if cfg.mode != "compact":
            return cls(None, None, growth, **kw)
        if fraction is not None:
            cfg = cfg.replace(token_capacity_fraction=fraction)
        return cls(cfg.token_capacity(length), length, growth, **kw)

    @property
    def enabled(self) -> bool:
        return self.initial is not None

    @functools.cached_property
    def buckets(self) -> tuple[int, ...]:
        """The capacities an adaptive run may use, ascending, the last one `maximum`. Each rung is
        >= (1 + bucket_step) x the previous, so rounding a count up to its rung costs at most that
        factor (half of it on average); L=1024 has 45 rungs (multiples of 8 up to 128), of which a
        run meets a few."""
        if not self.enabled:
            return ()
        m, out, b = max(1, int(self.bucket_multiple)), [], 0
        while True:
            b = max(b + m, m * math.ceil(b * (1 + self.bucket_step) / m))
            if b >= self.maximum:
                return (*out, self.maximum)
            out.append(b)

    def bucket_for(self, count: int) -> int:
        """The smallest bucket that holds `count` token rows per sequence (at most `maximum`)."""
        if not self.enabled:
            raise CapacityOverflowError("bucket_for on a policy that has no token capacity")
        for b in self.buckets:
            if b >= count:
                return b
        return self.maximum

    def grow(self, capacity: int) -> int:
        """The next capacity after an overflow at `capacity` (a bucket when adaptive)."""
        if not self.enabled:
            raise CapacityOverflowError("overflow reported by a call that has no token capacity")
        if capacity >= self.maximum:  # cannot happen: L rows always hold every token
            raise CapacityOverflowError(f"overflow at the full length {capacity}: the call reports overflow "
                                        "where none is possible")
        new = min(self.maximum, max(capacity + 1, math.ceil(capacity * self.growth)))
        return self.bucket_for(new) if self.adaptive else new

    def run(self, fn: Callable[[int | None], tuple[Any, Any]], capacity: int | None = None, *,
            on_retry: Callable[[int, int], None] | None = None, retry: bool = True,
            grow: Callable[[int], int] | None = None) -> tuple[Any, int | None]:
        """`fn(capacity) -> (result, overflow)` at `capacity` (default: `initial`), re-run at the
        next capacity (`grow`, default `self.grow`) until it fits. Returns (result, the capacity
        that held)."""
        capacity = self.initial if capacity is None else capacity
        while True:
            result, overflow = fn(capacity)
            if not bool(overflow):
                return result, capacity
            if not retry:
                raise CapacityOverflowError(
                    f"a sequence has more tokens than the compact capacity {capacity}; raise "
                    "model.token_capacity_fraction or allow retries")
            new = (grow or self.grow)(capacity)
            log.warning("compact token capacity %d overflowed; re-running at %d", capacity, new)
            if on_retry is not None:
                on_retry(capacity, new)
            capacity = new

    def run_counted(self, count: int, fn: Callable[[int | None], tuple[Any, Any]], *,
                    on_retry: Callable[[int, int], None] | None = None) -> tuple[Any, int | None]:
        """Inference whose token count is known before the token layers run (mxdna_jax.staged):
        `fn` at the smallest bucket holding `count` (the batch's largest per-sequence count).
        The retry is only a net (it cannot fire while `count` is right)."""
        return self.run(fn, self.bucket_for(int(count)) if self.enabled else None, on_retry=on_retry)

    def counted(self) -> CountedCapacity:
        """Per-batch capacities for a stream of counted inference calls of one shape, sparing
        compilations (CountedCapacity, Rungs)."""
        return CountedCapacity(self)

    def tracker(self, capacity: int | None = None) -> CapacityTracker:
        """A host-side capacity that follows the data, starting at `capacity` (default `initial`)."""
        return CapacityTracker(self, self.initial if capacity is None else capacity)


@dataclasses.dataclass
class Rungs:
    """Which rung to run at, given the one wanted: the rungs already run (compiled) and how often
    each was wanted. A rung not compiled yet costs a compilation (seconds to a minute), worth it
    for a rung that keeps coming back but not for a one-off: it is compiled once it has been
    wanted `policy.compile_after` times; until then the smallest compiled rung at most
    (1 + policy.reuse) x above it serves, if there is one. A long run ends up on the rungs it
    needs; a short one (a test, a dev split, a 2-step run) compiles few."""

    policy: CapacityPolicy
    compiled: set = dataclasses.field(default_factory=set)
    wanted: dict = dataclasses.field(default_factory=dict)

    def pick(self, want: int) -> int:
        self.wanted[want] = self.wanted.get(want, 0) + 1
        if want in self.compiled or self.wanted[want] >= self.policy.compile_after:
            return want
        spare = [c for c in self.compiled if want < c <= (1 + self.policy.reuse) * want]
        return min(spare) if spare else want

    def state_dict(self) -> dict:
        return {"compiled": sorted(self.compiled), "wanted": sorted(self.wanted.items())}

    def load_state_dict(self, state: dict) -> None:
        self.compiled = {int(c) for c in state.get("compiled", ())}
        self.wanted = {int(k): int(v) for k, v in state.get("wanted", ())}


@dataclasses.dataclass
class CountedCapacity:
    """The capacity of each counted inference call in a stream (one caller, one batch shape):
    the rung of the count (`Rungs.pick`: an already compiled rung up to (1 + reuse) x above it
    serves until that rung has come back `compile_after` times). Deterministic for a given
    batch order."""

    policy: CapacityPolicy
    rungs: Rungs = None

    def __post_init__(self):
        self.rungs = self.rungs or Rungs(self.policy)

    def run(self, count: int, fn: Callable[[int | None], tuple[Any, Any]], *,
            on_retry: Callable[[int, int], None] | None = None) -> tuple[Any, int | None]:
        """`fn` at the chosen rung (the retry is only a net); returns (result, the capacity that held)."""
        cap = self.rungs.pick(self.policy.bucket_for(int(count))) if self.policy.enabled else None
        result, cap = self.policy.run(fn, cap, on_retry=on_retry)
        self.rungs.compiled.add(cap)
        return result, cap


@dataclasses.dataclass
class CapacityTracker:
    """The adaptive capacity of a training run (or an evaluation), a deterministic function of the
    counts it has seen: its `state_dict` goes into the checkpoint, so a resumed run picks the same
    capacities (different capacities round attention sums differently, ~1e-7) and reproduces
    the same losses bit for bit.

    After each step, `update(capacity that held, the batch's largest per-sequence count)`:
    - the target is the smallest rung holding count x (1 + margin);
    - above the current capacity: grow to it at once (before an overflow has to);
    - below: shrink only after `patience` consecutive such steps, to the target of the largest
      count among them (never below a count seen since), so shrinking happens at a bounded
      rate (a fresh run's 0.5 x L guess too);
    - a step that overflowed was re-run at `policy.grow(capacity)` (a rung; its count was
      unknown): the next step runs at the target of the count that run reported (`provisional`);
    - each move goes through `Rungs.pick`: an already compiled rung a little above the target
      serves until the target has been wanted `compile_after` times; with `remaining` steps
      fewer than `policy.min_remaining`, no move compiles (a short run, or the end of one).
    A policy that is not adaptive (or a loss that reports no `max_tokens`) only keeps retries."""

    policy: CapacityPolicy
    capacity: int | None
    low_steps: int = 0  # consecutive steps whose target was a smaller rung
    low_max: int = 0  # the largest count among them
    provisional: bool = False  # an overflow's stopgap: the next observation's target replaces it
    rungs: Rungs = None

    def __post_init__(self):
        self.rungs = self.rungs or Rungs(self.policy)

    def target(self, count: int) -> int:
        p = self.policy
        return p.bucket_for(min(p.maximum, math.ceil(count * (1 + p.margin))))

    def grow(self, capacity: int) -> int:
        """The retry after an overflow at `capacity`: a compiled rung between it and
        `policy.grow(capacity)` first (a wasted step if it is still too small, less than a
        compilation), else `policy.grow(capacity)`."""
        full = self.policy.grow(capacity)
        if not self.policy.adaptive:
            return full
        spare = [c for c in self.rungs.compiled if capacity < c < full]
        return min(spare) if spare else full

    def run(self, fn: Callable[[int | None], tuple[Any, Any]], *,
            on_retry: Callable[[int, int], None] | None = None) -> tuple[Any, int | None]:
        """`policy.run(fn)` at the current capacity with this tracker's retries."""
        return self.policy.run(fn, self.capacity, on_retry=on_retry, grow=self.grow)

    def _reset(self):
        self.low_steps, self.low_max = 0, 0

    def _move(self, want: int, remaining: int | None) -> int:
        new = self.rungs.pick(want)
        if new not in self.rungs.compiled and remaining is not None and remaining < self.policy.min_remaining:
            above = [c for c in self.rungs.compiled if c >= want]
            new = min(above) if above else self.capacity  # (growing: the retry is the net)
        return new

    def update(self, capacity: int | None, max_tokens=None, remaining: int | None = None) -> int | None:
        """Record a finished step (`capacity`: the one it held at; `remaining`: steps left in
        the run, None for an open-ended stream); returns the next capacity."""
        p = self.policy
        if not p.enabled:
            return self.capacity
        self.rungs.compiled |= {self.capacity, capacity}  # the step ran (or overflowed) at these
        if capacity != self.capacity:  # grown by the overflow retry (x growth: a way through this batch)
            self.capacity = capacity
            self._reset()
            # what the batch turned out to need is known now: the next step runs at its target
            # (between the capacity that overflowed and the grown one), not x growth for a while
            self.provisional = True
        if not p.adaptive or max_tokens is None:
            return self.capacity
        count = int(round(float(max_tokens)))
        want = self.target(count)
        if want > self.capacity:
            self.capacity = self._move(want, remaining)
            self._reset()
        elif want < self.capacity and self.provisional:
            self.capacity = self._move(want, remaining)
        elif want < self.capacity:
            self.low_steps += 1
            self.low_max = max(self.low_max, count)
            if self.low_steps >= p.patience:
                self.capacity = self._move(self.target(self.low_max), remaining)
                self._reset()
        else:
            self._reset()
        self.provisional = False
        return self.capacity

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "low_steps": self.low_steps, "low_max": self.low_max,
                "provisional": self.provisional, "rungs": self.rungs.state_dict()}

    def load_state_dict(self, state: dict) -> CapacityTracker:
        self.capacity = state.get("capacity", self.capacity)
        self.low_steps, self.low_max = int(state.get("low_steps", 0)), int(state.get("low_max", 0))
        self.provisional = bool(state.get("provisional", False))
        self.rungs.load_state_dict(state.get("rungs") or {})
        return self


def call_with_capacity(fn: Callable[[int], tuple[Any, Any]], capacity: int, length: int, *, retry: bool = True,
                       factor: float = 1.5) -> tuple[Any, int]:
    """`CapacityPolicy(capacity, length, factor).run(fn)`: for a call outside the trainer."""
    return CapacityPolicy(capacity, length, factor).run(fn, retry=retry)
