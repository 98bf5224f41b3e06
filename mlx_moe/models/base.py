"""What an architecture file declares, and the MoE block they share.

Attention, norms and embeddings are mlx-lm's own classes; an architecture file
swaps in our MoE block and says where its experts live in checkpoints.
"""

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..experts import PROJECTIONS, MoEExperts
from ..routing import route


class MoEBlock(nn.Module):
    """Router + routed experts (+ optional shared experts).

    Subclasses set the attributes under mlx-lm's names: ``experts_attr`` names
    the ``MoEExperts`` child, ``gate_attr`` the module holding the router
    weight and ``router_attr`` the router turning its logits into weights and
    ids (None when the gate does both, DeepSeek's ``GroupLimitedGate``).
    """

    experts_attr = "switch_mlp"
    gate_attr = "gate"
    router_attr = "router"

    @property
    def routed(self):
        return getattr(self, self.experts_attr)

    def route(self, x) -> Tuple[mx.array, mx.array]:
        # routing.route: the router kernel where it runs (GPU decode), else MLX ops
        router = None if self.router_attr is None else getattr(self, self.router_attr)
        return route(x, getattr(self, self.gate_attr), router)

    def shared(self, x) -> Optional[mx.array]:
        return None

    def __call__(self, x):
        weights, ids = self.route(x)
        routed = self.routed
        # Router ids are in [0, E) by construction: no host-side id check (a
        # sync per layer). OffloadedExperts checks ids on the host it reads anyway.
        if isinstance(routed, MoEExperts):
            y = routed(x, weights, ids, validate=False)
        else:
            y = routed(x, weights, ids)
        s = self.shared(x)
        return y if s is None else y + s


@dataclass(frozen=True)
class ExpertLayout:
    """Where one architecture keeps its routed experts and how they are shaped.

    ``hf_containers``: checkpoint prefixes (inside a layer) that hold routed experts.
    ``proj_names``: checkpoint projection name -> our name (Mixtral: w1 -> gate_proj).
    ``stacked_orientation``: for stacked tensors whose sizes cannot decide it
    (H == I or H == 2I), whether they are stored ``out_in`` (nn.Linear) or
    ``in_out`` (x @ W, gpt-oss).
    ``gate_up``: how a stacked ``gate_up_proj`` packs its halves: ``concat`` or
    ``interleave`` (gpt-oss: gate rows even, up rows odd).
    """

    hf_containers: Tuple[str, ...] = ("mlp.experts",)
    proj_names: dict = field(default_factory=lambda: {p: p for p in PROJECTIONS})
    stacked_orientation: str = "out_in"
    gate_up: str = "concat"


@dataclass(frozen=True)
class Architecture:
    model_type: str
    module: ModuleType  # the mlx-lm model module we reuse
    moe_block: Callable  # (args, config) -> MoEBlock
    replaces: type  # mlx-lm's sparse block class, swapped for ``moe_block``
    moe_attr: str = "mlp"
    layout: ExpertLayout = ExpertLayout()
    # (args, config, layer_idx) -> an nn.Module for layers mlx-lm builds as MoE
    # but the config marks dense; None when mlx-lm already handles it.
    dense_override: Optional[Callable] = None
    # (model, args, config) -> None: checkpoint-config quirks mlx-lm's classes miss.
    finalize: Optional[Callable] = None

    @property
    def experts_prefix(self):
        """Our experts' prefix inside a layer, e.g. ``mlp.switch_mlp``."""
        return f"{self.moe_attr}.{self.moe_block.experts_attr}"
