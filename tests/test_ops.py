"""Deformable conv, conv-expert dispatch and RoPE as pure functions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mxdna_jax.config import expert_conv_groups
from mxdna_jax.ops.deformable import deform_conv1d
from mxdna_jax.ops.experts import conv_experts, tile_layout, tiled_apply
from mxdna_jax.ops.nms import basic_unit_nms, unit_layout
from mxdna_jax.ops.rope import apply_rope, rope_tables


# ----------------------------------------------------------------------------- deformable


def deform_case(z, i):
    g = lambda k: z[f"case_{i:02d}/{k}"]
    w = g("weight")[..., 0].transpose(2, 1, 0)  # (C_out, C_in, K) -> (K, C_in, C_out)
    t = lambda a: a.transpose(0, 2, 1)
    return t(g("input")), t(g("offset")), t(g("modulator")), w, t(g("output"))


@pytest.mark.parametrize("i", range(5))
def test_deform_matches_torchvision(fixtures_dir, i):
    z = np.load(fixtures_dir / "deform_conv_cases.npz")
    x, off, mod, w, ref = deform_case(z, i)
    out = jax.jit(deform_conv1d)(x, off, mod, w)
    chex.assert_shape(out, ref.shape)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(deform_conv1d(x, off, mod, w)), np.asarray(out), atol=1e-6)


def test_deform_rows_subset_equals_full(fixtures_dir):
    z = np.load(fixtures_dir / "deform_conv_cases.npz")
    x, off, mod, w, _ = deform_case(z, 0)
    full = deform_conv1d(x, off, mod, w)
    rows = jnp.array([[0, 3, 7], [1, 2, 5]])
    take = lambda a: jnp.take_along_axis(a, rows[..., None], axis=1)
    part = deform_conv1d(x, take(off), take(mod), w, rows_BT=rows)
    np.testing.assert_allclose(part, take(full), atol=1e-6)


def test_deform_gradients_reach_offsets_and_modulators():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 12, 4)), jnp.float32)
    off = jnp.asarray(rng.uniform(-2, 2, (2, 12, 3)), jnp.float32)
    mod = jnp.asarray(rng.uniform(0.2, 1.8, (2, 12, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    f = lambda o, m: jnp.sum(deform_conv1d(x, o, m, w) ** 2)
    g_off, g_mod = jax.grad(f, argnums=(0, 1))(off, mod)
    assert np.isfinite(g_off).all() and np.abs(g_off).max() > 1e-3
    assert np.isfinite(g_mod).all() and np.abs(g_mod).max() > 1e-3
    # central finite difference on a few offsets (away from integer coordinates: piecewise linear)
    eps = 1e-2
    f64 = jax.jit(f)
    for b, t, k in [(0, 5, 0), (1, 3, 2), (0, 10, 1)]:
        e = jnp.zeros_like(off).at[b, t, k].set(eps)
        fd = (f64(off + e, mod) - f64(off - e, mod)) / (2 * eps)
        np.testing.assert_allclose(g_off[b, t, k], fd, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- experts


def test_expert_groups_rule():
    assert [expert_conv_groups(d, k) for d in (64,) for k in range(1, 11)] == [1, 2, 2, 4, 4, 4, 8, 8, 8, 8]
    for d in (128, 512):
        assert [expert_conv_groups(d, k) for k in range(1, 11)] == [1, 2, 2, 4, 4, 4, 8, 8, 8, 8]
    assert expert_conv_groups(96, 5) == 4  # 4 and 6 tie at distance 1: the first met (4) wins


@pytest.mark.parametrize("tile", [4, 16])
def test_tile_layout_is_a_permutation(tile):
    rng = np.random.default_rng(1)
    group = jnp.asarray(rng.integers(-1, 5, 57), jnp.int32)
    row_of_slot, tile_group = tile_layout(group, 5, tile)
    rs = np.asarray(row_of_slot)
    used = rs[rs >= 0]
    assert sorted(used.tolist()) == np.flatnonzero(np.asarray(group) >= 0).tolist()
    for s, r in enumerate(rs):
        if r >= 0:
            assert tile_group[s // tile] == group[r]
    out = tiled_apply([lambda x, e=e: x * 10 + e for e in range(5)], group, (jnp.arange(57.0)[:, None],), 1,
                      jnp.float32, tile)
    expect = np.where(np.asarray(group) >= 0, np.arange(57) * 10 + np.asarray(group), 0)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], expect)


def make_expert_params(rng, d, E=10):
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
    groups = [expert_conv_groups(d, k) for k in range(1, E + 1)]
    return {
        "pre": f(E, d, 2 * d), "conv": [f(k, g, d // g, d // g) for k, g in zip(range(1, E + 1), groups)],
        "norm_scale": 1 + f(E, d), "norm_bias": f(E, d), "post": f(E, d, d),
    }


def reference_unit(x, s, k, e, p, probs, params, eps=1e-6):
    """One unit straight from the definition (numpy float64)."""
    d = x.shape[-1]
    g = expert_conv_groups(d, k)
    pre = np.asarray(params["pre"][e], np.float64)
    h = x[s: s + k] @ pre
    G = h[:, :d] / (1 + np.exp(-h[:, d:]))
    conv = np.asarray(params["conv"][e], np.float64)  # (k, g, ci, co)
    ci = d // g
    c = np.zeros(d)
    for j in range(k):
        for gi in range(g):
            c[gi * ci:(gi + 1) * ci] += G[j, gi * ci:(gi + 1) * ci] @ conv[j, gi]
    mu, var = c.mean(), c.var()
    n = (c - mu) / np.sqrt(var + eps) * np.asarray(params["norm_scale"][e]) + np.asarray(params["norm_bias"][e])
    return probs[p, e] * ((n / (1 + np.exp(-n))) @ np.asarray(params["post"][e], np.float64))


def test_sparse_dispatch_equals_dense_and_definition():
    rng = np.random.default_rng(0)
    B, L, d = 2, 40, 16
    logits = jnp.asarray(rng.standard_normal((B, L, 10)), jnp.float32)
    mask = np.ones((B, L), np.int32)
    mask[1, 30:] = 0
    center, all_ = basic_unit_nms(logits, jnp.asarray(mask))
    uc, tap = unit_layout(center, all_)
    x = jnp.asarray(rng.standard_normal((B, L, d)), jnp.float32)
    probs = jax.nn.softmax(logits, -1)
    params = make_expert_params(rng, d)
    run = lambda dense, tile=8: jax.jit(lambda *a: conv_experts(*a, params, eps=1e-6, dense=dense, tile=tile))(
        x, center, all_, uc, tap, probs)
    sparse, dense = run(False), run(True)
    chex.assert_shape(sparse, (B, L, d))
    np.testing.assert_allclose(sparse, dense, atol=1e-5)
    np.testing.assert_allclose(run(False, 128), dense, atol=1e-5)
    xn, pn = np.asarray(x, np.float64), np.asarray(probs, np.float64)
    for b in range(B):
        for p in np.flatnonzero(np.asarray(center[b]) >= 0):
            e = int(center[b, p])
            k = e + 1
            ref = reference_unit(xn[b], p - k // 2, k, e, p, pn[b], params)
            np.testing.assert_allclose(np.asarray(sparse[b, p]), ref, atol=2e-4, rtol=1e-4)
        assert (np.asarray(sparse[b])[np.asarray(center[b]) < 0] == 0).all()


def test_sparse_dispatch_gradients_match_dense():
    rng = np.random.default_rng(2)
    B, L, d = 1, 24, 8
    logits = jnp.asarray(rng.standard_normal((B, L, 10)), jnp.float32)
    center, all_ = basic_unit_nms(logits, jnp.ones((B, L), jnp.int32))
    uc, tap = unit_layout(center, all_)
    x = jnp.asarray(rng.standard_normal((B, L, d)), jnp.float32)
    params = make_expert_params(rng, d)

    def loss(params, x, logits, dense):
        out = conv_experts(x, center, all_, uc, tap, jax.nn.softmax(logits, -1), params, eps=1e-6, dense=dense, tile=8)
        return jnp.sum(out ** 2)

    gs = jax.grad(loss, argnums=(0, 1, 2))(params, x, logits, False)
    gd = jax.grad(loss, argnums=(0, 1, 2))(params, x, logits, True)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gd)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert np.abs(gs[2]).max() > 0  # the gate logits get gradient through the probability scaling


# ----------------------------------------------------------------------------- rope


def test_rope_formula_and_relative_property():
    rng = np.random.default_rng(0)
    H = 8
    q = jnp.asarray(rng.standard_normal((1, 3, 2, H)), jnp.float32)
    pos = jnp.array([[0, 5, 17]])
    cos, sin = rope_tables(pos, H)
    out = np.asarray(apply_rope(q, cos, sin))
    inv = 1.0 / 10000 ** (np.arange(0, H, 2) / H)
    for t, p in enumerate([0, 5, 17]):
        ang = np.concatenate([p * inv, p * inv])
        x = np.asarray(q[0, t])
        rot = np.concatenate([-x[:, H // 2:], x[:, : H // 2]], -1)
        np.testing.assert_allclose(out[0, t], x * np.cos(ang) + rot * np.sin(ang), atol=1e-5)
    # scores depend only on the position difference
    k = jnp.asarray(rng.standard_normal((1, 1, 2, H)), jnp.float32)
    def score(pq, pk):
        cq, sq = rope_tables(jnp.array([[pq]]), H)
        ck, sk = rope_tables(jnp.array([[pk]]), H)
        return float(jnp.sum(apply_rope(q[:, :1], cq, sq) * apply_rope(k, ck, sk)))
    np.testing.assert_allclose(score(3, 1), score(103, 101), rtol=1e-4)
