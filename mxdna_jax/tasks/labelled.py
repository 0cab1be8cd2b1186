"""Labelled sequences held as vocab ids, the label mapping, stratified carving and subsampling.

A split stores all its sequences as ONE uint8 array of nucleotide ids (no [CLS]/[SEP]) plus
row offsets: 50k sequences of 300 nt take 15 MB instead of ~20 MB of Python strings, and
batching slices it without re-encoding. Every row remembers where it came from (file and
1-based line, or the file itself for one-sequence-per-file layouts), so any later error
(an over-long sequence, a class missing from train) names the exact place to fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mxdna_jax import vocab
from mxdna_jax.cli import UserError

SPLITS = ("train", "dev", "test")
# Independent random streams (np.random.SeedSequence([seed, stream, ...])): carving, subsampling
# and shuffling with the same user seed must not reuse the same permutation.
CARVE_STREAM, SUBSAMPLE_STREAM, SHUFFLE_STREAM = 1, 2, 3

_BAD = 255
_TABLE = np.where(vocab.LOOKUP >= 0, vocab.LOOKUP, _BAD).astype(np.uint8).tobytes()
_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_DECODE = np.array(list("-N^$?ATCG"))


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a task. Row i is ids[offsets[i]:offsets[i+1]] with label labels[i].

    `sources` are the files rows came from; row i came from sources[source_index[i]] at 1-based
    line lines[i] (0 when the whole file is the row: Genomic Benchmarks .txt files).
    `provenance` is JSON-able: {"kind": "file" | "files" | "carved", ...} plus "subsampled".
    """

    name: str
    ids: np.ndarray  # uint8 (total,) vocab ids, rows concatenated
    offsets: np.ndarray  # int64 (n+1,)
    labels: np.ndarray  # int32 (n,)
    sources: tuple[str, ...]
    source_index: np.ndarray  # int32 (n,)
    lines: np.ndarray  # int32 (n,)
    record_ids: tuple[str, ...] | None = None
    provenance: Mapping = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row_ids(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def sequence(self, i: int) -> str:
        """Row i as letters; IUPAC codes read back as N (they share the [UNK] id)."""
        return "".join(_DECODE[self.row_ids(i)])

    def sequences(self) -> list[str]:
        return [self.sequence(i) for i in range(len(self))]

    def where(self, i: int) -> str:
        """`path:line` of row i (`path` alone for one-sequence-per-file rows), plus the record id."""
        path, line = self.sources[self.source_index[i]], int(self.lines[i])
        out = f"{path}:{line}" if line > 0 else path
        if self.record_ids is not None and self.record_ids[i] and line > 0:
            out += f": record {self.record_ids[i]!r}"
        return out

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)

    def length_stats(self) -> dict[str, float]:
        n = self.lengths
        return {"min": int(n.min()), "mean": float(n.mean()), "max": int(n.max())}

    def take(self, rows: np.ndarray, *, name: str | None = None, provenance: Mapping | None = None) -> Split:
        """A new split of the given rows (in the given order)."""
        rows = np.asarray(rows, dtype=np.int64)
        ids, offsets = gather_rows(self.ids, self.offsets, rows)
        return Split(
            name=self.name if name is None else name, ids=ids, offsets=offsets, labels=self.labels[rows],
            sources=self.sources, source_index=self.source_index[rows], lines=self.lines[rows],
            record_ids=None if self.record_ids is None else tuple(self.record_ids[i] for i in rows),
            provenance=dict(self.provenance) if provenance is None else provenance,
        )


def gather_rows(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, starts=None, lengths=None):
    """(ids, offsets) of the selected rows, concatenated; `starts`/`lengths` default to whole rows."""
    starts = offsets[:-1][rows] if starts is None else starts
    lengths = np.diff(offsets)[rows] if lengths is None else lengths
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    pos = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1], dtype=np.int64)
    return ids[pos], new_offsets


def encode_rows(rows: Sequence[bytes], where: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """Sequences (bytes, whitespace already handled) -> (uint8 ids, offsets) in one pass.

    Uses vocab's lookup table (the one `vocab.nucleotides_to_ids` uses: ACGT + N/IUPAC codes, any
    case) on the concatenation instead of one numpy call per row: 50k rows encode in ~10 ms.
    """
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise UserError(f"{where(int(empty[0]))}: empty sequence")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.frombuffer(b"".join(rows).translate(_TABLE), dtype=np.uint8)
    bad = np.flatnonzero(ids == _BAD)
    if bad.size:
        r = int(np.searchsorted(offsets, bad[0], side="right")) - 1
        row, pos = bytes(rows[r]), int(bad[0] - offsets[r])
        text = row[:pos].decode("utf-8", "replace")  # report characters, not bytes, of non-ASCII input
        ch = row[pos:].decode("utf-8", "replace")[:1]
        raise UserError(
            f"{where(r)}: invalid character {ch!r} at position {len(text) + 1} (1-based) of the sequence; "
            "expected A/C/G/T/N or IUPAC codes (any case)"
        )
    return ids, offsets


# ---- labels ------------------------------------------------------------------------------


def map_labels(
    raw: Sequence[tuple[Sequence[str], Callable[[int], str]]],
) -> tuple[tuple[str, ...], bool, list[np.ndarray]]:
    """Raw label strings of each split (train first) -> (class_names, integer_labels, int32 arrays).

    All integers: kept as they are (class_names "0".."max"). No integers: class names, sorted
    and numbered 0..C-1. A mix, or a number that is not an integer ("1.5", "1.0"), is an error
    naming the first offending row.
    """
    kinds: dict[str, str] = {}
    for labels, _ in raw:
        for lab in set(labels):
            if lab not in kinds:
                kinds[lab] = "int" if _INT.fullmatch(lab) else ("number" if _NUMBER.fullmatch(lab) else "name")

    def first(pred):
        for labels, where in raw:
            for i, lab in enumerate(labels):
                if pred(lab):
                    return where(i), lab
        raise AssertionError("unreachable")

    if "" in kinds:
        w, _ = first(lambda s: s == "")
        raise UserError(f"{w}: empty label")
    present = set(kinds.values())
    if "int" in present and present != {"int"}:
        w, lab = first(lambda s: kinds[s] != "int")
        w_int, lab_int = first(lambda s: kinds[s] == "int")
        raise UserError(
            f"{w}: label {lab!r} is not an integer, but other labels are (e.g. {lab_int!r} at {w_int}); "
            "a task's labels must be all integers or all class names"
        )
    if "number" in present:
        w, lab = first(lambda s: kinds[s] == "number")
        raise UserError(f"{w}: label {lab!r} is a number but not an integer; labels must be integers or class names")
    if present == {"int"}:
        values = {lab: int(lab) for lab in kinds}
        if min(values.values()) < 0:
            w, lab = first(lambda s: values[s] < 0)
            raise UserError(f"{w}: label {lab!r} is negative; integer labels must be 0..C-1")
        names = tuple(str(i) for i in range(max(values.values()) + 1))
        integer = True
    else:
        names = tuple(sorted(kinds))
        values = {lab: i for i, lab in enumerate(names)}
        integer = False
    arrays = [np.fromiter((values[s] for s in labels), dtype=np.int32, count=len(labels)) for labels, _ in raw]
    return names, integer, arrays


# ---- stratified selection ----------------------------------------------------------------


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Rows per class for a stratified sample of n rows: largest-remainder rounding of
    n * counts / total, so the total is exactly n and each class is within one row of its share."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    quota = counts * n / total
    out = np.floor(quota).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(quota - out)))  # largest remainder, then class index
    out[order[: n - int(out.sum())]] += 1
    return np.minimum(out, counts)


def _class_permutations(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def carve(split: Split, fractions: Mapping[str, float], *, seed: int, num_classes: int) -> dict[str, Split]:
    """Splits `fractions` (e.g. {"test": 0.1, "dev": 0.1}) of `split`'s rows off it, stratified by
    class and deterministic in `seed`. Returns {part: Split} plus the rest under split.name.

    Each part gets round(fraction * rows) rows (at least 1), split between classes by `allocate`;
    every class keeps at least one row in the remainder (it is the training set). Rows keep
    their original order within each part.
    """
    n = len(split)
    for part, f in fractions.items():
        if not 0.0 < f < 1.0:
            raise UserError(f"{part}_fraction must be between 0 and 1 (exclusive), got {f}")
    if sum(fractions.values()) >= 1.0:
        raise UserError(f"carving fractions {dict(fractions)} leave no rows for {split.name}")
    counts = split.class_counts(num_classes)
    left = counts - (counts > 0)  # one row of each class stays in the remainder
    perms = _class_permutations(split.labels, num_classes, np.random.default_rng([seed, CARVE_STREAM]))
    taken = np.zeros(num_classes, dtype=np.int64)
    out = {}
    for part, f in fractions.items():
        k = np.minimum(allocate(counts, max(1, round(f * n))), left - taken)
        rows = np.sort(np.concatenate([perms[c][taken[c] : taken[c] + k[c]] for c in range(num_classes)]))
        taken += k
        if rows.size == 0:
            src = split.provenance.get("path") or split.sources[0]
            raise UserError(f"{src}: the {split.name} split ({n} rows) is too small to carve a {part} split "
                            f"of {f:g} from it (every class keeps one row)")
        prov = {"kind": "carved", "from": split.name, "fraction": f, "seed": seed, "stratified": True,
                "from_rows": n, "from_provenance": dict(split.provenance)}
        out[part] = split.take(rows, name=part, provenance=prov)
    keep = np.ones(n, dtype=bool)
    for c in range(num_classes):
        keep[perms[c][: taken[c]]] = False
    prov = dict(split.provenance, carved_out={p: len(s) for p, s in out.items()}, carve_seed=seed)
    out[split.name] = split.take(np.flatnonzero(keep), provenance=prov)
    return out


def subsample(split: Split, n: int, seed: int, *, num_classes: int | None = None) -> Split:
    """At most n rows of `split`, stratified by class (`allocate`), deterministic in `seed`, in
    their original order. A split of n rows or fewer is returned whole; either way the result's
    provenance records {"subsampled": {"n", "seed", "from_rows", "stratified"}}."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"subsample size must be an integer > 0, got {n!r}")
    num_classes = int(split.labels.max()) + 1 if num_classes is None else num_classes
    prov = dict(split.provenance, subsampled={"n": int(n), "seed": int(seed), "from_rows": len(split),
                                              "stratified": True})
    if n >= len(split):
        return dataclasses.replace(split, provenance=prov)
    k = allocate(split.class_counts(num_classes), int(n))
    perms = _class_permutations(split.labels, num_classes, np.random.default_rng([seed, SUBSAMPLE_STREAM]))
    rows = np.sort(np.concatenate([perms[c][: k[c]] for c in range(num_classes)]))
    return split.take(rows, provenance=prov)


# ---- the task ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledTask:
    """A classification task: train/dev/test splits sharing one label mapping.

    class_names[k] is the name of integer label k. With integer labels in the data
    (`integer_labels`), label k is the data's k and its name is str(k); with class-name labels
    the names are sorted and numbered 0..C-1.
    """

    name: str
    layout: str  # "csv" | "folders" | "fasta"
    root: str | None
    class_names: tuple[str, ...]
    integer_labels: bool
    splits: Mapping[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_ids(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def dev(self) -> Split:
        return self.splits["dev"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    def class_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class name: rows}}."""
        return {s: dict(zip(self.class_names, split.class_counts(self.num_classes).tolist()))
                for s, split in self.splits.items()}

    def subsample(self, split: str, n: int, seed: int = 0) -> LabelledTask:
        """The task with `split` replaced by at most n of its rows (see `subsample`)."""
        if split not in self.splits:
            raise UserError(f"no split {split!r}; this task has {', '.join(self.splits)}")
        new = subsample(self.splits[split], n, seed, num_classes=self.num_classes)
        return dataclasses.replace(self, splits={**self.splits, split: new})

    def metadata(self) -> dict:
        """JSON-able description: mapping, and per split rows, lengths, class counts, provenance."""
        counts = self.class_counts()
        return {
            "name": self.name, "layout": self.layout, "root": self.root,
            "class_names": list(self.class_names), "integer_labels": self.integer_labels,
            "num_classes": self.num_classes,
            "splits": {
                s: {"rows": len(sp), "lengths": sp.length_stats(), "class_counts": counts[s],
                    "sources": _summarise_sources(sp.sources), "provenance": dict(sp.provenance)}
                for s, sp in self.splits.items()
            },
        }

    def describe(self) -> str:
        """A printable summary: one line per split, then how each split was made."""
        if self.integer_labels:
            classes = f"integer labels 0..{self.num_classes - 1}"
        else:
            classes = "class names -> labels " + ", ".join(f"{c}={i}" for i, c in enumerate(self.class_names))
        lines = [f"task {self.name} ({self.layout} layout{', ' + self.root if self.root else ''}): "
                 f"{self.num_classes} classes, {classes}"]
        rows = [("split", "rows", "len min/mean/max", "class counts")]
        counts = self.class_counts()
        for s, sp in self.splits.items():
            st = sp.length_stats()
            rows.append((s, f"{len(sp):,}", f"{st['min']}/{st['mean']:.1f}/{st['max']}",
                         " ".join(f"{c}:{k:,}" for c, k in counts[s].items())))
        widths = [max(len(r[j]) for r in rows) for j in range(4)]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        for s, sp in self.splits.items():
            lines.append(f"  {s}: {_describe_provenance(sp)}")
        return "\n".join(lines)


def _summarise_sources(sources: Sequence[str]) -> list[str] | str:
    if len(sources) <= 4:
        return list(sources)
    return f"{len(sources)} files under {os.path.commonpath(sources)}"


def _describe_provenance(sp: Split) -> str:
    p = sp.provenance
    if p.get("kind") == "carved":
        text = (f"carved from {p['from']} ({p['fraction']:g} of {p['from_rows']:,} rows, stratified, "
                f"seed {p['seed']})")
    else:
        src = _summarise_sources(sp.sources)
        text = ", ".join(src) if isinstance(src, list) else src
    if "note" in p:
        text += f" ({p['note']})"
    if "carved_out" in p:
        parts = ", ".join(f"{k} ({n:,} rows)" for k, n in p["carved_out"].items())
        text += f"; {parts} carved out of it (seed {p['carve_seed']})"
    if "subsampled" in p:
        q = p["subsampled"]
        if q["n"] < q["from_rows"]:
            text += f"; subsampled to {q['n']:,} of {q['from_rows']:,} rows (stratified, seed {q['seed']})"
        else:
            text += f"; subsample of {q['n']:,} asked, all {q['from_rows']:,} rows kept"
    return text
