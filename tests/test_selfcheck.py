"""GPU kernels never crash a user: ``auto`` self-checks each kernel once per
process before its first use and falls back (``gather`` / the router's MLX ops)
with one warning when it fails.

There is no GPU here: each test injects a kernel on the CPU (its backend's
``available`` made true, its run replaced by one that raises, returns garbage
or is correct) and tells the self-check there is a GPU backend.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import mlx_moe
from mlx_moe import experts as experts_mod
from mlx_moe.kernels import selfcheck
from mlx_moe.kernels.fused import backend as fused
from mlx_moe.kernels.prefill import backend as prefill
from mlx_moe.kernels.router import backend as router
from mlx_moe.loading import load_model

PROMPT_DECODE = [1, 44, 73, 80]  # 4 tokens: fused and the router kernel serve every call
PROMPT_PREFILL = [1, 44, 73, 80, 80, 83, 4, 91, 83, 86, 80, 72]  # 12 tokens: prefill serves it


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    mlx_moe.kernels.register()
    selfcheck.reset()
    monkeypatch.delenv("MLX_MOE_SELFCHECK", raising=False)
    yield
    selfcheck.reset()


@pytest.fixture
def fake_gpu(monkeypatch):
    """The self-check believes MLX has a GPU backend."""
    monkeypatch.setattr(selfcheck, "gpu_backend", lambda: "metal")


def greedy(model, prompt, steps=6):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=steps)]


@pytest.fixture(scope="module")
def gather_tokens(tmp_path_factory):
    import fixtures

    path = fixtures.write_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3_moe", "per_expert")
    model, _ = load_model(path, backend="gather")
    return path, {tuple(p): greedy(model, p) for p in (PROMPT_DECODE, PROMPT_PREFILL)}


def run_model(path, prompt):
    """Greedy tokens with ``auto``; returns (tokens, the self-check warnings)."""
    model, _ = load_model(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = greedy(model, prompt)
    return tokens, [w for w in caught if "self-check" in str(w.message)]


def counting(calls, fn):
    def f(*a, **k):
        calls.append(1)
        return fn(*a, **k)
    return f


def broken(*a, **k):
    raise RuntimeError("[metal::Device] Unable to build metal library from source: error: use of undeclared identifier 'simd_sum'")


def garbage(experts, x, weights, ids):
    return mx.random.normal(x.shape, key=mx.random.key(9)).astype(x.dtype) * 100


def nans(experts, x, weights, ids):
    return mx.full(x.shape, float("nan"), x.dtype)


def zero_row(experts, x, weights, ids):
    """A kernel that is right except for one token's output row."""
    y = experts_mod.run_gather(experts, x, weights, ids)
    return y.reshape(-1, y.shape[-1]).at[0].multiply(0.0).reshape(y.shape)


# ------------------------------------------------------------ expert kernels


@pytest.mark.parametrize("bad,why", [
    (broken, r"RuntimeError: \[metal::Device\] Unable to build metal library"),
    (garbage, r"max relative error .* > 0.002 against the fallback"),
    (nans, r"non-finite output"),
    (zero_row, r"max relative error .* > 0.002"),
])
@pytest.mark.parametrize("kernel,prompt", [("fused", PROMPT_DECODE), ("prefill", PROMPT_PREFILL)])
def test_failing_expert_kernel_falls_back_to_gather(kernel, prompt, bad, why, gather_tokens, fake_gpu, monkeypatch):
    path, want = gather_tokens
    mod = fused if kernel == "fused" else prefill
    runs, used = [], []
    monkeypatch.setattr(mod, "available", lambda e, x, ids: (x.size // x.shape[-1] <= 8) == (kernel == "fused"))
    monkeypatch.setattr(mod, "run_fused" if kernel == "fused" else "run_backend", counting(runs, bad))
    real_gather = experts_mod.BACKENDS["gather"].run
    monkeypatch.setitem(experts_mod.BACKENDS, "gather", experts_mod.Backend(counting(used, real_gather)))

    tokens, warned = run_model(path, prompt)

    assert tokens == want[tuple(prompt)]
    assert len(warned) == 1, [str(w.message) for w in warned]
    msg = str(warned[0].message)
    assert f"the {kernel} kernel failed its self-check" in msg and "(gather instead)" in msg
    assert __import__("re").search(why, msg), msg
    assert runs == [1]  # the check's one run; never again, not per layer
    assert used  # the model ran on gather
    assert selfcheck.RESULTS[kernel].ok is False
    # a second model in the same process: no new check, no new warning
    assert run_model(path, prompt) == (want[tuple(prompt)], [])
    assert runs == [1]


@pytest.mark.parametrize("kernel,prompt", [("fused", PROMPT_DECODE), ("prefill", PROMPT_PREFILL)])
def test_passing_kernel_is_checked_once_then_used(kernel, prompt, gather_tokens, fake_gpu, monkeypatch):
    """A correct kernel (here: gather itself) passes, then serves every layer."""
    path, want = gather_tokens
    mod = fused if kernel == "fused" else prefill
    runs, checks = [], []
    monkeypatch.setattr(mod, "available", lambda e, x, ids: (x.size // x.shape[-1] <= 8) == (kernel == "fused"))
    monkeypatch.setattr(mod, "run_fused" if kernel == "fused" else "run_backend",
                        counting(runs, experts_mod.run_gather))
    monkeypatch.setattr(selfcheck, "check", counting(checks, selfcheck.check))
    tokens, warned = run_model(path, prompt)
    assert tokens == want[tuple(prompt)] and warned == []
    assert checks == [1] and selfcheck.RESULTS[kernel].ok
    assert selfcheck.RESULTS[kernel].max_rel_err < 1e-6
    assert len(runs) > 2  # the check's run, then the model's layers


# ------------------------------------------------------------- router kernel


def _ops_route(gate, r, x):
    return gate(x) if r is None else r(gate(x))


def _wrong_ids(gate, r, x):
    w, ids = _ops_route(gate, r, x)
    return w, (ids + 1) % gate["weight"].shape[0]


@pytest.mark.parametrize("bad,why", [
    (broken, r"Unable to build metal library"),
    (_wrong_ids, r"expert ids differ from the MLX ops' in 8 of 8 rows"),
    (lambda g, r, x: tuple(a * 3 if a.dtype != mx.uint32 else a for a in _ops_route(g, r, x)),
     r"max relative error"),
])
def test_failing_router_kernel_falls_back_to_the_ops(bad, why, gather_tokens, fake_gpu, monkeypatch):
    path, want = gather_tokens
    runs = []
    monkeypatch.setattr(router, "available", lambda g, r, x: True)
    monkeypatch.setattr(router, "route", counting(runs, bad))
    tokens, warned = run_model(path, PROMPT_DECODE)
    assert tokens == want[tuple(PROMPT_DECODE)]
    assert len(warned) == 1
    msg = str(warned[0].message)
    assert "the router kernel failed its self-check" in msg and "(the MLX ops instead)" in msg
    assert __import__("re").search(why, msg), msg
    assert runs == [1]


def test_passing_router_kernel_is_used(gather_tokens, fake_gpu, monkeypatch):
    path, want = gather_tokens
    runs = []
    monkeypatch.setattr(router, "available", lambda g, r, x: True)
    monkeypatch.setattr(router, "route", counting(runs, _ops_route))
    tokens, warned = run_model(path, PROMPT_DECODE)
    assert tokens == want[tuple(PROMPT_DECODE)] and warned == []
    assert len(runs) > 1 and selfcheck.RESULTS["router"].ok


# ----------------------------------------------------------------- scope


def test_no_check_without_a_gpu_backend(gather_tokens, monkeypatch):
    """On the CPU no kernel is eligible and nothing is checked; with a kernel
    injected as available, it is used as before (the emulator tests do this)."""
    path, want = gather_tokens
    runs = []
    monkeypatch.setattr(fused, "available", lambda e, x, ids: True)
    monkeypatch.setattr(fused, "run_fused", counting(runs, experts_mod.run_gather))
    assert not selfcheck.enabled()
    tokens, warned = run_model(path, PROMPT_DECODE)
    assert tokens == want[tuple(PROMPT_DECODE)] and warned == [] and selfcheck.RESULTS == {}


def test_env_switch_trusts_the_kernels(gather_tokens, fake_gpu, monkeypatch):
    path, _ = gather_tokens
    monkeypatch.setenv("MLX_MOE_SELFCHECK", "0")
    monkeypatch.setattr(fused, "available", lambda e, x, ids: True)
    monkeypatch.setattr(fused, "run_fused", experts_mod.run_gather)
    assert not selfcheck.enabled()
    _, warned = run_model(path, PROMPT_DECODE)
    assert warned == [] and selfcheck.RESULTS == {}


def test_explicit_backend_is_not_second_guessed(gather_tokens, fake_gpu, monkeypatch):
    """``backend="fused"`` is the user's choice: no check, the kernel runs (and
    its error surfaces)."""
    path, _ = gather_tokens
    monkeypatch.setattr(fused, "run_fused", broken)
    model, _ = load_model(path, backend="fused")
    with pytest.raises(RuntimeError, match="Unable to build"):
        greedy(model, PROMPT_DECODE)
    assert selfcheck.RESULTS == {}


def test_check_does_not_advance_the_global_generator(fake_gpu, monkeypatch):
    from mlx_moe.testing.reference import random_experts, random_inputs

    e = random_experts(8, 64, 32, "silu", ("affine", 4, 32), mx.bfloat16)
    x, w, ids = random_inputs(e, 2, 2, mx.bfloat16)
    monkeypatch.setattr(fused, "run_fused", experts_mod.run_gather)
    mx.random.seed(5)
    want = mx.random.uniform(shape=(3,))
    mx.random.seed(5)
    assert selfcheck.passed("fused", e, x, ids)
    assert mx.array_equal(mx.random.uniform(shape=(3,)), want)
    assert np.isfinite(selfcheck.RESULTS["fused"].seconds)


def test_first_use_inside_a_compiled_trace_defers_the_check(fake_gpu, monkeypatch):
    """With the layer's arrays as mx.compile inputs nothing can be evaluated:
    that trace takes gather (no verdict, no warning), the next plain call checks."""
    from mlx_moe.testing.reference import random_experts, random_inputs

    e = random_experts(8, 64, 32, "silu", ("affine", 4, 32), mx.float32)
    x, w, ids = random_inputs(e, 2, 2, mx.float32)
    runs = []
    monkeypatch.setattr(fused, "available", lambda *a: True)
    monkeypatch.setattr(fused, "run_fused", counting(runs, experts_mod.run_gather))
    f = mx.compile(lambda x: e(x, w, ids, validate=False), inputs=e.state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = f(x)
    assert runs == [1] and selfcheck.RESULTS == {}  # the check's attempt; the trace took gather
    assert mx.allclose(y, experts_mod.run_gather(e, x, w, ids))
    assert e.select_backend(x, ids) == "fused" and selfcheck.RESULTS["fused"].ok and runs == [1, 1]


def test_compiled_decode_first_step_checks_and_falls_back(gather_tokens, fake_gpu, monkeypatch):
    """mlx_moe.decode's compiled step (after an 11-token prefill, which fused
    does not serve, the first fused call is traced) checks there, falls back
    and gives gather's tokens."""
    from mlx_moe.decode import generate_step as our_step

    path, _ = gather_tokens
    prompt = mx.array(PROMPT_PREFILL)
    model, _ = load_model(path, backend="gather")
    want = [r.token for r in our_step(prompt, model, max_tokens=5)]
    monkeypatch.setattr(fused, "available", lambda e, x, ids: x.size // x.shape[-1] <= 8)
    monkeypatch.setattr(fused, "run_fused", broken)
    model, _ = load_model(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [r.token for r in our_step(prompt, model, max_tokens=5)]
    assert got == want
    assert [str(w.message).split(" and ")[0] for w in caught] == ["mlx_moe: the fused kernel failed its self-check"]
