"""Fixed-shape numpy batches of a labelled split for jitted fine-tuning and evaluation.

Each batch is padded to a BUCKET length: the smallest of a few lengths (by default multiples of
64, then max_length) that holds the batch's longest row + 2 ([CLS], [SEP]). A jitted step then
compiles once per bucket, not once per batch, and short tasks do not pay for max_length.

Nothing is truncated silently: a row longer than max_length - 2 nucleotides is a UserError
naming its file and line, unless `truncate` says which end to cut:
  "right"   keep the first max_length - 2 nt (drop the 3' / right end)
  "left"    keep the last max_length - 2 nt (drop the left end)
  "center"  keep the middle window (drop equally from both ends; the odd one from the right)

Batch dict (all numpy, batch_size rows):
  input_ids            int32 (B, L)  [CLS]=2 ids [SEP]=3, [PAD]=0 after (vocab's ids)
  attention_mask       int32 (B, L)  1 from [CLS] to [SEP]
  special_tokens_mask  int32 (B, L)  1 at [CLS], [SEP], [PAD]
  labels               int32 (B,)    the class; vocab.IGNORE_LABEL (-100) on padding rows
  valid                int32 (B,)    1 for real rows, 0 for padding rows
  index                int32 (B,)    the row's index in the split; -1 on padding rows
Only the last batch of a pass without drop_remainder has padding rows: all-[PAD] rows whose
attention_mask is 0. Weight metrics by `valid` with jnp.where (not a product: a fully masked
row may give NaN logits); IGNORE_LABEL makes a forgotten mask fail loudly instead of silently
biasing the metric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from mxdna_jax import vocab
from mxdna_jax.cli import UserError
from mxdna_jax.tasks.labelled import SHUFFLE_STREAM, Split, gather_rows

TRUNCATE_MODES = ("right", "left", "center")
BUCKET_MULTIPLE = 64


def bucket_lengths(max_length: int, multiple: int = BUCKET_MULTIPLE) -> tuple[int, ...]:
    """Multiples of `multiple` below max_length, then max_length: (64, 128, ..., max_length)."""
    return tuple(range(multiple, max_length, multiple)) + (max_length,)


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSplit:
    """A split cut to fit max_length (rows without specials, concatenated) and its buckets."""

    split: Split
    max_length: int
    truncate: str | None
    buckets: tuple[int, ...]
    ids: np.ndarray
    offsets: np.ndarray
    n_truncated: int

    def __len__(self) -> int:
        return len(self.split)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def bucket_for(self, tokens: int) -> int:
        return self.buckets[int(np.searchsorted(self.buckets, tokens))]

    def num_batches(self, batch_size: int, *, drop_remainder: bool = False) -> int:
        n, b = len(self), _positive_int("batch_size", batch_size)
        return n // b if drop_remainder else -(-n // b)

    def order(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> np.ndarray:
        """Row order of one pass: the file order, or a permutation fixed by (seed, epoch)."""
        n = len(self)
        if not shuffle:
            return np.arange(n)
        return np.random.default_rng([int(seed), SHUFFLE_STREAM, int(epoch)]).permutation(n)

    def batch(self, rows: np.ndarray, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """The batch of the given split rows, padded with invalid rows up to batch_size."""
        rows = np.asarray(rows, dtype=np.int64)
        b = len(rows) if batch_size is None else batch_size
        lengths = self.lengths[rows]
        length = self.bucket_for(int(lengths.max()) + 2)
        input_ids = np.full((b, length), vocab.PAD, dtype=np.int32)
        for j, (r, n) in enumerate(zip(rows, lengths)):
            input_ids[j, 0] = vocab.CLS
            input_ids[j, 1 : n + 1] = self.ids[self.offsets[r] : self.offsets[r] + n]
            input_ids[j, n + 1] = vocab.SEP
        out = vocab.make_masks(input_ids)
        out["labels"] = np.full(b, vocab.IGNORE_LABEL, dtype=np.int32)
        out["labels"][: len(rows)] = self.split.labels[rows]
        out["valid"] = (np.arange(b) < len(rows)).astype(np.int32)
        out["index"] = np.full(b, -1, dtype=np.int32)
        out["index"][: len(rows)] = rows
        return out

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the split in batches of exactly batch_size rows.

        shuffle: a permutation fixed by (seed, epoch): the same for the same pair, different per
        epoch. drop_remainder: skip the last partial batch (training); otherwise it is padded with
        invalid rows (`valid` = 0) so every batch has the same shape (evaluation).
        """
        b = _positive_int("batch_size", batch_size)
        order = self.order(shuffle=shuffle, seed=seed, epoch=epoch)
        stop = len(order) - len(order) % b if drop_remainder else len(order)
        for start in range(0, stop, b):
            yield self.batch(order[start : start + b], b)


def encode_split(split: Split, max_length: int, *, truncate: str | None = None,
                 buckets: Sequence[int] | None = None) -> EncodedSplit:
    """Check (or cut, per `truncate`) every row against max_length tokens ([CLS] + nt + [SEP]).

    buckets: the padded lengths batches may take (default `bucket_lengths(max_length)`); pass
    (max_length,) for one static shape.
    """
    max_length = _positive_int("max_length", max_length, 3)
    if truncate is not None and truncate not in TRUNCATE_MODES:
        raise UserError(f"truncate must be one of {', '.join(map(repr, TRUNCATE_MODES))} or None, got {truncate!r}")
    buckets = tuple(sorted({_positive_int("bucket length", b, 3) for b in
                            (bucket_lengths(max_length) if buckets is None else buckets)}))
    if not buckets:
        raise UserError("buckets is empty")
    keep = max_length - 2
    lengths = split.lengths
    over = np.flatnonzero(lengths > keep)
    if over.size and truncate is None:
        i = int(over[0])
        raise UserError(
            f"{split.where(i)}: sequence of {lengths[i]} nt needs {lengths[i] + 2} tokens with [CLS]/[SEP], "
            f"more than max_length={max_length} ({over.size} of {len(split)} {split.name} rows are too long); "
            f"pass truncate='right', 'left' or 'center' to cut them to {keep} nt"
        )
    ids, offsets = split.ids, split.offsets
    if over.size:
        new_len = np.minimum(lengths, keep)
        cut = lengths - new_len
        shift = {"right": 0 * cut, "left": cut, "center": cut // 2}[truncate]
        ids, offsets = gather_rows(split.ids, split.offsets, np.arange(len(split)),
                                   starts=split.offsets[:-1] + shift, lengths=new_len)
    longest = int(np.diff(offsets).max()) + 2
    if longest > buckets[-1]:
        raise UserError(f"the longest {split.name} row needs {longest} tokens but the largest bucket is {buckets[-1]}")
    return EncodedSplit(split=split, max_length=max_length, truncate=truncate, buckets=buckets, ids=ids,
                        offsets=offsets, n_truncated=int(over.size))


def batches(split: Split, batch_size: int, max_length: int, *, truncate: str | None = None,
            buckets: Sequence[int] | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0,
            drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """`encode_split(...).batches(...)` in one call (encode once and reuse it across epochs)."""
    enc = encode_split(split, max_length, truncate=truncate, buckets=buckets)
    return enc.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_remainder=drop_remainder)
