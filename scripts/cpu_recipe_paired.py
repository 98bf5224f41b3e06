"""Paired per-token loss differences between the folders scripts/cpu_recipe_perplexity.py wrote (its
first argument, default recipe_ppl/). Usage: python scripts/cpu_recipe_paired.py [FOLDER]"""
import math
import sys
from pathlib import Path

FOLDER = sys.argv[1] if len(sys.argv) > 1 else "recipe_ppl"
# the held-out rows, built exactly as the perplexity script builds them
exec(open(Path(__file__).with_name("cpu_recipe_perplexity.py")).read().split("CONFIGS = [")[0])
import mlx.nn as nn
def losses(d):
    m, _ = load_model(d)
    out = []
    for i in range(0, rows.shape[0], 8):
        x = rows[i:i+8]
        l = nn.losses.cross_entropy(m(x[:, :-1]).astype(mx.float32), x[:, 1:])
        out.append(l.reshape(-1))
    return mx.concatenate(out)
base = Path(FOLDER)
ref = losses(base / "moe_4_8")
for other in ["uniform_4-bit_g32", "uniform_4-bit_g64", "mixed_4_6", "uniform_5-bit_g64"]:
    d = losses(base / other) - ref
    n = d.size
    mean = d.mean().item(); se = (d.std() / math.sqrt(n)).item()
    print(f"{other} - moe_4_8: mean token loss diff {mean:+.5f} ± {se:.5f} (n={n})")
