"""A trained model with the head an evaluation needs, from any trained-model path."""

from __future__ import annotations

from flax import nnx

from mxdna_jax import heads, params_io


def load_model(source: str, head: str = "tokens"):
    """`head` model from a train.py workdir (newest verified step), a step dir, a params dir or
    official weights (.safetensors/.npz with config.json beside). Parameters the source lacks
    (e.g. a classifier head) are fresh and logged. Official weights load batch-independent (a
    sequence's outputs never depend on its batch-mates, quirk Q2), in compact mode."""
    kind = params_io.source_kind(source)
    if kind == "official":
        from mxdna_jax import convert

        return convert.from_official(source, head=head, mode="compact", batch_independent=True)
    model = params_io.load_any(source, head=head).model
    if heads.head_name(model) != head:  # a params dir saved with another head
        other = heads.build_model(model.cfg, head)
        params_io.load_matching(other, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        model = other
    return model


def source_model_config(source: str):
    """The ModelConfig a trained-model path was trained with (what a warm start must build)."""
    import json
    import pathlib

    from mxdna_jax.config import ModelConfig

    kind = params_io.source_kind(source)
    src = pathlib.Path(source).absolute()
    if kind == "official":
        from mxdna_jax import convert

        return ModelConfig.from_official(convert._official_config(src, None), mode="compact", batch_independent=True)
    if kind == "params_dir":
        return ModelConfig.from_dict(json.loads((src / "model_config.json").read_text())["model"])
    return params_io.workdir_model_config(src if kind == "workdir" else src.parent.parent)
