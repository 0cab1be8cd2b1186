"""Optimizer, schedule, configs, and the train-step semantics (accumulation, bf16, overflow, NaN)."""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

import _toy_model as toy
from mxdna_jax import optim, sharding, train_lib, trainer
from mxdna_jax.capacity import CapacityOverflowError, CapacityPolicy
from mxdna_jax.config import ModelConfig

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_CFG = dict(lr=1e-2, warmup_steps=2, steps=10, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.98,
                 grad_clip=1.0)
# 2 micro-batches of 8 rows vs one batch of 16 (rows have different mask counts): float32 sums
# in a different order; measured max |diff| 0 on the loss, 2.4e-7 on the grad norm, 7.5e-8 on
# the params after one update (4 micro-batches: 1.2e-7).
ACCUM_ATOL = 1e-6


def load_config(name):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


# ------------------------------------------------------------------ schedule and mask


def test_lr_schedule_values():
    s = optim.lr_schedule(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    expect = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 1e-3 * (0.1 + 0.9 * 0.5), 110: 1e-4, 500: 1e-4}
    for step, lr in expect.items():
        np.testing.assert_allclose(float(s(step)), lr, rtol=1e-5, err_msg=f"step {step}")
    # monotone decay after warmup
    vals = [float(s(i)) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # no warmup: starts at the peak
    np.testing.assert_allclose(float(optim.lr_schedule(lr=1.0, warmup_steps=0, total_steps=10,
                                                       min_lr_ratio=0.0)(0)), 1.0)


def test_decay_mask():
    params = nnx.state(toy.make_model(), nnx.Param)
    mask = nnx.to_pure_dict(optim.decay_mask(params))
    assert mask == {"embed": False, "conv": True, "norm_scale": False, "qkv": True, "w_in": True,
                    "b_in": False, "w_out": True, "router": True, "head": True}
    nested = {"layer_norm": {"scale": jnp.ones((4, 4))}, "attn": {"bias": jnp.ones((4, 4)), "kernel": jnp.ones((4, 4))}}
    assert optim.decay_mask(nested) == {"layer_norm": {"scale": False}, "attn": {"bias": False, "kernel": True}}


def test_weight_decay_skips_masked_params():
    tx, _ = optim.make_optimizer(dict(TRAIN_CFG, weight_decay=0.5, lr=0.1, warmup_steps=0))
    params = {"w": jnp.ones((2, 2)), "ln_scale": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["ln_scale"], np.zeros(2))


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_config_model_section_is_model_config(name):
    c = load_config(name)
    assert set(c.model.keys()) == {f.name for f in dataclasses.fields(ModelConfig)}
    m = ModelConfig.from_dict(c.model.to_dict())
    assert set(c.keys()) == {"model", "objective", "init_from", "data", "train", "checkpoint", "mesh", "finetune",
                            "mae"}
    # one source per knob: the aux-loss weight and the compute dtype live in the model section only
    assert m.router_aux_loss_coef == 0.01 and "aux_loss_coef" not in c.train and "compute_dtype" not in c.train
    if name == "base":
        assert (m.hidden_size, m.num_attention_heads, m.intermediate_size) == (512, 16, 2048)
        assert (m.num_nucleotide_layers, m.num_token_layers) == (4, 16)
    else:
        assert (m.hidden_size, m.num_attention_heads, m.intermediate_size) == (64, 4, 128)
        assert (m.num_nucleotide_layers, m.num_token_layers) == (2, 2)


def test_locked_config_rejects_typos():
    c = load_config("tiny")
    with pytest.raises(AttributeError, match="steps"):
        c.train.stesp = 5
    path = str(ROOT / "configs" / "tiny.py")

    def parse(*args):
        argv = ["prog", f"--config={path}", *args]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
        fv(argv)
        return fv.config

    c = parse("--config.train.steps=7", "--config.checkpoint.async_save=false")
    assert c.train.steps == 7 and c.checkpoint.async_save is False
    with pytest.raises(Exception, match="stesp"):
        parse("--config.train.stesp=5")
    with pytest.raises(Exception):
        parse("--config.train.steps=7.5")  # type-checked too


# ------------------------------------------------------------------ train step semantics


def _params(state):
    return jax.device_get(nnx.to_pure_dict(state.params))


@pytest.fixture(scope="module")
def setup():
    """One jitted fp32 step shared by the tests below (each starts from a fresh state)."""
    mesh = sharding.make_mesh(-1, 1, 1)
    tx, sched = optim.make_optimizer(TRAIN_CFG)
    graphdef, _, sh = train_lib.init_train_state(toy.make_model, tx, mesh, seed=0)
    step = train_lib.make_train_step(toy.toy_loss_fn, tx, graphdef, sh, mesh, schedule=sched)

    def fresh():
        return train_lib.init_train_state(toy.make_model, tx, mesh, seed=0)[1]

    return mesh, tx, sched, graphdef, sh, step, fresh


def test_grad_accumulation_matches_full_batch(setup):
    """2 micro-batches of 8 == one batch of 16, rows with uneven masked-token counts (so the
    loss_weight weighting matters). The router jitter is off: its key differs per micro-batch."""

    def no_jitter(model, batch, rng, *, token_capacity):
        # aux_coef=0: the aux loss is pooled over the (micro-)batch, a nonlinear function of the
        # pool, so it is by construction not additive over micro-batches.
        return toy.toy_loss_fn(model, batch, None, token_capacity=token_capacity, aux_coef=0.0)

    mesh, tx, _, graphdef, sh, _, fresh = setup
    results = []
    for accum in (1, 2):
        step = train_lib.make_train_step(no_jitter, tx, graphdef, sh, mesh, grad_accum_steps=accum)
        state, m = step(fresh(), sharding.host_batch_to_global(toy.make_batch(3, batch=16), mesh),
                        token_capacity=None)
        results.append((float(m["loss"]), float(m["grad_norm"]), _params(state)))
    (l1, g1, p1), (l2, g2, p2) = results
    np.testing.assert_allclose(l2, l1, atol=ACCUM_ATOL)
    np.testing.assert_allclose(g2, g1, atol=ACCUM_ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ACCUM_ATOL, rtol=0), p2, p1)


def test_bf16_compute_keeps_fp32_master_params(setup):
    mesh, tx, sched, graphdef, sh, step32, fresh = setup
    step16 = train_lib.make_train_step(toy.toy_loss_fn, tx, graphdef, sh, mesh, compute_dtype="bfloat16",
                                       schedule=sched)
    batch = sharding.host_batch_to_global(toy.make_batch(0), mesh)
    s32, m32 = step32(fresh(), batch, token_capacity=None)
    s16, m16 = step16(fresh(), batch, token_capacity=None)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
    assert int(s16.step) == 1 and bool(m16["applied"])


def test_step_rng_is_a_function_of_seed_and_step(setup):
    """Two fresh runs give bit-identical results (jitter included): resume can be exact."""
    mesh, *_, step, fresh = setup
    outs = []
    for _ in range(2):
        s = fresh()
        for i in range(2):
            s, m = step(s, sharding.host_batch_to_global(toy.make_batch(i), mesh), token_capacity=None)
        outs.append((float(m["loss"]), _params(s)))
    assert outs[0][0] == outs[1][0]
    jax.tree.map(np.testing.assert_array_equal, outs[0][1], outs[1][1])


def test_overflow_reruns_same_step_at_larger_capacity(setup):
    mesh, *_, step, fresh = setup
    batch = sharding.host_batch_to_global(toy.make_batch(0, units=7), mesh)
    # Reference: the capacity the retries will end at (9 fits 7 units) from the start.
    ref_state, ref_m = step(fresh(), batch, token_capacity=9)
    # Capacity 4 overflows: the step must not be applied, and the retry reproduces the reference.
    s1, m1 = step(fresh(), batch, token_capacity=4)
    assert bool(m1["overflow"]) and not bool(m1["applied"]) and int(s1.step) == 0
    retries = []
    policy = CapacityPolicy(initial=4, maximum=12, growth=1.5)
    s2, m2, cap = trainer.train_step_with_retry(step, s1, batch, 4, policy,
                                                on_retry=lambda a, b: retries.append((a, b)))
    assert retries == [(4, 6), (6, 9)] and cap == 9
    assert int(s2.step) == 1 and not m2["overflow"]
    assert float(m2["loss"]) == float(ref_m["loss"])
    jax.tree.map(np.testing.assert_array_equal, _params(s2), _params(ref_state))
    with pytest.raises(CapacityOverflowError, match="full length"):
        policy.grow(12)


def test_non_finite_loss_is_not_applied_and_raises(setup):
    mesh, *_, step, fresh = setup
    state = fresh()
    before = _params(state)
    batch = toy.make_batch(0)
    batch["poison"][:] = True
    state, m = step(state, sharding.host_batch_to_global(batch, mesh), token_capacity=None)
    m = jax.device_get(m)
    assert not m["finite"] and not m["applied"] and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, _params(state), before)
    with pytest.raises(train_lib.NonFiniteLossError, match="step 1"):
        train_lib.check_step(1, m)
