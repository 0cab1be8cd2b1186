"""The tokenizer interface: what every tokenizer returns, and how the model calls it.

Shape letters as in model.py: B batch, L nucleotide length (padded, incl. [CLS]/[SEP]), T token
rows, D hidden, E experts.

Token rows. In 'original' mode (capacity None) the token states live at nucleotide length,
T = L, with `mask` marking the token rows; in 'compact' mode a tokenizer may gather its token
rows into the static capacity T = capacity (in order, [CLS] first) and report `overflow` when
a sequence has more. A tokenizer whose tokens are all the nucleotides (`single`) returns T = L
in both modes: there is nothing to compact.

Units. Tokenizers that cut the sequence into units describe them with the NMS encoding of
ops/nms.py: `center` = expert index (unit length - 1 for the 1..E kernel sizes) at each unit
centre, -1 elsewhere; `all` = that index at every position the unit covers. Units lie inside the
window [1, n - 1) of a right-padded sequence of n valid rows ([CLS] at 0, [SEP] at n - 1), as the
NMS places them. `single` reports every window position as a unit of length 1 (index 0).
`kmer_overlap`'s units overlap, so it uses the encoding loosely: every window row is a centre,
`center` = `all` = (its k-mer's span clipped to the window) - 1.

Given units. A tokenizer whose segmentation is made on the host (`bpe`) reads it from
`units_BL` (the `center` encoding above, int32, -1 at [CLS]/[SEP]/padding); the model passes its
`units=` argument here. Every other tokenizer ignores `units_BL`, so callers may pass it always.

Absent diagnostics are None, not zero-size arrays: a tokenizer without a router returns
`router_logits=None`. None is an empty pytree, so jit, vmap, scan and nnx transforms pass it
through untouched, and code that needs router logits fails loudly instead of computing a
statistic over an empty axis. `aux_loss` is always a float32 scalar (0 for fixed tokenizers) and
`overflow` always a bool scalar, so losses and the capacity policy never ask which tokenizer ran.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp


class TokenizationOutput(NamedTuple):
    hidden: jax.Array  # (B, T, D) token-row states (T = L in 'original' mode)
    positions: jax.Array  # (B, T) int32 nucleotide index of each row (its RoPE position)
    mask: jax.Array  # (B, T) int32: 1 at token rows ([CLS], unit tokens, [SEP])
    router_logits: jax.Array | None  # (B, L, E) fp32 gate logits; None without a router
    center: jax.Array  # (B, L) int32 unit encoding (see the module docstring)
    all: jax.Array  # (B, L) int32
    aux_loss: jax.Array  # () fp32: load balancing loss of a router, 0 for fixed tokenizers
    overflow: jax.Array  # () bool: compact capacity exceeded (the outputs are then invalid)


class Tokenizer(Protocol):
    """What MxDNAModel calls. `uses_jitter`: whether the model should draw router jitter for it."""

    uses_jitter: bool

    def __call__(self, h_BLD, attention_mask_BL, special_BL, *, jitter_BLD=None, capacity: int | None = None,
                 dense_experts: bool = False, expert_tile: int = 128, sow=None,
                 units_BL=None) -> TokenizationOutput: ...


def gather_rows(x_BL_, idx_BT):
    return jnp.take_along_axis(x_BL_, idx_BT.reshape(idx_BT.shape + (1,) * (x_BL_.ndim - 2)), axis=1)


def arange_positions(B: int, L: int):
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


def unit_token_mask(center_BL, attention_mask_BL, special_BL):
    """Token rows of a unit tokenizer: [CLS]/[SEP] and unit centres (padding never)."""
    return ((special_BL + (center_BL >= 0)) * attention_mask_BL > 0).astype(jnp.int32)


def compact_token_positions(token_mask_BL, capacity: int):
    """Positions (B, T) of token rows in order, their mask (B, T) and the overflow flag."""
    B, L = token_mask_BL.shape
    tm = token_mask_BL.astype(jnp.int32)
    slot = jnp.cumsum(tm, axis=1) - 1
    slot = jnp.where(tm > 0, slot, capacity)  # non-tokens -> dropped
    pos = jnp.zeros((B, capacity), jnp.int32).at[jnp.arange(B)[:, None], slot].set(
        arange_positions(B, L), mode="drop")
    count = tm.sum(axis=1)
    mask = (jnp.arange(capacity)[None, :] < count[:, None]).astype(jnp.int32)
    return pos, mask, jnp.any(count > capacity)


def zero_aux_loss():
    return jnp.zeros((), jnp.float32)

