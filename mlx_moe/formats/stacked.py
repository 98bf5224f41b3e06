"""Experts stacked per projection in one tensor: ``{container}.gate_up_proj``
(gate and up halves concatenated, or interleaved as gpt-oss does) and
``{container}.down_proj``, in either orientation, with optional ``*_bias``.

Orientation comes from the config's sizes; only when they cannot decide (H == I
for down_proj, H == 2I for gate_up_proj) does the architecture's convention
apply — never a guess from a square shape.
"""

import mlx.core as mx


def _find(ctx, base):
    for c in ctx.containers:
        for name in (f"{c}.{base}", f"{c}.{base}.weight"):
            if name in ctx.names:
                return c, name
    return None, None


def detect(ctx):
    return _find(ctx, "gate_up_proj")[1] is not None or _find(ctx, "gate_proj")[1] is not None


def orient(ctx, name, out_dim, in_dim, tie):
    """Return the tensor as ``[E, out, in]``; ``tie`` decides a square shape."""
    E, shape = ctx.num_experts, ctx.shape(name)
    if len(shape) != 3 or shape[0] != E or sorted(shape[1:]) != sorted((out_dim, in_dim)):
        ctx.fail(
            f"tensor '{name}' has shape {list(shape)}, expected [{E}, {out_dim}, {in_dim}] "
            f"or [{E}, {in_dim}, {out_dim}]"
        )
    w = ctx.take(name)
    layout = tie if out_dim == in_dim else ("out_in" if shape[1:] == (out_dim, in_dim) else "in_out")
    return (mx.contiguous(w.swapaxes(-1, -2)) if layout == "in_out" else w), layout


def split_gate_up(ctx, t, axis):
    """Split the 2I axis into (gate, up)."""
    I = ctx.intermediate
    idx = lambda sl: tuple([slice(None)] * (axis % t.ndim) + [sl])
    if ctx.gate_up == "interleave":
        return mx.contiguous(t[idx(slice(0, None, 2))]), mx.contiguous(t[idx(slice(1, None, 2))])
    return mx.contiguous(t[idx(slice(0, I))]), mx.contiguous(t[idx(slice(I, None))])


def _square_tie(ctx, name, out_dim, in_dim):
    """Orientation a non-square tensor reveals, for its square sibling."""
    shape = ctx.shape(name)[1:] if name else None
    if name is None or out_dim == in_dim or len(shape) != 2:
        return None
    return "out_in" if shape == (out_dim, in_dim) else "in_out"


def extract(ctx):
    H, I = ctx.hidden, ctx.intermediate
    out = {}
    c, gu = _find(ctx, "gate_up_proj")
    cd, down = _find(ctx, "down_proj")
    # A square tensor follows the orientation its non-square sibling reveals.
    tie = _square_tie(ctx, down, H, I) or _square_tie(ctx, gu, 2 * I, H) or ctx.orientation
    if gu is not None:
        w, _ = orient(ctx, gu, 2 * I, H, tie)
        out["gate_proj.weight"], out["up_proj.weight"] = split_gate_up(ctx, w, -2)
        if f"{c}.gate_up_proj_bias" in ctx.names:
            b = ctx.take(f"{c}.gate_up_proj_bias")
            out["gate_proj.bias"], out["up_proj.bias"] = split_gate_up(ctx, b, -1)
    else:
        for proj in ("gate_proj", "up_proj"):
            _, name = _find(ctx, proj)
            if name is not None:
                out[f"{proj}.weight"], tie = orient(ctx, name, I, H, tie)
    if down is not None:
        out["down_proj.weight"], _ = orient(ctx, down, H, I, tie)
        if f"{cd}.down_proj_bias" in ctx.names:
            out["down_proj.bias"] = ctx.take(f"{cd}.down_proj_bias")
    return out
