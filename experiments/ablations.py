"""Ablations of diffusion: alpha, graph k, gamma and truncation T, one PNG plot each.

    python -m experiments.ablations [--quick] [--out results/ablations]
                                    [--datasets digits coil20 mpeg7] [--params alpha k]
    python -m experiments.ablations --method aqe --sweep n=0,1,2,4,8 [--sweep ...]

For each parameter, converged diffusion (``DIFFUSION``, solver "auto": the exact
inverse per connected component when they are small, else CG to tolerance) is run
with that parameter swept and the others at their base values, on every label
data set available (digits always; COIL-20 and MPEG-7 from ``../shared/data``).
Label mAP (query itself ignored) against the parameter, one line per data set,
in ``<param>.png``; every point in ``ablations.csv``; settings in
``config.json``. Everything is written atomically.

A new parameter (e.g. the rank r of Fast Spectral Ranking) is one more entry of
``ABLATIONS``: name -> (values, quick values, method, config from (base, value),
log-scale x axis).

Any registered method (``retrieval_jax.methods.METHODS``) is swept by its registry name:
``--method NAME --sweep FIELD=v1,v2,...`` sweeps one option of its config (values parsed
as the command line parses that option), the others at the config's defaults; the
parameter is named ``NAME.FIELD`` in the CSV and the plot.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.methods import (DIFFUSION, FSR, METHODS, OFFLINE_DIFFUSION, DiffusionConfig, FsrConfig,
                                   OfflineDiffusionConfig, config_options)

from experiments import reproduce
from experiments.common import (available_label_datasets, label_experiment_parser, parse_experiment_args,
                                load_label_dataset, pyplot, save_figure, versions, write_csv, write_json)


@dataclasses.dataclass(frozen=True)
class Ablation:
    values: tuple
    quick_values: tuple
    method: object
    config: object          # (base settings, value) -> config
    log_x: bool = False
    label: str = ""


def _diff(s: reproduce.Settings, **kw):
    """Converged diffusion: the exact inverse where the graph's components are small, else CG
    to tolerance (the same ranking); truncation always runs CG on the shortlists."""
    base = dict(k=s.k, query_k=s.query_k, max_iter=s.max_iter_tol,
                solver="cg" if "truncate" in kw else "auto")
    base.update(kw)
    return DiffusionConfig(**base)


ABLATIONS = {
    "alpha": Ablation((0.5, 0.7, 0.8, 0.9, 0.95, 0.99), (0.9, 0.99), DIFFUSION,
                      lambda s, v: _diff(s, alpha=v), label="diffusion alpha"),
    "k": Ablation((3, 5, 10, 20, 50, 100), (5, 20), DIFFUSION,
                  lambda s, v: _diff(s, k=v), log_x=True, label="graph neighbours k"),
    "gamma": Ablation((1.0, 2.0, 3.0, 4.0, 6.0), (1.0, 3.0), DIFFUSION,
                      lambda s, v: _diff(s, gamma=v), label="similarity exponent gamma"),
    "truncate": Ablation((50, 100, 200, 500, 1000), (100, 300), DIFFUSION,
                         lambda s, v: _diff(s, truncate=v), log_x=True,
                         label="truncation T (shortlist size)"),
    "rank": Ablation((25, 50, 100, 200, 400), (25, 200), FSR,
                     lambda s, v: FsrConfig(k=s.k, query_k=s.query_k, rank=v, mode="approx"),
                     log_x=True, label="FSR rank r (approx)"),
    "offline_top_l": Ablation((25, 50, 100, 200, 500), (50, 200), OFFLINE_DIFFUSION,
                              lambda s, v: OfflineDiffusionConfig(k=s.k, query_k=s.query_k,
                                                                  truncate=min(s.truncate, 500), top_l=v),
                              log_x=True, label="offline rows kept L"),
}


def registry_ablation(method: str, spec: str) -> tuple[str, Ablation]:
    """(``method.field``, an `Ablation`) from ``FIELD=v1,v2,...`` for a method of `METHODS`:
    the option ``field`` of its config swept over the values (parsed by the option's own
    parser), every other option at its default. ValueError for an unknown method, field
    or value."""
    if method not in METHODS:
        raise ValueError(f"no method named {method!r} is registered (registered: {', '.join(METHODS)})")
    m = METHODS[method]
    field, sep, text = spec.partition("=")
    options = {name: opt for name, opt, _ in config_options(m.config_type)}
    if not sep or field not in options:
        raise ValueError(f"--sweep takes FIELD=v1,v2,... with FIELD an option of {method} "
                         f"({', '.join(options) or 'none'}), got {spec!r}")
    parse = options[field].parse or (lambda t: type(getattr(m.config_type(), field))(t))
    try:
        values = tuple(parse(v) for v in text.split(",") if v.strip())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--sweep {spec}: {exc}") from None
    if not values:
        raise ValueError(f"--sweep {spec}: no values")
    return f"{method}.{field}", Ablation(values, values[:2], m, lambda s, v: m.config_type(**{field: v}),
                                         label=f"{method} {field}")


def sweep(param: str, ab: Ablation, name: str, data, settings, *, quick: bool, log=print):
    X, labels = data.X, np.asarray(data.labels)
    n = X.shape[0]
    qids = np.arange(0, n, settings.query_stride, dtype=np.int32)
    out = []
    for v in (ab.quick_values if quick else ab.values):
        try:
            cfg = ab.config(settings, v)
            t0 = time.perf_counter()
            state = ab.method.build(X, cfg)
            scores = np.asarray(ab.method.search_items(state, qids))
        except ValueError as exc:  # e.g. k or T larger than this data set
            log(f"  {name:8s} {param}={v}: skipped ({exc})")
            continue
        res = reproduce.label_scores(ranking_from_scores(scores, exclude=qids), labels, qids)
        rec = {"param": param, "value": v, "dataset": name, "mAP": 100 * res.map,
               "mP@10": 100 * res.mp[10], "n_queries": int(qids.size),
               "seconds": time.perf_counter() - t0}
        log(f"  {name:8s} {param}={v}: mAP {rec['mAP']:.2f}  mP@10 {rec['mP@10']:.2f}")
        out.append(rec)
    return out


def plot(path: Path, param: str, ab: Ablation, records) -> None:
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    for ds in dict.fromkeys(r["dataset"] for r in records):
        rs = [r for r in records if r["dataset"] == ds]
        ax.plot([r["value"] for r in rs], [r["mAP"] for r in rs], marker="o", label=ds)
    if ab.log_x:
        ax.set_xscale("log")
    values = sorted({r["value"] for r in records})
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" for v in values])
    ax.minorticks_off()
    ax.set_xlabel(ab.label or param)
    ax.set_ylabel("mAP (%)")
    ax.set_title(f"{ab.method.name}: mAP vs {param}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run(out="results/ablations", *, quick: bool = False, datasets=None, params=None,
        data_dir=None, method: str | None = None, sweeps=(), log=print):
    """Sweep ``params`` (names of `ABLATIONS`; default all of them), or with ``method`` the
    ``sweeps`` (``FIELD=v1,v2,...``) of that registered method, on every data set."""
    settings = reproduce.QUICK if quick else reproduce.FULL
    names = list(datasets) if datasets else available_label_datasets(data_dir)
    ablations = dict(ABLATIONS)
    if method is not None:
        ablations = dict(registry_ablation(method, spec) for spec in sweeps)
        params = list(ablations)
    params = list(params) if params else list(ABLATIONS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = {name: load_label_dataset(name, data_dir) for name in names}
    records = []
    for param in params:
        ab = ablations[param]
        log(f"{param}: {ab.quick_values if quick else ab.values}")
        recs = []
        for name, data in loaded.items():
            recs += sweep(param, ab, name, data, settings, quick=quick, log=log)
        if recs:
            plot(out / f"{param.replace('.', '_')}.png", param, ab, recs)
            log(f"wrote {out / (param.replace('.', '_') + '.png')}")
        records += recs
    write_csv(out / "ablations.csv", records,
              ("param", "value", "dataset", "mAP", "mP@10", "n_queries", "seconds"),
              float_format="{:.4f}")
    config = {"command": sys.argv, "quick": quick, "datasets": names,
              "settings": dataclasses.asdict(settings),
              "params": {p: list(ablations[p].quick_values if quick else ablations[p].values)
                         for p in params},
              "base_config": dataclasses.asdict(_diff(settings) if method is None
                                                else METHODS[method].config_type()),
              "versions": versions()}
    write_json(out / "config.json", config)
    log(f"wrote {out / 'ablations.csv'}, {out / 'config.json'}")
    return records


def main(argv=None):
    p = label_experiment_parser(__doc__, out="results/ablations",
                                quick="2 values per parameter, every 4th item a query, CG <= 200 steps")
    p.add_argument("--params", nargs="+", choices=list(ABLATIONS), default=None,
                   help="parameters to sweep (default: all)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="sweep options of this registered method instead (with --sweep)")
    p.add_argument("--sweep", action="append", default=[], metavar="FIELD=v1,v2,...",
                   help="an option of --method's config and its values (repeatable)")
    args = parse_experiment_args(p, argv)
    if (args.method is None) != (not args.sweep):
        p.error("--method and --sweep go together")
    if args.method is not None and args.params:
        p.error("--params sweeps diffusion's parameters; with --method use --sweep")
    try:
        for spec in args.sweep:
            registry_ablation(args.method, spec)
    except ValueError as exc:
        p.error(str(exc))
    run(args.out, quick=args.quick, datasets=args.datasets, params=args.params,
        data_dir=args.data_dir, method=args.method, sweeps=args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
