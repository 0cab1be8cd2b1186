"""k-mer tokenizations: `kmer` (non-overlapping) and `kmer_overlap` (DNABERT-1's overlapping k-mers).

`kmer`: a fixed tiling in place of the learnt gate + NMS.

Units of length `cfg.kmer_size` tile each sequence's window [1, n - 1) from its start (the last
unit is shorter when k does not divide the length), and go through the same unit body as the
learnt layer (units.py): conv experts for lengths 1..k (weight 1, there is no router) and the
deformable assembly, each switchable. The baseline therefore differs from MxDNA only in how
units are chosen. No router: no jitter, aux loss 0, router_logits None.
"""

from __future__ import annotations

import jax.numpy as jnp

from mxdna_jax.layers import LayerNorm
from mxdna_jax.ops.experts import sliding_conv_expert
from mxdna_jax.ops.units import fixed_units, overlapping_kmers, sliding_mean
from mxdna_jax.tokenizers.base import zero_aux_loss
from mxdna_jax.tokenizers.units import Routing, Units, UnitTokenizer


class KmerTokenization(UnitTokenizer):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        self.kmer_size = int(cfg.kmer_size)
        # the input LN feeds only the experts here (no gate)
        self.input_norm = (LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
                           if cfg.experts else None)
        self._init_body(cfg, tuple(range(1, self.kmer_size + 1)), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def select(self, x_BLD, attention_mask_BL, special_BL, jitter_BLD, units_BL=None) -> Units:
        center, all_ = fixed_units(attention_mask_BL, self.kmer_size)
        return Units(center, all_, None, None, zero_aux_loss())


class KmerOverlapTokenization(UnitTokenizer):
    """Overlapping k-mers (DNABERT-1 style): a k-mer token at every nucleotide, so tokens =
    nucleotides (+ [CLS]/[SEP]).

    The k-mer centred at p spans [p - k//2, p - k//2 + k), clipped to the window (the edge k-mers
    are shorter: their taps outside the window read zero). It is embedded by the unit body's
    expert of kernel k (`experts=True`; the expert bank holds that one expert), applied at stride 1
    (ops/experts.sliding_conv_expert: exactly what the expert computes for a non-overlapping unit
    centred at p), or by the mean of its nucleotide states (`experts=False`); then the deformable
    assembly (if on) over all rows. No gate, no NMS, no router: no jitter, aux loss 0. Like
    `single`, every row is a token row, so compact mode changes nothing (T = L, never overflows).
    The unit encoding reports every window row as a centre with value (clipped span - 1), see
    ops/units.overlapping_kmers.
    """

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        self.kmer_size = int(cfg.kmer_size)
        self.input_norm = (LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
                           if cfg.experts else None)
        self._init_body(cfg, (self.kmer_size,), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def select(self, x_BLD, attention_mask_BL, special_BL, jitter_BLD, units_BL=None) -> Units:
        center, all_ = overlapping_kmers(attention_mask_BL, self.kmer_size)
        return Units(center, all_, None, None, zero_aux_loss())

    def route(self, h_BLD, attention_mask_BL, special_BL, jitter_BLD=None, units_BL=None) -> Routing:
        x = self.normed(h_BLD)
        units = self.select(x, attention_mask_BL, special_BL, jitter_BLD, units_BL)
        return Routing(x, units, None, None)  # overlapping units: no unit layout

    def embed_units(self, h_BLD, routing: Routing, *, dense_experts: bool = False, expert_tile: int = 128):
        valid = routing.units.center >= 0
        if self.use_experts:
            p = self.expert_params()
            moe = sliding_conv_expert(routing.x, valid, p["pre"][0], p["conv"][0], p["norm_scale"][0],
                                      p["norm_bias"][0], p["post"][0], eps=self.expert_layer_norm_eps)
            return h_BLD + moe.astype(h_BLD.dtype), moe
        moe = sliding_mean(h_BLD, valid, self.kmer_size)
        return jnp.where(valid[..., None], moe, h_BLD), moe

    def assemble(self, u_BLD, attention_mask_BL, special_BL, token_mask_BL, capacity: int | None = None, sow=None):
        # every valid row is a token row: nothing to compact, whatever the capacity
        return super().assemble(u_BLD, attention_mask_BL, special_BL, token_mask_BL, None, sow=sow)
