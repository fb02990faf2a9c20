"""A method registered from outside the package is a `retrieval-jax rank` method: listed, with its
option in `rank --help`, and run end to end; the built-in methods' options come from their configs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import cli, methods
from retrieval_jax.methods import METHODS, make_method, option, positive_int, register, resolve, unregister
from retrieval_jax.methods.base import checked_database, database_state, similarities
from conftest import cli_fails, cli_run


@dataclasses.dataclass(frozen=True)
class PowerConfig:
    """Inner products raised to a power (an even power ranks by |<q, x>|)."""

    power: int = option(1, "score exponent: <q, x>^power", flag="--toy-power", parse=positive_int)


@database_state
class PowerState:
    database: jax.Array
    config: PowerConfig = PowerConfig()


def _check_sizes(config: PowerConfig, n: int) -> None:
    if config.power > 2 * n:  # a size check of the method's own, to see the CLI use it
        raise ValueError(f"PowerConfig.power = {config.power} exceeds twice the {n} database items")


def _build(database, config: PowerConfig = PowerConfig()) -> PowerState:
    db = checked_database(database, config, PowerConfig, "toy-power")
    _check_sizes(config, db.shape[0])
    return PowerState(database=jnp.asarray(db), config=config)


@jax.jit
def _search(state, queries):
    return similarities(state, queries) ** state.config.power


@jax.jit
def _search_items(state, ids):
    return similarities(state, state.database[ids]) ** state.config.power


@pytest.fixture
def toy():
    method = register(make_method("toy-power", _build, _search, _search_items, PowerConfig,
                                  check_sizes=_check_sizes, summary="inner products to a power"))
    yield method
    unregister("toy-power")


# unit vectors at 0, 40, 100 and 170 degrees: no two |cosines| of a row tie
ANGLES = np.deg2rad([0.0, 40.0, 100.0, 170.0])


@pytest.fixture
def descriptors(tmp_path):
    x = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1).astype(np.float32)
    np.savez(tmp_path / "desc.npz", X=x)
    return tmp_path / "desc.npz", x


def test_register_returns_the_method_and_refuses_a_duplicate(toy):
    assert METHODS["toy-power"] is toy and list(METHODS)[-1] == "toy-power"
    with pytest.raises(ValueError, match="already registered"):
        register(toy)
    with pytest.raises(ValueError, match="already registered"):
        register(methods.DIFFUSION)
    with pytest.raises(TypeError, match="takes a retrieval_jax.methods.Method"):
        register(("knn", None, None, None))
    with pytest.raises(TypeError, match="must be a dataclass"):
        register(toy._replace(name="toy-bad", config_type=dict))
    assert "toy-bad" not in METHODS
    with pytest.raises(KeyError, match="no method named 'nope'"):
        unregister("nope")


def test_registered_method_and_its_option_in_rank_help(toy, capsys):
    with pytest.raises(SystemExit):
        cli.main(["rank", "--help"])
    out = capsys.readouterr().out
    assert "toy-power options (--method toy-power):" in out
    assert "--toy-power TOY_POWER" in out and "score exponent: <q, x>^power (default: 1)" in out
    assert "  toy-power  inner products to a power" in out
    assert "{" + ",".join(METHODS) + "}" in out and list(METHODS)[-1] == "toy-power"  # --method choices
    # every built-in method's options in a group of its own, with defaults
    for name in ("diffusion", "fsr", "alpha-qe", "dba-qe", "offline-diffusion"):
        assert f"{name} options (--method {name}):" in out, name
    assert "--dba-n DBA_N         DBA neighbours (default: 10)" in out


def test_unregistered_method_is_gone_from_the_cli(capsys):
    assert "toy-power" not in METHODS
    with pytest.raises(SystemExit):
        cli.main(["rank", "--help"])
    assert "toy-power" not in capsys.readouterr().out


def _rank(path, out, *extra):
    cli_run(["rank", path, "--items", "--method", "toy-power", "--top", "all", "-o", out, *extra])
    with np.load(out) as r:
        return r["ranking"], r["scores"], str(r["method"])


def test_registered_method_ranks_end_to_end(toy, descriptors, tmp_path):
    path, x = descriptors
    # by hand: angle differences of row i; power 1 ranks by cos, power 2 by cos^2 = |cos|^2
    by_cos = [[0, 1, 2, 3], [1, 0, 2, 3], [2, 1, 3, 0], [3, 2, 1, 0]]
    by_cos2 = [[0, 3, 1, 2], [1, 0, 3, 2], [2, 1, 3, 0], [3, 0, 1, 2]]
    ranking, scores, name = _rank(path, tmp_path / "p1.npz")
    assert name == "toy-power" and ranking.tolist() == by_cos
    ranking, scores, _ = _rank(path, tmp_path / "p2.npz", "--toy-power", 2)
    assert ranking.tolist() == by_cos2
    cos = np.cos(ANGLES[:, None] - ANGLES[None, :])
    np.testing.assert_allclose(scores, np.take_along_axis(cos ** 2, np.asarray(by_cos2), axis=1), atol=1e-6)
    # external queries: the first two database items again, through search
    np.savez(tmp_path / "q.npz", Q=x[:2])
    cli_run(["rank", path, "--queries", tmp_path / "q.npz", "--method", "toy-power", "--toy-power", 2,
             "--top", 2, "-o", tmp_path / "q2.npz"])
    with np.load(tmp_path / "q2.npz") as r:
        assert r["ranking"].tolist() == [row[:2] for row in by_cos2[:2]]


def test_registered_method_checks_through_the_cli(toy, descriptors, tmp_path, capsys):
    path, _ = descriptors
    out = tmp_path / "o.npz"
    cli_fails(["rank", path, "--items", "--method", "toy-power", "--toy-power", 0, "-o", out], capsys,
              "argument --toy-power: expected a positive integer, got 0")
    # the method's check_sizes, its Python name turned into the flag
    cli_fails(["rank", path, "--items", "--method", "toy-power", "--toy-power", 9, "-o", out], capsys,
              "invalid toy-power option: --toy-power 9 exceeds twice the 4 database items")
    graph_methods = ", ".join(name for name, m in METHODS.items() if m.from_graph is not None)  # they grow
    cli_fails(["rank", path, "--items", "--method", "toy-power", "--graph", path, "-o", out], capsys,
              f"--graph is used by the graph methods ({graph_methods}) only")


def test_resolve_chooses_sizes_from_n():
    values, chosen = resolve(methods.FsrConfig, {"k": 7}, 56)
    assert values["k"] == 7 and values["query_k"] == 7 and values["rank"] == 56
    assert [c[0] for c in chosen] == ["query_k", "rank"]
    # offline diffusion's truncate depends on query_k, declared after it: resolved first
    values, _ = resolve(methods.OfflineDiffusionConfig, {"query_k": 30}, 20)
    assert values["truncate"] == 30 and values["k"] == 3
    values, chosen = resolve(methods.DiffusionConfig, {}, 200_000)
    assert values["truncate"] == 2000 and values["solver"] == "cg"
    assert resolve(methods.DiffusionConfig, {"solver": "inverse"}, 200_000)[0]["truncate"] is None
    with pytest.raises(ValueError, match="has no option tpyo"):
        resolve(methods.DiffusionConfig, {"tpyo": 1}, 10)


def test_flags_shared_by_methods_must_parse_alike(toy, capsys):
    other = dataclasses.make_dataclass(
        "OtherConfig", [("power", float, option(1.0, "another exponent", flag="--toy-power"))], frozen=True)
    register(toy._replace(name="toy-other", config_type=other))
    try:
        with pytest.raises(TypeError, match="--toy-power is declared by several methods"):
            cli.build_parser()
    finally:
        unregister("toy-other")
