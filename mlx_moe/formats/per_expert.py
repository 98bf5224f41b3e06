"""One tensor per expert: ``{container}.{e}.{proj}.weight`` (HF standard;
Mixtral's ``w1/w3/w2``), optionally FP8 with ``weight_scale_inv``.

Weights are returned as per-expert lists: the loader quantizes each expert before
stacking, so a layer's bf16 experts never exist as one tensor."""

import mlx.core as mx

from .fp8 import dequantize_fp8_blocks


def _container(ctx):
    for c in ctx.containers:
        if any(f"{c}.0.{p}.weight" in ctx.names for p in ctx.proj_names):
            return c
    return None


def detect(ctx):
    return _container(ctx) is not None


def extract(ctx):
    c = _container(ctx)
    out = {}
    for src, proj in ctx.proj_names.items():
        want = ctx.expected(proj)
        missing = [e for e in range(ctx.num_experts) if f"{c}.{e}.{src}.weight" not in ctx.names]
        if missing:
            ctx.fail(f"missing experts for {src}: {missing} (of {ctx.num_experts}) under '{c}'")
        rows = []
        for e in range(ctx.num_experts):
            name = f"{c}.{e}.{src}.weight"
            if ctx.shape(name) != want:
                ctx.fail(f"tensor '{name}' has shape {list(ctx.shape(name))}, expected {list(want)} [out, in]")
            w = ctx.take(name)
            if f"{name}_scale_inv" in ctx.names:
                w = dequantize_fp8_blocks(w, ctx.take(f"{name}_scale_inv"), ctx.fp8_block)
            rows.append(w)
        out[f"{proj}.weight"] = rows
        if f"{c}.0.{src}.bias" in ctx.names:
            out[f"{proj}.bias"] = mx.stack(
                [ctx.take(f"{c}.{e}.{src}.bias") for e in range(ctx.num_experts)]
            )
    return out
