import mlx.nn as nn
from mlx_lm.models import qwen3_moe as base

from ..experts import MoEExperts
from ..routing import SoftmaxTopK
from .base import Architecture, MoEBlock


class Qwen3MoeBlock(MoEBlock):
    def __init__(self, args, config):
        super().__init__()
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = MoEExperts(
            args.num_experts, args.hidden_size, args.moe_intermediate_size
        )
        self.router = SoftmaxTopK(args.num_experts_per_tok, args.norm_topk_prob)


ARCH = Architecture("qwen3_moe", base, Qwen3MoeBlock, base.Qwen3MoeSparseMoeBlock)
