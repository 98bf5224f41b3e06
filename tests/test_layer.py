"""MoEExperts: ``gather`` vs ``loop`` vs an independent numpy per-expert reference.

The numpy reference computes in float64 from the float weights, or, for quantized
layers, from weights it dequantizes itself out of MLX's packed format (bit-stream
unpacking, FP4/FP8 tables); it never calls ``mx.dequantize``.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_moe.experts as experts_mod
from fixtures import E4M3_VALUES, FP4_VALUES
from mlx_moe.experts import MoEExperts, QuantizedExpertLinear, combine

E, K = 8, 2
H, I = 128, 256  # every group size below divides both

# m -> the leading shape of x: decode step, a few tokens, a prefill batch
SHAPES = {1: (1, 1), 7: (7,), 300: (3, 100)}


# ------------------------------------------------------------ numpy reference


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


NP_ACTIVATIONS = {
    "silu": lambda g, u: g * _sigmoid(g) * u,
    "gelu_tanh": lambda g, u: 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u,
    "gelu": lambda g, u: 0.5 * g * (1 + np.vectorize(math.erf)(g / math.sqrt(2))) * u,
    "relu": lambda g, u: np.maximum(g, 0) * u,
    "swiglu_oai": lambda g, u: (np.clip(u, -7.0, 7.0) + 1)
    * np.minimum(g, 7.0)
    * _sigmoid(1.702 * np.minimum(g, 7.0)),
}


def np_moe(x, W, weights, ids, act):
    """Per-expert loop in float64. ``W``: {"gate"|"up"|"down": (w [E,out,in], b [E,out] | None)}."""
    x = np.asarray(x, np.float64).reshape(-1, H)
    ids = np.asarray(ids).reshape(x.shape[0], -1)
    weights = np.asarray(weights, np.float64).reshape(x.shape[0], -1)
    out = np.zeros_like(x)

    def lin(name, e, v):
        w, b = W[name]
        y = v @ np.asarray(w[e], np.float64).T
        return y if b is None else y + b[e]

    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        xe = x[rows]
        y = lin("down", e, NP_ACTIVATIONS[act](lin("gate", e, xe), lin("up", e, xe)))
        np.add.at(out, rows, y * weights[rows, slots][:, None])
    return out


def np_unpack_affine(wq, bits, n):
    """MLX affine packing: a little-endian bit stream of ``bits``-bit codes."""
    b = np.ascontiguousarray(np.array(wq)).view(np.uint8)
    stream = np.unpackbits(b, axis=-1, bitorder="little")[..., : n * bits]
    stream = stream.reshape(*b.shape[:-1], n, bits).astype(np.uint32)
    return (stream << np.arange(bits, dtype=np.uint32)).sum(-1)


def np_dequantize(layer, n):
    """numpy dequantization of a ``QuantizedExpertLinear`` with input dim ``n``."""
    mode, bits, gs = layer.mode, layer.bits, layer.group_size
    scales = np.array(layer.scales.astype(mx.float32) if layer.mode == "affine" else layer.scales)
    if mode == "affine":
        q = np_unpack_affine(layer.weight, bits, n).astype(np.float64)
        biases = np.array(layer.biases.astype(mx.float32)).astype(np.float64)
        g = q.reshape(*q.shape[:-1], n // gs, gs)
        return (g * scales[..., None] + biases[..., None]).reshape(q.shape)
    b = np.array(layer.weight).view(np.uint8)
    if mode in ("mxfp4", "nvfp4"):
        vals = FP4_VALUES[np.stack([b & 15, b >> 4], -1).reshape(*b.shape[:-1], n)]
    elif mode == "mxfp8":
        vals = E4M3_VALUES[b]
    else:  # pragma: no cover
        raise AssertionError(mode)
    scale = E4M3_VALUES[scales] if mode == "nvfp4" else np.exp2(scales.astype(np.float64) - 127)
    g = vals.astype(np.float64).reshape(*vals.shape[:-1], n // gs, gs)
    return (g * scale[..., None]).reshape(vals.shape)


# ------------------------------------------------------------------ fixtures


def make_experts(activation="silu", bias=False, seed=0, gain=1.0):
    """MoEExperts with seeded float weights; returns (layer, numpy weights)."""
    rng = np.random.default_rng(seed)
    ex = MoEExperts(E, H, I, activation=activation, bias=bias, backend="gather")
    W = {}
    for name, proj, (o, i) in (
        ("gate", ex.gate_proj, (I, H)),
        ("up", ex.up_proj, (I, H)),
        ("down", ex.down_proj, (H, I)),
    ):
        g = gain if name != "down" else 1.0
        w = (rng.normal(size=(E, o, i)) * g / math.sqrt(i)).astype(np.float32)
        proj.weight = mx.array(w)
        b = None
        if bias:
            b = (0.5 * rng.normal(size=(E, o))).astype(np.float32)
            proj.bias = mx.array(b)
        W[name] = (w, b)
    return ex, W


def make_inputs(m, seed=1, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    lead = SHAPES[m]
    x = rng.normal(size=(*lead, H)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(m)]).reshape(*lead, K)
    logits = rng.normal(size=(*lead, K))
    w = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    return (mx.array(x, dtype=dtype), mx.array(w), mx.array(ids.astype(np.uint32))), (x, w, ids)


def run(ex, backend, inputs):
    ex.backend = backend
    y = ex(*inputs)
    mx.eval(y)
    return np.array(y.astype(mx.float32))


@pytest.fixture
def sort_calls(monkeypatch):
    """Counts calls of the gather backend's sort (the sorted path)."""
    calls = []
    orig = experts_mod._gather_sort

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(experts_mod, "_gather_sort", spy)
    return calls


def check_path(sort_calls, m):
    """m=300 must take the sorted path, 1 and 7 the unsorted one."""
    assert bool(sort_calls) == (m * K >= experts_mod.SORT_THRESHOLD)
    assert bool(sort_calls) == (m == 300)


# -------------------------------------------------------------------- float


@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize(
    "activation,bias",
    [("silu", False), ("silu", True), ("gelu_tanh", False), ("gelu", False), ("relu", False), ("swiglu_oai", True)],
)
def test_float_gather_loop_numpy(activation, bias, m, sort_calls):
    # gain 4 on gate/up makes |pre-activations| exceed swiglu_oai's clamp at 7
    ex, W = make_experts(activation, bias, gain=4.0 if activation == "swiglu_oai" else 1.0)
    inputs, (x, w, ids) = make_inputs(m)
    ref = np_moe(x, W, w, ids, activation).reshape(*SHAPES[m], H)

    y_gather = run(ex, "gather", inputs)
    check_path(sort_calls, m)
    y_loop = run(ex, "loop", inputs)

    assert y_gather.shape == y_loop.shape == (*SHAPES[m], H)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(y_gather, ref, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(y_loop, ref, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(y_gather, y_loop, rtol=0, atol=2e-6 * scale)


def test_swiglu_oai_clamps_are_exercised():
    """The swiglu_oai case above really hits both clamps (else it guards nothing)."""
    _, W = make_experts("swiglu_oai", True, gain=4.0)
    _, (x, _, _) = make_inputs(300)
    x = x.reshape(-1, H).astype(np.float64)
    g = np.einsum("th,eih->tei", x, W["gate"][0]) + W["gate"][1][None]
    u = np.einsum("th,eih->tei", x, W["up"][0]) + W["up"][1][None]
    assert (g > 7).mean() > 0.01 and (np.abs(u) > 7).mean() > 0.01


def test_auto_backend_matches_reference():
    ex, W = make_experts("silu")
    inputs, (x, w, ids) = make_inputs(7)
    y = run(ex, "auto", inputs)
    ref = np_moe(x, W, w, ids, "silu").reshape(*SHAPES[7], H)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


# ---------------------------------------------------------------- quantized


def quantized_case(bits, group_size, mode, activation="silu", bias=False):
    ex, _ = make_experts(activation, bias, gain=4.0 if activation == "swiglu_oai" else 1.0)
    nn.quantize(ex, group_size=group_size, bits=bits, mode=mode)
    for proj in (ex.gate_proj, ex.up_proj, ex.down_proj):
        assert isinstance(proj, QuantizedExpertLinear)
        assert (proj.bits, proj.group_size, proj.mode) == (bits, group_size, mode)
    assert ex.quantized == {"group_size": group_size, "bits": bits, "mode": mode}
    Wq = {
        "gate": (np_dequantize(ex.gate_proj, H), W_bias(ex.gate_proj)),
        "up": (np_dequantize(ex.up_proj, H), W_bias(ex.up_proj)),
        "down": (np_dequantize(ex.down_proj, I), W_bias(ex.down_proj)),
    }
    return ex, Wq


def W_bias(proj):
    return np.array(proj.bias) if "bias" in proj else None


@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantized_affine(bits, group_size, m, sort_calls):
    ex, Wq = quantized_case(bits, group_size, "affine")
    assert ex.gate_proj.weight.shape == (E, I, H * bits // 32)
    assert ex.down_proj.scales.shape == (E, H, I // group_size)
    inputs, (x, w, ids) = make_inputs(m)
    ref = np_moe(x, Wq, w, ids, "silu").reshape(*SHAPES[m], H)

    y_gather = run(ex, "gather", inputs)
    check_path(sort_calls, m)
    y_loop = run(ex, "loop", inputs)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(y_gather, y_loop, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(y_gather, ref, rtol=0, atol=5e-6 * scale)
    np.testing.assert_allclose(y_loop, ref, rtol=0, atol=5e-6 * scale)


@pytest.mark.parametrize("m", [7, 300])
@pytest.mark.parametrize(
    "mode,bits,group_size,activation,bias",
    [
        ("mxfp4", 4, 32, "swiglu_oai", True),  # gpt-oss's experts
        ("nvfp4", 4, 16, "silu", False),
        ("mxfp8", 8, 32, "silu", False),
    ],
)
def test_quantized_fp_modes(mode, bits, group_size, activation, bias, m, sort_calls):
    ex, Wq = quantized_case(bits, group_size, mode, activation, bias)
    inputs, (x, w, ids) = make_inputs(m)
    ref = np_moe(x, Wq, w, ids, activation).reshape(*SHAPES[m], H)
    y_gather = run(ex, "gather", inputs)
    check_path(sort_calls, m)
    y_loop = run(ex, "loop", inputs)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(y_gather, y_loop, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(y_gather, ref, rtol=0, atol=5e-6 * scale)


def test_numpy_dequantization_is_not_the_float_weights():
    """Guards the guard: the quantized reference really uses the packed weights."""
    ex, W = make_experts("silu")
    w_float = W["gate"][0]
    nn.quantize(ex, group_size=64, bits=3)
    deq = np_dequantize(ex.gate_proj, H)
    err = np.abs(deq - w_float)
    assert err.max() > 1e-2  # 3-bit is coarse
    assert err.max() < 0.6 * np.abs(w_float).max()  # but it is the same matrix


# -------------------------------------------------------- float32 accumulation


def _bf16_case():
    """Two experts whose weighted outputs cancel to 2**-14 only in float32.

    y0 = 1 + 2**-7, w0 = 1 + 2**-7: the product 1 + 2**-6 + 2**-14 rounds to
    1 + 2**-6 in bfloat16; y1 = -(1 + 2**-6), w1 = 1. A float32 accumulation gives
    2**-14 (a bfloat16 number), a bfloat16 one gives 0.
    """
    y = mx.array([[[1 + 2**-7], [-(1 + 2**-6)]]], dtype=mx.bfloat16)  # [1, k=2, H=1]
    w = mx.array([[1 + 2**-7, 1.0]], dtype=mx.bfloat16)
    return y, w


def test_combine_accumulates_in_float32():
    y, w = _bf16_case()
    out = combine(y, w)
    assert out.dtype == mx.float32
    assert out.item() == 2.0**-14
    # what a bfloat16 accumulation would give: the case separates the two
    assert ((y * w[..., None]).sum(axis=-2)).item() == 0.0


@pytest.mark.parametrize("backend", ["gather", "loop"])
def test_bf16_layer_accumulates_in_float32(backend):
    """End to end through both backends with bfloat16 activations and weights.

    Expert e maps x = e_0 to y_e = c_e * e_0 exactly (relu(1) * 1 = 1, then a
    down column c_e), so only the top-k combine can round.
    """
    Hs, Is = 32, 32
    ex = MoEExperts(4, Hs, Is, activation="relu", backend=backend)
    gate = np.zeros((4, Is, Hs), np.float32)
    gate[:, 0, 0] = 1.0
    down = np.zeros((4, Hs, Is), np.float32)
    down[0, 0, 0] = 1 + 2**-7
    down[1, 0, 0] = -(1 + 2**-6)
    down[2, 0, 0] = 3.0  # unused experts must not leak in
    down[3, 0, 0] = 5.0
    ex.gate_proj.weight = mx.array(gate, dtype=mx.bfloat16)
    ex.up_proj.weight = mx.array(gate, dtype=mx.bfloat16)
    ex.down_proj.weight = mx.array(down, dtype=mx.bfloat16)
    x = mx.zeros((2, Hs), dtype=mx.bfloat16).at[:, 0].add(1.0)
    ids = mx.array([[0, 1], [1, 0]], dtype=mx.uint32)
    w = mx.array([[1 + 2**-7, 1.0], [1.0, 1 + 2**-7]], dtype=mx.bfloat16)
    y = ex(x, w, ids)
    assert y.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(y.astype(mx.float32))[:, 0], [2.0**-14, 2.0**-14])
    assert np.all(np.array(y.astype(mx.float32))[:, 1:] == 0)


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [E, E + 5, -1])
def test_loop_rejects_out_of_range_expert_id(bad):
    ex, _ = make_experts("silu")
    ex.backend = "loop"
    inputs, _ = make_inputs(7)
    x, w, ids = inputs
    ids = mx.array(np.array(ids).astype(np.int32)).at[3, 1].add(bad - np.array(ids)[3, 1].item())
    with pytest.raises(ValueError, match=rf"expert id {bad} out of range \[0, {E}\)"):
        mx.eval(ex(x, w, ids))


def test_unknown_backend():
    ex, _ = make_experts("silu")
    ex.backend = "nope"
    inputs, _ = make_inputs(7)
    with pytest.raises(ValueError, match=r"Unknown MoE backend 'nope'.*'gather'.*'loop'"):
        ex(*inputs)


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"Unknown expert activation 'swishy'"):
        MoEExperts(E, H, I, activation="swishy")


@pytest.mark.parametrize("hf_name,ours", [("swish", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu")])
def test_hf_activation_names(hf_name, ours):
    ex = MoEExperts(E, H, I, activation=hf_name)
    assert ex.activation_name == ours


def test_sorted_gather_in_chunks_matches_one_call(monkeypatch):
    """Long prefills split the sorted pairs into several gather calls (CUDA grid limit)."""
    mx.random.seed(3)
    ex = MoEExperts(8, 64, 64)
    x = mx.random.normal((300, 64))
    ids = mx.argpartition(mx.random.normal((300, 8)), kth=-2, axis=-1)[:, -2:]
    w = mx.softmax(mx.random.normal((300, 2)), axis=-1)
    ex.backend = "gather"
    whole = ex(x, w, ids)
    monkeypatch.setattr(experts_mod, "MAX_PAIRS_PER_CALL", 77)
    chunked = ex(x, w, ids)
    ex.backend = "loop"
    assert mx.allclose(chunked, ex(x, w, ids), atol=1e-5)
    assert mx.array_equal(chunked, whole)


# ------------------------------------------------------------ construction


def test_mlx_lm_size_names_build_the_same_layer():
    """``hidden_size``/``intermediate_size`` or mlx-lm's ``input_dims``/``hidden_dims``."""
    ours = MoEExperts(E, hidden_size=H, intermediate_size=I, key=mx.random.key(1))
    theirs = MoEExperts(E, input_dims=H, hidden_dims=I, key=mx.random.key(1))
    positional = MoEExperts(E, H, I, key=mx.random.key(1))
    for ex in (theirs, positional):
        assert (ex.hidden_size, ex.intermediate_size, ex.hidden_dims) == (H, I, I)
        for p in experts_mod.PROJECTIONS:
            assert mx.array_equal(ex[p].weight, ours[p].weight)
    with pytest.raises(ValueError, match="hidden_size or input_dims"):
        MoEExperts(E, H, I, input_dims=H + 1)
    with pytest.raises(ValueError, match="intermediate_size or hidden_dims"):
        MoEExperts(E, hidden_size=H, intermediate_size=I, hidden_dims=I)


def test_from_arrays_constructors_hold_the_arrays_and_keep_the_generator():
    ex, _ = make_experts("gelu", bias=True)
    nn.quantize(ex, group_size=64, bits=4)
    q = ex.gate_proj
    mx.random.seed(5)
    want = mx.random.uniform(shape=(4,))
    mx.random.seed(5)
    copy = experts_mod.QuantizedExpertLinear.from_arrays(
        q.weight, q.scales, q.biases, q.bias, group_size=64, bits=4
    )
    floats = experts_mod.ExpertLinear.from_arrays(mx.zeros((E, I, H)), mx.ones((E, I)))
    view = MoEExperts.from_projections(copy, ex.up_proj, ex.down_proj, "gelu", "loop")
    assert mx.array_equal(mx.random.uniform(shape=(4,)), want)  # no random init drawn
    assert copy.weight is q.weight and copy.bias is q.bias
    assert (copy.input_dims, copy.output_dims, copy.num_experts) == (H, I, E)
    assert (floats.input_dims, floats.output_dims) == (H, I) and "bias" in floats
    assert (view.hidden_size, view.intermediate_size, view.backend) == (H, I, "loop")
    assert view.quantized == ex.quantized and view.sort_threshold == ex.sort_threshold
    inputs, _ = make_inputs(7)
    assert mx.array_equal(view(*inputs), ex(*inputs))


@pytest.mark.parametrize("kw", [{"global_scale": True}, {"quantize_input": True}])
def test_to_quantized_refuses_what_it_cannot_run(kw):
    ex, _ = make_experts("silu")
    with pytest.raises(ValueError, match=next(iter(kw))):
        ex.gate_proj.to_quantized(group_size=16, bits=4, mode="nvfp4", **kw)
    with pytest.raises(TypeError, match="unknown"):
        ex.gate_proj.to_quantized(unknown=1)


def test_to_quantized_defaults_follow_the_mode():
    """``nn.quantize(model, mode=...)`` passes group_size=bits=None."""
    ex, _ = make_experts("silu")
    nn.quantize(ex, mode="mxfp4")
    assert ex.quantized == {"group_size": 32, "bits": 4, "mode": "mxfp4"}


# ------------------------------------------------- direct-call validation


@pytest.mark.parametrize("backend", ["gather", "loop", "auto"])
@pytest.mark.parametrize("bad,dtype", [(E, mx.uint32), (E + 5, mx.int32), (10**6, mx.uint32),
                                       (-1, mx.int32), (2**32 - 1, mx.uint32)])
def test_out_of_range_expert_id_is_refused_on_every_backend(backend, bad, dtype):
    """gather used to give expert 0's output for ids 8 and 1e6, NaN rows for -1."""
    ex, _ = make_experts("silu")
    ex.backend = backend
    (x, w, ids), _ = make_inputs(7)
    ids = np.array(ids).astype(np.int64)
    ids[3, 1] = bad
    ids = mx.array(ids).astype(dtype)
    with pytest.raises(ValueError, match=rf"expert id {bad} out of range \[0, {E}\) in topk_ids"):
        mx.eval(ex(x, w, ids))


def _shape_case(kind):
    (x, w, ids), _ = make_inputs(7)  # x [7, H], w and ids [7, K]
    if kind == "x one token, ids five":
        return x[:1], w[:5], ids[:5]
    if kind == "weights 1-D":
        return x, w[0], ids
    if kind == "weights fewer slots":
        return x, w[:, :1], ids
    if kind == "x wrong width":
        return x[:, : H // 2], w, ids
    if kind == "ids 0-D":
        return x[0], w[0], ids[0, 0]
    if kind == "float ids":
        return x, w, ids.astype(mx.float32)
    raise AssertionError(kind)


SHAPE_CASES = {
    "x one token, ids five": r"topk_ids must be \[\.\.\., k\] with x's leading shape \(1,\); got x \(1, 128\), topk_weights \(5, 2\), topk_ids \(5, 2\)",
    "weights 1-D": r"topk_weights and topk_ids must have one shape; got x \(7, 128\), topk_weights \(2,\), topk_ids \(7, 2\)",
    "weights fewer slots": r"topk_weights and topk_ids must have one shape; got .*topk_weights \(7, 1\)",
    "x wrong width": r"x must be \[\.\.\., 128\] \(hidden size 128\); got x \(7, 64\)",
    "ids 0-D": r"topk_ids must be \[\.\.\., k\]",
    "float ids": r"topk_ids must be integers; got dtype mlx.core.float32",
}


@pytest.mark.parametrize("backend", ["gather", "loop"])
@pytest.mark.parametrize("kind", list(SHAPE_CASES))
def test_disagreeing_shapes_are_refused_naming_them(kind, backend):
    """x [1, H] with ids [5, k] used to broadcast to 5 rows; loop took 1-D weights."""
    ex, _ = make_experts("silu")
    ex.backend = backend
    with pytest.raises(ValueError, match=SHAPE_CASES[kind]):
        mx.eval(ex(*_shape_case(kind)))


def test_unbatched_token_is_still_accepted():
    """x [H] with weights, ids [k]: one token without a batch axis."""
    ex, W = make_experts("silu")
    (x, w, ids), (xn, wn, idn) = make_inputs(1)
    y = ex(x[0, 0], w[0, 0], ids[0, 0])
    ref = np_moe(xn[0, 0], W, wn[0, 0], idn[0, 0], "silu")[0]
    np.testing.assert_allclose(np.array(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_validate_false_skips_the_checks():
    """What the models pass: no check (and no host sync) at all."""
    ex, _ = make_experts("silu")
    (x, w, ids), _ = make_inputs(7)
    assert ex(x[:1], w[:5], ids[:5], validate=False).shape == (5, H)  # broadcasts, unchecked


@pytest.mark.parametrize("kw,name", [
    ({"num_experts": 0}, "num_experts"), ({"num_experts": -3}, "num_experts"),
    ({"num_experts": 2.5}, "num_experts"), ({"hidden_size": 0}, "hidden_size"),
    ({"intermediate_size": -1}, "intermediate_size"), ({"input_dims": 0}, "hidden_size"),
    ({"hidden_dims": 0}, "intermediate_size"),
])
def test_sizes_below_one_are_refused_at_construction(kw, name):
    args = {"num_experts": E, "hidden_size": H, "intermediate_size": I}
    if "input_dims" in kw:
        args.pop("hidden_size")
    if "hidden_dims" in kw:
        args.pop("intermediate_size")
    args.update(kw)
    with pytest.raises(ValueError, match=rf"MoEExperts: {name} must be an integer >= 1; got {list(kw.values())[0]!r}"):
        MoEExperts(**args)


def test_zero_experts_no_longer_kills_the_interpreter():
    """num_experts=0 used to build, then its first call killed the interpreter
    (SIGFPE): run in a child so a regression fails instead of crashing pytest."""
    import subprocess
    import sys

    code = ("import mlx.core as mx\nfrom mlx_moe.experts import MoEExperts\n"
            "try:\n    e = MoEExperts(0, 64, 32)\nexcept ValueError as err:\n    print('refused:', err)\n"
            "else:\n    mx.eval(e(mx.ones((1, 64)), mx.ones((1, 2)), mx.array([[0, 1]])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    assert "refused: MoEExperts: num_experts must be an integer >= 1; got 0" in out.stdout


def test_model_path_adds_no_host_sync(checkpoint, monkeypatch):
    """Inside our MoE blocks the id check is off: building a forward pass of a
    model issues no mx.eval and never reaches the checks."""
    from mlx_moe.loading import load_model

    model, _ = load_model(checkpoint("qwen3_moe"))
    prompt = mx.array([[1, 44, 73, 80, 80, 83, 4, 91]])
    want = model(prompt)
    mx.eval(want)
    evals, checks = [], []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a, **k: evals.append(1) or real_eval(*a, **k))
    monkeypatch.setattr(MoEExperts, "check_inputs", lambda *a: checks.append(1))
    y = model(prompt)  # lazy: the graph only
    assert evals == [] and checks == []
    # ...while a direct call does check (one eval of the ids' min and max)
    ex = next(b.routed for layer in model.layers for b in [layer.mlp] if hasattr(b, "routed"))
    monkeypatch.undo()
    monkeypatch.setattr(mx, "eval", lambda *a, **k: evals.append(1) or real_eval(*a, **k))
    (x, w, ids), _ = make_inputs(7)
    ex(mx.zeros((7, ex.hidden_size)), w, ids % ex.num_experts)
    assert evals == [1]
    assert mx.array_equal(y, want)
