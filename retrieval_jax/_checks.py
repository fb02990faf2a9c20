"""Input validation shared by every public entry point.

Checks run on the host, at the public boundary, before anything is traced: a
jitted function never sees an array that would turn into a silent NaN. Under a trace
what is static (shapes, dtypes) is checked at trace time, and a few value checks are
staged to run with the computation (`raise_rows_when_run`).
"""
from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(*values) -> bool:
    """True if the values of any of ``values`` cannot be read here: a JAX tracer (we are
    inside jit, vmap or grad), or an array spanning devices of other processes.

    Then only what is static (shapes, dtypes) can be checked; values are left alone and
    checked by the caller's own non-traced (or single-process) entry point.
    """
    return any(isinstance(v, jax.core.Tracer)
               or (isinstance(v, jax.Array) and not v.is_fully_addressable) for v in values)


def raise_rows_when_run(ok, message) -> None:
    """Stage a per-row check that runs with the traced computation (``jax.jit``, ``vmap``,
    ``grad``): ``ok`` bool[...] flags the good rows (a tracer, computed on the device);
    when the compiled call runs, a host callback receives the flags and raises
    ``ValueError(message(count, first))`` for the bad ones, so the call fails with a
    ``JaxRuntimeError`` carrying that message instead of returning NaN. Moves only the
    flags to the host."""
    jax.debug.callback(functools.partial(raise_bad_rows, message=message), ok)


def raise_bad_rows(ok, message) -> None:
    """``ValueError(message(count, first))`` if any of the concrete flags ``ok`` is False."""
    bad = np.flatnonzero(~np.asarray(ok, bool).reshape(-1))
    if bad.size:
        raise ValueError(message(int(bad.size), int(bad[0])))


def check_traced_scalar(value, name: str):
    """A traced parameter: a real scalar (shape () ), returned as is."""
    shape = getattr(value, "shape", ())
    if shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {shape}; vmap over it for several values")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not np.issubdtype(dtype, np.floating):
        raise TypeError(f"{name} must be a real floating-point scalar, got dtype {dtype}")
    return value


# The matrices `as_matrix` has scanned (finite, no zero-norm row), by identity: each is a
# view it returned, so a chain of checked public functions scans a database once however
# many of them it passes through. Views are never handed back for another array (a
# caller's own array, a slice or a copy is scanned again), and a view's entry goes with it.
_SCANNED: "weakref.WeakValueDictionary[int, np.ndarray]" = weakref.WeakValueDictionary()


def as_matrix(x, name: str, *, dtype=np.float32, allow_zero_rows: bool = False) -> np.ndarray:
    """Return ``x`` as a finite 2-D array of ``dtype``; raise a clear error otherwise.

    The result is a view that later calls recognise: passing it on to another checked
    function costs no second scan of its values (`scan_rows` runs once per matrix).
    """
    if isinstance(x, np.ndarray) and x.dtype == dtype and _SCANNED.get(id(x)) is x:
        return x
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic array-likes
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(dtype, copy=False)
    scan_rows(arr, name, allow_zero_rows=allow_zero_rows)
    if allow_zero_rows:
        return arr
    view = arr.view()
    _SCANNED[id(view)] = view
    return view


def scan_rows(arr: np.ndarray, name: str, *, allow_zero_rows: bool = False) -> None:
    """One pass over a matrix's values: NaN / inf rows, and zero-norm rows unless allowed."""
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{name} has NaN or inf in {bad.size} row(s) (first: row {bad[0]}); "
            "clean or drop those descriptors before building an index")
    if not allow_zero_rows:
        norms = np.linalg.norm(arr, axis=1)
        zero = np.flatnonzero(norms == 0)
        if zero.size:
            raise ValueError(
                f"{name} has {zero.size} zero-norm row(s) (first: row {zero[0]}); a zero "
                "descriptor has no direction, drop it or use a different pooling")


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"dimension mismatch: {name_a} has d = {a.shape[1]} but {name_b} has d = {b.shape[1]}; "
            "both must come from the same descriptor pipeline")


def is_int(value) -> bool:
    """True for a Python or numpy integer (bool excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (Python or numpy integer, bool excluded), else a ValueError."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_k(k, n: int, *, name: str = "k", what: str = "database items") -> int:
    if not is_int(k):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"{name} must be positive, got {k}")
    if k > n:
        raise ValueError(f"{name} = {k} exceeds the {n} {what}; choose {name} <= {n}")
    return k


def check_alpha(alpha):
    """alpha in (0, 1) as a float; a traced alpha is returned as is (its value is not checked)."""
    if is_traced(alpha):
        return check_traced_scalar(alpha, "alpha")
    alpha = _as_float(alpha, "alpha")
    if not (0.0 < alpha < 1.0):
        raise ValueError(
            f"alpha must lie strictly between 0 and 1 (got {alpha}): (I - alpha W) is singular "
            "at alpha = 1 and the ranking degenerates to the query itself at alpha = 0")
    if np.float32(alpha) >= 1.0:
        raise ValueError(f"alpha = {alpha!r} rounds to 1 in float32, the dtype the operator is applied in, "
                         "where (I - alpha W) is singular; use alpha <= 1 - 1e-7 (e.g. 0.9999999)")
    return alpha


def check_gamma(gamma):
    """gamma > 0 as a float; a traced gamma is returned as is."""
    if is_traced(gamma):
        return check_traced_scalar(gamma, "gamma")
    gamma = _as_float(gamma, "gamma")
    if not (gamma > 0.0) or not np.isfinite(gamma):
        raise ValueError(f"gamma must be a positive finite power, got {gamma}")
    return gamma


def check_positive(value, name: str):
    """value > 0 and finite as a float; a traced value is returned as is."""
    if is_traced(value):
        return check_traced_scalar(value, name)
    value = _as_float(value, name)
    if not (value > 0.0) or not np.isfinite(value):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """A flag: True or False (numpy's bool too), never a truthy string or number ("no" is
    true in Python)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_tolerance(value, name: str = "tol"):
    """A relative residual tolerance, 0 < tol < 1, as a float (tol >= 1 would stop an
    iterative solver before its first step, at x = 0); a traced value is returned as is."""
    if is_traced(value):
        return check_traced_scalar(value, name)
    value = check_positive(value, name)
    if value >= 1.0:
        raise ValueError(f"{name} is a relative residual tolerance and must be below 1 (at {name} = {value} "
                         "the solver stops before its first step and returns zero scores); e.g. 1e-6")
    return value


def check_nonnegative(value, name: str, what: str = "a finite number >= 0") -> float:
    """A concrete Python float that is finite and >= 0 (booleans refused): an exponent or
    weight that 0 switches off (alpha-QE's alpha, SuperGlobal's beta)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = _as_float(value, name)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def _as_float(value, name: str) -> float:
    """A Python float from a real scalar (Python, numpy or a concrete 0-d JAX array)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number, got the string {value!r}")
    shape = np.shape(value)
    if shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {shape}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from exc


def check_node_ids(ids, n: int, name: str = "ids") -> None:
    """Integer node ids in [0, n): never cast from floats, never clamped. Values are checked
    only when concrete; under a trace the dtype is."""
    dtype = getattr(ids, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must be integer node ids, got dtype {dtype} (no silent cast)")
    if not is_traced(ids):
        i = np.asarray(ids)
        if i.size and (i.min() < 0 or i.max() >= n):
            raise ValueError(f"{name} must lie in [0, {n}), got range [{i.min()}, {i.max()}]")


def check_knn_args(queries, database, k, exclude_self: bool):
    """Validated (queries, database, k) of an exact kNN search (host side)."""
    q = as_matrix(queries, "queries")
    db = as_matrix(database, "database")
    check_same_dim(q, db, "queries", "database")
    n = db.shape[0]
    if exclude_self:
        if q.shape[0] != n:
            raise ValueError("exclude_self=True means the queries are the database, "
                             f"but got {q.shape[0]} queries for {n} database items")
        k = check_k(k, n - 1, what="other database items")
    else:
        k = check_k(k, n)
    return q, db, k


def check_mask(mask, shape, what: str) -> jax.Array:
    """``mask`` as a bool array of exactly ``shape`` (non-zero = valid); ``what`` names the shape."""
    import jax.numpy as jnp

    mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {what} = {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == jnp.bool_ else mask != 0


def check_real_dtype(x, name: str = "x") -> None:
    """A TypeError unless ``x``'s dtype is real: float, int or bool (static: works on tracers)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except Exception as exc:  # ragged nested lists and the like
            raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from exc
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"{name} has complex dtype {dtype}; it must hold real numbers "
                        "(take the real part or the magnitude first)")
    if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}")


def check_finite_values(x, name: str, mask=None,
                        fix: str = "clean or drop those descriptors first, NaN spreads into every result") -> None:
    """A ValueError if a concrete ``x`` holds NaN or inf (where ``mask`` [B, H, W] is true,
    for a map [B, H, W, C]: padded positions never contribute). Traced values (jit, vmap,
    grad) cannot be read and pass unchecked."""
    if is_traced(x) or (mask is not None and is_traced(mask)):
        return
    with jax.ensure_compile_time_eval():     # concrete values inside someone's jit: evaluate now
        finite = jnp.isfinite(x)
        if mask is not None:
            finite = finite | ~mask[..., None]
        if bool(jnp.all(finite)):
            return
    bad = np.argwhere(~np.asarray(finite))
    raise ValueError(f"{name} has {len(bad)} NaN or inf value(s) (first at index {tuple(bad[0].tolist())}); "
                     f"{fix}")
