"""Embeddings and learnt tokenizations of sequences with a trained model (batched, jitted).

    embed(model, seqs, pool="mean")   -> (N, D) float32, one row per sequence, input order
    embed(model, seqs, pool="tokens") -> TokenEmbeddings (all unit-token states, flat + offsets)
    learnt_units(model, seqs)         -> per sequence, its units as (start, length) in 0-based nt

Sequences are bucketed by length (a padded length that is a multiple of `BUCKET`), so a
FASTA of mixed lengths compiles a handful of shapes, not one per record. `model` is a
`MxDNAForTokenExtraction` (params_io.load_any(..., head="tokens")).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxdna_jax import staged, vocab
from mxdna_jax.capacity import CapacityPolicy
from mxdna_jax.cli import UserError

BUCKET = 64
POOLS = ("mean", "cls", "tokens")


@dataclasses.dataclass
class TokenEmbeddings:
    """Every unit token of every sequence: rows offsets[i]:offsets[i+1] belong to sequence i."""

    embeddings: np.ndarray  # (N_tok, D) float32
    offsets: np.ndarray  # (N + 1,) int64
    positions: np.ndarray  # (N_tok,) int32: 0-based nucleotide index of each token's unit centre


def bucket_length(n_nt: int, limit: int) -> int:
    """Padded model length for a sequence of n_nt nucleotides ([CLS] + [SEP] included)."""
    return min(limit, BUCKET * math.ceil((n_nt + 2) / BUCKET))


def encode_all(seqs: Sequence[str | np.ndarray], limit: int, names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Nucleotide ids per sequence (strings are validated: a bad character is a UserError naming
    the record); a sequence over the model's limit is a UserError (never truncated silently)."""
    out = []
    for i, s in enumerate(seqs):
        name = names[i] if names is not None else f"sequence {i}"
        try:
            ids = vocab.nucleotides_to_ids(s, name=name) if isinstance(s, (str, bytes)) else np.asarray(s, np.int32)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not len(ids):
            raise UserError(f"{name}: empty sequence")
        if len(ids) + 2 > limit:
            raise UserError(f"{name}: {len(ids)} nt is longer than the model's limit of {limit - 2} nt "
                            "(max_position_embeddings - 2); split or truncate it first")
        out.append(ids)
    return out


def batches_by_bucket(ids: Sequence[np.ndarray], batch_size: int, limit: int) -> Iterable[tuple[np.ndarray, dict]]:
    """(indices into `ids`, padded batch) per batch; each batch is one bucket length and exactly
    `batch_size` rows (a short last batch repeats its first row; callers keep len(indices))."""
    order = sorted(range(len(ids)), key=lambda i: (bucket_length(len(ids[i]), limit), i))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_length(len(ids[i]), limit), []).append(i)
    for L, idx in groups.items():
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo: lo + batch_size]
            rows = [np.concatenate([[vocab.CLS], ids[i], [vocab.SEP]]) for i in chunk]
            rows += [rows[0]] * (batch_size - len(rows))  # static batch shape
            yield np.asarray(chunk), vocab.batch_from_ids(rows, pad_to=L)


@nnx.jit(static_argnames=("token_capacity",))
def _tokens_forward(model, ids, am, key, units, token_capacity):
    # One jitted function for every call: compiled once per (model structure, batch shape, capacity).
    return model(ids, am, jitter_key=key, token_capacity=token_capacity, units=units)


@nnx.jit
def _prefix(model, ids, am, key, units):
    return staged.prefix(model, ids, am, jitter_key=key, units=units)


@nnx.jit(static_argnames=("token_capacity",))
def _finish(model, prefix, token_capacity):
    # compiled once per (model structure, batch shape, rung): the policy's ladder bounds the rungs
    return staged.finish(model, prefix, token_capacity)


def segmenter_for(model, source: str | None = None):
    """The host-side unit encoder a `tokenizer='bpe'` model needs (the BPE JSON next to the
    source's checkpoint, else model.bpe_path); None for every other tokenizer."""
    if model.cfg.tokenizer != "bpe":
        return None
    import pathlib

    from mxdna_jax.tokenizers import bpe

    beside = pathlib.Path(source or "") / bpe.BPE_FILENAME
    return bpe.BpeSegmenter(str(beside) if source and beside.is_file() else model.cfg.bpe_path,
                            max_unit_length=model.cfg.num_experts)


def _forward(model, L: int, segmenter=None) -> Callable:
    """fn(batch, jitter_key=None) -> TokenExtractionOutput on host. Compact mode: the nucleotide
    layers and the tokenizer run first and give the batch's token count, the token layers then run
    at the smallest rung of the policy's ladder that holds it (mxdna_jax.staged; until that rung
    has come back a few times, an already compiled one up to 1.25x above: capacity.Rungs), and
    never retry."""
    policy = CapacityPolicy.for_model(model.cfg, L)
    counted = policy.counted()  # this length's rungs, compiled as they keep coming back

    def call(batch, jitter_key=None):
        ids, am = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
        units = None if segmenter is None else jnp.asarray(segmenter(batch["input_ids"]))
        if not policy.enabled:
            return jax.device_get(_tokens_forward(model, ids, am, jitter_key, units, token_capacity=None))
        prefix, count = _prefix(model, ids, am, jitter_key, units)

        def attempt(cap):
            out = _finish(model, prefix, token_capacity=cap)
            return out, out.backbone.overflow

        out, _ = counted.run(int(count), attempt)
        return jax.device_get(out)

    return call


def embed(model, seqs, *, pool: str = "mean", batch_size: int = 16, names=None, progress=None, segmenter=None):
    """Pooled embeddings (N, D) for pool 'mean' (over each sequence's unit tokens) or 'cls' (the
    final [CLS] state); all unit tokens for pool 'tokens'."""
    if pool not in POOLS:
        raise UserError(f"pool must be one of {POOLS}, got {pool!r}")
    limit = model.cfg.max_position_embeddings
    ids = encode_all(seqs, limit, names)
    pooled: list[np.ndarray | None] = [None] * len(ids)
    per_seq: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(ids)
    forwards: dict[int, Callable] = {}
    for idx, batch in batches_by_bucket(ids, batch_size, limit):
        L = batch["input_ids"].shape[1]
        out = forwards.setdefault(L, _forward(model, L, segmenter))(batch)
        mask = np.asarray(out.mask, bool)
        tokens = np.asarray(out.tokens, np.float32)
        for row, i in enumerate(idx):
            if pool == "cls":
                pooled[i] = np.asarray(out.backbone.token_hidden[row, 0], np.float32)
            elif pool == "mean":
                pooled[i] = tokens[row][mask[row]].mean(0)
            else:
                per_seq[i] = (tokens[row][mask[row]], np.asarray(out.positions[row])[mask[row]] - 1)
        if progress is not None:
            progress(len(idx))
    if pool != "tokens":
        return np.stack(pooled)
    counts = np.asarray([len(t) for t, _ in per_seq], np.int64)
    return TokenEmbeddings(np.concatenate([t for t, _ in per_seq]), np.concatenate([[0], np.cumsum(counts)]),
                           np.concatenate([p for _, p in per_seq]).astype(np.int32))


def units_from_centers(center_L: np.ndarray, n_nt: int) -> list[tuple[int, int]]:
    """(start, length) of each unit, 0-based in the sequence, from one row of the NMS encoding
    (expert index = length - 1 at the centre row; row r is nucleotide r - 1)."""
    rows = np.flatnonzero(np.asarray(center_L)[: n_nt + 2] >= 0)
    out = []
    for r in rows:
        k = int(center_L[r]) + 1
        out.append((int(r - k // 2 - 1), k))
    return out


def learnt_units(model, seqs, *, batch_size: int = 16, names=None, jitter_key=None,
                 segmenter=None) -> list[list[tuple[int, int]]]:
    """Each sequence's units (start, length). `jitter_key`: a training-mode (stochastic) pass."""
    limit = model.cfg.max_position_embeddings
    ids = encode_all(seqs, limit, names)
    units: list = [None] * len(ids)
    forwards: dict[int, Callable] = {}
    for idx, batch in batches_by_bucket(ids, batch_size, limit):
        L = batch["input_ids"].shape[1]
        out = forwards.setdefault(L, _forward(model, L, segmenter))(batch, jitter_key)
        for row, i in enumerate(idx):
            units[i] = units_from_centers(np.asarray(out.backbone.center[row]), len(ids[i]))
    return units
