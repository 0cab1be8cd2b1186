"""One function from a config to what a run needs: the model (its config and head), the
objective (example transform + loss) and the compact-capacity policy — nanodo's
`get_model_and_loss`. train.py, eval.py, the benchmarks and the tests all build through it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from mxdna_jax import cli, heads, objectives
from mxdna_jax.capacity import CapacityPolicy
from mxdna_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Experiment:
    model_config: ModelConfig
    objective: objectives.Objective
    seed: int = 0
    capacity_growth: float = 1.5
    # the capacity follows the token counts (capacity.CapacityTracker): train.capacity_* fields
    capacity_adaptive: bool = True
    capacity_margin: float = 0.05
    capacity_patience: int = 10
    capacity_bucket_step: float = 0.0625
    capacity_min_remaining: int = 100
    # host-side unit encoding for tokenizers that take their units as an input (bpe): ids -> units
    segmenter: Any = None

    @property
    def head(self) -> str:
        return self.objective.head

    def model_ctor(self):
        """A no-argument constructor (train_lib builds it abstractly and inside jit)."""
        return functools.partial(heads.build_model, self.model_config, self.head, seed=self.seed)

    def loss_fn(self, model, batch, rng, *, token_capacity=None):
        return self.objective.loss(model, batch, rng, token_capacity=token_capacity)

    def add_units(self, batch: dict) -> dict:
        """`batch` with the unit encoding a host-segmented tokenizer needs (batches that did not
        come through `objective.example`, e.g. labelled tasks); unchanged for the others."""
        if self.segmenter is None:
            return batch
        return dict(batch, units=self.segmenter(batch["input_ids"]))

    def capacity(self, length: int) -> CapacityPolicy:
        """The token-capacity policy at padded length `length` (incl. [CLS]/[SEP])."""
        return CapacityPolicy.for_model(self.model_config, length, growth=self.capacity_growth,
                                        adaptive=self.capacity_adaptive, margin=self.capacity_margin,
                                        patience=self.capacity_patience, bucket_step=self.capacity_bucket_step,
                                        min_remaining=self.capacity_min_remaining)


def model_config(config) -> ModelConfig:
    try:
        return ModelConfig.from_dict(dict(config.model))
    except (TypeError, ValueError) as e:
        raise cli.UserError(f"model config: {cli.one_line(e)}") from None


def build(config, *, bpe_path: str | None = None) -> Experiment:
    """The experiment a train.py-shaped ConfigDict describes (UserError naming a bad field).
    `bpe_path`: the BPE tokenizer JSON of a `tokenizer='bpe'` model (default model.bpe_path)."""
    name = str(config.get("objective", "mlm"))
    try:
        objective = objectives.get(name, config)
    except ValueError as e:
        raise cli.UserError(f"objective: {cli.one_line(e)}") from None
    mc = model_config(config)
    segmenter = None
    if mc.tokenizer == "bpe":
        from mxdna_jax.tokenizers import bpe

        try:
            objective = bpe.wrap_objective(objective, mc, bpe_path)
        except (ValueError, OSError) as e:
            raise cli.UserError(f"model.tokenizer='bpe': {cli.one_line(e)}") from None
        segmenter = objective.segmenter
    t = config.train
    return Experiment(mc, objective, seed=int(t.seed), capacity_growth=float(t.get("capacity_growth", 1.5)),
                      capacity_adaptive=bool(t.get("capacity_adaptive", True)),
                      capacity_margin=float(t.get("capacity_margin", 0.05)),
                      capacity_patience=int(t.get("capacity_patience", 10)),
                      capacity_bucket_step=float(t.get("capacity_bucket_step", 0.0625)),
                      capacity_min_remaining=int(t.get("capacity_min_remaining", 100)), segmenter=segmenter)
