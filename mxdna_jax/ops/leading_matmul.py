"""a^T b over a leading (row) axis, in a form XLA:CPU runs on its bf16 path.

XLA:CPU has bf16 arithmetic only in its YNNPACK dots, and YNNPACK takes a dot only when the lhs
contracts its last dim in a row-major layout. The products a backward needs over the rows
(a weight gradient x^T dy, attention's P^T dO and dS^T q) contract a leading dim of both
operands, so XLA's float normalisation upcasts them to fp32 Eigen dots behind converts. A 2-D
transpose of `a` does not help: JAX's transposes carry a transposed layout and XLA's transpose
folding puts the rest back into the dot. A 3-D one is not folded: the rows are split into pairs,
(R, S) -> (S, R/2, 2), one physical copy of `a`, and the dot contracts (R/2, 2), the lhs's
trailing dims. Measured on 2 AMD EPYC cores (AVX-512 bf16): a Dense backward at 2,048 x 512 ->
2,048 rows, bf16, 40.7 -> 22.9 ms; attention forward + backward at 4 x 16 heads x 512, head_dim 32,
bf16, 186-208 -> 90-95 ms. The numbers are the same products summed in fp32. Used for bf16 only:
XLA:CPU's fp32 dots take a transposed operand natively, and a base fp32 train step with Dense and
attention in this form ran 10% slower (5.84 against 5.26 s, timed alternately in one process).
"""

import jax
import jax.numpy as jnp


def leading_matmul(a, b, n_batch: int = 0):
    """sum over r of a[..., r, s] b[..., r, h] -> (..., s, h): a^T b over the axis after the
    `n_batch` leading batch axes (a: (*batch, R, S), b: (*batch, R, H)), accumulated in fp32."""
    R = a.shape[n_batch]
    if R % 2:  # a zero row adds nothing to the sum
        pad = [(0, 0)] * n_batch + [(0, 1), (0, 0)]
        a, b = jnp.pad(a, pad), jnp.pad(b, pad)
        R += 1
    batch = a.shape[:n_batch]
    r = tuple(range(n_batch))
    a_SP2 = a.reshape(*batch, R // 2, 2, a.shape[-1]).transpose(*r, n_batch + 2, n_batch, n_batch + 1)
    b_P2H = b.reshape(*batch, R // 2, 2, b.shape[-1])
    dims = (((n_batch + 1, n_batch + 2), (n_batch, n_batch + 1)), (r, r))
    return jax.lax.dot_general(a_SP2, b_P2H, dims, preferred_element_type=jnp.float32)
