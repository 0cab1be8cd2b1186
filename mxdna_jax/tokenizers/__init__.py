"""Tokenizers: the layer between the nucleotide layers and the token layers.

`ModelConfig.tokenizer` names one entry of `REGISTRY`:

  learnt        MxDNA's layer: gate (+ router jitter) -> basic-unit NMS -> conv experts -> deformable conv
  kmer          non-overlapping k-mers (`kmer_size`): a fixed tiling in place of gate + NMS, then the
                same expert embedding and deformable assembly as `learnt`
  kmer_overlap  overlapping k-mers (DNABERT-1): a k-mer token at every nucleotide, embedded by the
                expert of kernel `kmer_size` at stride 1, then the deformable assembly
  bpe           units from a host-side BPE segmentation (DNABERT-2's tokenizer, trained on the
                pretraining corpus; bpe.py), passed as `model(..., units=...)`, embedded as `learnt`'s
  single        every nucleotide is a token (identity; the paper's single-nucleotide baseline)

The baselines share the unit body (units.py) with `learnt`: a fixed segmentation yields units,
and the same unit embedding path embeds them, so the comparison changes only how the sequence
is cut (the paper's Table 3).

All return a `base.TokenizationOutput`; the token layers, heads and losses read only that.

The registry is a constant table of "module:class" strings resolved on first use, not a
decorator that fills a dict at import: the table is the whole list in one place, reading it needs
no import order, and `config.py` can validate a name without importing Flax (the classes are
imported only when a model is built).
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "learnt": "mxdna_jax.tokenizers.learnt:LearntTokenization",
    "kmer": "mxdna_jax.tokenizers.kmer:KmerTokenization",
    "kmer_overlap": "mxdna_jax.tokenizers.kmer:KmerOverlapTokenization",
    "bpe": "mxdna_jax.tokenizers.bpe:BpeTokenization",
    "single": "mxdna_jax.tokenizers.single:SingleTokenization",
}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def check_name(name: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"tokenizer must be one of {', '.join(map(repr, NAMES))}; got {name!r}")
    return name


def tokenizer_class(name: str) -> type:
    module, cls = REGISTRY[check_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def build_tokenizer(cfg, *, rngs, dtype, param_dtype):
    """The tokenizer module `cfg.tokenizer` names (an nnx.Module following `base.Tokenizer`)."""
    return tokenizer_class(cfg.tokenizer)(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
