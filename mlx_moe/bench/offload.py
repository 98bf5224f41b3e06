"""``python -m mlx_moe.bench offload``: decode tok/s vs expert budget.

Writes (once) a random 4-bit Qwen3-MoE model in the expert-file layout whose
routed experts are several GB, then decodes the same prompt with:

* ``resident``: every expert in memory (the reference; its tokens are the oracle),
* ``offload``: ``expert_budget_gb`` = 100 / 75 / 50 / 25 % of the routed-expert
  bytes (predictor ``router``; at 50 % also ``prev``, ``union`` and ``none``),
* ``mmap``: plain mmap paging of the same expert files at the same budget --
  no cache of ours: every use copies the expert out of a read-only mapping, so
  the kernel's page cache is the only cache (what a user gets for free).

Every run is a fresh child process, started after the page cache of every file
of the folder was dropped (``posix_fadvise(POSIX_FADV_DONTNEED)``), so expert
reads really hit the disk. "Same budget" is enforced, not assumed: offload and
mmap children run in a memory cgroup whose limit is the process' own footprint
(measured by a probe run at the minimum budget) plus the budget. Under that
limit the kernel must evict mapped file pages for the mmap run exactly as a
Mac with that much free RAM would; ``RLIMIT_AS`` would not do (it limits
address space, which an mmap of the whole file exceeds, not resident pages).
Without a writable memory cgroup the bench says so and runs unlimited.

The disk's own sequential read GB/s (O_DIRECT, 8 MiB requests) and its
expert-record read GB/s (one record per request, as the cache reads) are
measured in the same run as the roofline.
"""

import argparse
import json
import math
import mmap
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..synthetic import CONFIGS
from .common import drop_page_cache, proc_status

# Qwen3-30B-A3B scaled to a few GB of routed experts on a small disk.
BENCH_CONFIG = {
    **CONFIGS["qwen3-30b-a3b"],
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "head_dim": 64,
    "moe_intermediate_size": 1024,
    "vocab_size": 8192,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

# ------------------------------------------------------------------ model


def make_model(folder, config=None, bits=4, group_size=64, seed=0, progress=True, embed_scale=16.0,
               attn_out_scale=0.1):
    """A random quantized model in the expert-file layout, written layer by layer.

    Non-expert weights: ``mlx_moe.synthetic.fill_random`` (quantized like
    mlx-lm would). Routed experts: uniformly random 4-bit codes with affine
    scales/biases spanning ``±sqrt(3/in)`` (unit-variance outputs), generated
    with numpy per layer -- 50x faster than quantizing float draws, and a
    valid quantized model all the same. float32 activations (the fast MLX CPU
    path).

    ``embed_scale`` multiplies the token embeddings, ``attn_out_scale`` the
    attention output projections. With unit scales, the residual stream of a
    random model is dominated by the attention output -- an average over the
    context, nearly the same for every token -- so every router picks nearly
    the same experts every token (~25 of 128 experts per layer over 48 tokens,
    63 % of a token's experts shared with the previous token): any cache looks
    great. The defaults (16, 0.1) make the current token dominate: routing is
    then as diverse as uniform random (6 % overlap = k/E, ~100 distinct experts
    per layer in 24 tokens), the worst case for a cache. Trained models lie in
    between; the bench reports both ends.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten

    from ..experts import PROJECTIONS
    from ..models import build_model
    from ..quantization import QuantSpec, apply_plan, config_entry, plan_quantization
    from ..safetensors_io import save_sharded
    from ..synthetic import fill_random
    from ..cli import UsageError
    from ..offload.layout import INDEX, ExpertFileWriter, is_offload_folder
    from ..safe_write import staged_folder
    from ..offload.loader import moe_blocks

    folder = Path(folder)
    config = dict(config or BENCH_CONFIG)
    spec = QuantSpec.parse({"bits": bits, "group_size": group_size})
    if os.path.lexists(folder) and not is_offload_folder(folder):
        # Regenerating replaces only a bench model, never a folder the user pointed us at.
        raise UsageError(f"{folder} exists and is not an expert-file model folder; choose another --folder")
    with staged_folder(folder, force=True) as tmp:
        model, arch = build_model(config)
        blocks = moe_blocks(model, arch)
        shapes = {}
        for idx, block in blocks.items():
            ex = block.routed
            shapes[idx] = (ex.num_experts, ex.intermediate_size, ex.hidden_size)
            setattr(block, block.experts_attr, nn.Module())  # experts are written below
        plan = plan_quantization(model, spec)
        apply_plan(model, plan)
        fill_random(model, seed=seed, dtype=mx.float32)
        emb = model.model.embed_tokens
        if "scales" in emb:
            emb.scales = emb.scales * embed_scale
            emb.biases = emb.biases * embed_scale
        else:
            emb.weight = emb.weight * embed_scale
        for layer in model.layers:
            o = layer.self_attn.o_proj
            if "scales" in o:
                o.scales, o.biases = o.scales * attn_out_scale, o.biases * attn_out_scale
            else:
                o.weight = o.weight * attn_out_scale
        save_sharded(tree_flatten(model.parameters()), tmp, 2 << 30)
        del model
        rng = np.random.default_rng(seed)
        writer = ExpertFileWriter(tmp)
        for n, (idx, (E, I, H)) in enumerate(sorted(shapes.items())):
            arrays = {}
            for proj, (out, inp) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                a = math.sqrt(3.0 / inp)
                groups = inp // group_size
                arrays[f"{proj}.weight"] = rng.integers(0, 1 << 32, (E, out, inp * bits // 32), dtype=np.uint32)
                jitter = 1 + 0.1 * rng.standard_normal((E, out, groups), dtype=np.float32)
                scales = (2 * a / (2 ** bits - 1)) * jitter
                arrays[f"{proj}.scales"] = scales.astype(np.float32)
                arrays[f"{proj}.biases"] = (-scales * (2 ** bits - 1) / 2).astype(np.float32)
            q = {"group_size": group_size, "bits": bits, "mode": "affine"}
            writer.write_layer(idx, f"model.layers.{idx}.{arch.experts_prefix}", arrays,
                               {p: q for p in PROJECTIONS})
            if progress:
                print(f"  experts of layer {idx} written ({n + 1}/{len(shapes)})", file=sys.stderr, flush=True)
        writer.finish()
        config["quantization"] = config_entry(spec, plan)
        config["quantization_config"] = config["quantization"]
        config["mlx_moe_expert_files"] = str(INDEX)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# ------------------------------------------------------------------ disk


def drop_folder(folder):
    """Evict every file of ``folder`` from the page cache, so expert reads hit the disk."""
    drop_page_cache(f for f in Path(folder).rglob("*") if f.is_file())


def disk_roofline(folder, max_bytes=2 << 30, threads=2):
    """Sequential read GB/s (O_DIRECT, 8 MiB) and expert-record read GB/s at ``threads`` deep."""
    from ..offload.layout import ExpertIndex

    index = ExpertIndex(folder)
    files = [index.path(e) for e in index.layers.values()]
    entry = next(iter(index.layers.values()))
    drop_folder(folder)
    chunk = 8 << 20
    buf = mmap.mmap(-1, chunk)
    done, t0 = 0, time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            off, size = 0, os.fstat(fd).st_size // 4096 * 4096
            while off < size and done < max_bytes:
                n = os.preadv(fd, [memoryview(buf)[:min(chunk, size - off)]], off)
                if n <= 0:
                    break
                off += n
                done += n
        finally:
            os.close(fd)
        if done >= max_bytes:
            break
    seq = done / (time.perf_counter() - t0) / 1e9
    # expert records, random order, as the cache reads them
    drop_folder(folder)
    import random

    rnd = random.Random(0)
    jobs = [(rnd.choice(list(index.layers.values())), rnd.randrange(entry.num_experts)) for _ in range(256)]
    fds = {e.layer: os.open(index.path(e), os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for e in index.layers.values()}
    bufs = [mmap.mmap(-1, entry.record_bytes) for _ in range(threads)]

    def worker(t):  # each thread streams its share of the jobs, like a reader thread
        n = 0
        for e, x in jobs[t::threads]:
            n += os.preadv(fds[e.layer], [bufs[t]], e.offset(x))
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(worker, range(threads)))
    rec = total / (time.perf_counter() - t0) / 1e9
    for fd in fds.values():
        os.close(fd)
    return {"seq_read_gbps": seq, "record_read_gbps": rec, "record_bytes": entry.record_bytes,
            "record_threads": threads}


# ------------------------------------------------------------------ cgroup


class MemCgroup:
    """A child memory cgroup (v1 or v2) under this process' own, with a limit."""

    def __init__(self, name, limit_bytes):
        self.path = None
        base = self._base()
        if base is None:
            return
        path = base / name
        try:
            path.mkdir(exist_ok=True)
            if (path / "memory.limit_in_bytes").exists():
                self.v = 1
                (path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            else:
                self.v = 2
                (path / "memory.max").write_text(str(int(limit_bytes)))
                (path / "memory.swap.max").write_text("0") if (path / "memory.swap.max").exists() else None
            self.path = path
        except OSError:
            try:
                path.rmdir()
            except OSError:
                pass

    @staticmethod
    def _base():
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, ctrls, p = line.split(":", 2)
            if "memory" in ctrls.split(","):
                base = Path("/sys/fs/cgroup/memory") / p.lstrip("/")
                if base.is_dir() and os.access(base, os.W_OK):
                    return base
        for line in lines:
            if line.startswith("0::"):
                base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                if (base / "cgroup.subtree_control").exists() and os.access(base, os.W_OK):
                    return base
        return None

    def attach(self):
        """preexec_fn: move the child into the cgroup."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self):
        if self.path is None:
            return None
        f = self.path / ("memory.max_usage_in_bytes" if self.v == 1 else "memory.peak")
        try:
            return int(f.read_text())
        except (OSError, ValueError):
            return None

    def remove(self):
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


# ------------------------------------------------------------------ child


def _proc_io():
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def child(spec):
    """One run: load, prefill ``prompt_tokens``, decode ``tokens``; JSON to stdout."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    from ..loading import load_model
    from ..offload import stats as offload_stats
    from ..offload.cache import Stats
    from ..offload.prefetch import PredictionStats

    t0 = time.perf_counter()
    budget = spec.get("budget")
    opts = spec.get("options") or {}
    model, config = load_model(spec["folder"], expert_budget_gb=budget, expert_options=opts or None)
    load_s = time.perf_counter() - t0
    cache_obj = getattr(model, "expert_cache", None)
    if spec.get("record_trace") and cache_obj is not None:
        cache_obj.trace = []
    rng = np.random.default_rng(spec.get("seed", 0))
    vocab = config["vocab_size"]
    prompt = mx.array(rng.integers(3, vocab, spec["prompt_tokens"]))
    forced = rng.integers(3, vocab, spec["tokens"]) if spec.get("forced") else None
    kv = make_prompt_cache(model)
    t1 = time.perf_counter()
    y = mx.argmax(model(prompt[None], cache=kv)[:, -1], axis=-1)
    mx.eval(y)
    prefill_s = time.perf_counter() - t1
    toks, times, io = [int(y.item())], [time.perf_counter()], {}
    warm = spec.get("warmup", 4)
    for i in range(spec["tokens"]):
        if i == warm:
            io["start"] = _proc_io()
            if cache_obj is not None:  # steady-state stats only
                cache_obj.stats = Stats()
                cache_obj.planner.stats = PredictionStats()
        inp = y if forced is None else mx.array([int(forced[i])])
        y = mx.argmax(model(inp[None], cache=kv)[:, -1], axis=-1)
        mx.eval(y)
        toks.append(int(y.item()))
        times.append(time.perf_counter())
    io["end"] = _proc_io()
    n = len(times) - 1 - warm
    dt = times[-1] - times[warm]
    out = {
        "tokens": toks,
        "decode_tps": n / dt,
        "decode_s": dt,
        "decode_tokens": n,
        "prefill_s": prefill_s,
        "load_s": load_s,
        "disk_read_bytes_per_token": (io["end"] - io["start"]) / n if io.get("start") is not None else None,
        "vm_hwm": proc_status("VmHWM"),
        "stats": offload_stats(model),
    }
    if cache_obj is not None:
        out["pool_bytes"] = sum(p.nbytes for p in cache_obj.pools)
        if cache_obj.trace is not None:
            import pickle

            with open(spec["record_trace"], "wb") as f:
                pickle.dump(cache_obj.trace, f)
        cache_obj.shutdown()
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def replay(spec):
    """Replay a recorded routing trace through the cache alone (no model): the
    expert-delivery rate when compute is ~free, i.e. the I/O-bound regime of a
    GPU Mac. ``compute_ms`` per layer call is slept (the CPU is idle, as while a
    GPU computes)."""
    import pickle

    from ..offload.cache import ExpertCache, Stats
    from ..offload.layout import ExpertIndex
    from ..offload.loader import parse_budget
    from ..offload.prefetch import PredictionStats

    with open(spec["trace"], "rb") as f:
        trace = pickle.load(f)
    index = ExpertIndex(spec["folder"])
    budget = parse_budget(spec["budget"], index.routed_bytes())
    cache = ExpertCache(index, budget, spec["top_k"], **(spec.get("options") or {}))
    if cache.full:
        cache.preload_all()  # as the loader does when the budget covers every expert
    compute = spec.get("compute_ms", 0.0) / 1e3
    first = min(index.layers)
    token_times, io = [], {}
    warm = spec.get("warmup", 4)
    n_tok = 0
    for layer, ids, guess, decode in trace:
        if decode and layer == first:
            token_times.append(time.perf_counter())
            if n_tok == warm:
                io["start"] = _proc_io()
                cache.stats, cache.planner.stats = Stats(), PredictionStats()
            n_tok += 1
        used, cap = cache.start_call(layer, ids, guess, decode)
        if len(used) <= cap:
            cache.acquire(layer, used)
            cache.after_acquire(layer, guess, decode)
            if compute:
                time.sleep(compute)
        else:
            for group in cache.groups_for(layer, used, cap):
                cache.acquire(layer, group)
                if compute:
                    time.sleep(compute)
    token_times.append(time.perf_counter())
    io["end"] = _proc_io()
    n = len(token_times) - 1 - warm
    out = {
        "decode_tps": n / (token_times[-1] - token_times[warm]),
        "decode_tokens": n,
        "disk_read_bytes_per_token": (io["end"] - io["start"]) / n if io.get("start") is not None else None,
        "vm_hwm": proc_status("VmHWM"),
        "pool_bytes": sum(p.nbytes for p in cache.pools),
        "stats": cache.summary(),
        "tokens": None,
    }
    cache.shutdown()
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def run_child(spec, limit_bytes=None, name="run", timeout=1800):
    drop_folder(spec["folder"])
    cg = MemCgroup(f"mlx-moe-bench-{os.getpid()}-{name}", limit_bytes) if limit_bytes else None
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(
            [sys.executable, "-m", "mlx_moe.bench", "offload", "--child", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, env=env,
            preexec_fn=cg.attach if cg is not None and cg.path is not None else None,
        )
        peak = cg.peak() if cg is not None else None
    finally:
        if cg is not None:
            cg.remove()
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            r = json.loads(line[len("BENCH_RESULT "):])
            r["cgroup_limit"] = limit_bytes if cg is not None and cg.path is not None else None
            r["cgroup_peak"] = peak
            return r
    return {"error": f"exit {p.returncode}: {p.stderr[-2000:]}", "cgroup_limit": limit_bytes}


# ------------------------------------------------------------------ main


def _fmt(v, f=".2f", none="-"):
    return none if v is None else format(v, f)


def table(results, resident_tokens):
    rows = ["| run | budget | GB | tok/s | x resident | x mmap | hit rate | disk MB/token | stall ms/token | "
            "pred. acc. (router/prev/union) | tokens = resident |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    res = next((r for r in results if r["mode"] == "resident"), None)
    mm = {r["budget_pct"]: r for r in results if r["mode"] == "mmap"}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['label']} | {r.get('budget_pct', '-')}% | | error: {r['error'][:80]} |||||||")
            continue
        s = r.get("stats") or {}
        d = s.get("decode") or {}
        acc = s.get("prediction_accuracy") or {}
        tps = r["decode_tps"]
        if tps is None:
            continue
        xm = None
        if r["mode"] == "offload" and r["budget_pct"] in mm and "decode_tps" in mm[r["budget_pct"]]:
            xm = tps / mm[r["budget_pct"]]["decode_tps"]
        accs = "/".join(_fmt(acc.get(k), ".0%") for k in ("router", "prev", "union")) if acc and r["mode"] == "offload" else "-"
        rows.append(
            f"| {r['label']} | {r.get('budget_pct', 100)}% | {_fmt(r.get('budget_gb'))} | {tps:.3f} | "
            f"{_fmt(tps / res['decode_tps'] if res else None)} | {_fmt(xm)} | "
            f"{_fmt(d.get('hit_rate'), '.1%') if r['mode'] == 'offload' else '-'} | "
            f"{_fmt(None if r.get('disk_read_bytes_per_token') is None else r['disk_read_bytes_per_token'] / 1e6, '.0f')} | "
            f"{_fmt(d.get('stall_ms_per_token'), '.0f') if r['mode'] == 'offload' else '-'} | {accs} | "
            f"{'-' if resident_tokens is None or r.get('tokens') is None else 'yes' if r['tokens'] == resident_tokens else 'NO'} |"
        )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="mlx_moe.bench offload", description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="/tmp/mlx-moe-offload-bench", help="model folder (generated if missing)")
    p.add_argument("--regenerate", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers of the generated model")
    p.add_argument("--embed-scale", type=float, default=16.0, help="token-embedding scale of the generated model")
    p.add_argument("--attn-out-scale", type=float, default=0.1,
                   help="attention-output scale of the generated model (1, with --embed-scale 1: "
                        "concentrated routing; the defaults: uniform routing)")
    p.add_argument("--budgets", default="100,75,50,25", help="percent of the routed-expert bytes")
    p.add_argument("--predictors", default="prev,union,none", help="extra predictors compared at --predictor-budget")
    p.add_argument("--predictor-budget", type=int, default=50)
    p.add_argument("--modes", default="resident,offload,mmap,replay")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=20, help="decode steps (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--forced", action="store_true", help="feed random tokens instead of the argmax (no text locality)")
    p.add_argument("--io-threads", type=int, default=2)
    p.add_argument("--no-cgroup", action="store_true", help="do not limit memory to the budget")
    p.add_argument("--slack-mb", type=int, default=64, help="memory limit = footprint + budget + slack")
    p.add_argument("--replay-compute-ms", type=float, default=0.25,
                   help="replay mode: emulated compute per layer call (a GPU's share; the CPU idles)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        return replay(spec) if spec.get("trace") else child(spec)

    folder = Path(args.folder)
    if args.regenerate or not (folder / "experts" / "index.json").exists():
        cfg = dict(BENCH_CONFIG)
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
        print(f"Generating the bench model in {folder} ...", file=sys.stderr)
        t = time.perf_counter()
        make_model(folder, cfg, embed_scale=args.embed_scale, attn_out_scale=args.attn_out_scale)
        print(f"  done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    from ..offload.layout import ExpertIndex

    index = ExpertIndex(folder)
    routed = index.routed_bytes()
    config = json.loads((folder / "config.json").read_text())
    print(f"Model: {folder}, {len(index.layers)} MoE layers x {config['num_experts']} experts "
          f"(top-{config['num_experts_per_tok']}), routed experts {routed / 1e9:.2f} GB", file=sys.stderr)
    roof = disk_roofline(folder, threads=args.io_threads)
    print(f"Disk: sequential {roof['seq_read_gbps']:.2f} GB/s, expert records "
          f"{roof['record_read_gbps']:.2f} GB/s ({args.io_threads} deep)", file=sys.stderr)
    base = {"folder": str(folder), "prompt_tokens": args.prompt_tokens, "tokens": args.tokens,
            "warmup": args.warmup, "forced": args.forced}
    modes = args.modes.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    results = []

    def record(label, mode, pct, r):
        r.update(label=label, mode=mode, budget_pct=pct, budget_gb=routed * pct / 100 / 1e9)
        results.append(r)
        if "error" in r:
            print(f"  {label} @ {pct}%: ERROR {r['error'][-300:]}", file=sys.stderr)
        else:
            print(f"  {label} @ {pct}%: {r['decode_tps']:.3f} tok/s", file=sys.stderr, flush=True)

    if "resident" in modes:
        record("resident", "resident", 100, run_child({**base}, name="resident"))
    footprint = None
    if not args.no_cgroup and ("offload" in modes or "mmap" in modes):
        # the process' own footprint: a run at the minimum budget, minus its pool
        k = config["num_experts_per_tok"]
        slot = sum(t.nbytes for t in next(iter(index.layers.values())).tensors)
        probe = run_child({**base, "budget": k * slot / 1e9, "tokens": 6, "warmup": 2,
                           "options": {"io_threads": args.io_threads}}, name="probe")
        if "error" not in probe and probe.get("vm_hwm"):
            footprint = probe["vm_hwm"] - probe["pool_bytes"]
            print(f"  footprint without the pool: {footprint / 1e9:.2f} GB (probe peak RSS)", file=sys.stderr)
        else:
            print(f"  probe failed, no memory limits: {probe.get('error')}", file=sys.stderr)

    def limit(pct):
        if footprint is None:
            return None
        return int(footprint + routed * pct / 100 + args.slack_mb * 1e6)

    opts = {"io_threads": args.io_threads}
    trace = Path(args.json or "/tmp/mlx-moe-bench").with_suffix(".trace.pkl")
    for pct in budgets:
        b = routed * pct / 100 / 1e9
        if "offload" in modes:
            extra = {"record_trace": str(trace)} if pct == 100 and "replay" in modes else {}
            record("offload/router", "offload", pct,
                   run_child({**base, **extra, "budget": b, "options": {**opts, "predictor": "router"}},
                             limit(pct), name=f"off{pct}"))
            if pct == args.predictor_budget:
                for pred in [x for x in args.predictors.split(",") if x]:
                    record(f"offload/{pred}", "offload", pct,
                           run_child({**base, "budget": b, "options": {**opts, "predictor": pred}},
                                     limit(pct), name=f"off{pct}{pred}"))
        if "mmap" in modes:
            # the mmap baseline's own pool is a scratch of 2 layers' top-k; the rest of
            # its budget is page cache under the same cgroup limit
            k = config["num_experts_per_tok"]
            slot = sum(t.nbytes for t in next(iter(index.layers.values())).tensors)
            record("mmap", "mmap", pct,
                   run_child({**base, "budget": 2 * k * slot / 1e9, "options": {"io_mode": "mmap"}},
                             limit(pct), name=f"mmap{pct}"))
    replays = []
    if "replay" in modes:
        if not trace.exists():
            run_child({**base, "record_trace": str(trace), "budget": "100%", "options": opts}, name="trace")
        k = config["num_experts_per_tok"]
        slot = sum(t.nbytes for t in next(iter(index.layers.values())).tensors)
        rbase = {"folder": str(folder), "trace": str(trace), "top_k": k, "warmup": args.warmup,
                 "compute_ms": args.replay_compute_ms}
        rfoot = None
        if not args.no_cgroup:
            probe = run_child({**rbase, "budget": k * slot / 1e9, "options": opts}, name="rprobe")
            if "error" not in probe:
                rfoot = probe["vm_hwm"] - probe["pool_bytes"]
        rlimit = lambda pct: None if rfoot is None else int(rfoot + routed * pct / 100 + args.slack_mb * 1e6)
        n_layers = len(index.layers)
        for pct in budgets:
            b = routed * pct / 100 / 1e9
            preds = ["router"] + ([x for x in args.predictors.split(",") if x] if pct == args.predictor_budget else [])
            for pred in preds:
                r = run_child({**rbase, "budget": b, "options": {**opts, "predictor": pred}}, rlimit(pct),
                              name=f"r{pct}{pred}")
                r.update(label=f"offload/{pred}", mode="offload", budget_pct=pct, budget_gb=b)
                replays.append(r)
                print(f"  replay offload/{pred} @ {pct}%: {r.get('decode_tps', float('nan')):.2f} tok/s",
                      file=sys.stderr, flush=True)
            r = run_child({**rbase, "budget": 2 * k * slot / 1e9, "options": {"io_mode": "mmap"}}, rlimit(pct),
                          name=f"rmmap{pct}")
            r.update(label="mmap", mode="mmap", budget_pct=pct, budget_gb=b)
            replays.append(r)
            print(f"  replay mmap @ {pct}%: {r.get('decode_tps', float('nan')):.2f} tok/s", file=sys.stderr, flush=True)
        ideal = 1e3 / (n_layers * args.replay_compute_ms) if args.replay_compute_ms else None
        replays.insert(0, {"label": "resident (emulated)", "mode": "resident", "budget_pct": 100,
                           "budget_gb": routed / 1e9, "decode_tps": ideal, "tokens": None})
    ref = next((r["tokens"] for r in results if r["mode"] == "resident" and "tokens" in r), None)
    md = table(results, ref)
    summary = {"model": str(folder), "routed_gb": routed / 1e9, "config": {k: config[k] for k in (
        "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_experts", "num_experts_per_tok")},
        "disk": roof, "footprint_bytes": footprint, "cgroup": footprint is not None,
        "forced_tokens": args.forced, "results": results}
    print(f"\nDisk roofline: sequential read {roof['seq_read_gbps']:.2f} GB/s (O_DIRECT, 8 MiB), expert "
          f"records {roof['record_read_gbps']:.2f} GB/s ({roof['record_bytes'] / 1e6:.1f} MB, "
          f"{roof['record_threads']} deep); routed experts {routed / 1e9:.2f} GB; memory limit by cgroup: "
          f"{'yes' if footprint is not None else 'no'}\n")
    print(md)
    if replays:
        summary["replay"] = {"compute_ms_per_layer": args.replay_compute_ms, "footprint_bytes": rfoot,
                             "results": replays}
        print(f"\nI/O-bound regime (trace replay through the cache alone, {args.replay_compute_ms} ms of "
              f"idle 'GPU' compute per layer call, same cgroup budgets):\n")
        print(table([r for r in replays if r.get("decode_tps") is not None or "error" in r], None))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary

