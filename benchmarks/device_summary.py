"""Collect what benchmarks/device_check.sh wrote into device_check.json and device_check.md.

    python benchmarks/device_summary.py RESULTS_DIR

Standard library only: it must run even when a step before it failed. Reads (each optional)
env.json, setup.json, steps.tsv, attention_check.json, parity_*.json, forward_*.json and
train_step_*.json from RESULTS_DIR.
"""

from __future__ import annotations

import json
import pathlib
import sys


def load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def steps_table(res: pathlib.Path) -> list[dict]:
    rows = []
    try:
        for line in (res / "steps.tsv").read_text().splitlines():
            name, status, secs, limit = (line.split("\t") + ["", "", "", ""])[:4]
            rows.append({"step": name, "status": status, "seconds": float(secs or 0), "limit_s": limit})
    except OSError:
        pass
    return rows


def parity_summary(rows):
    if not isinstance(rows, list):
        return None
    return {"ok": all(r["ok"] for r in rows), "n_keys": len(rows),
            "errors": {r["key"]: r["error"] for r in rows}, "failed": [r["key"] for r in rows if not r["ok"]]}


def forward_summary(d):
    if not d or not d.get("runs"):
        return None
    r = d["runs"][0]
    if "error" in r:
        return {"error": r["error"]}
    peak = r["peak_adjacent"]["gflops"]
    return {"config": d["config_name"], "batch": r["batch"], "L": r["L"], "mode": r["mode"], "dtype": r["dtype"],
            "attention": r.get("attention"), "cudnn_attention_calls": r.get("cudnn_attention_calls"),
            "capacity": r["capacity"], "tokens_per_seq": r["tokens"]["mean_tokens_per_seq"],
            "mean_unit_length": r["tokens"]["mean_unit_length"],
            "compile_s": r["compile"]["total_s"], "forward_s": r["forward"]["median_s"], "nt_per_s": r["nt_per_s"],
            "real_nt_per_s": r["real_nt_per_s"], "model_gflops_per_s": r["model_gflops_per_s"],
            "matmul_peak_gflops": peak, "frac_of_peak": r["model_frac_of_peak"],
            "executed_frac_of_peak": r["executed_frac_of_peak"], "nms_share": r["nms"]["share_of_forward"],
            "peaks_start_end": {dt: [p.get("start", {}).get("gflops"), (p.get("end") or {}).get("gflops")]
                                for dt, p in d.get("peaks", {}).items()}}


def train_summary(d):
    if not d or not d.get("rows"):
        return None
    r = d["rows"][0]
    return {"config": r["config"], "batch": r["batch"], "L": r["L"], "mode": r["mode"], "dtype": r["dtype"],
            "attention": r.get("attention"), "cudnn_attention_calls": r.get("cudnn_attention_calls"),
            "capacity": r["capacity"], "tokens_per_seq": r["tokens_per_seq"],
            "compile_s": r["compile_s"], "step_s": r["step_s"], "nt_per_s": r["nt_per_s"],
            "model_gflops_per_s": r["model_gflops"], "matmul_peak_gflops": r["peak_gflops"], "frac_of_peak": r["mfu"],
            "peak_memory_gib": ((r.get("memory") or {}).get("peak_bytes") or 0) / 2**30, "loss": r["loss"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = pathlib.Path(argv[0] if argv else "benchmarks/results/device")
    env, setup, attn = load(res / "env.json"), load(res / "setup.json"), load(res / "attention_check.json")
    out = {"env": env, "setup": setup, "steps": steps_table(res), "attention": None, "parity": {},
           "forward": {}, "train_step": {}}
    if attn:
        out["attention"] = {"cudnn_ok": attn.get("cudnn_ok"), "shapes": {
            s: {impl: {k: v for k, v in r.items() if k != "traceback"} for impl, r in rows.items()}
            for s, rows in attn.get("shapes", {}).items()}}
    for p in sorted(res.glob("parity_*.json")):
        out["parity"][p.stem[len("parity_"):]] = parity_summary(load(p))
    for p in sorted(res.glob("forward_*.json")):
        out["forward"][p.stem] = forward_summary(load(p))
    for p in sorted(res.glob("train_step_*.json")):
        out["train_step"][p.stem] = train_summary(load(p))
    (res / "device_check.json").write_text(json.dumps(out, indent=1) + "\n")

    md = ["# Device check", ""]
    if env:
        md += [f"{env.get('date', '')} · {env.get('device_kind', '?')} x{env.get('device_count', '?')} · "
               f"jax {env.get('jax', '?')} ({env.get('backend', '?')}) · flax {env.get('flax', '?')} · "
               f"python {env.get('python', '?')}" + (" · **DRY RUN (CPU, tiny sizes)**" if env.get("dry") else ""), ""]
    if out["steps"]:
        md += ["| step | status | seconds | limit s |", "|---|---|---:|---:|"]
        md += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']} |" for s in out["steps"]]
        md.append("")
    for name, p in out["parity"].items():
        if p is None:
            md += [f"Parity {name}: no result", ""]
            continue
        md += [f"## Parity {name}: {'all keys within tolerance' if p['ok'] else 'FAILED: ' + ', '.join(p['failed'])}",
               "", "| key | max abs error |", "|---|---:|"]
        md += [f"| {k} | {fmt(v)} |" for k, v in p["errors"].items()]
        md.append("")
    for name, f in out["forward"].items():
        if not f or "error" in f:
            md += [f"## {name}: {'no result' if not f else f['error']}", ""]
            continue
        md += [f"## Forward ({name})", "",
               f"{f['config']} config, batch {f['batch']} x {f['L']} ({f['mode']}, {f['dtype']}, attention "
               f"{f['attention']}, {f['cudnn_attention_calls']} cuDNN attention calls): "
               f"**{f['nt_per_s']:,.0f} nt/s** ({f['forward_s'] * 1e3:.1f} ms per batch), "
               f"**{100 * f['frac_of_peak']:.0f}% of the bf16 matmul peak** in useful FLOPs "
               f"({f['model_gflops_per_s']:,.0f} of {f['matmul_peak_gflops']:,.0f} GFLOP/s; executed "
               f"{100 * f['executed_frac_of_peak']:.0f}%). Tokens/seq {f['tokens_per_seq']:.0f} at capacity "
               f"{f['capacity']}, mean unit {f['mean_unit_length']:.2f} nt, NMS {100 * f['nms_share']:.1f}% of the "
               f"forward, compile {f['compile_s']:.1f} s.", ""]
    for name, t in out["train_step"].items():
        if not t:
            md += [f"## {name}: no result", ""]
            continue
        md += [f"## Train step ({name})", "",
               f"{t['config']} config, batch {t['batch']} x {t['L']} ({t['mode']}, {t['dtype']}, attention "
               f"{t['attention']}, {t['cudnn_attention_calls']} cuDNN attention calls): "
               f"**{t['nt_per_s']:,.0f} nt/s** ({t['step_s'] * 1e3:.1f} ms per step), "
               f"**{100 * t['frac_of_peak']:.0f}% of the bf16 matmul peak** (3 x forward useful FLOPs; "
               f"{t['model_gflops_per_s']:,.0f} of {t['matmul_peak_gflops']:,.0f} GFLOP/s). Tokens/seq "
               f"{t['tokens_per_seq']:.0f} at capacity {t['capacity']}, compile {t['compile_s']:.1f} s, peak memory "
               f"{t['peak_memory_gib']:.1f} GiB, loss {t['loss']:.3f}.", ""]
    if out["attention"]:
        md += [f"## Attention implementations (cuDNN usable: {out['attention']['cudnn_ok']})", "",
               "| T x S | impl | ok | max abs err | grad err | fwd ms | fwd+bwd ms | error |",
               "|---|---|---|---:|---:|---:|---:|---|"]
        for s, rows in out["attention"]["shapes"].items():
            for impl, r in rows.items():
                md.append(f"| {s} | {impl} | {r.get('ok')} | {fmt(r.get('max_abs_err'))} | "
                          f"{fmt(r.get('grad_max_abs_err'))} | {fmt(r.get('fwd_ms'), '.2f')} | "
                          f"{fmt(r.get('fwd_bwd_ms'), '.2f')} | {r.get('error', '')} |")
        md.append("")
    (res / "device_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
