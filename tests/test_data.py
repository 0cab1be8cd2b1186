"""Data layer: FASTA parsing and caching, masking, Grain pipelines (real genomes when present)."""

import gzip
import math
import pickle

import numpy as np
import pytest
from conftest import shared_path

from mxdna_jax import vocab
from mxdna_jax.data import fasta as fasta_mod
from mxdna_jax.data.pipeline import TRAIN_STREAM, MakeExample
from mxdna_jax.data import (
    Genome,
    PretrainData,
    PretrainDataConfig,
    WindowSampler,
    default_corpus_path,
    default_corpus_paths,
    element_rng,
    fasta_eval_batches,
    mask_tokens,
    process_element_indices,
    unigram_entropy,
)

YEAST = ("data", "yeast_chrI_3species", "ScerR64_I_GCF_000146045.2_R64_genomic.fna.gz")
CHR20 = ("data", "human_chr20_grch37", "20.fa.gz")


@pytest.fixture(autouse=True)
def _session_cache(tmp_path_factory, monkeypatch):
    # One cache per test session: real genomes are parsed once, ~/.cache is never touched.
    monkeypatch.setenv("MXDNA_CACHE", str(tmp_path_factory.getbasetemp() / "mxdna_cache"))


def write_fasta(path, records, width=60, gz=False, newline="\n"):
    lines = []
    for name, seq in records:
        lines.append(">" + name)
        lines += [seq[i : i + width] for i in range(0, len(seq), width)] if width else [seq]
    text = newline.join(lines) + newline
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(text.encode())
    return path


def random_dna(rng, n, alphabet="ACGT"):
    return "".join(rng.choice(list(alphabet), size=n))


def reconstruct(batch):
    """Original tokens of a masked batch: labels where predicted, input_ids elsewhere."""
    return np.where(batch["labels"] != vocab.IGNORE_LABEL, batch["labels"], batch["input_ids"])


# ---------------------------------------------------------------- FASTA parsing and cache


def test_multirecord_odd_widths_lowercase_crlf(tmp_path):
    rng = np.random.default_rng(0)
    s1, s2, s3 = random_dna(rng, 1001), random_dna(rng, 37, "ACGTNacgtnRY"), random_dna(rng, 500).lower()
    p = tmp_path / "multi.fa"
    text = (
        f">rec1 some description\r\n{s1[:7]}\r\n{s1[7:20]}\r\n\r\n{s1[20:]}\r\n"
        f">empty\n>rec2\n{s2}\n>rec3\tdesc\n" + "\n".join(s3[i : i + 13] for i in range(0, 500, 13))  # no final \n
    )
    p.write_text(text)
    with pytest.warns(UserWarning, match="'empty' has no sequence"):
        g = Genome(p, use_cache=False)
    assert g.names == ("rec1", "rec2", "rec3")
    assert list(g.lengths) == [1001, 37, 500] and len(g) == 1538
    for i, s in enumerate((s1, s2, s3)):
        np.testing.assert_array_equal(g.record(i), vocab.nucleotides_to_ids(s))
    np.testing.assert_array_equal(g.window(1001 + 37 + 10, 5), vocab.nucleotides_to_ids(s3[10:15]))
    with pytest.raises(IndexError):
        g.window(1000, 2)  # crosses rec1/rec2


def test_gz_and_plain_identical(tmp_path):
    rng = np.random.default_rng(1)
    recs = [("a", random_dna(rng, 3000)), ("b", random_dna(rng, 71, "acgtN"))]
    ga = Genome(write_fasta(tmp_path / "x.fa", recs, width=61), use_cache=False)
    gb = Genome(write_fasta(tmp_path / "x.fa.gz", recs, width=80, gz=True), use_cache=False)
    assert ga.names == gb.names
    np.testing.assert_array_equal(ga.record(0), gb.record(0))
    np.testing.assert_array_equal(ga.record(1), gb.record(1))


def test_real_yeast_gz_matches_plain_and_independent_decoding(tmp_path):
    src = shared_path(*YEAST)
    text = gzip.decompress(src.read_bytes())
    plain = tmp_path / "scer.fna"
    plain.write_bytes(text)
    gz, pl = Genome(src), Genome(plain)
    np.testing.assert_array_equal(np.asarray(gz.record(0)), np.asarray(pl.record(0)))
    seq = "".join(line for line in text.decode().splitlines() if not line.startswith(">"))
    assert any(c.islower() for c in seq)  # soft-masked input is exercised
    np.testing.assert_array_equal(gz.record(0), vocab.nucleotides_to_ids(seq))
    assert gz.names == ("NC_001133.9",) and len(gz) == 230_218


def test_tiny_read_blocks_give_same_result_and_positions(tmp_path, monkeypatch):
    # Records, headers and lines straddle read blocks: the carry logic and error positions must hold.
    rng = np.random.default_rng(3)
    recs = [(f"r{i} desc", random_dna(rng, n, "ACGTNacgt")) for i, n in enumerate((1, 50, 333, 7))]
    p = write_fasta(tmp_path / "t.fa.gz", recs, width=11, gz=True)
    ref = fasta_mod.parse_fasta(p)
    monkeypatch.setattr(fasta_mod, "_CHUNK", 7)
    tiny = fasta_mod.parse_fasta(p)
    np.testing.assert_array_equal(ref[0], tiny[0])
    assert ref[1:] == tiny[1:] == (["r0", "r1", "r2", "r3"], [1, 50, 333, 7])
    gap = write_fasta(tmp_path / "g.fa", [("x", "-" * 30 + "AC" * 20 + "E")], width=9)
    with pytest.raises(ValueError, match="'E' at position 71"):
        fasta_mod.parse_fasta(gap, drop_gaps=True)


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    p = write_fasta(tmp_path / "c.fa", [("r", "ACGT" * 100)])
    cdir = tmp_path / "cache"
    g1 = Genome(p, cache_dir=cdir)
    assert isinstance(g1._parts[0], np.memmap)
    assert len(list(cdir.glob("*.npy"))) == 1 and len(list(cdir.glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("parsed again although cached")

    monkeypatch.setattr(fasta_mod, "parse_fasta", boom)
    g2 = Genome(p, cache_dir=cdir)
    np.testing.assert_array_equal(g1.record(0), g2.record(0))
    # Environment variable is honoured as the default cache dir.
    monkeypatch.setenv("MXDNA_CACHE", str(cdir))
    Genome(p)
    # A changed file (size/mtime) must be parsed again.
    write_fasta(p, [("r", "GGGG" * 101)])
    with pytest.raises(AssertionError, match="parsed again"):
        Genome(p, cache_dir=cdir)


def test_cache_write_is_atomic_and_unwritable_falls_back(tmp_path, monkeypatch):
    p = write_fasta(tmp_path / "c.fa", [("r", "ACGTTGCA" * 50)])
    cdir = tmp_path / "cache"

    def killed(f, arr):  # dies half way through writing the array
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fasta_mod.np, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            Genome(p, cache_dir=cdir)
    assert list(cdir.iterdir()) == []  # neither a half file nor a stray tmp
    g = Genome(p, cache_dir=cdir)
    assert g.record(0)[:4].tolist() == [vocab.A, vocab.C, vocab.G, vocab.T]

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="keeping c.fa in memory"):
        g = Genome(p, cache_dir=blocker / "sub")
    assert not isinstance(g._parts[0], np.memmap) and len(g) == 400


def test_genome_pickles_by_cache_path(tmp_path):
    p = write_fasta(tmp_path / "big.fa", [("r", "ACGT" * 50_000)])
    g = Genome(p, cache_dir=tmp_path / "cache")
    blob = pickle.dumps(g)
    assert len(blob) < 10_000  # the 200 kb array is not copied into worker processes
    np.testing.assert_array_equal(pickle.loads(blob).window(123, 40), g.window(123, 40))


def test_invalid_character_names_file_record_position(tmp_path):
    p = write_fasta(tmp_path / "bad.fa", [("ok", "ACGT" * 5), ("chrX", "ACGTACGGXA")], width=6)
    with pytest.raises(ValueError, match=r"bad\.fa: record 'chrX': invalid character 'X' at position 9"):
        Genome(p, use_cache=False)
    p2 = write_fasta(tmp_path / "gap.fa", [("bc1", "AC-GT--A")])
    with pytest.raises(ValueError, match=r"'bc1'.*'-' at position 3.*drop_gaps=True"):
        Genome(p2, use_cache=False)
    g = Genome(p2, use_cache=False, drop_gaps=True)
    assert vocab.decode(g.record(0)) == "ACGTA"
    p3 = write_fasta(tmp_path / "gap2.fa", [("bc2", "AC--GT*A")])
    with pytest.raises(ValueError, match=r"'bc2'.*'\*' at position 7"):  # positions count gaps
        Genome(p3, use_cache=False, drop_gaps=True)


def test_empty_and_sequenceless_fasta(tmp_path):
    for name, content in (("empty.fa", ""), ("blank.fa", "\n\n  \n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match="empty FASTA file"):
            Genome(tmp_path / name, use_cache=False)
    (tmp_path / "hdr.fa").write_text(">a\n>b\n\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no sequence found"):
        Genome(tmp_path / "hdr.fa", use_cache=False)
    (tmp_path / "nohdr.fa").write_text("ACGT\n>a\nACGT\n")
    with pytest.raises(ValueError, match="before the first '>' header"):
        Genome(tmp_path / "nohdr.fa", use_cache=False)
    with pytest.raises(FileNotFoundError):
        Genome(tmp_path / "missing.fa")


def test_unigram_entropy_nats():
    assert unigram_entropy(np.array([vocab.A] * 10 + [vocab.UNK] * 5)) == 0.0
    assert unigram_entropy(np.array(list(vocab.NUCLEOTIDE_IDS) * 3 + [vocab.UNK])) == pytest.approx(math.log(4))
    g = Genome(default_corpus_path())
    h = unigram_entropy(g)
    c = g.counts()[list(vocab.NUCLEOTIDE_IDS)]
    p = c / c.sum()
    assert h == pytest.approx(-(p * np.log(p)).sum()) and 1.3 < h < math.log(4)  # GC ~39%


def test_default_corpus_embedded():
    paths = default_corpus_paths()
    assert len(paths) == 3 and default_corpus_path() in paths
    g = Genome(paths)
    assert g.names == ("NC_001133.9", "NC_079272.1", "NC_079256.1") and len(g) == 695_239


# ---------------------------------------------------------------- masking


def _masking_input(rng, b=2000, length=512):
    ids = rng.choice(np.array(vocab.NUCLEOTIDE_IDS), size=(b, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = vocab.CLS, vocab.SEP
    ids[: b // 2, -40:] = vocab.PAD  # padded rows: [SEP] before the pads
    ids[: b // 2, -41] = vocab.SEP
    ids[:, 100:110] = vocab.UNK
    return ids


def test_masking_statistics_and_consistency():
    rng = np.random.default_rng(0)
    ids = _masking_input(rng)
    out, labels = mask_tokens(ids, np.random.default_rng(1))
    assert out.dtype == labels.dtype == np.int32 and out.shape == labels.shape == ids.shape
    eligible = np.isin(ids, vocab.NUCLEOTIDE_IDS)
    sel = labels != vocab.IGNORE_LABEL
    assert not (sel & ~eligible).any()  # specials and [UNK] never selected
    np.testing.assert_array_equal(labels[sel], ids[sel])
    np.testing.assert_array_equal(out[~sel], ids[~sel])
    assert abs(sel.sum() / eligible.sum() - 0.15) < 0.003
    n = sel.sum()
    to_mask = (out == vocab.MASK) & sel
    changed = sel & (out != vocab.MASK) & (out != ids)
    assert abs(to_mask.sum() / n - 0.8) < 0.01
    assert np.isin(out[changed], vocab.NUCLEOTIDE_IDS).all()
    # 10% random nucleotide, of which 3/4 differ from the original; 10% (+2.5%) unchanged.
    assert abs(changed.sum() / n - 0.075) < 0.006
    assert abs((sel & (out == ids)).sum() / n - 0.125) < 0.008


def test_masking_fractions_configurable_and_at_least_one():
    rng = np.random.default_rng(2)
    ids = _masking_input(rng, b=200)
    out, labels = mask_tokens(ids, rng, mask_prob=0.3, mask_token_frac=1.0, random_token_frac=0.0)
    sel = labels != vocab.IGNORE_LABEL
    assert (out[sel] == vocab.MASK).all() and abs(sel.mean() / np.isin(ids, vocab.NUCLEOTIDE_IDS).mean() - 0.3) < 0.01
    out, labels = mask_tokens(ids, rng, mask_token_frac=0.0, random_token_frac=0.0)
    np.testing.assert_array_equal(out, ids)
    # Short rows: with a tiny probability nothing would be drawn, yet each row gets exactly one.
    short = np.array([[vocab.CLS, vocab.A, vocab.UNK, vocab.SEP]] * 50
                     + [[vocab.CLS, vocab.UNK, vocab.SEP, vocab.PAD]] * 5)
    _, labels = mask_tokens(short, rng, mask_prob=1e-9)
    assert ((labels != vocab.IGNORE_LABEL).sum(1) == [1] * 50 + [0] * 5).all()
    assert (labels[:50, 1] == vocab.A).all()
    with pytest.raises(ValueError):
        mask_tokens(short, rng, mask_token_frac=0.9, random_token_frac=0.2)


def test_reverse_complement_ids():
    ids = vocab.nucleotides_to_ids("AACGTNG")
    assert vocab.decode(vocab.reverse_complement_ids(ids)) == "CNACGTT"
    np.testing.assert_array_equal(vocab.reverse_complement_ids(vocab.reverse_complement_ids(ids)), ids)


# ---------------------------------------------------------------- pipeline


def small_cfg(**kw):
    return PretrainDataConfig(**{"window": 128, "global_batch_size": 8, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format_and_determinism():
    data = PretrainData(small_cfg())
    b = next(iter(data.dataset()))
    assert set(b) == {"input_ids", "attention_mask", "special_tokens_mask", "labels"}
    for v in b.values():
        assert v.shape == (8, 130) and v.dtype == np.int32
    assert (b["input_ids"][:, 0] == vocab.CLS).all() and (b["input_ids"][:, -1] == vocab.SEP).all()
    np.testing.assert_array_equal(b["special_tokens_mask"], vocab.make_masks(b["input_ids"])["special_tokens_mask"])
    assert (b["attention_mask"] == 1).all()
    assert ((b["labels"] != vocab.IGNORE_LABEL).sum(1) >= 1).all()
    assert (b["labels"][b["special_tokens_mask"] == 1] == vocab.IGNORE_LABEL).all()
    again = take(iter(PretrainData(small_cfg()).dataset()), 3)
    assert_batches_equal(take(iter(data.dataset()), 3), again)
    other = take(iter(PretrainData(small_cfg(seed=1)).dataset()), 3)
    assert not np.array_equal(other[0]["input_ids"], again[0]["input_ids"])
    # Streams (train / validation / eval) and elements never share random numbers.
    draws = [element_rng(0, stream, i).random(4) for stream in (0, 1, 2) for i in (0, 1)]
    assert len({d.tobytes() for d in draws}) == 6
    # Any element can be recomputed from its global index alone.
    make = MakeExample(data.train_sampler, data.cfg, data.cfg.seed, TRAIN_STREAM)
    for j in (0, 5):
        np.testing.assert_array_equal(make(2 * 8 + j)["input_ids"], again[2]["input_ids"][j])


def test_windows_are_genome_substrings_and_rc_rate():
    g = Genome(default_corpus_paths())
    fwd = "|".join(vocab.decode(g.record(r)) for r in range(g.num_records))
    rc = vocab.decode(vocab.reverse_complement_ids(vocab.nucleotides_to_ids(fwd.replace("|", "N"))))
    batches = take(iter(PretrainData(small_cfg(window=64), genome=g).dataset()), 25)
    n_fwd = 0
    for row in np.concatenate([reconstruct(b) for b in batches]):
        s = vocab.decode(row)
        assert len(s) == 64 and (s in fwd or s in rc)
        n_fwd += s in fwd
    assert 60 < n_fwd < 140  # of 200 windows, rc_prob=0.5
    f0 = reconstruct(take(iter(PretrainData(small_cfg(rc_prob=0.0), genome=g).dataset()), 1)[0])
    f1 = reconstruct(take(iter(PretrainData(small_cfg(rc_prob=1.0), genome=g).dataset()), 1)[0])
    np.testing.assert_array_equal(f1[:, 1:-1], vocab.COMPLEMENT[f0[:, -2:0:-1]])  # same windows, other strand


@pytest.mark.parametrize("workers", [0, 2])
def test_checkpoint_round_trip(workers):
    cfg = small_cfg(num_workers=workers)
    data = PretrainData(cfg)
    it = iter(data.dataset())
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    it2 = iter(PretrainData(cfg).dataset())
    it2.set_state(state)
    got = take(it2, 3)
    assert_batches_equal(got, expected)
    # Same data whatever the worker count or the way we resume (start_step).
    assert_batches_equal(take(iter(PretrainData(small_cfg()).dataset(start_step=2)), 3), expected)
    if workers:
        it.close()
        it2.close()


def test_multiprocess_shard_union():
    for s, p in ((0, 0), (3, 1), (7, 3)):
        idx = process_element_indices(s, 8, p, 4)
        np.testing.assert_array_equal(idx, s * 8 + 2 * p + np.arange(2))
    with pytest.raises(ValueError, match="not divisible"):
        process_element_indices(0, 8, 0, 3)
    g = Genome(default_corpus_paths())
    whole = take(iter(PretrainData(small_cfg(), genome=g).dataset()), 3)
    parts = [take(iter(PretrainData(small_cfg(), genome=g, process_index=p, process_count=4).dataset()), 3)
             for p in range(4)]
    for s in range(3):
        assert all(parts[p][s]["input_ids"].shape == (2, 130) for p in range(4))
        for k in whole[s]:
            np.testing.assert_array_equal(np.concatenate([parts[p][s][k] for p in range(4)]), whole[s][k])
    val = PretrainData(small_cfg(), genome=g).validation_batches(2)
    vparts = [PretrainData(small_cfg(), genome=g, process_index=p, process_count=2).validation_batches(2)
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([v[1]["labels"] for v in vparts]), val[1]["labels"])


def test_sampler_support_is_exactly_the_valid_starts(tmp_path):
    g = Genome(write_fasta(tmp_path / "s.fa", [("a", "ACGT" * 10), ("b", "TTGCA" * 3)]), use_cache=False)
    sampler = WindowSampler(g, [(0, 10), (20, 25), (40, 55)], 5)
    starts = {sampler.sample(element_rng(0, 0, i))[0] for i in range(2000)}
    assert starts == set(range(6)) | {20} | set(range(40, 51))
    start, win = sampler.sample(element_rng(0, 0, 0))
    np.testing.assert_array_equal(win, g.window(start, 5))


def test_validation_region_held_out():
    data = PretrainData(small_cfg(window=200))
    g, w, v0 = data.genome, 200, data.val_start
    assert v0 <= len(g) - max(math.ceil(0.02 * len(g)), 8 * w)
    assert all(e <= v0 for _, e in data.train_sampler.segments)
    assert all(s >= v0 for s, _ in data.val_sampler.segments)
    starts = np.array([data.train_sampler.sample(element_rng(0, 0, i))[0] for i in range(3000)])
    assert (starts + w <= v0).all() and starts.max() > v0 - 20_000  # reaches up to the boundary
    rec = np.searchsorted(g.starts, starts, side="right") - 1
    assert (starts + w <= g.starts[rec] + g.lengths[rec]).all()  # never across records
    assert len(set(rec.tolist())) == 3
    vstarts = np.array([data.val_sampler.sample(element_rng(0, 1, i))[0] for i in range(300)])
    assert (vstarts >= v0).all() and (vstarts + w <= len(g)).all()
    # Fixed validation batches: independent of the training seed, drawn from the tail only.
    vb = data.validation_batches(2)
    assert_batches_equal(vb, PretrainData(small_cfg(window=200, seed=7)).validation_batches(2))
    tail = vocab.decode(g.window(v0, len(g) - v0))
    tail_rc = vocab.decode(vocab.reverse_complement_ids(g.window(v0, len(g) - v0)))
    for row in reconstruct(vb[0]):
        assert vocab.decode(row) in tail or vocab.decode(row) in tail_rc
    with pytest.raises(ValueError, match="cover the whole genome"):
        PretrainData(small_cfg(window=100_000))


def test_fasta_eval_batches_deterministic(tmp_path):
    a = fasta_eval_batches(default_corpus_path(), window=100, batch_size=4, n_batches=2)
    b = fasta_eval_batches(default_corpus_path(), window=100, batch_size=4, n_batches=2)
    assert_batches_equal(a, b)
    assert a[0]["input_ids"].shape == (4, 102)
    fwd = vocab.decode(Genome(default_corpus_path()).record(0))
    assert all(vocab.decode(r) in fwd for r in reconstruct(a[1]))  # forward strand by default
    c = fasta_eval_batches(default_corpus_path(), window=100, batch_size=4, n_batches=2, seed=1)
    assert not np.array_equal(a[0]["labels"], c[0]["labels"])
    short = write_fasta(tmp_path / "short.fa", [("s", "ACGT" * 10)])
    with pytest.raises(ValueError, match="no record"):
        fasta_eval_batches(short, window=100, batch_size=2, n_batches=1)


def test_all_n_corpus_raises_clearly(tmp_path):
    p = write_fasta(tmp_path / "n.fa", [("a", "N" * 5000), ("b", "n" * 3000)])
    with pytest.raises(ValueError, match="is the corpus all N"):
        PretrainData(small_cfg(fasta=str(p), val_fraction=0.0))
    # Passes the upfront check (one good window exists) but sampling cannot find it: error, no hang.
    p = write_fasta(tmp_path / "almost.fa", [("a", "N" * 20_000 + "ACGT" * 16)])
    data = PretrainData(small_cfg(fasta=str(p), window=64, val_fraction=0.0, max_tries=3))
    with pytest.raises(ValueError, match="almost all N"):
        next(iter(data.dataset()))


def test_human_chr20_opens_and_n_runs_skipped():
    g = Genome(shared_path(*CHR20))
    assert g.names == ("20",) and len(g) == 63_025_520
    assert g.counts()[vocab.UNK] == 3_520_000  # as documented in SOURCE.md
    assert (np.asarray(g.window(0, 60_000)) == vocab.UNK).all()  # telomeric N run
    # Segment [0, 70 kb): 86% of draws start in the N run and must be re-drawn.
    sampler = WindowSampler(g, [(0, 70_000)], 500, max_n_frac=0.1)
    for i in range(200):
        start, win = sampler.sample(element_rng(0, 0, i))
        assert start >= 60_000 - 50 and np.count_nonzero(win == vocab.UNK) <= 50
    data = PretrainData(small_cfg(window=500), genome=g)
    assert data.val_start < len(g) - 60_000
    for b in take(iter(data.dataset()), 4):
        assert ((reconstruct(b) == vocab.UNK).sum(1) <= 50).all()
