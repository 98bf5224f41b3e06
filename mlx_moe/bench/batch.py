"""``--batch``: batched greedy decode, B sequences at once through mlx-lm's
``mlx_lm.generate.batch_generate`` (what a server runs), on our model and on
mlx-lm's twin holding the same arrays.

Each sequence has its own prompt (lengths cycled from ``--batch-prompt``, so
the batch may be ragged) and generates ``--batch-tokens`` tokens. The figure is
the aggregate generated tok/s: tokens we count in the returned ids over the
wall time of the whole call (prefill included: that is what a caller waits
for), median of interleaved repeats after one untimed warm-up per model.
mlx-lm's own ``generation_tps`` (decode steps only) is kept beside it."""

import time
import traceback
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from .common import fmt_range, interleaved_order, ratio_stats, release_memory, sample_stats
from .e2e import build_pair, planned_models

DEFAULT_PROMPT = [64]
DEFAULT_NEW_TOKENS = 64
DEFAULT_REPEATS = 3

# batch_generate only asks its tokenizer for stop tokens and for text; with no
# stop token every sequence runs to max_tokens, so B * new tokens are generated.
_NO_STOP_TOKENIZER = SimpleNamespace(eos_token_ids=[], decode=lambda ids: "")


def batch_prompts(B: int, lengths, vocab: int, seed: int) -> list:
    """B random prompts (lists of ids), the i-th ``lengths[i % len(lengths)]`` long."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, lengths[i % len(lengths)]).tolist() for i in range(B)]


def _batch_once(model, prompts, new_tokens: int) -> dict:
    from mlx_lm.generate import batch_generate

    mx.synchronize()
    t0 = time.perf_counter()
    r = batch_generate(model, _NO_STOP_TOKENIZER, prompts, max_tokens=new_tokens, return_token_ids=True)
    wall = time.perf_counter() - t0
    generated = sum(len(ids) for ids in r.token_ids)
    return {"wall_s": wall, "generated": generated, "tok_s": generated / wall,
            "generation_tps": r.stats.generation_tps, "token_ids": r.token_ids}


def _error(e: BaseException) -> str:
    """The exception and where it was raised, verbatim (a failure to run is a result)."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno} in {where.name})"


def bench_batch_size(models: dict, B: int, args, vocab: int) -> dict:
    """Every model at batch size B: warm-up, then interleaved timed repeats."""
    prompts = batch_prompts(B, args.batch_prompt, vocab, args.seed + B)
    out = {"B": B, "prompt_tokens": [len(p) for p in prompts], "new_tokens": args.batch_tokens, "impls": {}}
    live = []
    for k, model in models.items():  # warm-up; an impl that fails is reported, not timed
        try:
            _batch_once(model, prompts, args.batch_tokens)
            live.append(k)
        except Exception as e:
            out["impls"][k] = {"error": _error(e)}
        release_memory()
    runs = {k: [] for k in live}
    for i in range(args.batch_repeats):
        for k in interleaved_order(live, i):
            release_memory()
            runs[k].append(_batch_once(models[k], prompts, args.batch_tokens))
    release_memory()
    for k in live:
        out["impls"][k] = {
            "tok_s": sample_stats([r["tok_s"] for r in runs[k]]),
            "wall_s": [r["wall_s"] for r in runs[k]],
            "generated_tokens": runs[k][-1]["generated"],
            "mlx_lm_generation_tps": sample_stats([r["generation_tps"] for r in runs[k]]),
        }
    if set(live) == {"ours", "mlx-lm"}:  # repeats >= 1 (the CLI refuses fewer)
        out["tokens_agree"] = runs["ours"][-1]["token_ids"] == runs["mlx-lm"][-1]["token_ids"]
        out["impls"]["ours"]["ratio_vs_mlx_lm"] = ratio_stats(
            [r["tok_s"] for r in runs["ours"]], [r["tok_s"] for r in runs["mlx-lm"]])
    return out


def bench_batch(args, log) -> dict:
    results = []
    for name, bits, tag in planned_models(args, log, "batch", results):
        log(f"[batch] {name} q{bits}: building ({tag['weights_gb']:.2f} GB, est {tag['build_est_s']:.0f} s)")
        try:
            ours, twin, build_s = build_pair(name, bits, args)
        except Exception as e:
            log(f"[batch] {name} q{bits}: ERROR {_error(e)}")
            results.append({**tag, "skipped": f"error: {_error(e)}"})
            continue
        res = {**tag, "build_s": build_s, "sizes": []}
        for B in args.batch:
            r = bench_batch_size({"ours": ours, "mlx-lm": twin}, B, args, tag["vocab_size"])
            res["sizes"].append(r)
            log(f"[batch] {name} q{bits} B={B}: " + ", ".join(
                f"{k} {fmt_range(v['tok_s'])} tok/s" if "tok_s" in v else f"{k} ERROR {v['error']}"
                for k, v in r["impls"].items()))
        results.append(res)
        del ours, twin
        release_memory()
    return {
        "results": results,
        "definitions": {
            "tok_s": "generated tokens (counted in batch_generate's returned ids: B * new_tokens, no stop token) / wall time of the batch_generate call incl. prefill of the B prompts; median, min, max, spread, samples over interleaved repeats after one warm-up",
            "mlx_lm_generation_tps": "batch_generate's own stats.generation_tps (decode steps only), same runs",
            "ratio_vs_mlx_lm": "median: ratio of median tok/s (ours / mlx-lm); round_min/round_max: within-round ratios",
            "error": "the exception batch_generate raised for that model (then it is not timed)",
            "tokens_agree": "the last run's token ids of ours equal mlx-lm's",
        },
    }


def format_batch(res) -> str:
    lines = [f"{'config':<18}{'bits':>4}{'B':>4}  {'prompt':<10}{'new':>5}  {'impl':<8}{'gen tok/s med (min–max)':>26}"
             f"{'spread':>8}{'×mlx-lm (rounds)':>22}"]
    for r in res["results"]:
        if "skipped" in r:
            lines.append(f"{r['config']} q{r['bits']}: skipped ({r['skipped']})")
            continue
        for s in r["sizes"]:
            pl = s["prompt_tokens"]
            prompt = f"{min(pl)}" if min(pl) == max(pl) else f"{min(pl)}-{max(pl)}"
            for k, v in s["impls"].items():
                head = f"{r['config']:<18}{r['bits']:>4}{s['B']:>4}  {prompt:<10}{s['new_tokens']:>5}  {k:<8}"
                if "error" in v:
                    lines.append(head + f"ERROR {v['error']}")
                    continue
                rs = v.get("ratio_vs_mlx_lm")
                ratio = f"{rs['median']:.2f} ({rs['round_min']:.2f}–{rs['round_max']:.2f})" if rs else ""
                lines.append((head + f"{fmt_range(v['tok_s']):>26}{v['tok_s']['spread']:>8.1%}{ratio:>22}").rstrip())
    return "\n".join(lines)
