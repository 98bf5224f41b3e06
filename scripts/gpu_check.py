#!/usr/bin/env python3
"""The whole GPU check of the fused decode kernels, in one process.

    python scripts/gpu_check.py [--tests full|quick|none] [--skip-sweep] [--iters N]
    ncu --kernel-name regex:moe_ --metrics gpu__time_duration.sum,dram__bytes_read.sum \
        python scripts/gpu_check.py --ncu-target     # GPU-side kernel times only

1. runs tests/test_kernels_gpu.py with pytest in a child process and writes
   the max error of every case (the tests append them to gpu_tests.tsv);
2. times the Qwen3-30B-A3B expert layer (E=128, H=2048, I=768, top-8, affine
   q4 g64, bf16) at m = 1 (and 2, 4, 8): the ``fused`` backend against the
   ``gather`` backend (gather_qmm), in us per layer and GB/s of the selected
   experts' weight bytes (gate+up+down incl. scales/biases); kernel A and B
   alone; a launch-shape sweep at m = 1.

Weights are cycled over several layers (more bytes than the L2 cache) with
fresh random expert ids each call, so the timed reads come from HBM. Each
timing evaluates N independent layer calls at once (MLX encodes them back to
back on one stream) and divides; the best of 3 repetitions is kept. The
per-call synchronous latency is given too.

Logs go to $OUT (or ./gpu_check_out): gpu_tests.tsv, timing.json, timing.md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_moe import kernels  # noqa: E402
from mlx_moe.experts import BACKENDS  # noqa: E402
from mlx_moe.kernels.common import gpu_backend  # noqa: E402
from mlx_moe.kernels.fused import backend as fused  # noqa: E402
from mlx_moe.testing.reference import random_experts, random_inputs  # noqa: E402

OUT = Path(os.environ.get("OUT") or ROOT / "gpu_check_out")


def log(*a):
    print(*a, flush=True)


def device_info():
    info = {"mlx": mx.__version__, "python": platform.python_version(),
            "backend": gpu_backend()}
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["gpu"] = r.stdout.strip()
    except Exception as e:  # noqa: BLE001
        info["gpu"] = f"nvidia-smi unavailable ({e})"
    try:
        info["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:  # noqa: BLE001
        pass
    return info


# -------------------------------------------------------------------- tests


def run_tests(mode="full"):
    t0 = time.time()
    log(f"== pytest tests/test_kernels_gpu.py -m gpu ({mode})")
    # quick: every format/launch-shape test, affine combos with silu only
    sel = ["-k", "not test_affine or silu"] if mode == "quick" else []
    tsv = OUT / "gpu_tests.tsv"
    tsv.write_text("case\tmax_rel_err_vs_reference\tmax_rel_err_vs_loop\n")
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
                          *sel, str(ROOT / "tests" / "test_kernels_gpu.py")],
                         env={**os.environ, "MLX_MOE_GPU_RESULTS": str(tsv)})
    status = f"pytest exit code {rc}"
    results = [(n, float(a), float(b)) for n, a, b in
               (line.split("\t") for line in tsv.read_text().splitlines()[1:])]
    worst_ref = max((r[1] for r in results), default=float("nan"))
    worst_loop = max((r[2] for r in results), default=float("nan"))
    log(f"== tests: {status}; {len(results)} checked cases; worst max-rel error "
        f"vs reference {worst_ref:.2e}, vs loop {worst_loop:.2e} ({time.time() - t0:.0f}s)")
    return {"status": status, "cases": len(results), "worst_vs_reference": worst_ref,
            "worst_vs_loop": worst_loop}


# ------------------------------------------------------------------- timing

E, H, I, K = 128, 2048, 768, 8
BITS, GROUP = 4, 64


def make_layers(n):
    layers = []
    for i in range(n):
        e = random_experts(E, H, I, "silu", ("affine", BITS, GROUP), mx.bfloat16, seed=100 + i)
        mx.eval(e.parameters())
        layers.append(e)
        mx.clear_cache()
    return layers


def expert_bytes(e):
    total = 0
    for p in (e.gate_proj, e.up_proj, e.down_proj):
        for name in ("weight", "scales", "biases", "bias"):
            if name in p and p[name] is not None:
                total += p[name].nbytes
    return total / e.num_experts


def make_inputs(m, n, seed=0):
    ins = []
    for i in range(n):
        x, w, ids = random_inputs(_TEMPLATE, m, K, mx.bfloat16, seed=seed + i)
        ins.append((x, w, ids))
    mx.eval(ins)
    return ins


def timed(fn, calls, iters, reps=3):
    """Best seconds per call over reps of `iters` calls evaluated together."""
    mx.eval([fn(*calls[i % len(calls)]) for i in range(min(iters, 2 * len(calls)))])
    mx.synchronize()
    best = float("inf")
    for _ in range(reps):
        outs = [fn(*calls[i % len(calls)]) for i in range(iters)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
        del outs
    return best


def latency(fn, calls, n=50):
    ts = []
    for i in range(n):
        c = calls[i % len(calls)]
        t0 = time.perf_counter()
        mx.eval(fn(*c))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[5:]))


def run_timing(args):
    kernels.register()
    log(f"== timing: Qwen3-30B-A3B experts E={E} H={H} I={I} top-{K} affine q{BITS} g{GROUP} bf16")
    t0 = time.time()
    layers = make_layers(args.layers)
    global _TEMPLATE
    _TEMPLATE = layers[0]
    per_expert = expert_bytes(layers[0])
    log(f"   {args.layers} layers of {per_expert * E / 2**20:.0f} MiB, "
        f"{per_expert / 2**20:.3f} MiB per expert (made in {time.time() - t0:.0f}s)")
    fused_run, gather_run = BACKENDS["fused"].run, BACKENDS["gather"].run
    rows = []
    for m in args.ms:
        ins = make_inputs(m, 64, seed=1000 * m)
        calls = [(layers[i % len(layers)],) + ins[i] for i in range(len(ins))]
        uniq = np.mean([len(np.unique(np.array(c[3]))) for c in calls])
        nbytes = uniq * per_expert
        row = {"m": m, "unique_experts": float(uniq), "weight_bytes": float(nbytes)}
        for name, fn in (("fused", fused_run), ("gather", gather_run)):
            try:
                t = timed(fn, calls, args.iters)
                lat = latency(fn, calls)
                row[name] = {"us": t * 1e6, "GBps": nbytes / t / 1e9, "sync_latency_us": lat * 1e6}
            except Exception:  # noqa: BLE001
                row[name] = {"error": traceback.format_exc()[-2000:]}
        if m == 1:
            hs = [fused.gate_up(*c[:2], c[3]) for c in calls]
            mx.eval(hs)
            ta = timed(lambda e, x, w, ids: fused.gate_up(e, x, ids), calls, args.iters)
            bcalls = [c + (h,) for c, h in zip(calls, hs)]
            tb = timed(lambda e, x, w, ids, h: fused.down(e, h, x, w, ids), bcalls, args.iters)
            pe = {p: 0 for p in ("a", "b")}
            for pn, p in (("a", (layers[0].gate_proj, layers[0].up_proj)), ("b", (layers[0].down_proj,))):
                pe[pn] = sum(q[n].nbytes for q in p for n in ("weight", "scales", "biases")) / E
            row["kernel_a"] = {"us": ta * 1e6, "GBps": uniq * pe["a"] / ta / 1e9}
            row["kernel_b"] = {"us": tb * 1e6, "GBps": uniq * pe["b"] / tb / 1e9}
        rows.append(row)
        log("   " + json.dumps(row))

    sweep = []
    if not args.skip_sweep:
        log("== launch-shape sweep, m=1 (fused layer)")
        ins = make_inputs(1, 64, seed=7)
        calls = [(layers[i % len(layers)],) + ins[i] for i in range(len(ins))]
        nbytes = K * per_expert
        variants = [({}, {})]
        variants += [({"lpr": 32, "rps": r, "wpb": w}, {}) for r, w in
                     ((1, 4), (2, 2), (2, 8), (4, 4), (4, 2))]
        variants += [({"lpr": 16, "rps": 2, "wpb": 4}, {})]
        variants += [({}, {"lpr": l, "rb": r, "wpb": w}) for l, r, w in
                     ((8, 1, 4), (8, 4, 4), (8, 2, 8), (8, 2, 2), (4, 2, 4), (16, 2, 4), (8, 4, 8))]
        for ta, tb in variants:
            fused.reset_tuning()
            fused.set_tuning(ta, tb)
            p = fused.plan(layers[0], *ins[0][:1], ins[0][2])
            try:
                t = timed(fused_run, calls, args.iters)
                r = {"a": ta, "b": tb, "template_a": dict(p.template_a), "us": t * 1e6,
                     "GBps": nbytes / t / 1e9}
            except Exception:  # noqa: BLE001
                r = {"a": ta, "b": tb, "error": traceback.format_exc()[-1500:]}
            sweep.append({k: (v if k != "template_a" else {kk: v[kk] for kk in ("LPR", "RPS", "WPB")})
                          for k, v in r.items()})
            log("   " + json.dumps(sweep[-1], default=str))
        fused.reset_tuning()
    return {"rows": rows, "sweep": sweep}


def ncu_target():
    """A few m=1 fused layers on distinct weights, for a profiler to time."""
    kernels.register()
    global _TEMPLATE
    layers = make_layers(2)
    _TEMPLATE = layers[0]
    ins = make_inputs(1, 8)
    for i in range(8):
        mx.eval(BACKENDS["fused"].run(layers[i % 2], *ins[i]))
    mx.synchronize()
    log("ncu target done")
    return 0


def write_markdown(info, tests, timing):
    lines = [f"# fused MoE decode kernels: GPU check", "",
             f"- device: {info.get('gpu')}; MLX {info['mlx']} ({info['backend']})",
             f"- tests: {tests.get('status')}, {tests.get('cases')} cases, worst max-rel error "
             f"vs reference {tests.get('worst_vs_reference', float('nan')):.2e}, "
             f"vs loop {tests.get('worst_vs_loop', float('nan')):.2e}", "",
             f"Qwen3-30B-A3B expert layer (E={E}, H={H}, I={I}, top-{K}, q{BITS} g{GROUP}, bf16):", "",
             "| m | experts read | MiB | fused us | fused GB/s | gather us | gather GB/s | speedup | fused sync us | gather sync us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in timing.get("rows", []):
        f, g = r.get("fused", {}), r.get("gather", {})
        if "us" in f and "us" in g:
            lines.append(
                f"| {r['m']} | {r['unique_experts']:.1f} | {r['weight_bytes'] / 2**20:.1f} | "
                f"{f['us']:.1f} | {f['GBps']:.0f} | {g['us']:.1f} | {g['GBps']:.0f} | "
                f"{g['us'] / f['us']:.1f}x | {f['sync_latency_us']:.0f} | {g['sync_latency_us']:.0f} |")
        else:
            lines.append(f"| {r['m']} | error: see timing.json |")
    for r in timing.get("rows", []):
        if "kernel_a" in r:
            lines += ["", f"m=1 kernels alone: A (gate+up+act) {r['kernel_a']['us']:.1f} us "
                      f"{r['kernel_a']['GBps']:.0f} GB/s; B (down+combine) {r['kernel_b']['us']:.1f} us "
                      f"{r['kernel_b']['GBps']:.0f} GB/s"]
    if timing.get("sweep"):
        lines += ["", "Launch-shape sweep (m=1, fused layer):", "", "| A | B | us | GB/s |", "|---|---|---|---|"]
        for s in timing["sweep"]:
            lines.append(f"| {s['a'] or 'default'} | {s['b'] or 'default'} | "
                         f"{s.get('us', float('nan')):.1f} | {s.get('GBps', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", choices=("full", "quick", "none"), default="full",
                    help="GPU test selection (full: ~6 min on an H100, mostly NVRTC compiles)")
    ap.add_argument("--ncu-target", action="store_true",
                    help="only run a few fused m=1 layers (to be wrapped by ncu/nsys)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ms", type=int, nargs="*", default=[1, 2, 4, 8])
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    info = device_info()
    log("== device", json.dumps(info))
    if info["backend"] is None:
        log("no MLX GPU backend: nothing to check")
        return 2
    t0 = time.time()
    if args.ncu_target:
        return ncu_target()
    tests = {} if args.tests == "none" else run_tests(args.tests)
    timing = {}
    try:
        timing = run_timing(args)
    except Exception:  # noqa: BLE001
        log(traceback.format_exc())
    (OUT / "timing.json").write_text(json.dumps(
        {"device": info, "tests": tests, "timing": timing}, indent=1, default=str))
    md = write_markdown(info, tests, timing)
    (OUT / "timing.md").write_text(md)
    log(md)
    log(f"== done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
