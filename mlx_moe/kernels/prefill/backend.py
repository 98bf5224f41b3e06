"""The ``prefill`` MoE backend: grouped GEMM for many tokens (m > 8).

The (token, expert) pairs are sorted by expert on the GPU (no host sync) and
two launches of ONE kernel body (``prefill_body.inc`` beside this module) do
the layer:

1. ``GATED=1``: ``h[p] = act(x[tok[p]] . Wg[e]^T, x[tok[p]] . Wu[e]^T)`` for the
   sorted pairs ``p`` of expert ``e`` -- gate and up share the A tile;
2. ``GATED=0``: ``y[pair[p]] = h[p] . Wd[e]^T``, written straight back in the
   original (token, slot) order, so ``combine`` needs no un-permute.

Each block takes a 64-row m-tile of one expert's segment x a column tile and
dequantizes AFQ 4/8-bit (or float) weight tiles into shared memory; the
per-warp MMA is a platform helper (CUDA ``mma.sync`` bf16/f16 tensor cores,
Metal ``simdgroup_matrix``, a scalar CPU emulation for the tests).

The same body is emitted for ``mx.fast.cuda_kernel`` and
``mx.fast.metal_kernel`` (``sources.py``); only the CUDA emission has run on
hardware (H100, run 1 in docs/kernels/PREFILL_NOTES.md). The Metal emission is
off unless ``MLX_MOE_PREFILL_METAL=1`` until someone runs the GPU tests on a Mac.

The sort bookkeeping (``plan``) and the weighted top-k sum (``combine``) are
MLX ops by default (as measured on the H100); one-launch kernels for both
(``prefill_plan.inc`` / ``prefill_combine.inc``) and a K step of 64 are opt-in
until a GPU run confirms them.

Environment (read at call time; ``scripts/gpu_prefill.py`` times every choice):

* ``MLX_MOE_PREFILL_METAL=1``: let ``auto`` pick this backend on Metal.
* ``MLX_MOE_PREFILL_PLAN=kernel``: the plan kernel instead of MLX ops.
* ``MLX_MOE_PREFILL_COMBINE=kernel``: the combine kernel instead of MLX ops.
* ``MLX_MOE_PREFILL_BK=64``: K step 64 where K % 64 == 0 (default 32).
"""

import os

import mlx.core as mx

from ...experts import combine as combine_ops
from ..common import ACT_IDS, custom_kernel, gpu_backend
from . import sources
from .sources import BK, BM, BN, COMBINE_THREADS, KERNEL_SPECS, PLAN_THREADS, THREADS

DECODE_MAX_M = 8  # m <= 8 belongs to the fused decode kernels


# Defaults = what ran on the H100 (run 1): MLX-op plan and combine, K step 32.
# The plan / combine kernels and BK 64 pass the CPU emulator and nvcc but have
# not run on a GPU yet (device budget).
def _env_kernel(name):
    return os.environ.get(name, "ops") == "kernel"


def _default_bk():
    return int(os.environ.get("MLX_MOE_PREFILL_BK", "32"))  # 32 or 64 (needs K % 64 == 0)


# ---------------------------------------------------------------- bookkeeping


def plan(ids, num_experts, launch=None, kernel=None):
    """``(order, segs, tiles, slots)``: :func:`plan_kernel` or :func:`plan_ops`
    (``kernel=None``: ``MLX_MOE_PREFILL_PLAN``)."""
    if _env_kernel("MLX_MOE_PREFILL_PLAN") if kernel is None else kernel:
        return plan_kernel(ids, num_experts, launch)
    return plan_ops(ids, num_experts)


def plan_kernel(ids, num_experts, launch=None):
    """:func:`plan_ops` with one small kernel after the argsort instead of ~12 MLX ops."""
    flat = ids.reshape(-1)
    P = flat.size
    order = mx.argsort(flat)
    launch = launch or mlx_launcher()
    segs, tiles = launch(
        "plan", [flat, order], [("E", num_experts)], (PLAN_THREADS, 1, 1),
        [(num_experts + 1,), (num_experts + 1,)], [mx.int32, mx.int32],
    )
    return order, segs, tiles, -(-P // BM) + min(num_experts, P)


def plan_ops(ids, num_experts, bm=BM):
    """Sort (token, expert) pairs by expert, on device, without a host sync.

    Returns ``order`` (sorted position -> flat pair index), ``segs [E+1]``
    (sorted rows of expert e: ``segs[e]:segs[e+1]``), ``tiles [E+1]`` (m-tiles
    of expert e: ``tiles[e]:tiles[e+1]``) and ``slots``, a static upper bound
    of ``tiles[E]`` used as the grid's y size.
    """
    flat = ids.reshape(-1).astype(mx.int32)
    P = flat.size
    order = mx.argsort(flat).astype(mx.int32)
    bounds = mx.arange(num_experts + 1, dtype=mx.int32)
    segs = (flat[:, None] < bounds[None, :]).astype(mx.int32).sum(axis=0)
    counts = segs[1:] - segs[:-1]
    mtiles = (counts + (bm - 1)) // bm
    tiles = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(mtiles)]).astype(mx.int32)
    slots = -(-P // bm) + min(num_experts, P)
    return order, segs.astype(mx.int32), tiles, slots


def _proj_args(proj):
    """``(bits, group_size, w, scales, biases)`` of an expert projection."""
    if hasattr(proj, "scales"):
        return proj.bits, proj.group_size, proj["weight"], proj["scales"], proj["biases"]
    return 0, 32, proj["weight"], None, None


_DUMMY = {}


def _dummy():
    if "f" not in _DUMMY:
        _DUMMY["f"] = mx.zeros((1,), mx.float32)
    return _DUMMY["f"]


def _bias(proj):
    if "bias" in proj:
        return proj["bias"].astype(mx.float32)
    return None


# ---------------------------------------------------------------- launchers

_KERNELS = {}


def _mlx_kernel(platform, kernel, bk=32):
    if (platform, kernel, bk) not in _KERNELS:
        header, source = sources.emit(platform, kernel, bk)
        _, inputs, outputs, _ = KERNEL_SPECS[kernel]
        _KERNELS[platform, kernel, bk] = custom_kernel(
            platform,
            name=f"mlx_moe_prefill_{kernel}_bk{bk}",
            input_names=inputs,
            output_names=outputs,
            source=source,
            header=header,
            ensure_row_contiguous=True,
        )
    return _KERNELS[platform, kernel, bk]


def mlx_launcher(platform=None):
    """``launch(kernel, inputs, template, grid, out_shapes, out_dtypes) -> [outputs]``
    through ``mx.fast.cuda_kernel`` / ``mx.fast.metal_kernel``; grid in threads."""
    platform = platform or gpu_backend()

    def launch(kernel, inputs, template, grid, out_shapes, out_dtypes, bk=32):
        return _mlx_kernel(platform, kernel, bk)(
            inputs=inputs,
            template=template,
            grid=grid,
            threadgroup=(KERNEL_SPECS[kernel][3], 1, 1),
            output_shapes=out_shapes,
            output_dtypes=out_dtypes,
        )

    return launch


# ---------------------------------------------------------------- the layer


def _launch_proj(launch, x, rows, tiles, segs, slots, projs, gated, act, out_dtype, topk=1,
                 bk=None):
    bits, gs, w0, s0, z0 = _proj_args(projs[0])
    if gated:
        _, _, w1, s1, z1 = _proj_args(projs[1])
    else:
        w1, s1, z1 = w0, s0, z0
    if s0 is None:
        s0 = z0 = s1 = z1 = _dummy()
    bias0 = _bias(projs[0])
    bias1 = _bias(projs[1]) if gated else bias0
    has_bias = bias0 is not None
    if not has_bias:
        bias0 = bias1 = _dummy()
    E, N = w0.shape[0], w0.shape[1]
    K = x.shape[-1]
    ncols = BN // 2 if gated else BN
    n_tiles = -(-N // ncols)
    template = [
        ("T", x.dtype),
        ("BITS", bits),
        ("GS", gs),
        ("GATED", int(gated)),
        ("ACT", act),
        ("HAS_BIAS", int(has_bias)),
        ("E", E),
        ("K", K),
        ("N", N),
        ("TOPK", topk if gated else 1),
    ]
    inputs = [x, rows, tiles, segs, w0, s0, z0, w1, s1, z1, bias0, bias1]
    P = rows.shape[0]
    bk = bk or _default_bk()
    if K % bk:
        bk = 32
    return launch("gemm", inputs, template, (n_tiles * THREADS, slots, 1), [(P, N)], [out_dtype],
                  bk=bk)[0]


def run_prefill(experts, x, weights, ids, launch=None, bk=None, kernels=None):
    """The grouped-GEMM prefill: ``y [..., H]`` (float32 like the other backends).

    ``kernels``: use the plan / combine kernels (default: ``MLX_MOE_PREFILL_PLAN`` /
    ``MLX_MOE_PREFILL_COMBINE``, i.e. the MLX-op versions); ``bk``: K step
    (default: ``MLX_MOE_PREFILL_BK``, i.e. 32)."""
    launch = launch or mlx_launcher()
    H = x.shape[-1]
    k = ids.shape[-1]
    x2 = x.reshape(-1, H)
    ids = mx.stop_gradient(ids)
    order, segs, tiles, slots = plan(ids, experts.num_experts, launch, kernels)
    act = ACT_IDS[experts.activation_name]
    h = _launch_proj(
        launch, x2, order, tiles, segs, slots,
        (experts.gate_proj, experts.up_proj), True, act, x.dtype, topk=k, bk=bk,
    )
    y = _launch_proj(
        launch, h, order, tiles, segs, slots,
        (experts.down_proj,), False, act, x.dtype, bk=bk,
    )
    if _env_kernel("MLX_MOE_PREFILL_COMBINE") if kernels is None else kernels:
        return combine(launch, y, weights).reshape(*ids.shape[:-1], H)
    return combine_ops(y.reshape(*ids.shape, H), weights)


def combine(launch, y, weights):
    """``out[t] = sum_j weights[t, j] * y[t*k + j]`` in float32, one pass over ``y``."""
    k = weights.shape[-1]
    w = weights.reshape(-1, k).astype(mx.float32)
    T, N = w.shape[0], y.shape[-1]
    return launch(
        "combine", [y, w], [("TOPK", k), ("N", N)],
        (-(-N // COMBINE_THREADS) * COMBINE_THREADS, T, 1), [(T, N)], [mx.float32],
    )[0]


# ---------------------------------------------------------------- backend


def supports(experts, x, ids):
    """Shapes / formats the kernel handles (platform-independent part)."""
    if x.dtype not in (mx.bfloat16, mx.float16):
        return False
    if experts.activation_name not in ACT_IDS:
        return False
    H, I = x.shape[-1], experts.intermediate_size
    if H % BK or I % BK:
        return False
    q = experts.quantized
    if q is not None:
        if q["mode"] != "affine" or q["bits"] not in (4, 8):
            return False
        if q["group_size"] not in (32, 64, 128):
            return False
        if H % q["group_size"] or I % q["group_size"]:
            return False
        if experts.gate_proj.get("biases") is None:
            return False
    return True


def available(experts, x, ids):
    m = x.size // x.shape[-1]
    if m <= DECODE_MAX_M:
        return False
    if mx.default_device() != mx.gpu:
        return False
    platform = gpu_backend()
    if platform is None:
        return False
    if platform == "metal" and os.environ.get("MLX_MOE_PREFILL_METAL") != "1":
        return False  # the Metal emission has never run; opt in explicitly
    return supports(experts, x, ids)


def run_backend(experts, x, weights, ids):
    return run_prefill(experts, x, weights, ids)


def register(name="prefill"):
    """Register the ``prefill`` backend with :mod:`mlx_moe.experts`."""
    from ...experts import Backend, register_backend

    register_backend(name, Backend(run_backend, available))
