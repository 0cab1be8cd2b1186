"""Masked-LM objective (MxDNA): DNABERT-style 15% masking of the nucleotides, cross-entropy on
the masked positions + the router's load-balancing loss (x model.router_aux_loss_coef)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from mxdna_jax import vocab
from mxdna_jax.data.masking import mask_tokens


def masked_cross_entropy(logits_BLV, labels_BL):
    """Mean CE over labels != IGNORE_LABEL (no shift), and the count of predicted positions."""
    valid = labels_BL != vocab.IGNORE_LABEL
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                         jnp.where(valid, labels_BL, 0))
    n = valid.sum()
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(n, 1), n


def mlm_loss_fn(model, batch, jitter_key, *, token_capacity=None):
    """(loss, metrics) of a batch with `input_ids`, `attention_mask`, `special_tokens_mask`, `labels`.

    `jitter_key=None` is eval mode (no router jitter). metrics['overflow'] flags a compact batch
    whose tokens exceeded `token_capacity`: the caller must re-run it at a larger capacity.
    """
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("special_tokens_mask"),
                jitter_key=jitter_key, token_capacity=token_capacity, units=batch.get("units"))
    labels = batch["labels"]
    ce, n = masked_cross_entropy(out.logits, labels)
    loss = ce + model.cfg.router_aux_loss_coef * out.aux_loss
    valid = labels != vocab.IGNORE_LABEL
    correct = jnp.sum(jnp.where(valid, out.logits.argmax(-1) == labels, False))
    n_tokens = out.backbone.token_mask.sum()
    n_nt = batch["attention_mask"].sum()
    metrics = {
        "loss": loss, "mlm_loss": ce, "aux_loss": out.aux_loss,
        "accuracy": correct / jnp.maximum(n, 1), "n_predicted": n,
        # micro-batches and eval batches are averaged with this weight (train_lib)
        "loss_weight": n,
        "overflow": out.overflow,
        # tokens per nucleotide incl. [CLS]/[SEP]: 1 / (mean unit length), roughly
        "tokens_per_nt": n_tokens / jnp.maximum(n_nt, 1),
        # token rows per sequence: the compact capacity follows the largest (mxdna_jax.capacity)
        "max_tokens": out.backbone.token_mask.sum(1).max(), "mean_tokens": out.backbone.token_mask.sum(1).mean(),
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class MLM:
    """Picklable (grain workers run `example`)."""

    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    name: str = "mlm"
    head: str = "mlm"

    @classmethod
    def from_config(cls, config) -> MLM:
        d = config.data
        return cls(float(d.mask_prob), float(d.mask_token_frac), float(d.random_token_frac))

    def example(self, tokens_L, rng: np.random.Generator, label=None) -> dict[str, np.ndarray]:
        ids, labels = mask_tokens(tokens_L, rng, mask_prob=self.mask_prob, mask_token_frac=self.mask_token_frac,
                                  random_token_frac=self.random_token_frac)
        out = vocab.make_masks(ids)
        out["labels"] = labels
        return out

    def loss(self, model, batch, rng, *, token_capacity=None):
        return mlm_loss_fn(model, batch, rng, token_capacity=token_capacity)
