"""Random-weight MoE models and checkpoints from real configs, built layer by layer.

``random_model(config, quantize, seed)`` gives our model for a real config
(``qwen3-30b-a3b``, ``mixtral-8x7b``, ``gpt-oss-20b``, ``deepseek-v3-small``,
``tiny``, a config dict, or a path to a config.json / model folder) filled with
random values, quantized as it is built: every decoder layer is generated,
quantized and evaluated on its own, so the model never exists in bf16 and
memory stays near the quantized size. ``mlx_lm_twin(model, config)`` builds
mlx-lm's own model for the same config holding the very same arrays.

``write_random_checkpoint(folder, config)`` writes a Hugging Face checkpoint
(per-expert tensors, sharded safetensors with an index, config.json and a small
tokenizer) one tensor at a time: only one tensor -- one expert's matrix for
experts -- is ever in memory.

Every tensor's values come from a key derived from ``seed`` and its name (per
expert for experts, per block of rows for large matrices), so the same seed
gives the same values whatever the order: ``load_model(write_random_checkpoint(
f, cfg, seed=s))`` holds exactly ``random_model(cfg, None, seed=s)``'s arrays
(except DeepSeek's ``kv_b_proj``, which mlx-lm splits on load).
"""

import contextlib
import copy
import io
import json
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, quantize_model

from .experts import MoEExperts
from .loading import set_backend
from .models import build_model, get_architecture
from .quantization import QuantSpec, apply_plan, config_entry, plan_quantization

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Float elements generated per block for large non-expert matrices (64 MB of fp32).
BLOCK_ELEMS = 1 << 24
# Float bytes generated before quantized pieces are evaluated and the floats dropped.
CHUNK_BYTES = 256 << 20
ROUTED_INIT_STD = 0.02  # 1-D parameters that are not norms (biases, sinks)

# ------------------------------------------------------------------ configs

_QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}

_MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}

_GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "attention_bias": True,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "sliding_window": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 150000,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "max_position_embeddings": 131072,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "vocab_size": 201088,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}

_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "attention_bias": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "max_position_embeddings": 163840,
    "tie_word_embeddings": False,
    "vocab_size": 129280,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}

_TINY = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}

CONFIGS: Dict[str, dict] = {
    "qwen3-30b-a3b": _QWEN3_30B,
    "mixtral-8x7b": _MIXTRAL_8X7B,
    "gpt-oss-20b": _GPT_OSS_20B,
    # DeepSeek-V3's real dimensions, cut to 4 layers (1 dense + 3 MoE): ~19 GB at 4 bits.
    "deepseek-v3-small": {**_DEEPSEEK_V3, "num_hidden_layers": 4, "first_k_dense_replace": 1},
    "deepseek-v3": _DEEPSEEK_V3,
    "tiny": _TINY,
}


def get_config(config) -> dict:
    """A config dict from a name in ``CONFIGS``, a dict, a config.json or a model folder.

    Source quantization (``quantization_config`` of fp8 / mxfp4 releases, an mlx
    ``quantization`` entry) is dropped: random models are quantized by the caller.
    """
    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
    elif str(config) in CONFIGS:
        cfg = copy.deepcopy(CONFIGS[str(config)])
    else:
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ValueError(
                f"Unknown config '{config}': not one of {sorted(CONFIGS)} nor a config.json path"
            )
        cfg = json.loads(path.read_text())
        if "model_type" not in cfg and "text_config" in cfg:
            cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k != "text_config"}}
    cfg.pop("quantization_config", None)
    cfg.pop("quantization", None)
    get_architecture(cfg)  # fail early on unsupported model types
    return cfg


def load_config_for_gb(gb: float) -> dict:
    """A Qwen3-MoE config whose bf16 checkpoint is about ``gb`` GB (for load benchmarks)."""
    H, I, vocab = 1024, 512, 16384
    target = gb * 1e9
    embed = 2 * vocab * H * 2
    attn = (2 * H * H + 2 * H * 256 + 64 * H) * 2
    layers = int(min(48, max(2, round(target / 256e6))))
    expert = 3 * H * I * 2
    E = (target - embed - layers * attn) / (layers * expert)
    E = int(max(8, round(E / 8) * 8))
    return {
        **_TINY,
        "hidden_size": H,
        "intermediate_size": 4 * H,
        "moe_intermediate_size": I,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "num_experts": E,
        "num_experts_per_tok": 8,
        "vocab_size": vocab,
    }


# ------------------------------------------------------------------ random values


def _key(seed: int, name: str):
    return mx.random.key(((seed & 0xFFFFFFFF) << 32) | zlib.crc32(name.encode()))


def _is_norm(name: str) -> bool:
    owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return "norm" in owner


def _normal(name, shape, std, dtype, seed):
    return (mx.random.normal(tuple(shape), key=_key(seed, name)) * std).astype(dtype)


def _float_value(name, shape, dtype, seed):
    """One block's values: ones for norm weights, N(0, 0.02) for other 1-D,
    N(0, 1/in) for matrices."""
    if len(shape) == 1:
        if _is_norm(name):
            return mx.ones(tuple(shape), dtype=dtype)
        return _normal(name, shape, ROUTED_INIT_STD, dtype, seed)
    return _normal(name, shape, shape[-1] ** -0.5, dtype, seed)


def expert_block(name: str, e: int, shape, dtype=mx.bfloat16, seed: int = 0) -> mx.array:
    """Expert ``e`` of the stacked expert tensor ``name`` (our stacked name), shape ``shape[1:]``."""
    return _float_value(f"{name}#e{e}", tuple(shape[1:]), dtype, seed)


def tensor_blocks(
    name: str, shape, dtype=mx.bfloat16, seed: int = 0, expert: bool = False
) -> Iterator[mx.array]:
    """The random values of tensor ``name`` as consecutive blocks along axis 0.

    Experts come one per block (``[1, out, in]``), other matrices in blocks of
    rows of at most ``BLOCK_ELEMS`` elements. Concatenated, the blocks are the
    tensor; block boundaries depend only on the shape, so values are stable.
    """
    shape = tuple(shape)
    if expert:
        for e in range(shape[0]):
            yield expert_block(name, e, shape, dtype, seed)[None]
        return
    if len(shape) <= 1:
        yield _float_value(name, shape, dtype, seed)
        return
    row = math.prod(shape[1:])
    rows = max(1, BLOCK_ELEMS // row)
    if rows >= shape[0]:
        yield _normal(f"{name}#b0", shape, shape[-1] ** -0.5, dtype, seed)
        return
    for i, r0 in enumerate(range(0, shape[0], rows)):
        n = min(rows, shape[0] - r0)
        yield _normal(f"{name}#b{i}", (n, *shape[1:]), shape[-1] ** -0.5, dtype, seed)


def random_tensor(name, shape, dtype=mx.bfloat16, seed=0, expert=False) -> mx.array:
    """The whole tensor (evaluated). Mind the size: use ``tensor_blocks`` for big ones."""
    blocks = list(tensor_blocks(name, shape, dtype, seed, expert))
    out = blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=0)
    mx.eval(out)
    return out


def random_quantized(
    name, shape, group_size=64, bits=4, mode="affine", dtype=mx.bfloat16, seed=0, expert=False
) -> Tuple[mx.array, mx.array, Optional[mx.array]]:
    """``mx.quantize`` of ``random_tensor(name, shape)``, built block by block.

    The float values exist only ``CHUNK_BYTES`` at a time; the quantized pieces
    are evaluated as they come and concatenated at the end.
    """
    pieces: List[tuple] = []
    pending, pending_bytes = [], 0
    for block in tensor_blocks(name, shape, dtype, seed, expert):
        q = mx.quantize(block, group_size, bits, mode=mode)
        pending.append(q)
        pending_bytes += block.size * 4
        if pending_bytes >= CHUNK_BYTES:
            mx.eval(pending)
            pieces += pending
            pending, pending_bytes = [], 0
    mx.eval(pending)
    pieces += pending
    parts = list(zip(*pieces))
    out = [p[0] if len(p) == 1 else mx.concatenate(p, axis=0) for p in parts]
    mx.eval(out)
    del pieces, parts
    w, scales, *biases = out
    return w, scales, (biases[0] if biases else None)


# ------------------------------------------------------------------ random models


def _is_quantized_module(m) -> bool:
    return hasattr(m, "scales") and hasattr(m, "bits") and hasattr(m, "group_size")


def _units(names):
    """Parameter names grouped: non-layer first, then one group per decoder layer."""
    groups: Dict[Optional[int], list] = {}
    for n in names:
        m = LAYER_RE.match(n)
        groups.setdefault(int(m.group(1)) if m else None, []).append(n)
    return [groups[k] for k in sorted(groups, key=lambda k: -1 if k is None else k)]


def fill_random(model: nn.Module, seed: int = 0, dtype=mx.bfloat16, progress: bool = False):
    """Give every parameter of ``model`` random values, one decoder layer at a time.

    Quantized modules get ``mx.quantize`` of random normal values of their float
    shape (with their own group size / bits / mode); routed experts are generated
    per expert. Each layer is evaluated before the next one is generated.
    """
    modules = dict(model.named_modules())
    expert_paths = {p for p, m in modules.items() if isinstance(m, MoEExperts)}
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    units = _units(list(shapes))
    if progress:
        try:
            from tqdm import tqdm

            units = tqdm(units, desc="Random weights", unit="layer")
        except ImportError:
            pass
    for names in units:
        new = {}
        by_module: Dict[str, list] = {}
        for n in names:
            path, attr = n.rsplit(".", 1) if "." in n else ("", n)
            by_module.setdefault(path, []).append(attr)
        for path, attrs in by_module.items():
            m = modules[path]
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            expert = parent in expert_paths
            full = (lambda a: f"{path}.{a}" if path else a)
            if _is_quantized_module(m) and "weight" in attrs:
                packed = shapes[full("weight")]
                float_shape = (*packed[:-1], packed[-1] * 32 // m.bits)
                w, s, b = random_quantized(
                    full("weight"), float_shape, m.group_size, m.bits,
                    getattr(m, "mode", "affine"), dtype, seed, expert,
                )
                new[full("weight")], new[full("scales")] = w, s
                if b is not None:
                    new[full("biases")] = b
                attrs = [a for a in attrs if a not in ("weight", "scales", "biases")]
            for a in attrs:
                new[full(a)] = random_tensor(full(a), shapes[full(a)], dtype, seed, expert)
        model.update(tree_unflatten(list(new.items())))
        mx.eval(list(new.values()))
        del new
        mx.clear_cache()
    return model


def random_model(
    config,
    quantize=None,
    seed: int = 0,
    dtype=mx.bfloat16,
    backend: str = "auto",
    progress: bool = False,
):
    """Our model for ``config`` with random weights, quantized while it is built.

    ``quantize``: None or e.g. ``{"bits": 4, "group_size": 64}`` (mlx-lm's rules
    pick which modules). Returns ``(model, config)``; ``config`` carries the
    ``quantization`` entry a saved folder would have.
    """
    config = get_config(config)
    spec = QuantSpec.parse(quantize)
    model, _ = build_model(config)
    plan = plan_quantization(model, spec) if spec else {}
    apply_plan(model, plan)
    out_config = dict(config)
    if plan:
        out_config["quantization"] = config_entry(spec, plan)
        out_config["quantization_config"] = out_config["quantization"]
    fill_random(model, seed, dtype, progress)
    model.eval()
    set_backend(model, backend)
    return model, out_config


def mlx_lm_twin(model: nn.Module, config: dict, quantize=None) -> nn.Module:
    """mlx-lm's own model for ``config``, quantized by ``mlx_lm.utils.quantize_model``
    with the same settings, holding the same arrays as ``model`` (no copy)."""
    base = get_config(config)
    spec = QuantSpec.parse(quantize)
    if spec is None and "quantization" in config:
        q = config["quantization"]
        spec = QuantSpec.parse({k: q[k] for k in ("bits", "group_size", "mode") if k in q})
    model_class, args_class = _get_classes(base)
    twin = model_class(args_class.from_dict(base))
    if spec is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_model(twin, base, spec.group_size, spec.bits, mode=spec.mode)
    twin.load_weights(list(tree_flatten(model.parameters())), strict=True)
    twin.eval()
    return twin


def model_bytes(config, quantize=None, dtype=mx.bfloat16) -> int:
    """Bytes of the model's parameters (quantized as asked), from the lazy skeleton."""
    config = get_config(config)
    spec = QuantSpec.parse(quantize)
    model, _ = build_model(config)
    if spec:
        apply_plan(model, plan_quantization(model, spec))
    total = 0
    for _, v in tree_flatten(model.parameters()):
        total += v.size * (dtype.size if mx.issubdtype(v.dtype, mx.floating) else v.dtype.size)
    return total


# ------------------------------------------------------------------ checkpoints

_ST_DTYPES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32"}


def _checkpoint_plan(config: dict, dtype, seed: int):
    """``[(hf_name, shape, blocks)]`` for the whole model, layers in order.

    Routed experts are written per expert under the architecture's Hugging Face
    names; gpt-oss (whose HF layout is stacked mxfp4) is written stacked in
    mlx-lm's layout, which both loaders read.
    """
    model, arch = build_model(config)
    modules = dict(model.named_modules())
    expert_paths = {p for p, m in modules.items() if isinstance(m, MoEExperts)}
    reverse = {ours: hf for hf, ours in arch.layout.proj_names.items()}
    per_expert = arch.layout.gate_up == "concat"
    entries = []
    for name, arr in tree_flatten(model.parameters()):
        shape = tuple(arr.shape)
        path, attr = name.rsplit(".", 1)
        proj_path, proj = path.rsplit(".", 1) if "." in path else ("", path)
        if proj_path in expert_paths:
            if not per_expert:
                entries.append((name, shape, lambda n=name, s=shape: tensor_blocks(n, s, dtype, seed, True)))
                continue
            m = LAYER_RE.match(name)
            container = f"model.layers.{m.group(1)}.{arch.layout.hf_containers[0]}"
            for e in range(shape[0]):
                entries.append((
                    f"{container}.{e}.{reverse[proj]}.{attr}",
                    shape[1:],
                    lambda n=name, e=e, s=shape: iter([expert_block(n, e, s, dtype, seed)]),
                ))
            continue
        if attr == "weight" and proj in ("embed_q", "unembed_out") and config.get("model_type") == "deepseek_v3":
            if proj == "unembed_out":
                continue
            # mlx-lm splits HF's kv_b_proj into embed_q / unembed_out on load.
            heads = config["num_attention_heads"]
            rows = heads * (config["qk_nope_head_dim"] + config["v_head_dim"])
            kv = f"{proj_path}.kv_b_proj.weight"
            kshape = (rows, config["kv_lora_rank"])
            entries.append((kv, kshape, lambda n=kv, s=kshape: tensor_blocks(n, s, dtype, seed)))
            continue
        entries.append((name, shape, lambda n=name, s=shape: tensor_blocks(n, s, dtype, seed)))
    order = lambda e: (-1 if not LAYER_RE.match(e[0]) and "embed" in e[0] else
                       int(LAYER_RE.match(e[0]).group(1)) if LAYER_RE.match(e[0]) else 1 << 30)
    entries.sort(key=order)  # stable: keeps expert order within a layer
    return entries


def _write_safetensors(path: Path, entries, dtype):
    """Write ``entries`` to one safetensors file, evaluating one block at a time."""
    item = dtype.size
    header, offset = {}, 0
    for name, shape, _ in entries:
        n = math.prod(shape) * item
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, blocks in entries:
            written = 0
            for b in blocks():
                b = b.astype(dtype)
                mx.eval(b)
                f.write(memoryview(b))
                written += b.nbytes
                del b
            if written != math.prod(shape) * item:
                raise RuntimeError(f"{name}: wrote {written} bytes, expected {math.prod(shape) * item}")
    os.replace(tmp, path)
    return offset


def _write_tokenizer(folder: Path, config: dict):
    """A small word-level tokenizer so tokenizer-requiring tools (mlx_lm.convert) work."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(min(1000, config["vocab_size"]) - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": config.get("max_position_embeddings", 4096),
        "clean_up_tokenization_spaces": False,
    }, indent=2))


def write_random_checkpoint(
    folder,
    config,
    dtype=mx.bfloat16,
    seed: int = 0,
    max_shard_gb: float = 2.0,
    tokenizer: bool = True,
    progress: bool = False,
) -> Path:
    """Write a random Hugging Face checkpoint for ``config`` into ``folder``.

    Per-expert tensors (``model.layers.L.mlp.experts.E.gate_proj.weight``;
    Mixtral's ``w1/w2/w3``), sharded ``model-XXXXX-of-YYYYY.safetensors`` plus
    ``model.safetensors.index.json``, ``config.json`` and (``tokenizer=True``) a
    small tokenizer. Tensors are generated and written one at a time (experts
    one expert at a time), so memory stays at one tensor whatever the size.
    Returns the folder.
    """
    config = get_config(config)
    config["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}[dtype]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = _checkpoint_plan(config, dtype, seed)
    limit = max_shard_gb * 1e9
    shards, current, size = [], [], 0
    for e in entries:
        n = math.prod(e[1]) * dtype.size
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    if current:
        shards.append(current)
    it = enumerate(shards)
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(it, total=len(shards), desc="Writing", unit="shard")
        except ImportError:
            pass
    weight_map, total = {}, 0
    for i, shard in it:
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(folder / fname, shard, dtype)
        weight_map.update({name: fname for name, _, _ in shard})
        mx.clear_cache()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
    ))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        _write_tokenizer(folder, config)
    return folder


__all__ = [
    "CONFIGS",
    "get_config",
    "load_config_for_gb",
    "random_model",
    "mlx_lm_twin",
    "fill_random",
    "model_bytes",
    "random_quantized",
    "random_tensor",
    "tensor_blocks",
    "write_random_checkpoint",
]
