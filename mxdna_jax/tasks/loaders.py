"""Loaders for the three labelled-data layouts, all returning a `LabelledTask`.

  csv      TASK/{train,dev,test}.{csv,tsv}[.gz] with a header naming `sequence` and `label` (any
           column order, extra columns ignored, an `id` column kept as record ids). GUE's layout.
           dev may also be called valid/validation/val.
  folders  TASK/{train,test}/<class>/*.txt, one sequence per file, whitespace inside removed
           (Genomic Benchmarks). An optional dev/ folder is used when present.
  fasta    TASK/<class>.fa[.gz] (no splits: test and dev are carved), or
           TASK/{train,test}/<class>.fa[.gz] (dev optional). Also .fasta/.fna/.fas.

A split that is missing can be carved from train only when asked (dev_fraction /
test_fraction); the carving is stratified, seeded and recorded in the split's provenance.
Every error is a `UserError` of one line naming the file and 1-based line (the file alone when
the file is the row).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import os
import pathlib
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from mxdna_jax.cli import UserError
from mxdna_jax.tasks.labelled import LabelledTask, Split, carve, encode_rows, map_labels

SPLIT_ALIASES = {"train": ("train",), "dev": ("dev", "valid", "validation", "val"), "test": ("test",)}
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
FASTA_SUFFIXES = tuple(s + z for s in (".fa", ".fasta", ".fna", ".fas") for z in ("", ".gz"))
LAYOUTS = ("csv", "folders", "fasta")
_WHITESPACE = b" \t\r\n\v\f"
_ID_COLUMN = "id"


def _is_gzip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_binary(path):
    return (gzip.open if _is_gzip(path) else open)(path, "rb")


def _read_errors(path, e: BaseException) -> UserError:
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
        return UserError(f"{path}: truncated or corrupt gzip file ({type(e).__name__}: {e})")
    if isinstance(e, UnicodeDecodeError):  # reported per decoding block: find the line in the whole text
        with _open_binary(path) as f:
            data = f.read()
        try:
            data.decode("utf-8")
            return UserError(f"{path}: not UTF-8 text ({e.reason})")
        except UnicodeDecodeError as whole:
            line = data.count(b"\n", 0, whole.start) + 1
            return UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[whole.start]:02x}: {whole.reason})")
    return UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _task_name(root: pathlib.Path) -> str:
    """`prom_300_tata`; GUE's numbered tasks get their parent too (`mouse/0`)."""
    return f"{root.parent.name}/{root.name}" if root.name.isdigit() and root.parent.name else root.name


# ---- csv / tsv ---------------------------------------------------------------------------


def read_table(path, split: str) -> tuple[Split, list[str]]:
    """One CSV/TSV file -> (Split with placeholder labels, raw label strings)."""
    path = str(path)
    delimiter = "\t" if path.endswith((".tsv", ".tsv.gz")) else ","
    seqs, labels, lines, ids = [], [], [], []
    header_line = 0
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = None
            for row in reader:
                if not any(field.strip() for field in row):
                    continue  # blank lines (trailing newlines, spacing) carry no row
                if header is None:
                    header, header_line = [c.strip().lower() for c in row], reader.line_num
                    cols = _columns(path, header, header_line, delimiter, row)
                    need = max(cols.values())
                    continue
                if len(row) <= need:
                    raise UserError(f"{path}:{reader.line_num}: {len(row)} field(s), the header has {len(header)}")
                lines.append(reader.line_num)
                seqs.append(row[cols["sequence"]].strip().encode("utf-8"))
                labels.append(row[cols["label"]].strip())
                if _ID_COLUMN in cols:
                    ids.append(row[cols[_ID_COLUMN]].strip())
    except UserError:
        raise
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: {e}") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise _read_errors(path, e) from None
    if header is None:
        raise UserError(f"{path}:1: empty file; expected a header line naming 'sequence' and 'label' columns")
    if not seqs:
        raise UserError(f"{path}:{header_line + 1}: no rows after the header; the {split} split is empty")
    n = len(seqs)
    sp = Split(name=split, ids=np.zeros(0, np.uint8), offsets=np.zeros(n + 1, np.int64),
               labels=np.zeros(n, np.int32), sources=(path,), source_index=np.zeros(n, np.int32),
               lines=np.asarray(lines, np.int32), record_ids=tuple(ids) if ids else None,
               provenance={"kind": "file", "path": path})
    tokens, offsets = encode_rows(seqs, sp.where)
    return _with(sp, ids=tokens, offsets=offsets), labels


def _columns(path, header, line, delimiter, raw_row) -> dict[str, int]:
    cols = {}
    for want in ("sequence", "label", _ID_COLUMN):
        if want in header:
            cols[want] = header.index(want)
        elif want != _ID_COLUMN:
            hint = ""
            if len(raw_row) == 1 and ("\t" if delimiter == "," else ",") in raw_row[0]:
                hint = "; the header looks " + ("tab-separated: name the file .tsv" if delimiter == "," else
                                                "comma-separated: name the file .csv")
            raise UserError(f"{path}:{line}: no {want!r} column in the header (found: {', '.join(header)}); "
                            f"expected columns 'sequence' and 'label'{hint}")
    return cols


def _with(sp: Split, **changes) -> Split:
    return dataclasses.replace(sp, **changes)


def _find_split_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        hits = [root / (a + s) for a in aliases for s in TABLE_SUFFIXES if (root / (a + s)).is_file()]
        if len(hits) > 1:
            raise UserError(f"{root}: both {hits[0].name} and {hits[1].name} exist for the {split} split; keep one")
        if hits:
            found[split] = hits[0]
    return found


def load_csv_task(path, *, name=None, dev_fraction=None, test_fraction=None, seed=0) -> LabelledTask:
    """A GUE-style task directory (see the module docstring)."""
    root = _check_dir(path)
    files = _find_split_files(root)
    looked = {s: f"{s}.csv, {s}.tsv" + (", .gz too" if s == "train" else ", .gz too; also named valid/validation/val"
                                              if s == "dev" else ", .gz too") for s in SPLIT_ALIASES}
    if "train" not in files:
        raise UserError(f"{root}: no train split (looked for {looked['train']})")
    found = {s: read_table(p, s) for s, p in files.items()}
    return _assemble(name or _task_name(root), "csv", str(root), found, looked, dev_fraction, test_fraction, seed)


# ---- Genomic Benchmarks folders ----------------------------------------------------------


def read_class_folders(split_dir, split: str) -> tuple[Split, list[str]]:
    """SPLIT/<class>/*.txt -> (Split with placeholder labels, class names); files in natural order."""
    split_dir = pathlib.Path(split_dir)
    classes = sorted((d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: _natural_key(d.name))
    if not classes:
        raise UserError(f"{split_dir}: no class folders; expected {split_dir}/<class>/*.txt")
    rows, labels, sources = [], [], []
    for d in classes:
        files = sorted((p for p in d.iterdir() if p.suffix == ".txt" and p.is_file() and not p.name.startswith(".")),
                       key=lambda p: _natural_key(p.name))
        if not files:
            raise UserError(f"{d}: no .txt files; the {split} split of class {d.name!r} is empty")
        for p in files:
            try:
                rows.append(p.read_bytes().translate(None, _WHITESPACE))
            except OSError as e:
                raise _read_errors(p, e) from None
            labels.append(d.name)
            sources.append(str(p))
    n = len(rows)
    sp = Split(name=split, ids=np.zeros(0, np.uint8), offsets=np.zeros(n + 1, np.int64),
               labels=np.zeros(n, np.int32), sources=tuple(sources), source_index=np.arange(n, dtype=np.int32),
               lines=np.zeros(n, np.int32), record_ids=tuple(pathlib.Path(s).stem for s in sources),
               provenance={"kind": "files", "path": str(split_dir)})
    tokens, offsets = encode_rows(rows, sp.where)
    return _with(sp, ids=tokens, offsets=offsets), labels


def _split_dirs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        hits = [root / a for a in aliases if (root / a).is_dir()]
        if len(hits) > 1:
            raise UserError(f"{root}: both {hits[0].name}/ and {hits[1].name}/ exist for the {split} split; keep one")
        if hits:
            found[split] = hits[0]
    return found


def load_folder_task(path, *, name=None, dev_fraction=None, test_fraction=None, seed=0) -> LabelledTask:
    """A Genomic Benchmarks directory (see the module docstring); dev is usually carved."""
    root = _check_dir(path)
    dirs = _split_dirs(root)
    looked = {s: f"{s}/<class>/*.txt" + ("; also named valid/validation/val" if s == "dev" else "")
              for s in SPLIT_ALIASES}
    if "train" not in dirs:
        raise UserError(f"{root}: no train split (looked for {looked['train']})")
    found = {s: read_class_folders(d, s) for s, d in dirs.items()}
    return _assemble(name or _task_name(root), "folders", str(root), found, looked, dev_fraction, test_fraction, seed)


# ---- one FASTA per class -----------------------------------------------------------------


def _fasta_class_files(d: pathlib.Path) -> dict[str, pathlib.Path]:
    out: dict[str, pathlib.Path] = {}
    for p in sorted(d.iterdir(), key=lambda p: _natural_key(p.name)):
        suffix = next((s for s in sorted(FASTA_SUFFIXES, key=len, reverse=True) if p.name.endswith(s)), None)
        if suffix is None or not p.is_file() or p.name.startswith("."):
            continue
        cls = p.name[: -len(suffix)]
        if cls in out:
            raise UserError(f"{d}: both {out[cls].name} and {p.name} name class {cls!r}; keep one")
        out[cls] = p
    return out


def _fasta_headers(path) -> list[tuple[int, str, bool]]:
    """(1-based line, record name, has sequence) of each '>' header, named as parse_fasta names them."""
    out = []
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith(b">"):
                    text = line[1:].decode("utf-8", "replace").strip()
                    out.append([lineno, text.split(maxsplit=1)[0] if text else "", False])
                elif out and not out[-1][2] and line.strip():
                    out[-1][2] = True
    except (OSError, EOFError, zlib.error) as e:
        raise _read_errors(path, e) from None
    return [tuple(h) for h in out]


_FASTA_BAD_CHAR = re.compile(r"record (?P<name>'.*'|\".*\"): invalid character (?P<ch>.+?) at position (?P<pos>\d+) ")


def _locate_fasta_error(path, message: str, headers) -> str:
    """parse_fasta's message with the line of the bad character (it reports record and position)."""
    m = _FASTA_BAD_CHAR.search(message)
    if not m:
        return message if message.startswith(str(path)) else f"{path}: {message}"
    name, pos = ast.literal_eval(m["name"]), int(m["pos"])
    start = next((h[0] for h in headers if h[1] == name), None)
    line = start
    if start is not None:
        seen = 0
        with _open_binary(path) as f:
            for lineno, text in enumerate(f, 1):
                if lineno > start:
                    seen += len(text.translate(None, _WHITESPACE))
                    if seen >= pos:
                        line = lineno
                        break
    where = f"{path}:{line}" if line else str(path)
    return (f"{where}: record {m['name']}: invalid character {m['ch']} at position {pos} (1-based) of the record; "
            "expected A/C/G/T/N or IUPAC codes (any case)")


def read_fasta_file(path):
    """(ids, names, lengths, header lines) of one FASTA(.gz), every problem a UserError with file:line."""
    # Imported here: mxdna_jax.data pulls in grain (seconds); CSV and folder tasks do not need it.
    from mxdna_jax.data.fasta import check_fasta_path, parse_fasta

    try:
        check_fasta_path(path)
    except ValueError as e:
        raise UserError(str(e)) from None
    headers = _fasta_headers(path)
    empty = next((h for h in headers if not h[2]), None)
    if empty is not None:
        raise UserError(f"{path}:{empty[0]}: record {empty[1]!r}: empty sequence")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty records were rejected above
            ids, names, lengths = parse_fasta(path)
    except ValueError as e:
        raise UserError(_locate_fasta_error(path, str(e), headers)) from None
    lines = [h[0] for h in headers] if len(headers) == len(names) else [0] * len(names)
    return ids, names, lengths, lines


def read_fasta_classes(pairs: Sequence[tuple[str, os.PathLike | str]], split: str) -> tuple[Split, list[str]]:
    """(class, FASTA path) pairs -> (Split with placeholder labels, class names); a class may repeat."""
    chunks, lens, labels, names, lines, src_index, sources = [], [], [], [], [], [], []
    for i, (cls, path) in enumerate(pairs):
        ids, n, ln, hl = read_fasta_file(path)
        chunks.append(np.asarray(ids, np.uint8))
        lens += ln
        names += n
        lines += hl
        labels += [str(cls)] * len(n)
        src_index += [i] * len(n)
        sources.append(str(path))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    sp = Split(name=split, ids=np.concatenate(chunks), offsets=offsets, labels=np.zeros(len(lens), np.int32),
               sources=tuple(sources), source_index=np.asarray(src_index, np.int32),
               lines=np.asarray(lines, np.int32), record_ids=tuple(names),
               provenance={"kind": "files", "paths": sources})
    return sp, labels


def load_fasta_task(source, *, name=None, dev_fraction=None, test_fraction=None, seed=0) -> LabelledTask:
    """One FASTA per class: a directory (see the module docstring), a {class: path or [paths]}
    mapping, or a list of (class, path) pairs. Without train/test folders everything is one pool
    from which test and dev are carved (test_fraction and dev_fraction are then required)."""
    if isinstance(source, (str, os.PathLike)):
        root = _check_dir(source)
        dirs = {s: d for s, d in _split_dirs(root).items() if _fasta_class_files(d)}
        looked = {s: f"{s}/<class>.fa[.gz]" + ("; also named valid/validation/val" if s == "dev" else "")
                  for s in SPLIT_ALIASES}
        if dirs:
            if "train" not in dirs:
                raise UserError(f"{root}: no train split (looked for {looked['train']})")
            found = {s: read_fasta_classes(list(_fasta_class_files(d).items()), s) for s, d in dirs.items()}
            return _assemble(name or _task_name(root), "fasta", str(root), found, looked,
                             dev_fraction, test_fraction, seed)
        pairs = list(_fasta_class_files(root).items())
        if not pairs:
            raise UserError(f"{root}: no FASTA files (looked for <class>{{.fa,.fasta,.fna,.fas}}[.gz] and "
                            f"{looked['train']})")
        name, where = name or _task_name(root), str(root)
    else:
        items = source.items() if isinstance(source, Mapping) else source
        pairs = [(c, p) for c, ps in items for p in ([ps] if isinstance(ps, (str, os.PathLike)) else ps)]
        if not pairs:
            raise UserError("no (class, FASTA path) pairs given")
        name, where = name or "fasta_classes", None
    looked = {s: f"{s} (the FASTA files have no train/test folders)" for s in SPLIT_ALIASES}
    found = {"train": read_fasta_classes(pairs, "train")}
    return _assemble(name, "fasta", where, found, looked, dev_fraction, test_fraction, seed)


# ---- detection and assembly ----------------------------------------------------------------


def _check_dir(path) -> pathlib.Path:
    root = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not root.exists():
        raise UserError(f"task directory not found: {root}")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the task directory holding the splits")
    return root


def detect_layouts(path) -> list[str]:
    """The layouts a task directory matches (usually one)."""
    root = _check_dir(path)
    out = []
    if _find_split_files(root):
        out.append("csv")
    dirs = _split_dirs(root)
    if any(any(c.is_dir() and not c.name.startswith(".") for c in d.iterdir()) for d in dirs.values()):
        out.append("folders")
    if _fasta_class_files(root) or any(_fasta_class_files(d) for d in dirs.values()):
        out.append("fasta")
    return out


_LOOKED_FOR = ("train/dev/test.csv|.tsv[.gz] (GUE), train/<class>/*.txt and test/<class>/*.txt "
               "(Genomic Benchmarks), <class>.fa[.gz] or train/<class>.fa and test/<class>.fa (FASTA per class)")


def load_task(path, *, layout: str | None = None, name: str | None = None, dev_fraction: float | None = None,
              test_fraction: float | None = None, seed: int = 0) -> LabelledTask:
    """Loads a task directory in any known layout (detected unless `layout` is given).

    dev_fraction / test_fraction: carve that split from train (stratified, seeded) when the
    layout has no such split; ignored (and noted in the split's provenance) when it has one.
    """
    root = _check_dir(path)
    if layout is None:
        found = detect_layouts(root)
        if not found:
            raise UserError(f"{root}: no known labelled-data layout; looked for {_LOOKED_FOR}")
        if len(found) > 1:
            raise UserError(f"{root}: matches several layouts ({', '.join(found)}); pass layout= to choose one")
        layout = found[0]
    loaders = {"csv": load_csv_task, "folders": load_folder_task, "fasta": load_fasta_task}
    if layout not in loaders:
        raise UserError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return loaders[layout](root, name=name, dev_fraction=dev_fraction, test_fraction=test_fraction, seed=seed)


def _assemble(name, layout, root, found, looked, dev_fraction, test_fraction, seed) -> LabelledTask:
    order = [s for s in ("train", "dev", "test") if s in found]
    class_names, integer, arrays = map_labels([(found[s][1], found[s][0].where) for s in order])
    splits = {s: _with(found[s][0], labels=a) for s, a in zip(order, arrays)}
    train = splits["train"]
    counts = train.class_counts(len(class_names))
    if np.count_nonzero(counts) < 2:
        only = class_names[int(np.argmax(counts))]
        raise UserError(f"{train.where(0)}: the train split has only one class ({only!r}); "
                        "classification needs at least two")
    for s in ("dev", "test"):
        if s in splits:
            absent = np.flatnonzero(counts[splits[s].labels] == 0)
            if absent.size:
                i = int(absent[0])
                k = int(splits[s].labels[i])
                cls = f"label {k}" if integer else f"class {class_names[k]!r}"
                src = train.provenance.get("path") or train.sources[0]
                raise UserError(f"{splits[s].where(i)}: {cls} does not occur in the train split ({src}); "
                                "a model cannot learn it")
    fractions = {"test": test_fraction, "dev": dev_fraction}
    wanted = {}
    for s, f in fractions.items():
        if s in splits:
            if f is not None:
                splits[s] = _with(splits[s], provenance={**splits[s].provenance,
                                                         "note": f"{s}_fraction={f} not used: the {s} split exists"})
        elif f is None:
            where = root or "the FASTA files"
            raise UserError(f"{where}: no {s} split (looked for {looked[s]}); pass {s}_fraction "
                            f"(e.g. 0.1) to carve a stratified {s} split from train")
        else:
            wanted[s] = float(f)
    if wanted:
        splits.update(carve(train, wanted, seed=seed, num_classes=len(class_names)))
    return LabelledTask(name=name, layout=layout, root=root, class_names=class_names, integer_labels=integer,
                        splits={s: splits[s] for s in ("train", "dev", "test")})
