"""Shared benchmark helpers: machine info, timing, matmul peak, FLOP counting, real windows, output.

Used by `benchmarks/forward.py` (and meant for a later train-step benchmark). Everything here is
plain functions on numpy / jax arrays; nothing touches the training code.

Conventions (also stated in benchmarks/README.md):
  * L is the model sequence length INCLUDING [CLS] and [SEP]; a window holds L - 2 nucleotides.
  * "nt/s" counts all B * L positions of the batch (there is no padding: every window is full).
    `real_nt_per_s` counts only the B * (L - 2) genomic nucleotides.
  * FLOPs count multiply-adds as 2 and only matmul-like work (projections, attention score and
    value products, expert/deformable convolutions, router, LM head); element-wise work is ignored.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/forward.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from mxdna_jax import host_malloc, vocab  # noqa: E402
from mxdna_jax.config import ModelConfig  # noqa: E402

DEFAULT_FASTA = "/work/shared/data/human_chr20_grch37/20.fa.gz"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- machine / config


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


# The matmul ISA decides what bf16 can gain: AVX2 alone has no bf16 arithmetic (bf16 peak ~ fp32),
# AVX-512 bf16 doubles the dot rate, AMX more.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_isa() -> str:
    """The matmul-relevant instruction sets of this CPU (/proc/cpuinfo flags), e.g. 'avx2+avx512f'."""
    flags = _cpuinfo("flags")
    if flags is None:
        return "unknown"
    have = set(flags.split())
    return "+".join(f for f in ISA_FLAGS if f in have) or "none of " + "/".join(ISA_FLAGS)


def machine_info() -> dict[str, Any]:
    import flax

    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:  # pragma: no cover
        jaxlib_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "host_malloc": host_malloc.state,  # glibc malloc settings (mxdna_jax/host_malloc.py)
    }


def model_config(name: str, **overrides) -> ModelConfig:
    """'base' = ModelConfig() defaults (the paper's ~100M model); 'tiny' = configs/tiny.py."""
    if name == "base":
        return ModelConfig(**overrides)
    if name == "tiny":
        from configs import tiny

        d = dict(tiny.get_config().model)
        d.update(overrides)
        return ModelConfig.from_dict(d)
    raise ValueError(f"unknown config {name!r} (base|tiny)")


def load_weights(model, path: str | None) -> None:
    """Overwrite `model`'s fresh params with official-named weights (.safetensors / .npz, as written by
    `python -m mxdna_jax.convert export` or benchmarks/official_compare.py); no-op for None/''.

    Why benchmarks take weights: the NMS, so the token count and the work of the 16 token layers,
    depends on the draw (seed 0 of our initialisers makes ~3-nt units, the official initialisation
    with torch seed 0 ~5-nt units). A comparison with the official model needs the same weights.
    """
    if path:
        from mxdna_jax import convert

        convert.load_into(model, _official_state_dict(path))


@functools.lru_cache(maxsize=1)
def _official_state_dict(path: str):
    """Read once per process: train_step.py builds one model per (dtype, layer loop) row."""
    from mxdna_jax import convert

    return convert.load_official_state_dict(path)


def weights_label(args: dict) -> str:
    """How a results table names its weights: the --weights file, or the fresh draw's seed."""
    if args.get("weights"):
        return f"Weights {pathlib.Path(args['weights']).name} (--weights)"
    return f"Fresh random weights (seed {args.get('seed', 0)})"


# ----------------------------------------------------------------------------- timing


def block(x):
    return jax.block_until_ready(x)


def time_call(fn: Callable, *args, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Wall time of `fn(*args)` (blocked until ready): `warmup` untimed calls, then `repeats` timed."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    return summarize(times)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    ts = sorted(times)
    q = (lambda f: ts[min(len(ts) - 1, int(round(f * (len(ts) - 1))))]) if ts else None
    return {
        "median_s": statistics.median(ts),
        "min_s": ts[0],
        "max_s": ts[-1],
        "q25_s": q(0.25),
        "q75_s": q(0.75),
        "times_s": list(times),
        "repeats": len(ts),
    }


def compile_jitted(fn: Callable, *args, **jit_kw):
    """(compiled, {'lower_s', 'compile_s', 'total_s'}) for jax.jit(fn) at these arguments."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn, **jit_kw).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def xla_cost(compiled) -> dict[str, float | None]:
    """XLA's own estimate (flops, bytes accessed) of a compiled executable, or Nones.

    Caveat: XLA counts the body of a while loop (the NMS rounds) and of `lax.map` (the expert
    tiles) ONCE, and sums the branches of a `lax.switch`; treat it as a cross-check of the dense
    parts, not as the executed FLOPs.
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # pragma: no cover - backend without cost analysis
        return {"flops": None, "bytes_accessed": None, "transcendentals": None}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    get = lambda k: float(ca[k]) if k in ca else None  # noqa: E731
    return {"flops": get("flops"), "bytes_accessed": get("bytes accessed"), "transcendentals": get("transcendentals")}


def cudnn_attention_calls(compiled) -> int | None:
    """How many cuDNN fused-attention calls a compiled executable makes (0 off NVIDIA GPUs)."""
    try:
        return compiled.as_text().count("__cudnn$fmha")
    except Exception:  # pragma: no cover - backend without HLO text
        return None


# ----------------------------------------------------------------------------- matmul peak


def matmul_peak(dtype: str, n: int = 4096, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Achievable matmul GFLOP/s: n x n @ n x n in `dtype`, timed in this process.

    Two forms are timed: fp32 accumulation/output (`preferred_element_type=float32`, what the model's
    Dense layers do) and output in `dtype`; the peak is the faster of the two.
    """
    dt = _DTYPES[dtype]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dt)
    flops = 2.0 * n**3
    out = {"dtype": dtype, "n": n, "flops": flops}
    forms = {"acc_f32": lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)}
    if dtype != "float32":
        forms["out_same"] = lambda x, y: jnp.dot(x, y)
    best = 0.0
    for name, f in forms.items():
        t = time_call(jax.jit(f), a, b, warmup=warmup, repeats=repeats)
        g = flops / t["median_s"] / 1e9
        out[name] = {"gflops": g, **t}
        best = max(best, g)
    out["gflops"] = best
    return out


class PeakProbe:
    """One n x n @ n x n matmul in `dtype` with fp32 accumulation (the model's Dense form), timed on demand.

    `interleaved` alternates it with the function being benchmarked, so that load from other
    processes (this 2-core machine is shared) hits both sides of the ratio alike.
    """

    def __init__(self, dtype: str, n: int = 4096):
        dt = _DTYPES[dtype]
        ka, kb = jax.random.split(jax.random.key(1))
        self.a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
        self.b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
        self.fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        self.flops = 2.0 * n**3
        self.n = n
        block(self.fn(self.a, self.b))

    def gflops_once(self) -> float:
        t0 = time.perf_counter()
        block(self.fn(self.a, self.b))
        return self.flops / (time.perf_counter() - t0) / 1e9


def time_interleaved(fn: Callable, args: Sequence, probe: PeakProbe, *, warmup: int = 1,
                     repeats: int = 5) -> tuple[dict[str, Any], list[float]]:
    """Like time_call, but each timed call of fn is followed by one probe matmul.

    Returns (summary of fn's times, the probe's GFLOP/s after each call).
    """
    for _ in range(warmup):
        block(fn(*args))
    times, peaks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
        peaks.append(probe.gflops_once())
    return summarize(times), peaks


# ----------------------------------------------------------------------------- real data


def real_windows(L: int, batch: int, *, seed: int = 0, fasta: str = DEFAULT_FASTA, max_tries: int = 10_000):
    """A batch of `batch` random windows of L - 2 nt from the genome, skipping any window with N.

    Returns (inputs dict of int32 numpy arrays [input_ids, attention_mask, special_tokens_mask],
    info dict with the record, starts and GC fraction). Rows are [CLS] window [SEP], no padding.
    """
    from mxdna_jax.data.fasta import Genome

    if L < 3:
        raise ValueError("L must leave room for [CLS], one nucleotide and [SEP]")
    g = Genome(fasta)
    rng = np.random.default_rng(seed)
    n = L - 2
    rows, starts = [], []
    for _ in range(max_tries):
        if len(rows) == batch:
            break
        r = int(rng.integers(g.num_records))
        if g.lengths[r] < n:
            continue
        s = int(g.starts[r] + rng.integers(0, g.lengths[r] - n + 1))
        w = np.asarray(g.window(s, n))
        if not np.isin(w, vocab.NUCLEOTIDE_IDS).all():  # N / IUPAC -> [UNK]: skip
            continue
        rows.append(np.concatenate([[vocab.CLS], w, [vocab.SEP]]).astype(np.int32))
        starts.append(s)
    if len(rows) < batch:
        raise RuntimeError(f"found only {len(rows)} N-free windows of {n} nt in {max_tries} tries")
    batch_np = vocab.batch_from_ids(rows, pad_to=L)
    body = np.stack(rows)[:, 1:-1]
    gc = float(np.isin(body, (vocab.G, vocab.C)).mean())
    info = {"fasta": fasta, "records": list(g.names), "starts": starts, "seed": seed, "gc_fraction": gc,
            "nucleotides_per_window": n}
    return batch_np, info


# ----------------------------------------------------------------------------- learnt-token statistics


def unit_stats(center_BL, all_BL, token_mask_BT, cfg: ModelConfig) -> dict[str, Any]:
    """Host-side statistics of the NMS result of one batch.

    tokens = token rows incl. [CLS]/[SEP]; units = basic units (= tokens - 2 for full windows);
    unit length = nucleotides per unit; coverage = covered nucleotides / window nucleotides.
    """
    center = np.asarray(center_BL)
    all_ = np.asarray(all_BL)
    tm = np.asarray(token_mask_BT)
    E = cfg.num_experts
    ks = np.asarray(cfg.expert_kernel_sizes)
    units_e = np.bincount(center[center >= 0], minlength=E)[:E]
    covered_e = np.bincount(all_[all_ >= 0], minlength=E)[:E]
    B, L = center.shape
    units = (center >= 0).sum(1)
    tokens = tm.sum(1)
    return {
        "tokens_per_seq": tokens.tolist(),
        "mean_tokens_per_seq": float(tokens.mean()),
        "max_tokens_per_seq": int(tokens.max()),
        "units_per_seq": units.tolist(),
        "mean_unit_length": float((units_e * ks).sum() / max(units_e.sum(), 1)),
        "coverage": float(covered_e.sum() / (B * (L - 2))),
        "units_per_expert": units_e.tolist(),  # batch totals, expert e = unit length e + 1
        "covered_per_expert": covered_e.tolist(),
    }


# ----------------------------------------------------------------------------- FLOP counting


def _layer_flops(rows: float, keys: float, D: int, F: int) -> dict[str, float]:
    """One pre-norm encoder layer: `rows` query rows attending to `keys` key rows."""
    return {"proj": 8.0 * rows * D * D, "attn": 4.0 * rows * keys * D, "ffn": 6.0 * rows * D * F}


def analytic_flops(cfg: ModelConfig, B: int, L: int, stats: dict[str, Any], *, mode: str,
                   capacity: int | None, expert_tile: int = 128, counted: bool = False) -> dict[str, Any]:
    """Batch FLOPs of one MLM forward from the config and the measured NMS statistics.

    'model' = the algorithm's useful work: token layers, deformable conv and decoder keys at the
    measured token rows, experts per covered nucleotide (one conv tap each) and per unit.
    'executed' = what this implementation computes: token layers/deform/decoder keys at L rows
    ('original') or at the capacity ('compact'); experts over whole 128-row tiles and all k taps.
    Both count the full L query rows of the nucleotide layers and the decoder. `counted`: the
    two-call inference path (mxdna_jax.staged), whose first call runs the router a second time.
    """
    D, F, V, E = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_experts
    ks = list(cfg.expert_kernel_sizes)
    gs = list(cfg.expert_groups())
    tok = float(sum(stats["tokens_per_seq"]))  # batch total of token rows
    tok_sq = float(sum(t * t for t in stats["tokens_per_seq"]))
    units_e = stats["units_per_expert"]
    cov_e = stats["covered_per_expert"]
    rows = float(B * L)

    def total(layer):
        return sum(layer.values())

    nuc = cfg.num_nucleotide_layers * total(_layer_flops(rows, L, D, F))  # per-sequence keys: L
    router = 2.0 * rows * D * E
    offsets = 2 * 2.0 * rows * (3 * D) * 3  # offset + modulator kernel-3 convs, 3 outputs each
    pre = sum(4.0 * D * D * c for c in cov_e)
    conv = sum(2.0 * D * (D // g) * c for g, c in zip(gs, cov_e))
    post = sum(2.0 * D * D * u for u in units_e)

    def build(tok_rows, tok_sq_rows, deform_rows, experts):
        token_layers = cfg.num_token_layers * (8.0 * tok_rows * D * D + 4.0 * tok_sq_rows * D + 6.0 * tok_rows * D * F)
        # cross decoder: L query rows over the sequence's token rows
        decoder = 4.0 * rows * D * D + 4.0 * tok_rows * D * D + 4.0 * L * tok_rows * D + 6.0 * rows * D * F
        head = 2.0 * rows * D * D + 2.0 * rows * D * V
        parts = {
            "nucleotide_layers": nuc,
            "router": router,
            "experts": experts,
            "deformable": offsets + 6.0 * deform_rows * D * D,
            "token_layers": token_layers,
            "mlm_decoder": decoder,
            "lm_head": head,
        }
        parts["total"] = sum(parts.values())
        return parts

    model = build(tok, tok_sq, tok, pre + conv + post)
    if mode == "original":
        ex_rows, ex_sq = rows, float(B * L * L)
    else:
        ex_rows, ex_sq = float(B * capacity), float(B * capacity * capacity)
    # executed experts: per expert, ceil(rows/tile) tiles of `tile` rows; nucleotide tiles compute all k taps
    t = expert_tile
    ex_pre_conv = sum(math.ceil(c / t) * t * (4.0 * D * D + 2.0 * k * D * (D // g)) for k, g, c in zip(ks, gs, cov_e))
    ex_post = sum(math.ceil(u / t) * t * 2.0 * D * D for u in units_e)
    executed = build(ex_rows, ex_sq, ex_rows, ex_pre_conv + ex_post)
    if counted:
        executed["total"] += executed["router"]
        executed["router"] *= 2
    per_nt = {k: v / rows for k, v in model.items()}
    return {"model": model, "executed": executed, "model_per_position": per_nt,
            "executed_per_position": {k: v / rows for k, v in executed.items()}}


# ----------------------------------------------------------------------------- output


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (jax.Array,)):
        return np.asarray(x).tolist()
    return x


def write_json(path, obj) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    align = align or ("l" * len(headers))
    sep = {"l": "---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep[a] for a in align) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x, digits: int = 3) -> str:
    """Compact number formatting for tables ('-' for None)."""
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.{digits}f}"


def run_log(out: pathlib.Path) -> Callable[[str], None]:
    """A logger for the long comparison harnesses: each line timestamped, to stdout and appended
    to OUT/log.txt (a resumed run continues the same file)."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log

