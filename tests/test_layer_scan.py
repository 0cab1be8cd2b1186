"""Layer stacks as one lax.scan (ModelConfig.layer_loop='scan') == the unrolled loop: forward,
captured per-layer outputs, per-layer gradients (with and without remat), the stored param layout;
and 'auto' (scan without a gradient, unrolled under one) == both."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxdna_jax import vocab
from mxdna_jax.config import ModelConfig
from mxdna_jax.layers import run_layers, set_attention_implementation
from mxdna_jax.model import MxDNAForMAE, MxDNAForMaskedLM

SEQS = ["ACGTTGCAAGGCTTAGCAATCGATCGGATCCATGCAAATTTGCGCG", "TTGACGGCTAGCTAGGATCGATCG", "GATTACA"]
TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_nucleotide_layers=2,
            num_token_layers=3, max_position_embeddings=64, layer_loop="scan")


def make(cls=MxDNAForMaskedLM, **kw):
    return cls(ModelConfig(**{**TINY, **kw}), rngs=nnx.Rngs(0))


def batch():
    b = vocab.encode_batch(SEQS, pad_to=48)
    return jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])


@nnx.jit
def forward(m, ids, am):
    out = m(ids, am, capture=True)
    return out.logits, out.backbone.intermediates


@nnx.jit
def grads(m, ids, am):
    def loss(m):
        out = m(ids, am)
        return jnp.mean(out.logits**2) + out.aux_loss

    return nnx.grad(loss)(m)


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# the learnt tokenizer in compact mode; a cheaper one (compile time) at nucleotide length
@pytest.mark.parametrize("mode,tokenizer", [("compact", "learnt"), ("original", "kmer")])
def test_forward_and_capture_equal(mode, tokenizer):
    ids, am = batch()
    kw = dict(mode=mode, tokenizer=tokenizer, kmer_size=3)
    scan, unrolled = make(**kw), make(layer_loop="unrolled", remat=False, **kw)
    # the option changes how layers run, never what is stored: same tree, same init
    assert jax.tree.structure(nnx.state(scan)) == jax.tree.structure(nnx.state(unrolled))
    assert max_abs_diff(nnx.state(scan), nnx.state(unrolled)) == 0.0
    assert set(nnx.state(scan.model.token_layers)) == {0, 1, 2}  # stored per layer, as convert.py names them
    (ls, cs), (lu, cu) = forward(scan, ids, am), forward(unrolled, ids, am)
    assert set(cs) == set(cu)
    prefix = "compact_" if mode == "compact" else ""
    assert cs[prefix + "token_layer_outputs"].shape[0] == 3 and cs["nucleotide_layer_outputs"].shape[0] == 2
    assert max_abs_diff(ls, lu) <= 1e-6
    for k in cs:
        assert max_abs_diff(cs[k], cu[k]) <= 1e-6, k
    if tokenizer == "kmer":  # un-jitted too (lax.scan runs eagerly)
        assert max_abs_diff(scan(ids, am).logits, ls) <= 1e-6


@pytest.fixture(scope="module")
def unrolled_grads():
    return grads(make(layer_loop="unrolled", remat=False, tokenizer="kmer", kmer_size=3), *batch())


@pytest.mark.parametrize("loop,remat,policy", [("scan", False, "nothing"), ("scan", True, "nothing"),
                                               ("scan", True, "dots"), ("auto", True, "dots")])
def test_gradients_equal_per_layer(loop, remat, policy, unrolled_grads):
    gs = grads(make(layer_loop=loop, remat=remat, remat_policy=policy, tokenizer="kmer", kmer_size=3), *batch())
    gu = unrolled_grads
    assert jax.tree.structure(gs) == jax.tree.structure(gu)
    for i in range(3):  # every token layer gets its own, non-zero gradient
        k = gs["model"]["token_layers"][i]["ffn"]["w2"]["kernel"][...]
        assert float(jnp.max(jnp.abs(k))) > 0
        np.testing.assert_allclose(k, gu["model"]["token_layers"][i]["ffn"]["w2"]["kernel"][...], atol=1e-6)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(gu))
    assert max_abs_diff(gs, gu) <= 1e-5 * max(scale, 1.0)


def test_program_has_one_scan_per_stack():
    ids, am = batch()

    def scans(m):
        return scan_lengths(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(m), s)(ids, am).logits)(nnx.state(m)).jaxpr)

    # the stacks add one scan each (nucleotide: 2 layers, token: 3) to those the tokenizer has
    assert scans(make()) - scans(make(layer_loop="unrolled")) == collections.Counter([2, 3])


def scan_lengths(jaxpr) -> collections.Counter:
    """Lengths of every scan in a jaxpr, nested ones (custom_vjp, remat, cond bodies) included."""
    out = collections.Counter()
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            out[e.params["length"]] += 1
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += scan_lengths(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += scan_lengths(sub)
    return out


def test_auto_scans_the_forward_and_unrolls_the_gradient():
    ids, am = batch()
    kw = dict(tokenizer="kmer", kmer_size=3)
    auto, unrolled = make(layer_loop="auto", **kw), make(layer_loop="unrolled", **kw)

    def fwd(m):
        return jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(m), s)(ids, am).logits)(nnx.state(m)).jaxpr

    def grad(m):
        loss = lambda s: jnp.mean(nnx.merge(nnx.graphdef(m), s)(ids, am).logits ** 2)  # noqa: E731
        return jax.make_jaxpr(jax.grad(loss))(nnx.state(m)).jaxpr

    assert scan_lengths(fwd(auto)) - scan_lengths(fwd(unrolled)) == collections.Counter([2, 3])
    assert scan_lengths(grad(auto)) == scan_lengths(grad(unrolled))  # no layer scan under the gradient
    (la, ca), (lu, cu) = forward(auto, ids, am), forward(unrolled, ids, am)
    assert max_abs_diff(la, lu) <= 1e-6 and max_abs_diff(ca, cu) <= 1e-6


def test_layers_that_differ_run_unrolled():
    ids, am = batch()
    m, ref = make(), make(layer_loop="unrolled")
    set_attention_implementation(m.model.token_layers[1], "xla")  # a different static graph: no scan
    x = jax.random.normal(jax.random.key(0), (3, 48, 32))
    rope = m.model.nucleotide_rope(3, 48)
    a, outs = run_layers(m.model.token_layers, x, rope, am, collect=True)
    b, outs_ref = run_layers(ref.model.token_layers, x, rope, am, loop="unrolled", collect=True)
    assert outs.shape == (3, 3, 48, 32)
    assert max_abs_diff((a, outs), (b, outs_ref)) <= 1e-5


def test_mae_decoder_stack():
    ids, am = batch()
    mae_mask = jnp.zeros_like(ids).at[:, 3:9].set(1)
    cfg = dict(tokenizer="kmer", kmer_size=3, mae_decoder_layers=2)
    fwd = nnx.jit(lambda m: m(ids, am, mae_mask=mae_mask).logits)
    a, b = fwd(make(MxDNAForMAE, **cfg)), fwd(make(MxDNAForMAE, layer_loop="unrolled", **cfg))
    assert max_abs_diff(a, b) <= 1e-6


def test_config_validation():
    with pytest.raises(ValueError, match="layer_loop"):
        ModelConfig(layer_loop="loop")
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig(remat_policy="dots_all")
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="yes")


def test_loop_and_remat_are_resume_safe():
    import dataclasses

    from mxdna_jax.validate import check_resume_config

    model = {f.name: getattr(ModelConfig(**TINY), f.name) for f in dataclasses.fields(ModelConfig)}
    old = {"model": {k: v for k, v in model.items() if k not in ("layer_loop", "remat_policy")}}
    now = {"model": {**model, "layer_loop": "unrolled", "remat": True, "remat_policy": "dots"}}
    # a checkpoint from before the fields existed, resumed with other loop/remat choices: nothing to accept
    assert check_resume_config(old, now, workdir="w", allow_change=False) == []
