"""Bad input to the user-facing commands gives one `error:` line and exit 2, never a traceback or a
silently wrong answer; relative paths mean what they say."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mxdna_jax import convert_cli, parity
from test_train import env_for

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env_for(), capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(r, expect: str, code: int = 2):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def files_of(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_fasta(path: pathlib.Path, n: int = 4000):
    seq = "".join(np.random.default_rng(0).choice(list("ACGT"), n))
    path.write_text(">chr1\n" + "\n".join(seq[i:i + 60] for i in range(0, n, 60)) + "\n")


# ------------------------------------------------------------------ eval.py


@pytest.mark.parametrize("flag,value", [("batches", 0), ("batch_size", -1), ("window", 0)])
def test_eval_counts_must_be_positive(tmp_path, flag, value):
    r = run([str(ROOT / "eval.py"), "mlm", "--workdir=run", "--fasta=x.fa", f"--{flag}={value}"], cwd=tmp_path)
    assert_one_error_line(r, f"--{flag} must be > 0, got {value}")
    assert list(tmp_path.iterdir()) == []


def test_eval_relative_paths_and_damaged_checkpoints(tmp_path):
    from test_checkpoint_integrity import drop_manifest, flip_silently, make_workdir

    saved = make_workdir(tmp_path / "run")
    write_fasta(tmp_path / "x.fa")
    args = [str(ROOT / "eval.py"), "mlm", "--workdir=run", "--fasta=x.fa", "--batches=1", "--batch_size=2",
            "--out=e.json"]
    r = run(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["step"] == 2 and np.isfinite(res["mlm_loss"]) and res["fasta"] == str(tmp_path / "x.fa")

    # A workdir that is not one, and checkpoints that are all silently damaged: one line, exit 2.
    assert_one_error_line(run([*args[:2], "--workdir=nope", *args[3:]], cwd=tmp_path), "is not a directory")
    for step in (2, 1):
        drop_manifest(tmp_path / "run" / "checkpoints" / str(step))
        flip_silently(tmp_path / "run" / "checkpoints" / str(step), saved[step])
    before = files_of(tmp_path)
    assert_one_error_line(run(args, cwd=tmp_path), "no usable checkpoint under")
    assert_one_error_line(run([*args, "--checkpoint=run/checkpoints/2"], cwd=tmp_path),
                          "checkpoint step 2 at")
    assert files_of(tmp_path) == before  # e.json was not rewritten


# ------------------------------------------------------------------ convert check


@pytest.fixture(scope="module")
def fixture_arrays(fixtures_dir):
    return parity.load_fixture(fixtures_dir / "public_small.npz")


def check(path, capsys):
    code = convert_cli.main(["check", str(path)])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case,expect", [
    ("missing", "fixture not found"),
    ("garbage", "is not a readable .npz fixture"),
    ("npy", "holds a single array"),
    ("truncated", "is not a readable .npz fixture"),
    ("no_inputs", "is incomplete: missing input_ids, mlm_labels"),
    ("no_weights", "is incomplete: missing param/*"),
    ("no_outputs", "is incomplete: missing reference outputs"),
])
def test_check_unusable_fixture_exits_2(tmp_path, fixtures_dir, fixture_arrays, capsys, case, expect):
    path = tmp_path / "f.npz"
    fx = dict(fixture_arrays)
    if case == "garbage":
        path.write_bytes(b"this is not a zip file\n" * 10)
    elif case == "npy":
        np.save(path.with_suffix(".npy"), np.zeros(3))
        path.with_suffix(".npy").rename(path)
    elif case == "truncated":
        data = (fixtures_dir / "public_small.npz").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "no_inputs":
        np.savez(path, **{k: v for k, v in fx.items() if k not in ("input_ids", "mlm_labels")})
    elif case == "no_weights":
        np.savez(path, **{k: v for k, v in fx.items() if not k.startswith("param/")})
    elif case == "no_outputs":
        keep = set(parity.REQUIRED_KEYS)
        np.savez(path, **{k: v for k, v in fx.items() if k in keep or "param/" in k})
    code, err = check(path, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err


def test_check_missing_official_tensor_exits_2(tmp_path, fixture_arrays, capsys):
    path = tmp_path / "f.npz"
    np.savez(path, **{k: v for k, v in fixture_arrays.items() if k != "param/lm_head.bias"})
    code, err = check(path, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "official tensors missing" in err and "lm_head.bias" in err, err


# ------------------------------------------------------------------ convert import / export


def test_convert_import_export_relative_paths(tmp_path, fixture_arrays):
    from safetensors.numpy import load_file, save_file

    sd = {k[len("param/"):]: v for k, v in fixture_arrays.items() if k.startswith("param/")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(str(fixture_arrays["config_json"]))
    m = ["-m", "mxdna_jax.convert"]
    r = run([*m, "import", "model.safetensors", "params"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "params" / "model_config.json").exists()
    r = run([*m, "export", "params", "back/model.safetensors"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    assert (tmp_path / "back" / "config.json").exists()

    # An existing output is refused with one line, and left as it was.
    before = files_of(tmp_path)
    assert_one_error_line(run([*m, "import", "model.safetensors", "params"], cwd=tmp_path), "is not empty")
    assert_one_error_line(run([*m, "import", "nope.safetensors", "p2"], cwd=tmp_path), "not found")
    assert files_of(tmp_path) == before
