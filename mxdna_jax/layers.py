"""NNX building blocks: Dense, LayerNorm, attention, SwiGLU, encoder and cross-attention layers.

Params carry `logical_axes` metadata (plain names); `mxdna_jax.sharding` maps them to mesh axes,
so a model can be built with or without a mesh. Compute runs in `dtype` (fp32 or bf16) with fp32
accumulation; LayerNorm and softmax statistics are always fp32.

Attention goes through `mxdna_jax.ops.attention.attention` in every layer: the key mask is the
only mask (boolean, exact for any row set), which covers both the self-attention of EncoderLayer
and the cross-attention of CrossDecoderLayer (whose query rows are never masked, quirk Q1). By
default it is picked per platform at lowering: `jax.nn.dot_product_attention` (cuDNN flash
attention on NVIDIA GPUs where it fits, XLA elsewhere) and the hand-written softmax on CPU, where
XLA fuses it better; `set_attention_implementation` fixes one for a whole model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mxdna_jax.ops import attention as attention_ops
from mxdna_jax.ops import mlp as mlp_ops
from mxdna_jax.ops.experts import layer_norm
from mxdna_jax.ops.grad_forms import differentiate_as
from mxdna_jax.ops.rope import apply_rope

trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


def param(rngs, init, shape, axes, dtype):
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class Dense(nnx.Module):
    def __init__(self, d_in, d_out, axes, *, rngs, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                 init=trunc_normal):
        self.kernel = param(rngs, init, (d_in, d_out), axes, param_dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), logical_axes=(axes[1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        return mlp_ops.dense(x, self.kernel[...], None if self.bias is None else self.bias[...], self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, d, eps, *, param_dtype=jnp.float32, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((d,), param_dtype), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps).astype(self.dtype)


class Attention(nnx.Module):
    """Bias-free multi-head attention with half-split RoPE at given positions."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense(d, d, ("embed", "qkv"), **kw)
        self.k = Dense(d, d, ("embed", "qkv"), **kw)
        self.v = Dense(d, d, ("embed", "qkv"), **kw)
        self.o = Dense(d, d, ("qkv", "embed"), **kw)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.implementation = None  # per platform; see set_attention_implementation

    def __call__(self, xq_BTD, xkv_BSD, rope_q, rope_k, key_mask_BS):
        B, T, _ = xq_BTD.shape
        S = xkv_BSD.shape[1]
        q = apply_rope(self.q(xq_BTD).reshape(B, T, self.num_heads, self.head_dim), *rope_q)
        k = apply_rope(self.k(xkv_BSD).reshape(B, S, self.num_heads, self.head_dim), *rope_k)
        v = self.v(xkv_BSD).reshape(B, S, self.num_heads, self.head_dim)
        o = attention_ops.attention(q, k, v, key_mask_BS, implementation=self.implementation)
        return self.o(o.reshape(B, T, self.num_heads * self.head_dim))


def set_attention_implementation(module: nnx.Module, implementation: str | None) -> int:
    """Set the attention implementation of every Attention in `module` (see ops/attention.py):
    None (per platform, the default), 'xla' (`jax.nn.dot_product_attention`'s XLA path
    everywhere), 'cudnn' (cuDNN flash attention; NVIDIA GPU, bf16/fp16 only) or 'reference' (the
    hand-written softmax). A static attribute: set it before `nnx.split`/`jit`. Returns how many
    attention modules were changed."""
    if implementation not in attention_ops.IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {attention_ops.IMPLEMENTATIONS}")
    n = 0
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Attention):
            node.implementation = implementation
            n += 1
    return n


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x), bias-free (mxdna_jax.ops.mlp.swiglu: chunked along the sequence on CPU)."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.w1 = Dense(d, f, ("embed", "mlp"), **kw)
        self.w3 = Dense(d, f, ("embed", "mlp"), **kw)
        self.w2 = Dense(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return mlp_ops.swiglu(x, self.w1.kernel[...], self.w3.kernel[...], self.w2.kernel[...], self.w1.dtype)


class EncoderLayer(nnx.Module):
    """Pre-norm layer over a row set S: rows outside S pass through unchanged."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.attn = Attention(cfg, **kw)
        self.post_attn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.ffn = SwiGLU(cfg, **kw)

    def __call__(self, h_BTD, rope, mask_BT):
        keep = mask_BT[..., None].astype(h_BTD.dtype)
        x = self.input_norm(h_BTD)
        h_BTD = h_BTD + keep * self.attn(x, x, rope, rope, mask_BT)
        return h_BTD + keep * self.ffn(self.post_attn_norm(h_BTD))


class CrossDecoderLayer(nnx.Module):
    """MLM decoder: nucleotide queries attend to token states (one LN for both sides).

    As in the official model every query row, padding included, gets the attention output
    (its query mask is dropped, quirk Q1); the FFN is masked by the nucleotide attention mask.
    """

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.cross_attn = Attention(cfg, **kw)
        self.post_attn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.ffn = SwiGLU(cfg, **kw)

    def __call__(self, q_BLD, rope_q, kv_BTD, rope_k, key_mask_BT, query_mask_BL):
        h = q_BLD + self.cross_attn(self.input_norm(q_BLD), self.input_norm(kv_BTD), rope_q, rope_k, key_mask_BT)
        keep = query_mask_BL[..., None].astype(h.dtype)
        return h + keep * self.ffn(self.post_attn_norm(h))


# ----------------------------------------------------------------------------- a stack of identical layers

LAYER_LOOPS = ("auto", "scan", "unrolled")
# What a rematerialised layer keeps for its backward (ModelConfig.remat_policy); the rest is recomputed.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,  # the whole layer is recomputed: least memory
    # q/k/v/o and FFN projections (dots without batch dims) kept; attention core, LN, RoPE, SiLU recomputed.
    # Dense runs its matmul under a custom VJP (ops/mlp.py), which hides the dot from the dots rule,
    # so its output is kept by name.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(mlp_ops.MATMUL_NAME)),
}


def run_layers(layers, h, *args, loop: str = "auto", remat: bool = False, remat_policy: str = "nothing",
               collect: bool = False):
    """`h` through `layers` (an nnx.List of one layer type) in order, each called as layer(h, *args).

    Returns (the last output, the (N, *h.shape) stack of every layer's output when `collect`, else None).

    loop='scan': one `lax.scan` over the layers' param states, stacked here, inside the call, so the
    stored params stay per layer (checkpoints, convert.py names, sharding rules) and their gradients
    come back per layer through the stack. XLA then compiles one layer body for the forward and one
    for the backward, instead of N copies.
    loop='unrolled': a Python loop (N copies of the layer in the program).
    loop='auto': scan for the forward-only program, unrolled under a gradient (a custom VJP whose
    primal is the scan and whose forward/backward rules are the unrolled stack's VJP), because each
    is the faster one there (base config on 2 AMD EPYC cores, variants timed alternately: forward
    4 x 1,024 nt, scan 1.54 s against 1.68 s unrolled in fp32, 1.22 s against 1.29 s in bf16;
    train step 4 x 512 nt, unrolled + remat 'dots' 2.93 s against 3.83 s scan, fp32).
    The two differ by float rounding only.
    Layers whose graphs differ (e.g. another attention implementation on one of them) run unrolled.
    remat: recompute each layer in the backward, keeping what `remat_policy` names (REMAT_POLICIES).
    """
    if loop not in LAYER_LOOPS:
        raise ValueError(f"layer loop {loop!r} not in {LAYER_LOOPS}")
    policy = REMAT_POLICIES[remat_policy]
    if not len(layers):
        return h, None
    splits = [nnx.split(layer) for layer in layers]
    graphdef = splits[0][0]
    states = [state for _, state in splits]
    if loop == "unrolled" or len(layers) == 1 or any(g != graphdef for g, _ in splits):
        return _unrolled(graphdef, states, h, args, remat, policy, collect)
    if loop == "scan":
        return _scanned(graphdef, states, h, args, remat, policy, collect)
    loop_fn = lambda run: lambda states, h, args: run(graphdef, states, h, args, remat, policy, collect)  # noqa: E731
    return differentiate_as(loop_fn(_scanned), loop_fn(_unrolled))(states, h, args)


def _unrolled(graphdef, states, h, args, remat, policy, collect):
    outs = []
    for state in states:
        layer = nnx.merge(graphdef, state)
        h = (nnx.remat(layer, policy=policy) if remat else layer)(h, *args)
        outs.append(h)
    return h, jnp.stack(outs) if collect else None


def _scanned(graphdef, states, h, args, remat, policy, collect):
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def body(h, state):
        h = nnx.merge(graphdef, state)(h, *args)
        return h, h if collect else None

    if remat:
        body = jax.checkpoint(body, policy=policy)
    return jax.lax.scan(body, h, stacked)
