"""Fused MoE kernels (Metal and CUDA from one source) and their backend.

Call :func:`register` once (``mlx_moe/__init__.py`` does) to add the ``fused``
backend to :data:`mlx_moe.experts.BACKENDS`; ``auto`` then picks it whenever
:func:`mlx_moe.kernels.fused.available` holds (GPU default device, at most 8
tokens, supported format).
"""

_registered = False


def register():
    """Register the ``fused`` backend with :mod:`mlx_moe.experts` (idempotent)."""
    global _registered
    if _registered:
        return
    from ..experts import Backend, register_backend
    from .fused import available, run_fused

    register_backend("fused", Backend(run_fused, available))
    _registered = True
