"""Run the router kernel's body on the CPU (tests only).

``moe_router.inc`` is built with the host C++ compiler against the fused
kernels' ``host_header.h`` (one fiber per GPU thread, block barriers) plus
``router_sync.h``'s host branch, through :class:`emulate_fused.HostLibrary`'s
build-and-cache; one block per token as on the GPU. What this cannot check is
what ``emulate_fused`` cannot: timing, the GPU compilers, backend headers.
"""

import ctypes
import hashlib

import mlx.core as mx
import numpy as np

from ..kernels.router import backend, sources
from .emulate_fused import DTYPE, HostLibrary, _np_dtype, _raw, _tname, bf16_to_float


def config(gate, router, x):
    """``(template, in_types, out_types)`` of the kernel call ``backend.route`` makes."""
    p = backend.plan(gate, router, x)
    ins = backend.inputs(gate, x, p.kind)
    return (tuple((n, _tname(v)) for n, v in p.template),
            tuple(_tname(a.dtype) for a in ins), (DTYPE[p.out_dtype], "uint32"))


def _name(cfg):
    return "moe_router_" + hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]


class RouterLibrary:
    """Emulated router kernel instances, built once for a list of configs."""

    def __init__(self, configs, cache_dir):
        funcs, self.names = [], {}
        tn = sources.fused.TYPE_NAMES["host"]
        for cfg in configs:
            if cfg in self.names:
                continue
            template, in_types, out_types = cfg
            name = self.names[cfg] = _name(cfg)
            funcs.append(sources.assemble_host_function(name, in_types, out_types, list(template)))
            args = [f"(const {tn[t]}*)in[{i}]" for i, t in enumerate(in_types)]
            args += [f"({tn[t]}*)out[{i}]" for i, t in enumerate(out_types)]
            funcs.append(
                f'extern "C" int launch_{name}(void** in, void** out, int nby, int nt) {{\n'
                f"  for (int by = 0; by < nby; ++by)\n"
                f"    if (!moe_emu::run_block(nt, 0, by, [&]() {{ {name}({', '.join(args)}); }}))\n"
                f"      return 1;\n"
                f"  return 0;\n}}\n")
        extra = sources.read(sources.SYNC) + "\n" + "\n".join(funcs)
        self.lib = HostLibrary([], cache_dir, extra=extra).lib

    def launch(self, cfg, inputs, out_shape, grid, tg):
        """Raw outputs (NumPy; bfloat16 as uint16) of one launch."""
        keep = [_raw(a) for a in inputs]
        outs = [np.zeros(out_shape, _np_dtype(t)) for t in cfg[2]]
        in_ptrs = (ctypes.c_void_p * len(keep))(*[k.ctypes.data for k in keep])
        out_ptrs = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
        if getattr(self.lib, f"launch_{self.names[cfg]}")(in_ptrs, out_ptrs, grid[1], tg[0]):
            raise RuntimeError("emulated router kernel failed (divergent barrier)")
        return outs

    def run(self, gate, router, x):
        """``(weights float32, ids)`` as NumPy ``[..., k]`` from the emulated kernel."""
        cfg = config(gate, router, x)
        p = backend.plan(gate, router, x)
        w, ids = self.launch(cfg, backend.inputs(gate, x, p.kind), p.out_shape, p.grid, p.tg)
        w = bf16_to_float(w) if cfg[2][0] == "bfloat16" else w
        return w.astype(np.float32), ids

    def kernel_object(self):
        """Stands in for the ``mx.fast`` kernel object in ``backend.route``."""
        lib = self

        def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            cfg = (tuple((n, _tname(v)) for n, v in template),
                   tuple(_tname(a.dtype) for a in inputs),
                   tuple(DTYPE[d] for d in output_dtypes))
            w, ids = lib.launch(cfg, inputs, output_shapes[0], grid, threadgroup)
            w = mx.array(w)
            return [w.view(mx.bfloat16) if output_dtypes[0] == mx.bfloat16 else w, mx.array(ids)]

        return call
