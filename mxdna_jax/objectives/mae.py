"""Masked-autoencoder objective (BarcodeMAE): masked tokens never reach the encoder; a decoder,
given the encoder's kept tokens plus a mask embedding at each masked token's original position,
reconstructs them. Loss: cross-entropy on the masked tokens only (+ the router's aux loss).

Masking happens on the host, on nucleotides, in whole spans of `mae.span` nt tiling the window
from its first nucleotide: exactly round(mask_ratio x spans) spans of each sequence (at least one
masked and one kept). Their ids become [MASK] here, and the model also swaps their embeddings for
the [MASK] embedding (model.MxDNAForMAE.encode), so no masked content enters any encoder layer.
With tokenizer='kmer' and span = kmer_size the spans are exactly the k-mer tokens (BarcodeMAE);
with learnt units, a token is masked when its unit touches a masked span (ops/mae.py), so units
that straddle a span edge are dropped too and the masked token share is a little above the
nucleotide ratio (reported as metrics['masked_token_fraction']).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from mxdna_jax import vocab
from mxdna_jax.objectives.mlm import masked_cross_entropy
from mxdna_jax.ops import mae as mae_ops


def span_mask(n_valid: int, L: int, span: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(L,) int32: 1 at the nucleotides of the masked spans of a sequence with `n_valid` rows
    ([CLS] + nucleotides + [SEP]). The spans tile [1, n_valid - 1) from 1 (the last may be
    shorter); round(ratio * spans) of them are masked, clipped to [1, spans - 1] (one span: masked)."""
    m = n_valid - 2
    out = np.zeros(L, np.int32)
    if m <= 0:
        return out
    n_spans = math.ceil(m / span)
    n_mask = min(max(1, int(ratio * n_spans + 0.5)), max(1, n_spans - 1))  # half rounds up
    for j in rng.choice(n_spans, size=n_mask, replace=False):
        out[1 + j * span: min(1 + (j + 1) * span, n_valid - 1)] = 1
    return out


def mae_loss_fn(model, batch, jitter_key, *, keep_fraction: float, token_capacity=None):
    """(loss, metrics) of a batch with input_ids, attention_mask, special_tokens_mask, mae_mask,
    labels (the original id at masked nucleotides, IGNORE_LABEL elsewhere)."""
    cfg = model.cfg
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("special_tokens_mask"),
                mae_mask=batch["mae_mask"], keep_fraction=keep_fraction, jitter_key=jitter_key,
                token_capacity=token_capacity, units=batch.get("units"))
    start, length = mae_ops.unit_spans(out.center, out.token_positions, out.token_mask)
    labels = batch["labels"]
    if cfg.mae_target == "kmer":
        targets = mae_ops.kmer_targets(labels, start, length, out.masked_rows, cfg.kmer_size)
    else:
        targets = mae_ops.nucleotide_targets(labels, start, length, out.masked_rows, cfg.max_unit_length)
        targets = jnp.where(targets == vocab.UNK, vocab.IGNORE_LABEL, targets)  # N has no nucleotide target
    ce, n = masked_cross_entropy(out.logits, targets)
    loss = ce + cfg.router_aux_loss_coef * out.aux_loss
    valid = targets != vocab.IGNORE_LABEL
    correct = jnp.sum(jnp.where(valid, out.logits.argmax(-1) == targets, False))
    units = jnp.sum(out.masked_rows + out.kept_rows) - 2 * batch["input_ids"].shape[0]  # minus [CLS]/[SEP]
    metrics = {
        "loss": loss, "mae_loss": ce, "aux_loss": out.aux_loss,
        "accuracy": correct / jnp.maximum(n, 1), "n_predicted": n, "loss_weight": n,
        "overflow": out.overflow,
        "tokens_per_nt": out.token_mask.sum() / jnp.maximum(batch["attention_mask"].sum(), 1),
        "masked_token_fraction": out.masked_rows.sum() / jnp.maximum(units, 1),
        # token rows per sequence: the compact capacity follows the largest (mxdna_jax.capacity)
        "max_tokens": out.token_mask.sum(1).max(), "mean_tokens": out.token_mask.sum(1).mean(),
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class MAE:
    """Picklable (grain workers run `example`)."""

    mask_ratio: float = 0.5
    span: int = 6
    keep_margin: float = 0.1  # kept-row capacity K = (1 - mask_ratio + keep_margin) x token rows
    name: str = "mae"
    head: str = "mae"

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 1:
            raise ValueError(f"mae.span must be an integer >= 1, got {self.span!r}")
        if not 0.0 <= self.keep_margin <= 1.0:
            raise ValueError(f"mae.keep_margin must be in [0, 1], got {self.keep_margin}")

    @property
    def keep_fraction(self) -> float:
        return min(1.0, 1.0 - self.mask_ratio + self.keep_margin)

    @classmethod
    def from_config(cls, config) -> MAE:
        section = dict(config.get("mae") or {})
        unknown = sorted(set(section) - {"mask_ratio", "span", "keep_margin"})
        if unknown:
            raise ValueError(f"unknown mae config field(s): {unknown}")
        tokenizer = config.model.tokenizer
        if tokenizer == "kmer_overlap":
            raise ValueError("objective 'mae' needs non-overlapping units: with tokenizer='kmer_overlap' every "
                             "token overlaps its neighbours, so a masked token's content leaks into kept ones")
        span = int(section.get("span", 6))
        if tokenizer == "kmer" and span != int(config.model.kmer_size):
            raise ValueError(f"with tokenizer='kmer', mae.span must equal model.kmer_size={config.model.kmer_size} "
                             f"(the masked spans are the k-mer tokens), got {span}")
        return cls(float(section.get("mask_ratio", 0.5)), span, float(section.get("keep_margin", 0.1)))

    def example(self, tokens_L, rng: np.random.Generator, label=None) -> dict[str, np.ndarray]:
        tokens = np.asarray(tokens_L, np.int32)
        n_valid = int(np.count_nonzero(tokens != vocab.PAD))
        mae_mask = span_mask(n_valid, tokens.shape[0], self.span, self.mask_ratio, rng)
        out = vocab.make_masks(np.where(mae_mask > 0, vocab.MASK, tokens).astype(np.int32))
        out["mae_mask"] = mae_mask
        out["labels"] = np.where(mae_mask > 0, tokens, vocab.IGNORE_LABEL).astype(np.int32)
        return out

    def loss(self, model, batch, rng, *, token_capacity=None):
        return mae_loss_fn(model, batch, rng, keep_fraction=self.keep_fraction, token_capacity=token_capacity)
