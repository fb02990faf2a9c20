"""experiments/gss_vs_diffusion.py in quick mode on COIL-20 (held-out classes).

Run as its command line would (``main(["--quick", "--out", tmp])``). Checked: the files it
writes; that every choice is the best *training* score of its grid (never a test one);
that the best-on-test rows bound the chosen ones; and that the reported test numbers of
kNN, the chosen diffusion cell and the chosen GSS snapshot agree with an independent
re-evaluation through the public method API (``GSS.build`` with the chosen epochs and
learning rate, ``DIFFUSION.build`` with the exact inverse, ``label_map``).
"""
import numpy as np
import pytest

from conftest import assert_valid_png, read_csv, require_data

pytestmark = pytest.mark.slow  # trains GSS on both halves of COIL-20 (make test-slow)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require_data("coil20")
    from experiments import gss_vs_diffusion
    out = tmp_path_factory.mktemp("gss_vs_diffusion")
    gss_vs_diffusion.main(["--quick", "--out", str(out)])
    return out


def _map(scores, labels):
    from retrieval_jax.diffusion import ranking_from_scores
    from retrieval_jax.evaluation import label_map
    n = len(labels)
    return 100 * label_map(ranking_from_scores(np.asarray(scores), exclude=np.arange(n)), labels)


def test_outputs_and_choices_on_train_only(run):
    for name in ("summary.csv", "summary.md", "gss_curves.csv", "diffusion_grid.csv", "config.json"):
        assert (run / name).is_file(), name
    assert_valid_png(run / "gss_vs_diffusion.png")
    rows = {r["row"]: r for r in read_csv(run / "summary.csv")}
    assert {"kNN search (cosine)", "diffusion, grid chosen on train", "diffusion, best on test (upper bound)",
            "GSS untrained (0 epochs)", "GSS, chosen on train", "GSS, best on test (not a choice)"} <= set(rows)
    curves = read_csv(run / "gss_curves.csv")
    assert len(curves) == 4 and all(np.isfinite(float(c["test"])) for c in curves)
    best = max(curves, key=lambda c: float(c["train"]))
    chosen = rows["GSS, chosen on train"]
    assert chosen["setting"] == f"lr={float(best['lr']):g}, epochs={best['epochs']}"
    assert float(chosen["test"]) == pytest.approx(float(best["test"]), abs=1e-3)
    assert float(rows["GSS, best on test (not a choice)"]["test"]) >= float(chosen["test"]) - 1e-9
    grid = read_csv(run / "diffusion_grid.csv")
    assert len(grid) == 6
    cell = max(grid, key=lambda c: float(c["train"]))
    dif = rows["diffusion, grid chosen on train"]
    assert dif["setting"] == f"k={cell['k']}, alpha={float(cell['alpha']):g}"
    assert float(rows["diffusion, best on test (upper bound)"]["test"]) >= float(dif["test"]) - 1e-9
    # the objective decreases along the run on both halves
    objective = [float(c["objective_train"]) for c in curves[1:]]
    assert objective == sorted(objective, reverse=True)
    text = (run / "summary.md").read_text()
    assert "coil20: GSS (chosen on train)" in text
    assert ("beats diffusion" in text) != ("does not beat diffusion" in text)


def test_reported_test_numbers_match_an_independent_run(run):
    from experiments import learn_diffusion
    from retrieval_jax.methods import DIFFUSION, GSS, DiffusionConfig, GssConfig
    rows = {r["row"]: r for r in read_csv(run / "summary.csv")}
    sp = learn_diffusion.load_coil20_split(learn_diffusion.Settings(item_stride=2))
    X, y = sp.X_test, sp.y_test
    ids = np.arange(len(y), dtype=np.int32)
    assert _map(X @ X.T, y) == pytest.approx(float(rows["kNN search (cosine)"]["test"]), abs=1e-3)
    k, alpha = (part.split("=")[1] for part in rows["diffusion, grid chosen on train"]["setting"].split(", "))
    state = DIFFUSION.build(X, DiffusionConfig(k=int(k), alpha=float(alpha), solver="inverse"))
    assert _map(DIFFUSION.search_items(state, ids), y) == pytest.approx(
        float(rows["diffusion, grid chosen on train"]["test"]), abs=1e-3)
    lr, epochs = (part.split("=")[1] for part in rows["GSS, chosen on train"]["setting"].split(", "))
    gss = GSS.build(X, GssConfig(epochs=int(epochs), lr=float(lr)))
    assert _map(GSS.search_items(gss, ids), y) == pytest.approx(float(rows["GSS, chosen on train"]["test"]),
                                                                abs=1e-3)
