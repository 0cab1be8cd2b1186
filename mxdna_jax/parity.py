"""Parity of our model against a fixture in the shared/reference format (official PyTorch outputs).

`compare_fixture(path)` runs every head on the fixture's inputs and weights and returns, per
stored key, the max abs error and its tolerance; `python -m mxdna_jax.convert check FILE.npz`
(its command line is in `mxdna_jax.convert_cli`) prints that table and exits 1 when any key is
over tolerance or an integer key differs, 2 (one `error:` line) when the fixture cannot be read
or lacks what a check needs.
"""

from __future__ import annotations

import json
import pathlib
import zipfile
import zlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxdna_jax import cli as cli_lib
from mxdna_jax import convert, heads
from mxdna_jax.config import ModelConfig
from mxdna_jax.model import extract_tokens, flatten_tokens
from mxdna_jax.objectives.mlm import masked_cross_entropy
from mxdna_jax.tokenization import router_z_loss_official

# Absolute tolerances per key (the fixtures' README §10 groups). Integer keys must match exactly.
TOLERANCE = {
    "embeddings": 1e-6,
    "nucleotide_layer_outputs": 1e-5,
    "conversion_input_layernorm_out": 2e-5,
    "router_logits": 1e-5, "train_router_logits": 1e-5,
    "moe_output": 1e-5, "deform_input": 1e-5,
    "deform_layernorm_out": 2e-5, "deform_offset": 1e-5, "deform_modulator_logit": 1e-5,
    "conversion_output": 5e-5, "token_layer_outputs": 5e-5,
    "final_hidden": 1e-4, "token_extraction": 1e-4,
    "decoder_output": 1e-5, "decoder_norm_output": 2e-5,
    "mlm_logits": 1e-5, "train_mlm_logits": 1e-5, "cls_logits": 1e-5, "cls_head_input": 2e-5,
    "aux_loss": 1e-5, "mlm_ce_loss": 1e-5, "mlm_loss_total": 1e-5, "router_z_loss": 1e-5,
}
INTEGER_KEYS = ("nms_center", "nms_all", "motif_attention_mask", "train_nms_center", "train_nms_all",
                "token_extraction_batch_index", "token_extraction_position")
# (B, 3, L) in the fixtures, (B, L, 3) here
_TAP_MAJOR = ("deform_offset", "deform_modulator_logit")


# What a fixture needs besides reference outputs and official-named `param/...` weights.
REQUIRED_KEYS = ("config_json", "input_ids", "attention_mask", "special_tokens_mask", "mlm_labels")
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def load_fixture(path) -> dict[str, np.ndarray]:
    """Every array of a .npz fixture; cli.UserError (one line, naming the file) when it is not a
    readable .npz (missing, truncated, another format, a corrupted member)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise cli_lib.UserError(f"fixture not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except _UNREADABLE as e:
        raise cli_lib.UserError(f"{path} is not a readable .npz fixture ({cli_lib.one_line(e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise cli_lib.UserError(f"{path} holds a single array, not a .npz fixture")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except _UNREADABLE as e:
        raise cli_lib.UserError(f"{path}: an array in it is unreadable, the file is truncated or corrupted "
                                f"({cli_lib.one_line(e)})") from None


def check_fixture_complete(fx: dict[str, np.ndarray], path) -> None:
    """cli.UserError naming what a fixture lacks for a parity check (inputs, config, weights,
    reference outputs), before any model is built."""
    missing = [k for k in REQUIRED_KEYS if k not in fx]
    if not any(k.startswith("param/") for k in fx):
        missing.append("param/* (the official weights)")
    if not any(k in TOLERANCE or k in INTEGER_KEYS for k in fx):
        missing.append("reference outputs (e.g. mlm_logits)")
    if missing:
        raise cli_lib.UserError(f"fixture {path} is incomplete: missing {', '.join(missing)}")


def fixture_config(fx: dict[str, np.ndarray], **overrides) -> ModelConfig:
    hf = json.loads(str(fx["config_json"]))
    return ModelConfig.from_official(hf, **overrides)


def build_models(fx, cfg: ModelConfig):
    sd = {k[len("param/"):]: v for k, v in fx.items() if k.startswith("param/")}
    mlm = heads.build_model(cfg, "mlm")
    convert.load_into(mlm, sd)
    models = {"mlm": mlm}
    cls_sd = {k[len("cls_param/"):]: v for k, v in fx.items() if k.startswith("cls_param/")}
    if cls_sd:
        cls = heads.build_model(cfg, "cls")
        backbone = {k: v for k, v in sd.items() if k.startswith("model.")}
        convert.load_into(cls, {**backbone, **cls_sd})
        models["cls"] = cls
    return models


def mlm_ce(logits_BLV, labels_BL):
    return masked_cross_entropy(logits_BLV, labels_BL)[0]


def run_fixture(fx, cfg: ModelConfig, *, jit: bool = True, models=None) -> dict[str, np.ndarray]:
    """Our outputs for every key the fixture stores (as numpy, in the fixture's layout).

    One compiled forward serves every head: the classifier head and the token extraction read
    the masked-LM model's backbone output (the three official classes share the backbone
    weights), and eval mode is the train-mode graph with a jitter of exactly 1.
    """
    models = build_models(fx, cfg) if models is None else models
    ids, am, sm = (jnp.asarray(fx[k]) for k in ("input_ids", "attention_mask", "special_tokens_mask"))
    labels = jnp.asarray(fx["mlm_labels"])
    wrap = nnx.jit if jit else (lambda f: f)

    @wrap
    def forward(mlm, cls, jitter):
        out = mlm(ids, am, sm, capture=True, jitter=jitter)
        res = dict(out.backbone.intermediates)
        ce = mlm_ce(out.logits, labels)
        res.update(mlm_logits=out.logits, aux_loss=out.aux_loss, mlm_ce_loss=ce,
                   mlm_loss_total=ce + cfg.router_aux_loss_coef * out.aux_loss,
                   router_z_loss=router_z_loss_official(out.backbone.router_logits, out.backbone.center))
        if cls is not None:
            res["cls_logits"], res["cls_head_input"] = cls.head(out.backbone)
        ext = extract_tokens(out.backbone, sm)
        res.update(tokens=ext.tokens, token_mask=ext.mask, token_positions=ext.positions)
        return res

    B, L = ids.shape
    res: dict[str, Any] = dict(forward(models["mlm"], models.get("cls"), jnp.ones((B, L, cfg.hidden_size))))
    if "train_jitter" in fx:
        tr = forward(models["mlm"], models.get("cls"), jnp.asarray(fx["train_jitter"]))
        res.update(train_router_logits=tr["router_logits"], train_nms_center=tr["nms_center"],
                   train_nms_all=tr["nms_all"], train_mlm_logits=tr["mlm_logits"])
    rows, b, pos = flatten_tokens(res.pop("tokens"), res.pop("token_mask"), res.pop("token_positions"))
    res.update(token_extraction=rows, token_extraction_batch_index=b, token_extraction_position=pos)
    out = {k: np.asarray(v) for k, v in res.items()}
    for k in _TAP_MAJOR:
        if k in out:
            out[k] = out[k].transpose(0, 2, 1)
    return out


def compare(fx, ours) -> list[dict]:
    rows = []
    for key in sorted(set(fx) & set(ours)):
        ref, got = np.asarray(fx[key]), np.asarray(ours[key])
        if key in INTEGER_KEYS:
            ok = ref.shape == got.shape and bool((ref == got).all())
            n_bad = int((ref != got).sum()) if ref.shape == got.shape else -1
            rows.append(dict(key=key, kind="exact", error=n_bad, tol=0, ok=ok))
        elif key in TOLERANCE:
            if ref.shape != got.shape:
                rows.append(dict(key=key, kind="abs", error=float("inf"), tol=TOLERANCE[key], ok=False))
                continue
            err = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
            rows.append(dict(key=key, kind="abs", error=err, tol=TOLERANCE[key], ok=err <= TOLERANCE[key]))
    return rows


def compare_fixture(path, **overrides) -> list[dict]:
    fx = load_fixture(path)
    cfg = fixture_config(fx, **overrides)
    return compare(fx, run_fixture(fx, cfg))
