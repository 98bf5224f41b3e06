import mlx.nn as nn
from mlx_lm.models import olmoe as base

from ..experts import MoEExperts
from ..routing import SoftmaxTopK
from .base import Architecture, MoEBlock


class OlmoeBlock(MoEBlock):
    def __init__(self, args, config):
        super().__init__()
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = MoEExperts(
            args.num_experts, args.hidden_size, args.intermediate_size, bias=args.mlp_bias
        )
        self.router = SoftmaxTopK(args.num_experts_per_tok, args.norm_topk_prob)


ARCH = Architecture("olmoe", base, OlmoeBlock, base.OlmoeSparseMoeBlock)
