"""mlx_moe.bench and mlx_moe.synthetic: the instrument's own logic, on tiny shapes.

No timing assertions: only that it runs, reports what it says it reports, and
computes its ratios from the times it measured.
"""

import importlib
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_moe import load_model
from mlx_moe.bench import batch, cli, cold, e2e, layer, load, plot
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
        "--prefill", "16,32", "--decode-tokens", "6", "--decode-repeats", "2", "--repeats", "1", "--chain", "2",
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
    for impl in ("ours", "mlx-lm"):
        d = res["impls"][impl]["decode"]
        assert d["tokens"] == 6 and d["repeats"] == 2 and len(d["stats"]["samples"]) == 2
        assert d["tok_s"] == d["stats"]["median"]
    assert [r["order"] for r in res["decode_rounds"]] == [["ours", "mlx-lm"], ["mlx-lm", "ours"]]
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


# ------------------------------------------------------------------ decode repeats, batch, cold start


@pytest.fixture
def micro_path(tmp_path):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def e2e_args(**kw):
    base = dict(group_size=64, dtype=mx.float32, seed=0, prefill=[8], e2e_repeats=1, decode_tokens=5,
                decode_repeats=4, compiled_decode=True, max_build_s=100.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_decode_is_interleaved_and_its_stats_follow_the_samples(monkeypatch, micro_path):
    """Scripted tok/s per run: the rounds must alternate which impl goes first, free
    memory before every run, and every figure must follow from the samples."""
    names = ["ours", "mlx-lm", "ours+decode"]
    script = random.Random(1)
    calls, rates = [], {k: [] for k in names}

    def fake_decode_once(name, prompt, n):
        calls.append(name)
        r = script.uniform(50, 150)
        rates[name].append(r)
        return list(range(n)), r

    monkeypatch.setattr(e2e, "e2e_decoders", lambda ours, twin, compiled: {k: k for k in names})
    monkeypatch.setattr(e2e, "_decode_once", fake_decode_once)
    monkeypatch.setattr(e2e, "release_memory", lambda: calls.append("release"))
    R = 4
    res = e2e.bench_e2e_config(micro_path, 4, e2e_args(decode_repeats=R), rate=1e9, mem=1 << 34, log=lambda s: None)

    runs = [c for c in calls if c != "release"]
    order = [names if i % 2 == 0 else names[::-1] for i in range(R)]
    assert runs == names + [k for o in order for k in o]  # warm-up each, then R interleaved rounds
    first_timed = calls.index(names[-1]) + 1  # after the last warm-up
    timed = calls[first_timed:]
    assert all(timed[i - 1] == "release" for i, c in enumerate(timed) if c != "release")
    assert [r["order"] for r in res["decode_rounds"]] == order
    t = [r["t_s"] for r in res["decode_rounds"]]
    assert t == sorted(t) and all(r["unix_time"] > 0 for r in res["decode_rounds"])

    samples = {k: rates[k][1:] for k in names}  # rates[k][0] is the warm-up
    for k in names:
        d = res["impls"][k]["decode"]
        st, xs = d["stats"], samples[k]
        assert st["samples"] == xs and d["repeats"] == R
        med = statistics.median(xs)
        assert d["tok_s"] == st["median"] == pytest.approx(med)
        assert (st["min"], st["max"]) == (min(xs), max(xs))
        assert st["spread"] == pytest.approx((max(xs) - min(xs)) / med)
        assert [r["tok_s"][k] for r in res["decode_rounds"]] == xs
    for k in ("ours", "ours+decode"):
        ratio = res["impls"][k]["decode"]["ratio_vs_mlx_lm"]
        per_round = [a / b for a, b in zip(samples[k], samples["mlx-lm"])]
        assert ratio["median"] == pytest.approx(statistics.median(samples[k]) / statistics.median(samples["mlx-lm"]))
        assert res["impls"][k]["speedup_vs_mlx_lm"]["decode"] == pytest.approx(ratio["median"])
        assert (ratio["round_min"], ratio["round_max"]) == pytest.approx((min(per_round), max(per_round)))
    text = e2e.format_e2e({"results": [res]})
    st = res["impls"]["ours"]["decode"]["stats"]
    assert f"{st['median']:.1f} ({st['min']:.1f}–{st['max']:.1f})" in text and f"{st['spread']:.1%}" in text
    assert "decode rounds" in text


@pytest.mark.parametrize("flag", ["--decode-repeats", "--decode-tokens", "--batch", "--batch-repeats"])
def test_counts_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--e2e", "--batch", "4", flag, "0"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"mlx_moe.bench: error: {flag} must be at least 1, got 0\n"


def batch_args(micro_path, **kw):
    base = dict(config=[micro_path], bits=[4], group_size=64, dtype=mx.float32, seed=0, max_build_s=100.0,
                batch=[2, 3], batch_prompt=[5, 9], batch_tokens=4, batch_repeats=2)
    base.update(kw)
    return SimpleNamespace(**base)


def test_batch_runs_batch_generate_on_both_models(monkeypatch, micro_path):
    mlx_lm_generate = importlib.import_module("mlx_lm.generate")  # the package's `generate` is a function

    built, seen = {}, []
    real_build, real_bg = batch.build_pair, mlx_lm_generate.batch_generate

    def build(*a):
        built["ours"], built["mlx-lm"], s = real_build(*a)
        return built["ours"], built["mlx-lm"], s

    def spy(model, tokenizer, prompts, **kw):
        seen.append((next(k for k, m in built.items() if m is model), [len(p) for p in prompts], kw["max_tokens"]))
        return real_bg(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(batch, "build_pair", build)
    monkeypatch.setattr(mlx_lm_generate, "batch_generate", spy)
    res = batch.bench_batch(batch_args(micro_path), log=lambda s: None)
    (r,) = res["results"]
    assert [s["B"] for s in r["sizes"]] == [2, 3]
    for s in r["sizes"]:
        B = s["B"]
        lengths = [5, 9, 5][:B]
        assert s["prompt_tokens"] == lengths
        # warm-up each, then 2 interleaved repeats: ours, mlx-lm, mlx-lm, ours
        calls = [c for c in seen if c[1] == lengths]
        assert [c[0] for c in calls] == ["ours", "mlx-lm", "ours", "mlx-lm", "mlx-lm", "ours"]
        assert all(c[2] == 4 for c in calls)
        for k in ("ours", "mlx-lm"):
            v = s["impls"][k]
            assert v["generated_tokens"] == B * 4
            assert v["tok_s"]["samples"] == pytest.approx([B * 4 / w for w in v["wall_s"]])
            assert v["tok_s"]["median"] == pytest.approx(statistics.median(v["tok_s"]["samples"]))
        assert s["tokens_agree"] is True  # same arrays, greedy
        o, m = s["impls"]["ours"]["tok_s"]["samples"], s["impls"]["mlx-lm"]["tok_s"]["samples"]
        assert s["impls"]["ours"]["ratio_vs_mlx_lm"]["median"] == pytest.approx(statistics.median(o) / statistics.median(m))
    assert "ours" in batch.format_batch(res) and "5-9" in batch.format_batch(res)


def test_batch_reports_a_failure_verbatim(monkeypatch, micro_path):
    mlx_lm_generate = importlib.import_module("mlx_lm.generate")  # the package's `generate` is a function

    built = {}
    real_build, real_bg = batch.build_pair, mlx_lm_generate.batch_generate

    def build(*a):
        built["ours"], twin, s = real_build(*a)
        return built["ours"], twin, s

    def fails_on_ours(model, *a, **kw):
        if model is built["ours"]:
            raise TypeError("no batching for you")
        return real_bg(model, *a, **kw)

    monkeypatch.setattr(batch, "build_pair", build)
    monkeypatch.setattr(mlx_lm_generate, "batch_generate", fails_on_ours)
    res = batch.bench_batch(batch_args(micro_path, batch=[2], batch_repeats=1), log=lambda s: None)
    (s,) = res["results"][0]["sizes"]
    assert s["impls"]["ours"]["error"].startswith("TypeError: no batching for you (at ")
    assert s["impls"]["mlx-lm"]["generated_tokens"] == 2 * 4
    assert "ERROR TypeError: no batching for you" in batch.format_batch(res)


def test_batch_counts_the_tokens_it_gets_back(monkeypatch):
    """Generated tokens are counted in the returned ids, not assumed B x max_tokens."""
    mlx_lm_generate = importlib.import_module("mlx_lm.generate")
    stats = SimpleNamespace(generation_tps=1.0)
    monkeypatch.setattr(mlx_lm_generate, "batch_generate",
                        lambda *a, **kw: SimpleNamespace(token_ids=[[1, 2, 3], [4]], stats=stats))
    r = batch._batch_once(None, [[0], [0]], new_tokens=3)
    assert r["generated"] == 4 and r["tok_s"] == pytest.approx(4 / r["wall_s"])


def cold_args(micro_path, **kw):
    base = dict(config=[micro_path], bits=[4], group_size=64, dtype=mx.float32, seed=0, max_build_s=100.0,
                cold_timeout=240.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_cold_children_report_both_impls(micro_path):
    res = cold.bench_cold(cold_args(micro_path), log=lambda s: None)
    (r,) = res["results"]
    assert set(r["cases"]) == {"warm", "empty"} and set(r["warmup"]) == {"ours", "mlx-lm"}
    dirs = []
    for case, v in r["cases"].items():
        for impl in ("ours", "mlx-lm"):
            c = v[impl]
            assert c["prefill_s"] > 0 and c["decode_s"] > 0 and c["build_s"] > 0, (case, impl, c)
            dirs.append(c["mlx_cache_dir"])
        d = v["ours_minus_mlx_lm"]
        assert d["prefill_s"] == pytest.approx(v["ours"]["prefill_s"] - v["mlx-lm"]["prefill_s"])
        assert d["decode_s"] == pytest.approx(v["ours"]["decode_s"] - v["mlx-lm"]["decode_s"])
    empty = dirs[2:]  # each "empty" child got its own new cache folder
    assert all(empty) and len(set(empty)) == 2 and not set(empty) & set(dirs[:2])
    assert "ours − mlx-lm" in cold.format_cold(res)


def test_cold_child_failures_name_the_cause(micro_path):
    args = cold_args(micro_path)
    with pytest.raises(RuntimeError, match=r"timed out after 0.2 s; stderr tail"):
        cold.run_child("ours", micro_path, 4, args, 0.2, None, "ours (test)")
    with pytest.raises(RuntimeError, match=r"(?s)exited with 2; stderr tail:.*Unknown config 'no-such-model'"):
        cold.run_child("ours", "no-such-model", 4, args, 120, None, "ours (test)")
