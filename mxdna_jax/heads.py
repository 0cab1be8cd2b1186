"""The one registry of model heads: name -> NNX class. Objectives, checkpoints (params_io),
conversion and eval.py name heads with these keys."""

from __future__ import annotations

from flax import nnx

from mxdna_jax.config import ModelConfig


def _classes():
    from mxdna_jax import model as m  # late: model imports layers/tokenizers (heavy)

    return {"mlm": m.MxDNAForMaskedLM, "cls": m.MxDNAForSequenceClassification, "tokens": m.MxDNAForTokenExtraction,
            "mae": m.MxDNAForMAE}


HEAD_NAMES = ("mlm", "cls", "tokens", "mae")


def head_class(head: str):
    classes = _classes()
    if head not in classes:
        raise ValueError(f"head must be one of {list(classes)}, got {head!r}")
    return classes[head]


def build_model(cfg: ModelConfig, head: str = "mlm", *, rngs: nnx.Rngs | None = None, seed: int = 0):
    """A model with head `head` (fresh params from `rngs`, or `nnx.Rngs(params=seed)`)."""
    return head_class(head)(cfg, rngs=rngs if rngs is not None else nnx.Rngs(params=seed))


def head_name(model) -> str:
    """The registry key of a model instance."""
    for name, cls in _classes().items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered head")
