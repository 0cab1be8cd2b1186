"""Checks of a training config that must pass before anything is written or compiled, and the
comparison of a resumed run's config with the one its checkpoint was trained with.

Every problem is a `UserError` whose one-line message names the field (`train.steps`, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mxdna_jax.cli import UserError

# Fields that may change when a run is resumed without changing what is computed: cadence of
# logs/evals/checkpoints, loader parallelism, and the mesh (restoring onto another mesh works and
# changes results only at the level of reduction order). Anything else (data, masking, optimiser,
# schedule — `train.steps` sets the cosine decay — seeds) needs --allow_config_change.
RESUME_SAFE_FIELDS = frozenset({
    "train.log_every", "train.eval_every", "train.eval_batches",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save", "checkpoint.checksums",
    "data.num_workers", "data.read_threads", "data.prefetch_batches", "data.cache_dir",
    "mesh.data", "mesh.fsdp", "mesh.model",
    "init_from",  # only read by a fresh start
    # how many token rows compact mode computes, not what: like the mesh, reduction order only
    "train.capacity_growth", "train.capacity_adaptive", "train.capacity_margin", "train.capacity_patience",
    "train.capacity_bucket_step", "train.capacity_min_remaining",
    # how the layers run and what their backward keeps, not what they compute (same params)
    "model.layer_loop", "model.remat", "model.remat_policy",
})
# Sections a pretraining run never reads (eval.py finetune's settings).
RESUME_SAFE_SECTIONS = ("finetune",)
# What no flag can change on resume: the parameters would not fit.
STRICT_SECTIONS = ("model",)


def _positive(section: Mapping[str, Any], prefix: str, *names: str) -> None:
    for n in names:
        v = section.get(n)
        if v is None or int(v) <= 0 or int(v) != v:
            raise UserError(f"{prefix}.{n} must be a positive integer, got {v!r}")


def _non_negative(section: Mapping[str, Any], prefix: str, *names: str) -> None:
    for n in names:
        v = section.get(n)
        if v is None or v < 0:
            raise UserError(f"{prefix}.{n} must be >= 0, got {v!r}")


def check_training_config(config) -> None:
    """Numbers that would otherwise fail late (ZeroDivisionError after compiling) or silently
    (steps <= 0 would exit 0 having done nothing)."""
    d, t, c = config.data, config.train, config.checkpoint
    _positive(d, "data", "window", "global_batch_size")
    _positive(t, "train", "steps", "log_every", "grad_accum_steps")
    _positive(c, "checkpoint", "every_steps", "keep")
    _non_negative(t, "train", "eval_every", "warmup_steps", "weight_decay")
    if int(t.eval_every) > 0:
        _positive(t, "train", "eval_batches")
    if not float(t.lr) > 0:
        raise UserError(f"train.lr must be > 0, got {t.lr!r}")
    init_from = str(config.get("init_from", "") or "")
    if init_from and not os.path.exists(init_from):
        raise UserError(f"init_from {init_from} not found (a train.py workdir, a checkpoint step, a params "
                        "directory or an official .safetensors)")
    if float(t.get("capacity_growth", 1.5)) <= 1:
        raise UserError(f"train.capacity_growth must be > 1, got {t.capacity_growth!r}")
    if not float(t.get("capacity_bucket_step", 0.0625)) > 0:
        raise UserError(f"train.capacity_bucket_step must be > 0, got {t.capacity_bucket_step!r}")
    if not float(t.get("capacity_margin", 0.05)) >= 0:
        raise UserError(f"train.capacity_margin must be >= 0, got {t.capacity_margin!r}")
    if "capacity_patience" in t:
        _positive(t, "train", "capacity_patience")
    if "capacity_min_remaining" in t:
        _non_negative(t, "train", "capacity_min_remaining")
    gb, k = int(d.global_batch_size), int(t.grad_accum_steps)
    if gb % k:
        raise UserError(f"data.global_batch_size={gb} is not divisible by train.grad_accum_steps={k}")


def check_mesh(config, devices) -> Any:
    """The run's mesh, or a UserError naming the mesh fields and the device count."""
    from mxdna_jax import sharding

    m = config.mesh
    try:
        mesh = sharding.mesh_from_config(m, devices=devices)
    except ValueError as e:
        raise UserError(f"mesh (data={m.data}, fsdp={m.fsdp}, model={m.model}) does not fit "
                        f"{len(devices)} device(s): {e}") from None
    check_batch_fits_mesh(config, mesh)
    return mesh


def check_batch_fits_mesh(config, mesh) -> None:
    from mxdna_jax import sharding

    gb, k = int(config.data.global_batch_size), int(config.train.grad_accum_steps)
    shards = sharding.batch_shards(mesh)
    if (gb // k) % shards:
        what = f"global_batch_size/grad_accum_steps = {gb}/{k} = {gb // k}" if k > 1 else f"global_batch_size={gb}"
        raise UserError(f"data.{what} is not divisible by the {shards} batch shards of the mesh "
                        f"{dict(mesh.shape)} (data x fsdp)")
    try:
        sharding.process_batch_slice(mesh, gb)
    except ValueError as e:
        raise UserError(f"data.global_batch_size={gb}: {e}") from None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Fields whose value differs between two resolved configs (JSON dicts), safe ones omitted:
    [{"field", "saved", "now"}, ...] sorted by field."""
    a, b = _flatten(saved), _flatten(current)
    return [{"field": f, "saved": a.get(f), "now": b.get(f)} for f in sorted(set(a) | set(b))
            if a.get(f) != b.get(f) and f not in RESUME_SAFE_FIELDS and f.split(".", 1)[0] not in RESUME_SAFE_SECTIONS]


def describe_changes(changes: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['field']}: {c['saved']!r} -> {c['now']!r}" for c in changes)


def _section_defaults() -> dict[str, dict[str, Any]]:
    """The code defaults of the sections whose fields are dataclass fields."""
    import dataclasses

    from mxdna_jax.config import ModelConfig
    from mxdna_jax.data.pipeline import PretrainDataConfig
    from mxdna_jax.objectives.mae import MAE

    def fields(obj, names=None):
        d = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if names is None or f.name in names}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    # the config files spell the path fields as strings ('' = default), not the dataclass's tuples/None
    data = {**fields(PretrainDataConfig()), "fasta": "", "barcodes": "", "cache_dir": ""}
    return {"model": fields(ModelConfig()), "data": data,
            "mae": fields(MAE(), ("mask_ratio", "span", "keep_margin"))}


def _with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config whose model/data/mae section predates a field (or the whole section) gets
    that field's default (what the run was, in effect, trained with), so a new field never
    blocks resuming."""
    out = dict(saved)
    if "model" not in saved:
        return out
    for name, defaults in _section_defaults().items():
        section = dict(saved.get(name) or {})
        out[name] = {**{k: v for k, v in defaults.items() if k not in section}, **section}
    return out


def check_resume_config(saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, workdir: str,
                        allow_change: bool) -> list[dict[str, Any]]:
    """The changes to record when resuming with `current` a run trained with `saved` (the
    checkpoint's own copy). Model changes always fail; others fail unless `allow_change`."""
    if not saved:
        return []
    changes = config_changes(_with_defaults(saved), _with_defaults(current))
    strict = [c for c in changes if c["field"].split(".", 1)[0] in STRICT_SECTIONS]
    if strict:
        raise UserError(f"{workdir} holds checkpoints of a different model config ({describe_changes(strict)}); "
                        "use another --workdir")
    if changes and not allow_change:
        raise UserError(f"resuming {workdir} with a config that differs from its checkpoint's: "
                        f"{describe_changes(changes)}; pass --allow_config_change to accept (recorded as an "
                        "event), or use another --workdir")
    return changes
