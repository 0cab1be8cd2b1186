"""The learnt tokenization layer: gate + jitter, basic-unit NMS, conv experts, deformable conv.

Nucleotide states in, token states out. In 'original' mode the token states live at nucleotide
length (B, L, D) with a token mask, as in the official checkpoint; in 'compact' mode only the
token rows ([CLS], unit centres, [SEP]) are computed, gathered into a static capacity T.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mxdna_jax.layers import LayerNorm, param, trunc_normal
from mxdna_jax.ops.deformable import deform_conv1d
from mxdna_jax.ops.experts import conv_experts
from mxdna_jax.ops.nms import basic_unit_nms, unit_layout


class TokenizationOutput(NamedTuple):
    hidden: jax.Array  # original: (B, L, D) conversion output; compact: (B, T, D) token rows
    positions: jax.Array  # (B, L) or (B, T): nucleotide index of each row (RoPE position)
    mask: jax.Array  # (B, L) or (B, T): 1 at token rows ([CLS], centres, [SEP])
    router_logits: jax.Array  # (B, L, E) fp32
    center: jax.Array  # (B, L) expert index at unit centres, -1 elsewhere
    all: jax.Array  # (B, L) expert index at every covered position
    aux_loss: jax.Array  # () load balancing loss, pooled over the batch's centres
    overflow: jax.Array  # () bool: compact capacity exceeded (outputs invalid)


def load_balancing_loss(router_logits_BLE, center_BL):
    """E * sum_e Pbar_e * fbar_e over all unit centres of the batch pooled (quirk Q12)."""
    E = router_logits_BLE.shape[-1]
    probs = jax.nn.softmax(router_logits_BLE.astype(jnp.float32), axis=-1)
    is_c = (center_BL >= 0).astype(jnp.float32)
    n = jnp.maximum(is_c.sum(), 1.0)
    p_bar = jnp.einsum("ble,bl->e", probs, is_c) / n
    f_bar = jnp.einsum("ble,bl->e", jax.nn.one_hot(center_BL, E, dtype=jnp.float32), is_c) / n
    return E * jnp.sum(p_bar * f_bar)


def router_z_loss_official(router_logits_BLE, center_BL):
    """The official z-loss value (quirk Q11): mean logsumexp^2 over rows with center != 0."""
    lse = jax.nn.logsumexp(router_logits_BLE.astype(jnp.float32), axis=-1)
    keep = (center_BL != 0).astype(jnp.float32)
    return jnp.sum(keep * lse**2) / jnp.maximum(keep.sum(), 1.0)


def conv1d_same(y_BLD, w_KDO, b_O):
    """Kernel-3 conv with zero padding 1: out[t] = b + sum_i W[i] y[t - 1 + i]."""
    padded = jnp.pad(y_BLD, ((0, 0), (1, 1), (0, 0)))
    L = y_BLD.shape[1]
    taps = jnp.stack([padded[:, i: i + L] for i in range(w_KDO.shape[0])], axis=2)  # (B, L, K, D)
    return jnp.einsum("blkd,kdo->blo", taps.astype(jnp.float32), w_KDO.astype(jnp.float32)) + b_O[None, None, :]


def gather_rows(x_BL_, idx_BT):
    return jnp.take_along_axis(x_BL_, idx_BT.reshape(idx_BT.shape + (1,) * (x_BL_.ndim - 2)), axis=1)


def compact_token_positions(token_mask_BL, capacity: int):
    """Positions (B, T) of token rows in order, their mask (B, T) and the overflow flag."""
    B, L = token_mask_BL.shape
    tm = token_mask_BL.astype(jnp.int32)
    slot = jnp.cumsum(tm, axis=1) - 1
    slot = jnp.where(tm > 0, slot, capacity)  # non-tokens -> dropped
    pos = jnp.zeros((B, capacity), jnp.int32).at[jnp.arange(B)[:, None], slot].set(
        jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)), mode="drop")
    count = tm.sum(axis=1)
    mask = (jnp.arange(capacity)[None, :] < count[:, None]).astype(jnp.int32)
    return pos, mask, jnp.any(count > capacity)


class DeformableBlock(nnx.Module):
    """LN -> offsets/modulators (kernel-3 convs) -> modulated deformable conv, plus residual."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        d, K = cfg.hidden_size, cfg.deformable_kernel_size
        self.norm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        zeros = nnx.initializers.zeros
        # (tap, in, out): out channel j is the offset / modulator of deformable tap j
        self.offset_kernel = param(rngs, zeros, (K, d, K), ("taps", "embed", None), param_dtype)
        self.offset_bias = nnx.Param(jnp.zeros((K,), param_dtype), logical_axes=(None,))
        self.modulator_kernel = param(rngs, zeros, (K, d, K), ("taps", "embed", None), param_dtype)
        self.modulator_bias = nnx.Param(jnp.zeros((K,), param_dtype), logical_axes=(None,))
        self.kernel = param(rngs, trunc_normal, (K, d, d), ("taps", "embed", "qkv"), param_dtype)
        self.batch_independent = cfg.batch_independent
        self.dtype = dtype

    def __call__(self, u_BLD, attention_mask_BL, special_BL, token_mask_BL, rows_BT=None, sow=None):
        y = self.norm(u_BLD)
        y_conv = y
        if self.batch_independent:
            # the official convs read LN(padding row) at [SEP] (quirk Q2); zero it so a sequence
            # never depends on how much padding its batch has
            y_conv = y * attention_mask_BL[..., None].astype(y.dtype)
        offset_BLK = conv1d_same(y_conv, self.offset_kernel[...], self.offset_bias[...])
        mod_logit_BLK = conv1d_same(y_conv, self.modulator_kernel[...], self.modulator_bias[...])
        if sow is not None:
            sow("deform_layernorm_out", y)
            sow("deform_offset", offset_BLK)
            sow("deform_modulator_logit", mod_logit_BLK)
        modulator_BLK = 2 * jax.nn.sigmoid(mod_logit_BLK)
        keep = ((1 - special_BL) * token_mask_BL)[..., None].astype(y.dtype)
        x_in = y * keep
        if rows_BT is None:
            return u_BLD + deform_conv1d(x_in, offset_BLK, modulator_BLK, self.kernel[...].astype(self.dtype))
        off = gather_rows(offset_BLK, rows_BT)
        mod = gather_rows(modulator_BLK, rows_BT)
        return gather_rows(u_BLD, rows_BT) + deform_conv1d(x_in, off, mod, self.kernel[...].astype(self.dtype), rows_BT)


class LearntTokenization(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        d, E = cfg.hidden_size, cfg.num_experts
        self.cfg = cfg
        self.dtype = dtype
        self.input_norm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.gate = param(rngs, trunc_normal, (d, E), ("embed", None), param_dtype)
        # stored by the official model and never used in a forward (quirk Q15); kept for round trips
        self.masked_token_embedding = param(rngs, trunc_normal, (d,), ("embed",), param_dtype)
        self.expert_pre = param(rngs, trunc_normal, (E, d, 2 * d), ("experts", "embed", "mlp"), param_dtype)
        self.expert_conv = nnx.List([
            param(rngs, trunc_normal, (k, g, d // g, d // g), ("taps", None, "conv_in", None), param_dtype)
            for k, g in zip(cfg.expert_kernel_sizes, cfg.expert_groups())
        ])
        self.expert_norm_scale = nnx.Param(jnp.ones((E, d), param_dtype), logical_axes=("experts", "embed"))
        self.expert_norm_bias = nnx.Param(jnp.zeros((E, d), param_dtype), logical_axes=("experts", "embed"))
        self.expert_post = param(rngs, trunc_normal, (E, d, d), ("experts", "mlp", "embed"), param_dtype)
        self.deform = DeformableBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def expert_params(self) -> dict[str, Any]:
        return {
            "pre": self.expert_pre[...], "conv": [c[...] for c in self.expert_conv],
            "norm_scale": self.expert_norm_scale[...], "norm_bias": self.expert_norm_bias[...],
            "post": self.expert_post[...],
        }

    def __call__(self, h_BLD, attention_mask_BL, special_BL, *, jitter_BLD=None, capacity: int | None = None,
                 dense_experts: bool = False, expert_tile: int = 128, sow=None) -> TokenizationOutput:
        cfg = self.cfg
        x = self.input_norm(h_BLD)
        gate_in = x.astype(jnp.float32) * (1 - special_BL)[..., None].astype(jnp.float32)
        if jitter_BLD is not None:
            gate_in = gate_in * jitter_BLD.astype(jnp.float32)
        # router logits stay fp32 at any compute dtype: the NMS order is sensitive at ~1e-6
        logits_BLE = jnp.dot(gate_in, self.gate[...].astype(jnp.float32))
        center, all_ = basic_unit_nms(jax.lax.stop_gradient(logits_BLE), attention_mask_BL, cfg.expert_kernel_sizes)
        unit_center, tap = unit_layout(center, all_, cfg.expert_kernel_sizes)
        probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
        moe = conv_experts(x, center, all_, unit_center, tap, probs_BLE, self.expert_params(),
                           eps=cfg.expert_layer_norm_eps, tile=expert_tile, dense=dense_experts)
        u = h_BLD + moe.astype(h_BLD.dtype)
        token_mask = ((special_BL + (center >= 0)) * attention_mask_BL > 0).astype(jnp.int32)
        if sow is not None:
            sow("conversion_input_layernorm_out", x)
            sow("moe_output", moe)
            sow("deform_input", u)
            sow("motif_attention_mask", token_mask)
        aux = load_balancing_loss(logits_BLE, center)
        B, L, _ = h_BLD.shape
        if capacity is None:
            out = self.deform(u, attention_mask_BL, special_BL, token_mask, sow=sow)
            pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
            return TokenizationOutput(out, pos, token_mask, logits_BLE, center, all_, aux, jnp.array(False))
        pos, mask, overflow = compact_token_positions(token_mask, capacity)
        out = self.deform(u, attention_mask_BL, special_BL, token_mask, rows_BT=pos, sow=sow)
        return TokenizationOutput(out, pos, mask, logits_BLE, center, all_, aux, overflow)
