"""1-D modulated deformable convolution (kernel 3, one offset group) as gathers.

Semantics are torchvision's `deform_conv2d` as the official MxDNA block calls it (sequence on
the height axis, zero padding 1): tap j of output row t samples the input at the fractional
coordinate q = fp32(t - 1 + j) + offset[t, j] by linear interpolation; taps outside (-1, L)
read zero, and so does the missing neighbour at the edges. The coordinate is formed in fp32 on
purpose: torchvision does, and ulp(300) ~ 3e-5 shows up in the outputs.

Output rows can be any subset of positions (`rows_BT`), which is what the compact mode uses:
only token rows are computed, sampling a full-length input.
"""

import chex
import jax.numpy as jnp


def deform_sample(x_BLC, offset_BTK, rows_BT):
    """Linearly interpolated samples (B, T, K, C) of x at rows_BT - 1 + k + offset (K = 3 taps)."""
    chex.assert_rank([x_BLC, offset_BTK, rows_BT], [3, 3, 2])
    B, L, C = x_BLC.shape
    K = offset_BTK.shape[-1]
    chex.assert_shape(offset_BTK, (B, rows_BT.shape[1], K))
    base_BTK = (rows_BT[:, :, None] - (K // 2) + jnp.arange(K)[None, None, :]).astype(jnp.float32)
    q_BTK = base_BTK + offset_BTK.astype(jnp.float32)
    inside_BTK = (q_BTK > -1) & (q_BTK < L)
    lo_f = jnp.floor(q_BTK)
    frac_BTK = q_BTK - lo_f
    lo_BTK = lo_f.astype(jnp.int32)
    hi_BTK = lo_BTK + 1

    def take(idx_BTK):
        ok = inside_BTK & (idx_BTK >= 0) & (idx_BTK <= L - 1)
        flat = jnp.clip(idx_BTK, 0, L - 1).reshape(B, -1)
        v = jnp.take_along_axis(x_BLC, flat[:, :, None], axis=1).reshape(*idx_BTK.shape, C)
        return jnp.where(ok[..., None], v, 0)

    w_hi = frac_BTK[..., None].astype(x_BLC.dtype)
    return (1 - w_hi) * take(lo_BTK) + w_hi * take(hi_BTK)


def deform_conv1d(x_BLC, offset_BTK, modulator_BTK, weight_KCD, rows_BT=None):
    """Modulated deformable conv: out[t] = sum_k W_k (m[t,k] * sample_k(t)).

    Args:
      x_BLC: input (already masked); offset/modulator (B, T, K) at output rows `rows_BT`
      (default: every row, T = L); weight_KCD: tap-major (K, C_in, D_out).
    """
    B, L, _ = x_BLC.shape
    if rows_BT is None:
        rows_BT = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :], (B, L))
    chex.assert_equal_shape([offset_BTK, modulator_BTK])
    chex.assert_shape(weight_KCD, (offset_BTK.shape[-1], x_BLC.shape[-1], None))
    samples_BTKC = deform_sample(x_BLC, offset_BTK, rows_BT)
    modulated = samples_BTKC * modulator_BTK[..., None].astype(samples_BTKC.dtype)
    return jnp.einsum("btkc,kcd->btd", modulated, weight_KCD.astype(samples_BTKC.dtype),
                      preferred_element_type=jnp.float32).astype(x_BLC.dtype)
