"""Pictures of rankings: queries with their top results, positives and negatives marked."""
from __future__ import annotations

from pathlib import Path


def ranked_results_figure(path, images, labels, queries, named_rankings: dict, top: int = 8, *,
                          title: str = "", aps: dict | None = None, dpi: int = 80) -> Path:
    """Save a PNG grid: for each query one row per method, the query then its ``top`` results.

    Results of the query's class are framed green, others red; the query is framed
    blue. Written atomically.

    Args:
      path: PNG file to write.
      images: [n, h, w] (grey) or [n, h, w, 3] images of the collection.
      labels: [n] class labels.
      queries: ids of the queries to show.
      named_rankings: {method name: int[n_queries_total, >= top] rankings, best first},
        indexed by query id.
      aps: optional {method name: per-query AP array} shown beside each row.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_write

    names = list(named_rankings)
    rows = len(queries) * len(names)
    fig, axes = plt.subplots(rows, top + 1, figsize=(1.1 * (top + 1) + 0.8, 1.15 * rows), squeeze=False)
    for qi, q in enumerate(queries):
        for mi, name in enumerate(names):
            ranking = named_rankings[name]
            row = qi * len(names) + mi
            ax = axes[row, 0]
            ax.imshow(images[q], cmap="gray")
            label = name if aps is None else f"{name}\nAP {100 * aps[name][q]:.0f}"
            ax.set_ylabel(label, fontsize=7)
            if mi == 0:
                ax.set_title(f"query {q}", fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:blue")
                spine.set_linewidth(2)
            for j in range(top):
                item = ranking[q, j]
                ax = axes[row, j + 1]
                ax.imshow(images[item], cmap="gray")
                ok = labels[item] == labels[q]
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:green" if ok else "tab:red")
                    spine.set_linewidth(3)
            for ax in axes[row]:
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return out
