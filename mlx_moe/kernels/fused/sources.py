"""Kernel sources of the fused decode path, assembled per backend.

One source of truth: the kernel bodies (``moe_gate_up.inc``, ``moe_down.inc``)
and the shared helpers (``moe_common.h``) are written once against a few names
that each backend header defines (``metal_header.h``, ``cuda_header.cuh``, and
``host_header.h`` for the CPU emulation used by the tests). A short per-backend
prologue maps the thread/threadgroup indices onto ``LANE``, ``WARP``,
``BID_X``, ``BID_Y``; it is part of the *source* (not the header) because MLX's
Metal signature writer only adds the ``[[thread_index_in_simdgroup]]``-style
attributes that the source text mentions.

Besides the strings that ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` take
(``header(backend)``, ``source(kernel, backend)``), this module assembles whole
translation units the way MLX 0.32 does (``assemble_*``), for the compile checks
in the tests and for the standalone files that ``scripts/gen_metal.py`` writes.
"""

from functools import lru_cache
from pathlib import Path

SRC_DIR = Path(__file__).resolve().parent

HEADER_FILES = {
    "metal": "metal_header.h",
    "cuda": "cuda_header.cuh",
    "host": "host_header.h",
}
COMMON_FILE = "moe_common.h"

PROLOGUE = {
    "metal": (
        "  const unsigned int LANE = thread_index_in_simdgroup;\n"
        "  const unsigned int WARP = simdgroup_index_in_threadgroup;\n"
        "  const unsigned int BID_X = threadgroup_position_in_grid.x;\n"
        "  const unsigned int BID_Y = threadgroup_position_in_grid.y;\n"
    ),
    "cuda": (
        "  const unsigned int LANE = threadIdx.x & 31u;\n"
        "  const unsigned int WARP = threadIdx.x >> 5;\n"
        "  const unsigned int BID_X = blockIdx.x;\n"
        "  const unsigned int BID_Y = blockIdx.y;\n"
    ),
    "host": (
        "  const unsigned int LANE = unsigned(moe_emu::cur->tid) & 31u;\n"
        "  const unsigned int WARP = unsigned(moe_emu::cur->tid) >> 5;\n"
        "  const unsigned int BID_X = unsigned(moe_emu::bx);\n"
        "  const unsigned int BID_Y = unsigned(moe_emu::by);\n"
    ),
}

# name -> (body file, input names, output names, template names)
KERNELS = {
    "moe_gate_up": (
        "moe_gate_up.inc",
        ["x", "ids", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b",
         "gate_bias", "up_bias"],
        ["h"],
        ["XK", "WK", "BITS", "GS", "ACT", "HAS_BIAS", "IN_DIM", "OUT_DIM",
         "TOPK", "N_EXPERTS", "LPR", "RPS", "WPB"],
    ),
    "moe_down": (
        "moe_down.inc",
        ["h", "ids", "tw", "down_w", "down_s", "down_b", "down_bias"],
        ["y"],
        ["WK", "BITS", "GS", "HAS_BIAS", "IN_DIM", "OUT_DIM", "TOPK",
         "N_EXPERTS", "LPR", "RB", "WPB", "OT"],
    ),
}


@lru_cache(maxsize=None)
def read(name: str) -> str:
    return (SRC_DIR / name).read_text()


def header(backend: str) -> str:
    """The ``header=`` string: backend header followed by the shared helpers."""
    return read(HEADER_FILES[backend]) + "\n" + read(COMMON_FILE)


def source(kernel: str, backend: str) -> str:
    """The ``source=`` string (function body): prologue followed by the body."""
    return PROLOGUE[backend] + read(KERNELS[kernel][0])


def minify(text: str) -> str:
    """Drop comments, indentation and blank lines (same code, shorter string).

    MLX hashes and copies the whole kernel source on every call of a custom
    kernel, so the runtime strings are kept short.
    """
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("//"):
            continue
        i = s.find("//")
        if i >= 0 and '"' not in s[i:]:
            s = s[:i].rstrip()
        out.append(s)
    return "\n".join(out) + "\n"


def input_names(kernel):
    return list(KERNELS[kernel][1])


def output_names(kernel):
    return list(KERNELS[kernel][2])


def template_names(kernel):
    return list(KERNELS[kernel][3])


# ----------------------------------------------------- whole translation units
# Type names per backend for dtype names ("float32", "bfloat16", ...).
TYPE_NAMES = {
    "metal": {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t",
              "uint32": "uint32_t", "int32": "int32_t", "uint8": "uint8_t"},
    "cuda": {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16",
             "uint32": "uint32_t", "int32": "int32_t", "uint8": "uint8_t"},
    "host": {"float32": "float", "float16": "f16_t", "bfloat16": "bf16_t",
             "uint32": "uint32_t", "int32": "int32_t", "uint8": "uint8_t"},
}

# The attributes MLX's Metal signature writer knows, in its order.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]


def _tvalue(backend, v):
    if isinstance(v, str):  # a dtype name
        return TYPE_NAMES[backend][v]
    return str(int(v))


def assemble_metal(kernel, func_name, in_types, in_sizes, out_types, template,
                   instantiate=True, minified=False):
    """Metal source as MLX 0.32's ``metal_kernel`` writes it.

    ``in_types``/``out_types`` are dtype names, ``in_sizes`` element counts (MLX
    passes inputs of fewer than 8 elements in the ``constant`` address space),
    ``template`` a list of (name, int or dtype name).
    """
    names_in, names_out = input_names(kernel), output_names(kernel)
    mini = minify if minified else (lambda t: t)
    src = mini(source(kernel, "metal"))
    out = [mini(header("metal"))]
    if template:
        kinds = ["typename" if isinstance(v, str) else "int" for _, v in template]
        out.append("template <" + ", ".join(
            f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n")
    params = []
    idx = 0
    for n, t, size in zip(names_in, in_types, in_sizes):
        loc = "constant" if size < 8 else "device"
        params.append(f"  const {loc} {TYPE_NAMES['metal'][t]}* {n} [[buffer({idx})]]")
        idx += 1
    for n, t in zip(names_out, out_types):
        params.append(f"  device {TYPE_NAMES['metal'][t]}* {n} [[buffer({idx})]]")
        idx += 1
    for attr, ty in METAL_ATTRIBUTES:
        if attr in src:
            params.append(f"  {ty} {attr} [[{attr}]]")
    out.append(f"[[kernel]] void {func_name}(\n" + ",\n".join(params) + ") {\n")
    out.append(src)
    out.append("\n}\n")
    if template and instantiate:
        targs = func_name + "<" + ", ".join(_tvalue("metal", v) for _, v in template) + ">"
        out.append(f'\ntemplate [[host_name("{func_name}")]] [[kernel]] '
                   f"decltype({targs}) {targs};\n")
    return "".join(out)


def _assemble_flat(backend, kernel, func_name, in_types, out_types, template,
                   qualifier, minified=False):
    """CUDA (as MLX 0.32's ``cuda_kernel`` writes it) or host emulation source."""
    names_in, names_out = input_names(kernel), output_names(kernel)
    tn = TYPE_NAMES[backend]
    params = [f"    const {tn[t]}* {n}" for n, t in zip(names_in, in_types)]
    params += [f"    {tn[t]}* {n}" for n, t in zip(names_out, out_types)]
    out = [f"{qualifier}void {func_name}(\n" + ",\n".join(params) + ") {\n"]
    for n, v in template:
        if isinstance(v, str):
            out.append(f"  using {n} = {tn[v]};\n")
        else:
            out.append(f"  constexpr int {n} = {int(v)};\n")
    src = source(kernel, backend)
    out.append("\n" + (minify(src) if minified else src) + "\n}\n")
    return "".join(out)


def assemble_cuda(kernel, func_name, in_types, out_types, template,
                  mlx_header=None, minified=False):
    """CUDA translation unit as MLX builds it for NVRTC.

    MLX starts with ``#include "mlx/backend/cuda/device/utils.cuh"`` and
    ``<cooperative_groups.h>``; outside MLX pass ``mlx_header`` to replace it.
    """
    default = mlx_header if mlx_header is not None else (
        '#include "mlx/backend/cuda/device/utils.cuh"\n\n'
        "#include <cooperative_groups.h>\n\n")
    body = _assemble_flat("cuda", kernel, func_name, in_types, out_types,
                          template, "__global__ ", minified)
    hdr = minify(header("cuda")) if minified else header("cuda")
    return (default + hdr + "namespace mlx::core::cu {\n\n"
            "namespace cg = cooperative_groups;\n\n" + body
            + "\n} // namespace mlx::core::cu\n")


def assemble_host_function(kernel, func_name, in_types, out_types, template):
    """One kernel as a plain C++ function for the host emulation (no header)."""
    return _assemble_flat("host", kernel, func_name, in_types, out_types,
                          template, "static ")
