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
    and the router kernel with :mod:`mlx_moe.routing` (idempotent).

    Each is ``available`` to ``auto`` only once it has passed its self-check
    (:mod:`.selfcheck`: run at its first eligible call in a process, on the
    GPU only). The backend modules' ``available``/``run``/``route`` are looked
    up at call time, so tests can replace them."""
    global _registered
    if _registered:
        return
    from .. import routing
    from ..experts import Backend, register_backend
    from . import selfcheck
    from .fused import backend as fused
    from .prefill import backend as prefill
    from .router import backend as router

    def fused_available(experts, x, ids):
        return fused.available(experts, x, ids) and selfcheck.passed("fused", experts, x, ids)

    def prefill_available(experts, x, ids):
        return prefill.available(experts, x, ids) and selfcheck.passed("prefill", experts, x, ids)

    register_backend("fused", Backend(lambda *a: fused.run_fused(*a), fused_available))
    register_backend("prefill", Backend(lambda *a: prefill.run_backend(*a), prefill_available))
    routing.register_kernel(_CheckedRouter(router, selfcheck))
    _registered = True


class _CheckedRouter:
    """The router kernel backend as :func:`mlx_moe.routing.route` sees it:
    ``available`` only after the self-check passed."""

    def __init__(self, backend, selfcheck):
        self.backend, self.selfcheck = backend, selfcheck

    def available(self, gate, router, x):
        return self.backend.available(gate, router, x) and self.selfcheck.passed("router", gate, router, x)

    def route(self, gate, router, x):
        return self.backend.route(gate, router, x)
