"""``mlx_moe.doctor``: what this machine runs, and whether each GPU kernel works here.

Prints the platform, MLX's version and device, the expert backends, and for
each kernel (``fused`` decode, ``prefill`` grouped GEMM, ``router``): whether
it compiled, its max relative error against the NumPy reference
(``mlx_moe.testing.reference``), the time of its first call (compile + run)
and of a warm call, and whether ``auto`` uses it. Exits 1 when a kernel fails;
on a machine without an MLX GPU backend the kernels are not applicable and it
exits 0. The command to run first on a new Mac and paste into a bug report.

A diagnostic tool: it imports ``mlx_moe.testing`` (the runtime never does).
"""

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import mlx.core as mx

from . import __version__
from .cli import run
from .kernels.common import gpu_backend

PROG = "mlx_moe.doctor"

# max |err| / max |ref| against the float64 reference, bfloat16 activations:
# tests/test_kernels_gpu.py (fused: REF_TOL; prefill rounds h to bfloat16 like
# gather_qmm: the 8e-2 there; router weights: tests/test_router_kernel.py W_TOL
# relative to weights <= 1, with room for the bfloat16 output).
TOL = {"fused": 1e-2, "prefill": 8e-2, "router": 1e-2}
CASE = dict(E=16, H=512, I=256, k=4)


@dataclass
class KernelReport:
    kernel: str
    status: str  # "ok", "FAIL", "n/a"
    compiled: Optional[bool] = None
    max_rel_err: Optional[float] = None
    tol: Optional[float] = None
    first_s: Optional[float] = None  # compile + run
    warm_s: Optional[float] = None
    note: str = ""


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, time.perf_counter() - t0


def _experts():
    from .testing.reference import random_experts

    return random_experts(CASE["E"], CASE["H"], CASE["I"], "silu", ("affine", 4, 64), mx.bfloat16, seed=1)


def case_fused():
    """``(run, check)``: the kernel call and ``check(y) -> max rel err``."""
    from .kernels.fused import backend as fused
    from .testing.reference import random_inputs, reference, rel_err

    e = _experts()
    x, w, ids = random_inputs(e, 4, CASE["k"], mx.bfloat16, seed=2)
    ref = reference(e, x, w, ids)
    return (lambda: fused.run_fused(e, x, w, ids)), (lambda y: rel_err(y.reshape(ref.shape), ref, "max"))


def case_prefill():
    from .kernels.prefill import backend as prefill
    from .testing.reference import random_inputs, reference, rel_err

    e = _experts()
    x, w, ids = random_inputs(e, 64, CASE["k"], mx.bfloat16, seed=3)
    ref = reference(e, x, w, ids)
    return (lambda: prefill.run_prefill(e, x, w, ids)), (lambda y: rel_err(y.reshape(ref.shape), ref, "max"))


def case_router():
    import numpy as np
    import mlx.nn as nn

    from .kernels.router import backend as router
    from .routing import SoftmaxTopK
    from .testing.reference import reference_router

    H, E, k = CASE["H"], CASE["E"], CASE["k"]
    gate = nn.Linear(H, E, bias=False)
    gate.weight = (mx.random.normal((E, H), key=mx.random.key(4)) / H ** 0.5).astype(mx.bfloat16)
    r = SoftmaxTopK(k)
    x = mx.random.normal((4, H), key=mx.random.key(5)).astype(mx.bfloat16)
    rw, rids = reference_router(gate, r, x)

    def check(out):
        w, ids = (np.array(a.astype(mx.float32) if a.dtype != mx.uint32 else a) for a in out)
        w, ids = w.reshape(rw.shape), ids.reshape(rids.shape).astype(np.int64)
        if not (np.sort(ids, -1) == np.sort(rids, -1)).all():
            raise ValueError(f"expert ids {ids.tolist()} != reference {rids.tolist()}")
        o, ro = np.argsort(ids, -1), np.argsort(rids, -1)
        d = np.take_along_axis(w, o, -1) - np.take_along_axis(rw, ro, -1)
        return float(np.abs(d).max() / np.abs(rw).max())

    return (lambda: router.route(gate, r, x)), check


CASES: dict = {"fused": case_fused, "prefill": case_prefill, "router": case_router}


def uses_it(kernel) -> str:
    """Whether ``auto`` may pick the kernel here (before its self-check)."""
    if kernel == "prefill" and gpu_backend() == "metal" and os.environ.get("MLX_MOE_PREFILL_METAL") != "1":
        return "auto: no (Metal prefill is opt-in: MLX_MOE_PREFILL_METAL=1)"
    if kernel == "router":
        from .kernels.router import backend as router

        if not router.ENABLED:
            return "auto: no (router kernel disabled)"
    return "auto: yes"


def check_kernel(kernel: str, make: Callable) -> KernelReport:
    r = KernelReport(kernel, "FAIL", tol=TOL[kernel])
    try:
        call, check = make()
        out, r.first_s = _timed(call)
        r.compiled = True
        _, r.warm_s = _timed(call)
        r.max_rel_err = check(out)
    except Exception as e:  # whatever the kernel does, report it
        r.note = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if r.compiled is None:
            r.compiled = False
        return r
    if not r.max_rel_err <= r.tol:  # NaN fails too
        r.note = f"error {r.max_rel_err:.3g} > {r.tol:g}"
        return r
    r.status = "ok"
    r.note = uses_it(kernel)
    return r


def check_kernels() -> List[KernelReport]:
    if gpu_backend() is None:
        return [KernelReport(k, "n/a", note="not applicable (no GPU backend in this MLX)") for k in CASES]
    from .kernels import register

    register()
    with mx.stream(_device()):
        return [check_kernel(k, make) for k, make in CASES.items()]


def _device():
    return mx.gpu


def environment() -> List[str]:
    from . import experts
    from .kernels import register

    register()
    try:
        import mlx_lm

        lm = getattr(mlx_lm, "__version__", "?")
    except Exception as e:  # pragma: no cover
        lm = f"not importable ({e})"
    gpu = gpu_backend()
    dev = mx.default_device()
    info = ""
    if gpu is not None:
        try:
            di = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            info = f" ({di.get('device_name', di.get('architecture', '?'))}, memory {di.get('memory_size', 0) / 2**30:.0f} GiB)"
        except Exception:
            pass
    return [
        f"platform   {platform.platform()} ({platform.machine()}), Python {platform.python_version()}",
        f"mlx        {mx.__version__}; default device {dev}; GPU backend {gpu or 'none'}{info}",
        f"mlx-lm     {lm}",
        f"mlx_moe    {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"backends   registered: {', '.join(sorted(experts.BACKENDS))}; auto order: {', '.join(experts.AUTO_ORDER)}",
    ]


def _fmt(v, spec, width):
    return f"{'-' if v is None else format(v, spec):>{width}}"


def table(reports: List[KernelReport]) -> List[str]:
    rows = [f"{'kernel':<8} {'status':<6} {'compiled':<8} {'max rel err':>11} {'tol':>6} "
            f"{'first call':>10} {'warm':>9}  note"]
    for r in reports:
        comp = "-" if r.compiled is None else ("yes" if r.compiled else "no")
        first = "-" if r.first_s is None else f"{r.first_s * 1e3:.1f} ms"
        warm = "-" if r.warm_s is None else f"{r.warm_s * 1e3:.2f} ms"
        rows.append(f"{r.kernel:<8} {r.status:<6} {comp:<8} {_fmt(r.max_rel_err, '.2e', 11)} "
                    f"{_fmt(r.tol, '.0e', 6)} {first:>10} {warm:>9}  {r.note}")
    return rows


def doctor(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true", help="tracebacks of unexpected errors")
    p.parse_args(argv)
    for line in environment():
        print(line)
    reports = check_kernels()
    print()
    for line in table(reports):
        print(line)
    failed = [r.kernel for r in reports if r.status == "FAIL"]
    if failed:
        print(f"\n{PROG}: {len(failed)} kernel(s) failed: {', '.join(failed)} "
              "(auto falls back to gather / the MLX ops for them)", file=sys.stderr)
        raise SystemExit(1)


def main(argv=None):
    sys.exit(run(PROG, doctor, argv))


if __name__ == "__main__":
    main()
