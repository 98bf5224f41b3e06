"""Gated expert activations: ``act(gate, up) -> h``.

Each entry computes one expert's intermediate activation ``h [..., I]`` from
its gate and up projections. ``swiglu_oai`` is gpt-oss's clamped SwiGLU.
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn

OAI_ALPHA = 1.702
OAI_LIMIT = 7.0


def silu(gate, up):
    return nn.silu(gate) * up


def gelu_tanh(gate, up):
    return nn.gelu_approx(gate) * up


def gelu(gate, up):
    return nn.gelu(gate) * up


def relu(gate, up):
    return nn.relu(gate) * up


@partial(mx.compile, shapeless=True)
def swiglu_oai(gate, up):
    # Same arithmetic order as mlx-lm's swiglu_oai so float32 results match bit for bit.
    gate = mx.minimum(gate, OAI_LIMIT)
    up = mx.clip(up, -OAI_LIMIT, OAI_LIMIT)
    return (up + 1.0) * (gate * mx.sigmoid(OAI_ALPHA * gate))


ACTIVATIONS = {
    "silu": silu,
    "gelu_tanh": gelu_tanh,
    "gelu": gelu,
    "relu": relu,
    "swiglu_oai": swiglu_oai,
}

# Names used by Hugging Face configs (`hidden_act`) mapped to ours.
HF_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def get_activation(name: str):
    name = HF_NAMES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Unknown expert activation '{name}'; expected one of {sorted(ACTIVATIONS)}"
        )
    return name, ACTIVATIONS[name]
