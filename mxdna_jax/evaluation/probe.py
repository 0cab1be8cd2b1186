"""Frozen-encoder probes on DNA barcodes, as BarcodeBERT / BarcodeMAE evaluate their encoders.

    probe(init_from, out, data=None, ...) -> dict      (eval.py probe; writes OUT/probe.json, probe.md)
    knn_genus(query_emb, query_genus, ref_emb, ref_genus)          -> metrics (1-NN, cosine)
    linear_probe(train_emb, train_labels, test_emb, test_labels)   -> metrics (logistic regression)

Embedding of a barcode: the mean of the final unit-token states (evaluation.embed, pool='mean')
of its first `window` nt (offset 0; the window the model was pretrained with). On the species-
disjoint split of data/barcodes.py:
- 1-NN genus: each `unseen`-species barcode takes the genus of its most cosine-similar `train`
  barcode. Its species was never seen, so only the genus can be right: does the embedding place
  a new species next to its relatives?
- linear species: a logistic regression on standardised `train` embeddings, species labels,
  scored on `test` (the same species, other barcodes).
Metrics (scikit-learn): accuracy, macro-F1, balanced accuracy.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np

from mxdna_jax.cli import UserError
from mxdna_jax.data import barcodes as bc

METRICS = ("accuracy", "macro_f1", "balanced_accuracy")


def label_metrics(y_true, y_pred) -> dict[str, float]:
    """accuracy, macro-F1 and balanced accuracy of string or integer labels."""
    from sklearn import metrics as skm

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if not len(y_true):
        raise ValueError("no examples to score")
    with warnings.catch_warnings():  # predicted classes absent from y_true: a warning, not an error
        warnings.simplefilter("ignore", UserWarning)
        return {"accuracy": float(skm.accuracy_score(y_true, y_pred)),
                "macro_f1": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
                "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred))}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(query_emb, ref_emb, *, chunk: int = 1024) -> np.ndarray:
    """Index of each query's most cosine-similar reference row (ties: the first)."""
    q, r = _unit_rows(query_emb), _unit_rows(ref_emb)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"query (N, D) and reference (M, D) embeddings expected, got {q.shape} and {r.shape}")
    if not len(r):
        raise ValueError("empty reference set")
    return np.concatenate([np.argmax(q[i: i + chunk] @ r.T, axis=1) for i in range(0, len(q), chunk)]
                          or [np.zeros(0, np.int64)])


def knn_genus(query_emb, query_genus, ref_emb, ref_genus) -> dict[str, float]:
    """1-NN (cosine) genus classification: metrics, plus the share of queries whose genus is in
    the reference set at all (the ceiling of the accuracy)."""
    ref_genus, query_genus = np.asarray(ref_genus), np.asarray(query_genus)
    pred = ref_genus[nearest_neighbours(query_emb, ref_emb)]
    out = label_metrics(query_genus, pred)
    out["genus_in_reference"] = float(np.isin(query_genus, ref_genus).mean())
    return out


def linear_probe(train_emb, train_labels, test_emb, test_labels, *, max_iter: int = 1000, C: float = 1.0,
                 ) -> dict[str, float]:
    """Logistic regression (lbfgs, multinomial) on standardised embeddings (the scaler is fit on
    train): metrics on test, plus `converged` and `n_iter`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_labels = np.asarray(train_labels)
    if len(np.unique(train_labels)) < 2:
        raise ValueError("the linear probe needs at least 2 classes in its training set")
    scaler = StandardScaler().fit(np.asarray(train_emb, np.float64))
    clf = LogisticRegression(max_iter=int(max_iter), C=float(C))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(scaler.transform(np.asarray(train_emb, np.float64)), train_labels)
    out = label_metrics(test_labels, clf.predict(scaler.transform(np.asarray(test_emb, np.float64))))
    out["converged"] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    out["n_iter"] = int(np.max(clf.n_iter_))
    return out


def barcode_embeddings(model, barcodes: bc.Barcodes, *, window: int, batch_size: int = 16, progress=None,
                       segmenter=None) -> np.ndarray:
    """(N, D) mean-pooled embeddings of each barcode's first `window` nt."""
    from mxdna_jax.evaluation.embed import embed

    seqs = [barcodes.row_ids(i)[:window].astype(np.int32) for i in range(len(barcodes))]
    return embed(model, seqs, pool="mean", batch_size=batch_size, names=list(barcodes.processids),
                 progress=progress, segmenter=segmenter)


def _workdir_of(source: str) -> pathlib.Path | None:
    """The train.py workdir of a workdir or step-dir source (None for params dirs and weights)."""
    src = pathlib.Path(source)
    if (src / "config.json").is_file() and (src / "checkpoints").is_dir():
        return src
    if src.parent.name == "checkpoints" and (src.parent.parent / "config.json").is_file():
        return src.parent.parent
    return None


def _run_data(workdir: pathlib.Path | None) -> dict:
    """The data section of a train.py workdir's config.json ({} when there is none)."""
    if workdir is None:
        return {}
    try:
        data = json.loads((workdir / "config.json").read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


def _subsample(split: bc.BarcodeSplit, max_per_split: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of train/test/unseen, each at most max_per_split (seeded; 0 = all); test keeps only
    species that train still has."""
    rng = np.random.default_rng(seed)
    rows = {}
    for name in ("train", "test", "unseen"):
        r = split.indices(name)
        if max_per_split and len(r) > max_per_split:
            r = np.sort(rng.choice(r, max_per_split, replace=False))
        rows[name] = r
    b = split.barcodes
    train_species = {b.species[i] for i in rows["train"]}
    rows["test"] = np.asarray([i for i in rows["test"] if b.species[i] in train_species], np.int64)
    return rows


def _load(init_from: str):
    """(model with the tokens head, step or None, unused source parameter names)."""
    from mxdna_jax import params_io
    from mxdna_jax.evaluation.loading import load_model

    if params_io.source_kind(init_from) in ("workdir", "step_dir"):
        loaded = params_io.load_any(init_from, head="tokens")  # an MAE decoder or MLM head: unused
        return loaded.model, loaded.step, list(loaded.report.unused)
    return load_model(init_from, head="tokens"), None, []


def probe(init_from, out, data=None, *, split: str | None = None, seed: int = 0, batch_size: int = 16,
          window: int | None = None, max_per_split: int = 0, linear_max_iter: int = 1000,
          progress: bool = True) -> dict:
    """Embed the barcodes with the frozen encoder of `init_from` (a train.py workdir, a step dir,
    a params dir or official weights), run both probes, write OUT/probe.json and OUT/probe.md.

    data: barcode TSV path(s) (a list or a comma-separated string); None = those the init_from
    run pretrained on (its data.barcodes), else the embedded ones.
    split: None = INIT_FROM/barcode_split.tsv when init_from is a workdir that has one (the
    pretraining run's split), else a new split with `seed`, written to OUT/barcode_split.tsv;
    'new' = always a new one; else a split file path.
    window: nucleotides per barcode (None = the run's data.window, else the model's limit).
    max_per_split: > 0 caps each split (a quick look; test keeps only species still in train).
    """
    from mxdna_jax import cli

    init_from, out = cli.abspath(str(init_from)), cli.abspath(str(out))
    if isinstance(data, str):
        data = [p.strip() for p in data.split(",") if p.strip()]
    data = [cli.abspath(str(p)) for p in data] if data else None
    for name, v, lo in (("batch_size", batch_size, 1), ("max_per_split", max_per_split, 0),
                        ("linear_max_iter", linear_max_iter, 1), ("window", window or 1, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {v!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--workdir {out} is a file, not a directory")
    workdir = _workdir_of(init_from)
    run_data = _run_data(workdir)
    if data is None and run_data.get("corpus") == "barcodes" and run_data.get("barcodes"):
        data = [p.strip() for p in str(run_data["barcodes"]).split(",") if p.strip()]
    barcodes = bc.load_barcodes(data)  # bad data fails before a model is loaded
    made = False
    if split is None and workdir is not None and (workdir / bc.SPLIT_FILENAME).is_file():
        try:
            sp = bc.read_split(workdir / bc.SPLIT_FILENAME, barcodes)
        except UserError as e:
            raise UserError(f"{e}; pass split='new' (--split=new) for a new split of these barcodes") from None
    elif split is None or split == "new":
        sp, made = bc.split_barcodes(barcodes, seed), True
    else:
        sp = bc.read_split(cli.abspath(split), barcodes)
    if made and workdir is not None and pathlib.Path(out) == workdir and (workdir / bc.SPLIT_FILENAME).exists():
        raise UserError(f"a new split would overwrite {workdir / bc.SPLIT_FILENAME}, the pretraining run's own; "
                        "write the probe to another --workdir")
    model, step, unused = _load(init_from)
    limit = model.cfg.max_position_embeddings - 2
    window = min(int(window or run_data.get("window") or limit), limit)
    os.makedirs(out, exist_ok=True)
    if made:
        sp = bc.BarcodeSplit(sp.barcodes, sp.assignment, sp.seed, sp.unseen_fraction, sp.test_fraction,
                             bc.write_split(sp, os.path.join(out, bc.SPLIT_FILENAME)))
    rows = _subsample(sp, max_per_split, seed)
    if not len(rows["unseen"]) or not len(rows["train"]) or not len(rows["test"]):
        raise UserError(f"the split has {len(rows['train'])} train, {len(rows['test'])} test and "
                        f"{len(rows['unseen'])} unseen barcodes; each probe needs some (more species per genus?)")
    needed = np.concatenate([rows["train"], rows["test"], rows["unseen"]])
    from mxdna_jax.evaluation.embed import segmenter_for

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(needed), unit="barcode", desc="embed")
    try:
        emb = barcode_embeddings(model, barcodes.take(needed), window=window, batch_size=batch_size,
                                 progress=bar.update if bar is not None else None,
                                 segmenter=segmenter_for(model, str(workdir or init_from)))
    finally:
        if bar is not None:
            bar.close()
    at = dict(zip(needed.tolist(), range(len(needed))))
    E = {k: emb[[at[i] for i in r]] for k, r in rows.items()}
    genus = np.asarray(barcodes.genera)
    species = np.asarray(barcodes.species)
    result: dict = {}
    for k, v in knn_genus(E["unseen"], genus[rows["unseen"]], E["train"], genus[rows["train"]]).items():
        result[f"knn_genus/{k}"] = v
    lin = linear_probe(E["train"], species[rows["train"]], E["test"], species[rows["test"]],
                       max_iter=linear_max_iter)
    for k, v in lin.items():
        result[f"linear_species/{k}"] = v
    result["counts"] = {
        "reference": len(rows["train"]), "reference_genera": len(set(genus[rows["train"]])),
        "queries": len(rows["unseen"]), "query_species": len(set(species[rows["unseen"]])),
        "query_genera": len(set(genus[rows["unseen"]])),
        "linear_train": len(rows["train"]), "linear_test": len(rows["test"]),
        "linear_species": len(set(species[rows["train"]])),
        "linear_test_species": len(set(species[rows["test"]]))}
    result.update(
        source=init_from, step=step, unused_parameters=len(unused), data=list(barcodes.sources),
        data_report=dict(barcodes.report), split_file=sp.path, split_seed=sp.seed, split=sp.counts(),
        window=window, pool="mean", embedding_dim=int(emb.shape[1]), max_per_split=max_per_split,
        linear_max_iter=linear_max_iter)
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "probe.md"), "w") as f:
        f.write(results_markdown(result))
    return result


def results_markdown(result: dict) -> str:
    c = result["counts"]
    rows = [("1-NN genus (unseen species -> seen-train reference)", "knn_genus",
             f"{c['queries']} queries / {c['query_species']} species; {c['reference']} references"),
            ("linear species (seen-train -> seen-test)", "linear_species",
             f"{c['linear_train']} train / {c['linear_species']} species; {c['linear_test']} test")]
    step = f", step {result['step']}" if result.get("step") is not None else ""
    lines = [f"# Barcode probes: {result['source']}{step}", "",
             f"Mean-pooled unit tokens of the first {result['window']} nt; split {result['split_file']}.", "",
             "| probe | accuracy | macro-F1 | balanced accuracy | data |", "|---|---|---|---|---|"]
    for title, key, what in rows:
        cells = " | ".join(f"{100 * result[f'{key}/{m}']:.2f}" for m in METRICS)
        lines.append(f"| {title} | {cells} | {what} |")
    if not result.get("linear_species/converged", True):
        lines += ["", f"The logistic regression did not converge in {result['linear_max_iter']} iterations."]
    return "\n".join(lines) + "\n"
