"""Peak resident memory while streaming + quantizing a few-hundred-MB checkpoint.

Bound (issue 4): peak RSS <= 1.15 x final quantized bytes + one layer's source
experts, counted above the interpreter's RSS once mlx/mlx_moe are imported.
Measured in a fresh subprocess so nothing else in the test run pollutes max RSS.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LAYERS, H, E, I = 8, 512, 32, 512
# A qwen3_moe checkpoint of ~400 MB in bf16, sharded HF style.
OVERRIDES = dict(
    hidden_size=H, num_hidden_layers=LAYERS, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
    head_dim=64, num_experts=E, num_experts_per_tok=4, moe_intermediate_size=I, mlp_only_layers=[], vocab_size=1024,
)
WRITER = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from fixtures import write_checkpoint
    write_checkpoint(sys.argv[1], "qwen3_moe", dtype="bfloat16", shards={LAYERS + 1}, tokenizer=False,
                     overrides={OVERRIDES!r})
    """
)

CHILD = textwrap.dedent(
    """
    import json, sys
    import mlx.core as mx
    from mlx.utils import tree_flatten
    import mlx_moe
    def status_mb(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
    base = status_mb("VmRSS")
    model, _ = mlx_moe.load_model(sys.argv[1], quantize={"bits": 4, "group_size": 64})
    qbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    # VmHWM, not ru_maxrss: Linux carries the spawning process's peak into the
    # child's ru_maxrss across exec, so a large pytest process inflated it.
    peak = status_mb("VmHWM")
    print(json.dumps({"base_mb": base, "peak_mb": peak, "quantized_mb": qbytes / 2**20,
                      "mlx_peak_mb": mx.get_peak_memory() / 2**20}))
    """
)


@pytest.mark.slow
def test_streaming_quantized_load_peak_rss(tmp_path):
    # Written by a fresh interpreter: RSS of the loading child was seen to vary with
    # what the writing process had done before (not with MLX's own peak).
    subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], check=True)
    source_mb = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors")) / 2**20
    assert source_mb > 250  # "a checkpoint of a few hundred MB"
    for f in tmp_path.glob("*.safetensors"):  # read from disk, as a real first load does
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    layer_experts_mb = E * 3 * H * I * 2 / 2**20
    used = r["peak_mb"] - r["base_mb"]
    bound = 1.15 * r["quantized_mb"] + layer_experts_mb
    print(f"peak above baseline {used:.1f} MB, quantized {r['quantized_mb']:.1f} MB, "
          f"ratio {used / r['quantized_mb']:.3f}, bound {bound:.1f} MB, source {source_mb:.0f} MB")
    assert used <= bound, r
