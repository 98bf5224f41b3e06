"""``mlx_moe.bench``: mlx-moe against mlx-lm, in the same process, on the same
weights. One module per benchmark (``layer``, ``e2e``, ``load``, ``offload``),
the machine record (``sysinfo``), ``plot`` and the command line (``cli``,
whose docstring is the ``--help`` text)."""
