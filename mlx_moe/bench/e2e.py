"""``--e2e``: whole models with random weights built from real configs, ours
against mlx-lm's own model class holding the same arrays: first forward,
prefill tok/s, greedy decode tok/s with a KV cache, peak memory."""

import gc
import time

import mlx.core as mx
import numpy as np

from .common import GB, gen_rate, median
from .sysinfo import memory_budget

DEFAULT_PREFILL = [128, 512, 2048]


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
            from ..decode import generate_step as our_generate_step

            impls["ours+decode"] = lambda p, n: (
                r.token for r in our_generate_step(p, ours, max_tokens=n, sampler=greedy, compiled=True)
            )
        except ImportError:
            pass
    return impls


def bench_e2e_config(name: str, bits: int, args, rate: float, mem: int, log) -> dict:
    from ..synthetic import get_config, mlx_lm_twin, model_bytes, random_model

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


