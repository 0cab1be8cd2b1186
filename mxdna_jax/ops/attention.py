"""Masked multi-head attention over a row set (the official flash-attn varlen semantics).

Every query row attends to the key rows of its own sequence whose mask is 1. Query rows outside
the set are the caller's business (layers zero them, or keep them: quirk Q1). Softmax statistics
are fp32 whatever the input dtype.

`attention` is what the layers call. Its `implementation`:
  None        the default, chosen per platform when the computation is lowered
              (`lax.platform_dependent`, so `jax.export` for another platform gets that platform's
              branch): `jax.nn.dot_product_attention` with cuDNN flash attention on an NVIDIA GPU
              where cuDNN takes the call (bf16/fp16, head_dim a multiple of 8 up to 128, even
              lengths), the library's XLA attention on other GPUs and TPU, and the hand-written
              softmax (`masked_attention`) on CPU. Why not the library on CPU too: its XLA version
              vmaps over the query-group axis; the 5-D probabilities that makes stop XLA:CPU from
              fusing the softmax into the PV matmul and add a transposed copy of the probabilities
              (measured on 2 AMD EPYC cores: +40% for attention alone at B4 x 1024 x 8 heads, fp32;
              +35% to +75% for whole forwards). The numbers are the same to the last bits or so
              (parity fixtures: identical errors on public_small, <= 1e-5 on every key).
  'xla'       `jax.nn.dot_product_attention(implementation=None)` (its XLA path) everywhere.
  'cudnn'     `jax.nn.dot_product_attention(implementation='cudnn')`; raises where cuDNN cannot run it.
  'reference' `masked_attention` everywhere.

Rows without any key (padding rows of a sequence that has no valid row at all) get the mean of
all value rows in every implementation: the masked logits are a large finite negative (-1e30 in
`masked_attention`, -0.7 x the dtype max in the library), so after the max subtraction the
softmax of such a row is uniform, never NaN. Real batches have none ([CLS] and [SEP] are always
keys); the MLM decoder's padding query rows (quirk Q1) do have keys and are reproduced exactly.
"""

import chex
import jax
import jax.numpy as jnp

from mxdna_jax.ops.grad_forms import differentiate_as
from mxdna_jax.ops.leading_matmul import leading_matmul

_NEG = -1e30

IMPLEMENTATIONS = (None, "xla", "cudnn", "reference")


def masked_attention(q_BTNH, k_BSNH, v_BSNH, key_mask_BS):
    """The hand-written masked softmax (fp32 logits, softmax and accumulation).

    The key mask is an additive bias (0 or -1e30, which absorbs any logit exactly). The forward
    computes normalised probabilities, which XLA:CPU fuses into the values matmul (48 ms against
    119 ms for dividing the output instead, B4 x 16 heads x 1,024, head_dim 32, fp32). The
    backward differs by dtype, each the faster on XLA:CPU (base train step 4 x 512, the two forms
    timed alternately in one process on 2 AMD EPYC cores):
      fp32: autodiff of `_values_then_normalise` (the normalisation divides the (B, T, N, H)
            output; the max shift is a constant to autodiff): 5.26 s per step against 5.84 s
            with the written-out backward.
      bf16: the written-out backward (`_attention_bwd`, the flash-attention formulas), whose
            products are fed in bf16, the two that contract over the query rows (P^T dO, dS^T q)
            in the form XLA:CPU keeps in bf16 (ops/leading_matmul.py). Autodiff left every
            backward product an fp32 dot (the logits' cotangent is fp32): 3.10 s per step against
            3.93 s; attention alone (forward + backward, 4 x 16 heads x 512) 90-95 against 186-208 ms.
    The outputs of the forms differ by float rounding."""
    _check(q_BTNH, k_BSNH, v_BSNH, key_mask_BS)
    bias_BS = jnp.where(key_mask_BS.astype(bool), 0.0, _NEG).astype(jnp.float32)
    attend = _attention_fp32 if q_BTNH.dtype == jnp.float32 else _attention
    return attend(q_BTNH, k_BSNH, v_BSNH, bias_BS)


def _scaled_q(q_BTNH):
    # The 1/sqrt(H) scale goes on q, not on the (B, N, T, S) logits: XLA:CPU's fused dot (YNNPACK)
    # takes the scalar as a materialised (B, N, T, S) operand, a broadcast that cost 14 of the 85 ms
    # of an attention forward + backward at B4 x 16 heads x 512 (fp32). Same numbers to rounding.
    return (q_BTNH.astype(jnp.float32) * q_BTNH.shape[-1] ** -0.5).astype(q_BTNH.dtype)


def _logits(qs_BTNH, k_BSNH, bias_BS):
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", qs_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    return logits_BNTS + bias_BS[:, None, None, :]


def _probs_and_out(qs_BTNH, k_BSNH, v_BSNH, bias_BS):
    logits_BNTS = _logits(qs_BTNH, k_BSNH, bias_BS)
    probs_BNTS = jnp.exp(logits_BNTS - logits_BNTS.max(axis=-1, keepdims=True))
    probs_BNTS = (probs_BNTS / probs_BNTS.sum(axis=-1, keepdims=True)).astype(v_BSNH.dtype)
    out_BTNH = jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH, preferred_element_type=jnp.float32)
    return probs_BNTS, out_BTNH.astype(qs_BTNH.dtype)


def _softmax_then_values(q_BTNH, k_BSNH, v_BSNH, bias_BS):
    return _probs_and_out(_scaled_q(q_BTNH), k_BSNH, v_BSNH, bias_BS)[1]


_attention = jax.custom_vjp(_softmax_then_values)


def _attention_fwd(q_BTNH, k_BSNH, v_BSNH, bias_BS):
    qs_BTNH = _scaled_q(q_BTNH)
    probs_BNTS, out_BTNH = _probs_and_out(qs_BTNH, k_BSNH, v_BSNH, bias_BS)
    return out_BTNH, (qs_BTNH, k_BSNH, v_BSNH, probs_BNTS, out_BTNH)


def _attention_bwd(residuals, dout_BTNH):
    """dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dO * O)); dq = dS K / sqrt(H); dK = dS^T q_s.
    Products in the inputs' dtype with fp32 accumulation; the softmax's own terms in fp32."""
    qs_BTNH, k_BSNH, v_BSNH, probs_BNTS, out_BTNH = residuals
    dt = qs_BTNH.dtype
    dout_BTNH = dout_BTNH.astype(dt)
    dv_BNSH = leading_matmul(probs_BNTS, jnp.swapaxes(dout_BTNH, 1, 2), n_batch=2)
    dprobs_BNTS = jnp.einsum("btnh,bsnh->bnts", dout_BTNH, v_BSNH, preferred_element_type=jnp.float32)
    row_BNT1 = jnp.einsum("btnh,btnh->bnt", dout_BTNH.astype(jnp.float32), out_BTNH.astype(jnp.float32))[..., None]
    dlogits_BNTS = (probs_BNTS.astype(jnp.float32) * (dprobs_BNTS - row_BNT1)).astype(dt)
    dqs_BTNH = jnp.einsum("bnts,bsnh->btnh", dlogits_BNTS, k_BSNH, preferred_element_type=jnp.float32)
    dk_BNSH = leading_matmul(dlogits_BNTS, jnp.swapaxes(qs_BTNH, 1, 2), n_batch=2)
    dq_BTNH = (dqs_BTNH * qs_BTNH.shape[-1] ** -0.5).astype(dt)
    return (dq_BTNH, jnp.swapaxes(dk_BNSH, 1, 2).astype(k_BSNH.dtype),
            jnp.swapaxes(dv_BNSH, 1, 2).astype(v_BSNH.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _values_then_normalise(q_BTNH, k_BSNH, v_BSNH, bias_BS):
    logits_BNTS = _logits(_scaled_q(q_BTNH), k_BSNH, bias_BS)
    shift_BNT1 = jax.lax.stop_gradient(logits_BNTS.max(axis=-1, keepdims=True))
    weights_BNTS = jnp.exp(logits_BNTS - shift_BNT1)
    total_BTN1 = jnp.swapaxes(weights_BNTS.sum(axis=-1), 1, 2)[..., None]
    out_BTNH = jnp.einsum("bnts,bsnh->btnh", weights_BNTS.astype(v_BSNH.dtype), v_BSNH,
                          preferred_element_type=jnp.float32)
    return (out_BTNH / total_BTN1).astype(q_BTNH.dtype)


_attention_fp32 = differentiate_as(_softmax_then_values, _values_then_normalise)


def library_attention(q_BTNH, k_BSNH, v_BSNH, key_mask_BS, *, implementation=None):
    """`jax.nn.dot_product_attention` with the key mask as a boolean mask (exact for any row set,
    not only prefixes: the token mask of 'original' mode is scattered). cuDNN wants the mask at
    the logits' (B, 1, T, S) shape, so it is broadcast for that implementation only."""
    _check(q_BTNH, k_BSNH, v_BSNH, key_mask_BS)
    B, T = q_BTNH.shape[:2]
    S = k_BSNH.shape[1]
    mask = key_mask_BS.astype(bool)[:, None, None, :]
    if implementation == "cudnn":
        mask = jnp.broadcast_to(mask, (B, 1, T, S))
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask,
                                        implementation=implementation).astype(q_BTNH.dtype)


def cudnn_fits(q_BTNH, k_BSNH) -> bool:
    """The shape/dtype conditions under which cuDNN flash attention takes a masked call, forward
    and backward (the backward's bias pattern needs even lengths). Whether cuDNN is present is
    only known when the call is traced (see `_gpu_attention`)."""
    H, T, S = q_BTNH.shape[-1], q_BTNH.shape[1], k_BSNH.shape[1]
    return (q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and H % 8 == 0 and H <= 128
            and T % 2 == 0 and S % 2 == 0)


def _gpu_attention(q, k, v, key_mask):
    """cuDNN where it takes the call, else the library's XLA attention. cuDNN raises at trace time
    when it is absent (e.g. lowering for 'cuda' on a CPU-only host) or the shape is unsupported."""
    if cudnn_fits(q, k):
        try:
            return library_attention(q, k, v, key_mask, implementation="cudnn")
        except (RuntimeError, NotImplementedError, ValueError):
            pass
    return library_attention(q, k, v, key_mask)


def attention(q_BTNH, k_BSNH, v_BSNH, key_mask_BS, *, implementation=None):
    """softmax(q k^T / sqrt(H) over the keys with mask 1) v, per head, in q's dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    if implementation == "reference":
        return masked_attention(q_BTNH, k_BSNH, v_BSNH, key_mask_BS)
    if implementation == "xla":
        return library_attention(q_BTNH, k_BSNH, v_BSNH, key_mask_BS)
    if implementation == "cudnn":
        return library_attention(q_BTNH, k_BSNH, v_BSNH, key_mask_BS, implementation="cudnn")
    return jax.lax.platform_dependent(q_BTNH, k_BSNH, v_BSNH, key_mask_BS, cpu=masked_attention,
                                      cuda=_gpu_attention, default=library_attention)


def _check(q_BTNH, k_BSNH, v_BSNH, key_mask_BS):
    chex.assert_rank([q_BTNH, k_BSNH, v_BSNH, key_mask_BS], [4, 4, 4, 2])
    chex.assert_equal_shape([k_BSNH, v_BSNH])
    chex.assert_shape(key_mask_BS, k_BSNH.shape[:2])
