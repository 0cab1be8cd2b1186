"""MLM vs MAE on DNA barcodes at equal compute, one command (issue: BarcodeMAE's claim):

    python benchmarks/compare_objectives.py --out=benchmarks/results/objectives     # ~2 h on 2 cores
    python benchmarks/compare_objectives.py --quick --out=/tmp/objectives_quick     # a few minutes

For each tokenizer (non-overlapping 6-mers, MxDNA's learnt units) and objective (MxDNA's MLM,
BarcodeMAE's MAE) and seed: pretrain configs/barcode_mae.py:TOKENIZER,OBJECTIVE on the embedded
barcodes (seen-train species; the same encoder, steps and batch for both objectives, the same
species-disjoint split for every run), then `eval.py probe` its frozen encoder: 1-NN genus
accuracy of unseen species, linear-probe species accuracy of seen species.

Writes OUT/results.json (every run) and OUT/results.md (mean +- sample std over seeds). Each
pretraining is a train.py workdir OUT/pretrain/<tok>_<obj>_s<seed>; a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import run_log  # noqa: E402 (benchmarks/common.py, next to this file)

TOKENIZERS = ("kmer", "learnt")
OBJECTIVES = ("mlm", "mae")
PROBE_KEYS = ("knn_genus/accuracy", "knn_genus/macro_f1", "linear_species/accuracy", "linear_species/macro_f1")


def load_config(arg: str):
    spec = importlib.util.spec_from_file_location("cfg_barcode_mae", ROOT / "configs" / "barcode_mae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def run_one(tokenizer, objective, seed, args, out: pathlib.Path, log) -> dict:
    from mxdna_jax import params_io, pretrain
    from mxdna_jax.evaluation import probe

    name = f"{tokenizer}_{objective}_s{seed}"
    wd = out / "pretrain" / name
    c = load_config(f"{tokenizer},{objective}")
    with c.unlocked():
        c.train.update(seed=seed, steps=args.steps, warmup_steps=max(1, args.steps // 10), log_every=25,
                       eval_every=args.steps, eval_batches=4)
        c.data.update(global_batch_size=args.batch, window=args.window)
        c.checkpoint.update(every_steps=args.steps, keep=1)
    saved = wd / "config.json"
    if saved.exists():  # a cached run made with other settings must not stand in for this one
        got = json.loads(saved.read_text())
        have = (got["train"]["steps"], got["data"]["global_batch_size"], got["data"]["window"])
        if have != (args.steps, args.batch, args.window):
            raise SystemExit(f"{wd} was pretrained with (steps, batch, window) = {have}, not "
                             f"{(args.steps, args.batch, args.window)}: use another --out or delete it")
    try:
        done = params_io.latest_good_step(wd)[0] >= args.steps
    except Exception:  # noqa: BLE001 (no usable checkpoint yet)
        done = False
    if not done:
        t0 = time.time()
        pretrain.run(c, str(wd))
        log(f"pretrained {name} in {time.time() - t0:.0f} s")
    dst = out / "probe" / name
    if (dst / "probe.json").exists():
        res = json.loads((dst / "probe.json").read_text())
    else:
        t0 = time.time()
        res = probe.probe(str(wd), str(dst), batch_size=32, max_per_split=args.max_per_split, progress=False)
        log(f"{name}: 1-NN genus {100 * res['knn_genus/accuracy']:.2f}, linear species "
            f"{100 * res['linear_species/accuracy']:.2f} ({time.time() - t0:.0f} s)")
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("kind") == "eval"]
    return {"workdir": str(wd), "probe": {k: res[k] for k in PROBE_KEYS}, "counts": res.get("counts"),
            "val_loss": val[-1].get("val_loss") if val else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "objectives"))
    p.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (every run)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window", type=int, default=660)
    p.add_argument("--max_per_split", type=int, default=0, help="probe: cap each split (0 = all barcodes)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 10 steps, 200 barcodes per split")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.batch, args.max_per_split = 1, 10, 8, 200
    out = pathlib.Path(args.out).absolute()
    log = run_log(out)

    from mxdna_jax.evaluation.metrics import aggregate, fmt_mean_std

    t_start = time.time()
    tokenizers = [t for t in args.tokenizers.split(",") if t]
    results: dict = {"settings": vars(args), "runs": {}}
    for tok in tokenizers:
        for obj in OBJECTIVES:
            for seed in range(args.seeds):
                results["runs"][f"{tok}_{obj}_s{seed}"] = run_one(tok, obj, seed, args, out, log)
    summary = {}
    for tok in tokenizers:
        for obj in OBJECTIVES:
            per_seed = [results["runs"][f"{tok}_{obj}_s{s}"]["probe"] for s in range(args.seeds)]
            summary[f"{tok}_{obj}"] = aggregate(per_seed)
    results["mean_std"] = summary
    results["seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = [f"Frozen-encoder probes (%) mean +- sample std over {args.seeds} seed(s); {args.steps} pretraining steps x "
          f"{args.batch} barcodes x {args.window} nt each (configs/barcode_mae.py, CPU size); total "
          f"{results['seconds'] / 60:.0f} min.", "",
          "| tokenizer | objective | 1-NN genus (unseen species) | linear probe species | 1-NN macro-F1 |",
          "|---|---|---|---|---|"]
    for tok in tokenizers:
        for obj in OBJECTIVES:
            ms = summary[f"{tok}_{obj}"]
            md.append(f"| {tok} | {obj} | {fmt_mean_std(ms['knn_genus/accuracy'])} | "
                      f"{fmt_mean_std(ms['linear_species/accuracy'])} | {fmt_mean_std(ms['knn_genus/macro_f1'])} |")
    (out / "results.md").write_text("\n".join(md) + "\n")
    log(f"done in {results['seconds'] / 60:.1f} min -> {out / 'results.md'}")


if __name__ == "__main__":
    main()
