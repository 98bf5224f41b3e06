"""The routed-expert layer: stacked ``[E, out, in]`` weights and its backends.

``MoEExperts`` takes the router's output from outside (as the seeds do):
``y = experts(x, topk_weights, topk_ids)`` with ``x [..., H]`` and
``topk_weights, topk_ids [..., k]``. Parameter names (``gate_proj``, ``up_proj``,
``down_proj`` with ``weight``/``scales``/``biases``/``bias``) match mlx-lm's
``SwitchGLU`` so saved folders load in mlx-lm and mlx-swift unchanged.

Sizes: ``H`` (``hidden_size``) is the model width, ``I`` (``intermediate_size``)
one expert's width; mlx-lm's ``SwitchGLU(input_dims, hidden_dims, num_experts)``
calls them ``input_dims`` and ``hidden_dims``. A projection layer only knows its
own ``input_dims``/``output_dims``, as mlx-lm's ``SwitchLinear`` does.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import get_activation
from .quantization import mode_defaults

# The expert projections, named as in mlx-lm's SwitchGLU.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# (token, expert) pair count from which tokens are sorted by expert; mlx-lm's value.
SORT_THRESHOLD = 64
MAX_PAIRS_PER_CALL = 32768


def _placeholder_key():
    """A key for random inits that ``from_*`` constructors replace at once: they
    must not advance the global generator (seeded runs stay the same)."""
    return mx.random.key(0)


class ExpertLinear(nn.Module):
    """``E`` float linear layers stacked as ``weight [E, out, in]`` (mlx-lm's
    ``SwitchLinear``: same arguments, same parameters). ``key``: PRNG key of the
    random init (default: the global generator)."""

    def __init__(self, input_dims, output_dims, num_experts, bias=False, *, key=None):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(
            -scale, scale, (num_experts, output_dims, input_dims), key=key
        )
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @classmethod
    def from_arrays(cls, weight, bias=None):
        """The layer holding ``weight [E, out, in]`` and ``bias [E, out]`` (no copy)."""
        num_experts, output_dims, input_dims = weight.shape
        layer = cls(input_dims, output_dims, num_experts, bias is not None, key=_placeholder_key())
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        return layer

    @property
    def num_experts(self):
        return self.weight.shape[0]

    @property
    def output_dims(self):
        return self.weight.shape[1]

    @property
    def input_dims(self):
        return self.weight.shape[2]

    def expert_weight(self, e):
        return self.weight[e]

    def __call__(self, x, indices, sorted_indices=False):
        w = self["weight"]
        dtype = x.dtype
        if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm handles float32 only.
            x, w = x.astype(mx.float32), w.astype(mx.float32)
        y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return _add_bias(self, y.astype(dtype), indices)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False,
                     global_scale=False):
        """What ``nn.quantize`` calls: ``group_size``, ``bits`` (None: the mode's
        default), ``mode``, and ``quantize_input`` when true. mlx-lm's
        ``SwitchLinear`` also takes ``global_scale`` (nvfp4 per-expert tensor
        scales); no backend here runs either, so both are refused."""
        for name, value in (("quantize_input", quantize_input), ("global_scale", global_scale)):
            if value:
                raise ValueError(f"{name}={value!r} is not supported for routed experts")
        group_size, bits = mode_defaults(mode, group_size, bits)
        w, scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        return QuantizedExpertLinear.from_arrays(
            w, scales, biases[0] if biases else None, self.get("bias"),
            group_size=group_size, bits=bits, mode=mode,
        )


class QuantizedExpertLinear(nn.Module):
    """``E`` quantized linear layers (MLX quantization: affine, mxfp4, nvfp4, mxfp8);
    mlx-lm's ``QuantizedSwitchLinear`` without ``global_scale``."""

    def __init__(
        self,
        input_dims,
        output_dims,
        num_experts,
        bias=False,
        group_size=None,
        bits=None,
        mode="affine",
    ):
        super().__init__()
        group_size, bits = mode_defaults(mode, group_size, bits)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(
            mx.zeros((num_experts, output_dims, input_dims)), group_size, bits, mode=mode
        )
        self.biases = biases[0] if biases else None
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @classmethod
    def from_arrays(cls, weight, scales, biases=None, bias=None, *, group_size, bits, mode="affine"):
        """The layer holding already quantized ``weight``/``scales``/``biases``
        (``mx.quantize``'s outputs for ``[E, out, in]``) and ``bias [E, out]`` (no copy)."""
        num_experts, output_dims, packed = weight.shape
        layer = cls(packed * 32 // bits, output_dims, num_experts, bias is not None, group_size, bits, mode)
        layer.weight, layer.scales, layer.biases = weight, scales, biases
        if bias is not None:
            layer.bias = bias
        layer.freeze()
        return layer

    @property
    def num_experts(self):
        return self.weight.shape[0]

    @property
    def output_dims(self):
        return self.weight.shape[1]

    @property
    def input_dims(self):
        return self.weight.shape[2] * 32 // self.bits

    def expert_weight(self, e):
        return mx.dequantize(
            self.weight[e],
            self.scales[e],
            None if self.biases is None else self.biases[e],
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def __call__(self, x, indices, sorted_indices=False):
        y = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        return _add_bias(self, y, indices)


def _add_bias(layer, y, indices):
    if "bias" in layer:
        y = y + mx.expand_dims(layer["bias"][indices], -2)
    return y


def combine(y, weights):
    """Weighted top-k sum ``[..., k, H] x [..., k] -> [..., H]`` accumulated in float32."""
    out = (y.astype(mx.float32) * weights[..., None].astype(mx.float32)).sum(axis=-2)
    return out


# ---------------------------------------------------------------- backends


@dataclass
class Backend:
    """A way to run ``MoEExperts``: ``run(experts, x, weights, ids) -> y [..., H]``.

    ``available(experts, x, ids)`` says whether it can run this call here; ``auto``
    picks the first available backend in ``AUTO_ORDER``.
    """

    run: Callable
    available: Callable = lambda experts, x, ids: True


BACKENDS: Dict[str, Backend] = {}
AUTO_ORDER = ["fused", "prefill", "gather"]


def register_backend(name: str, backend: Backend):
    BACKENDS[name] = backend


def _gather_sort(x, indices):
    *_, k = indices.shape
    flat = indices.flatten()
    order = mx.argsort(flat)
    inv_order = mx.argsort(order)
    return x.flatten(0, -3)[order // k], flat[order], inv_order


def _project(experts, x, idx, sorted_indices):
    h = experts.activation(
        experts.gate_proj(x, idx, sorted_indices=sorted_indices),
        experts.up_proj(x, idx, sorted_indices=sorted_indices),
    )
    return experts.down_proj(h, idx, sorted_indices=sorted_indices)


def run_gather(experts, x, weights, ids):
    """``gather_mm``/``gather_qmm`` over all (token, expert) pairs, sorted when many."""
    x = mx.expand_dims(x, (-2, -3))
    ids = mx.stop_gradient(ids)
    if ids.size < experts.sort_threshold:
        y = _project(experts, x, ids, False)
    else:
        x, idx, inv_order = _gather_sort(x, ids)
        # The CUDA kernels launch a grid slice per pair (at most 65535 of them).
        step = MAX_PAIRS_PER_CALL
        y = mx.concatenate(
            [_project(experts, x[i : i + step], idx[i : i + step], True) for i in range(0, idx.size, step)]
        )
        y = mx.unflatten(y[inv_order], 0, ids.shape)
    return combine(y.squeeze(-2), weights)


def run_loop(experts, x, weights, ids):
    """Per-expert reference: dense matmuls on each expert's tokens, scatter-added.

    This is the oracle, so it checks ids on the host (it is never a hot path).
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    ids_np = np.array(ids.reshape(x.shape[0], -1))
    w = weights.reshape(x.shape[0], -1).astype(mx.float32)
    E = experts.num_experts
    bad = (ids_np < 0) | (ids_np >= E)
    if bad.any():
        raise ValueError(
            f"expert id {int(ids_np[bad][0])} out of range [0, {E}) in topk_ids"
        )
    out = mx.zeros((x.shape[0], shape[-1]), dtype=mx.float32)
    for e in np.unique(ids_np):
        rows, slots = np.nonzero(ids_np == e)
        xe = x[mx.array(rows)]
        h = experts.activation(
            _dense(experts.gate_proj, e, xe), _dense(experts.up_proj, e, xe)
        )
        ye = _dense(experts.down_proj, e, h).astype(mx.float32)
        out = out.at[mx.array(rows)].add(ye * w[mx.array(rows), mx.array(slots)][:, None])
    return out.reshape(*shape[:-1], shape[-1])


def _dense(layer, e, x):
    y = x @ layer.expert_weight(int(e)).T.astype(x.dtype)
    if "bias" in layer:
        y = y + layer["bias"][int(e)]
    return y


register_backend("gather", Backend(run_gather))
register_backend("loop", Backend(run_loop))


class MoEExperts(nn.Module):
    """``num_experts`` gated MLP experts: ``down(act(gate(x), up(x)))``, each
    ``H -> I -> H`` for ``hidden_size`` H and ``intermediate_size`` I.

    mlx-lm's ``SwitchGLU`` keywords ``input_dims`` (= H) and ``hidden_dims`` (= I)
    are accepted in their place. ``key``: PRNG key of the random init.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: Optional[int] = None,
        intermediate_size: Optional[int] = None,
        activation: str = "silu",
        bias: bool = False,
        backend: str = "auto",
        *,
        input_dims: Optional[int] = None,
        hidden_dims: Optional[int] = None,
        key=None,
    ):
        super().__init__()
        H = _one_of("hidden_size", hidden_size, "input_dims", input_dims)
        I = _one_of("intermediate_size", intermediate_size, "hidden_dims", hidden_dims)
        for name, value in (("num_experts", num_experts), ("hidden_size", H), ("intermediate_size", I)):
            _check_size(name, value)
        keys = [None] * 3 if key is None else mx.random.split(key, 3)
        self.gate_proj = ExpertLinear(H, I, num_experts, bias, key=keys[0])
        self.up_proj = ExpertLinear(H, I, num_experts, bias, key=keys[1])
        self.down_proj = ExpertLinear(I, H, num_experts, bias, key=keys[2])
        self.activation_name, self.activation = get_activation(activation)
        self.backend = backend
        self.sort_threshold = SORT_THRESHOLD

    @classmethod
    def from_projections(cls, gate_proj, up_proj, down_proj, activation="silu", backend="auto"):
        """Experts over existing projection layers (``ExpertLinear`` or
        ``QuantizedExpertLinear``), e.g. views of the offload pool (no copy)."""
        experts = cls(gate_proj.num_experts, down_proj.output_dims, gate_proj.output_dims,
                      activation, backend=backend, key=_placeholder_key())
        experts.gate_proj, experts.up_proj, experts.down_proj = gate_proj, up_proj, down_proj
        return experts

    @property
    def num_experts(self):
        return self.gate_proj.num_experts

    @property
    def hidden_size(self):
        """H, the model width."""
        return self.down_proj.output_dims

    @property
    def intermediate_size(self):
        """I, one expert's width."""
        return self.gate_proj.output_dims

    @property
    def hidden_dims(self):
        """mlx-lm's ``SwitchGLU`` name for I (``intermediate_size``)."""
        return self.intermediate_size

    @property
    def quantized(self) -> Optional[dict]:
        p = self.gate_proj
        if isinstance(p, QuantizedExpertLinear):
            return {"group_size": p.group_size, "bits": p.bits, "mode": p.mode}
        return None

    def select_backend(self, x, ids) -> str:
        if self.backend != "auto":
            if self.backend not in BACKENDS:
                raise ValueError(
                    f"Unknown MoE backend '{self.backend}'; available: {sorted(BACKENDS)}"
                )
            return self.backend
        for name in AUTO_ORDER:
            b = BACKENDS.get(name)
            if b is not None and b.available(self, x, ids):
                return name
        return "gather"

    def __call__(self, x, weights, ids, validate: bool = True):
        """``y [..., H]`` in x's dtype for ``x [..., H]``, ``weights, ids [..., k]``.

        ``validate`` (default on, for direct calls): refuse shapes that do not
        agree and expert ids outside ``[0, E)``; the id check reads ``ids`` on
        the host (one sync). Our MoE blocks pass ``validate=False``: their
        routers give valid ids by construction, and decode must not sync per
        layer.
        """
        if validate:
            self.check_inputs(x, weights, ids)
        name = self.select_backend(x, ids)
        return BACKENDS[name].run(self, x, weights, ids).astype(x.dtype)

    def check_inputs(self, x, weights, ids):
        """ValueError naming the shapes (or the expert id) when ``x [..., H]``,
        ``weights [..., k]`` and ``ids [..., k]`` (integer ids in ``[0, E)``) do
        not agree. Evaluates ``ids`` (a host sync)."""
        H, E = self.hidden_size, self.num_experts
        shapes = f"x {tuple(x.shape)}, topk_weights {tuple(weights.shape)}, topk_ids {tuple(ids.shape)}"
        if x.ndim < 1 or x.shape[-1] != H:
            raise ValueError(f"MoEExperts: x must be [..., {H}] (hidden size {H}); got {shapes}")
        if ids.ndim < 1 or ids.shape[-1] < 1 or tuple(ids.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(
                f"MoEExperts: topk_ids must be [..., k] with x's leading shape "
                f"{tuple(x.shape[:-1])}; got {shapes}"
            )
        if tuple(weights.shape) != tuple(ids.shape):
            raise ValueError(f"MoEExperts: topk_weights and topk_ids must have one shape; got {shapes}")
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise ValueError(f"MoEExperts: topk_ids must be integers; got dtype {ids.dtype}")
        if ids.size:
            lo, hi = mx.min(ids), mx.max(ids)
            mx.eval(lo, hi)
            if lo.item() < 0 or hi.item() >= E:
                bad = lo.item() if lo.item() < 0 else hi.item()
                raise ValueError(f"MoEExperts: expert id {bad} out of range [0, {E}) in topk_ids")


def _check_size(name, value):
    """A layer size must be an integer >= 1 (0 experts used to crash MLX)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"MoEExperts: {name} must be an integer >= 1; got {value!r}")


def _one_of(name, value, alias, alias_value):
    """``value``, or its mlx-lm spelling ``alias_value``; exactly one must be given."""
    if value is not None and alias_value is not None:
        raise ValueError(f"MoEExperts: pass {name} or {alias} (mlx-lm's name for it), not both")
    if value is None and alias_value is None:
        raise TypeError(f"MoEExperts: missing {name}")
    return alias_value if value is None else value
