"""The tokenizer seam: single / kmer / learnt behind one interface, the learnt layer's switches,
and the paper's component ablation configs (configs/ablation.py)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxdna_jax import convert, parity, tokenizers, vocab
from mxdna_jax.config import ModelConfig, expert_conv_groups
from mxdna_jax.model import MxDNAForMaskedLM, extract_tokens
from mxdna_jax.ops.nms import unit_layout
from mxdna_jax.ops.experts import conv_experts, sliding_conv_expert
from mxdna_jax.ops.units import fixed_units, overlapping_kmers, sliding_mean, unit_mean

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
            num_token_layers=1, max_position_embeddings=512)
SEQS = ["ACGTTGCAAGGCTTAGCNNATCGATCGGATCCATGCAAATTTGCG", "GATTACA", "TTGACGGCTAGCTAGGATCGAT", "A"]
L = 56


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def build(cfg, seed=0):
    return MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(seed))


def batch(seqs=SEQS, pad_to=L):
    b = vocab.encode_batch(seqs, pad_to=pad_to)
    return jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])


@nnx.jit(static_argnames=("token_capacity", "capture"))
def run(m, ids, am, jitter_key=None, jitter=None, token_capacity=None, capture=False):
    return m(ids, am, jitter_key=jitter_key, jitter=jitter, token_capacity=token_capacity, capture=capture)


def param_paths(module):
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def tokenizer_params(m):
    return {p[2:]: s for p, s in param_paths(m).items() if p[:2] == ("model", "tokenization")}


def copy_shared_params(src, dst):
    """dst's params := src's at the same paths (dst's paths must all exist in src)."""
    s = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
    d_state = nnx.state(dst, nnx.Param)
    for p, v in nnx.to_flat_state(d_state):
        v[...] = s[p][...]
    nnx.update(dst, d_state)


def unit_tiling(center, all_, am, k=None):
    """Numpy check: units tile the window [1, n - 1) exactly once; `all` agrees with `center`;
    (if k) every unit has length k but the last, centres at start + len // 2."""
    center, all_, am = map(np.asarray, (center, all_, am))
    for b in range(center.shape[0]):
        n = int(am[b].sum())
        cover = np.zeros(center.shape[1], int)
        starts = []
        for p in np.flatnonzero(center[b] >= 0):
            ln = int(center[b, p]) + 1
            s = p - ln // 2
            assert 1 <= s and s + ln <= n - 1, (b, p, ln, n)
            cover[s: s + ln] += 1
            assert (all_[b, s: s + ln] == center[b, p]).all()
            starts.append((s, ln))
        assert (cover[1: max(n - 1, 1)] == 1).all() and cover[:1].sum() == 0 and cover[max(n - 1, 0):].sum() == 0
        assert ((all_[b] >= 0) == (cover == 1)).all()
        if k is not None:
            inner = max(n - 2, 0)
            expect = [(1 + i * k, min(k, inner - i * k)) for i in range(-(-inner // k))]
            assert starts == expect, (b, starts, expect)


# ----------------------------------------------------------------------------- registry, config


def test_registry_and_config_switches():
    assert tokenizers.NAMES == ("learnt", "kmer", "kmer_overlap", "bpe", "single")
    for name in tokenizers.NAMES:
        assert tokenizers.tokenizer_class(name).__name__.lower().startswith(name.replace("_", ""))
    with pytest.raises(ValueError, match="tokenizer must be one of 'learnt', 'kmer', 'kmer_overlap', 'bpe', "
                                         "'single'; got 'wordpiece'"):
        ModelConfig(tokenizer="wordpiece")
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        ModelConfig(bpe_vocab_size=2)
    with pytest.raises(ValueError, match="kmer_size"):
        ModelConfig(kmer_size=0)
    with pytest.raises(ValueError, match="deformable must be True or False"):
        ModelConfig(deformable="no")
    with pytest.raises(ValueError, match="did you mean 'kmer_size'"):
        ModelConfig.from_dict({"kmer_sise": 3})
    assert not hasattr(ModelConfig(), "max_kernel")
    d = ModelConfig()
    assert (d.tokenizer, d.experts, d.deformable, d.jitter, d.kmer_size) == ("learnt", True, True, True, 6)
    assert ModelConfig(jitter=False).to_official()["router_jitter_noise"] == 0.0
    for kw in (dict(tokenizer="single"), dict(experts=False), dict(deformable=False)):
        with pytest.raises(ValueError, match="no official MxDNA config"):
            ModelConfig(**kw).to_official()


# ----------------------------------------------------------------------------- unit ops


@pytest.mark.parametrize("k", [1, 2, 3, 6, 10])
def test_fixed_units_tile_the_window(k):
    rng = np.random.default_rng(k)
    lengths = [0, 1, 2, 3, 4, 5, 9, 17, 40, 64] + rng.integers(2, 65, size=6).tolist()
    am = (np.arange(64)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    center, all_ = jax.jit(fixed_units, static_argnums=1)(jnp.asarray(am), k)
    unit_tiling(center, all_, am, k)


def test_unit_mean_matches_numpy():
    am = jnp.asarray((np.arange(40)[None, :] < np.asarray([[40], [23], [2]])).astype(np.int32))
    center, all_ = fixed_units(am, 4)
    uc, _ = unit_layout(center, all_, (1, 2, 3, 4))
    x = jax.random.normal(jax.random.key(0), (3, 40, 5))
    got = np.asarray(unit_mean(x, uc, center))
    xn, c = np.asarray(x), np.asarray(center)
    for b, p in zip(*np.nonzero(c >= 0)):
        ln = c[b, p] + 1
        s = p - ln // 2
        np.testing.assert_allclose(got[b, p], xn[b, s: s + ln].mean(0), rtol=1e-6, atol=1e-6)
    assert (got[c < 0] == 0).all()


# ----------------------------------------------------------------------------- single


def test_single_tokens_are_the_nucleotides():
    ids, am = batch()
    B = ids.shape[0]
    cfg = tiny(tokenizer="single")
    m_orig, m_comp = build(cfg.replace(mode="original")), build(cfg.replace(mode="compact"))
    assert tokenizer_params(m_orig) == {}
    assert param_paths(m_orig) == param_paths(m_comp)
    o = run(m_orig, ids, am, jitter_key=jax.random.key(1))
    c = run(m_comp, ids, am, token_capacity=8)  # the capacity is irrelevant: every row is a token row
    for out in (o, c):
        bb = out.backbone
        assert bb.token_hidden.shape == (B, L, 32)
        np.testing.assert_array_equal(bb.token_mask, am)
        np.testing.assert_array_equal(bb.token_positions, np.broadcast_to(np.arange(L), (B, L)))
        assert float(out.aux_loss) == 0.0 and not bool(out.overflow) and bb.router_logits is None
        ext = extract_tokens(bb, (ids == vocab.CLS) | (ids == vocab.SEP) | (ids == vocab.PAD))
        np.testing.assert_array_equal(np.asarray(ext.mask).sum(1), [len(s) for s in SEQS])
        unit_tiling(bb.center, bb.all, am, 1)
    np.testing.assert_array_equal(np.asarray(o.logits), np.asarray(c.logits))
    np.testing.assert_allclose(np.asarray(m_orig(ids, am).logits), np.asarray(o.logits), atol=1e-5)  # eager
    # no jitter reaches a tokenizer without a router
    np.testing.assert_array_equal(np.asarray(o.logits), np.asarray(run(m_orig, ids, am).logits))
    # single = the degenerate unit tokenizer: 1-mers, mean embedding, no deformable conv
    k1 = build(tiny(tokenizer="kmer", kmer_size=1, experts=False, deformable=False, mode="original"))
    assert tokenizer_params(k1) == {}
    np.testing.assert_array_equal(np.asarray(run(k1, ids, am).logits), np.asarray(o.logits))


# ----------------------------------------------------------------------------- kmer


def test_kmer_tiling_and_compact_equals_original():
    ids, am = batch()
    k = 3
    cfg = tiny(tokenizer="kmer", kmer_size=k)
    m_orig, m_comp = build(cfg.replace(mode="original")), build(cfg.replace(mode="compact"))
    tp = tokenizer_params(m_orig)
    assert tp[("expert_pre",)] == (k, 32, 64) and len([p for p in tp if p[0] == "expert_conv"]) == k
    assert ("gate",) not in tp and ("masked_token_embedding",) not in tp and ("deform", "kernel") in tp
    o = run(m_orig, ids, am)
    n = np.asarray(am).sum(1)
    tokens = 2 * (n >= 2) + -(-np.maximum(n - 2, 0) // k)
    T = int(tokens.max())
    c = run(m_comp, ids, am, token_capacity=T)
    assert not bool(c.overflow) and bool(run(m_comp, ids, am, token_capacity=T - 1).overflow)
    unit_tiling(o.backbone.center, o.backbone.all, am, k)
    np.testing.assert_array_equal(np.asarray(c.backbone.center), np.asarray(o.backbone.center))
    np.testing.assert_array_equal(np.asarray(o.backbone.token_mask).sum(1), tokens)
    np.testing.assert_array_equal(np.asarray(c.backbone.token_mask).sum(1), tokens)
    assert float(o.aux_loss) == 0.0 and o.backbone.router_logits is None
    valid = np.asarray(am, bool)
    np.testing.assert_allclose(np.asarray(c.logits)[valid], np.asarray(o.logits)[valid], atol=1e-5)
    # token rows: same positions, same states
    po, pc = np.asarray(o.backbone.token_positions), np.asarray(c.backbone.token_positions)
    mo, mc = np.asarray(o.backbone.token_mask, bool), np.asarray(c.backbone.token_mask, bool)
    for b in range(ids.shape[0]):
        np.testing.assert_array_equal(po[b][mo[b]], pc[b][mc[b]])
        np.testing.assert_allclose(np.asarray(o.backbone.token_hidden)[b][mo[b]],
                                   np.asarray(c.backbone.token_hidden)[b][mc[b]], atol=5e-5)
    # gradients: finite everywhere; the experts of the unit lengths present (k and the tails) learn
    labels = jnp.where(am.astype(bool) & (ids >= vocab.A), ids, -100)
    grads = nnx.jit(nnx.grad(lambda m: parity.mlm_ce(m(ids, am, token_capacity=T).logits, labels)))(m_comp)
    flat = dict(nnx.to_flat_state(grads))
    assert all(np.isfinite(np.asarray(g[...])).all() for g in flat.values())
    used = set(np.unique(np.asarray(o.backbone.center)[np.asarray(o.backbone.center) >= 0]).tolist())
    assert used == {0, k - 1}  # lengths k and 1 (the tails of 7 and 22 nt, and "A"); never 2
    for e in range(k):
        g = np.abs(np.asarray(flat[("model", "tokenization", "expert_conv", e)][...])).max()
        assert (g > 0) == (e in used), (e, g)


# ----------------------------------------------------------------------------- kmer_overlap


def test_overlapping_kmers_encoding():
    am = jnp.asarray((np.arange(12)[None, :] < np.array([[12], [9], [3], [2]])).astype(np.int32))
    center, all_ = overlapping_kmers(am, 4)
    c = np.asarray(center)
    np.testing.assert_array_equal(c, np.asarray(all_))
    # row 0: window [1, 11); the 4-mer at p spans [p - 2, p + 2) clipped to it
    np.testing.assert_array_equal(c[0], [-1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 2, -1])
    np.testing.assert_array_equal(c[1], [-1, 1, 2, 3, 3, 3, 3, 2, -1, -1, -1, -1])
    np.testing.assert_array_equal(c[2], [-1, 0] + [-1] * 10)  # one nucleotide: a 1-nt "k-mer"
    assert (c[3] == -1).all()  # no nucleotide at all


def test_sliding_conv_expert_is_the_unit_expert_at_every_position():
    """At stride 1 the k-mer at p gets exactly what conv_experts gives a lone unit of length k
    centred at p (same params); window edges read zeros."""
    k, D, L = 4, 32, 16
    rng = np.random.default_rng(0)
    g = expert_conv_groups(D, k)
    p = {"pre": rng.normal(0, 0.2, (1, D, 2 * D)), "conv": [rng.normal(0, 0.2, (k, g, D // g, D // g))],
         "norm_scale": 1 + rng.normal(0, 0.1, (1, D)), "norm_bias": rng.normal(0, 0.1, (1, D)),
         "post": rng.normal(0, 0.2, (1, D, D))}
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    x = jnp.asarray(rng.normal(size=(1, L, D)), jnp.float32)
    am = jnp.ones((1, L), jnp.int32)
    valid = overlapping_kmers(am, k)[0] >= 0
    out = sliding_conv_expert(x, valid, p["pre"][0], p["conv"][0], p["norm_scale"][0], p["norm_bias"][0],
                              p["post"][0], eps=1e-6)
    assert (np.asarray(out)[0, [0, L - 1]] == 0).all()
    xv = x * valid[..., None]
    for c in range(1, L - 1):
        s = c - k // 2  # the unit's start; expert 0 of this one-expert bank has kernel k
        # a unit running off the row: pad the row so the unit fits, then read the centre
        pad = max(0, -s), max(0, s + k - L)
        xp = jnp.pad(xv, ((0, 0), pad, (0, 0)))
        Lp = L + sum(pad)
        cen = np.full((1, Lp), -1, np.int32)
        cen[0, c + pad[0]] = 0
        al = np.full((1, Lp), -1, np.int32)
        al[0, s + pad[0]: s + pad[0] + k] = 0
        ucp = np.where(al >= 0, c + pad[0], -1).astype(np.int32)
        tp = np.where(al >= 0, np.arange(Lp) - (s + pad[0]), -1).astype(np.int32)
        ref = conv_experts(xp, jnp.asarray(cen), jnp.asarray(al), jnp.asarray(ucp), jnp.asarray(tp), None, p,
                           eps=1e-6, dense=True)
        np.testing.assert_allclose(np.asarray(out)[0, c], np.asarray(ref)[0, c + pad[0]], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("experts", [True, False])
def test_kmer_overlap_tokens_are_the_nucleotides(experts):
    ids, am = batch()
    B = ids.shape[0]
    k = 4
    cfg = tiny(tokenizer="kmer_overlap", kmer_size=k, experts=experts)
    m_orig, m_comp = build(cfg.replace(mode="original")), build(cfg.replace(mode="compact"))
    tp = tokenizer_params(m_orig)
    assert ("gate",) not in tp and ("deform", "kernel") in tp
    if experts:  # the expert bank is the one expert of kernel k
        assert tp[("expert_pre",)] == (1, 32, 64) and tp[("expert_conv", 0)][0] == k
        assert ("expert_conv", 1) not in tp
    else:
        assert not any(p[0].startswith("expert") for p in tp) and ("input_norm", "scale") not in tp
    o = run(m_orig, ids, am, jitter_key=jax.random.key(1))
    c = run(m_comp, ids, am, token_capacity=8)  # every row is a token row: the capacity is ignored
    sm = (ids == vocab.CLS) | (ids == vocab.SEP) | (ids == vocab.PAD)
    for out in (o, c):
        bb = out.backbone
        assert bb.token_hidden.shape == (B, L, 32) and not bool(out.overflow)
        np.testing.assert_array_equal(bb.token_mask, am)
        ext = extract_tokens(bb, sm)
        np.testing.assert_array_equal(np.asarray(ext.mask).sum(1), [len(s) for s in SEQS])  # tokens == nucleotides
        assert float(out.aux_loss) == 0.0 and bb.router_logits is None
    np.testing.assert_array_equal(np.asarray(o.logits), np.asarray(c.logits))  # compact == original
    np.testing.assert_array_equal(np.asarray(o.logits), np.asarray(run(m_orig, ids, am).logits))  # no jitter
    if not experts:  # the mean of each k-mer's nucleotide states replaces the nucleotide's state
        inter = run(m_orig, ids, am, capture=True).backbone.intermediates
        h = inter["nucleotide_layer_outputs"][-1]
        valid = overlapping_kmers(am, k)[0] >= 0
        want = jnp.where(valid[..., None], sliding_mean(h, valid, k), h)
        np.testing.assert_array_equal(np.asarray(inter["deform_input"]), np.asarray(want))
    labels = jnp.where(am.astype(bool) & (ids >= vocab.A), ids, -100)
    grads = nnx.jit(nnx.grad(lambda m: parity.mlm_ce(m(ids, am).logits, labels)))(m_orig)
    flat = dict(nnx.to_flat_state(grads))
    assert all(np.isfinite(np.asarray(g[...])).all() for g in flat.values())
    if experts:
        assert np.abs(np.asarray(flat[("model", "tokenization", "expert_conv", 0)][...])).max() > 0


def test_sliding_mean_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 10, 3)).astype(np.float32)
    am = (np.arange(10)[None, :] < np.array([[10], [6]])).astype(np.int32)
    k = 3
    valid = overlapping_kmers(jnp.asarray(am), k)[0] >= 0
    got = np.asarray(sliding_mean(jnp.asarray(x), valid, k))
    v = np.asarray(valid)
    for b in range(2):
        for p in range(10):
            if not v[b, p]:
                assert (got[b, p] == 0).all()
                continue
            rows = [q for q in range(p - k // 2, p - k // 2 + k) if 0 <= q < 10 and v[b, q]]
            np.testing.assert_allclose(got[b, p], x[b, rows].mean(0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- learnt defaults


def test_learnt_default_param_tree_is_the_official_one(fixtures_dir):
    """Every param of the default model is the target of exactly the fixture's official tensors
    (names and shapes, through the conversion rules), and the tokenizer's own tree is frozen."""
    fx = parity.load_fixture(fixtures_dir / "public_small.npz")
    cfg = parity.fixture_config(fx)
    abstract = nnx.eval_shape(lambda: MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(0)))
    ours = param_paths(abstract)
    sd = {k[len("param/"):]: v for k, v in fx.items() if k.startswith("param/")}
    converted = convert.official_to_ours(sd, convert.rules_for(abstract), ours)
    assert {p: v.shape for p, (_, v) in converted.items()} == ours
    E, d = 10, 32
    frozen = {("input_norm", "scale"): (d,), ("input_norm", "bias"): (d,), ("gate",): (d, E),
              ("masked_token_embedding",): (d,), ("expert_pre",): (E, d, 2 * d),
              ("expert_norm_scale",): (E, d), ("expert_norm_bias",): (E, d), ("expert_post",): (E, d, d),
              ("deform", "norm", "scale"): (d,), ("deform", "norm", "bias"): (d,),
              ("deform", "offset_kernel"): (3, d, 3), ("deform", "offset_bias"): (3,),
              ("deform", "modulator_kernel"): (3, d, 3), ("deform", "modulator_bias"): (3,),
              ("deform", "kernel"): (3, d, d)}
    groups = {1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 8, 8: 8, 9: 8, 10: 8}  # config.expert_conv_groups(32, k)
    frozen |= {("expert_conv", k - 1): (k, g, d // g, d // g) for k, g in groups.items()}
    m = nnx.eval_shape(lambda: MxDNAForMaskedLM(tiny(), rngs=nnx.Rngs(0)))
    assert tokenizer_params(m) == frozen
    # jitter has no params: switching it off keeps the tree (and the fresh-init draws)
    assert param_paths(nnx.eval_shape(lambda: MxDNAForMaskedLM(tiny(jitter=False), rngs=nnx.Rngs(0)))) == \
        param_paths(m)


# ----------------------------------------------------------------------------- switches


def test_jitter_switch():
    ids, am = batch()
    on, off = build(tiny(mode="original")), build(tiny(mode="original", jitter=False))
    key = jax.random.key(3)
    eval_on = run(on, ids, am)
    assert np.abs(np.asarray(run(on, ids, am, jitter_key=key).backbone.router_logits)
                  - np.asarray(eval_on.backbone.router_logits)).max() > 1e-6
    # off: a key or an explicit jitter array changes nothing, and eval mode is the default model's
    jit_arr = jax.random.uniform(key, (ids.shape[0], L, 32), minval=0.5, maxval=1.5)
    for out in (run(off, ids, am, jitter_key=key), run(off, ids, am, jitter=jit_arr)):
        np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(eval_on.logits))
        np.testing.assert_array_equal(np.asarray(out.backbone.router_logits),
                                      np.asarray(eval_on.backbone.router_logits))


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_deformable_off_tokens_are_the_embedded_centres(mode):
    ids, am = batch()
    full = build(tiny(mode=mode))
    ablated = build(tiny(mode=mode, deformable=False))
    tp = tokenizer_params(ablated)
    assert not any(p[0] in ("deform", "masked_token_embedding") for p in tp) and ("expert_pre",) in tp
    copy_shared_params(full, ablated)
    cap = None if mode == "original" else L
    f = run(full, ids, am, token_capacity=cap, capture=True).backbone
    a = run(ablated, ids, am, token_capacity=cap, capture=True).backbone
    np.testing.assert_array_equal(np.asarray(a.center), np.asarray(f.center))
    u = np.asarray(f.intermediates["deform_input"])  # the full model's expert-embedded states
    np.testing.assert_array_equal(np.asarray(a.intermediates["deform_input"]), u)
    key = "conversion_output" if mode == "original" else "compact_conversion_output"
    rows = np.take_along_axis(u, np.asarray(a.token_positions)[..., None], axis=1)
    np.testing.assert_array_equal(np.asarray(a.intermediates[key]), rows)


def test_experts_off_units_are_means_and_gate_learns_from_aux_only():
    ids, am = batch()
    labels = jnp.where(am.astype(bool) & (ids >= vocab.A), ids, -100)
    m = build(tiny(mode="original", experts=False))
    tp = tokenizer_params(m)
    assert not any(p[0].startswith("expert") or p[0] == "masked_token_embedding" for p in tp)
    assert ("gate",) in tp and ("deform", "kernel") in tp
    bb = run(m, ids, am, capture=True).backbone
    h = np.asarray(bb.nucleotide_hidden)
    u = np.asarray(bb.intermediates["deform_input"])
    c = np.asarray(bb.center)
    for b, p in zip(*np.nonzero(c >= 0)):
        ln = c[b, p] + 1
        np.testing.assert_allclose(u[b, p], h[b, p - ln // 2: p - ln // 2 + ln].mean(0), atol=1e-6)
    np.testing.assert_array_equal(u[c < 0], h[c < 0])

    @nnx.jit
    def gate_grad(m, aux_coef):
        def loss(m):
            out = m(ids, am, jitter_key=jax.random.key(0))
            return parity.mlm_ce(out.logits, labels) + aux_coef * out.aux_loss
        return nnx.grad(loss)(m).model.tokenization.gate[...]

    assert float(jnp.abs(gate_grad(m, 0.0)).max()) == 0.0
    assert float(jnp.abs(gate_grad(m, 0.01)).max()) > 0.0


# ----------------------------------------------------------------------------- ablation configs


def load_ablation(variant):
    spec = importlib.util.spec_from_file_location("_cfg_ablation", ROOT / "configs" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


EXPECT_TOKENIZER_PARAMS = {  # (has expert params, has deformable params)
    "single": (False, False), "experts": (True, False), "deformable": (True, True), "full": (True, True)}


@pytest.mark.parametrize("variant", list(EXPECT_TOKENIZER_PARAMS))
def test_ablation_config_builds_runs_and_trains(variant):
    c = load_ablation(variant)
    assert c.is_locked
    import dataclasses
    assert set(c.model.keys()) == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig.from_dict(c.model.to_dict())
    m = build(cfg)
    tp = tokenizer_params(m)
    has_experts, has_deform = EXPECT_TOKENIZER_PARAMS[variant]
    assert (("expert_pre",) in tp, ("deform", "kernel") in tp) == (has_experts, has_deform)
    assert m.model.tokenization.uses_jitter == (variant == "full")
    ids, am = batch()
    labels = jnp.where(am.astype(bool) & (ids >= vocab.A), ids, -100)

    @nnx.jit
    def loss_and_grads(m):
        def loss(m):
            out = m(ids, am, jitter_key=jax.random.key(0), token_capacity=L)
            return parity.mlm_ce(out.logits, labels) + 0.01 * out.aux_loss, (out.overflow, out.aux_loss)
        return nnx.value_and_grad(loss, has_aux=True)(m)

    (loss, (overflow, aux)), grads = loss_and_grads(m)
    assert np.isfinite(float(loss)) and not bool(overflow)
    assert (float(aux) > 0) == (variant != "single")
    flat = dict(nnx.to_flat_state(grads))
    assert set(flat) == set(param_paths(m))
    for path, g in flat.items():
        assert np.isfinite(np.asarray(g[...])).all(), path
    if variant != "single":
        assert np.abs(np.asarray(flat[("model", "tokenization", "gate")][...])).max() > 0


def test_ablation_rejects_unknown_variant():
    with pytest.raises(ValueError, match="single, experts, deformable, full"):
        load_ablation("jitter")


def load_baselines(arg):
    spec = importlib.util.spec_from_file_location("_baselines_under_test", ROOT / "configs" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("arg", ["mxdna", "single", "kmer", "kmer_overlap", "bpe", "kmer_overlap,base"])
def test_baseline_configs(arg):
    c = load_baselines(arg)
    assert c.is_locked
    cfg = ModelConfig.from_dict(c.model.to_dict())
    variant, _, size = arg.partition(",")
    assert cfg.tokenizer == {"mxdna": "learnt"}.get(variant, variant)
    assert cfg.hidden_size == (512 if size == "base" else 64)
    if size:
        return
    m = build(cfg)
    ids, am = batch()
    units = None
    if variant == "bpe":  # a stand-in segmentation: 3-mers, as the pipeline's batch['units'] would carry
        units = fixed_units(am, 3)[0]
    out = m(ids, am, units=units, token_capacity=L)
    assert np.isfinite(np.asarray(out.logits)).all() and not bool(out.overflow)
    with pytest.raises(ValueError, match="VARIANT"):
        load_baselines("wordpiece")
