import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RETRIEVAL_JAX_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]

try:  # CI runs the property tests on a fixed sequence of examples, so a red run reproduces
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a test extra
    pass


# The files that take longest, heaviest first (measured on 2 cores): those of `make test-slow`
# (they hold little else), then those of `make test`. Under pytest-xdist (`--dist loadfile
# --no-loadscope-reorder`) the workers take files in collection order, so these start first and
# the short files fill in at the end: neither worker is left running one long file alone. A file
# missing from the list only runs later; the order of the tests inside a file never changes.
HEAVY_FIRST = ("test_spectral_experiment.py", "test_experiments.py", "test_notebooks.py",
               "test_learn_diffusion.py", "test_finetune.py", "test_feature_experiments.py",
               "test_bench_converged.py", "test_bench_defaults.py", "test_object_discovery.py",
               "test_gss_vs_diffusion.py", "test_baseline_table.py", "test_mining_on_manifolds.py",
               "test_discovery_scale.py", "test_multiprocess.py",
               "test_manifold_ranking.py", "test_backbones.py", "test_composable.py", "test_fsr.py",
               "test_cli.py", "test_build_search.py", "test_mining.py", "test_cluster_aware.py", "test_gss.py",
               "test_cli_pooling.py", "test_components.py", "test_cli_defaults.py",
               "test_preconditioned.py", "test_offline.py", "test_learned_diffusion.py",
               "test_pooling.py", "test_neighbours.py")


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # only in pytest-xdist workers
        return
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def data_dir() -> Path:
    return Path(os.environ.get("RETRIEVAL_JAX_DATA", REPO.parent / "shared" / "data"))


def require_data(sub: str) -> Path:
    """The real data folder ``sub`` of ../shared/data, or skip with the reason."""
    path = data_dir() / sub
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set RETRIEVAL_JAX_DATA to the shared data dir)")
    return path


def unit_clusters(seed: int, n: int, d: int, c: int, noise: float):
    """(float32[n, d] unit rows around c Gaussian centres, int labels[n]), seeded."""
    import numpy as np
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    labels = rng.integers(0, c, n)
    x = centers[labels] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def cli_run(argv):
    """``retrieval_jax.cli.main(argv)`` succeeds (exit status 0)."""
    from retrieval_jax import cli
    assert cli.main([str(a) for a in argv]) == 0


def cli_fails(argv, capsys, match):
    """The CLI exits with status 2 and an error message containing ``match`` (no traceback)."""
    from retrieval_jax import cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "error:" in err and match in err and "Traceback" not in err, err


def read_csv(path):
    """Rows of a CSV file as dicts of strings."""
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_valid_png(path, min_width: int = 100, min_height: int = 100):
    """``path`` is a readable PNG picture of at least the given size."""
    from PIL import Image
    assert Path(path).is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > min_width and im.size[1] > min_height, im.size


def temp_files(directory) -> list[str]:
    """Names of the ``.tmp`` files in ``directory``, sorted (atomic writes' temporaries)."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


@contextlib.contextmanager
def writer_at_half(script: str, *args):
    """A Python subprocess running ``script`` with ``args``, once it has printed "half"
    (mid-write); killed with SIGKILL when the block ends, whatever happens in it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half", proc.stderr.read()
        yield proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
