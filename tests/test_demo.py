"""The main job of the README (`make demo`) and the README's API example, run as written."""
import re
from pathlib import Path

import numpy as np

from conftest import REPO, assert_valid_png, read_csv, unit_clusters
from retrieval_jax import demo


def test_demo_on_digits(tmp_path, capsys):
    rows = demo.run("digits", out=tmp_path)
    printed = capsys.readouterr().out
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
