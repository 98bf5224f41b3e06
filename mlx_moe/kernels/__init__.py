"""MoE kernels (Metal and CUDA from one source per family) and their backends.

``fused/`` holds the decode kernels (at most 8 tokens), ``prefill/`` the
grouped GEMM (more tokens), ``router/`` the decode routing kernel: each has its kernel sources, a ``sources`` module
that assembles them per platform, and a ``backend`` module that launches them.
``common.py`` holds what both share.

Call :func:`register` once (``mlx_moe/__init__.py`` does) to add the ``fused``
and ``prefill`` backends to :data:`mlx_moe.experts.BACKENDS`; ``auto`` picks
them where their ``available`` holds (GPU default device, supported format).
It also hands the router kernel to :func:`mlx_moe.routing.route`, which uses
it on the same terms.
"""

_registered = False


def register():
    """Register the ``fused`` and ``prefill`` backends with :mod:`mlx_moe.experts`
    and the router kernel with :mod:`mlx_moe.routing` (idempotent)."""
    global _registered
    if _registered:
        return
    from .. import routing
    from ..experts import Backend, register_backend
    from .fused.backend import available, run_fused
    from .prefill import backend as prefill
    from .router import backend as router

    register_backend("fused", Backend(run_fused, available))
    prefill.register()
    routing.register_kernel(router)
    _registered = True
