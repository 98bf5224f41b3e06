"""Expert weight layouts: detect how a checkpoint stores one layer's routed
experts and turn them into our stacked ``[E, out, in]`` tensors.

Each layout is one small module with ``detect(ctx)`` and ``extract(ctx)``; to
support a new one, add a module and list it in ``FORMATS``.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Set, Tuple

from ..experts import PROJECTIONS
from ..safetensors_io import CheckpointError
from . import mlx_stacked, mxfp4, per_expert, stacked
from .fp8 import dequantize_fp8_blocks, dequantize_fp8_rest

# Tried in order; the first layout that recognises the layer wins.
FORMATS = [mlx_stacked, mxfp4, stacked, per_expert]

# Containers every architecture may use besides its own: Gemma-4 style ``moe.*``
# and experts hung directly on the layer.
EXTRA_CONTAINERS = ("moe.experts", "moe", "experts")


@dataclass
class ExpertContext:
    """One layer's view of the checkpoint, for a layout module."""

    layer: int
    names: Set[str]  # tensor names relative to the layer prefix
    get: Callable  # relative name -> lazy mx.array
    shape: Callable  # relative name -> tuple
    ours: str  # our experts prefix, e.g. "mlp.switch_mlp"
    containers: Tuple[str, ...]
    proj_names: Dict[str, str]  # checkpoint projection name -> ours
    num_experts: int
    hidden: int  # H
    intermediate: int  # I
    orientation: str  # tie-break for stacked tensors whose sizes can't decide
    gate_up: str  # "concat" | "interleave"
    fp8_block: Tuple[int, int] = (128, 128)
    consumed: Set[str] = field(default_factory=set)

    def expected(self, proj):
        """(out, in) of our projection."""
        H, I = self.hidden, self.intermediate
        return (H, I) if proj == "down_proj" else (I, H)

    def take(self, name):
        self.consumed.add(name)
        return self.get(name)

    def fail(self, msg):
        raise CheckpointError(f"layer {self.layer}: {msg}")


def extract_experts(ctx: ExpertContext) -> Dict[str, object]:
    """``{"gate_proj.weight": array | QuantizedTensor, ...}`` for the layer, or {}."""
    for fmt in FORMATS:
        if fmt.detect(ctx):
            out = fmt.extract(ctx)
            missing = [p for p in PROJECTIONS if f"{p}.weight" not in out]
            if missing:
                ctx.fail(f"routed experts incomplete in {fmt.__name__.rsplit('.', 1)[-1]} layout: no {missing}")
            return out
    return {}


__all__ = ["EXTRA_CONTAINERS", "ExpertContext", "FORMATS", "extract_experts", "dequantize_fp8_blocks", "dequantize_fp8_rest"]
