"""The model config (HF ``config.json`` keys) from a GGUF's ``{arch}.*`` metadata.

Sizes that the metadata may omit or state for the dense FFN only (expert and
shared-expert widths, which layers are MoE) are read from tensor shapes, which
cannot disagree with the weights. Routing facts that llama.cpp hard-codes per
architecture (not in the file) are stated here, each with its source.
"""

import numpy as np

from .names import arch_names
from .reader import GGUFError, GGUFFile


def _f32(v):
    """A float32 metadata value as its shortest decimal (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(v)))


def _first(v):
    """Per-layer arrays (some files store head counts per layer) -> their first value."""
    return v[0] if isinstance(v, list) else v


class _Meta:
    def __init__(self, gf: GGUFFile):
        self.gf = gf

    def __call__(self, key, default=KeyError):
        v = self.gf.arch_key(key)
        if v is None:
            if default is KeyError:
                raise GGUFError(f"{self.gf.path}: GGUF metadata has no '{self.gf.architecture}.{key}'")
            return default
        return _first(v)


def _shape(gf, name):
    return gf.tensors[name].shape if name in gf else None


def _layers(gf, n_layers):
    moe = [l for l in range(n_layers) if f"blk.{l}.ffn_gate_exps.weight" in gf]
    if not moe:
        raise GGUFError(
            f"{gf.path}: no routed experts (blk.N.ffn_gate_exps) in this {gf.architecture} GGUF; "
            "mlx-moe loads Mixture-of-Experts models only"
        )
    return moe, [l for l in range(n_layers) if l not in moe]


def _rope_scaling(m):
    kind = m("rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    out = {"type": kind, "rope_type": kind, "factor": _f32(m("rope.scaling.factor", 1.0))}
    orig = m("rope.scaling.original_context_length", None)
    if orig:
        out["original_max_position_embeddings"] = int(orig)
    return out


def build_config(gf: GGUFFile) -> dict:
    names = arch_names(gf.architecture, gf.path)
    m = _Meta(gf)
    n_layers = int(m("block_count"))
    moe, dense = _layers(gf, n_layers)
    E, I, H = _shape(gf, f"blk.{moe[0]}.ffn_gate_exps.weight")
    if "token_embd.weight" not in gf:
        raise GGUFError(f"{gf.path}: no token_embd.weight")
    V, H_embd = gf.tensors["token_embd.weight"].shape
    nh = int(m("attention.head_count"))
    cfg = {
        "model_type": names.model_type,
        "hidden_size": int(m("embedding_length", H_embd)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": nh,
        "num_key_value_heads": int(m("attention.head_count_kv", nh)),
        "rms_norm_eps": _f32(m("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(m("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(m("context_length", 4096)),
        "vocab_size": int(V),
        "tie_word_embeddings": "output.weight" not in gf,
        "rope_scaling": _rope_scaling(m),
    }
    n_expert = int(m("expert_count", E))
    if n_expert != E:
        raise GGUFError(f"{gf.path}: metadata says {n_expert} experts, blk.{moe[0]}.ffn_gate_exps has {E}")
    for key, tok in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        v = gf.get(f"tokenizer.ggml.{tok}")
        if v is not None:
            cfg[key] = int(v)
    top_k = int(m("expert_used_count"))
    dense_I = _shape(gf, f"blk.{dense[0]}.ffn_gate.weight")[0] if dense else None
    key_length = m("attention.key_length", None)
    build = _ARCH[names.model_type]
    build(cfg, gf, m, moe=moe, dense=dense, E=E, I=I, top_k=top_k, dense_I=dense_I, key_length=key_length)
    return dict(sorted(cfg.items()))


def _no_dense(gf, dense):
    if dense:
        raise GGUFError(f"{gf.path}: layers {dense} have no routed experts; {gf.architecture} needs MoE in every layer")


def _qwen3_moe(cfg, gf, m, moe, dense, E, I, top_k, dense_I, key_length):
    cfg.update(
        num_experts=E,
        num_experts_per_tok=top_k,
        moe_intermediate_size=I,
        intermediate_size=dense_I or int(m("feed_forward_length", I)),
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        head_dim=int(key_length or cfg["hidden_size"] // cfg["num_attention_heads"]),
        # llama.cpp's qwen3moe graph always renormalises the top-k weights
        norm_topk_prob=bool(m("expert_weights_norm", True)),
        attention_bias=False,
    )


def _qwen2_moe(cfg, gf, m, moe, dense, E, I, top_k, dense_I, key_length):
    shexp = _shape(gf, f"blk.{moe[0]}.ffn_gate_shexp.weight")
    if shexp is None:
        raise GGUFError(f"{gf.path}: qwen2moe needs a shared expert (blk.{moe[0]}.ffn_gate_shexp.weight)")
    cfg.update(
        num_experts=E,
        num_experts_per_tok=top_k,
        moe_intermediate_size=I,
        shared_expert_intermediate_size=int(shexp[0]),
        intermediate_size=dense_I or int(m("feed_forward_length", I)),
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        # llama.cpp's qwen2moe graph does not renormalise (HF's default too)
        norm_topk_prob=bool(m("expert_weights_norm", False)),
    )


def _mixtral(cfg, gf, m, moe, dense, E, I, top_k, dense_I, key_length):
    _no_dense(gf, dense)
    cfg.update(num_local_experts=E, num_experts_per_tok=top_k, intermediate_size=I)
    if cfg["rope_scaling"] is None:
        cfg.pop("rope_scaling")


def _olmoe(cfg, gf, m, moe, dense, E, I, top_k, dense_I, key_length):
    _no_dense(gf, dense)
    cfg.update(
        num_experts=E,
        num_experts_per_tok=top_k,
        intermediate_size=I,
        norm_topk_prob=bool(m("expert_weights_norm", False)),  # OLMoE does not renormalise
        attention_bias=False,
    )


def _gpt_oss(cfg, gf, m, moe, dense, E, I, top_k, dense_I, key_length):
    _no_dense(gf, dense)
    n = cfg["num_hidden_layers"]
    cfg.update(
        num_local_experts=E,
        num_experts_per_tok=top_k,
        experts_per_token=top_k,
        intermediate_size=I,
        head_dim=int(key_length or 64),
        sliding_window=int(m("attention.sliding_window", 128)),
        # llama.cpp: sliding-window attention on every other layer, starting with layer 0
        layer_types=["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n)],
        swiglu_limit=7.0,  # hard-coded in llama.cpp's gpt-oss graph, as in the HF config
        attention_bias=True,
    )
    rs = cfg.get("rope_scaling")
    if rs and rs["rope_type"] == "yarn":
        # gpt-oss's own config: YaRN with beta 32/1 and no truncation (llama.cpp's defaults)
        rs.update(
            beta_fast=_f32(m("rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=_f32(m("rope.scaling.yarn_beta_slow", 1.0)),
            truncate=False,
        )


def _deepseek_v3(cfg, gf, m, moe, dense, E, I, top_k, dense_I, key_length):
    first_dense = int(m("leading_dense_block_count", len(dense)))
    if dense != list(range(first_dense)):
        raise GGUFError(f"{gf.path}: dense layers {dense} are not the first {first_dense} (leading_dense_block_count)")
    rope = int(m("rope.dimension_count"))
    kv_lora = int(m("attention.kv_lora_rank"))
    nh = cfg["num_attention_heads"]
    l0 = moe[0]
    # head sizes: newer files state them (key_length_mla / value_length_mla);
    # older ones as key_length / value_length (before MLA's absorption in llama.cpp)
    k_mla, v_mla = m("attention.key_length_mla", None), m("attention.value_length_mla", None)
    qk_head = int(k_mla or key_length)
    v_head = int(v_mla or m("attention.value_length"))
    shexp = _shape(gf, f"blk.{l0}.ffn_gate_shexp.weight")
    func = m("expert_gating_func", 2)  # llama.cpp: 1 softmax, 2 sigmoid
    cfg.update(
        n_routed_experts=E,
        num_experts_per_tok=top_k,
        moe_intermediate_size=I,
        intermediate_size=dense_I or int(m("feed_forward_length", I)),
        first_k_dense_replace=first_dense,
        moe_layer_freq=1,
        n_shared_experts=int(m("expert_shared_count", (shexp[0] // I) if shexp else 0)),
        routed_scaling_factor=_f32(m("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(m("expert_weights_norm", True)),
        scoring_func={1: "softmax", 2: "sigmoid"}[int(func)],
        topk_method="noaux_tc" if f"blk.{l0}.exp_probs_b.bias" in gf else "greedy",
        n_group=int(m("expert_group_count", 1)),
        topk_group=int(m("expert_group_used_count", 1)),
        q_lora_rank=int(m("attention.q_lora_rank")) if "blk.0.attn_q_a.weight" in gf else None,
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=qk_head - rope,
        v_head_dim=v_head,
        num_key_value_heads=nh,
        attention_bias=False,
    )
    rs = cfg.get("rope_scaling")
    if rs and rs["rope_type"] == "yarn":
        # llama.cpp's converter writes yarn_log_multiplier = 0.1 * mscale_all_dim
        mscale = round(float(m("rope.scaling.yarn_log_multiplier", 0.1)) * 10, 6)
        rs.update(beta_fast=32.0, beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale)


_ARCH = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
    "deepseek_v3": _deepseek_v3,
}
