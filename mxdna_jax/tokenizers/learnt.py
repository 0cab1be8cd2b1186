"""The learnt tokenization (MxDNA): gate + jitter -> basic-unit NMS -> conv experts -> deformable conv.

The gate scores every (position, unit length) candidate; the NMS (ops/nms.py) keeps the
non-overlapping units greedily by score; the unit body (units.py) embeds and assembles them.
`cfg.experts`, `cfg.deformable` and `cfg.jitter` switch the components off one by one (the
paper's component ablation); with all three on this is the official layer, parameter names
and numbers included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mxdna_jax.layers import LayerNorm, param, trunc_normal
from mxdna_jax.ops.nms import basic_unit_nms
from mxdna_jax.tokenizers.units import Units, UnitTokenizer


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


class LearntTokenization(UnitTokenizer):
    """Units chosen by the gate and the NMS over lengths `cfg.expert_kernel_sizes`.

    `masked_token_embedding` is stored by the official model and never used in a forward (quirk
    Q15); it exists only in the official layout (experts and deformable on), where it keeps
    checkpoint round trips complete.
    """

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        d, E = cfg.hidden_size, cfg.num_experts
        self.cfg = cfg
        self.uses_jitter = bool(cfg.jitter)
        self.input_norm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.gate = param(rngs, trunc_normal, (d, E), ("embed", None), param_dtype)
        if cfg.experts and cfg.deformable:
            self.masked_token_embedding = param(rngs, trunc_normal, (d,), ("embed",), param_dtype)
        self._init_body(cfg, cfg.expert_kernel_sizes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def gate_logits(self, x_BLD, special_BL, jitter_BLD=None):
        """(B, L, E) fp32 router logits: the gate on the input LN's output, [CLS]/[SEP]/[PAD] rows zeroed,
        times the multiplicative jitter when given."""
        gate_in = x_BLD.astype(jnp.float32) * (1 - special_BL)[..., None].astype(jnp.float32)
        if jitter_BLD is not None:
            gate_in = gate_in * jitter_BLD.astype(jnp.float32)
        # router logits stay fp32 at any compute dtype: the NMS order is sensitive at ~1e-6
        return jnp.dot(gate_in, self.gate[...].astype(jnp.float32))

    def nms(self, logits_BLE, attention_mask_BL):
        """(center, all): the basic units the greedy NMS keeps (no gradient flows through the choice)."""
        return basic_unit_nms(jax.lax.stop_gradient(logits_BLE), attention_mask_BL, self.kernel_sizes)

    def select(self, x_BLD, attention_mask_BL, special_BL, jitter_BLD, units_BL=None) -> Units:
        logits_BLE = self.gate_logits(x_BLD, special_BL, jitter_BLD)
        center, all_ = self.nms(logits_BLE, attention_mask_BL)
        # the expert outputs are weighted by the router probability: the MLM loss's path to the gate
        probs = jax.nn.softmax(logits_BLE, axis=-1) if self.use_experts else None
        return Units(center, all_, logits_BLE, probs, load_balancing_loss(logits_BLE, center))
