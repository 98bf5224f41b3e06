"""Mixed-bit quantization recipes (``--quant-predicate``, ``quantize={"recipe": ...}``).

A recipe gives each quantizable module its own settings. mlx-lm's four
(``mixed_2_6``, ``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``) are mlx-lm's own
predicate (``mlx_lm.convert.mixed_quant_predicate_builder``), so a folder made
with one equals ``mlx_lm.convert --quant-predicate`` byte for byte. Ours:

``moe_4_8``: MoE-aware. Routed experts (most of an MoE's bytes) at 4 bits;
everything every token runs through at 8 bits: attention, routers, shared
experts, dense MLP layers; ``lm_head`` at 6 and the embedding at 4 (as
mlx-lm's recipes); the routed experts of the first and last eighth of the
layers (mlx-lm's ``num_layers // 8``; none below 8 layers) at 6 bits.
"""

from typing import Callable, Dict, Union

import mlx.nn as nn

MLX_LM_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")

# ours: name -> (routed experts, routed experts in edge layers, dense paths, lm_head, embedding)
MOE_RECIPES: Dict[str, tuple] = {"moe_4_8": (4, 6, 8, 6, 4)}

RECIPES = MLX_LM_RECIPES + tuple(MOE_RECIPES)

# Module path pieces of routed experts (mlx-lm's names: switch_mlp, and ours: experts).
ROUTED = (".switch_mlp.", ".experts.")


def check_recipe(name: str, mode: str = "affine"):
    """ValueError naming the problem for an unknown recipe or a non-affine mode."""
    if name not in RECIPES:
        raise ValueError(f"Unknown quantization recipe '{name}'; expected one of {', '.join(RECIPES)}")
    if mode != "affine":
        raise ValueError(f"quantization recipe '{name}' supports only the 'affine' mode, not '{mode}'")


def recipe_predicate(name: str, model: nn.Module, group_size: int) -> Callable[[str, nn.Module], Union[bool, dict]]:
    """``predicate(path, module) -> settings dict`` for ``name`` on ``model``."""
    check_recipe(name)
    if name in MLX_LM_RECIPES:
        from mlx_lm.convert import mixed_quant_predicate_builder

        return mixed_quant_predicate_builder(name, model, group_size)
    expert_bits, edge_bits, dense_bits, head_bits, embed_bits = MOE_RECIPES[name]
    n = len(model.layers)
    edge = n // 8

    def q(bits):
        return {"group_size": group_size, "bits": bits, "mode": "affine"}

    def predicate(path, module):
        parts = path.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), None)
        if layer is None:
            return q(head_bits if "lm_head" in path else embed_bits if "embed" in path else dense_bits)
        if any(r in f".{path}." for r in ROUTED):
            return q(edge_bits if layer < edge or layer >= n - edge else expert_bits)
        return q(dense_bits)  # attention, routers, shared experts, dense MLPs

    return predicate
