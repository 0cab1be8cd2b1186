"""The training loop's safety rails, in-process on the toy model (fast): preemption by signal,
a NaN right after a restore, config changes on resume, the workdir lock, config validation."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import _toy_model as toy
from mxdna_jax import cli, preemption, train_lib, validate, workdir as workdir_lib

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def train_losses(workdir):
    out = {}
    for r in toy.read_jsonl(workdir):
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


def ckpt_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


class SignalAt(toy.ToyIterator):
    """Sends a real signal to this process while the loop fetches batch `at` (during step `at`)."""

    def __init__(self, *a, signal_at: int, signum=signal.SIGTERM, **kw):
        super().__init__(*a, **kw)
        self.signal_at, self.signum = signal_at, signum

    def __next__(self):
        if self.pos == self.signal_at:
            os.kill(os.getpid(), self.signum)
        return super().__next__()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref")
    _, state = toy.run_toy_training(wd, toy.loop_config())
    return train_losses(wd), jax.device_get(nnx.to_pure_dict(state.params))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_the_current_step_and_resume_is_exact(tmp_path, reference, monkeypatch, signum):
    ref_losses, ref_params = reference
    monkeypatch.setattr(toy, "ToyIterator", lambda *a, **kw: SignalAt(*a, signal_at=3, signum=signum, **kw))
    with preemption.StopSignal() as stop, pytest.raises(preemption.Preempted) as exc:
        toy.run_toy_training(tmp_path, toy.loop_config(), stop_signal=stop)
    monkeypatch.undo()
    # Batch 3 is prefetched during step 3, so step 3 is the step that was running: it is finished
    # and checkpointed (step 3 is also a scheduled save; the signal must not save it twice).
    assert exc.value.step == 3 and exc.value.signal_name == signal.Signals(signum).name
    assert ckpt_steps(tmp_path) == [3]
    assert str(tmp_path / "checkpoints" / "3") in str(exc.value) and "resume" in str(exc.value)
    events = [r for r in toy.read_jsonl(tmp_path) if r["kind"] == "event"]
    assert events[-1]["event"] == "preempted" and events[-1]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    _, state = toy.run_toy_training(tmp_path, toy.loop_config())
    got = train_losses(tmp_path)
    assert {s: got[s] for s in range(1, 7)} == ref_losses  # bit-identical, steps after the stop included
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(state.params)), ref_params)


def test_unscheduled_stop_saves_that_step(tmp_path, reference):
    stop = preemption.StopSignal()
    stop.request("test")
    with pytest.raises(preemption.Preempted) as exc:
        toy.run_toy_training(tmp_path, toy.loop_config(), stop_signal=stop)
    assert exc.value.step == 1 and ckpt_steps(tmp_path) == [1]
    toy.run_toy_training(tmp_path, toy.loop_config())
    got = train_losses(tmp_path)
    assert {s: got[s] for s in range(1, 7)} == reference[0]


def test_second_sigint_aborts_at_once():
    with preemption.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT" and stop.should_stop(0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_on_first_step_after_restore_names_the_checkpoint(tmp_path):
    cfg = toy.loop_config()
    with pytest.raises(RuntimeError, match="simulated crash"):
        toy.run_toy_training(tmp_path, cfg, fail_at=4)  # step 3 is checkpointed
    with pytest.raises(train_lib.NonFiniteLossError) as exc:
        toy.run_toy_training(tmp_path, cfg, poison_at=3)  # NaN in step 4, the first after the restore
    msg = str(exc.value)
    assert "step 4" in msg and "first step after restoring checkpoint" in msg
    assert str(tmp_path / "checkpoints" / "3") in msg and "suspect" in msg
    assert ckpt_steps(tmp_path) == [3]
    # A NaN later in a run is the loss's fault, not the checkpoint's.
    with pytest.raises(train_lib.NonFiniteLossError) as exc:
        toy.run_toy_training(tmp_path, cfg, poison_at=4)
    assert "step 5" in str(exc.value) and "suspect" not in str(exc.value)


def test_config_change_on_resume_is_refused_or_recorded(tmp_path):
    toy.run_toy_training(tmp_path, toy.loop_config(steps=3))
    config_json = (tmp_path / "config.json").read_text()
    metrics = (tmp_path / "metrics.jsonl").read_text()

    with pytest.raises(cli.UserError) as exc:
        toy.run_toy_training(tmp_path, toy.loop_config(steps=6, lr=2e-2))
    msg = str(exc.value)
    assert "train.lr: 0.01 -> 0.02" in msg and "train.steps: 3 -> 6" in msg and "--allow_config_change" in msg
    assert "\n" not in msg
    assert (tmp_path / "config.json").read_text() == config_json  # nothing written
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert ckpt_steps(tmp_path) == [3]

    # Cadence fields are safe to change without the flag.
    toy.run_toy_training(tmp_path, toy.loop_config(steps=3, log_every=2, eval_every=0))

    _, state = toy.run_toy_training(tmp_path, toy.loop_config(steps=6, lr=2e-2), allow_config_change=True)
    assert int(state.step) == 6
    ev = [r for r in toy.read_jsonl(tmp_path) if r.get("event") == "config_changed"]
    assert len(ev) == 1 and ev[0]["step"] == 3
    assert {c["field"] for c in ev[0]["changes"]} == {"train.lr", "train.steps"}
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 2e-2

    other = toy.loop_config()
    other.model = {"hidden_size": 32}
    with pytest.raises(cli.UserError, match="different model config .*model.hidden_size: 16 -> 32"):
        toy.run_toy_training(tmp_path, other, allow_config_change=True)  # never allowed


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
os.write(fd, b'{"pid": %d, "host": "h", "started": "then"}' % os.getpid())
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    lock_file = tmp_path / workdir_lib.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cli.UserError, match=f"in use by another run \\(pid {holder.pid} on h"):
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="mxdna_jax.workdir"):
        with workdir_lib.WorkdirLock(str(tmp_path)) as lock:
            assert lock.took_over["pid"] == holder.pid
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            with pytest.raises(cli.UserError, match=f"pid {os.getpid()}"):  # flock is per open file
                workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    assert f"taking over the stale lock of pid {holder.pid}" in caplog.text
    assert lock_file.read_text() == ""  # a clean release leaves nothing to take over
    with workdir_lib.WorkdirLock(str(tmp_path)) as lock:
        assert lock.took_over is None


def test_check_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(cli.UserError, match="is a file, not a directory"):
        workdir_lib.check_writable(str(tmp_path / "f"))
    with pytest.raises(cli.UserError, match="is a file, not a directory"):
        workdir_lib.check_writable(str(tmp_path / "f" / "sub"))
    workdir_lib.check_writable(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()  # checking writes nothing


@pytest.mark.parametrize("section,field,value,expect", [
    ("data", "window", 0, "data.window must be a positive integer, got 0"),
    ("data", "global_batch_size", -8, "data.global_batch_size must be a positive integer"),
    ("train", "steps", 0, "train.steps must be a positive integer, got 0"),
    ("train", "log_every", 0, "train.log_every must be a positive integer"),
    ("checkpoint", "every_steps", 0, "checkpoint.every_steps must be a positive integer"),
    ("train", "grad_accum_steps", 3, "not divisible by train.grad_accum_steps=3"),
    ("train", "capacity_growth", 1.0, "train.capacity_growth must be > 1"),
    ("train", "eval_batches", 0, "train.eval_batches must be a positive integer"),
])
def test_check_training_config(section, field, value, expect):
    c = toy.loop_config()
    validate.check_training_config(c)
    c[section][field] = value
    with pytest.raises(cli.UserError, match=expect.replace("(", "\\(").replace(".", "\\.")):
        validate.check_training_config(c)


def test_check_mesh():
    c = toy.loop_config()
    assert validate.check_mesh(c, jax.devices()).shape["data"] == 8
    c.mesh = {"data": 2, "fsdp": 1, "model": 3}
    with pytest.raises(cli.UserError, match=r"mesh \(data=2, fsdp=1, model=3\) does not fit 8 device"):
        validate.check_mesh(c, jax.devices())
    c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.data["global_batch_size"] = 12
    with pytest.raises(cli.UserError, match="global_batch_size=12 is not divisible by the 8 batch shards"):
        validate.check_mesh(c, jax.devices())


def test_resume_config_from_before_a_new_model_field():
    """A checkpoint whose saved model section lacks a field added later resumes (the default is
    what it was trained with); a real difference is still refused."""
    cur = {"model": {"hidden_size": 16, "tokenizer": "learnt"}, "train": {"lr": 0.1}}
    assert validate.check_resume_config({"model": {"hidden_size": 16}, "train": {"lr": 0.1}}, cur, workdir="w",
                                        allow_change=False) == []
    with pytest.raises(cli.UserError, match="model.tokenizer: 'learnt' -> 'single'"):
        validate.check_resume_config({"model": {"hidden_size": 16}, "train": {"lr": 0.1}},
                                     {**cur, "model": {"hidden_size": 16, "tokenizer": "single"}}, workdir="w",
                                     allow_change=True)
