"""Training logs: `metrics.jsonl` (one object per logged step), TensorBoard events, a tqdm bar.

Only process 0 writes (every process may call the methods). The JSONL file is appended to on
resume and flushed per line, so a crash loses nothing already logged; after a resume that fell
back to an older checkpoint, readers should take the last line per (step, kind).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
        v = np.asarray(v).item()
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # 'nan' / 'inf': strict JSON has no NaN
    return v


class MetricsLogger:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 enabled: bool | None = None, tensorboard: bool = True, progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step hides events of a previous run beyond the step we resumed from.
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step or None)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def log(self, step: int, metrics: Mapping[str, Any], *, kind: str = "train") -> None:
        """One JSONL line {"step", "kind", "time", **metrics} and one TB scalar per metric."""
        if not self.enabled:
            return
        row = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))
        if self._bar is not None and kind == "train":
            post = {}
            if "loss" in row and isinstance(row["loss"], (int, float)):
                post["loss"] = f"{row['loss']:.4f}"
            if "nt_per_s" in row and isinstance(row["nt_per_s"], (int, float)):
                post["nt/s"] = f"{row['nt_per_s']:.3g}"
            self._bar.set_postfix(post, refresh=False)

    def event(self, step: int, name: str, **fields: Any) -> None:
        """A non-metric line (resume, overflow retry, eval, error) in the same JSONL stream."""
        if not self.enabled:
            return
        row = {"step": int(step), "kind": "event", "event": name, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in fields.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            self._bar.write(f"[step {step}] {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def advance(self, n: int = 1) -> None:
        """Move the progress bar (tqdm computes the rate and ETA)."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Best effort: called in `finally` blocks, also after a disk-full error, where flushing
        TensorBoard's buffer fails again and must not hide the error being reported."""
        for f in (self._bar, self._tb, self._jsonl):
            if f is None:
                continue
            try:
                f.close()
            except OSError as e:
                log.warning("closing %s failed: %s", type(f).__name__, e)
        self._jsonl = self._tb = self._bar = None
