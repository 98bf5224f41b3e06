"""Quantization settings and which modules get them (mlx-lm's rules).

``QuantSpec`` validates a request; ``plan_quantization`` decides per module path,
exactly as ``mlx_lm.utils.quantize_model`` would, so our folders load in mlx-lm
and our 4-bit models match mlx-lm's token for token.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

# mode -> (allowed bits, allowed group sizes, default bits, default group size)
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64),
    "mxfp4": ((4,), (32,), 4, 32),
    "nvfp4": ((4,), (16,), 4, 16),
    "mxfp8": ((8,), (32,), 8, 32),
}


def mode_defaults(mode, group_size=None, bits=None):
    """``(group_size, bits)`` with the ones not given (None) at ``mode``'s defaults."""
    if mode not in MODES:
        raise ValueError(f"Unsupported quantization mode '{mode}'; expected one of {sorted(MODES)}")
    _, _, bits_default, group_default = MODES[mode]
    return group_size or group_default, bits or bits_default


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"
    recipe: Optional[str] = None  # a mixed-bit recipe of ``mlx_moe.recipes``

    @classmethod
    def parse(cls, spec) -> Optional["QuantSpec"]:
        """From None, a QuantSpec, a recipe name (``"moe_4_8"``), or a dict like
        ``{"bits": 4, "group_size": 64}`` (optionally with ``"recipe"``)."""
        if spec is None or isinstance(spec, QuantSpec):
            return spec
        spec = {"recipe": spec} if isinstance(spec, str) else dict(spec)
        mode = spec.pop("mode", "affine") or "affine"
        recipe = spec.pop("recipe", None)
        group, bits = mode_defaults(mode, spec.pop("group_size", None), spec.pop("bits", None))
        bits_ok, groups_ok, _, _ = MODES[mode]
        if spec:
            raise ValueError(f"Unknown quantization keys {sorted(spec)}")
        if bits not in bits_ok:
            raise ValueError(f"Unsupported bits={bits} for mode '{mode}'; supported: {list(bits_ok)}")
        if group not in groups_ok:
            raise ValueError(
                f"Unsupported group_size={group} for mode '{mode}'; supported: {list(groups_ok)}"
            )
        if recipe is not None:
            from .recipes import check_recipe

            check_recipe(recipe, mode)
        return cls(bits, group, mode, recipe)

    def params(self) -> dict:
        """The default settings, as config.json's ``quantization`` top level holds them."""
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}


def plan_quantization(model: nn.Module, spec: QuantSpec) -> Dict[str, dict]:
    """``{module_path: params}`` for every module mlx-lm would quantize under ``spec``.

    mlx-lm's rule: modules with ``to_quantized`` whose input dim divides by the
    group size, filtered and overridden by the model's ``quant_predicate``
    (e.g. routers kept at 8 bits); a recipe's predicate replaces the model's,
    as ``mlx_lm.convert --quant-predicate`` does.
    """
    if spec.recipe is not None:
        from .recipes import recipe_predicate

        predicate = recipe_predicate(spec.recipe, model, spec.group_size)
    else:
        predicate = getattr(model, "quant_predicate", None)
    plan = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % spec.group_size:
            continue
        choice = predicate(path, module) if predicate else True
        if choice is True:
            plan[path] = spec.params()
        elif isinstance(choice, dict):
            # mlx-lm calls to_quantized(**choice): unnamed settings take the
            # method defaults (affine), not the requested mode.
            plan[path] = {"group_size": 64, "bits": 4, "mode": "affine", **choice}
    return plan


def apply_plan(model: nn.Module, plan: Dict[str, dict]):
    """Swap the planned modules for their quantized classes (lazily; no weights read)."""
    if plan:
        nn.quantize(model, class_predicate=lambda p, m: plan.get(p, False))


def config_entry(spec: QuantSpec, plan: Dict[str, dict]) -> dict:
    """The ``quantization`` entry of config.json, in mlx-lm's format."""
    entry = spec.params()
    for path, params in plan.items():
        if params != spec.params() or spec.recipe is not None:  # mlx-lm lists every path a recipe set
            entry[path] = params
    return entry


def is_quantized(module) -> bool:
    return hasattr(module, "scales") and hasattr(module, "bits")


def module_params(module) -> dict:
    return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}


@dataclass
class QuantizedTensor:
    """A tensor already in MLX quantized form (e.g. mxfp4 experts from disk)."""

    weight: mx.array
    scales: mx.array
    biases: Optional[mx.array]
    group_size: int
    bits: int
    mode: str

    @property
    def params(self):
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def dequantize(self, dtype=mx.bfloat16):
        return mx.dequantize(
            self.weight, self.scales, self.biases,
            group_size=self.group_size, bits=self.bits, mode=self.mode,
        ).astype(dtype)

    def take_rows(self, rows):
        """Rows of the output dim (e.g. gate rows of an interleaved gate_up)."""
        pick = lambda a: None if a is None else mx.contiguous(a[..., rows, :])
        return QuantizedTensor(
            pick(self.weight), pick(self.scales), pick(self.biases),
            self.group_size, self.bits, self.mode,
        )
