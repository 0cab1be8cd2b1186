"""Barcode probes: 1-NN genus and linear species probes on synthetic embeddings (where the right
answer is known), then `probe()` and `eval.py probe` end to end on a tiny random model over a few
genera of the packaged barcodes."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from mxdna_jax import heads, params_io
from mxdna_jax.config import ModelConfig
from mxdna_jax.data import barcodes as bc
from mxdna_jax.evaluation import probe as P
from test_barcodes import write_tsv
from test_train import ROOT, env_for

CFG = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
                  num_token_layers=1, max_position_embeddings=256, mode="original")
WINDOW = 62  # one bucket shape (64 positions): one compile


def one_hot(labels):
    names = sorted(set(labels))
    return np.eye(len(names), dtype=np.float32)[[names.index(x) for x in labels]]


def test_knn_on_one_hot_genus_codes_is_perfect_and_can_fail():
    rng = np.random.default_rng(0)
    genera = [f"g{k}" for k in range(6)]
    ref = [genera[k % 6] for k in range(30)]
    query = [genera[k] for k in rng.integers(0, 6, 20)]
    codes = one_hot(ref + query)
    m = P.knn_genus(codes[30:] * 3.0, query, codes[:30], ref)  # scale does not matter: cosine
    assert m["accuracy"] == m["macro_f1"] == m["balanced_accuracy"] == m["genus_in_reference"] == 1.0
    wrong = P.knn_genus(codes[30:], query, codes[:30], list(np.roll(ref, 1)))  # references mislabelled
    assert wrong["accuracy"] == 0.0
    # cosine, not Euclidean: the nearer point in angle wins even when it is farther away
    assert P.nearest_neighbours(np.array([[1.0, 0.1]]), np.array([[10.0, 0.0], [0.5, 0.5]]))[0] == 0


def test_linear_probe_and_label_metrics():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, (4, 8))
    y = np.repeat(np.array(["a", "b", "c", "d"]), 20)
    x = centres[np.searchsorted(["a", "b", "c", "d"], y)] + rng.normal(0, 0.3, (80, 8))
    m = P.linear_probe(x[::2], y[::2], x[1::2], y[1::2])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["converged"]
    noise = P.linear_probe(rng.normal(size=(40, 8)), y[::2], rng.normal(size=(40, 8)), y[1::2])
    assert noise["accuracy"] < 0.6
    m = P.label_metrics(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_loading_an_encoder_reports_extra_source_params_as_unused():
    """A pretrained MAE/MLM checkpoint has parameters the tokens head lacks (its decoder): they are
    reported as unused, never an error."""
    src = heads.build_model(CFG, "mlm", seed=1)
    flat = params_io.flatten_params(nnx.to_pure_dict(nnx.state(src, nnx.Param)))
    flat["decoder/extra_layer/kernel"] = np.zeros((3, 3), np.float32)
    report = params_io.load_matching(heads.build_model(CFG, "tokens", seed=2), flat)
    assert "decoder/extra_layer/kernel" in report.unused and not report.fresh


@pytest.fixture(scope="module")
def few_genera(tmp_path_factory):
    """~100 packaged barcodes: 5 genera of >= 3 species, <= 4 barcodes per species."""
    b = bc.load_barcodes()
    species_of = {}
    for i in range(len(b)):
        species_of.setdefault(b.genera[i], {}).setdefault(b.species[i], []).append(i)
    genera = [g for g in sorted(species_of) if len(species_of[g]) >= 3][:5]
    rows = [i for g in genera for s in sorted(species_of[g]) for i in species_of[g][s][:4]]
    d = tmp_path_factory.mktemp("probe")
    path = write_tsv(d / "few.tsv", [(b.processids[i], b.genera[i], b.species[i], b.sequence(i)) for i in rows])
    params = d / "params"
    params_io.save_params(heads.build_model(CFG, "mlm", seed=3), params)
    return d, path, params


def test_probe_end_to_end_and_cli_reproduces_it(few_genera):
    d, path, params = few_genera
    out = d / "out"
    r = P.probe(str(params), str(out), str(path), window=WINDOW, batch_size=32, progress=False)
    saved = json.loads((out / "probe.json").read_text())
    for key in [f"{p}/{m}" for p in ("knn_genus", "linear_species") for m in P.METRICS]:
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == r[key]
    c = saved["counts"]
    assert c["queries"] == r["split"]["unseen"]["barcodes"] > 0 and c["reference"] == r["split"]["train"]["barcodes"]
    assert c["linear_test"] == r["split"]["test"]["barcodes"] and c["query_genera"] <= 5
    assert saved["knn_genus/genus_in_reference"] == 1.0  # every unseen genus has seen relatives
    assert saved["source"] == str(params) and saved["window"] == WINDOW and saved["embedding_dim"] == 32
    assert saved["split_file"] == str(out / bc.SPLIT_FILENAME) and (out / bc.SPLIT_FILENAME).exists()
    assert "| 1-NN genus" in (out / "probe.md").read_text()
    # the same split and model through the command line: the same numbers
    cli_out = d / "cli_out"
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "probe", f"--init_from={params}",
                          f"--workdir={cli_out}", f"--data={path}", f"--split={out / bc.SPLIT_FILENAME}",
                          f"--window={WINDOW}", "--batch_size=32"], env=env_for(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((cli_out / "probe.json").read_text())
    for key in [f"{p}/{m}" for p in ("knn_genus", "linear_species") for m in P.METRICS]:
        assert again[key] == pytest.approx(saved[key], abs=1e-6)
    assert again["counts"] == saved["counts"] and "1-NN genus" in res.stdout


def test_probe_bad_input_is_one_error_line(few_genera, tmp_path):
    d, _, params = few_genera
    bad = tmp_path / "bad.tsv"
    write_tsv(bad, [("P1", "G", "G s", "ACGT"), ("P2", "G", "G s", "ACGXT")])
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "probe", f"--init_from={params}",
                          f"--workdir={tmp_path / 'o'}", f"--data={bad}"], env=env_for(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"error: {bad}:3: P2: invalid character 'X' at position 3 of the "
                                                   "nucleotides; expected A/C/G/T, N, IUPAC codes or '-'")
    with pytest.raises(P.UserError, match=r"max_per_split must be an integer >= 0"):
        P.probe(str(params), str(tmp_path / "o"), max_per_split=-1)
