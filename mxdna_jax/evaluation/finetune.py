"""Fine-tuning on a labelled task: [CLS] (or mean-pooled) classifier, AdamW with warmup, early
stopping on dev MCC, the best-dev parameters evaluated on test, repeated over seeds.

Per seed, `OUT/seed_<s>/` holds metrics.jsonl + TensorBoard curves and `checkpoints/<step>` (the
best-dev parameters, Orbax); `OUT/results.json` has every seed's metrics and their mean +-
sample std (keys `test/mcc`, `test/accuracy`, `test/f1`, `test/auroc` for two classes,
`dev/...`), and `OUT/results.md` one table row per task.

It is the pretraining machinery with another objective: `build` (objective='classification'),
`trainer.restore_or_init` (warm start from `config.init_from`), `train_lib` steps on the
config's mesh, the one capacity policy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxdna_jax import build, checkpoint, metrics_log, optim, sharding, trainer, validate
from mxdna_jax.cli import UserError
from mxdna_jax.evaluation import metrics as M
from mxdna_jax.train_lib import cast_floating, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SeedResult:
    seed: int
    metrics: dict[str, float]  # dev/..., test/..., best_step, steps, epochs


def finetune_config(config, task, *, seed: int, init_from: str | None):
    """The run config of one seed: the classification objective with the task's class count,
    the schedule sized to the task, the seed everywhere."""
    c = copy.deepcopy(config)
    f = c.finetune
    with c.unlocked():
        c.objective = "classification"
        c.init_from = init_from or ""
        c.model.num_labels = int(task.num_classes)
        c.train.seed = int(seed)
        c.data.global_batch_size = int(f.batch_size)
        c.train.lr = float(f.lr)
        c.train.grad_accum_steps = 1
    return c


def _encode(task, cfg, f):
    from mxdna_jax.tasks import encode_split

    max_length = int(f.max_length) or cfg.max_position_embeddings
    if max_length > cfg.max_position_embeddings:
        raise UserError(f"finetune.max_length={max_length} exceeds model.max_position_embeddings="
                        f"{cfg.max_position_embeddings}")
    truncate = str(f.truncate) or None
    return {name: encode_split(split, max_length, truncate=truncate) for name, split in task.splits.items()}


class _Logits:
    """Jitted (params, rest, batch) -> logits (B, C) per bucket length. Compact mode runs in two
    calls (mxdna_jax.staged): the nucleotide layers and the tokenizer give the batch's token count,
    the rest runs at the smallest bucket of the policy's ladder that holds it."""

    def __init__(self, exp, graphdef, shardings, mesh, compute_dtype):
        from mxdna_jax import staged

        self.exp, self.mesh = exp, mesh
        bs, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)

        def merged(params, rest):
            return nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)

        def fwd(params, rest, batch, token_capacity):
            logits, out = merged(params, rest)(batch["input_ids"], batch["attention_mask"],
                                               batch["special_tokens_mask"], token_capacity=token_capacity,
                                               units=batch.get("units"))
            return logits, out.overflow

        def prefix(params, rest, batch):
            return staged.prefix(merged(params, rest), batch["input_ids"], batch["attention_mask"],
                                 batch["special_tokens_mask"], units=batch.get("units"))

        def finish(params, rest, p, token_capacity):
            logits, out = staged.finish(merged(params, rest), p, token_capacity)
            return logits, out.overflow

        self.jitted = jax.jit(fwd, in_shardings=(shardings.params, shardings.rest, bs), out_shardings=rep,
                              static_argnums=3)
        self.prefix = jax.jit(prefix, in_shardings=(shardings.params, shardings.rest, bs), out_shardings=(bs, rep))
        self.finish = jax.jit(finish, in_shardings=(shardings.params, shardings.rest, bs), out_shardings=rep,
                              static_argnums=3)
        self.counted: dict = {}  # per bucket length: capacity.CountedCapacity

    def __call__(self, params, rest, batch) -> np.ndarray:
        L = batch["input_ids"].shape[1]
        policy = self.exp.capacity(L)
        with jax.set_mesh(self.mesh):
            if not policy.enabled:
                logits, _ = self.jitted(params, rest, batch, None)
            else:
                p, count = self.prefix(params, rest, batch)
                if L not in self.counted:
                    self.counted[L] = policy.counted()
                logits, _ = self.counted[L].run(int(count), lambda cap: self.finish(params, rest, p, cap))
        return np.asarray(jax.device_get(logits), np.float32)


def _model_batch(exp, batch) -> dict:
    """A task batch as the model reads it: host bookkeeping dropped, units added (bpe)."""
    return exp.add_units({k: v for k, v in batch.items() if k not in ("valid", "index")})


def evaluate_split(exp, logits_fn, params, rest, encoded, batch_size, to_global) -> dict[str, float]:
    labels, logits = [], []
    for batch in encoded.batches(batch_size):
        valid = np.asarray(batch["valid"], bool)
        out = logits_fn(params, rest, to_global(_model_batch(exp, batch)))
        logits.append(out[valid])
        labels.append(np.asarray(batch["labels"])[valid])
    return M.classification_metrics(np.concatenate(labels), np.concatenate(logits))


def finetune_seed(config, task, out_dir: str, *, seed: int, init_from: str | None = None, mesh=None,
                  progress: bool = True) -> SeedResult:
    f = config.finetune
    c = finetune_config(config, task, seed=seed, init_from=init_from)
    bpe_path = None
    if c.model.tokenizer == "bpe":  # the pretraining run's BPE, copied next to this checkpoint
        from mxdna_jax.tokenizers import bpe

        os.makedirs(out_dir, exist_ok=True)
        bpe_path = str(bpe.ensure_tokenizer(out_dir, [], int(c.model.bpe_vocab_size),
                                            source=init_from or c.model.bpe_path or None))
    exp = build.build(c, bpe_path=bpe_path)
    enc = _encode(task, exp.model_config, f)
    B = int(f.batch_size)
    steps_per_epoch = enc["train"].num_batches(B, drop_remainder=True)
    if steps_per_epoch == 0:
        raise UserError(f"{task.name}: {len(task.train.labels)} training rows are fewer than finetune.batch_size={B}")
    total = int(f.epochs) * steps_per_epoch
    with c.unlocked():
        c.train.steps = total
        c.train.warmup_steps = int(round(float(f.warmup_ratio) * total))
    mesh = mesh if mesh is not None else validate.check_mesh(c, jax.devices())
    to_global = lambda b: sharding.host_batch_to_global(b, mesh, global_batch_size=B)  # noqa: E731
    tx, schedule = optim.make_optimizer(c.train)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = checkpoint.CheckpointManager(os.path.join(out_dir, "checkpoints"), keep=1, async_save=False)
    logger = None
    try:
        start = trainer.restore_or_init(c, out_dir, ckpt, exp.model_ctor(), tx, mesh, exp.capacity(64))
        if start.restored is not None:
            raise UserError(f"{out_dir} already holds a fine-tuning checkpoint; use a new --workdir")
        compute_dtype = exp.model_config.dtype
        step_fn = make_train_step(exp.loss_fn, tx, start.graphdef, start.shardings, mesh,
                                  compute_dtype=compute_dtype, schedule=schedule)
        logits_fn = _Logits(exp, start.graphdef, start.shardings, mesh, compute_dtype)
        logger = metrics_log.MetricsLogger(out_dir, total_steps=total, progress=progress)
        if start.warm is not None:
            logger.event(0, "warm_start", source=str(init_from), loaded=start.warm.loaded, fresh=start.warm.fresh)
        state, best, best_dev, since_best, step = start.state, None, -np.inf, 0, 0
        # The starting point on dev (fresh head; pretrained or random backbone): what fine-tuning adds.
        dev0 = evaluate_split(exp, logits_fn, state.params, state.rest, enc["dev"], B, to_global)
        logger.log(0, {f"dev_{k}": v for k, v in dev0.items()}, kind="eval")
        trackers: dict = {}  # per bucket length: the capacity follows that length's token counts
        eval_every = int(f.eval_every) or steps_per_epoch
        epochs_run = 0
        for epoch in range(int(f.epochs)):
            epochs_run = epoch + 1
            window: list[float] = []
            for batch in enc["train"].batches(B, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True):
                L = batch["input_ids"].shape[1]
                if L not in trackers:
                    trackers[L] = exp.capacity(L).tracker()
                tracker = trackers[L]
                gb = to_global(_model_batch(exp, batch))
                state, m, cap = trainer.train_step_with_retry(step_fn, state, gb, tracker.capacity, tracker.policy,
                                                              grow=tracker.grow)
                tracker.update(cap, m.get("max_tokens"), remaining=total - step - 1)
                if not bool(m["finite"]):
                    raise FloatingPointError(f"{task.name} seed {seed}: non-finite loss at step {step + 1}")
                step += 1
                window.append(float(m["loss"]))
                logger.advance()
                if step % int(c.train.log_every) == 0:
                    logger.log(step, {"loss": float(np.mean(window)), "lr": float(m["lr"])})
                    window = []
                if step % eval_every == 0 or step == total:
                    dev = evaluate_split(exp, logits_fn, state.params, state.rest, enc["dev"], B, to_global)
                    logger.log(step, {f"dev_{k}": v for k, v in dev.items()}, kind="eval")
                    if dev["mcc"] > best_dev:
                        best_dev, since_best = dev["mcc"], 0
                        best = (step, jax.tree.map(jnp.copy, state.params), dev)
                    else:
                        since_best += 1
            if since_best >= int(f.patience):
                logger.event(step, "early_stop", epochs=epochs_run, best_step=best[0])
                break
        best_step, best_params, dev = best
        ckpt.save(best_step, {"params": best_params}, meta={"config": trainer.config_json(c), "dev": dev})
        ckpt.wait_until_finished()
        test = evaluate_split(exp, logits_fn, best_params, state.rest, enc["test"], B, to_global)
        logger.log(best_step, {f"test_{k}": v for k, v in test.items()}, kind="test")
    finally:
        if logger is not None:
            logger.close()
        ckpt.close()
    out = {f"dev/{k}": v for k, v in dev.items()}
    out.update({f"test/{k}": v for k, v in test.items()})
    out.update({f"dev_initial/{k}": v for k, v in dev0.items()})
    out.update(best_step=best_step, steps=step, epochs=epochs_run)
    return SeedResult(seed, out)


def finetune(config, task_path: str, out_dir: str, *, seeds: int = 1, init_from: str | None = None,
             mesh=None, progress: bool = True) -> dict[str, Any]:
    """Load the task, fine-tune `seeds` times, write results.json / results.md; returns the results."""
    from mxdna_jax.tasks import load_task

    f = config.finetune
    task = load_task(task_path, dev_fraction=float(f.dev_fraction) or None, seed=0)
    if int(f.max_train) and len(task.train.labels) > int(f.max_train):
        task = task.subsample("train", int(f.max_train), seed=0)
    log.info("%s", task.describe())
    results = []
    for s in range(seeds):
        t0 = time.time()
        r = finetune_seed(config, task, os.path.join(out_dir, f"seed_{s}"), seed=s, init_from=init_from, mesh=mesh,
                          progress=progress)
        r.metrics["seconds"] = time.time() - t0
        results.append(r)
        log.info("%s seed %d: test mcc %.4f acc %.4f (best dev step %d)", task.name, s, r.metrics["test/mcc"],
                 r.metrics["test/accuracy"], r.metrics["best_step"])
    summary = {
        "task": task.name, "task_path": os.path.abspath(task_path), "init_from": init_from or None,
        "classes": list(task.class_names), "task_metadata": task.metadata(),
        "per_seed": [dict(r.metrics, seed=r.seed) for r in results],
        "mean_std": M.aggregate([r.metrics for r in results]),
        "config": trainer.config_json(config),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(results_table([summary]))
    return summary


COLUMNS = (("test/mcc", "test MCC"), ("test/accuracy", "test acc"), ("test/f1", "test F1"), ("dev/mcc", "dev MCC"))


def results_table(summaries: list[Mapping[str, Any]], label: str = "task") -> str:
    """Markdown, one row per task: MCC / accuracy / F1 in percent, mean +- sample std over seeds."""
    head = f"| {label} | train rows | seeds | " + " | ".join(name for _, name in COLUMNS) + " |\n"
    head += "|---|---|---|" + "---|" * len(COLUMNS) + "\n"
    rows = []
    for s in summaries:
        ms = s["mean_std"]
        n_train = s.get("task_metadata", {}).get("splits", {}).get("train", {}).get("rows", "")
        cells = [M.fmt_mean_std(ms[k]) if k in ms else "-" for k, _ in COLUMNS]
        rows.append(f"| {s.get('name', s['task'])} | {n_train} | {len(s['per_seed'])} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
