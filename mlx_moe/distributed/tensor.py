"""Tensor parallel through mlx-lm's own ``Model.shard(group)`` (qwen3_moe,
deepseek_v3, gpt_oss have one): attention heads, dense MLPs and shared experts are
split with MLX's sharded linear layers (``mlx.nn.layers.distributed``), the routed
experts along I (``shard_inplace``), and each MoE block's partial output is summed
over the group — what mlx-lm's own MoE blocks do with ``sharding_group``, done here by
giving our block a subclass whose ``__call__`` adds the ``all_sum``.

``ep+tp``: the experts are already this rank's E/N (``ShardedExperts`` without an
``all_sum`` of its own); ``shard()`` sees stand-ins for them, and the block's one
``all_sum`` adds the ranks' routed, shared and attention-free partial outputs.
"""

import functools

import mlx.core as mx
import mlx.nn as nn

from ..experts import ExpertLinear
from ..models import MoEBlock
from .group import WATCHDOG

HEAD_ATTRS = ("n_heads", "n_kv_heads", "num_heads", "num_attention_heads", "num_key_value_heads")


@functools.lru_cache(maxsize=None)
def _tensor_parallel(cls):
    def __call__(self, x):
        y = cls.__call__(self, x)
        y = mx.distributed.all_sum(y, group=self.sharding_group)
        WATCHDOG.beat_if_armed()
        return y

    return type(f"TensorParallel{cls.__name__}", (cls,), {"__call__": __call__})


class _Stub(nn.Module):
    """What ``shard()`` splits instead of expert-parallel experts (they stay whole)."""

    def __init__(self, n):
        super().__init__()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, proj, ExpertLinear(n, n, 1, bias=True, key=mx.random.key(0)))


def check_shardable(model, group, config):
    n = group.size()
    if not hasattr(model, "shard"):
        raise ValueError(
            f"{config.get('model_type')}: mlx-lm has no shard() for this architecture, so "
            "parallel='tp' / 'ep+tp' cannot split it; use parallel='ep'"
        )
    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "self_attn", None)
        for a in HEAD_ATTRS:
            v = getattr(attn, a, None)
            if isinstance(v, int) and v % n:
                raise ValueError(f"layer {i}: {a} = {v} does not split over {n} ranks (tensor parallel)")


def tensor_parallel(model, group, config, experts_whole=False):
    """Split ``model`` over ``group`` with its ``shard()``; ``experts_whole``: leave the
    routed experts as they are (expert parallel holds them)."""
    check_shardable(model, group, config)
    blocks = [m for _, m in model.named_modules() if isinstance(m, MoEBlock)]
    kept = {}
    if experts_whole:
        for b in blocks:
            kept[id(b)] = b.routed
            setattr(b, b.experts_attr, _Stub(group.size()))
    try:
        model.shard(group)
    finally:
        for b in blocks:
            if id(b) in kept:
                setattr(b, b.experts_attr, kept[id(b)])
    for b in blocks:
        if getattr(b, "sharding_group", None) is not None:
            b.__class__ = _tensor_parallel(type(b))
    mx.eval(model.parameters())
    return model
