"""DNA barcodes: the loader on the packaged data and on bad files, the species-disjoint split
(disjointness, seen relatives of every unseen genus, determinism, the split file), and the
`data.corpus='barcodes'` pretraining stream (shapes, [PAD] after [SEP], start offsets, masking)."""

import gzip

import numpy as np
import pytest

from mxdna_jax import vocab
from mxdna_jax.cli import UserError
from mxdna_jax.data import barcodes as bc
from mxdna_jax.data.pipeline import TRAIN_STREAM, VAL_STREAM, PretrainData, PretrainDataConfig, element_rng

HEADER = ("processid\tsampleid\tbin_uri\tphylum_name\tclass_name\torder_name\tfamily_name\tgenus_name\t"
          "species_name\tnucleotides\tsequence_len")


def write_tsv(path, rows, header=HEADER):
    """rows: (processid, genus, species, nucleotides) in the BOLD column layout."""
    lines = [header] + [f"{p}\tS{p}\tBOLD:X\tArthropoda\tInsecta\tDiptera\tFam\t{g}\t{s}\t{seq}\t{len(seq)}"
                        for p, g, s, seq in rows]
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def random_seq(rng, n=80):
    return "".join(rng.choice(list("ACGT"), n))


@pytest.fixture(scope="module")
def embedded():
    return bc.load_barcodes()


@pytest.fixture(scope="module")
def embedded_split(embedded):
    return bc.split_barcodes(embedded, seed=0)


def test_embedded_barcodes_load_clean(embedded):
    b = embedded
    assert len(bc.default_barcode_paths()) == 2 and all(p.endswith(".tsv.gz") for p in b.sources)
    assert len(b) == 9278 and b.report["rows"] == 9278 and b.report["duplicates"] == 0
    assert b.report["unlabelled"] == 0 and b.labelled.all() and b.report["single_species_genera"] == 156
    assert len(set(b.species)) == 1926 and len(set(b.genera)) == 549 and len(set(b.processids)) == len(b)
    assert set(np.unique(b.ids)) <= {vocab.UNK, *vocab.NUCLEOTIDE_IDS}  # no gap, no special
    last = b.ids[b.offsets[1:] - 1]
    assert (last != vocab.UNK).all()  # no trailing N
    assert b.lengths.min() >= 300 and b.lengths.max() <= 784
    seqs = {b.sequence(i) for i in range(len(b))}
    assert len(seqs) == len(b) and not any("-" in s for s in seqs)  # no exact duplicates, no gaps
    assert b.where(0).endswith(":2 (SSJAE238-13)")


def test_cleaning_gaps_trailing_n_duplicates_unlabelled(tmp_path):
    rows = [("P1", "Ga", "Ga one", "ac-gt--ACNNN"), ("P2", "Ga", "Ga two", "ACGTACG"),
            ("P3", "Ga", "Ga one", "AC--GTAC"),          # = P1 after cleaning: a duplicate
            ("P4", "", "", "GGGTTT"), ("P5", "Gb", "None", "NNGATTACANN")]
    b = bc.load_barcodes(write_tsv(tmp_path / "x.tsv.gz", rows))
    assert b.processids == ("P1", "P2", "P4", "P5")
    assert [b.sequence(i) for i in range(len(b))] == ["ACGTAC", "ACGTACG", "GGGTTT", "NNGATTACA"]
    assert b.report == dict(rows=5, duplicates=1, gapped=2, trailing_n=2, unlabelled=2, barcodes=4,
                            single_species_genera=0)
    assert b.species[3] == "" and b.where(2).endswith("x.tsv.gz:5 (P4)")


@pytest.mark.parametrize("case, pattern", [
    ("columns", r"x\.tsv:1: missing column\(s\) genus_name, nucleotides in the header"),
    ("only_n", r"x\.tsv:3: P2: the sequence is empty or only N and/or gaps"),
    ("gaps", r"x\.tsv:2: P1: the sequence is empty or only N and/or gaps"),
    ("invalid", r"x\.tsv:3: P2: invalid character 'X' at position 4 of the nucleotides"),
    ("fields", r"x\.tsv:2: 3 field\(s\), the header has 11"),
    ("empty", r"x\.tsv:1: empty file"),
    ("duplicate_id", r"x\.tsv:3: processid P1 also at .*x\.tsv:2 with another sequence"),
])
def test_bad_barcode_files_are_one_line_naming_file_and_line(tmp_path, case, pattern):
    p = tmp_path / "x.tsv"
    good = ("P1", "G", "G s", "ACGTACGT")
    if case == "columns":
        p.write_text("processid\tspecies_name\tseq\nP1\tG s\tACGT\n")
    elif case == "fields":
        p.write_text(HEADER + "\nP1\tS\tB\n")
    elif case == "empty":
        p.write_text("")
    else:
        bad = {"only_n": [good, ("P2", "G", "G s", "NN-NN")], "gaps": [("P1", "G", "G s", "---")],
               "invalid": [good, ("P2", "G", "G s", "ACGTXACGT")],
               "duplicate_id": [good, ("P1", "G", "G s", "GGGG")]}[case]
        write_tsv(p, bad)
    with pytest.raises(UserError, match=pattern) as e:
        bc.load_barcodes(str(p))
    assert "\n" not in str(e.value)


def check_split(split):
    b, c = split.barcodes, split.counts()
    sp = {n: {(b.genera[i], b.species[i]) for i in split.indices(n)} for n in bc.SPLIT_NAMES}
    assert not sp["unseen"] & (sp["train"] | sp["test"])  # species-disjoint
    assert sp["test"] <= sp["train"]  # every probe-test species is in probe-train
    train_genera = {g for g, _ in sp["train"]}
    assert {g for g, _ in sp["unseen"]} <= train_genera  # every unseen genus has seen relatives
    assert sum(v["barcodes"] for v in c.values()) == len(b)
    return c


def test_split_disjoint_with_seen_relatives_and_deterministic(embedded, embedded_split):
    c = check_split(embedded_split)
    assert c["unseen"]["species"] == round(0.2 * 1926) and c["excluded"]["barcodes"] == 0
    assert c == {"train": {"barcodes": 6274, "species": 1541, "genera": 549},
                 "test": {"barcodes": 1697, "species": 816, "genera": 505},
                 "unseen": {"barcodes": 1307, "species": 385, "genera": 252},
                 "excluded": {"barcodes": 0, "species": 0, "genera": 0}}
    np.testing.assert_array_equal(bc.split_barcodes(embedded, seed=0).assignment, embedded_split.assignment)
    other = bc.split_barcodes(embedded, seed=1)
    check_split(other)
    assert (other.assignment != embedded_split.assignment).any()
    assert "train 6274 barcodes / 1541 species / 549 genera" in embedded_split.describe()


def test_split_file_round_trip_reuse_and_conflicts(tmp_path, embedded, embedded_split):
    path = tmp_path / bc.SPLIT_FILENAME
    assert bc.ensure_split(path, embedded, write=False).path == str(path) and not path.exists()
    made = bc.ensure_split(path, embedded, seed=0)
    assert path.exists() and made.path == str(path)
    np.testing.assert_array_equal(made.assignment, embedded_split.assignment)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# barcode split") and lines[2] == "processid\tspecies\tgenus\tsplit"
    assert len(lines) == 3 + len(embedded) and lines[3].split("\t")[0] == "SSJAE238-13"
    again = bc.read_split(path, embedded)
    np.testing.assert_array_equal(again.assignment, embedded_split.assignment)
    assert (again.seed, again.unseen_fraction, again.test_fraction) == (0, 0.2, 0.2)
    # a resume finds it, whatever the split code would do now; other parameters conflict
    rows = lines[:3] + [lines[3].rsplit("\t", 1)[0] + "\tunseen"] + lines[4:]
    path.write_text("\n".join(rows) + "\n")
    assert bc.ensure_split(path, embedded, seed=0).assignment[0] == bc.SPLIT_NAMES.index("unseen")
    with pytest.raises(UserError, match=r"was made with seed=0, .*this run asks seed=1"):
        bc.ensure_split(path, embedded, seed=1)
    # a split of other data: named by file and line
    sub = embedded.take(np.arange(5, len(embedded)))
    with pytest.raises(UserError, match=rf"{bc.SPLIT_FILENAME}:4: processid SSJAE238-13 is not among the barcodes"):
        bc.read_split(path, sub)
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match=r"has no row for 1 of the barcodes"):
        bc.read_split(path, embedded)


def test_single_species_genera_never_crash(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"A{i}", "Solo", "Solo alone", random_seq(rng)) for i in range(3)]  # a genus of one species
    rows += [(f"B{i}{k}", "Duo", f"Duo sp{k}", random_seq(rng)) for k in range(2) for i in range(3)]
    b = bc.load_barcodes(write_tsv(tmp_path / "x.tsv", rows))
    assert b.report["single_species_genera"] == 1
    split = bc.split_barcodes(b, seed=0, unseen_fraction=0.5)
    check_split(split)
    unseen = {b.species[i] for i in split.indices("unseen")}
    assert len(unseen) == 1 and unseen <= {"Duo sp0", "Duo sp1"}  # 0.5 x 3 species, Duo keeps one seen
    only_solo = bc.split_barcodes(b.take(np.arange(3)), seed=0, unseen_fraction=0.5)
    assert len(only_solo.indices("unseen")) == 0 and len(only_solo.indices("train")) == 2
    assert "1 single-species genera" in only_solo.describe()
    # the corpus built on it works too
    cfg = PretrainDataConfig(corpus="barcodes", barcodes=(str(tmp_path / "x.tsv"),), window=64, global_batch_size=4)
    data = PretrainData(cfg, split=only_solo)
    assert next(iter(data.dataset()))["input_ids"].shape == (4, 66)
    assert len(data.validation_batches(1)) == 1


def reconstruct(batch):
    """The uncorrupted tokens: labels at the predicted positions, inputs elsewhere."""
    return np.where(batch["labels"] != vocab.IGNORE_LABEL, batch["labels"], batch["input_ids"])


def test_barcode_corpus_shapes_pad_offsets_and_determinism(embedded_split):
    window, B = 660, 8
    cfg = PretrainDataConfig(corpus="barcodes", window=window, global_batch_size=B, seed=3)
    data = PretrainData(cfg, split=embedded_split)
    train = embedded_split.subset("train")
    by_seq = {}
    for i in range(len(train)):
        by_seq.setdefault(train.row_ids(i)[:40].tobytes(), []).append(i)
    batches = [b for _, b in zip(range(3), iter(data.dataset()))]
    offsets = []
    for k, batch in enumerate(batches):
        assert batch["input_ids"].shape == batch["labels"].shape == (B, window + 2)
        full = reconstruct(batch)
        for r in range(B):
            row, am = full[r], batch["attention_mask"][r]
            sep = int(np.flatnonzero(row == vocab.SEP)[0])
            assert row[0] == vocab.CLS and (row[sep + 1:] == vocab.PAD).all()
            assert (am == (np.arange(window + 2) <= sep)).all()  # attention up to [SEP]
            assert (batch["labels"][r][sep:] == vocab.IGNORE_LABEL).all()  # [SEP]/[PAD] are never masked
            assert (batch["input_ids"][r][sep + 1:] == vocab.PAD).all()
            # the sampler's draw for this element says which barcode and offset it is
            i, off = data.train_sampler.draw(element_rng(3, TRAIN_STREAM, k * B + r), k * B + r)
            offsets.append(off)
            seq = train.row_ids(i)[off: off + window]
            assert sep == len(seq) + 1 and (row[1:sep] == seq).all()
    assert 0 <= min(offsets) and max(offsets) <= 5 and len(set(offsets)) > 1
    assert any((b["input_ids"] == vocab.PAD).any() for b in batches)  # barcodes shorter than 660 nt
    again = [b for _, b in zip(range(3), iter(PretrainData(cfg, split=embedded_split).dataset(start_step=1)))]
    for a, b in zip(batches[1:], again):  # elements are pure functions of (seed, step): resume is exact
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    parts = [next(iter(PretrainData(cfg, split=embedded_split, process_index=p, process_count=2).dataset()))
             for p in range(2)]
    for key in parts[0]:  # two processes' halves make the one-process batch
        np.testing.assert_array_equal(np.concatenate([q[key] for q in parts]), batches[0][key])
    val = data.validation_batches(2)
    test = embedded_split.subset("test")
    starts = {test.row_ids(i)[:window].tobytes() for i in range(len(test))}
    for vb in val:  # validation: seen-test barcodes from their first nucleotide
        for row in reconstruct(vb):
            sep = int(np.flatnonzero(row == vocab.SEP)[0])
            assert row[1:sep].astype(np.uint8).tobytes() in starts
    assert data.val_sampler.draw(element_rng(0, VAL_STREAM, 5), 5)[1] == 0
    val_again = PretrainData(cfg, split=embedded_split).validation_batches(1)[0]
    for key in val[0]:
        np.testing.assert_array_equal(val[0][key], val_again[key])


def test_barcode_corpus_default_split_and_config_errors(tmp_path):
    from mxdna_jax import pretrain

    with pytest.raises(ValueError, match=r"^data.corpus must be one of 'genome', 'barcodes', got 'barcode'$"):
        PretrainDataConfig(corpus="barcode")
    with pytest.raises(ValueError, match=r"data.barcode_max_offset must be >= 0"):
        PretrainDataConfig(barcode_max_offset=-1)
    with pytest.raises(UserError, match=r"data.corpus must be one of"):
        pretrain.data_config({"corpus": "barcode", "window": 64})
    dc = pretrain.data_config({"corpus": "barcodes", "barcodes": "a.tsv, b.tsv", "window": 64})
    assert [p.rsplit("/", 1)[1] for p in dc.barcodes] == ["a.tsv", "b.tsv"] and dc.barcodes[0].startswith("/")
    with pytest.raises(UserError, match=r"barcode TSV file not found: .*a\.tsv"):
        pretrain.check_paths(dc)
    # pretrain.run's split: new (not yet written) in a fresh workdir, the file's on a resume
    dc = pretrain.data_config({"corpus": "barcodes", "window": 64, "barcode_seed": 2})
    split = pretrain.barcode_split(dc, str(tmp_path))
    assert split.seed == 2 and split.path == str(tmp_path / bc.SPLIT_FILENAME)
    assert not (tmp_path / bc.SPLIT_FILENAME).exists()
    bc.write_split(split, split.path)
    np.testing.assert_array_equal(pretrain.barcode_split(dc, str(tmp_path)).assignment, split.assignment)
    dc = pretrain.data_config({"corpus": "barcodes", "window": 64, "barcode_seed": 0})
    with pytest.raises(UserError, match=r"barcode_split.tsv was made with seed=2"):
        pretrain.barcode_split(dc, str(tmp_path))
