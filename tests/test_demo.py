"""The main job of the README (`make demo`) and the README's API example, run as written."""
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_valid_png, read_csv, unit_clusters
from retrieval_jax import demo


@pytest.fixture(scope="module")
def digits_demo(tmp_path_factory):
    """``demo.run("digits")`` once: (output folder, returned rows, printed text)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = demo.run("digits", out=out)
    return out, rows, printed.getvalue()


@pytest.mark.slow  # the whole demo run (make demo's job): make test-slow
def test_demo_on_digits(digits_demo):
    tmp_path, rows, printed = digits_demo
    assert "digits: 1797 items" in printed
    csv_rows = {r["method"]: r for r in read_csv(tmp_path / "results.csv")}
    assert list(csv_rows) == [r["method"] for r in rows]
    m = {name: float(r["mAP"]) for name, r in csv_rows.items()}
    # diffusion beats kNN search clearly on the digits manifold (65.8 -> 83.6)
    assert m["diffusion, CG to tol 1e-6"] > m["kNN search"] + 10
    # the exact route ranks as converged CG, and its config records the solver it chose
    assert abs(m["diffusion, exact (solver auto)"] - m["diffusion, CG to tol 1e-6"]) < 0.05
    assert "'solver': 'inverse'" in csv_rows["diffusion, exact (solver auto)"]["config"]
    assert_valid_png(tmp_path / "queries.png", 300, 300)


def _ap(row, q, labels):
    """Oxford AP (the trapezoid of Philbin et al. 2007) of item q's ranking, q left out."""
    row = row[row != q]
    r = np.flatnonzero(labels[row] == labels[q])          # 0-based ranks of the positives
    j = np.arange(len(r))
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    p1 = (j + 1) / (r + 1)
    return float(np.sum((p0 + p1) / 2) / (np.sum(labels == labels[q]) - 1))


@pytest.mark.slow  # the whole demo run (make demo's job): make test-slow
def test_demo_shows_the_largest_ap_gains(digits_demo):
    """The pictured queries are the n_show largest AP gains of diffusion over kNN search,
    recomputed here (the two rankings from the methods, AP and the choice by hand)."""
    from retrieval_jax.diffusion import ranking_from_scores
    out, _, _ = digits_demo
    data = demo.load("digits", images=False)
    X, labels = np.asarray(data.X), np.asarray(data.labels)
    n = X.shape[0]
    ids = np.arange(n, dtype=np.int32)
    configs = {label: (method, cfg) for label, method, cfg in demo.default_configs(n, 10)}
    rankings = {}
    for label in ("kNN search", "diffusion, CG to tol 1e-6"):
        method, cfg = configs[label]
        scores = np.asarray(method.search_items(method.build(X, cfg), ids))
        rankings[label] = ranking_from_scores(scores, exclude=ids)
    base, new = rankings["kNN search"], rankings["diffusion, CG to tol 1e-6"]
    gain = np.array([_ap(new[q], q, labels) - _ap(base[q], q, labels) for q in range(n)])
    expected = sorted(range(n), key=lambda q: (-gain[q], q))[:6]

    shown = read_csv(out / "queries.csv")
    assert [int(r["query"]) for r in shown] == expected
    for r in shown:
        q = int(r["query"])
        assert abs(float(r["gain"]) - 100 * gain[q]) < 1e-6
        assert abs(float(r["ap_knn"]) - 100 * _ap(base[q], q, labels)) < 1e-6
        # the picture starts at the first rank where one list is right and the other wrong
        first = next(j for j in range(n) if (labels[base[q, j]] == labels[q]) != (labels[new[q, j]] == labels[q]))
        assert int(r["first_difference"]) == first + 1
    assert gain[expected[-1]] > 0.5            # each pictured query gains over 50 AP points


def test_largest_gains_and_first_difference_by_hand():
    base = np.array([0.5, 0.25, np.nan, 0.75, 0.0])
    new = np.array([0.625, 1.0, 1.0, 0.75, 0.75])
    np.testing.assert_array_equal(demo.largest_gains(base, new, 3), [1, 4, 0])   # 0.75 = 0.75: smaller id first
    np.testing.assert_array_equal(demo.largest_gains(base, new, 10), [1, 4, 0, 3])  # NaN left out
    a = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(demo.first_difference(a, np.array([[1, 3, 2], [4, 5, 6]])), [1, 3])
    with pytest.raises(ValueError, match="same shape"):
        demo.first_difference(a, a[:1])


def test_readme_api_example_runs():
    X, _ = unit_clusters(0, 600, 16, 6, noise=0.3)
    Q = X[:5] + 0.01
    ids = np.arange(5)
    scope = {"X": X, "Q": Q, "ids": ids}
    exec(compile(_readme_block("## The API in one screen"), "README.md", "exec"), scope)
    assert scope["scores"].shape == (5, 600)
    assert np.isfinite(np.asarray(scope["scores"])).all()


def _readme_block(heading: str) -> str:
    text = (Path(REPO) / "README.md").read_text()
    block = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_readme_composable_example_matches_diffuse():
    import jax.numpy as jnp

    from retrieval_jax.diffusion import diffuse, indicator_vectors
    from retrieval_jax.graph import knn_graph, normalize
    X, _ = unit_clusters(1, 300, 12, 5, noise=0.3)
    scope = {"X": X}
    exec(compile(_readme_block("### jit, vmap and grad through the graph and the diffusion"), "README.md", "exec"),
         scope)
    y = indicator_vectors(np.arange(3), 300)
    # the last S is the vmap over gamma: its gamma = 3 row is the plain call
    ref = diffuse(normalize(knn_graph(X, 10, gamma=3.0)), y)
    np.testing.assert_allclose(np.asarray(scope["S"][1]), np.asarray(ref), rtol=1e-4, atol=1e-6)
    w = normalize(knn_graph(X, 10, gamma=3.0, mutual=True))
    np.testing.assert_allclose(scope["W"].to_dense(), w.to_dense(), rtol=1e-5, atol=1e-7)  # same W, other layout
    f = lambda a: float(diffuse(w, y, alpha=a, tol=1e-7, max_iter=1000)[0, 7])  # noqa: E731
    fd = (f(0.9 + 1e-3) - f(0.9 - 1e-3)) / 2e-3
    assert abs(float(scope["ga"]) - fd) < 2e-2 * abs(fd)
    assert scope["gX"].shape == X.shape and bool(jnp.isfinite(scope["gX"]).all())


def test_readme_method_table_is_the_registry():
    """The README's method table names every method of METHODS, in registry order, and no other."""
    from retrieval_jax.methods import METHODS
    text = (Path(REPO) / "README.md").read_text()
    table = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert names == list(METHODS), (names, list(METHODS))
    listing = (Path(REPO) / "docs" / "methods.md").read_text()
    assert set(re.findall(r"^\| `([^`]+)` \| `", listing, re.M)) == set(METHODS)
