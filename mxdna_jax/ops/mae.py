"""Masked-autoencoder row bookkeeping (BarcodeMAE), pure jnp and static-shaped.

Shape letters as in ops/__init__.py, plus K kept token rows per sequence (static) and S target
slots per token row (the longest unit).

The host masks whole nucleotide spans (objectives/mae.py); the model's tokenizer then cuts the
[MASK]ed sequence into units. A token row is *masked* when its unit covers any masked
nucleotide: it is dropped from the encoder's token layers and the decoder gets the mask
embedding in its place. The other valid rows ([CLS], [SEP], units wholly outside the masked
spans) are *kept*: gathered into K rows for the encoder, scattered back to their T-row slots for
the decoder, which runs at their original positions.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from mxdna_jax import vocab
from mxdna_jax.tokenizers.base import compact_token_positions, gather_rows


def kept_capacity(T: int, keep_fraction: float) -> int:
    """Static K for T token rows: ceil(keep_fraction * T), at least 3 ([CLS], a unit, [SEP]) and at
    most T. The objective sets keep_fraction = the unmasked share plus a margin; a batch that keeps
    more rows reports overflow, and the capacity policy re-runs it at a larger T (hence a larger
    K): rows are never dropped silently."""
    return min(T, max(3, math.ceil(T * keep_fraction)))


def unit_spans(center_BL, positions_BT, token_mask_BT):
    """(start_BT, length_BT) of each token row's unit; length 0 for [CLS]/[SEP]/padding rows.

    A unit of length k centred at p covers [p - k//2, p - k//2 + k) (the NMS convention)."""
    e_BT = gather_rows(center_BL, positions_BT)
    length = jnp.where((token_mask_BT > 0) & (e_BT >= 0), e_BT + 1, 0).astype(jnp.int32)
    start = (positions_BT - length // 2).astype(jnp.int32)
    return start, length


def span_count(x_BL, start_BT, length_BT):
    """sum of x over each row's span [start, start + length) (0 for length 0), via a prefix sum."""
    B, L = x_BL.shape
    cs = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.cumsum(x_BL.astype(jnp.int32), axis=1)], axis=1)
    lo = jnp.clip(start_BT, 0, L)
    hi = jnp.clip(start_BT + length_BT, 0, L)
    return jnp.take_along_axis(cs, hi, axis=1) - jnp.take_along_axis(cs, lo, axis=1)


def masked_rows(nt_mask_BL, center_BL, positions_BT, token_mask_BT):
    """(masked_BT, kept_BT) int32: masked = a valid unit row touching a masked nucleotide;
    kept = every other valid row ([CLS]/[SEP] are always kept)."""
    start, length = unit_spans(center_BL, positions_BT, token_mask_BT)
    masked = (span_count(nt_mask_BL, start, length) > 0) & (token_mask_BT > 0)
    kept = (token_mask_BT > 0) & ~masked
    return masked.astype(jnp.int32), kept.astype(jnp.int32)


def gather_kept(x_BTD, kept_BT, K: int):
    """The kept rows of x in order: (x_BKD, rows_BK index into T, mask_BK, overflow)."""
    rows, mask, overflow = compact_token_positions(kept_BT, K)
    return gather_rows(x_BTD, rows), rows, mask, overflow


def scatter_kept(base_BTD, x_BKD, rows_BK, mask_BK):
    """base with row rows_BK[b, k] replaced by x[b, k] where mask_BK (invalid slots dropped)."""
    B, T, _ = base_BTD.shape
    idx = jnp.where(mask_BK > 0, rows_BK, T)  # out of range -> mode='drop'
    return base_BTD.at[jnp.arange(B)[:, None], idx].set(x_BKD.astype(base_BTD.dtype), mode="drop")


def nucleotide_targets(labels_BL, start_BT, length_BT, row_mask_BT, S: int):
    """(B, T, S) targets: slot s of a masked row is labels[start + s] for s < length, else
    IGNORE_LABEL. `labels_BL` holds the original id at masked nucleotides and IGNORE_LABEL
    elsewhere, so a unit that straddles a span edge is scored on its masked nucleotides only."""
    B, L = labels_BL.shape
    s = jnp.arange(S, dtype=jnp.int32)[None, None, :]
    idx = start_BT[..., None] + s  # (B, T, S)
    ok = (s < length_BT[..., None]) & (row_mask_BT[..., None] > 0) & (idx >= 0) & (idx < L)
    lab = jnp.take_along_axis(labels_BL, jnp.clip(idx, 0, L - 1).reshape(B, -1), axis=1).reshape(idx.shape)
    return jnp.where(ok, lab, vocab.IGNORE_LABEL).astype(jnp.int32)


def kmer_targets(labels_BL, start_BT, length_BT, row_mask_BT, k: int):
    """(B, T) BarcodeMAE targets: the index (base 4, A/C/G/T = 0..3 in vocab order) of each masked
    row's k-mer, 4**k ([UNK]) when it holds an N; IGNORE_LABEL for rows that are not masked, not
    of length k (a short tail unit) or not wholly masked."""
    nt = nucleotide_targets(labels_BL, start_BT, length_BT, row_mask_BT, k)  # (B, T, k)
    full = (length_BT == k) & (row_mask_BT > 0) & jnp.all(nt != vocab.IGNORE_LABEL, axis=-1)
    base = nt - vocab.A  # A, T, C, G are consecutive ids
    is_acgt = (base >= 0) & (base < 4)
    weights = (4 ** jnp.arange(k - 1, -1, -1, dtype=jnp.int32))[None, None, :]
    index = jnp.sum(jnp.where(is_acgt, base, 0) * weights, axis=-1)
    index = jnp.where(jnp.all(is_acgt, axis=-1), index, 4**k)
    return jnp.where(full, index, vocab.IGNORE_LABEL).astype(jnp.int32)
