"""Expert parallel: each rank holds a contiguous slice of the routed experts.

``ShardedExperts`` is an ``MoEExperts`` over experts ``[lo, hi)`` of ``E``: it runs
every token through its own experts (ids outside its range get weight 0 and a
harmless local id), and ``all_sum`` over the group adds the ranks' partial outputs
(in float32, as the single-process combine accumulates). Parameter names stay
mlx-lm's, so the streaming loader and quantization see an ordinary expert layer.
"""

import mlx.core as mx

from ..experts import BACKENDS, MoEExperts, QuantizedExpertLinear, _placeholder_key
from ..models import MoEBlock
from .group import WATCHDOG


def expert_range(num_experts: int, rank: int, size: int):
    """Rank ``rank``'s contiguous experts ``[lo, hi)``: E/N each, the remainder spread."""
    if size > num_experts:
        raise ValueError(f"expert parallel over {size} ranks needs at least {size} experts; the model has {num_experts}")
    return rank * num_experts // size, (rank + 1) * num_experts // size


class ShardedExperts(MoEExperts):
    """Experts ``[lo, hi)`` of ``total_experts``; outputs summed over ``group``."""

    def __init__(self, total_experts, lo, hi, hidden_size, intermediate_size, activation="silu",
                 bias=False, backend="auto", group=None):
        super().__init__(hi - lo, hidden_size, intermediate_size, activation, bias, backend,
                         key=_placeholder_key())
        self.total_experts, self.lo, self.hi = total_experts, lo, hi
        self.group = group

    @classmethod
    def like(cls, experts: MoEExperts, group, all_sum=True):
        """The rank's slice of ``experts`` (a lazy skeleton: nothing is allocated),
        quantized as ``experts`` is; ``all_sum=False``: the caller adds the ranks."""
        lo, hi = expert_range(experts.num_experts, group.rank(), group.size())
        new = cls(experts.num_experts, lo, hi, experts.hidden_size, experts.intermediate_size,
                  experts.activation_name, "bias" in experts.gate_proj, experts.backend,
                  group if all_sum else None)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            old = experts[proj]
            if isinstance(old, QuantizedExpertLinear):
                setattr(new, proj, new[proj].to_quantized(old.group_size, old.bits, old.mode))
        new.sort_threshold = experts.sort_threshold
        return new

    def __call__(self, x, weights, ids, validate: bool = True):
        if validate:
            _check_global(self, x, weights, ids)  # the global ids, against E
        inside = (ids >= self.lo) & (ids < self.hi)
        local = mx.where(inside, ids - self.lo, 0).astype(mx.uint32)
        w = mx.where(inside, weights, mx.zeros_like(weights))
        name = self.select_backend(x, local)
        y = BACKENDS[name].run(self, x, w, local).astype(mx.float32)
        if self.group is not None and self.group.size() > 1:
            y = mx.distributed.all_sum(y, group=self.group)
            WATCHDOG.beat_if_armed()
        return y.astype(x.dtype)


def _check_global(experts, x, weights, ids):
    E = experts.total_experts
    if ids.size:
        lo, hi = int(mx.min(ids).item()), int(mx.max(ids).item())
        if lo < 0 or hi >= E:
            raise ValueError(f"expert id {lo if lo < 0 else hi} out of range [0, {E}) in topk_ids")


def shard_experts(model, group, all_sum=True):
    """Swap every routed ``MoEExperts`` in ``model``'s MoE blocks for this rank's
    ``ShardedExperts``; returns ``{layer: (lo, hi)}``."""
    ranges = {}
    for idx, layer in enumerate(model.layers):
        for _, block in layer.named_modules():
            if isinstance(block, MoEBlock) and isinstance(block.routed, MoEExperts):
                new = ShardedExperts.like(block.routed, group, all_sum)
                setattr(block, block.experts_attr, new)
                ranges[idx] = (new.lo, new.hi)
    return ranges
