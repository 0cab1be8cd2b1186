"""Checkpoints that cannot be trusted are never used, and checkpoints that cannot be written say so.

- A committed step without its manifest (killed between orbax's commit and the manifest thread)
  is still verified, by the content fingerprints saved in its metadata; with flipped bytes it is
  rejected and the previous step used, by resuming (CheckpointManager) and by eval/inference
  (params_io). A step with neither manifest nor fingerprints is "unverifiable".
- A save that fails for lack of disk space raises CheckpointSaveError (one line, errno, the
  previous intact step) from poll_errors/save/wait_until_finished/close, once; the previous step
  is kept and restores bit-exactly.
- A trained masked-LM checkpoint loads into every head; what it lacks is reported as fresh.
"""

import json
import logging
import pathlib
import re
import subprocess
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxdna_jax import checkpoint, heads, params_io, sharding
from mxdna_jax.config import ModelConfig
from mxdna_jax.model import MxDNAForMaskedLM

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

TINY = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
                   num_token_layers=1, max_position_embeddings=512)


# ------------------------------------------------------------------ helpers


def files_of(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def array_files(step_dir: pathlib.Path, item: str = "params") -> list[pathlib.Path]:
    """The item's OCDBT data files, largest first."""
    chunks = [p for p in (step_dir / item).rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(chunks, key=lambda p: (-p.stat().st_size, str(p)))


def flip_middle(path: pathlib.Path, n: int = 16) -> None:
    """Invert n bytes in the middle of a file (sizes unchanged: only content checks can tell)."""
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    for i in range(mid, min(mid + n, len(b))):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def flip_silently(step_dir: pathlib.Path, saved: dict[str, np.ndarray]) -> pathlib.Path:
    """Flip bytes in the middle of the largest params data file that orbax actually reads (a
    step's params/ holds more than one), such that the step still reads back without an error,
    with other numbers than `saved` (flat params): damage only a content check can see."""
    for f in array_files(step_dir):
        flip_middle(f)
        try:
            raw = params_io.flatten_params(params_io.read_array_tree(step_dir / "params"))
            if any(not np.array_equal(raw[k], saved[k]) for k in saved):
                return f
        except Exception:  # noqa: BLE001 - a flip orbax notices is not the case under test
            pass
        flip_middle(f)  # undo
    raise AssertionError(f"no flip in {step_dir} changed the values silently")


def drop_manifest(step_dir: pathlib.Path) -> None:
    (step_dir / checkpoint.MANIFEST).unlink()


def strip_fingerprints(step_dir: pathlib.Path) -> None:
    """What an older version wrote: a meta item without fingerprints."""
    f = step_dir / "meta" / checkpoint.META_FILE
    meta = json.loads(f.read_text())
    del meta[checkpoint.FINGERPRINT_KEY]
    f.write_text(json.dumps(meta))


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def log_text(caplog) -> str:
    return " | ".join(rec.getMessage() for rec in caplog.records)


# ------------------------------------------------------------------ a real train.py-shaped workdir


def cfg_json():
    return {"model": params_io._cfg_dict(TINY), "data": {"window": 30, "global_batch_size": 2}}


def make_workdir(path: pathlib.Path, steps=(1, 2)) -> dict[int, dict]:
    """What train.py leaves: config.json and checkpoints/<step> with params/opt_state/meta/data, as
    train_lib.run_training saves them (the params are an nnx.State of the masked-LM model; each
    step's values differ). Returns {step: flat numpy params}."""
    model = MxDNAForMaskedLM(TINY, rngs=nnx.Rngs(params=0))
    params = nnx.state(model, nnx.Param)
    mgr = checkpoint.CheckpointManager(path / "checkpoints", keep=3)
    saved = {}
    for s in steps:
        p = jax.tree.map(lambda x, s=s: x + 0.01 * s, params)
        mgr.save(s, {"params": p, "opt_state": {"count": jnp.asarray(s, jnp.int32)}},
                 meta={"rng": [0, 0], "config": cfg_json(), "token_capacity": None}, data_state={"pos": s})
        mgr.wait_until_finished()
        saved[s] = params_io.flatten_params(jax.device_get(nnx.to_pure_dict(p)))
    mgr.close()
    (path / "config.json").write_text(json.dumps(cfg_json(), indent=1))
    return saved


@pytest.fixture(scope="module")
def workdir_template(tmp_path_factory):
    wd = tmp_path_factory.mktemp("workdir_template")
    return wd, make_workdir(wd)


@pytest.fixture
def workdir(workdir_template, tmp_path):
    import shutil

    src, saved = workdir_template
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, saved


def params_of(model) -> dict[str, np.ndarray]:
    return params_io.flatten_params(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


# ------------------------------------------------------------------ resuming (CheckpointManager)


def mesh8():
    return sharding.make_mesh(8, 1, 1, devices=jax.devices()[:8])


def restore_target(mesh):
    """What train_lib restores: the params (sharded by their logical axes) and the optimizer state."""
    params = nnx.state(nnx.eval_shape(lambda: MxDNAForMaskedLM(TINY, rngs=nnx.Rngs(params=0))), nnx.Param)
    shardings = sharding.param_shardings(params, mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings),
            "opt_state": {"count": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}}


def restored_params(r) -> dict[str, np.ndarray]:
    return params_io.flatten_params(jax.device_get(nnx.to_pure_dict(r.arrays["params"])))


def assert_flat_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bytes_without_manifest_fall_back(workdir, caplog):
    wd, saved = workdir
    ck = wd / "checkpoints"
    drop_manifest(ck / "2")
    flip_silently(ck / "2", saved[2])  # reads back without an error, with other numbers
    before = files_of(wd)

    mgr = checkpoint.CheckpointManager(ck, keep=3)
    with caplog.at_level(logging.ERROR, logger="mxdna_jax.checkpoint"):
        r = mgr.restore_latest(restore_target(mesh8()))
    assert r.step == 1 and r.data_state == {"pos": 1} and int(r.arrays["opt_state"]["count"]) == 1
    assert checkpoint.FINGERPRINT_KEY not in r.meta
    assert_flat_equal(restored_params(r), saved[1])
    msg = log_text(caplog)
    assert "checkpoint step 2" in msg and "fingerprint" in msg and "falling back to step 1" in msg, msg
    assert files_of(wd) == before  # nothing deleted or rewritten
    mgr.close()


def test_intact_step_without_manifest_is_verified_and_gets_one(workdir, caplog):
    wd, saved = workdir
    ck = wd / "checkpoints"
    drop_manifest(ck / "2")
    mgr = checkpoint.CheckpointManager(ck, keep=3)
    with caplog.at_level(logging.INFO, logger="mxdna_jax.checkpoint"):
        r = mgr.restore_latest(restore_target(sharding.make_mesh(2, 1, 4, devices=jax.devices()[:8])))
    assert r.step == 2
    assert_flat_equal(restored_params(r), saved[2])
    assert "verified by its fingerprints" in log_text(caplog)
    assert checkpoint.check_step_dir(ck / "2") == [] and (ck / "2" / checkpoint.MANIFEST).exists()
    mgr.close()


def test_step_with_neither_manifest_nor_fingerprints_is_unverifiable(workdir, caplog):
    wd, saved = workdir
    ck = wd / "checkpoints"
    drop_manifest(ck / "2")
    strip_fingerprints(ck / "2")
    mgr = checkpoint.CheckpointManager(ck, keep=3)
    with caplog.at_level(logging.ERROR, logger="mxdna_jax.checkpoint"):
        r = mgr.restore_latest(restore_target(mesh8()))
    assert r.step == 1
    assert_flat_equal(restored_params(r), saved[1])
    msg = log_text(caplog)
    assert "checkpoint step 2" in msg and "unverifiable" in msg and "falling back to step 1" in msg, msg
    mgr.close()
    # An explicit opt-in loads it, with a warning.
    mgr = checkpoint.CheckpointManager(ck, keep=3, allow_unverified=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mxdna_jax.checkpoint"):
        r = mgr.restore(2, restore_target(mesh8()))
    assert r.step == 2 and "allow_unverified" in log_text(caplog)
    assert_flat_equal(restored_params(r), saved[2])
    mgr.close()


def test_fingerprint_is_sharding_and_host_independent():
    model = MxDNAForMaskedLM(TINY, rngs=nnx.Rngs(params=0))
    host = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    mesh = sharding.make_mesh(2, 1, 4, devices=jax.devices()[:8])

    def sharded(x):  # the first dimension split 8 (or 4, or 2) ways when it divides
        n = next((n for n in (8, 4, 2) if x.ndim and x.shape[0] % n == 0), None)
        spec = jax.sharding.PartitionSpec() if n is None else jax.sharding.PartitionSpec(
            {8: ("data", "model"), 4: "model", 2: "data"}[n])
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    on_mesh = jax.tree.map(sharded, host)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(on_mesh))
    fp = checkpoint.fingerprint(host)
    assert fp == checkpoint.fingerprint(on_mesh) == checkpoint.fingerprint(jax.tree.map(jnp.asarray, host))
    assert len(fp) == len(jax.tree.leaves(host))
    # any single-byte change of any element changes the fingerprint
    w = np.asarray(host["model"]["embed"])
    for flat_byte in (0, 1, 2, 3, w.nbytes // 2, w.nbytes - 1):
        v = w.copy()
        v.reshape(-1).view(np.uint8)[flat_byte] ^= 0x01
        assert checkpoint.fingerprint({"x": v}) != checkpoint.fingerprint({"x": w}), flat_byte


# ------------------------------------------------------------------ disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (root only), unmounted afterwards."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


SMALL = {"params": {"a": jnp.arange(1000, dtype=jnp.float32)}}
BIG = {"params": {"a": jnp.asarray(np.random.default_rng(0).standard_normal(300_000), jnp.float32)}}  # 1.2 MB


def expect_save_error(e: checkpoint.CheckpointSaveError, directory, detail: str = ""):
    msg = str(e)
    assert msg == (f"checkpoint step 2 could not be written to {directory / '2'}: [Errno 28] No space left on "
                   f"device{detail}; the previous checkpoint (step 1) is intact"), msg
    assert e.step == 2 and e.previous == 1 and "\n" not in msg


def assert_step_1_intact(ck: pathlib.Path):
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["1"]
    assert checkpoint.check_step_dir(ck / "1") == []
    again = checkpoint.CheckpointManager(ck, keep=1)
    assert again.all_steps() == [1]  # a partial step 2 is not a step
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), SMALL)
    r = again.restore_latest(target)
    assert r.step == 1 and r.meta["n"] == 1
    assert_trees_equal(r.arrays, SMALL)
    again.close()


def poll_until_error(mgr, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        mgr.poll_errors()
        time.sleep(0.02)
    raise AssertionError("poll_errors never reported the failed save")


@pytest.mark.parametrize("reported_by", ["poll_errors", "wait_until_finished", "save", "close"])
def test_disk_full_during_an_async_save_is_reported_once(small_disk, reported_by, monkeypatch):
    ck = small_disk / "ck"
    mgr = checkpoint.CheckpointManager(ck, keep=1, async_save=True)  # keep=1: retention must not eat step 1
    mgr.save(1, SMALL, meta={"n": 1})
    mgr.wait_until_finished()
    # The free-space check before a save passes (another writer fills the disk meanwhile, or a
    # filesystem whose free space means little): the write itself fails, in orbax's threads.
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1 << 40))
    mgr.save(2, BIG, meta={"n": 2})  # returns at once
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        if reported_by == "poll_errors":
            poll_until_error(mgr)
        elif reported_by == "wait_until_finished":
            mgr.wait_until_finished()
        elif reported_by == "save":
            mgr.save(3, SMALL, meta={"n": 3})
        else:
            mgr.close()
    expect_save_error(e.value, ck)
    # Reported once: the cleanup calls of a `finally` stay quiet.
    mgr.poll_errors()
    mgr.wait_until_finished()
    mgr.close()
    mgr.close()
    assert_step_1_intact(ck)


def test_a_save_that_cannot_fit_is_refused_before_it_starts(small_disk):
    ck = small_disk / "ck"
    mgr = checkpoint.CheckpointManager(ck, keep=1, async_save=True)
    mgr.save(1, SMALL, meta={"n": 1})
    mgr.wait_until_finished()
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        mgr.save(2, BIG, meta={"n": 2})
    free = re.search(r"needs at least 1\.2 MB, (0\.\d) MB free", str(e.value))
    assert free, str(e.value)
    expect_save_error(e.value, ck, detail=f" (needs at least 1.2 MB, {free.group(1)} MB free)")
    assert not [p for p in ck.iterdir() if p.name.startswith("2")]  # nothing of step 2 was written
    mgr.poll_errors()
    mgr.close()
    assert_step_1_intact(ck)


def test_poll_errors_does_not_block_a_save_in_progress(tmp_path):
    mgr = checkpoint.CheckpointManager(tmp_path, keep=2, async_save=True)
    mgr.save(1, BIG, meta={})
    t0 = time.perf_counter()
    for _ in range(20):
        mgr.poll_errors()
    assert time.perf_counter() - t0 < 1.0
    mgr.close()
    assert checkpoint.check_step_dir(tmp_path / "1") == []


# ------------------------------------------------------------------ loading a trained model


def test_load_from_workdir_skips_a_flipped_manifestless_step(workdir, caplog):
    wd, saved = workdir
    drop_manifest(wd / "checkpoints" / "2")
    flip_silently(wd / "checkpoints" / "2", saved[2])
    before = files_of(wd)
    with caplog.at_level(logging.WARNING, logger="mxdna_jax.params_io"):
        model, step = params_io.load_from_workdir(wd)
    assert step == 1
    got = params_of(model)
    assert got.keys() == saved[1].keys()
    for k in got:
        np.testing.assert_array_equal(got[k], saved[1][k], err_msg=k)
    msg = log_text(caplog)
    assert "checkpoint step 2" in msg and "fingerprint" in msg and "trying an older one" in msg, msg
    assert files_of(wd) == before

    # Asked for by name, the damaged step is refused with the step and the damage named.
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"checkpoint step 2 .*fingerprint"):
        params_io.load_from_workdir(wd, step_dir=wd / "checkpoints" / "2")
    # With every step damaged: one clear error, never NaN params.
    drop_manifest(wd / "checkpoints" / "1")
    flip_silently(wd / "checkpoints" / "1", saved[1])
    with pytest.raises(ValueError, match=r"no usable checkpoint under .*steps \[2, 1\]"):
        params_io.load_from_workdir(wd)


def test_load_from_workdir_unverifiable_step(workdir, caplog):
    wd, saved = workdir
    drop_manifest(wd / "checkpoints" / "2")
    strip_fingerprints(wd / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="mxdna_jax.params_io"):
        _, step = params_io.load_from_workdir(wd)
    assert step == 1 and "unverifiable" in log_text(caplog)
    loaded = params_io.load_from_workdir(wd, allow_unverified=True)
    assert loaded.step == 2
    np.testing.assert_array_equal(params_of(loaded.model)["model/embed"], saved[2]["model/embed"])


@pytest.mark.parametrize("head", heads.HEAD_NAMES)
def test_every_head_loads_a_trained_mlm_checkpoint(workdir, head, caplog):
    wd, saved = workdir
    with caplog.at_level(logging.WARNING, logger="mxdna_jax.params_io"):
        loaded = params_io.load_from_workdir(wd, head=head)
    model, step = loaded
    assert step == 2 and type(model) is heads.head_class(head) and heads.head_name(model) == head
    got = params_of(model)
    backbone = [k for k in saved[2] if k.startswith("model/")]
    assert backbone and all(k in got for k in backbone)
    for k in backbone:
        np.testing.assert_array_equal(got[k], saved[2][k], err_msg=k)
    rep = loaded.report
    assert set(rep.loaded) == set(got) - set(rep.fresh) and set(backbone) <= set(rep.loaded)
    if head == "mlm":
        assert rep.fresh == [] and rep.unused == []
    elif head == "cls":
        assert rep.fresh == sorted(k for k in got if k.split("/")[0] in ("cls_norm", "dense", "out_proj"))
        assert rep.fresh and "out_proj/kernel" in rep.fresh
        assert "fresh" in log_text(caplog) and "out_proj/kernel" in log_text(caplog)
    elif head == "mae":  # the MAE decoder is new; the MLM decoder and head are not used
        assert rep.fresh == sorted(k for k in got if not k.startswith("model/")) and rep.fresh
        assert set(rep.unused) == {k for k in saved[2] if not k.startswith("model/")}
    else:
        assert rep.fresh == [] and set(rep.unused) == {k for k in saved[2] if not k.startswith("model/")}


def test_load_matching_shape_mismatch_names_the_parameter():
    model = MxDNAForMaskedLM(TINY, rngs=nnx.Rngs(params=0))
    before = params_of(model)
    src = dict(before)
    src["model/embed"] = np.zeros((5, 32), np.float32)
    src["norm/scale"] = before["norm/scale"] + 1
    with pytest.raises(ValueError, match=r"model/embed: the source has shape \(5, 32\), the model \(9, 32\)"):
        params_io.load_matching(model, src)
    after = params_of(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)  # untouched on error
    rep = params_io.load_matching(model, {"norm": {"scale": before["norm/scale"] + 1}, "extra": np.zeros(2)})
    assert rep.loaded == ["norm/scale"] and rep.unused == ["extra"] and "model/embed" in rep.fresh
    np.testing.assert_array_equal(params_of(model)["norm/scale"], before["norm/scale"] + 1)
