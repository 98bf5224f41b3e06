"""Routers vs numpy references (float64) and vs mlx-lm's own routing arithmetic."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe.routing import GroupLimitedGate, SoftmaxTopK, TopKSoftmax


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _by_id(weights, ids):
    """Sort each row's (id, weight) pairs by id: top-k order is not part of the contract."""
    ids = np.asarray(ids).astype(np.int64)
    weights = np.asarray(weights, np.float64)
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(weights, order, -1), np.take_along_axis(ids, order, -1)


def _topk_ids(scores, k):
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def assert_routing(got, ref, rtol=1e-6, atol=1e-7):
    (gw, gi), (rw, ri) = _by_id(*got), _by_id(*ref)
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_allclose(gw, rw, rtol=rtol, atol=atol)


def np_softmax_topk(logits, k, normalize):
    p = _softmax(logits.astype(np.float64))
    ids = _topk_ids(p, k)
    w = np.take_along_axis(p, ids, -1)
    if normalize:
        w = w / w.sum(-1, keepdims=True)
    return w, ids


def np_topk_softmax(logits, k):
    ids = _topk_ids(logits, k)
    return _softmax(np.take_along_axis(logits.astype(np.float64), ids, -1)), ids


def np_group_limited(x, W, bias, k, n_group, topk_group, scale, normalize):
    """Hugging Face DeepseekV3TopkRouter / MoE.route_tokens_to_experts, in float64."""
    scores = _sigmoid(x.astype(np.float64) @ W.astype(np.float64).T)
    choice = scores + bias
    if n_group > 1:
        g = choice.reshape(*choice.shape[:-1], n_group, -1)
        group_scores = np.sort(g, -1)[..., -2:].sum(-1)
        keep = _topk_ids(group_scores, topk_group)
        mask = np.zeros(group_scores.shape, bool)
        np.put_along_axis(mask, keep, True, -1)
        g = np.where(mask[..., None], g, 0.0)  # HF masks with 0.0
        choice = g.reshape(choice.shape)
    ids = _topk_ids(choice, k)
    w = np.take_along_axis(scores, ids, -1)
    if normalize and k > 1:
        w = w / w.sum(-1, keepdims=True)
    return w * scale, ids


def _logits(shape, seed, spread=2.0):
    return (np.random.default_rng(seed).normal(size=shape) * spread).astype(np.float32)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 4), (64, 8)])
def test_softmax_topk(E, k, normalize):
    logits = _logits((3, 17, E), seed=E + k)
    w, ids = SoftmaxTopK(k, normalize)(mx.array(logits))
    assert w.shape == ids.shape == (3, 17, k)
    assert_routing((w, ids), np_softmax_topk(logits, k, normalize))
    if normalize:
        np.testing.assert_allclose(np.array(w).sum(-1), 1.0, rtol=1e-6)
    else:
        assert np.all(np.array(w).sum(-1) < 1.0)


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (32, 4)])
def test_topk_softmax(E, k):
    logits = _logits((5, 11, E), seed=E * k)
    w, ids = TopKSoftmax(k)(mx.array(logits))
    assert_routing((w, ids), np_topk_softmax(logits, k))
    np.testing.assert_allclose(np.array(w).sum(-1), 1.0, rtol=1e-6)


def test_softmax_topk_and_topk_softmax_differ():
    """Same ids, different weights: the two orders are not interchangeable."""
    logits = _logits((50, 8), seed=3)
    a = SoftmaxTopK(2, normalize=False)(mx.array(logits))
    b = TopKSoftmax(2)(mx.array(logits))
    (aw, ai), (bw, bi) = _by_id(*a), _by_id(*b)
    np.testing.assert_array_equal(ai, bi)
    assert np.abs(aw - bw).max() > 0.05


def _gate(E, H, k, n_group, topk_group, scale, normalize, seed, bias_spread=0.1):
    rng = np.random.default_rng(seed)
    W = (rng.normal(size=(E, H)) / np.sqrt(H)).astype(np.float32)
    bias = (rng.normal(size=E) * bias_spread).astype(np.float32)
    gate = GroupLimitedGate(H, E, k, n_group, topk_group, scale, normalize)
    gate.weight = mx.array(W)
    gate.e_score_correction_bias = mx.array(bias)
    return gate, W, bias


@pytest.mark.parametrize(
    "E,k,n_group,topk_group,scale,normalize",
    [
        (8, 2, 1, 1, 1.0, True),
        (8, 2, 2, 1, 2.5, True),  # the tiny DeepSeek-V3 config
        (16, 4, 4, 2, 2.5, True),
        (32, 8, 8, 4, 2.5, True),  # DeepSeek-V3's 8 groups / 4 kept, scaled down
        (16, 4, 4, 2, 1.0, False),
        (16, 1, 4, 2, 2.5, True),  # k = 1: no renormalisation
    ],
)
def test_group_limited_gate(E, k, n_group, topk_group, scale, normalize):
    H = 24
    gate, W, bias = _gate(E, H, k, n_group, topk_group, scale, normalize, seed=E + k + n_group)
    x = np.random.default_rng(7).normal(size=(4, 33, H)).astype(np.float32)
    w, ids = gate(mx.array(x))
    ref = np_group_limited(x, W, bias, k, n_group, topk_group, scale, normalize)
    assert_routing((w, ids), ref, rtol=2e-6)

    # every chosen expert lies in one of the topk_group kept groups
    per_group = E // n_group
    groups = np.array(ids) // per_group
    assert max(len(set(r)) for r in groups.reshape(-1, k)) <= topk_group
    if normalize and k > 1:
        np.testing.assert_allclose(np.array(w).sum(-1), scale, rtol=1e-5)


def test_group_masking_excludes_best_expert_of_losing_group():
    """Group 0 holds the single best expert, group 1 the better top-2 sum: the
    best expert must be dropped (no group limit would pick it)."""
    E, H = 8, 8
    gate = GroupLimitedGate(H, E, 2, n_group=2, topk_group=1, routed_scaling_factor=1.0)
    gate.weight = mx.eye(E)[:, :H]
    #              group 0: best single, rest poor | group 1: two good ones
    logits = np.array([4.0, -3, -3, -3, 2.0, 1.9, -3, -3], np.float32)
    w, ids = gate(mx.array(logits[None]))
    assert sorted(np.array(ids)[0].tolist()) == [4, 5]
    s = _sigmoid(logits[[4, 5]].astype(np.float64))
    np.testing.assert_allclose(np.sort(np.array(w)[0]), np.sort(s / s.sum()), rtol=1e-6)

    ungrouped = GroupLimitedGate(H, E, 2, n_group=1, topk_group=1)
    ungrouped.weight = gate.weight
    assert 0 in np.array(ungrouped(mx.array(logits[None]))[1])[0].tolist()


def test_correction_bias_selects_but_does_not_weight():
    """The bias moves the choice; the weights stay the uncorrected sigmoid scores."""
    E, H = 4, 4
    gate = GroupLimitedGate(H, E, 2, routed_scaling_factor=2.5, normalize=False)
    gate.weight = mx.eye(E)
    gate.e_score_correction_bias = mx.array([0.0, 0.0, 0.0, 1.0])
    logits = np.array([[3.0, 2.0, 1.0, -1.0]], np.float32)
    w, ids = gate(mx.array(logits))
    w, ids = _by_id(w, ids)
    assert ids[0].tolist() == [0, 3]
    np.testing.assert_allclose(w[0], 2.5 * _sigmoid(logits[0, [0, 3]].astype(np.float64)), rtol=1e-6)


def test_group_limited_gate_matches_mlx_lm_exactly():
    """Bit-for-bit against mlx-lm's DeepSeek-V3 ``group_expert_select``."""
    from mlx_lm.models.deepseek_v3 import group_expert_select

    E, H, k = 16, 32, 4
    gate, W, bias = _gate(E, H, k, 4, 2, 2.5, True, seed=11, bias_spread=0.3)
    x = mx.array(np.random.default_rng(12).normal(size=(2, 40, H)).astype(np.float32))
    w, ids = gate(x)
    ref_ids, ref_w = group_expert_select(x @ gate.weight.T, gate.e_score_correction_bias, k, 4, 2, 2.5, True)
    (gw, gi), (rw, ri) = _by_id(w, ids), _by_id(ref_w, ref_ids)
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_array_equal(gw, rw)
