"""The retrieval-jax CLI end to end (in-process via main(argv), and once via subprocess)."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from retrieval_jax import cli
from retrieval_jax.data import load_digits
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import mean_average_precision
from retrieval_jax.methods import DIFFUSION, DiffusionConfig
from conftest import cli_fails, cli_run


N = 600


run, fails = cli_run, cli_fails


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    full = load_digits()  # the first 600 digits keep the test fast
    data = type(full)(X=full.X[:N], labels=full.labels[:N], class_names=full.class_names)
    np.save(d / "X.npy", data.X)
    np.save(d / "labels.npy", data.labels)
    (d / "labels.txt").write_text("\n".join(f"img{i},{c}" for i, c in enumerate(data.labels)))
    run(["graph", d / "X.npy", "-o", d / "graph.npz", "--k", 10])
    return d, data


def _label_protocol(ranking, labels):
    n = labels.shape[0]
    pos = [np.flatnonzero((labels == labels[q]) & (np.arange(n) != q)) for q in range(n)]
    return mean_average_precision(ranking, pos, [[q] for q in range(n)], ks=(10,))


def test_help_via_subprocess():
    out = subprocess.run([sys.executable, "-m", "retrieval_jax.cli", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for cmd in ("extract", "graph", "rank", "evaluate", "demo"):
        assert cmd in out.stdout


def test_graph_rank_evaluate_round_trip(digits, capsys):
    d, data = digits
    with np.load(d / "graph.npz") as g:
        assert g["indices"].shape[0] == N and int(g["k"]) == 10 and bool(g["mutual"])
    run(["rank", d / "X.npy", "--items", "--graph", d / "graph.npz", "--method", "diffusion",
         "--max-iter", 50, "--top", "all", "-o", d / "diff.npz"])
    run(["evaluate", d / "diff.npz", "--labels", d / "labels.npy", "--ks", 10,
         "-o", d / "diff.json"])
    got = json.loads((d / "diff.json").read_text())
    # the same pipeline in-process; the items diffusion never reaches (score 0) follow
    # the reached ones in similarity order
    state = DIFFUSION.build(data.X, DiffusionConfig(k=10, query_k=10, max_iter=50))
    ids = np.arange(N)
    s = np.asarray(DIFFUSION.search_items(state, ids))
    sims = data.X @ data.X.T
    key = np.where(s > 0, s / s.max(axis=1, keepdims=True), sims / np.abs(sims).max(1, keepdims=True) - 2)
    ref = _label_protocol(ranking_from_scores(key), data.labels)
    assert got["mAP"] == pytest.approx(100 * ref.map, abs=0.05)
    assert got["mP@10"] == pytest.approx(100 * ref.mp[10], abs=0.05)
    with np.load(d / "diff.npz") as r:
        assert r["ranking"].shape == (N, N) and r["ranking"].dtype == np.int32
        assert np.array_equal(r["query_ids"], ids)

    maps = {}
    for method in ("knn", "alpha-qe", "dba-qe"):
        run(["rank", d / "X.npy", "--items", "--method", method, "--qe-n", 5, "--dba-n", 5,
             "--top", "all", "-o", d / f"{method}.npz"])
        # text labels (last comma field) give the same result as the .npy
        run(["evaluate", d / f"{method}.npz", "--labels", d / "labels.txt",
             "-o", d / f"{method}.json"])
        maps[method] = json.loads((d / f"{method}.json").read_text())["mAP"]
    assert got["mAP"] > maps["dba-qe"] > maps["knn"] and maps["alpha-qe"] > maps["knn"], maps
    out = capsys.readouterr().out
    assert "label protocol" in out and "wrote" in out


def test_bullseye_and_truncated_topN(digits, capsys):
    d, _ = digits
    run(["rank", d / "X.npy", "--items", "--method", "diffusion", "--k", 10, "--truncate", 100,
         "--top", 50, "--batch-size", 500, "-o", d / "trunc.npz"])
    run(["evaluate", d / "trunc.npz", "--labels", d / "labels.npy", "--bullseye",
         "-o", d / "trunc.json"])
    res = json.loads((d / "trunc.json").read_text())
    assert 0 < res["bullseye"] <= 100 and res["top"] == 50
    assert "bull's-eye" in capsys.readouterr().out


def _revisitop_files(tmp_path):
    """A small benchmark in the published formats: .mat with X, Q (d x n) and gnd .pkl."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=(5, 16))
    lab = rng.integers(0, 5, 150)
    X = c[lab] + 0.6 * rng.normal(size=(150, 16))
    qlab = np.arange(5)
    Q = c[qlab] + 0.3 * rng.normal(size=(5, 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    scipy.io.savemat(tmp_path / "desc.mat", {"X": X.T.astype(np.float32),
                                             "Q": Q.T.astype(np.float32)})
    gnd = []
    for q in range(5):
        pos = np.flatnonzero(lab == qlab[q])
        gnd.append({"easy": pos[::2].tolist(), "hard": pos[1::2].tolist(), "junk": [],
                    "bbx": [0.0, 0.0, 1.0, 1.0]})
    obj = {"gnd": gnd, "imlist": [f"db{i}" for i in range(150)],
           "qimlist": [f"q{i}" for i in range(5)]}
    with open(tmp_path / "gnd_toy.pkl", "wb") as f:
        pickle.dump(obj, f)
    classic = dict(obj, gnd=[{"ok": g["easy"] + g["hard"], "junk": []} for g in gnd])
    with open(tmp_path / "gnd_classic.pkl", "wb") as f:
        pickle.dump(classic, f)
    return tmp_path


def test_revisitop_mat_and_gnd_protocols(tmp_path, capsys):
    d = _revisitop_files(tmp_path)
    run(["rank", d / "desc.mat", "--queries", d / "desc.mat", "--method", "dba-qe",
         "--qe-n", 3, "--dba-n", 3, "--top", "all", "-o", d / "r.npz"])
    run(["evaluate", d / "r.npz", "--gnd", d / "gnd_toy.pkl", "-o", d / "rev.json"])
    rev = json.loads((d / "rev.json").read_text())
    assert rev["protocol"] == "revisited"
    assert {"easy", "medium", "hard"} <= set(rev) and rev["medium"]["mAP"] > 50
    run(["evaluate", d / "r.npz", "--gnd", d / "gnd_classic.pkl", "-o", d / "cl.json"])
    cl = json.loads((d / "cl.json").read_text())
    assert cl["protocol"] == "classic" and cl["mAP"] == pytest.approx(rev["medium"]["mAP"])
    # out-of-graph queries with the diffusion method, and a graph file from the .mat
    run(["graph", d / "desc.mat", "--k", 8, "-o", d / "g.npz"])
    run(["rank", d / "desc.mat", "--queries", d / "desc.mat", "--graph", d / "g.npz",
         "--query-k", 5, "-o", d / "rd.npz", "--top", "all"])
    run(["evaluate", d / "rd.npz", "--gnd", d / "gnd_toy.pkl"])
    assert "revisited protocol" in capsys.readouterr().out


def test_extract_wiring_with_a_stub_model(tmp_path, monkeypatch, capsys):
    """The extract sub-command passes its options through and writes X and names."""
    import importlib
    backbones = importlib.import_module("retrieval_jax.backbones.efficientnet_lite")
    ext = importlib.import_module("retrieval_jax.descriptors.extraction")

    (tmp_path / "imgs").mkdir()
    seen = {}

    def fake_extract(folder, model, pooling, **kw):
        seen.update(kw, folder=folder, model=model)
        return ext.Extracted(np.eye(3, 4, dtype=np.float32), ("a.png", "b.png", "c.png"), ())

    monkeypatch.setattr(backbones, "load_efficientnet_lite", lambda v: f"model-{v}")
    monkeypatch.setattr(ext, "extract", fake_extract)
    run(["extract", tmp_path / "imgs", "-o", tmp_path / "d.npz", "--model", "lite1",
         "--max-size", 300, "--pooling", "mac"])
    assert seen["model"] == "model-lite1" and seen["max_size"] == 300
    with np.load(tmp_path / "d.npz") as z:
        assert z["X"].shape == (3, 4) and list(z["names"]) == ["a.png", "b.png", "c.png"]
    # the descriptors file is directly usable by the next step (X chosen among X, names)
    run(["rank", tmp_path / "d.npz", "--items", "--method", "knn", "-o", tmp_path / "r.npz"])


def test_extract_without_features_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "imgs").mkdir()
    for name in ("backbones", "backbones.efficientnet_lite", "descriptors", "descriptors.extraction",
                 "descriptors.pooling"):
        monkeypatch.setitem(sys.modules, "retrieval_jax." + name, None)
    fails(["extract", tmp_path / "imgs", "-o", tmp_path / "d.npz"], capsys,
          "feature extraction is unavailable")


def test_demo_subcommand_forwards_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset" in out and out.startswith("usage: retrieval-jax demo ")


def test_bad_arguments(digits, tmp_path, capsys):
    d, _ = digits
    X, g, lab = d / "X.npy", d / "graph.npz", d / "labels.npy"
    out = tmp_path / "o.npz"
    np.save(tmp_path / "Q5.npy", np.ones((3, 5), np.float32))
    (tmp_path / "fake.npy").write_text("not an array")
    np.save(tmp_path / "small.npy", np.eye(20, 64, dtype=np.float32) + 0.1)
    run(["graph", tmp_path / "small.npy", "--k", 3, "-o", tmp_path / "small_g.npz"])
    np.save(tmp_path / "lab_short.npy", np.zeros(10, np.int64))
    run(["rank", X, "--queries", tmp_path / "small.npy", "--method", "knn", "-o",
         tmp_path / "ext.npz"])
    rk = tmp_path / "rk.npz"  # rankings of every item, made here so the test stands alone
    run(["rank", X, "--items", "--method", "knn", "--top", "all", "-o", rk])
    cases = [
        ([], "choose a command"),
        (["nope"], "invalid choice"),
        (["graph", tmp_path / "missing.npy", "-o", out], "does not exist"),
        (["graph", X, "-o", tmp_path / "g.txt"], "should end in .npz"),
        (["graph", X, "-o", tmp_path / "no_dir" / "g.npz"], "output directory"),
        (["graph", X, "-o", out, "--k", 0], "expected a positive integer"),
        (["graph", X, "-o", out, "--k", 5000], "must be smaller than the number"),
        (["graph", X, "-o", out, "--gamma", "nan"], "finite"),
        (["graph", X, "-o", out, "--gamma", -1], "gamma must be a positive"),
        (["graph", tmp_path / "fake.npy", "-o", out], "not a .npy file"),
        (["graph", X], "required: -o/--output"),
        (["rank", X, "-o", out], "one of the arguments --queries --items is required"),
        (["rank", X, "--items", "--queries", X, "-o", out], "not allowed with"),
        (["rank", X, "--items", "--method", "pagerank", "-o", out], "invalid choice"),
        (["rank", X, "--items", "--method", "knn", "--graph", g, "-o", out],
         "--graph is used by the graph methods ("),  # the list grows with METHODS (test_cli_registry)
        (["rank", X, "--items", "--alpha", 1.5, "-o", out], "alpha must lie strictly between"),
        (["rank", X, "--items", "--method", "alpha-qe", "--qe-alpha", -1, "-o", out],
         "alpha must be a finite exponent >= 0"),
        (["rank", X, "--items", "--method", "alpha-qe", "--qe-n", N, "-o", out],
         f"choose --qe-n <= {N - 1}"),
        (["rank", X, "--items", "--method", "dba-qe", "--dba-n", N, "-o", out],
         f"choose --dba-n <= {N - 1}"),
        (["rank", X, "--queries", X, "--query-k", N + 1, "-o", out],
         f"--query-k {N + 1} exceeds the {N} database items"),
        (["rank", X, "--items", "--method", "fsr", "--rank", N + 1, "-o", out],
         f"--rank {N + 1} exceeds"),
        (["rank", X, "--queries", X, "--exclude-self", "-o", out], "--exclude-self goes with --items"),
        (["rank", X, "--items", "--exclude-self", "--top", N, "-o", out], "less the query"),
        (["rank", X, "--items", "--method", "dba-qe", "--dba-n", 0, "-o", out],
         "expected a positive integer"),
        (["rank", X, "--items", "--top", 5000, "-o", out], "exceeds the database size"),
        (["rank", X, "--items", "--top", "many", "-o", out], "expected a positive integer"),
        (["rank", X, "--queries", tmp_path / "Q5.npy", "-o", out], "dimension 5"),
        (["rank", X, "--queries", tmp_path / "nope.npy", "-o", out], "does not exist"),
        (["rank", X, "--items", "--graph", tmp_path / "small_g.npz", "-o", out],
         f"has 20 nodes but {N} were expected"),
        (["rank", X, "--items", "--graph", X, "-o", out], "cannot read graph"),
        (["rank", X, "--items", "--graph", g, "--truncate", 5, "-o", out],
         "--truncate = 5 must be at least --query-k = 10"),
        (["rank", X, "--items", "--k", 3000, "-o", out], "--k 3000 exceeds"),
        (["rank", X, "--key", "Z", "--items", "-o", out], "--key 'Z' does not apply"),
        (["rank", X, "--queries", X, "--queries-key", "Z", "-o", out], "--queries-key 'Z'"),
        (["evaluate", tmp_path / "none.npz", "--labels", lab], "does not exist"),
        (["evaluate", d / "graph.npz", "--labels", lab], "no 'ranking' array"),
        (["evaluate", rk], "one of the arguments --gnd --labels is required"),
        (["evaluate", rk, "--labels", tmp_path / "lab_short.npy"],
         f"has 10 labels but the rankings are over {N}"),
        (["evaluate", tmp_path / "ext.npz", "--labels", lab], "pass --query-labels"),
        (["evaluate", tmp_path / "ext.npz", "--labels", lab, "--query-labels", lab],
         f"{N} query labels for 20 ranked queries"),
        (["evaluate", rk, "--labels", lab, "--ks", 0], "expected a positive integer"),
        (["evaluate", rk, "--labels", lab, "--ks", 5, N], f"--ks {N} exceeds the {N - 1}"),
        (["evaluate", rk, "--labels", lab, "--ukbench", "--query-labels", lab],
         "--ukbench needs every database item"),
        (["evaluate", rk, "--labels", lab, "-o", tmp_path / "r.txt"],
         "should end in .json"),
        (["evaluate", rk, "--gnd", lab], "cannot read ground truth"),
        (["evaluate", rk, "--gnd", lab, "--bullseye"], "--bullseye and --ukbench apply"),
        (["extract", tmp_path / "no_such_folder", "-o", out], "does not exist"),
        (["extract", tmp_path, "-o", out, "--max-size", -3], "expected a positive integer"),
        (["extract", tmp_path, "-o", out, "--model", "resnet"], "invalid choice"),
    ]
    for argv, match in cases:
        fails(argv, capsys, match)


def test_bad_ground_truth_sizes(tmp_path, capsys):
    d = _revisitop_files(tmp_path)
    run(["rank", d / "desc.mat", "--items", "--method", "knn", "--top", 20, "-o", d / "items.npz"])
    fails(["evaluate", d / "items.npz", "--gnd", d / "gnd_toy.pkl"], capsys,
          "rankings have 150 queries but")
    fails(["evaluate", d / "items.npz", "--labels", d / "gnd_toy.pkl"], capsys,
          "cannot read labels")


@pytest.mark.slow  # 30-60 s: make test-slow (make test stays under 10 minutes)
def test_rank_fsr_and_inverse_agree_with_cg(tmp_path):
    """The exact routes of the CLI rank like converged CG."""
    from sklearn.datasets import load_digits
    x = load_digits().data[:300].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "x.npy", x)
    out = {}
    for name, extra in [("cg", ["--max-iter", "2000", "--tol", "1e-7"]), ("inv", ["--solver", "inverse"]),
                        ("auto", ["--solver", "auto"]), ("fsr", ["--method", "fsr", "--rank", "299"])]:
        argv = ["rank", str(tmp_path / "x.npy"), "--items", "--k", "8", "--top", "all",
                "-o", str(tmp_path / f"{name}.npz")] + extra
        assert cli.main(argv) == 0
        out[name] = np.load(tmp_path / f"{name}.npz")["ranking"][:, :10]
    assert (out["inv"] == out["cg"]).mean() > 0.97
    assert (out["auto"] == out["inv"]).all()  # 300 items: small components, so auto inverts
    assert (out["fsr"] == out["cg"]).mean() > 0.97
