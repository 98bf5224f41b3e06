"""Run the prefill kernels' bodies on the CPU (tests only).

The same ``prefill_*.inc`` bodies (mlx_moe/kernels/prefill/) that CUDA and
Metal compile are built with the host C++ compiler against ``prefill_cpu.h``:
one ``std::thread`` per GPU thread, real block barriers. ``mode="cpu"`` uses a
scalar warp tile; ``mode="cpu_mma16816"`` runs the CUDA warp tile's fragment
code (``prefill_mma16816.h``) on an emulated ``mma.sync``. :func:`cpu_launcher`
has the launcher signature of :func:`mlx_moe.kernels.prefill.backend.mlx_launcher`.
"""

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..kernels.prefill.sources import KERNEL_SPECS, emit, template_consts

C_TYPES = {
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


def cpu_source(kernel, inputs, template, out_dtypes, mode="cpu", bk=32):
    """The C++ translation unit running one kernel instance on ``std::thread``s."""
    header, source = emit(mode, kernel, bk)
    _, in_names, out_names, threads = KERNEL_SPECS[kernel]
    params = ["int pf_tid", "int pf_bx", "int pf_by"]
    casts = []
    for n, a in zip(in_names, inputs):
        params.append(f"const {C_TYPES[a.dtype]}* {n}")
        casts.append(f"(const {C_TYPES[a.dtype]}*)a[{len(casts)}]")
        if f"{n}_shape" in source:
            params.append(f"const int* {n}_shape")
            casts.append(f"(const int*)a[{len(casts)}]")
    for n, d in zip(out_names, out_dtypes):
        params.append(f"{C_TYPES[d]}* {n}")
        casts.append(f"({C_TYPES[d]}*)a[{len(casts)}]")
    consts = template_consts(template, C_TYPES)
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


def cpu_launcher(cache_dir, mode="cpu", cxx="g++"):
    """A launcher running the kernel bodies on the CPU; libraries are built
    into (and reused from) ``cache_dir``."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    libs = {}

    def launch(kernel, inputs, template, grid, out_shapes, out_dtypes, bk=32):
        src = cpu_source(kernel, inputs, template, out_dtypes, mode, bk)
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
