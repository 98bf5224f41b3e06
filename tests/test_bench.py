"""mlx_moe.bench and mlx_moe.synthetic: the instrument's own logic, on tiny shapes.

No timing assertions: only that it runs, reports what it says it reports, and
computes its ratios from the times it measured.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_moe import load_model
from mlx_moe.bench import cli, layer, load, plot
from mlx_moe.bench.common import speedup
from mlx_moe.testing.reference import rel_err
from mlx_moe.synthetic import (
    CONFIGS,
    get_config,
    load_config_for_gb,
    mlx_lm_twin,
    model_bytes,
    random_model,
    write_random_checkpoint,
)

MICRO = {
    **CONFIGS["tiny"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 256,
}
Q4 = {"bits": 4, "group_size": 64}


# ------------------------------------------------------------------ pure arithmetic


def test_layer_metrics_arithmetic():
    m, k, H, I = 4, 2, 64, 32
    r = layer.layer_metrics(2e-3, m, k, H, I, bytes_read=1e6)
    assert r["us"] == pytest.approx(2000.0)
    assert r["gbs"] == pytest.approx(1e6 / 2e-3 / 1e9)
    assert r["tflops"] == pytest.approx(2 * m * k * 3 * H * I / 2e-3 / 1e12)
    assert speedup(1.0, 2.0) == 2.0  # mlx-lm twice as slow -> ours 2x
    assert speedup(4.0, 2.0) == 0.5
    s = layer.SHAPES["qwen3-30b-a3b"]
    assert s.flops(1) == 2 * 8 * 3 * 2048 * 768
    # 4-bit, group 64: 0.5 byte per weight + bf16 scale and bias per 64 weights
    assert s.expert_bytes(4, 64) == 3 * 2048 * 768 * (0.5 + 4 / 64)


def test_routes_are_distinct_per_token():
    routes = layer.make_routes(m=32, E=16, k=4, draws=3, seed=0, dtype=mx.float32)
    for r in routes:
        ids = np.array(r["ids"])
        assert ids.shape == (32, 4)
        assert all(len(set(row)) == 4 for row in ids)
        assert r["distinct"] == len(np.unique(ids))
        assert np.allclose(np.array(r["weights"]).sum(-1), 1.0, atol=1e-5)
    assert len({tuple(np.array(r["ids"]).ravel()) for r in routes}) == 3


def layer_args(**kw):
    base = dict(group_size=64, dtype=mx.float32, m=[1, 4], backends=None, cycle_bytes=0,
                route_draws=2, seed=0, row_budget_s=0.02, repeats=1, chain=2,
                max_call_s=10.0, max_build_s=100.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_layer_rows_use_the_measured_times(monkeypatch):
    """Feed fake timings through the sweep: every figure must follow from them."""
    fake = {"ours:gather": (3e-3, 2e-3), "ours:loop": (9e-3, 8e-3), "mlx-lm": (4e-3, 5e-3)}

    def fake_time(impls, x0, routes, *a, **k):
        out = {}
        for name, fn in impls.items():
            single, chain = fake[name]
            out[name] = {"first_s": 1.0, "single_s": single, "single_samples": 3, "chain_s": chain,
                         "chain_len": 4, "chain_repeats": 3,
                         "output": fn(x0, routes[0]["weights"], routes[0]["ids"], 0)}
        return out

    monkeypatch.setattr(layer, "time_impls", fake_time)
    shape = layer.SHAPES["tiny"]
    rows, skipped = layer.bench_layer_shape(shape, 4, layer_args(), rate=1e9, mem=1 << 34, log=lambda s: None)
    assert {r["m"] for r in rows} == {1, 4}
    for r in rows:
        single, chain = fake["mlx-lm" if r["impl"] == "mlx-lm" else f"ours:{r['backend']}"]
        per_expert = r["layer_bytes"] / shape.E
        assert r["bytes_per_call"] == pytest.approx(r["distinct_experts"] * per_expert)
        assert r["chain"]["us"] == pytest.approx(chain * 1e6)
        assert r["single"]["us"] == pytest.approx(single * 1e6)
        assert r["chain"]["gbs"] == pytest.approx(r["bytes_per_call"] / chain / 1e9)
        assert r["chain"]["tflops"] == pytest.approx(shape.flops(r["m"]) / chain / 1e12)
        if r["impl"] == "ours":
            assert r["speedup_vs_mlx_lm"]["chain"] == pytest.approx(fake["mlx-lm"][1] / chain)
            assert r["speedup_vs_mlx_lm"]["single"] == pytest.approx(fake["mlx-lm"][0] / single)
            assert r["max_rel_err_vs_mlx_lm"] < 1e-5  # same weights, same math
        if r["m"] == 1:
            assert r["distinct_experts"] == shape.k  # m = 1 reads exactly k experts
    assert {r["backend"] for r in rows} >= {"gather", "loop", "SwitchGLU"}


def test_layer_sweep_skips_what_does_not_fit():
    shape = layer.SHAPES["deepseek-v3"]
    rows, skipped = layer.bench_layer_shape(shape, 8, layer_args(), rate=1e9, mem=1 << 30, log=lambda s: None)
    assert rows == [] and "memory" in skipped[0]["reason"]
    rows, skipped = layer.bench_layer_shape(shape, 4, layer_args(max_build_s=1.0), rate=1e6, mem=1 << 50, log=lambda s: None)
    assert rows == [] and "time" in skipped[0]["reason"]


def test_time_impls_real_run():
    shape = layer.SHAPES["tiny"]
    ours, ref = layer.build_layer(shape, 4, 64, mx.float32, 0)
    routes = layer.make_routes(4, shape.E, shape.k, 2, 0, mx.float32)
    impls = {"ours": lambda x, w, i, n: ours(x, w, i),
             "mlx-lm": lambda x, w, i, n: (ref(x, i) * w[..., None]).sum(-2)}
    res = layer.time_impls(impls, mx.random.normal((4, shape.H)), routes, budget_s=0.01, repeats=2, chain_len=3)
    for r in res.values():
        assert r["single_s"] > 0 and r["chain_s"] > 0 and r["first_s"] > 0
        assert r["chain_len"] == 3 and r["chain_repeats"] == 2
    assert rel_err(res["ours"]["output"], res["mlx-lm"]["output"], kind="max") < 1e-5


# ------------------------------------------------------------------ synthetic


@pytest.mark.parametrize("quantize", [None, Q4])
def test_random_model_matches_its_mlx_lm_twin(quantize):
    model, config = random_model(MICRO, quantize, seed=1, dtype=mx.float32)
    twin = mlx_lm_twin(model, config, quantize)
    ours = dict(tree_flatten(model.parameters()))
    theirs = dict(tree_flatten(twin.parameters()))
    assert set(ours) == set(theirs)
    assert all(ours[k] is theirs[k] or mx.array_equal(ours[k], theirs[k]) for k in ours)
    if quantize:
        assert ours["model.layers.0.mlp.switch_mlp.gate_proj.weight"].dtype == mx.uint32
        assert config["quantization"]["bits"] == 4
    tokens = mx.array([[3, 17, 99, 4, 250, 8, 61]])
    a, b = model(tokens), twin(tokens)
    assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
    assert mx.array_equal(a.argmax(-1), b.argmax(-1)).item()


def test_random_model_is_deterministic_and_sane():
    a, _ = random_model(MICRO, Q4, seed=5)
    b, _ = random_model(MICRO, Q4, seed=5)
    c, _ = random_model(MICRO, Q4, seed=6)
    fa, fb, fc = (dict(tree_flatten(m.parameters())) for m in (a, b, c))
    assert all(mx.array_equal(fa[k], fb[k]) for k in fa)
    assert not mx.array_equal(fa["model.embed_tokens.weight"], fc["model.embed_tokens.weight"])
    assert fa["model.norm.weight"].dtype == mx.bfloat16
    assert mx.all(fa["model.norm.weight"] == 1).item()
    assert model_bytes(MICRO, Q4) == sum(v.nbytes for v in fa.values())


def test_get_config():
    assert get_config("qwen3-30b-a3b")["num_experts"] == 128
    assert get_config("deepseek-v3-small")["num_hidden_layers"] < 10
    with pytest.raises(ValueError):
        get_config("no-such-model")
    cfg = load_config_for_gb(2.0)
    assert 1.5e9 < model_bytes(cfg) < 2.5e9


def test_write_random_checkpoint_loads_in_both(tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    folder = write_random_checkpoint(tmp_path / "ckpt", MICRO, seed=3, max_shard_gb=0.0002)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / f).exists() for f in shards)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]  # HF per-expert
    assert (folder / "tokenizer.json").exists()

    ours, _ = load_model(folder)
    theirs, _ = mlx_lm_load_model(folder)
    expected, _ = random_model(MICRO, None, seed=3)
    o, t, e = (dict(tree_flatten(m.parameters())) for m in (ours, theirs, expected))
    assert set(o) == set(t) == set(e)
    for k in o:
        assert o[k].dtype == mx.bfloat16
        assert mx.array_equal(o[k], t[k]).item() and mx.array_equal(o[k], e[k]).item(), k

    q, _ = load_model(folder, quantize=Q4)
    eq, _ = random_model(MICRO, Q4, seed=3)
    fq, fe = dict(tree_flatten(q.parameters())), dict(tree_flatten(eq.parameters()))
    assert all(mx.array_equal(fq[k], fe[k]).item() for k in fq)


# ------------------------------------------------------------------ CLI


def test_cli_writes_complete_json(tmp_path, capsys):
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    out = tmp_path / "bench.json"
    cli.main([
        "--layer", "--e2e", "--shapes", "tiny", "--m", "1,4", "--bits", "4", "--config", str(cfg),
        "--prefill", "16,32", "--decode-tokens", "6", "--repeats", "1", "--chain", "2",
        "--row-budget-s", "0.01", "--no-compiled-decode", "--json", str(out),
    ])
    text = capsys.readouterr().out
    assert "Layer" in text and "End to end" in text
    report = json.loads(out.read_text())
    meta = report["meta"]
    for key in ("platform", "cpu", "device", "gpu", "mlx", "mlx_lm", "date", "backends"):
        assert key in meta
    assert meta["mlx"] == mx.__version__
    rows = report["layer"]["rows"]
    assert {r["m"] for r in rows} == {1, 4}
    for r in rows:
        for mode in ("single", "chain"):
            assert set(r[mode]) >= {"us", "gbs", "tflops"}
        assert r["backend"] and r["auto_backend"]
        if r["impl"] == "ours":
            ref = next(x for x in rows if x["impl"] == "mlx-lm" and x["m"] == r["m"])
            assert r["speedup_vs_mlx_lm"]["chain"] == pytest.approx(ref["chain"]["us"] / r["chain"]["us"])
    (res,) = report["e2e"]["results"]
    for impl in ("ours", "mlx-lm"):
        v = res["impls"][impl]
        assert v["first_forward_s"] > 0 and v["decode"]["tok_s"] > 0
        assert set(v["prefill"]) == {"16", "32"} and v["prefill"]["16"]["peak_gb"] > 0
    sp = res["impls"]["ours"]["speedup_vs_mlx_lm"]
    assert sp["decode"] == pytest.approx(res["impls"]["ours"]["decode"]["tok_s"] / res["impls"]["mlx-lm"]["decode"]["tok_s"])
    assert sp["prefill_32"] == pytest.approx(
        res["impls"]["ours"]["prefill"]["32"]["tok_s"] / res["impls"]["mlx-lm"]["prefill"]["32"]["tok_s"])


def test_load_bench_subprocesses(tmp_path):
    args = SimpleNamespace(bits=[4], group_size=64, workdir=str(tmp_path / "w"), keep=False,
                           load_gb=0.001, load_config=MICRO, seed=0)
    res = load.bench_load(args, log=lambda s: None)
    assert res["outputs_identical"] is True
    for impl in ("ours", "mlx-lm"):
        v = res["impls"][impl]
        assert v["wall_s"] > 0 and v["peak_rss_gb"] > 0 and v["quantized_gb"] > 0
        assert v["source_gbs"] == pytest.approx(res["source_gb"] / v["wall_s"])
        assert v["peak_rss_over_quantized"] == pytest.approx(v["peak_rss_gb"] / v["quantized_gb"])
    assert res["impls"]["ours"]["speedup_vs_mlx_lm"]["wall"] == pytest.approx(
        res["impls"]["mlx-lm"]["wall_s"] / res["impls"]["ours"]["wall_s"])
    assert "bench.json" not in str(tmp_path) and not (tmp_path / "w").exists()  # cleaned up
    assert "load" in load.format_load(res) or "ours" in load.format_load(res)


def _rows():
    rows = []
    for impl, backend, f in (("ours", "gather", 2.0), ("mlx-lm", "SwitchGLU", 1.0)):
        for m in (1, 4, 32):
            rows.append({"shape": "tiny", "bits": 4, "m": m, "impl": impl, "backend": backend,
                         "chain": {"gbs": f * m}})
    return rows


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    plot.plot_layer(_rows(), path, peak_gbs=100.0)
    assert path.stat().st_size > 1000


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot.plot_layer(_rows(), tmp_path / "x.png")


# The smallest layer run of this file: one tiny shape, m = 1, one timed repeat.
TINY_LAYER_ARGS = ["--layer", "--shapes", "tiny", "--m", "1", "--bits", "4", "--repeats", "1", "--chain", "2",
                   "--row-budget-s", "0.01"]
# What the installed console script does (pip writes it from pyproject's [project.scripts]).
CONSOLE_SCRIPT = ("import sys; from importlib.metadata import entry_points; "
                  "(ep,) = entry_points(group='console_scripts', name='mlx_moe.bench'); sys.exit(ep.load()())")


def test_console_script_exits_0(tmp_path):
    script = Path(sys.executable).with_name("mlx_moe.bench")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", CONSOLE_SCRIPT]
    p = subprocess.run(cmd + TINY_LAYER_ARGS + ["--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Layer" in p.stdout and (tmp_path / "b.json").exists()
    assert "'meta'" not in p.stderr  # the report is not dumped as an exit message


def test_plot_without_matplotlib_fails_before_the_benchmark(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        cli.main(TINY_LAYER_ARGS + ["--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # no benchmark ran
    assert err == "mlx_moe.bench: error: --plot needs matplotlib (pip install matplotlib)\n"
