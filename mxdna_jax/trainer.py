"""The training run: restore-or-init (resume / warm start / fresh), the step loop, the evaluator.

`run_training` wires them together for train.py; eval.py reuses `Evaluator`; the pieces are
separate so a fine-tuning driver can reuse restore-or-init with a warm start and its own loop.

    run      : fresh | resume (same workdir, strict config check) | warm start (config.init_from:
               parameters matched by name and shape, the rest freshly initialised, both logged)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxdna_jax import checkpoint, host_malloc, metrics_log, optim, preemption, sharding, validate
from mxdna_jax.capacity import CapacityPolicy
from mxdna_jax.cli import UserError
from mxdna_jax.train_lib import (LossFn, NonFiniteLossError, TrainState, abstract_train_state, check_step,
                                 init_train_state, make_eval_step, make_train_step, state_shardings)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ evaluation


# per-step token counts the capacity tracker reads; logged as real_tokens_* by the train loop
_COUNT_KEYS = ("max_tokens", "mean_tokens")


class Evaluator:
    """Loss-weighted means of an eval step's scalar metrics over batches. The compact capacity
    follows the batches' token counts (`tracker`, a capacity.CapacityTracker; a loss evaluates in
    one call, so the count is known only afterwards) and a batch that overflows is re-run larger.
    `tracker` persists across calls; the train loop resets it to the training capacity before
    each evaluation, so what an evaluation computes does not depend on earlier evaluations."""

    def __init__(self, eval_step, policy: CapacityPolicy, *, to_global: Callable = lambda b: b,
                 on_retry: Callable[[int, int], None] | None = None):
        self.eval_step, self.policy, self.to_global, self.on_retry = eval_step, policy, to_global, on_retry
        self.tracker = policy.tracker()

    @property
    def capacity(self) -> int | None:
        return self.tracker.capacity

    def __call__(self, state, batches: Iterable) -> dict[str, float]:
        sums: dict[str, float] = {}
        total_w, n = 0.0, 0
        for batch in batches:
            batch = self.to_global(batch)

            def attempt(cap, batch=batch):
                m = jax.device_get(self.eval_step(state, batch, token_capacity=cap))
                return m, m["overflow"]

            m, cap = self.tracker.run(attempt, on_retry=self.on_retry)
            self.tracker.update(cap, m.get("max_tokens"))
            w = float(m["loss_weight"])
            for key, v in m.items():
                if key not in ("overflow", "loss_weight", *_COUNT_KEYS) and np.ndim(v) == 0:
                    sums[key] = sums.get(key, 0.0) + w * float(v)
            total_w += w
            n += 1
        out = {k: v / total_w for k, v in sums.items()} if n else {}
        out["batches"] = n
        return out


def train_step_with_retry(train_step, state, batch, capacity, policy: CapacityPolicy, *,
                          on_retry: Callable[[int, int], None] | None = None, pending=None,
                          grow: Callable[[int], int] | None = None):
    """Run one step; after an overflow rerun the SAME step from the SAME pre-step state (the
    jitted step returns it untouched on overflow, although its input was donated) at the next
    capacity (`grow`, default policy.grow; a CapacityTracker's prefers compiled capacities) until
    it fits. `pending`: an already dispatched (state, metrics) of the first attempt (lets the
    caller overlap host work with it). Returns (state, host metrics, capacity)."""
    current = {"state": state, "pending": pending}

    def attempt(cap):
        out = current.pop("pending", None) or train_step(current["state"], batch, token_capacity=cap)
        current["state"], metrics = out
        m = jax.device_get(metrics)
        return m, m["overflow"]

    m, capacity = policy.run(attempt, capacity, on_retry=on_retry, grow=grow)
    return current["state"], m, capacity


# ------------------------------------------------------------------------------------ restore or init


@dataclasses.dataclass
class Start:
    graphdef: Any
    state: TrainState
    shardings: TrainState
    restored: checkpoint.Restored | None  # resumed from this checkpoint (None: fresh or warm start)
    config_changes: list[dict]  # accepted with --allow_config_change (resume only)
    warm: Any  # params_io.LoadReport of a warm start, else None
    token_capacity: int | None
    step: int  # the step `state` is at (read once: the first train step donates `state`)
    capacity_state: dict | None = None  # the checkpoint's CapacityTracker state (adaptive policies)


def arrays_of(tree: TrainState) -> dict[str, Any]:
    """The array items a checkpoint stores."""
    out = {"params": tree.params, "opt_state": tree.opt_state}
    if jax.tree.leaves(tree.rest):
        out["rest"] = tree.rest
    return out


def restore_or_init(config, workdir: str, ckpt: checkpoint.CheckpointManager, model_ctor, tx, mesh,
                    policy: CapacityPolicy, *, allow_config_change: bool = False) -> Start:
    """Resume the newest good checkpoint of `workdir`; else warm-start from `config.init_from`
    (if set); else initialise from `config.train.seed`."""
    cfg_json = config_json(config)
    graphdef, abstract = abstract_train_state(model_ctor, tx)
    shardings = state_shardings(abstract, tx, mesh)
    changes: list[dict] = []

    def validate_meta(meta):
        changes[:] = validate.check_resume_config(meta.get("config"), cfg_json, workdir=workdir,
                                                  allow_change=allow_config_change)

    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    arrays_of(abstract), arrays_of(shardings))
    restored = ckpt.restore_latest(abstract_sharded, validate_meta=validate_meta)
    capacity, warm, capacity_state = policy.initial, None, None
    if restored is not None:
        rep = sharding.replicated(mesh)
        state = TrainState(step=jax.device_put(jnp.asarray(restored.meta["step"], jnp.int32), rep),
                           params=restored.arrays["params"], opt_state=restored.arrays["opt_state"],
                           rng=jax.device_put(np.asarray(restored.meta["rng"], np.uint32), rep),
                           rest=restored.arrays.get("rest", abstract.rest))
        if restored.meta.get("token_capacity") is not None and capacity is not None:
            if policy.adaptive:  # the capacity the run had reached (and how it got there): same next choices
                capacity = int(restored.meta["token_capacity"])
                capacity_state = dict(restored.meta.get("capacity_tracker") or {}, capacity=capacity)
            else:
                capacity = max(capacity, int(restored.meta["token_capacity"]))  # a grown capacity stays grown
    else:
        graphdef, state, _ = init_train_state(model_ctor, tx, mesh, int(config.train.seed))
        init_from = str(config.get("init_from", "") or "")
        if init_from:
            state, warm = warm_start(state, graphdef, init_from)
    return Start(graphdef, state, shardings, restored, changes, warm, capacity, int(jax.device_get(state.step)),
                 capacity_state)


def warm_start(state: TrainState, graphdef, source: str):
    """Params of `source` (a train.py workdir's newest verified checkpoint, one of its step dirs,
    a params dir, or an official .safetensors) copied into `state.params` wherever name and shape
    match; the others keep their fresh initialisation. Returns (state, params_io.LoadReport)."""
    from mxdna_jax import params_io

    source_params = params_io.source_params(source)
    model = nnx.merge(graphdef, state.params, state.rest)
    try:
        report = params_io.load_matching(model, source_params)
    except ValueError as e:  # a same-named parameter of another shape: a different architecture
        raise UserError(f"config.init_from={source}: {e}") from None
    if not report.loaded:
        raise UserError(f"config.init_from={source}: no parameter of this model matches the source by "
                                 "name and shape (a different architecture?)")
    log.info("warm start from %s: %d parameters loaded, %d fresh (%s)", source, len(report.loaded),
             len(report.fresh), ", ".join(report.fresh) or "none")
    return state.replace(params=nnx.state(model, nnx.Param)), report


def config_json(config) -> dict:
    return json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(dict(config)))


# ------------------------------------------------------------------------------------ the loop


def _tokens(batch) -> int:
    x = batch["input_ids"] if isinstance(batch, Mapping) and "input_ids" in batch else jax.tree.leaves(batch)[0]
    return int(np.prod(x.shape[:2]))


class _Window:
    """Host-side means of the per-step metrics between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.steps, self.tokens, self.retries, self.t0 = {}, 0, 0, 0, time.perf_counter()
        self.timed_steps = 0
        self.excluded = 0.0  # eval / checkpoint / compile time inside the window, not throughput
        self.capacity: dict[str, float] = {}  # sums of the compact-capacity figures (steps that have a capacity)

    def add(self, m, tokens, *, timed=True, capacity=None):
        for k, v in m.items():
            if np.ndim(v) == 0 and k not in ("overflow", "finite", "applied", *_COUNT_KEYS):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        if capacity is not None and "max_tokens" in m:
            c = self.capacity
            for k, v in (("n", 1.0), ("capacity", capacity), ("max", float(m["max_tokens"])),
                         ("util", float(m.get("mean_tokens", m["max_tokens"])) / capacity)):
                c[k] = c.get(k, 0.0) + v
        self.steps += 1
        if timed:
            self.tokens += tokens
            self.timed_steps += 1

    def summary(self):
        dt = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        if self.timed_steps:
            out.update(steps_per_sec=self.timed_steps / dt, nt_per_s=self.tokens / dt)
        out["overflow_retries"] = self.retries
        if self.capacity:
            n = self.capacity["n"]
            # token rows the token layers ran on vs the rows the batches needed (their longest sequence)
            out.update(token_capacity_mean=self.capacity["capacity"] / n, real_tokens_max=self.capacity["max"] / n,
                       capacity_utilisation=self.capacity["util"] / n)
        return out


def run_training(config, workdir: str, *, loss_fn: LossFn, model_ctor: Callable[[], nnx.Module],
                 train_iter_factory: Callable[[int, int, int, Any], Iterator],
                 eval_iter_factory: Callable[[int, int], Iterable] | None = None,
                 policy: CapacityPolicy | None = None, mesh=None, allow_config_change: bool = False,
                 stop_signal: preemption.StopSignal | None = None) -> tuple[Any, TrainState]:
    """Train `config.train.steps` optimizer steps in `workdir` (see `restore_or_init`).

    - `model_ctor()` builds the model (called abstractly and inside jit; never materialised whole
      on one device).
    - `train_iter_factory(shard_index, num_shards, start_step, data_state)` returns this
      process's iterator over host batches (dicts of numpy arrays with global_batch / num_shards
      rows), positioned for step `start_step`: either from the step (step-indexed pipelines) or
      by `set_state(data_state)` (data_state is what the iterator's `get_state()` returned when
      the checkpoint was written, None on a fresh start or when the checkpoint has none).
    - `eval_iter_factory(shard_index, num_shards)` returns a fresh iterable of eval batches;
      `config.train.eval_batches` of them are used every `eval_every` steps.
    - `policy`: the compact token capacity; a grown capacity stays grown (saved in checkpoints).
    - Resuming checks the checkpoint's config: a different model is refused; other changes (but
      the cadence/loader/mesh fields of `validate.RESUME_SAFE_FIELDS`) are refused unless
      `allow_config_change`, and then recorded as a `config_changed` event.
    - `stop_signal` (a `preemption.StopSignal`, entered by the caller) is checked after every
      step: the step is checkpointed, the save awaited, and `preemption.Preempted` raised.
    Returns (graphdef, final state). Raises NonFiniteLossError on NaN/Inf (after finishing any
    checkpoint of an earlier, good step), checkpoint.CheckpointSaveError when a save fails (the
    previous checkpoint is intact), cli.UserError for a refused config change.
    """
    tc, ck = config.train, config.checkpoint
    policy = policy if policy is not None else CapacityPolicy(None, None)
    mesh = mesh if mesh is not None else sharding.mesh_from_config(config.mesh)
    tx, schedule = optim.make_optimizer(tc)
    ckpt = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), keep=int(ck.keep),
                                        async_save=bool(ck.async_save), checksums=bool(ck.get("checksums", True)))
    try:
        start = restore_or_init(config, workdir, ckpt, model_ctor, tx, mesh, policy,
                                allow_config_change=allow_config_change)
        compute_dtype = str(config.model.get("dtype", "float32"))
        train_step = make_train_step(loss_fn, tx, start.graphdef, start.shardings, mesh,
                                     grad_accum_steps=int(tc.grad_accum_steps), compute_dtype=compute_dtype,
                                     schedule=schedule)
        eval_step = make_eval_step(loss_fn, start.graphdef, start.shardings, mesh, compute_dtype=compute_dtype)
        loop = TrainLoop(config, workdir, ckpt, mesh, train_step, eval_step, policy, start,
                         stop_signal if stop_signal is not None else preemption.StopSignal())
        state = loop.run(train_iter_factory, eval_iter_factory)
    finally:
        ckpt.close()
    return start.graphdef, state


class TrainLoop:
    """Steps from `start` to `config.train.steps`: logging, evaluation, checkpoints, stops."""

    def __init__(self, config, workdir, ckpt, mesh, train_step, eval_step, policy, start: Start, stop_signal):
        self.config, self.workdir, self.ckpt, self.mesh = config, workdir, ckpt, mesh
        self.train_step, self.policy, self.start, self.stop = train_step, policy, start, stop_signal
        self.global_batch = int(config.data.global_batch_size)
        self.to_global = functools.partial(sharding.host_batch_to_global, mesh=mesh,
                                           global_batch_size=self.global_batch)
        self.shard_index, self.num_shards = sharding.process_batch_slice(mesh, self.global_batch)
        self.state = start.state
        self.tracker = policy.tracker(start.token_capacity)
        if start.capacity_state is not None:
            self.tracker.load_state_dict(start.capacity_state)
        self.logger = None
        self.evaluator = Evaluator(eval_step, policy, to_global=self.to_global, on_retry=self._eval_retry)

    @property
    def capacity(self) -> int | None:
        return self.tracker.capacity

    def _eval_retry(self, old, new):
        self.logger.event(self.step, "eval_capacity_grown", old=old, new=new)

    def run(self, train_iter_factory, eval_iter_factory) -> TrainState:
        cfg, tc, start = self.config, self.config.train, self.start
        first = start.step
        self.step = first
        train_iter = train_iter_factory(self.shard_index, self.num_shards, first,
                                        start.restored.data_state if start.restored else None)
        if jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(config_json(cfg), f, indent=1)
        self.logger = logger = metrics_log.MetricsLogger(self.workdir, total_steps=int(tc.steps), start_step=first)
        try:
            self._log_start(logger)
            self._loop(train_iter, eval_iter_factory)
        except NonFiniteLossError as e:
            log.error("%s", e)
            logger.event(self.step + 1, "non_finite_loss", message=str(e))
            raise
        finally:
            logger.close()
        return self.state

    def _log_start(self, logger):
        start, tc = self.start, self.config.train
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
        logger.event(start.step, "start", resumed=start.restored is not None, params=n_params,
                     devices=jax.device_count(), mesh=dict(self.mesh.shape), token_capacity=self.capacity,
                     init_from=str(self.config.get("init_from", "") or "") or None, host_malloc=host_malloc.state)
        if start.warm is not None:
            logger.event(start.step, "warm_start", source=str(self.config.init_from), loaded=start.warm.loaded,
                         fresh=start.warm.fresh, unused=start.warm.unused)
        if start.config_changes:
            log.warning("resuming with config changes (--allow_config_change): %s",
                        validate.describe_changes(start.config_changes))
            logger.event(start.step, "config_changed", changes=start.config_changes)
        if start.step >= int(tc.steps):
            log.warning("the checkpoint is at step %d >= train.steps=%d: nothing to train", start.step, int(tc.steps))

    def _check(self, step, m):
        try:
            check_step(step, m)
        except NonFiniteLossError as e:
            if step == self.start.step + 1 and self.start.restored is not None:
                # A model that trained fine before the checkpoint and fails on the first step after it
                # points at the checkpoint, not at the loss.
                raise NonFiniteLossError(f"{e}. This is the first step after restoring checkpoint "
                                         f"{self.ckpt.step_dir(self.start.step)}: that checkpoint is the likely "
                                         "suspect (move it aside to resume from the one before)") from None
            raise

    def _save(self, step, data_state):
        self.ckpt.save(step, arrays_of(self.state), data_state=data_state,
                       meta={"rng": np.asarray(jax.device_get(self.state.rng)).tolist(),
                             "token_capacity": self.capacity, "capacity_tracker": self.tracker.state_dict(),
                             "config": config_json(self.config), "time": time.time()})

    def _evaluate(self, step, eval_iter_factory):
        if eval_iter_factory is None:
            return
        it = eval_iter_factory(self.shard_index, self.num_shards)
        batches = (b for _, b in zip(range(int(self.config.train.eval_batches)), it))
        self.evaluator.tracker = self.policy.tracker(self.capacity)
        m = self.evaluator(self.state, batches)
        self.logger.log(step, {f"val_{k}": v for k, v in m.items()}, kind="eval")

    def _loop(self, train_iter, eval_iter_factory):
        tc, ck, logger = self.config.train, self.config.checkpoint, self.logger
        total, every, log_every, eval_every = int(tc.steps), int(ck.every_steps), int(tc.log_every), int(tc.eval_every)
        window = _Window()
        compiled = {self.capacity}  # capacities whose step is compiled (the first step compiles its own)
        step = self.step
        batch = self.to_global(next(train_iter)) if step < total else None
        while step < total:
            saving = (step + 1) % every == 0 or step + 1 == total
            t_step = time.perf_counter()
            pending = self.train_step(self.state, batch, token_capacity=self.capacity)  # async dispatch
            # The iterator's position right after this step's batch, before prefetching the next.
            data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
            next_batch = self.to_global(next(train_iter)) if step + 1 < total else None  # overlaps compute

            attempted = {self.capacity}

            def on_retry(old, new, step=step, attempted=attempted):
                window.retries += 1
                attempted.add(new)
                logger.event(step + 1, "capacity_grown", old=old, new=new)

            self.state, m, held = train_step_with_retry(self.train_step, self.state, batch, self.capacity,
                                                        self.policy, on_retry=on_retry, pending=pending,
                                                        grow=self.tracker.grow)
            self._check(step + 1, m)
            # the next step's capacity
            if self.tracker.update(held, m.get("max_tokens"), remaining=total - step - 1) != held:
                logger.event(step + 1, "capacity_changed", old=held, new=self.capacity,
                             max_tokens=int(round(float(m["max_tokens"]))))
            if step == self.start.step:  # includes compilation: logged, but kept out of the throughput
                seconds = time.perf_counter() - window.t0
                logger.event(step + 1, "first_step_done", seconds=seconds)
                window.add(m, _tokens(batch), timed=False, capacity=held)
                window.excluded += seconds
            elif not attempted <= compiled:  # compiled a new capacity: kept out of the throughput too
                window.add(m, _tokens(batch), timed=False, capacity=held)
                window.excluded += time.perf_counter() - t_step
            else:
                window.add(m, _tokens(batch), capacity=held)
            compiled |= attempted
            step = self.step = step + 1
            batch = next_batch
            logger.advance()
            if (step % log_every == 0 or step == total) and window.steps:
                logger.log(step, dict(window.summary(), token_capacity=self.capacity))
                window.reset()
            t_side = time.perf_counter()
            if eval_every > 0 and (step % eval_every == 0 or step == total):
                self._evaluate(step, eval_iter_factory)
            if saving:
                self._save(step, data_state)
            self.ckpt.poll_errors()  # a failed async save stops the run now, not at the next save
            if step < total and self.stop.should_stop(step, self.ckpt.reached_preemption):
                if not saving:
                    self._save(step, data_state)
                self.ckpt.wait_until_finished()
                logger.event(step, "preempted", signal=self.stop.received)
                raise preemption.Preempted(step, str(self.ckpt.step_dir(step)), self.stop.received)
            window.excluded += time.perf_counter() - t_side
