"""Decode tok/s of the default model with the models' path (no id check) vs an id check forced on
every MoE call: 7 interleaved runs of 200 tokens. Usage: python scripts/cpu_idcheck_decode.py"""
import statistics, time
import mlx.core as mx
from mlx_lm.generate import generate_step
import mlx_moe
from mlx_moe import experts as E
model, tok = mlx_moe.load(None)
prompt = mx.array(tok.encode("A list is"))
orig = E.MoEExperts.__call__
def forced(self, x, w, ids, validate=True):
    return orig(self, x, w, ids, validate=True)
def run():
    t1 = None; n = 0
    for t, _ in generate_step(prompt, model, max_tokens=200, sampler=lambda l: mx.argmax(l, -1)):
        if t1 is None: t1 = time.perf_counter()
        n += 1
    return (n - 1) / (time.perf_counter() - t1)
res = {"model path (validate=False)": [], "forced id check (validate=True)": []}
run()
for r in range(7):
    for k in (list(res) if r % 2 == 0 else list(res)[::-1]):
        E.MoEExperts.__call__ = forced if "forced" in k else orig
        res[k].append(run())
E.MoEExperts.__call__ = orig
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.1f} tok/s (min {min(v):.1f}, max {max(v):.1f}, 7 interleaved runs of 200 tokens)")
