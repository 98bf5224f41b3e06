"""Decode probe on the GPU (2026-12-01, H200): per-node host cost of a chain of adds, then
ours (mlx-lm generate_step), mlx-lm and mlx_moe.decode's compiled step on random
Qwen3-30B-A3B q4 g64: 5 interleaved rounds of 128 tokens, and one eager forward split
into graph-build and total time. Usage: source .gpu/setup.sh && python3 scripts/gpu_decode_probe.py
(the 2026-12-01 run had this file at .probe/probe1.py, importing a snapshot of the
repository; its log is docs/runs/2026-12-01-h200/decode_probe1.log)."""
import os, sys, time, statistics, ctypes, glob, json
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mlx.core as mx
OUT = os.environ.get("OUT", "/tmp")
res = {}
def log(*a):
    print(*a, flush=True)
log("mlx", mx.__version__, mx.default_device(), "precompiled:", hasattr(mx.fast, "precompiled_cuda_kernel"))
try:
    lib = ctypes.CDLL("libnvrtc.so.13"); v = (ctypes.c_int(), ctypes.c_int()); lib.nvrtcVersion(ctypes.byref(v[0]), ctypes.byref(v[1])); log("nvrtc", v[0].value, v[1].value, lib._name)
except Exception as e:
    log("nvrtc via soname failed:", e)
import nvidia; log("nvidia pkg", list(nvidia.__path__)); log(glob.glob(list(nvidia.__path__)[0] + "/*/lib/libnvrtc*")[:4])
log("TMPDIR", os.environ.get("TMPDIR"), "MLX_PTX_CACHE_DIR", os.environ.get("MLX_PTX_CACHE_DIR"))
log("ptx dirs", glob.glob("/tmp/mlx/*"))
# per-node host cost
for n in (64, 512, 2048):
    def chain():
        x = mx.zeros((1, 2048))
        for _ in range(n):
            x = x + 1
        return x
    mx.eval(chain())
    ts = []
    for _ in range(5):
        t = time.perf_counter(); mx.eval(chain()); ts.append(time.perf_counter() - t)
    log(f"chain add n={n}: {min(ts)/n*1e6:.2f} us/node (min of 5)")
    # graph build only
    t = time.perf_counter(); y = chain(); tb = time.perf_counter() - t; mx.eval(y)
    log(f"   build only: {tb/n*1e6:.2f} us/node")
import mlx_moe  # noqa: F401  (registers the kernels)
from mlx_moe.synthetic import get_config, mlx_lm_twin, random_model
from mlx_moe.decode import generate_step as our_step
from mlx_lm.generate import generate_step
cfg = get_config("qwen3-30b-a3b")
t = time.perf_counter()
ours, qcfg = random_model(cfg, {"bits": 4, "group_size": 64}, seed=0, dtype=mx.bfloat16)
twin = mlx_lm_twin(ours, qcfg, {"bits": 4, "group_size": 64})
log(f"build {time.perf_counter()-t:.1f}s")
greedy = lambda lp: mx.argmax(lp, axis=-1)
prompt = mx.array(list(range(1, 65)))
def run(kind, n):
    if kind == "ours":
        it = (t for t, _ in generate_step(prompt, ours, max_tokens=n, sampler=greedy))
    elif kind == "mlx-lm":
        it = (t for t, _ in generate_step(prompt, twin, max_tokens=n, sampler=greedy))
    else:
        it = (r.token for r in our_step(prompt, ours, max_tokens=n, sampler=greedy))
    toks = []; t1 = None
    for tok in it:
        if t1 is None: t1 = time.perf_counter()
        toks.append(int(tok))
    return toks, (len(toks) - 1) / (time.perf_counter() - t1)
for k in ("ours", "mlx-lm", "compiled"):
    t = time.perf_counter(); run(k, 8); log(f"warm {k} {time.perf_counter()-t:.1f}s")
tps = {k: [] for k in ("ours", "mlx-lm", "compiled")}
toks = {}
for r in range(5):
    for k in tps:
        toks[k], v = run(k, 128); tps[k].append(v)
    log("rep", r, {k: round(v[-1], 1) for k, v in tps.items()})
for k, v in tps.items():
    log(f"{k}: median {statistics.median(v):.1f} min {min(v):.1f} max {max(v):.1f}")
log("agree ours/mlx-lm", next((i for i,(a,b) in enumerate(zip(toks['ours'], toks['mlx-lm'])) if a!=b), 128),
    "compiled/mlx-lm", next((i for i,(a,b) in enumerate(zip(toks['compiled'], toks['mlx-lm'])) if a!=b), 128))
# one-layer timing split: time of a full eager forward at T=1 broken by module
from mlx_lm.models.cache import make_prompt_cache
cache = make_prompt_cache(ours); mx.eval(ours(prompt[None], cache=cache))
x = mx.array([[5]])
def fwd(): return ours(x, cache=cache)
for name, fn in [("full fwd (cache grows)", fwd)]:
    mx.eval(fn()); ts=[]
    for _ in range(20):
        t=time.perf_counter(); y = fn(); tb=time.perf_counter()-t; mx.eval(y); ts.append((tb, time.perf_counter()-t))
    log(name, "build ms", round(statistics.median([a for a,_ in ts])*1e3,2), "total ms", round(statistics.median([b for _,b in ts])*1e3,2))
log("ptx dirs after", glob.glob("/tmp/mlx/*/*")[:5], len(glob.glob("/tmp/mlx/*/ptx/*")))
json.dump(tps, open(os.path.join(OUT, "probe1.json"), "w"))
