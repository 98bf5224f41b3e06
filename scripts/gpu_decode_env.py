"""Decode under MLX CUDA settings (2026-12-01, H200): each configuration in its own child
process (MLX reads MLX_USE_CUDA_GRAPHS / MLX_MAX_OPS_PER_BUFFER once): ours, mlx-lm and
the compiled step, interleaved, 128 tokens; the default run then decodes 6 more times to
show drift within a process. Usage: source .gpu/setup.sh && python3 scripts/gpu_decode_env.py
(the run had this file at .probe/probe2.py with a snapshot of the repository on its path;
its log is docs/runs/2026-12-01-h200/decode_env_probe.log; its graph census timed out)."""
import gc, glob, json, os, re, statistics, subprocess, sys, time, collections
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("OUT", "/tmp")

def child(mode, rounds, tokens):
    sys.path.insert(0, os.path.join(HERE, ".."))
    import mlx.core as mx
    import mlx_moe  # registers kernels
    from mlx_moe.synthetic import get_config, mlx_lm_twin, random_model
    from mlx_moe.decode import generate_step as our_step
    from mlx_lm.generate import generate_step
    cfg = get_config("qwen3-30b-a3b")
    ours, qcfg = random_model(cfg, {"bits": 4, "group_size": 64}, seed=0, dtype=mx.bfloat16)
    twin = mlx_lm_twin(ours, qcfg, {"bits": 4, "group_size": 64})
    greedy = lambda lp: mx.argmax(lp, axis=-1)
    prompt = mx.array(list(range(1, 65)))
    def run(kind, n):
        if kind == "ours":
            it = (t for t, _ in generate_step(prompt, ours, max_tokens=n, sampler=greedy))
        elif kind == "mlx-lm":
            it = (t for t, _ in generate_step(prompt, twin, max_tokens=n, sampler=greedy))
        else:
            it = (r.token for r in our_step(prompt, ours, max_tokens=n, sampler=greedy))
        t1 = None; c = 0
        for tok in it:
            if t1 is None: t1 = time.perf_counter()
            c += 1
        return (c - 1) / (time.perf_counter() - t1)
    kinds = ["ours", "mlx-lm", "compiled"]
    t = time.perf_counter()
    for k in kinds: run(k, 4)
    warm = time.perf_counter() - t
    if mode == "dot":
        return {"warm": warm}
    res = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for k in order:
            gc.collect(); mx.clear_cache()
            res[k].append(run(k, tokens))
    if mode == "drift":
        res["ours_norm_clear"] = []
        for r in range(6):
            res["ours_norm_clear"].append(run("ours", tokens))
    return {"warm": warm, **res}

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    r = child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print("RESULT " + json.dumps(r), flush=True)
    sys.exit(0)

configs = [
    ("default", {}, "drift", 4),
    ("nographs", {"MLX_USE_CUDA_GRAPHS": "0"}, "run", 3),
    ("ops1000", {"MLX_MAX_OPS_PER_BUFFER": "1000", "MLX_MAX_MB_PER_BUFFER": "100000"}, "run", 3),
    ("ops20", {"MLX_MAX_OPS_PER_BUFFER": "20"}, "run", 3),
]
summary = {}
for name, env, mode, rounds in configs:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "child", mode, str(rounds), "128"], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=300)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
        print(name, "FAILED", p.stderr[-2000:], flush=True); continue
    r = json.loads(line[0][7:]); summary[name] = r
    print(f"== {name} ({time.perf_counter()-t:.0f}s, warm {r['warm']:.1f}s)", flush=True)
    for k, v in r.items():
        if isinstance(v, list):
            print(f"   {k:16s} median {statistics.median(v):6.1f}  [{', '.join(f'{x:.1f}' for x in v)}]", flush=True)
# graph node census of one decode step (ours eager and mlx-lm)
for kind in ("census",):
    d = "/tmp/gdot"; os.makedirs(d, exist_ok=True)
    code = f'''
import sys, os, glob; sys.path.insert(0, {os.path.join(HERE, "..")!r})
import mlx.core as mx, mlx_moe
from mlx_moe.synthetic import get_config, mlx_lm_twin, random_model
from mlx_lm.models.cache import make_prompt_cache
cfg = dict(get_config("qwen3-30b-a3b")); cfg["num_hidden_layers"] = 4
ours, q = random_model(cfg, {{"bits": 4, "group_size": 64}}, seed=0, dtype=mx.bfloat16)
twin = mlx_lm_twin(ours, q, {{"bits": 4, "group_size": 64}})
for name, m in (("ours", ours), ("mlxlm", twin)):
    c = make_prompt_cache(m); mx.eval(m(mx.array([list(range(1, 17))]), cache=c))
    for i in range(3): mx.eval(m(mx.array([[5]]), cache=c))
    mx.synchronize()
    for f in glob.glob("{d}/*"): os.remove(f)
    open("{d}/_mark_" + name, "w").write("")
    mx.eval(m(mx.array([[5]]), cache=c)); mx.synchronize()
    os.makedirs("{d}/" + name, exist_ok=True)
    for f in glob.glob("{d}/g_*.dot"): os.rename(f, "{d}/" + name + "/" + os.path.basename(f))
'''
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLX_SAVE_CUDA_GRAPHS_DOT_FILE": d + "/g"},
                       capture_output=True, text=True, timeout=300)
    print("census rc", p.returncode, p.stderr[-1500:], flush=True)
    for name in ("ours", "mlxlm"):
        files = glob.glob(f"{d}/{name}/*.dot")
        c = collections.Counter()
        for f in files:
            txt = open(f, errors="replace").read()
            for lab in re.findall(r'label="([^"]*)"', txt):
                m = re.search(r"(?:kernel_)?([A-Za-z_][A-Za-z0-9_:<>]*)", lab.split("\\n")[0])
                c[lab.split("\\n")[0][:60]] += 1
        print(f"== census {name}: {len(files)} graphs, {sum(c.values())} labeled nodes (4 layers)")
        for k, v in c.most_common(40):
            print(f"   {v:4d} {k}")
json.dump(summary, open(os.path.join(OUT, "probe2.json"), "w"))
import shutil
for name in ("ours", "mlxlm"):
    fs = sorted(glob.glob(f"/tmp/gdot/{name}/*.dot"))
    if fs:
        shutil.copy(fs[len(fs)//2], os.path.join(OUT, f"graph_{name}.dot"))
