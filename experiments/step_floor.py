"""The floor under a CG step on this CPU: the reference kernels of ``step_floor.c``, compiled
with the machine's C compiler and called through ctypes (no JAX, no Python in the loop).

`compile_kernels` builds ``step_floor.c`` (``cc -O3 -march=native -fopenmp``) into a folder,
atomically, once per source text; `floor_times` times, on the same graph layout and the same
right-hand sides the library's CG runs on:

* ``c_product``: y = x - alpha W x alone, a gather of B-wide rows per neighbour slot;
* ``c_update``: p = r + b p, x += a p, r -= a q, the least vector work any CG step does
  (four [n, B] arrays read, three written);
* ``c_floor`` = ``c_product`` + ``c_update``: what a step costs at best when written by hand;
* ``c_cg``: whole steps of a hand-fused CG (Chronopoulos-Gear form, two passes per step), whose
  iterates `floor_times` also returns so a caller can check it solves the same system.

Used by ``experiments.bench_cg_step``. Not part of the library: the library's CG is JAX, so
it composes with jit, vmap and grad; this file measures how far that loop is from the machine.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from experiments.common import spread, timed_calls

SOURCE = Path(__file__).with_name("step_floor.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def compile_kernels(folder: Path) -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernels, "") or (None, why not): no C compiler, or it failed."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc / gcc) on PATH"
    text = SOURCE.read_bytes()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"step_floor_{hashlib.sha256(text + ' '.join(FLAGS).encode()).hexdigest()[:12]}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if done.returncode:
                return None, f"{cc} failed: {done.stderr.strip()[:300]}"
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    kernels = ctypes.CDLL(str(lib))
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    kernels.ell_product.argtypes = [i32, i32, i32, ptr, ptr, f32, ptr, ptr]
    kernels.ell_product.restype = None
    kernels.update_pass.argtypes = [i32, i32, ptr, ptr, ptr, ptr, ptr, ptr]
    kernels.update_pass.restype = None
    kernels.cg_fused.argtypes = [i32, i32, i32, ptr, ptr, f32, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    kernels.cg_fused.restype = ctypes.c_int
    return kernels, ""


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _contiguous(a, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def floor_times(kernels, indices, weights, alpha: float, rhs, steps: int, repeat: int,
                pause=lambda: None) -> tuple[dict, np.ndarray]:
    """Seconds (`common.spread` of ``repeat`` calls after a warm one: OpenMP starts its threads
    on the first parallel region) of ``steps`` products, update passes and
    fused CG steps on ``rhs`` [n, B] (node axis first) with M = I - alpha W, W given as padded
    neighbour lists (``indices`` int32 [n, K], ``weights`` float32 [n, K]); and the fused
    CG's x [n, B] after ``steps`` steps from x0 = 0."""
    idx, w, b = _contiguous(indices, np.int32), _contiguous(weights, np.float32), _contiguous(rhs, np.float32)
    if b.ndim != 2 or idx.shape != w.shape or idx.shape[0] != b.shape[0]:
        raise ValueError(f"expected indices / weights [n, K] and rhs [n, B], got {idx.shape}, {w.shape}, {b.shape}")
    n, k = idx.shape
    cols = b.shape[1]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError("neighbour ids outside [0, n)")
    state = [np.empty_like(b) for _ in range(5)]
    a = np.full(cols, 0.1, np.float32)
    beta = np.full(cols, 0.5, np.float32)

    def products():
        src, dst = b, state[0]
        for _ in range(steps):
            kernels.ell_product(n, k, cols, _ptr(idx), _ptr(w), alpha, _ptr(src), _ptr(dst))
            src, dst = dst, (state[1] if dst is state[0] else state[0])

    for s in state[:4]:
        s[...] = b

    def updates():   # bounded values: r falls by 0.1 q per step, p stays within 2 |r|
        for _ in range(steps):
            kernels.update_pass(n, cols, _ptr(state[0]), _ptr(state[1]), _ptr(state[2]), _ptr(state[3]),
                                _ptr(a), _ptr(beta))

    def fused():
        if kernels.cg_fused(n, k, cols, _ptr(idx), _ptr(w), alpha, _ptr(b), *(_ptr(s) for s in state), steps):
            raise MemoryError("cg_fused could not allocate its per-column scalars")

    times = {}
    for key, fn in (("c_product", products), ("c_update", updates), ("c_cg", fused)):
        times[key] = spread(timed_calls(fn, repeat)[1])
        pause()
    return times, state[0].copy()
