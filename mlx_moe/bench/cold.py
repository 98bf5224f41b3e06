"""``--cold``: what a user waits for on a fresh process: the first prefill of a
128-token prompt and the first decode step after it, ours against mlx-lm.

Both include compiling every kernel the step needs (JIT on the GPU, loading it
from MLX's on-disk kernel cache when there), which is why each is timed in its
own fresh interpreter, ``python -m mlx_moe.bench _cold_child ...``
(:func:`cold_child`), after building the random model there (not timed).

Two cases: ``warm`` runs the children with the environment as it is, after one
untimed child per impl has filled MLX's on-disk kernel cache; ``empty`` gives
every child a new empty ``MLX_PTX_CACHE_DIR`` (the CUDA backend's kernel
cache) and ``CUDA_CACHE_PATH`` (the driver's cache of PTX compiled for this
GPU), as on a fresh machine. Neither has an effect on CPU: run all the same."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from .e2e import build_pair, planned_models, prefill

# The hidden subcommand of ``python -m mlx_moe.bench`` that runs cold_child.
CHILD_COMMAND = "_cold_child"
PROMPT_TOKENS = 128
IMPLS = ("ours", "mlx-lm")
CASES = ("warm", "empty")
CACHE_ENV = "MLX_PTX_CACHE_DIR"
DRIVER_CACHE_ENV = "CUDA_CACHE_PATH"


def cold_child(impl, config, bits, group_size, dtype, seed, out_json) -> None:
    """Runs in a fresh interpreter: build the model (untimed), then time the
    first prefill and the first decode step; writes the seconds to ``out_json``."""
    from mlx_lm.models.cache import make_prompt_cache

    from ..synthetic import get_config

    args = SimpleNamespace(group_size=int(group_size), seed=int(seed), dtype=getattr(mx, dtype))
    ours, twin, build_s = build_pair(config, int(bits), args)
    model = ours if impl == "ours" else twin
    mx.eval(model.parameters())
    rng = np.random.default_rng(int(seed))
    tokens = mx.array(rng.integers(0, get_config(config)["vocab_size"], PROMPT_TOKENS).astype(np.int32))
    cache = make_prompt_cache(model)
    mx.synchronize()
    t0 = time.perf_counter()
    logits = prefill(model, tokens, cache)
    t1 = time.perf_counter()
    # The first decode step: sample the prompt's next token, run it, sample again.
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(mx.argmax(model(y[None], cache=cache)[:, -1, :], axis=-1))
    t2 = time.perf_counter()
    Path(out_json).write_text(json.dumps({
        "build_s": build_s, "prefill_s": t1 - t0, "decode_s": t2 - t1,
        "mlx_cache_dir": os.environ.get(CACHE_ENV),
    }))


def _tail(text, n=3000) -> str:
    if isinstance(text, bytes):  # TimeoutExpired keeps bytes even with text=True
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def run_child(impl: str, config: str, bits: int, args, timeout: float, env: dict, label: str) -> dict:
    """One child; its figures, or RuntimeError naming ``label``, the cause and the
    child's stderr tail."""
    work = Path(tempfile.mkdtemp(prefix="mlx_moe_cold_"))
    try:
        out = work / "out.json"
        cmd = [sys.executable, "-m", "mlx_moe.bench", CHILD_COMMAND, impl, str(config), str(bits),
               str(args.group_size), str(args.dtype).split(".")[-1], str(args.seed), str(out)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"cold child {label} timed out after {timeout:g} s; stderr tail:\n{_tail(e.stderr)}") from None
        if p.returncode != 0:
            raise RuntimeError(f"cold child {label} exited with {p.returncode}; stderr tail:\n{_tail(p.stderr)}")
        r = json.loads(out.read_text())
        r["process_s"] = time.perf_counter() - t0
        return r
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_cold_config(name: str, bits: int, args, timeout: float, log) -> dict:
    def child(impl, case, env):
        label = f"{impl} ({case}, {name} q{bits})"
        try:
            r = run_child(impl, name, bits, args, timeout, env, label)
            log(f"[cold] {label}: prefill {r['prefill_s']:.3f} s, first decode step {r['decode_s']:.3f} s")
            return r
        except RuntimeError as e:
            log(f"[cold] ERROR {e}")
            return {"error": str(e)}

    base = dict(os.environ)
    out = {"warmup": {}, "cases": {}}
    for impl in IMPLS:  # fill MLX's on-disk kernel cache for the "warm" case
        out["warmup"][impl] = child(impl, "warm-up", base)
    out["cases"]["warm"] = {impl: child(impl, "warm", base) for impl in IMPLS}
    out["cases"]["empty"] = {}
    for impl in IMPLS:
        empty = tempfile.mkdtemp(prefix="mlx_moe_kernel_cache_")
        env = {**base}
        for var in (CACHE_ENV, DRIVER_CACHE_ENV):
            env[var] = os.path.join(empty, var)
            os.mkdir(env[var])
        try:
            out["cases"]["empty"][impl] = child(impl, "empty", env)
        finally:
            shutil.rmtree(empty, ignore_errors=True)
    for case in out["cases"].values():
        o, l = case["ours"], case["mlx-lm"]
        if "error" not in o and "error" not in l:
            case["ours_minus_mlx_lm"] = {k: o[k] - l[k] for k in ("prefill_s", "decode_s")}
    return out


def bench_cold(args, log) -> dict:
    results = []
    for name, bits, tag in planned_models(args, log, "cold", results):
        # The child builds the model, then compiles and runs one prefill and step.
        timeout = args.cold_timeout or 120 + 4 * tag["build_est_s"]
        results.append({**tag, "timeout_s": timeout, **bench_cold_config(name, bits, args, timeout, log)})
    return {
        "results": results,
        "prompt_tokens": PROMPT_TOKENS,
        "definitions": {
            "prefill_s": f"first prefill in a fresh process after building the model: {PROMPT_TOKENS - 1} tokens into the KV cache, then the last with its logits (as mlx-lm's generate_step), incl. kernel compilation",
            "decode_s": "the first decode step after it: greedy token from those logits, one forward, greedy token of its logits",
            "warm": "children with the environment as it is, after one untimed child per impl (the 'warmup' entries) filled MLX's on-disk kernel cache",
            "empty": f"each child with {CACHE_ENV} and {DRIVER_CACHE_ENV} set to new empty folders (no effect on the CPU backend)",
            "ours_minus_mlx_lm": "ours seconds - mlx-lm seconds (< 0: ours starts faster)",
            "error": "the child's timeout or crash, with its stderr tail",
        },
    }


def format_cold(res) -> str:
    lines = [f"{'config':<18}{'bits':>4}  {'case':<7}{'impl':<15}{'prefill s':>11}{'1st step s':>12}{'build s':>9}"]
    for r in res["results"]:
        if "skipped" in r:
            lines.append(f"{r['config']} q{r['bits']}: skipped ({r['skipped']})")
            continue
        for case, v in r["cases"].items():
            head = f"{r['config']:<18}{r['bits']:>4}  {case:<7}"
            for impl in IMPLS:
                c = v[impl]
                if "error" in c:
                    lines.append(head + f"{impl:<15}ERROR " + c["error"].splitlines()[0])
                else:
                    lines.append(head + f"{impl:<15}{c['prefill_s']:>11.3f}{c['decode_s']:>12.4f}{c['build_s']:>9.2f}")
            d = v.get("ours_minus_mlx_lm")
            if d:
                lines.append(head + f"{'ours − mlx-lm':<15}{d['prefill_s']:>+11.3f}{d['decode_s']:>+12.4f}")
    return "\n".join(lines)
