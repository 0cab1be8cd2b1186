"""The seams: every tokenizer x objective builds from its config and trains one sharded step;
warm start from a pretraining workdir (matching names and shapes loaded, the rest fresh, both
logged); one capacity policy."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from mxdna_jax import (build, checkpoint, cli, heads, objectives, optim, params_io, pretrain, sharding, tokenizers,
                       train_lib, trainer, vocab)
from mxdna_jax.capacity import CapacityOverflowError, CapacityPolicy
from mxdna_jax.data.pipeline import PretrainData, PretrainDataConfig
from test_optim import load_config

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
             num_token_layers=1, max_position_embeddings=512)


def small_config(**top):
    c = load_config("tiny")
    with c.unlocked():
        c.model.update(SMALL)
        c.data.update(window=62, global_batch_size=8)
        c.train.update(steps=2, warmup_steps=1, log_every=1, eval_every=0)
        c.checkpoint.update(every_steps=2)
        for k, v in top.items():
            if isinstance(v, dict):
                c[k].update(v)
            else:
                c[k] = v
    return c


def labelled_batch(exp, n=8, seed=0):
    """Real windows with the objective's own example transform (labels: a GC-content class;
    the units of a host-segmented tokenizer are added by the transform too)."""
    mlm = next(iter(PretrainData(PretrainDataConfig(window=62, global_batch_size=n, seed=seed)).dataset()))
    tokens = np.where(mlm["labels"] != vocab.IGNORE_LABEL, mlm["labels"], mlm["input_ids"])  # unmasked
    rng = np.random.default_rng(seed)
    rows = []
    for ids in tokens:
        gc = np.isin(ids, (7, 8)).mean()
        rows.append(exp.objective.example(ids, rng, label=int(gc > 0.38)))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# mae x kmer_overlap is refused (overlapping tokens leak masked content; test_mae.py)
COMBOS = [(t, o) for t in tokenizers.NAMES for o in sorted(objectives.OBJECTIVES) if (t, o) != ("kmer_overlap", "mae")]


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    from mxdna_jax.data.pipeline import default_corpus_paths
    from mxdna_jax.tokenizers import bpe

    path = tmp_path_factory.mktemp("bpe") / "bpe.json"
    bpe.train_bpe(default_corpus_paths(), 64, str(path))
    return str(path)


@pytest.mark.parametrize("tokenizer,objective", COMBOS)
def test_every_tokenizer_and_objective_trains_one_sharded_step(tokenizer, objective, bpe_json):
    model = {"tokenizer": tokenizer, "bpe_path": bpe_json if tokenizer == "bpe" else ""}
    config = small_config(objective=objective, model=model)
    exp = build.build(config)
    assert exp.model_config.tokenizer == tokenizer and exp.objective.name == objective
    mesh = sharding.make_mesh(4, 1, 2)  # 8 fake devices: data x model
    tx, sched = optim.make_optimizer(config.train)
    graphdef, state, sh = train_lib.init_train_state(exp.model_ctor(), tx, mesh, seed=0)
    step = train_lib.make_train_step(exp.loss_fn, tx, graphdef, sh, mesh, schedule=sched)
    batch = sharding.host_batch_to_global(labelled_batch(exp), mesh)
    policy = exp.capacity(64)
    # at the padded length no batch overflows: one compilation (the retries have their own tests)
    state, m, cap = trainer.train_step_with_retry(step, state, batch, policy.maximum, policy)
    assert int(state.step) == 1 and bool(m["applied"]) and np.isfinite(m["loss"])
    assert cap == policy.maximum or cap is None
    model = nnx.merge(graphdef, state.params, state.rest)
    # jitted: eager ops on 8 sharded devices compile one by one (~0.4 s each, most of this test's time)
    out = nnx.jit(lambda mdl, b: mdl.model(b["input_ids"], b["attention_mask"], token_capacity=cap,
                                           units=b.get("units")))(model, batch)
    if tokenizer in ("single", "kmer_overlap"):
        # no merging: every nucleotide (and [CLS]/[SEP]) is a token, and nothing to balance
        np.testing.assert_array_equal(np.asarray(out.token_mask).sum(1), np.asarray(batch["attention_mask"]).sum(1))
        assert float(out.aux_loss) == 0.0
    else:
        assert (np.asarray(out.token_mask).sum(1) < np.asarray(batch["attention_mask"]).sum(1)).all()


def test_unknown_tokenizer_or_objective_is_one_line():
    with pytest.raises(cli.UserError, match="objective: objective must be one of"):
        build.build(small_config(objective="mea"))
    with pytest.raises(cli.UserError, match="model config: .*tokenizer"):
        build.build(small_config(model={"tokenizer": "bpee"}))


# ------------------------------------------------------------------ warm start


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pretrain") / "run"
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    pretrain.run(small_config(), str(wd), mesh=mesh)
    step, _, params = params_io.newest_verified_params(wd)
    assert step == 2
    return wd, params


def flat(params_state):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params_state)}


def test_warm_start_loads_the_backbone_and_initialises_the_new_head(pretrained, tmp_path):
    wd, source = pretrained
    source = params_io.flatten_params(source)
    config = small_config(objective="classification", init_from=str(wd))
    exp = build.build(config)
    mesh = sharding.make_mesh(8, 1, 1)
    tx, _ = optim.make_optimizer(config.train)
    ckpt = checkpoint.CheckpointManager(tmp_path / "ft" / "checkpoints")
    start = trainer.restore_or_init(config, str(tmp_path / "ft"), ckpt, exp.model_ctor(), tx, mesh, exp.capacity(64))
    ckpt.close()
    assert start.restored is None and start.step == 0
    got = flat(start.state.params)
    head = {k for k in got if not k.startswith("model/")}
    assert head == set(start.warm.fresh) and head and all(k.split("/")[0] in ("cls_norm", "dense", "out_proj")
                                                          for k in head)
    assert set(start.warm.loaded) == {k for k in got if k.startswith("model/")}
    for k in start.warm.loaded:  # the backbone is the pretrained one, bit for bit
        np.testing.assert_array_equal(got[k], source[k], err_msg=k)
    fresh = flat(nnx.state(heads.build_model(exp.model_config, "cls", seed=int(config.train.seed)), nnx.Param))
    for k in head:  # the head is the seed's fresh initialisation
        np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)
    assert {k.split("/")[0] for k in start.warm.unused} >= {"decoder", "lm_head"}  # the MLM head is left out


def test_warm_start_shape_mismatch_names_the_parameter(pretrained, tmp_path):
    wd, _ = pretrained
    config = small_config(init_from=str(wd), model={"intermediate_size": 96})
    exp = build.build(config)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, _ = optim.make_optimizer(config.train)
    ckpt = checkpoint.CheckpointManager(tmp_path / "ft" / "checkpoints")
    msg = r"parameter [a-z_/]+/w1/kernel: the source has shape \(32, 64\), the model \(32, 96\)"
    with pytest.raises(cli.UserError, match=msg):
        trainer.restore_or_init(config, str(tmp_path / "ft"), ckpt, exp.model_ctor(), tx, mesh, exp.capacity(64))
    ckpt.close()


def test_warm_start_run_logs_both_sets(pretrained, tmp_path):
    """A classification run from the pretraining workdir through run_training: the warm_start
    event lists loaded and fresh parameters, and the run trains."""
    wd, _ = pretrained
    config = small_config(objective="classification", init_from=str(wd))
    exp = build.build(config)
    batch = labelled_batch(exp)

    def it(shard, n, start, state):
        while True:
            yield batch

    mesh = sharding.make_mesh(8, 1, 1)
    _, state = trainer.run_training(config, str(tmp_path / "ft"), loss_fn=exp.loss_fn, model_ctor=exp.model_ctor(),
                                    train_iter_factory=it, policy=exp.capacity(64), mesh=mesh)
    assert int(state.step) == 2
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    (warm,) = [r for r in rows if r.get("event") == "warm_start"]
    assert warm["source"] == str(wd) and len(warm["loaded"]) > 10
    assert sorted(warm["fresh"]) == sorted(k for k in warm["fresh"] if not k.startswith("model/"))
    assert any(k.startswith("out_proj") for k in warm["fresh"])
    # Resuming this workdir is a resume (its own checkpoint), not a second warm start.
    _, state = trainer.run_training(config, str(tmp_path / "ft"), loss_fn=exp.loss_fn, model_ctor=exp.model_ctor(),
                                    train_iter_factory=it, policy=exp.capacity(64), mesh=mesh)
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed"] for r in rows if r.get("event") == "start"] == [False, True]
    assert len([r for r in rows if r.get("event") == "warm_start"]) == 1


# ------------------------------------------------------------------ one capacity policy


def test_capacity_policy():
    cfg = build.model_config(small_config())
    p = CapacityPolicy.for_model(cfg, 64)
    assert (p.initial, p.maximum) == (cfg.token_capacity(64), 64)
    assert CapacityPolicy.for_model(cfg.replace(mode="original"), 64).initial is None
    assert CapacityPolicy.for_model(cfg, 64, fraction=0.25).initial == 16
    calls, retries = [], []
    result, cap = p.run(lambda c: (calls.append(c) or c, c < 40), 20, on_retry=lambda a, b: retries.append((a, b)))
    assert calls == [20, 30, 45] and cap == 45 == result and retries == [(20, 30), (30, 45)]
    with pytest.raises(CapacityOverflowError, match="full length"):
        p.grow(64)
    with pytest.raises(CapacityOverflowError, match="more tokens than the compact capacity 20"):
        p.run(lambda c: (None, True), 20, retry=False)
