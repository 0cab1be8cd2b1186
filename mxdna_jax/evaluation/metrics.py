"""Classification metrics (scikit-learn: the definitions everyone compares against) and their
aggregation over seeds (mean +- sample std, as the GUE / MxDNA papers report)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def classification_metrics(labels, logits) -> dict[str, float]:
    """accuracy, MCC, macro-F1 (and AUROC for two classes) of integer `labels` (N,) against
    `logits` (N, C); rows are all valid (drop padding rows before calling)."""
    from sklearn import metrics as skm

    labels = np.asarray(labels)
    logits = np.asarray(logits, np.float64)
    if labels.ndim != 1 or logits.ndim != 2 or len(labels) != len(logits):
        raise ValueError(f"labels (N,) and logits (N, C) expected, got {labels.shape} and {logits.shape}")
    if not len(labels):
        raise ValueError("no examples to score")
    pred = logits.argmax(-1)
    out = {
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "mcc": float(skm.matthews_corrcoef(labels, pred)),
        "f1": float(skm.f1_score(labels, pred, average="macro", zero_division=0)),
    }
    if logits.shape[1] == 2 and len(np.unique(labels)) == 2:
        out["auroc"] = float(skm.roc_auc_score(labels, logits[:, 1] - logits[:, 0]))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and SAMPLE standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(per_seed: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{key: {"mean", "std", "n"}} over the seeds' metric dicts (keys present in every seed)."""
    keys = [k for k in per_seed[0] if all(k in m for m in per_seed) and isinstance(per_seed[0][k], (int, float))]
    out = {}
    for k in keys:
        mean, std = mean_std([float(m[k]) for m in per_seed])
        out[k] = {"mean": mean, "std": std, "n": len(per_seed)}
    return out


def fmt_mean_std(cell: Mapping[str, float], scale: float = 100.0, digits: int = 2) -> str:
    """'61.23 +- 1.05' (percent by default, as the papers print MCC/accuracy)."""
    if not math.isfinite(cell["mean"]):
        return "nan"
    return f"{cell['mean'] * scale:.{digits}f} +- {cell['std'] * scale:.{digits}f}"
