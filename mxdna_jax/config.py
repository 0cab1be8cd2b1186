"""Model configuration: one frozen dataclass, built from an ml_collections ConfigDict.

`configs/*.py` return ConfigDicts (the command-line surface); `ModelConfig.from_dict`
turns the `model` part into this dataclass and rejects unknown keys, so a typo fails loudly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from mxdna_jax import tokenizers, vocab

Mode = Literal["original", "compact"]
ClsPool = Literal["cls", "mean"]
MaeTarget = Literal["nucleotides", "kmer"]
LayerLoop = Literal["auto", "scan", "unrolled"]
RematPolicy = Literal["nothing", "dots"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 512
    num_attention_heads: int = 16
    intermediate_size: int = 2048
    num_nucleotide_layers: int = 4
    num_token_layers: int = 16
    expert_kernel_sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    deformable_kernel_size: int = 3
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    expert_layer_norm_eps: float = 1e-6  # the official expert LN keeps its wrapper's default (quirk Q4)
    router_jitter_noise: float = 0.01
    router_aux_loss_coef: float = 0.01
    vocab_size: int = vocab.VOCAB_SIZE
    num_labels: int = 2
    # True: a sequence's outputs never depend on its batch-mates (fixes the official [SEP]
    # offset leak, quirk Q2). False reproduces the official checkpoint's numbers exactly.
    batch_independent: bool = True
    # 'original': token layers at nucleotide length with masks (the checkpoint's semantics).
    # 'compact': token rows gathered into a static capacity; same numbers while it holds.
    mode: Mode = "compact"
    # Compact capacity (tokens per sequence incl. [CLS]/[SEP]) as a fraction of the padded
    # length; overflow is detected and reported, never silently dropped.
    token_capacity_fraction: float = 0.5
    dtype: str = "float32"  # compute dtype; params stay param_dtype
    param_dtype: str = "float32"
    # How a stack of identical layers (nucleotide, token, MAE decoder) runs: 'unrolled' (a Python
    # loop: N copies), 'scan' (one lax.scan over the per-layer params, stacked inside the call:
    # one compiled layer body forward and backward, for deep stacks on accelerators) or 'auto'
    # (scan in a forward-only program, unrolled under a gradient: the faster of the two in each,
    # measured on CPU; layers.run_layers). Same params, same numbers to rounding. Rematerialise
    # each layer in the backward (remat), keeping what remat_policy names: 'dots' (the projection
    # and FFN matmul outputs; attention core and elementwise ops recomputed) or 'nothing' (the
    # whole layer recomputed: least memory).
    # Defaults from the base train step at 4 x 512 on CPU (issue 10, benchmarks/train_step.py
    # --layer-loops): remat 'dots' 0.69x the step time of no remat with 0.7x the peak memory;
    # scan costs 7-30% more than unrolled there (stacking the params and their gradients each
    # step), while the forward alone (4 x 1,024 nt) is 6-8% faster scanned: hence 'auto'.
    layer_loop: LayerLoop = "auto"
    remat: bool = True
    remat_policy: RematPolicy = "dots"
    # The layer between nucleotide and token layers (mxdna_jax/tokenizers): 'learnt' (MxDNA),
    # 'kmer' (non-overlapping k-mers of kmer_size), 'kmer_overlap' (a k-mer of kmer_size at every
    # nucleotide, DNABERT-1), 'bpe' (units of a BPE segmentation passed as model(..., units=...),
    # DNABERT-2), 'single' (every nucleotide a token).
    tokenizer: str = "learnt"
    # Components of the unit tokenizers (learnt, kmer, kmer_overlap, bpe), switchable for the paper's ablation;
    # tokenizers without a component ignore its switch. experts=False: a unit is the mean of its
    # nucleotide states (no expert params; a learnt gate then learns from the aux loss alone);
    # deformable=False: a unit's token state is its embedded centre row (no deformable params);
    # jitter=False: no router jitter, even in training.
    experts: bool = True
    deformable: bool = True
    jitter: bool = True
    kmer_size: int = 6
    # tokenizer='bpe': vocabulary of the BPE trained on the pretraining corpus (DNABERT-2's 4096);
    # its tokens are at most num_experts nt. Only the segmentation uses it (the model embeds units
    # by length), so it changes no parameter.
    bpe_vocab_size: int = 4096
    # tokenizer='bpe': the tokenizer JSON ('' = <workdir>/bpe_tokenizer.json, trained on the
    # pretraining corpus at the first start; tokenizers/bpe.ensure_tokenizer copies a given one there).
    bpe_path: str = ""
    # What the sequence classifier reads: 'cls' the final [CLS] state (the official head), 'mean'
    # the mean of the final states of the valid unit tokens ([CLS]/[SEP] excluded, the rows
    # extract_tokens returns); either then goes through cls_norm -> dense -> tanh -> out_proj.
    cls_pool: ClsPool = "cls"
    # The masked-autoencoder head (objective 'mae', BarcodeMAE): decoder depth (same width as the
    # encoder), and what it reconstructs for each masked token: 'nucleotides' (each nucleotide of
    # the token's unit; any tokenizer) or 'kmer' (the k-mer's id among the 4**k + [UNK], as
    # BarcodeMAE; tokenizer 'kmer' only). Other heads ignore both; they create no parameter.
    mae_decoder_layers: int = 6
    mae_target: MaeTarget = "nucleotides"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.mode not in ("original", "compact"):
            raise ValueError(f"mode must be 'original' or 'compact', got {self.mode!r}")
        if not 0 < self.token_capacity_fraction <= 1:
            raise ValueError(f"token_capacity_fraction must be in (0, 1], got {self.token_capacity_fraction}")
        if tuple(self.expert_kernel_sizes) != tuple(range(1, len(self.expert_kernel_sizes) + 1)):
            raise ValueError(f"expert_kernel_sizes must be 1..E, got {self.expert_kernel_sizes}")
        if self.deformable_kernel_size != 3:
            raise ValueError("only deformable_kernel_size=3 is implemented (as in the official model)")
        tokenizers.check_name(self.tokenizer)
        if self.layer_loop not in ("auto", "scan", "unrolled"):
            raise ValueError(f"layer_loop must be 'auto', 'scan' or 'unrolled', got {self.layer_loop!r}")
        if self.remat_policy not in ("nothing", "dots"):
            raise ValueError(f"remat_policy must be 'nothing' or 'dots', got {self.remat_policy!r}")
        for name in ("experts", "deformable", "jitter", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.kmer_size, bool) or not isinstance(self.kmer_size, int) or self.kmer_size < 1:
            raise ValueError(f"kmer_size must be a positive integer, got {self.kmer_size!r}")
        if self.cls_pool not in ("cls", "mean"):
            raise ValueError(f"cls_pool must be 'cls' or 'mean', got {self.cls_pool!r}")
        if self.mae_target not in ("nucleotides", "kmer"):
            raise ValueError(f"mae_target must be 'nucleotides' or 'kmer', got {self.mae_target!r}")
        if self.mae_target == "kmer" and self.tokenizer != "kmer":
            raise ValueError(f"mae_target='kmer' predicts k-mer ids, so it needs tokenizer='kmer' "
                             f"(got {self.tokenizer!r}); use mae_target='nucleotides'")
        d = self.mae_decoder_layers
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"mae_decoder_layers must be an integer >= 0, got {d!r}")
        if not isinstance(self.bpe_path, str):
            raise ValueError(f"bpe_path must be a string ('' = <workdir>/bpe_tokenizer.json), got {self.bpe_path!r}")
        v = self.bpe_vocab_size
        if isinstance(v, bool) or not isinstance(v, int) or v < 4:
            raise ValueError(f"bpe_vocab_size must be an integer >= 4 (the A/C/G/T alphabet), got {v!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_unit_length(self) -> int:
        """The longest unit the tokenizer makes (nucleotides per token)."""
        if self.tokenizer == "single":
            return 1
        if self.tokenizer in ("kmer", "kmer_overlap"):
            return self.kmer_size
        return max(self.expert_kernel_sizes)

    @property
    def num_experts(self) -> int:
        return len(self.expert_kernel_sizes)

    def expert_groups(self) -> tuple[int, ...]:
        return tuple(expert_conv_groups(self.hidden_size, k) for k in self.expert_kernel_sizes)

    def token_capacity(self, length: int) -> int:
        """Static token capacity T for a padded nucleotide length L (incl. [CLS]/[SEP])."""
        return min(length, max(3, math.ceil(length * self.token_capacity_fraction)))

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, names, 1)[0]!r}?)"
                     if difflib.get_close_matches(u, names, 1) else repr(u) for u in unknown]
            raise ValueError(f"unknown model config field(s): {', '.join(hints)}")
        if "expert_kernel_sizes" in d:
            d["expert_kernel_sizes"] = tuple(d["expert_kernel_sizes"])
        return cls(**d)

    @classmethod
    def from_official(cls, hf: Mapping[str, Any], **overrides) -> ModelConfig:
        """From the official `config.json` kwargs (HF MxDNAConfig). Defaults to parity semantics."""
        n_layers = int(hf["num_hidden_layers"])
        conv_idx = int(hf["conversion_layer_idx"])
        if int(hf.get("num_key_value_heads", hf["num_attention_heads"])) != int(hf["num_attention_heads"]):
            raise ValueError("grouped-query attention (num_key_value_heads != heads) is not supported")
        if int(hf.get("num_motif_groups", 1)) != 1:
            raise ValueError("only num_motif_groups=1 is supported (as in the released checkpoint)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
        kw = dict(
            hidden_size=int(hf["hidden_size"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_nucleotide_layers=conv_idx,
            num_token_layers=n_layers - conv_idx - 1,
            expert_kernel_sizes=tuple(int(k) for k in hf["expert_kernel_sizes"]),
            deformable_kernel_size=int(hf.get("deformable_conv_kernel_size", 3)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            router_jitter_noise=float(hf.get("router_jitter_noise", 0.01)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
            vocab_size=int(hf.get("vocab_size", vocab.VOCAB_SIZE)),
            num_labels=int(hf.get("num_labels", 2)),
            batch_independent=False,
            mode="original",
        )
        kw.update(overrides)
        return cls(**kw)

    @property
    def is_official_layout(self) -> bool:
        """Whether the params are those of the official checkpoint (full learnt tokenizer)."""
        return self.tokenizer == "learnt" and self.experts and self.deformable

    def to_official(self) -> dict[str, Any]:
        """The official config.json kwargs for these weights."""
        if not self.is_official_layout:
            raise ValueError(f"no official MxDNA config for tokenizer={self.tokenizer!r}, experts={self.experts}, "
                             f"deformable={self.deformable} (only the full learnt tokenizer has one)")
        if self.cls_pool != "cls":
            raise ValueError(f"no official MxDNA config for cls_pool={self.cls_pool!r}: the official classifier "
                             "reads [CLS] (set cls_pool='cls' to export the backbone or an MLM model)")
        return {
            "model_type": "mxdna",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_nucleotide_layers + 1 + self.num_token_layers,
            "conversion_layer_idx": self.num_nucleotide_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "rope_theta": self.rope_theta,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": 1,
            "expert_kernel_sizes": list(self.expert_kernel_sizes),
            "deformable_conv_kernel_size": self.deformable_kernel_size,
            "router_jitter_noise": self.router_jitter_noise if self.jitter else 0.0,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "num_motif_groups": 1,
            "num_labels": self.num_labels,
            "pad_token_id": vocab.PAD, "unk_token_id": vocab.UNK, "cls_token_id": vocab.CLS,
            "sep_token_id": vocab.SEP, "mask_token_id": vocab.MASK,
        }


def expert_conv_groups(d: int, k: int) -> int:
    """Conv groups of the kernel-k expert: the divisor of d closest to k.

    Ties go to the first divisor met when enumerating pairs (a, d/a) for a = 1..floor(sqrt d),
    small one first, with a strict improvement test (the official rule; d=64, k=3 gives 2).
    """
    best, best_gap = None, None
    for a in range(1, math.isqrt(d) + 1):
        if d % a:
            continue
        for f in (a, d // a):
            gap = abs(f - k)
            if best_gap is None or gap < best_gap:
                best, best_gap = f, gap
    return best
