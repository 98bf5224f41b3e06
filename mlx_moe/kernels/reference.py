"""NumPy reference of the fused kernels' exact semantics (tests, checks).

Weights are dequantized in float32 exactly as the kernels do (affine:
``scale * q + bias`` per group; mxfp4: ``e2m1(q) * 2**(s - 127)``), dot
products are taken in float64, ``h = act(gate + gate_bias, up + up_bias)`` is
kept in float32 (the kernels' ``h``) and ``y = sum_k w_k * (down_e h_k +
down_bias_e)`` is accumulated in float64.
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


def random_experts(E, H, I, activation="silu", fmt=("affine", 4, 64),
                   dtype=mx.bfloat16, bias=False, seed=0):
    """A random ``MoEExperts`` in format ``("affine", bits, group)``,
    ``("mxfp4", 4, 32)`` or ``("float", 0, 0)`` with parameters in ``dtype``."""
    from ..experts import MoEExperts

    mx.random.seed(seed)
    m = MoEExperts(E, H, I, activation=activation, bias=bias)
    if bias:
        for p in (m.gate_proj, m.up_proj, m.down_proj):
            p.bias = 0.1 * mx.random.normal(p.bias.shape)
    mode, bits, gs = fmt
    if mode != "float":
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(m, name)
            setattr(m, name, layer.to_quantized(group_size=gs, bits=bits, mode=mode))
    m.set_dtype(dtype)
    return m


def random_inputs(experts, m, k, dtype=mx.bfloat16, seed=0, ids_dtype=mx.uint32):
    """``x [m, H]``, softmax ``weights [m, k]`` and distinct ``ids [m, k]``."""
    rng = np.random.RandomState(seed)
    E, H = experts.num_experts, experts.gate_proj.input_dims
    x = mx.array(rng.standard_normal((m, H)).astype(np.float32)).astype(dtype)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(m)])
    w = rng.standard_normal((m, k)).astype(np.float32)
    w = np.exp(w) / np.exp(w).sum(-1, keepdims=True)
    return x, mx.array(w).astype(dtype), mx.array(ids.astype(np.int64)).astype(ids_dtype)


def max_rel(a, b):
    """max |a - b| / max |b|."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
