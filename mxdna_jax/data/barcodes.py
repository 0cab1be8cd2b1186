"""Real DNA barcodes (COI-5P) with their taxonomy: loading, a species-disjoint split, and the
pretraining corpus of BarcodeMAE-style runs.

    load_barcodes(paths=None)            -> Barcodes (None: the embedded BarcodeBERT "unseen" TSVs)
    split_barcodes(barcodes, seed=0)     -> BarcodeSplit: train / test / unseen (/ excluded)
    ensure_split(path, barcodes, ...)    -> the split file's split if present (checked), else a new one
    BarcodeSampler, MakeBarcodeExample   -> the grain elements of `data.corpus='barcodes'`

The split answers the BarcodeMAE evaluation questions. `unseen` species are held out of
pretraining entirely, and are drawn only from genera with at least 2 species, so each of their
genera keeps at least 1 seen species: a 1-NN query from an unseen species can only name its
genus correctly through a relative. Each seen species' barcodes are cut into `train` (the
pretraining corpus, the 1-NN reference set, the linear probe's training set) and `test` (the
linear probe's test set; the pretraining validation batches). Every seen species with >= 2
barcodes puts at least 1 in test and at least 1 in train, so every test species is in train.
Rows without species or genus are `excluded` from every split (and counted).

Bad input is a UserError of one line naming the file and 1-based line.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
import pathlib
import re
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from mxdna_jax import vocab
from mxdna_jax.cli import UserError

REQUIRED_COLUMNS = ("processid", "genus_name", "species_name", "nucleotides")
SPLIT_NAMES = ("train", "test", "unseen", "excluded")
SPLIT_FILENAME = "barcode_split.tsv"
DEFAULT_UNSEEN_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2
_MISSING = {"", "na", "n/a", "nan", "none", "null", "not_classified", "unclassified"}
_INVALID = re.compile(r"[^ACGTNRYSWKMBDHV-]")


def default_barcode_paths() -> tuple[str, ...]:
    """The embedded BarcodeBERT barcodes (two TSVs, 9,278 rows); see default_barcodes/SOURCE.md."""
    root = importlib.resources.files("mxdna_jax.data") / "default_barcodes"
    return tuple(sorted(str(p) for p in root.iterdir() if p.name.endswith(".tsv.gz")))


@dataclasses.dataclass(frozen=True)
class Barcodes:
    """Cleaned barcodes, columnar: row i is ids[offsets[i]:offsets[i+1]] (vocab ids, uint8),
    from sources[source_index[i]] line lines[i]. species/genus are '' where the file has none."""

    processids: tuple[str, ...]
    species: tuple[str, ...]
    genera: tuple[str, ...]
    ids: np.ndarray
    offsets: np.ndarray
    sources: tuple[str, ...]
    source_index: np.ndarray
    lines: np.ndarray
    report: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.processids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def labelled(self) -> np.ndarray:
        return np.asarray([bool(s and g) for s, g in zip(self.species, self.genera)], bool)

    def row_ids(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]: self.offsets[i + 1]]

    def sequence(self, i: int) -> str:
        return vocab.decode(self.row_ids(i))

    def where(self, i: int) -> str:
        return f"{self.sources[self.source_index[i]]}:{int(self.lines[i])} ({self.processids[i]})"

    def take(self, rows) -> Barcodes:
        rows = np.asarray(rows, np.int64)
        lengths = self.lengths[rows]
        ids = np.concatenate([self.row_ids(i) for i in rows]) if len(rows) else np.zeros(0, np.uint8)
        return dataclasses.replace(
            self, processids=tuple(self.processids[i] for i in rows), species=tuple(self.species[i] for i in rows),
            genera=tuple(self.genera[i] for i in rows), ids=ids,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            source_index=self.source_index[rows], lines=self.lines[rows])


def _label(value: str) -> str:
    v = value.strip()
    return "" if v.lower() in _MISSING else v


def _read_rows(path: str):
    """(line number, fields) of each non-blank line, header included; read errors as UserErrors."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gz else open)(path, "rt", encoding="utf-8-sig", newline="") as f:
            rows = [(n, line.rstrip("\r\n").split("\t")) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise UserError(f"barcode file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a barcode TSV") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return rows


def load_barcodes(paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> Barcodes:
    """Barcode TSV(s) (BOLD/BIOSCAN layout; gzipped or not) -> cleaned `Barcodes`, file order.

    Needs the columns processid, genus_name, species_name, nucleotides (others are ignored).
    Cleaning: upper case, `-` (alignment gaps) removed, trailing N stripped, exact duplicate
    sequences dropped (the first kept). `report` counts rows, duplicates, gapped rows, trailing-N
    rows, rows without species/genus (`unlabelled`: excluded from the split) and genera with a
    single species (they cannot give unseen-species queries).
    """
    if paths is None:
        paths = default_barcode_paths()
    elif isinstance(paths, (str, os.PathLike)):
        paths = (paths,)
    paths = tuple(str(p) for p in paths)
    if not paths:
        raise UserError("no barcode files given")
    pids, species, genera, rows_ids, src, lines = [], [], [], [], [], []
    seen_seq: dict[bytes, int] = {}
    seen_pid: dict[str, int] = {}
    report = dict(rows=0, duplicates=0, gapped=0, trailing_n=0, unlabelled=0)
    for k, path in enumerate(paths):
        rows = _read_rows(path)
        if not rows:
            raise UserError(f"{path}:1: empty file; expected a header naming {', '.join(REQUIRED_COLUMNS)}")
        header_line, header = rows[0]
        header = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            hint = "; is it tab-separated?" if len(header) == 1 and "," in header[0] else ""
            raise UserError(f"{path}:{header_line}: missing column(s) {', '.join(missing)} in the header "
                            f"(a barcode TSV needs {', '.join(REQUIRED_COLUMNS)}){hint}")
        col = {c: header.index(c) for c in REQUIRED_COLUMNS}
        if len(rows) == 1:
            raise UserError(f"{path}:{header_line + 1}: no barcodes after the header")
        for line, fields in rows[1:]:
            if len(fields) < len(header):
                raise UserError(f"{path}:{line}: {len(fields)} field(s), the header has {len(header)}")
            report["rows"] += 1
            pid = fields[col["processid"]].strip()
            if not pid:
                raise UserError(f"{path}:{line}: empty processid")
            raw = fields[col["nucleotides"]].strip().upper()
            bad = _INVALID.search(raw)
            if bad:
                raise UserError(f"{path}:{line}: {pid}: invalid character {bad.group()!r} at position {bad.start()} "
                                "of the nucleotides; expected A/C/G/T, N, IUPAC codes or '-'")
            seq = raw.replace("-", "")
            if not seq.strip("N"):
                raise UserError(f"{path}:{line}: {pid}: the sequence is empty or only N and/or gaps")
            report["gapped"] += len(seq) != len(raw)
            stripped = seq.rstrip("N")
            report["trailing_n"] += len(stripped) != len(seq)
            key = stripped.encode("ascii")
            if key in seen_seq:
                report["duplicates"] += 1
                continue
            if pid in seen_pid:
                j = seen_pid[pid]
                raise UserError(f"{path}:{line}: processid {pid} also at {paths[src[j]]}:{lines[j]} "
                                "with another sequence")
            seen_seq[key], seen_pid[pid] = len(pids), len(pids)
            sp, ge = _label(fields[col["species_name"]]), _label(fields[col["genus_name"]])
            report["unlabelled"] += not (sp and ge)
            pids.append(pid)
            species.append(sp)
            genera.append(ge)
            rows_ids.append(key)
            src.append(k)
            lines.append(line)
    lengths = np.asarray([len(r) for r in rows_ids], np.int64)
    ids = vocab.LOOKUP[np.frombuffer(b"".join(rows_ids), np.uint8)].astype(np.uint8)  # validated above
    genus_species: dict[str, set] = {}
    for s, g in zip(species, genera):
        if s and g:
            genus_species.setdefault(g, set()).add(s)
    report["barcodes"] = len(pids)
    report["single_species_genera"] = sum(len(v) == 1 for v in genus_species.values())
    return Barcodes(tuple(pids), tuple(species), tuple(genera), ids,
                    np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), paths,
                    np.asarray(src, np.int32), np.asarray(lines, np.int32), report)


# ---------------------------------------------------------------------------------- the split


@dataclasses.dataclass(frozen=True)
class BarcodeSplit:
    """`assignment[i]` is the split of barcode i, an index into SPLIT_NAMES."""

    barcodes: Barcodes
    assignment: np.ndarray
    seed: int | None = None
    unseen_fraction: float | None = None
    test_fraction: float | None = None
    path: str | None = None  # the file it was read from or written to

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.assignment == SPLIT_NAMES.index(name))

    def subset(self, name: str) -> Barcodes:
        return self.barcodes.take(self.indices(name))

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {barcodes, species, genera}}."""
        b = self.barcodes
        out = {}
        for name in SPLIT_NAMES:
            rows = self.indices(name)
            out[name] = {"barcodes": int(len(rows)), "species": len({(b.genera[i], b.species[i]) for i in rows}),
                         "genera": len({b.genera[i] for i in rows})}
        return out

    def describe(self) -> str:
        c, r = self.counts(), self.barcodes.report
        parts = [f"{n} {v['barcodes']} barcodes / {v['species']} species / {v['genera']} genera"
                 for n, v in c.items() if n != "excluded" or v["barcodes"]]
        extra = [f"{r[k]} {what}" for k, what in (("duplicates", "duplicate sequences dropped"),
                                                  ("unlabelled", "rows without species/genus excluded"),
                                                  ("single_species_genera", "single-species genera (no unseen "
                                                   "species possible)")) if r.get(k)]
        params = f"seed={self.seed}, unseen_fraction={self.unseen_fraction}, test_fraction={self.test_fraction}"
        return f"barcode split ({params}): " + "; ".join(parts) + (f" ({', '.join(extra)})" if extra else "")


def _check_fraction(name: str, value: float, upper_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok or (upper_open and value == 1):
        raise ValueError(f"{name} must be a number in [0, {'1)' if upper_open else '1]'}, got {value!r}")
    return float(value)


def split_barcodes(barcodes: Barcodes, seed: int = 0, unseen_fraction: float = DEFAULT_UNSEEN_FRACTION,
                   test_fraction: float = DEFAULT_TEST_FRACTION) -> BarcodeSplit:
    """The species-disjoint split (module docstring); a pure function of (barcodes, seed, fractions).

    round(unseen_fraction x species) species are unseen, or fewer when the multi-species genera
    cannot give that many while keeping a seen species each. A seen species of n >= 2 barcodes puts
    min(n - 1, max(1, round(test_fraction x n))) of them in test (none when test_fraction is 0).
    """
    unseen_fraction = _check_fraction("unseen_fraction", unseen_fraction, upper_open=True)
    test_fraction = _check_fraction("test_fraction", test_fraction, upper_open=True)
    labelled = barcodes.labelled
    assignment = np.full(len(barcodes), SPLIT_NAMES.index("excluded"), np.int8)
    rows_of: dict[tuple[str, str], list[int]] = {}
    for i in np.flatnonzero(labelled):
        rows_of.setdefault((barcodes.genera[i], barcodes.species[i]), []).append(int(i))
    species = sorted(rows_of)
    per_genus: dict[str, int] = {}
    for g, _ in species:
        per_genus[g] = per_genus.get(g, 0) + 1
    rng = np.random.default_rng(seed)
    target = round(unseen_fraction * len(species))
    eligible = [sp for sp in species if per_genus[sp[0]] >= 2]
    seen_left, unseen = dict(per_genus), set()
    for k in rng.permutation(len(eligible)):
        if len(unseen) == target:
            break
        g = eligible[k][0]
        if seen_left[g] >= 2:  # the genus keeps at least one seen species
            unseen.add(eligible[k])
            seen_left[g] -= 1
    for sp in species:
        rows = np.asarray(rows_of[sp])
        if sp in unseen:
            assignment[rows] = SPLIT_NAMES.index("unseen")
            continue
        rows = rows[rng.permutation(len(rows))]
        n = len(rows)
        n_test = 0 if n == 1 or test_fraction == 0 else min(n - 1, max(1, round(test_fraction * n)))
        assignment[rows[:n_test]] = SPLIT_NAMES.index("test")
        assignment[rows[n_test:]] = SPLIT_NAMES.index("train")
    return BarcodeSplit(barcodes, assignment, int(seed), unseen_fraction, test_fraction)


_PARAMS = re.compile(r"seed=(-?\d+) unseen_fraction=(\S+) test_fraction=(\S+)")


def write_split(split: BarcodeSplit, path) -> str:
    """The split as a TSV (comment lines with the parameters and sources, then processid, species,
    genus, split per barcode), written atomically (temporary file + rename)."""
    import tempfile

    path = pathlib.Path(path)
    b = split.barcodes
    text = [f"# barcode split (mxdna_jax.data.barcodes): seed={split.seed} unseen_fraction={split.unseen_fraction} "
            f"test_fraction={split.test_fraction}",
            f"# sources: {', '.join(b.sources)}", "processid\tspecies\tgenus\tsplit"]
    text += [f"{p}\t{s}\t{g}\t{SPLIT_NAMES[a]}" for p, s, g, a in zip(b.processids, b.species, b.genera,
                                                                     split.assignment)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(text) + "\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


def read_split(path, barcodes: Barcodes) -> BarcodeSplit:
    """A split file (write_split) applied to `barcodes`: every processid of the file must be one of
    the barcodes with the same species and genus, and every barcode must be in the file."""
    path = str(path)
    seed = unseen = test = None
    index = {p: i for i, p in enumerate(barcodes.processids)}
    assignment = np.full(len(barcodes), -1, np.int8)
    header = None
    for line, fields in _read_rows(path):
        if fields[0].startswith("#"):
            m = _PARAMS.search("\t".join(fields))
            if m:
                seed, unseen, test = int(m.group(1)), float(m.group(2)), float(m.group(3))
            continue
        if header is None:
            header = fields
            if header[:4] != ["processid", "species", "genus", "split"]:
                raise UserError(f"{path}:{line}: not a barcode split file (header {header[:4]}, expected "
                                "processid, species, genus, split)")
            continue
        if len(fields) < 4:
            raise UserError(f"{path}:{line}: {len(fields)} field(s), expected 4")
        pid, sp, ge, name = fields[:4]
        if name not in SPLIT_NAMES:
            raise UserError(f"{path}:{line}: unknown split {name!r} (expected one of {', '.join(SPLIT_NAMES)})")
        i = index.get(pid)
        if i is None:
            raise UserError(f"{path}:{line}: processid {pid} is not among the barcodes of {', '.join(barcodes.sources)}"
                            "; this split belongs to other data")
        if (barcodes.species[i], barcodes.genera[i]) != (sp, ge):
            raise UserError(f"{path}:{line}: {pid} is {sp!r} ({ge}) here but {barcodes.species[i]!r} "
                            f"({barcodes.genera[i]}) in {barcodes.where(i)}")
        if assignment[i] >= 0:
            raise UserError(f"{path}:{line}: processid {pid} is listed twice")
        assignment[i] = SPLIT_NAMES.index(name)
    if header is None:
        raise UserError(f"{path}:1: empty split file")
    missing = np.flatnonzero(assignment < 0)
    if len(missing):
        raise UserError(f"{path}: has no row for {len(missing)} of the barcodes, e.g. {barcodes.where(missing[0])}; "
                        "this split belongs to other data")
    return BarcodeSplit(barcodes, assignment, seed, unseen, test, path)


def ensure_split(path, barcodes: Barcodes, *, seed: int = 0, unseen_fraction: float = DEFAULT_UNSEEN_FRACTION,
                 test_fraction: float = DEFAULT_TEST_FRACTION, write: bool = True) -> BarcodeSplit:
    """The split in the file `path` (e.g. WORKDIR/barcode_split.tsv) when it exists, after checking
    it was made with these parameters and these barcodes (a conflict is a UserError); otherwise a
    new split, written there when `write` (process 0 of a run)."""
    path = pathlib.Path(path)
    if path.exists():
        split = read_split(path, barcodes)
        asked = (int(seed), float(unseen_fraction), float(test_fraction))
        had = (split.seed, split.unseen_fraction, split.test_fraction)
        if had != asked:
            raise UserError(f"{path} was made with seed={had[0]}, unseen_fraction={had[1]}, test_fraction={had[2]}; "
                            f"this run asks seed={asked[0]}, unseen_fraction={asked[1]}, test_fraction={asked[2]} "
                            "(set data.barcode_* to match, or use another workdir)")
        return split
    split = split_barcodes(barcodes, seed, unseen_fraction, test_fraction)
    if write:
        write_split(split, path)
    return dataclasses.replace(split, path=str(path))


# ------------------------------------------------------------------------ pretraining corpus


class BarcodeSampler:
    """Picks (barcode, start offset) for one element and builds its tokens.

    Training (`max_offset` > 0 or `order` None): a barcode uniformly at random, then an offset
    uniform in 0..max_offset nt dropped from the front (BarcodeMAE's random k-mer phase).
    Validation (`order` given): element g is barcode order[g % n], offset 0.
    Tokens: [CLS] the next `window` nt (fewer if the barcode is shorter) [SEP] [PAD]..., window + 2
    in all. No reverse complement: barcodes share one orientation.
    """

    def __init__(self, barcodes: Barcodes, window: int, *, max_offset: int = 0, order=None, what="barcodes"):
        if not len(barcodes):
            raise ValueError(f"{what}: no barcodes")
        self.ids, self.offsets, self.window, self.max_offset = barcodes.ids, barcodes.offsets, window, max_offset
        self.order = None if order is None else np.asarray(order, np.int64)
        self.n = len(barcodes)

    def draw(self, rng: np.random.Generator, index: int) -> tuple[int, int]:
        if self.order is not None:
            return int(self.order[index % self.n]), 0
        i = int(rng.integers(self.n))
        off = int(rng.integers(self.max_offset + 1)) if self.max_offset else 0
        length = int(self.offsets[i + 1] - self.offsets[i])
        return i, min(off, length - 1)  # at least one nucleotide is left

    def tokens(self, i: int, offset: int) -> np.ndarray:
        seq = self.ids[self.offsets[i] + offset: self.offsets[i + 1]][: self.window]
        out = np.full(self.window + 2, vocab.PAD, np.int32)
        out[0], out[1: len(seq) + 1], out[len(seq) + 1] = vocab.CLS, seq, vocab.SEP
        return out


class MakeBarcodeExample:
    """Global element index -> one example (picklable, for grain workers): the sampler's tokens,
    then the objective's transform, with the counter-based generator of the genome pipeline."""

    def __init__(self, sampler: BarcodeSampler, seed: int, stream: int, objective):
        self.sampler, self.seed, self.stream, self.objective = sampler, seed, stream, objective

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        from mxdna_jax.data.pipeline import element_rng

        rng = element_rng(self.seed, self.stream, index)
        tokens = self.sampler.tokens(*self.sampler.draw(rng, index))
        return self.objective.example(tokens, rng)
