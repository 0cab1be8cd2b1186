"""Forward-pass benchmark of MxDNAForMaskedLM (throughput, NMS share, compile time, FLOPs).

    python benchmarks/forward.py                      # base config, L = 512 1024 2048, both modes, fp32 + bf16
    python benchmarks/forward.py --quick              # tiny config, one length: a < 1 min smoke test
    python benchmarks/forward.py --lengths 1024 --modes compact --dtypes bfloat16 --repeats 3

For each (L, mode, dtype): one batch of real human chr20 windows (no N), a freshly initialised
model (seed 0), one jitted forward `model(input_ids, attention_mask, special_tokens_mask)` with
the weights as an argument; compile time, then `--warmup` untimed and `--repeats` timed calls
(median reported). Next to it, in the same process: `basic_unit_nms` jitted alone on the router
logits of that forward, a `--peak-n`^3 matmul of the same dtype (the achievable peak), and with
`--breakdown` the forward split into separately jitted stages. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repo root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mxdna_jax import staged  # noqa: E402
from mxdna_jax.capacity import CapacityPolicy  # noqa: E402
from mxdna_jax.layers import set_attention_implementation  # noqa: E402
from mxdna_jax.model import MxDNAForMaskedLM  # noqa: E402
from mxdna_jax.ops.nms import basic_unit_nms  # noqa: E402
from mxdna_jax.tokenizers.base import unit_token_mask  # noqa: E402

# The reference: official PyTorch MxDNA, base config, batch 4 x 1,024 nt, fp32, CPU.
REFERENCE = {"nt_per_s": 1525.0, "gflops_effective": 168.0, "nms_share": 0.002, "batch": 4, "length": 1024,
             "dtype": "float32", "source": "official PyTorch implementation, as quoted in the issue"}
AIMS = {"compact_float32_x_ref": 1.0, "bfloat16_x_ref": 3.0, "nms_share_max": 0.03}


# ----------------------------------------------------------------------------- model plumbing


class Bench:
    """One set of random weights shared by every (mode, dtype) variant: params do not depend on them.

    Weights come from the model's own initialisers, `nnx.Rngs(params=seed)`, with jax's default PRNG
    (threefry). That costs one slow XLA CPU compile per parameter shape (15-30 s), so --quick switches
    to the 'rbg' PRNG (a different draw). The draw matters for the NMS: with rbg seed 0 the random
    router makes every nucleotide a unit of length 1 (tokens = L), with threefry seed 0 units average
    ~3 nt; the unit statistics are reported with every row.
    """

    def __init__(self, cfg, seed: int = 0, attention: str | None = None, weights: str | None = None):
        self.attention = attention  # ops/attention.py implementation (None: per platform)
        t0 = time.perf_counter()
        model = MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(params=seed))
        common.load_weights(model, weights)  # --weights: e.g. the official initialisation
        _, self.state = nnx.split(model)
        self.init_s = time.perf_counter() - t0
        self.base_cfg = cfg
        self.n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.state)))

    def graphdef(self, cfg):
        abstract = nnx.eval_shape(lambda: MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(params=0)))
        set_attention_implementation(abstract, self.attention)
        gd, st = nnx.split(abstract)
        if jax.tree.structure(st) != jax.tree.structure(self.state):
            raise RuntimeError("parameter tree differs between variants")
        return gd


def _outputs(out) -> dict[str, jax.Array]:
    bb = out.backbone
    return {"logits": out.logits, "overflow": out.overflow, "token_mask": bb.token_mask,
            "router_logits": bb.router_logits, "center": bb.center, "all": bb.all, "aux_loss": out.aux_loss}


def forward_fn(graphdef, capacity):
    """One jitted call at a capacity fixed before the batch is seen (`--capacity fixed`, original mode)."""

    def fwd(state, ids, am, sm):
        return _outputs(nnx.merge(graphdef, state)(ids, am, sm, token_capacity=capacity))

    return fwd


def counted_forward(graphdef, policy: CapacityPolicy, state, ids, am, sm):
    """The inference path of a compact model (`--capacity counted`, mxdna_jax.staged): jit 1 runs the
    nucleotide layers and reads the batch's token count, the host picks `policy.bucket_for(count)`,
    jit 2 runs the tokenizer's token rows, the token layers and the head at that capacity.
    Returns (call, its compiled executables, compile times, the capacity); `call` is what is timed,
    host read of the count included."""

    def pre(state, ids, am, sm):
        return staged.prefix(nnx.merge(graphdef, state), ids, am, sm)

    pre_c, ct1 = common.compile_jitted(pre, state, ids, am, sm)
    p, count = pre_c(state, ids, am, sm)
    capacity = policy.bucket_for(int(count))

    def fin(state, p):
        return _outputs(staged.finish(nnx.merge(graphdef, state), p, token_capacity=capacity))

    fin_c, ct2 = common.compile_jitted(fin, state, p)

    def call(state, ids, am, sm):
        p, count = pre_c(state, ids, am, sm)
        if policy.bucket_for(int(count)) != capacity:  # the same batch every call: cannot happen
            raise RuntimeError("the batch's token count changed between calls")
        return fin_c(state, p)

    compile_s = {k: ct1[k] + ct2[k] for k in ct1}
    return call, (pre_c, fin_c), compile_s, capacity


def stage_fns(graphdef, capacity):
    """The forward split into the model's own stages (MxDNAModel / UnitTokenizer / MxDNAForMaskedLM),
    each called as the forward calls it, so nothing here re-derives a stage.

    nucleotide: embed_ids + nucleotide_stage; tokenization: tokenizer_stage (router, NMS, experts,
    deformable conv, compaction); inside it, route = input LN + gate + NMS + unit layout, experts =
    embed_units, deform = token_mask + assemble (deformable block + compaction); token_layers:
    token_stage (RoPE + token layers + final LN); head: decoder_stage (MLM cross decoder + LN + LM head).
    """

    def mlm(state):
        return nnx.merge(graphdef, state)

    def nucleotide(state, ids, am):
        m = mlm(state).model
        return m.nucleotide_stage(m.embed_ids(ids), am).hidden

    def tokenization(state, h, am, sm):
        return mlm(state).model.tokenizer_stage(h, am, sm, capacity=capacity)

    def route(state, h, am, sm):
        return mlm(state).model.tokenization.route(h, am, sm)

    def experts(state, h, r):
        return mlm(state).model.tokenization.embed_units(h, r)[0]

    def deform(state, u, r, am, sm):
        tk = mlm(state).model.tokenization
        return tk.assemble(u, am, sm, tk.token_mask(r.units.center, am, sm), capacity)

    def token_layers(state, tok):
        return mlm(state).model.token_stage(tok)

    def head(state, h_nuc, final, tok, am):
        return mlm(state).decoder_stage(h_nuc, final, tok.positions, tok.mask, am)

    return {"nucleotide": nucleotide, "tokenization": tokenization, "route": route, "experts": experts,
            "deform": deform, "token_layers": token_layers, "head": head}


def run_breakdown(fns, state, ids, am, sm, full_logits, *, warmup, repeats) -> dict[str, Any]:
    res: dict[str, Any] = {}

    def timed(name, fn, *args):
        compiled, ct = common.compile_jitted(fn, *args)
        t = common.time_call(compiled, *args, warmup=warmup, repeats=repeats)
        out = compiled(*args)
        res[name] = {"median_s": t["median_s"], "min_s": t["min_s"], "times_s": t["times_s"], "compile": ct,
                     "xla_cost": common.xla_cost(compiled)}
        return out

    h = timed("nucleotide", fns["nucleotide"], state, ids, am)
    tok = timed("tokenization", fns["tokenization"], state, h, am, sm)
    r = timed("route", fns["route"], state, h, am, sm)
    u = timed("experts", fns["experts"], state, h, r)
    timed("deform", fns["deform"], state, u, r, am, sm)
    t = timed("token_layers", fns["token_layers"], state, tok)
    logits = timed("head", fns["head"], state, h, t, tok, am)
    stages = ("nucleotide", "tokenization", "token_layers", "head")
    res["sum_of_stages_s"] = sum(res[s]["median_s"] for s in stages)
    res["stage_logits_max_abs_diff_vs_forward"] = float(jnp.max(jnp.abs(logits - full_logits)))
    return res


# ----------------------------------------------------------------------------- one configuration


def bench_one(bench: Bench, cfg, L: int, batch_np, args, log) -> dict[str, Any]:
    B = batch_np["input_ids"].shape[0]
    ids, am, sm = (jnp.asarray(batch_np[k]) for k in ("input_ids", "attention_mask", "special_tokens_mask"))
    gd = bench.graphdef(cfg)
    state = bench.state
    rec: dict[str, Any] = {"L": L, "batch": B, "mode": cfg.mode, "dtype": cfg.dtype, "layer_loop": cfg.layer_loop,
                           "attention": bench.attention or "default", "loadavg_before": list(os.getloadavg())}
    counted = cfg.mode == "compact" and args.capacity == "counted"
    policy = CapacityPolicy.for_model(cfg, L, fraction=args.capacity_fraction, adaptive=counted)
    retries = []
    if counted:
        compiled, executables, ct, capacity = counted_forward(gd, policy, state, ids, am, sm)
        first_t0 = time.perf_counter()
        out = common.block(compiled(state, ids, am, sm))
        first_s = time.perf_counter() - first_t0
    else:
        capacity = policy.initial
        while True:
            compiled, ct = common.compile_jitted(forward_fn(gd, capacity), state, ids, am, sm)
            executables = (compiled,)
            first_t0 = time.perf_counter()
            out = common.block(compiled(state, ids, am, sm))
            first_s = time.perf_counter() - first_t0
            if not bool(out["overflow"]):
                break
            # capacity exceeded for this batch: grow to the batch's token count (from the NMS centres,
            # which are complete even when the compacted rows are not), rounded up to 64, and retry
            need = int(np.asarray(unit_token_mask(out["center"], am, sm)).sum(1).max())
            new = min(L, max(capacity + 64, -(-need // 64) * 64))
            retries.append({"capacity": capacity, "tokens_needed": need, "compile": ct})
            log(f"    overflow at capacity {capacity} (batch needs {need}); retrying with {new}")
            capacity = new
    if bool(out["overflow"]):
        raise RuntimeError(f"overflow at capacity {capacity}")
    costs = [common.xla_cost(c) for c in executables]
    xla = {k: (sum(c[k] for c in costs) if all(c[k] is not None for c in costs) else None) for k in costs[0]}
    calls = [common.cudnn_attention_calls(c) for c in executables]
    rec.update(capacity=capacity, capacity_policy="counted" if counted else ("fixed" if capacity else "none"),
               capacity_retries=retries, compile=ct, first_call_s=first_s, xla_cost=xla,
               cudnn_attention_calls=None if None in calls else sum(calls))
    stats = common.unit_stats(out["center"], out["all"], out["token_mask"], cfg)
    rec["overflow"] = bool(out["overflow"])
    rec["tokens"] = stats
    if stats["mean_unit_length"] < 1.5:
        log(f"    WARNING: mean unit length {stats['mean_unit_length']:.2f}: this random draw makes (almost) every "
            "nucleotide a unit; compact mode cannot save anything")
    flops = common.analytic_flops(cfg, B, L, stats, mode=cfg.mode, capacity=capacity, counted=counted)
    rec["flops"] = flops
    rec["capacity_over_real"] = capacity / stats["max_tokens_per_seq"] if capacity else None
    rec["capacity_over_mean"] = capacity / stats["mean_tokens_per_seq"] if capacity else None
    mf, ef = flops["model"]["total"], flops["executed"]["total"]

    # forward calls alternated with a same-dtype peak matmul (machine load hits both alike)
    probe = common.PeakProbe(cfg.dtype, n=args.peak_n)
    t, peaks = common.time_interleaved(compiled, (state, ids, am, sm), probe, warmup=args.warmup,
                                       repeats=args.repeats)
    rec["forward"] = t
    med = t["median_s"]
    rec["peak_adjacent"] = {"gflops": float(np.median(peaks)), "per_call_gflops": peaks, "n": args.peak_n,
                            "form": "dot with fp32 accumulation"}
    rec["nt_per_s"] = B * L / med
    rec["nt_per_s_best"] = B * L / t["min_s"]
    rec["real_nt_per_s"] = B * (L - 2) / med
    rec["model_gflops_per_s"] = mf / med / 1e9
    rec["executed_gflops_per_s"] = ef / med / 1e9
    xf = rec["xla_cost"]["flops"]
    rec["xla_gflops_per_s"] = xf / med / 1e9 if xf else None
    # per pair (forward i, matmul i) ratios, then the median
    rec["model_frac_of_peak"] = float(np.median([mf / ti / 1e9 / p for ti, p in zip(t["times_s"], peaks)]))
    rec["executed_frac_of_peak"] = float(np.median([ef / ti / 1e9 / p for ti, p in zip(t["times_s"], peaks)]))

    # NMS alone on this forward's router logits
    nms = jax.jit(lambda lg, m: basic_unit_nms(lg, m, cfg.expert_kernel_sizes, return_rounds=True))
    lg = out["router_logits"]
    t0 = time.perf_counter()
    nms_c = nms.lower(lg, am).compile()
    nms_compile = time.perf_counter() - t0
    c2, a2, rounds = nms_c(lg, am)
    same = bool(jnp.array_equal(c2, out["center"]) and jnp.array_equal(a2, out["all"]))
    tn = common.time_call(nms_c, lg, am, warmup=args.warmup, repeats=max(args.repeats, 5))
    rec["nms"] = {**tn, "compile_s": nms_compile, "rounds": int(rounds), "share_of_forward": tn["median_s"] / med,
                  "matches_forward": same}

    if args.breakdown:
        fns = stage_fns(gd, capacity)
        rec["breakdown"] = run_breakdown(fns, state, ids, am, sm, out["logits"], warmup=1,
                                         repeats=args.breakdown_repeats)
    rec["loadavg_after"] = list(os.getloadavg())
    return rec


# ----------------------------------------------------------------------------- report


def best_peaks(result: dict[str, Any]) -> dict[str, float]:
    """Highest matmul GFLOP/s seen per dtype anywhere in the run (the least-contended estimate)."""
    best: dict[str, float] = {}
    for dt, p in result.get("peaks", {}).items():
        for k in ("start", "end"):
            if p.get(k):
                best[dt] = max(best.get(dt, 0.0), p[k]["gflops"])
    for r in result["runs"]:
        if "peak_adjacent" in r:
            best[r["dtype"]] = max([best.get(r["dtype"], 0.0)] + r["peak_adjacent"]["per_call_gflops"])
    return best


def projected_nt_per_s(r: dict[str, Any], best: dict[str, float]) -> float:
    """nt/s if the run's measured fraction of peak held at the best peak seen: frac * peak / FLOPs per position."""
    return r["model_frac_of_peak"] * best[r["dtype"]] * 1e9 / (r["flops"]["model"]["total"] / (r["batch"] * r["L"]))


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    runs = result["runs"]
    best = best_peaks(result)
    load_start = f"{m['loadavg_at_start'][0]:.1f}"
    load_end = f"{m['loadavg_at_end'][0]:.1f}" if "loadavg_at_end" in m else "?"
    lines = [
        f"# MxDNA forward benchmark ({result['config_name']} config)",
        "",
        f"{m['date']} · jax {m['jax']} ({m['backend']}) · flax {m['flax']} · {m['cpu_count']} CPUs "
        f"({m['cpu_model']}, {m.get('cpu_isa', '?')}) · glibc malloc {m.get('host_malloc', 'default')} · "
        f"load avg at start {m['loadavg_at_start'][0]:.2f}",
        "",
        f"Batch {result['args']['batch']} of real human chr20 windows (no N); L = sequence length incl. [CLS]/[SEP] "
        f"(L - 2 nucleotides per window, no padding); **nt/s counts all B x L positions**. "
        + common.weights_label(result["args"])
        + f", {result['n_params'] / 1e6:.1f}M parameters. Forward = median of "
        f"{result['args']['repeats']} calls after {result['args']['warmup']} warm-up (best = fastest call). "
        f"Peak = median of a {result['args']['peak_n']}^3 matmul of the same dtype (fp32 accumulation, as the "
        f"model's Dense) timed after each forward call; % peak = median over those (forward, matmul) pairs, so "
        f"machine load cancels to first order. "
        f"Model GFLOP = useful work at the measured token count; executed = what this implementation computes "
        f"(token rows at L in original, at the capacity in compact; expert tiles of 128 rows and all k taps). "
        f"**proj. nt/s** = % peak (model) x the best peak seen in this run "
        f"({', '.join(f'{dt} {g:.0f}' for dt, g in best.items())} GFLOP/s) / model FLOPs per position: the "
        f"throughput on an otherwise idle machine if the measured efficiency holds (1-min load avg: "
        f"{load_start} at start, {load_end} at end of the run; 2 = both cores busy).",
        "",
    ]
    headers = ["L", "mode", "dtype", "capacity", "tokens/seq", "unit len", "compile s", "forward s", "nt/s",
               "nt/s best", "x ref", "proj. nt/s", "proj. x ref", "model MFLOP/nt", "exec MFLOP/nt", "XLA MFLOP/nt",
               "model GFLOP/s", "peak GFLOP/s",
               "% peak (model)", "% peak (exec)", "NMS ms", "NMS %", "NMS rounds"]
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([r["L"], r["mode"], r["dtype"]] + ["error"] + ["-"] * (len(headers) - 4))
            continue
        nt = r["batch"] * r["L"]
        xf = r["xla_cost"]["flops"]
        rows.append([
            r["L"], r["mode"] + (f" ({r['layer_loop']})" if len(result["args"].get("layer_loops") or []) > 1 else ""),
            r["dtype"], r["capacity"] if r["capacity"] is not None else "L",
            common.fmt(r["tokens"]["mean_tokens_per_seq"]), common.fmt(r["tokens"]["mean_unit_length"]),
            common.fmt(r["compile"]["total_s"]), common.fmt(r["forward"]["median_s"]), common.fmt(r["nt_per_s"]),
            common.fmt(r["nt_per_s_best"]),
            common.fmt(r["nt_per_s"] / REFERENCE["nt_per_s"]) if result["config_name"] == "base" else "-",
            common.fmt(projected_nt_per_s(r, best)),
            common.fmt(projected_nt_per_s(r, best) / REFERENCE["nt_per_s"]) if result["config_name"] == "base" else "-",
            common.fmt(r["flops"]["model"]["total"] / nt / 1e6), common.fmt(r["flops"]["executed"]["total"] / nt / 1e6),
            common.fmt(xf / nt / 1e6) if xf else "-",
            common.fmt(r["model_gflops_per_s"]), common.fmt(r["peak_adjacent"]["gflops"]),
            f"{100 * r['model_frac_of_peak']:.0f}%", f"{100 * r['executed_frac_of_peak']:.0f}%",
            common.fmt(1e3 * r["nms"]["median_s"]), f"{100 * r['nms']['share_of_forward']:.2f}%", r["nms"]["rounds"],
        ])
    lines.append(common.md_table(headers, rows, "rll" + "r" * (len(headers) - 3)))
    lines.append("")
    ref = REFERENCE
    lines.append(f"Reference (issue): official PyTorch, base config, batch {ref['batch']} x {ref['length']}, fp32: "
                 f"{ref['nt_per_s']:,.0f} nt/s, ~{ref['gflops_effective']:.0f} GFLOP/s effective, NMS "
                 f"{100 * ref['nms_share']:.1f}% of the forward. Aims: compact fp32 >= 1x, bf16 >= 3x, NMS < 3%.")
    lines.append("")
    peaks = result.get("peaks", {})
    if peaks:
        lines.append("Matmul peaks (GFLOP/s, start / end of run): " + ", ".join(
            f"{dt} {p['start']['gflops']:.0f}" + (f" / {p['end']['gflops']:.0f}" if p.get("end") else "")
            for dt, p in peaks.items()))
        lines.append("")

    bd_runs = [r for r in runs if "breakdown" in r]
    if bd_runs:
        lines += ["## Where the time goes (stages jitted separately, median seconds; share of their sum)", ""]
        st = ["nucleotide", "tokenization", "token_layers", "head"]
        sub = ["route", "experts", "deform"]
        h2 = (["L", "mode", "dtype", "forward s", "sum of stages s"] + st + ["(route+NMS)", "(experts)", "(deform)",
              "NMS alone"])
        rows = []
        for r in bd_runs:
            bd = r["breakdown"]
            tot = bd["sum_of_stages_s"]
            cell = lambda s: f"{bd[s]['median_s']:.3f} ({100 * bd[s]['median_s'] / tot:.0f}%)"  # noqa: E731
            rows.append([r["L"], r["mode"], r["dtype"], f"{r['forward']['median_s']:.3f}", f"{tot:.3f}"]
                        + [cell(s) for s in st] + [cell(s) for s in sub] + [f"{r['nms']['median_s']:.3f}"])
        lines.append(common.md_table(h2, rows, "rll" + "r" * (len(h2) - 3)))
        lines.append("")
        lines.append("Analytic model FLOPs by stage (MFLOP per position, useful work / executed):")
        lines.append("")
        parts = ["nucleotide_layers", "router", "experts", "deformable", "token_layers", "mlm_decoder", "lm_head"]
        rows = []
        for r in bd_runs:
            nt = r["batch"] * r["L"]
            rows.append([r["L"], r["mode"], r["dtype"]] + [
                f"{r['flops']['model'][p] / nt / 1e6:.2f} / {r['flops']['executed'][p] / nt / 1e6:.2f}" for p in parts])
        lines.append(common.md_table(["L", "mode", "dtype"] + parts, rows, "rll" + "r" * len(parts)))
        lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048],
                   help="sequence lengths incl. [CLS]/[SEP]")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=["original", "compact"], choices=["original", "compact"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--config", default="base", choices=["base", "tiny"])
    p.add_argument("--capacity", default="counted", choices=["counted", "fixed"],
                   help="compact mode: 'counted' = the inference path (mxdna_jax.staged: count the batch's "
                        "tokens, then run the token layers at the policy's smallest rung holding them); "
                        "'fixed' = one call at the config's capacity fraction")
    p.add_argument("--capacity-fraction", type=float, default=None,
                   help="--capacity fixed: compact capacity / L (default: the config's token_capacity_fraction)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the forward's stages jitted separately")
    p.add_argument("--breakdown-repeats", type=int, default=3)
    p.add_argument("--peak-n", type=int, default=4096)
    p.add_argument("--peak-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="weights and window sampling")
    p.add_argument("--prng", default=None,
                   help="jax_default_prng_impl for the weight init (default: jax's threefry2x32; --quick: rbg)")
    p.add_argument("--fasta", default=common.DEFAULT_FASTA)
    p.add_argument("--weights", default=None, metavar="SAFETENSORS",
                   help="official-named weights to run instead of the seed's fresh ones (common.load_weights)")
    p.add_argument("--attention", default="default", choices=["default", "xla", "cudnn", "reference"],
                   help="attention implementation (mxdna_jax/ops/attention.py; default: chosen per platform)")
    p.add_argument("--layer-loops", nargs="+", default=None, choices=["auto", "scan", "unrolled"],
                   help="ModelConfig.layer_loop variants, each timed in this process (default: the config's)")
    p.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="output file stem (default: forward, or forward_quick)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only re-render the markdown next to an existing results JSON, then exit")
    p.add_argument("--quick", action="store_true",
                   help="smoke test (< 1 min): tiny config, L=256, fp32 only, no breakdown, 3 repeats, 1024^3 peak "
                        "(explicit --dtypes / --breakdown still apply)")
    a = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else list(argv)
    dtypes_given = "--dtypes" in raw
    breakdown_given = any(x in raw for x in ("--breakdown", "--no-breakdown"))
    if a.quick:
        a.config, a.lengths, a.repeats, a.peak_n, a.peak_repeats = "tiny", [256], 3, 1024, 2
        a.dtypes = a.dtypes if dtypes_given else ["float32"]
        a.prng = a.prng or "rbg"
        a.breakdown = a.breakdown if breakdown_given else False
    a.name = a.name or ("forward_quick" if a.quick else "forward")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        import json

        src = pathlib.Path(args.render)
        src.with_suffix(".md").write_text(render_markdown(json.loads(src.read_text())))
        print(f"wrote {src.with_suffix('.md')}")
        return 0
    t_start = time.perf_counter()
    if args.prng:
        jax.config.update("jax_default_prng_impl", args.prng)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    base_cfg = common.model_config(args.config)
    for L in args.lengths:
        if L > base_cfg.max_position_embeddings:
            raise SystemExit(f"L={L} exceeds max_position_embeddings={base_cfg.max_position_embeddings}")
    result: dict[str, Any] = {"machine": common.machine_info(), "config_name": args.config,
                              "model_config": {k: v for k, v in vars(base_cfg).items()}, "args": vars(args),
                              "reference": REFERENCE, "aims": AIMS, "runs": [], "peaks": {}}
    out_dir = pathlib.Path(args.out)
    log(f"jax {jax.__version__} on {jax.devices()}; building {args.config} model")
    bench = Bench(base_cfg, seed=args.seed, attention=None if args.attention == "default" else args.attention,
                  weights=args.weights)
    result["n_params"], result["init_s"] = bench.n_params, bench.init_s
    log(f"init {bench.init_s:.1f}s, {bench.n_params / 1e6:.1f}M params")
    for dt in args.dtypes:
        result["peaks"][dt] = {"start": common.matmul_peak(dt, n=args.peak_n, repeats=args.peak_repeats)}
        log(f"matmul peak {dt}: {result['peaks'][dt]['start']['gflops']:.1f} GFLOP/s")

    def save():
        common.write_json(out_dir / f"{args.name}.json", result)
        (out_dir / f"{args.name}.md").write_text(render_markdown(result))

    for L in args.lengths:
        batch_np, data_info = common.real_windows(L, args.batch, seed=args.seed, fasta=args.fasta)
        result.setdefault("data", {})[str(L)] = data_info
        for mode in args.modes:
            for dt, loop in ((d, lp) for d in args.dtypes for lp in args.layer_loops or [base_cfg.layer_loop]):
                cfg = base_cfg.replace(mode=mode, dtype=dt, layer_loop=loop)
                log(f"L={L} {mode} {dt} layers {loop}")
                try:
                    rec = bench_one(bench, cfg, L, batch_np, args, log)
                except Exception as e:  # keep the other rows
                    import traceback

                    traceback.print_exc()
                    rec = {"L": L, "mode": mode, "dtype": dt, "error": repr(e)}
                result["runs"].append(rec)
                if "error" not in rec:
                    bd = rec.get("breakdown")
                    log(f"    compile {rec['compile']['total_s']:.1f}s  forward {rec['forward']['median_s']:.3f}s "
                        f"({rec['nt_per_s']:.0f} nt/s"
                        + (f", {rec['nt_per_s'] / REFERENCE['nt_per_s']:.2f}x ref" if args.config == "base" else "")
                        + ")  "
                        f"model {rec['model_gflops_per_s']:.1f} GFLOP/s = {100 * rec['model_frac_of_peak']:.0f}% of "
                        f"{rec['peak_adjacent']['gflops']:.0f}  tokens/seq {rec['tokens']['mean_tokens_per_seq']:.0f} "
                        f"(cap {rec['capacity']})  NMS {1e3 * rec['nms']['median_s']:.1f}ms "
                        f"= {100 * rec['nms']['share_of_forward']:.2f}%"
                        + ("  stages: " + ", ".join(f"{s} {bd[s]['median_s']:.3f}" for s in
                                                     ("nucleotide", "tokenization", "route", "experts", "deform",
                                                      "token_layers", "head")) if bd else ""))
                save()
    for dt in args.dtypes:
        result["peaks"][dt]["end"] = common.matmul_peak(dt, n=args.peak_n, repeats=args.peak_repeats)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t_start
    save()
    log(f"done in {result['wall_s']:.0f}s -> {out_dir / (args.name + '.json')}, {args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())  # glibc malloc left as is: a forward alone runs 3.5% slower with host_malloc's settings
