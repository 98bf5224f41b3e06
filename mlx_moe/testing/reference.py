"""NumPy references of the MoE kernels, random layers and inputs (tests, checks).

``reference`` models the fused decode kernels exactly: weights are dequantized in float32 exactly as the kernels do (affine:
``scale * q + bias`` per group; mxfp4: ``e2m1(q) * 2**(s - 127)``), dot
products are taken in float64, ``h = act(gate + gate_bias, up + up_bias)`` is
kept in float32 (the kernels' ``h``) and ``y = sum_k w_k * (down_e h_k +
down_bias_e)`` is accumulated in float64.

``reference_prefill`` models the grouped-GEMM prefill tile by tile, rounding
where the kernel rounds (weights and ``h`` in the activation dtype).
"""

import math

import mlx.core as mx
import numpy as np

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                dtype=np.float32)


def to_numpy(a, dtype=np.float32):
    """MLX array -> NumPy (bfloat16 via float32)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.array(a).astype(dtype)


def unpack_codes(w, bits):
    """uint32 ``[..., n]`` -> codes ``[..., n * 32 // bits]`` (little end first)."""
    w = np.array(w).astype(np.uint32)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    q = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*w.shape[:-1], w.shape[-1] * per)


def dequantize(layer, experts=None):
    """float32 ``[E, out, in]`` weights of an ExpertLinear / QuantizedExpertLinear
    (only experts ``experts``, in that order, when given)."""
    def get(name):
        a = layer[name]
        return a if experts is None else a[mx.array(np.asarray(experts, np.int32))]

    if "scales" not in layer:
        return to_numpy(get("weight"))
    mode = layer.mode
    if mode == "affine":
        q = unpack_codes(get("weight"), layer.bits).astype(np.float32)
        gs = layer.group_size
        s = np.repeat(to_numpy(get("scales")), gs, axis=-1)
        b = np.repeat(to_numpy(get("biases")), gs, axis=-1)
        return (s * q + b).astype(np.float32)
    if mode == "mxfp4":
        q = unpack_codes(get("weight"), 4)
        s = np.array(get("scales")).astype(np.int32) - 127
        scale = np.repeat(np.ldexp(np.float32(1), s).astype(np.float32), 32, axis=-1)
        return (E2M1[q] * scale).astype(np.float32)
    raise ValueError(f"no reference for mode {mode}")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def activation(name, g, u):
    if name == "silu":
        return g * _sigmoid(g) * u
    if name == "gelu_tanh":
        return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return g * (1 + erf(g / math.sqrt(2))) / 2 * u
    if name == "relu":
        return np.maximum(g, 0) * u
    if name == "swiglu_oai":
        g = np.minimum(g, 7.0)
        u = np.clip(u, -7.0, 7.0)
        return (u + 1) * (g * _sigmoid(1.702 * g))
    raise ValueError(name)


def reference(experts, x, weights, ids, return_h=False):
    """float64 ``y [m, H]`` (and float32 ``h [m * k, I]``) of the fused layer."""
    H = x.shape[-1]
    K = ids.shape[-1]
    xs = to_numpy(x).reshape(-1, H).astype(np.float64)
    m = xs.shape[0]
    idn = np.array(ids).reshape(m, K).astype(np.int64)
    wt = to_numpy(weights).reshape(m, K).astype(np.float64)
    used = np.unique(idn)
    slot = {int(e): i for i, e in enumerate(used)}
    g_w, u_w, d_w = (dequantize(p, used).astype(np.float64) for p in
                     (experts.gate_proj, experts.up_proj, experts.down_proj))

    def bias(layer):
        if "bias" not in layer:
            return None
        return to_numpy(layer["bias"][mx.array(used.astype(np.int32))]).astype(np.float64)

    gb, ub, db = bias(experts.gate_proj), bias(experts.up_proj), bias(experts.down_proj)
    I = g_w.shape[1]
    h = np.zeros((m * K, I), np.float32)
    y = np.zeros((m, H), np.float64)
    for t in range(m):
        for s in range(K):
            e = slot[int(idn[t, s])]
            g = g_w[e] @ xs[t]
            u = u_w[e] @ xs[t]
            if gb is not None:
                g = g + gb[e]
                u = u + ub[e]
            hv = activation(experts.activation_name, g, u).astype(np.float32)
            h[t * K + s] = hv
            d = d_w[e] @ hv.astype(np.float64)
            if db is not None:
                d = d + db[e]
            y[t] += wt[t, s] * d
    return (y, h) if return_h else y


def _round(a, dtype):
    """float32 ``a`` rounded through the MLX ``dtype``."""
    return np.array(mx.array(a).astype(dtype).astype(mx.float32))


def reference_prefill(experts, x, weights, ids):
    """NumPy model of the prefill kernel's semantics, tile by tile, in its order.

    Uses the kernel's own ``plan_ops`` bookkeeping and walks (expert, m-tile)
    blocks like the grid does; rounds dequantized weights to the activation
    dtype like the shared-memory tiles.
    """
    from ..kernels.prefill.backend import plan_ops
    from ..kernels.prefill.sources import BM

    dt = x.dtype
    H = x.shape[-1]
    k = ids.shape[-1]
    order, segs, tiles, slots = plan_ops(ids, experts.num_experts)
    order, segs, tiles = (np.array(a) for a in (order, segs, tiles))
    assert tiles[-1] <= slots
    xs = to_numpy(x.reshape(-1, H))
    P = order.size
    wg, wu, wd = (_round(dequantize(p), dt) for p in
                  (experts.gate_proj, experts.up_proj, experts.down_proj))
    bias = [to_numpy(p["bias"]) if "bias" in p else None
            for p in (experts.gate_proj, experts.up_proj, experts.down_proj)]
    y = np.zeros((P, H), np.float32)
    E = experts.num_experts
    for slot in range(int(tiles[-1])):
        e = int(np.searchsorted(tiles, slot, side="right") - 1)
        r0 = segs[e] + (slot - tiles[e]) * BM
        r1 = min(r0 + BM, segs[e + 1])
        assert 0 <= e < E and r0 < r1
        p = np.arange(r0, r1)
        a = xs[order[p] // k]
        g = a @ wg[e].T
        u = a @ wu[e].T
        if bias[0] is not None:
            g, u = g + bias[0][e], u + bias[1][e]
        h = _round(activation(experts.activation_name, _round(g, dt), _round(u, dt)), dt)
        o = h @ wd[e].T
        if bias[2] is not None:
            o = o + bias[2][e]
        y[order[p]] = _round(o, dt)
    y = y.reshape(*ids.shape, H)
    return (y * to_numpy(weights)[..., None]).sum(axis=-2)


# ------------------------------------------------------------ random layers


def random_experts(E, H, I, activation="silu", fmt=("affine", 4, 64),
                   dtype=mx.bfloat16, bias=False, seed=0):
    """A random ``MoEExperts`` in format ``("affine", bits, group)``,
    ``("mxfp4", 4, 32)`` or ``("float", 0, 0)`` with parameters in ``dtype``.

    Weights are cast to ``dtype`` before quantizing, like real checkpoints,
    so the scales and biases are ``dtype`` values of ``dtype`` weights.
    """
    from ..experts import PROJECTIONS, MoEExperts

    mx.random.seed(seed)
    m = MoEExperts(E, H, I, activation=activation, bias=bias)
    mode, bits, gs = fmt
    for name in PROJECTIONS:
        p = getattr(m, name)
        p.weight = p.weight.astype(dtype)
        if bias:
            p.bias = (0.1 * mx.random.normal(p.bias.shape)).astype(dtype)
        if mode != "float":
            p = p.to_quantized(group_size=gs, bits=bits, mode=mode)
        setattr(m, name, p)
    mx.eval(m.parameters())
    return m


def random_inputs(experts, m, k, dtype=mx.bfloat16, seed=0, ids_dtype=mx.uint32,
                  weights_dtype=None, skew=0.0):
    """``x [m, H]``, softmax ``weights [m, k]`` (``weights_dtype``, default
    ``dtype``) and distinct ``ids [m, k]``.

    ``skew > 0`` biases the routing towards low expert ids (uneven segments).
    """
    rng = np.random.RandomState(seed)
    E, H = experts.num_experts, experts.gate_proj.input_dims
    x = mx.array(rng.standard_normal((m, H)).astype(np.float32)).astype(dtype)
    if skew:
        logits = rng.standard_normal((m, E)) - skew * np.arange(E) / E
        ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    else:
        ids = np.stack([rng.permutation(E)[:k] for _ in range(m)])
    w = rng.standard_normal((m, k)).astype(np.float32)
    w = np.exp(w) / np.exp(w).sum(-1, keepdims=True)
    return (x, mx.array(w).astype(weights_dtype or dtype),
            mx.array(ids.astype(np.int64)).astype(ids_dtype))


def rel_err(a, b, kind="norm"):
    """Relative error of ``a`` against ``b`` (MLX or NumPy arrays), in float64.

    ``kind="norm"``: ``||a - b|| / ||b||``; ``kind="max"``: ``max|a - b| / max|b|``.
    An all-zero ``b`` gives the absolute error.
    """
    a, b = _f64(a), _f64(b)
    if kind == "max":
        num, den = np.abs(a - b).max(), np.abs(b).max()
    elif kind == "norm":
        num, den = np.linalg.norm(a - b), np.linalg.norm(b)
    else:
        raise ValueError(f"kind must be 'norm' or 'max', not {kind!r}")
    return float(num / (den if den > 0 else 1.0))


def _f64(a):
    if isinstance(a, mx.array):
        a = a.astype(mx.float32)
    return np.asarray(a, np.float64)


# ------------------------------------------------------------------- router


def reference_router(gate, router, x, return_margin=False):
    """float64 ``(weights [m, k], ids [m, k])`` of the router kernel's semantics
    (``mlx_moe/kernels/router/moe_router.inc``): float64 logits from the
    float32-dequantized router weight (+ bias), selection by descending score
    with the lower id first on ties (stable sort), ids in selection order.
    ``gate``/``router`` as :func:`mlx_moe.routing.route` takes them.
    ``return_margin``: also each row's smallest gap between a chosen and an
    unchosen score (expert or group), below which rounding may swap ids.
    """
    from ..routing import SoftmaxTopK, TopKSoftmax

    H = x.shape[-1]
    xs = to_numpy(x).reshape(-1, H).astype(np.float64)
    if "scales" in gate:
        w = dequantize(gate)  # [E, H] from the [E, H*bits/32] codes
    else:
        w = to_numpy(gate["weight"])
    z = xs @ w.astype(np.float64).T
    if "bias" in gate:
        z = z + to_numpy(gate["bias"]).astype(np.float64)

    margin = np.full(z.shape[0], np.inf)

    def top(scores, k):
        order = np.argsort(-scores, axis=-1, kind="stable")
        if k < scores.shape[-1]:
            srt = np.take_along_axis(scores, order, -1)
            margin[:] = np.minimum(margin, srt[:, k - 1] - srt[:, k])
        return order[:, :k]

    def out(wt, ids):
        return (wt, ids, margin) if return_margin else (wt, ids)

    if isinstance(router, SoftmaxTopK):
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ids = top(z, router.k)
        wt = np.take_along_axis(p, ids, -1)
        if router.normalize:
            wt = wt / wt.sum(-1, keepdims=True)
        return out(wt, ids)
    if isinstance(router, TopKSoftmax):
        ids = top(z, router.k)
        e = np.exp(np.take_along_axis(z, ids, -1) - z.max(-1, keepdims=True))
        return out(e / e.sum(-1, keepdims=True), ids)
    g = gate  # GroupLimitedGate
    s = 1.0 / (1.0 + np.exp(-z))
    c = s + to_numpy(g["e_score_correction_bias"]).astype(np.float64)
    if g.n_group > 1 and g.topk_group < g.n_group:
        grouped = c.reshape(c.shape[0], g.n_group, -1)
        gscore = np.sort(grouped, -1)[..., -2:].sum(-1)
        kept = top(gscore, g.topk_group)
        mask = np.zeros(gscore.shape, bool)
        np.put_along_axis(mask, kept, True, -1)
        c = np.where(mask[..., None], grouped, 0.0).reshape(c.shape)
    ids = top(c, g.k)
    wt = np.take_along_axis(s, ids, -1)
    if g.normalize and g.k > 1:
        wt = wt / wt.sum(-1, keepdims=True)
    return out(wt * g.routed_scaling_factor, ids)
