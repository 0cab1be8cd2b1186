"""Sharding rules, mesh construction, batch placement, and mesh-independence of a train step."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mxdna_jax import optim, sharding, train_lib
import _toy_model as toy

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

# Two train steps on any mesh must match one device to this absolute tolerance (float32; the
# differences come only from the order of cross-device reductions: measured max 4.8e-7 on the
# loss and 7.5e-7 on the params).
MESH_ATOL = 1e-5

TRAIN_CFG = dict(lr=1e-2, warmup_steps=2, steps=10, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.98,
                 grad_clip=1.0)


def mesh_of(data, fsdp=1, model=1):
    n = data * fsdp * model
    return sharding.make_mesh(data, fsdp, model, devices=jax.devices()[:n])


def test_make_mesh_sizes():
    m = sharding.make_mesh(-1, 1, 2)
    assert dict(m.shape) == {"data": 4, "fsdp": 1, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert dict(sharding.mesh_from_config({"data": 2, "fsdp": -1, "model": 2}).shape) == {
        "data": 2, "fsdp": 2, "model": 2}
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(3, 1, 2)


@pytest.mark.parametrize("axes,shape,mesh_shape,expected", [
    (("embed", "mlp"), (16, 32), (2, 2, 2), P("fsdp", "model")),
    (("mlp", "embed"), (32, 16), (2, 2, 2), P("model", "fsdp")),
    (("embed", "qkv"), (16, 48), (2, 2, 2), P("fsdp", "model")),
    (("vocab", "embed"), (9, 16), (2, 2, 2), P(None, "fsdp")),  # 9 % 2: vocab falls back to replicated
    (("vocab", "embed"), (10, 16), (1, 1, 2), P("model")),  # fsdp size 1 is dropped
    (("taps", "conv_in", "embed"), (3, 16, 16), (2, 2, 2), P(None, None, "fsdp")),
    (("embed", "experts"), (16, 10), (2, 2, 2), P("fsdp")),
    (("mlp", "qkv"), (32, 32), (2, 1, 4), P("model")),  # a mesh axis may be used once
    ((None,), (7,), (2, 2, 2), P()),
    (("embed", "mlp"), (16, 32), (8, 1, 1), P()),  # pure data parallel: all replicated
    (None, (4, 4), (2, 2, 2), P()),
])
def test_logical_to_spec(axes, shape, mesh_shape, expected):
    assert sharding.logical_to_spec(axes, shape, mesh_of(*mesh_shape)) == expected


def test_logical_to_spec_errors():
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("heads",), (4,), mesh_of(8))
    with pytest.raises(ValueError, match="do not match"):
        sharding.logical_to_spec(("embed",), (4, 4), mesh_of(8))


def test_param_shardings_of_model_and_shard_model():
    mesh = mesh_of(2, 2, 2)
    model = toy.make_model()
    specs = jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(sharding.param_shardings(nnx.state(model), mesh)))
    assert specs == {"embed": P(None, "fsdp"), "conv": P(None, None, "fsdp"), "norm_scale": P("fsdp"),
                     "qkv": P("fsdp", "model"), "w_in": P(None, "model"), "b_in": P("model"),
                     "w_out": P("model", "fsdp"), "router": P("fsdp"), "head": P("fsdp")}
    sharding.shard_model(model, mesh)
    assert model.w_out[...].sharding.spec == P("model", "fsdp")
    assert model.embed[...].sharding.spec == P(None, "fsdp")


def test_batch_sharding_and_host_batch():
    mesh = mesh_of(4, 1, 2)
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    b = toy.make_batch(0)
    g = sharding.host_batch_to_global(b, mesh, global_batch_size=8)
    np.testing.assert_array_equal(np.asarray(g["input_ids"]), b["input_ids"])
    assert g["input_ids"].sharding.spec == P(("data", "fsdp"))
    # 2 rows per data shard, replicated over 'model'.
    assert {s.data.shape for s in g["input_ids"].addressable_shards} == {(2, 12)}
    assert sharding.process_batch_slice(mesh, 8) == (0, 1)


def _one_step(mesh, *, accum=1, steps=1):
    tx, sched = optim.make_optimizer(TRAIN_CFG)
    graphdef, state, sh = train_lib.init_train_state(toy.make_model, tx, mesh, seed=0)
    step = train_lib.make_train_step(toy.toy_loss_fn, tx, graphdef, sh, mesh, grad_accum_steps=accum, schedule=sched)
    losses = []
    for i in range(steps):
        state, m = step(state, sharding.host_batch_to_global(toy.make_batch(i), mesh), token_capacity=None)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(nnx.to_pure_dict(state.params)), state


@pytest.fixture(scope="module")
def single_device_result():
    return _one_step(mesh_of(1), steps=2)


@pytest.mark.parametrize("mesh_shape", [(4, 1, 2), (8, 1, 1), (2, 2, 2)])
def test_train_step_is_mesh_independent(single_device_result, mesh_shape):
    ref_losses, ref_params, _ = single_device_result
    losses, params, state = _one_step(mesh_of(*mesh_shape), steps=2)
    np.testing.assert_allclose(losses, ref_losses, atol=MESH_ATOL, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=MESH_ATOL, rtol=0), params, ref_params)
    # Params (and Adam moments) stay on their rule-given shardings after the update.
    expected = sharding.logical_to_spec(("mlp", "embed"), (32, 16), state.params["w_out"][...].sharding.mesh)
    assert state.params["w_out"][...].sharding.spec == expected
    assert int(state.step) == 2


_TWO_PROCESS = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    from mxdna_jax import distributed
    assert distributed.maybe_initialize()
    import jax, numpy as np
    from mxdna_jax import sharding
    mesh = sharding.make_mesh(-1, 1, 1)
    idx, n = sharding.process_batch_slice(mesh, 8)
    assert (idx, n) == (jax.process_index(), 2), (idx, n)
    local = np.arange(8, dtype=np.float32)[idx * 4:(idx + 1) * 4]
    g = sharding.host_batch_to_global({{"x": local}}, mesh, global_batch_size=8)["x"]
    total = jax.jit(lambda x: x.sum(), out_shardings=sharding.replicated(mesh))(g)
    assert float(total) == 28.0, float(total)
    print("OK", jax.process_index(), jax.device_count())
""")


def test_two_processes_feed_one_global_batch(tmp_path):
    """maybe_initialize from MXDNA_* env vars (gloo over 127.0.0.1); each process feeds its half."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    procs = []
    for pid in range(2):
        env = dict(os.environ, MXDNA_COORDINATOR=f"127.0.0.1:{port}", MXDNA_NUM_PROCESSES="2",
                   MXDNA_PROCESS_ID=str(pid))
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert sorted(o.strip().splitlines()[-1] for o, _ in outs) == ["OK 0 4", "OK 1 4"]
