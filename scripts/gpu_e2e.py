"""Decode/prefill profile on a random Qwen3-30B-A3B-shaped q4 model: ours vs mlx-lm.

Usage (H100 through the device tool): python scripts/gpu_e2e.py [--layers N] [--config NAME]
Prints one line per measurement; writes JSON to $OUT/e2e.json when OUT is set.
A record of one run: docs/runs/2026-11-25-h100/gpu_e2e_profile.log.
"""

import argparse
import json
import os
import time

import mlx.core as mx

from mlx_moe.bench.common import median
from mlx_moe.decode import generate_step as our_step
from mlx_moe.loading import set_backend
from mlx_moe.synthetic import get_config, mlx_lm_twin, random_model


def decode_tps(step_fn, n=100):
    prompt = mx.array(list(range(1, 17)))
    t0 = time.perf_counter()
    it = step_fn(prompt, n)
    next(it)
    t1 = time.perf_counter()
    count = 1
    for _ in it:
        count += 1
    t2 = time.perf_counter()
    return (count - 1) / (t2 - t1), t1 - t0


def prefill_tps(model, T, reps=3):
    from mlx_lm.models.cache import make_prompt_cache

    x = mx.random.randint(0, 1000, (1, T))
    times = []
    for _ in range(reps + 1):
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        mx.eval(model(x, cache=cache))
        times.append(time.perf_counter() - t0)
    return T / median(times[1:]), times[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    args = p.parse_args()
    cfg = get_config(args.config)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    q = {"bits": 4, "group_size": 64}
    t0 = time.perf_counter()
    ours, qcfg = random_model(cfg, q, seed=0)
    twin = mlx_lm_twin(ours, qcfg, q)
    print(f"built in {time.perf_counter() - t0:.1f}s, device {mx.default_device()}", flush=True)
    res = {}
    from mlx_lm.generate import generate_step as lm_step

    tps, first = decode_tps(lambda pr, n: (t for t, _ in lm_step(pr, twin, max_tokens=n)), args.tokens)
    res["mlx_lm_decode"] = (tps, first)
    print(f"mlx-lm decode {tps:.1f} tok/s (first {first:.1f}s)", flush=True)
    for backend in ["gather", "auto"]:
        set_backend(ours, backend)
        for compiled in [False, True]:
            tps, first = decode_tps(lambda pr, n: (r.token for r in our_step(pr, ours, n, compiled=compiled)), args.tokens)
            res[f"ours_{backend}_compiled{int(compiled)}"] = (tps, first)
            print(f"ours decode backend={backend} compiled={compiled}: {tps:.1f} tok/s (first {first:.1f}s)", flush=True)
    for T in args.prefill:
        tps, first = prefill_tps(twin, T)
        res[f"mlx_lm_prefill_{T}"] = (tps, first)
        print(f"mlx-lm prefill T={T}: {tps:.1f} tok/s (first {first:.1f}s)", flush=True)
        set_backend(ours, "auto")
        tps, first = prefill_tps(ours, T)
        res[f"ours_prefill_{T}"] = (tps, first)
        print(f"ours prefill T={T}: {tps:.1f} tok/s (first {first:.1f}s)", flush=True)
    print(f"peak memory {mx.get_peak_memory() / 1e9:.1f} GB")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "e2e.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
