"""Nucleotide vocabulary of the official MxDNA (one id per nucleotide) and encoding.

The ids are those of the official `1mertokenizer`:
[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 A=5 T=6 C=7 G=8.
Encoding uses a 256-entry lookup table so a megabase converts in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
A, T, C, G = 5, 6, 7, 8
VOCAB_SIZE = 9
TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "T", "C", "G")
NUCLEOTIDE_IDS = (A, T, C, G)
SPECIAL_IDS = (PAD, CLS, SEP)  # what the tokenizer flags in special_tokens_mask
# Label of positions that are not predicted (the optax/PyTorch convention); the one definition.
IGNORE_LABEL = -100

# IUPAC ambiguity codes (and N) are real sequence content of unknown identity: [UNK].
AMBIGUOUS = "NRYSWKMBDHV"

_INVALID = -1
LOOKUP = np.full(256, _INVALID, dtype=np.int32)
for _ch, _id in (("A", A), ("T", T), ("C", C), ("G", G)):
    LOOKUP[ord(_ch)] = _id
    LOOKUP[ord(_ch.lower())] = _id
for _ch in AMBIGUOUS:
    LOOKUP[ord(_ch)] = UNK
    LOOKUP[ord(_ch.lower())] = UNK

_DECODE = np.array(["-", "N", "^", "$", "?", "A", "T", "C", "G"])

# Reverse complement in id space: A<->T, C<->G, everything else unchanged.
COMPLEMENT = np.arange(VOCAB_SIZE, dtype=np.int32)
COMPLEMENT[[A, T, C, G]] = [T, A, G, C]


def nucleotides_to_ids(seq: str | bytes, *, name: str = "sequence") -> np.ndarray:
    """Map nucleotide characters to ids (no [CLS]/[SEP]).

    Accepts upper and lower case; N and IUPAC ambiguity codes give [UNK]. Any other
    character raises a ValueError naming the character and its (0-based) position.
    """
    raw = seq.encode("ascii", errors="replace") if isinstance(seq, str) else bytes(seq)
    if isinstance(seq, str) and not seq.isascii():
        pos = next(i for i, ch in enumerate(seq) if not ch.isascii())
        raise ValueError(f"{name}: invalid character {seq[pos]!r} at position {pos}; expected A/C/G/T/N or IUPAC codes")
    ids = LOOKUP[np.frombuffer(raw, dtype=np.uint8)]
    bad = np.flatnonzero(ids == _INVALID)
    if bad.size:
        pos = int(bad[0])
        raise ValueError(
            f"{name}: invalid character {chr(raw[pos])!r} at position {pos}; expected A/C/G/T/N or IUPAC codes"
        )
    return ids


def _check_sequence(seq, name: str = "sequence") -> None:
    if not isinstance(seq, (str, bytes, bytearray)):
        raise TypeError(f"{name} is {type(seq).__name__}, expected str or bytes")


def encode(seq: str | bytes, *, max_length: int | None = None) -> np.ndarray:
    """[CLS] ids [SEP] for one sequence; `max_length` bounds the total (with specials)."""
    _check_sequence(seq)
    if len(seq) == 0:
        raise ValueError("empty sequence: MxDNA needs at least one nucleotide between [CLS] and [SEP]")
    if max_length is not None and len(seq) + 2 > max_length:
        raise ValueError(
            f"sequence of {len(seq)} nt is too long: {len(seq) + 2} tokens with [CLS]/[SEP] "
            f"exceed max_length={max_length}"
        )
    ids = nucleotides_to_ids(seq)
    return np.concatenate([[CLS], ids, [SEP]]).astype(np.int32)


def batch_from_ids(rows: Sequence[np.ndarray], *, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad already-encoded rows ([CLS] ... [SEP]) into model inputs."""
    if not rows:
        raise ValueError("empty batch")
    length = max(len(r) for r in rows)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({length} tokens)")
        length = pad_to
    input_ids = np.full((len(rows), length), PAD, dtype=np.int32)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
    return make_masks(input_ids)


def make_masks(input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """attention_mask (1 from [CLS] to [SEP]) and special_tokens_mask (1 at [CLS], [SEP], [PAD]).

    [MASK] and [UNK] are ordinary positions, as in the official tokenizer.
    """
    input_ids = np.asarray(input_ids, dtype=np.int32)
    attention_mask = (input_ids != PAD).astype(np.int32)
    special = np.isin(input_ids, SPECIAL_IDS).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "special_tokens_mask": special}


def encode_batch(
    seqs: Sequence[str], *, max_length: int | None = None, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Encode strings into right-padded `input_ids`, `attention_mask`, `special_tokens_mask`.

    `pad_to` fixes the padded length (static shapes under jit); by default the longest row.
    """
    if isinstance(seqs, (str, bytes, bytearray)):
        # A str is a sequence of 1-nt strings: encoding it would silently give one row per letter.
        raise TypeError(f"encode_batch expects a sequence of sequences; got a {type(seqs).__name__} "
                        "(wrap one sequence in a list)")
    rows = []
    for i, s in enumerate(seqs):
        _check_sequence(s, f"sequence {i}")
        try:
            rows.append(encode(s, max_length=max_length))
        except ValueError as e:
            raise ValueError(f"batch element {i}: {e}") from None
    return batch_from_ids(rows, pad_to=pad_to)


def decode(ids: np.ndarray, *, strip_special: bool = True) -> str:
    """Ids back to letters ([UNK] -> N). Specials are dropped unless strip_special=False."""
    ids = np.asarray(ids)
    if strip_special:
        ids = ids[~np.isin(ids, (PAD, CLS, SEP))]
    return "".join(_DECODE[ids])


def reverse_complement_ids(ids: np.ndarray) -> np.ndarray:
    """Reverse complement of nucleotide ids (no specials)."""
    return COMPLEMENT[np.asarray(ids)[::-1]]
