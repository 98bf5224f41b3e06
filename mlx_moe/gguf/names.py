"""llama.cpp tensor names -> ours (mlx-lm's), per architecture.

A GGUF names tensors ``token_embd.weight``, ``blk.{N}.attn_q.weight``,
``blk.{N}.ffn_gate_exps.weight`` (routed experts stacked ``[E, out, in]``, the
very layout of our ``switch_mlp``), ... . Each architecture is a table from the
llama.cpp base name to ours inside ``model.layers.{N}``; ``{moe}`` and
``{experts}`` are filled from the model's ``Architecture``.

llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` for the
``llama`` architecture (its rope rotates interleaved pairs, HF's rotates
halves); ``unpermute_rows`` undoes that on the raw rows, before any
dequantization (a row permutation never splits a quantization block).
"""

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from .reader import GGUFError

GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Shared by every architecture here.
_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    # dense FFN layers (e.g. Qwen3's mlp_only_layers, DeepSeek's first layers)
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # routed experts
    "ffn_gate_inp": "{moe}.gate",
    "ffn_gate_exps": "{experts}.gate_proj",
    "ffn_up_exps": "{experts}.up_proj",
    "ffn_down_exps": "{experts}.down_proj",
}


@dataclass(frozen=True)
class ArchNames:
    model_type: str  # ours (HF's)
    block: Dict[str, str]
    permute_qk: bool = False  # llama.cpp permuted attn_q/attn_k rows at conversion
    skip: Tuple[str, ...] = ()  # base names we do not need (recomputed at run time)


ARCH_NAMES = {
    "qwen3moe": ArchNames(
        "qwen3_moe", {**_COMMON, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    ),
    # Mixtral is llama.cpp's ``llama`` with experts; a dense llama is refused by the config.
    "llama": ArchNames("mixtral", dict(_COMMON), permute_qk=True, skip=("rope_freqs",)),
    "qwen2moe": ArchNames(
        "qwen2_moe",
        {
            **_COMMON,
            "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
            "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
            "ffn_up_shexp": "mlp.shared_expert.up_proj",
            "ffn_down_shexp": "mlp.shared_expert.down_proj",
        },
    ),
    "olmoe": ArchNames(
        "olmoe", {**_COMMON, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    ),
    "gpt-oss": ArchNames(
        "gpt_oss",
        {
            **{k: v for k, v in _COMMON.items() if k != "ffn_norm"},
            "post_attention_norm": "post_attention_layernorm",
            "attn_sinks": "self_attn.sinks",
            "ffn_gate_inp": "mlp.router",
        },
    ),
    "deepseek2": ArchNames(
        "deepseek_v3",
        {
            **_COMMON,
            "attn_q_a": "self_attn.q_a_proj",
            "attn_q_a_norm": "self_attn.q_a_layernorm",
            "attn_q_b": "self_attn.q_b_proj",
            "attn_q": "self_attn.q_proj",  # models without q_lora_rank
            "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
            "attn_kv_a_norm": "self_attn.kv_a_layernorm",
            "attn_kv_b": "self_attn.kv_b_proj",  # older files; split by mlx-lm's sanitize
            # newer files split kv_b at conversion, in exactly mlx-lm's MultiLinear layout:
            # k_b [heads, kv_lora_rank, qk_nope], v_b [heads, v_head_dim, kv_lora_rank]
            "attn_k_b": "self_attn.embed_q",
            "attn_v_b": "self_attn.unembed_out",
            "exp_probs_b": "mlp.gate.e_score_correction_bias",
            "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
            "ffn_up_shexp": "mlp.shared_experts.up_proj",
            "ffn_down_shexp": "mlp.shared_experts.down_proj",
        },
        skip=("rope_freqs",),
    ),
}

# Ours are bare parameters, llama.cpp adds a suffix: "attn_sinks.weight", "exp_probs_b.bias".
BARE = {"attn_sinks", "exp_probs_b"}

BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


def arch_names(architecture: str, path="") -> ArchNames:
    if architecture not in ARCH_NAMES:
        raise GGUFError(
            f"{path}: GGUF architecture '{architecture}' is not supported; "
            f"supported: {sorted(ARCH_NAMES)}"
        )
    return ARCH_NAMES[architecture]


@dataclass
class NameMap:
    """GGUF name <-> ours for one model (``moe`` / ``experts`` from its Architecture)."""

    names: ArchNames
    moe: str  # e.g. "mlp", "block_sparse_moe"
    experts: str  # e.g. "mlp.switch_mlp"
    path: str = ""
    _cache: Dict[str, Optional[str]] = field(default_factory=dict)

    def ours(self, gguf_name: str) -> Optional[str]:
        """Our name, None for tensors we skip; an error for unknown ones."""
        base, _, suffix = gguf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = gguf_name, "weight"
        if base in GLOBAL:
            return f"{GLOBAL[base]}.{suffix}"
        if base in self.names.skip:
            return None
        m = re.match(r"^blk\.(\d+)\.(.+)$", base)
        if m:
            layer, short = m.groups()
            if short in self.names.skip:
                return None
            if short in self.names.block:
                ours = self.names.block[short].format(moe=self.moe, experts=self.experts)
                if short in BARE:
                    return f"model.layers.{layer}.{ours}"
                return f"model.layers.{layer}.{ours}.{suffix}"
        raise GGUFError(
            f"{self.path}: tensor '{gguf_name}' has no counterpart in the "
            f"{self.names.model_type} model (llama.cpp architecture names known: "
            f"{sorted(self.names.block)})"
        )

    def permutation(self, gguf_name: str, config: dict) -> Optional[int]:
        """Heads to un-permute ``gguf_name``'s rows by (llama.cpp's q/k permutation), or None."""
        if not self.names.permute_qk:
            return None
        m = BLOCK_RE.match(gguf_name)
        if not m:
            return None
        if m.group(2) == "attn_q":
            return config["num_attention_heads"]
        if m.group(2) == "attn_k":
            return config.get("num_key_value_heads") or config["num_attention_heads"]
        return None


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: within each head, rows were reordered from
    (half, pair) to (pair, half); ``rows`` is ``[out, ...]`` (raw bytes or values)."""
    out = rows.shape[0]
    r = rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:])
    return np.ascontiguousarray(r.swapaxes(1, 2)).reshape(rows.shape)
