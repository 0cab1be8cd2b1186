"""Convolution experts: one expert per basic unit, kernel = stride = unit length.

A unit of length k (expert e = k - 1) with start s and centre p yields
    c = sum_j W_conv_e[j] . GLU(W_pre_e x[s + j])        (grouped conv, g_e groups)
    moe[p] = P[p, e] * W_post_e silu(LN_e(c))
Everything before the sum is per nucleotide, so the work is two ragged ("grouped") matmuls:
one over nucleotide rows grouped by the expert of their unit, one over unit rows grouped by
their expert. XLA has no fast ragged matmul on CPU/GPU (`lax.ragged_dot` lowers to a dense
all-groups product there), so rows are sorted by expert into fixed-size tiles, each tile owned by
one expert (the megablocks layout): at most M/R + E tiles, never an overflow, and a `lax.map`
over tiles runs one expert per tile, skipping empty tiles. FLOPs therefore scale with the number
of nucleotides and units, not with E times that. `dense_*` are the all-experts references.

Weight layouts (ours): pre (E, D, 2D); conv_e (k, g, D/g, D/g) = [tap, group, in, out];
norm scale/bias (E, D); post (E, D, D).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp


def glu(h):
    a, b = jnp.split(h, 2, axis=-1)
    return a * jax.nn.sigmoid(b)


def layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    lead = (1,) * (x.ndim - 1)
    scale, bias = scale.astype(jnp.float32).reshape(lead + (-1,)), bias.astype(jnp.float32).reshape(lead + (-1,))
    return (y * scale + bias).astype(x.dtype)


def expert_nucleotide_rows(x_RD, tap_R, pre_DF, conv_KGIO):
    """Per-nucleotide contribution of one expert: W_conv[tap] . GLU(W_pre x)."""
    R, D = x_RD.shape
    k, g, ci, _ = conv_KGIO.shape
    glu_RD = glu(jnp.dot(x_RD, pre_DF.astype(x_RD.dtype), preferred_element_type=jnp.float32).astype(x_RD.dtype))
    y_RKGO = jnp.einsum("rgi,kgio->rkgo", glu_RD.reshape(R, g, ci), conv_KGIO.astype(x_RD.dtype),
                        preferred_element_type=jnp.float32)
    y_RKD = y_RKGO.reshape(R, k, D)
    tap = jnp.clip(tap_R, 0, k - 1)
    return jnp.take_along_axis(y_RKD, tap[:, None, None], axis=1)[:, 0].astype(x_RD.dtype)


def expert_unit_rows(c_RD, scale_D, bias_D, post_DD, eps):
    """Per-unit output of one expert: W_post silu(LN(c))."""
    h = jax.nn.silu(layer_norm(c_RD, scale_D, bias_D, eps))
    return jnp.dot(h, post_DD.astype(h.dtype), preferred_element_type=jnp.float32).astype(c_RD.dtype)


# ----------------------------------------------------------------------------- tiled dispatch


def tile_layout(group_M, num_groups: int, tile: int):
    """Sort rows by group into tiles owned by one group each.

    Returns (row_of_slot_S, tile_group_G): S = G * tile slots, -1 = empty slot; tile_group is the
    owning group of each tile, or `num_groups` for an empty tile. G = ceil(M / tile) + num_groups
    bounds the tile count for any grouping, so no row is ever dropped.
    """
    M = group_M.shape[0]
    num_tiles = -(-M // tile) + num_groups
    key = jnp.where(group_M >= 0, group_M, num_groups)
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=num_groups + 1)[:num_groups]
    starts = jnp.cumsum(counts) - counts
    padded = -(-counts // tile) * tile
    padded_starts = jnp.cumsum(padded) - padded
    sorted_key = key[order]
    rank = jnp.arange(M) - starts[jnp.clip(sorted_key, 0, num_groups - 1)]
    slot = jnp.where(sorted_key < num_groups, padded_starts[jnp.clip(sorted_key, 0, num_groups - 1)] + rank,
                     num_tiles * tile)
    row_of_slot = jnp.full((num_tiles * tile,), -1, jnp.int32).at[slot].set(order.astype(jnp.int32), mode="drop")
    tile_start = jnp.arange(num_tiles) * tile
    padded_ends = padded_starts + padded
    owner = jnp.sum(tile_start[:, None] >= padded_ends[None, :], axis=1)  # groups entirely before
    tile_group = jnp.where(owner < num_groups, owner, num_groups).astype(jnp.int32)
    return row_of_slot, tile_group


def tiled_apply(fns: Sequence, group_M, inputs: Sequence, out_dim: int, out_dtype, tile: int):
    """out[r] = fns[group[r]](*[a[r] for a in inputs]) for rows with group >= 0, else 0.

    Each fn maps a tile of rows (R, ...) to (R, out_dim).
    """
    E = len(fns)
    M = group_M.shape[0]
    row_of_slot, tile_group = tile_layout(group_M, E, tile)
    G = tile_group.shape[0]
    src = jnp.clip(row_of_slot, 0, M - 1)
    tiles = [a[src].reshape(G, tile, *a.shape[1:]) for a in inputs]
    branches = [lambda args, f=f: f(*args).astype(out_dtype) for f in fns]
    branches.append(lambda args: jnp.zeros((tile, out_dim), out_dtype))

    def one_tile(xs):
        g, *args = xs
        return jax.lax.switch(g, branches, args)

    out_GRD = jax.lax.map(one_tile, (tile_group, *tiles))
    out_SD = out_GRD.reshape(G * tile, out_dim)
    dest = jnp.where(row_of_slot >= 0, row_of_slot, M)
    return jnp.zeros((M, out_dim), out_dtype).at[dest].set(out_SD, mode="drop")


# ----------------------------------------------------------------------------- the expert layer


def conv_experts(x_BLD, center_BL, all_BL, unit_center_BL, tap_BL, probs_BLE, params, *, eps: float,
                 tile: int = 128, dense: bool = False):
    """moe (B, L, D): prob-weighted expert outputs at unit centres, zero elsewhere.

    params: dict with 'pre' (E, D, 2D), 'conv' (list of E arrays (k, g, D/g, D/g)),
    'norm_scale', 'norm_bias' (E, D), 'post' (E, D, D).
    probs_BLE: the router's probabilities; None weights every unit 1 (fixed unit selectors
    have no router).
    """
    chex.assert_rank(x_BLD, 3)
    B, L, D = x_BLD.shape
    E = params["pre"].shape[0]
    chex.assert_shape([center_BL, all_BL, unit_center_BL, tap_BL], (B, L))
    if probs_BLE is not None:
        chex.assert_shape(probs_BLE, (B, L, E))
    chex.assert_shape(params["pre"], (E, D, 2 * D))
    M = B * L
    x_MD = x_BLD.reshape(M, D)
    group_M = all_BL.reshape(M)
    tap_M = tap_BL.reshape(M)
    offsets = (jnp.arange(B, dtype=jnp.int32) * L)[:, None]
    unit_row_M = jnp.where(unit_center_BL >= 0, unit_center_BL + offsets, M).reshape(M)

    nuc_fns = [lambda x, t, e=e: expert_nucleotide_rows(x, t, params["pre"][e], params["conv"][e]) for e in range(E)]
    unit_fns = [lambda c, e=e: expert_unit_rows(c, params["norm_scale"][e], params["norm_bias"][e],
                                                params["post"][e], eps) for e in range(E)]
    if dense:
        contrib_MD = _dense_apply(nuc_fns, group_M, (x_MD, tap_M))
    else:
        contrib_MD = tiled_apply(nuc_fns, group_M, (x_MD, tap_M), D, x_MD.dtype, tile)
    c_MD = jnp.zeros((M, D), jnp.float32).at[unit_row_M].add(contrib_MD.astype(jnp.float32), mode="drop")
    c_MD = c_MD.astype(x_BLD.dtype)
    center_M = center_BL.reshape(M)
    if dense:
        out_MD = _dense_apply(unit_fns, center_M, (c_MD,))
    else:
        out_MD = tiled_apply(unit_fns, center_M, (c_MD,), D, x_MD.dtype, tile)
    if probs_BLE is not None:
        p_M = jnp.take_along_axis(probs_BLE.reshape(M, E), jnp.clip(center_M, 0, E - 1)[:, None], axis=1)[:, 0]
        out_MD = out_MD * p_M[:, None].astype(out_MD.dtype)
    moe_MD = jnp.where((center_M >= 0)[:, None], out_MD, 0)
    return moe_MD.reshape(B, L, D)


def sliding_conv_expert(x_BLD, valid_BL, pre_DF, conv_KGIO, scale_D, bias_D, post_DD, *, eps: float):
    """One conv expert of kernel k at stride 1 (overlapping k-mers): at every valid row p,
        c[p] = sum_j W_conv[j] . GLU(W_pre x[p - k//2 + j])      (rows outside `valid_BL` read 0)
        out[p] = W_post silu(LN(c[p]))
    i.e. what `conv_experts` computes for a unit of length k centred at p, at every p at once; 0 at
    invalid rows. Per-row products are rounded to x's dtype and summed in fp32, as there.
    """
    chex.assert_rank(x_BLD, 3)
    B, L, D = x_BLD.shape
    k, g, ci, _ = conv_KGIO.shape
    chex.assert_shape(valid_BL, (B, L))
    keep = valid_BL[..., None].astype(x_BLD.dtype)
    glu_BLD = glu(jnp.dot(x_BLD, pre_DF.astype(x_BLD.dtype), preferred_element_type=jnp.float32).astype(x_BLD.dtype))
    glu_BLD = glu_BLD * keep
    y_BLKGO = jnp.einsum("blgi,kgio->blkgo", glu_BLD.reshape(B, L, g, ci), conv_KGIO.astype(x_BLD.dtype),
                         preferred_element_type=jnp.float32)
    y_BLKD = y_BLKGO.reshape(B, L, k, D).astype(x_BLD.dtype).astype(jnp.float32)
    lo = k // 2
    padded = jnp.pad(y_BLKD, ((0, 0), (lo, k - 1 - lo), (0, 0), (0, 0)))
    c_BLD = padded[:, 0:L, 0]
    for j in range(1, k):
        c_BLD = c_BLD + padded[:, j: j + L, j]
    out = expert_unit_rows(c_BLD.astype(x_BLD.dtype), scale_D, bias_D, post_DD, eps)
    return out * keep


def _dense_apply(fns, group_M, inputs):
    """Reference: every expert on every row, then select (E times the FLOPs)."""
    out = None
    for e, f in enumerate(fns):
        y = f(*inputs)
        sel = (group_M == e)[:, None]
        out = jnp.where(sel, y, 0 if out is None else out)
    return out
