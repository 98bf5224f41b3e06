"""Kernel source of the router, assembled per backend.

The body (``moe_router.inc``) is written against the fused kernels' names:
their per-backend header and ``moe_common.h`` (chunk loads, dequant, dot,
``moe_sg_sum``) from ``kernels/fused/``, plus ``router_sync.h`` here
(threadgroup arrays, barrier, lane shuffle). The index prologue is the fused
one. Besides the ``header``/``source`` strings for ``mx.fast.metal_kernel`` /
``mx.fast.cuda_kernel``, this module assembles whole translation units the
way MLX 0.32 does, for the compile checks in the tests.
"""

from functools import lru_cache
from pathlib import Path

from ..fused import sources as fused

SRC_DIR = Path(__file__).resolve().parent
NAME = "moe_router"
BODY = "moe_router.inc"
SYNC = "router_sync.h"
INPUT_NAMES = ["x", "w", "s", "b", "bias", "corr"]
OUTPUT_NAMES = ["weights", "ids"]
TEMPLATE_NAMES = ["XK", "WK", "BITS", "GS", "IN_DIM", "N_EXPERTS", "TOPK", "KIND",
                  "NORM", "HAS_BIAS", "N_GROUP", "TOPK_GROUP", "SCALE_BITS", "WPB", "RB", "OT"]


@lru_cache(maxsize=None)
def read(name: str) -> str:
    return (SRC_DIR / name).read_text()


def header(backend: str) -> str:
    """The ``header=`` string: the fused header + moe_common.h, then router_sync.h."""
    return fused.header(backend) + "\n" + read(SYNC)


def source(backend: str) -> str:
    """The ``source=`` string: the fused index prologue, then the body."""
    return fused.PROLOGUE[backend] + read(BODY)


def _tvalue(backend, v):
    return fused.TYPE_NAMES[backend][v] if isinstance(v, str) else str(int(v))


def assemble_metal(func_name, in_types, in_sizes, out_types, template, minified=False):
    """Metal source as MLX 0.32's ``metal_kernel`` writes it, instantiated once.

    Types are dtype names, ``in_sizes`` element counts (inputs of fewer than 8
    elements are ``constant``), ``template`` a list of (name, int or dtype name).
    """
    mini = fused.minify if minified else (lambda t: t)
    src = mini(source("metal"))
    kinds = ["typename" if isinstance(v, str) else "int" for _, v in template]
    params = []
    for i, (n, t, size) in enumerate(zip(INPUT_NAMES, in_types, in_sizes)):
        loc = "constant" if size < 8 else "device"
        params.append(f"  const {loc} {fused.TYPE_NAMES['metal'][t]}* {n} [[buffer({i})]]")
    for i, (n, t) in enumerate(zip(OUTPUT_NAMES, out_types)):
        params.append(f"  device {fused.TYPE_NAMES['metal'][t]}* {n} [[buffer({len(INPUT_NAMES) + i})]]")
    params += [f"  {ty} {a} [[{a}]]" for a, ty in fused.METAL_ATTRIBUTES if a in src]
    targs = func_name + "<" + ", ".join(_tvalue("metal", v) for _, v in template) + ">"
    return (
        mini(header("metal"))
        + "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
        + f"[[kernel]] void {func_name}(\n" + ",\n".join(params) + ") {\n" + src + "\n}\n"
        + f'\ntemplate [[host_name("{func_name}")]] [[kernel]] decltype({targs}) {targs};\n'
    )


def _assemble_flat(backend, func_name, in_types, out_types, template, qualifier, minified):
    tn = fused.TYPE_NAMES[backend]
    params = [f"    const {tn[t]}* {n}" for n, t in zip(INPUT_NAMES, in_types)]
    params += [f"    {tn[t]}* {n}" for n, t in zip(OUTPUT_NAMES, out_types)]
    out = [f"{qualifier}void {func_name}(\n" + ",\n".join(params) + ") {\n"]
    for n, v in template:
        out.append(f"  using {n} = {tn[v]};\n" if isinstance(v, str)
                   else f"  constexpr int {n} = {int(v)};\n")
    src = source(backend)
    out.append("\n" + (fused.minify(src) if minified else src) + "\n}\n")
    return "".join(out)


def assemble_cuda(func_name, in_types, out_types, template, mlx_header, minified=True):
    """CUDA translation unit as MLX builds it for NVRTC, with ``mlx_header``
    standing in for MLX's ``#include "mlx/backend/cuda/device/utils.cuh"``."""
    hdr = fused.minify(header("cuda")) if minified else header("cuda")
    body = _assemble_flat("cuda", func_name, in_types, out_types, template, "__global__ ", minified)
    return (mlx_header + hdr + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
            + body + "\n} // namespace mlx::core::cu\n")


def assemble_host_function(func_name, in_types, out_types, template):
    """The kernel as a plain C++ function for the host emulation (no header)."""
    return _assemble_flat("host", func_name, in_types, out_types, template, "static ", False)
