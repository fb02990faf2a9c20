"""A page of ranked results: queries with their top results before and after diffusion.

    python -m experiments.results_page [--dataset digits|coil20|mpeg7] [--out results/page]
                                       [--queries 6] [--top 8] [--select improved|random]

Every shown query has two rows: plain kNN search (before) and diffusion (after,
CG to tolerance). Each result is framed green when it has the query's class and
red otherwise; the row label gives that query's AP under each method. ``improved``
picks the queries whose AP gained most from diffusion (with a few random ones
when ``--queries`` exceeds the improved ones), ``random`` a seeded random sample.
Writes ``results_page.png`` and ``index.html`` (which embeds the PNG and lists the
per-query APs), atomically.
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

import numpy as np

from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import label_map
from retrieval_jax.evaluation.figures import ranked_results_figure
from retrieval_jax.methods import DIFFUSION, KNN_SEARCH, DiffusionConfig, KnnConfig

from experiments.common import LABEL_DATASETS, load_label_dataset, write_text

BEFORE_AFTER = (("kNN search", KNN_SEARCH, KnnConfig()),
                ("diffusion", DIFFUSION, DiffusionConfig(k=10, max_iter=1000)))


def rankings(X, methods=BEFORE_AFTER):
    """Full rankings (query itself moved last) of every item by each method."""
    ids = np.arange(X.shape[0], dtype=np.int32)
    out = {}
    for name, method, cfg in methods:
        scores = np.asarray(method.search_items(method.build(X, cfg), ids))
        out[name] = ranking_from_scores(scores, exclude=ids)
    return out


def choose_queries(aps: dict, n_show: int, select: str, seed: int = 0) -> np.ndarray:
    names = list(aps)
    before, after = aps[names[0]], aps[names[-1]]
    rng = np.random.default_rng(seed)
    n = before.size
    if select == "random":
        return np.sort(rng.choice(n, size=min(n_show, n), replace=False))
    gain = np.nan_to_num(after - before, nan=-np.inf)
    best = np.argsort(-gain, kind="stable")[: max(1, (2 * n_show) // 3)]
    rest = rng.choice(np.setdiff1d(np.arange(n), best), size=n_show - best.size, replace=False)
    return np.concatenate([best, rest])


def page(path: Path, png_name: str, dataset: str, queries, aps: dict, maps: dict) -> None:
    names = list(aps)
    rows = "\n".join(
        f"<tr><td>{q}</td>" + "".join(f"<td>{100 * aps[m][q]:.1f}</td>" for m in names) + "</tr>"
        for q in queries)
    summary = ", ".join(f"{html.escape(m)} {100 * v:.2f}" for m, v in maps.items())
    text = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Ranked results: {html.escape(dataset)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
img{{max-width:100%}}</style></head>
<body>
<h1>Ranked results on {html.escape(dataset)}: before and after diffusion</h1>
<p>Every item queries the rest (itself excluded). Label mAP (%): {summary}.</p>
<p>For each query (blue frame): the top results of <b>{html.escape(names[0])}</b> (upper row)
and <b>{html.escape(names[-1])}</b> (lower row); <span style="color:green">green</span> = same
class as the query, <span style="color:red">red</span> = another class.</p>
<img src="{html.escape(png_name)}" alt="queries and their ranked results">
<h2>Per-query AP (%)</h2>
<table><tr><th>query</th>{''.join(f'<th>{html.escape(m)}</th>' for m in names)}</tr>
{rows}
</table>
</body></html>
"""
    write_text(path, text)


def run(dataset="digits", out="results/page", *, n_queries: int = 6, top: int = 8,
        select: str = "improved", seed: int = 0, data_dir=None, log=print):
    data = load_label_dataset(dataset, data_dir, images=True)
    labels = np.asarray(data.labels)
    named = rankings(data.X)
    aps, maps = {}, {}
    for name, r in named.items():
        maps[name], aps[name] = label_map(r, labels, return_aps=True)
    queries = choose_queries(aps, n_queries, select, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "results_page.png"
    ranked_results_figure(png, data.images, labels, queries, named, top, aps=aps,
                          title=f"{dataset}: top {top} results, kNN search (upper row) vs diffusion "
                                "(lower row); green = same class, red = other")
    page(out / "index.html", png.name, dataset, queries, aps, maps)
    log(f"wrote {png} and {out / 'index.html'} ("
        + ", ".join(f"{m} mAP {100 * v:.2f}" for m, v in maps.items()) + ")")
    return queries, maps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=LABEL_DATASETS)
    p.add_argument("--out", default="results/page", help="output folder")
    p.add_argument("--queries", type=int, default=6, help="queries shown")
    p.add_argument("--top", type=int, default=8, help="results shown per query")
    p.add_argument("--select", default="improved", choices=("improved", "random"),
                   help="queries where diffusion gained most, or a random sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder holding coil20/ and mpeg7/")
    args = p.parse_args(argv)
    if args.queries < 1 or args.top < 1:
        p.error("--queries and --top must be positive")
    try:
        run(args.dataset, args.out, n_queries=args.queries, top=args.top, select=args.select,
            seed=args.seed, data_dir=args.data_dir)
    except FileNotFoundError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
