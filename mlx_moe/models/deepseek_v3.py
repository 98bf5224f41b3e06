from mlx_lm.models import deepseek_v3 as base

from ..experts import MoEExperts
from ..routing import GroupLimitedGate
from .base import Architecture, MoEBlock


class DeepseekV3Block(MoEBlock):
    router_attr = None  # the GroupLimitedGate scores and selects

    def __init__(self, args, config):
        super().__init__()
        E, I = args.n_routed_experts, args.moe_intermediate_size
        self.gate = GroupLimitedGate(
            args.hidden_size,
            E,
            args.num_experts_per_tok,
            args.n_group,
            args.topk_group,
            args.routed_scaling_factor,
            args.norm_topk_prob,
        )
        self.switch_mlp = MoEExperts(E, args.hidden_size, I)
        if args.n_shared_experts is not None:
            self.shared_experts = base.DeepseekV3MLP(
                args, intermediate_size=I * args.n_shared_experts
            )

    def shared(self, x):
        return self.shared_experts(x) if "shared_experts" in self else None


ARCH = Architecture("deepseek_v3", base, DeepseekV3Block, base.DeepseekV3MoE)
