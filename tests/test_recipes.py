"""mlx_moe.convert's --quant-predicate, --dtype and -d against mlx_lm.convert with
the same flags on the same tiny checkpoint: equal config ``quantization``
entries, equal weights, equal greedy tokens in mlx-lm and mlx-moe; the MoE
recipe's bits per module; recipes through the streaming loader; bad values."""

import json

import mlx.core as mx
import pytest
from mlx_lm.convert import convert as lm_convert
from mlx_lm.utils import load_model as lm_load_model

from fixtures import tiny_config, write_checkpoint
from mlx_moe import load_model
from mlx_moe.convert import cli, main
from mlx_moe.loading import prepare
from mlx_moe.models import build_model
from mlx_moe.quantization import QuantSpec, plan_quantization
from mlx_moe.recipes import MLX_LM_RECIPES, recipe_predicate

PROMPT = [3, 17, 42, 5, 88, 1, 60]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """float32 qwen3_moe: a dense first layer, then two MoE layers."""
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "src", "qwen3_moe")


def greedy(model, n=8):
    toks = list(PROMPT)
    for _ in range(n):
        toks.append(int(mx.argmax(model(mx.array([toks]))[0, -1]).item()))
    return toks[len(PROMPT):]


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def entries(folder):
    """config.json's ``quantization``; a per-path entry without ``mode`` (mlx-lm's
    router rule writes none) means affine, which ours spells out."""
    q = json.loads((folder / "config.json").read_text()).get("quantization")
    return q and {k: {"mode": "affine", **v} if isinstance(v, dict) else v for k, v in q.items()}


def assert_same_folder(ref, ours, tokens=True):
    qa, qb = entries(ref), entries(ours)
    assert qa == qb
    wa, wb = weights(ref), weights(ours)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype, k
        assert mx.array_equal(wa[k], wb[k]), k
    if tokens:  # mlx-lm reads our folder strictly; both generate the same tokens
        lm, _ = lm_load_model(ours, strict=True)
        moe, _ = load_model(ours)
        assert greedy(lm) == greedy(moe)
    return qb


def both(hf, tmp_path, flags, lm_kwargs, src=None):
    src = src or hf
    ref, ours = tmp_path / "ref", tmp_path / "ours"
    lm_convert(str(src), str(ref), **lm_kwargs)
    main(["--hf-path", str(src), "--mlx-path", str(ours), *flags])
    return ref, ours


@pytest.mark.parametrize("recipe", MLX_LM_RECIPES)
def test_mlx_lm_recipes_match_mlx_lm_convert(hf, tmp_path, recipe):
    ref, ours = both(hf, tmp_path, ["-q", "--q-group-size", "32", "--quant-predicate", recipe],
                     dict(quantize=True, q_group_size=32, quant_predicate=recipe))
    q = assert_same_folder(ref, ours)
    assert len({v["bits"] for v in q.values() if isinstance(v, dict)}) == 2  # really mixed


def test_recipe_without_group_size_gives_mlx_lm_weights(hf, tmp_path):
    """mlx-lm writes ``"group_size": null`` per path then; we write the 64 it means."""
    ref, ours = both(hf, tmp_path, ["--quant-predicate", "mixed_4_6"],  # implies -q
                     dict(quantize=True, quant_predicate="mixed_4_6"))
    wa, wb = weights(ref), weights(ours)
    assert sorted(wa) == sorted(wb) and all(mx.array_equal(wa[k], wb[k]) for k in wa)
    q = json.loads((ours / "config.json").read_text())["quantization"]
    assert {v["group_size"] for v in q.values() if isinstance(v, dict)} == {64}


def test_moe_recipe_matches_mlx_lm_with_the_same_predicate(hf, tmp_path):
    """mlx-lm has no MoE recipe: give mlx_lm.convert ours as a callable."""
    model, *_ = prepare(hf)
    pred = recipe_predicate("moe_4_8", model, 32)
    ref, ours = both(hf, tmp_path, ["--quant-predicate", "moe_4_8", "--q-group-size", "32"],
                     dict(quantize=True, q_group_size=32, quant_predicate=pred))
    q = assert_same_folder(ref, ours)
    assert q["model.layers.1.mlp.switch_mlp.down_proj"]["bits"] == 4
    assert q["model.layers.1.self_attn.v_proj"]["bits"] == 8


@pytest.mark.parametrize("dtype,quantize", [("bfloat16", False), ("float16", True), ("float32", True)])
def test_dtype_matches_mlx_lm_convert(hf, tmp_path, dtype, quantize):
    q = ["-q", "--q-group-size", "32"] if quantize else []
    ref, ours = both(hf, tmp_path, ["--dtype", dtype, *q],
                     dict(dtype=dtype, quantize=quantize, q_group_size=32 if quantize else None))
    # mlx-lm's experts run half precision only on a GPU; tokens in float32.
    assert_same_folder(ref, ours, tokens=dtype == "float32")
    assert weights(ours)["model.layers.1.self_attn.q_proj.weight" if not quantize
                         else "model.layers.1.self_attn.q_proj.scales"].dtype == getattr(mx, dtype)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_dequantize_matches_mlx_lm_convert(hf, tmp_path, dtype):
    """Without --dtype mlx-lm casts to config.json's ``torch_dtype`` (float32 here),
    ours keeps the weights' own (bfloat16): the same as mlx-lm's --dtype bfloat16."""
    qdir = tmp_path / "q"
    lm_convert(str(hf), str(qdir), quantize=True, q_group_size=32, dtype="bfloat16")
    extra = ["--dtype", dtype] if dtype else []
    ref, ours = both(hf, tmp_path, ["-d", *extra], dict(dequantize=True, dtype=dtype or "bfloat16"), src=qdir)
    assert_same_folder(ref, ours, tokens=dtype == "float32")
    cfg = json.loads((ours / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert not any(k.endswith(".scales") for k in weights(ours))


def test_streaming_load_with_recipe_equals_converted_folder(hf, tmp_path):
    for recipe in ("moe_4_8", "mixed_3_6"):
        spec = {"recipe": recipe, "group_size": 32}
        main(["--hf-path", str(hf), "--mlx-path", str(tmp_path / recipe), "--quant-predicate", recipe,
               "--q-group-size", "32"])
        streamed, config = load_model(hf, quantize=spec)
        lm, _ = lm_load_model(tmp_path / recipe, strict=True)
        assert greedy(streamed) == greedy(lm)
        saved = json.loads((tmp_path / recipe / "config.json").read_text())["quantization"]
        assert config["quantization"] == saved
    a, _ = load_model(hf, quantize="moe_4_8")  # a recipe name alone: its defaults (group 64)
    assert a.model.layers[1].mlp.switch_mlp.up_proj.bits == 4


def moe_bits(arch, layers):
    cfg = {**tiny_config(arch), "num_hidden_layers": layers}
    if arch == "qwen2_moe":
        cfg["mlp_only_layers"] = [1]
    model, _ = build_model(cfg)
    plan = plan_quantization(model, QuantSpec.parse({"recipe": "moe_4_8", "group_size": 32}))
    assert all(v["group_size"] == 32 and v["mode"] == "affine" for v in plan.values())
    return {k: v["bits"] for k, v in plan.items()}


def test_moe_recipe_bits_per_module():
    bits = moe_bits("qwen2_moe", 16)  # shared experts; layer 1 dense; edges: 2 first, 2 last
    assert bits["model.embed_tokens"] == 4 and bits["lm_head"] == 6
    for i in range(16):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert bits[p + "self_attn." + proj] == 8
        if i == 1:
            assert all(bits[p + f"mlp.{x}"] == 8 for x in ("gate_proj", "up_proj", "down_proj"))
            continue
        assert bits[p + "mlp.gate"] == 8  # router
        for x in ("gate_proj", "up_proj", "down_proj"):
            assert bits[p + "mlp.shared_expert." + x] == 8
            assert bits[p + "mlp.switch_mlp." + x] == (6 if i < 2 or i >= 14 else 4), (i, x)
    # Under 8 layers no layer counts as first/last eighth: every routed expert at 4.
    small = moe_bits("qwen3_moe", 3)
    assert {v for k, v in small.items() if ".switch_mlp." in k} == {4}


@pytest.mark.parametrize("flags,names", [
    (["--quant-predicate", "mixed_9_9"], "--quant-predicate"),
    (["--quant-predicate", "moe_4_8", "--q-mode", "mxfp4"], "--quant-predicate"),
    (["--dtype", "int8"], "--dtype"),
    (["-d", "-q"], "-d/--dequantize"),
    (["--dtype", "float16", "--expert-file-layout"], "--expert-file-layout"),
])
def test_bad_values_one_line_exit_2(hf, tmp_path, capsys, flags, names):
    with pytest.raises(SystemExit) as e:
        cli(["--hf-path", str(hf), "--mlx-path", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if l.startswith("mlx_moe.convert: error: ")]
    assert len(errors) == 1 and names in errors[0], err
    assert all(l.startswith(("usage:", " ", "mlx_moe.convert: error: ")) for l in err), err
    assert not (tmp_path / "out").exists()
