"""Compatibility re-exports: the tokenization layers live in mxdna_jax.tokenizers.

New code imports from `mxdna_jax.tokenizers.*` (base: the interface; learnt: MxDNA's layer;
units: the shared unit body; kmer, single: the baselines).
"""

from mxdna_jax.tokenizers.base import TokenizationOutput, compact_token_positions, gather_rows
from mxdna_jax.tokenizers.learnt import LearntTokenization, load_balancing_loss, router_z_loss_official
from mxdna_jax.tokenizers.units import DeformableBlock, conv1d_same

__all__ = ["DeformableBlock", "LearntTokenization", "TokenizationOutput", "compact_token_positions", "conv1d_same",
           "gather_rows", "load_balancing_loss", "router_z_loss_official"]
