"""Fused MoE kernels (Metal and CUDA from one source) and their backend.

Call :func:`register` once (``mlx_moe/__init__.py`` does) to add the ``fused``
(decode, at most 8 tokens) and ``prefill`` (grouped GEMM, more tokens) backends
to :data:`mlx_moe.experts.BACKENDS`; ``auto`` picks them where their
``available`` holds (GPU default device, supported format).
"""

_registered = False


def register():
    """Register the ``fused`` backend with :mod:`mlx_moe.experts` (idempotent)."""
    global _registered
    if _registered:
        return
    from ..experts import Backend, register_backend
    from . import prefill
    from .fused import available, run_fused

    register_backend("fused", Backend(run_fused, available))
    prefill.register()
    _registered = True
