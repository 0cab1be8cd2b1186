"""Labelled tasks (mxdna_jax.tasks): the three layouts on real GUE slices (tests/fixtures/tasks,
see SOURCE.md), label mapping, one-line errors naming file and line, bucketed batches,
truncation, shuffling, stratified carving and subsampling."""

import csv
import dataclasses
import gzip
import json
import pathlib
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, shared_path

from mxdna_jax import vocab
from mxdna_jax.cli import UserError
from mxdna_jax.tasks import (
    allocate,
    bucket_lengths,
    carve,
    detect_layouts,
    encode_split,
    load_fasta_task,
    load_task,
    map_labels,
    read_table,
    subsample,
)

TASKS = FIXTURES / "tasks"
GUE = TASKS / "gue_prom_300_tata"
NODEV = TASKS / "csv_mouse0_nodev"
GB = TASKS / "gb_tf0"
FASTA = TASKS / "fasta_mouse2"


def gue_rows(path):
    """[(sequence, label)] of a fixture CSV, read independently of the loader."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return [(r["sequence"], r["label"]) for r in csv.DictReader(f)]


def real_seqs(n=40):
    return [s for s, _ in gue_rows(NODEV / "train.csv")][:n] * (n // 24 + 1)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def csv_task(tmp_path, splits, header="sequence,label"):
    """A GUE-layout dir with {split: [(seq, label)]}, real sequences unless given."""
    for split, rows in splits.items():
        write(tmp_path / f"{split}.csv", header + "\n" + "".join(f"{s},{lab}\n" for s, lab in rows))
    return tmp_path


def raises(match_parts, fn, *a, **kw):
    with pytest.raises(UserError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for part in match_parts:
        assert part in msg, (part, msg)
    return msg


# ---- the four fixture layouts ----------------------------------------------------------------


def test_gue_csv_gz_layout():
    task = load_task(GUE)
    assert (task.layout, task.name, task.integer_labels) == ("csv", "gue_prom_300_tata", True)
    assert task.class_names == ("0", "1")
    assert {s: len(sp) for s, sp in task.splits.items()} == {"train": 16, "dev": 8, "test": 8}
    assert task.class_counts() == {"train": {"0": 8, "1": 8}, "dev": {"0": 4, "1": 4}, "test": {"0": 4, "1": 4}}
    for split in ("train", "dev", "test"):
        sp, rows = task.splits[split], gue_rows(GUE / f"{split}.csv.gz")
        assert sp.sequences() == [s for s, _ in rows]
        assert sp.labels.dtype == np.int32 and sp.labels.tolist() == [int(lab) for _, lab in rows]
        assert sp.lines.tolist() == list(range(2, len(rows) + 2))
        assert sp.provenance == {"kind": "file", "path": str(GUE / f"{split}.csv.gz")}
        assert sp.length_stats() == {"min": 300, "mean": 300.0, "max": 300}
        assert sp.ids.dtype == np.uint8
    np.testing.assert_array_equal(task.train.row_ids(0), vocab.nucleotides_to_ids(gue_rows(GUE / "train.csv.gz")[0][0]))
    assert task.train.where(2) == f"{GUE / 'train.csv.gz'}:4"
    json.dumps(task.metadata())
    text = task.describe()
    assert "train  16" in text and "0:8 1:8" in text and "train.csv.gz" in text


def test_csv_without_dev_carves_only_when_asked():
    msg = raises([str(NODEV), "no dev split", "dev_fraction"], load_task, NODEV)
    assert "dev.csv" in msg
    task = load_task(NODEV, dev_fraction=0.25, seed=3)
    assert {s: len(sp) for s, sp in task.splits.items()} == {"train": 18, "dev": 6, "test": 8}
    assert task.class_counts()["dev"] == {"0": 3, "1": 3}
    p = task.dev.provenance
    assert (p["kind"], p["from"], p["fraction"], p["seed"], p["stratified"], p["from_rows"]) == (
        "carved", "train", 0.25, 3, True, 24)
    assert task.train.provenance["carved_out"] == {"dev": 6}
    assert "carved from train (0.25 of 24 rows, stratified, seed 3)" in task.describe()
    # columns in another order, an extra column ignored, `id` kept; carved rows keep their file lines
    rows = gue_rows(NODEV / "train.csv")
    with open(NODEV / "train.csv", newline="") as f:
        ids = [r["id"] for r in csv.DictReader(f)]
    assert sorted(task.train.record_ids + task.dev.record_ids) == sorted(ids) and ids[0] == "train:2"
    assert not set(task.train.record_ids) & set(task.dev.record_ids)
    for sp in (task.train, task.dev):
        assert [rows[line - 2][0] for line in sp.lines] == sp.sequences()
    assert load_task(NODEV, dev_fraction=0.25, seed=3).dev.record_ids == task.dev.record_ids
    assert load_task(NODEV, dev_fraction=0.25, seed=4).dev.record_ids != task.dev.record_ids


def test_dev_fraction_ignored_and_noted_when_dev_exists():
    task = load_task(GUE, dev_fraction=0.1)
    assert len(task.dev) == 8 and task.dev.provenance["kind"] == "file"
    assert "dev_fraction=0.1 not used" in task.dev.provenance["note"]


def test_tsv_and_plain_csv_give_the_same_task(tmp_path):
    rows = gue_rows(NODEV / "train.csv")
    for split in ("train", "dev", "test"):
        write(tmp_path / "tsv" / f"{split}.tsv", "sequence\tlabel\n" + "".join(f"{s}\t{lab}\n" for s, lab in rows))
        write(tmp_path / "csv" / f"{split}.csv", "sequence,label\n" + "".join(f"{s},{lab}\n" for s, lab in rows))
    a, b = load_task(tmp_path / "tsv"), load_task(tmp_path / "csv")
    np.testing.assert_array_equal(a.train.ids, b.train.ids)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    write(tmp_path / "bad" / "train.csv", "sequence\tlabel\nACGT\t0\n")
    raises(["train.csv:1:", "no 'sequence' column", "tab-separated"], read_table, tmp_path / "bad/train.csv", "train")


def test_bom_crlf_case_and_blank_lines(tmp_path):
    s = real_seqs()
    text = f"\ufeffSequence,Label\r\n{s[0].lower()},1\r\n\r\n{s[1]}NRY,0\r\n"
    (tmp_path / "train.csv").write_bytes(text.encode())
    split, labels = read_table(tmp_path / "train.csv", "train")
    assert split.sequences() == [s[0], s[1] + "NNN"] and labels == ["1", "0"] and split.lines.tolist() == [2, 4]


def test_genomic_benchmarks_folders():
    raises([str(GB), "no dev split", "dev/<class>/*.txt", "dev_fraction"], load_task, GB)
    task = load_task(GB, dev_fraction=0.25)
    assert task.layout == "folders" and task.class_names == ("negative", "positive") and not task.integer_labels
    assert {s: len(sp) for s, sp in task.splits.items()} == {"train": 12, "dev": 4, "test": 8}
    assert task.class_counts()["test"] == {"negative": 4, "positive": 4}
    test = task.test
    # files in natural order per class; whitespace of wrapped files removed; the file is the row
    assert test.record_ids == ("502", "503", "504", "505", "2", "3", "4", "5")
    assert test.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert set(test.lengths.tolist()) == {101}
    for i in range(len(test)):
        path = pathlib.Path(test.where(i))
        assert path.is_file() and test.sequence(i) == "".join(path.read_text().split())
    assert any("\n" in pathlib.Path(test.where(i)).read_text().strip() for i in range(len(test)))


def test_fasta_per_class_without_splits_carves_test_and_dev():
    raises([str(FASTA), "no test split", "test_fraction"], load_task, FASTA)
    task = load_task(FASTA, test_fraction=0.25, dev_fraction=0.25, seed=1)
    assert task.layout == "fasta" and task.class_names == ("negative", "positive")
    assert task.class_counts() == {"train": {"negative": 6, "positive": 6}, "dev": {"negative": 3, "positive": 3},
                                   "test": {"negative": 3, "positive": 3}}
    ids = [r for sp in task.splits.values() for r in sp.record_ids]
    assert len(ids) == len(set(ids)) == 24  # a partition of the 24 records
    assert task.test.provenance["kind"] == task.dev.provenance["kind"] == "carved"
    # record sequences and header lines, from the plain and the gzipped file
    for sp in task.splits.values():
        for i in range(len(sp)):
            path = sp.sources[sp.source_index[i]]
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                lines = f.read().splitlines()
            assert lines[sp.lines[i] - 1].startswith(f">{sp.record_ids[i]} ")
            width = 80 if path.endswith(".gz") else 60
            assert "".join(lines[sp.lines[i] : sp.lines[i] + -(-101 // width)]) == sp.sequence(i)
    again = load_task(FASTA, test_fraction=0.25, dev_fraction=0.25, seed=1)
    assert again.test.record_ids == task.test.record_ids


def test_fasta_split_folders_and_pairs(tmp_path):
    for split in ("train", "test"):
        for name in ("negative.fa", "positive.fa.gz"):
            (tmp_path / split).mkdir(exist_ok=True)
            shutil.copy(FASTA / name, tmp_path / split / name)
    task = load_task(tmp_path, dev_fraction=0.5)
    assert task.layout == "fasta"
    assert {s: len(sp) for s, sp in task.splits.items()} == {"train": 12, "dev": 12, "test": 24}
    pairs = load_fasta_task([("pos", FASTA / "positive.fa.gz"), ("neg", FASTA / "negative.fa")],
                            test_fraction=0.25, dev_fraction=0.25)
    assert pairs.class_names == ("neg", "pos") and pairs.root is None
    by_map = load_fasta_task({"pos": [FASTA / "positive.fa.gz"], "neg": FASTA / "negative.fa"},
                             test_fraction=0.25, dev_fraction=0.25)
    assert by_map.test.record_ids == pairs.test.record_ids


def test_layout_detection_and_unknown_layout(tmp_path):
    assert [detect_layouts(p) for p in (GUE, NODEV, GB, FASTA)] == [["csv"], ["csv"], ["folders"], ["fasta"]]
    write(tmp_path / "README.md", "nothing here\n")
    raises([str(tmp_path), "no known labelled-data layout", "train/dev/test.csv", "train/<class>/*.txt",
            "<class>.fa"], load_task, tmp_path)
    raises(["task directory not found", "nope"], load_task, tmp_path / "nope")
    raises(["is not a directory"], load_task, tmp_path / "README.md")


# ---- labels ----------------------------------------------------------------------------------


def test_string_labels_sorted_and_consistent_across_splits(tmp_path):
    s = real_seqs()
    csv_task(tmp_path, {
        "train": [(s[0], "promoter"), (s[1], "enhancer"), (s[2], "other"), (s[3], "enhancer")],
        "dev": [(s[4], "other")],
        "test": [(s[5], "promoter"), (s[6], "promoter")],
    })
    task = load_task(tmp_path)
    assert task.class_names == ("enhancer", "other", "promoter") and not task.integer_labels
    assert task.label_ids == {"enhancer": 0, "other": 1, "promoter": 2}
    assert task.train.labels.tolist() == [2, 0, 1, 0]
    assert task.dev.labels.tolist() == [1] and task.test.labels.tolist() == [2, 2]
    assert task.class_counts()["test"] == {"enhancer": 0, "other": 0, "promoter": 2}


def test_integer_labels_kept_as_they_are(tmp_path):
    s = real_seqs()
    csv_task(tmp_path, {"train": [(s[0], "2"), (s[1], "0"), (s[2], "1")], "dev": [(s[3], "0")], "test": [(s[4], "2")]})
    task = load_task(tmp_path)
    assert task.integer_labels and task.class_names == ("0", "1", "2")
    assert task.train.labels.tolist() == [2, 0, 1]


# ---- bad input: one line naming the file and the line -------------------------------------


def _bad_cases(s):
    """name -> (splits, header, expected message parts with {dir} for the task directory)."""
    ok = [(s[0], "0"), (s[1], "1")]
    return {
        "no_label_column": ({"train": ok, "dev": ok, "test": ok}, "sequence,class",
                            ["{dir}/train.csv:1:", "no 'label' column", "found: sequence, class"]),
        "no_sequence_column": ({"train": ok, "dev": ok, "test": ok}, "seq,label",
                               ["{dir}/train.csv:1:", "no 'sequence' column"]),
        "mixed_labels": ({"train": ok + [(s[2], "tata")], "dev": ok, "test": ok}, "sequence,label",
                         ["{dir}/train.csv:4:", "label 'tata' is not an integer", "'0' at {dir}/train.csv:2"]),
        "float_label": ({"train": ok, "dev": ok, "test": ok + [(s[2], "1.5")]}, "sequence,label",
                        ["{dir}/test.csv:4:", "label '1.5' is not an integer"]),
        "float_labels_only": ({"train": [(s[0], "0.0"), (s[1], "1.0")], "dev": ok, "test": ok}, "sequence,label",
                              ["{dir}/train.csv:2:", "label '0.0' is not an integer", "'0' at {dir}/dev.csv:2"]),
        "negative_label": ({"train": ok + [(s[2], "-1")], "dev": ok, "test": ok}, "sequence,label",
                           ["{dir}/train.csv:4:", "label '-1' is negative"]),
        "invalid_char": ({"train": ok, "dev": [(s[0], "0"), ("ACGTNacgtnRYX", "1")], "test": ok}, "sequence,label",
                         ["{dir}/dev.csv:3:", "invalid character 'X' at position 13 (1-based)"]),
        "non_ascii_char": ({"train": ok, "dev": ok, "test": [("ACGé", "1")]}, "sequence,label",
                           ["{dir}/test.csv:2:", "invalid character 'é' at position 4"]),
        "test_class_absent_from_train": ({"train": ok, "dev": ok, "test": ok + [(s[3], "2")]}, "sequence,label",
                                         ["{dir}/test.csv:4:", "label 2 does not occur in the train split"]),
        "dev_class_absent_from_train": (
            {"train": [(s[0], "a"), (s[1], "b")], "dev": [(s[2], "c")], "test": [(s[0], "a")]}, "sequence,label",
            ["{dir}/dev.csv:2:", "class 'c' does not occur in the train split"]),
        "empty_split": ({"train": ok, "dev": [], "test": ok}, "sequence,label",
                        ["{dir}/dev.csv:2:", "no rows after the header", "dev split is empty"]),
        "empty_sequence": ({"train": ok + [("", "1")], "dev": ok, "test": ok}, "sequence,label",
                           ["{dir}/train.csv:4:", "empty sequence"]),
        "empty_label": ({"train": ok + [(s[2], "")], "dev": ok, "test": ok}, "sequence,label",
                        ["{dir}/train.csv:4:", "empty label"]),
        "one_class": ({"train": [(s[0], "0"), (s[1], "0")], "dev": ok, "test": ok}, "sequence,label",
                      ["{dir}/train.csv:2:", "only one class"]),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases([""] * 4)))
def test_bad_csv_input_names_file_and_line(tmp_path, case):
    splits, header, parts = _bad_cases(real_seqs())[case]
    csv_task(tmp_path, splits, header=header)
    raises([p.format(dir=tmp_path) for p in parts], load_task, tmp_path)


def test_bad_csv_structure(tmp_path):
    s = real_seqs()
    write(tmp_path / "a" / "train.csv", "")
    raises([f"{tmp_path}/a/train.csv:1:", "empty file"], read_table, tmp_path / "a" / "train.csv", "train")
    write(tmp_path / "b" / "train.csv", f"label,sequence\n0,{s[0]}\n\n1\n")
    raises([f"{tmp_path}/b/train.csv:4:", "1 field(s), the header has 2"],
           read_table, tmp_path / "b/train.csv", "train")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv.gz").write_bytes(gzip.compress(f"sequence,label\n{s[0]},0\n".encode())[:-12])
    raises([f"{tmp_path}/c/train.csv.gz", "truncated or corrupt gzip"],
           read_table, tmp_path / "c/train.csv.gz", "train")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.csv").write_bytes(f"sequence,label\n{s[0]},0\nAC\xff,1\n".encode("latin-1"))
    raises([f"{tmp_path}/e/train.csv:3:", "not UTF-8 text"], read_table, tmp_path / "e/train.csv", "train")
    write(tmp_path / "d" / "train.csv", "x")
    write(tmp_path / "d" / "train.csv.gz", "x")
    raises(["both train.csv and train.csv.gz exist"], load_task, tmp_path / "d")


def test_bad_folder_input_names_the_file(tmp_path):
    shutil.copytree(GB, tmp_path / "gb")
    bad = tmp_path / "gb" / "test" / "positive" / "3.txt"
    bad.write_text("ACGT\nACUT\n")
    raises([f"{bad}: invalid character 'U' at position 7"], load_task, tmp_path / "gb", dev_fraction=0.25)
    bad.write_text("\n  \n")
    raises([f"{bad}: empty sequence"], load_task, tmp_path / "gb", dev_fraction=0.25)
    bad.unlink()
    shutil.copytree(tmp_path / "gb" / "test" / "positive", tmp_path / "gb" / "test" / "other")
    raises([f"{tmp_path}/gb/test/other/2.txt", "class 'other' does not occur in the train split"],
           load_task, tmp_path / "gb", dev_fraction=0.25)


def test_bad_fasta_input_names_file_and_line(tmp_path):
    lines = (FASTA / "negative.fa").read_text().splitlines()
    assert lines[9].startswith(">mouse2_train_line") and not lines[10].startswith(">")  # records: header + 2 lines
    bad = lines[:11] + [lines[11][:20] + "Z" + lines[11][21:]] + lines[12:]
    write(tmp_path / "t" / "negative.fa", "\n".join(bad) + "\n")
    shutil.copy(FASTA / "positive.fa.gz", tmp_path / "t")
    raises([f"{tmp_path}/t/negative.fa:12:", f"record {lines[9][1:].split()[0]!r}", "invalid character 'Z'",
            "position 81"],
           load_task, tmp_path / "t", test_fraction=0.25, dev_fraction=0.25)
    write(tmp_path / "t" / "negative.fa", "\n".join(lines[:3] + [">empty record"] + lines[3:]) + "\n")
    raises([f"{tmp_path}/t/negative.fa:4:", "record 'empty'", "empty sequence"],
           load_task, tmp_path / "t", test_fraction=0.25, dev_fraction=0.25)


# ---- batches ---------------------------------------------------------------------------------


def test_bucket_padding_shapes_masks_and_ids():
    task = load_task(NODEV, dev_fraction=0.25)
    assert bucket_lengths(300) == (64, 128, 192, 256, 300)
    enc = encode_split(task.test, max_length=512)
    assert enc.n_truncated == 0 and enc.bucket_for(103) == 128
    got = list(enc.batches(3))
    assert len(got) == enc.num_batches(3) == 3
    for b in got:
        assert set(b) == {"input_ids", "attention_mask", "special_tokens_mask", "labels", "valid", "index"}
        assert b["input_ids"].shape == (3, 128) and all(v.dtype == np.int32 for v in b.values())
    rows = np.concatenate([b["index"][b["valid"] == 1] for b in got])
    assert rows.tolist() == list(range(8))
    last = got[-1]
    assert last["valid"].tolist() == [1, 1, 0] and last["index"].tolist() == [6, 7, -1]
    assert last["labels"][2] == vocab.IGNORE_LABEL and not last["attention_mask"][2].any()
    assert (last["input_ids"][2] == vocab.PAD).all()
    for b in got:
        for j in np.flatnonzero(b["valid"]):
            i = b["index"][j]
            want = vocab.encode(task.test.sequence(i))
            np.testing.assert_array_equal(b["input_ids"][j, : len(want)], want)
            assert b["attention_mask"][j].sum() == 103 and b["labels"][j] == task.test.labels[i]
            special = b["special_tokens_mask"][j]
            assert special[[0, 102]].tolist() == [1, 1] and special[1:102].sum() == 0 and special[103:].all()
    assert [b["input_ids"].shape for b in encode_split(task.test, 512, buckets=(512,)).batches(8)] == [(8, 512)]
    assert len(list(enc.batches(3, drop_remainder=True))) == enc.num_batches(3, drop_remainder=True) == 2


def test_over_length_is_an_error_unless_truncate_says_how():
    task = load_task(GUE)
    raises([f"{GUE}/train.csv.gz:2:", "sequence of 300 nt needs 302 tokens", "max_length=258",
            "16 of 16 train rows", "truncate="], encode_split, task.train, 258)
    raises(["truncate must be one of"], encode_split, task.train, 258, truncate="middle")
    seq = task.train.sequence(0)
    expect = {"right": seq[:256], "left": seq[-256:], "center": seq[22:278]}
    for mode, want in expect.items():
        enc = encode_split(task.train, 258, truncate=mode)
        assert enc.n_truncated == 16 and enc.lengths.max() == 256
        b = next(enc.batches(4))
        assert b["input_ids"].shape == (4, 258)
        assert vocab.decode(b["input_ids"][0]) == want
    assert encode_split(task.train, 302).n_truncated == 0  # exactly fits


def test_shuffling_is_deterministic_per_seed_and_epoch():
    enc = encode_split(load_task(GUE).train, 512)

    def order(**kw):
        return np.concatenate([b["index"] for b in enc.batches(5, shuffle=True, **kw)]).tolist()

    a = order(seed=0, epoch=0)
    assert a == order(seed=0, epoch=0) and sorted(a) == [-1] * 4 + list(range(16))
    assert a != order(seed=0, epoch=1) and a != order(seed=1, epoch=0)
    assert sorted(x for x in order(seed=0, epoch=1) if x >= 0) == list(range(16))
    drop = np.concatenate([b["index"] for b in enc.batches(5, shuffle=True, seed=0, drop_remainder=True)]).tolist()
    assert drop == a[:15]


# ---- stratified carving and subsampling --------------------------------------------------


def _imbalanced(tmp_path):
    """300 rows of 3 classes, 200/70/30, real sequences in a class-interleaved order."""
    s = real_seqs()
    labels = ["a"] * 200 + ["b"] * 70 + ["c"] * 30
    order = np.random.default_rng(0).permutation(300)
    csv_task(tmp_path, {"train": [(s[i % 24], labels[i]) for i in order]})
    return read_table(tmp_path / "train.csv", "train")


def test_allocation_is_exact_and_proportional():
    assert allocate(np.array([200, 70, 30]), 30).tolist() == [20, 7, 3]
    assert allocate(np.array([2460, 2444]), 1000).tolist() == [502, 498]
    got = allocate(np.array([5, 3, 1]), 4)
    assert got.sum() == 4 and (got <= [5, 3, 1]).all()


def test_carving_and_subsampling_are_stratified_and_reproducible(tmp_path):
    split, raw = _imbalanced(tmp_path)
    _, _, (labels,) = map_labels([(raw, split.where)])
    split = dataclasses.replace(split, labels=labels)
    parts = carve(split, {"test": 0.1, "dev": 0.2}, seed=7, num_classes=3)
    counts = [parts[p].class_counts(3).tolist() for p in ("test", "dev", "train")]
    assert counts == [[20, 7, 3], [40, 14, 6], [140, 49, 21]]
    lines = np.concatenate([parts[p].lines for p in parts])
    assert sorted(lines.tolist()) == list(range(2, 302))  # a partition, nothing lost or repeated
    assert all((np.diff(parts[p].lines) > 0).all() for p in parts)  # file order kept
    again = carve(split, {"test": 0.1, "dev": 0.2}, seed=7, num_classes=3)
    assert all((again[p].lines == parts[p].lines).all() for p in parts)
    other = carve(split, {"test": 0.1, "dev": 0.2}, seed=8, num_classes=3)
    assert (other["test"].lines != parts["test"].lines).any()

    sub = subsample(split, 100, seed=1, num_classes=3)
    assert sub.class_counts(3).tolist() == [67, 23, 10]
    assert sub.provenance["subsampled"] == {"n": 100, "seed": 1, "from_rows": 300, "stratified": True}
    assert (subsample(split, 100, seed=1).lines == sub.lines).all()
    assert (subsample(split, 100, seed=2).lines != sub.lines).any()
    assert len(subsample(split, 1000, seed=1)) == 300
    raises(["subsample size must be an integer > 0"], subsample, split, 0, 1)
    raises(["leave no rows"], carve, split, {"test": 0.5, "dev": 0.5}, seed=0, num_classes=3)


def test_task_subsample_recorded_in_metadata():
    task = load_task(NODEV, dev_fraction=0.25).subsample("train", 6, seed=0)
    assert task.class_counts()["train"] == {"0": 3, "1": 3}
    assert task.metadata()["splits"]["train"]["provenance"]["subsampled"]["n"] == 6
    assert "subsampled to 6 of 18 rows (stratified, seed 0)" in task.describe()
    raises(["no split 'valid'"], task.subsample, "valid", 3)


# ---- full GUE task from ../shared --------------------------------------------------------


def test_full_gue_task_matches_source_counts():
    root = shared_path("data", "gue_deepgene_mirror", "prom", "prom_300_tata")
    task = load_task(root)
    assert task.name == "prom_300_tata" and task.class_names == ("0", "1")
    assert {s: len(sp) for s, sp in task.splits.items()} == {"train": 4904, "dev": 613, "test": 613}
    assert task.class_counts()["train"] == {"0": 2460, "1": 2444}
    assert sum(task.class_counts()["dev"].values()) == 613
    assert task.train.length_stats() == {"min": 300, "mean": 300.0, "max": 300}
    sub = task.subsample("train", 1000, seed=0)
    assert sub.class_counts()["train"] == {"0": 502, "1": 498}
    enc = encode_split(sub.train, 512)
    b = next(enc.batches(32, shuffle=True, seed=0))
    assert b["input_ids"].shape == (32, 320) and b["valid"].all()
