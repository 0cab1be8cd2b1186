"""Masked-LM objective: cross-entropy on the masked nucleotides + coef x load-balancing loss."""

from __future__ import annotations

import jax.numpy as jnp
import optax

IGNORE = -100


def masked_cross_entropy(logits_BLV, labels_BL):
    """Mean CE over labels != -100 (no shift), and the count of predicted positions."""
    valid = labels_BL != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                         jnp.where(valid, labels_BL, 0))
    n = valid.sum()
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(n, 1), n


def mlm_loss_fn(model, batch, jitter_key, *, token_capacity=None, aux_loss_coef=None):
    """(loss, metrics) of a batch with `input_ids`, `attention_mask`, `special_tokens_mask`, `labels`.

    `jitter_key=None` is eval mode (no router jitter). metrics['overflow'] flags a compact batch
    whose tokens exceeded `token_capacity`: the caller must re-run it at a larger capacity.
    """
    coef = model.cfg.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("special_tokens_mask"),
                jitter_key=jitter_key, token_capacity=token_capacity)
    labels = batch["labels"]
    ce, n = masked_cross_entropy(out.logits, labels)
    loss = ce + coef * out.aux_loss
    valid = labels != IGNORE
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
    }
    return loss, metrics
