"""The router kernel backend: a decode step's routing in one custom kernel.

``mlx_moe.routing.route`` asks :func:`available` and, when it holds (an MLX GPU
backend is the default device, at most ``MAX_TOKENS`` tokens, a supported
router and weight format), calls :func:`route` instead of the router's MLX ops
(gate matmul, softmax, argpartition, take_along_axis, sum, divide; ~12 ops for
DeepSeek's group limit): every MLX op costs ~5-7 us of host time in decode.

Semantics are those of :mod:`mlx_moe.routing` with float32 logits (see
``moe_router.inc``); the weights come out in the dtype the MLX ops return.
Set ``ENABLED = False`` to force the MLX ops (comparisons, benchmarks). The
call path is lazy (no eval/item); plans are cached per call shape.
"""

import struct
import weakref
from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx

from ...routing import GroupLimitedGate, SoftmaxTopK, TopKSoftmax
from ..common import custom_kernel, gpu_backend, off_gpu_reason, pow2_ceil
from ..fused.backend import XK_IDS, Unsupported, _check_in_dim, proj_format
from ..fused.sources import minify
from . import sources

ENABLED = True  # False: routing.route always takes the MLX ops
MAX_TOKENS = 8
MAX_EXPERTS = 512
MAX_TOPK = 16
MAX_GROUPS = 32
MAX_WPB = 16  # 512 threads: <= 128 registers per thread on CUDA
RB = 4  # rows a warp computes together

_KERNEL_OBJECTS: Dict[str, object] = {}


def kernel_object(backend: str):
    """The (cached) ``mx.fast`` kernel object; templates are passed per call."""
    k = _KERNEL_OBJECTS.get(backend)
    if k is None:
        common = dict(
            name=sources.NAME,
            input_names=list(sources.INPUT_NAMES),
            output_names=list(sources.OUTPUT_NAMES),
            source=minify(sources.source(backend)),
            header=minify(sources.header(backend)),
            ensure_row_contiguous=True,
        )
        k = custom_kernel(backend, **common)
        if k is None:
            raise Unsupported(f"no router kernel for backend '{backend}'")
        _KERNEL_OBJECTS[backend] = k
    return k


@dataclass
class Plan:
    template: list
    grid: tuple
    tg: tuple
    out_shape: tuple
    out_dtype: mx.Dtype
    kind: int


def _kind(gate, router):
    """``(KIND, k, normalize, n_group, topk_group, scale)`` of a router."""
    if router is None and isinstance(gate, GroupLimitedGate):
        return (2, gate.k, bool(gate.normalize), int(gate.n_group), int(gate.topk_group),
                float(gate.routed_scaling_factor))
    if isinstance(router, SoftmaxTopK):
        return 0, router.k, bool(router.normalize), 1, 1, 1.0
    if isinstance(router, TopKSoftmax):
        return 1, router.k, False, 1, 1, 1.0
    raise Unsupported(f"no router kernel for {type(router if router is not None else gate).__name__}")


def _make_plan(gate, router, x) -> Plan:
    kind, k, norm, n_group, topk_group, scale = _kind(gate, router)
    if x.dtype not in XK_IDS:
        raise Unsupported(f"activations of dtype {x.dtype} not supported")
    H = x.shape[-1]
    m = x.size // H if H else 0
    if not 1 <= m <= MAX_TOKENS:
        raise Unsupported(f"the router kernel is for decode: {m} tokens")
    wk, bits, gs = proj_format(gate, "router")
    w = gate["weight"]
    E = w.shape[0]
    in_dim = gate["scales"].shape[-1] * gs if "scales" in gate else w.shape[-1]
    if w.ndim != 2 or in_dim != H:
        raise Unsupported(f"router weight {w.shape} does not match hidden size {H}")
    _check_in_dim((wk, bits, gs), H, "router")
    if not 1 <= k <= min(E, MAX_TOPK) or E > MAX_EXPERTS:
        raise Unsupported(f"router kernel supports E <= {MAX_EXPERTS}, k <= {MAX_TOPK}; got E={E} k={k}")
    if kind == 2 and (E % n_group or n_group > MAX_GROUPS or not 1 <= topk_group):
        raise Unsupported(f"router kernel: {E} experts in {n_group} groups")
    if kind == 2:
        out_dtype = mx.float32  # sigmoid of float32 logits, as GroupLimitedGate
    else:
        # The dtype today's ops give (softmax keeps its input's): taken from the
        # lazy graph of one dummy row, never evaluated.
        out_dtype = gate(mx.zeros((1, H), x.dtype)).dtype
    wpb = min(MAX_WPB, pow2_ceil(-(-E // RB)))
    template = [
        ("XK", XK_IDS[x.dtype]), ("WK", wk), ("BITS", bits), ("GS", gs or H),
        ("IN_DIM", H), ("N_EXPERTS", E), ("TOPK", k), ("KIND", kind),
        ("NORM", int(norm)), ("HAS_BIAS", int("bias" in gate)),
        ("N_GROUP", n_group if kind == 2 else 1),
        ("TOPK_GROUP", topk_group if kind == 2 else 1),
        ("SCALE_BITS", struct.unpack("<i", struct.pack("<f", scale))[0]),
        ("WPB", wpb), ("RB", RB), ("OT", out_dtype),
    ]
    return Plan(template, (wpb * 32, m, 1), (wpb * 32, 1, 1),
                tuple(x.shape[:-1]) + (k,), out_dtype, kind)


# (id(gate), id(router), x dtype, x shape) -> (gate weakref, weight array,
# router, plan or the reason it cannot run): an identity check instead of
# re-deriving the plan; router objects are taken as immutable.
_FAST: Dict[tuple, tuple] = {}


def plan(gate, router, x) -> Plan:
    """The launch plan of this call (cached), or Unsupported saying why."""
    key = (id(gate), id(router), x.dtype, x.shape)
    w = gate["weight"]
    hit = _FAST.get(key)
    if hit is None or hit[0]() is not gate or hit[1] is not w or hit[2] is not router:
        try:
            p = _make_plan(gate, router, x)
        except Unsupported as e:
            p = str(e)
        hit = (weakref.ref(gate), w, router, p)
        _FAST[key] = hit
    if isinstance(hit[3], str):
        raise Unsupported(hit[3])
    return hit[3]


def why_not(gate, router, x) -> Optional[str]:
    """None when the router kernel runs this call here, else the reason."""
    if not ENABLED:
        return "the router kernel is disabled (mlx_moe.kernels.router.backend.ENABLED)"
    reason = off_gpu_reason("the router kernel")
    if reason is not None:
        return reason
    if x.ndim == 0 or x.size > MAX_TOKENS * x.shape[-1]:
        return f"the router kernel is for decode (<= {MAX_TOKENS} tokens)"
    try:
        plan(gate, router, x)
    except Unsupported as e:
        return str(e)
    return None


def available(gate, router, x) -> bool:
    return why_not(gate, router, x) is None


def inputs(gate, x, kind):
    """Kernel inputs in order; ones a configuration does not read are x."""
    def get(name):
        a = gate.get(name)
        return x if a is None else a
    corr = get("e_score_correction_bias") if kind == 2 else x
    return [x, gate["weight"], get("scales"), get("biases"), get("bias"), corr]


def route(gate, router, x):
    """``(weights [..., k], ids [..., k] uint32)`` from the kernel (no
    availability check: call :func:`available` first)."""
    p = plan(gate, router, x)
    return tuple(kernel_object(gpu_backend())(
        inputs=inputs(gate, x, p.kind),
        template=p.template,
        grid=p.grid,
        threadgroup=p.tg,
        output_shapes=[p.out_shape, p.out_shape],
        output_dtypes=[p.out_dtype, mx.uint32],
    ))
