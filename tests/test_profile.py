"""Expert-usage profiling (mlx_moe/profile.py, mlx_moe.generate --profile) on the shipped model."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlx_moe
from mlx_moe import profile, routing
from mlx_moe.models import MoEBlock
from mlx_moe.profile import ExpertProfiler, moe_blocks


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = mlx_moe.load(progress=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def model32():
    """float32 copy: cached decode and a full forward route identically (no bf16 rounding ties)."""
    model, _ = mlx_moe.load(progress=False)
    model.set_dtype(mx.float32)
    return model


def independent_routing(model, tokens):
    """Per MoE layer: (ids [T, k], weights [T, k]) computed here, with NumPy on the router logits
    of a plain full-sequence forward (no profiler, no cache)."""
    inner = model.model
    h = inner.embed_tokens(mx.array(tokens)[None])
    out = []
    for layer in inner.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), "causal", None)
        z = layer.post_attention_layernorm(h)
        block = layer.mlp
        logits = np.array(block.gate(z).astype(mx.float32))[0].astype(np.float64)
        k = block.router.k
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(p, ids, -1)
        w /= w.sum(-1, keepdims=True)  # norm_topk_prob: true in the shipped config
        out.append((ids, w))
        h = h + block(z)
    return out


def run_profiled(model, sequences):
    """Each (prompt, decode_tokens): prompt[:-1] in one forward, then the last prompt token and
    the decode tokens one by one through the KV cache, under a profiler."""
    prof = ExpertProfiler(model)
    with prof:
        for prompt, decode in sequences:
            prof.begin(len(prompt))
            cache = make_prompt_cache(model)
            model(mx.array(prompt[:-1])[None], cache=cache)
            for t in [prompt[-1]] + decode[:-1]:
                mx.eval(model(mx.array([[t]]), cache=cache))
    return prof.result("default")


SEQS = [([33, 533, 294, 17, 900, 41, 7], [260, 654, 1188, 266, 654, 12, 320, 1500]),
        ([5, 1000, 77], [3, 2047, 64, 64, 9])]


def test_counts_equal_an_independent_count(model32):
    r = run_profiled(model32, SEQS)
    E, k = r["num_experts"], r["top_k"]
    assert (E, k) == (8, 2)
    want = {p: np.zeros((2, E), np.int64) for p in ("prefill", "decode")}
    mass = {p: np.zeros((2, E)) for p in ("prefill", "decode")}
    for prompt, decode in SEQS:
        fed = prompt + decode[:-1]  # every token the model routed
        for row, (ids, w) in enumerate(independent_routing(model32, fed)):
            for phase, sl in (("prefill", slice(0, len(prompt))), ("decode", slice(len(prompt), None))):
                want[phase][row] += np.bincount(ids[sl].reshape(-1), minlength=E)
                mass[phase][row] += np.bincount(ids[sl].reshape(-1), weights=w[sl].reshape(-1), minlength=E)
    for phase in ("prefill", "decode"):
        np.testing.assert_array_equal(np.array(r["phases"][phase]["counts"]), want[phase], err_msg=phase)
        np.testing.assert_allclose(np.array(r["phases"][phase]["weight_mass"]), mass[phase], rtol=1e-4, atol=1e-4)
    # the split sums to the token counts x k, in every layer
    n_pre = sum(len(p) for p, _ in SEQS)
    n_dec = sum(len(d) - 1 for _, d in SEQS)
    assert r["phases"]["prefill"]["tokens"] == n_pre and r["phases"]["decode"]["tokens"] == n_dec
    assert np.array(r["phases"]["prefill"]["counts"]).sum(1).tolist() == [n_pre * k] * 2
    assert np.array(r["phases"]["decode"]["counts"]).sum(1).tolist() == [n_dec * k] * 2
    # normalized top-k weights: each token's weights sum to 1
    np.testing.assert_allclose(np.array(r["phases"]["all"]["weight_mass"]).sum(1), n_pre + n_dec, rtol=1e-5)


def test_forward_without_profiler_runs_no_recording_code(loaded):
    """The hook must add nothing to an unprofiled forward: no call into profile.py at all, and
    the blocks' classes are the plain ones (before attaching and after detaching)."""
    model, _ = loaded
    classes = [type(b) for _, b in moe_blocks(model)]
    x = mx.array([[33, 533, 294, 17]])

    def profile_calls():
        seen = []

        def tracer(frame, event, arg):
            if event == "call" and frame.f_code.co_filename == profile.__file__:
                seen.append(frame.f_code.co_name)

        sys.setprofile(tracer)
        try:
            mx.eval(model(x))
        finally:
            sys.setprofile(None)
        return seen

    assert profile_calls() == []
    for fn in (MoEBlock.__call__, MoEBlock.route, routing.route):  # no profiler test in the hot path
        code = fn.__code__
        names = list(code.co_names) + [c for c in code.co_consts if isinstance(c, str)]
        assert not any("profil" in name.lower() for name in names), fn
    prof = ExpertProfiler(model).attach()
    prof.begin(4)
    assert "record" in profile_calls()  # the tracer does see the hook when attached
    prof.detach()
    assert [type(b) for _, b in moe_blocks(model)] == classes
    assert not any("_mlx_moe_profiler" in b.__dict__ for _, b in moe_blocks(model))
    assert profile_calls() == []


def test_profile_cli_json_schema_and_split(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A list is\n\nThe for statement\nclass definitions\n")
    out = tmp_path / "prof.json"
    with pytest.raises(SystemExit) as e:
        profile.cli(["--prompts", str(prompts), "-o", str(out), "-m", "6", "--coactivation"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "max/mean" in printed and "wrote" in printed
    r = json.loads(out.read_text())
    assert set(r) >= {"version", "model", "num_experts", "top_k", "moe_layers", "prompts", "phases",
                      "coactivation", "generated_tokens"}
    assert r["version"] == 1 and r["moe_layers"] == [0, 1] and r["prompts"] == 3
    E, k, L = r["num_experts"], r["top_k"], len(r["moe_layers"])
    assert set(r["phases"]) == {"prefill", "decode", "all"}
    for ph in r["phases"].values():
        assert set(ph) == {"tokens", "counts", "weight_mass", "entropy_bits", "entropy_norm", "max_over_mean"}
        assert np.array(ph["counts"]).shape == (L, E) and np.array(ph["weight_mass"]).shape == (L, E)
        assert np.array(ph["counts"]).sum(1).tolist() == [ph["tokens"] * k] * L
        for h, n, m in zip(ph["entropy_bits"], ph["entropy_norm"], ph["max_over_mean"]):
            assert 0 <= h <= np.log2(E) + 1e-9 and 0 <= n <= 1 + 1e-9 and 1 - 1e-9 <= m <= E / k + 1e-9
    # prefill = the prompts' tokens; decode = every generated token but each prompt's last
    _, tokenizer = mlx_moe.load(progress=False)
    n_pre = sum(len(tokenizer.encode(p)) for p in ("A list is", "The for statement", "class definitions"))
    assert r["phases"]["prefill"]["tokens"] == n_pre
    assert r["phases"]["decode"]["tokens"] == r["generated_tokens"] - 3
    assert r["phases"]["all"]["tokens"] == n_pre + r["generated_tokens"] - 3
    pairs = np.array(r["coactivation"]["all"])
    assert pairs.shape == (L, E, E) and (pairs == pairs.transpose(0, 2, 1)).all()
    assert (np.diagonal(pairs, axis1=1, axis2=2) == 0).all()
    np.testing.assert_array_equal(pairs.sum(2), np.array(r["phases"]["all"]["counts"]) * (k - 1))


def test_generate_profile_flag(tmp_path, capsys):
    from mlx_moe import generate

    out = tmp_path / "g.json"
    with pytest.raises(SystemExit) as e:
        generate.cli(["--profile", str(out), "-m", "5", "--json"])
    assert e.value.code == 0
    captured = capsys.readouterr()
    reply = json.loads(captured.out)  # stdout stays one JSON object; the table goes to stderr
    assert "max/mean" in captured.err
    r = json.loads(out.read_text())
    assert r["phases"]["prefill"]["tokens"] == len(reply["prompt_tokens"])
    assert r["phases"]["decode"]["tokens"] >= len(reply["tokens"]) - 1
    k = r["top_k"]
    for ph in r["phases"].values():
        assert np.array(ph["counts"]).sum(1).tolist() == [ph["tokens"] * k] * 2


def one_line_error(capsys, fn, argv, prog):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    # one error line (argparse's own errors add its usage lines before it, as in every mlx_moe CLI)
    lines = err.splitlines()
    assert [line for line in lines if ": error: " in line] == [lines[-1]], err
    assert lines[-1].startswith(f"{prog}: error: "), err
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), err
    assert "Traceback" not in err
    return lines[-1]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    P = "mlx_moe.profile"
    assert "No such file" in one_line_error(capsys, profile.cli, ["--prompts", str(tmp_path / "missing")], P)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in one_line_error(capsys, profile.cli, ["--prompts", str(empty)], P)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "hi"}]\n{"messages": 3}\n')
    assert "line 2" in one_line_error(capsys, profile.cli, ["--prompts", str(bad)], P)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    assert "line 2: invalid JSON" in one_line_error(capsys, profile.cli, ["--prompts", str(broken)], P)
    good = tmp_path / "p.txt"
    good.write_text("A list is\n")
    chats = tmp_path / "c.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert "chat template" in one_line_error(capsys, profile.cli, ["--prompts", str(chats)], P)
    assert "--max-tokens" in one_line_error(capsys, profile.cli, ["--prompts", str(good), "-m", "0"], P)
    assert "does not exist" in one_line_error(
        capsys, profile.cli, ["--prompts", str(good), "-o", str(tmp_path / "no" / "x.json")], P)
    assert "one of --prompts" in one_line_error(capsys, profile.cli, [], P)
    assert "one of --prompts" in one_line_error(capsys, profile.cli, ["--prompts", str(good), "--from", str(good)], P)
    assert "not a JSON profile" in one_line_error(capsys, profile.cli, ["--from", str(good)], P)
    other = tmp_path / "other.json"
    other.write_text('{"version": 1, "phases": {}}')
    assert "not an expert profile" in one_line_error(capsys, profile.cli, ["--from", str(other)], P)
    assert "--q-bits" in one_line_error(capsys, profile.cli, ["--prompts", str(good), "--q-bits", "7"], P)
    assert "--time-every" in one_line_error(capsys, profile.cli, ["--prompts", str(good), "--time-every", "-1"], P)
    assert "does not exist" in one_line_error(
        capsys, __import__("mlx_moe.generate").generate.cli,
        ["--profile", str(tmp_path / "no" / "g.json")], "mlx_moe.generate")

    # --plot without matplotlib: said before anything is loaded
    import mlx_moe.loading

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(mlx_moe.loading, "load", lambda *a, **k: pytest.fail("loaded before the plot check"))
    err = one_line_error(capsys, profile.cli, ["--prompts", str(good), "--plot", str(tmp_path / "h.png")], P)
    assert "pip install 'mlx-moe-engine[plot]'" in err


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    r = {"moe_layers": [0, 1], "phases": {"all": {"counts": [[1, 2, 3, 0], [0, 0, 5, 1]]}}}
    path = tmp_path / "h.png"
    profile.plot_heatmap(r, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timing_split_leaves_routing_alone(loaded):
    """Timed steps (an evaluation at each boundary) route and generate exactly as untimed ones;
    the parts add up to the total; every class swapped for timing is put back."""
    model, tokenizer = loaded
    attn_classes = [type(layer.self_attn) for layer in model.layers]
    prompts = ["A list is", "The for statement"]
    plain, n_plain = profile.profile_prompts(model, tokenizer, prompts, max_tokens=12)
    timed, n_timed = profile.profile_prompts(model, tokenizer, prompts, max_tokens=12, time_every=3)
    a, b = plain.result(), timed.result()
    assert n_plain == n_timed
    for p in ("prefill", "decode"):
        assert a["phases"][p]["counts"] == b["phases"][p]["counts"]
    assert a["timing"] is None
    t = b["timing"]
    # decode steps t = 1..11 of each prompt, numbered on from 0 across prompts: every 3rd is timed
    assert t["steps"] == len(range(0, 22, 3)) and t["every"] == 3
    ms = t["per_token_ms"]
    assert set(ms) == {"router", "experts", "attention", "rest", "total"}
    assert all(ms[p] > 0 for p in ("router", "experts", "attention"))
    assert ms["total"] == pytest.approx(sum(ms[p] for p in ("router", "experts", "attention", "rest")))
    assert sum(t["share"].values()) == pytest.approx(1.0)
    assert [type(layer.self_attn) for layer in model.layers] == attn_classes
    assert all(type(b).__name__.startswith("Qwen3") for _, b in moe_blocks(model))


def test_from_saved_profile(tmp_path, capsys):
    out = tmp_path / "g.json"
    from mlx_moe import generate

    with pytest.raises(SystemExit):
        generate.cli(["--profile", str(out), "-m", "4", "--verbose", "False"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        profile.cli(["--from", str(out)])
    assert e.value.code == 0
    assert "max/mean" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_every_architecture(arch):
    """Dense layers are left out, shared experts and DeepSeek's gate are kept: a recorded and
    timed forward gives the unprofiled forward's logits exactly, and counts sum to tokens x k."""
    from fixtures.configs import moe_layers, tiny_config

    from mlx_moe.synthetic import random_model

    model, cfg = random_model(tiny_config(arch), dtype=mx.float32)
    tokens = mx.array([[1, 5, 9, 2, 7, 3]])
    cache = make_prompt_cache(model)
    want = model(tokens[:, :4], cache=cache)
    want_step = model(tokens[:, 4:5], cache=cache)
    prof = ExpertProfiler(model)
    prof.attach(timing=True)
    prof.begin(4)
    cache = make_prompt_cache(model)
    got = model(tokens[:, :4], cache=cache)
    timer = profile.StepTimer()
    prof.timer = timer
    timer.start()
    got_step = model(tokens[:, 4:5], cache=cache)
    timer.stop(got_step)
    prof.timer = None
    prof.detach()
    np.testing.assert_array_equal(np.array(got), np.array(want))
    np.testing.assert_array_equal(np.array(got_step), np.array(want_step))
    r = prof.result()
    assert r["moe_layers"] == moe_layers(arch)
    k = r["top_k"]
    assert np.array(r["phases"]["prefill"]["counts"]).sum(1).tolist() == [4 * k] * len(r["moe_layers"])
    assert np.array(r["phases"]["decode"]["counts"]).sum(1).tolist() == [k] * len(r["moe_layers"])
    assert timer.steps == 1 and timer.totals["experts"] > 0 and timer.totals["attention"] > 0


def test_recorded_ids_are_read_two_forwards_late(loaded):
    """No host read in the forward being recorded: a forward's ids are read on the host only
    once two later forwards have begun (or at finish)."""
    model, _ = loaded
    prof = ExpertProfiler(model)
    with prof:
        prof.begin(3)
        model(mx.array([[33, 533, 294]]))  # lazy, never evaluated here
        model(mx.array([[5]]))
        assert prof._counts is None and len(prof._forwards) == 2
        model(mx.array([[6]]))
        assert len(prof._forwards) == 2 and prof._tokens == {"prefill": 3, "decode": 0}
        prof.finish()
    assert prof._tokens == {"prefill": 3, "decode": 2}


def test_chats_and_templates(loaded):
    """JSONL chats and templated plain prompts encode as mlx_moe.generate encodes them."""
    from mlx_moe.generate import DEFAULT_CHAT_TEMPLATE, prompt_tokens

    _, tokenizer = mlx_moe.load(progress=False)
    assert profile.encode(tokenizer, "A list is", False) == prompt_tokens(tokenizer, "A list is", False)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    assert profile.encode(tokenizer, "A list is", False) == prompt_tokens(tokenizer, "A list is", False)
    assert profile.encode(tokenizer, "A list is", True) == tokenizer.encode("A list is")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A list is"}]
    assert profile.encode(tokenizer, chat, False) == prompt_tokens(tokenizer, "A list is", False, "Be brief.")
