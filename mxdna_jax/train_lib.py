"""Sharded training for any NNX model driven by a loss function.

Loss-function contract (what `objectives.mlm.mlm_loss_fn` implements):

    loss_fn(model, batch, rng, *, token_capacity) -> (loss, metrics)

- `rng`: a typed PRNG key for training (router jitter), None in eval (deterministic).
- `token_capacity`: a static int (compact mode) or None.
- `metrics`: dict of scalars. Recognised keys: `overflow` (bool: the capacity was too small, the
  results are invalid), `loss_weight` (e.g. the number of masked tokens; micro-batches and eval
  batches are averaged with it so accumulation reproduces the full-batch mean; default 1).

State is functional: `TrainState` holds the params as an `nnx.State` (Variables keep their
`logical_axes`), the optax state, the step and the base RNG key; the model's graphdef stays
outside, static. The step is one `jax.jit` with explicit in/out shardings and the state donated.

Safety rules kept inside the jitted step: an update is applied only when loss and gradient norm
are finite AND no micro-batch overflowed; otherwise the returned state is the pre-step state
(step counter included). So the host can rerun the same step at a larger capacity after an
overflow although the input state was donated, and a NaN never reaches the params.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mxdna_jax import capacity as capacity_lib
from mxdna_jax import checkpoint, metrics_log, optim, preemption, sharding, validate

log = logging.getLogger(__name__)

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nnx.State of nnx.Param (float32 master weights)
    opt_state: Any
    rng: jax.Array  # raw key data of the base key; step keys are fold_in(base, step)
    rest: Any  # nnx.State of the model's non-Param variables (constant during training)


class NonFiniteLossError(FloatingPointError):
    pass


class CapacityError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ state


def _split(model: nnx.Module):
    return nnx.split(model, nnx.Param, ...)


def abstract_train_state(model_ctor: Callable[[], nnx.Module], tx: optax.GradientTransformation):
    """(graphdef, TrainState of ShapeDtypeStructs) without allocating anything."""
    graphdef, params, rest = _split(nnx.eval_shape(model_ctor))
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return graphdef, TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                opt_state=jax.eval_shape(tx.init, params), rng=rng, rest=rest)


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings for every TrainState leaf: params/rest from their logical_axes, optimizer
    moments like their params, everything else replicated."""
    rep = sharding.replicated(mesh)
    p_sh = sharding.param_shardings(abstract.params, mesh)
    o_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, p_sh,
                                 transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep,
                      rest=sharding.param_shardings(abstract.rest, mesh))


def init_train_state(model_ctor, tx, mesh, seed: int):
    """(graphdef, state, shardings): the model is built inside jit, straight into its shards."""
    graphdef, abstract = abstract_train_state(model_ctor, tx)
    shardings = state_shardings(abstract, tx, mesh)

    def init():
        _, params, rest = _split(model_ctor())
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)), rest=rest)

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def cast_floating(tree, dtype):
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ------------------------------------------------------------------------------------ steps


def _combine_metrics(metrics, weights):
    """Per-micro-batch metric stacks -> step metrics: bools any(), loss_weight summed, the rest
    averaged with the loss weights."""
    total = weights.sum()
    out = {}
    for k, v in metrics.items():
        if v.dtype == jnp.bool_:
            out[k] = v.any()
        elif k == "loss_weight":
            out[k] = v.sum()
        else:
            out[k] = (v.astype(jnp.float32) * weights).sum() / total
    return out


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, graphdef, shardings: TrainState,
                    mesh, *, grad_accum_steps: int = 1, compute_dtype: str | None = None,
                    schedule: optax.Schedule | None = None):
    """Jitted `train_step(state, batch, *, token_capacity) -> (state, metrics)`; state donated.

    compute_dtype='bfloat16' casts the float32 master params to bf16 for the forward/backward;
    the cast's transpose returns float32 gradients, and the update is float32.
    Gradient accumulation: the global batch is split into `grad_accum_steps` micro-batches
    (rows i, i+k, i+2k, ... so every device keeps its rows) summed in a `lax.scan`.
    """
    if compute_dtype in ("float32", None):
        compute_dtype = None
    k = int(grad_accum_steps)
    batch_axes = sharding.LOGICAL_RULES["batch"]

    def loss_and_grad(params, rest, batch, key, token_capacity):
        def f(p):
            model = nnx.merge(graphdef, cast_floating(p, compute_dtype), rest)
            loss, metrics = loss_fn(model, batch, key, token_capacity=token_capacity)
            return loss.astype(jnp.float32), dict(metrics)

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        weight = jnp.asarray(metrics.get("loss_weight", 1.0), jnp.float32)
        return loss, metrics, grads, weight

    def train_step(state: TrainState, batch, token_capacity):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if k == 1:
            loss, metrics, grads, _ = loss_and_grad(state.params, state.rest, batch, key, token_capacity)
        else:
            def split(x):
                if x.shape[0] % k:
                    raise ValueError(f"batch {x.shape[0]} is not divisible by grad_accum_steps={k}")
                return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

            micro = jax.tree.map(split, batch)
            micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, batch_axes)))

            def body(acc, xs):
                i, mb = xs
                loss, metrics, grads, w = loss_and_grad(state.params, state.rest, mb,
                                                        jax.random.fold_in(key, i), token_capacity)
                acc = jax.tree.map(lambda a, g: a + w * g, acc, grads)
                return acc, (loss, metrics, w)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            gsum, (losses, metrics, ws) = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
            total = ws.sum()
            grads = jax.tree.map(lambda g: g / total, gsum)
            loss = (losses * ws).sum() / total
            metrics = _combine_metrics(metrics, ws)

        grad_norm = optax.tree.norm(grads)
        overflow = jnp.asarray(metrics.get("overflow", False), jnp.bool_)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        ok = finite & ~overflow
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + ok.astype(jnp.int32), params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, overflow=overflow, finite=finite,
                       applied=ok)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new_state, metrics

    jitted = jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(shardings, sharding.replicated(mesh)),
                     static_argnums=2, donate_argnums=0)

    @functools.wraps(train_step)
    def run(state, batch, *, token_capacity=None):
        with jax.set_mesh(mesh):
            return jitted(state, batch, token_capacity)

    run.jitted = jitted
    return run


def make_eval_step(loss_fn: LossFn, graphdef, shardings: TrainState, mesh, *,
                   compute_dtype: str | None = None):
    """Jitted `eval_step(state, batch, *, token_capacity) -> metrics` (loss_fn gets rng=None)."""
    if compute_dtype in ("float32", None):
        compute_dtype = None

    def eval_step(state: TrainState, batch, token_capacity):
        model = nnx.merge(graphdef, cast_floating(state.params, compute_dtype), state.rest)
        loss, metrics = loss_fn(model, batch, None, token_capacity=token_capacity)
        metrics = dict(metrics, loss=loss.astype(jnp.float32))
        metrics["overflow"] = jnp.asarray(metrics.get("overflow", False), jnp.bool_)
        metrics.setdefault("loss_weight", jnp.ones((), jnp.float32))
        return metrics

    jitted = jax.jit(eval_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                     out_shardings=sharding.replicated(mesh), static_argnums=2)

    def run(state, batch, *, token_capacity=None):
        with jax.set_mesh(mesh):
            return jitted(state, batch, token_capacity)

    return run


# ------------------------------------------------------------------------------------ overflow


def grow_capacity(capacity: int, max_capacity: int, growth: float = 1.5) -> int:
    """The next capacity after an overflow (`capacity.grow`'s rule); raises at the full length."""
    if max_capacity is None or capacity >= max_capacity:
        raise CapacityError(f"token capacity overflow at capacity {capacity} with max_capacity={max_capacity} "
                            "(the full length): the loss function reports overflow where none is possible")
    return capacity_lib.grow(capacity, max_capacity, growth)


def check_step(step: int, m: Mapping[str, Any]) -> None:
    """Raise if a finished (non-overflowed) step produced a non-finite loss or gradient."""
    if not bool(m.get("finite", True)):
        raise NonFiniteLossError(f"non-finite loss at step {step}: loss={float(m['loss'])}, "
                                 f"grad_norm={float(m.get('grad_norm', float('nan')))}; the update was "
                                 "not applied and no checkpoint of this state will be written")


def train_step_with_retry(train_step, state, batch, capacity, *, max_capacity=None, growth=1.5,
                          on_retry: Callable[[int, int], None] | None = None, pending=None):
    """Run one step; after an overflow rerun the SAME step from the SAME pre-step state (the
    jitted step left it untouched) at a larger capacity until it fits.

    `pending` is an already dispatched (state, metrics) for this step (lets the caller overlap
    host work with the first attempt). Returns (state, host_metrics, capacity).
    """
    new_state, metrics = pending if pending is not None else train_step(state, batch, token_capacity=capacity)
    m = jax.device_get(metrics)
    while bool(m["overflow"]):
        if capacity is None:
            raise CapacityError("loss function reported overflow with token_capacity=None")
        new_cap = grow_capacity(capacity, max_capacity, growth)
        if on_retry is not None:
            on_retry(capacity, new_cap)
        capacity = new_cap
        new_state, metrics = train_step(new_state, batch, token_capacity=capacity)
        m = jax.device_get(metrics)
    return new_state, m, capacity


def evaluate(eval_step, state, batches: Iterable, capacity, *, max_capacity=None, growth=1.5,
             to_global: Callable = lambda b: b, on_retry=None):
    """Loss-weighted means of the eval metrics over `batches`. Returns (metrics, capacity)."""
    sums: dict[str, float] = {}
    total_w, n = 0.0, 0
    for batch in batches:
        batch = to_global(batch)
        m = jax.device_get(eval_step(state, batch, token_capacity=capacity))
        while bool(m["overflow"]):
            new_cap = grow_capacity(capacity, max_capacity, growth)
            if on_retry is not None:
                on_retry(capacity, new_cap)
            capacity = new_cap
            m = jax.device_get(eval_step(state, batch, token_capacity=capacity))
        w = float(m["loss_weight"])
        for key, v in m.items():
            if key not in ("overflow", "loss_weight") and np.ndim(v) == 0:
                sums[key] = sums.get(key, 0.0) + w * float(v)
        total_w += w
        n += 1
    out = {k: v / total_w for k, v in sums.items()} if n else {}
    out["batches"] = n
    return out, capacity


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

    def add(self, m, tokens, *, timed=True):
        for k, v in m.items():
            if np.ndim(v) == 0 and k not in ("overflow", "finite", "applied"):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
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
        return out


def run_training(config, workdir: str, *, loss_fn: LossFn, model_ctor: Callable[[], nnx.Module],
                 train_iter_factory: Callable[[int, int, int, Any], Iterator],
                 eval_iter_factory: Callable[[int, int], Iterable] | None = None,
                 token_capacity: int | None = None, max_token_capacity: int | None = None,
                 mesh=None, allow_config_change: bool = False,
                 stop_signal: preemption.StopSignal | None = None) -> tuple[Any, TrainState]:
    """Train `config.train.steps` optimizer steps, resuming from `workdir/checkpoints`.

    - `model_ctor()` builds the model (called abstractly and inside jit; never materialised whole
      on one device).
    - `train_iter_factory(shard_index, num_shards, start_step, data_state)` returns this
      process's iterator over host batches (dicts of numpy arrays with global_batch / num_shards
      rows), positioned for step `start_step`: either from the step (step-indexed pipelines) or
      by `set_state(data_state)` (data_state is what the iterator's `get_state()` returned when
      the checkpoint was written, None on a fresh start or when the checkpoint has none).
    - `eval_iter_factory(shard_index, num_shards)` returns a fresh iterable of eval batches;
      `config.train.eval_batches` of them are used every `eval_every` steps.
    - `token_capacity` (compact mode) grows x`capacity_growth` on overflow up to
      `max_token_capacity`, and stays grown (saved in the checkpoint).
    - Resuming checks the checkpoint's config: a different model is refused; other changes (but
      the cadence/loader/mesh fields of `validate.RESUME_SAFE_FIELDS`) are refused unless
      `allow_config_change`, and then recorded as a `config_changed` event.
    - `stop_signal` (a `preemption.StopSignal`, entered by the caller) is checked after every
      step: the step is checkpointed, the save awaited, and `preemption.Preempted` raised.
    Returns (graphdef, final state). Raises NonFiniteLossError on NaN/Inf (after finishing any
    checkpoint of an earlier, good step), checkpoint.CheckpointSaveError when a save fails (the
    previous checkpoint is intact), cli.UserError for a refused config change.
    """
    stop_signal = stop_signal if stop_signal is not None else preemption.StopSignal()
    tc = config.train
    mesh = mesh if mesh is not None else sharding.mesh_from_config(config.mesh)
    tx, schedule = optim.make_optimizer(tc)
    graphdef, abstract = abstract_train_state(model_ctor, tx)
    shardings = state_shardings(abstract, tx, mesh)
    growth = float(tc.get("capacity_growth", 1.5))
    cfg_json = json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)
    ck = config.checkpoint
    ckpt = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), keep=int(ck.keep),
                                        async_save=bool(ck.async_save), checksums=bool(ck.get("checksums", True)))
    global_batch = int(config.data.global_batch_size)
    shard_index, num_shards = sharding.process_batch_slice(mesh, global_batch)
    to_global = functools.partial(sharding.host_batch_to_global, mesh=mesh, global_batch_size=global_batch)

    def arrays_of(tree: TrainState):
        out = {"params": tree.params, "opt_state": tree.opt_state}
        if jax.tree.leaves(tree.rest):
            out["rest"] = tree.rest
        return out

    config_changes: list[dict] = []

    def validate_meta(meta):
        config_changes[:] = validate.check_resume_config(meta.get("config"), cfg_json, workdir=workdir,
                                                         allow_change=allow_config_change)

    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    arrays_of(abstract), arrays_of(shardings))
    restored = ckpt.restore_latest(abstract_sharded, validate_meta=validate_meta)
    if restored is None:
        graphdef, state, _ = init_train_state(model_ctor, tx, mesh, int(tc.seed))
    else:
        rep = sharding.replicated(mesh)
        state = TrainState(step=jax.device_put(jnp.asarray(restored.meta["step"], jnp.int32), rep),
                           params=restored.arrays["params"], opt_state=restored.arrays["opt_state"],
                           rng=jax.device_put(np.asarray(restored.meta["rng"], np.uint32), rep),
                           rest=restored.arrays.get("rest", abstract.rest))
        if restored.meta.get("token_capacity") is not None and token_capacity is not None:
            token_capacity = max(token_capacity, int(restored.meta["token_capacity"]))
    start = int(jax.device_get(state.step))
    train_iter = train_iter_factory(shard_index, num_shards, start, restored.data_state if restored else None)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg_json, f, indent=1)

    train_step = make_train_step(loss_fn, tx, graphdef, shardings, mesh, grad_accum_steps=int(tc.grad_accum_steps),
                                 compute_dtype=str(tc.compute_dtype), schedule=schedule)
    eval_step = make_eval_step(loss_fn, graphdef, shardings, mesh, compute_dtype=str(tc.compute_dtype))
    logger = metrics_log.MetricsLogger(workdir, total_steps=int(tc.steps), start_step=start)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    logger.event(start, "start", resumed=restored is not None, params=n_params, devices=jax.device_count(),
                 mesh=dict(mesh.shape), token_capacity=token_capacity)
    if config_changes:
        log.warning("resuming with config changes (--allow_config_change): %s", validate.describe_changes(config_changes))
        logger.event(start, "config_changed", changes=config_changes)
    if start >= int(tc.steps):
        log.warning("the checkpoint is at step %d >= train.steps=%d: nothing to train", start, int(tc.steps))

    def save(step, data_state):
        ckpt.save(step, arrays_of(state), data_state=data_state,
                  meta={"rng": np.asarray(jax.device_get(state.rng)).tolist(), "token_capacity": token_capacity,
                        "config": cfg_json, "time": time.time()})

    def check_first_step(step, m):
        try:
            check_step(step, m)
        except NonFiniteLossError as e:
            if step == start + 1 and restored is not None:
                # A model that trained fine before the checkpoint and fails on the first step after it
                # points at the checkpoint, not at the loss.
                raise NonFiniteLossError(f"{e}. This is the first step after restoring checkpoint "
                                         f"{ckpt.step_dir(start)}: that checkpoint is the likely suspect "
                                         "(move it aside to resume from the one before)") from None
            raise

    def run_eval(step):
        nonlocal token_capacity
        if eval_iter_factory is None:
            return
        it = eval_iter_factory(shard_index, num_shards)
        batches = (b for _, b in zip(range(int(tc.eval_batches)), it))
        m, token_capacity = evaluate(eval_step, state, batches, token_capacity, max_capacity=max_token_capacity,
                                     growth=growth, to_global=to_global,
                                     on_retry=lambda a, b: logger.event(step, "eval_capacity_grown", old=a, new=b))
        logger.log(step, {f"val_{k}": v for k, v in m.items()}, kind="eval")

    every, log_every, eval_every = int(ck.every_steps), int(tc.log_every), int(tc.eval_every)
    window = _Window()
    step = start
    try:
        batch = to_global(next(train_iter)) if step < tc.steps else None
        while step < tc.steps:
            saving = (step + 1) % every == 0 or step + 1 == tc.steps
            pending = train_step(state, batch, token_capacity=token_capacity)  # async dispatch
            # The iterator's position right after this step's batch, before prefetching the next.
            data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
            next_batch = to_global(next(train_iter)) if step + 1 < tc.steps else None  # overlaps compute

            def on_retry(old, new, step=step):
                window.retries += 1
                log.warning("step %d: token capacity %d overflowed; re-running the step at %d", step + 1, old, new)
                logger.event(step + 1, "capacity_grown", old=old, new=new)

            state, m, token_capacity = train_step_with_retry(
                train_step, state, batch, token_capacity, max_capacity=max_token_capacity, growth=growth,
                on_retry=on_retry, pending=pending)
            check_first_step(step + 1, m)
            if step == start:  # includes compilation: logged, but kept out of the throughput
                first = time.perf_counter() - window.t0
                logger.event(step + 1, "first_step_done", seconds=first)
                window.add(m, _tokens(batch), timed=False)
                window.excluded += first
            else:
                window.add(m, _tokens(batch))
            step += 1
            batch = next_batch
            logger.advance()
            if (step % log_every == 0 or step == tc.steps) and window.steps:
                logger.log(step, dict(window.summary(), token_capacity=token_capacity))
                window.reset()
            t_side = time.perf_counter()
            if eval_every > 0 and (step % eval_every == 0 or step == tc.steps):
                run_eval(step)
            if saving:
                save(step, data_state)
            ckpt.poll_errors()  # a failed async save stops the run now, not at the next save
            if step < tc.steps and stop_signal.should_stop(step, ckpt.reached_preemption):
                if not saving:
                    save(step, data_state)
                ckpt.wait_until_finished()
                logger.event(step, "preempted", signal=stop_signal.received)
                raise preemption.Preempted(step, str(ckpt.step_dir(step)), stop_signal.received)
            window.excluded += time.perf_counter() - t_side
    except NonFiniteLossError as e:
        log.error("%s", e)
        logger.event(step + 1, "non_finite_loss", message=str(e))
        raise
    finally:
        ckpt.close()
        logger.close()
    return graphdef, state
