"""Kernel sources of the grouped-GEMM prefill, assembled per platform.

One kernel body per kernel (``prefill_body.inc`` for the GEMM, ``prefill_plan.inc``
and ``prefill_combine.inc`` for the opt-in bookkeeping kernels) is written
against the tile constants (``prefill_tiles.h``), the activations
(``prefill_act.h``) and a platform header that supplies the per-warp MMA and
barriers: ``prefill_cuda.cuh`` + ``prefill_mma16816.h`` (CUDA ``mma.sync``),
``prefill_metal.h`` (``simdgroup_matrix``), ``prefill_cpu.h`` (the CPU emulator
of the tests, :mod:`mlx_moe.testing.emulate_prefill`).

:func:`emit` gives the ``header=`` / ``source=`` strings of
``mx.fast.cuda_kernel`` / ``mx.fast.metal_kernel``; :func:`cuda_source` the
whole translation unit MLX builds from them, for nvcc checks.
"""

from functools import lru_cache
from pathlib import Path

import mlx.core as mx

SRC_DIR = Path(__file__).resolve().parent

# Tile constants (must match prefill_tiles.h).
BM, BN, BK, THREADS = 64, 128, 32, 128
PLAN_THREADS = COMBINE_THREADS = 256
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


@lru_cache(maxsize=None)
def read(name: str) -> str:
    return (SRC_DIR / name).read_text()


def emit(platform: str, kernel: str = "gemm", bk: int = 32):
    """``(header, source)`` of one prefill kernel (``gemm``, ``plan``, ``combine``)."""
    parts = [f"#define PF_BK {bk}", "prefill_tiles.h", *PLATFORM_HEADERS[platform], "prefill_act.h"]
    header = "\n".join(f if f.startswith("#") else read(f) for f in parts)
    source = (
        PROLOGUES[platform]
        + "const int pf_lane = pf_tid & 31;\n"
        + "const int pf_warp = pf_tid >> 5;\n"
        + read(KERNEL_SPECS[kernel][0])
    )
    return header, source


def template_consts(template, types):
    """Template arguments as C++ declarations (dtypes -> ``using``, ints -> ``constexpr``)."""
    return [
        f"  using {n} = {types[v]};" if isinstance(v, mx.Dtype) else f"  constexpr int {n} = {int(v)};"
        for n, v in template
    ]


# ---------------------------------------------------------------- offline CUDA check (tests)

CUDA_TYPES = {
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
        params.append(f"    const {CUDA_TYPES[a.dtype]}* {n}")
        if f"{n}_shape" in source:
            params.append(f"    const __grid_constant__ Shape {n}_shape")
    params += [f"    {CUDA_TYPES[d]}* {n}" for n, d in zip(out_names, out_dtypes)]
    consts = template_consts(template, CUDA_TYPES)
    return (
        "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n"
        "struct Shape { int d[8]; __device__ int operator[](int i) const { return d[i]; } };\n"
        + header
        + "\nnamespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
        + f"__global__ void {name or 'mlx_moe_prefill_' + kernel}(\n" + ",\n".join(params) + ") {\n"
        + "\n".join(consts) + "\n" + source + "\n}\n}\n"
    )
