"""A stand-in for MxDNAForMaskedLM in the training-infrastructure tests.

Same contract as the real model: `nnx.Param`s with `logical_axes` metadata using the model's
logical names, and a loss `toy_loss_fn(model, batch, rng, *, token_capacity) -> (loss, metrics)`
with mlm_loss / aux_loss / accuracy / overflow / loss_weight. Overflow is simulated: each row
carries `units` (how many token slots it needs) and overflows when that exceeds the capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB = 9


class ToyMLM(nnx.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 16, f: int = 32, *, seed: int = 0):
        # numpy init from an int seed: jax.random compiles slowly on CPU (~1 s per shape) and these
        # tests build many models; the real model takes rngs=nnx.Rngs(params=seed).
        r = np.random.default_rng(seed)

        def init(*shape):
            return jnp.asarray(0.2 * r.standard_normal(shape), jnp.float32)

        self.embed = nnx.Param(init(vocab, d), logical_axes=("vocab", "embed"))
        self.conv = nnx.Param(init(3, d, d), logical_axes=("taps", "conv_in", "embed"))
        self.norm_scale = nnx.Param(jnp.ones((d,)), logical_axes=("embed",))
        self.qkv = nnx.Param(init(d, 2 * d), logical_axes=("embed", "qkv"))
        self.w_in = nnx.Param(init(2 * d, f), logical_axes=(None, "mlp"))
        self.b_in = nnx.Param(jnp.zeros((f,)), logical_axes=("mlp",))
        self.w_out = nnx.Param(init(f, d), logical_axes=("mlp", "embed"))
        self.router = nnx.Param(init(d, 10), logical_axes=("embed", "experts"))
        self.head = nnx.Param(init(d, vocab), logical_axes=("embed", "vocab"))

    def __call__(self, ids, jitter_key=None):
        x = jnp.take(self.embed[...], ids, axis=0)  # (B, L, d)
        xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
        w = self.conv[...]
        x = x + xp[:, :-2] @ w[0] + xp[:, 1:-1] @ w[1] + xp[:, 2:] @ w[2]
        x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * self.norm_scale[...][None, None, :]
        router = x @ self.router[...]
        if jitter_key is not None:
            router = router + 0.01 * jax.random.normal(jitter_key, router.shape, router.dtype)
        probs = jax.nn.softmax(router.astype(jnp.float32), -1)
        h = jax.nn.gelu(x @ self.qkv[...] @ self.w_in[...] + self.b_in[...][None, None, :])
        x = x + h @ self.w_out[...]
        return x @ self.head[...], probs


def toy_loss_fn(model, batch, rng, *, token_capacity, aux_coef: float = 0.01):
    logits, probs = model(batch["input_ids"], rng)
    logits = logits.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    n = mask.sum()
    mlm = (ce * mask).sum() / jnp.maximum(n, 1.0)
    aux = 10.0 * jnp.sum(probs.mean((0, 1)) ** 2)
    acc = ((logits.argmax(-1) == batch["labels"]) * mask).sum() / jnp.maximum(n, 1.0)
    loss = mlm + aux_coef * aux
    if "poison" in batch:  # test hook: NaN loss on demand
        loss = loss + jnp.where(batch["poison"].any(), jnp.nan, 0.0)
    if token_capacity is None:
        overflow = jnp.zeros((), jnp.bool_)
    else:
        overflow = (batch["units"] > token_capacity).any()
    return loss, {"mlm_loss": mlm, "aux_loss": aux, "accuracy": acc, "overflow": overflow, "loss_weight": n}


def make_model(seed: int = 0, **kw) -> ToyMLM:
    return ToyMLM(seed=seed, **kw)


def make_batch(seed: int, batch: int = 8, length: int = 12, *, units: int | None = None) -> dict:
    """A deterministic MLM batch; `mask` density varies per row so loss weights are uneven."""
    r = np.random.default_rng(seed)
    labels = r.integers(5, VOCAB, (batch, length)).astype(np.int32)
    mask = r.random((batch, length)) < np.linspace(0.1, 0.6, batch)[:, None]
    mask[:, 0] = True
    ids = np.where(mask, 4, labels).astype(np.int32)
    u = np.full((batch,), 4 if units is None else units, np.int32)
    # `poison` is always present (all False) so that NaN tests reuse the compiled clean step.
    return {"input_ids": ids, "labels": labels, "mask": mask, "units": u, "poison": np.zeros((batch,), bool)}


class ToyIterator:
    """Deterministic batches with grain-like get_state()/set_state()."""

    def __init__(self, seed: int = 0, batch: int = 8, length: int = 12, shard_index: int = 0, num_shards: int = 1,
                 *, units: dict | None = None, poison_at: int | None = None, fail_at: int | None = None):
        self.seed, self.batch, self.length = seed, batch // num_shards, length
        self.shard_index, self.num_shards, self.pos = shard_index, num_shards, 0
        # test hooks keyed by batch position: rows needing more token slots, a NaN batch, a crash
        self.units, self.poison_at, self.fail_at = units or {}, poison_at, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos == self.fail_at:
            raise RuntimeError(f"simulated crash while reading batch {self.pos}")
        b = make_batch(self.seed * 100_003 + self.pos, self.batch * self.num_shards, self.length,
                       units=self.units.get(self.pos))
        b["poison"][:] = self.pos == self.poison_at
        self.pos += 1
        lo = self.shard_index * self.batch
        return {k: v[lo:lo + self.batch] for k, v in b.items()}

    def get_state(self):
        return {"pos": self.pos, "seed": self.seed}

    def set_state(self, state):
        self.pos = int(state["pos"])


# ------------------------------------------------------------------ the training loop on the toy

LOOP_TRAIN_CFG = dict(lr=1e-2, warmup_steps=2, steps=6, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.98,
                      grad_clip=1.0, grad_accum_steps=1, seed=0, log_every=1, eval_every=3, eval_batches=2,
                      capacity_growth=1.5)


def loop_config(**train):
    """A train.py-shaped ConfigDict for `run_training` with the toy model."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.model = {"hidden_size": 16}  # compared on resume; the toy model ignores it
    c.data = {"global_batch_size": 8, "window": 12}
    c.train = dict(LOOP_TRAIN_CFG, **train)
    c.checkpoint = {"every_steps": 3, "keep": 3, "async_save": True, "checksums": True}
    c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    return c


def run_toy_training(workdir, config, mesh=None, **kw):
    """`trainer.run_training` of the toy on ToyIterator batches; `kw` goes to the train
    iterator (units, poison_at, fail_at) or to run_training (allow_config_change, stop_signal)."""
    from mxdna_jax import trainer
    from mxdna_jax.capacity import CapacityPolicy

    loop_kw = {k: kw.pop(k) for k in ("allow_config_change", "stop_signal") if k in kw}

    def train_iter(shard_index, num_shards, start_step, data_state):
        it = ToyIterator(seed=1, batch=8, shard_index=shard_index, num_shards=num_shards, **{"units": {1: 6}, **kw})
        assert (data_state is None) == (start_step == 0)
        if data_state is not None:
            assert data_state["pos"] == start_step
            it.set_state(data_state)
        return it

    def eval_iter(shard_index, num_shards):
        return ToyIterator(seed=99, batch=8, shard_index=shard_index, num_shards=num_shards)

    return trainer.run_training(config, str(workdir), loss_fn=toy_loss_fn, model_ctor=make_model,
                                train_iter_factory=train_iter, eval_iter_factory=eval_iter,
                                policy=CapacityPolicy(4, 12), mesh=mesh, **loop_kw)


def read_jsonl(workdir):
    import json
    import os

    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
