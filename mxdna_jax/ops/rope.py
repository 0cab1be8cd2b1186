"""Rotary position embeddings, half-split (Llama/Mistral) convention, at arbitrary positions.

MxDNA puts tokens at the nucleotide index of their unit centre, so positions are an int array,
not an arange. Tables are built in fp32 as the official code does.
"""

import chex
import jax.numpy as jnp


def rope_tables(positions_BT, head_dim: int, theta: float = 10000.0):
    """cos/sin tables (B, T, H) in fp32 for integer positions (B, T)."""
    inv_freq_h = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h[None, None, :]
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """R(x, p) = x cos + rotate_half(x) sin, with rotate_half([x1, x2]) = [-x2, x1]."""
    chex.assert_rank(x_BTNH, 4)
    chex.assert_shape([cos_BTH, sin_BTH], (x_BTNH.shape[0], x_BTNH.shape[1], x_BTNH.shape[3]))
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    return (x_BTNH.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BTNH.dtype)
