"""Fine-tuning: metrics against hand-computed values, the seeds loop and its results files, a warm
start from a pretraining workdir that learns a real task, and bad input."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import shared_path
from mxdna_jax import pretrain, sharding
from mxdna_jax.evaluation import finetune as ft
from mxdna_jax.evaluation import metrics as M
from mxdna_jax.tasks import load_task
from test_seams import SMALL, small_config
from test_train import ROOT, env_for

pytestmark = pytest.mark.usefixtures("jax_compile_cache")
FIXTURE_TASK = ROOT / "tests" / "fixtures" / "tasks" / "gue_prom_300_tata"


def test_metrics_equal_hand_computed_values():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    logits = np.stack([1 - pred, pred], 1).astype(float) + np.linspace(0, 0.1, 8)[:, None] * [0, 1]
    m = M.classification_metrics(labels, logits)
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    f1_pos, f1_neg = 2 * tp / (2 * tp + fp + fn), 2 * tn / (2 * tn + fn + fp)
    assert m["accuracy"] == pytest.approx(6 / 8) and m["mcc"] == pytest.approx(mcc)
    assert m["f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    # AUROC from the score ranks: the fraction of (positive, negative) pairs ordered right
    score = logits[:, 1] - logits[:, 0]
    pairs = [(p, n) for p in np.flatnonzero(labels == 1) for n in np.flatnonzero(labels == 0)]
    assert m["auroc"] == pytest.approx(np.mean([score[p] > score[n] for p, n in pairs]))
    three = M.classification_metrics(np.array([0, 1, 2, 2]), np.eye(3)[[0, 1, 2, 1]])
    assert "auroc" not in three and three["accuracy"] == 0.75
    agg = M.aggregate([{"test/mcc": 0.5}, {"test/mcc": 0.7}, {"test/mcc": 0.6}])
    assert agg["test/mcc"]["mean"] == pytest.approx(0.6) and agg["test/mcc"]["std"] == pytest.approx(0.1)  # ddof=1
    assert M.fmt_mean_std(agg["test/mcc"]) == "60.00 +- 10.00"


def ft_config(**finetune):
    c = small_config()
    with c.unlocked():
        c.finetune.update(dict(batch_size=8, epochs=2, lr=1e-3), **finetune)
    return c


def test_seeds_loop_writes_per_seed_and_mean_std(tmp_path):
    mesh = sharding.make_mesh(8, 1, 1)  # sharded like pretraining: 8 fake devices
    summary = ft.finetune(ft_config(), str(FIXTURE_TASK), str(tmp_path / "out"), seeds=2, mesh=mesh, progress=False)
    per_seed = summary["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1]
    assert per_seed[0]["test/mcc"] != per_seed[1]["test/mcc"] or per_seed[0]["dev/f1"] != per_seed[1]["dev/f1"]
    for key in ("test/mcc", "test/accuracy", "test/f1", "test/auroc", "dev/mcc"):
        vals = [r[key] for r in per_seed]
        assert summary["mean_std"][key]["mean"] == pytest.approx(np.mean(vals))
        assert summary["mean_std"][key]["std"] == pytest.approx(np.std(vals, ddof=1))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["per_seed"] == json.loads(json.dumps(per_seed)) and saved["classes"] == ["0", "1"]
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| gue_prom_300_tata | 16 | 2 |")
    for s in (0, 1):
        seed_dir = tmp_path / "out" / f"seed_{s}"
        steps = [int(p.name) for p in (seed_dir / "checkpoints").iterdir() if p.name.isdigit()]
        assert steps == [per_seed[s]["best_step"]]  # the best-dev parameters, kept on disk
        rows = [json.loads(x) for x in (seed_dir / "metrics.jsonl").read_text().splitlines()]
        assert any(r["kind"] == "test" for r in rows) and list((seed_dir / "tb").iterdir())


@pytest.mark.slow
def test_warm_start_then_finetune_learns_a_real_task(tmp_path):
    """prom_300_tata (GUE, real promoters vs non-promoters), subsampled: the fine-tuned classifier
    beats the same model before fine-tuning on dev by a clear margin."""
    task_dir = shared_path("data", "gue_deepgene_mirror", "prom", "prom_300_tata")
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    pre = tmp_path / "pretrained"
    pretrain.run(small_config(), str(pre), mesh=one)
    task = load_task(str(task_dir)).subsample("train", 640, seed=0).subsample("dev", 256, seed=0)
    task = task.subsample("test", 256, seed=0)
    r = ft.finetune_seed(ft_config(batch_size=32, epochs=3, patience=3), task, str(tmp_path / "ft"), seed=0,
                         init_from=str(pre), mesh=one, progress=False)
    m = r.metrics
    assert m["dev/accuracy"] >= m["dev_initial/accuracy"] + 0.05, m
    assert m["test/accuracy"] > 0.55 and m["test/mcc"] > 0.1, m
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    (warm,) = [x for x in rows if x.get("event") == "warm_start"]
    assert {k.split("/")[0] for k in warm["fresh"]} == {"cls_norm", "dense", "out_proj"}


def test_finetune_cli_bad_input(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "eval.py"), "finetune", *args], cwd=tmp_path, env=env_for(),
                              capture_output=True, text=True, timeout=300)

    r = run("--task=nope", "--workdir=out")
    assert r.returncode == 2 and "--task" in r.stderr and "is not a directory" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("sequence,label\nACGT,0\nACGA,1\n")
    (bad / "dev.csv").write_text("sequence,label\nACGT,0\n")
    (bad / "test.csv").write_text("sequence,label\nACXT,0\n")
    r = run(f"--task={bad}", "--workdir=out", *[f"--config.model.{k}={v}" for k, v in SMALL.items()])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{bad / 'test.csv'}:2" in r.stderr and "'X'" in r.stderr
    r = run(f"--task={bad}", "--workdir=out", "--config.finetune.epohcs=2")
    assert r.returncode == 2 and 'Did you mean "epochs"' in r.stderr
