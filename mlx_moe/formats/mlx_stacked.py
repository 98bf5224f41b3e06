"""Already in our (= mlx-lm's) layout: ``{ours}.{proj}.weight`` stacked, maybe
quantized with ``scales``/``biases`` (mlx-community folders, our own convert)."""

from ..experts import PROJECTIONS

SUFFIXES = ("weight", "scales", "biases", "bias")


def detect(ctx):
    return f"{ctx.ours}.gate_proj.weight" in ctx.names


def extract(ctx):
    out = {}
    for proj in PROJECTIONS:
        for s in SUFFIXES:
            name = f"{ctx.ours}.{proj}.{s}"
            if name in ctx.names:
                out[f"{proj}.{s}"] = ctx.take(name)
        w = f"{ctx.ours}.{proj}.weight"
        if w in ctx.names and f"{ctx.ours}.{proj}.scales" not in ctx.names:
            found, want = ctx.shape(w), (ctx.num_experts, *ctx.expected(proj))
            if found != want:
                ctx.fail(f"tensor '{w}' has shape {list(found)}, expected {list(want)} [E, out, in]")
    return out
