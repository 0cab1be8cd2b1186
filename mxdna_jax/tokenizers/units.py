"""The shared body of unit tokenizers: units -> embedding -> assembly.

A unit tokenizer is a unit selector (`select`: the learnt gate + NMS, or a fixed k-mer tiling)
followed by one body, so a fixed tokenizer gets exactly the machinery the learnt one has:

  embedding  `experts=True`: conv experts (kernel = stride = unit length), added to the unit
             centre's state as a residual and weighted by the router probability when there
             is a router (1 otherwise).
             `experts=False`: the parameter-free mean of the unit's nucleotide states replaces
             the centre's state. Nothing downstream then depends on the router probabilities,
             so a learnt gate is trained by the load-balancing aux loss alone.
  assembly   `deformable=True`: LN -> modulated deformable conv over the token rows, plus the
             residual (the official block).
             `deformable=False`: a unit's token state is its embedded state at the centre row.

[CLS] and [SEP] are token rows too, carried through the embedding unchanged. Compact mode
computes only the token rows, gathered into the static capacity.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mxdna_jax.config import expert_conv_groups
from mxdna_jax.layers import LayerNorm, param, trunc_normal
from mxdna_jax.ops.deformable import deform_conv1d
from mxdna_jax.ops.experts import conv_experts
from mxdna_jax.ops.nms import unit_layout
from mxdna_jax.ops.units import unit_mean
from mxdna_jax.tokenizers.base import (TokenizationOutput, arange_positions, compact_token_positions, gather_rows,
                                       unit_token_mask)


def conv1d_same(y_BLD, w_KDO, b_O):
    """Kernel-3 conv with zero padding 1: out[t] = b + sum_i W[i] y[t - 1 + i]."""
    padded = jnp.pad(y_BLD, ((0, 0), (1, 1), (0, 0)))
    L = y_BLD.shape[1]
    taps = jnp.stack([padded[:, i: i + L] for i in range(w_KDO.shape[0])], axis=2)  # (B, L, K, D)
    return jnp.einsum("blkd,kdo->blo", taps.astype(jnp.float32), w_KDO.astype(jnp.float32)) + b_O[None, None, :]


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


class Units(NamedTuple):
    """What a unit selector returns."""

    center: jax.Array  # (B, L) int32 unit encoding (ops/nms.py)
    all: jax.Array  # (B, L) int32
    router_logits: jax.Array | None  # (B, L, E) fp32, None for fixed selectors
    probs: jax.Array | None  # (B, L, E) expert weights of the embedding; None = 1
    aux_loss: jax.Array  # () fp32


class Routing(NamedTuple):
    """What `UnitTokenizer.route` returns: the units and where each covered position sits in its unit."""

    x: jax.Array | None  # (B, L, D) the input LN's output (what the gate and experts read); None if unused
    units: Units
    unit_center: jax.Array  # (B, L) int32 row of the covering unit's centre, -1 if uncovered
    tap: jax.Array  # (B, L) int32 index inside the covering unit, -1 if uncovered


class UnitTokenizer(nnx.Module):
    """Base of unit tokenizers: subclasses create their selector's params, call `_init_body`
    and implement `select`. Only the params a configuration uses are created."""

    uses_jitter: bool = False

    def _init_body(self, cfg, kernel_sizes, *, rngs, dtype, param_dtype):
        """Expert params for units of lengths `kernel_sizes` (= 1..E) if `cfg.experts`, and the
        deformable block if `cfg.deformable`. Creation order = the official checkpoint's (the
        fresh-init draws of the default model stay what they were)."""
        d, E = cfg.hidden_size, len(kernel_sizes)
        self.kernel_sizes = tuple(kernel_sizes)
        self.expert_layer_norm_eps = cfg.expert_layer_norm_eps
        self.dtype = dtype
        self.use_experts = bool(cfg.experts)
        if self.use_experts:
            self.expert_pre = param(rngs, trunc_normal, (E, d, 2 * d), ("experts", "embed", "mlp"), param_dtype)
            self.expert_conv = nnx.List([
                param(rngs, trunc_normal, (k, g, d // g, d // g), ("taps", None, "conv_in", None), param_dtype)
                for k, g in ((k, expert_conv_groups(d, k)) for k in self.kernel_sizes)
            ])
            self.expert_norm_scale = nnx.Param(jnp.ones((E, d), param_dtype), logical_axes=("experts", "embed"))
            self.expert_norm_bias = nnx.Param(jnp.zeros((E, d), param_dtype), logical_axes=("experts", "embed"))
            self.expert_post = param(rngs, trunc_normal, (E, d, d), ("experts", "mlp", "embed"), param_dtype)
        self.deform = DeformableBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype) if cfg.deformable else None

    def expert_params(self) -> dict[str, Any]:
        return {
            "pre": self.expert_pre[...], "conv": [c[...] for c in self.expert_conv],
            "norm_scale": self.expert_norm_scale[...], "norm_bias": self.expert_norm_bias[...],
            "post": self.expert_post[...],
        }

    def normed(self, h_BLD):
        """The input LN's output: what a gate and the experts read. Subclasses set `input_norm`,
        None when nothing reads it (then this is None too)."""
        return None if self.input_norm is None else self.input_norm(h_BLD)

    def select(self, x_BLD, attention_mask_BL, special_BL, jitter_BLD, units_BL=None) -> Units:
        """The units (`units_BL`: a given segmentation, read only by tokenizers that need one)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ stages (__call__ is made of these)

    def route(self, h_BLD, attention_mask_BL, special_BL, jitter_BLD=None, units_BL=None) -> Routing:
        """Input LN -> unit selection (`select`) -> each covered position's unit centre and tap."""
        x = self.normed(h_BLD)
        units = self.select(x, attention_mask_BL, special_BL, jitter_BLD, units_BL)
        unit_center, tap = unit_layout(units.center, units.all, self.kernel_sizes)
        return Routing(x, units, unit_center, tap)

    def embed_units(self, h_BLD, routing: Routing, *, dense_experts: bool = False, expert_tile: int = 128):
        """(u, moe): the states with each unit embedded at its centre row, and the embedding itself
        (expert outputs, or unit means with `experts=False`)."""
        units = routing.units
        if self.use_experts:
            moe = conv_experts(routing.x, units.center, units.all, routing.unit_center, routing.tap, units.probs,
                               self.expert_params(), eps=self.expert_layer_norm_eps, tile=expert_tile,
                               dense=dense_experts)
            return h_BLD + moe.astype(h_BLD.dtype), moe
        moe = unit_mean(h_BLD, routing.unit_center, units.center)
        return jnp.where((units.center >= 0)[..., None], moe, h_BLD), moe

    def token_mask(self, center_BL, attention_mask_BL, special_BL):
        """(B, L) int32: the token rows at nucleotide length ([CLS], unit centres, [SEP])."""
        return unit_token_mask(center_BL, attention_mask_BL, special_BL)

    def assemble(self, u_BLD, attention_mask_BL, special_BL, token_mask_BL, capacity: int | None = None, sow=None):
        """Token rows from the embedded states: (hidden (B, T, D), positions, mask, overflow). The
        deformable block (if on) runs over the token rows; compact mode gathers them into `capacity`."""
        B, L, _ = u_BLD.shape
        if capacity is None:
            out = u_BLD if self.deform is None else self.deform(u_BLD, attention_mask_BL, special_BL, token_mask_BL,
                                                               sow=sow)
            return out, arange_positions(B, L), token_mask_BL, jnp.array(False)
        pos, mask, overflow = compact_token_positions(token_mask_BL, capacity)
        if self.deform is None:
            out = gather_rows(u_BLD, pos)
        else:
            out = self.deform(u_BLD, attention_mask_BL, special_BL, token_mask_BL, rows_BT=pos, sow=sow)
        return out, pos, mask, overflow

    def __call__(self, h_BLD, attention_mask_BL, special_BL, *, jitter_BLD=None, capacity: int | None = None,
                 dense_experts: bool = False, expert_tile: int = 128, sow=None,
                 units_BL=None) -> TokenizationOutput:
        r = self.route(h_BLD, attention_mask_BL, special_BL, jitter_BLD, units_BL)
        u, moe = self.embed_units(h_BLD, r, dense_experts=dense_experts, expert_tile=expert_tile)
        token_mask = self.token_mask(r.units.center, attention_mask_BL, special_BL)
        if sow is not None:
            if r.x is not None:
                sow("conversion_input_layernorm_out", r.x)
            sow("moe_output" if self.use_experts else "unit_mean", moe)
            sow("deform_input", u)
            sow("motif_attention_mask", token_mask)
        out, pos, mask, overflow = self.assemble(u, attention_mask_BL, special_BL, token_mask, capacity, sow=sow)
        units = r.units
        return TokenizationOutput(out, pos, mask, units.router_logits, units.center, units.all, units.aux_loss,
                                  overflow)
