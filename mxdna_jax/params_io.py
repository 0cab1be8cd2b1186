"""Loading trained models for inference and evaluation (no optimizer state).

- `load_from_workdir(workdir)`: the newest good training checkpoint of a `train.py` run
  (the same integrity checks as resuming: commit marker + checksum manifest), params only.
- `save_params` / `load_params`: a self-contained params directory (Orbax + model_config.json),
  what `python -m mxdna_jax.convert import` writes for an official checkpoint.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mxdna_jax import checkpoint
from mxdna_jax.config import ModelConfig

log = logging.getLogger(__name__)

HEADS = {"mlm": "MxDNAForMaskedLM", "cls": "MxDNAForSequenceClassification", "tokens": "MxDNAForTokenExtraction"}


def _build(cfg: ModelConfig, head: str):
    from mxdna_jax import model as m

    return getattr(m, HEADS[head])(cfg, rngs=nnx.Rngs(0))


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
    head = next(k for k, v in HEADS.items() if type(model).__name__ == v)
    (out / "model_config.json").write_text(json.dumps({"head": head, "model": _cfg_dict(model.cfg)}, indent=1))


def load_params(params_dir, **overrides):
    d = pathlib.Path(params_dir)
    meta = json.loads((d / "model_config.json").read_text())
    cfg = ModelConfig.from_dict({**meta["model"], **overrides})
    return _restore_params_into(_build(cfg, meta["head"]), d / "params")


def _cfg_dict(cfg: ModelConfig) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["expert_kernel_sizes"] = list(d["expert_kernel_sizes"])
    return d


def latest_good_step(workdir) -> tuple[int, pathlib.Path]:
    """The newest step under workdir/checkpoints that passes the integrity checks."""
    ck = pathlib.Path(workdir) / "checkpoints"
    if not ck.is_dir():
        raise FileNotFoundError(f"no checkpoints under {ck}")
    steps = sorted((int(p.name) for p in ck.iterdir() if p.name.isdigit()), reverse=True)
    for s in steps:
        problems = checkpoint.check_step_dir(ck / str(s))
        if not problems:
            return s, ck / str(s)
        log.warning("checkpoint step %d is unusable (%s); trying an older one", s, "; ".join(problems))
    raise FileNotFoundError(f"no usable checkpoint under {ck} (steps seen: {steps})")


def load_from_workdir(workdir, *, step_dir=None, head: str = "mlm", **overrides):
    """(model, step) from a train.py workdir; `step_dir` picks a specific checkpoint."""
    workdir = pathlib.Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: is {workdir} a train.py workdir?")
    model_section = json.loads(cfg_path.read_text())["model"]
    cfg = ModelConfig.from_dict({**model_section, **overrides})
    if step_dir is None:
        step, step_dir = latest_good_step(workdir)
    else:
        step_dir = pathlib.Path(step_dir)
        problems = checkpoint.check_step_dir(step_dir)
        if problems:
            raise ValueError(f"checkpoint {step_dir} is unusable: {'; '.join(problems)}")
        step = int(step_dir.name) if step_dir.name.isdigit() else -1
    model = _build(cfg, head)
    return _restore_params_into(model, step_dir / "params"), step
