"""Attention implementations side by side on this machine: numbers and time (device_check.sh).

    python benchmarks/attention_check.py [--batch 32] [--heads 16] [--head-dim 32] [--dtype bfloat16]
                                         [--shapes 1024x1024 512x512 1024x512] [--out FILE.json]

For each (query rows T, key rows S) of the base model at 1,024 nt (nucleotide layers 1024x1024,
compact token layers 512x512 at the capacity, the MLM cross decoder 1024x512) and each
implementation of `mxdna_jax.ops.attention.attention` ('reference' = the hand-written softmax,
'xla' = jax.nn.dot_product_attention's XLA path, 'cudnn' = cuDNN flash attention, None = the
per-platform default the model uses): the max abs difference of the output and of the gradients
from the reference computed in fp32 on the same (bf16) inputs, and the median time of the forward
and of forward + backward. The key masks hold padded sequences (prefix masks), a scattered mask
(the 'original' mode token mask) and one sequence without any key (its rows must be the mean of
the values, as in the reference, and finite). An implementation that fails is recorded with its
error; `cudnn_ok` says whether cuDNN ran every shape forward and backward within tolerance
(device_check.sh then lets the model use it, else pins 'xla').
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mxdna_jax.ops import attention as attn_ops  # noqa: E402

IMPLS = {"reference": "reference", "xla": "xla", "cudnn": "cudnn", "default": None}
TOL = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 1e-4}


def masks(B: int, S: int, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    lengths = r.integers(S // 2, S + 1, size=B)
    lengths[0] = S
    m = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
    if B > 2:
        m[1] = (r.random(S) < 0.3).astype(np.int32)  # scattered, like the 'original' token mask
        m[1, 0] = 1
    if B > 3:
        m[2] = 0  # no key at all
    return m


def timed(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def check_shape(B, T, S, N, H, dtype, repeats, impls=tuple(IMPLS)):
    k = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(k[0], (B, T, N, H), jnp.float32).astype(dt)
    kk = jax.random.normal(k[1], (B, S, N, H), jnp.float32).astype(dt)
    v = jax.random.normal(k[2], (B, S, N, H), jnp.float32).astype(dt)
    dout = jax.random.normal(k[3], (B, T, N, H), jnp.float32).astype(dt)
    m = jnp.asarray(masks(B, S))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_fwd = jax.jit(lambda q, k, v: attn_ops.masked_attention(f32(q), f32(k), f32(v), m))
    ref_out = np.asarray(ref_fwd(q, kk, v))
    ref_grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn_ops.masked_attention(f32(q), f32(k), f32(v), m)
                                                        * f32(dout)), argnums=(0, 1, 2)))(q, kk, v)
    rows = {}
    for name in impls:
        impl = IMPLS[name]
        rec = {}
        try:
            fwd = jax.jit(lambda q, k, v, impl=impl: attn_ops.attention(q, k, v, m, implementation=impl))
            out = np.asarray(fwd(q, kk, v).astype(jnp.float32))
            rec["finite"] = bool(np.isfinite(out).all())
            rec["max_abs_err"] = float(np.abs(out - ref_out).max())
            rec["max_abs_err_keyless_row"] = float(np.abs(out[2] - ref_out[2]).max()) if B > 3 else None
            rec["fwd_ms"] = 1e3 * timed(fwd, (q, kk, v), repeats)
            grad = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
                f32(attn_ops.attention(q, k, v, m, implementation=impl)) * f32(dout)), argnums=(0, 1, 2)))
            g = grad(q, kk, v)
            rec["grad_max_abs_err"] = float(max(np.abs(np.asarray(f32(a)) - np.asarray(b)).max()
                                                for a, b in zip(g, ref_grad)))
            rec["fwd_bwd_ms"] = 1e3 * timed(grad, (q, kk, v), repeats)
            scale = max(1.0, float(np.abs(ref_out).max()))
            gscale = max(1.0, max(float(np.abs(np.asarray(b)).max()) for b in ref_grad))
            rec["ok"] = (rec["finite"] and rec["max_abs_err"] <= TOL[dtype] * scale
                         and rec["grad_max_abs_err"] <= 2 * TOL[dtype] * gscale)
        except Exception as e:  # noqa: BLE001 - record and go on
            rec = {"ok": False, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}",
                   "traceback": traceback.format_exc()[-3000:]}
        rows[name] = rec
        msg = (f"err {rec['max_abs_err']:.2e} grad err {rec['grad_max_abs_err']:.2e} fwd {rec['fwd_ms']:.2f} ms "
               f"fwd+bwd {rec['fwd_bwd_ms']:.2f} ms" if "error" not in rec else rec["error"])
        print(f"  T={T} S={S} {name:9s} {'ok ' if rec['ok'] else 'BAD'} {msg}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOL))
    p.add_argument("--shapes", nargs="+", default=["1024x1024", "512x512", "1024x512"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()}; B={a.batch} heads={a.heads} head_dim={a.head_dim} {a.dtype}",
          flush=True)
    result = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "args": vars(a), "shapes": {}}
    for s in a.shapes:
        T, S = (int(x) for x in s.split("x"))
        result["shapes"][s] = check_shape(a.batch, T, S, a.heads, a.head_dim, a.dtype, a.repeats, a.impls)
    for impl in ("cudnn", "default"):
        result[f"{impl}_ok"] = all(r[impl]["ok"] for r in result["shapes"].values()) if impl in a.impls else None
    print(f"cudnn_ok={result['cudnn_ok']} default_ok={result['default_ok']}", flush=True)
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
