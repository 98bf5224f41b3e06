"""Deterministic writers of tiny MoE checkpoints, in the layouts real publishers use.

Not a test module: the tests import it. Everything here is independent of
``mlx_moe`` (it writes safetensors byte by byte), so a bug in our loader or
safetensors reader cannot hide in the fixtures.

One seed gives one set of underlying float weights (``canonical_weights``); every
layout of that seed carries exactly those floats:

* every weight matrix that any layout quantizes is drawn on a grid that FP4
  (e2m1) x power-of-two per 32-wide group and FP8 (e4m3) x power-of-two per
  128x128 block both represent exactly, so ``fp8`` / ``mxfp4`` checkpoints
  dequantize to the very floats the ``per_expert`` checkpoint stores;
* ``bfloat16`` checkpoints round the remaining tensors to bf16 once, in the
  canonical weights, so every layout stores the same bf16 values.

Layouts (``LAYOUTS``):

``per_expert``   HF standard: ``{layer}.mlp.experts.{e}.gate_proj.weight`` [I, H]
                 (Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``).
``mlx_float``    an mlx-lm float folder: ``switch_mlp.*`` stacked ``[E, out, in]``
                 (written by mlx-lm itself, except gpt-oss, see below).
``stacked``      transformers-v5 fused: ``experts.gate_up_proj`` [E, 2I, H]
                 (gate rows then up rows), ``experts.down_proj`` [E, H, I].
``stacked_t``    the transposed fused form: ``gate_up_proj`` [E, H, 2I] (gate
                 columns then up columns), ``down_proj`` [E, I, H].
``gpt_oss``      gpt-oss as transformers writes it: ``gate_up_proj`` [E, H, 2I]
                 with interleaved gate/up columns + ``gate_up_proj_bias`` [E, 2I],
                 ``down_proj`` [E, I, H] + ``down_proj_bias`` [E, H].
``moe_direct``   Gemma-4 style, experts directly under ``{layer}.moe.``:
                 ``moe.gate_up_proj`` [E, 2I, H], ``moe.down_proj`` [E, H, I].
``moe_direct_per_expert``  ``{layer}.moe.{e}.gate_proj.weight`` [I, H] etc.
``layer_experts`` transformers' Gemma-4 naming: ``{layer}.experts.gate_up_proj``
                 [E, 2I, H] / ``{layer}.experts.down_proj`` [E, H, I].
``fp8``          DeepSeek-V3 / Qwen3-FP8 style: every linear weight except router,
                 embeddings and lm_head as F8_E4M3 + ``weight_scale_inv`` float32
                 per 128x128 block (partial edge blocks), ``quantization_config``
                 ``{"quant_method": "fp8", "weight_block_size": [128, 128], ...}``.
``mxfp4``        gpt-oss original: ``gate_up_proj_blocks`` [E, 2I, H/32, 16] uint8,
                 ``gate_up_proj_scales`` [E, 2I, H/32] uint8 (e8m0), the same for
                 ``down_proj``, float biases; ``quantization_config``
                 ``{"quant_method": "mxfp4", ...}``.
``mlx``          an mlx-lm converted folder: mlx-lm's own ``quantize_model``
                 (4 bit, group 32) + ``save_model`` + ``save_config`` on the float
                 reference: ``switch_mlp.*`` weight/scales/biases + ``quantization``.

gpt-oss has no per-expert checkpoints and mlx-lm cannot read transformers' fused
``[E, H, 2I]`` tensors, so its float reference (``reference_layout``) is
``mlx_float``: mlx-lm's own stacked names ``mlp.experts.{gate,up,down}_proj.{weight,bias}``.
"""

import copy
import json
import math
import re
import struct
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")

LAYOUTS = (
    "per_expert",
    "mlx_float",
    "stacked",
    "stacked_t",
    "gpt_oss",
    "moe_direct",
    "moe_direct_per_expert",
    "layer_experts",
    "fp8",
    "mxfp4",
    "mlx",
)

# Which layouts exist for which architecture.
_FUSED = ("stacked", "stacked_t", "moe_direct", "moe_direct_per_expert", "layer_experts")
ARCH_LAYOUTS = {
    "qwen3_moe": ("per_expert", "mlx_float", *_FUSED, "fp8", "mlx"),
    "mixtral": ("per_expert", "mlx_float", *_FUSED, "mlx"),
    "qwen2_moe": ("per_expert", "mlx_float", *_FUSED, "mlx"),
    "olmoe": ("per_expert", "mlx_float", *_FUSED, "mlx"),
    "deepseek_v3": ("per_expert", "mlx_float", *_FUSED, "fp8", "mlx"),
    "gpt_oss": ("mlx_float", "gpt_oss", "mxfp4", "mlx"),
}

MLX_QUANT = {"group_size": 32, "bits": 4}  # what the ``mlx`` layout is quantized with


def reference_layout(arch: str) -> str:
    """The float layout mlx-lm loads natively for ``arch`` (our oracle's input)."""
    return "mlx_float" if arch == "gpt_oss" else "per_expert"


# ------------------------------------------------------------------ configs


def tiny_config(arch: str, dtype: str = "float32") -> dict:
    """A tiny ``config.json`` with the keys the real published configs carry."""
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16"}[dtype]
    common = {
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if arch == "qwen3_moe":  # after Qwen/Qwen3-30B-A3B
        cfg = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "head_dim": 16,
            "hidden_size": 64,
            "intermediate_size": 192,
            "max_position_embeddings": 512,
            "max_window_layers": 3,
            "mlp_only_layers": [0],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": 160,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "output_router_logits": False,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.001,
            "sliding_window": None,
            "transformers_version": "4.51.0",
            "use_sliding_window": False,
        }
    elif arch == "mixtral":  # after mistralai/Mixtral-8x7B-v0.1
        cfg = {
            "architectures": ["MixtralForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 96,
            "max_position_embeddings": 512,
            "model_type": "mixtral",
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "output_router_logits": False,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.02,
            "sliding_window": None,
            "transformers_version": "4.36.0.dev0",
        }
    elif arch == "qwen2_moe":  # after Qwen/Qwen1.5-MoE-A2.7B
        cfg = {
            "architectures": ["Qwen2MoeForCausalLM"],
            "decoder_sparse_step": 1,
            "hidden_size": 64,
            "intermediate_size": 192,
            "max_position_embeddings": 512,
            "max_window_layers": 2,
            "model_type": "qwen2_moe",
            "moe_intermediate_size": 96,
            "norm_topk_prob": False,
            "num_attention_heads": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 4,
            "output_router_logits": False,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": 128,
            "sliding_window": 512,
            "transformers_version": "4.40.0.dev0",
            "use_sliding_window": False,
        }
    elif arch == "olmoe":  # after allenai/OLMoE-1B-7B-0924
        cfg = {
            "architectures": ["OlmoeForCausalLM"],
            "attention_bias": False,
            "clip_qkv": None,
            "hidden_size": 64,
            "intermediate_size": 96,
            "max_position_embeddings": 512,
            "model_type": "olmoe",
            "norm_topk_prob": False,
            "num_attention_heads": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 4,
            "output_router_logits": False,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "router_aux_loss_coef": 0.01,
            "transformers_version": "4.43.0.dev0",
        }
    elif arch == "deepseek_v3":  # after deepseek-ai/DeepSeek-V3
        cfg = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "attention_bias": False,
            "ep_size": 1,
            "first_k_dense_replace": 1,
            "hidden_size": 64,
            "intermediate_size": 192,
            "kv_lora_rank": 32,
            "max_position_embeddings": 512,
            "model_type": "deepseek_v3",
            "moe_intermediate_size": 160,
            "moe_layer_freq": 1,
            "n_group": 2,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "num_nextn_predict_layers": 0,
            "pretraining_tp": 1,
            "q_lora_rank": 48,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 10000,
            "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid",
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "transformers_version": "4.33.1",
            "v_head_dim": 16,
        }
    elif arch == "gpt_oss":  # after openai/gpt-oss-20b
        cfg = {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "experts_per_token": 2,
            "head_dim": 16,
            "hidden_size": 64,
            "initial_context_length": 4096,
            "intermediate_size": 64,
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 4096,
            "model_type": "gpt_oss",
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "num_local_experts": 8,
            "output_router_logits": False,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": 150000,
            "router_aux_loss_coef": 0.9,
            "sliding_window": 6,
            "swiglu_limit": 7.0,
            "transformers_version": "4.55.0.dev0",
        }
    else:
        raise ValueError(f"unknown arch {arch!r}")
    out = {**common, **cfg}
    return dict(sorted(out.items()))


def _n_experts(cfg):
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in cfg:
            return cfg[key]
    raise KeyError("no expert count")


def _expert_dims(cfg):
    arch = cfg["model_type"]
    H = cfg["hidden_size"]
    I = cfg["intermediate_size"] if arch in ("mixtral", "olmoe", "gpt_oss") else cfg["moe_intermediate_size"]
    return _n_experts(cfg), H, I


def _is_sparse(cfg, l):
    arch = cfg["model_type"]
    if arch in ("qwen3_moe", "qwen2_moe"):
        step = cfg.get("decoder_sparse_step", 1) or 1
        return l not in cfg.get("mlp_only_layers", []) and (l + 1) % step == 0
    if arch == "deepseek_v3":
        return l >= cfg["first_k_dense_replace"] and l % cfg["moe_layer_freq"] == 0
    return True


# Per architecture: where the routed experts live and their projection names
# (gate, up, down) in HF per-expert checkpoints; mlx-lm's stacked prefix.
EXPERT_CONTAINER = {a: "mlp.experts" for a in ARCHS}
EXPERT_CONTAINER["mixtral"] = "block_sparse_moe.experts"
PROJ_NAMES = {a: ("gate_proj", "up_proj", "down_proj") for a in ARCHS}
PROJ_NAMES["mixtral"] = ("w1", "w3", "w2")
MLX_PREFIX = {a: "mlp.switch_mlp" for a in ARCHS}
MLX_PREFIX["mixtral"] = "block_sparse_moe.switch_mlp"
MLX_PREFIX["gpt_oss"] = "mlp.experts"


def moe_layers(arch: str, cfg: Optional[dict] = None):
    cfg = cfg or tiny_config(arch)
    return [l for l in range(cfg["num_hidden_layers"]) if _is_sparse(cfg, l)]


# ------------------------------------------------------------ canonical weights

FP4_VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32
)
GRID_EXPONENTS = np.array([-6, -5, -4])


def _param_specs(cfg):
    """Ordered ``name -> (shape, kind)`` of the HF per-expert checkpoint.

    kinds: ``grid`` (a linear weight drawn on the FP4/FP8-exact grid), ``embed``,
    ``head``, ``router``, ``norm``, ``bias``, ``small`` (sinks), ``corr`` (DeepSeek's
    float32 ``e_score_correction_bias``).
    """
    arch = cfg["model_type"]
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    E, _, I = _expert_dims(cfg)
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    specs = {"model.embed_tokens.weight": ((V, H), "embed")}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        specs[f"{p}.input_layernorm.weight"] = ((H,), "norm")
        a = f"{p}.self_attn"
        if arch == "deepseek_v3":
            qh = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
            specs[f"{a}.q_a_proj.weight"] = ((cfg["q_lora_rank"], H), "grid")
            specs[f"{a}.q_a_layernorm.weight"] = ((cfg["q_lora_rank"],), "norm")
            specs[f"{a}.q_b_proj.weight"] = ((nh * qh, cfg["q_lora_rank"]), "grid")
            specs[f"{a}.kv_a_proj_with_mqa.weight"] = (
                (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], H),
                "grid",
            )
            specs[f"{a}.kv_a_layernorm.weight"] = ((cfg["kv_lora_rank"],), "norm")
            specs[f"{a}.kv_b_proj.weight"] = (
                (nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"]),
                "grid",
            )
            specs[f"{a}.o_proj.weight"] = ((H, nh * cfg["v_head_dim"]), "grid")
        else:
            qkv_bias = arch in ("qwen2_moe", "gpt_oss")
            for n, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
                specs[f"{a}.{n}.weight"] = ((out, H), "grid")
                if qkv_bias:
                    specs[f"{a}.{n}.bias"] = ((out,), "bias")
            specs[f"{a}.o_proj.weight"] = ((H, nh * hd), "grid")
            if arch == "gpt_oss":
                specs[f"{a}.o_proj.bias"] = ((H,), "bias")
                specs[f"{a}.sinks"] = ((nh,), "small")
            if arch == "qwen3_moe":
                specs[f"{a}.q_norm.weight"] = ((hd,), "norm")
                specs[f"{a}.k_norm.weight"] = ((hd,), "norm")
            if arch == "olmoe":
                specs[f"{a}.q_norm.weight"] = ((nh * hd,), "norm")
                specs[f"{a}.k_norm.weight"] = ((nkv * hd,), "norm")
        specs[f"{p}.post_attention_layernorm.weight"] = ((H,), "norm")

        if not _is_sparse(cfg, l):
            Id = cfg["intermediate_size"]
            specs[f"{p}.mlp.gate_proj.weight"] = ((Id, H), "grid")
            specs[f"{p}.mlp.up_proj.weight"] = ((Id, H), "grid")
            specs[f"{p}.mlp.down_proj.weight"] = ((H, Id), "grid")
            continue

        block = "block_sparse_moe" if arch == "mixtral" else "mlp"
        if arch == "gpt_oss":
            specs[f"{p}.mlp.router.weight"] = ((E, H), "router")
            specs[f"{p}.mlp.router.bias"] = ((E,), "bias")
        else:
            specs[f"{p}.{block}.gate.weight"] = ((E, H), "router")
        if arch == "deepseek_v3":
            specs[f"{p}.mlp.gate.e_score_correction_bias"] = ((E,), "corr")
        g, u, d = PROJ_NAMES[arch]
        c = EXPERT_CONTAINER[arch]
        for e in range(E):
            specs[f"{p}.{c}.{e}.{g}.weight"] = ((I, H), "grid")
            specs[f"{p}.{c}.{e}.{u}.weight"] = ((I, H), "grid")
            specs[f"{p}.{c}.{e}.{d}.weight"] = ((H, I), "grid")
            if arch == "gpt_oss":
                specs[f"{p}.{c}.{e}.{g}.bias"] = ((I,), "bias")
                specs[f"{p}.{c}.{e}.{u}.bias"] = ((I,), "bias")
                specs[f"{p}.{c}.{e}.{d}.bias"] = ((H,), "bias")
        if arch == "qwen2_moe":
            Is = cfg["shared_expert_intermediate_size"]
            specs[f"{p}.mlp.shared_expert.gate_proj.weight"] = ((Is, H), "grid")
            specs[f"{p}.mlp.shared_expert.up_proj.weight"] = ((Is, H), "grid")
            specs[f"{p}.mlp.shared_expert.down_proj.weight"] = ((H, Is), "grid")
            specs[f"{p}.mlp.shared_expert_gate.weight"] = ((1, H), "router")
        if arch == "deepseek_v3":
            Is = I * cfg["n_shared_experts"]
            specs[f"{p}.mlp.shared_experts.gate_proj.weight"] = ((Is, H), "grid")
            specs[f"{p}.mlp.shared_experts.up_proj.weight"] = ((Is, H), "grid")
            specs[f"{p}.mlp.shared_experts.down_proj.weight"] = ((H, Is), "grid")
    specs["model.norm.weight"] = ((H,), "norm")
    specs["lm_head.weight"] = ((V, H), "head")
    return specs


def _grid(rng, shape):
    """FP4 value x 2**s per (row, 32-wide input group): exact in fp4, fp8 and bf16."""
    *lead, n = shape
    groups = math.ceil(n / 32)
    codes = rng.integers(0, 16, size=shape)
    exps = rng.choice(GRID_EXPONENTS, size=(*lead, groups))
    scale = np.repeat(np.exp2(exps.astype(np.float32)), 32, axis=-1)[..., :n]
    return (FP4_VALUES[codes] * scale).astype(np.float32)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = (u + (((u >> 16) & 1) + np.uint32(0x7FFF))) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


def canonical_weights(arch: str, seed: int = 0, dtype: str = "float32", cfg=None) -> Dict[str, np.ndarray]:
    """The float weights every layout of ``(arch, seed, dtype)`` carries, HF per-expert names."""
    cfg = cfg or tiny_config(arch, dtype)
    rng = np.random.default_rng([seed, ARCHS.index(arch)])
    H = cfg["hidden_size"]
    out = {}
    for name, (shape, kind) in _param_specs(cfg).items():
        if kind == "grid":
            w = _grid(rng, shape)
        elif kind == "embed":
            w = rng.normal(0, 1.0, shape)
        elif kind == "head":
            w = rng.normal(0, 2.0 / math.sqrt(H), shape)
        elif kind == "router":
            w = rng.normal(0, 1.5 / math.sqrt(H), shape)
        elif kind == "norm":
            w = 1.0 + 0.1 * rng.normal(size=shape)
        elif kind == "bias":
            w = 0.1 * rng.normal(size=shape)
        elif kind == "small":
            w = 0.5 * rng.normal(size=shape)
        elif kind == "corr":
            w = 0.05 * rng.normal(size=shape)
        else:  # pragma: no cover
            raise AssertionError(kind)
        w = np.asarray(w, dtype=np.float32)
        if dtype == "bfloat16" and kind != "corr":
            w = bf16_round(w)
        out[name] = w
    return out


# --------------------------------------------------------------- safetensors


class Raw:
    """A tensor given as its safetensors dtype string, shape and raw bytes."""

    def __init__(self, dtype: str, shape, data: bytes):
        self.dtype, self.shape, self.data = dtype, tuple(shape), bytes(data)
        itemsize = {"F8_E4M3": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "U32": 4, "I32": 4}[dtype]
        assert len(self.data) == itemsize * int(np.prod(self.shape, dtype=np.int64)), (dtype, shape)


_NP_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
}


def _encode(t, float_dtype: str) -> Raw:
    if isinstance(t, Raw):
        return t
    t = np.asarray(t)
    if t.dtype == np.float32 and float_dtype == "bfloat16":
        u = bf16_round(t).view(np.uint32)
        return Raw("BF16", t.shape, (u >> 16).astype("<u2").tobytes())
    return Raw(_NP_DTYPES[t.dtype], t.shape, np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes())


def write_safetensors(path, tensors: Dict[str, Raw], metadata=None):
    """Write ``tensors`` (``Raw``) as a safetensors file, in the given order."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(t.data)]}
        offset += len(t.data)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(t.data)


def write_tensors(path: Path, tensors: Dict[str, object], float_dtype="float32", shards=1, metadata=None):
    """``model.safetensors`` or ``model-0000X-of-0000N.safetensors`` + index, HF style.

    Tensors fill shards in order by size, so a layer's experts straddle files.
    """
    raws = {k: _encode(v, float_dtype) for k, v in tensors.items()}
    metadata = {"format": "pt"} if metadata is None else metadata
    if shards == 1:
        write_safetensors(path / "model.safetensors", raws, metadata)
        return
    total = sum(len(r.data) for r in raws.values())
    per = total / shards
    files = [dict() for _ in range(shards)]
    acc = 0
    for name, r in raws.items():
        i = min(int(acc // per), shards - 1)
        files[i][name] = r
        acc += len(r.data)
    assert all(files), "too many shards for this checkpoint"
    weight_map = {}
    for i, part in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(path / fname, part, metadata)
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


# ------------------------------------------------------------ quantized forms


def _e4m3_table():
    c = np.arange(256, dtype=np.int32)
    s = np.where(c >> 7, -1.0, 1.0)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7.0))
    v = np.where((e == 15) & (m == 7), np.nan, s * v)
    return v.astype(np.float32)


E4M3_VALUES = _e4m3_table()


def _grid_codes(x: np.ndarray, positive_values: np.ndarray, sign_bit: int) -> np.ndarray:
    """Codes of ``x`` in a sign-magnitude float format whose non-negative values,
    in code order, are ``positive_values`` (ascending). ``x`` must lie on the grid."""
    a = np.abs(x)
    idx = np.clip(np.searchsorted(positive_values, a), 0, len(positive_values) - 1)
    assert np.array_equal(positive_values[idx], a), "value not on the grid"
    return (idx | np.where(np.signbit(x) & (a > 0), sign_bit, 0)).astype(np.uint8)


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    return E4M3_VALUES[codes]


def fp8_block_quantize(w: np.ndarray, rng, block=128):
    """Exact FP8 (e4m3) + float32 ``weight_scale_inv`` per ``block x block`` tile."""
    out, inp = w.shape
    gr, gc = math.ceil(out / block), math.ceil(inp / block)
    scale_inv = np.exp2(rng.choice([-10.0, -9.0], size=(gr, gc))).astype(np.float32)
    full = np.repeat(np.repeat(scale_inv, block, 0), block, 1)[:out, :inp]
    q = w / full
    codes = _grid_codes(q, E4M3_VALUES[:127], 0x80)
    assert np.array_equal(e4m3_decode(codes) * full, w), "weight not on the fp8 grid"
    return codes, scale_inv


def fp8_dequantize(codes: np.ndarray, scale_inv: np.ndarray, block=128) -> np.ndarray:
    out, inp = codes.shape
    full = np.repeat(np.repeat(scale_inv, block, 0), block, 1)[:out, :inp]
    return e4m3_decode(codes) * full


def mxfp4_quantize(w: np.ndarray):
    """Exact MXFP4 of ``w [..., out, in]`` (``in % 32 == 0``): blocks [..., out, in/32, 16], scales."""
    *lead, n = w.shape
    g = w.reshape(*lead, n // 32, 32)
    amax = np.abs(g).max(-1)
    # smallest power of two that puts every value of the group on the fp4 grid
    exps = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
    for _ in range(4):
        q = g / np.exp2(exps)[..., None]
        ok = np.all(np.isin(np.abs(q), FP4_VALUES[:8]), axis=-1)
        if ok.all():
            break
        exps = np.where(ok, exps, exps - 1)
    q = g / np.exp2(exps)[..., None]
    codes = _grid_codes(q, FP4_VALUES[:8], 8)
    assert np.array_equal(FP4_VALUES[codes] * np.exp2(exps)[..., None], g), "weight not on the fp4 grid"
    codes = codes.reshape(*lead, n // 32, 16, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)
    scales = (exps + 127).astype(np.uint8)
    return blocks, scales


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """numpy reference: [..., out, G, 16] uint8 + [..., out, G] e8m0 -> [..., out, G*32]."""
    codes = np.stack([blocks & 15, blocks >> 4], -1).reshape(*blocks.shape[:-1], 32)
    vals = FP4_VALUES[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


# ---------------------------------------------------------------- layouts

_EXPERT_RE = re.compile(r"^(model\.layers\.(\d+))\.(.+)\.(\d+)\.(\w+)\.(weight|bias)$")


def stacked_experts(arch, weights, cfg):
    """``{layer: {"gate"|"up"|"down": {"weight": [E, out, in], "bias": [E, out]}}}``."""
    E, _, _ = _expert_dims(cfg)
    g, u, d = PROJ_NAMES[arch]
    c = EXPERT_CONTAINER[arch]
    out = {}
    for l in moe_layers(arch, cfg):
        p = f"model.layers.{l}.{c}"
        out[l] = {}
        for key, proj in (("gate", g), ("up", u), ("down", d)):
            out[l][key] = {"weight": np.stack([weights[f"{p}.{e}.{proj}.weight"] for e in range(E)])}
            if f"{p}.0.{proj}.bias" in weights:
                out[l][key]["bias"] = np.stack([weights[f"{p}.{e}.{proj}.bias"] for e in range(E)])
    return out


def _non_expert(arch, weights):
    c = EXPERT_CONTAINER[arch]
    return {k: v for k, v in weights.items() if not re.match(rf"^model\.layers\.\d+\.{re.escape(c)}\.\d+\.", k)}


def _interleave(a, b, axis):
    """Alternate slices of ``a`` and ``b`` along ``axis`` (gate even, up odd)."""
    s = np.stack([a, b], axis=axis + 1 if axis >= 0 else axis)
    shape = list(a.shape)
    shape[axis] *= 2
    return s.reshape(shape)


def layout_tensors(arch, layout, weights, cfg, seed=0):
    """``(tensors, config)`` of ``layout`` for the canonical ``weights`` (numpy / Raw)."""
    if layout not in ARCH_LAYOUTS[arch]:
        raise ValueError(f"layout {layout!r} is not defined for {arch}")
    cfg = copy.deepcopy(cfg)
    if layout == "per_expert":
        return dict(weights), cfg
    rest = _non_expert(arch, weights)
    st = stacked_experts(arch, weights, cfg)
    tensors = {}
    # keep the HF ordering: each layer's non-expert tensors, then its experts
    by_layer = {}
    for k, v in rest.items():
        m = re.match(r"^model\.layers\.(\d+)\.", k)
        by_layer.setdefault(int(m.group(1)) if m else -1, {})[k] = v
    for k, v in by_layer.pop(-1).items():
        if k.startswith("model.embed"):
            tensors[k] = v
    for l in range(cfg["num_hidden_layers"]):
        tensors.update(by_layer.get(l, {}))
        if l in st:
            tensors.update(_layout_experts(arch, layout, l, st[l], cfg))
    tensors.update({k: v for k, v in rest.items() if k not in tensors})

    if layout == "fp8":
        rng = np.random.default_rng([seed, 8])
        q = {}
        for k, v in tensors.items():
            if k.endswith(".weight") and _is_fp8_target(k):
                codes, sinv = fp8_block_quantize(v, rng)
                q[k] = Raw("F8_E4M3", codes.shape, codes.tobytes())
                q[k + "_scale_inv"] = sinv
            else:
                q[k] = v
        tensors = q
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    if layout == "mxfp4":
        cfg["quantization_config"] = {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        }
    return tensors, cfg


def _is_fp8_target(name):
    """DeepSeek-V3 / Qwen3-FP8: every linear but routers, embeddings and lm_head."""
    if name.startswith("model.embed") or name.startswith("lm_head"):
        return False
    if re.search(r"\.(mlp\.gate|shared_expert_gate|router)\.weight$", name):
        return False
    return bool(re.search(r"(_proj|_mqa|\.w[123])\.weight$", name))


def _layout_experts(arch, layout, l, ex, cfg):
    p = f"model.layers.{l}"
    c = EXPERT_CONTAINER[arch]
    gw, uw, dw = ex["gate"]["weight"], ex["up"]["weight"], ex["down"]["weight"]
    if layout == "stacked":
        return {f"{p}.{c}.gate_up_proj": np.concatenate([gw, uw], 1), f"{p}.{c}.down_proj": dw}
    if layout == "stacked_t":
        return {
            f"{p}.{c}.gate_up_proj": np.ascontiguousarray(np.concatenate([gw, uw], 1).swapaxes(1, 2)),
            f"{p}.{c}.down_proj": np.ascontiguousarray(dw.swapaxes(1, 2)),
        }
    if layout == "moe_direct":
        return {f"{p}.moe.gate_up_proj": np.concatenate([gw, uw], 1), f"{p}.moe.down_proj": dw}
    if layout == "layer_experts":
        return {f"{p}.experts.gate_up_proj": np.concatenate([gw, uw], 1), f"{p}.experts.down_proj": dw}
    if layout == "moe_direct_per_expert":
        out = {}
        for e in range(gw.shape[0]):
            out[f"{p}.moe.{e}.gate_proj.weight"] = gw[e]
            out[f"{p}.moe.{e}.up_proj.weight"] = uw[e]
            out[f"{p}.moe.{e}.down_proj.weight"] = dw[e]
        return out
    if layout == "fp8":
        g, u, d = PROJ_NAMES[arch]
        out = {}
        for e in range(gw.shape[0]):
            out[f"{p}.{c}.{e}.{g}.weight"] = gw[e]
            out[f"{p}.{c}.{e}.{u}.weight"] = uw[e]
            out[f"{p}.{c}.{e}.{d}.weight"] = dw[e]
        return out
    if layout == "gpt_oss":  # transformers: x @ W, gate/up interleaved columns
        return {
            f"{p}.mlp.experts.gate_up_proj": np.ascontiguousarray(_interleave(gw, uw, 1).swapaxes(1, 2)),
            f"{p}.mlp.experts.gate_up_proj_bias": _interleave(ex["gate"]["bias"], ex["up"]["bias"], 1),
            f"{p}.mlp.experts.down_proj": np.ascontiguousarray(dw.swapaxes(1, 2)),
            f"{p}.mlp.experts.down_proj_bias": ex["down"]["bias"],
        }
    if layout == "mxfp4":  # gpt-oss original: [E, out, in/32, 16] with interleaved gate/up rows
        gu_blocks, gu_scales = mxfp4_quantize(_interleave(gw, uw, 1))
        d_blocks, d_scales = mxfp4_quantize(dw)
        return {
            f"{p}.mlp.experts.gate_up_proj_blocks": gu_blocks,
            f"{p}.mlp.experts.gate_up_proj_scales": gu_scales,
            f"{p}.mlp.experts.gate_up_proj_bias": _interleave(ex["gate"]["bias"], ex["up"]["bias"], 1),
            f"{p}.mlp.experts.down_proj_blocks": d_blocks,
            f"{p}.mlp.experts.down_proj_scales": d_scales,
            f"{p}.mlp.experts.down_proj_bias": ex["down"]["bias"],
        }
    if layout == "mlx_float":  # mlx-lm's own names (written by hand only for gpt-oss)
        m = MLX_PREFIX[arch]
        out = {}
        for key in ("gate", "up", "down"):
            for kind, v in ex[key].items():
                out[f"{p}.{m}.{key}_proj.{kind}"] = v
        return out
    raise ValueError(f"layout {layout!r}")


# ---------------------------------------------------------------- writers


def write_tokenizer(path: Path, vocab_size: int = 128):
    """A character-level tokenizer (``tokenizer.json``) over ``vocab_size`` ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    for j in range(len(vocab), vocab_size):
        vocab[f"<extra_{j}>"] = j
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))


def write_config(path: Path, cfg: dict):
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def write_checkpoint(
    path,
    arch: str,
    layout: Optional[str] = None,
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    mutate: Optional[Callable[[dict], dict]] = None,
    mutate_config: Optional[Callable[[dict], dict]] = None,
    tokenizer: bool = True,
    overrides: Optional[dict] = None,
) -> Path:
    """Write a tiny ``arch`` checkpoint of ``layout`` into ``path`` (created); return it.

    ``overrides`` change the tiny config before the weights are drawn (other
    sizes). ``mutate(tensors) -> tensors`` / ``mutate_config(cfg) -> cfg`` edit
    what gets written (error-case tests). Tensors are numpy arrays (float32 ones
    are written as ``dtype``) or ``Raw``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layout = layout or reference_layout(arch)
    cfg = {**tiny_config(arch, dtype), **(overrides or {})}
    weights = canonical_weights(arch, seed, dtype, cfg)
    if layout in ("mlx", "mlx_float") and not (layout == "mlx_float" and arch == "gpt_oss"):
        return _write_with_mlx_lm(path, arch, layout, dtype, shards, seed, mutate, mutate_config, tokenizer, overrides)
    tensors, cfg = layout_tensors(arch, layout, weights, cfg, seed)
    if arch == "deepseek_v3" and dtype == "bfloat16":
        key = [k for k in tensors if k.endswith("e_score_correction_bias")]
        for k in key:  # real DeepSeek-V3 checkpoints keep it float32
            tensors[k] = Raw("F32", tensors[k].shape, tensors[k].astype("<f4").tobytes())
    if mutate is not None:
        tensors = mutate(tensors)
    if mutate_config is not None:
        cfg = mutate_config(cfg)
    write_config(path, cfg)
    write_tensors(path, tensors, dtype, shards, metadata={"format": "mlx"} if layout == "mlx_float" else None)
    if tokenizer:
        write_tokenizer(path, cfg["vocab_size"])
    return path


def _write_with_mlx_lm(path, arch, layout, dtype, shards, seed, mutate, mutate_config, tokenizer, overrides):
    """``mlx_float`` / ``mlx``: mlx-lm loads the reference and saves it (quantized for ``mlx``)."""
    import tempfile

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    with tempfile.TemporaryDirectory() as tmp:
        ref = write_checkpoint(tmp, arch, reference_layout(arch), dtype, 1, seed, tokenizer=False, overrides=overrides)
        model, config = load_model(Path(ref))
    if layout == "mlx":
        model, config = quantize_model(model, config, MLX_QUANT["group_size"], MLX_QUANT["bits"])
    if mutate is None and shards == 1:
        save_model(path, model)
    else:
        tensors = {}
        for k, v in tree_flatten(model.parameters()):
            if v.dtype == mx.bfloat16:
                tensors[k] = Raw("BF16", v.shape, np.array(v.view(mx.uint16)).tobytes())
            else:
                tensors[k] = np.array(v)
        if mutate is not None:
            tensors = mutate(tensors)
        write_tensors(path, tensors, "float32", shards, metadata={"format": "mlx"})
    if mutate_config is not None:
        config = mutate_config(config)
    save_config(config, path / "config.json")
    if tokenizer:
        write_tokenizer(path, config["vocab_size"])
    return path
