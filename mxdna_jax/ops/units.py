"""Fixed unit selection and parameter-free unit pooling, in the NMS unit encoding.

The encoding (see nms.py): center_BL = e at each unit centre, -1 elsewhere; all_BL = e at every
position the unit covers, where e = unit length - 1 (expert e has kernel size e + 1). A unit
of length k starting at s has its centre at s + k // 2, as the NMS places it.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp


def fixed_units(attention_mask_BL, k: int):
    """Non-overlapping k-mers tiling the window [1, n - 1) from its start; the last may be shorter.

    The window is the one the NMS fills (valid_candidates): [CLS] at 0, [SEP] at n - 1 and the
    padding after it are never covered. Returns (center_BL, all_BL), int32.
    """
    chex.assert_rank(attention_mask_BL, 2)
    if k < 1:
        raise ValueError(f"unit length must be >= 1, got {k}")
    L = attention_mask_BL.shape[1]
    n_B1 = attention_mask_BL.astype(jnp.int32).sum(axis=1, keepdims=True)
    pos = jnp.arange(L, dtype=jnp.int32)[None, :]
    inside = window_mask(attention_mask_BL)
    start = 1 + ((pos - 1) // k) * k
    length = jnp.minimum(start + k, n_B1 - 1) - start
    e = length - 1
    all_BL = jnp.where(inside, e, -1)
    center_BL = jnp.where(inside & (pos == start + length // 2), e, -1)
    return center_BL.astype(jnp.int32), all_BL.astype(jnp.int32)


def window_mask(attention_mask_BL):
    """(B, L) bool: the window [1, n - 1) of a right-padded sequence of n valid rows."""
    L = attention_mask_BL.shape[1]
    n_B1 = attention_mask_BL.astype(jnp.int32).sum(axis=1, keepdims=True)
    pos = jnp.arange(L, dtype=jnp.int32)[None, :]
    return (pos >= 1) & (pos < n_B1 - 1)


def overlapping_kmers(attention_mask_BL, k: int):
    """Overlapping k-mers (DNABERT-1 style, stride 1): one centred at every window row p, spanning
    [p - k//2, p - k//2 + k) clipped to the window, so there are as many k-mers as nucleotides.

    Overlapping units have no single covering unit per position, so the NMS encoding is used
    loosely: center_BL = all_BL = (clipped span length - 1) at every window row, -1 elsewhere.
    """
    chex.assert_rank(attention_mask_BL, 2)
    if k < 1:
        raise ValueError(f"k-mer length must be >= 1, got {k}")
    L = attention_mask_BL.shape[1]
    n_B1 = attention_mask_BL.astype(jnp.int32).sum(axis=1, keepdims=True)
    pos = jnp.arange(L, dtype=jnp.int32)[None, :]
    start = jnp.maximum(pos - k // 2, 1)
    end = jnp.minimum(pos - k // 2 + k, n_B1 - 1)
    center_BL = jnp.where(window_mask(attention_mask_BL), end - start - 1, -1).astype(jnp.int32)
    return center_BL, center_BL


def sliding_mean(x_BLD, valid_BL, k: int):
    """(B, L, D): at each valid row p, the mean of x over the valid rows of [p - k//2, p - k//2 + k);
    0 elsewhere. Sums accumulate in fp32."""
    chex.assert_rank(x_BLD, 3)
    B, L, D = x_BLD.shape
    v = valid_BL.astype(jnp.float32)
    lo = k // 2
    xs = jnp.pad(x_BLD.astype(jnp.float32) * v[..., None], ((0, 0), (lo, k - 1 - lo), (0, 0)))
    vs = jnp.pad(v, ((0, 0), (lo, k - 1 - lo)))
    total = sum(xs[:, j: j + L] for j in range(k))
    count = sum(vs[:, j: j + L] for j in range(k))
    mean = total / jnp.maximum(count, 1.0)[..., None]
    return jnp.where(valid_BL[..., None], mean, 0).astype(x_BLD.dtype)


def unit_mean(x_BLD, unit_center_BL, center_BL):
    """(B, L, D): the mean of x over each unit, at the unit's centre row; 0 elsewhere.

    unit_center_BL (from nms.unit_layout) names, per covered position, the row of its unit's
    centre; sums accumulate in fp32.
    """
    chex.assert_rank(x_BLD, 3)
    B, L, D = x_BLD.shape
    chex.assert_shape([unit_center_BL, center_BL], (B, L))
    M = B * L
    offsets = (jnp.arange(B, dtype=jnp.int32) * L)[:, None]
    row_M = jnp.where(unit_center_BL >= 0, unit_center_BL + offsets, M).reshape(M)
    sum_MD = jnp.zeros((M, D), jnp.float32).at[row_M].add(x_BLD.reshape(M, D).astype(jnp.float32), mode="drop")
    count_M = jnp.zeros((M,), jnp.float32).at[row_M].add(1.0, mode="drop")
    mean_MD = sum_MD / jnp.maximum(count_M, 1.0)[:, None]
    is_c = (center_BL >= 0).reshape(M)[:, None]
    return jnp.where(is_c, mean_MD, 0).astype(x_BLD.dtype).reshape(B, L, D)
