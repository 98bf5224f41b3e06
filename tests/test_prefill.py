"""Grouped-GEMM prefill (mlx_moe/kernels/prefill/).

CPU: the numpy model of the kernel (tile schedule, sort/segment bookkeeping,
AFQ unpacking) against the ``loop`` backend; the kernel body itself run by the
CPU emulator (scalar warp tile, and the CUDA mma.sync fragment code on an
emulated mma) against that model; the CUDA emission compiled by nvcc.
GPU (``-m gpu``): the real kernel against ``loop`` for bits x group x T.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import experts as experts_mod
from mlx_moe.experts import run_loop
from mlx_moe.kernels.common import gpu_backend
from mlx_moe.kernels.prefill import backend as pf
from mlx_moe.kernels.prefill import sources
from mlx_moe.testing import emulate_prefill
from mlx_moe.testing.reference import (
    dequantize, random_experts, random_inputs, reference_prefill, rel_err)

HAS_GPU = gpu_backend() is not None
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an MLX GPU backend")


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """``emu(mode)``: a CPU-emulator launcher building into this session's tmp dir."""
    cache = tmp_path_factory.mktemp("prefill_emu")
    return lambda mode="cpu": emulate_prefill.cpu_launcher(cache, mode)


def _experts(E, H, I, bits=4, gs=32, act="silu", bias=False, dtype=mx.bfloat16, seed=0):
    fmt = ("affine", bits, gs) if bits else ("float", 0, 0)
    return random_experts(E, H, I, act, fmt, dtype, bias, seed=seed)


# Kernel vs MLX-op oracles (loop / gather): the worst token's relative error.
# A norm over the whole output hides a token: at T=8192 one zeroed output row
# is 1.3 % of the norm (the old bound was 2 %). Measured on the CPU for the
# numpy model of the kernel vs loop (E=16, H=512, I=256, k=4, bits 4/8, group
# 32/128, T 64-8192): worst row 0.95-1.5 %, whole-output norm 0.8-0.9 %.
ROW_TOL = 4e-2


def row_err(got, ref):
    """max over tokens of ||got_t - ref_t|| / ||ref_t||; rows smaller than a
    tenth of the median row norm are measured against that floor."""
    a = np.asarray(got.astype(mx.float32) if isinstance(got, mx.array) else got, np.float64)
    b = np.asarray(ref.astype(mx.float32) if isinstance(ref, mx.array) else ref, np.float64)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, a.shape[-1])
    n = np.linalg.norm(b, axis=-1)
    return float((np.linalg.norm(a - b, axis=-1) / np.maximum(n, 0.1 * np.median(n) + 1e-30)).max())


def test_row_err_catches_one_zeroed_token():
    """What the whole-output norm missed (the GPU tests' old 2e-2 bound)."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8192, 512))
    got = ref * (1 + 8e-3 * rng.standard_normal(ref.shape))  # ~0.8 % rounding noise
    assert row_err(got, ref) < ROW_TOL
    got[4000] = 0
    assert rel_err(got, ref) < 2e-2  # the old check passed this
    assert row_err(got, ref) == pytest.approx(1.0)


def _case(E=8, H=128, I=64, k=2, T=40, bits=4, gs=32, act="silu", bias=False,
          dtype=mx.bfloat16, skew=0.0, seed=0):
    ex = _experts(E, H, I, bits, gs, act, bias, dtype, seed=seed)
    x, w, ids = random_inputs(ex, T, k, dtype, seed=seed + 1, ids_dtype=mx.int32,
                              weights_dtype=mx.float32, skew=skew)
    return ex, x, w, ids


# ---------------------------------------------------------------- bookkeeping


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_np_dequant_matches_mlx(bits, gs):
    ex = _experts(4, 256, 128, bits, gs, dtype=mx.float32)
    for p in (ex.gate_proj, ex.down_proj):
        ref = np.stack([np.array(p.expert_weight(e)) for e in range(4)])
        np.testing.assert_allclose(dequantize(p), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "T,E,k,skew", [(40, 8, 2, 0.0), (9, 16, 4, 0.0), (300, 4, 2, 3.0), (64, 128, 8, 0.0)]
)
@pytest.mark.parametrize("impl", ["ops", "kernel"])
def test_plan(T, E, k, skew, impl, emu):
    if impl == "kernel" and shutil.which("g++") is None:
        pytest.skip("needs g++")
    _, _, ids = random_inputs(_experts(E, 32, 32, bits=0), T, k, ids_dtype=mx.int32, skew=skew)
    if impl == "ops":
        order, segs, tiles, slots = pf.plan_ops(ids, E)
    else:  # the plan kernel body on the CPU emulator
        order, segs, tiles, slots = pf.plan_kernel(ids, E, emu())
    flat = np.array(ids).reshape(-1)
    order, segs, tiles = np.array(order), np.array(segs), np.array(tiles)
    assert sorted(order.tolist()) == list(range(flat.size))
    assert np.all(np.diff(flat[order]) >= 0)
    counts = np.bincount(flat, minlength=E)
    np.testing.assert_array_equal(segs, np.concatenate([[0], np.cumsum(counts)]))
    mt = -(-counts // sources.BM)
    np.testing.assert_array_equal(tiles, np.concatenate([[0], np.cumsum(mt)]))
    assert tiles[-1] <= slots
    for e in range(E):
        assert np.all(flat[order[segs[e]:segs[e + 1]]] == e)


def test_plan_one_expert():
    ids = mx.zeros((100, 1), mx.int32) + 3
    order, segs, tiles, slots = pf.plan_ops(ids, 8)
    assert np.array(segs).tolist() == [0, 0, 0, 0, 100, 100, 100, 100, 100]
    assert np.array(tiles)[-1] == 2 and slots >= 2


REF_CASES = [
    dict(bits=4, gs=32),
    dict(bits=8, gs=64, H=256, I=128),
    dict(bits=4, gs=128, H=256, I=128),
    dict(bits=0),
    dict(bits=4, gs=32, act="swiglu_oai", bias=True),
    dict(bits=8, gs=32, act="gelu", T=33),
    dict(bits=4, gs=32, act="gelu_tanh"),
    dict(bits=4, gs=32, act="relu"),
    dict(bits=4, gs=32, H=192, I=96),  # partial n-tiles in both launches
    dict(bits=4, gs=32, E=4, T=200, skew=3.0),  # several m-tiles per expert
    dict(bits=4, gs=32, dtype=mx.float16),
]


@pytest.mark.parametrize("cfg", REF_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_matches_loop(cfg):
    ex, x, w, ids = _case(**cfg)
    ref = run_loop(ex, x, w, ids)
    got = reference_prefill(ex, x, w, ids)
    assert row_err(got, ref) < ROW_TOL


# ---------------------------------------------------------------- the kernel body on the CPU

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")


@needs_cxx
@pytest.mark.parametrize("cfg", REF_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_emulated_kernel_matches_reference(cfg, emu):
    ex, x, w, ids = _case(**cfg)
    ref = reference_prefill(ex, x, w, ids)
    got = pf.run_prefill(ex, x, w, ids, launch=emu("cpu"))
    assert rel_err(got, ref) < 2e-3
    assert row_err(got, run_loop(ex, x, w, ids)) < ROW_TOL
    # the same through the plan / combine kernels
    got = pf.run_prefill(ex, x, w, ids, launch=emu("cpu"), kernels=True)
    assert rel_err(got, ref) < 2e-3


@needs_cxx
@pytest.mark.parametrize(
    "cfg",
    [dict(bits=4, gs=32), dict(bits=8, gs=32, H=192, I=96, bias=True),
     dict(bits=4, gs=32, dtype=mx.float16, E=4, T=100, skew=2.0)],
    ids=["q4", "q8-partial-bias", "f16-multitile"],
)
def test_emulated_mma16816_matches_reference(cfg, emu):
    """The CUDA warp tile's fragment indexing (prefill_mma16816.h) on an emulated mma.sync."""
    ex, x, w, ids = _case(**cfg)
    ref = reference_prefill(ex, x, w, ids)
    got = pf.run_prefill(ex, x, w, ids, launch=emu("cpu_mma16816"))
    assert rel_err(got, ref) < 2e-3


BK64_CASES = [
    dict(bits=4, gs=32),  # two quantization groups per K step
    dict(bits=8, gs=32, H=192, I=96, bias=True),  # down K=96 falls back to BK 32
    dict(bits=8, gs=128, H=256, I=128, act="gelu_tanh"),
    dict(bits=0),
]


@needs_cxx
@pytest.mark.parametrize("mode", ["cpu", "cpu_mma16816"])
@pytest.mark.parametrize("cfg", BK64_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_emulated_kernel_bk64(cfg, mode, emu):
    if mode == "cpu_mma16816" and cfg["bits"] != 4:
        pytest.skip("slow mode: one case")
    ex, x, w, ids = _case(**cfg)
    ref = reference_prefill(ex, x, w, ids)
    got = pf.run_prefill(ex, x, w, ids, launch=emu(mode), bk=64, kernels=True)
    assert rel_err(got, ref) < 2e-3


@needs_cxx
def test_emulated_kernel_catches_a_wrong_weight(emu):
    """Negative control: the comparison is sensitive to one changed expert."""
    ex, x, w, ids = _case(bits=4, gs=32)
    got = pf.run_prefill(ex, x, w, ids, launch=emu("cpu"))
    ex.down_proj.scales = ex.down_proj.scales.at[3].multiply(1.5)
    ref = reference_prefill(ex, x, w, ids)
    assert rel_err(got, ref) > 1e-2


# ---------------------------------------------------------------- CUDA emission (nvcc)


def _nvcc(tmp_path, src):
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    res = subprocess.run(
        ["nvcc", "-arch=sm_90", "-std=c++17", "-c", "-o", str(tmp_path / "k.o"), str(cu),
         "-Xptxas", "-v"],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "0 bytes spill stores" in res.stderr
    return res.stderr


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


@needs_nvcc
# Each nvcc run costs ~10 s on CI's 2 cores: one case per bits / gating / bias / K-step.
@pytest.mark.parametrize("bits,gated,dtype,bias,bk", [
    (4, 1, mx.bfloat16, 0, 32), (8, 0, mx.float16, 1, 64), (0, 1, mx.bfloat16, 0, 32),
])
def test_cuda_emission_compiles(tmp_path, bits, gated, dtype, bias, bk):
    E, H, I = 128, 2048, 768
    K, N = (H, I) if gated else (I, H)
    x = mx.zeros((4, K), dtype)
    r = mx.zeros((4,), mx.int32)
    o = mx.zeros((4,), mx.uint32)
    d = mx.zeros((1,), mx.float32)
    if bits:
        wq = mx.zeros((E, N, K * bits // 32), mx.uint32)
        s = mx.zeros((E, N, K // 64), mx.bfloat16)
    else:
        wq, s = mx.zeros((E, N, K), mx.bfloat16), d
    tmpl = [("T", dtype), ("BITS", bits), ("GS", 64), ("GATED", gated), ("ACT", 0),
            ("HAS_BIAS", bias), ("E", E), ("K", K), ("N", N), ("TOPK", 8 if gated else 1)]
    _nvcc(tmp_path, sources.cuda_source("gemm", [x, o, r, r, wq, s, s, wq, s, s, d, d], tmpl, [dtype],
                                   bk=bk))


@needs_nvcc
def test_cuda_emission_compiles_plan_and_combine(tmp_path):
    ids, order = mx.zeros((64,), mx.uint32), mx.zeros((64,), mx.uint32)
    _nvcc(tmp_path, sources.cuda_source("plan", [ids, order], [("E", 128)], [mx.int32, mx.int32]))
    y, w = mx.zeros((64, 2048), mx.bfloat16), mx.zeros((8, 8), mx.float32)
    _nvcc(tmp_path, sources.cuda_source("combine", [y, w], [("TOPK", 8), ("N", 2048)], [mx.float32]))


@pytest.mark.parametrize("kernel", ["gemm", "plan", "combine"])
def test_metal_emission_names_its_attributes(kernel):
    header, source = sources.emit("metal", kernel)
    for name in ("thread_index_in_threadgroup", "threadgroup_position_in_grid"):
        assert name in source  # metal_kernel only adds attributes named in the source
    assert "simdgroup_multiply_accumulate" in header


# ---------------------------------------------------------------- backend selection


def test_available_and_registration():
    ex, x, w, ids = _case()
    assert not pf.available(ex, x[:8], ids[:8])  # decode sizes belong to the fused kernels
    assert pf.supports(ex, x, ids)
    assert not pf.supports(ex, x.astype(mx.float32), ids)
    if not HAS_GPU:
        assert not pf.available(ex, x, ids)
    pf.register()
    assert "prefill" in experts_mod.BACKENDS


# ---------------------------------------------------------------- GPU

GPU_T = [9, 64, 512, 2048, 8192]


@gpu
@needs_gpu
@pytest.mark.parametrize("T", GPU_T)
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_prefill_matches_loop(bits, gs, T):
    ex, x, w, ids = _case(E=16, H=512, I=256, k=4, T=T, bits=bits, gs=gs)
    with mx.stream(mx.gpu):
        got = pf.run_prefill(ex, x, w, ids)
        ref = run_loop(ex, x, w, ids)
        assert row_err(got, ref) < ROW_TOL


@gpu
@needs_gpu
@pytest.mark.parametrize("T", [512, 2048, 8192])
def test_gpu_qwen_shape_matches_gather(T):
    ex, x, w, ids = _case(E=128, H=2048, I=768, k=8, T=T, bits=4, gs=64)
    got = pf.run_prefill(ex, x, w, ids)
    ref = experts_mod.run_gather(ex, x, w, ids)  # sorted gather_qmm (pairs >= 64)
    assert row_err(got, ref) < ROW_TOL
