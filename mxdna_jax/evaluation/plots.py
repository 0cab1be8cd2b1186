"""The pictures users expect (matplotlib, written as PNG; Agg backend, no display needed):

- `tokenization_figure`: one sequence cut by several tokenizers, one row each (the MxDNA paper's
  Figure 4 style: the learnt tokenization over two stochastic passes beside k-mer and BPE);
- `length_histograms`: token-length distributions per dataset and tokenizer (Figure 3 style);
- `embedding_map`: a 2-D t-SNE map of pooled embeddings coloured by label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless machine
    import matplotlib.pyplot as plt

    return plt


def tokenization_figure(seq: str, rows: Mapping[str, Sequence[tuple[int, int]]], path: str, *,
                        title: str | None = None, max_len: int = 10) -> str:
    """`rows`: tokenizer name -> its units (start, length) over `seq` (0-based). Each unit is a
    box coloured by its length; the nucleotides are printed above."""
    plt = _pyplot()
    n = len(seq)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * n + 2), 0.55 * (len(rows) + 1) + 0.6))
    cmap = plt.get_cmap("viridis", max_len)
    for x, ch in enumerate(seq):
        ax.text(x + 0.5, len(rows) + 0.5, ch, ha="center", va="center", family="monospace", fontsize=7)
    for r, (name, units) in enumerate(rows.items()):
        y = len(rows) - 1 - r
        for a, k in units:
            if a + k <= 0 or a >= n:
                continue
            ax.add_patch(plt.Rectangle((a, y + 0.1), k, 0.8, facecolor=cmap(min(k, max_len) - 1), edgecolor="white",
                                       linewidth=0.8))
    ax.set_xlim(0, n)
    ax.set_ylim(0, len(rows) + 1)
    ax.set_yticks([len(rows) - 1 - r + 0.5 for r in range(len(rows))] + [len(rows) + 0.5])
    ax.set_yticklabels(list(rows) + ["sequence"])
    ax.set_xlabel("position (nt)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0.5, max_len + 0.5))
    fig.colorbar(sm, ax=ax, label="unit length (nt)", ticks=range(1, max_len + 1), fraction=0.03, pad=0.01)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def length_histograms(data: Mapping[str, Mapping[str, Sequence[int]]], path: str, *, max_len: int = 12) -> str:
    """`data`: dataset -> tokenizer -> token lengths. One panel per dataset, one bar series per
    tokenizer (fraction of tokens of each length), mean length in the legend."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.2), squeeze=False)
    for ax, (dataset, by_tok) in zip(axes[0], data.items()):
        width = 0.8 / max(len(by_tok), 1)
        for i, (tok, lengths) in enumerate(by_tok.items()):
            lengths = np.asarray(lengths)
            counts = np.bincount(np.clip(lengths, 1, max_len), minlength=max_len + 1)[1:]
            ax.bar(np.arange(1, max_len + 1) + (i - (len(by_tok) - 1) / 2) * width, counts / max(counts.sum(), 1),
                   width=width, label=f"{tok} (mean {lengths.mean():.2f})")
        ax.set_title(dataset)
        ax.set_xlabel("token length (nt)")
        ax.set_ylabel("fraction of tokens")
        ax.set_xticks(range(1, max_len + 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def embedding_map(embeddings: np.ndarray, labels: Sequence, path: str, *, class_names=None, seed: int = 0,
                  title: str | None = None) -> str:
    """t-SNE (scikit-learn) of `embeddings` (N, D) to 2-D, points coloured by label."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    emb = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels)
    perplexity = float(min(30, max(2, (len(emb) - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(emb)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c in np.unique(labels):
        sel = labels == c
        name = class_names[int(c)] if class_names is not None else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.7, label=f"{name} ({sel.sum()})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title(title or "t-SNE of pooled embeddings")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
