"""Run the fused decode kernels' bodies on the CPU (tests only).

The same ``moe_gate_up.inc`` / ``moe_down.inc`` bodies (mlx_moe/kernels/fused/) that Metal and CUDA
compile are built with the host C++ compiler against ``host_header.h``, which
runs each threadblock as one fiber per thread with real lane semantics for the
simdgroup reductions. This checks indexing, tails and reductions of the actual
kernel text before any GPU sees it. It cannot check timing, memory coalescing,
the GPU compilers, or anything backend-specific (``metal_header.h`` and
``cuda_header.cuh`` are not used here).
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..kernels.fused import backend as fused
from ..kernels.fused import sources

DTYPE = {
    mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16",
    mx.uint32: "uint32", mx.int32: "int32", mx.uint8: "uint8",
}


def compiler():
    for c in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _tname(v):
    return DTYPE[v] if isinstance(v, mx.Dtype) else v


def _func_name(kernel, template, in_types, out_types):
    key = repr((kernel, template, in_types, out_types)).encode()
    return f"{kernel}_{hashlib.sha1(key).hexdigest()[:12]}"


class HostLibrary:
    """A shared library of emulated kernel instances, built once per config set."""

    def __init__(self, configs, cache_dir, opt="-O1", extra=""):
        """``configs``: list of ``(kernel, template, in_types, out_types)``
        with template values ints or dtype names; ``cache_dir``: where the
        sources and libraries go (reused across calls); ``extra``: more C++
        code (e.g. ``extern "C"`` wrappers of helpers for tests)."""
        funcs, launchers, self.names = [], [], {}
        for kernel, template, in_types, out_types in configs:
            key = (kernel, tuple(template), tuple(in_types), tuple(out_types))
            if key in self.names:
                continue
            name = _func_name(*key)
            self.names[key] = name
            funcs.append(sources.assemble_host_function(
                kernel, name, in_types, out_types, list(template)))
            nin, nout = len(in_types), len(out_types)
            tn = sources.TYPE_NAMES["host"]
            args = [f"(const {tn[t]}*)in[{i}]" for i, t in enumerate(in_types)]
            args += [f"({tn[t]}*)out[{i}]" for i, t in enumerate(out_types)]
            launchers.append(
                f'extern "C" int launch_{name}(void** in, void** out, int nbx, int nby, int nt) {{\n'
                f"  moe_emu::error = false;\n"
                f"  for (int by = 0; by < nby; ++by)\n"
                f"    for (int bx = 0; bx < nbx; ++bx)\n"
                f"      if (!moe_emu::run_block(nt, bx, by, [&]() {{ {name}({', '.join(args)}); }}))\n"
                f"        return 1;\n"
                f"  return 0;\n}}\n")
            assert nin and nout
        text = (sources.header("host") + "\n" + "\n".join(funcs) + "\n"
                + "\n".join(launchers) + "\n" + extra)
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        so = cache / f"emu_{digest}.so"
        if not so.exists():
            cpp = cache / f"emu_{digest}.cpp"
            cpp.write_text(text)
            cxx = compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler for the kernel emulation")
            tmp = cache / f"emu_{digest}.{os.getpid()}.so"
            subprocess.run(
                [cxx, "-std=c++17", opt, "-shared", "-fPIC", "-w", "-o", str(tmp), str(cpp)],
                check=True, capture_output=True, text=True)
            os.replace(tmp, so)
        self.lib = ctypes.CDLL(str(so))

    def launch(self, kernel, template, inputs, out_shapes, out_types, grid, tg):
        in_types = tuple(_tname(a.dtype) for a in inputs)
        key = (kernel, tuple((n, _tname(v)) for n, v in template), in_types, tuple(out_types))
        name = self.names[key]
        keep = [_raw(a) for a in inputs]
        outs = [np.zeros(s, dtype=_np_dtype(t)) for s, t in zip(out_shapes, out_types)]
        in_ptrs = (ctypes.c_void_p * len(keep))(*[k.ctypes.data for k in keep])
        out_ptrs = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
        nbx, nby = grid[0] // tg[0], grid[1]
        rc = getattr(self.lib, f"launch_{name}")(in_ptrs, out_ptrs, nbx, nby, tg[0])
        if rc:
            raise RuntimeError(f"emulated kernel {kernel} failed (divergent barrier)")
        return outs


def _np_dtype(t):
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
            "uint32": np.uint32, "int32": np.int32, "uint8": np.uint8}[t]


def _raw(a):
    """Contiguous NumPy view of an MLX array's bytes (bfloat16 as uint16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def bf16_to_float(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def layer_configs(experts, x, ids, weights=None):
    """The two ``(kernel, template, in_types, out_types)`` of a fused call
    (``weights`` only matters for its dtype; float32 when None)."""
    p = fused.plan(experts, x, ids)
    ins_a, ins_b = _layer_inputs(experts, x, ids, weights, p)
    tpl = lambda t: tuple((n, _tname(v)) for n, v in t)  # noqa: E731
    types_a = tuple(_tname(a.dtype) for a in ins_a)
    types_b = tuple(_tname(a.dtype) for a in ins_b)
    return [
        ("moe_gate_up", tpl(p.template_a), types_a, ("float32",)),
        ("moe_down", tpl(p.template_b), types_b, (DTYPE[x.dtype],)),
    ]


def _layer_inputs(experts, x, ids, weights, p, h=None):
    """Kernel inputs in the order and with the dummies fused.py uses."""
    m, K = p.m, p.k
    tw = weights if weights is not None else mx.ones(ids.shape, mx.float32)
    if h is None:
        h = mx.zeros((m * K, p.inter), mx.float32)
    gw, gs, gb, gbias = fused._inputs(experts["gate_proj"], x)
    uw, us, ub, ubias = fused._inputs(experts["up_proj"], x)
    dw, ds, db, dbias = fused._inputs(experts["down_proj"], h)
    ins_a = [x, ids, gw, gs, gb, uw, us, ub, gbias, ubias]
    ins_b = [h, ids, tw, dw, ds, db, dbias]
    return ins_a, ins_b


def run_layer(lib, experts, x, weights, ids):
    """Emulated fused layer: ``(y, h)`` as NumPy (y float32 from x's dtype)."""
    p = fused.plan(experts, x, ids)
    ins_a, _ = _layer_inputs(experts, x, ids, weights, p)
    tpl_a = [(n, _tname(v)) for n, v in p.template_a]
    tpl_b = [(n, _tname(v)) for n, v in p.template_b]
    (h,) = lib.launch("moe_gate_up", tpl_a, ins_a, [(p.m * p.k, p.inter)], ("float32",),
                      p.grid_a, p.tg_a)
    _, ins_b = _layer_inputs(experts, x, ids, weights, p, h=mx.array(h))
    yt = DTYPE[x.dtype]
    (y,) = lib.launch("moe_down", tpl_b, ins_b, [x.shape], (yt,), p.grid_b, p.tg_b)
    if yt == "bfloat16":
        y = bf16_to_float(y)
    return y.astype(np.float32).reshape(p.m, p.hidden), h
