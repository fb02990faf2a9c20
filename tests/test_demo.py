"""The main job of the README (`make demo`) and the README's API example, run as written."""
import re
from pathlib import Path

import numpy as np

from conftest import REPO, assert_valid_png, read_csv
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


def _readme_api_snippet() -> str:
    text = (Path(REPO) / "README.md").read_text()
    block = text.split("## The API in one screen", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_readme_api_example_runs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    X = centers[rng.integers(0, 6, 600)] + 0.3 * rng.normal(size=(600, 16))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    Q = X[:5] + 0.01
    ids = np.arange(5)
    scope = {"X": X, "Q": Q, "ids": ids}
    exec(compile(_readme_api_snippet(), "README.md", "exec"), scope)
    assert scope["scores"].shape == (5, 600)
    assert np.isfinite(np.asarray(scope["scores"])).all()
