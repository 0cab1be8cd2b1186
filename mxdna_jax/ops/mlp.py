"""The position-wise matmuls: a Dense (x W + b) and the SwiGLU FFN, w2(silu(x w1) * x w3).

Compute in `dtype` with the matmul output in `dtype` (fp32 accumulation inside the kernel; a
bf16 output halves the activations a bf16 train step stores). One 2-D (rows, D) matmul whatever
the leading dims: on (B, T, D) XLA:CPU lays the backward's weight-gradient operand out
transposed and spends a slow copy fusion on it (~25% of a base train step); the flat form has
the same numbers. Its backward is written out (`_matmul`, a custom VJP) so that on CPU the
weight gradient x^T dy stays a bf16 dot (`ops/leading_matmul.py` says why and what it gains).

`swiglu` on CPU runs its forward in chunks of about `CPU_CHUNK_ROWS` rows along the sequence
(`lax.map`): the (rows, F) intermediates of a whole batch (32 MiB at 4 x 1,024 rows, F 2,048,
fp32) fall out of cache and are written to fresh pages on every call, the chunks' stay in cache
and reuse one buffer. Measured on 2 AMD EPYC cores, 4,096 rows, fp32: 81 ms whole against 63 ms
in chunks of 1,024 rows. Under a gradient the whole-batch form is faster (the backward's
weight-gradient matmuls want all rows: 133 ms against 149 ms with remat 'dots' at 2,048 rows),
so a custom VJP differentiates the unchunked form; the two differ by float rounding only (each
row's numbers come from the same matmuls). Other platforms run the unchunked form.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mxdna_jax.ops.grad_forms import differentiate_as
from mxdna_jax.ops.leading_matmul import leading_matmul

CPU_CHUNK_ROWS = 1024
# The name a Dense output carries for remat policies (layers.REMAT_POLICIES): the custom VJP
# below hides its dot from jax's dots rule.
MATMUL_NAME = "mxdna_matmul"


def _weight_grad_plain(x_ND, dy_NE):
    return jax.lax.dot_general(x_ND, dy_NE, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_ND, kernel_DE, dtype):
    """x (N, D) in `dtype` @ kernel (D, E) cast to `dtype`; output in `dtype`. The kernel's
    gradient comes back in the kernel's own dtype, accumulated in fp32."""
    return jnp.dot(x_ND, kernel_DE.astype(dtype), preferred_element_type=dtype)


def _matmul_fwd(x_ND, kernel_DE, dtype):
    return _matmul(x_ND, kernel_DE, dtype), (x_ND, kernel_DE)


def _matmul_bwd(dtype, residuals, dy_NE):
    x_ND, kernel_DE = residuals
    dx_ND = jax.lax.dot_general(dy_NE, kernel_DE.astype(dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=dtype)
    # x^T dy: in bf16 on CPU, in the form XLA:CPU keeps in bf16 (ops/leading_matmul.py), fp32-summed;
    # fp32 keeps the plain dot, which XLA:CPU's fp32 dots take transposed at no cost
    dk_DE = (jax.lax.platform_dependent(x_ND, dy_NE, cpu=leading_matmul, default=_weight_grad_plain)
             if x_ND.dtype == jnp.bfloat16 else _weight_grad_plain(x_ND, dy_NE))
    return dx_ND.astype(x_ND.dtype), dk_DE.astype(kernel_DE.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x, kernel_DE, bias_E, dtype):
    """x (..., D) @ kernel (D, E) [+ bias], in `dtype`."""
    lead = x.shape[:-1]
    y = checkpoint_name(_matmul(x.reshape(-1, x.shape[-1]).astype(dtype), kernel_DE, dtype), MATMUL_NAME)
    if bias_E is not None:
        y = y + bias_E.astype(jnp.float32)[None, :]
    return y.reshape(*lead, kernel_DE.shape[1]).astype(dtype)


def _swiglu_whole(x_BTD, w1_DF, w3_DF, w2_FD, dtype):
    return dense(jax.nn.silu(dense(x_BTD, w1_DF, None, dtype)) * dense(x_BTD, w3_DF, None, dtype), w2_FD, None, dtype)


def chunk_count(shape, rows: int | None = None) -> int:
    """How many sequence chunks give about `rows` (default CPU_CHUNK_ROWS, read at trace time)
    rows each (1 = no chunking): whole batches below two chunks' worth."""
    rows = rows or CPU_CHUNK_ROWS
    T, total = shape[-2], math.prod(shape[:-1])
    return max(1, min(T, total // rows)) if total >= 2 * rows else 1


def _swiglu_chunked(x_BTD, w1_DF, w3_DF, w2_FD, *, dtype, n):
    B, T, D = x_BTD.shape
    c = -(-T // n)
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, n * c - T), (0, 0)))  # zero rows, sliced off below
    x_nBcD = jnp.moveaxis(x_BTD.reshape(B, n, c, D), 1, 0)
    y_nBcD = jax.lax.map(lambda x: _swiglu_whole(x, w1_DF, w3_DF, w2_FD, dtype), x_nBcD)
    return jnp.moveaxis(y_nBcD, 0, 1).reshape(B, n * c, D)[:, :T]


def swiglu(x_BTD, w1_DF, w3_DF, w2_FD, dtype):
    """w2(silu(x w1) * x w3) over (B, T, D) rows, in `dtype` (see the module docstring)."""
    n = chunk_count(x_BTD.shape) if x_BTD.ndim == 3 else 1
    if n == 1:
        return _swiglu_whole(x_BTD, w1_DF, w3_DF, w2_FD, dtype)
    return jax.lax.platform_dependent(
        x_BTD, w1_DF, w3_DF, w2_FD,
        cpu=differentiate_as(functools.partial(_swiglu_chunked, dtype=dtype, n=n),
                             functools.partial(_swiglu_whole, dtype=dtype)),
        default=functools.partial(_swiglu_whole, dtype=dtype))
