"""gpt-oss's MXFP4 experts: ``gate_up_proj_blocks [E, 2I, H/32, 16]`` (uint8,
two e2m1 values a byte) with ``gate_up_proj_scales [E, 2I, H/32]`` (e8m0), gate and
up rows interleaved; same for ``down_proj``. This is MLX's ``mxfp4`` bit layout,
so the blocks become MLX quantized weights without touching a value."""

import mlx.core as mx

from ..quantization import QuantizedTensor
from .stacked import split_gate_up


def _container(ctx):
    for c in ctx.containers:
        if f"{c}.gate_up_proj_blocks" in ctx.names:
            return c
    return None


def detect(ctx):
    return _container(ctx) is not None


def _load(ctx, c, base, out_dim, in_dim):
    blocks, scales = f"{c}.{base}_blocks", f"{c}.{base}_scales"
    E = ctx.num_experts
    want_b, want_s = (E, out_dim, in_dim // 32, 16), (E, out_dim, in_dim // 32)
    for name, want in ((blocks, want_b), (scales, want_s)):
        if name not in ctx.names:
            ctx.fail(f"missing tensor '{name}'")
        if ctx.shape(name) != want:
            ctx.fail(f"tensor '{name}' has shape {list(ctx.shape(name))}, expected {list(want)}")
    w = ctx.take(blocks).view(mx.uint32).reshape(E, out_dim, in_dim // 8)
    return QuantizedTensor(w, ctx.take(scales), None, 32, 4, "mxfp4")


def extract(ctx):
    c, H, I = _container(ctx), ctx.hidden, ctx.intermediate
    gu = _load(ctx, c, "gate_up_proj", 2 * I, H)
    rows = (slice(0, None, 2), slice(1, None, 2)) if ctx.gate_up == "interleave" else (slice(0, I), slice(I, None))
    out = {"gate_proj.weight": gu.take_rows(rows[0]), "up_proj.weight": gu.take_rows(rows[1])}
    out["down_proj.weight"] = _load(ctx, c, "down_proj", H, I)
    if f"{c}.gate_up_proj_bias" in ctx.names:
        b = ctx.take(f"{c}.gate_up_proj_bias")
        out["gate_proj.bias"], out["up_proj.bias"] = split_gate_up(ctx, b, -1)
    if f"{c}.down_proj_bias" in ctx.names:
        out["down_proj.bias"] = ctx.take(f"{c}.down_proj_bias")
    return out
