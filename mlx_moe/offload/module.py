"""``OffloadedExperts``: the routed-expert layer over the slot pool.

Same call as ``MoEExperts``: ``y = experts(x, topk_weights, topk_ids)``. It
evaluates ``topk_ids`` on the host (a sync per MoE layer, the price of knowing
what to read), makes those experts resident through the cache, remaps expert
ids to slot ids and runs the very same backend (``gather_qmm`` or a fused
kernel) over the pool. One row of ``gather_qmm`` does not depend on which
matrix index it is given or on the other rows, so the output is bit-identical
to the resident layer's.

When one call needs more experts than the pool can hold at once (a long prompt
at a small budget), the experts are taken in groups; every group runs the
gather over *all* (token, expert) pairs with the same shapes as the resident
call -- pairs outside the group point at slot 0 and are discarded -- and the
per-pair outputs are merged before the one weighted sum, so the result is the
``gather`` backend's, bit for bit.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..experts import (
    BACKENDS,
    PROJECTIONS,
    ExpertLinear,
    MoEExperts,
    QuantizedExpertLinear,
    _gather_sort,
    _project,
    combine,
)


def _proj(pool, proj):
    a = {k: pool.arrays.get(f"{proj}.{k}") for k in ("weight", "scales", "biases", "bias")}
    q = pool.quantization.get(proj)
    if q:
        return QuantizedExpertLinear.from_arrays(
            a["weight"], a["scales"], a["biases"], a["bias"],
            group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
        )
    return ExpertLinear.from_arrays(a["weight"], a["bias"])


def pool_view(pool, activation: str, backend: str) -> MoEExperts:
    """A ``MoEExperts`` whose ``[S, ...]`` arrays are the pool's (no copy)."""
    v = MoEExperts.from_projections(*(_proj(pool, p) for p in PROJECTIONS), activation, backend)
    v.freeze()
    return v


def pair_outputs(experts, x, ids):
    """``run_gather`` before its weighted sum: per-pair outputs ``[..., k, H]``."""
    x = mx.expand_dims(x, (-2, -3))
    do_sort = ids.size >= experts.sort_threshold
    idx, inv_order = ids, None
    if do_sort:
        x, idx, inv_order = _gather_sort(x, ids)
    y = _project(experts, x, idx, do_sort)
    if do_sort:
        y = mx.unflatten(y[inv_order], 0, ids.shape)
    return y.squeeze(-2)


class OffloadedExperts(nn.Module):
    """Routed experts of one layer, streamed from the expert file into the pool."""

    def __init__(self, cache, layer: int, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str = "silu", backend: str = "auto"):
        super().__init__()
        self._cache = cache
        self.layer = layer
        self._num_experts = num_experts
        self._hidden_size, self._intermediate_size = hidden_size, intermediate_size
        self.activation_name = activation
        self.backend = backend
        self._view = None
        self._next_route = None  # the next MoE block's route(), for the router predictor

    # MoEExperts-like read-only facts
    @property
    def num_experts(self):
        return self._num_experts

    @property
    def hidden_size(self):
        return self._hidden_size

    @property
    def intermediate_size(self):
        return self._intermediate_size

    @property
    def hidden_dims(self):
        """mlx-lm's name for ``intermediate_size``, as on ``MoEExperts``."""
        return self._intermediate_size

    @property
    def quantized(self):
        q = self._cache.pool_of[self.layer].quantization.get("gate_proj")
        return dict(q) if q else None

    @property
    def view(self):
        if self._view is None or self._view.backend != self.backend:
            # object.__setattr__: a Module attribute would make the pool model parameters
            object.__setattr__(self, "_view", pool_view(self._cache.pool_of[self.layer], self.activation_name, self.backend))
        return self._view

    def __call__(self, x, weights, ids):
        cache = self._cache
        try:
            return self._call(cache, x, weights, ids)
        except KeyboardInterrupt:
            cache.close()  # stop the reader threads; they restart on the next call
            raise

    def _call(self, cache, x, weights, ids):
        k = ids.shape[-1]
        T = ids.size // k
        decode = T <= cache.decode_max_tokens
        guess = None
        wants = cache.planner.predictor in ("router", "union") or cache.track_all_predictors
        if decode and wants and self._next_route is not None:
            guess = self._next_route(x)[1]
        # Evaluating ids also finishes the previous layer's computation, which
        # frees the slots it read; the pending output covers graphs that ids
        # does not depend on (e.g. a discarded prefill chunk).
        pending, cache.pending_output = cache.pending_output, None
        mx.eval([a for a in (ids, guess, pending) if a is not None])
        del pending
        ids_np = np.array(ids)
        E = self._num_experts
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= E):
            raise ValueError(f"layer {self.layer}: expert id out of range [0, {E}) in topk_ids")
        g = None if guess is None else np.unique(np.array(guess))
        used, cap = cache.start_call(self.layer, ids_np, g, decode)
        view = self.view
        if len(used) <= cap:
            slots = cache.acquire(self.layer, used)
            cache.after_acquire(self.layer, g, decode)
            lut = np.zeros(E, np.uint32)
            lut[used] = slots
            slot_ids = mx.array(lut[ids_np])
            name = view.select_backend(x, slot_ids)
            y = BACKENDS[name].run(view, x, weights, slot_ids).astype(x.dtype)
            cache.pending_output = y
            return y
        # More experts than slots: groups, merged per pair, one weighted sum.
        y = None
        for group in cache.groups_for(self.layer, used, cap):
            slots = cache.acquire(self.layer, group)
            lut = np.zeros(E, np.uint32)
            lut[group] = slots
            mask = np.isin(ids_np, group)
            slot_ids = mx.array(np.where(mask, lut[ids_np], lut[group[0]]).astype(np.uint32))
            yg = pair_outputs(view, x, slot_ids)
            y = yg if y is None else mx.where(mx.array(mask)[..., None], yg, y)
            mx.eval(y)  # the next group may overwrite these slots
        return combine(y, weights).astype(x.dtype)
