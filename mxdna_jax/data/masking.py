"""BERT/DNABERT-style masked-LM corruption in pure numpy.

Semantics follow the HF `DataCollatorForLanguageModeling` used by MxDNA/DNABERT pretraining:
each eligible position is selected independently with probability `mask_prob`; of the
selected, `mask_token_frac` become [MASK], `random_token_frac` a random nucleotide (which may
equal the original, as in BERT) and the rest stay unchanged. Only A/C/G/T positions are
eligible: specials carry no information and [UNK] (N, IUPAC) has no defined target.
"""

from __future__ import annotations

import numpy as np

from mxdna_jax import vocab

_NUC = np.asarray(vocab.NUCLEOTIDE_IDS, dtype=np.int32)
# A, T, C, G are consecutive ids, so eligibility is a range test (np.isin costs ~30 us a call).
_LO, _HI = int(_NUC.min()), int(_NUC.max())
assert _HI - _LO + 1 == _NUC.size


def mask_tokens(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_prob: float = 0.15,
    mask_token_frac: float = 0.8,
    random_token_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt `input_ids` (..., L); returns (masked input_ids, labels), both int32.

    labels hold the original id at selected positions and vocab.IGNORE_LABEL elsewhere. Every row
    with at least one eligible position gets at least one selected position, so a short
    window never yields a loss with an empty denominator.
    """
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    if mask_token_frac < 0 or random_token_frac < 0 or mask_token_frac + random_token_frac > 1:
        raise ValueError(
            f"need mask_token_frac, random_token_frac >= 0 with sum <= 1, got {mask_token_frac}, {random_token_frac}"
        )
    ids = np.asarray(input_ids, dtype=np.int32)
    if ids.ndim == 0:
        raise ValueError("input_ids must have a length axis")
    shape = ids.shape
    ids2 = ids.reshape(-1, shape[-1])
    eligible = (ids2 >= _LO) & (ids2 <= _HI)
    selected = eligible & (rng.random(ids2.shape) < mask_prob)

    # Rows with eligible positions but nothing drawn: select one eligible position at random.
    empty = eligible.any(axis=1) & ~selected.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        keys = np.where(eligible[rows], rng.random((rows.size, ids2.shape[1])), -1.0)
        selected[rows, keys.argmax(axis=1)] = True

    # One uniform per position decides MASK / random / keep, so the split is exact in expectation.
    action = rng.random(ids2.shape)
    to_mask = selected & (action < mask_token_frac)
    to_random = selected & (action >= mask_token_frac) & (action < mask_token_frac + random_token_frac)
    out = ids2.copy()
    out[to_mask] = vocab.MASK
    out[to_random] = _NUC[rng.integers(0, _NUC.size, size=int(to_random.sum()))]
    labels = np.where(selected, ids2, vocab.IGNORE_LABEL).astype(np.int32)
    return out.reshape(shape), labels.reshape(shape)
