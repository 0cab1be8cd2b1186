"""train.py as users and schedulers run it: the README's own commands from a copy of the
repository (relative paths), preemption by SIGTERM (one and two processes), a second run on a
live workdir, disk full, and bad input (exit 2, one line, nothing written)."""

import json
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import SHARED
from test_train import ROOT, env_for, free_port, step_losses, train_cmd

README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """Every line of the README's ```bash blocks (continuation lines joined)."""
    text = README.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        out += [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    return out


def as_argv(command: str) -> list[str]:
    """A README command line -> argv for this interpreter (`python`/`.venv/bin/python` -> sys.executable;
    `../shared/` -> the shared/ beside this checkout)."""
    argv = shlex.split(command)
    assert argv[0] in ("python", ".venv/bin/python"), command
    argv[0] = sys.executable
    return [a.replace("../shared/", f"{SHARED}/") for a in argv]


def copy_repo(dst: pathlib.Path) -> pathlib.Path:
    """The files a fresh clone has (tracked + new, not ignored) — no runs/, no caches."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def snapshot(path: pathlib.Path) -> dict:
    """Every file under path with its bytes (what 'nothing written or changed' is checked against)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the README's main command


def test_readme_main_command_then_eval(tmp_path):
    """The README's main command exactly as written (relative --workdir, run from the repository
    root) with the README's documented smoke override, then the README's eval command on its
    output. This is the path that once lost the whole run to a relative workdir."""
    commands = readme_commands()
    main = next(c for c in commands if "train.py" in c and "pip install" in c and "[test]" not in c)
    train = main.split("&&")[-1].strip()
    assert "--workdir=runs/" in train  # relative, as a new user types it
    smoke = re.search(r"`(--config\.train\.steps=\d+)`", README.read_text()).group(1)
    eval_cmd = next(c for c in commands if c.startswith("python eval.py mlm") and "--workdir=runs/tiny" in c)
    if "../shared/" in eval_cmd and not SHARED.exists():
        pytest.skip("the README's eval example reads ../shared")

    repo = copy_repo(tmp_path / "repo")
    steps = 3
    r = subprocess.run(as_argv(train) + [smoke.split("=")[0] + f"={steps}"], cwd=repo, env=env_for(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wd = repo / "runs" / "tiny"
    assert (wd / "checkpoints" / str(steps) / "mxdna_manifest.json").exists()
    assert max(step_losses(wd)) == steps  # the last step is always logged
    assert json.loads((wd / "config.json").read_text())["train"]["steps"] == steps
    events = map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
    (start,) = [e for e in events if e.get("event") == "start"]
    assert start["host_malloc"] == "tuned"  # a CPU run keeps XLA's temporaries mapped (mxdna_jax/host_malloc.py)

    e = subprocess.run(as_argv(eval_cmd), cwd=repo, env=env_for(), capture_output=True, text=True, timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads((wd / "eval_mlm.json").read_text())
    assert res["step"] == steps and 0 < res["mlm_loss"] < 3 and 0 < res["accuracy"] < 1
    assert f"{res['mlm_loss']:.4f}" in e.stdout

    # Resuming it with a different schedule is refused, naming the field; nothing is touched.
    before = snapshot(wd)
    r2 = subprocess.run(as_argv(train) + [smoke.split("=")[0] + f"={steps + 2}"], cwd=repo, env=env_for(),
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 2, r2.stderr[-3000:]
    assert error_lines(r2.stderr) == [error_lines(r2.stderr)[0]] and "Traceback" not in r2.stderr
    assert f"train.steps: {steps} -> {steps + 2}" in r2.stderr and "--allow_config_change" in r2.stderr
    assert snapshot(wd) == before


# ------------------------------------------------------------------ preemption and the workdir lock


def wait_for_step(workdir: pathlib.Path, step: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and step_losses(workdir) and max(step_losses(workdir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged (exit {proc.poll()})")


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_resume_is_bit_identical(tmp_path):
    steps = ["--config.train.steps=30", "--config.checkpoint.every_steps=100"]
    ref = subprocess.run(train_cmd(tmp_path / "ref", *steps), env=env_for(), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_losses = step_losses(tmp_path / "ref")

    wd = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(wd, *steps), env=env_for(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        # A second run on the live workdir (the first one holds the lock from before it compiles)
        # is refused before it writes anything.
        deadline = time.time() + 120
        while f'"pid": {proc.pid}' not in (wd / ".lock").read_text() if (wd / ".lock").exists() else True:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        second = subprocess.run(train_cmd(wd, *steps), env=env_for(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"in use by another run (pid {proc.pid}" in second.stderr
        assert len(error_lines(second.stderr)) == 1 and "Traceback" not in second.stderr
        assert f'"pid": {proc.pid}' in (wd / ".lock").read_text()  # the refused run left the lock alone
        wait_for_step(wd, 2, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("preempted:"))
    stopped = int(re.search(r"after step (\d+)", line).group(1))
    assert 2 <= stopped < 30 and str(wd / "checkpoints" / str(stopped)) in line and "resume" in line
    assert (wd / "checkpoints" / str(stopped) / "mxdna_manifest.json").exists()  # the save was awaited
    assert max(step_losses(wd)) == stopped

    resumed = subprocess.run(train_cmd(wd, *steps), env=env_for(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(wd) == ref_losses  # every step bit-identical to the uninterrupted run


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    steps = ["--config.train.steps=40", "--config.checkpoint.every_steps=100"]
    port = free_port()
    wd = tmp_path / "two"
    procs = [subprocess.Popen(train_cmd(wd, *steps),
                              env=env_for(devices=1, MXDNA_COORDINATOR=f"127.0.0.1:{port}", MXDNA_NUM_PROCESSES="2",
                                          MXDNA_PROCESS_ID=str(pid)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    try:
        wait_for_step(wd, 2, procs[0])
        procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [75, 75], [e[-2000:] for e in errs]
    stopped = {int(re.search(r"preempted: .*after step (\d+)", e).group(1)) for e in errs}
    assert len(stopped) == 1  # both processes agree on the step
    (step,) = stopped
    assert step < 40 and (wd / "checkpoints" / str(step) / "mxdna_manifest.json").exists()


# ------------------------------------------------------------------ disk full


def mount_tmpfs(path: pathlib.Path, size: str, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}",) + options), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")


@pytest.mark.slow
def test_disk_full_stops_at_the_failed_save_and_keeps_the_previous_checkpoint(tmp_path):
    from mxdna_jax import checkpoint

    wd = tmp_path / "small_disk"
    # One checkpoint of this model takes ~1.6 MB: the first save fits, the second cannot.
    mount_tmpfs(wd, "2400k")
    try:
        r = subprocess.run(train_cmd(wd, "--config.train.steps=30", "--config.checkpoint.every_steps=2",
                                     "--config.train.log_every=10"),
                           env=env_for(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 4, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        (err,) = error_lines(r.stderr)
        assert "could not be written" in err and "No space left on device" in err and "step 2" in err, err
        assert checkpoint.check_step_dir(wd / "checkpoints" / "2") == []  # the previous checkpoint is intact
        # The pre-save estimate is a lower bound of what a step really takes (no false refusals).
        need = float(re.search(r"needs at least ([\d.]+) MB", err).group(1)) * 1e6
        used = sum(p.stat().st_size for p in (wd / "checkpoints" / "2").rglob("*") if p.is_file())
        assert used >= need * 0.999, (used, need)
        assert len(r.stderr.splitlines()) < 60, r.stderr  # no wall of tracebacks
    finally:
        subprocess.run(["umount", "-l", str(wd)], check=False)


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written


def truncated_gz(tmp_path):
    src = sorted((ROOT / "mxdna_jax" / "data" / "default_corpus").glob("*.fna.gz"))[0].read_bytes()
    p = tmp_path / "cut.fa.gz"
    p.write_bytes(src[: len(src) // 2])
    return [f"--config.data.fasta={p}"], "gzip"


INVALID_FASTA = ">chr1\nACGTACGT\nACGTXCGT\n"
BAD = {
    "invalid_char": lambda t: ([f"--config.data.fasta={_fa(t, INVALID_FASTA)}"], "'X'"),
    "empty_fasta": lambda t: ([f"--config.data.fasta={_fa(t, '')}"], "empty"),
    "missing_fasta": lambda t: ([f"--config.data.fasta={t / 'nope.fa'}"], "not found"),
    "fasta_is_dir": lambda t: ([f"--config.data.fasta={t}"], "is a directory"),
    "truncated_gz": truncated_gz,
    "window_too_long": lambda t: (["--config.data.window=600"], "max_position_embeddings"),
    "window_0": lambda t: (["--config.data.window=0"], "data.window must be a positive integer"),
    "batch_0": lambda t: (["--config.data.global_batch_size=0"], "data.global_batch_size must be a positive"),
    "steps_0": lambda t: (["--config.train.steps=0"], "train.steps must be a positive integer"),
    "log_every_0": lambda t: (["--config.train.log_every=0"], "train.log_every must be a positive"),
    "every_steps_0": lambda t: (["--config.checkpoint.every_steps=0"], "checkpoint.every_steps must be a positive"),
    "batch_vs_devices": lambda t: (["--config.data.global_batch_size=6"], "not divisible by the 4 batch shards"),
    "batch_vs_accum": lambda t: (["--config.train.grad_accum_steps=3"], "not divisible by train.grad_accum_steps=3"),
    "mesh_too_big": lambda t: (["--config.mesh.data=1", "--config.mesh.model=3"], "does not fit 4 device"),
    "typo": lambda t: (["--config.train.stesp=5"], 'Did you mean "steps"'),
    "bad_value": lambda t: (["--config.train.steps=ten"], "--config.train.steps=ten"),
}


def _fa(tmp_path, text):
    p = tmp_path / "x.fa"
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", sorted(BAD) + ["workdir_is_file", "workdir_read_only"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "notes.txt").write_text("an earlier run's file")  # must survive untouched
    extra, expect = [], None
    if case == "workdir_is_file":
        wd = tmp_path / "w" / "notes.txt"
        expect = "is a file, not a directory"
    elif case == "workdir_read_only":
        wd = tmp_path / "ro"
        mount_tmpfs(wd, "1m", "ro")
        expect = "is not writable"
    else:
        extra, expect = BAD[case](tmp_path)
    before = snapshot(tmp_path / "w")
    try:
        r = subprocess.run(train_cmd(wd, "--config.train.steps=2", *extra), env=env_for(devices=4),
                           capture_output=True, text=True, timeout=300)
    finally:
        if case == "workdir_read_only":
            subprocess.run(["umount", "-l", str(wd)], check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and expect in lines[0], r.stderr[-3000:]
    assert snapshot(tmp_path / "w") == before
    assert not (tmp_path / "w" / "checkpoints").exists()
