"""mlx_moe.convert: output loads strictly in mlx-lm with the same logits; the
destination is written atomically and never left half-done."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_moe
from mlx_lm.utils import load_model as mlx_lm_load

from mlx_moe import load_model
from mlx_moe.convert import convert, main

CONFIG = dict(
    model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[],
    norm_topk_prob=True, rms_norm_eps=1e-6, vocab_size=96, rope_theta=1e4,
    tie_word_embeddings=False, max_position_embeddings=128,
)
TOKENS = mx.array([[3, 17, 42, 5, 88, 1, 60]])


def write_hf_checkpoint(folder: Path, config=CONFIG):
    """HF per-expert layout, float32, from mlx-lm's parameter tree."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    rng = np.random.default_rng(0)
    weights = {}
    for name, v in tree_flatten(model.parameters()):
        a = mx.array(rng.standard_normal(v.shape, dtype=np.float32) * 0.1)
        if ".switch_mlp." in name:
            layer, proj = name.split(".")[2], name.split(".")[-2]
            for e in range(a.shape[0]):
                weights[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = a[e]
        else:
            weights[name] = a
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "src")


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
    with pytest.raises(FileExistsError, match="--force"):
        main(["--hf-path", str(hf), "--mlx-path", str(dst)])
    assert (dst / "keep.txt").read_text() == "mine"
    main(["--hf-path", str(hf), "--mlx-path", str(dst), "--force", "-q", "--q-group-size", "32"])
    assert not (dst / "keep.txt").exists()
    assert json.loads((dst / "config.json").read_text())["quantization"]["group_size"] == 32


def test_failed_convert_leaves_no_partial_output(hf, tmp_path):
    bad = tmp_path / "bad"
    write_hf_checkpoint(bad)
    weights = mx.load(str(bad / "model.safetensors"))
    weights["model.layers.1.mlp.experts.3.up_proj.weight"] = mx.zeros((64, 60))
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
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
