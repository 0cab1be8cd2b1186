"""Attention implementations (mxdna_jax/ops/attention.py): the library call equals the hand-written
masked softmax, including rows without keys, and the model keeps fixture parity through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _hlo import dot_operand_types
from mxdna_jax import parity
from mxdna_jax.layers import set_attention_implementation
from mxdna_jax.ops.attention import attention, cudnn_fits, masked_attention

B, T, S, N, H = 3, 12, 10, 2, 8


def _qkv(dtype=jnp.float32, T=T, S=S):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, N, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, N, H), jnp.float32).astype(dtype)
    return q, k, v


def _masks():
    prefix = (np.arange(S)[None] < np.array([S, 7, 2])[:, None]).astype(np.int32)
    scattered = (np.random.default_rng(0).random((B, S)) < 0.5).astype(np.int32)
    scattered[:, 0] = 1
    keyless = prefix.copy()
    keyless[1] = 0  # a sequence with no key at all: every query row of it is fully masked
    return {"prefix": prefix, "scattered": scattered, "keyless": keyless}


@pytest.mark.parametrize("impl", ["xla", None, "reference"])
@pytest.mark.parametrize("mask_name", ["prefix", "scattered", "keyless"])
def test_equals_masked_softmax(impl, mask_name):
    q, k, v = _qkv()
    m = jnp.asarray(_masks()[mask_name])
    ref = masked_attention(q, k, v, m)
    for fn in (attention, jax.jit(attention, static_argnames="implementation")):
        got = fn(q, k, v, m, implementation=impl)
        assert got.shape == q.shape and got.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=0)
    if mask_name == "keyless":  # no key: the mean of all value rows (uniform softmax), never NaN
        np.testing.assert_allclose(np.asarray(ref[1]), np.broadcast_to(np.asarray(v[1]).mean(0), (T, N, H)),
                                   atol=1e-6)


def test_grads_and_bf16_match():
    q, k, v = _qkv()
    m = jnp.asarray(_masks()["scattered"])

    def loss(fn, *a):
        return (fn(*a, m) ** 2).sum()

    g_ref = jax.grad(lambda *a: loss(masked_attention, *a), argnums=(0, 1, 2))(q, k, v)
    g_lib = jax.grad(lambda *a: loss(lambda *b: attention(*b, implementation="xla"), *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_lib):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    qb, kb, vb = _qkv(jnp.bfloat16)
    ref = masked_attention(qb, kb, vb, m).astype(jnp.float32)
    got = attention(qb, kb, vb, m, implementation="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(ref), atol=2e-2, rtol=0)


@pytest.mark.parametrize("T_", [12, 11])  # 11: an odd row count, padded inside the backward
def test_written_out_backward_equals_float64_autodiff(T_):
    """`masked_attention`'s gradients (fp32: autodiff of its differentiated form; bf16: the
    written-out flash-attention backward) equal autodiff of the plain softmax in float64, for rows
    without keys too."""
    q, k, v = _qkv(T=T_)
    m = _masks()["keyless"]
    ct = jax.random.normal(jax.random.key(5), q.shape)

    def plain64(q, k, v):
        with jax.enable_x64():
            bias = jnp.where(jnp.asarray(m) > 0, 0.0, -1e30)[:, None, None, :]

            def loss(q, k, v):
                probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H) + bias, axis=-1)
                return jnp.sum(jnp.einsum("bnts,bsnh->btnh", probs, v) * np.asarray(ct, np.float64))

            return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(
                *(jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v)))]

    want = plain64(q, k, v)
    for dtype, tol in ((jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)):
        args = [a.astype(dtype) for a in (q, k, v)]
        got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(masked_attention(q, k, v, jnp.asarray(m)).astype(jnp.float32)
                                                       * ct), argnums=(0, 1, 2)))(*args)
        for g, w in zip(got, want):
            assert g.dtype == dtype
            scale = np.abs(np.asarray(w)).max()
            assert scale > 0
            np.testing.assert_allclose(np.asarray(g, np.float64) / scale, np.asarray(w) / scale, atol=tol, rtol=0)


def test_bf16_backward_dots_stay_bf16_on_cpu():
    q, k, v = _qkv(jnp.bfloat16, T=64, S=64)
    m = jnp.ones((B, 64), jnp.int32)
    f = jax.grad(lambda q, k, v: jnp.sum(masked_attention(q, k, v, m).astype(jnp.float32)), argnums=(0, 1, 2))
    types = dot_operand_types(jax.jit(f).lower(q, k, v).compile().as_text())
    assert len(types) >= 5 and all(t == ("bf16", "bf16") for t in types), types


def test_cudnn_conditions_and_bad_name():
    q, k, _ = _qkv(jnp.bfloat16)
    assert cudnn_fits(q, k)
    assert not cudnn_fits(q.astype(jnp.float32), k.astype(jnp.float32))  # fp32: XLA
    assert not cudnn_fits(*_qkv(jnp.bfloat16, T=11)[:2])  # odd length: the backward's bias pattern fails
    with pytest.raises(ValueError, match="not in"):
        attention(*_qkv(), jnp.ones((B, S), jnp.int32), implementation="flash")


def test_fixture_parity_through_the_library(fixtures_dir):
    """The whole model with `jax.nn.dot_product_attention`'s XLA path in every layer (the path GPUs
    without cuDNN and TPUs take) keeps the official fixture: padding rows of the MLM logits included."""
    fx = parity.load_fixture(fixtures_dir / "public_small.npz")
    cfg = parity.fixture_config(fx)
    models = parity.build_models(fx, cfg)
    assert sum(set_attention_implementation(m, "xla") for m in models.values()) > 0
    rows = parity.compare(fx, parity.run_fixture(fx, cfg, models=models))
    bad = [(r["key"], r["error"], r["tol"]) for r in rows if not r["ok"]]
    assert not bad, bad
    err = {r["key"]: r["error"] for r in rows}
    assert err["mlm_logits"] < 2e-6 and err["mlm_loss_total"] < 2e-6 and err["train_mlm_logits"] < 2e-6
