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
import zlib
from collections.abc import Sequence

import numpy as np

from mxdna_jax import vocab

CACHE_FORMAT = 2  # bump when the parse semantics or the cache layout change, so stale caches are ignored
_BAD, _GAP = 255, 254
_WHITESPACE = b" \t\r\n\v\f"  # deleted anywhere in sequence lines (line width is irrelevant)
_CHUNK = 1 << 23


def _table(drop_gaps: bool) -> bytes:
    t = np.where(vocab.LOOKUP >= 0, vocab.LOOKUP, _BAD).astype(np.uint8)
    if drop_gaps:
        t[ord("-")] = _GAP
    return t.tobytes()


class FastaNotFoundError(FileNotFoundError, ValueError):
    """A FASTA path that does not exist. Also a ValueError, so the entry points report it as one
    line of bad input (exit code 2) like every other data error; still a FileNotFoundError for
    callers that catch that."""


# Magic bytes of compressions we do not read: name them instead of reporting "invalid character".
_OTHER_COMPRESSIONS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


def _one_line(e: BaseException) -> str:
    """`Type: message` on one line; module-qualified outside builtins (`zlib.error`, not `error`)."""
    t = type(e)
    name = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"
    text = " ".join(str(e).split())
    return f"{name}: {text}" if text else name


def check_fasta_path(path) -> pathlib.Path:
    """`path` as a Path if it names an existing regular file; otherwise a one-line error naming it."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a FASTA file")
    if not path.exists():
        raise FastaNotFoundError(f"FASTA file not found: {path}")
    if not path.is_file():  # a FIFO or device: it cannot be read twice (magic bytes, then parse)
        raise ValueError(f"{path} is not a regular file; give a FASTA or FASTA.gz file")
    return path


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
            if _is_binary(text):
                raise ValueError(f"{self.path}: not a FASTA file (binary data before any '>' header)")
            raise ValueError(f"{self.path}: sequence data before the first '>' header; is this a FASTA file?")
        bad = np.flatnonzero(ids == _BAD)
        if bad.size:
            i = int(bad[0])
            byte = text.translate(None, _WHITESPACE)[i]
            if not 0x20 <= byte < 0x7F:  # a control or non-ASCII byte: binary, not a typo in a sequence
                raise ValueError(
                    f"{self.path}: not a FASTA file (binary byte 0x{byte:02x} in record {self.name!r} "
                    f"at position {self.raw + i + 1})"
                )
            ch = chr(byte)
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


_PRINTABLE = bytes(range(0x20, 0x7F))
_HIGH = bytes(range(0x80, 0x100))


def _is_binary(text: bytes) -> bool:
    """Control bytes other than whitespace, or bytes that are not UTF-8: no FASTA has those."""
    other = text.translate(None, _WHITESPACE + _PRINTABLE)
    if not other:
        return False
    if other.translate(None, _HIGH):  # NUL, ESC, DEL, ...
        return True
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _open_fasta(path: str):
    """A binary file object of the (decompressed) text; gzip is detected by magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(6)
    for prefix, name in _OTHER_COMPRESSIONS.items():
        if magic.startswith(prefix):
            raise ValueError(f"{path}: {name}-compressed; only plain or gzip FASTA is read (recompress it with gzip)")
    return (gzip.open if magic.startswith(b"\x1f\x8b") else open)(path, "rb")


def parse_fasta(path, *, drop_gaps: bool = False) -> tuple[np.ndarray, list[str], list[int]]:
    """Stream a FASTA(.gz) file into (uint8 ids of all records concatenated, names, lengths).

    Reads 8 MiB blocks (the text is never held whole; only the ids are), so a 63 Mb
    chromosome needs ~2x63 MB at the final concatenate. Gzip is detected by magic bytes.
    Every failure is a ValueError with a one-line message naming the file.
    """
    path = str(path)
    b = _RecordBuilder(path, drop_gaps)
    try:
        seen = _read_records(path, b)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile first: it is an OSError
        raise ValueError(f"{path}: truncated or corrupt gzip file ({_one_line(e)}); re-download it") from None
    except OSError as e:  # permissions, I/O errors: bad input too, reported without a traceback
        raise ValueError(f"{path}: cannot read ({e.strerror or _one_line(e)})") from None
    b.finish()
    if not seen:
        raise ValueError(f"{path}: empty FASTA file")
    if not b.lengths:
        raise ValueError(f"{path}: no sequence found (no record has any nucleotides)")
    ids = np.concatenate(b.chunks) if len(b.chunks) > 1 else b.chunks[0].copy()
    return ids, b.names, b.lengths


def _read_records(path: str, b: _RecordBuilder) -> bool:
    """Feeds the whole file to `b`; whether it had any non-blank text."""
    carry, seen = b"", False
    with _open_fasta(path) as f:
        while True:
            block = f.read(_CHUNK)
            data = carry + block
            if block:  # only hand over complete lines, so a header is never split
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            seen = seen or bool(data.strip())
            _scan(data, b)
            if not block:
                return seen


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


def _crc32(ids: np.ndarray) -> int:
    c = 0
    for i in range(0, ids.size, _CHUNK):  # chunked: a memory-mapped genome is never copied whole
        c = zlib.crc32(ids[i : i + _CHUNK], c)
    return c


def _parse_meta(text: bytes, key: str) -> tuple[list[str], list[int], int]:
    """(names, lengths, crc32) from the `.json` metadata; ValueError if it is not what we wrote."""
    m = json.loads(text)
    if not isinstance(m, dict) or m.get("key") != key:
        raise ValueError("metadata is damaged or belongs to another file")
    names, lengths, crc = m.get("names"), m.get("lengths"), m.get("crc32")
    if not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
        and isinstance(lengths, list) and all(type(n) is int and n > 0 for n in lengths)
        and len(names) == len(lengths) > 0 and type(crc) is int
    ):
        raise ValueError("metadata fields are missing or malformed")
    return names, lengths, crc


def _cache_problem(npy: pathlib.Path, ids: np.ndarray, lengths: list[int], crc: int) -> str | None:
    """What is wrong with a loaded cache array, or None. The checksum catches overwrites that keep
    the size (a wrong window is silent, unlike a crash); it costs ~0.1 s per GB, once per open."""
    if ids.dtype != np.uint8 or ids.ndim != 1:
        return f"array is {ids.dtype} {ids.shape}, expected uint8 1-D"
    if ids.size != sum(lengths):
        return f"array holds {ids.size} ids, the metadata says {sum(lengths)}"
    size, expected = npy.stat().st_size, getattr(ids, "offset", 0) + ids.nbytes
    if size != expected:
        return f"file is {size} bytes, expected {expected}"
    if _crc32(ids) != crc:
        return "checksum mismatch: the array was overwritten"
    return None


def _read_cache(path: pathlib.Path, npy: pathlib.Path, meta: pathlib.Path, key: str):
    """The cached (ids, names, lengths), or None to parse again.

    A damaged cache (truncated, overwritten, metadata not ours) is reported and ignored, so the
    caller rebuilds it: a bad cache must neither crash sampling later nor give wrong ids.
    """
    if not meta.exists():
        return None  # never cached, or killed before the commit marker was written
    try:
        names, lengths, crc = _parse_meta(meta.read_bytes(), key)
        with warnings.catch_warnings():  # a garbage header can make numpy's literal_eval warn
            warnings.simplefilter("ignore")
            ids = np.load(npy, mmap_mode="r", allow_pickle=False)
        problem = _cache_problem(npy, ids, lengths, crc)
    except Exception as e:  # noqa: BLE001 - a garbage .npy header raises ValueError, EOFError,
        problem = _one_line(e)  # TypeError, tokenize.TokenError, ...: all mean "rebuild it"
    if problem is None:
        return ids, names, lengths
    warnings.warn(f"ignoring damaged FASTA cache {npy} ({problem}); rebuilding it from {path}", stacklevel=4)
    return None


def _write_cache(ids, names, lengths, npy: pathlib.Path, meta: pathlib.Path, key: str):
    """Writes the array, then the metadata, each atomically. The `.json` is the commit marker:
    a process killed in between leaves at worst an orphan `.npy`, overwritten by the next run."""
    npy.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(npy, lambda f: np.save(f, ids))
    text = json.dumps({"key": key, "names": names, "lengths": lengths, "crc32": _crc32(ids)}).encode()
    _atomic_write(meta, lambda f: f.write(text))


def load_fasta_ids(path, *, drop_gaps: bool = False, cache_dir=None, use_cache: bool = True):
    """(ids, names, lengths, cache_file) for one file; ids memory-mapped when cached.

    Errors: FastaNotFoundError (a FileNotFoundError and a ValueError) for a missing path,
    ValueError with a one-line message naming the file for anything else wrong with it. A file
    that fails to parse never gets a cache; a damaged cache is rebuilt with a warning.
    """
    path = check_fasta_path(path)
    if use_cache:
        cdir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        npy, meta, key = _cache_files(path, drop_gaps, cdir)
        cached = _read_cache(path, npy, meta, key)
        if cached is not None:
            return (*cached, npy)
    ids, names, lengths = parse_fasta(path, drop_gaps=drop_gaps)
    if not use_cache:
        return ids, names, lengths, None
    try:
        _write_cache(ids, names, lengths, npy, meta, key)
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
