"""Checkpoint round trips, resharding on restore, corruption fallback, and resumable training."""

import json
import logging
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import _toy_model as toy
from mxdna_jax import checkpoint, optim, sharding, train_lib

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

TRAIN_CFG = dict(lr=1e-2, warmup_steps=2, steps=10, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.98,
                 grad_clip=1.0)


def mesh_of(data, fsdp=1, model=1):
    return sharding.make_mesh(data, fsdp, model, devices=jax.devices()[:data * fsdp * model])


def trained_state(mesh, steps=2):
    tx, sched = optim.make_optimizer(TRAIN_CFG)
    graphdef, state, sh = train_lib.init_train_state(toy.make_model, tx, mesh, seed=0)
    step = train_lib.make_train_step(toy.toy_loss_fn, tx, graphdef, sh, mesh, schedule=sched)
    for i in range(steps):
        state, _ = step(state, sharding.host_batch_to_global(toy.make_batch(i), mesh), token_capacity=None)
    return tx, graphdef, state, sh, step


def arrays(state):
    return {"params": state.params, "opt_state": state.opt_state}


def abstract_on(tx, mesh):
    _, abstract = train_lib.abstract_train_state(toy.make_model, tx)
    sh = train_lib.state_shardings(abstract, tx, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), arrays(abstract), arrays(sh))


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def trained():
    return trained_state(mesh_of(8))


def save(mgr, step, state, data_state=None):
    mgr.save(step, arrays(state), meta={"rng": np.asarray(state.rng).tolist(), "note": "x"}, data_state=data_state)
    mgr.wait_until_finished()


@pytest.mark.parametrize("data_state", [{"pos": 17, "nested": {"a": [1, 2]}}, b"\x00grain-bytes\xff"])
def test_round_trip_is_exact(tmp_path, trained, data_state):
    tx, _, state, _, _ = trained
    mgr = checkpoint.CheckpointManager(tmp_path, keep=2, async_save=True)
    save(mgr, 2, state, data_state)
    r = mgr.restore_latest(abstract_on(tx, mesh_of(8)))
    assert r.step == 2 and r.meta["step"] == 2 and r.meta["note"] == "x"
    assert r.meta["rng"] == np.asarray(state.rng).tolist()
    assert r.data_state == data_state
    assert_trees_equal(r.arrays, arrays(state))
    assert jax.tree.structure(r.arrays) == jax.tree.structure(arrays(state))
    mgr.close()


def test_manifest_is_written_once_committed(tmp_path, trained):
    """No need to wait for the next save: a crash right after a commit still leaves a verifiable step."""
    import time

    _, _, state, _, _ = trained
    mgr = checkpoint.CheckpointManager(tmp_path, keep=2, async_save=True)
    mgr.save(3, arrays(state), meta={})
    deadline = time.time() + 60
    while not (tmp_path / "3" / checkpoint.MANIFEST).exists() and time.time() < deadline:
        time.sleep(0.05)
    manifest = json.loads((tmp_path / "3" / checkpoint.MANIFEST).read_text())["files"]
    assert "commit_success.txt" in manifest and any(k.startswith("params/") for k in manifest)
    assert checkpoint.check_step_dir(tmp_path / "3") == []
    mgr.close()


def test_restore_onto_a_different_mesh(tmp_path, trained):
    """Saved on (data=8), restored onto (data=4, model=2): same values, new shardings, and the
    restored state trains on the new mesh."""
    tx, graphdef, state, _, _ = trained
    mgr = checkpoint.CheckpointManager(tmp_path, keep=2)
    save(mgr, 2, state)
    mesh2 = mesh_of(4, 1, 2)
    r = mgr.restore_latest(abstract_on(tx, mesh2))
    assert_trees_equal(r.arrays, arrays(state))
    w = r.arrays["params"]["w_in"][...]
    assert w.sharding.mesh.shape == mesh2.shape and w.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    mu = r.arrays["opt_state"][1][0].mu["w_out"][...]
    assert mu.sharding.spec == jax.sharding.PartitionSpec("model")
    mgr.close()


def _damage(step_dir: pathlib.Path, how: str, every_file: bool = False):
    """Damage the largest params data file (or every one: without the manifest, whether orbax
    notices depends on which of its OCDBT files a restore actually reads)."""
    arrays_ = sorted((p for p in (step_dir / "params").rglob("*") if p.is_file() and "/d/" in str(p)),
                     key=lambda p: (p.stat().st_size, str(p)))
    biggest = arrays_[-1]
    if how == "truncate":
        for p in arrays_ if every_file else [biggest]:
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 2)
    elif how == "delete":
        for p in arrays_ if every_file else [biggest]:
            p.unlink()
    elif how == "flip":
        b = bytearray(biggest.read_bytes())
        b[len(b) // 2] ^= 0xFF
        biggest.write_bytes(bytes(b))
    elif how == "no_commit":
        (step_dir / checkpoint.COMMIT_MARKER).unlink()
    elif how == "no_meta":
        for p in (step_dir / "meta").iterdir():
            p.unlink()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop after a failed read
@pytest.mark.parametrize("how,checksums", [
    ("truncate", True), ("truncate", False), ("delete", True), ("delete", False), ("flip", True),
    ("no_commit", True), ("no_meta", False)])
def test_corrupt_latest_falls_back_to_previous(tmp_path, trained, caplog, how, checksums):
    tx, _, state, _, step_fn = trained
    state = jax.tree.map(lambda x: x.copy(), state)  # step_fn donates its input
    mesh = mesh_of(8)
    mgr = checkpoint.CheckpointManager(tmp_path, keep=3, checksums=checksums)
    save(mgr, 1, state, {"pos": 1})
    good = jax.device_get(arrays(state))
    state2, _ = step_fn(state, sharding.host_batch_to_global(toy.make_batch(5), mesh), token_capacity=None)
    save(mgr, 2, state2, {"pos": 2})
    mgr.close()
    _damage(tmp_path / "2", how, every_file=not checksums)
    files_before = sorted(str(p) for p in tmp_path.rglob("*"))

    mgr = checkpoint.CheckpointManager(tmp_path, keep=3, checksums=checksums)
    with caplog.at_level(logging.ERROR, logger="mxdna_jax.checkpoint"):
        r = mgr.restore_latest(abstract_on(tx, mesh))
    assert r.step == 1 and r.data_state == {"pos": 1}
    assert_trees_equal(r.arrays, good)
    msg = " ".join(rec.getMessage() for rec in caplog.records)
    assert "checkpoint step 2" in msg and "falling back to step 1" in msg, msg
    expected = {"truncate": "truncated" if checksums else "Error", "delete": "missing" if checksums else "Error",
                "flip": "sha256 mismatch", "no_commit": "commit marker", "no_meta": "metadata"}[how]
    assert expected in msg, msg
    assert sorted(str(p) for p in tmp_path.rglob("*")) == files_before  # nothing deleted

    # The next save of step 2 moves the bad one aside (not deleted) and the new one is used.
    state_restored = r.arrays
    mgr.save(2, state_restored, meta={"rng": [0, 0]}, data_state={"pos": 2})
    mgr.wait_until_finished()
    assert len(list(tmp_path.glob("2.unusable-*"))) == 1
    assert mgr.restore_latest(abstract_on(tx, mesh)).step == 2
    mgr.close()


def test_all_checkpoints_corrupt_raises(tmp_path, trained):
    tx, _, state, _, _ = trained
    mgr = checkpoint.CheckpointManager(tmp_path, keep=3)
    save(mgr, 1, state)
    mgr.close()
    _damage(tmp_path / "1", "delete", every_file=True)
    mgr = checkpoint.CheckpointManager(tmp_path, keep=3)
    with pytest.raises(RuntimeError, match="none of the checkpoints"):
        mgr.restore_latest(abstract_on(tx, mesh_of(8)))


def test_async_save_survives_donation(tmp_path, trained):
    """save() copies the arrays off the device before returning: donating them right after is safe."""
    tx, _, state, _, step_fn = trained
    mesh = mesh_of(8)
    # A private copy: step_fn donates its input.
    state = jax.tree.map(lambda x: x.copy(), state)
    expected = jax.device_get(arrays(state))
    mgr = checkpoint.CheckpointManager(tmp_path, keep=2, async_save=True)
    mgr.save(7, arrays(state), meta={})
    for i in range(3):
        state, _ = step_fn(state, sharding.host_batch_to_global(toy.make_batch(i), mesh), token_capacity=None)
    mgr.wait_until_finished()
    assert_trees_equal(mgr.restore_latest(abstract_on(tx, mesh)).arrays, expected)
    mgr.close()


# ------------------------------------------------------------------ the training loop


loop_config, run, read_jsonl = toy.loop_config, toy.run_toy_training, toy.read_jsonl


def test_run_training_resume_is_exact_and_nan_stops(tmp_path):
    cfg = loop_config()
    # Uninterrupted reference run.
    _, ref = run(tmp_path / "a", cfg)
    ref_rows = {r["step"]: r for r in read_jsonl(tmp_path / "a") if r["kind"] == "train"}
    assert sorted(ref_rows) == [1, 2, 3, 4, 5, 6]  # every step's loss, the compile step included
    events = [r for r in read_jsonl(tmp_path / "a") if r["kind"] == "event"]
    assert any(e["event"] == "capacity_grown" and (e["old"], e["new"]) == (4, 6) for e in events)
    assert [r["step"] for r in read_jsonl(tmp_path / "a") if r["kind"] == "eval"] == [3, 6]
    assert int(ref.step) == 6
    assert list((tmp_path / "a" / "tb").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]

    # Crash while reading batch 4 (during step 4): step 3 is checkpointed; resume from it.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", cfg, fail_at=4)
    _, resumed = run(tmp_path / "b", cfg)
    assert int(resumed.step) == 6
    assert_trees_equal(nnx.to_pure_dict(resumed.params), nnx.to_pure_dict(ref.params))
    assert_trees_equal(resumed.opt_state, ref.opt_state)
    rows = read_jsonl(tmp_path / "b")
    assert any(r["kind"] == "event" and r["event"] == "start" and r["resumed"] for r in rows)
    for r in rows:
        if r["kind"] == "train" and r["step"] in (4, 5, 6):
            assert r["loss"] == ref_rows[r["step"]]["loss"], r
        if r["kind"] == "event" and r["event"] == "start" and r["resumed"]:
            assert r["token_capacity"] == 6  # the grown capacity came back from the checkpoint

    # NaN at step 5: clear error, the last checkpoint stays at step 3.
    with pytest.raises(train_lib.NonFiniteLossError, match="step 5"):
        run(tmp_path / "c", cfg, poison_at=4)
    assert sorted(int(p.name) for p in (tmp_path / "c" / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    assert read_jsonl(tmp_path / "c")[-1]["event"] == "non_finite_loss"

    # A different model config in the same workdir is refused, not treated as corruption.
    other = loop_config()
    other.model = {"hidden_size": 32}
    with pytest.raises(ValueError, match="different model config"):
        run(tmp_path / "b", other)
