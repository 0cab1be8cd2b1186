"""BPE baseline (the paper's Table 3): a fixed, host-side segmentation behind the same backbone.

DNABERT-2 tokenizes DNA with byte-pair encoding (HF `tokenizers`, vocabulary 4096) trained on its
pretraining corpus. Here BPE only decides *where the units are*; the model embeds them exactly
as it embeds MxDNA's learnt units (units.py: the conv expert of the unit's length, the deformable
assembly, each switchable). The BPE vocabulary identity of a unit is not an input: two units of
the same length go through the same expert, as two learnt units do. That is the fair
comparison: BPE and MxDNA differ only in how the sequence is cut, not in the embedding
machinery or the parameter count (the bpe model has the learnt one's params minus the gate).

Pieces:
  train_bpe(corpus, vocab_size=4096, path)  HF BPE trained on nucleotide strings (ACGT only; runs
                                            between N's, chunked), tokens at most 10 nt; saves the
                                            tokenizer JSON.
  BpeSegmenter(path)                        host-side (picklable, for Grain workers): nucleotide ids
                                            (B, L) or (L,) -> the unit encoding (same shape, int32).
  WithUnits(objective, segmenter)           an objective whose example transform also adds
                                            batch["units"] (after the MLM masking).
  BpeTokenization                           the model side (`tokenizer="bpe"`): reads the encoding
                                            from `model(..., units=batch["units"])`.

The unit encoding is the NMS `center` encoding (tokenizers/base.py): unit length - 1 at each
unit's centre row (start + length // 2), -1 elsewhere; [CLS], [SEP] and padding are never
covered, every other row exactly once. Unit lengths are 1..E (E = cfg.num_experts = 10):
the trainer caps tokens at `max_token_length=10`, and a loaded vocabulary with longer tokens is
split into pieces of at most E (left to right, E nt each, the remainder last).

[MASK], N ([UNK]) and any other non-nucleotide id are single-nucleotide units, and BPE runs on
each maximal run of A/C/G/T between them (and between [CLS]/[SEP]). The segmentation is a
function of the model's *input* ids, after the MLM masking, so it never sees a masked
nucleotide: no leak of masked identities through unit boundaries (segmenting the unmasked
window would leak them: a boundary or a 10-nt unit across a masked position tells which letters
are there). Its cost: masking changes the segmentation around the masked positions (runs of
~1 / (0.15 * 0.8) = 8 nt between [MASK]s at DNABERT masking rates), so pretraining windows are
cut into shorter units than the same windows at fine-tuning. The 10% randomly replaced and
10% kept positions are ordinary letters to BPE (the model cannot tell them apart either).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from mxdna_jax import vocab
from mxdna_jax.layers import LayerNorm
from mxdna_jax.ops.nms import all_from_center
from mxdna_jax.tokenizers.base import zero_aux_loss
from mxdna_jax.tokenizers.units import Units, UnitTokenizer

DEFAULT_VOCAB_SIZE = 4096  # DNABERT-2's
MAX_TOKEN_LENGTH = 10  # = the number of experts (kernels 1..10) of the default model
BPE_FILENAME = "bpe_tokenizer.json"  # next to the checkpoint: <workdir>/bpe_tokenizer.json
DEFAULT_CHUNK_LENGTH = 1000  # training "words": BPE merges never cross a chunk boundary

_LETTER = np.zeros(vocab.VOCAB_SIZE, np.uint8)
_LETTER[[vocab.A, vocab.T, vocab.C, vocab.G]] = np.frombuffer(b"ATCG", np.uint8)
_NUCLEOTIDES = np.asarray(vocab.NUCLEOTIDE_IDS)
_SPECIAL = np.asarray(vocab.SPECIAL_IDS)


# ----------------------------------------------------------------------------- model side


class BpeTokenization(UnitTokenizer):
    """Units given by a host-side segmentation (`units_BL`, the NMS centre encoding), embedded by the
    same unit body as the learnt layer: conv experts for lengths 1..E (weight 1, no router) and the
    deformable assembly, each switchable. No router: no jitter, aux loss 0, router_logits None."""

    needs_units = True

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        self.input_norm = (LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, dtype=dtype)
                           if cfg.experts else None)
        self._init_body(cfg, cfg.expert_kernel_sizes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def select(self, x_BLD, attention_mask_BL, special_BL, jitter_BLD, units_BL=None) -> Units:
        if units_BL is None:
            raise ValueError("tokenizer='bpe' needs its units: call the model with units=batch['units'] "
                             "(BpeSegmenter(<workdir>/bpe_tokenizer.json)(input_ids))")
        if units_BL.shape != attention_mask_BL.shape:
            raise ValueError(f"units has shape {units_BL.shape}, input_ids {attention_mask_BL.shape}")
        center = units_BL.astype(jnp.int32)
        return Units(center, all_from_center(center, self.kernel_sizes), None, None, zero_aux_loss())


# ----------------------------------------------------------------------------- training


def _chunks(run: str, n: int) -> Iterator[str]:
    for i in range(0, len(run), n):
        yield run[i: i + n]


def _is_path_like(x) -> bool:
    return isinstance(x, (str, os.PathLike)) and os.path.isfile(x)


def corpus_pieces(corpus, chunk_length: int = DEFAULT_CHUNK_LENGTH) -> Iterator[str]:
    """The training words: maximal A/C/G/T runs of the corpus (N and other codes split them),
    cut into chunks of `chunk_length`.

    `corpus`: a data.fasta.Genome, a FASTA path or a list of FASTA paths (all existing files), or
    an iterable of nucleotide strings (case-insensitive).
    """
    from mxdna_jax.data.fasta import Genome, open_genome

    if isinstance(corpus, Genome) or _is_path_like(corpus) or (
            isinstance(corpus, (list, tuple)) and corpus and all(_is_path_like(p) for p in corpus)):
        genome = open_genome(corpus)
        for r in range(genome.num_records):
            ids = np.asarray(genome.record(r))
            is_nt = np.isin(ids, _NUCLEOTIDES)
            text = _LETTER[np.where(is_nt, ids, 0)].tobytes().decode("ascii")
            starts, ends = _runs(is_nt)
            for s, e in zip(starts, ends):
                yield from _chunks(text[s:e], chunk_length)
        return
    if isinstance(corpus, (str, bytes)):
        raise TypeError("train_bpe: a string corpus must be an existing FASTA path; wrap sequences in a list")
    for seq in corpus:
        for run in re.split(r"[^ACGT]+", str(seq).upper()):
            yield from _chunks(run, chunk_length)


def train_bpe(corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, path=None, *, max_token_length: int = MAX_TOKEN_LENGTH,
              chunk_length: int = DEFAULT_CHUNK_LENGTH, min_frequency: int = 0):
    """Train HF BPE on a nucleotide corpus (see `corpus_pieces`); save its JSON at `path` (if given).

    The alphabet is A/C/G/T (always in the vocabulary), no special tokens (the segmenter never
    shows BPE anything else), tokens at most `max_token_length` nt. Returns the HF Tokenizer.
    """
    from tokenizers import Tokenizer, models, trainers

    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (the alphabet), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  max_token_length=int(max_token_length), initial_alphabet=list("ACGT"),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(corpus_pieces(corpus, chunk_length), trainer)
    if path is not None:
        _atomic_write(pathlib.Path(path), tok.to_str())
    return tok


def _atomic_write(path: pathlib.Path, text: str) -> None:
    """Write via a unique temporary file + rename: concurrent writers (processes of one run, each
    training the same deterministic BPE) never see or leave a partial file."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def ensure_tokenizer(workdir, corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, *, source=None) -> pathlib.Path:
    """`<workdir>/bpe_tokenizer.json`: kept if present (a resumed run), else copied from `source`
    (a JSON, or a workdir holding one: fine-tuning from a BPE pretraining run), else trained on
    `corpus` (BPE training is deterministic, so every process of a run may call it: they write the
    same file). Call it before the data pipeline starts."""
    path = pathlib.Path(workdir) / BPE_FILENAME
    if path.exists():
        return path
    if source:
        src = pathlib.Path(source)
        src = src / BPE_FILENAME if src.is_dir() else src
        if not src.is_file():
            raise FileNotFoundError(f"no BPE tokenizer at {src}")
        _atomic_write(path, src.read_text())
        return path
    train_bpe(corpus, vocab_size, path)
    return path


# ----------------------------------------------------------------------------- segmentation


def _runs(mask_L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (exclusive) of the maximal True runs of a 1-d bool array."""
    d = np.diff(np.concatenate([[0], mask_L.astype(np.int8), [0]]))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def _split_long(starts: np.ndarray, lengths: np.ndarray, max_len: int):
    """Tokens longer than `max_len` cut left to right into pieces of max_len (the remainder last)."""
    if lengths.size == 0 or lengths.max() <= max_len:
        return starts, lengths
    s_out, l_out = [], []
    for s, n in zip(starts.tolist(), lengths.tolist()):
        while n > max_len:
            s_out.append(s)
            l_out.append(max_len)
            s, n = s + max_len, n - max_len
        s_out.append(s)
        l_out.append(n)
    return np.asarray(s_out, np.int64), np.asarray(l_out, np.int64)


class BpeSegmenter:
    """Nucleotide ids -> the BPE unit encoding (module docstring). Picklable: it carries the
    tokenizer JSON and rebuilds the HF tokenizer lazily in each process."""

    def __init__(self, path_or_json, *, max_unit_length: int = MAX_TOKEN_LENGTH):
        text = str(path_or_json)
        if not text.lstrip().startswith("{"):
            text = pathlib.Path(path_or_json).read_text()
        self.json = text
        self.max_unit_length = int(max_unit_length)
        self._tok = None
        _ = self.tokenizer  # fail here, not in a worker, on a bad file

    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self.json)
        return self._tok

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self.json, "max_unit_length": self.max_unit_length}

    def __setstate__(self, state):
        self.json, self.max_unit_length, self._tok = state["json"], state["max_unit_length"], None

    def units(self, ids_L) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of one row's units, in order."""
        ids = np.asarray(ids_L)
        is_nt = np.isin(ids, _NUCLEOTIDES)
        single = np.flatnonzero(~is_nt & ~np.isin(ids, _SPECIAL))  # [MASK], N, any other id
        r_start, r_end = _runs(is_nt)
        starts, lengths = [single], [np.ones_like(single)]
        if r_start.size:
            text = _LETTER[np.where(is_nt, ids, 0)].tobytes().decode("ascii")
            words = [text[s:e] for s, e in zip(r_start, r_end)]
            enc = self.tokenizer.encode(words, is_pretokenized=True)
            word = np.asarray(enc.word_ids, np.int64)
            off = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
            t_len = off[:, 1] - off[:, 0]
            covered = np.bincount(word, weights=t_len, minlength=len(words)) if word.size else np.zeros(len(words))
            if not np.array_equal(covered, r_end - r_start):
                raise ValueError("the BPE vocabulary does not cover every nucleotide run (is A/C/G/T in it?)")
            s, n = _split_long(r_start[word] + off[:, 0], t_len, self.max_unit_length)
            starts.append(s)
            lengths.append(n)
        starts, lengths = np.concatenate(starts), np.concatenate(lengths)
        order = np.argsort(starts, kind="stable")
        return starts[order], lengths[order]

    def encode_row(self, ids_L) -> np.ndarray:
        ids = np.asarray(ids_L)
        out = np.full(ids.shape, -1, np.int32)
        starts, lengths = self.units(ids)
        out[starts + lengths // 2] = lengths - 1
        return out

    def __call__(self, input_ids) -> np.ndarray:
        """(L,) or (B, L) ids -> the same shape of int32 unit encoding."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            return self.encode_row(ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (L,) or (B, L), got shape {ids.shape}")
        return np.stack([self.encode_row(r) for r in ids]) if len(ids) else np.zeros(ids.shape, np.int32)


def check_units(center_BL, input_ids_BL, max_unit_length: int = MAX_TOKEN_LENGTH) -> None:
    """Raise unless the encoding covers every non-special row exactly once with units of 1..max
    (and nothing at [CLS]/[SEP]/[PAD])."""
    center, ids = np.atleast_2d(np.asarray(center_BL)), np.atleast_2d(np.asarray(input_ids_BL))
    for b in range(center.shape[0]):
        cover = np.zeros(center.shape[1], np.int64)
        for p in np.flatnonzero(center[b] >= 0):
            n = int(center[b, p]) + 1
            if n > max_unit_length:
                raise ValueError(f"row {b}: unit of {n} nt at {p} (max {max_unit_length})")
            s = p - n // 2
            if s < 0 or s + n > center.shape[1]:
                raise ValueError(f"row {b}: unit at {p} of {n} nt runs off the row")
            cover[s: s + n] += 1
        want = (~np.isin(ids[b], _SPECIAL)).astype(np.int64)
        if not np.array_equal(cover, want):
            bad = int(np.flatnonzero(cover != want)[0])
            raise ValueError(f"row {b}: position {bad} covered {cover[bad]} times, expected {want[bad]}")


# ----------------------------------------------------------------------------- the data side


@dataclasses.dataclass(frozen=True)
class WithUnits:
    """An objective whose example transform also adds `units` (the BPE encoding of the example's
    final `input_ids`, i.e. after masking); the loss is the objective's (it must pass
    `units=batch.get("units")` to the model). Picklable (Grain workers)."""

    objective: Any
    segmenter: BpeSegmenter

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def head(self) -> str:
        return self.objective.head

    def example(self, tokens_L, rng, label=None) -> dict[str, np.ndarray]:
        out = self.objective.example(tokens_L, rng, label)
        out["units"] = self.segmenter(out["input_ids"])
        return out

    def loss(self, model, batch, rng, *, token_capacity=None):
        return self.objective.loss(model, batch, rng, token_capacity=token_capacity)


def unit_length_histogram(center, max_len: int = MAX_TOKEN_LENGTH) -> np.ndarray:
    """Counts of units of length 1..max_len in an encoding (host-side)."""
    c = np.asarray(center)
    return np.bincount(c[c >= 0].ravel() + 1, minlength=max_len + 1)[1: max_len + 1]



def wrap_objective(objective, model_config, path=None):
    """`objective` itself unless `model_config.tokenizer == 'bpe'`; then WithUnits around it, segmenting
    with the BPE JSON at `path` (default: `model_config.bpe_path`; units of at most num_experts nt)."""
    if model_config.tokenizer != "bpe":
        return objective
    path = path or model_config.bpe_path or None
    if path is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"tokenizer='bpe' needs its BPE tokenizer file ({BPE_FILENAME}); got {path!r}")
    return WithUnits(objective, BpeSegmenter(path, max_unit_length=model_config.num_experts))
