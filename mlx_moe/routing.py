"""Routers: router logits -> (topk_weights, topk_ids).

Each router keeps the arithmetic order of the reference implementation of its
family, so float32 runs agree with mlx-lm / Hugging Face to rounding.

:func:`route` is the one place a MoE block routes through: it runs the router
kernel (``mlx_moe/kernels/router``, registered by ``mlx_moe.kernels.register``)
where that can run (GPU default device, decode), else these MLX ops.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


# The router kernel backend (``available``/``route``), set by register_kernel.
_KERNEL = None


def register_kernel(backend):
    global _KERNEL
    _KERNEL = backend


def route(x, gate, router=None):
    """``(weights, ids)`` of tokens ``x``.

    ``gate`` holds the router weight: an ``nn.Linear``/``QuantizedLinear`` whose
    logits ``router`` (SoftmaxTopK, TopKSoftmax) turns into weights and ids, or
    a ``GroupLimitedGate`` that does both (``router`` None).
    """
    k = _KERNEL
    if k is not None and k.available(gate, router, x):
        return k.route(gate, router, x)
    return gate(x) if router is None else router(gate(x))


def _topk_ids(scores, k):
    return mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])


@dataclass
class SoftmaxTopK:
    """softmax over all experts, then top-k (Qwen2/3-MoE, OLMoE)."""

    k: int
    normalize: bool = False

    def __call__(self, logits):
        probs = mx.softmax(logits, axis=-1, precise=True)
        ids = _topk_ids(probs, self.k)
        weights = mx.take_along_axis(probs, ids, axis=-1)
        if self.normalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights, ids


@dataclass
class TopKSoftmax:
    """top-k of the logits, then softmax over the k chosen (Mixtral, gpt-oss)."""

    k: int

    def __call__(self, logits):
        ids = _topk_ids(logits, self.k)
        weights = mx.take_along_axis(logits, ids, axis=-1)
        return mx.softmax(weights, axis=-1, precise=True), ids


class GroupLimitedGate(nn.Module):
    """DeepSeek-V3 gate: sigmoid scores + correction bias, group-limited top-k.

    Experts are split into ``n_group`` groups; only the ``topk_group`` groups with
    the best top-2 score sums are eligible. Weights are the uncorrected sigmoid
    scores of the chosen experts, renormalised and scaled by
    ``routed_scaling_factor``. Holds ``weight`` and ``e_score_correction_bias``
    under mlx-lm's names.
    """

    def __init__(
        self,
        hidden_size,
        num_experts,
        k,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        normalize=True,
    ):
        super().__init__()
        self.weight = mx.zeros((num_experts, hidden_size))
        self.e_score_correction_bias = mx.zeros((num_experts,))
        self.k, self.n_group, self.topk_group = k, n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.normalize = normalize

    def __call__(self, x):
        scores = mx.sigmoid((x @ self.weight.T).astype(mx.float32))
        choice = scores + self.e_score_correction_bias
        drop = self.n_group - self.topk_group
        if self.n_group > 1 and drop > 0:
            choice = mx.unflatten(choice, axis=-1, shape=(self.n_group, -1))
            group_scores = mx.topk(choice, 2, axis=-1).sum(axis=-1, keepdims=True)
            dropped = mx.argpartition(group_scores, kth=drop - 1, axis=-2)[..., :drop, :]
            choice = mx.put_along_axis(
                choice, mx.stop_gradient(dropped), mx.array(0.0), axis=-2
            )
            choice = mx.flatten(choice, -2, -1)
        ids = _topk_ids(choice, self.k)
        weights = mx.take_along_axis(scores, ids, axis=-1)
        if self.k > 1 and self.normalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights * self.routed_scaling_factor, ids
