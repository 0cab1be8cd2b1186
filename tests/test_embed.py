"""Embeddings and learnt tokenizations of FASTA records: row order, ids, shapes, batch
independence, units tiling each record; `eval.py embed|tokenize` as a user runs it."""

import subprocess
import sys

import numpy as np
import pytest

from mxdna_jax import heads, params_io
from mxdna_jax.cli import UserError
from mxdna_jax.config import ModelConfig
from mxdna_jax.evaluation import embed as E
from mxdna_jax.evaluation.loading import load_model
from test_train import ROOT, env_for

CFG = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
                  num_token_layers=1, max_position_embeddings=256)
RECORDS = [("chrA first", "ACGTACGTTTGACCAGGGATCAGGCTTAGC" * 3), ("r2", "NNACGTAGCTAGCTAGCATCGATCGACTAGCTAGC"),
           ("r3", "ACG"), ("r4", "GATTACA" * 30)]


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "params"
    params_io.save_params(heads.build_model(CFG, "mlm", seed=3), d)
    return d


def write_fasta(path):
    path.write_text("".join(f">{n}\n{s[:40]}\n{s[40:]}\n" for n, s in RECORDS))
    return path


def test_embed_rows_in_input_order_and_batch_independent(params_dir):
    model = load_model(str(params_dir), head="tokens")
    seqs = [s for _, s in RECORDS]
    mean = E.embed(model, seqs, pool="mean", batch_size=2)
    cls = E.embed(model, seqs, pool="cls", batch_size=3)
    assert mean.shape == cls.shape == (4, 32) and np.isfinite(mean).all()
    for i, s in enumerate(seqs):  # alone == inside a mixed-length batch, in file order
        np.testing.assert_allclose(E.embed(model, [s], pool="mean")[0], mean[i], atol=1e-5)
    tok = E.embed(model, seqs, pool="tokens", batch_size=2)
    units = E.learnt_units(model, seqs, batch_size=2)
    assert list(np.diff(tok.offsets)) == [len(u) for u in units]
    for i, s in enumerate(seqs):
        rows = tok.embeddings[tok.offsets[i]:tok.offsets[i + 1]]
        np.testing.assert_allclose(rows.mean(0), mean[i], atol=1e-5)  # mean pooling = mean of the unit tokens
        # units tile the record: sorted, contiguous, lengths 1..10, covering every nucleotide once
        spans = sorted(units[i])
        assert spans[0][0] == 0 and all(a + k == b for (a, k), (b, _) in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == len(s) and all(1 <= k <= 10 for _, k in spans)
        centres = sorted(tok.positions[tok.offsets[i]:tok.offsets[i + 1]])
        assert centres == sorted(a + k // 2 for a, k in spans)


def test_bad_sequences_name_the_record(params_dir):
    model = load_model(str(params_dir), head="tokens")
    with pytest.raises(UserError, match=r"r2: invalid character 'X' at position 3"):
        E.embed(model, ["ACGT", "ACGXT"], names=["r1", "r2"])
    with pytest.raises(UserError, match=r"long: 300 nt is longer than the model's limit of 254 nt"):
        E.embed(model, ["A" * 300], names=["long"])
    with pytest.raises(UserError, match="pool must be one of"):
        E.embed(model, ["ACGT"], pool="max")


def test_eval_py_embed_and_tokenize_with_relative_paths(params_dir, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    write_fasta(work / "in.fa")
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "embed", f"--init_from={params_dir}", "--fasta=in.fa",
                        "--out=emb.npy", "--batch_size=2"], cwd=work, env=env_for(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    emb = np.load(work / "emb.npy")
    assert emb.shape == (4, 32)
    assert (work / "emb.ids.txt").read_text().split("\n")[:4] == ["chrA", "r2", "r3", "r4"]
    model = load_model(str(params_dir), head="tokens")
    np.testing.assert_allclose(emb, E.embed(model, [s for _, s in RECORDS], pool="mean"), atol=1e-5)

    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "tokenize", f"--init_from={params_dir}",
                        "--fasta=in.fa", "--out=units.bed"], cwd=work, env=env_for(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln.split("\t") for ln in (work / "units.bed").read_text().splitlines()]
    for name, seq in RECORDS:
        rows = [(int(a), int(b), int(k)) for n, a, b, k in lines if n == name.split()[0]]
        assert sum(k for _, _, k in rows) == len(seq) and all(b - a == k for a, b, k in rows)

    bad = subprocess.run([sys.executable, str(ROOT / "eval.py"), "embed", f"--init_from={params_dir}",
                          "--fasta=missing.fa", "--out=e.npy"], cwd=work, env=env_for(), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "FASTA file not found" in bad.stderr and "Traceback" not in bad.stderr
