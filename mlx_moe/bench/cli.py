"""``mlx_moe.bench``: mlx-moe against mlx-lm, in the same process, on the same weights.

Three sections (default: all three), and two more on request:

``--layer``  the routed-expert layer: our ``MoEExperts`` (every backend available
             here) vs mlx-lm's ``SwitchGLU`` + the weighted top-k sum of its MoE
             blocks, same quantized arrays, same inputs and routing, for real
             models' expert shapes and m tokens per call.
``--e2e``    whole models with random weights built from real configs: ours vs
             mlx-lm's own model class holding the same arrays: first forward,
             prefill tok/s, greedy decode tok/s with a KV cache, peak memory.
             Decode runs both through mlx_lm.generate.generate_step: one
             warm-up each, then --decode-repeats interleaved rounds (ours,
             mlx-lm; next round mlx-lm, ours; ...) of --decode-tokens tokens;
             shown as median (min–max) and spread = (max - min) / median, the
             ratio as ratio of medians (min–max of the per-round ratios), and
             every round's tok/s with its start time (drift).
``--load``   converting a random bf16 Hugging Face checkpoint on disk to a
             quantized folder: ``mlx_moe.convert.convert`` vs
             ``mlx_lm.convert.convert``, each in a fresh subprocess (clean RSS)
             with the source dropped from the page cache first.
``--batch B,...``  batched greedy decode through mlx_lm.generate.batch_generate
             on both models: B prompts (--batch-prompt tokens, lengths cycled
             when several) x --batch-tokens new tokens; aggregate generated
             tok/s (B x new tokens / wall time of the call), median (min–max)
             of --batch-repeats interleaved repeats. Off by default.
``--cold``   first prefill of a 128-token prompt and the first decode step, in
             a fresh child process per impl, with MLX's on-disk kernel cache
             warm and with empty MLX_PTX_CACHE_DIR and CUDA_CACHE_PATH. Off by default.

``offload``  (as the first argument) decode tok/s at expert budgets vs the resident
             model and plain mmap paging (``mlx_moe/bench/offload.py``; its own --help).

Ratios are always mlx-lm's time / ours (> 1: ours is faster). ``--quick`` runs
a small subset (~1 minute on a 2-core CPU). ``--json FILE`` keeps every figure
with the machine and versions; ``--plot FILE.png`` draws the layer sweep.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

from ..cli import UsageError as CliUsageError
from ..cli import add_verbose, positive_int
from ..cli import run as run_cli
from ..config_checks import check_config
from ..quantization import QuantSpec
from ..synthetic import get_config
from . import plot
from .common import UsageError, on_gpu, parse_list
from . import batch as batch_bench
from . import cold as cold_bench
from .e2e import DEFAULT_DECODE_REPEATS, DEFAULT_DECODE_TOKENS, DEFAULT_PREFILL, bench_e2e, format_e2e
from .layer import DEFAULT_BITS, DEFAULT_M, DEFAULT_SHAPES, SHAPES, bench_layers, format_layer_rows, parse_shape
from .load import CHILD_COMMAND, bench_load, format_load, load_child
from .sysinfo import loadavg, machine_info

# --quick: ~1 minute on a 2-core CPU.
QUICK = {
    "shapes": ["tiny"],
    "m": [1, 4, 32],
    "bits": [4],
    "config": ["tiny"],
    "prefill": [128, 512],
    "load_gb": 0.2,
    "row_budget_s": 0.6,
    "repeats": 2,
}


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
    p.add_argument("--group-size", type=positive_int, default=64)
    p.add_argument("--backends", help="our backends to time (default: every available one; loop only on small layers)")
    p.add_argument("--config", help="e2e configs, comma separated: names in mlx_moe.synthetic.CONFIGS or config.json paths (default: qwen3-30b-a3b on GPU, tiny on CPU)")
    p.add_argument("--prefill", help=f"prefill lengths (default: {','.join(map(str, DEFAULT_PREFILL))})")
    p.add_argument("--decode-tokens", type=int, help=f"greedy decode tokens per run (default: {DEFAULT_DECODE_TOKENS})")
    p.add_argument("--decode-repeats", type=int,
                   help=f"timed interleaved decode rounds per config (default: {DEFAULT_DECODE_REPEATS}; the figure is their median)")
    p.add_argument("--no-compiled-decode", dest="compiled_decode", action="store_false",
                   help="skip the extra 'ours+decode' row (mlx_moe.decode's compiled step)")
    p.add_argument("--batch", help="batch sizes for the batched decode section, comma separated (e.g. 4,8; default: off)")
    p.add_argument("--batch-prompt", help=f"prompt tokens per sequence; several are cycled over the batch (default: {','.join(map(str, batch_bench.DEFAULT_PROMPT))})")
    p.add_argument("--batch-tokens", type=int, help=f"new tokens per sequence (default: {batch_bench.DEFAULT_NEW_TOKENS})")
    p.add_argument("--batch-repeats", type=int, help=f"timed interleaved repeats per batch size (default: {batch_bench.DEFAULT_REPEATS})")
    p.add_argument("--cold", action="store_true", help="run the cold-start section (fresh child processes)")
    p.add_argument("--cold-timeout", type=float, help="seconds each cold child may take (default: 120 + 4x the estimated model build time)")
    p.add_argument("--load-gb", type=float, help="size of the bf16 checkpoint for --load (default: 2; --quick: 0.2)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="activations and float weights (default: bfloat16 on GPU, float32 on CPU where MLX's bf16 matmuls are far slower)")
    p.add_argument("--repeats", type=int, help="timed repeats (default: auto for the layer sweep, 3 for e2e prefill; decode: --decode-repeats)")
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
    add_verbose(p)
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
    args.decode_tokens = DEFAULT_DECODE_TOKENS if args.decode_tokens is None else args.decode_tokens
    args.decode_repeats = DEFAULT_DECODE_REPEATS if args.decode_repeats is None else args.decode_repeats
    args.batch = parse_list(args.batch, int) or []
    args.batch_prompt = parse_list(args.batch_prompt, int) or batch_bench.DEFAULT_PROMPT
    args.batch_tokens = batch_bench.DEFAULT_NEW_TOKENS if args.batch_tokens is None else args.batch_tokens
    args.batch_repeats = batch_bench.DEFAULT_REPEATS if args.batch_repeats is None else args.batch_repeats
    for flag, values in (("--decode-tokens", [args.decode_tokens]), ("--decode-repeats", [args.decode_repeats]),
                         ("--batch", args.batch), ("--batch-prompt", args.batch_prompt),
                         ("--batch-tokens", [args.batch_tokens]), ("--batch-repeats", [args.batch_repeats])):
        if min(values, default=1) < 1:
            raise UsageError(f"{flag} must be at least 1, got {min(values)}")
    args.load_gb = args.load_gb or q.get("load_gb") or 2.0
    args.dtype = getattr(mx, args.dtype or ("bfloat16" if gpu else "float32"))
    args.row_budget_s = args.row_budget_s or q.get("row_budget_s") or 2.0
    args.e2e_repeats = args.repeats or q.get("repeats") or 3  # args.repeats stays None: automatic in the layer sweep
    args.max_call_s = args.max_call_s or (30.0 if gpu else 0.5)
    args.max_build_s = args.max_build_s or (1800.0 if gpu else 90.0)
    if not (args.layer or args.e2e or args.load or args.batch or args.cold):
        args.layer = args.e2e = args.load = True
    for b in args.bits:
        if b:
            try:
                QuantSpec.parse({"bits": b, "group_size": args.group_size})
            except ValueError as e:
                raise UsageError(f"--bits/--group-size: {e}") from None
    for s in args.shapes:
        parse_shape(s)
    if args.e2e or args.batch or args.cold:
        for c in args.config:  # a wrong name or path fails now, not as a skipped row
            try:
                check_config(get_config(c), c)
            except ValueError as e:
                raise UsageError(f"--config: {e}") from None
    if args.e2e and (args.decode_tokens < DEFAULT_DECODE_TOKENS or args.decode_repeats < DEFAULT_DECODE_REPEATS):
        print(f"note: decode over {args.decode_repeats} x {args.decode_tokens} tokens (< {DEFAULT_DECODE_REPEATS} x "
              f"{DEFAULT_DECODE_TOKENS}): too few to tell a small speed-up from drift", file=sys.stderr)
    return args


def run(argv) -> dict:
    """Run the benchmarks ``argv`` asks for, print their tables; returns the report."""
    args = build_parser().parse_args(argv)
    resolve_args(args)
    if args.plot:
        if not args.layer:
            raise UsageError("--plot draws the layer sweep: add --layer (or leave out --e2e/--load)")
        plot.pyplot()  # fail now, not after the benchmarks
    log = lambda s: print(s, flush=True)
    meta = machine_info()
    meta["argv"] = argv
    settings = {k: (str(v).split(".")[-1] if isinstance(v, mx.Dtype) else v) for k, v in vars(args).items()}
    report = {"meta": meta, "settings": settings}
    log(f"mlx_moe.bench on {meta['device']} ({meta['gpu'] or meta['cpu']}), mlx {meta['mlx']}, mlx-lm {meta['mlx_lm']}, "
        f"backends {meta['backends']}, dtype {settings['dtype']}")
    t_all = time.perf_counter()
    if args.layer:
        report["layer"] = bench_layers(args, log)
    if args.e2e:
        report["e2e"] = bench_e2e(args, log)
    if args.batch:
        report["batch"] = batch_bench.bench_batch(args, log)
    if args.cold:
        report["cold"] = cold_bench.bench_cold(args, log)
    if args.load:
        try:
            report["load"] = bench_load(args, log)
        except Exception as e:
            log(f"[load] ERROR {type(e).__name__}: {e}")
            report["load"] = {"skipped": f"error: {type(e).__name__}: {e}"}
    report["total_s"] = time.perf_counter() - t_all
    meta["loadavg_end"] = loadavg()

    print()
    if "layer" in report:
        print("== Layer: µs per call, GB/s of expert weights read, ×mlx-lm = mlx-lm time / ours ==")
        print(format_layer_rows(report["layer"]["rows"]))
        for s in report["layer"]["skipped"]:
            print(f"  skipped: {s}")
        print()
    if "e2e" in report:
        print(f"== End to end (random weights): tok/s, ×mlx-lm = ours / mlx-lm; decode: median (min–max) of "
              f"{args.decode_repeats} interleaved runs of {args.decode_tokens} tokens ==")
        print(format_e2e(report["e2e"]))
        print()
    if "batch" in report:
        print("== Batched decode (mlx_lm.generate.batch_generate): generated tok/s of the batch, ×mlx-lm = ours / mlx-lm ==")
        print(batch_bench.format_batch(report["batch"]))
        print()
    if "cold" in report:
        print(f"== Cold start (fresh process each): first {cold_bench.PROMPT_TOKENS}-token prefill and first decode step, s ==")
        print(cold_bench.format_cold(report["cold"]))
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
        plot.plot_layer(report["layer"]["rows"], args.plot, args.peak_gbs)
        print(f"wrote {args.plot}")
    return report


def main(argv=None) -> None:
    """The ``mlx_moe.bench`` console script: returns None, so it exits 0; a user
    error is one line and SystemExit(2), Ctrl-C SIGTERM SystemExit(130) (``mlx_moe.cli``)."""
    code = run_cli("mlx_moe.bench", _dispatch, sys.argv[1:] if argv is None else list(argv))
    if code:
        raise SystemExit(code)


def _dispatch(argv) -> None:
    try:
        if argv[:1] == [CHILD_COMMAND]:
            load_child(*argv[1:])
        elif argv[:1] == [cold_bench.CHILD_COMMAND]:
            cold_bench.cold_child(*argv[1:])
        elif argv[:1] == ["server"]:  # mlx_moe.server vs mlx_lm.server: mlx_moe.bench server [--clients ...]
            from .server import main as server_main

            server_main(argv[1:])
        elif argv[:1] == ["distributed"]:  # N ranks on loopback: mlx_moe.bench distributed [--ranks 1,2]
            from .distributed import main as distributed_main

            distributed_main(argv[1:])
        elif argv[:1] == ["offload"]:  # expert-budget benchmark: mlx_moe.bench offload [--budgets ...]
            from .offload import main as offload_main

            offload_main([a for a in argv[1:] if a != "--verbose"])  # --verbose: read by run_cli
        else:
            run(argv)
    except UsageError as e:  # bench's own (a SystemExit, for library callers): one line, exit 2
        raise CliUsageError(str(e)) from None
