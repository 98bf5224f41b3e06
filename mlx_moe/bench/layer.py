"""``--layer``: the routed-expert layer, our ``MoEExperts`` (every backend
available here) against mlx-lm's ``SwitchGLU`` + the weighted top-k sum of its
MoE blocks, on the same quantized arrays, inputs and routing, for real models'
expert shapes and m tokens per call."""

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..experts import BACKENDS, MoEExperts
from ..testing.reference import rel_err
from .common import GB, UsageError, gen_rate, median, on_gpu, speedup
from .sysinfo import memory_budget


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
# The loop backend is the per-expert oracle: only run it on layers this small.
LOOP_MAX_BYTES = 64 << 20
DEFAULT_SHAPES = ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3", "gpt-oss-20b"]
DEFAULT_M = [1, 4, 32, 512, 2048]
DEFAULT_BITS = [4, 8]


def parse_shape(token: str) -> LayerShape:
    """A name from ``SHAPES`` or ``E:H:I:k`` (optionally ``:activation``)."""
    if token in SHAPES:
        return SHAPES[token]
    parts = token.split(":")
    if len(parts) in (4, 5) and all(p.isdigit() for p in parts[:4]):
        E, H, I, k = map(int, parts[:4])
        act = parts[4] if len(parts) == 5 else "silu"
        return LayerShape(token, E, H, I, k, act, act == "swiglu_oai")
    raise UsageError(f"unknown shape '{token}': use one of {sorted(SHAPES)} or E:H:I:k")


def layer_metrics(seconds: float, m: int, k: int, H: int, I: int, bytes_read: float) -> dict:
    """µs per call, GB/s of expert weight bytes read, TFLOP/s (2·m·k·3·H·I) for one timing."""
    return {
        "us": seconds * 1e6,
        "gbs": bytes_read / seconds / GB,
        "tflops": 2 * m * k * 3 * H * I / seconds / 1e12,
    }


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
    from ..synthetic import fill_random

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
                    return layer(x, w, ids, validate=False)  # no host sync in the timing

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
                    row["max_rel_err_vs_mlx_lm"] = rel_err(r["output"], ref_res["output"], kind="max")
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


