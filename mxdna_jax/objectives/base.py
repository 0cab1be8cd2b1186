"""What an objective is: the example transform it applies to each host-side example, the loss
it optimises, and the model head it needs. train.py and eval.py pick one by name from the
config (`config.objective`) and never ask which one they have.

Contract of `loss(model, batch, rng, *, token_capacity) -> (loss, metrics)` (train_lib's):
- `rng`: a typed PRNG key in training (router jitter), None in eval (deterministic).
- `metrics`: scalars; `overflow` (bool) says the compact capacity was too small (the host
  re-runs the call larger), `loss_weight` averages micro-batches and eval batches.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np


class Objective(Protocol):
    name: str
    head: str  # the model head it trains: one of mxdna_jax.heads.HEAD_NAMES

    def example(self, tokens_L: np.ndarray, rng: np.random.Generator, label: Any = None) -> dict[str, np.ndarray]:
        """One encoded sequence ([CLS] ... [SEP], int32, right-padded with [PAD] for barcodes) -> the
        example dict the loss reads."""

    def loss(self, model, batch: dict[str, jax.Array], rng, *, token_capacity: int | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        ...
