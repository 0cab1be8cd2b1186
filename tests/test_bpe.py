"""The BPE baseline: HF BPE trained on the embedded corpus, the host-side segmenter (unit encoding,
[MASK]/N handling, picklable), and `tokenizer='bpe'` embedding the given units."""

import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxdna_jax import vocab
from mxdna_jax.config import ModelConfig
from mxdna_jax.data.fasta import open_genome
from mxdna_jax.data.masking import mask_tokens
from mxdna_jax.data.pipeline import default_corpus_paths
from mxdna_jax.model import MxDNAForMaskedLM, extract_tokens
from mxdna_jax.objectives.mlm import MLM
from mxdna_jax.ops.nms import all_from_center, unit_layout
from mxdna_jax.tokenizers import bpe

VOCAB = 128  # small: trains in ~1 s on the 0.7 Mb corpus
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
            num_token_layers=1, max_position_embeddings=512)


@pytest.fixture(scope="module")
def genome():
    return open_genome(default_corpus_paths())


@pytest.fixture(scope="module")
def bpe_path(genome, tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / bpe.BPE_FILENAME
    bpe.train_bpe(genome, VOCAB, path)
    return path


def windows(genome, n, length, seed=0):
    """n rows [CLS] window [SEP] of `length` nt from the corpus."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(genome) - length, size=n)
    return [np.concatenate([[vocab.CLS], np.asarray(genome.window(int(s), length)), [vocab.SEP]]).astype(np.int32)
            for s in starts]


def test_train_bpe_vocab_round_trip_and_determinism(genome, bpe_path, tmp_path):
    spec = json.loads(bpe_path.read_text())
    tokens = list(spec["model"]["vocab"])
    assert len(tokens) == VOCAB and set("ACGT") <= set(tokens)
    assert set("".join(tokens)) == set("ACGT")
    assert max(map(len, tokens)) <= bpe.MAX_TOKEN_LENGTH
    # training is deterministic: the same corpus gives the same file
    again = tmp_path / "again.json"
    bpe.train_bpe(genome, VOCAB, again)
    assert again.read_text() == bpe_path.read_text()
    # the saved JSON round-trips: from the path, from the text, after pickling (Grain workers)
    ids = np.stack(windows(genome, 4, 200))
    a = bpe.BpeSegmenter(bpe_path)(ids)
    b = bpe.BpeSegmenter(bpe_path.read_text())(ids)
    c = pickle.loads(pickle.dumps(bpe.BpeSegmenter(bpe_path)))(ids)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # strings work as a corpus too (N splits the runs)
    tok = bpe.train_bpe(["ACGTACGTNNACGTACGT" * 20, "ttttacgt"], 16)
    assert tok.get_vocab_size() <= 16 and "ACGT" in tok.get_vocab()
    with pytest.raises(TypeError, match="wrap sequences in a list"):
        bpe.train_bpe("ACGT", 8)
    # ensure_tokenizer keeps an existing file, copies a source (a workdir), trains otherwise
    wd = tmp_path / "run"
    assert bpe.ensure_tokenizer(wd, None, source=bpe_path.parent).read_text() == bpe_path.read_text()
    assert bpe.ensure_tokenizer(wd, None).read_text() == bpe_path.read_text()


def test_segmentation_covers_every_window_nucleotide_once(genome, bpe_path):
    seg = bpe.BpeSegmenter(bpe_path)
    rows = windows(genome, 6, 150, seed=1) + windows(genome, 2, 37, seed=2)
    rows[1][[10, 11, 12, 40]] = vocab.UNK  # N run and a lone N
    rows[2][[5, 6, 90]] = vocab.MASK
    rows[3] = np.array([vocab.CLS, vocab.A, vocab.SEP], np.int32)  # one nucleotide
    rows[4] = np.array([vocab.CLS, vocab.MASK, vocab.UNK, vocab.SEP], np.int32)  # no run at all
    batch = vocab.batch_from_ids(rows, pad_to=160)
    ids = batch["input_ids"]
    units = seg(ids)
    assert units.dtype == np.int32 and units.shape == ids.shape
    bpe.check_units(units, ids)  # every non-special row once, units of 1..10, nothing at [CLS]/[SEP]/[PAD]
    special = np.isin(ids, vocab.SPECIAL_IDS)
    assert (units[special] == -1).all()
    single = np.isin(ids, (vocab.MASK, vocab.UNK))
    assert (units[single] == 0).all()  # [MASK] and N are single-nucleotide units centred on themselves
    np.testing.assert_array_equal(seg(ids), units)  # deterministic
    np.testing.assert_array_equal(seg(ids[2]), units[2])  # a row alone == the row in a batch
    assert units.max() + 1 <= bpe.MAX_TOKEN_LENGTH
    # the model-side `all` agrees with the host-side cover
    all_ = np.asarray(all_from_center(jnp.asarray(units)))
    assert ((all_ >= 0) == ~special).all()


def test_masked_positions_do_not_leak_through_the_segmentation(genome, bpe_path):
    """BPE runs on the maximal nucleotide runs between [MASK]/N: a run's units depend on that run
    only, and the segmentation is a function of the masked input alone."""
    seg = bpe.BpeSegmenter(bpe_path)
    row = windows(genome, 1, 120, seed=3)[0]
    row[60] = vocab.MASK
    a = seg(row)
    changed = row.copy()
    changed[61:80] = vocab.COMPLEMENT[changed[61:80]]  # another run after the [MASK]
    b = seg(changed)
    np.testing.assert_array_equal(a[:61], b[:61])  # the run before the [MASK] is cut the same way
    assert a[60] == 0
    # after MLM masking the segmentation sees only the input: two windows equal outside the
    # masked positions get the same units
    ids, labels = mask_tokens(row, np.random.default_rng(0), mask_prob=0.3, mask_token_frac=1.0,
                              random_token_frac=0.0)
    other = row.copy()
    hidden = labels != vocab.IGNORE_LABEL
    other[hidden] = vocab.COMPLEMENT[other[hidden]]
    ids2, _ = mask_tokens(other, np.random.default_rng(0), mask_prob=0.3, mask_token_frac=1.0,
                          random_token_frac=0.0)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(seg(ids), seg(ids2))


def test_long_tokens_are_split(tmp_path):
    """A vocabulary with tokens over the experts' maximum (here a BPE trained without the cap)
    is cut into pieces of at most max_unit_length."""
    path = tmp_path / "long.json"
    bpe.train_bpe(["ACGTTGCA" * 64] * 4, 40, path, max_token_length=64)
    assert max(map(len, json.loads(path.read_text())["model"]["vocab"])) > 10
    row = np.concatenate([[vocab.CLS], vocab.nucleotides_to_ids("ACGTTGCA" * 8), [vocab.SEP]]).astype(np.int32)
    units = bpe.BpeSegmenter(path, max_unit_length=10)(row)
    bpe.check_units(units, row, 10)
    assert units.max() == 9  # the long merges were cut into 10-nt pieces
    with pytest.raises(ValueError, match=r"unit of \d\d nt at \d+ \(max 10\)"):
        bpe.check_units(bpe.BpeSegmenter(path, max_unit_length=64)(row), row, 10)


def test_unit_length_histogram_is_sane(genome, bpe_path):
    seg = bpe.BpeSegmenter(bpe_path)
    ids = np.stack(windows(genome, 16, 510, seed=4))
    hist = bpe.unit_length_histogram(seg(ids))
    lengths = np.arange(1, bpe.MAX_TOKEN_LENGTH + 1)
    mean = (hist * lengths).sum() / hist.sum()
    assert (hist * lengths).sum() == 16 * 510  # every nucleotide in exactly one unit
    assert 2.0 < mean < 6.0, (mean, hist)  # a 128-merge vocabulary: ~3 nt per unit
    # MLM masking shortens the units ([MASK]s are single units, runs between them are short)
    masked = np.stack([mask_tokens(r, np.random.default_rng(i), mask_prob=0.15, mask_token_frac=0.8,
                                   random_token_frac=0.1)[0] for i, r in enumerate(ids)])
    h_m = bpe.unit_length_histogram(seg(masked))
    assert 1.0 < (h_m * lengths).sum() / h_m.sum() < mean


@nnx.jit(static_argnames=("token_capacity",))
def forward(m, ids, am, units, token_capacity=None):
    return m(ids, am, token_capacity=token_capacity, units=units)


def test_bpe_model_embeds_the_given_units(genome, bpe_path):
    seg = bpe.BpeSegmenter(bpe_path)
    rows = windows(genome, 3, 60, seed=5) + windows(genome, 1, 11, seed=6)
    rows[0][7] = vocab.MASK
    b = vocab.batch_from_ids(rows, pad_to=64)
    ids, am = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    units = jnp.asarray(seg(b["input_ids"]))
    cfg = ModelConfig(**TINY, tokenizer="bpe", mode="original")
    m = MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(0))
    params = {p[2:] for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param)) if p[:2] == ("model", "tokenization")}
    assert ("gate",) not in params and ("expert_pre",) in params and ("deform", "kernel") in params
    out = forward(m, ids, am, units)
    bb = out.backbone
    np.testing.assert_array_equal(np.asarray(bb.center), np.asarray(units))
    _, tap = unit_layout(bb.center, bb.all)
    assert ((np.asarray(tap) >= 0) == (np.asarray(units_cover(units)))).all()
    n_units = (np.asarray(units) >= 0).sum(1)
    np.testing.assert_array_equal(np.asarray(bb.token_mask).sum(1), n_units + 2)
    sm = np.isin(b["input_ids"], vocab.SPECIAL_IDS)
    np.testing.assert_array_equal(np.asarray(extract_tokens(bb, jnp.asarray(sm)).mask).sum(1), n_units)
    assert float(out.aux_loss) == 0.0 and bb.router_logits is None
    assert np.isfinite(np.asarray(out.logits)).all()
    # compact == original at a capacity that holds the tokens
    mc = MxDNAForMaskedLM(cfg.replace(mode="compact"), rngs=nnx.Rngs(0))
    comp = forward(mc, ids, am, units, token_capacity=48)
    assert not bool(comp.overflow)
    valid = np.asarray(am, bool)
    np.testing.assert_allclose(np.asarray(comp.logits)[valid], np.asarray(out.logits)[valid], atol=1e-5)
    # another segmentation gives other outputs; no segmentation is an error naming the fix
    shifted = jnp.asarray(bpe.BpeSegmenter(bpe_path, max_unit_length=1)(b["input_ids"]))
    assert np.abs(np.asarray(forward(m, ids, am, shifted).logits) - np.asarray(out.logits)).max() > 1e-4
    with pytest.raises(ValueError, match="tokenizer='bpe' needs its units"):
        m(ids, am)
    # the other tokenizers ignore `units`, so callers may always pass batch.get("units")
    learnt = MxDNAForMaskedLM(ModelConfig(**TINY, mode="original"), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(learnt(ids, am, units=units).logits),
                                  np.asarray(learnt(ids, am).logits))
    # gradients reach the experts through the given units
    grads = nnx.grad(lambda m: m(ids, am, units=units).logits[valid].sum())(m)
    g = dict(nnx.to_flat_state(grads))
    assert np.abs(np.asarray(g[("model", "tokenization", "expert_post")][...])).max() > 0


def units_cover(units):
    return np.asarray(all_from_center(jnp.asarray(units))) >= 0


def test_with_units_objective_adds_the_encoding_after_masking(genome, bpe_path):
    seg = bpe.BpeSegmenter(bpe_path)
    obj = bpe.WithUnits(MLM(), seg)
    assert (obj.name, obj.head) == ("mlm", "mlm")
    tokens = windows(genome, 1, 100, seed=7)[0]
    ex = obj.example(tokens, np.random.default_rng(0))
    ref = MLM().example(tokens, np.random.default_rng(0))
    for k, v in ref.items():
        np.testing.assert_array_equal(ex[k], v)
    np.testing.assert_array_equal(ex["units"], seg(ex["input_ids"]))
    assert (ex["units"][ex["input_ids"] == vocab.MASK] == 0).all()
    again = pickle.loads(pickle.dumps(obj)).example(tokens, np.random.default_rng(0))
    np.testing.assert_array_equal(again["units"], ex["units"])


def test_wrap_objective(bpe_path):
    mlm = MLM()
    assert bpe.wrap_objective(mlm, ModelConfig(), None) is mlm  # not bpe: unchanged
    w = bpe.wrap_objective(mlm, ModelConfig(tokenizer="bpe", expert_kernel_sizes=(1, 2, 3, 4, 5, 6)), bpe_path)
    assert isinstance(w, bpe.WithUnits) and w.objective is mlm and w.segmenter.max_unit_length == 6
    with pytest.raises(FileNotFoundError, match="bpe_tokenizer.json"):
        bpe.wrap_objective(mlm, ModelConfig(tokenizer="bpe"), None)
    # the model config may name the file (ModelConfig.bpe_path)
    w = bpe.wrap_objective(mlm, ModelConfig(tokenizer="bpe", bpe_path=str(bpe_path)))
    assert w.segmenter.json == bpe_path.read_text()
    with pytest.raises(ValueError, match="bpe_path must be a string"):
        ModelConfig(bpe_path=None)
