"""GPU check + timing of the grouped-GEMM prefill, in one process (no pytest needed).

    source .gpu/setup.sh && PYTHONUNBUFFERED=1 python scripts/gpu_prefill.py 2>&1 | tee $OUT/log

Phases (each guarded, results in $OUT/prefill_results.json):
  1. correctness: bits 4/8 x group 32/64/128 x T in {9, 64, 512, 2048, 8192}
     (E 16, H 512, I 256, top-4) against the ``loop`` backend; a few extra
     formats (bias + swiglu_oai, f16, float weights); the Qwen3-30B-A3B shape
     at T = 512/2048/8192 against ``gather`` (sorted gather_qmm).
  2. timing, Qwen3-30B-A3B MoE layer (E 128, H 2048, I 768, top-8, q4 g64, bf16):
     ours (and its launches, plan / combine kernels, K step 64), sorted gather_qmm.
  3. whole-model prefill of T=512 on a random Qwen3-30B-A3B with fewer layers
     (mlx-lm stock vs ours with gather / prefill experts), per layer.
"""

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from mlx_moe import experts as experts_mod  # noqa: E402
from mlx_moe.kernels.common import gpu_backend  # noqa: E402
from mlx_moe.kernels.prefill import backend as pf  # noqa: E402
from mlx_moe.testing.reference import (  # noqa: E402
    random_experts, random_inputs, reference_prefill, rel_err)

OUT = Path(os.environ.get("OUT", "."))
# PREFILL_DRY=1: tiny shapes on the CPU emulator, to test this script off-GPU.
DRY = os.environ.get("PREFILL_DRY") == "1"
if DRY:
    from mlx_moe.testing.emulate_prefill import cpu_launcher  # noqa: E402

    _EMU_DIR = tempfile.mkdtemp(prefix="mlx_moe_prefill_emu_")
    pf.mlx_launcher = lambda platform=None: cpu_launcher(_EMU_DIR)
SMALL = dict(E=4, H=256, I=128, k=2, T=(9, 64, 200)) if DRY else dict(
    E=16, H=512, I=256, k=4, T=(9, 64, 512, 2048, 8192))
RESULTS = {"device": None, "checks": [], "timing": [], "model": [], "errors": []}
T0 = time.time()
BUDGET_S = float(os.environ.get("PREFILL_BUDGET_S", "400"))


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def make_experts(E, H, I, bits=4, gs=64, activation="silu", bias=False, dtype=mx.bfloat16):
    fmt = ("affine", bits, gs) if bits else ("float", 0, 0)
    return random_experts(E, H, I, activation, fmt, dtype, bias)


def routing(ex, T, k, dtype=mx.bfloat16, skew=0.0):
    """``x, weights, ids`` as a router gives them (float32 weights, int32 ids)."""
    return random_inputs(ex, T, k, dtype, seed=1, ids_dtype=mx.int32,
                         weights_dtype=mx.float32, skew=skew)


def save():
    (OUT / "prefill_results.json").write_text(json.dumps(RESULTS, indent=1))


def guarded(name):
    def deco(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as exc:  # keep going: later phases still report
                msg = f"{name}: {type(exc).__name__}: {exc}"
                log("ERROR", msg)
                traceback.print_exc()
                RESULTS["errors"].append(msg[:2000])
                save()
        return run
    return deco


def bench(fn, iters=5, warmup=2):
    if DRY:
        iters, warmup = 1, 0
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def check(tag, got_fn, ref_fn, tol=2e-2):
    t = time.time()
    try:
        got = got_fn()
        ref = ref_fn()
        err = rel_err(got, ref)
        ok = bool(err < tol) and bool(mx.all(mx.isfinite(got)).item())
        rec = dict(case=tag, rel_err=round(err, 6), max_err=round(rel_err(got, ref, "max"), 6),
                   ok=ok, s=round(time.time() - t, 2))
    except Exception as exc:
        rec = dict(case=tag, ok=False, error=f"{type(exc).__name__}: {exc}"[:1000])
    RESULTS["checks"].append(rec)
    log("CHECK", json.dumps(rec))
    save()
    return rec.get("ok", False)


@guarded("correctness")
def phase_correctness():
    E, H, I, k = (SMALL[c] for c in "EHIk")
    for bits in (4, 8):
        for gs in (32, 64, 128):
            ex = make_experts(E, H, I, bits, gs)
            for T in SMALL["T"]:
                if time.time() - T0 > BUDGET_S:
                    log("budget reached in correctness")
                    return
                x, w, ids = routing(ex, T, k)
                check(f"b{bits} g{gs} T{T} vs loop",
                      lambda: pf.run_prefill(ex, x, w, ids),
                      lambda: experts_mod.run_loop(ex, x, w, ids))
    extra = [
        dict(bits=4, gs=64, activation="swiglu_oai", bias=True, dtype=mx.bfloat16),
        dict(bits=8, gs=32, activation="gelu", bias=False, dtype=mx.float16),
        dict(bits=0, gs=64, activation="silu", bias=False, dtype=mx.bfloat16),
    ]
    for c in extra:
        ex = make_experts(E, 384, 192, c["bits"], c["gs"], c["activation"],
                             c["bias"], c["dtype"])
        x, w, ids = routing(ex, 300 if not DRY else 40, k, c["dtype"], skew=2.0)
        check(f"{c} T300 skewed vs loop",
              lambda: pf.run_prefill(ex, x, w, ids),
              lambda: experts_mod.run_loop(ex, x, w, ids))
        if c["bits"] and c["dtype"] == mx.bfloat16:
            check(f"{c} T300 vs numpy model (tight)",
                  lambda: pf.run_prefill(ex, x, w, ids),
                  lambda: reference_prefill(ex, x, w, ids), tol=5e-3)


QWEN = dict(E=8, H=256, I=128, k=2) if DRY else dict(E=128, H=2048, I=768, k=8)
BIG_T = (64, 128, 256) if DRY else (512, 2048, 8192)


@guarded("qwen-correctness")
def phase_qwen_correctness(ex):
    for T in BIG_T:
        x, w, ids = routing(ex, T, QWEN["k"])
        check(f"qwen q4g64 T{T}: sorted gather_qmm (run_gather) vs loop",
              lambda: experts_mod.run_gather(ex, x, w, ids),
              lambda: experts_mod.run_loop(ex, x, w, ids))
        check(f"qwen q4g64 T{T}: ours vs gather",
              lambda: pf.run_prefill(ex, x, w, ids),
              lambda: experts_mod.run_gather(ex, x, w, ids))
        if T == BIG_T[0]:
            check(f"qwen q4g64 T{T}: ours vs numpy model (tight)",
                  lambda: pf.run_prefill(ex, x, w, ids),
                  lambda: reference_prefill(ex, x, w, ids), tol=5e-3)


@guarded("timing")
def phase_timing(ex, label="q4 g64"):
    E, H, I, k = QWEN["E"], QWEN["H"], QWEN["I"], QWEN["k"]
    for T in BIG_T:
        x, w, ids = routing(ex, T, k)
        flop = 6.0 * T * k * H * I
        row = dict(fmt=label, T=T, gflop=flop / 1e9)
        launch = pf.mlx_launcher()
        order, segs, tiles, slots = pf.plan(ids, E)
        mx.eval(order, segs, tiles)
        h = pf._launch_proj(launch, x, order, tiles, segs, slots,
                            (ex.gate_proj, ex.up_proj), True, 0, x.dtype, topk=k)
        y = pf._launch_proj(launch, h, order, tiles, segs, slots,
                            (ex.down_proj,), False, 0, x.dtype)
        mx.eval(h, y)
        variants = {
            "ours": lambda: pf.run_prefill(ex, x, w, ids),
            "ours_kernels": lambda: pf.run_prefill(ex, x, w, ids, kernels=True),
            "ours_kernels_bk64": lambda: pf.run_prefill(ex, x, w, ids, bk=64, kernels=True),
            "ours_plan_kernel": lambda: pf.plan_kernel(ids, E)[:3],
            "ours_plan": lambda: pf.plan(ids, E)[:3],
            "ours_gate_up": lambda: pf._launch_proj(
                launch, x, order, tiles, segs, slots, (ex.gate_proj, ex.up_proj), True, 0,
                x.dtype, topk=k),
            "ours_down": lambda: pf._launch_proj(
                launch, h, order, tiles, segs, slots, (ex.down_proj,), False, 0, x.dtype),
            "ours_combine": lambda: pf.combine(launch, y, w),
            "ours_gate_up_bk64": lambda: pf._launch_proj(
                launch, x, order, tiles, segs, slots, (ex.gate_proj, ex.up_proj), True, 0,
                x.dtype, topk=k, bk=64),
            "ours_down_bk64": lambda: pf._launch_proj(
                launch, h, order, tiles, segs, slots, (ex.down_proj,), False, 0, x.dtype, bk=64),
            "gather_qmm_sorted": lambda: experts_mod.run_gather(ex, x, w, ids),
        }
        skip = os.environ.get("PREFILL_TIME_SKIP", "").split(",")
        variants = {n: f for n, f in variants.items() if n not in skip}
        for name, fn in variants.items():
            if time.time() - T0 > BUDGET_S:
                log("budget reached, skipping", name)
                continue
            try:
                iters = 3 if (name == "gather_qmm_sorted" and T >= 2048) else 10
                ms = bench(fn, iters=iters)
                row[name + "_ms"] = round(ms, 3)
                if name in ("ours", "ours_kernels", "ours_kernels_bk64", "gather_qmm_sorted"):
                    row[name + "_tflops"] = round(flop / ms / 1e9, 2)
            except Exception as exc:
                row[name + "_error"] = f"{type(exc).__name__}: {exc}"[:500]
        if "ours_ms" in row and "gather_qmm_sorted_ms" in row:
            row["speedup_vs_gather_qmm"] = round(row["gather_qmm_sorted_ms"] / row["ours_ms"], 2)
        RESULTS["timing"].append(row)
        log("TIME", json.dumps(row))
        save()


@guarded("probe")
def phase_probe():
    """Run-2 probes: Qwen shape T=8192 vs loop; gather_mm (float experts) correctness."""
    E, H, I, k = QWEN["E"], QWEN["H"], QWEN["I"], QWEN["k"]
    ex = make_experts(E, H, I, 4, 64)
    x, w, ids = routing(ex, BIG_T[-1], k)
    ref = experts_mod.run_loop(ex, x, w, ids)
    mx.eval(ref)
    check(f"qwen q4g64 T{BIG_T[-1]}: ours vs loop",
          lambda: pf.run_prefill(ex, x, w, ids), lambda: ref)
    check(f"qwen q4g64 T{BIG_T[-1]}: ours kernels bk64 vs loop",
          lambda: pf.run_prefill(ex, x, w, ids, bk=64, kernels=True), lambda: ref)
    check(f"qwen q4g64 T{BIG_T[-1]}: ours kernels bk32 vs loop",
          lambda: pf.run_prefill(ex, x, w, ids, bk=32, kernels=True), lambda: ref)
    del ref
    for bits, gs, Ts in ((4, 32, (9, 8192)), (8, 64, (512,))):
        exs = make_experts(16, 512, 256, bits, gs)
        for T in Ts:
            x, w, ids = routing(exs, T, 4)
            check(f"kernels bk64 b{bits} g{gs} T{T} vs loop",
                  lambda: pf.run_prefill(exs, x, w, ids, bk=64, kernels=True),
                  lambda: experts_mod.run_loop(exs, x, w, ids))
    del ex
    exf = make_experts(16, 512, 256, 0, 64)
    for T in (4, 64):
        x, w, ids = routing(exf, T, 4)
        check(f"float bf16 experts T{T}: run_gather (gather_mm{' sorted' if T * 4 >= 64 else ''}) vs loop",
              lambda: experts_mod.run_gather(exf, x, w, ids),
              lambda: experts_mod.run_loop(exf, x, w, ids))


QWEN3_CONFIG = dict(
    model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=4, intermediate_size=6144,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
    moe_intermediate_size=768, rms_norm_eps=1e-6, vocab_size=151936, rope_theta=1e6,
    tie_word_embeddings=False, max_position_embeddings=40960, norm_topk_prob=True,
)


if DRY:
    QWEN3_CONFIG.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, num_experts=8,
                        num_experts_per_tok=2, moe_intermediate_size=128, vocab_size=1000)


@guarded("model")
def phase_model(T=64 if DRY else 512):
    import mlx.nn as nn
    from mlx_lm.models import qwen3_moe
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_moe.models import build_model

    L = QWEN3_CONFIG["num_hidden_layers"]
    tokens = mx.random.randint(0, 1000, (1, T))

    def prefill(model):
        def run():
            cache = make_prompt_cache(model)
            hid = model.model(tokens, cache=cache)
            return [hid] + [c.state for c in cache]
        return run

    def prep(model):
        model.set_dtype(mx.bfloat16)
        nn.quantize(model, group_size=64, bits=4)
        mx.eval(model.parameters())
        return model

    variants = os.environ.get(
        "PREFILL_MODEL_VARIANTS", "stock,gather,prefill,prefill_kernels,prefill_kernels_bk64")
    variants = variants.split(",")
    if "stock" in variants:
        stock = prep(qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(QWEN3_CONFIG)))
        ms = bench(prefill(stock), iters=3)
        RESULTS["model"].append(dict(variant="mlx-lm stock", layers=L, T=T, ms=round(ms, 2),
                                     ms_per_layer=round(ms / L, 3),
                                     est_tok_s_48_layers=round(T / (ms / L * 48) * 1e3, 1)))
        log("MODEL", RESULTS["model"][-1])
        del stock
    ours, _ = build_model(QWEN3_CONFIG)
    ours = prep(ours)
    flags = ("MLX_MOE_PREFILL_BK", "MLX_MOE_PREFILL_PLAN", "MLX_MOE_PREFILL_COMBINE")
    saved = {f: os.environ.get(f) for f in flags}
    for backend in [v for v in variants if v != "stock"]:
        kernel = "kernel" if "kernels" in backend else "ops"
        os.environ.update(MLX_MOE_PREFILL_BK="64" if backend.endswith("bk64") else "32",
                          MLX_MOE_PREFILL_PLAN=kernel, MLX_MOE_PREFILL_COMBINE=kernel)
        for layer in ours.model.layers:
            layer.mlp.switch_mlp.backend = "prefill" if backend.startswith("prefill") else backend
        try:
            ms = bench(prefill(ours), iters=3)
        finally:
            for f, v in saved.items():
                if v is None:
                    os.environ.pop(f, None)
                else:
                    os.environ[f] = v
        RESULTS["model"].append(dict(variant=f"mlx-moe {backend}", layers=L, T=T,
                                     ms=round(ms, 2), ms_per_layer=round(ms / L, 3),
                                     est_tok_s_48_layers=round(T / (ms / L * 48) * 1e3, 1)))
        log("MODEL", RESULTS["model"][-1])
        save()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:
        info = {}
    RESULTS["device"] = str(mx.default_device()) + " " + json.dumps({k: str(v) for k, v in info.items()})
    RESULTS["platform"] = gpu_backend()
    log("device", RESULTS["device"], "platform", RESULTS["platform"])
    pf.register()
    phases = os.environ.get("PREFILL_PHASES", "qwen,time,correct,model").split(",")
    ex = make_experts(QWEN["E"], QWEN["H"], QWEN["I"], 4, 64)
    for phase in phases:
        if phase != "qwen" and time.time() - T0 > BUDGET_S:
            log("budget reached, skipping phase", phase)
            continue
        log("PHASE", phase)
        if phase == "correct":
            phase_correctness()
        elif phase == "qwen":
            phase_qwen_correctness(ex)
        elif phase == "time":
            phase_timing(ex)
        elif phase == "model":
            phase_model()
        elif phase == "probe":
            phase_probe()
    n_ok = sum(c.get("ok", False) for c in RESULTS["checks"])
    log(f"SUMMARY checks ok {n_ok}/{len(RESULTS['checks'])}, errors {len(RESULTS['errors'])}")
    for row in RESULTS["timing"]:
        log("TABLE", json.dumps(row))
    for row in RESULTS["model"]:
        log("MODEL", json.dumps(row))
    save()


if __name__ == "__main__":
    main()
