"""Each architecture, loaded by us and by mlx-lm from the same tiny checkpoint:
same parameters, same logits, same greedy tokens (float32 and 4-bit)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import quantize_model

import fixtures
from mlx_moe.experts import MoEExperts, QuantizedExpertLinear
from mlx_moe.loading import load, load_model
from mlx_moe.models import MoEBlock

ARCHS = fixtures.ARCHS
# "Hello world" in the tiny tokenizer, after <s>; longer than gpt-oss's window (6)
PROMPT = [1, 44, 73, 80, 80, 83, 4, 91, 83, 86, 80, 72]
STEPS = 16


def greedy(model, steps=STEPS):
    """mlx-lm's own generator (KV cache, argmax): tokens and per-step logprobs."""
    tokens, logprobs = [], []
    for tok, lp in generate_step(mx.array(PROMPT), model, max_tokens=steps):
        tokens.append(int(tok))
        logprobs.append(np.array(lp.astype(mx.float32)))
    return tokens, np.stack(logprobs)


def logits(model):
    out = model(mx.array([PROMPT]))
    return np.array(out.astype(mx.float32))


def params(model):
    return dict(tree_flatten(model.parameters()))


def assert_same_params(ours, theirs, exact=True):
    a, b = params(ours), params(theirs)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if exact:
            assert mx.array_equal(a[k], b[k]), k
        else:
            np.testing.assert_allclose(
                np.array(a[k].astype(mx.float32)), np.array(b[k].astype(mx.float32)), rtol=0, atol=1e-6, err_msg=k
            )


def normalized_quantization(q):
    """``quantization`` config entries with mlx-lm's implicit ``mode: affine`` spelled out."""
    out = {}
    for k, v in q.items():
        out[k] = {"mode": "affine", **v} if isinstance(v, dict) else v
    out.setdefault("mode", "affine")
    return out


def assert_our_blocks(model, arch, quantized=None):
    """The model really runs our MoE blocks (else comparing with mlx-lm proves nothing)."""
    moe = [i for i, layer in enumerate(model.layers) for m in layer.children().values() if isinstance(m, MoEBlock)]
    assert moe == fixtures.moe_layers(arch)
    for i in moe:
        block = [m for m in model.layers[i].children().values() if isinstance(m, MoEBlock)][0]
        assert isinstance(block.routed, MoEExperts)
        if quantized is None:
            assert block.routed.quantized is None
        else:
            assert isinstance(block.routed.gate_proj, QuantizedExpertLinear)
            assert block.routed.quantized == quantized


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_matches_mlx_lm(arch, checkpoint):
    path = checkpoint(arch)
    ours, config = load_model(path)
    theirs, _ = mlx_lm_load_model(Path(path))
    assert_our_blocks(ours, arch)
    assert "quantization" not in config
    assert_same_params(ours, theirs)

    ref = logits(theirs)
    np.testing.assert_allclose(logits(ours), ref, rtol=0, atol=1e-4)

    tok_ours, lp_ours = greedy(ours)
    tok_theirs, lp_theirs = greedy(theirs)
    assert tok_ours == tok_theirs
    assert len(set(tok_theirs)) > 2, "degenerate generation would prove little"
    np.testing.assert_allclose(lp_ours, lp_theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_loop_backend_matches_mlx_lm(arch, checkpoint):
    path = checkpoint(arch)
    ours, _ = load_model(path, backend="loop")
    assert all(m.backend == "loop" for _, m in ours.named_modules() if isinstance(m, MoEExperts))
    theirs, _ = mlx_lm_load_model(Path(path))
    np.testing.assert_allclose(logits(ours), logits(theirs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_matches_mlx_lm(arch, checkpoint):
    path = checkpoint(arch)
    ours, config = load_model(path, quantize={"bits": 4, "group_size": 32})
    theirs, their_config = mlx_lm_load_model(Path(path))
    theirs, their_config = quantize_model(theirs, their_config, 32, 4)
    assert_our_blocks(ours, arch, {"group_size": 32, "bits": 4, "mode": "affine"})
    assert normalized_quantization(config["quantization"]) == normalized_quantization(their_config["quantization"])
    assert_same_params(ours, theirs)

    np.testing.assert_allclose(logits(ours), logits(theirs), rtol=0, atol=1e-4)
    tok_ours, lp_ours = greedy(ours)
    tok_theirs, lp_theirs = greedy(theirs)
    assert tok_ours == tok_theirs
    np.testing.assert_allclose(lp_ours, lp_theirs, rtol=0, atol=1e-4)


def test_4bit_differs_from_float(checkpoint):
    """Guards the 4-bit test: quantization really changes this model's outputs."""
    path = checkpoint("qwen3_moe")
    q, _ = load_model(path, quantize={"bits": 4, "group_size": 32})
    f, _ = load_model(path)
    assert np.abs(logits(q) - logits(f)).max() > 1e-2


@pytest.mark.parametrize("bits,group_size", [(2, 64), (5, 32), (8, 64)])
def test_other_bits_match_mlx_lm(bits, group_size, checkpoint):
    path = checkpoint("mixtral")
    ours, config = load_model(path, quantize={"bits": bits, "group_size": group_size})
    theirs, their_config = quantize_model(mlx_lm_load_model(Path(path))[0], fixtures.tiny_config("mixtral"), group_size, bits)
    assert normalized_quantization(config["quantization"]) == normalized_quantization(their_config["quantization"])
    assert_same_params(ours, theirs)
    assert greedy(ours)[0] == greedy(theirs)[0]


def test_load_returns_tokenizer(checkpoint):
    path = checkpoint("olmoe")
    model, tokenizer = load(path, progress=False)
    assert tokenizer.encode("Hello world", add_special_tokens=False) == PROMPT[1:]
    assert tokenizer.decode(PROMPT[1:]) == "Hello world"
    assert tokenizer.eos_token_id == 2
    theirs, _ = mlx_lm_load_model(Path(path))
    np.testing.assert_allclose(logits(model), logits(theirs), rtol=0, atol=1e-4)


# ---------------------------------------------- Hugging Face transformers oracle
# Independent of mlx-lm: transformers' PyTorch modelling code on the same files.
# Needs a CPU torch (``pip install torch``); without it these tests skip.


def hf_logits(path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits.float().numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_matches_transformers(arch, checkpoint):
    """gpt-oss is checked in transformers' own layout (fused [E, H, 2I], interleaved)."""
    path = checkpoint(arch, "gpt_oss" if arch == "gpt_oss" else None, mlx_lm_rope=False)
    ours, _ = load_model(path)
    np.testing.assert_allclose(logits(ours), hf_logits(path), rtol=0, atol=1e-4)


def test_gpt_oss_layout_matches_transformers_with_truncated_yarn(tmp_path):
    """The same check as above with YaRN's ``truncate: true``: isolates the expert
    layout, sinks, sliding window and clamped SwiGLU from the YaRN variant."""
    rope = {**fixtures.tiny_config("gpt_oss")["rope_scaling"], "truncate": True}
    path = fixtures.write_checkpoint(tmp_path, "gpt_oss", "gpt_oss", overrides={"rope_scaling": rope}, tokenizer=False)
    ours, _ = load_model(path)
    np.testing.assert_allclose(logits(ours), hf_logits(path), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {"mlp_only_layers": [1], "num_hidden_layers": 3, "norm_topk_prob": True},
        {"decoder_sparse_step": 2, "num_hidden_layers": 3},
    ],
)
def test_qwen2_moe_dense_layers_match_transformers(overrides, tmp_path):
    """Qwen2-MoE's dense layers and norm_topk_prob, which mlx-lm's qwen2_moe ignores."""
    path = fixtures.write_checkpoint(tmp_path, "qwen2_moe", overrides=overrides, tokenizer=False)
    ours, _ = load_model(path)
    dense = [i for i, layer in enumerate(ours.layers) if not isinstance(layer.mlp, MoEBlock)]
    assert dense == [i for i in range(3) if i not in fixtures.moe_layers("qwen2_moe", {**fixtures.tiny_config("qwen2_moe"), **overrides})]
    assert dense
    np.testing.assert_allclose(logits(ours), hf_logits(path), rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_checkpoint_matches_transformers(arch, checkpoint):
    """transformers v5 reads the fused ``gate_up_proj`` natively: it confirms what
    the ``stacked`` fixture means (gate rows, then up rows)."""
    path = checkpoint(arch, "stacked")
    ours, _ = load_model(path)
    np.testing.assert_allclose(logits(ours), hf_logits(path), rtol=0, atol=1e-4)
