"""How well the compact capacity follows the data in a real training run, and what other settings
of the one policy would have done on the same batches.

    python train.py --config=configs/tiny.py --workdir=runs/cap_chr20 \
        --config.data.fasta=/work/shared/data/human_chr20_grch37/20.fa.gz --config.data.window=1022 \
        --config.model.max_position_embeddings=1024 --config.data.global_batch_size=8 \
        --config.train.steps=400 --config.train.log_every=1
    python benchmarks/capacity_replay.py --workdir=runs/cap_chr20 --length=1024

Reads the run's metrics.jsonl (`train.log_every=1`, so each line is one step: the capacity the
step ran at, the batch's longest sequence in token rows, its mean, the overflow retries) and
reports:
- the run as it happened: retries, token rows run / rows needed (the batch's longest sequence,
  what any per-batch capacity must hold; retried attempts count in full), against a fixed 0.5 x L;
- the same count sequence replayed through `CapacityTracker` for a grid of (margin, patience),
  and through `CountedCapacity` (inference, which counts before it runs).
The replay is exact: a capacity changes how many rows are computed, never the tokens, so the
counts do not depend on the policy that was running. Writes OUT/capacity_replay.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repo root on sys.path)

from mxdna_jax.capacity import CapacityPolicy  # noqa: E402
from mxdna_jax.config import ModelConfig  # noqa: E402


def read_steps(workdir: pathlib.Path) -> list[dict]:
    """One dict per step (the last line per step wins: a resumed run re-logs its steps), with
    `retried_rows`: the capacities of its overflowed attempts (capacity_grown events)."""
    rows, retried = {}, {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train" and "real_tokens_max" in r:
            rows[r["step"]] = r
        elif r.get("kind") == "event" and r.get("event") == "capacity_grown":
            retried.setdefault(r["step"], {})[r["old"]] = r["old"]  # a resumed run may log it again
    for step, r in rows.items():
        r["retried_rows"] = sum(retried.get(step, {}).values())
    steps = [rows[s] for s in sorted(rows)]
    gaps = {b["step"] - a["step"] for a, b in zip(steps, steps[1:])}
    if not steps or gaps - {1}:
        raise SystemExit(f"{workdir}/metrics.jsonl: need one train line per step (train.log_every=1); "
                         f"found {len(steps)} lines, step gaps {sorted(gaps)}")
    return steps


def run_summary(steps: list[dict], fixed: int) -> dict:
    """The run as it happened (`fixed`: the capacity a fixed 0.5 x L policy would have used)."""
    # one step per line: the window means are that step's values (trainer._Window)
    counts = [int(round(s["real_tokens_max"])) for s in steps]
    caps = [int(round(s["token_capacity_mean"])) for s in steps]  # the capacity the step held at
    mean_tokens = [s["capacity_utilisation"] * c for s, c in zip(steps, caps)]
    retries = [int(s.get("overflow_retries", 0)) for s in steps]
    need = sum(counts)
    rows_run = sum(caps) + sum(s.get("retried_rows", 0) for s in steps)
    return {"steps": len(steps), "retries": sum(retries), "retry_rate": sum(retries) / len(steps),
            "rows_run_over_needed": rows_run / need, "capacity_over_needed": sum(caps) / need,
            "capacity_over_mean_tokens": sum(caps) / sum(mean_tokens),
            "fixed_over_needed": fixed * len(steps) / need, "fixed_capacity": fixed,
            "needed_mean": need / len(steps), "needed_min": min(counts), "needed_max": max(counts),
            "mean_tokens_mean": sum(mean_tokens) / len(steps),
            "last_100": {"capacity_over_needed": sum(caps[-100:]) / sum(counts[-100:]),
                         "retries": sum(retries[-100:])},
            "capacities": caps, "counts": counts}


def replay_training(policy: CapacityPolicy, counts: list[int]) -> dict:
    """The tracker on a sequence of per-batch largest counts: each step at the tracker's capacity,
    re-run at `tracker.grow` until it holds (every attempt computes its rows)."""
    tr = policy.tracker()
    rows_run = retries = 0
    caps, compiled = [], {tr.capacity}
    for i, count in enumerate(counts):
        held = tr.capacity
        rows_run += held
        while count > held:
            held = tr.grow(held)
            rows_run += held
            retries += 1
        caps.append(held)
        compiled.add(held)
        tr.update(held, count, remaining=len(counts) - i - 1)
        compiled.add(tr.capacity)
    return dict(summary(counts, caps, rows_run, retries, compiled), capacities=caps)


def replay_inference(policy: CapacityPolicy, counts: list[int]) -> dict:
    cc = policy.counted()
    caps = []
    for count in counts:
        _, cap = cc.run(count, lambda c, count=count: (None, count > c))
        caps.append(cap)
    return dict(summary(counts, caps, sum(caps), 0, set(caps)), capacities=caps)


def summary(counts, caps, rows_run, retries, compiled) -> dict:
    need = sum(counts)
    return {"steps": len(counts), "retries": retries, "retry_rate": retries / len(counts),
            "rows_run_over_needed": rows_run / need, "capacity_over_needed": sum(caps) / need,
            "capacities_compiled": len(compiled - {None})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a train.py workdir run with train.log_every=1")
    p.add_argument("--length", type=int, required=True, help="padded length L incl. [CLS]/[SEP] (data.window + 2)")
    p.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    p.add_argument("--patience", type=int, nargs="+", default=[3, 10, 30])
    p.add_argument("--min-remaining", type=int, default=100, help="train.capacity_min_remaining of the replays")
    p.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results" / "capacity"))
    a = p.parse_args(argv)
    wd = pathlib.Path(a.workdir)
    steps = read_steps(wd)
    run = run_summary(steps, CapacityPolicy.for_model(ModelConfig(), a.length).initial)
    counts = run["counts"]
    grid = []
    for m in a.margins:
        for pat in a.patience:
            pol = CapacityPolicy.for_model(ModelConfig(), a.length, adaptive=True, margin=m, patience=pat,
                                           min_remaining=a.min_remaining)
            grid.append({"margin": m, "patience": pat, **replay_training(pol, counts)})
    inference = replay_inference(CapacityPolicy.for_model(ModelConfig(), a.length, adaptive=True), counts)
    result = {"machine": common.machine_info(), "workdir": str(wd), "length": a.length, "run": run,
              "replay_training": grid, "replay_inference": inference}
    out = pathlib.Path(a.out)
    common.write_json(out / "capacity_replay.json", result)
    (out / "capacity_replay.md").write_text(render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    run = r["run"]
    lines = [f"# Compact capacity on real batches ({r['workdir']}, L = {r['length']})", "",
             f"{run['steps']} training steps; the batch's longest sequence needs {run['needed_mean']:.1f} token rows "
             f"on average (min {run['needed_min']}, max {run['needed_max']}; mean sequence "
             f"{run['mean_tokens_mean']:.1f}). 'rows / needed' = token rows the token layers ran (retried attempts "
             "included) / the batch's longest sequence, summed over steps.", "",
             "| | rows / needed | capacity / mean sequence | retries |", "|---|---|---|---|",
             f"| the run (default policy) | {run['rows_run_over_needed']:.3f}x (without the retried attempts "
             f"{run['capacity_over_needed']:.3f}x; last 100 steps {run['last_100']['capacity_over_needed']:.3f}x) | "
             f"{run['capacity_over_mean_tokens']:.3f}x | "
             f"{run['retries']} / {run['steps']} |",
             f"| fixed 0.5 x L = {run['fixed_capacity']} | {run['fixed_over_needed']:.3f}x | - | - |", "",
             "Replayed on the same counts (training: `CapacityTracker`; inference: `CountedCapacity`, which counts "
             "first):", "",
             "| policy | margin | patience | rows / needed | retries | capacities compiled |",
             "|---|---|---|---|---|---|"]
    for g in r["replay_training"]:
        lines.append(f"| training | {g['margin']} | {g['patience']} | {g['rows_run_over_needed']:.3f}x | "
                     f"{g['retries']} ({100 * g['retry_rate']:.1f}%) | {g['capacities_compiled']} |")
    i = r["replay_inference"]
    lines.append(f"| inference (counted) | - | - | {i['rows_run_over_needed']:.3f}x | 0 | {i['capacities_compiled']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
