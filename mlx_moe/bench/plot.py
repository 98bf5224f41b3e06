"""``--plot``: the layer sweep as GB/s against m (needs matplotlib)."""

import math
from typing import Optional

from .common import UsageError


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; the CLI calls it before
    any benchmark runs, so a missing matplotlib costs no benchmark time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    return plt


def plot_layer(rows: list, path, peak_gbs: Optional[float] = None):
    """GB/s vs m (log x), ours (each backend) vs mlx-lm, one panel per shape and bits."""
    plt = pyplot()
    panels = sorted({(r["shape"], r["bits"]) for r in rows}, key=lambda p: (p[0], p[1]))
    if not panels:
        raise UsageError("--plot: no layer rows to draw")
    cols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (shape, bits) in zip(axes.flat, panels):
        sel = [r for r in rows if r["shape"] == shape and r["bits"] == bits]
        for impl in sorted({(r["impl"], r["backend"]) for r in sel}, key=lambda x: x[0] != "mlx-lm"):
            pts = sorted((r["m"], r["chain"]["gbs"]) for r in sel if (r["impl"], r["backend"]) == impl)
            label = "mlx-lm" if impl[0] == "mlx-lm" else f"ours:{impl[1]}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="--" if impl[0] == "mlx-lm" else "-", label=label)
        if peak_gbs:
            ax.axhline(peak_gbs, color="gray", linestyle=":", label=f"peak {peak_gbs:g} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} q{bits}")
        ax.set_xlabel("tokens per call (m)")
        ax.set_ylabel("GB/s of expert weights")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


