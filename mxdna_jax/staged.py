"""The forward in two calls, so inference can read a batch's token count before choosing the
compact capacity (capacity.CapacityPolicy.counted, run_counted):

    p, count = prefix(model, ids, am)           # embed -> nucleotide layers -> token count (jit 1)
    out = finish(model, p, token_capacity=T)    # tokenizer at T -> token layers -> head   (jit 2, T static)

`finish(prefix(...))` computes what `model(...)` computes at the same capacity, from the model's
public stages (model.py), and returns the same output type. Why two calls and not a count-only
pre-pass: the nucleotide states cross from one call to the other on the device, so the
nucleotide layers run once; only the router and the NMS run twice (a few % of a forward),
because the tokenizer's units cannot be handed to it. In the first call the tokenizer runs in
'original' layout only for its token mask: XLA drops the experts and the deformable convolution,
whose outputs that call never returns.

Heads: the backbone, masked LM, [CLS] classifier and token extraction (what inference calls). The
MAE head's encoder drops masked rows inside its forward; it keeps the one-call path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mxdna_jax import model as M


class Prefix(NamedTuple):
    """What the first call hands to the second (every leaf has the batch as leading dim)."""

    hidden: jax.Array  # (B, L, D) output of the nucleotide layers
    attention_mask: jax.Array  # (B, L) int32
    special: jax.Array  # (B, L) int32
    jitter: jax.Array | None  # (B, L, D) router jitter drawn in the first call, or None
    units: jax.Array | None  # (B, L) host segmentation (bpe), or None
    tokens: jax.Array  # (B,) int32 token rows per sequence ([CLS], units, [SEP])


SUPPORTED = (M.MxDNAModel, M.MxDNAForMaskedLM, M.MxDNAForSequenceClassification, M.MxDNAForTokenExtraction)


def supports(model) -> bool:
    return type(model) in SUPPORTED


def _backbone(model) -> M.MxDNAModel:
    if not supports(model):
        raise TypeError(f"{type(model).__name__} has no two-call forward (heads: "
                        f"{', '.join(c.__name__ for c in SUPPORTED)})")
    return model if isinstance(model, M.MxDNAModel) else model.model


def prefix(model, input_ids, attention_mask, special_tokens_mask=None, *, jitter_key=None, jitter=None,
           units=None) -> tuple[Prefix, jax.Array]:
    """(Prefix, the largest per-sequence token count as a () int32): the first call."""
    m = _backbone(model)
    B, L = input_ids.shape
    am, sm = m.masks(input_ids, attention_mask, special_tokens_mask)
    jitter = m.router_jitter(B, L, jitter_key, jitter)
    h = m.nucleotide_stage(m.embed_ids(input_ids), am).hidden
    tokens = m.tokenizer_stage(h, am, sm, jitter_BLD=jitter, capacity=None, units_BL=units).mask.sum(1)
    tokens = tokens.astype(jnp.int32)
    return Prefix(h, am, sm, jitter, units, tokens), tokens.max()


def finish(model, p: Prefix, token_capacity: int | None = None):
    """The rest of `model(...)` at `token_capacity`: the same output type as `model`'s call."""
    m = _backbone(model)
    capacity = m.resolve_capacity(p.hidden.shape[1], token_capacity)
    tok = m.tokenizer_stage(p.hidden, p.attention_mask, p.special, jitter_BLD=p.jitter, capacity=capacity,
                            units_BL=p.units)
    final = m.token_stage(tok)
    out = M.BackboneOutput(p.hidden, final, tok.positions, tok.mask, tok.router_logits, tok.center, tok.all,
                           tok.aux_loss, tok.overflow, {})
    if isinstance(model, M.MxDNAModel):
        return out
    if isinstance(model, M.MxDNAForMaskedLM):
        logits = model.decoder_stage(p.hidden, final, tok.positions, tok.mask, p.attention_mask)
        return M.MLMOutput(logits, out.aux_loss, out.overflow, out)
    if isinstance(model, M.MxDNAForSequenceClassification):
        return model.head(out, p.special)[0], out
    return M.extract_tokens(out, p.special)
