import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2_moe as base

from ..experts import MoEExperts
from ..routing import SoftmaxTopK
from .base import Architecture, MoEBlock


class Qwen2MoeBlock(MoEBlock):
    def __init__(self, args, config):
        super().__init__()
        H = args.hidden_size
        self.gate = nn.Linear(H, args.num_experts, bias=False)
        self.switch_mlp = MoEExperts(args.num_experts, H, args.moe_intermediate_size)
        self.shared_expert = base.MLP(H, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)
        self.router = SoftmaxTopK(
            args.num_experts_per_tok, config.get("norm_topk_prob", False)
        )

    def shared(self, x):
        return mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def dense_layer(args, config, idx):
    """HF Qwen2-MoE makes a layer dense by ``mlp_only_layers`` / ``decoder_sparse_step``."""
    step = config.get("decoder_sparse_step", 1) or 1
    sparse = idx not in config.get("mlp_only_layers", []) and (idx + 1) % step == 0
    return None if sparse else base.MLP(args.hidden_size, args.intermediate_size)


ARCH = Architecture(
    "qwen2_moe",
    base,
    Qwen2MoeBlock,
    base.Qwen2MoeSparseMoeBlock,
    dense_override=dense_layer,
)
