"""The masked-autoencoder objective (BarcodeMAE): masking, the encoder's blindness to masked
content, decoder positions, the loss, jit, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxdna_jax import build, cli, heads, optim, sharding, train_lib, vocab
from mxdna_jax.config import ModelConfig
from mxdna_jax.objectives.mae import MAE, mae_loss_fn, span_mask
from mxdna_jax.ops import mae as mae_ops
from mxdna_jax.ops.rope import rope_tables
from test_seams import small_config

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
             num_token_layers=1, max_position_embeddings=256, mae_decoder_layers=1)
L = 100  # padded length incl. [CLS]/[SEP]
LENGTHS = (98, 61, 40, 7)  # nucleotides per sequence: full, padded, padded, one span + 1


def model_of(tokenizer="learnt", target="nucleotides", **kw):
    return heads.build_model(ModelConfig(**SMALL, tokenizer=tokenizer, mae_target=target, **kw), "mae", seed=0)


def jitted(model, fn):
    """jax.jit of `fn(model, *args)` (eager op-by-op dispatch of the model is slow on CPU)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    return lambda *a: f(state, *a)


def forward(model, batch, **kw):
    return jitted(model, lambda m, b: m(b["input_ids"], b["attention_mask"], b["special_tokens_mask"],
                                         mae_mask=b["mae_mask"], **kw))(batch)


def loss_of(model, batch, key=None):
    return jitted(model, lambda m, b, k: mae_loss_fn(m, b, k, keep_fraction=0.6))(batch, key)


def raw_batch(seed=0, n_unk=3):
    """Right-padded real-looking sequences ([CLS] seq [SEP] [PAD]...), a few N among them."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in LENGTHS:
        t = np.full(L, vocab.PAD, np.int32)
        seq = rng.integers(vocab.A, vocab.G + 1, n)
        seq[rng.choice(n, size=min(n_unk, n - 1), replace=False)] = vocab.UNK
        t[0], t[1:n + 1], t[n + 1] = vocab.CLS, seq, vocab.SEP
        rows.append(t)
    return np.stack(rows)


def mae_batch(objective=MAE(), seed=0):
    rng = np.random.default_rng(seed)
    raw = raw_batch(seed)
    rows = [objective.example(t, rng) for t in raw]
    return raw, {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


# ------------------------------------------------------------------ host-side masking


@pytest.mark.parametrize("ratio,span", [(0.5, 6), (0.3, 4), (0.8, 1)])
def test_masking_ratio_is_honoured_per_sequence(ratio, span):
    obj = MAE(mask_ratio=ratio, span=span)
    raw, batch = mae_batch(obj)
    for t, ids, mm, lab, am in zip(raw, *(np.asarray(batch[k]) for k in ("input_ids", "mae_mask", "labels",
                                                                         "attention_mask"))):
        n = int((t != vocab.PAD).sum())
        n_spans = -(-(n - 2) // span)
        spans = mm[1:n - 1]
        masked_spans = {j // span for j in np.flatnonzero(spans)}
        want = min(max(1, int(ratio * n_spans + 0.5)), max(1, n_spans - 1))
        assert len(masked_spans) == want
        # whole spans only, inside the window: never [CLS], [SEP] or padding
        for j in masked_spans:
            assert spans[j * span:(j + 1) * span].all()
        assert mm[0] == 0 and mm[n - 1:].sum() == 0
        # content replaced by [MASK] on the host; labels hold it, and only there
        np.testing.assert_array_equal(ids, np.where(mm > 0, vocab.MASK, t))
        np.testing.assert_array_equal(lab, np.where(mm > 0, t, vocab.IGNORE_LABEL))
        np.testing.assert_array_equal(am, t != vocab.PAD)


def test_span_mask_edge_cases():
    rng = np.random.default_rng(0)
    assert span_mask(2, 10, 6, 0.5, rng).sum() == 0  # no nucleotide: nothing to mask
    assert span_mask(5, 10, 6, 0.5, rng).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # one span: masked
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(mask_ratio=1.0)


def test_kmer_masked_tokens_are_exactly_the_masked_spans():
    model = model_of("kmer", "kmer")
    raw, batch = mae_batch()
    out = forward(model, batch)
    mm = np.asarray(batch["mae_mask"])
    for b, t in enumerate(raw):
        n = int((t != vocab.PAD).sum())
        assert int(out.masked_rows[b].sum()) == len({j // 6 for j in np.flatnonzero(mm[b, 1:n - 1])})
    np.testing.assert_array_equal(np.asarray(out.masked_rows + out.kept_rows), np.asarray(out.token_mask))
    assert int(np.asarray(out.masked_rows * out.kept_rows).sum()) == 0


# ------------------------------------------------------------------ the encoder never sees masked content


@pytest.mark.parametrize("tokenizer", ["learnt", "kmer"])
def test_encoder_output_is_independent_of_masked_content(tokenizer):
    model = model_of(tokenizer)
    raw, batch = mae_batch()
    mm = np.asarray(batch["mae_mask"])
    other = np.where(mm > 0, vocab.A + (raw - vocab.A + 1) % 4, raw)  # every masked nucleotide changed
    enc = jitted(model, lambda m, ids, b: m.encode(ids, b["attention_mask"], b["special_tokens_mask"],
                                                   b["mae_mask"], keep_fraction=0.6))
    a = enc(batch["input_ids"], batch)
    b = enc(jnp.asarray(raw), batch)  # the content itself, not [MASK]
    c = enc(jnp.asarray(other), batch)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))


@pytest.mark.parametrize("tokenizer", ["learnt", "kmer"])
def test_encoder_gradient_wrt_masked_inputs_is_zero(tokenizer):
    model = model_of(tokenizer)
    raw, batch = mae_batch()
    ids = jnp.asarray(raw)
    w = jax.random.normal(jax.random.key(1), (len(LENGTHS), 200, SMALL["hidden_size"]))

    def grad(m, embeds):
        def f(e):
            *_, enc, _, mask_K, _ = m.encode(ids, batch["attention_mask"], batch["special_tokens_mask"],
                                             batch["mae_mask"], keep_fraction=0.6, embeds=e)
            return jnp.sum(enc * mask_K[..., None] * w[:, :enc.shape[1]])

        return jax.grad(f)(embeds)

    g = np.asarray(jitted(model, grad)(model.model.embed_ids(ids)))
    mm = np.asarray(batch["mae_mask"]) > 0
    assert np.abs(g[mm]).max() == 0.0
    valid = (raw != vocab.PAD) & ~mm
    assert np.abs(g[valid]).max() > 1e-4  # the kept content does reach the encoder


# ------------------------------------------------------------------ decoder: original positions, loss


def reference_logits(model, batch, positions_fn=None):
    """The MAE forward without the gather: token layers over all T rows with the kept rows as the
    row set, then the decoder over T rows with RoPE at `positions_fn(token positions)`."""
    m = model.model
    ids, am, sm, mm = (batch[k] for k in ("input_ids", "attention_mask", "special_tokens_mask", "mae_mask"))
    h = jnp.where(mm[..., None] > 0, m.embed[...][vocab.MASK][None, None, :], m.embed_ids(ids))
    h = m.nucleotide_stage(h, am).hidden
    tok = m.tokenizer_stage(h, am, sm, capacity=m.resolve_capacity(ids.shape[1], None))
    masked, kept = mae_ops.masked_rows(mm, tok.center, tok.positions, tok.mask)
    enc = m.token_stage(tok._replace(mask=kept))
    x = jnp.where(masked[..., None] > 0, model.mask_embedding[...][None, None, :], 0.0)
    x = jnp.where(kept[..., None] > 0, model.decoder_embed(enc), x)
    pos = tok.positions if positions_fn is None else positions_fn(tok.positions)
    rope = rope_tables(pos, model.cfg.head_dim, model.cfg.rope_theta)
    for layer in model.decoder_layers:
        x = layer(x, rope, tok.mask)
    return model.mae_head(model.decoder_norm(x)).reshape(x.shape[:2] + model.target_shape), tok.mask


@pytest.mark.parametrize("tokenizer", ["learnt", "kmer"])
def test_decoder_sees_kept_states_and_mask_embeddings_at_their_original_positions(tokenizer):
    model = model_of(tokenizer)
    _, batch = mae_batch()
    out = forward(model, batch)
    assert not bool(out.overflow)
    ref, tm = jitted(model, reference_logits)(batch)
    valid = np.asarray(tm) > 0
    err = np.abs(np.asarray(out.logits)[valid] - np.asarray(ref)[valid]).max()
    assert err <= 2e-5
    # control: the same decoder at other positions (p // 2) gives logits far further off
    shifted, _ = jitted(model, lambda m, b: reference_logits(m, b, lambda p: p // 2))(batch)
    assert np.abs(np.asarray(shifted)[valid] - np.asarray(ref)[valid]).max() > 20 * max(err, 1e-6)


@pytest.mark.parametrize("tokenizer,target", [("kmer", "kmer"), ("kmer", "nucleotides"), ("learnt", "nucleotides")])
def test_loss_counts_masked_tokens_only(tokenizer, target):
    model = model_of(tokenizer, target)
    raw, batch = mae_batch()
    loss, met = loss_of(model, batch)
    out = forward(model, batch)
    mm, logits = np.asarray(batch["mae_mask"]) > 0, np.asarray(out.logits)
    start, length = (np.asarray(x) for x in mae_ops.unit_spans(out.center, out.token_positions, out.token_mask))
    masked = np.asarray(out.masked_rows) > 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    total, count = 0.0, 0
    for b, t in np.argwhere(masked):
        span = raw[b, start[b, t]:start[b, t] + length[b, t]]
        hit = mm[b, start[b, t]:start[b, t] + length[b, t]]
        if target == "kmer":
            if length[b, t] != 6 or not hit.all():
                continue
            acgt = (span >= vocab.A) & (span <= vocab.G)
            idx = int(sum((int(x) - vocab.A) * 4 ** (5 - i) for i, x in enumerate(span))) if acgt.all() else 4**6
            total, count = total - float(logp[b, t, idx]), count + 1
        else:
            for s, (x, h) in enumerate(zip(span, hit)):
                if h and x != vocab.UNK:
                    total, count = total - float(logp[b, t, s, x]), count + 1
    assert count > 0 and int(met["n_predicted"]) == count
    if target == "nucleotides":  # every masked A/C/G/T is predicted exactly once
        assert count == int((mm & (raw >= vocab.A)).sum())
    np.testing.assert_allclose(float(met["mae_loss"]), total / count, rtol=1e-5)
    assert 0.3 < float(met["masked_token_fraction"]) < 0.8


def test_jit_equals_eager():
    model = model_of("kmer")  # eager dispatch of the learnt tokenizer's NMS rounds takes a minute on CPU
    _, batch = mae_batch()
    key = jax.random.key(3)
    eager = mae_loss_fn(model, batch, key, keep_fraction=0.6)[1]
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, b, k: mae_loss_fn(nnx.merge(graphdef, s), b, k, keep_fraction=0.6)[1])(state, batch, key)
    for k in ("loss", "mae_loss", "aux_loss", "n_predicted", "accuracy"):
        np.testing.assert_allclose(float(jitted[k]), float(eager[k]), rtol=2e-6, err_msg=k)


def test_kept_capacity_overflow_is_reported():
    model = model_of("single")
    _, batch = mae_batch()
    out = forward(model, batch, keep_fraction=0.2)  # 20 rows for ~50 kept nucleotides
    assert bool(out.overflow)


# ------------------------------------------------------------------ config, meshes


def test_mae_config_errors_are_one_line():
    with pytest.raises(cli.UserError, match="kmer_overlap"):
        build.build(small_config(objective="mae", model={"tokenizer": "kmer_overlap"}))
    with pytest.raises(cli.UserError, match="mae.span must equal model.kmer_size"):
        build.build(small_config(objective="mae", model={"tokenizer": "kmer"}, mae={"span": 4}))
    with pytest.raises(cli.UserError, match="mae_target='kmer'"):
        build.build(small_config(objective="mae", model={"tokenizer": "learnt", "mae_target": "kmer"}))


def one_step(mesh_shape, tokenizer="learnt"):
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    config = small_config(objective="mae", model={"tokenizer": tokenizer, "mae_decoder_layers": 1})
    exp = build.build(config)
    tx, sched = optim.make_optimizer(config.train)
    graphdef, state, sh = train_lib.init_train_state(exp.model_ctor(), tx, mesh, seed=0)
    step = train_lib.make_train_step(exp.loss_fn, tx, graphdef, sh, mesh, schedule=sched)
    rng = np.random.default_rng(0)
    raw = np.concatenate([raw_batch(0), raw_batch(1)])
    rows = [exp.objective.example(t, rng) for t in raw]
    batch = sharding.host_batch_to_global({k: np.stack([r[k] for r in rows]) for k in rows[0]}, mesh)
    state, m = step(state, batch, token_capacity=exp.capacity(L).initial)
    assert not bool(m["overflow"]) and np.isfinite(float(m["loss"]))
    return float(m["loss"]), jax.device_get(nnx.to_pure_dict(state.params))


def test_eight_devices_equal_one():
    loss1, p1 = one_step((1, 1, 1))
    for shape in ((4, 1, 2),):  # 8 devices: data x model
        loss, p = one_step(shape)
        assert abs(loss - loss1) <= 1e-5, (shape, loss, loss1)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p, p1))
        assert max(diffs) <= 1e-5, (shape, max(diffs))
