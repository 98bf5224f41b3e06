"""Grouped-GEMM prefill for ``MoEExperts`` (many tokens: m > 8).

The (token, expert) pairs are sorted by expert on the GPU (no host sync) and
two launches of ONE kernel body (``metal_kernels/prefill_body.inc``) do the
layer:

1. ``GATED=1``: ``h[p] = act(x[tok[p]] . Wg[e]^T, x[tok[p]] . Wu[e]^T)`` for the
   sorted pairs ``p`` of expert ``e`` -- gate and up share the A tile;
2. ``GATED=0``: ``y[pair[p]] = h[p] . Wd[e]^T``, written straight back in the
   original (token, slot) order, so ``combine`` needs no un-permute.

Each block takes a 64-row m-tile of one expert's segment x a column tile and
dequantizes AFQ 4/8-bit (or float) weight tiles into shared memory; the
per-warp MMA is a platform helper (CUDA ``mma.sync`` bf16/f16 tensor cores,
Metal ``simdgroup_matrix``, a scalar CPU emulation for the tests).

The same body is emitted for ``mx.fast.cuda_kernel`` and
``mx.fast.metal_kernel``; only the CUDA emission has run on hardware (H100,
run 1 in metal_kernels/PREFILL_NOTES.md). The Metal emission is off unless
``MLX_MOE_PREFILL_METAL=1`` until someone runs the GPU tests on a Mac.

The sort bookkeeping (``plan``) and the weighted top-k sum (``combine``) are
MLX ops by default (as measured on the H100); one-launch kernels for both
(``prefill_plan.inc`` / ``prefill_combine.inc``) and a K step of 64 are
opt-in (``MLX_MOE_PREFILL_PLAN=kernel``, ``MLX_MOE_PREFILL_COMBINE=kernel``,
``MLX_MOE_PREFILL_BK=64``) until a GPU run confirms them.

``run_dequant_gather`` is the measured alternative (dequantize the layer's
experts to the activation dtype once per call, then sorted ``gather_mm``); it
gave WRONG results on MLX 0.32.4 CUDA (see the notes), so it is not registered
by default.
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

# Tile constants (must match metal_kernels/prefill_tiles.h).
BM, BN, BK, THREADS = 64, 128, 32, 128
PLAN_THREADS = COMBINE_THREADS = 256
# Defaults = what ran on the H100 (run 1): MLX-op plan and combine, K step 32.
# The plan / combine kernels and BK 64 pass the CPU emulator and nvcc but have
# not run on a GPU yet (device budget); scripts/gpu_prefill.py times all of them.
DEFAULT_BK = int(os.environ.get("MLX_MOE_PREFILL_BK", "32"))  # 32 or 64 (needs K % 64 == 0)
PLAN_KERNEL = os.environ.get("MLX_MOE_PREFILL_PLAN", "ops") == "kernel"
COMBINE_KERNEL = os.environ.get("MLX_MOE_PREFILL_COMBINE", "ops") == "kernel"
DECODE_MAX_M = 8  # m <= 8 belongs to the fused decode kernels
ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "swiglu_oai": 4}
INPUT_NAMES = [
    "x", "rows", "tiles", "segs",
    "w0", "s0", "z0", "w1", "s1", "z1",
    "bias0", "bias1",
]
# kernel -> (body file, input names, output names, threads per block)
KERNEL_SPECS = {
    "gemm": ("prefill_body.inc", INPUT_NAMES, ["out"], THREADS),
    "plan": ("prefill_plan.inc", ["flat", "order"], ["segs", "tiles"], PLAN_THREADS),
    "combine": ("prefill_combine.inc", ["y", "w"], ["out"], COMBINE_THREADS),
}


def _kernel_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here.parents[1] / "metal_kernels", here):
        if (d / "prefill_body.inc").exists():
            return d
    raise FileNotFoundError("metal_kernels/prefill_body.inc not found")


def _read(name):
    return (_kernel_dir() / name).read_text()


PLATFORM_HEADERS = {
    "cuda": ["prefill_cuda.cuh", "prefill_mma16816.h"],
    "metal": ["prefill_metal.h"],
    "cpu": ["prefill_cpu.h"],
    # CPU emulator running the CUDA warp tile on an emulated mma.sync
    "cpu_mma16816": ["#define PF_CPU_MMA16816", "prefill_cpu.h", "prefill_mma16816.h"],
}

PROLOGUES = {
    "cuda": (
        "const int pf_tid = threadIdx.x;\n"
        "const int pf_bx = blockIdx.x;\n"
        "const int pf_by = blockIdx.y;\n"
    ),
    # metal_kernel adds these attributes to the signature when the source names them.
    "metal": (
        "const int pf_tid = (int)thread_index_in_threadgroup;\n"
        "const int pf_bx = (int)threadgroup_position_in_grid.x;\n"
        "const int pf_by = (int)threadgroup_position_in_grid.y;\n"
    ),
    "cpu": "",  # the emulator passes pf_tid / pf_bx / pf_by as arguments
    "cpu_mma16816": "",
}


def emit(platform: str, kernel: str = "gemm", bk: int = 32):
    """``(header, source)`` of one prefill kernel (``gemm``, ``plan``, ``combine``)."""
    parts = [f"#define PF_BK {bk}", "prefill_tiles.h", *PLATFORM_HEADERS[platform], "prefill_act.h"]
    header = "\n".join(f if f.startswith("#") else _read(f) for f in parts)
    source = (
        PROLOGUES[platform]
        + "const int pf_lane = pf_tid & 31;\n"
        + "const int pf_warp = pf_tid >> 5;\n"
        + _read(KERNEL_SPECS[kernel][0])
    )
    return header, source


# ---------------------------------------------------------------- bookkeeping


def plan(ids, num_experts, launch=None, kernel=None):
    """``(order, segs, tiles, slots)``: :func:`plan_kernel` or :func:`plan_ops`."""
    if PLAN_KERNEL if kernel is None else kernel:
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
        header, source = emit(platform, kernel, bk)
        _, inputs, outputs, _ = KERNEL_SPECS[kernel]
        make = mx.fast.cuda_kernel if platform == "cuda" else mx.fast.metal_kernel
        _KERNELS[platform, kernel, bk] = make(
            name=f"mlx_moe_prefill_{kernel}_bk{bk}",
            input_names=inputs,
            output_names=outputs,
            source=source,
            header=header,
            ensure_row_contiguous=True,
        )
    return _KERNELS[platform, kernel, bk]


def gpu_platform():
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def mlx_launcher(platform=None):
    """``launch(kernel, inputs, template, grid, out_shapes, out_dtypes) -> [outputs]``
    through ``mx.fast.cuda_kernel`` / ``mx.fast.metal_kernel``; grid in threads."""
    platform = platform or gpu_platform()

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
    bk = bk or DEFAULT_BK
    if K % bk:
        bk = 32
    return launch("gemm", inputs, template, (n_tiles * THREADS, slots, 1), [(P, N)], [out_dtype],
                  bk=bk)[0]


def run_prefill(experts, x, weights, ids, launch=None, bk=None, kernels=None):
    """The grouped-GEMM prefill: ``y [..., H]`` (float32 like the other backends).

    ``kernels``: use the plan / combine kernels (default: ``MLX_MOE_PREFILL_PLAN`` /
    ``MLX_MOE_PREFILL_COMBINE``, i.e. the MLX-op versions)."""
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
    if COMBINE_KERNEL if kernels is None else kernels:
        return combine(launch, y, weights).reshape(*ids.shape[:-1], H)
    return _combine(y.reshape(*ids.shape, H), weights)


def combine(launch, y, weights):
    """``out[t] = sum_j weights[t, j] * y[t*k + j]`` in float32, one pass over ``y``."""
    k = weights.shape[-1]
    w = weights.reshape(-1, k).astype(mx.float32)
    T, N = w.shape[0], y.shape[-1]
    return launch(
        "combine", [y, w], [("TOPK", k), ("N", N)],
        (-(-N // COMBINE_THREADS) * COMBINE_THREADS, T, 1), [(T, N)], [mx.float32],
    )[0]


def _combine(y, weights):
    return (y.astype(mx.float32) * weights[..., None].astype(mx.float32)).sum(axis=-2)


def _dequant_all(proj, dtype):
    bits, gs, w, s, z = _proj_args(proj)
    if bits == 0:
        return w.astype(dtype)
    return mx.dequantize(w, s, z, group_size=gs, bits=bits).astype(dtype)


def run_dequant_gather(experts, x, weights, ids, contiguous=False):
    """Alternative: dequantize all experts once, then sorted ``gather_mm``.

    ``contiguous=True`` materializes ``W^T`` [E, K, N] instead of passing the
    transposed view (MLX 0.32.4 CUDA's sorted gather_mm gave wrong results with
    the view in run 1; see metal_kernels/PREFILL_NOTES.md)."""
    H = x.shape[-1]
    k = ids.shape[-1]
    ids = mx.stop_gradient(ids)
    flat = ids.reshape(-1)
    order = mx.argsort(flat)
    inv = mx.argsort(order)
    xs = mx.expand_dims(x.reshape(-1, H)[order // k], -2)
    idx = flat[order]

    def mm(proj, a):
        w = _dequant_all(proj, x.dtype).swapaxes(-1, -2)
        if contiguous:
            w = mx.contiguous(w)
        y = mx.gather_mm(a, w, rhs_indices=idx, sorted_indices=True)
        if "bias" in proj:
            y = y + mx.expand_dims(proj["bias"][idx], -2).astype(y.dtype)
        return y

    h = experts.activation(mm(experts.gate_proj, xs), mm(experts.up_proj, xs))
    y = mm(experts.down_proj, h)
    y = y[inv].reshape(*ids.shape, H)
    return _combine(y, weights)


# ---------------------------------------------------------------- backend


def supports(experts, x, ids):
    """Shapes / formats the kernel handles (platform-independent part)."""
    if x.dtype not in (mx.bfloat16, mx.float16):
        return False
    if experts.activation_name not in ACT_IDS:
        return False
    H, I = x.shape[-1], experts.hidden_dims
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
    platform = gpu_platform()
    if platform is None:
        return False
    if platform == "metal" and os.environ.get("MLX_MOE_PREFILL_METAL") != "1":
        return False  # the Metal emission has never run; opt in explicitly
    return supports(experts, x, ids)


def run_backend(experts, x, weights, ids):
    return run_prefill(experts, x, weights, ids)


def register(name="prefill", dequant_gather=False):
    """Register the ``prefill`` backend (and, on request, ``dequant_gather``)."""
    from ..experts import Backend, register_backend

    register_backend(name, Backend(run_backend, available))
    if dequant_gather:
        register_backend(
            "dequant_gather",
            Backend(
                run_dequant_gather,
                lambda e, x, ids: mx.default_device() == mx.gpu
                and x.size // x.shape[-1] > DECODE_MAX_M,
            ),
        )


# ---------------------------------------------------------------- references (tests)


def np_dequant(proj):
    """Numpy dequantization of MLX affine packing (independent of mx.dequantize)."""
    bits, gs, w, s, z = _proj_args(proj)
    w = np.array(w.astype(mx.float32) if bits == 0 else w)
    if bits == 0:
        return w
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    q = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    q = q.reshape(*w.shape[:-1], -1).astype(np.float32)
    s = np.repeat(np.array(s.astype(mx.float32)), gs, axis=-1)
    z = np.repeat(np.array(z.astype(mx.float32)), gs, axis=-1)
    return s * q + z


def _np_round(a, dtype):
    return np.array(mx.array(a).astype(dtype).astype(mx.float32))


def _np_act(name, g, u):
    if name == "silu":
        return g / (1 + np.exp(-g)) * u
    if name == "gelu_tanh":
        return 0.5 * g * (1 + np.tanh(0.7978845608028654 * (g + 0.044715 * g**3))) * u
    if name == "gelu":
        from math import erf

        return 0.5 * g * (1 + np.vectorize(erf)(g / np.sqrt(2))) * u
    if name == "relu":
        return np.maximum(g, 0) * u
    g = np.minimum(g, 7.0)
    u = np.clip(u, -7.0, 7.0)
    return (u + 1) * (g / (1 + np.exp(-1.702 * g)))


def reference_prefill(experts, x, weights, ids):
    """Numpy model of the kernel's semantics, tile by tile, in the kernel's order.

    Uses the same ``plan`` bookkeeping and walks (expert, m-tile) blocks like the
    grid does; dequantizes weights to the activation dtype like the smem tiles.
    """
    dt = x.dtype
    H = x.shape[-1]
    k = ids.shape[-1]
    order, segs, tiles, slots = plan_ops(ids, experts.num_experts)
    order, segs, tiles = (np.array(a) for a in (order, segs, tiles))
    assert tiles[-1] <= slots
    xs = np.array(x.reshape(-1, H).astype(mx.float32))
    P = order.size
    wg, wu, wd = (_np_round(np_dequant(p), dt) for p in
                  (experts.gate_proj, experts.up_proj, experts.down_proj))
    bias = [
        np.array(p["bias"].astype(mx.float32)) if "bias" in p else None
        for p in (experts.gate_proj, experts.up_proj, experts.down_proj)
    ]
    y = np.zeros((P, H), np.float32)
    E = experts.num_experts
    for slot in range(int(tiles[-1])):
        e = int(np.searchsorted(tiles, slot, side="right") - 1)
        r0 = segs[e] + (slot - tiles[e]) * BM
        r1 = min(r0 + BM, segs[e + 1])
        assert 0 <= e < E and r0 < r1
        p = np.arange(r0, r1)
        a = xs[order[p] // k]
        g = a @ wg[e].T
        u = a @ wu[e].T
        if bias[0] is not None:
            g, u = g + bias[0][e], u + bias[1][e]
        h = _np_round(_np_act(experts.activation_name, _np_round(g, dt), _np_round(u, dt)), dt)
        o = h @ wd[e].T
        if bias[2] is not None:
            o = o + bias[2][e]
        y[order[p]] = _np_round(o, dt)
    y = y.reshape(*ids.shape, H)
    w = np.array(weights.astype(mx.float32))
    return (y * w[..., None]).sum(axis=-2)


# ---------------------------------------------------------------- offline CUDA check (tests)

_CUDA_TYPES = {
    mx.bfloat16: "__nv_bfloat16",
    mx.float16: "__half",
    mx.float32: "float",
    mx.uint32: "uint32_t",
    mx.int32: "int32_t",
}


def cuda_source(kernel, inputs, template, out_dtypes, name=None, bk=32):
    """The translation unit ``mx.fast.cuda_kernel`` builds (MLX 0.32 layout), with
    MLX's device header replaced by the standard CUDA headers, for nvcc checks."""
    header, source = emit("cuda", kernel, bk)
    _, in_names, out_names, _ = KERNEL_SPECS[kernel]
    params = []
    for n, a in zip(in_names, inputs):
        params.append(f"    const {_CUDA_TYPES[a.dtype]}* {n}")
        if f"{n}_shape" in source:
            params.append(f"    const __grid_constant__ Shape {n}_shape")
    params += [f"    {_CUDA_TYPES[d]}* {n}" for n, d in zip(out_names, out_dtypes)]
    consts = _template_consts(template, _CUDA_TYPES)
    return (
        "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n"
        "struct Shape { int d[8]; __device__ int operator[](int i) const { return d[i]; } };\n"
        + header
        + "\nnamespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
        + f"__global__ void {name or 'mlx_moe_prefill_' + kernel}(\n" + ",\n".join(params) + ") {\n"
        + "\n".join(consts) + "\n" + source + "\n}\n}\n"
    )


# ---------------------------------------------------------------- CPU emulator (tests)

_C_TYPES = {
    mx.bfloat16: "pf_bf16",
    mx.float16: "_Float16",
    mx.float32: "float",
    mx.uint32: "uint32_t",
    mx.int32: "int32_t",
}
_NP_OF = {
    mx.bfloat16: np.uint16,
    mx.float16: np.uint16,
    mx.float32: np.float32,
    mx.uint32: np.uint32,
    mx.int32: np.int32,
}


def _template_consts(template, types):
    """Template arguments as C++ declarations (dtypes -> ``using``, ints -> ``constexpr``)."""
    return [
        f"  using {n} = {types[v]};" if isinstance(v, mx.Dtype) else f"  constexpr int {n} = {int(v)};"
        for n, v in template
    ]


def _cpu_source(kernel, inputs, template, out_dtypes, mode="cpu", bk=32):
    header, source = emit(mode, kernel, bk)
    _, in_names, out_names, threads = KERNEL_SPECS[kernel]
    params = ["int pf_tid", "int pf_bx", "int pf_by"]
    casts = []
    for n, a in zip(in_names, inputs):
        params.append(f"const {_C_TYPES[a.dtype]}* {n}")
        casts.append(f"(const {_C_TYPES[a.dtype]}*)a[{len(casts)}]")
        if f"{n}_shape" in source:
            params.append(f"const int* {n}_shape")
            casts.append(f"(const int*)a[{len(casts)}]")
    for n, d in zip(out_names, out_dtypes):
        params.append(f"{_C_TYPES[d]}* {n}")
        casts.append(f"({_C_TYPES[d]}*)a[{len(casts)}]")
    consts = _template_consts(template, _C_TYPES)
    return f"""
#include <thread>
#include <vector>
{header}
constexpr int PF_NT = {threads};
std::barrier<>* pf_cpu_barrier;
thread_local int pf_cpu_lane, pf_cpu_warp;
std::barrier<>* pf_cpu_warp_barrier[PF_NT / 32];
uint32_t pf_cpu_stage[PF_NT / 32][32][6];
static void pf_kernel({", ".join(params)}) {{
{chr(10).join(consts)}
{source}
}}
extern "C" void pf_run(void** a, int gx, int gy) {{
  std::barrier<> bar(PF_NT);
  pf_cpu_barrier = &bar;
  std::vector<std::barrier<>*> wb;
  for (int w = 0; w < PF_NT / 32; w++) {{
    wb.push_back(new std::barrier<>(32));
    pf_cpu_warp_barrier[w] = wb.back();
  }}
  std::vector<std::thread> th;
  for (int t = 0; t < PF_NT; t++) {{
    th.emplace_back([=]() {{
      pf_cpu_lane = t & 31;
      pf_cpu_warp = t >> 5;
      for (int by = 0; by < gy; by++) {{
        for (int bx = 0; bx < gx; bx++) {{
          pf_kernel(t, bx, by, {", ".join(casts)});
          pf_cpu_barrier->arrive_and_wait();
        }}
      }}
    }});
  }}
  for (auto& t : th) t.join();
  for (auto* b : wb) delete b;
}}
"""


def cpu_launcher(mode="cpu", cache_dir=None, cxx="g++"):
    """A launcher running the kernel bodies on the CPU (one std::thread per GPU thread).

    ``mode="cpu"``: scalar warp tile; ``mode="cpu_mma16816"``: the CUDA warp tile
    (prefill_mma16816.h) on an emulated ``mma.sync``.
    """
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "mlx_moe_prefill_cpu")
    cache.mkdir(parents=True, exist_ok=True)
    libs = {}

    def launch(kernel, inputs, template, grid, out_shapes, out_dtypes, bk=32):
        src = _cpu_source(kernel, inputs, template, out_dtypes, mode, bk)
        key = hashlib.sha1(src.encode()).hexdigest()[:16]
        if key not in libs:
            so = cache / f"pf_{key}.so"
            if not so.exists():
                cpp = cache / f"pf_{key}.{os.getpid()}.cpp"
                cpp.write_text(src)
                tmp = so.with_suffix(f".{os.getpid()}.tmp")
                subprocess.run(
                    [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread",
                     "-Wno-unused-variable", "-o", str(tmp), str(cpp)],
                    check=True, capture_output=True, text=True,
                )
                os.replace(tmp, so)
            libs[key] = ctypes.CDLL(str(so))
        _, in_names, _, threads = KERNEL_SPECS[kernel]
        _, source = emit(mode, kernel, bk)
        arrays = []
        for n, a in zip(in_names, inputs):
            v = a.view(mx.uint16) if a.dtype in (mx.bfloat16, mx.float16) else a
            arrays.append(np.ascontiguousarray(np.array(v), dtype=_NP_OF[a.dtype]))
            if f"{n}_shape" in source:
                arrays.append(np.array(a.shape, np.int32))
        outs = [np.zeros(sh, _NP_OF[d]) for sh, d in zip(out_shapes, out_dtypes)]
        ptrs = (ctypes.c_void_p * (len(arrays) + len(outs)))(
            *[arr.ctypes.data for arr in arrays + outs])
        gx = -(-grid[0] // threads)
        libs[key].pf_run(ptrs, ctypes.c_int(gx), ctypes.c_int(grid[1]))
        res = []
        for o, d in zip(outs, out_dtypes):
            r = mx.array(o)
            res.append(r.view(d) if d in (mx.bfloat16, mx.float16) else r)
        return res

    return launch


# ---------------------------------------------------------------- test / bench helpers


def make_experts(E, H, I, bits=4, group_size=64, activation="silu", bias=False,
                 dtype=mx.bfloat16, seed=0):
    """A random ``MoEExperts`` (weights in ``dtype`` before quantizing, like real
    checkpoints, so scales/biases are ``dtype``); ``bits=0`` keeps float weights."""
    from ..experts import MoEExperts

    mx.random.seed(seed)
    ex = MoEExperts(E, H, I, activation=activation, bias=bias)
    for name in ("gate_proj", "up_proj", "down_proj"):
        p = getattr(ex, name)
        p.weight = p.weight.astype(dtype)
        if bias:
            p.bias = (0.1 * mx.random.normal(p.bias.shape)).astype(dtype)
        if bits:
            p = p.to_quantized(group_size=group_size, bits=bits)
        setattr(ex, name, p)
    mx.eval(ex.parameters())
    return ex


def random_routing(T, E, k, H, dtype=mx.bfloat16, seed=1, skew=0.0):
    """``x [T, H]``, ``weights [T, k]``, ``ids [T, k]`` (distinct experts per token).

    ``skew > 0`` biases the router towards low expert ids (uneven segments)."""
    mx.random.seed(seed)
    x = mx.random.normal((T, H)).astype(dtype)
    logits = mx.random.normal((T, E)) - skew * mx.arange(E, dtype=mx.float32) / E
    ids = mx.argpartition(-logits, k - 1, axis=-1)[:, :k].astype(mx.int32)
    weights = mx.softmax(mx.random.normal((T, k)), axis=-1)
    mx.eval(x, ids, weights)
    return x, weights, ids


def rel_err(a, b, kind="norm"):
    """``||a-b|| / ||b||`` (``kind="norm"``) or ``max|a-b| / max|b|`` (``"max"``)."""
    a = np.array(mx.array(a).astype(mx.float32))
    b = np.array(mx.array(b).astype(mx.float32))
    if kind == "max":
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))
