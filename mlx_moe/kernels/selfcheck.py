"""Self-check of each GPU kernel before ``auto`` first uses it in a process.

The first time ``auto`` could pick a kernel (``fused``, ``prefill`` or the
router kernel), :func:`passed` runs it once on a small random case built from
the call it is about to serve (the same module, so the same dtype, format,
activation and biases: the same kernel templates) and compares it with the
fallback: ``gather`` for the expert kernels, the router's MLX ops for the
router kernel. Compile errors, launch errors, non-finite output or an error
above the tolerance fail the check; the kernel is then off for the rest of the
process (``auto`` takes ``gather`` / the MLX ops) and one ``RuntimeWarning``
names the kernel and the error. The result is cached per kernel: one check per
kernel per process, never per layer.

A first call traced by ``mx.compile`` with the layer's arrays as compile
inputs cannot evaluate anything: that call takes the fallback, unrecorded, and
the next plain call runs the check. (``mlx_moe.decode`` compiles with the
caches as inputs only, so its first decode step checks as usual.)

Only where MLX has a GPU backend (on the CPU no kernel is eligible, nothing is
checked). ``MLX_MOE_SELFCHECK=0`` skips the check (the kernels are trusted).
Random numbers come from fixed keys: the global generator is not advanced.
``mlx_moe.doctor`` runs a fuller check against the NumPy references.
"""

import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from .common import gpu_backend

KERNELS = ("fused", "prefill", "router")

# max |kernel - fallback| / max |fallback|, by activation dtype: the GPU tests'
# bounds against MLX-op oracles (tests/test_kernels_gpu.py LOOP_TOL; bfloat16:
# the 8e-2 that gather and prefill get against the exact reference there, as
# both round h to bfloat16).
TOL = {mx.float32: 2e-3, mx.float16: 1e-2, mx.bfloat16: 8e-2}
PREFILL_TOKENS = 64  # the prefill check's tokens (the kernel serves > 8)
ROUTER_TOKENS = 8
ROUTER_MIN_AGREE = 6  # of 8 rows: bfloat16 logits may swap near-tied experts


@dataclass
class Result:
    kernel: str
    ok: bool
    error: Optional[str] = None  # why it failed
    max_rel_err: Optional[float] = None
    seconds: float = 0.0
    # the call was inside mx.compile / vmap with the layer's arrays as traced
    # inputs: nothing can be evaluated there, so no verdict yet
    deferred: bool = False


RESULTS: Dict[str, Result] = {}  # kernel -> its check's result (this process)
_LOCK = threading.Lock()


def enabled() -> bool:
    return gpu_backend() is not None and os.environ.get("MLX_MOE_SELFCHECK", "1") != "0"


def passed(kernel: str, *call) -> bool:
    """Whether ``kernel`` may serve ``auto``: its check's cached result, the
    check run first on the case of ``call`` (the arguments of the kernel's
    ``available``) when this process has not checked it yet."""
    r = RESULTS.get(kernel)
    if r is not None:
        return r.ok
    if not enabled():
        return True
    with _LOCK:
        r = RESULTS.get(kernel)
        if r is None:
            r = check(kernel, *call)
            if r.deferred:
                return False  # traced call: gather here, the check at the next plain call
            RESULTS[kernel] = r
            if not r.ok:
                fallback = "the MLX ops" if kernel == "router" else "gather"
                warnings.warn(
                    f"mlx_moe: the {kernel} kernel failed its self-check and is off for this "
                    f"process ({fallback} instead): {r.error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return r.ok


def reset():
    """Forget every result (tests): the next use checks again."""
    RESULTS.clear()


def check(kernel: str, *call) -> Result:
    """Run the check of ``kernel`` on the case of ``call`` (never raises)."""
    t0 = time.perf_counter()
    try:
        err, tol = _CHECKS[kernel](*call)
    except Exception as e:  # compile / launch errors, whatever they are
        deferred = "function transformations" in str(e)
        msg = f"{type(e).__name__}: {e}"
        msg = msg if len(msg) <= 2000 else msg[:2000] + " [...]"  # compiler logs run long
        return Result(kernel, False, msg, None, time.perf_counter() - t0, deferred)
    dt = time.perf_counter() - t0
    if not np.isfinite(err):
        return Result(kernel, False, "non-finite output", err, dt)
    if err > tol:
        return Result(kernel, False, f"max relative error {err:.3g} > {tol:g} against the fallback", err, dt)
    return Result(kernel, True, None, err, dt)


# ------------------------------------------------------------------ cases


def _key(i):
    return mx.random.key(1234 + i)


def _expert_inputs(experts, lead, dtype, k, seed):
    """Random ``x [*lead, H]``, softmax weights and distinct ids ``[*lead, k]``."""
    rng = np.random.RandomState(seed)
    E, H = experts.num_experts, experts.hidden_size
    m = int(np.prod(lead)) if lead else 1
    x = mx.random.normal((*lead, H), key=_key(seed)).astype(dtype)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(m)]).reshape(*lead, k)
    w = rng.standard_normal((*lead, k))
    w = np.exp(w) / np.exp(w).sum(-1, keepdims=True)
    return x, mx.array(w.astype(np.float32)).astype(dtype), mx.array(ids.astype(np.uint32))


def _max_rel(y, ref):
    y = np.array(y.astype(mx.float32), np.float64)
    ref = np.array(ref.astype(mx.float32), np.float64)
    if y.shape != ref.shape:
        raise ValueError(f"output shape {y.shape}, expected {ref.shape}")
    ok = np.isfinite(ref)  # where the layer itself is finite (e.g. unfilled pool slots)
    if not np.isfinite(y[ok]).all():
        return float("nan")
    y, ref = y[ok], ref[ok]
    den = np.abs(ref).max() if ref.size else 0.0
    return float(np.abs(y - ref).max() / (den if den > 0 else 1.0)) if ref.size else 0.0


def _check_experts(name, experts, x, ids, lead):
    from ..experts import BACKENDS, run_gather

    xs, w, idx = _expert_inputs(experts, lead, x.dtype, ids.shape[-1], seed=len(lead) + 7)
    y = BACKENDS[name].run(experts, xs, w, idx)
    ref = run_gather(experts, xs, w, idx)
    mx.eval(y, ref)
    return _max_rel(y, ref), TOL.get(x.dtype, 8e-2)


def _check_fused(experts, x, ids):
    # the call's own token count (<= 8): its launch plan
    return _check_experts("fused", experts, x, ids, tuple(x.shape[:-1]))


def _check_prefill(experts, x, ids):
    return _check_experts("prefill", experts, x, ids, (PREFILL_TOKENS,))


def _check_router(gate, router, x):
    from .router import backend

    xs = mx.random.normal((ROUTER_TOKENS, x.shape[-1]), key=_key(3)).astype(x.dtype)
    w, ids = backend.route(gate, router, xs)
    rw, rids = gate(xs) if router is None else router(gate(xs))
    mx.eval(w, ids, rw, rids)
    w, rw = (np.array(a.astype(mx.float32), np.float64).reshape(ROUTER_TOKENS, -1) for a in (w, rw))
    ids, rids = (np.array(a).astype(np.int64).reshape(ROUTER_TOKENS, -1) for a in (ids, rids))
    if w.shape != rw.shape or ids.shape != rids.shape:
        raise ValueError(f"output shapes {w.shape}/{ids.shape}, expected {rw.shape}/{rids.shape}")
    if not np.isfinite(w).all():
        return float("nan"), 0.0
    o, ro = np.argsort(ids, -1), np.argsort(rids, -1)
    ids, w = np.take_along_axis(ids, o, -1), np.take_along_axis(w, o, -1)
    rids, rw = np.take_along_axis(rids, ro, -1), np.take_along_axis(rw, ro, -1)
    agree = (ids == rids).all(-1)
    if agree.sum() < ROUTER_MIN_AGREE:
        raise ValueError(
            f"expert ids differ from the MLX ops' in {int((~agree).sum())} of {ROUTER_TOKENS} rows"
        )
    den = np.abs(rw[agree]).max()
    err = float(np.abs(w[agree] - rw[agree]).max() / (den if den > 0 else 1.0))
    return err, TOL.get(x.dtype, 8e-2)


_CHECKS = {"fused": _check_fused, "prefill": _check_prefill, "router": _check_router}
