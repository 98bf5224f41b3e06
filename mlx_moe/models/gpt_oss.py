import mlx.nn as nn
from mlx_lm.models import gpt_oss as base

from ..experts import MoEExperts
from ..routing import TopKSoftmax
from .base import Architecture, ExpertLayout, MoEBlock


class GptOssBlock(MoEBlock):
    experts_attr = "experts"

    def __init__(self, args, config):
        super().__init__()
        E, H = args.num_local_experts, args.hidden_size
        self.experts = MoEExperts(
            E, H, args.intermediate_size, activation="swiglu_oai", bias=True
        )
        self.router = nn.Linear(H, E, bias=True)
        self.topk = TopKSoftmax(args.num_experts_per_tok)

    def route(self, x):
        return self.topk(self.router(x))


ARCH = Architecture(
    "gpt_oss",
    base,
    GptOssBlock,
    base.MLPBlock,
    layout=ExpertLayout(stacked_orientation="in_out", gate_up="interleave"),
)
