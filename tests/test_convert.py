"""mlx_moe.convert: output loads strictly in mlx-lm with the same logits; the
destination is written atomically and never left half-done."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load

from fixtures import write_checkpoint
from mlx_moe import load_model
from mlx_moe.cli import UsageError
from mlx_moe.convert import convert, main

# Every layer MoE, with 64-wide experts (the shapes the error test names).
OVERRIDES = dict(num_hidden_layers=2, mlp_only_layers=[], moe_intermediate_size=64)
TOKENS = mx.array([[3, 17, 42, 5, 88, 1, 60]])


def write_hf(folder, mutate=None):
    """A float32 HF per-expert qwen3_moe checkpoint, with its tokenizer."""
    return write_checkpoint(folder, "qwen3_moe", overrides=OVERRIDES, mutate=mutate)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_hf(tmp_path_factory.mktemp("hf") / "src")


@pytest.mark.parametrize("quantize", [None, {"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 64}])
def test_convert_loads_strictly_in_mlx_lm_with_same_logits(hf, tmp_path, quantize):
    dst = convert(hf, tmp_path / "out", quantize=quantize, progress=False)
    ref, config = mlx_lm_load(dst, strict=True)
    ours, _ = load_model(hf, quantize=quantize)
    assert mx.array_equal(ref(TOKENS), ours(TOKENS))
    assert (dst / "tokenizer_config.json").exists()
    assert (dst / "model.safetensors.index.json").exists()
    if quantize:
        assert config["quantization"]["bits"] == quantize["bits"]
        router = config["quantization"].get("model.layers.0.mlp.gate", config["quantization"])
        assert router["bits"] == 8  # mlx-lm's rule: routers stay at 8 bits
    # Our loader reads its own output back to the same model.
    again, _ = load_model(dst)
    assert mx.array_equal(again(TOKENS), ours(TOKENS))


def test_convert_shards_large_models(hf, tmp_path):
    dst = convert(hf, tmp_path / "out", max_shard_gb=0.0002, progress=False)
    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    ref, _ = mlx_lm_load(dst, strict=True)
    ours, _ = load_model(hf)
    assert mx.array_equal(ref(TOKENS), ours(TOKENS))


def test_existing_destination_needs_force(hf, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists; pass --force"):
        main(["--hf-path", str(hf), "--mlx-path", str(dst)])
    assert (dst / "keep.txt").read_text() == "mine"
    main(["--hf-path", str(hf), "--mlx-path", str(dst), "--force", "-q", "--q-group-size", "32"])
    assert not (dst / "keep.txt").exists()
    assert json.loads((dst / "config.json").read_text())["quantization"]["group_size"] == 32


def test_failed_convert_leaves_no_partial_output(hf, tmp_path):
    short = {"model.layers.1.mlp.experts.3.up_proj.weight": np.zeros((64, 60), np.float32)}
    bad = write_hf(tmp_path / "bad", mutate=lambda t: {**t, **short})
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj\.weight.*\[64, 60\].*\[64, 64\]"):
        convert(bad, dst, quantize={"bits": 4, "group_size": 32}, progress=False)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_failed_convert_keeps_existing_destination(hf, tmp_path):
    dst = convert(hf, tmp_path / "out", progress=False)
    before = (dst / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="Unsupported bits=5 for mode 'mxfp4'"):
        convert(hf, dst, quantize={"bits": 5, "mode": "mxfp4"}, force=True, progress=False)
    assert (dst / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
