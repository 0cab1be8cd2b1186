"""Evaluate and use MxDNA checkpoints.

    python eval.py mlm --workdir=DIR --fasta=FILE [--checkpoint=STEP_DIR] [--batches=8] [--seed=0]
    python eval.py embed --init_from=MODEL --fasta=in.fa --out=emb.npy [--pool=mean|cls|tokens]
    python eval.py tokenize --init_from=MODEL --fasta=in.fa [--out=units.bed]
    python eval.py plots --init_from=MODEL --fasta=in.fa --workdir=OUT [--task=DIR[,DIR...]] [--bpe=bpe.json]
    python eval.py finetune --task=DIR[,DIR...] --workdir=OUT [--init_from=MODEL] [--config=configs/X.py]
                            [--seeds=3] [--config.finetune.epochs=3 ...]
    python eval.py probe --init_from=MODEL --workdir=OUT [--data=TSV[,TSV]] [--split=FILE|new] [--seed=0]
                         [--batch_size=16] [--window=N] [--max_per_split=0] [--linear_max_iter=1000]

`mlm` prints and writes (DIR/eval_mlm.json, or --out) the masked-LM loss and accuracy of the
newest verified checkpoint of a train.py run on deterministic windows of any FASTA.
`embed` writes one row per FASTA record, in file order (`--out`, plus OUT.ids.txt with the record
ids; `--pool=tokens` writes an .npz of every unit token with offsets). `tokenize` writes each
record's learnt units as BED-like lines `record  start  end  length` (0-based, end exclusive).
`plots` writes OUT/tokenization.png (the first record cut by the learnt tokenizer over two
stochastic passes and in eval mode, beside non-overlapping 6-mers and BPE), OUT/token_lengths.png
(token-length histograms per dataset: the FASTA and each --task) and OUT/embedding_map.png (t-SNE
of mean-pooled embeddings of the first task's test split, coloured by label).
`finetune` trains the [CLS] classifier on each labelled task (GUE CSV, Genomic Benchmarks folders
or one FASTA per class), early-stopped on dev MCC, tests the best-dev parameters, repeats over
seeds, and writes OUT/<task>/results.json|md plus OUT/results.md (one row per task). Without
--init_from the config's model is trained from scratch; with it, the model is the source's and
its weights are loaded (the classifier head is new).
`probe` embeds DNA barcodes with the frozen encoder (mean of the unit tokens) and scores 1-NN genus
classification of unseen species (cosine, against the seen-train barcodes) and a linear species
probe (seen-train -> seen-test), on the species-disjoint split of the pretraining run (its
barcode_split.tsv) or a new one; writes OUT/probe.json and OUT/probe.md.
MODEL is a train.py workdir (newest verified checkpoint), a step dir, a params dir or official
weights (.safetensors with its config.json).

Exit codes: 0 success; 2 bad input (flags, workdir, FASTA, a damaged or unverifiable checkpoint),
reported as one `error: ...` line; 1 an unexpected error (a bug: the traceback is printed).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mxdna_jax import cli, host_malloc

cli.default_config_flag(__file__, __name__)  # configs/tiny.py of this repository unless --config
_CONFIG = config_flags.DEFINE_config_file("config", None, "finetune: model and finetune settings",
                                          lock_config=True)
_TASK = flags.DEFINE_string("task", None, "finetune: labelled task directory (several: comma-separated)")
_SEEDS = flags.DEFINE_integer("seeds", 1, "finetune: repeats with seeds 0..N-1 (mean +- sample std)")
_WORKDIR = flags.DEFINE_string("workdir", None, "a train.py workdir (config.json + checkpoints/)")
_CKPT = flags.DEFINE_string("checkpoint", None, "a specific step directory (default: newest verified one)")
_FASTA = flags.DEFINE_string("fasta", None, "FASTA(.gz) to evaluate on")
_BATCHES = flags.DEFINE_integer("batches", 8, "number of batches")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "windows per batch")
_WINDOW = flags.DEFINE_integer("window", None, "nucleotides per window (default: the run's window)")
_SEED = flags.DEFINE_integer("seed", 0, "window and masking seed")
_OUT = flags.DEFINE_string("out", None, "output file (mlm: default WORKDIR/eval_mlm.json)")
_INIT = flags.DEFINE_string("init_from", None, "embed/tokenize: the trained model (workdir, step dir, params dir "
                            "or official .safetensors)")
_BPE = flags.DEFINE_string("bpe", None, "plots: a trained BPE tokenizer (JSON) to compare with")
_DATA = flags.DEFINE_string("data", None, "probe: barcode TSV(s), comma-separated (default: the embedded barcodes)")
_SPLIT = flags.DEFINE_string("split", None, "probe: a barcode split file, or 'new' (default: INIT_FROM's "
                             "barcode_split.tsv if it has one, else a new split with --seed)")
_MAX_PER_SPLIT = flags.DEFINE_integer("max_per_split", 0, "probe: at most this many barcodes per split (0: all)")
_LINEAR_MAX_ITER = flags.DEFINE_integer("linear_max_iter", 1000, "probe: logistic-regression iterations")
_POOL = flags.DEFINE_enum("pool", "mean", ["mean", "cls", "tokens"], "embed: pooling of the token states")


def _paths() -> dict[str, str | None]:
    """Every user path, resolved once against the start-up directory (Orbax needs absolute ones)."""
    workdir, fasta = cli.abspath(_WORKDIR.value), cli.abspath(_FASTA.value)
    if not workdir or not fasta:
        raise cli.UserError("mlm needs --workdir and --fasta")
    if not os.path.isdir(workdir):
        raise cli.UserError(f"--workdir {workdir} is not a directory")
    if not os.path.isfile(fasta):
        raise cli.UserError(f"FASTA file not found: {fasta}")
    out = cli.abspath(_OUT.value) or os.path.join(workdir, "eval_mlm.json")
    if not os.path.isdir(os.path.dirname(out)):
        raise cli.UserError(f"--out {out}: directory {os.path.dirname(out)} does not exist")
    return {"workdir": workdir, "fasta": fasta, "checkpoint": cli.abspath(_CKPT.value), "out": out}


def _check_counts() -> None:
    for name, flag in (("batches", _BATCHES), ("batch_size", _BATCH_SIZE), ("window", _WINDOW)):
        if flag.value is not None and flag.value <= 0:
            raise cli.UserError(f"--{name} must be > 0, got {flag.value}")


def _run_window(workdir: str) -> int:
    if _WINDOW.value is not None:
        return _WINDOW.value
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            window = json.load(f).get("data", {}).get("window")
    except (OSError, ValueError, AttributeError) as e:
        raise cli.UserError(f"{path} is unreadable ({cli.one_line(e)}): is {workdir} a train.py workdir?") from None
    if window is None:
        raise cli.UserError(f"{path} has no data.window; pass --window")
    return int(window)


def eval_mlm() -> dict:
    _check_counts()
    paths = _paths()  # all validation before anything is loaded or written

    import numpy as np
    from flax import nnx

    from mxdna_jax import params_io, vocab
    from mxdna_jax.capacity import CapacityPolicy
    from mxdna_jax.data.pipeline import fasta_eval_batches
    from mxdna_jax.objectives.mlm import mlm_loss_fn
    from mxdna_jax.trainer import Evaluator

    window = _run_window(paths["workdir"])
    model, step = params_io.load_from_workdir(paths["workdir"], step_dir=paths["checkpoint"])
    batches = fasta_eval_batches(paths["fasta"], window=window, batch_size=_BATCH_SIZE.value,
                                 n_batches=_BATCHES.value, seed=_SEED.value)
    from mxdna_jax.evaluation.embed import segmenter_for

    seg = segmenter_for(model, paths["workdir"])
    if seg is not None:  # units of the masked input, as in training
        batches = [dict(b, units=seg(b["input_ids"])) for b in batches]

    @nnx.jit(static_argnames=("token_capacity",))
    def eval_step(model, batch, token_capacity):
        return mlm_loss_fn(model, batch, None, token_capacity=token_capacity)[1]

    # the training loop's evaluator: masked-count-weighted means, capacity re-run on overflow
    # the capacity follows the windows' token counts (0.5 x L until `patience` batches fit a
    # smaller rung of the ladder; an overflow is re-run larger)
    m = Evaluator(eval_step, CapacityPolicy.for_model(model.cfg, window + 2, adaptive=True))(model, batches)
    weight = sum(float(np.sum(b["labels"] != vocab.IGNORE_LABEL)) for b in batches)
    result = {k: float(m[k]) for k in ("mlm_loss", "accuracy", "aux_loss")}
    result.update(step=step, fasta=paths["fasta"], window=window, windows=len(batches) * _BATCH_SIZE.value,
                  predicted_positions=int(weight), seed=_SEED.value)
    out = paths["out"]
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"step {step}: mlm_loss {result['mlm_loss']:.4f} nats, accuracy {result['accuracy']:.4f} "
          f"on {result['windows']} windows of {window} nt ({int(weight)} masked positions) -> {out}")
    return result


def _fasta_records(path: str):
    """(names, sequences as id arrays) of a FASTA(.gz), file order."""
    import numpy as np

    from mxdna_jax.data.fasta import parse_fasta

    ids, names, lengths = parse_fasta(path)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return names, [ids[a:b].astype(np.int32) for a, b in zip(bounds[:-1], bounds[1:])]


def _model_and_records(need_out: bool):
    _check_counts()
    init, fasta, out = cli.abspath(_INIT.value), cli.abspath(_FASTA.value), cli.abspath(_OUT.value)
    if not init or not fasta:
        raise cli.UserError("needs --init_from (a trained model) and --fasta")
    if not os.path.isfile(fasta):
        raise cli.UserError(f"FASTA file not found: {fasta}")
    if need_out and not out:
        raise cli.UserError("embed needs --out (e.g. --out=emb.npy)")
    if out and not os.path.isdir(os.path.dirname(out)):
        raise cli.UserError(f"--out {out}: directory {os.path.dirname(out)} does not exist")
    from mxdna_jax.evaluation.loading import load_model

    names, seqs = _fasta_records(fasta)  # parse first: a bad FASTA fails before a model is loaded
    from mxdna_jax.evaluation.embed import segmenter_for

    model = load_model(init, head="tokens")
    return model, names, seqs, out, segmenter_for(model, init)


def eval_embed() -> None:
    import numpy as np
    from tqdm import tqdm

    from mxdna_jax.evaluation.embed import embed

    model, names, seqs, out, seg = _model_and_records(need_out=True)
    with tqdm(total=len(seqs), unit="seq", desc="embed") as bar:
        emb = embed(model, seqs, pool=_POOL.value, batch_size=_BATCH_SIZE.value, names=names, progress=bar.update,
                    segmenter=seg)
    base = out[:-4] if out.endswith((".npy", ".npz")) else out
    if _POOL.value == "tokens":
        out = base + ".npz"
        np.savez(out, embeddings=emb.embeddings, offsets=emb.offsets, positions=emb.positions)
        shape = emb.embeddings.shape
    else:
        np.save(out, emb)
        shape = emb.shape
    with open(base + ".ids.txt", "w") as f:
        f.write("\n".join(names) + "\n")
    print(f"{len(names)} records -> {out} {shape} ({_POOL.value} pooling), ids in {base}.ids.txt")


def eval_tokenize() -> None:
    from mxdna_jax.evaluation.embed import learnt_units

    model, names, seqs, out, seg = _model_and_records(need_out=False)
    units = learnt_units(model, seqs, batch_size=_BATCH_SIZE.value, names=names, segmenter=seg)
    lines = [f"{n}\t{a}\t{a + k}\t{k}" for n, us in zip(names, units) for a, k in us]
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
        n_units = len(lines)
        n_nt = sum(len(s) for s in seqs)
        print(f"{len(names)} records, {n_units} units (mean {n_nt / max(n_units, 1):.2f} nt) -> {out}")
    else:
        sys.stdout.write(text)


def _windows(seqs, limit: int, n: int):
    """Up to n pieces of at most `limit` nt, in order (records longer than the model are cut)."""
    out = []
    for s in seqs:
        out += [s[i:i + limit] for i in range(0, len(s), limit)]
        if len(out) >= n:
            break
    return out[:n]


def eval_plots() -> None:
    import jax

    from mxdna_jax.evaluation import plots
    from mxdna_jax.evaluation.embed import embed, learnt_units

    model, names, seqs, _, seg = _model_and_records(need_out=False)
    out = cli.abspath(_WORKDIR.value)
    if not out:
        raise cli.UserError("plots needs --workdir=OUT (the folder the PNGs are written to)")
    tasks = [cli.abspath(t.strip()) for t in (_TASK.value or "").split(",") if t.strip()]
    os.makedirs(out, exist_ok=True)
    limit = model.cfg.max_position_embeddings - 2
    bpe = None
    if _BPE.value:
        from mxdna_jax.tokenizers.bpe import BpeSegmenter

        bpe = BpeSegmenter(cli.abspath(_BPE.value))
    seq = seqs[0][:120]
    rows = {f"model pass {i}": learnt_units(model, [seq], jitter_key=jax.random.key(i), segmenter=seg)[0]
            for i in (1, 2)}
    rows["model (eval)"] = learnt_units(model, [seq], segmenter=seg)[0]
    rows["6-mer"] = [(a, min(6, len(seq) - a)) for a in range(0, len(seq), 6)]
    if bpe is not None:
        rows["BPE"] = list(zip(*bpe.units(seq)))
    from mxdna_jax import vocab

    paths = [plots.tokenization_figure(vocab.decode(seq), rows, os.path.join(out, "tokenization.png"),
                                       title=f"{names[0]}: first {len(seq)} nt")]
    datasets = {os.path.basename(_FASTA.value): _windows(seqs, limit, 200)}
    loaded = []
    if tasks:
        from mxdna_jax.tasks import load_task

        for t in tasks:
            task = load_task(t, dev_fraction=0.1, test_fraction=0.1)
            test = task.subsample("test", 400, seed=0).test
            loaded.append((task, test))
            datasets[task.name] = [test.row_ids(i)[:limit] for i in range(len(test.labels))]
    hist = {}
    for name, pieces in datasets.items():
        hist[name] = {"model": [k for us in learnt_units(model, pieces, segmenter=seg) for _, k in us]}
        if bpe is not None:
            hist[name]["BPE"] = [int(k) for p in pieces for k in bpe.units(p)[1]]
    paths.append(plots.length_histograms(hist, os.path.join(out, "token_lengths.png")))
    if loaded:
        task, test = loaded[0]
        emb = embed(model, datasets[task.name], pool="mean", batch_size=_BATCH_SIZE.value, segmenter=seg)
        paths.append(plots.embedding_map(emb, test.labels, os.path.join(out, "embedding_map.png"),
                                         class_names=task.class_names, title=f"{task.name} (test, mean pooling)"))
    print("wrote " + ", ".join(paths))


def eval_finetune() -> None:
    import copy
    import dataclasses

    from mxdna_jax.evaluation import finetune as ft

    if not _TASK.value or not _WORKDIR.value:
        raise cli.UserError("finetune needs --task=DIR and --workdir=OUT")
    if _SEEDS.value <= 0:
        raise cli.UserError(f"--seeds must be > 0, got {_SEEDS.value}")
    tasks = [cli.abspath(t.strip()) for t in _TASK.value.split(",") if t.strip()]
    for t in tasks:
        if not os.path.isdir(t):
            raise cli.UserError(f"--task {t} is not a directory")
    out, init = cli.abspath(_WORKDIR.value), cli.abspath(_INIT.value)
    config = copy.deepcopy(_CONFIG.value)
    if init:
        from mxdna_jax.evaluation.loading import source_model_config

        src = source_model_config(init)  # the architecture the weights belong to
        with config.unlocked():
            for k, v in dataclasses.asdict(src).items():
                config.model[k] = list(v) if isinstance(v, tuple) else v
    summaries = []
    for t in tasks:
        name = os.path.relpath(t, os.path.dirname(os.path.dirname(t))) if len(tasks) > 1 else os.path.basename(t)
        summary = ft.finetune(config, t, os.path.join(out, name.replace(os.sep, "_")) if len(tasks) > 1 else out,
                              seeds=_SEEDS.value, init_from=init)
        summaries.append(dict(summary, name=name))
        print(ft.results_table([summaries[-1]]), end="")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(ft.results_table(summaries))
    print(f"results: {out}/results.md" + (" (+ results.json per task)" if len(tasks) > 1 else ", results.json"))


def eval_probe() -> dict:
    from mxdna_jax.evaluation import probe

    _check_counts()
    if not _INIT.value or not _WORKDIR.value:
        raise cli.UserError("probe needs --init_from (a trained model) and --workdir=OUT")
    result = probe.probe(_INIT.value, _WORKDIR.value, _DATA.value, split=_SPLIT.value, seed=_SEED.value,
                         batch_size=_BATCH_SIZE.value, window=_WINDOW.value, max_per_split=_MAX_PER_SPLIT.value,
                         linear_max_iter=_LINEAR_MAX_ITER.value)
    print(probe.results_markdown(result), end="")
    print(f"results: {os.path.join(cli.abspath(_WORKDIR.value), 'probe.json')}, probe.md")
    return result


def main(argv):
    from absl import logging as absl_logging

    from mxdna_jax.checkpoint import CorruptCheckpointError

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    commands = {"mlm": eval_mlm, "embed": eval_embed, "tokenize": eval_tokenize, "finetune": eval_finetune,
                "plots": eval_plots, "probe": eval_probe}
    if len(argv) != 2 or argv[1] not in commands:
        return cli.fail(f"usage: eval.py {{{','.join(commands)}}} [flags]; got {argv[1:]}", cli.EXIT_BAD_INPUT)
    try:
        commands[argv[1]]()
    except (cli.UserError, OSError, ValueError, CorruptCheckpointError) as e:
        # OSError: FileNotFoundError/PermissionError for a path. Anything else is a bug: traceback.
        return cli.fail(e, cli.EXIT_BAD_INPUT)
    return cli.EXIT_OK


if __name__ == "__main__":
    if sys.argv[1:2] == ["finetune"]:  # training steps gain; a forward alone loses ~3.5% (host_malloc.py)
        host_malloc.tune_for_xla_cpu()  # before JAX starts its CPU threads
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
