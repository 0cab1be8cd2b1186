"""Sequence classification (fine-tuning): cross-entropy of the [CLS] head's logits; the router's
load-balancing loss is kept (x model.router_aux_loss_coef) so learnt units stay balanced."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from mxdna_jax import vocab


def classification_loss_fn(model, batch, jitter_key, *, token_capacity=None):
    """(loss, metrics) of a batch with `input_ids`, `attention_mask`, `labels` (B,) int."""
    logits_BC, out = model(batch["input_ids"], batch["attention_mask"], batch.get("special_tokens_mask"),
                           jitter_key=jitter_key, token_capacity=token_capacity)
    labels_B = batch["labels"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B).mean()
    loss = ce + model.cfg.router_aux_loss_coef * out.aux_loss
    n = jnp.asarray(labels_B.shape[0], jnp.float32)
    metrics = {"loss": loss, "ce_loss": ce, "aux_loss": out.aux_loss,
               "accuracy": jnp.mean(logits_BC.argmax(-1) == labels_B), "loss_weight": n,
               "overflow": out.overflow}
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
