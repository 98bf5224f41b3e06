"""GGUF import (mlx_moe.gguf): exact transcodes, names and configs per architecture,
the same logits as the safetensors twin, errors, tokenizer.

Tiny GGUFs come from ``fixtures.gguf_writer`` (the gguf package's own writer,
name map and quantizers); the twin is a safetensors checkpoint holding the very
float values the GGUF stores (``gguf.quants.dequantize`` of what was written).
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import fixtures  # noqa: E402
from fixtures.gguf_writer import random_kquant, twin_mutate, write_gguf, write_twin_tokenizer  # noqa: E402
from mlx_moe.experts import MoEExperts  # noqa: E402
from mlx_moe.gguf import GGUFError, load_gguf, load_tokenizer, save_tokenizer  # noqa: E402
from mlx_moe.gguf import quants  # noqa: E402
from mlx_moe.loading import load_model  # noqa: E402

T = gguf.GGMLQuantizationType
TOKENS = mx.array([[1, 5, 9, 30, 100, 7, 257, 3]])
# K-quants need rows of 256 values: a wider variant of the tiny configs
WIDE = {"hidden_size": 256, "moe_intermediate_size": 256, "intermediate_size": 256}


def _blocks(type_name, shape, rng):
    """Raw blocks of ``type_name`` for a float tensor of ``shape``: the gguf package's
    own quantizer where it has one, else random blocks with valid headers."""
    q = T[type_name]
    if type_name in ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"):
        return random_kquant(shape, q, rng)
    return gguf.quants.quantize(rng.normal(0, 0.05, size=shape).astype(np.float32), q)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "MXFP4"])
def test_exact_transcode_is_bit_exact(type_name):
    """mx.dequantize of the transcoded arrays == gguf.quants.dequantize, stacked [E, out, in]."""
    rng = np.random.default_rng(0)
    raw = _blocks(type_name, (3, 8, 512), rng)
    if type_name == "Q4_0":  # every code, including the -0.0 case (negative d, q = 8)
        blocks = raw.reshape(-1, 18)
        blocks[:, 2:] = rng.integers(0, 256, size=blocks[:, 2:].shape, dtype=np.uint8)
    qt = quants.transcode(raw, type_name)
    assert qt.params == quants.native_params(type_name)
    got = mx.dequantize(qt.weight, qt.scales, qt.biases, group_size=32, bits=qt.bits, mode=qt.mode)
    got = np.array(got.astype(mx.float32))  # mxfp4 dequantizes to bfloat16, exactly
    want = gguf.quants.dequantize(raw, T[type_name])
    assert got.shape == want.shape == (3, 8, 512)
    assert np.array_equal(got, want)
    # bit for bit, except that a zero may differ in sign (see quants' docstring)
    same_bits = got.view(np.uint32) == want.view(np.uint32)
    assert np.all(same_bits | (want == 0))
    if qt.mode == "affine":
        assert qt.scales.dtype == mx.float32 and qt.biases.dtype == mx.float32


def test_bfloat16_scales_would_not_be_exact():
    """Why the scales stay float32: d * sc (17 significant bits) does not fit bf16."""
    raw = random_kquant((4, 256), T.Q4_K, np.random.default_rng(1))
    qt = quants.transcode(raw, "Q4_K")
    lossy = mx.dequantize(qt.weight, qt.scales.astype(mx.bfloat16), qt.biases.astype(mx.bfloat16), group_size=32, bits=4)
    assert not np.array_equal(np.array(lossy.astype(mx.float32)), gguf.quants.dequantize(raw, T.Q4_K))


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_float_types_exact(type_name):
    w = np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, T[type_name]) if type_name != "F16" else w.astype(np.float16)
    got = quants.to_float(raw, type_name)
    assert got.dtype == quants.FLOAT_TYPES[type_name]
    assert np.array_equal(np.array(got.astype(mx.float32)), gguf.quants.dequantize(raw, T[type_name]))


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """``make(arch, qtype, overrides) -> (gguf path, twin folder)``, cached per module."""
    cache = {}

    def make(arch, qtype, overrides=None, split_max_tensors=0, mla_split=True):
        key = (arch, qtype, tuple(sorted((overrides or {}).items())), split_max_tensors, mla_split)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"gguf-{arch}-{qtype}")
            path, values, cfg = write_gguf(d / "model.gguf", arch, qtype, overrides=overrides,
                                           split_max_tensors=split_max_tensors, mla_split=mla_split)
            keys = ("vocab_size", "bos_token_id", "eos_token_id", "mlp_only_layers", *(overrides or {}))
            twin = fixtures.write_checkpoint(
                d / "twin", arch, overrides={k: cfg[k] for k in keys if k in cfg},
                mutate=twin_mutate(values), tokenizer=False,
            )
            write_twin_tokenizer(twin)
            cache[key] = (path, twin)
        return cache[key]

    return make


def _assert_transcoded(model, bits):
    """The GGUF model really holds quantized experts (the test exercises the transcode)."""
    experts = [m for _, m in model.named_modules() if isinstance(m, MoEExperts)]
    assert experts and all(getattr(e.gate_proj, "bits", None) == bits for e in experts)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


CASES = [
    ("qwen3_moe", "F32", None), ("qwen3_moe", "F16", None), ("qwen3_moe", "BF16", None),
    ("qwen3_moe", "Q8_0", None), ("qwen3_moe", "Q4_0", None), ("qwen3_moe", "Q4_1", None),
    ("qwen3_moe", "Q5_0", None), ("qwen3_moe", "Q5_1", None),
    ("qwen3_moe", "Q4_K", WIDE), ("qwen3_moe", "Q5_K", WIDE),
    ("mixtral", "F32", None), ("mixtral", "Q4_0", None),  # q/k rows un-permuted
    ("qwen2_moe", "Q8_0", None), ("olmoe", "Q5_1", None),
    ("gpt_oss", "Q4_0", None), ("deepseek_v3", "Q4_0", None),
]


@pytest.mark.parametrize("arch,qtype,overrides", CASES, ids=[f"{a}-{q}" for a, q, _ in CASES])
def test_logits_equal_safetensors_twin(gguf_model, arch, qtype, overrides):
    """Same floats, same logits, bit for bit (float32 CPU): names, config, permutation
    and the exact transcode are all right."""
    path, twin = gguf_model(arch, qtype, overrides)
    model, config = load_gguf(path)
    ref, _ = load_model(twin)
    if qtype in quants.EXACT_BITS:
        _assert_transcoded(model, quants.EXACT_BITS[qtype])
        assert config["quantization"]["group_size"] == 32
    assert np.array_equal(np.array(model(TOKENS)), np.array(ref(TOKENS)))


def test_deepseek_older_joined_kv_b(gguf_model):
    """Files from before llama.cpp split kv_b (attn_kv_b): mlx-lm's sanitize splits it."""
    path, twin = gguf_model("deepseek_v3", "Q8_0", mla_split=False)
    model, _ = load_gguf(path)
    ref, _ = load_model(twin)
    assert np.array_equal(np.array(model(TOKENS)), np.array(ref(TOKENS)))


def test_tied_embeddings_without_output_tensor(tmp_path):
    """No output.weight: the (quantized) embedding is the head, as llama.cpp does."""
    path, values, cfg = write_gguf(tmp_path / "tied.gguf", "qwen3_moe", "Q4_0", drop=("lm_head.weight",))
    model, config = load_gguf(path)
    assert config["tie_word_embeddings"] is True
    keys = ("vocab_size", "bos_token_id", "eos_token_id", "mlp_only_layers")
    twin = fixtures.write_checkpoint(
        tmp_path / "twin", "qwen3_moe", overrides={**{k: cfg[k] for k in keys}, "tie_word_embeddings": True},
        mutate=lambda t: twin_mutate(values)({k: None for k in t if k != "lm_head.weight"}),
        tokenizer=False,
    )
    ref, _ = load_model(twin)
    assert np.array_equal(np.array(model(TOKENS)), np.array(ref(TOKENS)))


def test_mxfp4_experts_kept_as_mxfp4(gguf_model):
    path, twin = gguf_model("gpt_oss", "MXFP4")
    model, config = load_gguf(path)
    assert config["quantization"]["mode"] == "mxfp4"
    ref, _ = load_model(twin)
    np.testing.assert_allclose(np.array(model(TOKENS)), np.array(ref(TOKENS)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_requested_quantization_matches_safetensors(gguf_model, qtype):
    """With a target that is not the file's own (4 bit, group 64), the GGUF's floats
    are quantized exactly as the safetensors twin's are."""
    path, twin = gguf_model("qwen3_moe", qtype)
    spec = {"bits": 4, "group_size": 64}
    model, config = load_gguf(path, quantize=spec, requantize=True)
    ref, ref_config = load_model(twin, quantize=spec)
    assert config["quantization"] == ref_config["quantization"]
    assert np.array_equal(np.array(model(TOKENS)), np.array(ref(TOKENS)))


def test_requested_quantization_keeps_exact_modules(gguf_model):
    """By default (as for safetensors), exactly transcoded modules are kept; the
    target applies to the float ones (here the routers, F32 in the file)."""
    path, twin = gguf_model("qwen3_moe", "Q5_1")
    model, config = load_gguf(path, quantize={"bits": 4, "group_size": 64})
    q = config["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64
    assert q["model.layers.0.mlp.switch_mlp.gate_proj"] == {"group_size": 32, "bits": 5, "mode": "affine"}
    _assert_transcoded(model, 5)
    assert model.layers[0].mlp.gate.bits == 8  # mlx-lm's router rule under -q


@pytest.mark.parametrize("qtype,bits", [("Q6_K", 8), ("Q3_K", 5), ("Q2_K", 4)])
def test_lossy_types_requantized_with_report(gguf_model, qtype, bits):
    path, twin = gguf_model("qwen3_moe", qtype, WIDE)
    model, config = load_gguf(path)
    report = model.gguf_requantized
    assert report and all(r["type"] == qtype and r["to"]["bits"] == bits for r in report.values())
    assert all(0 < r["rel_rms_error"] < 0.06 for r in report.values())
    _assert_transcoded(model, bits)


def test_split_gguf_loads_as_one(gguf_model, tmp_path):
    path, twin = gguf_model("qwen3_moe", "Q4_0", split_max_tensors=20)
    n = len(list(path.parent.glob("model-*-of-*.gguf")))
    assert n > 1 and path.name == f"model-00001-of-{n:05d}.gguf"
    model, _ = load_gguf(path)
    ref, _ = load_model(twin)
    assert np.array_equal(np.array(model(TOKENS)), np.array(ref(TOKENS)))
    # a missing part is named
    part = path.with_name(f"model-{n:05d}-of-{n:05d}.gguf")
    part.rename(tmp_path / part.name)
    try:
        with pytest.raises(GGUFError, match=part.name):
            load_gguf(path)
    finally:
        (tmp_path / part.name).rename(part)


def test_load_model_takes_a_folder_holding_a_gguf(gguf_model):
    path, _ = gguf_model("qwen3_moe", "Q4_0")
    model, config = load_model(path.parent)  # FolderLoader "gguf" (the twin is a subfolder)
    assert config["model_type"] == "qwen3_moe" and config["quantization"]["bits"] == 4


def test_load_model_takes_a_gguf_path(gguf_model):
    path, _ = gguf_model("qwen3_moe", "Q4_0")
    model, config = load_model(path)
    assert config["model_type"] == "qwen3_moe"


def _write_raw(path, arch, tensors, **meta):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    for k, v in meta.items():
        w.add_uint32(f"{arch}.{k}", v)
    for name, (data, dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    p = _write_raw(tmp_path / "phi.gguf", "phi3", {"token_embd.weight": (np.zeros((8, 32), np.float32), T.F32)})
    with pytest.raises(GGUFError, match=r"architecture 'phi3' is not supported.*qwen3moe"):
        load_gguf(p)


def test_unsupported_type_names_tensor_and_type(gguf_model, tmp_path):
    """A type the gguf package cannot dequantize (Q8_K) fails before any work, naming the tensor."""
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_K]
    p = _write_raw(
        tmp_path / "q8k.gguf", "qwen3moe",
        {"token_embd.weight": (np.zeros((4, size), np.uint8), T.Q8_K),
         "blk.0.ffn_gate_exps.weight": (np.zeros((2, 4, 32), np.float32), T.F32)},
    )
    with pytest.raises(GGUFError, match=r"token_embd\.weight.*Q8_K"):
        load_gguf(p)


def test_unknown_tensor_is_named(gguf_model, tmp_path):
    path, _ = gguf_model("olmoe", "F32")
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(tmp_path / "extra.gguf", "olmoe")
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("blk.0.mystery.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"blk\.0\.mystery\.weight"):
        load_gguf(tmp_path / "extra.gguf")


def test_truncated_file_is_named(gguf_model, tmp_path):
    path, _ = gguf_model("qwen3_moe", "Q8_0")
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"cut\.gguf.*(truncated|not a readable)"):
        load_gguf(cut)


def test_dense_only_gguf_is_refused(tmp_path):
    p = _write_raw(
        tmp_path / "dense.gguf", "llama",
        {"token_embd.weight": (np.zeros((8, 32), np.float32), T.F32),
         "blk.0.ffn_gate.weight": (np.zeros((16, 32), np.float32), T.F32)},
        **{"attention.head_count": 2},
    )
    with pytest.raises(GGUFError, match="no routed experts"):
        load_gguf(p)


def test_tokenizer_and_greedy_tokens_match_twin(gguf_model, tmp_path):
    """The tokenizer from tokenizer.ggml.* encodes as the twin's tokenizer.json does, and
    greedy generation gives the same tokens (what mlx_moe.load('x.gguf') will return)."""
    from mlx_lm import generate

    import mlx_moe

    path, twin = gguf_model("qwen3_moe", "Q8_0")
    tok = load_tokenizer(path)
    ref_model, ref_tok = mlx_moe.load(twin, progress=False)
    prompt = "The theory in the sea"
    assert tok.encode(prompt) == ref_tok.encode(prompt)
    assert set(tok.eos_token_ids) == set(ref_tok.eos_token_ids) == {len(tok.get_vocab()) - 1}
    model, _ = load_gguf(path)
    kw = dict(prompt=prompt, max_tokens=12, verbose=False)
    assert generate(model, tok, **kw) == generate(ref_model, ref_tok, **kw)
    out = save_tokenizer(path, tmp_path / "tok")
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()


def test_converted_folder_loads_in_mlx_lm(gguf_model, tmp_path):
    """What ``convert --hf-path x.gguf`` writes (weights with float32 scales, the
    per-module quantization entry, the tokenizer from save_tokenizer) loads strictly
    in mlx-lm and gives the GGUF model's logits."""
    import json

    from mlx.utils import tree_flatten
    from mlx_lm.utils import load as mlx_lm_load

    from mlx_moe.safetensors_io import save_sharded

    path, _ = gguf_model("qwen3_moe", "Q4_K", WIDE)
    model, config = load_gguf(path)
    out = tmp_path / "converted"
    out.mkdir()
    save_sharded(tree_flatten(model.parameters()), out)
    (out / "config.json").write_text(json.dumps(config))
    save_tokenizer(path, out)
    ref, tok = mlx_lm_load(str(out))
    np.testing.assert_allclose(np.array(ref(TOKENS)), np.array(model(TOKENS)), rtol=1e-5, atol=1e-5)
    assert tok.encode("The theory") == load_tokenizer(path).encode("The theory")


def test_streams_one_layer_at_a_time(gguf_model, monkeypatch):
    """Tensors are read unit by unit (globals, then layer 0, 1, ...), never revisited:
    the streaming loader's memory bound holds for GGUF as for safetensors."""
    import re

    from mlx_moe.gguf.checkpoint import GGUFCheckpoint

    order = []
    get = GGUFCheckpoint.get

    def spy(self, name):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        order.append(int(m.group(1)) if m else -1)
        return get(self, name)

    monkeypatch.setattr(GGUFCheckpoint, "get", spy)
    path, _ = gguf_model("qwen3_moe", "Q4_0")
    load_gguf(path)
    assert order == sorted(order) and set(order) == {-1, 0, 1, 2}


def test_sentencepiece_tokenizer(tmp_path):
    """tokenizer.ggml.model = llama (Mixtral's): BOS added, byte fallback, mlx-lm's SPM detokenizer."""
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += ["▁", "▁t", "he", "▁the", "h", "e", "t", "T", "▁T", "▁s", "a", "s"]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -1.5, -10.0, -10.0, -10.0, -10.0, -4.0, -5.0, -10.0, -10.0]
    w = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * 12)  # unknown, control, byte, normal
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((len(toks), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "spm.gguf")
    ids = tok.encode("The sea")
    assert [toks[i] for i in ids] == ["<s>", "▁T", "he", "▁s", "e", "a"]
    assert tok.eos_token_ids == {2} and isinstance(tok._detokenizer, SPMStreamingDetokenizer)
