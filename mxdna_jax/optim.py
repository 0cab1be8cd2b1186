"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

Gradient accumulation is not an optax wrapper here: `train_lib` sums micro-batch gradients inside
one jitted step (a `lax.scan`), so one call = one optimizer update = one schedule step = one log
line, and a checkpoint can never land between micro-batches. `optax.MultiSteps` would instead
make k calls per update, each logging a micro-batch loss and carrying a half-finished gradient
sum in the optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Path components (case-insensitive regexes) whose params get no weight decay, on top of every
# param with fewer than 2 dims (biases, LayerNorm scales/offsets).
NO_DECAY_PATTERNS: tuple[str, ...] = (r"norm", r"^ln", r"bias", r"embed")


def lr_schedule(*, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup to `lr` then cosine decay to `lr * min_lr_ratio` at `total_steps`.

    The first update (count 0) already uses lr / warmup_steps rather than 0, so no step is wasted.
    """
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup_steps, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = lr * (count + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((count - warmup_steps) / decay_steps, 0.0, 1.0)
        cos = lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(count < warmup_steps, warm, cos)

    return schedule


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def decay_mask(params: Any, no_decay_patterns: Sequence[str] = NO_DECAY_PATTERNS) -> Any:
    """Tree of bools like `params`: True where weight decay applies."""
    pats = [re.compile(p, re.IGNORECASE) for p in no_decay_patterns]

    def one(path, x):
        if jnp.ndim(x) < 2:
            return False
        return not any(p.search(name) for name in _path_names(path) for p in pats)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(train_cfg: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) from a config's `train` section (lr, warmup_steps, steps, min_lr_ratio,
    weight_decay, b1, b2, grad_clip; optional eps)."""
    schedule = lr_schedule(lr=float(train_cfg["lr"]), warmup_steps=int(train_cfg["warmup_steps"]),
                           total_steps=int(train_cfg["steps"]), min_lr_ratio=float(train_cfg["min_lr_ratio"]))
    parts = []
    if float(train_cfg["grad_clip"]) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg["grad_clip"])))
    parts.append(optax.adamw(schedule, b1=float(train_cfg["b1"]), b2=float(train_cfg["b2"]),
                             eps=float(train_cfg.get("eps", 1e-8)),
                             weight_decay=float(train_cfg["weight_decay"]), mask=decay_mask))
    return optax.chain(*parts), schedule
