"""Training objectives, by the name `config.objective` uses. To add one: a picklable class with
`name`, `head`, `example(tokens_L, rng, label)`, `loss(model, batch, rng, *, token_capacity)`
and `from_config(config)` (see base.py), registered below."""

from __future__ import annotations

from mxdna_jax.objectives.base import Objective
from mxdna_jax.objectives.classification import Classification
from mxdna_jax.objectives.mae import MAE
from mxdna_jax.objectives.mlm import MLM

OBJECTIVES = {"mlm": MLM, "mae": MAE, "classification": Classification}


def get(name: str, config) -> Objective:
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}") from None
    return cls.from_config(config)


__all__ = ["OBJECTIVES", "Objective", "get"]
