"""Loading trained models for inference and evaluation (no optimizer state).

- `load_from_workdir(workdir, head=...)`: the newest verified training checkpoint of a `train.py`
  run (the same checks as resuming: commit marker, checksum manifest, array fingerprints), params
  only, into any head: parameters whose name and shape match are loaded, the rest (e.g. a
  classifier head on a pretraining checkpoint) keep fresh weights and are reported.
- `load_matching(model, params)`: that name/shape matching, from a pure dict of numpy arrays
  (reusable for warm starts from any source).
- `save_params` / `load_params`: a self-contained params directory (Orbax + model_config.json),
  what `python -m mxdna_jax.convert import` writes for an official checkpoint.
- `load_any(path)`: whichever of the above a path is (what `convert export` takes);
  `source_params(path)`: the params of any of them, or of official weights, as a flat numpy dict
  (what a warm start feeds to `load_matching`).
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mxdna_jax import checkpoint, heads
from mxdna_jax.cli import UserError
from mxdna_jax.config import ModelConfig

log = logging.getLogger(__name__)

def _restore_params_into(model, params_dir: pathlib.Path):
    abstract = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(params_dir.absolute(), target)
    nnx.update(model, restored)
    return model


def save_params(model, out_dir) -> None:
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", nnx.state(model, nnx.Param))
    meta = {"head": heads.head_name(model), "model": _cfg_dict(model.cfg)}
    (out / "model_config.json").write_text(json.dumps(meta, indent=1))


def load_params(params_dir, **overrides):
    d = pathlib.Path(params_dir)
    meta = json.loads((d / "model_config.json").read_text())
    cfg = ModelConfig.from_dict({**meta["model"], **overrides})
    return _restore_params_into(heads.build_model(cfg, meta["head"]), d / "params")


def _cfg_dict(cfg: ModelConfig) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["expert_kernel_sizes"] = list(d["expert_kernel_sizes"])
    return d


# ------------------------------------------------------------------ loading by name and shape


class LoadReport(NamedTuple):
    """What `load_matching` did, as 'model/embed'-style parameter paths (sorted)."""

    loaded: list[str]  # model parameters set from the source
    fresh: list[str]  # model parameters absent from the source: they keep their initial weights
    unused: list[str]  # source parameters with no place in the model (e.g. the MLM head for 'cls')


def flatten_params(tree) -> dict[str, np.ndarray]:
    """{'model/embed': array} from a nested params tree: `nnx.to_pure_dict`, or an nnx.State
    restored without a target (whose leaves sit under a trailing 'value' key, dropped here)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = checkpoint.leaf_name(path)
        if name.endswith("/value"):
            name = name[: -len("/value")]
        out[name] = x
    return out


def load_matching(model, source_params: Mapping[str, Any]) -> LoadReport:
    """Set every nnx.Param of `model` whose path and shape match a leaf of `source_params` (a pure
    nested dict of numpy/jax arrays, or an already flat {'a/b': array} dict); the others keep
    their initial values. The model is changed only if every same-named shape matches: a shape
    mismatch raises ValueError naming the parameter and both shapes. Values are cast to the
    model's param dtypes and placed on the model's shardings."""
    source = flatten_params(source_params)
    state = nnx.state(model, nnx.Param)
    flat = [("/".join(map(str, path)), var) for path, var in nnx.to_flat_state(state)]
    for name, var in flat:
        if name in source and tuple(np.shape(source[name])) != tuple(var.shape):
            raise ValueError(f"parameter {name}: the source has shape {tuple(np.shape(source[name]))}, "
                             f"the model {tuple(var.shape)}")
    loaded, fresh = [], []
    for name, var in flat:
        if name not in source:
            fresh.append(name)
            continue
        value = np.asarray(source[name]).astype(var.dtype)
        current = var.get_value()
        var.set_value(jax.device_put(value, current.sharding) if isinstance(current, jax.Array) else value)
        loaded.append(name)
    nnx.update(model, state)
    model_names = {name for name, _ in flat}
    report = LoadReport(sorted(loaded), sorted(fresh), sorted(n for n in source if n not in model_names))
    if report.fresh:
        log.warning("%d of %d parameters of %s are not in the source and keep fresh initial weights: %s",
                    len(report.fresh), len(flat), type(model).__name__, ", ".join(report.fresh))
    if report.unused:
        log.info("%d source parameters have no place in %s and were not used: %s", len(report.unused),
                 type(model).__name__, ", ".join(report.unused))
    return report


def read_array_tree(item_dir) -> Any:
    """An Orbax array item (e.g. STEP/params) as nested dicts of numpy arrays, using the
    checkpoint's own metadata: no target tree and no devices needed (any mesh it was saved on)."""
    item_dir = pathlib.Path(item_dir).absolute()
    # The handler, not a Checkpointer: an item of a CheckpointManager step has no step-level
    # metadata file of its own, which a Checkpointer would warn about.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(item_dir).tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return handler.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        handler.close()


# ------------------------------------------------------------------ train.py workdirs


class LoadedCheckpoint(tuple):
    """`(model, step)` (so `model, step = load_from_workdir(...)` works), plus `.report` (a
    LoadReport: which parameters were loaded / fresh / unused) and `.step_dir`."""

    def __new__(cls, model, step: int, report: LoadReport, step_dir: pathlib.Path):
        self = super().__new__(cls, (model, step))
        self.model, self.step, self.report, self.step_dir = model, step, report, step_dir
        return self


def _step_of(step_dir: pathlib.Path) -> int:
    return int(step_dir.name) if step_dir.name.isdigit() else -1


def verified_params(step_dir, *, allow_unverified: bool = False) -> dict[str, np.ndarray]:
    """The `params` item of one training checkpoint, as numpy, after every integrity check:
    commit marker, manifest (when present), and the fingerprints saved with the arrays (a step
    with neither manifest nor fingerprints is refused unless `allow_unverified`). Raises
    checkpoint.CorruptCheckpointError naming the step and what failed."""
    step_dir = pathlib.Path(step_dir).absolute()
    step = _step_of(step_dir)
    problems = checkpoint.check_step_dir(step_dir)
    if problems:
        raise checkpoint.CorruptCheckpointError(step, step_dir, problems)
    try:
        meta = checkpoint.read_meta(step_dir)
    except (OSError, ValueError) as e:
        raise checkpoint.CorruptCheckpointError(step, step_dir, [f"metadata: {checkpoint.one_line_error(e)}"]) from None
    try:
        tree = read_array_tree(step_dir / "params")
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise checkpoint.CorruptCheckpointError(step, step_dir, [f"params: {checkpoint.one_line_error(e)}"]) from None
    problems = checkpoint.verification_problems(step_dir, meta, {"params": tree}, allow_unverified=allow_unverified)
    if problems:
        raise checkpoint.CorruptCheckpointError(step, step_dir, problems)
    return tree


def newest_verified_params(workdir, *, allow_unverified: bool = False) -> tuple[int, pathlib.Path, Any]:
    """(step, step_dir, params) of the newest step under WORKDIR/checkpoints that passes
    `verified_params`; each rejected newer step is logged with its problems."""
    ck = pathlib.Path(workdir).absolute() / "checkpoints"
    if not ck.is_dir():
        raise FileNotFoundError(f"no checkpoints under {ck}")
    steps = sorted((int(p.name) for p in ck.iterdir() if p.name.isdigit()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {ck}")
    rejected = []
    for s in steps:
        try:
            return s, ck / str(s), verified_params(ck / str(s), allow_unverified=allow_unverified)
        except checkpoint.CorruptCheckpointError as e:
            log.warning("%s; %s", e, "trying an older one" if s != steps[-1] else "no older step left")
            rejected.append(e)
    first = rejected[0]
    raise UserError(f"no usable checkpoint under {ck}: steps {steps} are all damaged or unverifiable "
                    f"(step {first.step}: {first.problems[0][:300]})")


def latest_good_step(workdir, *, allow_unverified: bool = False) -> tuple[int, pathlib.Path]:
    """The newest step under workdir/checkpoints that passes every integrity check."""
    step, step_dir, _ = newest_verified_params(workdir, allow_unverified=allow_unverified)
    return step, step_dir


def workdir_model_config(workdir, **overrides) -> ModelConfig:
    cfg_path = pathlib.Path(workdir) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: is {workdir} a train.py workdir?")
    try:
        model_section = json.loads(cfg_path.read_text())["model"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{cfg_path} is not a train.py config (no readable 'model' section: {e})") from None
    return ModelConfig.from_dict({**model_section, **overrides})


def load_from_workdir(workdir, *, step_dir=None, head: str = "mlm", allow_unverified: bool = False,
                      **overrides) -> LoadedCheckpoint:
    """(model, step) from a train.py workdir: the newest verified step, or `step_dir`. Any head:
    a 'cls'/'tokens' model takes the backbone of the trained masked-LM and keeps fresh weights
    for what the checkpoint lacks (reported in `.report.fresh` and logged)."""
    heads.head_class(head)  # an unknown head fails before the checkpoint is read
    workdir = pathlib.Path(workdir).absolute()
    cfg = workdir_model_config(workdir, **overrides)
    if step_dir is None:
        step, step_dir, params = newest_verified_params(workdir, allow_unverified=allow_unverified)
    else:
        step_dir = pathlib.Path(step_dir).absolute()
        step, params = _step_of(step_dir), verified_params(step_dir, allow_unverified=allow_unverified)
    model = heads.build_model(cfg, head)
    report = load_matching(model, params)
    return LoadedCheckpoint(model, step, report, step_dir)


def source_kind(source) -> str:
    """What a trained-model path is: 'official' (.safetensors/.npz weights, config.json beside),
    'params_dir' (model_config.json, from `convert import`), 'workdir' (train.py: config.json +
    checkpoints/) or 'step_dir' (WORKDIR/checkpoints/STEP). cli.UserError for anything else."""
    src = pathlib.Path(source).absolute()
    if not src.exists():
        raise FileNotFoundError(f"{src} not found")
    if src.is_file() and src.suffix in (".safetensors", ".npz"):
        return "official"
    if (src / "model_config.json").is_file():
        return "params_dir"
    if (src / "config.json").is_file() and (src / "checkpoints").is_dir():
        return "workdir"
    if src.parent.name == "checkpoints" and (src.parent.parent / "config.json").is_file():
        return "step_dir"
    raise UserError(f"{src} is neither official weights (.safetensors/.npz), a params directory "
                    "(model_config.json), a train.py workdir (config.json + checkpoints/) nor a checkpoint "
                    "step directory (WORKDIR/checkpoints/STEP)")


def source_params(source, *, allow_unverified: bool = False) -> dict[str, np.ndarray]:
    """Flat {'model/embed': array} params of any trained-model path (see `source_kind`), for
    `load_matching` (warm starts): a workdir gives its newest verified step, a step dir that step
    (verified), official weights their masked-LM/classifier/backbone tensors under our names."""
    src = pathlib.Path(source).absolute()
    kind = source_kind(src)
    if kind == "official":
        from mxdna_jax import convert

        return convert.official_params(src)
    if kind == "params_dir":
        return flatten_params(read_array_tree(src / "params"))
    if kind == "workdir":
        return flatten_params(newest_verified_params(src, allow_unverified=allow_unverified)[2])
    return flatten_params(verified_params(src, allow_unverified=allow_unverified))


def load_any(source, *, head: str = "mlm", allow_unverified: bool = False, **overrides) -> LoadedCheckpoint:
    """A trained model from a params dir, a train.py workdir (its newest verified step) or one of
    its step dirs (see `source_kind`; official weights: `convert.from_official`). `head` applies to
    train.py checkpoints (a params dir knows its own); `.step` is -1 for a params dir."""
    src = pathlib.Path(source).absolute()
    kind = source_kind(src)
    if kind == "params_dir":
        model = load_params(src, **overrides)
        names = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        return LoadedCheckpoint(model, -1, LoadReport(names, [], []), src)
    if kind == "workdir":
        return load_from_workdir(src, head=head, allow_unverified=allow_unverified, **overrides)
    if kind == "step_dir":
        return load_from_workdir(src.parent.parent, step_dir=src, head=head, allow_unverified=allow_unverified,
                                 **overrides)
    raise UserError(f"{src}: official weights are loaded with convert.from_official (or `convert import`), "
                    "not exported again")
