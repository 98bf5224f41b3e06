"""Usage: python scripts/cpu_recipe_perplexity.py [OUT_FOLDER]. Perplexity of mlx_moe.convert outputs of the default model on held-out text:
the last 5% of the token stream of pydoc_data.topics (the default model's own
validation split: examples/train_default_model.py, n_val = n_tok // 20), cut
into 128-token rows, scored by mlx_lm.perplexity.eval_ppl."""
import json, subprocess, sys, time
from pathlib import Path
import mlx.core as mx
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_default_model import load_corpus, encode_corpus
from tokenizers import Tokenizer
from mlx_lm.perplexity import eval_ppl
from mlx_lm.utils import load_model as lm_load
from mlx_moe import load_model

DM = Path(__file__).resolve().parents[1] / "mlx_moe" / "default_model"
tok = Tokenizer.from_file(str(DM / "tokenizer.json"))
data = encode_corpus(tok, load_corpus())
n_val = data.size // 20
val = data[-n_val:]
L = 128
rows = val[: (val.size // L) * L].reshape(-1, L)
print(f"corpus tokens {data.size} (training record: 124926), held-out {n_val}, rows {rows.shape}", flush=True)
rows = mx.array(rows)

CONFIGS = [
    ("bf16 (source)", []),
    ("uniform 8-bit g64", ["-q", "--q-bits", "8"]),
    ("uniform 6-bit g64", ["-q", "--q-bits", "6"]),
    ("uniform 5-bit g64", ["-q", "--q-bits", "5"]),
    ("uniform 4-bit g32", ["-q", "--q-group-size", "32"]),
    ("uniform 4-bit g64", ["-q"]),
    ("uniform 3-bit g64", ["-q", "--q-bits", "3"]),
    ("mixed_4_6", ["--quant-predicate", "mixed_4_6", "--q-group-size", "64"]),
    ("mixed_3_6", ["--quant-predicate", "mixed_3_6", "--q-group-size", "64"]),
    ("mixed_3_4", ["--quant-predicate", "mixed_3_4", "--q-group-size", "64"]),
    ("mixed_2_6", ["--quant-predicate", "mixed_2_6", "--q-group-size", "64"]),
    ("moe_4_8", ["--quant-predicate", "moe_4_8", "--q-group-size", "64"]),
]
out = Path("/tmp/rc/ppl")
results = []
for name, flags in CONFIGS:
    dst = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    cmd = ["python", "-m", "mlx_moe.convert", "--hf-path", str(DM), "--mlx-path", str(dst), "--force", *flags]
    subprocess.run(cmd, check=True, capture_output=True)
    w = {}
    for f in dst.glob("*.safetensors"):
        w.update(mx.load(str(f)))
    nbytes = sum(v.nbytes for v in w.values())
    model, _ = load_model(dst)
    ppl, se = eval_ppl(model, rows, batch_size=8)
    lm_ppl = None
    try:  # the same folder in mlx-lm (strict); bf16 float experts cannot run on CPU there
        lm, _ = lm_load(dst, strict=True)
        lm_ppl, _ = eval_ppl(lm, rows, batch_size=8)
    except Exception as e:
        lm_ppl = f"n/a ({type(e).__name__})"
    results.append((name, nbytes, float(ppl), float(se), lm_ppl, " ".join(flags)))
    print(f"| {name} | {nbytes} | {ppl:.4f} ± {se:.4f} | {lm_ppl} | `{' '.join(flags) or '(none)'}` |", flush=True)
json.dump(results, open("/tmp/rc/ppl.json", "w"), indent=1)
