"""CPU tests of the fused decode kernels (mlx_moe/kernels/fused).

* the NumPy reference of the kernels' exact semantics agrees with the ``gather``
  and ``loop`` backends;
* the kernel bodies themselves, compiled for the host against host_header.h
  (one fiber per GPU thread, real lane reductions), match that reference over
  formats, activations, dtypes, biases, token counts and launch shapes;
* the generated Metal files are fresh; the Metal emission passes a host C++
  syntax check against a shim (tests/metal_shim/metal_shim.h says what that
  cannot catch); the CUDA emission compiles with nvcc when present;
* the ``fused`` backend registers, refuses the CPU with a reason, and plans
  only supported calls.
"""

import importlib.util
import math
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import kernels
from mlx_moe.experts import BACKENDS, run_gather, run_loop
from mlx_moe.kernels.fused import backend as fused
from mlx_moe.kernels.fused import sources
from mlx_moe.testing import emulate_fused as emulate
from mlx_moe.testing import reference
from mlx_moe.testing.reference import random_experts, random_inputs, rel_err

ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "metal_shim"

F32, BF16, F16 = mx.float32, mx.bfloat16, mx.float16


def _gen_metal():
    spec = importlib.util.spec_from_file_location("gen_metal", ROOT / "scripts" / "gen_metal.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------- reference itself

REF_CASES = [
    (("affine", 4, 64), "silu", False),
    (("affine", 8, 32), "gelu_tanh", True),
    (("affine", 4, 128), "gelu", False),
    (("affine", 8, 128), "relu", False),
    (("mxfp4", 4, 32), "swiglu_oai", True),
    (("float", 0, 0), "silu", True),
]


@pytest.mark.parametrize("fmt,act,bias", REF_CASES)
def test_reference_matches_backends(fmt, act, bias):
    e = random_experts(6, 256, 128, act, fmt, F32, bias)
    x, w, ids = random_inputs(e, 3, 2, F32)
    y = reference.reference(e, x, w, ids)
    for run in (run_gather, run_loop):
        out = np.array(run(e, x, w, ids).astype(F32))
        assert rel_err(out, y, "max") < 1e-5, run.__name__


# --------------------------------------------------------- emulated kernels

# (fmt, act, bias, x dtype, E, H, I, [(m, k)], tuning overrides)
EMU_CASES = [
    (("affine", 4, 32), "silu", False, BF16, 6, 320, 96, [(1, 3), (3, 2)], None),
    (("affine", 4, 64), "gelu_tanh", True, BF16, 6, 320, 192, [(1, 4), (8, 4)], None),
    (("affine", 4, 128), "gelu", False, F16, 6, 384, 256, [(2, 3)], None),
    (("affine", 8, 32), "relu", False, F32, 6, 320, 96, [(1, 2), (4, 2)], None),
    (("affine", 8, 64), "swiglu_oai", True, BF16, 6, 320, 192, [(1, 3), (5, 3)], None),
    (("affine", 8, 128), "silu", False, BF16, 8, 256, 128, [(1, 8)], None),
    (("mxfp4", 4, 32), "swiglu_oai", True, BF16, 6, 320, 96, [(1, 4), (3, 4)], None),
    (("float", 0, 0), "silu", False, BF16, 6, 320, 96, [(1, 3)], None),
    (("float", 0, 0), "gelu", True, F16, 6, 320, 96, [(2, 2)], None),
    (("float", 0, 0), "relu", False, F32, 6, 256, 64, [(1, 3)], None),
    # launch-shape variants: lanes per row, rows per subgroup/warp, warps per block
    (("affine", 4, 64), "silu", False, BF16, 6, 1024, 192, [(1, 4), (2, 4)],
     ({"lpr": 32, "rps": 1, "wpb": 2}, {"lpr": 32, "rb": 1, "wpb": 1})),
    (("affine", 4, 64), "silu", True, BF16, 6, 1024, 192, [(2, 4)],
     ({"lpr": 4, "rps": 3, "wpb": 8}, {"lpr": 4, "rb": 3, "wpb": 2})),
    (("affine", 8, 32), "gelu", False, BF16, 6, 320, 160, [(3, 3)],
     ({"lpr": 16, "rps": 4, "wpb": 1}, {"lpr": 16, "rb": 4, "wpb": 4})),
]

EXTRA_CPP = """
extern "C" float moe_test_erf(float x) { return moe_erf_approx(x); }
extern "C" float moe_test_e2m1(unsigned q) { return moe_e2m1(q); }
extern "C" float moe_test_e8m0(float s) { return moe_e8m0(s); }
"""


def _emu_layers():
    layers = []
    for i, (fmt, act, bias, dt, E, H, I, mks, tune) in enumerate(EMU_CASES):
        e = random_experts(E, H, I, act, fmt, dt, bias, seed=i)
        for j, (m, k) in enumerate(mks):
            ids_dtype = mx.int32 if j % 2 else mx.uint32
            x, w, ids = random_inputs(e, m, k, dt, seed=10 * i + j, ids_dtype=ids_dtype)
            layers.append((i, e, x, w, ids, tune))
    return layers


@pytest.fixture(autouse=True)
def _restore_tuning():
    """Launch-shape overrides are module globals of the backend: never leak them."""
    yield
    fused.reset_tuning()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if emulate.compiler() is None:
        pytest.skip("no host C++ compiler")
    layers = _emu_layers()
    configs = []
    for _, e, x, w, ids, tune in layers:
        with _tuning(tune):
            configs += emulate.layer_configs(e, x, ids, w)
    lib = emulate.HostLibrary(configs, tmp_path_factory.mktemp("fused_emu"), extra=EXTRA_CPP)
    return lib, layers


class _tuning:
    def __init__(self, tune):
        self.tune = tune

    def __enter__(self):
        if self.tune:
            fused.set_tuning(*self.tune)

    def __exit__(self, *exc):
        fused.reset_tuning()


def test_emulated_kernels_match_reference(emu):
    lib, layers = emu
    for i, e, x, w, ids, tune in layers:
        with _tuning(tune):
            y, h = emulate.run_layer(lib, e, x, w, ids)
        y_ref, h_ref = reference.reference(e, x, w, ids, return_h=True)
        what = f"case {i} {EMU_CASES[i][:4]} m={x.shape[0]} k={ids.shape[-1]}"
        assert rel_err(h, h_ref, "max") < 2e-6, what
        # y is written in x's dtype: its rounding dominates
        tol = {F32: 2e-6, F16: 2e-3, BF16: 8e-3}[x.dtype]
        assert rel_err(y, y_ref, "max") < tol, what
        # and the project's oracle, in x's dtype
        y_loop = np.array(run_loop(e, x, w, ids).astype(F32))
        loop_tol = {F32: 1e-5, F16: 1e-2, BF16: 3e-2}[x.dtype]
        assert rel_err(y, y_loop, "max") < loop_tol, what


class _EmuKernel:
    """Stands in for an ``mx.fast`` kernel object: runs the emulated body."""

    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        tpl = [(n, emulate._tname(v)) for n, v in template]
        out_t = tuple(emulate.DTYPE[d] for d in output_dtypes)
        outs = self.lib.launch(self.name, tpl, inputs, output_shapes, out_t, grid, threadgroup)
        res = []
        for o, d in zip(outs, output_dtypes):
            a = mx.array(o)
            res.append(a.view(mx.bfloat16) if d == BF16 else a)
        return res


def test_fused_call_path_on_emulator(emu, monkeypatch):
    """The backend's own call path (inputs in kernel order, unreshaped
    [1, m, H] activations, grids, templates) with the kernels emulated."""
    lib, layers = emu
    kernels.register()
    monkeypatch.setattr(fused, "kernel_object", lambda name, backend: _EmuKernel(lib, name))
    monkeypatch.setattr(fused, "gpu_backend", lambda: "cuda")

    def plan_only(e, x, ids):
        try:
            fused.plan(e, x, ids)
        except fused.Unsupported as ex:
            return str(ex)
        return None

    monkeypatch.setattr(fused, "why_not", plan_only)
    for i, e, x, w, ids, tune in layers[:8]:
        if tune:
            continue
        m, k = ids.shape
        xs, ws, idss = x.reshape(1, m, -1), w.reshape(1, m, k), ids.reshape(1, m, k)
        assert e.select_backend(xs, idss) == "fused"
        y = e(xs, ws, idss)
        assert y.shape == xs.shape and y.dtype == x.dtype
        y_ref = reference.reference(e, x, w, ids)
        tol = {F32: 2e-6, F16: 2e-3, BF16: 8e-3}[x.dtype]
        assert rel_err(np.array(y.astype(F32)).reshape(m, -1), y_ref, "max") < tol, i


def test_emulated_helpers(emu):
    lib, _ = emu
    import ctypes

    f = lib.lib.moe_test_erf
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    err = max(abs(f(v) - math.erf(v)) for v in np.linspace(-6, 6, 2001))
    assert err < 3e-7
    g = lib.lib.moe_test_e2m1
    g.restype, g.argtypes = ctypes.c_float, [ctypes.c_uint]
    assert [g(q) for q in range(16)] == list(reference.E2M1)
    s = lib.lib.moe_test_e8m0
    s.restype, s.argtypes = ctypes.c_float, [ctypes.c_float]
    assert [s(v) for v in (0.0, 1.0, 127.0, 130.0, 254.0)] == [
        2.0 ** -127, 2.0 ** -126, 1.0, 8.0, 2.0 ** 127]


# ------------------------------------------------------------- source checks


def test_generated_metal_is_fresh():
    stale = _gen_metal().stale()
    assert not stale, f"stale generated Metal {stale}: run python scripts/gen_metal.py"


def test_generated_metal_sections_are_the_sources():
    gen = _gen_metal()
    for kernel in sources.KERNELS:
        text = (gen.OUT_DIR / f"{kernel}.metal").read_text()
        assert gen.extract(text, "HEADER") == sources.header("metal").rstrip("\n")
        assert gen.extract(text, "SOURCE") == sources.source(kernel, "metal").rstrip("\n")


def _metal_units(minified):
    """MLX-assembled Metal sources of a spread of configs, with instantiation."""
    units = []
    a_types = ["bfloat16", "uint32", "uint32", "bfloat16", "bfloat16", "uint32",
               "bfloat16", "bfloat16", "bfloat16", "bfloat16"]
    for n, (wk, bits, gs, act, xk) in enumerate(
            [(0, 4, 64, 0, 2), (0, 8, 32, 1, 1), (1, 4, 32, 4, 2), (4, 16, 256, 2, 0),
             (3, 16, 256, 3, 2), (2, 16, 256, 0, 2)]):
        tpl = [("XK", xk), ("WK", wk), ("BITS", bits), ("GS", gs), ("ACT", act),
               ("HAS_BIAS", n % 2), ("IN_DIM", 256), ("OUT_DIM", 96), ("TOPK", 4),
               ("N_EXPERTS", 8), ("LPR", 8), ("RPS", 2), ("WPB", 4)]
        # ids of 4 elements go to the constant address space
        units.append(sources.assemble_metal(
            "moe_gate_up", f"moe_gate_up_{n}", a_types, [256, 4] + [1000] * 8,
            ["float32"], tpl, minified=minified))
        tpl_b = [("WK", wk), ("BITS", bits), ("GS", gs), ("HAS_BIAS", n % 2),
                 ("IN_DIM", 96 if wk < 2 else 96), ("OUT_DIM", 256), ("TOPK", 4),
                 ("N_EXPERTS", 8), ("LPR", 8), ("RB", 2), ("WPB", 4),
                 ("OT", ["float32", "float16", "bfloat16"][n % 3])]
        units.append(sources.assemble_metal(
            "moe_down", f"moe_down_{n}",
            ["float32", "int32", "float32", "uint32", "uint8" if wk == 1 else "float16",
             "float16", "float16"], [1000, 4, 4, 1000, 1000, 1000, 1000],
            [["float32", "float16", "bfloat16"][n % 3]], tpl_b, minified=minified))
    return units


def _gxx():
    return shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(_gxx() is None, reason="no host C++ compiler")
def test_metal_emission_syntax(tmp_path):
    gen = _gen_metal()
    # the readable strings, and the minified ones fused.py hands to MLX
    for minified in (False, True):
        hdr = sources.header("metal")
        hdr = sources.minify(hdr) if minified else hdr
        text = hdr + "\n".join(u.replace(hdr, "", 1) for u in _metal_units(minified))
        if not minified:  # the generated standalone files too, instantiated once each
            for kernel, tpl in (
                ("moe_gate_up", "<2, 0, 4, 64, 0, 0, 2048, 768, 8, 128, 32, 2, 4>"),
                ("moe_down", "<0, 4, 64, 0, 768, 2048, 8, 128, 8, 2, 4, bfloat>"),
            ):
                body = (gen.OUT_DIR / f"{kernel}.metal").read_text()
                body = body[body.index("// MOE-HEADER-END"):]
                text += body + f"\ntemplate [[kernel]] decltype({kernel}{tpl}) {kernel}{tpl};\n"
        src = tmp_path / f"metal_check_{int(minified)}.cpp"
        src.write_text(text)
        r = subprocess.run(
            [_gxx(), "-std=c++17", "-fsyntax-only", "-Wno-attributes",
             "-Wno-unknown-pragmas", "-I", str(SHIM), str(src)],
            capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_emission_compiles(tmp_path):
    stub = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n"
    e = random_experts(8, 256, 128, "swiglu_oai", ("affine", 4, 64), BF16, bias=True)
    x, w, ids = random_inputs(e, 1, 4, BF16)
    cfgs = emulate.layer_configs(e, x, ids)
    e2 = random_experts(8, 256, 128, "gelu", ("mxfp4", 4, 32), F16)
    x2, _, ids2 = random_inputs(e2, 2, 4, F16, ids_dtype=mx.int32)
    cfgs += emulate.layer_configs(e2, x2, ids2)
    cfgs = [cfgs[0], cfgs[3]]  # gate_up affine+bias+swiglu_oai (bf16), down mxfp4 (f16)
    units = []
    for n, (kernel, tpl, in_t, out_t) in enumerate(cfgs):
        # minified: the strings fused.py hands to mx.fast.cuda_kernel
        u = sources.assemble_cuda(kernel, f"{kernel}_{n}", in_t, out_t, list(tpl),
                                  mlx_header=stub, minified=True)
        units.append(u if n == 0 else u.replace(stub + sources.minify(sources.header("cuda")), ""))
    src = tmp_path / "fused_check.cu"
    src.write_text("\n".join(units))
    r = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "--resource-usage", "-c", str(src),
         "-o", str(tmp_path / "fused_check.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "spill stores" in r.stderr and " 0 bytes spill stores" in r.stderr


# ----------------------------------------------------------------- backend


def test_fused_backend_registers_and_refuses_cpu():
    kernels.register()
    kernels.register()  # idempotent
    assert "fused" in BACKENDS
    e = random_experts(4, 64, 32, "silu", ("affine", 4, 32), F32)
    x, w, ids = random_inputs(e, 1, 2, F32)
    if fused.gpu_backend() is None or mx.default_device() != mx.gpu:
        assert not BACKENDS["fused"].available(e, x, ids)
        assert e.select_backend(x, ids) == "gather"
        e.backend = "fused"
        with pytest.raises(ValueError, match="GPU"):
            e(x, w, ids)


def test_plan_reasons():
    e = random_experts(4, 256, 128, "silu", ("affine", 4, 64), BF16)
    x, _, ids = random_inputs(e, 9, 2, BF16)
    with pytest.raises(fused.Unsupported, match="9 tokens"):
        fused.plan(e, x, ids)
    e3 = random_experts(4, 256, 128, "silu", ("affine", 3, 64), BF16)
    x, _, ids = random_inputs(e3, 1, 2, BF16)
    with pytest.raises(fused.Unsupported, match="bits"):
        fused.plan(e3, x, ids)
    ef = random_experts(4, 260, 36, "silu", ("float", 0, 0), F32)
    x, _, ids = random_inputs(ef, 1, 2, F32)
    with pytest.raises(fused.Unsupported, match="multiple"):
        fused.plan(ef, x, ids)


def test_plan_geometry_covers_rows():
    e = random_experts(8, 2048, 768, "silu", ("affine", 4, 64), BF16)
    for m in (1, 2, 4, 8):
        x, _, ids = random_inputs(e, m, 8, BF16)
        p = fused.plan(e, x, ids)
        ta, tb = dict(p.template_a), dict(p.template_b)
        rows_a = (p.grid_a[0] // 32) * (32 // ta["LPR"]) * ta["RPS"]
        assert rows_a >= 768 and p.grid_a[1] == 8 * m
        assert (p.grid_b[0] // 32) * tb["RB"] >= 2048 and p.grid_b[1] == m
        assert p.tg_a[0] <= 1024 and p.grid_a[0] % p.tg_a[0] == 0
        assert p.tg_b[0] <= 1024 and p.grid_b[0] % p.tg_b[0] == 0
