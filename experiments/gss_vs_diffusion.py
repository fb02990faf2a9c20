"""GSS against diffusion on held-out classes: COIL-20 (mAP) and MPEG-7 (bull's-eye).

    python -m experiments.gss_vs_diffusion [--quick] [--out results/gss_vs_diffusion]
                                           [--datasets coil20 mpeg7] [--data-dir DIR]

Guided Similarity Separation (Liu et al., NeurIPS 2019; ``retrieval_jax.methods.gss``)
trains a residual graph convolutional network on the database's kNN graph without
labels; diffusion (Iscen et al., CVPR 2017; ``retrieval_jax.methods.DIFFUSION``, the exact
inverse per connected component) ranks by manifold ranking on a mutual kNN graph. Both
have hyper-parameters that no label-free rule fixes: GSS's epoch count and learning
rate, diffusion's k and alpha. Here they are chosen the way a user without test labels
must choose them, on other classes:

* the classes are split as in ``experiments/learn_diffusion.py`` (COIL-20, raw 32x32
  pixels, L2-normalised: objects 1-10 train, 11-20 test; MPEG-7, EfficientNet-Lite0 GeM
  descriptors at 224 px: classes 1-35 train, 36-70 test, extracted once and cached in
  ``--out/cache``);
* on each half every item queries the others of its half (``search_items``): label mAP
  with the query excluded (COIL-20), bull's-eye over the top 40 with the query counted
  (MPEG-7);
* GSS is trained on the training half (one run per learning rate, snapshots along it)
  and the (learning rate, epochs) of the best training score is chosen. The full grid is
  one learning rate, 1e-3 (ten times the reference's 1e-4), with snapshots at 0, 10, 20,
  50 and 100 epochs: half the compute of the reference's 200 epochs, over a range of
  weight changes that includes theirs (Adam moves a weight by at most about the learning
  rate per step). The reference's own setting is a row of the table when ``Settings.lrs``
  holds 1e-4 and ``Settings.epochs`` 200. GSS is then
  trained on the test half, unsupervised as the method is (the test half is its
  database), and the chosen snapshot is reported. The other test snapshots are written
  too (the curve in the plot), never used for a choice;
* diffusion's k x alpha grid (gamma = 3, mutual graph) is scored on both halves; the cell
  best on the training half is reported on the test half, and so is the cell best on the
  test half itself: an upper bound for diffusion that no user can pick without test labels.

Rows of the summary: kNN search; diffusion, grid chosen on train; diffusion, best on
test (upper bound); GSS untrained (two graph convolutions, 0 epochs); GSS at the
reference's defaults (200 epochs, lr 1e-4) when the grid holds them; GSS chosen on train;
GSS best on test (for reference). Ties between cells go to the first in grid order.

Writes into ``--out``: ``summary.csv`` and ``summary.md`` (the table and the verdict),
``gss_curves.csv`` (every GSS snapshot: dataset, lr, epochs, train and test score and the
training objective), ``diffusion_grid.csv`` (every k x alpha cell on both halves),
``gss_vs_diffusion.png`` (the GSS curves against the diffusion rows) and ``config.json``.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from experiments import learn_diffusion
from experiments.common import (label_experiment_parser, parse_experiment_args, pyplot, save_figure, versions,
                                write_csv, write_json, write_text)
from retrieval_jax.data import default_data_dir
from retrieval_jax.graph import knn_graph
from retrieval_jax.methods import DIFFUSION, DiffusionConfig, diffusion_state_from_graph
from retrieval_jax.methods.gss import GssConfig, train_gss


@dataclasses.dataclass(frozen=True)
class Settings:
    epochs: tuple = (0, 10, 20, 50, 100)         # GSS snapshots; the last is the run's length
    lrs: tuple = (1e-3,)                         # GSS learning rates (one run each per half)
    gss_k: int = 5                               # the reference's k (the item itself counted)
    ks: tuple = (5, 10, 20)                      # diffusion graph k
    alphas: tuple = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    gamma: float = 3.0
    item_stride: int = 1                         # every item_stride-th item of each class
    mpeg7_size: int = 224


FULL = Settings()
QUICK = Settings(epochs=(0, 5, 10, 20), lrs=(1e-3,), ks=(5, 10), alphas=(0.8, 0.9, 0.99), item_stride=2)

REFERENCE_EPOCHS, REFERENCE_LR = 200, 1e-4
SUMMARY_COLUMNS = ("dataset", "metric", "row", "setting", "train", "test")
CURVE_COLUMNS = ("dataset", "lr", "epochs", "train", "test", "objective_train", "objective_test")
GRID_COLUMNS = ("dataset", "k", "alpha", "train", "test")


# ----------------------------------------------------------------------------- scores
def all_items(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32)


def diffusion_scores(X, labels, metric, ks, alphas, gamma) -> dict:
    """{(k, alpha): score} of every item of X querying the others by exact diffusion (the
    mutual kNN graph built once per k, the inverse per connected component per alpha)."""
    out = {}
    for k in ks:
        graph = knn_graph(X, k, gamma=float(gamma), mutual=True, show_progress=False)
        for alpha in alphas:
            cfg = DiffusionConfig(k=k, query_k=k, alpha=float(alpha), gamma=float(gamma), solver="inverse")
            state = diffusion_state_from_graph(X, graph, cfg)
            scores = np.asarray(DIFFUSION.search_items(state, all_items(len(X))))
            out[(k, alpha)] = learn_diffusion.score(scores, labels, metric)
    return out


def gss_runs(X, labels, metric, s: Settings, *, log=print, what=""):
    """{(lr, epochs): (score, objective)} of GSS snapshots on X, one training run per lr."""
    out = {}
    for lr in s.lrs:
        t0 = time.perf_counter()
        cfg = GssConfig(epochs=max(s.epochs), lr=float(lr), k=s.gss_k)
        _, snaps = train_gss(X, cfg, snapshots=s.epochs)
        for e, state in sorted(snaps.items()):
            emb = np.asarray(state.embeddings)
            objective = float(state.losses[-1]) if e else float("nan")
            out[(lr, e)] = (learn_diffusion.score(emb @ emb.T, labels, metric), objective)
        log(f"  GSS {what} lr {lr:g}: {max(s.epochs)} epochs in {time.perf_counter() - t0:.0f} s; "
            + ", ".join(f"{e}: {out[(lr, e)][0]:.2f}" for e in s.epochs))
    return out


def first_best(scores: dict):
    """The key of the best value; ties go to the first key in order."""
    keys = list(scores)
    return keys[int(np.argmax([scores[key] for key in keys]))]


# ----------------------------------------------------------------------------- one data set
def run_dataset(sp, s: Settings, *, log=print):
    metric = sp.metric
    log(f"{sp.name}: {sp.note}; train {len(sp.y_train)} items / {len(np.unique(sp.y_train))} classes, "
        f"test {len(sp.y_test)} items / {len(np.unique(sp.y_test))} classes, d = {sp.X_train.shape[1]}")
    halves = {"train": (sp.X_train, sp.y_train), "test": (sp.X_test, sp.y_test)}
    knn = {h: learn_diffusion.score(X @ X.T, y, metric) for h, (X, y) in halves.items()}

    t0 = time.perf_counter()
    cells = [(k, a) for k in s.ks for a in s.alphas]
    grid = {h: diffusion_scores(X, y, metric, s.ks, s.alphas, s.gamma) for h, (X, y) in halves.items()}
    log(f"  diffusion grid {len(s.ks)} k x {len(s.alphas)} alpha on both halves: {time.perf_counter() - t0:.0f} s")
    chosen, oracle = first_best(grid["train"]), first_best(grid["test"])

    gss = {h: gss_runs(X, y, metric, s, log=log, what=h) for h, (X, y) in halves.items()}
    train_scores = {key: v[0] for key, v in gss["train"].items()}
    test_scores = {key: v[0] for key, v in gss["test"].items()}
    g_chosen, g_oracle = first_best(train_scores), first_best(test_scores)
    untrained = (s.lrs[0], 0) if 0 in s.epochs else None

    def cell(key):
        return f"k={key[0]}, alpha={key[1]:g}"

    def setting(key):
        return f"lr={key[0]:g}, epochs={key[1]}"

    rows = [dict(row="kNN search (cosine)", setting="", train=knn["train"], test=knn["test"]),
            dict(row="diffusion, grid chosen on train", setting=cell(chosen), train=grid["train"][chosen],
                 test=grid["test"][chosen]),
            dict(row="diffusion, best on test (upper bound)", setting=cell(oracle), train=grid["train"][oracle],
                 test=grid["test"][oracle])]
    if untrained is not None:
        rows.append(dict(row="GSS untrained (0 epochs)", setting=f"k={s.gss_k}", train=train_scores[untrained],
                         test=test_scores[untrained]))
    if (REFERENCE_LR, REFERENCE_EPOCHS) in train_scores:
        key = (REFERENCE_LR, REFERENCE_EPOCHS)
        rows.append(dict(row="GSS, reference defaults", setting=setting(key), train=train_scores[key],
                         test=test_scores[key]))
    rows += [dict(row="GSS, chosen on train", setting=setting(g_chosen), train=train_scores[g_chosen],
                  test=test_scores[g_chosen]),
             dict(row="GSS, best on test (not a choice)", setting=setting(g_oracle), train=train_scores[g_oracle],
                  test=test_scores[g_oracle])]
    for r in rows:
        r.update(dataset=sp.name, metric=metric)
    curves = [dict(dataset=sp.name, lr=lr, epochs=e, train=gss["train"][(lr, e)][0], test=gss["test"][(lr, e)][0],
                   objective_train=gss["train"][(lr, e)][1], objective_test=gss["test"][(lr, e)][1])
              for lr in s.lrs for e in s.epochs]
    grid_rows = [dict(dataset=sp.name, k=c[0], alpha=c[1], train=grid["train"][c], test=grid["test"][c])
                 for c in cells]
    return rows, curves, grid_rows


def verdict(rows) -> str:
    """Whether GSS chosen on train beats diffusion chosen on train, in numbers."""
    r = {x["row"]: x for x in rows}
    name, metric = rows[0]["dataset"], rows[0]["metric"]
    g, d = r["GSS, chosen on train"]["test"], r["diffusion, grid chosen on train"]["test"]
    o, k = r["diffusion, best on test (upper bound)"]["test"], r["kNN search (cosine)"]["test"]
    word = "beats" if g > d + 1e-9 else "does not beat"
    return (f"{name}: GSS (chosen on train) {word} diffusion (chosen on train) on the test classes: {metric} "
            f"{g:.2f} vs {d:.2f} (diffusion's best on test {o:.2f}, kNN {k:.2f}; GSS "
            f"{'above' if g > o + 1e-9 else 'below'} that upper bound by {abs(g - o):.2f}).")


# ----------------------------------------------------------------------------- outputs
def markdown(rows, verdicts) -> str:
    lines = ["| data set | metric | row | setting | train classes | test classes |",
             "| --- | --- | --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['metric']} | {r['row']} | {r['setting']} | {r['train']:.2f} | "
                     f"{r['test']:.2f} |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"


def plot(path: Path, curves, rows) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["dataset"] for r in curves))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        summ = {x["row"]: x for x in rows if x["dataset"] == name}
        metric = next(x["metric"] for x in rows if x["dataset"] == name)
        lrs = list(dict.fromkeys(r["lr"] for r in curves if r["dataset"] == name))
        for i, lr in enumerate(lrs):
            rs = [r for r in curves if r["dataset"] == name and r["lr"] == lr]
            ax.plot([r["epochs"] for r in rs], [r["test"] for r in rs], "o-", color=f"C{i}",
                    label=f"GSS lr {lr:g}, test classes")
            ax.plot([r["epochs"] for r in rs], [r["train"] for r in rs], "o:", color=f"C{i}", alpha=0.6,
                    label=f"GSS lr {lr:g}, train classes")
        for key, style in (("diffusion, grid chosen on train", "--"), ("diffusion, best on test (upper bound)", ":"),
                           ("kNN search (cosine)", "-.")):
            ax.axhline(summ[key]["test"], ls=style, color="k", lw=1, label=f"{key} (test)")
        ax.set_title(f"{name}: {metric} (%) of the test classes")
        ax.set_xlabel("GSS epochs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def run(out="results/gss_vs_diffusion", *, quick=False, datasets=None, data_dir=None, log=print):
    s = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(datasets) if datasets else (["coil20"] if quick else ["coil20", "mpeg7"])
    try:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        available = [d for d in ("coil20", "mpeg7") if (root / d).is_dir()]
    except FileNotFoundError:
        available = []
    split_settings = learn_diffusion.Settings(item_stride=s.item_stride, mpeg7_size=s.mpeg7_size)
    rows, curves, grid, verdicts, t0 = [], [], [], [], time.perf_counter()
    for name in names:
        if name not in available:
            log(f"{name}: data folder absent, skipped")
            continue
        sp = (learn_diffusion.load_coil20_split(split_settings, data_dir) if name == "coil20"
              else learn_diffusion.load_mpeg7_split(split_settings, out / "cache", data_dir, log=log))
        r, c, g = run_dataset(sp, s, log=log)
        rows += r
        curves += c
        grid += g
        verdicts.append(verdict(r))
    if not rows:
        raise SystemExit("no data set available")
    write_csv(out / "summary.csv", rows, SUMMARY_COLUMNS, float_format="{:.4f}")
    write_csv(out / "gss_curves.csv", curves, CURVE_COLUMNS, float_format="{:.6g}")
    write_csv(out / "diffusion_grid.csv", grid, GRID_COLUMNS, float_format="{:.4f}")
    table = markdown(rows, verdicts)
    write_text(out / "summary.md", table)
    plot(out / "gss_vs_diffusion.png", curves, rows)
    write_json(out / "config.json", {"command": sys.argv, "quick": quick, "settings": dataclasses.asdict(s),
                                     "datasets": list(dict.fromkeys(r["dataset"] for r in rows)),
                                     "seconds": time.perf_counter() - t0, "versions": versions()})
    log("")
    log(table)
    log(f"wrote {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'gss_curves.csv'}, "
        f"{out / 'diffusion_grid.csv'}, {out / 'gss_vs_diffusion.png'}, {out / 'config.json'}")
    return rows, curves, grid


def main(argv=None):
    p = label_experiment_parser(__doc__.split("\n")[0], out="results/gss_vs_diffusion", datasets=("coil20", "mpeg7"),
                                quick="COIL-20 only, every 2nd pose, GSS lr 1e-3 for 20 epochs, a 2 x 3 diffusion grid",
                                datasets_help="coil20 and / or mpeg7 (default: both)")
    a = parse_experiment_args(p, argv)
    run(a.out, quick=a.quick, datasets=a.datasets, data_dir=a.data_dir)


if __name__ == "__main__":
    main()
