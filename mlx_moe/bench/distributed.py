"""``python -m mlx_moe.bench distributed``: decode and prefill tok/s and per-rank peak
memory of a model split over N processes (``mlx_moe.distributed``), N = 1, 2, ...

Each N runs as N local processes joined by MLX's ring backend over 127.0.0.1. On
one machine the ranks share its cores and memory bandwidth, so this measures the
overhead of the communication (one ``all_sum`` per MoE layer and step for ``ep``,
two per layer for ``tp``) and the per-rank memory, not the speed-up of N machines
(a change in tok/s here also reflects how the ranks share the cores).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..distributed.group import write_local_hostfile

CHILD = "--child"
NOTE = ("CPU loopback: the ranks share this machine's cores and memory, so these figures measure the "
        "overhead of communication and the per-rank memory, not the speed-up of N machines "
        "(a change in tok/s here also reflects how the ranks share the cores).")


def child(spec_file):
    """One rank: load, warm up, time prefill and decode; write rank<r>.json."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from ..distributed import barrier, expert_bytes
    from ..loading import load_model

    spec = json.loads(Path(spec_file).read_text())
    n, parallel = spec["n"], spec["parallel"]
    group = mx.distributed.init(strict=n > 1, backend="ring" if n > 1 else "any")
    t0 = time.perf_counter()
    model, config = load_model(spec["model"], quantize=spec.get("quantize"),
                               group=group if n > 1 else None, parallel=parallel if n > 1 else None)
    load_s = time.perf_counter() - t0
    vocab = config.get("vocab_size", 1000)
    prompt = mx.random.randint(0, vocab, (spec["prompt_tokens"],), key=mx.random.key(0))
    runs = []
    for _ in range(spec["repeats"] + 1):  # the first is a warm-up
        barrier(group)
        t = time.perf_counter()
        first = None
        for i, (tok, _) in enumerate(generate_step(prompt, model, max_tokens=spec["tokens"])):
            if i == 0:
                first = time.perf_counter()
        end = time.perf_counter()
        runs.append({"prefill_tps": spec["prompt_tokens"] / (first - t),
                     "decode_tps": (spec["tokens"] - 1) / (end - first)})
    barrier(group)
    runs = runs[1:]
    med = lambda k: sorted(r[k] for r in runs)[len(runs) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"rank": group.rank(), "load_s": load_s, "prefill_tps": med("prefill_tps"),
           "decode_tps": med("decode_tps"), "peak_mlx_bytes": mx.get_peak_memory(),
           "max_rss_bytes": rss, "expert_bytes": expert_bytes(model)}
    Path(spec["out"], f"rank{group.rank()}.json").write_text(json.dumps(out))


def run_n(args, n, parallel, tmp):
    spec = Path(tmp) / f"spec-{n}-{parallel}.json"
    out = Path(tmp) / f"out-{n}-{parallel.replace('+', '_')}"
    out.mkdir()
    spec.write_text(json.dumps({"n": n, "parallel": parallel, "model": args.model, "tokens": args.tokens,
                                "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
                                "out": str(out)}))
    hostfile = write_local_hostfile(Path(tmp) / f"hosts-{n}.json", n)
    procs = []
    for r in range(n):
        env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
        if n > 1:
            env.update(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
        procs.append(subprocess.Popen([sys.executable, "-m", "mlx_moe.bench", "distributed", CHILD, str(spec)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    deadline = time.monotonic() + args.timeout
    errors = []
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"N={n} {parallel}: no result within {args.timeout} s")
        if p.returncode:
            errors.append(f"rank {r}: exit {p.returncode}: {err.decode(errors='replace')[-800:]}")
    if errors:
        raise RuntimeError(f"N={n} {parallel} failed:\n" + "\n".join(errors))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def build_parser():
    p = argparse.ArgumentParser(prog="mlx_moe.bench distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    p.add_argument("--ranks", default="1,2", help="comma-separated process counts (default: 1,2)")
    p.add_argument("--parallel", default="ep", help="comma-separated modes: ep, tp, ep+tp (default: ep)")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is kept")
    p.add_argument("--timeout", type=float, default=600, help="seconds one configuration may take")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD]:
        return child(argv[1])
    args = build_parser().parse_args(argv)
    from ..loading import DEFAULT_MODEL
    from .sysinfo import machine_info

    args.model = str(args.model or DEFAULT_MODEL)
    ranks = [int(x) for x in args.ranks.split(",")]
    modes = [m.strip() for m in args.parallel.split(",")]
    print(NOTE)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        cores = os.cpu_count() or 1
        print(f"load average {load:.2f} on {cores} cores" + (" — busy machine: figures are noisy" if load > cores / 2 else ""))
    print(f"model {args.model}; prompt {args.prompt_tokens} tokens, decode {args.tokens} tokens, "
          f"median of {args.repeats}")
    print(f"{'N':>3} {'mode':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs N=1':>14} "
          f"{'expert MB/rank':>15} {'peak MLX MB/rank':>17} {'max RSS MB/rank':>16}")
    rows, base = [], None
    with tempfile.TemporaryDirectory(prefix="mlx_moe-bench-dist-") as tmp:
        for n in ranks:
            for mode in (["none"] if n == 1 else modes):
                res = run_n(args, n, mode, tmp)
                r0 = res[0]
                if n == 1:
                    base = r0["decode_tps"]
                rel = r0["decode_tps"] / base if base else float("nan")
                mb = lambda k: "/".join(f"{r[k] / 1e6:.1f}" for r in res)
                print(f"{n:>3} {mode:>6} {r0['prefill_tps']:>14.1f} {r0['decode_tps']:>13.1f} {rel:>14.2f} "
                      f"{mb('expert_bytes'):>15} {mb('peak_mlx_bytes'):>17} {mb('max_rss_bytes'):>16}")
                rows.append({"n": n, "parallel": mode, "ranks": res, "decode_vs_n1": rel})
    if args.json:
        try:
            info = machine_info()
        except Exception:  # noqa: BLE001 - the figures matter more than the machine description
            info = {}
        Path(args.json).write_text(json.dumps({"note": NOTE, "model": args.model, "tokens": args.tokens,
                                               "prompt_tokens": args.prompt_tokens, "rows": rows,
                                               "system": info}, indent=1))


if __name__ == "__main__":
    main()
