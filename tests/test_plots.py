"""Each picture is written, non-empty and a real PNG of the expected layout."""

import subprocess
import sys

import numpy as np

from test_embed import params_dir, write_fasta  # noqa: F401  (module fixture)
from test_train import ROOT, env_for

from mxdna_jax.evaluation import plots

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_plot_functions(tmp_path):
    seq = "ACGT" * 15
    plots.tokenization_figure(seq, {"a": [(0, 6), (6, 54)], "b": [(i, 1) for i in range(60)]}, str(tmp_path / "t1.png"))
    _, h1 = png_size(tmp_path / "t1.png")
    plots.tokenization_figure(seq, {n: [(0, 60)] for n in "abcd"}, str(tmp_path / "t2.png"))
    assert png_size(tmp_path / "t2.png")[1] > h1  # one row per tokenizer
    plots.length_histograms({"x": {"A": [1, 2, 2, 6], "B": [6, 6]}, "y": {"A": [3]}}, str(tmp_path / "h.png"))
    w, h = png_size(tmp_path / "h.png")
    assert w > h  # one panel per dataset, side by side
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 1, (40, 8)), rng.normal(4, 1, (40, 8))])
    plots.embedding_map(emb, [0] * 40 + [1] * 40, str(tmp_path / "e.png"), class_names=["neg", "pos"])
    png_size(tmp_path / "e.png")


def test_eval_py_plots(params_dir, tmp_path):  # noqa: F811
    write_fasta(tmp_path / "in.fa")
    task = ROOT / "tests" / "fixtures" / "tasks" / "gue_prom_300_tata"
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "plots", f"--init_from={params_dir}", "--fasta=in.fa",
                        "--workdir=pics", f"--task={task}"], cwd=tmp_path, env=env_for(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("tokenization.png", "token_lengths.png", "embedding_map.png"):
        png_size(tmp_path / "pics" / name)
