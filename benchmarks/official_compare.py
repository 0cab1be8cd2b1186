"""Time the official PyTorch MxDNA next to ours: same weights, same chr20 windows, same machine.

The official code has no licence, so it is not in this repository: point --official-src at the
`model_source/` folder of a clone of github.com/qiaoqiaoLF/MxDNA (branch full-model). The script
brings what that code needs on a CPU: a flash-attn stand-in (SDPA, defined as the fixtures' README
defines flash-attn's four functions) and the pybind11 build of its NMS kernel (--build-kernel).

Three steps, two Python environments (torch and jax are not installed together):

  # 1. jax venv: the windows forward.py and train_step.py time (seed 0), with MLM labels
  python benchmarks/official_compare.py batches --out OUT
  # 2. torch venv (torch, torchvision, transformers, safetensors, pybind11): official init with
  #    torch seed S, its weights under the checkpoint-compatible (ad3808d) names, token counts, and
  #    forward / train-step times alternated with a 4096^3 matmul
  python benchmarks/official_compare.py official --official-src CLONE/model_source --out OUT --build-kernel
  # 3. jax venv: ours on those weights
  python benchmarks/train_step.py --configs base --lengths 512 --modes compact --weights OUT/official_init.safetensors
  python benchmarks/forward.py --lengths 1024 --modes compact --weights OUT/official_init.safetensors

Why the weights matter: the token count (so the work of the 16 token layers) is a property of the
draw: torch seed 0 of the official initialisation makes ~207 token rows per 1,024-nt window, seed 0
of ours ~344. Comparing at different draws compares different amounts of work.

The model_source code is the repository's reorganised version (commit 9d54b10). Its parameters and
token counts are those of the checkpoint-compatible code (ad3808d, which our fixtures pin) and its
layers do the same products, but its token-layer outputs differ numerically (it is not the version
the fixtures were made with), so this script times it and checks nothing numerically.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
import types

BATCHES = "batches.npz"


# ----------------------------------------------------------------------------- step 1 (jax venv)


def write_batches(out: pathlib.Path, fasta: str | None) -> None:
    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import common
    import train_step

    fasta = fasta or common.DEFAULT_FASTA
    fwd, _ = common.real_windows(1024, 4, seed=0, fasta=fasta)  # forward.py's batch
    tr = train_step.make_batch(512, 4, fasta=fasta)  # train_step.py's batch (masked, labels)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / BATCHES, **{f"fwd_{k}": np.asarray(v) for k, v in fwd.items()},
             **{f"tr_{k}": np.asarray(v) for k, v in tr.items()})
    print(f"wrote {out / BATCHES}")


# ----------------------------------------------------------------------------- step 2 (torch venv)


def _flash_attn_stand_in():
    """Modules `flash_attn` and `flash_attn.bert_padding` with the four functions the official
    code imports, computed with torch SDPA (the fastest exact attention torch has on a CPU)."""
    import torch
    import torch.nn.functional as F

    def unpad_input(hidden, mask, *_, **__):
        seqlens = mask.sum(dim=-1, dtype=torch.int32)
        idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        cu = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
        return hidden.reshape(-1, *hidden.shape[2:])[idx], idx, cu, int(seqlens.max().item())

    def pad_input(hidden, idx, batch, seqlen):
        out = hidden.new_zeros(batch * seqlen, *hidden.shape[1:])
        out[idx] = hidden
        return out.reshape(batch, seqlen, *hidden.shape[1:])

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return o.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **_):  # flash-attn's argument names
        # sequence b owns rows cu[b]:cu[b+1]; pad to one (B, H, L, Dh) SDPA call with a key mask
        B, H, Dh = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
        cq, ck, max_q, max_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), max_seqlen_q, max_seqlen_k
        qp = q.new_zeros(B, int(max_q), H, Dh)
        kp, vp = k.new_zeros(B, int(max_k), H, Dh), v.new_zeros(B, int(max_k), H, Dh)
        keep = torch.zeros(B, 1, 1, int(max_k), dtype=torch.bool)
        for b in range(B):
            qp[b, :cq[b + 1] - cq[b]] = q[cq[b]:cq[b + 1]]
            kp[b, :ck[b + 1] - ck[b]] = k[ck[b]:ck[b + 1]]
            vp[b, :ck[b + 1] - ck[b]] = v[ck[b]:ck[b + 1]]
            keep[b, ..., :ck[b + 1] - ck[b]] = True
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                           attn_mask=keep, dropout_p=dropout_p, scale=softmax_scale).transpose(1, 2)
        return torch.cat([o[b, :cq[b + 1] - cq[b]] for b in range(B)], 0)

    fa = types.ModuleType("flash_attn")
    fa.flash_attn_func, fa.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    bp = types.ModuleType("flash_attn.bert_padding")
    bp.pad_input, bp.unpad_input = pad_input, unpad_input
    fa.bert_padding = bp
    for name, mod in (("flash_attn", fa), ("flash_attn.bert_padding", bp)):  # transformers calls find_spec
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules["flash_attn"], sys.modules["flash_attn.bert_padding"] = fa, bp


def _build_kernel(src: pathlib.Path) -> None:
    """The official NMS extension, as its CMakeLists builds it (-O3, C++17, pybind11)."""
    import pybind11

    build = src / "kernel" / "build"
    build.mkdir(exist_ok=True)
    target = build / ("BasicUnitNMS" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["g++", "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", str(src / "kernel" / "BasicUnitNMS.cpp"), "-o", str(target)]
    subprocess.run(cmd, check=True)
    print(f"built {target}")


def _ad3808d_name(name: str) -> str:
    """model_source (9d54b10) state-dict name -> the checkpoint-compatible (ad3808d) name that
    mxdna_jax.convert reads."""
    name = name.replace("model.token_layers.", "model.motif_layers.")
    name = name.replace("basic_unit_masked_token_embedding", "motif_masked_token_embedding")
    name = name.replace(".grouped_conv.", ".depthwise_conv.")
    for ln in ("model.conversion_layer.input_layernorm.", "model.conversion_layer.deform_conv.input_layernorm."):
        if name.startswith(ln):
            name = ln + "norm." + name[len(ln):]
    if ".conv_moe.experts." in name and ".norm." in name:
        name = name.replace(".norm.", ".norm.norm.")
    return name


def run_official(a) -> None:
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    src = pathlib.Path(a.official_src).resolve()
    if not (src / "modeling_mxdna.py").exists():
        raise SystemExit(f"error: {src} is not the model_source folder of an MxDNA clone (no modeling_mxdna.py)")
    if a.build_kernel:
        _build_kernel(src)
    _flash_attn_stand_in()
    sys.path.insert(0, str(src.parent))
    pkg = src.name
    MxDNAConfig = importlib.import_module(f"{pkg}.configuration_mxdna").MxDNAConfig
    MxDNAForMaskedLM = importlib.import_module(f"{pkg}.modeling_mxdna").MxDNAForMaskedLM

    torch.set_num_threads(a.threads)
    out = pathlib.Path(a.out)
    config = json.loads((src / "config" / "config.json").read_text())
    torch.manual_seed(a.seed)
    model = MxDNAForMaskedLM(MxDNAConfig(**config))
    weights = out / "official_init.safetensors"
    save_file({_ad3808d_name(k): v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(weights))
    (out / "config.json").write_text(json.dumps(config, indent=2))

    b = np.load(out / BATCHES)
    inputs = {pre: {k: torch.tensor(b[f"{pre}_{k}"].astype(np.int64))
                    for k in ("input_ids", "attention_mask", "special_tokens_mask")} for pre in ("fwd", "tr")}
    labels = torch.tensor(b["tr_labels"].astype(np.int64))
    result = {"seed": a.seed, "torch": torch.__version__, "threads": a.threads, "cpu": platform.processor(),
              "official_src": str(src), "weights": str(weights), "rows": {}}
    model.eval()
    with torch.no_grad():
        for pre in ("fwd", "tr"):
            tok = model.model(**inputs[pre]).token_attention_mask.sum(-1).tolist()  # [CLS] + centres + [SEP]
            result["rows"][pre] = {"batch": list(inputs[pre]["input_ids"].shape), "token_rows_per_seq": tok}
            print(f"{pre}: {list(inputs[pre]['input_ids'].shape)} token rows/seq {tok}")

    def forward():
        with torch.no_grad():
            model.eval()
            model(**inputs["fwd"])

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)

    def train_step():  # MLM + 0.01 x load-balancing loss, clip 1.0, AdamW: as train_step.py times ours
        model.train()
        loss = model(**inputs["tr"], labels=labels, load_balancing_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    x = torch.randn(4096, 4096)

    def peak():
        t0 = time.perf_counter()
        x @ x
        return 2 * 4096 ** 3 / (time.perf_counter() - t0) / 1e9

    fns = {"fwd": forward, "tr": train_step}
    for fn in fns.values():  # warm-up
        fn()
    peak()
    times = {k: [] for k in fns}
    peaks = {k: [] for k in fns}
    for _ in range(a.repeats):  # alternate, each followed by a matmul: the same load for every row
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            peaks[k].append(peak())
    for k in fns:
        med = statistics.median(times[k])
        B, L = result["rows"][k]["batch"]
        result["rows"][k].update(step_s=med, times_s=times[k], nt_per_s=B * L / med,
                                 peak_gflops=statistics.median(peaks[k]))
        print(f"official {k}: median {med:.3f} s ({B * L / med:,.0f} nt/s), torch fp32 4096^3 matmul "
              f"{statistics.median(peaks[k]):.0f} GFLOP/s")
    (out / "official.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'official.json'}, {weights}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s1 = sub.add_parser("batches", help="(jax venv) the benchmark windows -> OUT/batches.npz")
    s1.add_argument("--out", required=True)
    s1.add_argument("--fasta", default=None)
    s2 = sub.add_parser("official", help="(torch venv) official init, weights, token counts and timings")
    s2.add_argument("--official-src", required=True, help="model_source/ of a qiaoqiaoLF/MxDNA clone")
    s2.add_argument("--out", required=True, help="the folder `batches` wrote")
    s2.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the official init")
    s2.add_argument("--repeats", type=int, default=5)
    s2.add_argument("--threads", type=int, default=2)
    s2.add_argument("--build-kernel", action="store_true", help="compile the NMS extension first (g++, pybind11)")
    a = p.parse_args(argv)
    if a.cmd == "batches":
        write_batches(pathlib.Path(a.out), a.fasta)
    else:
        run_official(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
