"""Sequence classification (fine-tuning): cross-entropy of the [CLS] head's logits; the router's
load-balancing loss is kept (x model.router_aux_loss_coef) so learnt units stay balanced."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from mxdna_jax import vocab


def classification_loss_fn(model, batch, jitter_key, *, token_capacity=None):
    """(loss, metrics) of a batch with `input_ids`, `attention_mask`, `labels` (B,) int.

    Rows labelled IGNORE_LABEL (the padding rows that fill an eval batch to its static shape)
    count nowhere; `where`, not a product, keeps a row with no attention (NaN logits) out."""
    logits_BC, out = model(batch["input_ids"], batch["attention_mask"], batch.get("special_tokens_mask"),
                           jitter_key=jitter_key, token_capacity=token_capacity, units=batch.get("units"))
    labels_B = batch["labels"]
    valid_B = labels_B != vocab.IGNORE_LABEL
    n = jnp.maximum(valid_B.sum(), 1).astype(jnp.float32)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, jnp.where(valid_B, labels_B, 0))
    ce = jnp.sum(jnp.where(valid_B, ce_B, 0.0)) / n
    loss = ce + model.cfg.router_aux_loss_coef * out.aux_loss
    correct = jnp.sum(jnp.where(valid_B, logits_BC.argmax(-1) == labels_B, False))
    metrics = {"loss": loss, "ce_loss": ce, "aux_loss": out.aux_loss, "accuracy": correct / n,
               "loss_weight": valid_B.sum().astype(jnp.float32), "overflow": out.overflow,
               # token rows per sequence: the compact capacity follows the largest (mxdna_jax.capacity)
               "max_tokens": out.token_mask.sum(1).max(), "mean_tokens": out.token_mask.sum(1).mean()}
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class Classification:
    name: str = "classification"
    head: str = "cls"

    @classmethod
    def from_config(cls, config) -> Classification:
        return cls()

    def example(self, tokens_L, rng: np.random.Generator, label=None) -> dict[str, np.ndarray]:
        if label is None:
            raise ValueError("the classification objective needs a label for every example")
        out = vocab.make_masks(np.asarray(tokens_L, np.int32))
        out["labels"] = np.asarray(label, np.int32)
        return out

    def loss(self, model, batch, rng, *, token_capacity=None):
        return classification_loss_fn(model, batch, rng, token_capacity=token_capacity)
