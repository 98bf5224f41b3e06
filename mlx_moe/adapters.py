"""LoRA adapters trained by ``mlx_lm.lora``, applied unfused (``load(..., adapter_path=...)``,
``mlx_moe.generate --adapter-path``).

An adapter folder holds ``adapter_config.json`` and ``adapters.safetensors``. Linear layers
(attention, routers, dense MLPs) get mlx-lm's own ``LoRALinear`` / ``DoRALinear``; routed-expert
projections (``ExpertLinear`` / ``QuantizedExpertLinear``, keys under ``switch_mlp`` as in
mlx-lm) get :class:`LoRAExpertLinear`, mlx-lm's ``LoRASwitchLinear`` with the extras our expert
backends read. Which layers, rank and scale follow ``mlx_lm.tuner.utils.linear_to_lora_layers``
exactly (the last ``num_layers`` decoder layers; ``keys`` relative to a layer, or every linear
layer there). Experts with LoRA run on the ``gather`` backend (or ``loop``): the fused GPU
kernels read the base weights only.
"""

import json
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from .experts import PROJECTIONS, ExpertLinear, MoEExperts, QuantizedExpertLinear
from .cli import notice

EXPERT_TYPES = (ExpertLinear, QuantizedExpertLinear)
UNFUSED_BACKENDS = ("gather", "loop")


class LoRAExpertLinear(LoRASwitchLinear):
    """``LoRASwitchLinear`` over one of our stacked expert projections: the same parameters
    (``linear``, ``lora_a [E, r, in]``, ``lora_b [E, out, r]``) and call, plus the sizes and
    ``expert_weight(e)`` (base + scale * B_e A_e) that ``MoEExperts`` and the loop backend use."""

    @property
    def input_dims(self):
        return self.linear.input_dims

    @property
    def output_dims(self):
        return self.linear.output_dims

    def expert_weight(self, e):
        w = self.linear.expert_weight(e)
        delta = self.scale * (self.lora_b[e] @ self.lora_a[e])
        return (w.astype(mx.float32) + delta.astype(mx.float32)).astype(w.dtype)

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        # MLX's CPU gather_mm is float32-only (as ExpertLinear does for its weights).
        xf = self.dropout(x).astype(mx.float32)
        z = mx.gather_mm(xf, self.lora_a.astype(mx.float32).swapaxes(-1, -2),
                         rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.astype(mx.float32).swapaxes(-1, -2),
                         rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(x.dtype)


def linear_to_lora_layers(model: nn.Module, num_layers: int, config: dict, use_dora: bool = False):
    """``mlx_lm.tuner.utils.linear_to_lora_layers`` that also knows our expert projections."""
    if "scale" not in config:
        raise ValueError("adapter_config.json: lora_parameters has no 'scale' (mlx-lm's LoRA "
                         "config uses 'scale', not 'alpha')")
    for k in ("rank",):
        if k not in config:
            raise ValueError(f"adapter_config.json: lora_parameters has no {k!r}")
    dropout = config.get("dropout", 0.0)

    def to_lora(layer):
        if isinstance(layer, EXPERT_TYPES):
            if use_dora:
                raise ValueError(f"{type(layer).__name__} doesn't support DoRA yet.")
            lora = LoRAExpertLinear(layer.input_dims, layer.output_dims, layer.num_experts,
                                    r=config["rank"], dropout=dropout, scale=config["scale"])
            lora.linear = layer
            return lora
        if not use_dora and hasattr(layer, "to_lora"):
            return layer.to_lora(r=config["rank"], scale=config["scale"], dropout=dropout)
        if isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            cls = DoRALinear if use_dora else LoRALinear
        elif isinstance(layer, (SwitchLinear, QuantizedSwitchLinear)):
            if use_dora:
                raise ValueError(f"{type(layer).__name__} doesn't support DoRA yet.")
            cls = LoRASwitchLinear
        elif isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
            cls = DoRAEmbedding if use_dora else LoRAEmbedding
        else:
            raise ValueError(f"Can't convert layer of type {type(layer).__name__} to LoRA")
        return cls.from_base(layer, r=config["rank"], scale=config["scale"], dropout=dropout)

    keys = config.get("keys")
    if keys is None:
        kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear,
                 nn.Embedding, nn.QuantizedEmbedding) + EXPERT_TYPES
        keys = set()
        for layer in model.layers:
            layer.apply_to_modules(
                lambda p, m: keys.add(p) if hasattr(m, "to_lora") or isinstance(m, kinds) else None)
    keys = set(keys)
    for layer in model.layers[-max(num_layers, 0):]:
        lora_layers = [(k, to_lora(m)) for k, m in layer.named_modules() if k in keys]
        if lora_layers:
            layer.update_modules(tree_unflatten(lora_layers))
    top = [(k, to_lora(m)) for k, m in model.named_modules() if k in keys]
    if top:
        model.update_modules(tree_unflatten(top))


def read_config(adapter_path) -> types.SimpleNamespace:
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such adapter folder: {adapter_path}")
    f = folder / "adapter_config.json"
    if not f.exists():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (an mlx_lm.lora adapter folder "
                                "holds adapter_config.json and adapters.safetensors)")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{f}: expected a JSON object")
    if not (folder / "adapters.safetensors").exists():
        raise FileNotFoundError(f"{folder}: no adapters.safetensors")
    return types.SimpleNamespace(**config)


def load_adapters(model: nn.Module, adapter_path) -> nn.Module:
    """Apply the ``mlx_lm.lora`` adapter in ``adapter_path`` to ``model`` (in place), as
    ``mlx_lm.tuner.utils.load_adapters`` does; errors name the folder and the tensors."""
    folder = Path(adapter_path)
    config = read_config(folder)
    kind = getattr(config, "fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise ValueError(f"{folder}/adapter_config.json: unknown fine_tune_type {kind!r}")
    if kind != "full":
        params = getattr(config, "lora_parameters", None)
        num_layers = getattr(config, "num_layers", None)
        if not isinstance(params, dict) or not isinstance(num_layers, int):
            raise ValueError(f"{folder}/adapter_config.json: needs lora_parameters (an object) "
                             "and num_layers (a whole number)")
        try:
            linear_to_lora_layers(model, num_layers, params, use_dora=(kind == "dora"))
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
    weights = mx.load(str(folder / "adapters.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    if kind == "full":
        allowed = params
    else:
        allowed = {n: p for n, p in params.items() if n.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}
    errors = []
    for name, w in weights.items():
        if name not in allowed:
            errors.append(f"{name}: not an adapter parameter in the model")
        elif w.shape != allowed[name].shape:
            errors.append(f"{name}: adapter shape {tuple(w.shape)} does not match the model's "
                          f"{tuple(allowed[name].shape)}")
    if errors:
        raise ValueError(f"{folder}/adapters.safetensors does not fit the model: " + "; ".join(errors[:5])
                         + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    model.load_weights(list(weights.items()), strict=False)
    asked = set()
    for _, m in model.named_modules():
        if isinstance(m, MoEExperts) and any(
                isinstance(getattr(m, p), LoRAExpertLinear) for p in PROJECTIONS):
            if m.backend not in UNFUSED_BACKENDS:
                asked.add(m.backend)
                m.backend = "gather"
    if asked - {"auto"}:
        notice(f"experts with LoRA adapters run on the gather backend (not {', '.join(sorted(asked - {'auto'}))})")
    mx.eval(model.parameters())
    model.eval()
    return model
