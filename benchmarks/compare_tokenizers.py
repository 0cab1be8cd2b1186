"""The paper's comparisons at CPU scale, one command:

    python benchmarks/compare_tokenizers.py --out=benchmarks/results/compare      # ~2 h on 2 cores
    python benchmarks/compare_tokenizers.py --quick --out=/tmp/compare_quick      # a few minutes

1. Tokenizers behind one backbone (Table 3): pretrain `single`, non-overlapping 6-mer (`kmer`),
   `bpe` (trained on the same corpus, saved next to its checkpoint) and MxDNA's `learnt` tokenizer
   with the same backbone, steps, batch and data (human chr20 by default); fine-tune each on the
   GUE tasks, `--seeds` seeds; MCC mean +- sample std.
2. Component ablation (Table 4): the four `configs/ablation.py` variants (single; + conv experts;
   + deformable conv; + jitter) pretrained and fine-tuned the same way on `--ablation_tasks`.

Writes OUT/results.json (every run's numbers and settings) and OUT/results.md (the two tables).
Each pretraining run is a train.py workdir (OUT/pretrain/<name>); each fine-tuning an eval.py
finetune output (OUT/finetune/<name>/<task>); a rerun skips what is already complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import run_log  # noqa: E402 (benchmarks/common.py, next to this file)

SHARED = ROOT.parent / "shared" / "data"
GUE = SHARED / "gue_deepgene_mirror"
TOKENIZERS = ("single", "kmer", "bpe", "learnt")
BASELINE = {"single": "single", "kmer": "kmer", "bpe": "bpe", "learnt": "mxdna"}  # configs/baselines.py
ABLATION = ("single", "experts", "deformable", "full")


def load_config(name: str, variant: str | None = None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


def backbone(c, args):
    """The shared backbone and schedule; everything but the tokenizer fields is identical."""
    with c.unlocked():
        c.model.update(hidden_size=args.hidden, num_attention_heads=args.heads, intermediate_size=2 * args.hidden,
                       num_nucleotide_layers=args.layers, num_token_layers=args.layers,
                       max_position_embeddings=512)
        c.data.update(fasta=args.fasta, window=args.window, global_batch_size=args.batch, num_workers=0,
                      val_fraction=0.01)
        c.train.update(steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 10), log_every=25,
                       eval_every=args.steps, eval_batches=4)
        c.checkpoint.update(every_steps=args.steps, keep=1)
        c.finetune.update(epochs=args.epochs, batch_size=32, lr=args.ft_lr, max_train=args.max_train,
                          max_length=320, patience=2)
    return c


def pretrain_run(name, config, out: pathlib.Path, log):
    from mxdna_jax import params_io, pretrain

    wd = out / "pretrain" / name
    try:
        step = params_io.latest_good_step(wd)[0]
    except Exception:  # noqa: BLE001 (no usable checkpoint yet: train)
        step = -1
    if step < int(config.train.steps):
        t0 = time.time()
        pretrain.run(config, str(wd))
        log(f"pretrained {name} in {time.time() - t0:.0f} s")
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    return {"workdir": str(wd), "val_mlm_loss": val[-1]["val_mlm_loss"] if val else None,
            "tokens_per_nt": train[-1].get("tokens_per_nt") if train else None}


def finetune_run(name, config, task: str, out: pathlib.Path, init_from: str, seeds: int, log):
    from mxdna_jax.evaluation import finetune as ft

    dst = out / "finetune" / name / task.replace("/", "_")
    if (dst / "results.json").exists():
        return json.loads((dst / "results.json").read_text())
    t0 = time.time()
    summary = ft.finetune(config, str(GUE / task), str(dst), seeds=seeds, init_from=init_from, progress=False)
    ms = summary["mean_std"]["test/mcc"]
    log(f"{name} {task}: test MCC {100 * ms['mean']:.2f} +- {100 * ms['std']:.2f} ({time.time() - t0:.0f} s)")
    return summary


def table(title: str, names, tasks, results) -> str:
    from mxdna_jax.evaluation.metrics import fmt_mean_std

    lines = [f"### {title}", "", "| | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for n in names:
        cells, means = [], []
        for t in tasks:
            ms = results[n]["tasks"][t]["mean_std"]["test/mcc"]
            cells.append(fmt_mean_std(ms))
            means.append(ms["mean"])
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {100 * sum(means) / len(means):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare"))
    p.add_argument("--fasta", default=str(SHARED / "human_chr20_grch37" / "20.fa.gz"))
    p.add_argument("--tasks", default="prom/prom_core_all,prom/prom_300_tata,tf/0,mouse/0")
    p.add_argument("--ablation_tasks", default="prom/prom_core_all,mouse/0")
    p.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (each tokenizer)")
    p.add_argument("--window", type=int, default=126)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="nucleotide layers = token layers")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft_lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max_train", type=int, default=2000, help="stratified train subsample per task (0 = all)")
    p.add_argument("--bpe_vocab", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 task, 1 seed")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.max_train, args.epochs, args.batch = 20, 1, 256, 1, 16
        args.tasks, args.ablation_tasks, args.hidden, args.heads, args.layers = "prom/prom_300_tata", "", 32, 2, 1
        args.bpe_vocab = 256
    out = pathlib.Path(args.out).absolute()
    log = run_log(out)

    tasks = [t for t in args.tasks.split(",") if t]
    ab_tasks = [t for t in args.ablation_tasks.split(",") if t]
    t_start = time.time()
    results: dict = {"settings": vars(args), "tokenizers": {}, "ablation": {}}
    cfgs = {}
    for name in [t for t in args.tokenizers.split(",") if t]:
        c = backbone(load_config("baselines", BASELINE[name]), args)
        if name == "bpe":
            with c.unlocked():
                c.model.bpe_vocab_size = args.bpe_vocab
        if name == "bpe":
            from mxdna_jax.tokenizers import bpe

            bpe_path = out / "pretrain" / name / bpe.BPE_FILENAME
            if not bpe_path.exists():
                bpe_path.parent.mkdir(parents=True, exist_ok=True)
                bpe.train_bpe([args.fasta], args.bpe_vocab, str(bpe_path))
            with c.unlocked():
                c.model.bpe_path = str(bpe_path)
        cfgs[name] = c
        pre = pretrain_run(name, c, out, log)
        results["tokenizers"][name] = {"pretrain": pre, "tasks": {
            t: finetune_run(name, c, t, out, pre["workdir"], args.seeds, log) for t in tasks}}
    done_models = {json.dumps(cfgs[n].model.to_dict(), sort_keys=True): n for n in cfgs}
    for variant in ABLATION if ab_tasks else ():
        c = backbone(load_config("ablation", variant), args)
        # A variant whose model section equals a tokenizer run's (single = `single`, full = `learnt`)
        # is that run: reuse its pretraining and fine-tuning instead of training it twice.
        name = done_models.get(json.dumps(c.model.to_dict(), sort_keys=True), f"ablation_{variant}")
        pre = pretrain_run(name, c, out, log)
        results["ablation"][variant] = {"pretrain": pre, "tasks": {
            t: finetune_run(name, c, t, out, pre["workdir"], args.seeds, log) for t in ab_tasks}}
    results["seconds"] = time.time() - t_start
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    md = [f"Test MCC (%) mean +- sample std over {args.seeds} seed(s); backbone d={args.hidden}, "
          f"{args.layers}+{args.layers} layers, {args.steps} pretraining steps x {args.batch} x {args.window} nt of "
          f"{os.path.basename(args.fasta)}; fine-tuning {args.epochs} epochs on <= {args.max_train} train rows. "
          f"Total {results['seconds'] / 60:.0f} min.", ""]
    if results["tokenizers"]:
        md.append(table("Tokenizers (one backbone)", list(results["tokenizers"]), tasks, results["tokenizers"]))
    if results["ablation"]:
        md.append(table("Component ablation (learnt tokenizer)", list(results["ablation"]), ab_tasks,
                        results["ablation"]))
    (out / "results.md").write_text("\n".join(md))
    log(f"done in {results['seconds'] / 60:.1f} min -> {out / 'results.md'}")


if __name__ == "__main__":
    main()
