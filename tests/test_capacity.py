"""A capacity that follows the data: the bucket ladder, the training tracker on scripted token
counts, inference at the bucket of the counted tokens (equal to a large capacity on real
windows), and retries / utilisation in metrics.jsonl with an exact resume."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _toy_model as toy
from mxdna_jax import heads, staged, trainer
from mxdna_jax.capacity import CapacityOverflowError, CapacityPolicy
from mxdna_jax.config import ModelConfig
from mxdna_jax.data.pipeline import PretrainData, PretrainDataConfig
from mxdna_jax.evaluation import embed as E
from mxdna_jax.model import flatten_tokens

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

# ------------------------------------------------------------------ ladder


def test_bucket_ladder_and_bucket_for():
    p = CapacityPolicy(512, 1024, adaptive=True, bucket_step=0.125)
    b = p.buckets
    assert b[:8] == (8, 16, 24, 32, 40, 48, 56, 64) and b[-1] == 1024 and len(b) < 30
    assert all(x % 8 == 0 for x in b) and list(b) == sorted(set(b))
    # every rung is at least x(1 + step) (or +8) above the previous: a bounded set of shapes
    assert all(hi >= min(lo + 8, lo * 1.125) for lo, hi in zip(b, b[1:]))
    # ... and at most ~x(1 + step) plus rounding: a count never costs more than that
    assert all(hi <= math.ceil(lo * 1.125 / 8) * 8 + 8 for lo, hi in zip(b[:-1], b[1:-1]))
    assert [p.bucket_for(c) for c in (1, 8, 9, 205, 209, 1000, 1024)] == [8, 8, 16, 208, 240, 1024, 1024]
    assert all(p.bucket_for(c) >= c for c in range(1, 1025))
    d = CapacityPolicy(512, 1024).buckets  # the default ladder: x1.0625 steps
    assert len(d) == 45 and all(hi <= max(lo + 8, math.ceil(lo * 1.0625 / 8) * 8) for lo, hi in zip(d, d[1:]))
    assert CapacityPolicy(4, 12).buckets == (8, 12) and CapacityPolicy(3, 5).buckets == (5,)
    assert CapacityPolicy(4, 12, bucket_multiple=1, bucket_step=0.125).buckets == (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)
    # growth after an overflow: rounded to a rung when adaptive, the plain policy unchanged
    assert p.grow(208) == p.bucket_for(312) == 312 and CapacityPolicy(20, 64).grow(20) == 30
    with pytest.raises(CapacityOverflowError):
        CapacityPolicy(None, None).bucket_for(3)
    calls = []
    assert p.run_counted(205, lambda c: (calls.append(c) or c, False)) == (208, 208) and calls == [208]


def test_counted_capacity_spares_compilations():
    p = CapacityPolicy(512, 1024)  # rungs ..., 184, 200, 216, ...
    cc = p.counted()
    run = lambda n: cc.run(n, lambda c: (c, n > c))[1]  # noqa: E731
    # a first rung is compiled; a smaller one reuses it (<= 1.25x) until wanted 3 times
    assert [run(n) for n in (205, 190, 195, 190, 199, 100)] == [216, 216, 216, 200, 200, 104]
    assert cc.rungs.compiled == {216, 200, 104}
    assert [run(n) for n in (230, 230, 230)] == [232, 232, 232]  # never below the count's rung


# ------------------------------------------------------------------ training tracker


def test_tracker_on_scripted_counts():
    p = CapacityPolicy(512, 1024, adaptive=True, margin=0.05, patience=5, bucket_step=0.125)
    t = p.tracker()
    # the initial 0.5 x L guess: shrunk after `patience` steps, like any other capacity
    assert [t.update(512, c) for c in (200, 190, 200, 195, 200)] == [512] * 4 + [p.bucket_for(210)] == [512] * 4 + [240]
    for c in (205, 190, 210, 198):
        assert t.update(240, c) == 240
    assert t.update(240, 230) == 272  # close to the top: grows before it has to overflow
    # an overflow at 272 was re-run at grow(272) (x1.5, up to a rung); the batch needed 300: the
    # next step runs at 300's rung
    assert p.grow(272) == 456 and t.update(456, 300) == p.bucket_for(315) == 352
    # sustained low counts: shrink only after `patience` of them, to the rung of the largest
    assert [t.update(352, c) for c in (150, 170, 140, 150)] == [352] * 4
    assert t.update(352, 150) == p.bucket_for(math.ceil(170 * 1.05)) == 184 >= 170
    # a step that fits the current rung breaks a low streak
    for c in (100, 100, 100, 100, 170, 100, 100, 100, 100):
        assert t.update(184, c) == 184
    assert t.update(184, 100) == p.bucket_for(105) == 120
    # an overflow's retry tries a compiled capacity below x1.5 first, else x1.5 (up to a rung)
    assert t.rungs.compiled == {512, 240, 272, 456, 352, 184}
    assert t.grow(184) == 240 and t.grow(120) == p.grow(120) == 184
    # a rung is compiled once wanted 3 times; until then a compiled one <= 1.25x above serves
    assert [t.update(120, 160) for _ in range(3)] == [184] * 3  # 160 x 1.05 -> rung 184 (compiled)
    # near the end of a run (or in a short one) no move compiles: a compiled rung or no move
    assert t.update(184, 300, remaining=50) == 352 and t.update(352, 600, remaining=99) == 352
    assert t.update(352, 600, remaining=100) == p.bucket_for(630) == 672

    # a long noisy run: few distinct capacities, counts always held, retries rare; the state
    # round-trips through JSON (checkpoint meta), so a resumed tracker takes the same decisions
    rng = np.random.default_rng(0)
    counts = np.concatenate([rng.normal(205, 8, 500), rng.normal(240, 8, 500),
                             rng.normal(170, 6, 500)]).round().astype(int)

    def simulate(t, counts):
        caps, retries = [], 0
        for c in counts:
            cap = t.capacity
            while c > cap:  # what the overflow retry does
                cap, retries = p.grow(cap), retries + 1
            caps.append(cap)
            t.update(cap, c)
        return caps, retries

    caps, retries = simulate(p.tracker(), counts)
    assert len(set(caps)) <= 8 and retries <= 3, (sorted(set(caps)), retries)
    assert np.mean(np.asarray(caps) / counts) < 1.2  # vs each batch's largest count (what it must hold)
    t = p.tracker()
    first, _ = simulate(t, counts[:700])
    resumed = p.tracker().load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert first + simulate(resumed, counts[700:])[0] == caps


@pytest.mark.parametrize("field,value,message", [
    ("capacity_margin", -0.1, "train.capacity_margin must be >= 0"),
    ("capacity_patience", 0, "train.capacity_patience must be a positive integer"),
    ("capacity_bucket_step", 0.0, "train.capacity_bucket_step must be > 0"),
    ("capacity_min_remaining", -1, "train.capacity_min_remaining must be >= 0"),
])
def test_capacity_fields_are_validated_and_resume_safe(field, value, message):
    from mxdna_jax import build, validate
    from mxdna_jax.cli import UserError
    from test_optim import load_config

    c = load_config("tiny")
    exp = build.build(c)
    assert exp.capacity(128).adaptive and exp.capacity(128).buckets[-1] == 128
    with c.unlocked():
        c.train[field] = value
    with pytest.raises(UserError, match=message):
        validate.check_training_config(c)
    assert f"train.{field}" in validate.RESUME_SAFE_FIELDS


def test_fixed_policy_tracker_only_keeps_retries():
    p = CapacityPolicy(4, 12)  # not adaptive: the fixed policy of the existing runs
    t = p.tracker()
    assert t.update(4, 2) == 4 and t.update(6, 5) == 6 and t.update(6, 1) == 6
    assert CapacityPolicy(None, None).tracker().update(None, 5) is None


# ------------------------------------------------------------------ inference: count, then bucket

CFG = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
                  num_token_layers=2, max_position_embeddings=512, mode="compact", batch_independent=True)


def _windows(window, n=8, seed=0):
    b = next(iter(PretrainData(PretrainDataConfig(window=window, global_batch_size=n, seed=seed)).dataset()))
    from mxdna_jax import vocab

    ids = np.where(b["labels"] != vocab.IGNORE_LABEL, b["labels"], b["input_ids"])  # the unmasked windows
    return jnp.asarray(ids), jnp.asarray(b["attention_mask"])


@nnx.jit(static_argnames=("token_capacity",))
def _one_call(model, ids, am, token_capacity):
    return model(ids, am, token_capacity=token_capacity)


@nnx.jit
def _prefix(model, ids, am):
    return staged.prefix(model, ids, am)


@nnx.jit(static_argnames=("token_capacity",))
def _finish(model, p, token_capacity):
    return staged.finish(model, p, token_capacity)


@pytest.mark.parametrize("head", ["tokens", "mlm", "cls"])
def test_inference_at_counted_bucket_equals_large_capacity(head):
    model = heads.build_model(CFG, head, seed=1)
    ids, am = _windows(126, n=4)  # L = 128: real windows of the embedded corpus
    L = ids.shape[1]
    policy = CapacityPolicy.for_model(CFG, L)
    p, count = _prefix(model, ids, am)
    large = _one_call(model, ids, am, token_capacity=L)  # holds any batch: the reference
    backbone = large.backbone if head != "cls" else large[1]
    real = np.asarray(backbone.token_mask).sum(1)
    assert int(count) == real.max() and (np.asarray(p.tokens) == real).all()
    def attempt(c):
        out = _finish(model, p, c)
        return out, {"tokens": lambda: out.backbone, "mlm": lambda: out, "cls": lambda: out[1]}[head]().overflow

    out, cap = policy.run_counted(int(count), attempt)
    assert cap == policy.bucket_for(int(count)) and count <= cap < policy.initial, (int(count), cap)
    assert cap <= 1.125 * int(count) + 8
    # the staged call is the one-call forward at that capacity, bit for bit
    one = _one_call(model, ids, am, token_capacity=cap)
    jax.tree.map(np.testing.assert_array_equal, out, one)
    # and equals the large capacity (rows in the same order; the values up to reduction order)
    if head == "mlm":
        np.testing.assert_allclose(out.logits, large.logits, atol=2e-6, rtol=0)
    elif head == "cls":
        np.testing.assert_allclose(out[0], large[0], atol=2e-6, rtol=0)
    else:
        np.testing.assert_array_equal(out.mask, large.mask[:, :cap])
        np.testing.assert_array_equal(out.positions * out.mask, (large.positions * large.mask)[:, :cap])
        assert not np.asarray(large.mask)[:, cap:].any()
        m = np.asarray(out.mask, bool)
        np.testing.assert_allclose(np.asarray(out.tokens)[m], np.asarray(large.tokens)[:, :cap][m], atol=2e-6, rtol=0)


def test_embed_runs_at_the_counted_bucket():
    model = heads.build_model(CFG, "tokens", seed=2)
    ids, am = _windows(126, n=4, seed=3)
    seqs = [np.asarray(r)[1:int(a.sum()) - 1] for r, a in zip(np.asarray(ids), np.asarray(am))]
    tok = E.embed(model, seqs, pool="tokens", batch_size=4)
    ref = jax.device_get(_one_call(model, ids, am, token_capacity=ids.shape[1]))
    rows, b, pos = flatten_tokens(ref.tokens, ref.mask, ref.positions)
    np.testing.assert_array_equal(np.diff(tok.offsets), np.bincount(b, minlength=4))
    np.testing.assert_array_equal(tok.positions, pos - 1)
    np.testing.assert_allclose(tok.embeddings, rows, atol=2e-6, rtol=0)


# ------------------------------------------------------------------ the train loop


def _benchmark_module(name):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _counting_loss(model, batch, rng, *, token_capacity):
    loss, m = toy.toy_loss_fn(model, batch, rng, token_capacity=token_capacity)
    units = batch["units"]
    return loss, dict(m, max_tokens=units.max(), mean_tokens=units.mean().astype(jnp.float32))


_TOY_POLICY = CapacityPolicy(4, 12, adaptive=True, patience=2, bucket_multiple=1, min_remaining=0)


def _run(workdir, **kw):
    """The toy training loop with an adaptive policy whose loss reports token counts."""
    policy = _TOY_POLICY
    units = {1: 6, 2: 3, 3: 3, 4: 3, 5: 3}

    def train_iter(shard_index, num_shards, start_step, data_state):
        it = toy.ToyIterator(seed=1, batch=8, shard_index=shard_index, num_shards=num_shards, units=units, **kw)
        if data_state is not None:
            it.set_state(data_state)
        return it

    def eval_iter(shard_index, num_shards):
        return toy.ToyIterator(seed=99, batch=8, shard_index=shard_index, num_shards=num_shards)

    return trainer.run_training(toy.loop_config(), str(workdir), loss_fn=_counting_loss, model_ctor=toy.make_model,
                                train_iter_factory=train_iter, eval_iter_factory=eval_iter, policy=policy)


def test_retries_and_utilisation_in_metrics_and_exact_resume(tmp_path):
    _run(tmp_path / "a")
    rows = toy.read_jsonl(tmp_path / "a")
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    # step 2 needs 6 token rows at capacity 5: one retry, at grow(5) = 8
    assert [train[s]["overflow_retries"] for s in range(1, 7)] == [0, 1, 0, 0, 0, 0]
    assert [train[s]["token_capacity_mean"] for s in range(1, 7)] == [4, 8, 8, 8, 4, 4]
    assert [train[s]["real_tokens_max"] for s in range(1, 7)] == [4, 6, 3, 3, 3, 3]
    assert train[4]["capacity_utilisation"] == pytest.approx(3 / 8)
    events = [r for r in rows if r["kind"] == "event"]
    assert [(e["old"], e["new"]) for e in events if e["event"] == "capacity_grown"] == [(5, 8)]
    # 4 units: 4 -> 5 (4 x 1.05); the retried batch needed 6: 7 (6 x 1.05), but 8 is compiled and
    # close enough (Rungs); two steps of 3 units (patience 2): back to 4, compiled at step 1
    assert [(e["step"], e["old"], e["new"]) for e in events if e["event"] == "capacity_changed"] == [
        (1, 4, 5), (4, 8, 4)]

    # benchmarks/capacity_replay.py reads the log back, and its replay of the policy on the logged
    # counts takes the run's capacities and retries (what it reports for other settings rests on this)
    replay = _benchmark_module("capacity_replay")
    run = replay.run_summary(replay.read_steps(tmp_path / "a"), fixed=6)
    assert (run["retries"], run["capacities"], run["counts"]) == (1, [4, 8, 8, 8, 4, 4], [4, 6, 3, 3, 3, 3])
    assert run["capacity_over_needed"] == pytest.approx(36 / 22)
    assert run["rows_run_over_needed"] == pytest.approx((36 + 5) / 22)  # + the overflowed attempt at 5
    again = replay.replay_training(_TOY_POLICY, run["counts"])
    assert (again["retries"], again["capacities"]) == (1, run["capacities"])
    assert again["rows_run_over_needed"] == pytest.approx((36 + 5) / 22)  # + the overflowed attempt at 5

    # killed while reading batch 4 (step 3 checkpointed): the resumed run takes the same capacities
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "b", fail_at=4)
    _run(tmp_path / "b")
    again = {r["step"]: r for r in toy.read_jsonl(tmp_path / "b") if r["kind"] == "train"}
    for s in (4, 5, 6):
        assert again[s]["loss"] == train[s]["loss"]
        assert again[s]["token_capacity_mean"] == train[s]["token_capacity_mean"]
