"""The position-wise FFN (mxdna_jax.ops.mlp): the CPU sequence-chunked forward against the whole
batch, its gradient, and when it chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
