"""What the kernel families (``fused`` decode, ``prefill`` grouped GEMM, ``router``) share."""

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from . import cuda_cache

# Activation name -> the ``ACT`` template id both kernel families switch on
# (fused/moe_common.h and prefill/prefill_act.h).
ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "swiglu_oai": 4}


@lru_cache(maxsize=None)
def gpu_backend() -> Optional[str]:
    """``"metal"``/``"cuda"`` when MLX has that GPU backend, else None.

    An MLX build has at most one of them; Metal is asked first because asking
    ``mx.cuda`` on a Mac build is the path less travelled.
    """
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:  # pragma: no cover
        pass
    try:
        if mx.cuda.is_available():
            return "cuda"
    except Exception:  # pragma: no cover
        pass
    return None


def pow2_ceil(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    p = 1
    while p < n:
        p *= 2
    return p


def off_gpu_reason(what: str) -> Optional[str]:
    """Why ``what`` (a kernel family) cannot run here, if the GPU is missing or not
    the default device; None when it is."""
    if gpu_backend() is None:
        return f"{what} needs an MLX GPU backend (Metal or CUDA); none is available"
    if mx.default_device() != mx.gpu:
        return f"{what} runs on the GPU; the default device is {mx.default_device()}"
    return None


def custom_kernel(backend: str, **spec):
    """The ``mx.fast`` kernel object for ``backend`` ("metal" or "cuda"; CUDA ones
    behind the on-disk cubin cache of ``cuda_cache``), or None for another backend."""
    if backend == "metal":
        return mx.fast.metal_kernel(**spec)
    if backend == "cuda":
        return cuda_cache.wrap(mx.fast.cuda_kernel(**spec), **spec)
    return None
