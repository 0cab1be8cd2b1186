"""MxDNA backbone and heads (masked LM, [CLS] classifier, token extraction).

Shape letters (defined once here and in mxdna_jax/ops/__init__.py):
  B batch, L nucleotide length incl. [CLS]/[SEP] and padding, T token rows (L in 'original'
  mode, the static capacity in 'compact' mode), D hidden, E experts, V vocabulary, C labels,
  N layers of a stack (per-layer outputs).

nucleotides -> embed -> nucleotide layers -> tokenizer -> token layers -> final LN.
The tokenizer (`cfg.tokenizer`, built by mxdna_jax.tokenizers.build_tokenizer) is read only
through its output interface (tokenizers/base.py); nothing here asks which one it is.
RoPE positions are nucleotide row indices everywhere, also for tokens (their unit centres).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mxdna_jax import vocab
from mxdna_jax.config import ModelConfig
from mxdna_jax.layers import CrossDecoderLayer, Dense, EncoderLayer, LayerNorm, param, run_layers, trunc_normal
from mxdna_jax.ops import mae as mae_ops
from mxdna_jax.ops.rope import rope_tables
from mxdna_jax.tokenizers import build_tokenizer
from mxdna_jax.tokenizers.base import TokenizationOutput, arange_positions, gather_rows

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class BackboneOutput(NamedTuple):
    nucleotide_hidden: jax.Array  # (B, L, D) output of the last nucleotide layer (MLM queries)
    token_hidden: jax.Array  # (B, T, D) final-normed token states
    token_positions: jax.Array  # (B, T) nucleotide index of each token row
    token_mask: jax.Array  # (B, T) 1 at valid token rows ([CLS], centres, [SEP])
    router_logits: jax.Array | None  # (B, L, E); None when the tokenizer has no router
    center: jax.Array  # (B, L) unit encoding (tokenizers/base.py)
    all: jax.Array  # (B, L)
    aux_loss: jax.Array  # () fp32, 0 for fixed tokenizers
    overflow: jax.Array  # () bool: compact capacity exceeded; outputs are then invalid
    intermediates: dict[str, Any]


class NucleotideStageOutput(NamedTuple):
    hidden: jax.Array  # (B, L, D) output of the last nucleotide layer
    rope: tuple[jax.Array, jax.Array]  # (cos, sin) (B, L, H): RoPE at the nucleotide positions


def make_jitter(key, shape, eps):
    """Multiplicative router jitter U(1 - eps, 1 + eps), as the official training mode draws it."""
    return jax.random.uniform(key, shape, jnp.float32, 1.0 - eps, 1.0 + eps)


def derive_special_mask(input_ids):
    return jnp.isin(input_ids, jnp.asarray(vocab.SPECIAL_IDS)).astype(jnp.int32)


class MxDNAModel(nnx.Module):
    """The backbone. `capacity`/`mode` decide the token-layer layout (see ModelConfig.mode)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.embed = param(rngs, trunc_normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        self.nucleotide_layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.num_nucleotide_layers)])
        # named `tokenization` whatever the kind: the learnt layer's params are model.tokenization.*
        self.tokenization = build_tokenizer(cfg, **kw)
        self.token_layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.num_token_layers)])
        self.final_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=pdt, dtype=dtype)
        self.dtype = dtype

    def resolve_capacity(self, L: int, token_capacity: int | None) -> int | None:
        if self.cfg.mode == "original":
            return None
        return token_capacity if token_capacity is not None else self.cfg.token_capacity(L)

    # ------------------------------------------------------------------ stages (the forward is made of these)

    def masks(self, input_ids, attention_mask, special_tokens_mask=None):
        """(attention_mask, special_tokens_mask) as int32; the special mask derived from the ids when None."""
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        am = attention_mask.astype(jnp.int32)
        sm = derive_special_mask(input_ids) if special_tokens_mask is None else special_tokens_mask.astype(jnp.int32)
        return am, sm

    def router_jitter(self, B: int, L: int, jitter_key=None, jitter=None):
        """The (B, L, D) router jitter the tokenizer gets, or None: a given `jitter` wins, else one is
        drawn from `jitter_key`; None whenever the tokenizer has no router or jitter is switched off."""
        if not self.tokenization.uses_jitter:
            return None  # no router, or jitter switched off: no noise even when one is passed
        if jitter is None and jitter_key is not None and self.cfg.router_jitter_noise > 0:
            return make_jitter(jitter_key, (B, L, self.cfg.hidden_size), self.cfg.router_jitter_noise)
        return jitter

    def embed_ids(self, input_ids):
        """(B, L, D) nucleotide embeddings in the compute dtype."""
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)

    def nucleotide_rope(self, B: int, L: int):
        """RoPE tables at the nucleotide positions 0..L-1 (the nucleotide layers, the MLM decoder's queries)."""
        return rope_tables(arange_positions(B, L), self.cfg.head_dim, self.cfg.rope_theta)

    def nucleotide_stage(self, h_BLD, attention_mask_BL, *, sow=None) -> NucleotideStageOutput:
        """The nucleotide layers on embeddings `h_BLD`; `attention_mask_BL` int32."""
        B, L, _ = h_BLD.shape
        rope = self.nucleotide_rope(B, L)
        h_BLD, outs_NBLD = _run_layers(self.nucleotide_layers, self.cfg, h_BLD, rope, attention_mask_BL,
                                       collect=sow is not None)
        if outs_NBLD is not None:
            sow("nucleotide_layer_outputs", outs_NBLD)
        return NucleotideStageOutput(h_BLD, rope)

    def tokenizer_stage(self, h_BLD, attention_mask_BL, special_BL, *, jitter_BLD=None, capacity: int | None = None,
                        dense_experts: bool = False, expert_tile: int = 128, sow=None,
                        units_BL=None) -> TokenizationOutput:
        """The tokenizer on the nucleotide states: token rows (B, T, D), their positions and mask.
        `units_BL`: a host-made segmentation, for the tokenizers that read one (bpe)."""
        tok = self.tokenization(h_BLD, attention_mask_BL, special_BL, jitter_BLD=jitter_BLD, capacity=capacity,
                                dense_experts=dense_experts, expert_tile=expert_tile, sow=sow, units_BL=units_BL)
        if sow is not None:
            if tok.router_logits is not None:
                sow("router_logits", tok.router_logits)
            sow("nms_center", tok.center)
            sow("nms_all", tok.all)
            # in compact mode the token-row states have another layout (B, T, D): other names
            sow(_layout_prefix(capacity) + "conversion_output", tok.hidden)
        return tok

    def token_stage(self, tok: TokenizationOutput, *, sow=None):
        """RoPE at the token positions -> token layers over the token rows -> final LN: (B, T, D).
        `sow` gets layout-independent names (the model prefixes them in compact mode)."""
        t = tok.hidden
        rope_T = rope_tables(tok.positions, self.cfg.head_dim, self.cfg.rope_theta)
        t, outs_NBTD = _run_layers(self.token_layers, self.cfg, t, rope_T, tok.mask, collect=sow is not None)
        if outs_NBTD is not None:
            sow("token_layer_outputs", outs_NBTD)
        final = self.final_norm(t)
        if sow is not None:
            sow("final_hidden", final)
        return final

    def __call__(self, input_ids, attention_mask, special_tokens_mask=None, *, jitter_key=None, jitter=None,
                 token_capacity: int | None = None, capture: bool = False, dense_experts: bool = False,
                 expert_tile: int = 128, units=None) -> BackboneOutput:
        """`units`: (B, L) int32 unit encoding of a host-side segmentation (tokenizer='bpe' needs it:
        batch['units'] from tokenizers/bpe.BpeSegmenter); ignored by the other tokenizers, None is fine."""
        B, L = input_ids.shape
        am, sm = self.masks(input_ids, attention_mask, special_tokens_mask)
        inter: dict[str, Any] = {}
        sow = inter.__setitem__ if capture else None
        jitter = self.router_jitter(B, L, jitter_key, jitter)
        h = self.embed_ids(input_ids)
        if capture:
            inter["embeddings"] = h
        h = self.nucleotide_stage(h, am, sow=sow).hidden
        capacity = self.resolve_capacity(L, token_capacity)
        tok = self.tokenizer_stage(h, am, sm, jitter_BLD=jitter, capacity=capacity, dense_experts=dense_experts,
                                   expert_tile=expert_tile, sow=sow, units_BL=units)
        prefix = _layout_prefix(capacity)
        final = self.token_stage(tok, sow=None if sow is None else (lambda k, v: sow(prefix + k, v)))
        return BackboneOutput(h, final, tok.positions, tok.mask, tok.router_logits, tok.center, tok.all,
                              tok.aux_loss, tok.overflow, inter)


def _layout_prefix(capacity: int | None) -> str:
    """Capture names of token-row states: compact mode's (B, T, D) layout gets 'compact_'."""
    return "" if capacity is None else "compact_"


def _run_layers(layers, cfg: ModelConfig, h, *args, collect: bool = False):
    """A stack of identical layers as the config says (layer_loop, remat, remat_policy; layers.run_layers)."""
    return run_layers(layers, h, *args, loop=cfg.layer_loop, remat=cfg.remat, remat_policy=cfg.remat_policy,
                      collect=collect)


class LMHead(nnx.Module):
    """ESM-style head: dense -> erf-GELU -> LN -> decoder (untied) + bias."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        self.dense = Dense(d, d, ("embed", "qkv"), rngs=rngs, use_bias=True, dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.decoder = Dense(d, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), param_dtype), logical_axes=("vocab",))

    def __call__(self, x):
        h = self.norm(jax.nn.gelu(self.dense(x), approximate=False))
        return self.decoder(h).astype(jnp.float32) + self.bias[...].astype(jnp.float32)[None, None, :]


class MLMOutput(NamedTuple):
    logits: jax.Array  # (B, L, V) fp32, every row (padding rows too, quirk Q1)
    aux_loss: jax.Array
    overflow: jax.Array
    backbone: BackboneOutput


class MxDNAForMaskedLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        self.cfg = cfg
        self.model = MxDNAModel(cfg, rngs=rngs)
        self.decoder = CrossDecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=pdt, dtype=dtype)
        self.lm_head = LMHead(cfg, rngs=rngs, dtype=dtype, param_dtype=pdt)

    def decoder_stage(self, nucleotide_hidden_BLD, token_hidden_BTD, token_positions_BT, token_mask_BT,
                      attention_mask_BL, *, sow=None):
        """MLM logits (B, L, V) fp32: nucleotide queries (RoPE at their positions) cross-attend to the
        token states (RoPE at theirs) -> LN -> LM head."""
        B, L = attention_mask_BL.shape
        rope_q = self.model.nucleotide_rope(B, L)
        rope_k = rope_tables(token_positions_BT, self.cfg.head_dim, self.cfg.rope_theta)
        h = self.decoder(nucleotide_hidden_BLD, rope_q, token_hidden_BTD, rope_k, token_mask_BT,
                         attention_mask_BL.astype(jnp.int32))
        hn = self.norm(h)
        if sow is not None:
            sow("decoder_output", h)
            sow("decoder_norm_output", hn)
        return self.lm_head(hn)

    def __call__(self, input_ids, attention_mask, special_tokens_mask=None, **kw) -> MLMOutput:
        out = self.model(input_ids, attention_mask, special_tokens_mask, **kw)
        sow = out.intermediates.__setitem__ if kw.get("capture") else None
        logits = self.decoder_stage(out.nucleotide_hidden, out.token_hidden, out.token_positions, out.token_mask,
                                    attention_mask, sow=sow)
        return MLMOutput(logits, out.aux_loss, out.overflow, out)


class MxDNAForSequenceClassification(nnx.Module):
    """Sequence classifier (the official '...ND' head): pool -> LN -> dense -> tanh -> out_proj.

    The pool is `cfg.cls_pool`: the [CLS] row (official), or the mean of the unit tokens.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, num_labels: int | None = None):
        dtype, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        C = num_labels or cfg.num_labels
        self.cfg = cfg
        self.model = MxDNAModel(cfg, rngs=rngs)
        self.cls_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=pdt, dtype=dtype)
        self.dense = Dense(cfg.hidden_size, cfg.hidden_size, ("embed", "qkv"), rngs=rngs, use_bias=True,
                           dtype=dtype, param_dtype=pdt)
        self.out_proj = Dense(cfg.hidden_size, C, ("embed", None), rngs=rngs, use_bias=True, dtype=dtype,
                              param_dtype=pdt)

    def __call__(self, input_ids, attention_mask, special_tokens_mask=None, **kw):
        out = self.model(input_ids, attention_mask, special_tokens_mask, **kw)
        sm = derive_special_mask(input_ids) if special_tokens_mask is None else special_tokens_mask
        logits, cls = self.head(out, sm)
        if kw.get("capture"):
            out.intermediates["cls_head_input"] = cls
        return logits, out

    def pool(self, out: BackboneOutput, special_tokens_mask=None):
        """(B, D): the [CLS] row (cls_pool='cls'), or the mean over the valid unit-token rows
        (cls_pool='mean'; the rows extract_tokens returns, accumulated in fp32; 0 for none)."""
        if self.cfg.cls_pool == "cls":
            return out.token_hidden[:, 0]  # [CLS] is row 0 in both layouts
        if special_tokens_mask is None:
            raise ValueError("cls_pool='mean' needs the special tokens mask")
        ext = extract_tokens(out, special_tokens_mask)
        m = ext.mask.astype(jnp.float32)[..., None]
        total = jnp.sum(ext.tokens.astype(jnp.float32) * m, axis=1)
        return (total / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(out.token_hidden.dtype)

    def head(self, out: BackboneOutput, special_tokens_mask=None):
        """(logits (B, C), head input (B, D)) from a backbone output."""
        cls = self.cls_norm(self.pool(out, special_tokens_mask))
        return self.out_proj(jnp.tanh(self.dense(cls))).astype(jnp.float32), cls


class TokenExtractionOutput(NamedTuple):
    tokens: jax.Array  # (B, T, D) final states of the unit tokens (no [CLS]/[SEP])
    positions: jax.Array  # (B, T) nucleotide index of each token's unit centre
    mask: jax.Array  # (B, T) 1 at valid unit tokens
    backbone: BackboneOutput


class MxDNAForTokenExtraction(nnx.Module):
    """The learnt tokens: final states at unit centres, in (b, position) order.

    Static-shaped (B, T, D) with a mask; `flatten_tokens` gives the official flat (N_tok, D).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = MxDNAModel(cfg, rngs=rngs)

    def __call__(self, input_ids, attention_mask, special_tokens_mask=None, **kw) -> TokenExtractionOutput:
        out = self.model(input_ids, attention_mask, special_tokens_mask, **kw)
        sm = derive_special_mask(input_ids) if special_tokens_mask is None else special_tokens_mask
        return extract_tokens(out, sm)


def extract_tokens(out: BackboneOutput, special_tokens_mask) -> TokenExtractionOutput:
    """The unit tokens of a backbone output: token rows minus [CLS]/[SEP]."""
    is_special_T = gather_rows(special_tokens_mask.astype(jnp.int32), out.token_positions)
    mask = out.token_mask * (1 - is_special_T)
    return TokenExtractionOutput(out.token_hidden, out.token_positions, mask, out)


def flatten_tokens(tokens_BTD, mask_BT, positions_BT=None):
    """Host-side: the (N_tok, D) rows with mask 1, row-major, plus their (batch, position)."""
    import numpy as np

    mask = np.asarray(mask_BT).astype(bool)
    b, t = np.nonzero(mask)
    rows = np.asarray(tokens_BTD)[b, t]
    pos = np.asarray(positions_BT)[b, t] if positions_BT is not None else t
    return rows, b.astype(np.int32), pos.astype(np.int32)


class MAEOutput(NamedTuple):
    logits: jax.Array  # fp32: (B, T, S, V) per-nucleotide ('nucleotides') or (B, T, 4**k + 1) ('kmer')
    token_positions: jax.Array  # (B, T) nucleotide index of each token row (decoder RoPE positions)
    token_mask: jax.Array  # (B, T) 1 at valid token rows
    center: jax.Array  # (B, L) the tokenizer's unit encoding (targets are read through it)
    masked_rows: jax.Array  # (B, T) 1 at token rows the encoder never saw (mask embedding in the decoder)
    kept_rows: jax.Array  # (B, T) 1 at token rows the encoder processed
    encoder_hidden: jax.Array  # (B, K, D) final-normed encoder states of the kept rows
    encoder_rows: jax.Array  # (B, K) the T-row index of each kept row
    encoder_mask: jax.Array  # (B, K) 1 at valid kept rows
    aux_loss: jax.Array
    overflow: jax.Array  # token capacity T or kept capacity K exceeded: outputs invalid, re-run larger


class MxDNAForMAE(nnx.Module):
    """Masked autoencoder (BarcodeMAE) around the MxDNA backbone.

    Encoder = the backbone (`self.model`, the same parameters the other heads use, so a probe or a
    fine-tuning run loads it like any backbone): the nucleotide embeddings of masked nucleotides
    are replaced by the [MASK] embedding before anything reads them, the tokenizer cuts units,
    every token row whose unit touches a masked nucleotide is dropped, and the token layers run on
    the K kept rows only (ops/mae.py). Decoder: a projection of the kept states scattered back to
    their rows, a learnt mask embedding at the dropped rows, `mae_decoder_layers` transformer
    layers with RoPE at the original token positions, a final LN and a linear head.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        d = cfg.hidden_size
        self.cfg = cfg
        self.model = MxDNAModel(cfg, rngs=rngs)
        self.decoder_embed = Dense(d, d, ("embed", "qkv"), use_bias=True, **kw)
        self.mask_embedding = param(rngs, trunc_normal, (d,), ("embed",), pdt)
        self.decoder_layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.mae_decoder_layers)])
        self.decoder_norm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=pdt, dtype=dtype)
        if cfg.mae_target == "kmer":
            self.target_shape = (4**cfg.kmer_size + 1,)  # the k-mers + [UNK] (BarcodeMAE's vocabulary)
        else:
            self.target_shape = (cfg.max_unit_length, cfg.vocab_size)
        self.mae_head = Dense(d, math.prod(self.target_shape), ("embed", None), use_bias=True, **kw)

    def encode(self, input_ids, attention_mask, special_tokens_mask, mae_mask, *, keep_fraction: float,
               jitter_key=None, jitter=None, token_capacity: int | None = None, units=None, embeds=None):
        """The encoder half. `embeds` (B, L, D) replaces the id embeddings (the gradient test of
        'the encoder never sees masked content' differentiates through it)."""
        m = self.model
        B, L = input_ids.shape
        am, sm = m.masks(input_ids, attention_mask, special_tokens_mask)
        jitter = m.router_jitter(B, L, jitter_key, jitter)
        h = m.embed_ids(input_ids) if embeds is None else embeds.astype(m.dtype)
        mask_row = m.embed[...][vocab.MASK].astype(m.dtype)
        h = jnp.where(mae_mask[..., None] > 0, mask_row[None, None, :], h)
        h = m.nucleotide_stage(h, am).hidden
        tok = m.tokenizer_stage(h, am, sm, jitter_BLD=jitter, capacity=m.resolve_capacity(L, token_capacity),
                                units_BL=units)
        masked, kept = mae_ops.masked_rows(mae_mask, tok.center, tok.positions, tok.mask)
        K = mae_ops.kept_capacity(tok.hidden.shape[1], keep_fraction)
        x_BKD, rows_BK, mask_BK, kept_overflow = mae_ops.gather_kept(tok.hidden, kept, K)
        pos_BK = gather_rows(tok.positions, rows_BK)
        enc = m.token_stage(tok._replace(hidden=x_BKD, positions=pos_BK, mask=mask_BK))
        return tok, masked, kept, enc, rows_BK, mask_BK, tok.overflow | kept_overflow

    def __call__(self, input_ids, attention_mask, special_tokens_mask=None, *, mae_mask, keep_fraction: float = 0.6,
                 **kw) -> MAEOutput:
        tok, masked, kept, enc, rows, mask_K, overflow = self.encode(
            input_ids, attention_mask, special_tokens_mask, mae_mask, keep_fraction=keep_fraction, **kw)
        B, T, D = tok.hidden.shape
        z = self.decoder_embed(enc)
        base = jnp.where(masked[..., None] > 0, self.mask_embedding[...].astype(z.dtype)[None, None, :],
                         jnp.zeros((), z.dtype))
        x = mae_ops.scatter_kept(jnp.broadcast_to(base, (B, T, D)), z, rows, mask_K)
        rope = rope_tables(tok.positions, self.cfg.head_dim, self.cfg.rope_theta)
        x, _ = _run_layers(self.decoder_layers, self.cfg, x, rope, tok.mask)
        logits = self.mae_head(self.decoder_norm(x)).astype(jnp.float32).reshape(B, T, *self.target_shape)
        return MAEOutput(logits, tok.positions, tok.mask, tok.center, masked, kept, enc, rows, mask_K,
                         tok.aux_loss, overflow)
