"""``--e2e``: whole models with random weights built from real configs, ours
against mlx-lm's own model class holding the same arrays: first forward,
prefill tok/s, greedy decode tok/s with a KV cache, peak memory.

Decode is host-bound on a GPU and drifts over a run (tok/s of every
implementation alike can fall by a third over a few repeats), so its figure is
the median of interleaved repeats (ours, mlx-lm, then mlx-lm, ours, ...),
reported with min, max, spread, every sample and each round's timestamp; the
ratio to mlx-lm comes with the range of the per-round ratios."""

import time

import mlx.core as mx
import numpy as np

from .common import GB, fmt_range, gen_rate, interleaved_order, median, ratio_stats, release_memory, sample_stats
from .sysinfo import memory_budget

DEFAULT_PREFILL = [128, 512, 2048]
DEFAULT_DECODE_TOKENS = 128
DEFAULT_DECODE_REPEATS = 5


def prefill(model, tokens, cache, step=2048) -> mx.array:
    """Process ``tokens`` as mlx-lm's generate_step does: all but the last token
    with only the KV cache evaluated, then the last; returns its evaluated logits."""
    rest = tokens
    while rest.size > 1:
        n = min(step, rest.size - 1)
        model(rest[None, :n], cache=cache)
        mx.eval([c.state for c in cache])
        rest = rest[n:]
    logits = model(rest[None], cache=cache)
    mx.eval(logits)
    return logits


def _prefill_once(model, tokens, step=2048) -> float:
    """Seconds of :func:`prefill` on a fresh KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.synchronize()
    t0 = time.perf_counter()
    prefill(model, tokens, cache, step)
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


def plan_model(name: str, bits: int, args, rate: float, mem: int) -> dict:
    """What building config ``name`` at ``bits`` would take: a tag for the
    report (config, bits, model type, weights GB, parameter count, estimated
    build seconds) with ``skipped`` set when it would not fit in memory or
    take longer than ``--max-build-s``."""
    from ..synthetic import get_config, model_bytes

    config = get_config(name)
    quantize = {"bits": bits, "group_size": args.group_size} if bits else None
    wbytes = model_bytes(config, quantize, args.dtype)
    params = model_bytes(config, None, mx.float32) / 4  # float parameter count
    tag = {"config": name, "bits": bits, "model_type": config["model_type"], "vocab_size": config["vocab_size"],
           "weights_gb": wbytes / GB, "params": params, "build_est_s": params / rate}
    need = wbytes * 1.15 + 2 * GB
    if need > 0.9 * mem:
        tag["skipped"] = f"memory: needs ~{need / GB:.1f} GB, {mem / GB:.1f} GB here"
    elif tag["build_est_s"] > args.max_build_s:
        tag["skipped"] = (f"time: building would take ~{tag['build_est_s']:.0f} s "
                          f"(> --max-build-s {args.max_build_s:g})")
    return tag


def planned_models(args, log, label: str, results: list):
    """``(name, bits, tag)`` for each ``--config`` x ``--bits`` that fits here
    (``plan_model``); the others are logged and appended to ``results`` as skipped."""
    mem, rate = memory_budget(), gen_rate(args.dtype)
    for name in args.config:
        for bits in args.bits:
            tag = plan_model(name, bits, args, rate, mem)
            if "skipped" in tag:
                log(f"[{label}] skipped {name} q{bits}: {tag['skipped']}")
                results.append(tag)
                continue
            yield name, bits, tag


def build_pair(name: str, bits: int, args):
    """Our random model for config ``name`` and mlx-lm's twin holding the same
    arrays; returns ``(ours, twin, build seconds)``."""
    from ..synthetic import mlx_lm_twin, random_model

    quantize = {"bits": bits, "group_size": args.group_size} if bits else None
    t0 = time.perf_counter()
    ours, qconfig = random_model(name, quantize, seed=args.seed, dtype=args.dtype)
    build_s = time.perf_counter() - t0
    return ours, mlx_lm_twin(ours, qconfig, quantize), build_s


def interleaved_decode(decoders: dict, prompt, n: int, repeats: int) -> dict:
    """Greedy-decode ``n`` tokens after ``prompt`` with every decoder, ``repeats``
    rounds in :func:`interleaved_order`, after one untimed warm-up each.

    Returns per decoder its tok/s samples (round order), peak GB and last tokens,
    and the rounds: their order, start time (seconds since the first round
    began, and Unix time) and tok/s, so drift over the run stays visible."""
    names = list(decoders)
    for k in names:  # warm-up: kernel compilation, compiled graphs, allocator
        _decode_once(decoders[k], prompt, n)
        release_memory()
    tps = {k: [] for k in names}
    peaks, toks, rounds = {k: 0.0 for k in names}, {}, []
    t_start = time.perf_counter()
    for i in range(repeats):
        order = interleaved_order(names, i)
        rnd = {"round": i, "t_s": time.perf_counter() - t_start, "unix_time": time.time(), "order": order, "tok_s": {}}
        for k in order:
            release_memory()
            mx.reset_peak_memory()
            toks[k], rnd["tok_s"][k] = _decode_once(decoders[k], prompt, n)
            tps[k].append(rnd["tok_s"][k])
            peaks[k] = max(peaks[k], _peak_gb())
        rounds.append(rnd)
    release_memory()
    return {"tok_s": tps, "peak_gb": peaks, "tokens": toks, "rounds": rounds}


def bench_e2e_config(name: str, bits: int, args, rate: float, mem: int, log) -> dict:
    tag = plan_model(name, bits, args, rate, mem)
    if "skipped" in tag:
        return tag
    log(f"[e2e] {name} q{bits}: building {tag['params'] / 1e9:.2f}B params ({tag['weights_gb']:.2f} GB), "
        f"est {tag['build_est_s']:.0f} s")
    ours, twin, build_s = build_pair(name, bits, args)
    models = {"ours": ours, "mlx-lm": twin}
    vocab = tag["vocab_size"]
    rng = np.random.default_rng(args.seed)
    lengths = sorted(args.prefill)
    prompts = {T: mx.array(rng.integers(0, vocab, T).astype(np.int32)) for T in lengths}
    first_prompt = mx.array(rng.integers(0, vocab, 128).astype(np.int32))
    out = {**tag, "build_s": build_s, "dtype": str(args.dtype).split(".")[-1], "group_size": args.group_size,
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
    dec = interleaved_decode(decoders, dprompt, n, args.decode_repeats)
    tps = dec["tok_s"]
    for k in decoders:
        out["impls"].setdefault(k, {"prefill": {}, "decode": {}})
        toks = dec["tokens"][k]
        agree = next((i for i, (a, b) in enumerate(zip(toks, dec["tokens"]["mlx-lm"])) if a != b), len(toks))
        out["impls"][k]["decode"] = {
            "tok_s": median(tps[k]), "stats": sample_stats(tps[k]), "tokens": n, "prompt_tokens": int(dprompt.size),
            "peak_gb": dec["peak_gb"][k], "repeats": len(tps[k]), "tokens_agree_with_mlx_lm": agree,
        }
        if k != "mlx-lm":
            out["impls"][k]["decode"]["ratio_vs_mlx_lm"] = ratio_stats(tps[k], tps["mlx-lm"])
    out["decode_rounds"] = dec["rounds"]
    log(f"[e2e] {name} q{bits} decode, median of {args.decode_repeats}: "
        + ", ".join(f"{k} {fmt_range(sample_stats(tps[k]))} tok/s" for k in decoders))
    ref = out["impls"]["mlx-lm"]
    for k, v in out["impls"].items():
        if k == "mlx-lm":
            continue
        v["speedup_vs_mlx_lm"] = {
            "decode": v["decode"]["tok_s"] / ref["decode"]["tok_s"] if v.get("decode") else None,
            **({f"prefill_{T}": v["prefill"][T]["tok_s"] / ref["prefill"][T]["tok_s"] for T in v["prefill"]}),
            **({"first_forward": ref["first_forward_s"] / v["first_forward_s"]} if "first_forward_s" in v else {}),
        }
    del models, ours, twin, decoders
    release_memory()
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
            "decode": "greedy decode of `tokens` tokens with KV cache through mlx_lm.generate.generate_step for both (ours+decode: mlx_moe.decode.generate_step, compiled); tok/s over the tokens after the first. One untimed warm-up per impl, then `repeats` interleaved rounds (order reversed every other round, see decode_rounds), gc.collect() and mx.clear_cache() before every run; tok_s is the median",
            "decode.stats": "median, min, max, spread = (max - min) / median, and every sample (round order) of decode tok/s",
            "decode.ratio_vs_mlx_lm": "median: ratio of the median tok/s (ours / mlx-lm, = speedup_vs_mlx_lm.decode); round_min/round_max/rounds: ratios within each round",
            "decode_rounds": "per round: order run, start (t_s: seconds since the first timed round; unix_time) and tok/s per impl",
            "peak_gb": "mx.get_peak_memory after mx.reset_peak_memory, max over repeats; includes the (shared) weights",
            "speedup_vs_mlx_lm": "ours tok/s / mlx-lm tok/s (first_forward: mlx-lm time / ours)",
        },
    }


def _decode_cells(d: dict) -> str:
    """The decode columns of a row: ``median (min–max)`` tok/s and the spread."""
    if not d:
        return f"{'-':>28}{'-':>8}"
    st = d.get("stats") or sample_stats([d["tok_s"]])
    return f"{fmt_range(st):>28}{st['spread']:>8.1%}"


def format_rounds(r: dict) -> str:
    """One line per decode round: when it began and each impl's tok/s, in run order."""
    lines = [f"decode rounds, {r['config']} q{r['bits']} (seconds since the first round: tok/s in run order)"]
    for rnd in r.get("decode_rounds", []):
        lines.append(f"  {rnd['t_s']:>7.1f} s  " + ", ".join(f"{k} {rnd['tok_s'][k]:.1f}" for k in rnd["order"]))
    return "\n".join(lines)


def format_e2e(res) -> str:
    done = [r for r in res["results"] if "skipped" not in r]
    Ts = sorted({int(T) for r in done for v in r["impls"].values() for T in v["prefill"]})
    cw = max([18] + [len(r["config"]) + 1 for r in done])
    lines = []
    if done:
        lines.append(f"{'config':<{cw}}{'bits':>4}  {'impl':<13}{'1st fwd s':>10}"
                     + "".join(f"{'pf' + str(T) + ' tok/s':>14}" for T in Ts)
                     + f"{'decode tok/s med (min–max)':>28}{'spread':>8}{'peak GB':>9}")
    for r in done:
        for k, v in r["impls"].items():
            ff = v.get("first_forward_s")
            peaks = [p["peak_gb"] for p in v["prefill"].values()] + ([v["decode"]["peak_gb"]] if v["decode"] else [])
            lines.append(
                f"{r['config']:<{cw}}{r['bits']:>4}  {k:<13}" + (f"{ff:>10.3f}" if ff is not None else f"{'-':>10}")
                + "".join(f"{v['prefill'][str(T)]['tok_s']:>14.1f}" if str(T) in v["prefill"] else f"{'-':>14}" for T in Ts)
                + _decode_cells(v["decode"]) + f"{max(peaks, default=0):>9.3f}"
            )
            sp = v.get("speedup_vs_mlx_lm")
            if sp:
                ratio = (v.get("decode") or {}).get("ratio_vs_mlx_lm")
                dcell = (f"{ratio['median']:.2f} ({ratio['round_min']:.2f}–{ratio['round_max']:.2f})" if ratio
                         else f"{sp['decode']:.2f}" if sp.get("decode") else "-")
                lines.append(
                    f"{'':<{cw + 4}}  {'  ×mlx-lm':<13}" + (f"{sp['first_forward']:>10.2f}" if "first_forward" in sp else f"{'-':>10}")
                    + "".join(f"{sp['prefill_' + str(T)]:>14.2f}" if f"prefill_{T}" in sp else f"{'-':>14}" for T in Ts)
                    + f"{dcell:>28}"
                )
    for r in done:
        if r.get("decode_rounds"):
            lines.append(format_rounds(r))
    for r in res["results"]:
        if "skipped" in r:
            lines.append(f"{r['config']} q{r['bits']}: skipped ({r['skipped']})")
    return "\n".join(lines)
