import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gpt_oss as base
from mlx_lm.models.rope_utils import YarnRoPE

from ..experts import MoEExperts
from ..routing import TopKSoftmax
from .base import Architecture, ExpertLayout, MoEBlock


class GptOssBlock(MoEBlock):
    experts_attr = "experts"
    gate_attr, router_attr = "router", "topk"

    def __init__(self, args, config):
        super().__init__()
        E, H = args.num_local_experts, args.hidden_size
        self.experts = MoEExperts(
            E, H, args.intermediate_size, activation="swiglu_oai", bias=True
        )
        self.router = nn.Linear(H, E, bias=True)
        self.topk = TopKSoftmax(args.num_experts_per_tok)


def untruncated_yarn(model, args, config):
    """gpt-oss sets YaRN's ``truncate: false`` (correction range not rounded to
    whole dims); mlx-lm always rounds, so rebuild the frequencies as HF does."""
    rs = config.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) != "yarn" or rs.get("truncate", True):
        return
    for layer in model.layers:
        rope = layer.self_attn.rope
        if isinstance(rope, YarnRoPE):
            rope._freqs = _yarn_freqs(rope.dims, args.rope_theta, rs)


def _yarn_freqs(dims, base, rs):
    orig = rs.get("original_max_position_embeddings", 4096)

    def correction_dim(rotations):
        return dims * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(correction_dim(rs.get("beta_fast", 32)), 0)
    high = min(correction_dim(rs.get("beta_slow", 1)), dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inter = rs["factor"] * extra
    mask = 1.0 - ramp
    return (inter * extra) / (inter * mask + extra * (1 - mask))


ARCH = Architecture(
    "gpt_oss",
    base,
    GptOssBlock,
    base.MLPBlock,
    layout=ExpertLayout(stacked_orientation="in_out", gate_up="interleave"),
    finalize=untruncated_yarn,
)
