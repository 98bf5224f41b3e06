"""Architecture registry: ``model_type`` -> ``Architecture``; ``build_model``."""

from . import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Architecture, ExpertLayout, MoEBlock

ARCHITECTURES = {
    m.ARCH.model_type: m.ARCH
    for m in (qwen3_moe, mixtral, qwen2_moe, olmoe, deepseek_v3, gpt_oss)
}


def get_architecture(config: dict) -> Architecture:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture model_type={model_type!r}; "
            f"mlx-moe supports {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def build_model(config: dict):
    """Build the (lazy, randomly initialised) model for ``config`` with our MoE blocks.

    Returns ``(model, arch)``. Nothing is materialised until evaluated, so a
    30B-parameter skeleton costs no memory.
    """
    arch = get_architecture(config)
    args = arch.module.ModelArgs.from_dict(config)
    model = arch.module.Model(args)
    for idx, layer in enumerate(model.layers):
        block = getattr(layer, arch.moe_attr)
        if not isinstance(block, arch.replaces):
            continue
        dense = arch.dense_override and arch.dense_override(args, config, idx)
        setattr(layer, arch.moe_attr, dense or arch.moe_block(args, config))
    if arch.finalize:
        arch.finalize(model, args, config)
    return model, arch


__all__ = ["ARCHITECTURES", "Architecture", "ExpertLayout", "MoEBlock", "build_model", "get_architecture"]
