"""experiments/learn_diffusion.py and experiments/ablation_grid.py in quick mode on COIL-20.

Both run as their command lines would (``main(["--quick", ...])``) into a temporary
folder. Checked: the files they write, that the listwise loss decreases, that the
held-out numbers of the summary agree with an independent re-evaluation through the
public method API (``DIFFUSION.build`` + ``search_items`` with the exact inverse, a host
kNN graph, ``label_map``), and that the grid's one vmapped program gives the loop of
builds' mAP in every cell. This is the end-to-end test of the scripts; the model itself
(``retrieval_jax.training.learned_diffusion``) is tested against references in
tests/training/test_learned_diffusion.py.
"""
import json

import numpy as np
import pytest

from conftest import assert_valid_png, read_csv, require_data

pytestmark = pytest.mark.slow  # runs the two experiments (make test-slow)



def _quick_run(tmp_path_factory, module):
    """``module.main(["--quick", "--out", tmp])`` on COIL-20; the output folder."""
    require_data("coil20")
    out = tmp_path_factory.mktemp(module.__name__.rsplit(".", 1)[-1])
    module.main(["--quick", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    from experiments import learn_diffusion
    return _quick_run(tmp_path_factory, learn_diffusion)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    from experiments import ablation_grid
    return _quick_run(tmp_path_factory, ablation_grid)


def _summary(out):
    return {r["row"]: r for r in read_csv(out / "summary.csv") if r["dataset"] == "coil20"}


def _heldout_map(X, labels, alpha, gamma, k):
    """Label mAP of every item against the others by the exact diffusion (an independent route)."""
    from retrieval_jax.diffusion import ranking_from_scores
    from retrieval_jax.evaluation import label_map
    from retrieval_jax.methods import DIFFUSION, DiffusionConfig
    cfg = DiffusionConfig(k=k, query_k=k, alpha=float(alpha), gamma=float(gamma), solver="inverse")
    state = DIFFUSION.build(np.asarray(X, np.float32), cfg)
    n = X.shape[0]
    scores = np.asarray(DIFFUSION.search_items(state, np.arange(n, dtype=np.int32)))
    return 100 * label_map(ranking_from_scores(scores, exclude=np.arange(n)), labels)


def test_learn_diffusion_outputs_and_loss(learned):
    for name in ("steps.csv", "summary.csv", "config.json", "coil20_params.npz"):
        assert (learned / name).is_file(), name
    assert_valid_png(learned / "learn_diffusion.png")
    steps = read_csv(learned / "steps.csv")
    config = json.loads((learned / "config.json").read_text())
    assert len(steps) == config["settings"]["steps"] >= 5
    loss = np.array([float(r["loss"]) for r in steps])
    held = np.array([float(r["heldout"]) for r in steps])
    assert np.isfinite(loss).all() and np.isfinite(held).all()
    k = max(1, len(loss) // 3)
    assert loss[-k:].mean() < loss[:k].mean() and loss[-1] < loss[0], loss
    assert ((held > 0) & (held <= 100)).all()
    # every run says, with numbers, whether the learned model beats the grid and why
    assert config["explanation"] and any("grid" in line for line in config["explanation"])


def test_learn_diffusion_heldout_numbers_recomputed(learned):
    from retrieval_jax.data import load_coil20
    from retrieval_jax.diffusion import ranking_from_scores
    from retrieval_jax.evaluation import label_map

    rows = _summary(learned)
    p = np.load(learned / "coil20_params.npz")
    k = int(p["k"])
    data = load_coil20(size=32)
    ids = p["test_ids"]
    X, labels = np.asarray(data.X)[ids], np.asarray(data.labels)[ids]
    assert set(labels.tolist()) == set(range(10, 20))         # held-out objects 11-20 only
    n = X.shape[0]

    knn = 100 * label_map(ranking_from_scores(X @ X.T, exclude=np.arange(n)), labels)
    assert abs(knn - float(rows["kNN search (cosine)"]["heldout"])) < 1e-3

    # CG to 1e-5 in the experiment, the exact inverse here: the same ranking up to near-ties
    for row in ("diffusion, start (alpha0, gamma0)", "diffusion, grid best on train",
                "diffusion, grid oracle on held-out"):
        r = rows[row]
        ref = _heldout_map(X, labels, r["alpha"], r["gamma"], k)
        assert abs(ref - float(r["heldout"])) < 0.3, (row, ref, r["heldout"])

    # the learned projection, alpha and gamma, re-applied from the saved parameters
    Z = X @ p["P"]
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    r = rows["learned (alpha, gamma, P)"]
    assert abs(float(r["alpha"]) - float(p["alpha"])) < 1e-4 and abs(float(r["gamma"]) - float(p["gamma"])) < 1e-3
    ref = _heldout_map(Z, labels, p["alpha"], p["gamma"], k)
    assert abs(ref - float(r["heldout"])) < 0.3, (ref, r["heldout"])

    # no grid cell exceeds the ceiling that the held-out graph's components allow
    ceiling = float(rows["component ceiling, held-out graph P = I"]["heldout"])
    assert float(rows["diffusion, grid oracle on held-out"]["heldout"]) <= ceiling + 1e-6
    assert float(rows["diffusion, grid oracle on held-out"]["heldout"]) >= \
        float(rows["diffusion, grid best on train"]["heldout"])


def test_ablation_grid_vmap_equals_loop(grid):
    cells = read_csv(grid / "ablation_grid.csv")
    config = json.loads((grid / "config.json").read_text())
    s = config["settings"]
    n_diff = len(s["alphas"]) * len(s["gammas"])
    assert sum(r["family"] == "diffusion" for r in cells) == n_diff >= 4
    assert sum(r["family"] == "fsr" for r in cells) == len(s["fsr_alphas"]) + len(s["fsr_ts"]) >= 2
    for r in cells:
        m_loop, m_grid = float(r["mAP_loop"]), float(r["mAP_grid"])
        assert 10 < m_loop <= 100, r
        assert abs(m_grid - m_loop) < 1e-3, r                          # mAP in %, float32 rounding
        assert float(r["max_rel_score_diff"]) < 1e-3, r
    timing = read_csv(grid / "timing.csv")
    assert {(t["family"], t["route"]) for t in timing} == {
        (f, r) for f in ("diffusion", "fsr") for r in ("loop", "grid")}
    assert all(float(t["cold_s"]) > 0 for t in timing)
