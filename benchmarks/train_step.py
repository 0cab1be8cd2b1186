"""Train-step benchmark: throughput, peak memory, compile time and FLOP utilisation.

    python benchmarks/train_step.py [--configs tiny base] [--lengths 512 1024] [--batch 4]
                                    [--modes original compact] [--dtypes float32 bfloat16] [--quick]
                                    [--layer-loops scan unrolled scan:dots]

The step is the real one (`train_lib.make_train_step`: MLM loss + aux, AdamW, clipping) on a
1-device mesh, fed real human chr20 windows with DNABERT masking. Model FLOPs of a step are taken
as 3x the forward's useful FLOPs (forward + backward), counted analytically from the config and
the measured token counts (benchmarks/common.py). Utilisation is against a 4096^3 matmul of the
same dtype timed after every step in the same process, so machine load hits both sides alike.
Writes benchmarks/results/train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402
from mxdna_jax import host_malloc, optim, sharding, train_lib  # noqa: E402
from mxdna_jax.data.masking import mask_tokens  # noqa: E402
from mxdna_jax.layers import set_attention_implementation  # noqa: E402
from mxdna_jax.model import MxDNAForMaskedLM  # noqa: E402
from mxdna_jax.capacity import CapacityPolicy  # noqa: E402
from mxdna_jax.objectives.mlm import mlm_loss_fn  # noqa: E402

TRAIN = dict(lr=1e-4, warmup_steps=10, steps=1000, min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.98,
             grad_clip=1.0)


def make_batch(L, B, seed=0, fasta=common.DEFAULT_FASTA):
    inputs, _ = common.real_windows(L, B, seed=seed, fasta=fasta)
    ids, labels = mask_tokens(inputs["input_ids"], np.random.default_rng(seed))
    return dict(inputs, input_ids=ids, labels=labels)


def token_stats(cfg, graphdef, state, batch, capacity):
    model = nnx.merge(graphdef, state.params, state.rest)
    out = nnx.jit(lambda m, b: m(b["input_ids"], b["attention_mask"], b["special_tokens_mask"],
                                 token_capacity=capacity).backbone)(model, batch)
    return common.unit_stats(out.center, out.all, out.token_mask, cfg)


# --layer-loops: how the identical layers run (ModelConfig.layer_loop), optionally with remat and its
# policy after a colon: 'auto', 'scan', 'unrolled', 'scan:dots' (remat, matmul outputs kept), 'scan:nothing'.
def parse_variant(v: str) -> dict:
    loop, _, policy = v.partition(":")
    return dict(layer_loop=loop, remat=bool(policy), **({"remat_policy": policy} if policy else {}))


def prepare(name, L, B, mode, dtype, log, fasta=common.DEFAULT_FASTA, attention=None, variant=None,
            capacity_mode="tracked", weights=None):
    """Everything up to a compiled, warmed-up step: a dict `run` with run['step']() doing one timed step.

    Compact capacity (`capacity_mode`): 'tracked' = where a training run's CapacityTracker (the
    default train.capacity_* fields) settles for batches like this one: the smallest rung holding
    (1 + margin) x the batch's longest sequence; 'fixed' = the config's 0.5 x L."""
    overrides = parse_variant(variant) if variant else {}
    cfg = common.model_config(name, mode=mode, dtype=dtype, max_position_embeddings=max(L, 512), **overrides)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, sched = optim.make_optimizer(TRAIN)

    def ctor():
        model = MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(params=0))
        common.load_weights(model, weights)  # --weights: e.g. the official initialisation
        set_attention_implementation(model, attention)  # ops/attention.py; None: per platform
        return model

    graphdef, state, sh = train_lib.init_train_state(ctor, tx, mesh, seed=0)
    step = train_lib.make_train_step(mlm_loss_fn, tx, graphdef, sh, mesh, compute_dtype=dtype, schedule=sched)
    batch = sharding.host_batch_to_global(make_batch(L, B, fasta=fasta), mesh)
    policy = CapacityPolicy.for_model(cfg, L, adaptive=capacity_mode == "tracked")
    stats = token_stats(cfg, graphdef, state, batch, L if policy.enabled else None)  # L rows hold every token
    capacity = policy.initial
    if policy.enabled and capacity_mode == "tracked":
        capacity = policy.tracker().target(stats["max_tokens_per_seq"])
    elif capacity is not None and stats["max_tokens_per_seq"] > capacity:
        capacity = L
    # The step draws router jitter, so its token count can exceed the jitter-free count above: an
    # overflowed step leaves the state untouched (train_lib), and the next rung is compiled, as a
    # training run's retry would (counted in the row as capacity_retries).
    retries = 0
    while True:
        run = _compile_and_first_step(name, cfg, L, B, mode, dtype, attention, variant, capacity_mode, policy,
                                      stats, step, mesh, state, batch, capacity, log)
        if not bool(run["metrics"]["overflow"]):
            run["capacity_retries"] = retries
            return run
        if capacity is None or capacity >= L or retries >= 4:
            raise RuntimeError(f"capacity overflow in the benchmark batch at capacity {capacity}")
        state, retries = run["state"], retries + 1
        capacity = min(L, policy.bucket_for(capacity + 1))
        log(f"  overflow at the tracked capacity: retrying at {capacity}")


def _compile_and_first_step(name, cfg, L, B, mode, dtype, attention, variant, capacity_mode, policy, stats, step,
                            mesh, state, batch, capacity, log):
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, batch, capacity).compile()
    compile_s = time.perf_counter() - t0
    cudnn_calls = common.cudnn_attention_calls(compiled)
    mem = None
    if compiled is not None:
        try:
            ma = compiled.memory_analysis()
            mem = {"temp_bytes": int(ma.temp_size_in_bytes), "argument_bytes": int(ma.argument_size_in_bytes),
                   "output_bytes": int(ma.output_size_in_bytes)}
            mem["peak_bytes"] = mem["temp_bytes"] + mem["argument_bytes"]
        except Exception as e:  # noqa: BLE001 - not every backend reports it
            log(f"  memory analysis unavailable: {e}")
    run = dict(cfg=cfg, name=name, L=L, B=B, mode=mode, dtype=dtype, attention=attention, variant=variant,
               capacity=capacity, capacity_mode=capacity_mode if policy.enabled else "none", stats=stats,
               compile_s=compile_s, cudnn_calls=cudnn_calls, mem=mem)

    def one():
        t0 = time.perf_counter()
        run["state"], run["metrics"] = step(run["state"], batch, token_capacity=capacity)
        jax.block_until_ready(run["metrics"])
        return time.perf_counter() - t0

    run["state"], run["step"] = state, one
    run["first_step_s"] = one()  # first call (cached executable)
    return run


def finish(run, times, peaks, log):
    """The result row of a prepared run from its step times and the matmul rates timed next to them."""
    cfg, B, L, mode, capacity, mem = run["cfg"], run["B"], run["L"], run["mode"], run["capacity"], run["mem"]
    fl = common.analytic_flops(cfg, B, L, run["stats"], mode=mode, capacity=capacity)
    step_flops = 3.0 * fl["model"]["total"]
    med = statistics.median(times)
    peak = statistics.median(peaks)
    row = dict(config=run["name"], L=L, batch=B, mode=mode, dtype=run["dtype"],
               attention=run["attention"] or "default", layer_loop=cfg.layer_loop,
               remat=cfg.remat_policy if cfg.remat else "off", capacity=capacity or L,
               capacity_policy=run["capacity_mode"], capacity_retries=run.get("capacity_retries", 0),
               tokens_per_seq=float(np.mean(run["stats"]["tokens_per_seq"])),
               max_tokens_per_seq=run["stats"]["max_tokens_per_seq"],
               capacity_over_real=(capacity or L) / run["stats"]["max_tokens_per_seq"], compile_s=run["compile_s"],
               first_step_s=run["first_step_s"], step_s=med, step_times_s=times, nt_per_s=B * L / med,
               model_gflop_per_step=step_flops / 1e9, model_gflops=step_flops / med / 1e9, peak_gflops=peak,
               mfu=step_flops / med / 1e9 / peak,
               # per (step, matmul) pair, then the median: load that hits a pair hits both sides
               mfu_paired=statistics.median(step_flops / t / 1e9 / p for t, p in zip(times, peaks)),
               memory=mem, loss=float(run["metrics"]["loss"]), cudnn_attention_calls=run["cudnn_calls"])
    log(f"  {run['name']} L={L} {mode} {run['dtype']} {run['variant'] or ''}: {row['nt_per_s']:.0f} nt/s, "
        f"step {med:.2f}s, MFU {row['mfu']:.0%} (paired {row['mfu_paired']:.0%}), compile {run['compile_s']:.1f}s, "
        f"peak mem {(mem or {}).get('peak_bytes', 0) / 2**20:.0f} MiB")
    return row


def bench_group(name, L, B, mode, dtypes, repeats, probes, log, fasta=common.DEFAULT_FASTA, attention=None,
                variants=(None,), capacity_mode="tracked", weights=None):
    """One row per (dtype, variant); their timed steps alternate (a, b, c, a, b, c, ...), each
    followed by one peak matmul of its dtype, so the ratios between rows (bf16 / fp32 included)
    see the same machine load."""
    runs = [prepare(name, L, B, mode, dtype, log, fasta=fasta, attention=attention, variant=v,
                    capacity_mode=capacity_mode, weights=weights) for dtype in dtypes for v in variants]
    times, peaks = [[] for _ in runs], [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            times[i].append(run["step"]())
            peaks[i].append(probes[run["dtype"]].gflops_once())
    return [finish(run, t, p, log) for run, t, p in zip(runs, times, peaks)]


def bench_one(name, L, B, mode, dtype, repeats, probes, log, fasta=common.DEFAULT_FASTA, attention=None,
              capacity_mode="tracked", weights=None):
    return bench_group(name, L, B, mode, [dtype], repeats, probes, log, fasta=fasta, attention=attention,
                       capacity_mode=capacity_mode, weights=weights)[0]


def render(result):
    rows = result["rows"]
    lines = [f"# Train-step benchmark\n\n{result['machine'].get('date', '')} · jax {result['machine'].get('jax')} · "
             f"{result['machine'].get('cpu_count')} CPUs ({result['machine'].get('cpu_model', '?')}, "
             f"{result['machine'].get('cpu_isa', '?')}) · glibc malloc "
             f"{result['machine'].get('host_malloc', 'default')}\n",
             "Real human chr20 windows, DNABERT masking, MLM + 0.01 aux loss, AdamW; batch "
             f"{rows[0]['batch'] if rows else '?'}; nt/s counts B x L positions. MFU = 3 x forward model FLOPs / "
             "step time / same-dtype 4096^3 matmul rate timed after each step (model FLOPs: the useful work at the "
             "measured token count, whatever the capacity). Compact capacity: 'tracked' = the rung a training run's "
             "capacity tracker settles at for this batch (>= 1.05 x its longest sequence's token rows, shown in "
             "brackets), 'fixed' = 0.5 x L. "
             + common.weights_label(dict(result["args"], seed=0)) + ".\n"]
    headers = ["config", "L", "mode", "dtype", "layers", "remat", "capacity", "tokens/seq (max)", "compile s", "step s",
               "nt/s", "model GFLOP/s", "matmul GFLOP/s", "MFU", "MFU paired", "peak MiB"]
    body = [[r["config"], r["L"], r["mode"], r["dtype"], r.get("layer_loop", "unrolled"), r.get("remat", "off"),
             f"{r['capacity']} ({r.get('capacity_policy', 'fixed')}"
             + (f", {r['capacity_retries']} overflow retr{'y' if r['capacity_retries'] == 1 else 'ies'}"
                if r.get("capacity_retries") else "") + ")",
             f"{common.fmt(r['tokens_per_seq'])} ({r.get('max_tokens_per_seq', '-')})",
             common.fmt(r["compile_s"]), common.fmt(r["step_s"]), f"{r['nt_per_s']:,.0f}",
             common.fmt(r["model_gflops"]), common.fmt(r["peak_gflops"]), f"{r['mfu']:.0%}",
             f"{r['mfu_paired']:.0%}" if "mfu_paired" in r else "-",
             f"{(r['memory'] or {}).get('peak_bytes', 0) / 2**20:,.0f}"] for r in rows]
    lines.append(common.md_table(headers, body))
    ratios = []
    same = lambda x, r, *keys: all(x[k] == r[k] for k in ("config", "L", "dtype", "mode", *keys))  # noqa: E731
    for r in rows:
        if r.get("layer_loop", "unrolled") != "unrolled" or r.get("remat", "off") != "off":
            u = next((x for x in rows if same(x, r) and x.get("layer_loop") == "unrolled"
                      and x.get("remat", "off") == "off"), None)
            if u:
                ratios.append(f"- {r['config']} L={r['L']} {r['mode']} {r['dtype']}: {r['layer_loop']} "
                              f"(remat {r['remat']}) / unrolled: step time {r['step_s'] / u['step_s']:.2f}x "
                              f"(paired MFU ratio {r['mfu_paired'] / u['mfu_paired']:.2f}), compile "
                              f"{r['compile_s'] / u['compile_s']:.2f}x")
        if r["mode"] == "compact":
            o = next((x for x in rows if x["mode"] == "original" and x["config"] == r["config"]
                      and x["L"] == r["L"] and x["dtype"] == r["dtype"]), None)
            if o:
                ratios.append(f"- {r['config']} L={r['L']} {r['dtype']}: compact / original = "
                              f"{r['nt_per_s'] / o['nt_per_s']:.2f}x")
        if r["dtype"] == "bfloat16":
            f = next((x for x in rows if x["dtype"] == "float32" and all(
                x.get(k) == r.get(k) for k in ("config", "L", "mode", "layer_loop", "remat"))), None)
            if f:
                ratios.append(f"- {r['config']} L={r['L']} {r['mode']} {r.get('layer_loop')} (remat {r.get('remat')}): "
                              f"bf16 / fp32 = {r['nt_per_s'] / f['nt_per_s']:.2f}x")
    if ratios:
        lines.append("\n## Ratios (same run)\n\n" + "\n".join(ratios))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["tiny", "base"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=["original", "compact"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny config, L=128, 2 repeats (smoke test)")
    p.add_argument("--fasta", default=common.DEFAULT_FASTA)
    p.add_argument("--peak-n", type=int, default=4096, help="n of the n^3 matmul the MFU is measured against")
    p.add_argument("--attention", default="default", choices=["default", "xla", "cudnn", "reference"],
                   help="attention implementation (mxdna_jax/ops/attention.py; default: chosen per platform)")
    p.add_argument("--layer-loops", nargs="+", default=None, metavar="LOOP[:REMAT_POLICY]",
                   help="variants timed alternately in this process, with every dtype: 'scan', 'unrolled', "
                        "'scan:dots' (remat, "
                        "ModelConfig.remat_policy after the colon); default: the config's own")
    p.add_argument("--capacity", default="tracked", choices=["tracked", "fixed"],
                   help="compact capacity: 'tracked' = the rung a training run's CapacityTracker settles at for "
                        "this batch (margin 0.05 over its longest sequence); 'fixed' = 0.5 x L")
    p.add_argument("--weights", default=None, metavar="SAFETENSORS",
                   help="official-named weights to train from instead of fresh ones (common.load_weights)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    p.add_argument("--name", default=None, help="output file stem (default: train_step, or train_step_quick)")
    a = p.parse_args(argv)
    if a.quick:
        a.configs, a.lengths, a.repeats = ["tiny"], [128], 2
    log = lambda s: print(s, flush=True)
    probes = {d: common.PeakProbe(d, n=a.peak_n) for d in a.dtypes}
    attention = None if a.attention == "default" else a.attention
    rows = []
    for name in a.configs:
        for L in a.lengths:
            for mode in a.modes:
                rows += bench_group(name, L, a.batch, mode, a.dtypes, a.repeats, probes, log, fasta=a.fasta,
                                    attention=attention, variants=a.layer_loops or (None,),
                                    capacity_mode=a.capacity, weights=a.weights)
    result = {"machine": common.machine_info(), "args": vars(a), "rows": rows}
    out = pathlib.Path(a.out)
    stem = a.name or ("train_step_quick" if a.quick else "train_step")
    common.write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    host_malloc.tune_for_xla_cpu()  # as train.py does: the step is timed as a training run runs it
    raise SystemExit(main())
