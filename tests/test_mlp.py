"""The position-wise FFN (mxdna_jax.ops.mlp): the CPU sequence-chunked forward against the whole
batch, its gradient, and when it chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _hlo import dot_operand_types
from mxdna_jax.ops import mlp


def _case(B, T, D=16, F=48, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (B, T, D))
    w1, w3 = (jax.random.normal(k[i], (D, F)) * D**-0.5 for i in (1, 2))
    w2 = jax.random.normal(k[3], (F, D)) * F**-0.5
    return x, w1, w3, w2


def _reference(x, w1, w3, w2):
    h = jax.nn.silu(np.einsum("btd,df->btf", x, w1)) * np.einsum("btd,df->btf", x, w3)
    return np.einsum("btf,fd->btd", h, w2)


def test_chunk_count_rule():
    assert mlp.chunk_count((4, 1024, 512), rows=1024) == 4
    assert mlp.chunk_count((4, 360, 512), rows=1024) == 1  # under two chunks' worth: whole
    assert mlp.chunk_count((1, 8, 4), rows=2) == 4
    assert mlp.chunk_count((64, 3, 4), rows=2) == 3  # never more chunks than positions


@pytest.mark.parametrize("T", [24, 26])  # 26: not a multiple of the chunk count, padded then sliced
def test_chunked_forward_equals_whole_and_definition(monkeypatch, T):
    monkeypatch.setattr(mlp, "CPU_CHUNK_ROWS", 8)  # B x T = 3 x T rows -> several chunks
    x, w1, w3, w2 = _case(3, T)
    assert mlp.chunk_count(x.shape) > 1
    fn = jax.jit(lambda *a: mlp.swiglu(*a, jnp.float32))
    jaxpr = str(jax.make_jaxpr(lambda *a: mlp.swiglu(*a, jnp.float32))(x, w1, w3, w2))
    assert "while" in jaxpr or "scan" in jaxpr  # the chunk loop is in the program
    got = np.asarray(fn(x, w1, w3, w2))
    whole = np.asarray(jax.jit(lambda *a: mlp._swiglu_whole(*a, jnp.float32))(x, w1, w3, w2))
    assert got.shape == x.shape
    np.testing.assert_allclose(got, whole, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, _reference(*map(np.asarray, (x, w1, w3, w2))), atol=1e-5, rtol=1e-5)


def test_chunked_gradient_is_the_whole_forms(monkeypatch):
    monkeypatch.setattr(mlp, "CPU_CHUNK_ROWS", 8)
    x, w1, w3, w2 = _case(2, 20)
    ct = jax.random.normal(jax.random.key(9), x.shape)

    def loss(f):
        return lambda *a: jnp.sum(f(*a) * ct)

    g_chunked = jax.jit(jax.grad(loss(lambda *a: mlp.swiglu(*a, jnp.float32)), argnums=(0, 1, 2, 3)))(x, w1, w3, w2)
    g_whole = jax.jit(jax.grad(loss(lambda *a: mlp._swiglu_whole(*a, jnp.float32)), argnums=(0, 1, 2, 3)))(
        x, w1, w3, w2)
    for a, b in zip(g_chunked, g_whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
        assert float(jnp.abs(a).max()) > 0


def test_bf16_chunked_matches_whole(monkeypatch):
    monkeypatch.setattr(mlp, "CPU_CHUNK_ROWS", 8)
    x, w1, w3, w2 = _case(2, 32)
    a = jax.jit(lambda *a: mlp.swiglu(*a, jnp.bfloat16))(x, w1, w3, w2)
    b = jax.jit(lambda *a: mlp._swiglu_whole(*a, jnp.bfloat16))(x, w1, w3, w2)
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- Dense's custom VJP


@pytest.mark.parametrize("rows", [(4, 6), (3, 5)])  # an odd row count takes a zero pad row
def test_dense_gradient_equals_autodiff_fp32(rows):
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (*rows, 16))
    w = jax.random.normal(k[1], (16, 24)) * 0.2
    b = jax.random.normal(k[2], (24,))

    def loss(f):
        return lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b)))

    plain = lambda x, w, b: jnp.einsum("btd,de->bte", x, w) + b[None, None, :]  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda *a: mlp.dense(*a, jnp.float32)), argnums=(0, 1, 2)))(x, w, b)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
        assert float(jnp.abs(g).max()) > 0


def test_dense_bf16_kernel_gradient_fp32_accumulated():
    """bf16 compute: the kernel's gradient comes back in the kernel's dtype (fp32), summed in fp32,
    so it is closer to the exact gradient of the bf16-rounded inputs than a bf16 output would be."""
    k = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k[0], (512, 32)).astype(jnp.bfloat16)
    w = jax.random.normal(k[1], (32, 16)) * 0.2
    ct = jax.random.normal(k[2], (512, 16)).astype(jnp.bfloat16)
    _, vjp = jax.vjp(lambda x, w: mlp.dense(x, w, None, jnp.bfloat16), x, w)
    dx, dw = vjp(ct)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    exact = np.asarray(x, np.float64).T @ np.asarray(ct, np.float64)
    err = np.abs(np.asarray(dw) - exact).max() / np.abs(exact).max()
    assert err < 1e-5, err  # a bf16 output would be off by ~2^-9 relative


def test_dense_bf16_backward_dots_stay_bf16_on_cpu():
    """The point of the custom VJP: no dot of the compiled bf16 backward runs in fp32. XLA:CPU
    upcasts a bf16 dot whose lhs contracts a leading dim (x^T dy, what autodiff of x @ w gives)."""
    x = jnp.ones((256, 64), jnp.bfloat16)
    w = jnp.ones((64, 128), jnp.float32)

    def grad(dense):
        f = jax.grad(lambda x, w: jnp.sum(dense(x, w).astype(jnp.float32)), argnums=(0, 1))
        return dot_operand_types(jax.jit(f).lower(x, w).compile().as_text())

    got = grad(lambda x, w: mlp.dense(x, w, None, jnp.bfloat16))
    assert len(got) == 2 and all(t == ("bf16", "bf16") for t in got), got  # dx and dw
    # the check can fail: plain autodiff of the same matmul has its x^T dy dot in fp32
    plain = grad(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.bfloat16))
    assert ("f32", "f32") in plain, plain


def test_remat_dots_policy_keeps_the_dense_output(capsys):
    """The custom VJP hides Dense's dot from jax's dots rule; the 'dots' policy keeps it by name,
    so a rematerialised layer does not run its projections twice."""
    from jax.ad_checkpoint import print_saved_residuals

    from mxdna_jax.layers import REMAT_POLICIES

    def layer(x, w):
        return jnp.sum(jnp.sin(mlp.dense(jnp.sin(x), w, None, jnp.float32)))

    for policy, kept in ((REMAT_POLICIES["dots"], True), (REMAT_POLICIES["nothing"], False)):
        print_saved_residuals(jax.checkpoint(layer, policy=policy), jnp.ones((8, 16)), jnp.ones((16, 32)))
        out = capsys.readouterr().out
        assert (f"f32[8,32] named '{mlp.MATMUL_NAME}'" in out) == kept, out
