"""The ``fused`` MoE backend: two custom kernels for decode (m <= 8 tokens).

Kernel A (``moe_gate_up``) reads each selected expert's gate and up rows,
dequantizes in registers, dots them with the token, adds the expert biases and
applies the activation: ``h [m * k, I]`` (float32). Kernel B (``moe_down``)
computes every output row as the top-k weighted sum of the k experts' down rows
applied to ``h``, accumulated in float32: ``y [m, H]`` in the input dtype.

Both run through ``mx.fast.metal_kernel`` on Macs and ``mx.fast.cuda_kernel``
on NVIDIA GPUs, from the same source (``sources.py`` beside this module). The
call path is lazy: no ``eval``/``item``; kernel objects and launch plans are
cached.
"""

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx

from ..common import ACT_IDS, custom_kernel, gpu_backend, off_gpu_reason, pow2_ceil
from . import sources

MAX_TOKENS = 8

XK_IDS = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
FLOAT_WK = {mx.float32: 2, mx.float16: 3, mx.bfloat16: 4}
AFFINE_BITS = (4, 8)
AFFINE_GROUPS = (32, 64, 128)

# Launch shape. lpr=None picks lanes-per-row from the row length.
DEFAULT_TUNING = {
    "a": {"lpr": None, "rps": 2, "wpb": 4},
    "b": {"lpr": None, "rb": 4, "wpb": 4},
}
TUNING = {k: dict(v) for k, v in DEFAULT_TUNING.items()}


class Unsupported(ValueError):
    """The fused backend cannot run this call (the message says why)."""


# ------------------------------------------------------------ kernel objects

_KERNEL_OBJECTS: Dict[Tuple[str, str], object] = {}


def kernel_object(name: str, backend: str):
    """The (cached) ``mx.fast`` kernel object for one kernel and backend.

    Templates (dtype, bits, group, activation, shapes, launch shape) are passed
    per call; MLX compiles and caches each template set once.
    """
    key = (name, backend)
    k = _KERNEL_OBJECTS.get(key)
    if k is None:
        common = dict(
            name=name,
            input_names=sources.input_names(name),
            output_names=sources.output_names(name),
            source=sources.minify(sources.source(name, backend)),
            header=sources.minify(sources.header(backend)),
            ensure_row_contiguous=True,
        )
        k = custom_kernel(backend, **common)
        if k is None:
            raise Unsupported(f"no fused kernels for backend '{backend}'")
        _KERNEL_OBJECTS[key] = k
    return k


# --------------------------------------------------------------------- plans


def proj_format(layer, what) -> Tuple[int, int, int]:
    """``(WK, BITS, GS)`` of a projection, or Unsupported."""
    mode = getattr(layer, "mode", None)
    if hasattr(layer, "scales"):
        bits, gs = layer.bits, layer.group_size
        if mode == "affine":
            if bits not in AFFINE_BITS or gs not in AFFINE_GROUPS:
                raise Unsupported(
                    f"fused kernels support affine bits {AFFINE_BITS} with group "
                    f"size {AFFINE_GROUPS}; {what} has bits={bits} group={gs}"
                )
            if layer.get("biases") is None:
                raise Unsupported(f"{what}: affine quantization without biases")
            return 0, bits, gs
        if mode == "mxfp4":
            return 1, 4, 32
        raise Unsupported(f"fused kernels do not support quantization mode '{mode}' ({what})")
    wk = FLOAT_WK.get(layer.weight.dtype)
    if wk is None:
        raise Unsupported(f"{what}: weight dtype {layer.weight.dtype} not supported")
    return wk, 16, 0


def _values_per_chunk(wk, bits):
    return 128 // bits if wk <= 1 else 8


def _check_in_dim(fmt, in_dim, what):
    wk, bits, gs = fmt
    vpc = _values_per_chunk(wk, bits)
    if in_dim % vpc or in_dim % 8:
        raise Unsupported(
            f"{what}: input dim {in_dim} must be a multiple of {max(vpc, 8)} "
            "(whole 16-byte words per row)"
        )
    if wk <= 1 and in_dim % gs:
        raise Unsupported(f"{what}: input dim {in_dim} not a multiple of group {gs}")
    return in_dim // vpc  # chunks per row


def _lpr(chunks, iters, override):
    if override:
        return int(override)
    return max(4, min(32, pow2_ceil(-(-chunks // iters))))


@dataclass
class Plan:
    template_a: list
    grid_a: tuple
    tg_a: tuple
    template_b: list
    grid_b: tuple
    tg_b: tuple
    m: int
    k: int
    hidden: int
    inter: int


_PLANS: Dict[tuple, Plan] = {}
# (id(experts), x dtype, H, k, ids.size) -> (module weakrefs, gate and down
# weight arrays, activation, plan): a few identity checks instead of the full
# key; a changed module, weight array or activation falls back to _PLANS.
_FAST: Dict[tuple, tuple] = {}


def _plan_key(experts, x, ids):
    g, u, d = experts.gate_proj, experts.up_proj, experts.down_proj
    return (
        x.dtype, x.shape[-1], ids.shape[-1], ids.size, experts.activation_name,
        type(g), g.weight.dtype, g.weight.shape, getattr(g, "bits", 0),
        getattr(g, "group_size", 0), getattr(g, "mode", None),
        type(u), u.weight.dtype, u.weight.shape, getattr(u, "bits", 0),
        getattr(u, "group_size", 0), getattr(u, "mode", None),
        type(d), d.weight.dtype, d.weight.shape, getattr(d, "bits", 0),
        getattr(d, "group_size", 0), getattr(d, "mode", None),
        "bias" in g, "bias" in u, "bias" in d,
    )


def plan(experts, x, ids) -> Plan:
    """The launch plan of this call (cached), or Unsupported saying why."""
    # item access: nn.Module attribute lookup is several times slower
    g, u, d = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    fast = (id(experts), x.dtype, x.shape[-1], ids.shape[-1], ids.size)
    hit = _FAST.get(fast)
    if hit is not None:
        refs, gw, dw, act, p = hit
        if (refs[0]() is g and refs[1]() is u and refs[2]() is d
                and g["weight"] is gw and d["weight"] is dw
                and experts.activation_name == act):
            return p
    key = _plan_key(experts, x, ids)
    p = _PLANS.get(key)
    if p is None:
        p = _make_plan(experts, x, ids)
        _PLANS[key] = p
    _FAST[fast] = ((weakref.ref(g), weakref.ref(u), weakref.ref(d)),
                   g["weight"], d["weight"], experts.activation_name, p)
    return p


def _make_plan(experts, x, ids) -> Plan:
    if x.dtype not in XK_IDS:
        raise Unsupported(f"activations of dtype {x.dtype} not supported")
    if experts.activation_name not in ACT_IDS:
        raise Unsupported(f"activation '{experts.activation_name}' not supported")
    H = x.shape[-1]
    K = ids.shape[-1]
    m = ids.size // K if K else 0
    if K == 0 or m * H != x.size:
        raise Unsupported(f"x {x.shape} and topk_ids {ids.shape} do not match")
    if m > MAX_TOKENS:
        raise Unsupported(f"fused kernels are for decode: {m} tokens > {MAX_TOKENS}")
    g, u, d = experts.gate_proj, experts.up_proj, experts.down_proj
    E, I = experts.num_experts, experts.intermediate_size
    if g.input_dims != H or d.output_dims != H:
        raise Unsupported(f"expert input dims {g.input_dims} != hidden size {H}")
    fa = proj_format(g, "gate_proj")
    if proj_format(u, "up_proj") != fa or u.weight.dtype != g.weight.dtype:
        raise Unsupported("gate_proj and up_proj must share one format")
    fb = proj_format(d, "down_proj")
    has_bias_a = "bias" in g
    if ("bias" in u) != has_bias_a:
        raise Unsupported("gate_proj and up_proj must both have a bias or neither")
    has_bias_b = "bias" in d
    nca = _check_in_dim(fa, H, "gate/up_proj")
    ncb = _check_in_dim(fb, I, "down_proj")

    ta, tb = TUNING["a"], TUNING["b"]
    lpr_a = _lpr(nca, 2, ta.get("lpr"))
    rps, wpb_a = int(ta["rps"]), int(ta["wpb"])
    lpr_b = _lpr(ncb, 3, tb.get("lpr"))
    # Give every lane subgroup a top-k slot when k is small.
    if not tb.get("lpr"):
        lpr_b = max(lpr_b, min(32, pow2_ceil(-(-32 // K))))
    rb, wpb_b = int(tb["rb"]), int(tb["wpb"])

    rows_per_block_a = wpb_a * (32 // lpr_a) * rps
    nbx_a = -(-I // rows_per_block_a)
    template_a = [
        ("XK", XK_IDS[x.dtype]), ("WK", fa[0]), ("BITS", fa[1]),
        ("GS", fa[2] or H), ("ACT", ACT_IDS[experts.activation_name]),
        ("HAS_BIAS", int(has_bias_a)), ("IN_DIM", H), ("OUT_DIM", I),
        ("TOPK", K), ("N_EXPERTS", E), ("LPR", lpr_a), ("RPS", rps),
        ("WPB", wpb_a),
    ]
    rows_per_block_b = wpb_b * rb
    nbx_b = -(-H // rows_per_block_b)
    template_b = [
        ("WK", fb[0]), ("BITS", fb[1]), ("GS", fb[2] or I),
        ("HAS_BIAS", int(has_bias_b)), ("IN_DIM", I), ("OUT_DIM", H),
        ("TOPK", K), ("N_EXPERTS", E), ("LPR", lpr_b), ("RB", rb),
        ("WPB", wpb_b), ("OT", x.dtype),
    ]
    return Plan(
        template_a=template_a,
        grid_a=(nbx_a * wpb_a * 32, m * K, 1),
        tg_a=(wpb_a * 32, 1, 1),
        template_b=template_b,
        grid_b=(nbx_b * wpb_b * 32, m, 1),
        tg_b=(wpb_b * 32, 1, 1),
        m=m, k=K, hidden=H, inter=I,
    )


def set_tuning(a=None, b=None):
    """Override launch shapes (for benchmarks); clears cached plans."""
    if a:
        TUNING["a"].update(a)
    if b:
        TUNING["b"].update(b)
    _PLANS.clear()
    _FAST.clear()


def reset_tuning():
    for k, v in DEFAULT_TUNING.items():
        TUNING[k] = dict(v)
    _PLANS.clear()
    _FAST.clear()


# ------------------------------------------------------------------- backend


def why_not(experts, x, ids) -> Optional[str]:
    """None when the fused backend can run this call here, else the reason."""
    reason = off_gpu_reason("the fused MoE backend")
    if reason is not None:
        return reason
    try:
        plan(experts, x, ids)
    except Unsupported as e:
        return str(e)
    return None


def available(experts, x, ids) -> bool:
    return why_not(experts, x, ids) is None


def _inputs(layer, dummy):
    w = layer["weight"]
    s = layer.get("scales")
    b = layer.get("biases")
    bias = layer.get("bias")
    return (
        w,
        dummy if s is None else s,
        dummy if b is None else b,
        dummy if bias is None else bias,
    )


def run_fused(experts, x, weights, ids):
    """``y [..., H]`` (x's dtype) from the two fused kernels."""
    reason = why_not(experts, x, ids)
    if reason is not None:
        raise Unsupported(f"MoE backend 'fused' cannot run: {reason}")
    p = plan(experts, x, ids)
    ids = _ids(ids)
    return _down(experts, _gate_up(experts, x, ids, p), x, weights, ids, p)


def _ids(ids):
    return ids if ids.dtype in (mx.uint32, mx.int32) else ids.astype(mx.uint32)


# The kernels index flat row-major memory, so x [..., H], ids and weights
# [..., k] go in with their own shapes (no reshape ops on the hot path).


def _gate_up(experts, x, ids, p):
    # Inputs a configuration does not use are never read; pass x for them.
    gw, gs, gb, gbias = _inputs(experts["gate_proj"], x)
    uw, us, ub, ubias = _inputs(experts["up_proj"], x)
    return kernel_object("moe_gate_up", gpu_backend())(
        inputs=[x, ids, gw, gs, gb, uw, us, ub, gbias, ubias],
        template=p.template_a,
        grid=p.grid_a,
        threadgroup=p.tg_a,
        output_shapes=[(p.m * p.k, p.inter)],
        output_dtypes=[mx.float32],
    )[0]


def _down(experts, h, x, weights, ids, p):
    dw, ds, db, dbias = _inputs(experts["down_proj"], h)
    return kernel_object("moe_down", gpu_backend())(
        inputs=[h, ids, weights, dw, ds, db, dbias],
        template=p.template_b,
        grid=p.grid_b,
        threadgroup=p.tg_b,
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )[0]


def gate_up(experts, x, ids):
    """Kernel A alone: ``h [m * k, I]`` float32 (no availability check)."""
    return _gate_up(experts, x, _ids(ids), plan(experts, x, ids))


def down(experts, h, x, weights, ids):
    """Kernel B alone: ``y`` shaped and typed like ``x`` (no availability check)."""
    return _down(experts, h, x, weights, _ids(ids), plan(experts, x, ids))
