"""The position-wise matmuls: a Dense (x W + b) and the SwiGLU FFN, w2(silu(x w1) * x w3).

Compute in `dtype` with the matmul output in `dtype` (fp32 accumulation inside the kernel; a
bf16 output halves the activations a bf16 train step stores). One 2-D (rows, D) matmul whatever
the leading dims: on (B, T, D) XLA:CPU lays the backward's weight-gradient operand out
transposed and spends a slow copy fusion on it (~25% of a base train step); the flat form has
the same numbers.

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

from mxdna_jax.ops.grad_forms import differentiate_as

CPU_CHUNK_ROWS = 1024


def dense(x, kernel_DE, bias_E, dtype):
    """x (..., D) @ kernel (D, E) [+ bias], in `dtype`."""
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel_DE.astype(dtype), preferred_element_type=dtype)
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
