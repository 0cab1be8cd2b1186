"""FASTA / FASTA.gz genomes as memory-mapped arrays of vocab ids, parsed once and cached.

Why not pyfaidx: it cannot random-access plain gzip (only BGZF) and writes a `.fai` next to
the FASTA, which fails on read-only data directories (../shared/data is read-only). It also
returns strings that would have to be re-encoded for every sample. Pretraining samples
windows from the whole genome, so we parse each file once into a uint8 array of vocab ids,
cache it as `.npy` and `np.load(mmap_mode='r')` it: O(1) window slices, shared page cache
between data-loader workers, identical code for gz and plain files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np

from mxdna_jax import vocab

CACHE_FORMAT = 1  # bump when the parse semantics change, so stale caches are ignored
_BAD, _GAP = 255, 254
_WHITESPACE = b" \t\r\n\v\f"  # deleted anywhere in sequence lines (line width is irrelevant)
_CHUNK = 1 << 23


def _table(drop_gaps: bool) -> bytes:
    t = np.where(vocab.LOOKUP >= 0, vocab.LOOKUP, _BAD).astype(np.uint8)
    if drop_gaps:
        t[ord("-")] = _GAP
    return t.tobytes()


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MXDNA_CACHE") or pathlib.Path.home() / ".cache" / "mxdna_jax")


class _RecordBuilder:
    """Accumulates id chunks of one file; knows the current record for error messages."""

    def __init__(self, path: str, drop_gaps: bool):
        self.path, self.drop_gaps, self.table = path, drop_gaps, _table(drop_gaps)
        self.names: list[str] = []
        self.lengths: list[int] = []
        self.chunks: list[np.ndarray] = []
        self.name: str | None = None
        self.length = 0  # ids kept in the current record
        self.raw = 0  # characters seen in the current record (gaps included): error positions

    def header(self, line: bytes):
        self.finish()
        self.name = line.decode("utf-8", "replace").strip().split(maxsplit=1)[0] if line.strip() else ""
        self.length = self.raw = 0

    def sequence(self, text: bytes):
        ids = np.frombuffer(text.translate(self.table, _WHITESPACE), dtype=np.uint8)
        if not ids.size:
            return
        if self.name is None:
            raise ValueError(f"{self.path}: sequence data before the first '>' header; is this a FASTA file?")
        bad = np.flatnonzero(ids == _BAD)
        if bad.size:
            i = int(bad[0])
            ch = chr(text.translate(None, _WHITESPACE)[i])
            allowed = "A/C/G/T/N, IUPAC codes" + (" or '-'" if self.drop_gaps else "")
            raise ValueError(
                f"{self.path}: record {self.name!r}: invalid character {ch!r} at position {self.raw + i + 1} "
                f"(1-based, within the record); expected {allowed}"
                + ("; pass drop_gaps=True for aligned sequences" if ch == "-" else "")
            )
        self.raw += ids.size
        if self.drop_gaps:
            ids = ids[ids != _GAP]
        self.chunks.append(ids)
        self.length += ids.size

    def finish(self):
        if self.name is None:
            return
        if self.length == 0:
            warnings.warn(f"{self.path}: record {self.name!r} has no sequence; skipped", stacklevel=4)
        else:
            self.names.append(self.name)
            self.lengths.append(self.length)
        self.name = None


def parse_fasta(path, *, drop_gaps: bool = False) -> tuple[np.ndarray, list[str], list[int]]:
    """Stream a FASTA(.gz) file into (uint8 ids of all records concatenated, names, lengths).

    Reads 8 MiB blocks (the text is never held whole; only the ids are), so a 63 Mb
    chromosome needs ~2x63 MB at the final concatenate. Gzip is detected by magic bytes.
    """
    path = str(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    b = _RecordBuilder(path, drop_gaps)
    carry, seen = b"", False
    with (gzip.open if gz else open)(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            data = carry + block
            if block:  # only hand over complete lines, so a header is never split
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            seen = seen or bool(data.strip())
            _scan(data, b)
            if not block:
                break
    b.finish()
    if not seen:
        raise ValueError(f"{path}: empty FASTA file")
    if not b.lengths:
        raise ValueError(f"{path}: no sequence found (no record has any nucleotides)")
    ids = np.concatenate(b.chunks) if len(b.chunks) > 1 else b.chunks[0].copy()
    return ids, b.names, b.lengths


def _scan(text: bytes, b: _RecordBuilder):
    pos, n = 0, len(text)
    while pos < n:
        if text[pos] == 0x3E:  # '>' at a line start: a header line
            end = text.find(b"\n", pos)
            end = n if end < 0 else end
            b.header(text[pos + 1 : end])
            pos = end + 1
        else:
            nxt = text.find(b"\n>", pos)
            end = n if nxt < 0 else nxt + 1
            b.sequence(text[pos:end])
            pos = end


def _cache_files(path: pathlib.Path, drop_gaps: bool, cache_dir: pathlib.Path):
    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, drop_gaps, CACHE_FORMAT])
    stem = cache_dir / f"{path.name}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return stem.with_suffix(stem.suffix + ".npy"), stem.with_suffix(stem.suffix + ".json"), key


def _atomic_write(target: pathlib.Path, write):
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)  # atomic: readers see the old state or the whole file
    except BaseException:
        os.unlink(tmp)
        raise


def load_fasta_ids(path, *, drop_gaps: bool = False, cache_dir=None, use_cache: bool = True):
    """(ids, names, lengths, cache_file) for one file; ids memory-mapped when cached.

    The `.json` metadata is written after the `.npy` and acts as the commit marker, so a
    process killed mid-write leaves at worst an orphan `.npy` that is simply overwritten.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file not found: {path}")
    if use_cache:
        cdir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        npy, meta, key = _cache_files(path, drop_gaps, cdir)
        try:
            m = json.loads(meta.read_text())
            if m["key"] == key:
                ids = np.load(npy, mmap_mode="r")
                if ids.shape == (sum(m["lengths"]),) and ids.dtype == np.uint8:
                    return ids, m["names"], m["lengths"], npy
        except (OSError, ValueError, KeyError):
            pass  # no (or a damaged) cache: parse again
    ids, names, lengths = parse_fasta(path, drop_gaps=drop_gaps)
    if not use_cache:
        return ids, names, lengths, None
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        _atomic_write(npy, lambda f: np.save(f, ids))
        text = json.dumps({"key": key, "names": names, "lengths": lengths}).encode()
        _atomic_write(meta, lambda f: f.write(text))
        return np.load(npy, mmap_mode="r"), names, lengths, npy
    except OSError as e:
        warnings.warn(f"cannot write FASTA cache in {cdir} ({e}); keeping {path.name} in memory", stacklevel=2)
        return ids, names, lengths, None


class Genome:
    """Records of one or more FASTA files, concatenated into one coordinate system.

    `starts[r]` is record r's offset in the concatenation; windows never need to cross
    records, so each file keeps its own (memory-mapped) array and `window` slices one of them.
    Pickles by cache-file path (workers re-map the file instead of copying the genome).
    """

    def __init__(self, paths, *, drop_gaps: bool = False, cache_dir=None, use_cache: bool = True):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("Genome needs at least one FASTA path")
        self.paths = tuple(str(p) for p in paths)
        self._parts, self._part_files = [], []
        names, lengths, part, local = [], [], [], []
        for i, p in enumerate(self.paths):
            ids, n, ln, cache_file = load_fasta_ids(p, drop_gaps=drop_gaps, cache_dir=cache_dir, use_cache=use_cache)
            self._parts.append(ids)
            self._part_files.append(None if cache_file is None else str(cache_file))
            names += n
            lengths += ln
            part += [i] * len(n)
            local += list(np.cumsum([0] + ln[:-1]))
        dup = sorted({x for x in names if names.count(x) > 1}) if len(set(names)) < len(names) else []
        if dup:
            warnings.warn(f"duplicate record names {dup[:5]}; lookup by name returns the first", stacklevel=2)
        self.names = tuple(names)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.record_part = np.asarray(part, dtype=np.int64)
        self.record_local = np.asarray(local, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_records(self) -> int:
        return len(self.names)

    def record_index(self, name_or_index) -> int:
        return self.names.index(name_or_index) if isinstance(name_or_index, str) else int(name_or_index)

    def record(self, name_or_index) -> np.ndarray:
        """All ids of one record (a read-only view)."""
        r = self.record_index(name_or_index)
        lo = self.record_local[r]
        return self._parts[self.record_part[r]][lo : lo + self.lengths[r]]

    def window(self, start: int, length: int) -> np.ndarray:
        """Ids at concatenated positions [start, start+length), which must lie in one record."""
        r = int(np.searchsorted(self.starts, start, side="right")) - 1
        off = start - self.starts[r]
        if r < 0 or off + length > self.lengths[r]:
            raise IndexError(f"window [{start}, {start + length}) is not inside one record")
        lo = self.record_local[r] + off
        return self._parts[self.record_part[r]][lo : lo + length]

    def counts(self) -> np.ndarray:
        """Occurrences of each vocab id over the whole genome (chunked: bincount upcasts)."""
        out = np.zeros(vocab.VOCAB_SIZE, dtype=np.int64)
        for ids in self._parts:
            for i in range(0, ids.size, _CHUNK):
                out += np.bincount(ids[i : i + _CHUNK], minlength=vocab.VOCAB_SIZE)[: vocab.VOCAB_SIZE]
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_parts"] = [None if f else a for a, f in zip(self._parts, self._part_files)]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._parts = [np.load(f, mmap_mode="r") if f else a for a, f in zip(self._parts, self._part_files)]


def unigram_entropy(genome: Genome | np.ndarray) -> float:
    """Entropy in NATS (CE losses are in nats) of the A/C/G/T distribution; N etc. ignored.

    A masked-LM whose loss is not well below this has learnt nothing beyond base composition.
    """
    counts = genome.counts() if isinstance(genome, Genome) else np.bincount(np.ravel(genome), minlength=9)
    c = counts[list(vocab.NUCLEOTIDE_IDS)].astype(np.float64)
    if c.sum() == 0:
        raise ValueError("no A/C/G/T in the genome: unigram entropy undefined")
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def open_genome(paths: str | os.PathLike | Sequence[str | os.PathLike] | Genome, **kw) -> Genome:
    """A Genome from one path, several paths, or an existing Genome (returned as is)."""
    return paths if isinstance(paths, Genome) else Genome(paths, **kw)
