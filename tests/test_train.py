"""Pretraining end to end with the real MxDNA model: meshes, kill/resume, 2 processes, learning, bad input."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import compile_cache_env
from mxdna_jax import optim, sharding, train_lib
from mxdna_jax.config import ModelConfig
from mxdna_jax.data.pipeline import PretrainData, PretrainDataConfig
from mxdna_jax.model import MxDNAForMaskedLM
from mxdna_jax.objectives.mlm import mlm_loss_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
                   num_token_layers=1, max_position_embeddings=512)
MESH_ATOL = 1e-5  # measured: see the closing figures in README (order of cross-device reductions)

# ------------------------------------------------------------------ one step on several meshes


def one_step(mesh_shape):
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    tx, sched = optim.make_optimizer(dict(lr=1e-3, warmup_steps=1, steps=10, min_lr_ratio=0.1, weight_decay=0.01,
                                          b1=0.9, b2=0.98, grad_clip=1.0))
    ctor = lambda: MxDNAForMaskedLM(TINY, rngs=nnx.Rngs(params=0))
    graphdef, state, sh = train_lib.init_train_state(ctor, tx, mesh, seed=0)
    step = train_lib.make_train_step(mlm_loss_fn, tx, graphdef, sh, mesh, schedule=sched)
    data = PretrainData(PretrainDataConfig(window=62, global_batch_size=8, seed=3))
    batch = next(iter(data.dataset()))
    state, m = step(state, sharding.host_batch_to_global(batch, mesh), token_capacity=32)
    assert not bool(m["overflow"])
    return float(m["loss"]), jax.device_get(nnx.to_pure_dict(state.params))


@pytest.fixture(scope="module")
def single_device_step():
    return one_step((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(4, 1, 2), (8, 1, 1)])
def test_real_model_step_is_mesh_independent(single_device_step, mesh_shape):
    loss1, params1 = single_device_step
    loss, params = one_step(mesh_shape)
    assert abs(loss - loss1) <= MESH_ATOL, (loss, loss1)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, params1))
    assert max(diffs) <= MESH_ATOL, max(diffs)


# ------------------------------------------------------------------ train.py as a user runs it

FAST = ["--config.model.hidden_size=32", "--config.model.num_attention_heads=2",
        "--config.model.intermediate_size=64", "--config.data.window=62", "--config.data.global_batch_size=8",
        "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.warmup_steps=2",
        # capacity = the padded length: the first step cannot overflow, so each process compiles
        # its train step once (~20 s on 2 cores); the retries have their own tests (test_capacity.py)
        "--config.model.token_capacity_fraction=1.0"]


def train_cmd(workdir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config=" + str(ROOT / "configs/tiny.py"),
            f"--workdir={workdir}", *FAST, *extra]


def env_for(devices=1, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
               **compile_cache_env())
    env.update(extra)
    return env


def step_losses(workdir):
    """loss per step, the last line for a step winning (a resumed run re-logs steps)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train":
            out[row["step"]] = row["loss"]
    return out


# The MAE run below is the resume test of both objectives' machinery (MLM's resume is exact in
# test_cli.py's SIGTERM test); it also exercises the barcode corpus and the probe on a checkpoint.
MAE_FAST = ["--config.model.hidden_size=32", "--config.model.num_attention_heads=2",
            "--config.model.intermediate_size=64", "--config.model.num_token_layers=2",
            "--config.model.mae_decoder_layers=1", "--config.data.window=120", "--config.data.global_batch_size=8",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.warmup_steps=2"]


def mae_cmd(workdir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config=" + str(ROOT / "configs/barcode_mae.py"),
            f"--workdir={workdir}", *MAE_FAST, *extra]


def test_mae_kill_and_resume_is_exact(tmp_path):
    steps = ["--config.train.steps=10", "--config.checkpoint.every_steps=4"]
    full = subprocess.run(mae_cmd(tmp_path / "full", *steps), env=env_for(), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = step_losses(tmp_path / "full")
    assert sorted(ref) == list(range(1, 11))

    work = tmp_path / "killed"
    proc = subprocess.Popen(mae_cmd(work, *steps), env=env_for(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = work / "checkpoints" / "4" / "mxdna_manifest.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "no committed checkpoint at step 4"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(step_losses(work))
    assert killed_at < 10, "the run finished before it could be killed"
    resumed = subprocess.run(mae_cmd(work, *steps), env=env_for(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = step_losses(work)
    for s in range(5, 11):
        assert got[s] == ref[s], (s, got[s], ref[s])  # bit-identical, data order and masks included
    events = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert [e["resumed"] for e in starts] == [False, True]
    assert starts[1]["step"] in (4, 8)  # the newest committed checkpoint when the kill landed
    rows = [e for e in events if e.get("kind") == "train"]
    assert all(0.45 < r["masked_token_fraction"] < 0.55 and r["overflow_retries"] == 0 for r in rows)
    assert (work / "barcode_split.tsv").exists()

    # eval.py probe on the resumed run's final checkpoint: the frozen encoder of an MAE run
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "probe", f"--init_from={work}",
                        f"--workdir={work / 'probe'}", "--max_per_split=40", "--batch_size=8"], env=env_for(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((work / "probe" / "probe.json").read_text())
    assert res["step"] == 10
    assert 0 <= res["knn_genus/accuracy"] <= 1 and 0 <= res["linear_species/accuracy"] <= 1
    assert res["unused_parameters"] > 0  # the MAE decoder and head: not part of the encoder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """2 processes x 1 device over gloo on localhost == 1 process x 2 devices, same global batch."""
    steps = ["--config.train.steps=3", "--config.checkpoint.every_steps=3"]
    one = subprocess.run(train_cmd(tmp_path / "one", *steps), env=env_for(devices=2), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    procs = [subprocess.Popen(train_cmd(tmp_path / "two", *steps),
                              env=env_for(devices=1, MXDNA_COORDINATOR=f"127.0.0.1:{port}", MXDNA_NUM_PROCESSES="2",
                                          MXDNA_PROCESS_ID=str(pid)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])


def test_tiny_config_learns_real_genome(tmp_path):
    """120 steps of configs/tiny.py on the embedded yeast genome beat its unigram entropy.

    Measured on this machine: val MLM loss 1.300 nats at step 100 and 1.290 at step 200 against a
    unigram entropy of 1.366 nats; the bound below keeps a margin for seed/platform noise.
    """
    import importlib.util

    from mxdna_jax import pretrain
    from mxdna_jax.data.fasta import Genome, unigram_entropy
    from mxdna_jax.data.pipeline import default_corpus_paths

    spec = importlib.util.spec_from_file_location("tiny_cfg", ROOT / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    with config.unlocked():
        config.train.steps = 120
        config.train.eval_every = 120
        config.train.log_every = 40
        config.checkpoint.every_steps = 120
    one_device = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])  # 8 fake devices only add overhead
    pretrain.run(config, str(tmp_path / "run"), mesh=one_device)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    entropy = unigram_entropy(Genome(default_corpus_paths()))
    assert 1.35 < entropy < 1.39
    assert val[-1]["step"] == 120
    assert val[-1]["val_mlm_loss"] < entropy - 0.04, (val[-1]["val_mlm_loss"], entropy)
    assert train[0]["mlm_loss"] > train[-1]["mlm_loss"] + 0.15  # steps 1-40 start near ln(9) = 2.2
    assert all(np.isfinite(r["loss"]) for r in train)
