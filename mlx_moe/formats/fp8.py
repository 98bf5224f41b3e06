"""FP8 e4m3 weights with block-wise ``weight_scale_inv`` (DeepSeek-V3, Qwen3-FP8)."""

import mlx.core as mx


def dequantize_fp8_blocks(weight, scale_inv, block=(128, 128), dtype=mx.bfloat16):
    """``weight [m, n]`` (e4m3 bytes) times one scale per ``block`` tile; partial edge tiles allowed."""
    bm, bn = block
    w = mx.from_fp8(weight, dtype=mx.float32)
    m, n = w.shape
    pm, pn = (-m) % bm, (-n) % bn
    w = mx.pad(w, ((0, pm), (0, pn))).reshape((m + pm) // bm, bm, (n + pn) // bn, bn)
    w = w * scale_inv.astype(mx.float32)[:, None, :, None]
    return w.reshape(m + pm, n + pn)[:m, :n].astype(dtype)


def dequantize_fp8_rest(tensors: dict, block=(128, 128)) -> dict:
    """Dequantize every ``X.weight`` that has an ``X.weight_scale_inv`` beside it."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv") if name.endswith(".weight") else None
        out[name] = value if scale is None else dequantize_fp8_blocks(value, scale, block)
    return out
