"""experiments.reproduce, .ablations and .results_page in --quick mode on digits; every
experiment runs as ``python -m experiments.NAME`` from the repository root."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from conftest import REPO, assert_valid_png, read_csv
from experiments import ablations, reproduce, results_page

EXPERIMENTS = ("ablation_grid", "ablations", "bench_converged", "bench_diffusion", "bench_knn", "bench_million",
               "features_benchmark", "finetune_coil20", "learn_diffusion", "offline_diffusion",
               "regional_diffusion", "reproduce", "results_page", "spectral_benchmark")


def _toy_landmarks(d: Path):
    """A small benchmark in the published layout: .mat with X, Q (d x n), gnd .pkl."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    lab = rng.integers(0, 4, 120)
    X = centres[lab] + 0.7 * rng.normal(size=(120, 16))
    Q = centres + 0.3 * rng.normal(size=(4, 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    scipy.io.savemat(d / "toy.mat", {"X": X.T.astype(np.float32), "Q": Q.T.astype(np.float32)})
    gnd = [{"easy": np.flatnonzero(lab == q)[::2].tolist(),
            "hard": np.flatnonzero(lab == q)[1::2].tolist(), "junk": []} for q in range(4)]
    with open(d / "gnd_toy5k.pkl", "wb") as f:
        pickle.dump({"gnd": gnd, "imlist": [str(i) for i in range(120)],
                     "qimlist": [f"q{i}" for i in range(4)]}, f)


@pytest.mark.slow
def test_reproduce_quick(tmp_path, capsys):
    _toy_landmarks(tmp_path)
    out = tmp_path / "rep"
    assert reproduce.main(["--quick", "--datasets", "digits", "--out", str(out),
                           "--roxford", str(tmp_path / "toy.mat"),
                           "--gnd", str(tmp_path / "gnd_toy5k.pkl")]) == 0
    rows = read_csv(out / "results.csv")
    digits = {r["method"]: r for r in rows if r["dataset"] == "digits"}
    assert len(digits) == len(reproduce.table_rows(reproduce.QUICK, 1797)) == 11
    m = {name.split(" (")[0]: float(r["mAP"]) for name, r in digits.items()}
    assert m["diffusion, CG 20 steps"] > m["kNN search"] + 10
    assert m["diffusion, CG to tol 1e-6"] > m["kNN search"] + 10
    assert m["alpha-QE"] > m["kNN search"] and m["DBA + alpha-QE"] > m["alpha-QE"]
    assert all(float(r["mP@10"]) > 90 for r in digits.values())
    exact = m["diffusion, exact"]
    assert abs(exact - m["diffusion, CG to tol 1e-6"]) < 0.05  # CG converged = exact solve
    assert abs(m["FSR approx"] - exact) < 1.0  # FSR at r = 100 within 1 point of the exact ranking
    assert m["offline diffusion, cosine T=200"] > m["kNN search"] + 5
    assert all(r["n_queries"] == "450" and r["bullseye"] == "" for r in digits.values())
    toy = [r for r in rows if r["dataset"] == "toy5k"]
    assert len(toy) == 11 and all(0 < float(r["mAP_medium"]) <= 100 for r in toy)
    md = (out / "results.md").read_text()
    assert "## digits" in md and "## toy5k" in md and "| kNN search |" in md
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quick"] and cfg["datasets"]["digits"]["settings"]["query_stride"] == 4
    assert [r[0] for r in cfg["datasets"]["digits"]["rows"]] == list(digits)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_reproduce_argument_errors(tmp_path, capsys):
    for argv, match in ([["--roxford", str(tmp_path / "x.mat")], "go together"],
                        [["--roxford", str(tmp_path / "x.mat"), "--gnd", str(tmp_path / "g.pkl")],
                         "does not exist"],
                        [["--datasets", "imagenet"], "invalid choice"]):
        with pytest.raises(SystemExit) as exc:
            reproduce.main(argv)
        assert exc.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.slow
def test_ablations_quick(tmp_path):
    out = tmp_path / "abl"
    assert ablations.main(["--quick", "--datasets", "digits", "--out", str(out)]) == 0
    rows = read_csv(out / "ablations.csv")
    assert {r["param"] for r in rows} == set(ablations.ABLATIONS)
    by = {(r["param"], float(r["value"])): float(r["mAP"]) for r in rows}
    assert by[("alpha", 0.99)] > by[("alpha", 0.9)]      # the manifold helps digits
    assert by[("k", 20)] > by[("k", 5)]                  # k = 5 fragments the graph
    assert abs(by[("rank", 200)] - by[("alpha", 0.99)]) < 1.0  # FSR at r = 200 matches CG diffusion
    assert all(0 < v <= 100 for v in by.values())
    for param in ablations.ABLATIONS:
        assert_valid_png(out / f"{param}.png")
    assert json.loads((out / "config.json").read_text())["params"]["k"] == [5, 20]


def test_ablations_sweep_any_registered_method_by_name(tmp_path, capsys):
    out = tmp_path / "abl"
    assert ablations.main(["--quick", "--datasets", "digits", "--out", str(out),
                           "--method", "alpha-qe", "--sweep", "n=1,5"]) == 0
    rows = read_csv(out / "ablations.csv")
    assert [(r["param"], int(float(r["value"]))) for r in rows] == [("alpha-qe.n", 1), ("alpha-qe.n", 5)]
    assert_valid_png(out / "alpha-qe_n.png")
    # the mAP of n = 1 is that of the method built by hand with that config
    from retrieval_jax.diffusion import ranking_from_scores
    from retrieval_jax.methods import METHODS
    from retrieval_jax.data import load_digits
    data = load_digits()
    qids = np.arange(0, data.X.shape[0], reproduce.QUICK.query_stride, dtype=np.int32)
    m = METHODS["alpha-qe"]
    scores = np.asarray(m.search_items(m.build(data.X, m.config_type(n=1)), qids))
    res = reproduce.label_scores(ranking_from_scores(scores, exclude=qids), np.asarray(data.labels), qids)
    assert abs(float(rows[0]["mAP"]) - 100 * res.map) < 1e-3
    for argv, match in ((["--method", "alpha-qe"], "--method and --sweep go together"),
                        (["--method", "alpha-qe", "--sweep", "m=1"], "an option of alpha-qe"),
                        (["--method", "alpha-qe", "--sweep", "n=x"], "expected an integer"),
                        (["--method", "nope", "--sweep", "n=1"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            ablations.main(["--out", str(out)] + argv)
        assert exc.value.code == 2 and match in capsys.readouterr().err, argv


@pytest.mark.slow
def test_results_page(tmp_path):
    out = tmp_path / "page"
    queries, maps = results_page.run("digits", out, n_queries=3, top=4, log=lambda *a: None)
    assert len(queries) == 3 and maps["diffusion"] > maps["kNN search"]
    assert_valid_png(out / "results_page.png")
    html = (out / "index.html").read_text()
    assert '<img src="results_page.png"' in html and html.count("<tr>") == 4


# ----------------------------------------------------------------------------- as modules
def test_experiments_edit_no_sys_path():
    for name in EXPERIMENTS + ("common",):
        source = (REPO / "experiments" / f"{name}.py").read_text()
        assert "sys.path.insert" not in source and "sys.path.append" not in source, name


# Runs every experiment's module as ``python -m`` does (runpy, as __main__, sys.argv[0] its file)
# with --help, in one fresh interpreter started from the repository root with nothing added to
# sys.path (one interpreter start and jax import instead of one per experiment); prints
# {name: [exit status, stdout, stderr]} as JSON.
_RUN_AS_MODULES = """
import contextlib, io, json, runpy, sys, traceback
out = {}
for name in sys.argv[1:]:
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = ["-m", "--help"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_module("experiments." + name, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    out[name] = [code, stdout.getvalue(), stderr.getvalue()]
sys.__stdout__.write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_runs():
    res = subprocess.run([sys.executable, "-c", _RUN_AS_MODULES, *EXPERIMENTS], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_as_a_module(name, help_runs):
    """``python -m experiments.NAME --help`` from the repository root, nothing on sys.path."""
    code, stdout, stderr = help_runs[name]
    assert code == 0, stderr
    assert stdout.startswith("usage:") and "--help" in stdout


def test_one_experiment_runs_by_python_dash_m():
    """The literal command line, for one experiment."""
    out = subprocess.run([sys.executable, "-m", "experiments.results_page", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "--help" in out.stdout


def test_common_helpers(tmp_path):
    from experiments import common
    calls = []
    out, seconds = common.timed(lambda: calls.append(1) or len(calls), repeat=3)
    assert out == 3 and len(calls) == 3 and seconds >= 0
    _, (seconds, peak) = common.timed_with_peak(lambda: None)
    assert seconds >= 0 and peak > 0 and common.process_peak_rss_mb() >= peak
    path = common.write_csv(tmp_path / "t.csv", [{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}],
                            float_format="{:.2f}")
    assert read_csv(path) == [{"a": "1", "b": "0.50", "c": ""}, {"a": "2", "b": "", "c": "x"}]
    x, labels = common.clustered(50, 8, 5, seed=0)
    assert x.shape == (50, 8) and labels.shape == (50,)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
