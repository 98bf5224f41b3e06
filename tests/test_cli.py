"""mlx_moe.generate on the shipped default model: same greedy tokens as mlx-lm."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlx_moe.loading import DEFAULT_MODEL

PROMPT = "A list is"


def run_cli(*args, stdin=None):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_moe.generate", *args],
        input=stdin, capture_output=True, text=True, check=True,
    )
    return out.stdout


@pytest.fixture(scope="module")
def reference():
    model, tok = mlx_lm_load(str(DEFAULT_MODEL))
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm is float32-only
    ids = tok.encode(PROMPT)
    tokens = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=24)]
    return ids, tokens, tok


def test_default_model_is_small_and_a_real_moe():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size <= 20 * 2**20
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] >= 4


def test_generate_json_matches_mlx_lm_greedy(reference):
    ids, tokens, tok = reference
    r = json.loads(run_cli("--json", "--max-tokens", "24", "--prompt", PROMPT))
    assert r["prompt_tokens"] == ids
    assert r["tokens"] == tokens
    assert r["text"].strip() == tok.decode(tokens).strip()  # streamed text drops the leading space
    assert {"prompt_tokens", "tokens", "text", "prompt_tps", "generation_tps", "peak_memory_gb", "load_s"} <= set(r)
    assert r["generation_tps"] > 0 and r["load_s"] > 0
    # Recognisable text, not noise: mostly dictionary words.
    words = r["text"].split()
    assert len(words) >= 8 and sum(w.strip('.,"*').isalpha() for w in words) >= 0.6 * len(words)


def test_prompt_from_stdin_and_text_output(reference):
    ids, tokens, tok = reference
    out = run_cli("--prompt", "-", "--max-tokens", "24", stdin=PROMPT)
    assert tok.decode(tokens).strip() in out
    assert "Generation: 24 tokens" in out and "Peak memory" in out


def test_quantized_generation_runs(reference):
    r = json.loads(run_cli("--json", "--max-tokens", "8", "-q", "--q-bits", "8", "--q-group-size", "32"))
    assert len(r["tokens"]) == 8
