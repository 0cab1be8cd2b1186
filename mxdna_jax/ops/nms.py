"""Basic-unit non-maximum suppression, exact to the official greedy C++ and jittable.

The official algorithm visits every candidate (position p, unit length k) in descending gate
logit and accepts it when its span [p - k//2, p - k//2 + k) lies inside (CLS, SEP) and touches no
covered position. That is the lexicographically-first maximal independent set of the overlap
graph under the logit order, which parallel rounds reproduce exactly: in each round accept every
live candidate that outranks all live candidates overlapping it, then kill the candidates that
touch a newly covered position. A candidate accepted in a round has every higher-ranked
neighbour already dead, and a dead candidate overlaps an accepted one, so the greedy would have
accepted it too. Each round is a few sliding-window max/or passes over (B, L) arrays, and every
round accepts at least the best live candidate, so the loop always ends; on real sequences it
ends after a few dozen rounds instead of L*E sequential steps.

Ties: the order is descending logit, ties by ascending flat index p*E + e (a stable sort). The
official std::sort is unstable, so exact ties are implementation-defined there; this order
reproduces every tie-free official output.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _window_max(x_BL, before: int, after: int):
    """y[:, q] = max(x[:, q - before .. q + after]), zero-filled outside (x >= 0)."""
    return jax.lax.reduce_window(x_BL, jnp.zeros((), x_BL.dtype), jax.lax.max, (1, before + after + 1), (1, 1),
                                 ((0, 0), (before, after)))


def _cover(x_BLE, kernel_sizes):
    """For each position q: max over candidates (p, e) whose span covers q of x[p, e] (x >= 0).

    Candidate p covers q when p - k//2 <= q < p - k//2 + k, i.e. q - (k - 1 - k//2) <= p <= q + k//2.
    """
    out = None
    for e, k in enumerate(kernel_sizes):
        v = _window_max(x_BLE[:, :, e], k - 1 - k // 2, k // 2)
        out = v if out is None else jnp.maximum(out, v)
    return out


def _over_span(y_BL, kernel_sizes):
    """For each candidate (p, e): max of y (>= 0) over the positions of its span."""
    return jnp.stack([_window_max(y_BL, k // 2, k - 1 - k // 2) for k in kernel_sizes], axis=-1)


def candidate_priority(logits_BLE):
    """Unique int priority per candidate, higher = visited earlier (descending logit, stable)."""
    B, L, E = logits_BLE.shape
    flat = logits_BLE.reshape(B, L * E).astype(jnp.float32)
    order = jnp.argsort(-flat, axis=1, stable=True)
    rank = jnp.zeros_like(order).at[jnp.arange(B)[:, None], order].set(jnp.arange(L * E, dtype=order.dtype))
    return (L * E - rank).reshape(B, L, E).astype(jnp.int32)


def valid_candidates(lengths_B, L: int, kernel_sizes):
    """(B, L, E) bool: the span of (p, e) lies inside the window [1, n - 1)."""
    p = jnp.arange(L)[None, :, None]
    k = jnp.asarray(kernel_sizes, jnp.int32)[None, None, :]
    start = p - k // 2
    n = lengths_B[:, None, None]
    return (start >= 1) & (start + k <= n - 1)


def basic_unit_nms(logits_BLE, attention_mask_BL, kernel_sizes=tuple(range(1, 11)), *, return_rounds=False):
    """Greedy NMS of basic units.

    Args:
      logits_BLE: gate logits (B, L, E); column e is the unit of length kernel_sizes[e].
      attention_mask_BL: right-padded mask; n = its row sum is the valid length incl. [CLS]/[SEP].
    Returns:
      center_BL: expert index at each unit centre, -1 elsewhere (int32).
      all_BL: expert index at every covered position, -1 elsewhere (int32).
      (rounds: number of parallel rounds, if return_rounds.)
    """
    kernel_sizes = tuple(int(k) for k in kernel_sizes)
    chex.assert_rank(logits_BLE, 3)
    B, L, E = logits_BLE.shape
    chex.assert_shape(attention_mask_BL, (B, L))
    assert E == len(kernel_sizes), (E, kernel_sizes)
    lengths_B = attention_mask_BL.astype(jnp.int32).sum(axis=1)
    priority_BLE = candidate_priority(logits_BLE)
    live0_BLE = valid_candidates(lengths_B, L, kernel_sizes)

    def cond(state):
        live, _, _, _ = state
        return live.any()

    def body(state):
        live, covered, accepted, rounds = state
        pri_live = jnp.where(live, priority_BLE, 0)
        best_at_q = _cover(pri_live, kernel_sizes)
        take = live & (_over_span(best_at_q, kernel_sizes) == priority_BLE)
        accepted = accepted | take
        covered = jnp.maximum(covered, _cover(take.astype(jnp.int32), kernel_sizes))
        live = live & ~take & (_over_span(covered, kernel_sizes) == 0)
        return live, covered, accepted, rounds + 1

    init = (live0_BLE, jnp.zeros((B, L), jnp.int32), jnp.zeros((B, L, E), bool), jnp.int32(0))
    _, _, accepted_BLE, rounds = jax.lax.while_loop(cond, body, init)

    expert_ids = jnp.arange(E, dtype=jnp.int32)
    center_BL = jnp.where(accepted_BLE.any(-1), jnp.argmax(accepted_BLE, axis=-1).astype(jnp.int32), -1)
    # at most one accepted candidate covers a position, so the max of (e + 1) over them is its tag
    tagged_BLE = jnp.where(accepted_BLE, expert_ids + 1, 0)
    all_BL = _cover(tagged_BLE, kernel_sizes) - 1
    if return_rounds:
        return center_BL, all_BL, rounds
    return center_BL, all_BL


def unit_layout(center_BL, all_BL, kernel_sizes=tuple(range(1, 11))):
    """Per covered position: its unit's centre index and its tap index inside the unit.

    Returns (unit_center_BL, tap_BL), both -1 at uncovered positions.
    """
    k_of = jnp.asarray((0,) + tuple(kernel_sizes), jnp.int32)  # index e+1 -> k; -1 -> 0
    B, L = center_BL.shape
    pos = jnp.arange(L, dtype=jnp.int32)[None, :]
    k_center = k_of[center_BL + 1]
    start_marks = jnp.full((B, L), -1, jnp.int32)
    starts = jnp.where(center_BL >= 0, pos - k_center // 2, L)  # L = out of range -> dropped
    start_marks = start_marks.at[jnp.arange(B)[:, None], starts].set(starts, mode="drop")
    unit_start = jax.lax.cummax(start_marks, axis=1)
    covered = all_BL >= 0
    k_here = k_of[all_BL + 1]
    unit_center = jnp.where(covered, unit_start + k_here // 2, -1)
    tap = jnp.where(covered, pos - unit_start, -1)
    return unit_center, tap


def all_from_center(center_BL, kernel_sizes=tuple(range(1, 11))):
    """all_BL of a unit encoding given only its centres (a segmentation made elsewhere, e.g. BPE):
    the expert index at every position a unit covers, -1 elsewhere (units must not overlap)."""
    kernel_sizes = tuple(int(k) for k in kernel_sizes)
    expert_ids = jnp.arange(len(kernel_sizes), dtype=jnp.int32)[None, None, :]
    tagged_BLE = jnp.where(center_BL[..., None] == expert_ids, expert_ids + 1, 0)
    return _cover(tagged_BLE, kernel_sizes) - 1
