"""Masked multi-head attention over a row set (the official flash-attn varlen semantics).

Every query row attends to the key rows of its own sequence whose mask is 1. Query rows outside
the set are the caller's business (layers zero them). Softmax runs in fp32 whatever the input
dtype; masked keys get a large finite negative so a row without keys cannot make NaNs.
"""

import chex
import jax.numpy as jnp

_NEG = -1e30


def masked_attention(q_BTNH, k_BSNH, v_BSNH, key_mask_BS):
    chex.assert_rank([q_BTNH, k_BSNH, v_BSNH, key_mask_BS], [4, 4, 4, 2])
    chex.assert_equal_shape([k_BSNH, v_BSNH])
    chex.assert_shape(key_mask_BS, k_BSNH.shape[:2])
    scale = q_BTNH.shape[-1] ** -0.5
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale
    logits_BNTS = jnp.where(key_mask_BS[:, None, None, :].astype(bool), logits_BNTS, _NEG)
    probs_BNTS = jnp.exp(logits_BNTS - logits_BNTS.max(axis=-1, keepdims=True))
    probs_BNTS = probs_BNTS / probs_BNTS.sum(axis=-1, keepdims=True)
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS.astype(v_BSNH.dtype), v_BSNH,
                      preferred_element_type=jnp.float32).astype(q_BTNH.dtype)
