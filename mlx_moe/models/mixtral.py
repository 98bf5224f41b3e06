import mlx.nn as nn
from mlx_lm.models import mixtral as base

from ..experts import MoEExperts
from ..routing import TopKSoftmax
from .base import Architecture, ExpertLayout, MoEBlock


class MixtralBlock(MoEBlock):
    def __init__(self, args, config):
        super().__init__()
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = MoEExperts(
            args.num_local_experts, args.hidden_size, args.intermediate_size
        )
        self.router = TopKSoftmax(args.num_experts_per_tok)


ARCH = Architecture(
    "mixtral",
    base,
    MixtralBlock,
    base.MixtralSparseMoeBlock,
    moe_attr="block_sparse_moe",
    layout=ExpertLayout(
        hf_containers=("block_sparse_moe.experts",),
        proj_names={"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
    ),
)
