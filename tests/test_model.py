"""Model behaviour: modes agree, jit == eager, gradients, RNG semantics, batch independence."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxdna_jax import convert, parity, vocab
from mxdna_jax.capacity import CapacityOverflowError, call_with_capacity
from mxdna_jax.config import ModelConfig
from mxdna_jax.model import MxDNAForMaskedLM, MxDNAForSequenceClassification, extract_tokens, flatten_tokens

SEQS = ["ACGTTGCAAGGCTTAGCNNATCGATCGGATCCATGCAAATTTGCGCGTATATCGCGATCGATTTAGC",
        "TTGACGGCTAGCTAGGATCGATCGTTTAAACCCGGGATATCGAT",
        "GATTACA",
        "CCGCGGATATTATAGCGCGCATCGATCGTAGCTAGCTAGCTGATCGATGCATCGATCGATCGTAGCTAGCTAGCTACGAT"]


@pytest.fixture(scope="module")
def fixture_weights(fixtures_dir):
    """The public_small weights: real trained-looking offsets, a non-zero [PAD] row (quirk Q3)."""
    return parity.load_fixture(fixtures_dir / "public_small.npz")


def model_from_fixture(fx, **overrides):
    cfg = parity.fixture_config(fx, **overrides)
    m = MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(0))
    convert.load_into(m, {k[6:]: v for k, v in fx.items() if k.startswith("param/")})
    return m


@nnx.jit(static_argnames=("token_capacity",))
def forward(m, ids, am, jitter_key=None, token_capacity=None):
    out = m(ids, am, jitter_key=jitter_key, token_capacity=token_capacity)
    ext = extract_tokens(out.backbone, (ids == vocab.CLS) | (ids == vocab.SEP) | (ids == vocab.PAD))
    return out.logits, out.aux_loss, out.overflow, ext.tokens, ext.mask, ext.positions, out.backbone.router_logits


def batch(seqs, pad_to=None):
    b = vocab.encode_batch(seqs, pad_to=pad_to)
    return jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])


def test_compact_equals_original_and_shapes(fixture_weights):
    ids, am = batch(SEQS, pad_to=96)
    orig = forward(model_from_fixture(fixture_weights, batch_independent=True), ids, am)
    comp_model = model_from_fixture(fixture_weights, batch_independent=True, mode="compact")
    T = 64
    comp = forward(comp_model, ids, am, token_capacity=T)
    B, L = ids.shape
    chex.assert_shape([orig[0], comp[0]], (B, L, vocab.VOCAB_SIZE))
    chex.assert_shape(comp[3], (B, T, 64))
    chex.assert_shape(orig[3], (B, L, 64))
    assert not bool(comp[2])
    valid = np.asarray(am, bool)
    np.testing.assert_allclose(np.asarray(comp[0])[valid], np.asarray(orig[0])[valid], atol=1e-5)
    np.testing.assert_allclose(comp[1], orig[1], atol=1e-6)
    rows_o, b_o, p_o = flatten_tokens(orig[3], orig[4], orig[5])
    rows_c, b_c, p_c = flatten_tokens(comp[3], comp[4], comp[5])
    np.testing.assert_array_equal(b_o, b_c)
    np.testing.assert_array_equal(p_o, p_c)
    np.testing.assert_allclose(rows_c, rows_o, atol=5e-5)


def test_overflow_is_reported_and_retried(fixture_weights):
    ids, am = batch(SEQS, pad_to=96)
    m = model_from_fixture(fixture_weights, mode="compact")
    with pytest.raises(CapacityOverflowError, match="capacity 24"):
        call_with_capacity(lambda c: (None, forward(m, ids, am, token_capacity=c)[2]), 24, 96, retry=False)

    def run(c):
        out = forward(m, ids, am, token_capacity=c)
        return out, out[2]

    (logits, *_), used = call_with_capacity(run, 24, 96)
    assert 24 < used <= 96
    ref = forward(model_from_fixture(fixture_weights), ids, am)[0]
    valid = np.asarray(am, bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref)[valid], atol=1e-5)


def test_jit_equals_eager(fixture_weights):
    ids, am = batch(SEQS[1:3])
    m = model_from_fixture(fixture_weights)
    eager = m(ids, am).logits
    jitted = forward(m, ids, am)[0]
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-5)


def test_batch_independence_switch(fixture_weights):
    """Off: the official [SEP] leak (Q2) makes outputs depend on padding. On: they never do."""
    fx = fixture_weights
    ids_b, am_b = jnp.asarray(fx["input_ids"]), jnp.asarray(fx["attention_mask"])
    n = np.asarray(am_b).sum(1)

    def alone_vs_batched(model):
        batched = forward(model, ids_b, am_b)[0]
        worst = 0.0
        for b in (0, 2):  # padded rows whose last unit is within reach of [SEP]'s taps
            alone = forward(model, ids_b[b: b + 1, : n[b]], am_b[b: b + 1, : n[b]])[0]
            worst = max(worst, float(np.abs(np.asarray(alone[0]) - np.asarray(batched[b, : n[b]])).max()))
        return worst

    leak = alone_vs_batched(model_from_fixture(fx, batch_independent=False))
    fixed = alone_vs_batched(model_from_fixture(fx, batch_independent=True))
    assert leak > 1e-4, leak  # the official model's padding leak is real on these weights
    assert fixed < 1e-6, fixed


def test_train_mode_rng_semantics(fixture_weights):
    ids, am = batch(SEQS, pad_to=96)
    m = model_from_fixture(fixture_weights)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = forward(m, ids, am, jitter_key=k1)
    b = forward(m, ids, am, jitter_key=k1)
    c = forward(m, ids, am, jitter_key=k2)
    e1, e2 = forward(m, ids, am), forward(m, ids, am)
    np.testing.assert_array_equal(np.asarray(a[6]), np.asarray(b[6]))  # fixed key: deterministic
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.abs(np.asarray(a[6]) - np.asarray(c[6])).max() > 1e-4  # keys differ: jitter differs
    assert np.abs(np.asarray(a[6]) - np.asarray(e1[6])).max() > 1e-4  # train != eval
    np.testing.assert_array_equal(np.asarray(e1[0]), np.asarray(e2[0]))  # eval: deterministic


def test_gradients_finite_and_gate_trained(fixture_weights):
    ids, am = batch(SEQS, pad_to=96)
    labels = jnp.where(am.astype(bool) & (ids >= vocab.A), ids, -100)
    m = model_from_fixture(fixture_weights, mode="compact")

    @nnx.jit
    def grads_and_centres(m, ce_weight):
        def loss_fn(m):
            out = m(ids, am, jitter_key=jax.random.key(0), token_capacity=96)
            return ce_weight * parity.mlm_ce(out.logits, labels) + 0.01 * out.aux_loss, out.backbone.center
        return nnx.grad(loss_fn, has_aux=True)(m)

    grads, center = grads_and_centres(m, 1.0)
    flat = dict(nnx.to_flat_state(grads))
    for path, g in flat.items():
        assert np.isfinite(np.asarray(g[...])).all(), path
    gate = ("model", "tokenization", "gate")
    assert np.abs(np.asarray(flat[gate][...])).max() > 1e-6
    # the aux loss alone reaches the gate too
    aux_only = dict(nnx.to_flat_state(grads_and_centres(m, 0.0)[0]))
    assert np.abs(np.asarray(aux_only[gate][...])).max() > 1e-8
    # every parameter gets gradient except the unused masked-token embedding and the conv
    # weights of experts that no unit of this batch used (the dispatch is sparse)
    used = set(np.unique(np.asarray(center)[np.asarray(center) >= 0]).tolist())
    assert len(used) >= 3
    dead = {p for p, g in flat.items() if np.abs(np.asarray(g[...])).max() == 0}
    expect = {("model", "tokenization", "masked_token_embedding")}
    expect |= {("model", "tokenization", "expert_conv", e) for e in range(10) if e not in used}
    assert dead == expect, dead ^ expect


def test_edge_inputs(fixture_weights):
    m = model_from_fixture(fixture_weights, batch_independent=True)
    ids, am = batch(["N" * 30, "A", "ACGT"])  # all-N, a single nucleotide, short
    logits, aux, _, tokens, mask, pos, _ = forward(m, ids, am)
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(float(aux))
    assert int(np.asarray(mask)[1].sum()) == 1  # one nucleotide -> one unit of length 1
    assert np.asarray(mask)[0].sum() >= 3  # 30 nt -> at least ceil(30/10) units
    too_long = jnp.zeros((1, 2049), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(too_long, jnp.ones_like(too_long))


def test_bf16_close_to_fp32(fixture_weights):
    ids, am = batch(SEQS, pad_to=96)
    f32 = forward(model_from_fixture(fixture_weights, batch_independent=True), ids, am)
    bf = forward(model_from_fixture(fixture_weights, batch_independent=True, dtype="bfloat16"), ids, am)
    assert bf[0].dtype == jnp.float32  # logits are returned in fp32
    valid = np.asarray(am, bool)
    p32 = jax.nn.softmax(np.asarray(f32[0])[valid], -1)
    pbf = jax.nn.softmax(np.asarray(bf[0])[valid], -1)
    assert float(np.abs(p32 - pbf).max()) < 0.05


# ----------------------------------------------------------------------------- stages, classifier pooling


def test_stages_compose_the_forward(fixture_weights):
    """The public stage methods, called in order, give the forward's outputs bit for bit (the
    benchmark's breakdown times exactly these)."""
    ids, am = batch(SEQS, pad_to=96)
    for mode, cap in (("original", None), ("compact", 64)):
        m = model_from_fixture(fixture_weights, mode=mode)

        @nnx.jit
        def both(m, ids, am):
            full = m(ids, am, token_capacity=cap)
            bb = m.model
            am32, sm = bb.masks(ids, am)
            h = bb.nucleotide_stage(bb.embed_ids(ids), am32).hidden
            tk = bb.tokenization
            r = tk.route(h, am32, sm)
            u, _ = tk.embed_units(h, r)
            hidden, pos, mask, _ = tk.assemble(u, am32, sm, tk.token_mask(r.units.center, am32, sm), cap)
            tok = bb.tokenizer_stage(h, am32, sm, capacity=cap)
            final = bb.token_stage(tok)
            logits = m.decoder_stage(h, final, tok.positions, tok.mask, am32)
            return full, (hidden, pos, mask), tok, logits

        full, parts, tok, logits = both(m, ids, am)
        for a, b in zip(parts, (tok.hidden, tok.positions, tok.mask)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(tok.router_logits), np.asarray(full.backbone.router_logits))
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(full.logits))


def cls_model(fx, **overrides):
    cfg = parity.fixture_config(fx, **overrides)
    m = MxDNAForSequenceClassification(cfg, rngs=nnx.Rngs(0))  # fixture backbone, fresh head
    nnx.update(m.model, nnx.state(model_from_fixture(fx, **overrides).model))
    return m


def test_cls_pool_mean_and_cls(fixture_weights):
    ids, am = batch(SEQS, pad_to=96)
    sm = (ids == vocab.CLS) | (ids == vocab.SEP) | (ids == vocab.PAD)
    assert ModelConfig().cls_pool == "cls"
    with pytest.raises(ValueError, match="cls_pool must be 'cls' or 'mean'"):
        ModelConfig(cls_pool="max")
    with pytest.raises(ValueError, match="no official MxDNA config for cls_pool='mean'"):
        ModelConfig(cls_pool="mean").to_official()

    @nnx.jit(static_argnames=("cap",))
    def run(m, ids, am, cap=None):
        return m(ids, am, token_capacity=cap, capture=True)

    def manual_head(m, x_BD):
        x = m.cls_norm(x_BD)
        return np.asarray(m.out_proj(jnp.tanh(m.dense(x))).astype(jnp.float32))

    got = {}
    for pool in ("cls", "mean"):
        for mode, cap in (("original", None), ("compact", 64)):
            m = cls_model(fixture_weights, batch_independent=True, mode=mode, cls_pool=pool)
            logits, out = run(m, ids, am, cap)
            ext = extract_tokens(out, sm)
            toks, mask = np.asarray(ext.tokens, np.float64), np.asarray(ext.mask, bool)
            if pool == "cls":
                want_in = np.asarray(out.token_hidden[:, 0])
            else:
                assert (mask.sum(1) > 0).all()
                want_in = np.stack([toks[b][mask[b]].mean(0) for b in range(len(toks))]).astype(np.float32)
            np.testing.assert_allclose(np.asarray(logits), manual_head(m, jnp.asarray(want_in)), atol=2e-5)
            got[pool, mode] = np.asarray(logits)
    for pool in ("cls", "mean"):  # compact == original
        np.testing.assert_allclose(got[pool, "compact"], got[pool, "original"], atol=2e-5)
    assert np.abs(got["cls", "original"] - got["mean", "original"]).max() > 1e-4
    # the default ('cls') is the official head's number: pool = the [CLS] row
    m = cls_model(fixture_weights, batch_independent=True)
    logits, out = run(m, ids, am)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(m.head(out)[0]), rtol=1e-6, atol=1e-7)
