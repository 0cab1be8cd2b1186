"""Official MxDNA weights (PyTorch state-dict names and layouts) <-> our NNX params.

    python -m mxdna_jax.convert check FIXTURE.npz [--mode compact]  # parity report
    python -m mxdna_jax.convert import ckpt/model.safetensors OUT    # official weights -> Orbax params dir
    python -m mxdna_jax.convert export SOURCE out/model.safetensors  # ours -> official names + config.json

`export` SOURCE: a params dir written by `import`, a train.py workdir (its newest verified
checkpoint) or one of its step directories (WORKDIR/checkpoints/STEP). Exit codes: 0 success;
1 `check` found keys over tolerance; 2 bad input (an unreadable or incomplete fixture, a missing
or damaged checkpoint, an existing output), one `error:` line and nothing written.

This module is the conversion library; the command line lives in `mxdna_jax.convert_cli`
(`python -m mxdna_jax.convert` runs it). Heads are named by `mxdna_jax.heads`.

No torch is needed: weights come from .safetensors or .npz (a `param/` prefix is accepted, as in
the reference fixtures). Every official tensor name is mapped by one rule table; unmapped or
missing names and shape mismatches raise with the offending names.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from mxdna_jax import heads
from mxdna_jax.config import ModelConfig

Rule = tuple[str, tuple, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]

_T = (lambda w: w.T, lambda w: w.T)
_ID = (lambda w: w, lambda w: w)


def _ln(official: str, ours: tuple) -> list[Rule]:
    return [(f"{official}.weight", ours + ("scale",), *_ID), (f"{official}.bias", ours + ("bias",), *_ID)]


def _encoder_layer(official: str, ours: tuple) -> list[Rule]:
    rules = _ln(f"{official}.input_layernorm.norm", ours + ("input_norm",))
    rules += _ln(f"{official}.post_attention_layernorm.norm", ours + ("post_attn_norm",))
    attn = "cross_attn" if official == "decoder" else "self_attn"
    ours_attn = "cross_attn" if official == "decoder" else "attn"
    for p in "qkvo":
        rules.append((f"{official}.{attn}.projection_{p}.weight", ours + (ours_attn, p, "kernel"), *_T))
    for w in ("w1", "w2", "w3"):
        rules.append((f"{official}.ffn.ffn.{w}.weight", ours + ("ffn", w, "kernel"), *_T))
    return rules


def _expert_rules(cfg: ModelConfig) -> list[Rule]:
    d = cfg.hidden_size
    base, ours = "model.conversion_layer.conv_moe.experts", ("model", "tokenization")
    rules: list[Rule] = []
    for e, (k, g) in enumerate(zip(cfg.expert_kernel_sizes, cfg.expert_groups())):
        c = d // g
        rules.append((f"{base}.{e}.pointwise_conv_pre.weight", ours + ("expert_pre", e), *_T))
        rules.append((f"{base}.{e}.pointwise_conv_post.weight", ours + ("expert_post", e), *_T))
        rules.append((f"{base}.{e}.norm.norm.weight", ours + ("expert_norm_scale", e), *_ID))
        rules.append((f"{base}.{e}.norm.norm.bias", ours + ("expert_norm_bias", e), *_ID))
        # official grouped Conv1d (out, in/g, k) -> ours (tap, group, in, out)
        rules.append((
            f"{base}.{e}.depthwise_conv.weight", ours + ("expert_conv", e),
            lambda w, g=g, c=c, k=k: w.reshape(g, c, c, k).transpose(3, 0, 2, 1),
            lambda w, d=d, c=c, k=k: w.transpose(1, 3, 2, 0).reshape(d, c, k),
        ))
    return rules


def backbone_rules(cfg: ModelConfig, prefix: tuple = ("model",)) -> list[Rule]:
    rules: list[Rule] = [("model.embed_tokens.weight", prefix + ("embed",), *_ID)]
    for i in range(cfg.num_nucleotide_layers):
        rules += _encoder_layer(f"model.nucleotide_layers.{i}", prefix + ("nucleotide_layers", i))
    for i in range(cfg.num_token_layers):
        rules += _encoder_layer(f"model.motif_layers.{i}", prefix + ("token_layers", i))
    tok, conv = prefix + ("tokenization",), "model.conversion_layer"
    rules += _ln(f"{conv}.input_layernorm.norm", tok + ("input_norm",))
    rules.append((f"{conv}.gate.weight", tok + ("gate",), *_T))
    rules.append((f"{conv}.motif_masked_token_embedding", tok + ("masked_token_embedding",), *_ID))
    rules += _expert_rules(cfg)
    dc = f"{conv}.deform_conv"
    rules += _ln(f"{dc}.input_layernorm.norm", tok + ("deform", "norm"))
    tap_major = (lambda w: w.transpose(2, 1, 0), lambda w: w.transpose(2, 1, 0))  # (out,in,tap) <-> (tap,in,out)
    rules.append((f"{dc}.offset_conv.weight", tok + ("deform", "offset_kernel"), *tap_major))
    rules.append((f"{dc}.offset_conv.bias", tok + ("deform", "offset_bias"), *_ID))
    rules.append((f"{dc}.modulator_conv.weight", tok + ("deform", "modulator_kernel"), *tap_major))
    rules.append((f"{dc}.modulator_conv.bias", tok + ("deform", "modulator_bias"), *_ID))
    rules.append((f"{dc}.regular_conv.weight", tok + ("deform", "kernel"),
                  lambda w: w[..., 0].transpose(2, 1, 0), lambda w: w.transpose(2, 1, 0)[..., None]))
    rules += _ln("model.norm.norm", prefix + ("final_norm",))
    return rules


def mlm_rules(cfg: ModelConfig) -> list[Rule]:
    rules = backbone_rules(cfg)
    rules += _encoder_layer("decoder", ("decoder",))
    rules += _ln("norm.norm", ("norm",))
    rules += [
        ("lm_head.dense.weight", ("lm_head", "dense", "kernel"), *_T),
        ("lm_head.dense.bias", ("lm_head", "dense", "bias"), *_ID),
        ("lm_head.layer_norm.weight", ("lm_head", "norm", "scale"), *_ID),
        ("lm_head.layer_norm.bias", ("lm_head", "norm", "bias"), *_ID),
        ("lm_head.decoder.weight", ("lm_head", "decoder", "kernel"), *_T),
        ("lm_head.bias", ("lm_head", "bias"), *_ID),
    ]
    return rules


def cls_rules(cfg: ModelConfig) -> list[Rule]:
    rules = backbone_rules(cfg)
    rules += _ln("norm.norm", ("cls_norm",))
    rules += [
        ("task_head.dense.weight", ("dense", "kernel"), *_T), ("task_head.dense.bias", ("dense", "bias"), *_ID),
        ("task_head.out_proj.weight", ("out_proj", "kernel"), *_T),
        ("task_head.out_proj.bias", ("out_proj", "bias"), *_ID),
    ]
    return rules


# The conversion rules of each head of the registry (mxdna_jax.heads.HEAD_NAMES). The MAE head has
# no official counterpart: its encoder exports as the official backbone and its decoder, which
# pretraining throws away, is not exported (UNOFFICIAL lists what is left out).
RULES = {"mlm": mlm_rules, "cls": cls_rules, "tokens": backbone_rules, "mae": backbone_rules}
UNOFFICIAL = {"mae": ("decoder_embed", "mask_embedding", "decoder_layers", "decoder_norm", "mae_head")}


def rules_for(model) -> list[Rule]:
    try:
        head = heads.head_name(model)
    except ValueError:
        raise TypeError(f"no conversion rules for {type(model).__name__}") from None
    return RULES[head](model.cfg)


def load_official_state_dict(path: str | pathlib.Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Read official-named tensors from .safetensors or .npz (optionally under `prefix`, e.g. 'param/')."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        sd = load_file(str(path))
    elif path.suffix == ".npz":
        with np.load(path) as z:
            sd = {k: z[k] for k in z.files}
    else:
        raise ValueError(f"{path}: expected a .safetensors or .npz file")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def official_to_ours(state_dict: Mapping[str, np.ndarray], rules, param_paths) -> dict[tuple, tuple[str, np.ndarray]]:
    """{our param path: (official name, float32 value in our layout)} for every rule; per-expert
    tensors (a rule path ending in the expert index) whose parent path is one of `param_paths`
    (the model's params) are stacked into that one param."""
    missing = [name for name, *_ in rules if name not in state_dict]
    if missing:
        raise KeyError(f"{len(missing)} official tensors missing, e.g. {missing[:5]}")
    out: dict[tuple, tuple[str, np.ndarray]] = {}
    grouped: dict[tuple, dict[int, np.ndarray]] = {}
    for name, path, to_ours, _ in rules:
        value = to_ours(np.asarray(state_dict[name], dtype=np.float32))
        if isinstance(path[-1], int) and path[:-1] in param_paths:  # one slice of a stacked-experts param
            grouped.setdefault(path[:-1], {})[path[-1]] = value
        else:
            out[path] = (name, value)
    for path, slices in grouped.items():
        out[path] = ("experts " + "/".join(map(str, path)), np.stack([slices[i] for i in range(len(slices))]))
    return out


def load_into(model, state_dict: Mapping[str, np.ndarray], *, strict: bool = True, rules=None) -> None:
    """Copy official tensors into an NNX model in place (dtype follows the model's params).

    strict: every tensor of `state_dict` must have a place in the model.
    """
    rules = rules_for(model) if rules is None else rules
    params = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    converted = official_to_ours(state_dict, rules, flat)
    if strict:
        known = {name for name, *_ in rules}
        extra = sorted(k for k in state_dict if k not in known)
        if extra:
            raise KeyError(f"{len(extra)} official tensors have no place in {type(model).__name__}: {extra[:5]}")
    for path, (name, value) in converted.items():
        _assign(flat, path, value, name)
    nnx.update(model, params)


def official_params(path: str | pathlib.Path, config: Mapping | str | pathlib.Path | None = None, *,
                    prefix: str = "") -> dict[str, np.ndarray]:
    """Official weights as our flat params {'model/embed': array} without building a model (for
    `params_io.load_matching`, e.g. a warm start): the masked-LM, classifier or backbone-only
    names, whichever the file holds. `config`: the official config.json (default: beside it)."""
    path = pathlib.Path(path)
    sd = load_official_state_dict(path, prefix)
    cfg = ModelConfig.from_official(_official_config(path, config))
    head = official_head(sd)
    abstract = nnx.eval_shape(lambda: heads.build_model(cfg, head))  # the param paths, nothing allocated
    converted = official_to_ours(sd, rules_for(abstract), dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param))))
    return {"/".join(map(str, p)): value for p, (_, value) in converted.items()}


def official_head(state_dict: Mapping[str, np.ndarray]) -> str:
    """The head (a key of mxdna_jax.heads) whose tensors an official state dict holds: 'mlm'
    (lm_head.*), 'cls' (task_head.*) or 'tokens' (the backbone only)."""
    if "lm_head.dense.weight" in state_dict:
        return "mlm"
    if "task_head.dense.weight" in state_dict:
        return "cls"
    return "tokens"


def _official_config(weights: pathlib.Path, config) -> Mapping:
    if config is None:
        config = weights.with_name("config.json")
    if isinstance(config, Mapping):
        return config
    config = pathlib.Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"official config not found: {config} (pass the model's config.json)")
    return json.loads(config.read_text())


def _assign(flat, path, value, name):
    if path not in flat:
        raise KeyError(f"{name}: no parameter at {'/'.join(map(str, path))}")
    var = flat[path]
    if tuple(var.shape) != tuple(value.shape):
        raise ValueError(f"{name}: shape {value.shape} does not fit {'/'.join(map(str, path))} {var.shape}")
    var[...] = value.astype(var.dtype)


def export_state_dict(model) -> dict[str, np.ndarray]:
    """Our params -> official names and layouts (float32 numpy)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for name, path, _, to_official in rules_for(model):
        if path in flat:
            v = np.asarray(flat[path][...], dtype=np.float32)
        else:
            v = np.asarray(flat[path[:-1]][...], dtype=np.float32)[path[-1]]
        out[name] = np.ascontiguousarray(to_official(v))
    return out


def from_official(path, config: Mapping | str | pathlib.Path | None = None, *, head: str = "mlm",
                  prefix: str = "", **overrides):
    """One call from the released checkpoint to a ready model.

    `config` is the official config.json (a path or dict); by default `config.json` next to the
    weights. The returned model uses parity semantics (mode='original', batch_independent=False)
    unless overridden, e.g. `from_official('ckpt/model.safetensors', mode='compact')`.
    """
    heads.head_class(head)  # an unknown head fails before any file is read
    path = pathlib.Path(path)
    cfg = ModelConfig.from_official(_official_config(path, config), **overrides)
    model = heads.build_model(cfg, head)
    sd = load_official_state_dict(path, prefix)
    if head == "cls" and "task_head.dense.weight" not in sd:
        # a pretraining (MLM) checkpoint: take the backbone, keep the fresh classifier head
        load_into(model, sd, strict=False, rules=backbone_rules(cfg))
    else:
        load_into(model, sd, strict=head == "mlm")
    return model


if __name__ == "__main__":  # `python -m mxdna_jax.convert ...`: the command line is convert_cli's
    from mxdna_jax import convert_cli

    raise SystemExit(convert_cli.main())
