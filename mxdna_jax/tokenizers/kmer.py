"""Non-overlapping k-mer tokenization: a fixed tiling in place of the learnt gate + NMS.

Units of length `cfg.kmer_size` tile each sequence's window [1, n - 1) from its start (the last
unit is shorter when k does not divide the length), and go through the same unit body as the
learnt layer (units.py): conv experts for lengths 1..k (weight 1, there is no router) and the
deformable assembly, each switchable. The baseline therefore differs from MxDNA only in how
units are chosen. No router: no jitter, aux loss 0, router_logits None.
"""

from __future__ import annotations

from mxdna_jax.layers import LayerNorm
from mxdna_jax.ops.units import fixed_units
from mxdna_jax.tokenizers.base import zero_aux_loss
from mxdna_jax.tokenizers.units import Units, UnitTokenizer


class KmerTokenization(UnitTokenizer):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        self.kmer_size = int(cfg.kmer_size)
        # the input LN feeds only the experts here (no gate)
        self.input_norm = (LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
                           if cfg.experts else None)
        self._init_body(cfg, tuple(range(1, self.kmer_size + 1)), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def select(self, x_BLD, attention_mask_BL, special_BL, jitter_BLD) -> Units:
        center, all_ = fixed_units(attention_mask_BL, self.kmer_size)
        return Units(center, all_, None, None, zero_aux_loss())
