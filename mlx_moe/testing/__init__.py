"""Test-only helpers: NumPy references, random layers, CPU emulators of the kernels.

Nothing that ``import mlx_moe`` (or ``mlx_moe.generate`` / ``convert`` / ``load``)
reaches may import this package; it is shipped so the tests, ``scripts/`` and
``mlx_moe.bench`` can use it from an installed wheel.
"""
