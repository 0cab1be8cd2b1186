"""Single-nucleotide tokenization: every nucleotide is a token (the paper's baseline).

The token states are the nucleotide states themselves, at their own positions, with the
attention mask as the token mask: the token layers then form a plain transformer over
nucleotides. No params, aux loss 0, no router. Compact mode changes nothing: every row is a
token row, so T = L whatever the capacity (which is ignored) and `overflow` is never set. The
unit encoding reports every window position ([CLS]/[SEP]/padding excluded) as a unit of
length 1.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mxdna_jax.ops.units import fixed_units
from mxdna_jax.tokenizers.base import TokenizationOutput, arange_positions, zero_aux_loss


class SingleTokenization(nnx.Module):
    uses_jitter = False

    def __init__(self, cfg, *, rngs=None, dtype=None, param_dtype=None):
        del cfg, rngs, dtype, param_dtype  # nothing to build

    def __call__(self, h_BLD, attention_mask_BL, special_BL, *, jitter_BLD=None, capacity: int | None = None,
                 dense_experts: bool = False, expert_tile: int = 128, sow=None,
                 units_BL=None) -> TokenizationOutput:
        B, L, _ = h_BLD.shape
        center, all_ = fixed_units(attention_mask_BL, 1)
        return TokenizationOutput(h_BLD, arange_positions(B, L), attention_mask_BL.astype(jnp.int32), None,
                                  center, all_, zero_aux_loss(), jnp.array(False))
