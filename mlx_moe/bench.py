"""``mlx_moe.bench``: mlx-moe against mlx-lm, in the same process, on the same weights.

Three sections (default: all three):

``--layer``  the routed-expert layer: our ``MoEExperts`` (every backend available
             here) vs mlx-lm's ``SwitchGLU`` + the weighted top-k sum of its MoE
             blocks, same quantized arrays, same inputs and routing, for real
             models' expert shapes and m tokens per call.
``--e2e``    whole models with random weights built from real configs: ours vs
             mlx-lm's own model class holding the same arrays: first forward,
             prefill tok/s, greedy decode tok/s with a KV cache, peak memory.
``--load``   converting a random bf16 Hugging Face checkpoint on disk to a
             quantized folder: ``mlx_moe.convert.convert`` vs
             ``mlx_lm.convert.convert``, each in a fresh subprocess (clean RSS)
             with the source dropped from the page cache first.

``offload``  (as the first argument) decode tok/s at expert budgets vs the resident
             model and plain mmap paging: ``mlx_moe.offload.bench``'s options.

Ratios are always mlx-lm's time / ours (> 1: ours is faster). ``--quick`` runs
a small subset (~1 minute on a 2-core CPU). ``--json FILE`` keeps every figure
with the machine and versions; ``--plot FILE.png`` draws the layer sweep.
"""

import argparse
import contextlib
import datetime
import functools
import gc
import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .experts import BACKENDS, MoEExperts
from .quantization import QuantSpec

GB = 1e9

# ============================================================== shapes, settings


@dataclass(frozen=True)
class LayerShape:
    """The routed-expert layer of a model: E experts, hidden H, expert intermediate I, top-k."""

    name: str
    E: int
    H: int
    I: int
    k: int
    activation: str = "silu"
    bias: bool = False

    def flops(self, m: int) -> int:
        """Matmul FLOPs of one call on m tokens: 2 * m * k * 3 * H * I."""
        return 2 * m * self.k * 3 * self.H * self.I

    def expert_bytes(self, bits: int, group_size: int = 64, dtype_bytes: int = 2) -> int:
        """Bytes of one expert's gate+up+down (weights, affine scales+biases, biases)."""
        elems = 3 * self.H * self.I
        if bits:
            b = elems * bits // 8 + 2 * (elems // group_size) * dtype_bytes
        else:
            b = elems * dtype_bytes
        if self.bias:
            b += (2 * self.I + self.H) * dtype_bytes
        return b


SHAPES: Dict[str, LayerShape] = {
    s.name: s
    for s in [
        LayerShape("qwen3-30b-a3b", 128, 2048, 768, 8),
        LayerShape("mixtral-8x7b", 8, 4096, 14336, 2),
        LayerShape("deepseek-v3", 256, 7168, 2048, 8),
        LayerShape("gpt-oss-20b", 32, 2880, 2880, 4, "swiglu_oai", True),
        LayerShape("tiny", 16, 256, 128, 4),
        LayerShape("small", 64, 1024, 512, 8),
    ]
}
DEFAULT_SHAPES = ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3", "gpt-oss-20b"]
DEFAULT_M = [1, 4, 32, 512, 2048]
DEFAULT_BITS = [4, 8]
DEFAULT_PREFILL = [128, 512, 2048]
QUICK = {
    "shapes": ["tiny"],
    "m": [1, 4, 32],
    "bits": [4],
    "config": ["tiny"],
    "prefill": [128, 512],
    "decode_tokens": 100,
    "load_gb": 0.2,
    "row_budget_s": 0.6,
    "repeats": 2,
}
# The loop backend is the per-expert oracle: only run it on layers this small.
LOOP_MAX_BYTES = 64 << 20


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def parse_list(text, cast=str) -> list:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return list(text)
    return [cast(t.strip()) for t in str(text).split(",") if t.strip()]


def parse_shape(token: str) -> LayerShape:
    """A name from ``SHAPES`` or ``E:H:I:k`` (optionally ``:activation``)."""
    if token in SHAPES:
        return SHAPES[token]
    parts = token.split(":")
    if len(parts) in (4, 5) and all(p.isdigit() for p in parts[:4]):
        E, H, I, k = map(int, parts[:4])
        act = parts[4] if len(parts) == 5 else "silu"
        return LayerShape(token, E, H, I, k, act, act == "swiglu_oai")
    raise SystemExit(f"unknown shape '{token}': use one of {sorted(SHAPES)} or E:H:I:k")


def memory_budget() -> int:
    """Bytes this run may use: the GPU's memory, or the host's available memory."""
    info = {}
    try:
        info = mx.device_info()
    except Exception:
        pass
    if on_gpu():
        for key in ("memory_size", "total_memory", "max_recommended_working_set_size"):
            if info.get(key):
                return int(info[key])
        if shutil.which("nvidia-smi"):
            r = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                return int(float(r.stdout.split()[0]) * (1 << 20))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def register_backends():
    """Add the GPU backends other modules provide (fused, prefill), where importable."""
    notes = []
    for mod, fn in (("mlx_moe.kernels", "register"), ("mlx_moe.kernels.prefill", "register")):
        try:
            import importlib

            getattr(importlib.import_module(mod), fn)()
        except Exception as e:  # not built / not on this platform: their rows are just absent
            notes.append(f"{mod}.{fn}: {type(e).__name__}: {e}")
    return notes


# ============================================================== pure metrics


def layer_metrics(seconds: float, m: int, k: int, H: int, I: int, bytes_read: float) -> dict:
    """µs per call, GB/s of expert weight bytes read, TFLOP/s (2·m·k·3·H·I) for one timing."""
    return {
        "us": seconds * 1e6,
        "gbs": bytes_read / seconds / GB,
        "tflops": 2 * m * k * 3 * H * I / seconds / 1e12,
    }


def speedup(ours_seconds: float, ref_seconds: float) -> float:
    """mlx-lm's time / ours: > 1 means ours is faster."""
    return ref_seconds / ours_seconds


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ============================================================== layer sweep


def make_routes(m: int, E: int, k: int, draws: int, seed: int, dtype) -> List[dict]:
    """``draws`` routings of m tokens: k distinct uniformly random experts per token
    and softmax weights. Returns ``[{"weights", "ids", "distinct"}]``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        ids = np.argsort(rng.random((m, E)), axis=1)[:, :k].astype(np.uint32)
        logits = rng.standard_normal((m, k)).astype(np.float32)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        out.append({
            "weights": mx.array(w).astype(dtype),
            "ids": mx.array(ids),
            "distinct": int(np.unique(ids).size),
        })
    mx.eval([(r["weights"], r["ids"]) for r in out])
    return out


def _mlx_lm_activation(name):
    from mlx_lm.models import activations

    if name == "silu":
        from mlx_lm.models.switch_layers import SwiGLU

        return SwiGLU()
    if name == "swiglu_oai":
        return activations.SwigluOAI()
    raise ValueError(f"no mlx-lm SwitchGLU activation for '{name}'")


def layer_pair(shape: LayerShape, bits: int, group_size: int):
    """Lazy skeletons (nothing evaluated): our ``MoEExperts`` and mlx-lm's ``SwitchGLU``."""
    from mlx_lm.models.switch_layers import SwitchGLU

    ours = MoEExperts(shape.E, shape.H, shape.I, activation=shape.activation, bias=shape.bias)
    ref = SwitchGLU(shape.H, shape.I, shape.E, activation=_mlx_lm_activation(shape.activation), bias=shape.bias)
    if bits:
        nn.quantize(ours, group_size, bits)
        nn.quantize(ref, group_size, bits)
    return ours, ref


def build_layer(shape: LayerShape, bits: int, group_size: int, dtype, seed: int):
    """Our ``MoEExperts`` with random (quantized) weights, generated in chunks of
    experts so the float layer never exists whole, and mlx-lm's ``SwitchGLU``
    holding the same arrays (parameter names match)."""
    from .synthetic import fill_random

    ours, ref = layer_pair(shape, bits, group_size)
    fill_random(ours, seed=seed, dtype=dtype)
    ref.update(ours.parameters())
    ours.eval(), ref.eval()
    return ours, ref


def copy_layer(shape: LayerShape, bits: int, group_size: int, ours: MoEExperts):
    """Another (ours, ref) pair on fresh copies of ``ours``'s arrays, so calls can
    cycle through more weight bytes than the caches hold."""
    from mlx.utils import tree_map

    params = tree_map(lambda a: a + 0, ours.parameters())
    mx.eval(params)
    o, r = layer_pair(shape, bits, group_size)
    o.update(params)
    r.update(params)
    o.eval(), r.eval()
    return o, r


def module_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _chain_input(y):
    # The next call's input is this call's output, RMS-normalised (as a pre-norm
    # transformer feeds its MoE), so values neither vanish nor blow up.
    return mx.fast.rms_norm(y, None, 1e-6)


def time_impls(impls: Dict[str, Callable], x0, routes, budget_s: float, repeats: Optional[int] = None,
               chain_len: Optional[int] = None) -> Dict[str, dict]:
    """Time each ``fn(x, weights, ids, call_index)`` two ways, interleaving impls:

    * ``single``: one call per ``mx.eval`` (includes the per-eval sync/launch cost);
    * ``chain``: ``chain_len`` dependent calls (each input = previous output), one
      ``mx.eval``, time / chain_len.

    The very first call (compilation, kernel loading) is reported as
    ``first_s`` and excluded; then two warm-up calls each. Medians of repeats.
    """
    names = list(impls)
    R = len(routes)
    call = lambda name, x, i: impls[name](x, routes[i % R]["weights"], routes[i % R]["ids"], i)
    first, outputs = {}, {}
    for name in names:
        t0 = time.perf_counter()
        y = call(name, x0, 0)
        mx.eval(y)
        first[name] = time.perf_counter() - t0
        outputs[name] = y
    warm = []
    for i in (1, 2):
        for name in names:
            t0 = time.perf_counter()
            mx.eval(call(name, x0, i))
            warm.append(time.perf_counter() - t0)
    t_est = max(min(warm), 1e-6)
    n_impl = len(names)
    n_single = int(min(50, max(3, 0.35 * budget_s / (t_est * n_impl))))
    if chain_len is None:
        chain_len = int(min(32, max(4, 0.02 / t_est)))
    if repeats is None:
        repeats = int(min(20, max(3, 0.5 * budget_s / (t_est * chain_len * n_impl))))
    single = {n: [] for n in names}
    for i in range(n_single):
        for name in names:
            t0 = time.perf_counter()
            mx.eval(call(name, x0, 3 + i))
            single[name].append(time.perf_counter() - t0)
    chain = {n: [] for n in names}
    for r in range(repeats):
        for name in names:
            x = x0
            t0 = time.perf_counter()
            for j in range(chain_len):
                x = _chain_input(call(name, x, 3 + r * chain_len + j))
            mx.eval(x)
            chain[name].append((time.perf_counter() - t0) / chain_len)
    return {
        name: {
            "first_s": first[name],
            "single_s": median(single[name]),
            "single_min_s": min(single[name]),
            "single_samples": len(single[name]),
            "chain_s": median(chain[name]),
            "chain_min_s": min(chain[name]),
            "chain_len": chain_len,
            "chain_repeats": repeats,
            "output": outputs[name],
        }
        for name in names
    }


def rel_err(y, ref) -> float:
    y, ref = y.astype(mx.float32), ref.astype(mx.float32)
    scale = mx.abs(ref).max().item()
    return mx.abs(y - ref).max().item() / (scale if scale > 0 else 1.0)


@functools.lru_cache(maxsize=None)
def gen_rate(dtype) -> float:
    """Elements per second this device generates + quantizes random weights at."""
    from .synthetic import random_quantized

    n = 1 << 22 if not on_gpu() else 1 << 26
    random_quantized("calibration", (n // 1024, 1024), 64, 4, dtype=dtype)  # warm-up
    t0 = time.perf_counter()
    random_quantized("calibration2", (n // 1024, 1024), 64, 4, dtype=dtype)
    return n / (time.perf_counter() - t0)


def bench_layer_shape(shape: LayerShape, bits: int, args, rate: float, mem: int, log) -> (list, list):
    """All m rows of one (shape, bits). Returns (rows, skipped)."""
    rows, skipped = [], []
    group = args.group_size
    dtype = args.dtype
    dbytes = dtype.size
    layer_est = shape.E * shape.expert_bytes(bits, group, dbytes)
    m_max = max(args.m)
    act_est = 6 * m_max * shape.k * (shape.H + 3 * shape.I) * 4
    need = layer_est * 1.4 + act_est + 0.5 * GB
    tag = dict(shape=shape.name, bits=bits)
    if need > 0.85 * mem:
        skipped.append({**tag, "reason": f"memory: needs ~{need / GB:.1f} GB, {mem / GB:.1f} GB here"})
        return rows, skipped
    build_est = 3 * shape.E * shape.H * shape.I / rate
    if build_est > args.max_build_s:
        skipped.append({**tag, "reason": f"time: building the layer would take ~{build_est:.0f} s (> --max-build-s {args.max_build_s:g})"})
        return rows, skipped
    log(f"[layer] {shape.name} q{bits}: building E={shape.E} H={shape.H} I={shape.I} (~{layer_est / GB:.2f} GB, est {build_est:.0f} s)")
    t0 = time.perf_counter()
    ours, ref = build_layer(shape, bits, group, dtype, args.seed)
    build_s = time.perf_counter() - t0
    layer_bytes = module_bytes(ours)
    per_expert = layer_bytes / shape.E
    cycle = args.cycle_bytes if args.cycle_bytes is not None else (1 << 30 if on_gpu() else 256 << 20)
    copies = int(max(1, min(8, math.ceil(cycle / layer_bytes), (0.3 * mem) // layer_bytes)))
    pairs = [(ours, ref)] + [copy_layer(shape, bits, group, ours) for _ in range(copies - 1)]
    backends = args.backends or list(BACKENDS)
    t_prev, m_prev = None, None
    unavailable = {}
    try:
        for m in sorted(args.m):
            if t_prev is not None:
                pred = t_prev * m / m_prev
                if pred > args.max_call_s:
                    skipped.append({**tag, "m": m, "reason": f"time: ~{pred:.2f} s per call predicted (> --max-call-s {args.max_call_s:g})"})
                    continue
            routes = make_routes(m, shape.E, shape.k, args.route_draws, args.seed + m, dtype)
            x0 = mx.random.normal((m, shape.H), key=mx.random.key(args.seed)).astype(dtype)
            mx.eval(x0)
            impls, backend_of = {}, {}
            probe = pairs[0][0]
            for b in backends:
                if b not in BACKENDS:
                    skipped.append({**tag, "m": m, "backend": b, "reason": "backend not registered"})
                    continue
                if b == "loop" and (layer_bytes > LOOP_MAX_BYTES or m * shape.k > 256) and not args.backends:
                    continue  # the oracle: small shapes only unless asked for
                if not BACKENDS[b].available(probe, x0, routes[0]["ids"]):
                    unavailable.setdefault(b, []).append(m)
                    continue

                def f(x, w, ids, i, b=b):
                    layer = pairs[i % copies][0]
                    layer.backend = b
                    return layer(x, w, ids)

                impls[f"ours:{b}"] = f
                backend_of[f"ours:{b}"] = b

            def f_ref(x, w, ids, i):
                return (pairs[i % copies][1](x, ids) * w[..., None]).sum(axis=-2)

            impls["mlx-lm"] = f_ref
            backend_of["mlx-lm"] = "SwitchGLU"
            probe.backend = "auto"
            auto = probe.select_backend(x0, routes[0]["ids"])
            res = time_impls(impls, x0, routes, args.row_budget_s, args.repeats, args.chain)
            distinct = float(np.mean([r["distinct"] for r in routes]))
            bytes_read = distinct * per_expert
            ref_res = res["mlx-lm"]
            for name, r in res.items():
                row = {
                    **tag,
                    "E": shape.E, "H": shape.H, "I": shape.I, "k": shape.k,
                    "activation": shape.activation, "group_size": group,
                    "dtype": str(dtype).split(".")[-1], "m": m,
                    "impl": "mlx-lm" if name == "mlx-lm" else "ours",
                    "backend": backend_of[name],
                    "auto_backend": auto,
                    "distinct_experts": distinct,
                    "bytes_per_call": bytes_read,
                    "layer_bytes": layer_bytes,
                    "weight_copies": copies,
                    "flops_per_call": shape.flops(m),
                    "first_call_us": r["first_s"] * 1e6,
                    "single": {**layer_metrics(r["single_s"], m, shape.k, shape.H, shape.I, bytes_read),
                               "us_min": r.get("single_min_s", r["single_s"]) * 1e6,
                               "samples": r["single_samples"]},
                    "chain": {**layer_metrics(r["chain_s"], m, shape.k, shape.H, shape.I, bytes_read),
                              "us_min": r.get("chain_min_s", r["chain_s"]) * 1e6,
                              "len": r["chain_len"], "repeats": r["chain_repeats"]},
                    "build_s": build_s,
                }
                if name != "mlx-lm":
                    row["speedup_vs_mlx_lm"] = {
                        "single": speedup(r["single_s"], ref_res["single_s"]),
                        "chain": speedup(r["chain_s"], ref_res["chain_s"]),
                    }
                    row["max_rel_err_vs_mlx_lm"] = rel_err(r["output"], ref_res["output"])
                rows.append(row)
            log(format_layer_rows([r for r in rows if r["m"] == m], header=False))
            t_prev = max(r["single_s"] for n, r in res.items() if n != "ours:loop")
            m_prev = m
            del res, routes, x0
    finally:
        del pairs, ours, ref
        gc.collect()
        mx.clear_cache()
    for b, ms in unavailable.items():
        skipped.append({**tag, "backend": b, "m": ms, "reason": "backend not available for these calls here"})
    return rows, skipped


def bench_layers(args, log) -> dict:
    mem = memory_budget()
    rate = gen_rate(args.dtype)
    rows, skipped = [], []
    for token in args.shapes:
        shape = parse_shape(token)
        for bits in args.bits:
            try:
                r, s = bench_layer_shape(shape, bits, args, rate, mem, log)
            except Exception as e:  # keep going: one failing shape must not lose the others
                log(f"[layer] {shape.name} q{bits}: ERROR {type(e).__name__}: {e}")
                r, s = [], [{"shape": shape.name, "bits": bits, "reason": f"error: {type(e).__name__}: {e}"}]
            rows += r
            skipped += s
            for item in s:
                log(f"[layer] skipped {item}")
    return {
        "rows": rows,
        "skipped": skipped,
        "memory_budget_gb": mem / GB,
        "generation_rate_per_s": rate,
        "definitions": {
            "us": "median wall time per call (us_min: the fastest sample)",
            "single": "one call per mx.eval (includes per-eval launch/sync cost)",
            "chain": "N dependent calls (input = RMS-normalised previous output), one mx.eval, time/N",
            "bytes_per_call": "distinct experts touched by the call's routing (mean over draws) x bytes of one expert (gate+up+down weights, scales, biases, expert biases)",
            "gbs": "bytes_per_call / time",
            "tflops": "2*m*k*3*H*I / time",
            "speedup_vs_mlx_lm": "mlx-lm time / ours (>1: ours faster)",
            "mlx-lm": "SwitchGLU(x, ids) then (y * weights[..., None]).sum(-2), as mlx-lm's MoE blocks do",
            "routing": "k distinct uniformly random experts per token, softmax weights; draws cycled per call",
            "weight_copies": "copies of the layer's arrays cycled per call so reads are not served from cache",
            "first_call_us": "the first call of each impl (compilation, kernel loading); ours runs first, so kernels shared with mlx-lm are compiled on our clock",
            "max_rel_err_vs_mlx_lm": "max |ours - mlx-lm| / max |mlx-lm| on the first call's output",
        },
    }


def format_layer_rows(rows, header=True) -> str:
    lines = []
    w = max([15] + [len(r["shape"]) + 1 for r in rows])
    if header:
        lines.append(
            f"{'shape':<{w}}{'bits':>4}{'m':>6}  {'impl':<18}{'chain µs':>11}{'GB/s':>9}{'TFLOP/s':>9}"
            f"{'single µs':>11}{'×chain':>8}{'×single':>8}{'rel err':>9}"
        )
    for r in rows:
        sp = r.get("speedup_vs_mlx_lm")
        impl = "mlx-lm" if r["impl"] == "mlx-lm" else f"ours:{r['backend']}"
        lines.append(
            f"{r['shape']:<{w}}{r['bits']:>4}{r['m']:>6}  {impl:<18}{r['chain']['us']:>11.1f}{r['chain']['gbs']:>9.2f}"
            f"{r['chain']['tflops']:>9.3f}{r['single']['us']:>11.1f}"
            + (f"{sp['chain']:>8.2f}{sp['single']:>8.2f}{r['max_rel_err_vs_mlx_lm']:>9.1e}" if sp else f"{'1':>8}{'1':>8}{'':>9}")
        )
    return "\n".join(lines)


# ============================================================== end to end


def _prefill_once(model, tokens, step=2048) -> float:
    """Seconds to process ``tokens`` as mlx-lm's generate_step does: all but the
    last token with only the KV cache evaluated, then the last with its logits."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.synchronize()
    t0 = time.perf_counter()
    rest = tokens
    while rest.size > 1:
        n = min(step, rest.size - 1)
        model(rest[None, :n], cache=cache)
        mx.eval([c.state for c in cache])
        rest = rest[n:]
    mx.eval(model(rest[None], cache=cache))
    return time.perf_counter() - t0


def _decode_once(step_fn, prompt, n) -> (list, float):
    """Greedy tokens and tok/s over the n-1 tokens after the first (as mlx-lm reports)."""
    tokens, t_first = [], None
    for tok in step_fn(prompt, n):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(tok)
    dt = time.perf_counter() - t_first
    return tokens, (len(tokens) - 1) / dt if dt > 0 else float("inf")


def _peak_gb():
    return mx.get_peak_memory() / GB


def e2e_decoders(ours, twin, compiled: bool):
    from mlx_lm.generate import generate_step

    greedy = lambda lp: mx.argmax(lp, axis=-1)
    impls = {
        "ours": lambda p, n: (t for t, _ in generate_step(p, ours, max_tokens=n, sampler=greedy)),
        "mlx-lm": lambda p, n: (t for t, _ in generate_step(p, twin, max_tokens=n, sampler=greedy)),
    }
    if compiled:
        try:
            from .decode import generate_step as our_generate_step

            impls["ours+decode"] = lambda p, n: (
                r.token for r in our_generate_step(p, ours, max_tokens=n, sampler=greedy, compiled=True)
            )
        except ImportError:
            pass
    return impls


def bench_e2e_config(name: str, bits: int, args, rate: float, mem: int, log) -> dict:
    from .synthetic import get_config, mlx_lm_twin, model_bytes, random_model

    config = get_config(name)
    quantize = {"bits": bits, "group_size": args.group_size} if bits else None
    dtype = args.dtype
    wbytes = model_bytes(config, quantize, dtype)
    tag = {"config": name, "bits": bits, "model_type": config["model_type"], "weights_gb": wbytes / GB}
    need = wbytes * 1.15 + 2 * GB
    if need > 0.9 * mem:
        return {**tag, "skipped": f"memory: needs ~{need / GB:.1f} GB, {mem / GB:.1f} GB here"}
    params = model_bytes(config, None, mx.float32) / 4  # float parameter count
    build_est = params / rate
    if build_est > args.max_build_s:
        return {**tag, "skipped": f"time: building would take ~{build_est:.0f} s (> --max-build-s {args.max_build_s:g})"}
    log(f"[e2e] {name} q{bits}: building {params / 1e9:.2f}B params ({wbytes / GB:.2f} GB), est {build_est:.0f} s")
    t0 = time.perf_counter()
    ours, qconfig = random_model(config, quantize, seed=args.seed, dtype=dtype)
    build_s = time.perf_counter() - t0
    twin = mlx_lm_twin(ours, qconfig, quantize)
    models = {"ours": ours, "mlx-lm": twin}
    vocab = config["vocab_size"]
    rng = np.random.default_rng(args.seed)
    lengths = sorted(args.prefill)
    prompts = {T: mx.array(rng.integers(0, vocab, T).astype(np.int32)) for T in lengths}
    first_prompt = mx.array(rng.integers(0, vocab, 128).astype(np.int32))
    out = {**tag, "build_s": build_s, "dtype": str(dtype).split(".")[-1], "group_size": args.group_size,
           "impls": {k: {"prefill": {}, "decode": {}} for k in models}}
    # First forward (ours first, so kernels both share are compiled on our clock).
    for k, model in models.items():
        out["impls"][k]["first_forward_s"] = _prefill_once(model, first_prompt)
    for T in lengths:
        for k, model in models.items():
            _prefill_once(model, prompts[T])  # warm-up at this length
        times = {k: [] for k in models}
        peaks = {k: 0.0 for k in models}
        for _ in range(args.e2e_repeats):
            for k, model in models.items():
                mx.reset_peak_memory()
                times[k].append(_prefill_once(model, prompts[T]))
                peaks[k] = max(peaks[k], _peak_gb())
        for k in models:
            s = median(times[k])
            out["impls"][k]["prefill"][str(T)] = {"s": s, "tok_s": T / s, "peak_gb": peaks[k], "repeats": len(times[k])}
        log(f"[e2e] {name} q{bits} prefill T={T}: " + ", ".join(
            f"{k} {T / median(times[k]):.1f} tok/s" for k in models))
    decoders = e2e_decoders(ours, twin, args.compiled_decode)
    n = args.decode_tokens
    dprompt = prompts[lengths[0]] if lengths else first_prompt
    for k, fn in decoders.items():
        _decode_once(fn, dprompt, min(8, n))  # warm-up
    tps = {k: [] for k in decoders}
    toks, peaks = {}, {k: 0.0 for k in decoders}
    for _ in range(max(1, args.e2e_repeats)):
        for k, fn in decoders.items():
            mx.reset_peak_memory()
            toks[k], r = _decode_once(fn, dprompt, n)
            tps[k].append(r)
            peaks[k] = max(peaks[k], _peak_gb())
    for k in decoders:
        out["impls"].setdefault(k, {"prefill": {}, "decode": {}})
        agree = next((i for i, (a, b) in enumerate(zip(toks[k], toks["mlx-lm"])) if a != b), len(toks[k]))
        out["impls"][k]["decode"] = {
            "tok_s": median(tps[k]), "tokens": n, "prompt_tokens": int(dprompt.size),
            "peak_gb": peaks[k], "repeats": len(tps[k]), "tokens_agree_with_mlx_lm": agree,
        }
    log(f"[e2e] {name} q{bits} decode: " + ", ".join(f"{k} {median(tps[k]):.1f} tok/s" for k in decoders))
    ref = out["impls"]["mlx-lm"]
    for k, v in out["impls"].items():
        if k == "mlx-lm":
            continue
        v["speedup_vs_mlx_lm"] = {
            "decode": v["decode"]["tok_s"] / ref["decode"]["tok_s"] if v.get("decode") else None,
            **({f"prefill_{T}": v["prefill"][T]["tok_s"] / ref["prefill"][T]["tok_s"] for T in v["prefill"]}),
            **({"first_forward": ref["first_forward_s"] / v["first_forward_s"]} if "first_forward_s" in v else {}),
        }
    del models, ours, twin
    gc.collect()
    mx.clear_cache()
    return out


def bench_e2e(args, log) -> dict:
    mem = memory_budget()
    rate = gen_rate(args.dtype)
    results = []
    for name in args.config:
        for bits in args.bits:
            try:
                r = bench_e2e_config(name, bits, args, rate, mem, log)
            except Exception as e:
                log(f"[e2e] {name} q{bits}: ERROR {type(e).__name__}: {e}")
                r = {"config": name, "bits": bits, "skipped": f"error: {type(e).__name__}: {e}"}
            if "skipped" in r:
                log(f"[e2e] skipped {name} q{bits}: {r['skipped']}")
            results.append(r)
    return {
        "results": results,
        "definitions": {
            "first_forward_s": "first call on a fresh model (128-token prompt), incl. kernel compilation; ours runs first, so kernels shared with mlx-lm are compiled on our clock",
            "prefill": "T prompt tokens as mlx-lm's generate_step processes them (T-1 filling the KV cache, then the last with logits), median of repeats after a warm-up",
            "decode": "greedy decode with KV cache through mlx_lm.generate.generate_step for both (ours+decode: mlx_moe.decode.generate_step, compiled); tok/s over the tokens after the first",
            "peak_gb": "mx.get_peak_memory after mx.reset_peak_memory, max over repeats; includes the (shared) weights",
            "speedup_vs_mlx_lm": "ours tok/s / mlx-lm tok/s (first_forward: mlx-lm time / ours)",
        },
    }


def format_e2e(res) -> str:
    done = [r for r in res["results"] if "skipped" not in r]
    Ts = sorted({int(T) for r in done for v in r["impls"].values() for T in v["prefill"]})
    cw = max([18] + [len(r["config"]) + 1 for r in done])
    lines = []
    if done:
        lines.append(f"{'config':<{cw}}{'bits':>4}  {'impl':<13}{'1st fwd s':>10}"
                     + "".join(f"{'pf' + str(T) + ' tok/s':>14}" for T in Ts)
                     + f"{'decode tok/s':>14}{'peak GB':>9}")
    for r in done:
        for k, v in r["impls"].items():
            ff = v.get("first_forward_s")
            peaks = [p["peak_gb"] for p in v["prefill"].values()] + ([v["decode"]["peak_gb"]] if v["decode"] else [])
            lines.append(
                f"{r['config']:<{cw}}{r['bits']:>4}  {k:<13}" + (f"{ff:>10.3f}" if ff is not None else f"{'-':>10}")
                + "".join(f"{v['prefill'][str(T)]['tok_s']:>14.1f}" if str(T) in v["prefill"] else f"{'-':>14}" for T in Ts)
                + (f"{v['decode']['tok_s']:>14.1f}" if v["decode"] else f"{'-':>14}") + f"{max(peaks, default=0):>9.3f}"
            )
            sp = v.get("speedup_vs_mlx_lm")
            if sp:
                lines.append(
                    f"{'':<{cw + 4}}  {'  ×mlx-lm':<13}" + (f"{sp['first_forward']:>10.2f}" if "first_forward" in sp else f"{'-':>10}")
                    + "".join(f"{sp['prefill_' + str(T)]:>14.2f}" if f"prefill_{T}" in sp else f"{'-':>14}" for T in Ts)
                    + (f"{sp['decode']:>14.2f}" if sp.get("decode") else f"{'-':>14}")
                )
    for r in res["results"]:
        if "skipped" in r:
            lines.append(f"{r['config']} q{r['bits']}: skipped ({r['skipped']})")
    return "\n".join(lines)


# ============================================================== load


def drop_page_cache(files) -> bool:
    """Ask the kernel to drop ``files`` from the page cache (fsync first so pages are clean)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            ok = False
    return ok


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _proc_status(key) -> Optional[int]:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak that
    follows belongs to the conversion, not to the imports before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _load_child(impl, src, dst, bits, group, out_json):
    """Runs in a fresh interpreter: convert ``src`` to ``dst`` and report."""
    bits, group = int(bits), int(group)
    if impl == "ours":
        from .convert import convert

        run = lambda: convert(src, dst, quantize={"bits": bits, "group_size": group}, progress=False)
    else:
        from mlx_lm.convert import convert

        run = lambda: convert(src, dst, quantize=True, q_group_size=group, q_bits=bits)
    rss0 = _proc_status("VmRSS") or _maxrss_bytes()
    reset = _reset_peak_rss()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run()
    wall = time.perf_counter() - t0
    hwm = _proc_status("VmHWM") if reset else None
    Path(out_json).write_text(json.dumps({
        "wall_s": wall,
        # Peak RSS while converting: the high-water mark reset just before the
        # call where the kernel allows it, else the process's max RSS.
        "peak_rss_bytes": hwm or _maxrss_bytes(),
        "peak_rss_method": "VmHWM reset before convert" if hwm else "getrusage ru_maxrss (whole process)",
        "process_max_rss_bytes": _maxrss_bytes(),
        "rss_before_bytes": rss0,
        "mlx_peak_bytes": mx.get_peak_memory(),
    }))


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _same_outputs(a: Path, b: Path) -> Optional[bool]:
    """Whether two converted folders hold the same tensors (names and values)."""
    ta, tb = {}, {}
    for f in Path(a).glob("*.safetensors"):
        ta.update(mx.load(str(f)))
    for f in Path(b).glob("*.safetensors"):
        tb.update(mx.load(str(f)))
    if set(ta) != set(tb):
        return False
    for k in ta:
        if ta[k].shape != tb[k].shape or not mx.array_equal(ta[k], tb[k]).item():
            return False
    return True


def bench_load(args, log) -> dict:
    from .synthetic import load_config_for_gb, write_random_checkpoint

    bits = args.bits[0] if args.bits and args.bits[0] else 4
    group = args.group_size
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mlx_moe_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    config = getattr(args, "load_config", None) or load_config_for_gb(args.load_gb)
    try:
        shutil.rmtree(src, ignore_errors=True)
        log(f"[load] writing a ~{args.load_gb:g} GB bf16 checkpoint to {src}")
        t0 = time.perf_counter()
        write_random_checkpoint(src, config, seed=args.seed, max_shard_gb=max(0.1, args.load_gb / 4))
        write_s = time.perf_counter() - t0
        files = sorted(src.glob("*.safetensors"))
        src_bytes = sum(f.stat().st_size for f in files)
        out = {"source_gb": src_bytes / GB, "source_files": len(files), "write_s": write_s, "bits": bits,
               "group_size": group, "config": {k: config.get(k) for k in ("model_type", "num_hidden_layers", "num_experts", "hidden_size", "moe_intermediate_size")},
               "impls": {}}
        dsts = {}
        for impl in ("ours", "mlx-lm"):
            dst = work / f"dst-{impl}"
            shutil.rmtree(dst, ignore_errors=True)
            dropped = drop_page_cache(files)
            res_file = work / f"{impl}.json"
            cmd = [sys.executable, "-m", "mlx_moe.bench", "_load_child", impl, str(src), str(dst), str(bits), str(group), str(res_file)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            outer = time.perf_counter() - t0
            if p.returncode != 0:
                raise RuntimeError(f"{impl} conversion failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
            r = json.loads(res_file.read_text())
            qbytes = _safetensors_bytes(dst)
            out["impls"][impl] = {
                "wall_s": r["wall_s"],
                "process_s": outer,
                "source_gbs": src_bytes / r["wall_s"] / GB,
                "peak_rss_gb": r["peak_rss_bytes"] / GB,
                "peak_rss_method": r["peak_rss_method"],
                "process_max_rss_gb": r["process_max_rss_bytes"] / GB,
                "rss_before_convert_gb": r["rss_before_bytes"] / GB,
                "mlx_peak_gb": r["mlx_peak_bytes"] / GB,
                "quantized_gb": qbytes / GB,
                "peak_rss_over_quantized": r["peak_rss_bytes"] / qbytes,
                "page_cache_dropped": dropped,
            }
            dsts[impl] = dst
            log(f"[load] {impl}: {r['wall_s']:.2f} s, {src_bytes / r['wall_s'] / GB:.2f} GB/s, peak RSS {r['peak_rss_bytes'] / GB:.2f} GB")
        o, l = out["impls"]["ours"], out["impls"]["mlx-lm"]
        o["speedup_vs_mlx_lm"] = {"wall": l["wall_s"] / o["wall_s"], "peak_rss": l["peak_rss_gb"] / o["peak_rss_gb"]}
        try:
            out["outputs_identical"] = _same_outputs(dsts["ours"], dsts["mlx-lm"])
        except Exception as e:
            out["outputs_identical"] = None
            out["outputs_compare_error"] = f"{type(e).__name__}: {e}"
        out["definitions"] = {
            "wall_s": "time of the convert() call in a fresh subprocess (imports excluded)",
            "source_gbs": "source safetensors bytes / wall_s (source dropped from the page cache first)",
            "peak_rss_gb": "the child's RSS high-water mark during convert() (Linux: VmHWM reset just before the call, so it includes the ~0.3-0.5 GB of interpreter and imports resident then, see rss_before_convert_gb; elsewhere getrusage max RSS of the whole child)",
            "mlx_peak_gb": "mx.get_peak_memory() during convert() (MLX allocations only)",
            "peak_rss_over_quantized": "peak RSS / bytes of the quantized safetensors written",
            "speedup_vs_mlx_lm": "wall: mlx-lm time / ours; peak_rss: mlx-lm RSS / ours",
        }
        return out
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def format_load(res) -> str:
    if "impls" not in res:
        return f"load: {res.get('skipped', res)}"
    lines = [f"{'impl':<8}{'wall s':>9}{'src GB/s':>10}{'peak RSS GB':>13}{'RSS/quant':>11}{'MLX peak GB':>13}{'out GB':>8}{'×mlx-lm':>9}"]
    for k, v in res["impls"].items():
        sp = v.get("speedup_vs_mlx_lm", {}).get("wall")
        lines.append(f"{k:<8}{v['wall_s']:>9.2f}{v['source_gbs']:>10.2f}{v['peak_rss_gb']:>13.2f}"
                     f"{v['peak_rss_over_quantized']:>11.2f}{v['mlx_peak_gb']:>13.3f}{v['quantized_gb']:>8.3f}"
                     + (f"{sp:>9.2f}" if sp else f"{'1':>9}"))
    lines.append(f"source {res['source_gb']:.2f} GB bf16 in {res['source_files']} files; q{res['bits']} g{res['group_size']}; "
                 f"outputs identical: {res.get('outputs_identical')}")
    return "\n".join(lines)


# ============================================================== machine, plot, CLI


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def _gpu_name() -> Optional[str]:
    if not on_gpu():
        return None
    try:
        name = mx.device_info().get("device_name")
        if name:
            return str(name)
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    return "unknown GPU"


def machine_info() -> dict:
    import mlx_lm

    from . import __version__

    commit, dirty = None, None
    try:
        here = Path(__file__).parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
        commit = r.stdout.strip() or None
        if commit:
            r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here)
            dirty = bool(r.stdout.strip())
    except OSError:
        pass
    try:
        info = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()}
    except Exception:
        info = {}
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(mx.default_device()),
        "gpu": _gpu_name(),
        "device_info": info,
        "memory_budget_gb": memory_budget() / GB,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_moe": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "backends": sorted(BACKENDS),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": _loadavg(),
    }


def _loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def plot_layer(rows: list, path, peak_gbs: Optional[float] = None):
    """GB/s vs m (log x), ours (each backend) vs mlx-lm, one panel per shape and bits."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib  (or: pip install 'mlx-moe-engine[plot]')")
    panels = sorted({(r["shape"], r["bits"]) for r in rows}, key=lambda p: (p[0], p[1]))
    if not panels:
        raise SystemExit("--plot: no layer rows to draw")
    cols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (shape, bits) in zip(axes.flat, panels):
        sel = [r for r in rows if r["shape"] == shape and r["bits"] == bits]
        for impl in sorted({(r["impl"], r["backend"]) for r in sel}, key=lambda x: x[0] != "mlx-lm"):
            pts = sorted((r["m"], r["chain"]["gbs"]) for r in sel if (r["impl"], r["backend"]) == impl)
            label = "mlx-lm" if impl[0] == "mlx-lm" else f"ours:{impl[1]}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="--" if impl[0] == "mlx-lm" else "-", label=label)
        if peak_gbs:
            ax.axhline(peak_gbs, color="gray", linestyle=":", label=f"peak {peak_gbs:g} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} q{bits}")
        ax.set_xlabel("tokens per call (m)")
        ax.set_ylabel("GB/s of expert weights")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(prog="mlx_moe.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", action="store_true", help="run the layer sweep")
    p.add_argument("--e2e", action="store_true", help="run the end-to-end model benchmark")
    p.add_argument("--load", action="store_true", help="run the convert/load benchmark")
    p.add_argument("--quick", action="store_true", help="small subset (~1 min on a 2-core CPU)")
    p.add_argument("--shapes", help=f"layer shapes, comma separated: {', '.join(SHAPES)} or E:H:I:k (default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--m", help=f"tokens per layer call (default: {','.join(map(str, DEFAULT_M))})")
    p.add_argument("--bits", help="quantization bits, comma separated; 0 = unquantized (default: 4,8)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--backends", help=f"our backends to time (default: every available one; loop only on small layers)")
    p.add_argument("--config", help="e2e configs, comma separated: names in mlx_moe.synthetic.CONFIGS or config.json paths (default: qwen3-30b-a3b on GPU, tiny on CPU)")
    p.add_argument("--prefill", help=f"prefill lengths (default: {','.join(map(str, DEFAULT_PREFILL))})")
    p.add_argument("--decode-tokens", type=int, help="greedy decode tokens (default: 100)")
    p.add_argument("--no-compiled-decode", dest="compiled_decode", action="store_false",
                   help="skip the extra 'ours+decode' row (mlx_moe.decode's compiled step)")
    p.add_argument("--load-gb", type=float, help="size of the bf16 checkpoint for --load (default: 2; --quick: 0.2)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="activations and float weights (default: bfloat16 on GPU, float32 on CPU where MLX's bf16 matmuls are far slower)")
    p.add_argument("--repeats", type=int, help="timed repeats (default: auto for the layer sweep, 3 for e2e)")
    p.add_argument("--chain", type=int, help="calls per chained timing (default: auto, 4..32)")
    p.add_argument("--row-budget-s", type=float, help="rough seconds of timing per layer row (default: 2)")
    p.add_argument("--route-draws", type=int, default=8, help="routings cycled per layer row")
    p.add_argument("--cycle-bytes", type=float, help="cycle copies of a layer's weights up to this many bytes (default: 1 GiB on GPU, 256 MiB on CPU)")
    p.add_argument("--max-call-s", type=float, help="skip layer rows predicted slower than this per call (default: 0.5 CPU, 30 GPU)")
    p.add_argument("--max-build-s", type=float, help="skip layers/models whose random weights would take longer to make (default: 90 CPU, 1800 GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--plot", help="draw the layer sweep (GB/s vs m) to this PNG (needs matplotlib)")
    p.add_argument("--peak-gbs", type=float, help="memory bandwidth roofline to draw on the plot")
    p.add_argument("--workdir", help="where --load writes checkpoints (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep --load's checkpoints")
    return p


def resolve_args(args):
    q = QUICK if args.quick else {}
    gpu = on_gpu()
    args.shapes = parse_list(args.shapes) or q.get("shapes") or DEFAULT_SHAPES
    args.m = parse_list(args.m, int) or q.get("m") or DEFAULT_M
    args.bits = parse_list(args.bits, int) or q.get("bits") or DEFAULT_BITS
    args.backends = parse_list(args.backends)
    args.config = parse_list(args.config) or q.get("config") or (["qwen3-30b-a3b"] if gpu else ["tiny"])
    args.prefill = parse_list(args.prefill, int) or q.get("prefill") or DEFAULT_PREFILL
    args.decode_tokens = args.decode_tokens or q.get("decode_tokens") or 100
    args.load_gb = args.load_gb or q.get("load_gb") or 2.0
    args.dtype = getattr(mx, args.dtype or ("bfloat16" if gpu else "float32"))
    args.row_budget_s = args.row_budget_s or q.get("row_budget_s") or 2.0
    args.e2e_repeats = args.repeats or q.get("repeats") or 3
    args.repeats = args.repeats  # layer sweep: None = automatic
    args.max_call_s = args.max_call_s or (30.0 if gpu else 0.5)
    args.max_build_s = args.max_build_s or (1800.0 if gpu else 90.0)
    if not (args.layer or args.e2e or args.load):
        args.layer = args.e2e = args.load = True
    for b in args.bits:
        if b:
            QuantSpec.parse({"bits": b, "group_size": args.group_size})
    for s in args.shapes:
        parse_shape(s)
    if args.decode_tokens < 100:
        print(f"note: decode over {args.decode_tokens} tokens (< 100)", file=sys.stderr)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_load_child"]:
        return _load_child(*argv[1:])
    if argv[:1] == ["offload"]:  # expert-budget benchmark: mlx_moe.bench offload [--budgets ...]
        from .offload.bench import main as offload_main

        return offload_main(argv[1:])
    args = resolve_args(build_parser().parse_args(argv))
    log = lambda s: print(s, flush=True)
    notes = register_backends()
    meta = machine_info()
    meta["argv"] = argv
    meta["backend_notes"] = notes
    settings = {k: (str(v).split(".")[-1] if isinstance(v, mx.Dtype) else v) for k, v in vars(args).items()}
    report = {"meta": meta, "settings": settings}
    log(f"mlx_moe.bench on {meta['device']} ({meta['gpu'] or meta['cpu']}), mlx {meta['mlx']}, mlx-lm {meta['mlx_lm']}, "
        f"backends {meta['backends']}, dtype {settings['dtype']}")
    t_all = time.perf_counter()
    if args.layer:
        report["layer"] = bench_layers(args, log)
    if args.e2e:
        report["e2e"] = bench_e2e(args, log)
    if args.load:
        try:
            report["load"] = bench_load(args, log)
        except Exception as e:
            log(f"[load] ERROR {type(e).__name__}: {e}")
            report["load"] = {"skipped": f"error: {type(e).__name__}: {e}"}
    report["total_s"] = time.perf_counter() - t_all
    meta["loadavg_end"] = _loadavg()

    print()
    if "layer" in report:
        print("== Layer: µs per call, GB/s of expert weights read, ×mlx-lm = mlx-lm time / ours ==")
        print(format_layer_rows(report["layer"]["rows"]))
        for s in report["layer"]["skipped"]:
            print(f"  skipped: {s}")
        print()
    if "e2e" in report:
        print("== End to end (random weights): tok/s, ×mlx-lm = ours / mlx-lm ==")
        print(format_e2e(report["e2e"]))
        print()
    if "load" in report:
        print("== Convert (bf16 HF checkpoint on disk -> quantized folder), fresh subprocess each ==")
        print(format_load(report["load"]))
        print()
    la = meta["loadavg_end"]
    print(f"total {report['total_s']:.1f} s" + (f"; load average {la[0]:.1f} on {meta['cpu_count']} CPUs" if la else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        plot_layer(report.get("layer", {}).get("rows", []), args.plot, args.peak_gbs)
        print(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
