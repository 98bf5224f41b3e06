"""The on-disk cache of our CUDA kernels (``mlx_moe/kernels/cuda_cache.py``, issue 17).

CPU: the module name MLX looks for (libstdc++ ``std::hash`` checked against
g++, MLX's source layout checked against ``fused/sources.py``), the standalone
translation unit (nvcc for sm_90a, same mangled kernel name), path naming, the
prepare path with a fake kernel object (hit / compile / failure / off).

GPU (``-m gpu``, CUDA only): three child processes sharing one
``MLX_PTX_CACHE_DIR``: MLX alone (cache off: our source == MLX's verbose
source, reference outputs, NVRTC time), cache on and cold (we compile and
write the files), cache on and warm (first fused call < 0.5 s, outputs bit
equal); one more checks MLX's default cache directory.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_moe.kernels import cuda_cache as cc
from mlx_moe.kernels.common import gpu_backend
from mlx_moe.kernels.fused import sources as fsrc
from mlx_moe.kernels.prefill import sources as psrc

BF16, F16, F32 = mx.bfloat16, mx.float16, mx.float32

# ------------------------------------------------------------- variants

# Qwen3-30B-A3B-shaped decode layer: H 2048, I 768, 128 experts, top-8, 4-bit g64.
GATE_UP_TPL = [("XK", 2), ("WK", 0), ("BITS", 4), ("GS", 64), ("ACT", 0), ("HAS_BIAS", 0),
               ("IN_DIM", 2048), ("OUT_DIM", 768), ("TOPK", 8), ("N_EXPERTS", 128),
               ("LPR", 16), ("RPS", 2), ("WPB", 4)]
DOWN_TPL = [("WK", 0), ("BITS", 4), ("GS", 64), ("HAS_BIAS", 0), ("IN_DIM", 768),
            ("OUT_DIM", 2048), ("TOPK", 8), ("N_EXPERTS", 128), ("LPR", 8), ("RB", 4),
            ("WPB", 4), ("OT", BF16)]
GATE_UP_IN = [BF16, mx.uint32, mx.uint32, BF16, BF16, mx.uint32, BF16, BF16, BF16, BF16]
DOWN_IN = [F32, mx.uint32, BF16, mx.uint32, BF16, BF16, F32]


def _arrays(dtypes, ndim=2):
    return [mx.zeros((1,) * ndim, d) for d in dtypes]


def _fused_kernel(kernel, fake=None):
    spec = dict(name=kernel, input_names=fsrc.input_names(kernel),
                output_names=fsrc.output_names(kernel),
                source=fsrc.minify(fsrc.source(kernel, "cuda")),
                header=fsrc.minify(fsrc.header("cuda")))
    return cc.wrap(fake, **spec)


def _prefill_kernel(kernel="gemm", bk=32, fake=None):
    header, source = psrc.emit("cuda", kernel, bk)
    _, ins, outs, _ = psrc.KERNEL_SPECS[kernel]
    return cc.wrap(fake, name=f"mlx_moe_prefill_{kernel}_bk{bk}", input_names=ins,
                   output_names=outs, source=source, header=header)


def _variants():
    """(CachedKernel, inputs, template, output dtypes) of one Qwen3-30B layer."""
    ptpl = [("T", BF16), ("BITS", 4), ("GS", 64), ("GATED", 1), ("ACT", 0), ("HAS_BIAS", 0),
            ("E", 128), ("K", 2048), ("N", 768), ("TOPK", 8)]
    pin = [BF16, mx.int32, mx.int32, mx.int32, mx.uint32, BF16, BF16, mx.uint32, BF16, BF16,
           F32, F32]
    return [
        (_fused_kernel("moe_gate_up"), _arrays(GATE_UP_IN), GATE_UP_TPL, [F32]),
        (_fused_kernel("moe_down"), _arrays(DOWN_IN), DOWN_TPL, [BF16]),
        (_prefill_kernel(), _arrays(pin), ptpl, [BF16]),
    ]


# ------------------------------------------------------------- std::hash

ORACLE = r"""
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream f(argv[i], std::ios::binary);
    std::stringstream ss; ss << f.rdbuf();
    std::printf("%zx\n", std::hash<std::string>{}(ss.str()));
  }
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_std_hash_matches_gxx(tmp_path):
    exe = tmp_path / "oracle"
    (tmp_path / "oracle.cpp").write_text(ORACLE)
    subprocess.run(["g++", "-O1", "-o", str(exe), str(tmp_path / "oracle.cpp")], check=True)
    rng = random.Random(0)
    alpha = "abcdefghijklmnopqrstuvwxyz0123456789"
    blobs = [b""] + [alpha[:n].encode() for n in range(1, 18)]
    blobs += [bytes(rng.randrange(256) for _ in range(n)) for n in (7, 8, 9, 63, 64, 65, 1000)]
    blobs += ["héllo → ∑ 中文 ✓".encode(), ("x" * 100003).encode()]
    kname, src = _variants()[0][0].sources(_variants()[0][1], GATE_UP_TPL, [F32])
    blobs.append(src.encode())
    files = []
    for i, b in enumerate(blobs):
        files.append(tmp_path / f"b{i}")
        files[-1].write_bytes(b)
    out = subprocess.run([str(exe), *map(str, files)], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == [f"{cc.std_hash(b):x}" for b in blobs]
    assert cc.module_name(kname, src) == f"{kname}_{out[-1]}"


# ------------------------------------------------------------- MLX's source layout


def test_kernel_name():
    # Type names as MLX's get_type_string writes them (the H200 run of 2026-12-01
    # showed MLX's own source naming ``..._bfloat16_t``).
    assert cc.kernel_name("k", []) == "custom_kernel_k"
    assert (cc.kernel_name("k", [("A", 3), ("B", -1), ("C", True), ("D", False), ("T", BF16),
                                 ("U", F32), ("V", mx.uint32)])
            == "custom_kernel_k_3_-1_t_f_bfloat16_t_float_uint32_t")
    assert cc.kernel_name("moe_down", DOWN_TPL) == \
        "custom_kernel_moe_down_0_4_64_0_768_2048_8_128_8_4_4_bfloat16_t"


def test_source_matches_fused_assemble_cuda():
    """Same text as ``fused/sources.py``'s ``assemble_cuda`` (given MLX's exact default
    header: its own default drops the header's leading newline)."""
    def name(d):  # assemble_cuda takes dtype names ("bfloat16", ...)
        return str(d).rsplit(".", 1)[-1]

    for k, ins, tpl, outs in _variants()[:2]:
        kname, src = k.sources(ins, tpl, outs)
        ref = fsrc.assemble_cuda(
            k.name, kname, [name(a.dtype) for a in ins], [name(d) for d in outs],
            [(n, name(v) if isinstance(v, mx.Dtype) else v) for n, v in tpl],
            mlx_header=cc.DEFAULT_HEADERS[0], minified=True)
        assert src == ref
        assert src.startswith("\n#include \"mlx/backend/cuda/device/utils.cuh\"\n\n"
                              "#include <cooperative_groups.h>\n\n")
        assert f"__global__ void {kname}(\n    const " in src
        assert src.endswith("\n}\n\n} // namespace mlx::core::cu\n")


def test_source_shape_params_and_template_kinds():
    k = cc.wrap(None, name="t", input_names=["a", "b"], output_names=["o", "p"],
                source="o[0] = a_shape[0] + b_ndim;", header="// h\n")
    assert k.off  # MLX's Shape types: left to MLX
    kname, src = k.sources([mx.zeros((2, 3), F16), mx.zeros((), mx.int32)],
                           [("N", 4), ("F", True), ("T", F16)], [F32, mx.uint8])
    assert kname == "custom_kernel_t_4_t_float16_t"
    assert src == (
        cc.DEFAULT_HEADERS[0] + "// h\nnamespace mlx::core::cu {\n\nnamespace cg = "
        "cooperative_groups;\n\n__global__ void custom_kernel_t_4_t_float16_t(\n"
        "    const __half* a,\n    const __grid_constant__ Shape a_shape,\n"
        "    const int32_t* b,\n    float* o,\n    uint8_t* p) {\n"
        "  constexpr int N = 4;\n  constexpr bool F = true;\n  using T = __half;\n\n"
        "o[0] = a_shape[0] + b_ndim;\n}\n\n} // namespace mlx::core::cu\n")


def test_ptx_path_naming(tmp_path):
    short = "custom_kernel_x_1_2_abc"
    assert cc.ptx_path(tmp_path, short) == tmp_path / (short + ".ptx")
    n245 = "a" * 245
    assert cc.ptx_path(tmp_path, n245) == tmp_path / (n245 + ".ptx")
    long = "b" * 245 + "c" * 245 + "d" * 10
    assert cc.ptx_path(tmp_path, long) == tmp_path / ("b" * 245) / ("c" * 245) / ("d" * 10 + ".ptx")
    assert cc.ptx_path(tmp_path, "e" * 246) == tmp_path / ("e" * 245) / "e.ptx"


def test_cache_dir_follows_mlx(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "c"))
    assert cc.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MLX_PTX_CACHE_DIR")
    for v in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        monkeypatch.delenv(v, raising=False)
    assert cc.cache_dir() == Path("/tmp/mlx") / mx.__version__ / "ptx"
    monkeypatch.setenv("TEMPDIR", str(tmp_path / "d"))
    monkeypatch.setenv("TMP", str(tmp_path / "b"))  # libstdc++ order: TMPDIR TMP TEMP TEMPDIR
    assert cc.cache_dir() == tmp_path / "b" / "mlx" / mx.__version__ / "ptx"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert cc.cache_dir() == tmp_path / "mlx" / mx.__version__ / "ptx"


# ------------------------------------------------------------- standalone TU (nvcc)


def _nvcc_cubin(tmp_path, tag, text):
    cu = tmp_path / f"{tag}.cu"
    cu.write_text(text)
    out = tmp_path / f"{tag}.cubin"
    return subprocess.Popen(
        ["nvcc", "-arch=sm_90a", "-cubin", "-x", "cu",  # (NVRTC adds -default-device)
         "-o", str(out), str(cu)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_standalone_compiles_with_nvcc(tmp_path):
    """Both fused kernels and the prefill GEMM compile standalone for sm_90a, and the
    cubin holds the kernel under the mangled name of ``mlx::core::cu::<kernel_name>``."""
    jobs = []
    for i, (k, ins, tpl, outs) in enumerate(_variants()):
        kname, src = k.sources(ins, tpl, outs)
        st = cc.standalone_source(src)
        assert cc.MLX_INCLUDE not in st and st.count(cc.MLX_INCLUDE.strip()) == 0
        jobs.append((kname, *_nvcc_cubin(tmp_path, f"k{i}", st)))
    for kname, proc, out in jobs:
        log = proc.communicate()[0]
        assert proc.returncode == 0, log[-3000:]
        assert f"_ZN3mlx4core2cu{len(kname)}{kname}E".encode() in out.read_bytes()


# ------------------------------------------------------------- prepare (fake kernel)


class FakeKernel:
    """Records calls; with ``verbose=True`` prints MLX's verbose block for ``text``."""

    def __init__(self, text=None):
        self.text, self.calls = text, []

    def __call__(self, **kw):
        self.calls.append(kw)
        if kw.get("verbose") and self.text is not None:
            kname, src = self.text
            os.write(1, f"Generated source code for `{kname}`:\n```\n{src}\n```\n".encode())
        return ["out"]


def _launch(k, ins, tpl, outs):
    return k(inputs=ins, template=tpl, output_dtypes=outs, output_shapes=[(1,)] * len(outs),
             grid=(1, 1, 1), threadgroup=(1, 1, 1))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "ptx"))
    monkeypatch.delenv(cc.ENV, raising=False)
    for s in cc.STATS:
        monkeypatch.setitem(cc.STATS, s, 0)
    monkeypatch.setattr(cc, "_WARNED", set())
    return tmp_path / "ptx"


@pytest.mark.parametrize("header_idx", [0, 1])
def test_prepare_compiles_then_hits(cache, monkeypatch, header_idx):
    _, ins, tpl, outs = _variants()[0]
    k0 = _fused_kernel("moe_gate_up")
    truth = k0.sources(ins, tpl, outs, cc.DEFAULT_HEADERS[header_idx])
    compiled = []

    def fake_compile(src, name_expr, options, prog_name="k.cu"):
        compiled.append((src, name_expr))
        return b"CUBIN", "_Zmangled"

    monkeypatch.setattr(cc, "compile_cubin", fake_compile)
    monkeypatch.setattr(cc, "compute_capability", lambda: (9, 0))
    fake = FakeKernel(truth)
    k = _fused_kernel("moe_gate_up", fake)
    assert _launch(k, ins, tpl, outs) == ["out"]
    assert k.default_header == cc.DEFAULT_HEADERS[header_idx]  # picked from MLX's print
    kname, src = truth
    ptx = cc.ptx_path(cache, cc.module_name(kname, src))
    assert ptx.read_bytes() == b"CUBIN"
    assert ptx.with_suffix(".txt").read_text() == f"mlx::core::cu::{kname}\t_Zmangled\n"
    assert ptx.with_suffix(".cu").read_text() == src
    assert compiled == [(cc.standalone_source(src), "mlx::core::cu::" + kname)]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]
    # same variant again: one dict lookup, no second verbose call
    _launch(k, ins, tpl, outs)
    assert len(fake.calls) == 3 and sum(bool(c.get("verbose")) for c in fake.calls) == 1
    # a fresh process (new wrapper): file found, nothing compiled
    k2 = _fused_kernel("moe_gate_up", FakeKernel(truth))
    _launch(k2, ins, tpl, outs)
    assert len(compiled) == 1 and cc.STATS["hit"] == 1 and cc.STATS["compiled"] == 1
    # an equal template in a new list: variant key seen, nothing more
    _launch(k2, ins, list(tpl), outs)
    assert len(compiled) == 1 and cc.STATS["hit"] == 1
    # another variant (other dtype of an input) with its own template list: prepared
    ins2 = [mx.zeros((1, 1), F16) if i == 3 else a for i, a in enumerate(ins)]
    _launch(k2, ins2, list(tpl), outs)
    assert len(compiled) == 2
    # (the same list object with other dtypes takes the identity fast path: MLX
    # compiles that variant itself, as without the cache)
    ins3 = [mx.zeros((1, 1), F32) if i == 3 else a for i, a in enumerate(ins)]
    _launch(k2, ins3, tpl, outs)
    assert len(compiled) == 2 and len(k2.fast) == 3


def test_mismatch_with_mlx_disables_with_one_warning(cache, monkeypatch, capfd):
    _, ins, tpl, outs = _variants()[1]
    kname, src = _fused_kernel("moe_down").sources(ins, tpl, outs)
    monkeypatch.setattr(cc, "compile_cubin", lambda *a, **k: pytest.fail("compiled"))
    fake = FakeKernel((kname, src.replace("constexpr int TOPK", "constexpr int  TOPK")))
    k = _fused_kernel("moe_down", fake)
    for _ in range(2):
        assert _launch(k, ins, tpl, outs) == ["out"]
    _launch(k, ins, tpl[:-1] + [("OT", F16)], [F16])
    err = capfd.readouterr().err
    assert err.count("mlx_moe: kernel cache disabled:") == 1 and "differs" in err
    assert not cache.exists() or not list(cache.iterdir())


def test_failure_never_raises(cache, monkeypatch, capfd):
    _, ins, tpl, outs = _variants()[0]
    truth = _fused_kernel("moe_gate_up").sources(ins, tpl, outs)

    def boom(*a, **k):
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(cc, "compile_cubin", boom)
    monkeypatch.setattr(cc, "compute_capability", lambda: (9, 0))
    k = _fused_kernel("moe_gate_up", FakeKernel(truth))
    assert _launch(k, ins, tpl, outs) == ["out"]
    assert "mlx_moe: kernel cache disabled: OSError: libnvrtc" in capfd.readouterr().err
    assert cc.STATS["failed"] == 1


def test_disabled_by_env(cache, monkeypatch):
    monkeypatch.setenv(cc.ENV, "0")
    _, ins, tpl, outs = _variants()[0]
    truth = _fused_kernel("moe_gate_up").sources(ins, tpl, outs)
    monkeypatch.setattr(cc, "compile_cubin", lambda *a, **k: pytest.fail("compiled"))
    fake = FakeKernel(truth)
    k = _fused_kernel("moe_gate_up", fake)
    assert _launch(k, ins, tpl, outs) == ["out"]
    assert [c.get("verbose") for c in fake.calls] == [None]  # no probe either
    assert not cache.exists()


def test_prefill_plan_kernel_left_to_mlx(cache, monkeypatch):
    k = _prefill_kernel("plan", fake=FakeKernel())
    assert k.off
    monkeypatch.setattr(cc, "compile_cubin", lambda *a, **k: pytest.fail("compiled"))
    _launch(k, _arrays([mx.uint32, mx.uint32], 1), [("E", 128)], [mx.int32, mx.int32])
    assert list(k.seen.values()) == ["skipped (shape parameters)"]
    assert not cache.exists()


def test_hooks_wrap_cuda_kernels_only(monkeypatch):
    from mlx_moe.kernels.fused import backend as fused
    from mlx_moe.kernels.prefill import backend as prefill
    made = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: made.append(kw) or FakeKernel())
    monkeypatch.setattr(mx.fast, "metal_kernel", lambda **kw: FakeKernel())
    monkeypatch.setattr(fused, "_KERNEL_OBJECTS", {})
    monkeypatch.setattr(prefill, "_KERNELS", {})
    assert isinstance(fused.kernel_object("moe_down", "cuda"), cc.CachedKernel)
    assert isinstance(prefill._mlx_kernel("cuda", "gemm", 32), cc.CachedKernel)
    assert isinstance(fused.kernel_object("moe_down", "metal"), FakeKernel)
    assert isinstance(prefill._mlx_kernel("metal", "gemm", 32), FakeKernel)
    k = fused.kernel_object("moe_down", "cuda")
    assert (k.name, k.source, k.header) == (made[0]["name"], made[0]["source"], made[0]["header"])


# ------------------------------------------------------------- variants per model


def count_variants(m_decode=1, m_prefill=512, experts_fmt=("affine", 4, 64)):
    """Kernel variants one Qwen3-30B-shaped layer launches (decode step, prefill),
    counted through the launch hooks with the kernels replaced by fakes (CPU)."""
    from mlx_moe.kernels.fused import backend as fused
    from mlx_moe.kernels.prefill import backend as prefill
    from mlx_moe.testing.reference import random_experts, random_inputs
    seen = {}

    class Count(FakeKernel):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, *, inputs, template, output_dtypes, output_shapes, **kw):
            key = (self.name, tuple(template), *[a.dtype for a in inputs], *output_dtypes)
            seen[key] = seen.get(key, 0) + 1
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    e = random_experts(128, 2048, 768, "silu", experts_fmt, BF16)
    old_fused, old_pre = dict(fused._KERNEL_OBJECTS), dict(prefill._KERNELS)
    old_gb = fused.gpu_backend
    fused.gpu_backend = lambda: "cuda"
    try:
        for n in ("moe_gate_up", "moe_down"):
            fused._KERNEL_OBJECTS[n, "cuda"] = Count(n)
        for kern in ("gemm", "plan", "combine"):
            for bk in (32, 64):
                prefill._KERNELS["cuda", kern, bk] = Count(f"{kern}_bk{bk}")
        x, w, ids = random_inputs(e, m_decode, 8, BF16)
        p = fused.plan(e, x, ids)
        for _layer in range(48):  # every layer has the same shapes
            fused._down(e, fused._gate_up(e, x, fused._ids(ids), p), x, w, fused._ids(ids), p)
        decode = dict(seen)
        seen.clear()
        x, w, ids = random_inputs(e, m_prefill, 8, BF16)
        launch = prefill.mlx_launcher("cuda")
        for _layer in range(48):
            prefill.run_prefill(e, x, w, ids, launch=launch)
        return decode, dict(seen)
    finally:
        fused.gpu_backend = old_gb
        fused._KERNEL_OBJECTS.clear()
        fused._KERNEL_OBJECTS.update(old_fused)
        prefill._KERNELS.clear()
        prefill._KERNELS.update(old_pre)


def test_variants_per_model(monkeypatch):
    """48 layers share 2 decode variants and 2 prefill variants; nothing opt-in
    (BK 64, plan / combine kernels) is launched by default."""
    for env in ("MLX_MOE_PREFILL_PLAN", "MLX_MOE_PREFILL_COMBINE", "MLX_MOE_PREFILL_BK"):
        monkeypatch.delenv(env, raising=False)
    decode, prefill = count_variants()
    print("decode variants:", *[(k[0], v) for k, v in decode.items()])
    print("prefill variants:", *[(k[0], dict(k[1])["GATED"], v) for k, v in prefill.items()])
    assert sorted(k[0] for k in decode) == ["moe_down", "moe_gate_up"]
    assert all(v == 48 for v in decode.values())
    assert sorted(k[0] for k in prefill) == ["gemm_bk32", "gemm_bk32"]
    assert sorted(dict(k[1])["GATED"] for k in prefill) == [0, 1]
    assert all(v == 48 for v in prefill.values())


# ------------------------------------------------------------- GPU (CUDA)

CHILD = textwrap.dedent(r'''
    import json, os, sys, tempfile, time
    from pathlib import Path
    import numpy as np
    import mlx.core as mx
    from mlx_moe.kernels import cuda_cache as cc
    from mlx_moe.kernels.fused import backend as fused
    from mlx_moe.kernels.prefill import backend as prefill
    from mlx_moe.testing.reference import random_experts, random_inputs

    mode, out = sys.argv[1], Path(sys.argv[2])
    rep = {"mode": mode}
    t = time.perf_counter()
    # CUDA init + one of MLX's own JIT kernels (a compiled elementwise chain)
    mx.eval(mx.compile(lambda a: mx.exp(a) * 2 + 1)(mx.ones((8,))))
    rep["init_s"] = time.perf_counter() - t
    if mode == "default_dir":
        d = Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"
        rep.update(dir=str(d), exists=d.is_dir(), device_info=str(mx.device_info()))
        print("REPORT " + json.dumps(rep)); sys.exit(0)
    e = random_experts(128, 2048, 768, "silu", ("affine", 4, 64), mx.bfloat16)
    x, w, ids = random_inputs(e, 1, 8, mx.bfloat16)
    xp, wp, idsp = random_inputs(e, 64, 8, mx.bfloat16, seed=1)
    mx.eval(x, w, ids, xp, wp, idsp)
    if mode == "mlx":  # our source text against MLX's own (verbose print)
        p = fused.plan(e, x, ids)
        ids32 = fused._ids(ids)
        gw, gs, gb, gbias = fused._inputs(e["gate_proj"], x)
        uw, us, ub, ubias = fused._inputs(e["up_proj"], x)
        h = mx.zeros((8, 768), mx.float32)
        dw, ds, db, dbias = fused._inputs(e["down_proj"], h)
        cases = [("moe_gate_up", [x, ids32, gw, gs, gb, uw, us, ub, gbias, ubias],
                  p.template_a, [mx.float32]),
                 ("moe_down", [h, ids32, w, dw, ds, db, dbias], p.template_b, [x.dtype])]
        rep["source"] = {}
        for name, ins, tpl, outs in cases:
            k = fused.kernel_object(name, "cuda")
            kname, mlx_src = k.mlx_source(ins, tpl, outs)
            res = []
            for i, dh in enumerate(cc.DEFAULT_HEADERS):
                ours = k.sources(ins, tpl, outs, dh)
                res.append(ours == (kname, mlx_src))
            ours = k.sources(ins, tpl, outs, cc.DEFAULT_HEADERS[0])[1]
            i = next((i for i, (a, b) in enumerate(zip(ours, mlx_src)) if a != b),
                     min(len(ours), len(mlx_src)))
            rep["source"][name] = {"kernel_name": kname, "mlx_kernel_name_ok": kname ==
                                   cc.kernel_name(name, tpl), "match_per_header": res,
                                   "first_diff": i, "mlx": mlx_src[max(0, i - 60):i + 60],
                                   "ours": ours[max(0, i - 60):i + 60],
                                   "module": cc.module_name(kname, mlx_src)}
    rep["cache_enabled"] = cc.enabled()
    if mode == "cold":
        try:
            rep["nvrtc_options"] = cc.nvrtc_options(cc.compute_capability())
        except Exception as ex:
            rep["nvrtc_options"] = repr(ex)
    t = time.perf_counter()
    y = fused.run_fused(e, x, w, ids)
    mx.eval(y)
    rep["first_decode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    yp = prefill.run_prefill(e, xp, wp, idsp)
    mx.eval(yp)
    rep["first_prefill_s"] = time.perf_counter() - t
    t = time.perf_counter()
    mx.eval(fused.run_fused(e, x, w, ids), prefill.run_prefill(e, xp, wp, idsp))
    rep["second_both_s"] = time.perf_counter() - t
    rep["stats"] = dict(cc.STATS)
    np.save(out / f"{mode}_decode.npy", np.array(y.astype(mx.float32)))
    np.save(out / f"{mode}_prefill.npy", np.array(yp.astype(mx.float32)))
    d = cc.cache_dir()
    rep["cache_files"] = sorted(p.name for p in d.rglob("*") if "custom_kernel" in p.name)
    print("REPORT " + json.dumps(rep))
''')


def _child(mode, tmp_path, env):
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    sys.stdout.write(f"\n===== child {mode} (rc {r.returncode}) stderr tail:\n{r.stderr[-3000:]}\n")
    lines = [l for l in r.stdout.splitlines() if l.startswith("REPORT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(lines[-1][7:])
    print(f"child {mode}: " + json.dumps(rep, indent=1)[:6000])
    return rep


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() != "cuda", reason="needs MLX's CUDA backend")
def test_gpu_cache_cold_warm(tmp_path):
    import numpy as np
    env = dict(os.environ, MLX_PTX_CACHE_DIR=str(tmp_path / "ptx"))
    ok = True
    base = _child("mlx", tmp_path, dict(env, MLX_MOE_KERNEL_CACHE="0"))
    for name, s in base["source"].items():
        print(f"SOURCE {name}: match per default header {s['match_per_header']}"
              + ("" if any(s["match_per_header"]) else
                 f"\n  MLX : {s['mlx']!r}\n  ours: {s['ours']!r}"))
        ok &= any(s["match_per_header"]) and s["mlx_kernel_name_ok"]
    assert not any(f.endswith(".ptx") for f in base["cache_files"]), \
        "MLX wrote custom kernels to disk itself: " + str(base["cache_files"])
    cold = _child("cold", tmp_path, env)
    warm = _child("warm", tmp_path, env)
    print(f"\nFIRST CALLS  (decode / prefill, s)\n  mlx alone : {base['first_decode_s']:.3f} / "
          f"{base['first_prefill_s']:.3f}\n  cache cold: {cold['first_decode_s']:.3f} / "
          f"{cold['first_prefill_s']:.3f}   stats {cold['stats']}\n  cache warm: "
          f"{warm['first_decode_s']:.3f} / {warm['first_prefill_s']:.3f}   stats {warm['stats']}")
    mods = {s["module"] for s in base["source"].values()}
    print("expected modules:", sorted(mods), "\ncache files:", cold["cache_files"])
    assert ok, "our source differs from MLX's (see SOURCE lines)"
    assert cold["stats"]["compiled"] == 4 and cold["stats"]["failed"] == 0, cold["stats"]
    for m in mods:
        assert m + ".ptx" in cold["cache_files"] and m + ".txt" in cold["cache_files"], m
    assert warm["stats"]["hit"] == 4 and warm["stats"]["compiled"] == 0, warm["stats"]
    for mode in ("cold", "warm"):
        for what in ("decode", "prefill"):
            a = np.load(tmp_path / f"mlx_{what}.npy")
            b = np.load(tmp_path / f"{mode}_{what}.npy")
            assert np.array_equal(a, b), f"{mode} {what} differs from MLX's own compile"
    assert warm["first_decode_s"] < 0.5, warm["first_decode_s"]
    assert warm["first_prefill_s"] < 0.5, warm["first_prefill_s"]
    dflt = _child("default_dir", tmp_path, {k: v for k, v in os.environ.items()
                                            if k != "MLX_PTX_CACHE_DIR"})
    assert dflt["exists"], f"MLX's default cache dir is not {dflt['dir']}"
