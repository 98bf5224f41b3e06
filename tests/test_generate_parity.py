"""mlx_moe.generate's mlx-lm flags against mlx_lm.generate itself: the same command line on the
same (float32) weights gives the same tokens; bad values give one-line errors (exit 2).

Both CLIs run in-process; the tokens are read from each one's ``stream_generate`` (patched
with a recorder in both modules), so a flag that is parsed but not passed on shows up as a
different token list.
"""

import importlib
import json
import re
import shutil
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

from mlx_moe.loading import DEFAULT_MODEL

# The modules (``mlx_lm.generate`` the attribute is the function of that name).
lm_generate = importlib.import_module("mlx_lm.generate")
lm_cache_prompt = importlib.import_module("mlx_lm.cache_prompt")
moe_generate = importlib.import_module("mlx_moe.generate")
moe_cache_prompt = importlib.import_module("mlx_moe.cache_prompt")

PROMPT = "A list is"
N = 24
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if greeting %}{{ greeting }} {% endif %}{% endif %}"
)


def _folder(root, name, tokenizer_extra=None):
    path = root / name
    path.mkdir()
    (path / "model.safetensors").symlink_to(root / "weights.safetensors")
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    shutil.copy(DEFAULT_MODEL / "tokenizer.json", path / "tokenizer.json")
    tc = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tc, **(tokenizer_extra or {})}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The default model in float32 (exact comparisons on CPU): plain, with a chat template,
    and with the ChatML template that --use-default-chat-template applies."""
    root = tmp_path_factory.mktemp("f32")
    weights = mx.load(str(DEFAULT_MODEL / "model.safetensors"))
    mx.save_safetensors(str(root / "weights.safetensors"), {k: v.astype(mx.float32) for k, v in weights.items()})
    return {
        "plain": _folder(root, "plain"),
        "chat": _folder(root, "chat", {"chat_template": CHAT_TEMPLATE}),
        "chatml": _folder(root, "chatml", {"chat_template": moe_generate.DEFAULT_CHAT_TEMPLATE}),
        "root": root,
    }


class Recorder:
    """Wraps ``stream_generate`` in both modules: the tokens and the prompt of the last call."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = lm_generate.stream_generate

        def recording(model, tokenizer, prompt, **kwargs):
            call = {"prompt": [int(t) for t in (prompt.tolist() if isinstance(prompt, mx.array) else prompt)],
                    "tokens": [], "from_draft": 0, "kwargs": kwargs}
            self.calls.append(call)
            for r in original(model, tokenizer, prompt, **kwargs):
                call["tokens"].append(int(r.token))
                call["from_draft"] += bool(r.from_draft)
                yield r

        monkeypatch.setattr(lm_generate, "stream_generate", recording)
        monkeypatch.setattr(moe_generate, "stream_generate", recording)


@pytest.fixture
def rec(monkeypatch):
    return Recorder(monkeypatch)


def run_mlx_lm(rec, monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["mlx_lm.generate", *args, "--verbose", "False"])
    lm_generate.main()
    out = capsys.readouterr().out
    return rec.calls[-1], out


def run_ours(rec, capsys, args):
    moe_generate.main([*args, "--verbose", "False"])
    out = capsys.readouterr().out
    return rec.calls[-1], out


def both(rec, monkeypatch, capsys, args):
    """Same flags through both CLIs: (ours, mlx-lm), each with its stdout."""
    theirs, their_out = run_mlx_lm(rec, monkeypatch, capsys, args)
    ours, our_out = run_ours(rec, capsys, args)
    assert our_out == their_out  # --verbose False: the text only, in both
    return ours, theirs


def base_args(models, name="plain", n=N):
    return ["--model", str(models[name]), "--prompt", PROMPT, "--max-tokens", str(n)]


@pytest.fixture
def greedy(models, rec, capsys):
    ours, _ = run_ours(rec, capsys, base_args(models))
    return ours["tokens"]


# --- sampling ---------------------------------------------------------------------------------

def test_top_k_and_min_p_keep_only_the_top_token(models, rec, monkeypatch, capsys, greedy):
    # At temperature 1, top-k 1 (or min-p 1) leaves only the most likely token: greedy output.
    # Without the flag reaching the sampler, sampling at temperature 1 would wander off.
    for flags in (["--top-k", "1"], ["--min-p", "1.0"]):
        args = base_args(models) + ["--temp", "1.0", "--seed", "7"] + flags
        ours, theirs = both(rec, monkeypatch, capsys, args)
        assert ours["tokens"] == theirs["tokens"] == greedy, flags
    ours, _ = run_ours(rec, capsys, base_args(models) + ["--temp", "1.0", "--seed", "7"])
    assert ours["tokens"] != greedy  # the control: temperature 1 alone does wander


# --- chat templates ---------------------------------------------------------------------------

def test_system_prompt_and_chat_template_config(models, rec, monkeypatch, capsys):
    plain, _ = both(rec, monkeypatch, capsys, base_args(models, "chat"))
    sys_ours, sys_theirs = both(rec, monkeypatch, capsys, base_args(models, "chat") + ["--system-prompt", "Be brief."])
    cfg_ours, cfg_theirs = both(rec, monkeypatch, capsys,
                                base_args(models, "chat") + ["--chat-template-config", '{"greeting": "Sure:"}'])
    for ours, theirs in ((sys_ours, sys_theirs), (cfg_ours, cfg_theirs)):
        assert ours["prompt"] == theirs["prompt"] != plain["prompt"]
        assert ours["tokens"] == theirs["tokens"]
    assert len(sys_ours["prompt"]) > len(plain["prompt"]) and len(cfg_ours["prompt"]) > len(plain["prompt"])


def test_use_default_chat_template(models, rec, monkeypatch, capsys):
    # mlx_lm.generate 0.32.2 parses the flag and ignores it (its server applies the tokenizer's
    # default template, which transformers no longer has): ours applies ChatML to a tokenizer
    # without a template, which is what mlx-lm gives with that template in the folder.
    ours, _ = run_ours(rec, capsys, base_args(models) + ["--use-default-chat-template"])
    theirs, _ = run_mlx_lm(rec, monkeypatch, capsys, base_args(models, "chatml"))
    assert ours["prompt"] == theirs["prompt"] and ours["tokens"] == theirs["tokens"]
    plain, _ = run_ours(rec, capsys, base_args(models))
    assert plain["prompt"] != ours["prompt"]
    # A tokenizer that has a template keeps it.
    kept, _ = run_ours(rec, capsys, base_args(models, "chat") + ["--use-default-chat-template"])
    chat, _ = run_ours(rec, capsys, base_args(models, "chat"))
    assert kept["prompt"] == chat["prompt"]


def test_extra_eos_token(models, rec, monkeypatch, capsys, greedy):
    stop = greedy[5]
    cut = greedy.index(stop)
    tok = mlx_lm_load(str(models["plain"]))[1]
    for value in (str(stop), tok.convert_ids_to_tokens(stop)):
        ours, theirs = both(rec, monkeypatch, capsys, base_args(models) + ["--extra-eos-token", "2047", value])
        assert ours["tokens"] == theirs["tokens"]
        assert ours["tokens"][:-1] == greedy[:cut] and len(ours["tokens"]) == cut + 1, value


# --- KV cache ---------------------------------------------------------------------------------

def test_max_kv_size(models, rec, monkeypatch, capsys, greedy):
    ours, theirs = both(rec, monkeypatch, capsys, base_args(models) + ["--max-kv-size", "6"])
    assert ours["tokens"] == theirs["tokens"]
    assert ours["tokens"] != greedy  # a 6-token window forgets: the cache really rotates


def test_kv_bits(models, rec, monkeypatch, capsys, greedy):
    args = base_args(models) + ["--kv-bits", "2", "--kv-group-size", "32", "--quantized-kv-start", "2"]
    ours, theirs = both(rec, monkeypatch, capsys, args)
    assert ours["tokens"] == theirs["tokens"]
    assert ours["tokens"] != greedy  # 2-bit keys and values change the output
    late, _ = run_ours(rec, capsys, base_args(models) + ["--kv-bits", "2", "--kv-group-size", "32",
                                                         "--quantized-kv-start", "1000"])
    assert late["tokens"] == greedy  # quantization starts past the end: nothing changes


def cache_prompt_ours(capsys, args):
    moe_cache_prompt.main(args)
    capsys.readouterr()


def cache_prompt_mlx_lm(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["mlx_lm.cache_prompt", *args])
    lm_cache_prompt.main()
    capsys.readouterr()


@pytest.mark.parametrize("name", ["plain", "chat"])
def test_prompt_cache_file(models, rec, monkeypatch, capsys, tmp_path, name):
    model = str(models[name])
    cached = ["--model", model, "--prompt", "Lists and dictionaries"]
    ours_file, theirs_file = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    cache_prompt_ours(capsys, cached + ["--prompt-cache-file", str(ours_file)])
    cache_prompt_mlx_lm(monkeypatch, capsys, cached + ["--prompt-cache-file", str(theirs_file)])
    a, b = mx.load(str(ours_file)), mx.load(str(theirs_file))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)

    rest = ["--prompt", " are", "--max-tokens", str(N)]
    ours, theirs = both(rec, monkeypatch, capsys, rest + ["--prompt-cache-file", str(ours_file)])
    assert ours["prompt"] == theirs["prompt"] and ours["tokens"] == theirs["tokens"]
    assert ours["kwargs"]["prompt_cache"][0].offset > len(ours["prompt"])  # the prefix came from the file
    # Our file in mlx-lm and mlx-lm's in ours.
    cross, _ = run_mlx_lm(rec, monkeypatch, capsys, rest + ["--prompt-cache-file", str(theirs_file)])
    assert cross["tokens"] == ours["tokens"]
    # Without the cache the continuation is different (the model sees only " are").
    alone, _ = run_ours(rec, capsys, ["--model", model] + rest)
    assert alone["tokens"] != ours["tokens"]


def test_prompt_cache_file_quantized(models, rec, monkeypatch, capsys, tmp_path):
    f = tmp_path / "q.safetensors"
    kv = ["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"]
    cache_prompt_ours(capsys, ["--model", str(models["plain"]), "--prompt", PROMPT, "--prompt-cache-file", str(f)] + kv)
    args = ["--prompt", " a", "--max-tokens", str(N), "--prompt-cache-file", str(f), "--kv-group-size", "32"]
    ours, theirs = both(rec, monkeypatch, capsys, args)
    assert ours["tokens"] == theirs["tokens"]
    assert type(ours["kwargs"]["prompt_cache"][0]).__name__ == "QuantizedKVCache"


def test_prompt_cache_file_rotating_and_eos(models, rec, monkeypatch, capsys, tmp_path):
    f, g = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    made = ["--model", str(models["plain"]), "--prompt", "Lists and dictionaries are", "--max-kv-size", "8"]
    cache_prompt_ours(capsys, made + ["--prompt-cache-file", str(f)])
    cache_prompt_mlx_lm(monkeypatch, capsys, made + ["--prompt-cache-file", str(g)])
    rest = ["--prompt", " a list", "--max-tokens", str(N)]
    ours, theirs = both(rec, monkeypatch, capsys, rest + ["--prompt-cache-file", str(f)])
    cross, _ = run_ours(rec, capsys, rest + ["--prompt-cache-file", str(g)])
    assert ours["tokens"] == theirs["tokens"] == cross["tokens"]
    assert type(ours["kwargs"]["prompt_cache"][0]).__name__ == "RotatingKVCache"
    # --eos-token is saved with the cache and stops our generate there (mlx-lm's generate only
    # uses it for models whose config.json has no eos_token_id).
    stop = ours["tokens"][3]
    e = tmp_path / "eos.safetensors"
    cache_prompt_ours(capsys, made + ["--prompt-cache-file", str(e), "--eos-token", str(stop)])
    stopped, _ = run_ours(rec, capsys, rest + ["--prompt-cache-file", str(e)])
    assert stopped["tokens"] == ours["tokens"][: ours["tokens"].index(stop) + 1]


# --- adapters ---------------------------------------------------------------------------------

def make_adapter(models, path, keys=None, seed=0):
    """An adapter in mlx_lm.lora's format, made with mlx-lm's own LoRA layers on mlx-lm's model
    (random non-zero B, so that it changes the output)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm_load(str(models["plain"]))
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0, **({"keys": keys} if keys else {})}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(seed)
    weights = {k: (mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    path.mkdir()
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    (path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}))
    return path, weights


def test_adapter_path_all_layers(models, rec, monkeypatch, capsys, tmp_path, greedy):
    path, weights = make_adapter(models, tmp_path / "all")
    assert any(".switch_mlp." in k for k in weights) and any(".self_attn." in k for k in weights)
    args = base_args(models) + ["--adapter-path", str(path)]
    ours, theirs = both(rec, monkeypatch, capsys, args)
    assert ours["tokens"] == theirs["tokens"] != greedy
    loop, _ = run_ours(rec, capsys, args + ["--backend", "loop"])  # per-expert merged weights
    assert loop["tokens"] == ours["tokens"]
    # The fused kernels read the base weights only: experts with LoRA run on gather instead
    # (on this CPU, fused would refuse to run at all).
    moe_generate.main(args + ["--backend", "fused", "--verbose", "False"])
    assert "run on the gather backend (not fused)" in capsys.readouterr().err
    assert rec.calls[-1]["tokens"] == ours["tokens"]


def test_adapter_path_experts_only(models, rec, monkeypatch, capsys, tmp_path, greedy):
    keys = ["mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"]
    path, weights = make_adapter(models, tmp_path / "experts", keys=keys, seed=1)
    assert weights and all(".switch_mlp." in k for k in weights)
    ours, theirs = both(rec, monkeypatch, capsys, base_args(models) + ["--adapter-path", str(path)])
    assert ours["tokens"] == theirs["tokens"] != greedy


def test_adapter_trained_by_mlx_lm_lora(models, rec, monkeypatch, capsys, tmp_path, greedy):
    """The issue's oracle: a tiny adapter trained by ``mlx_lm.lora`` itself (fixed seed, a few
    iterations, every linear layer of both decoder layers: attention, router, experts)."""
    data = tmp_path / "data"
    data.mkdir()
    line = json.dumps({"text": "A list is a mutable sequence of items. Lists support indexing and slicing."})
    (data / "train.jsonl").write_text((line + "\n") * 8)
    (data / "valid.jsonl").write_text((line + "\n") * 2)
    adapter = tmp_path / "adapter"
    monkeypatch.setattr(sys, "argv", [
        "mlx_lm.lora", "--model", str(models["plain"]), "--train", "--data", str(data), "--iters", "4",
        "--batch-size", "2", "--num-layers", "2", "--adapter-path", str(adapter), "--steps-per-report", "100",
        "--val-batches", "1", "--steps-per-eval", "100", "--learning-rate", "3e-3", "--seed", "0"])
    importlib.import_module("mlx_lm.lora").main()
    capsys.readouterr()
    assert any(".switch_mlp." in k for k in mx.load(str(adapter / "adapters.safetensors")))
    ours, theirs = both(rec, monkeypatch, capsys, base_args(models) + ["--adapter-path", str(adapter)])
    assert ours["tokens"] == theirs["tokens"] != greedy


def test_adapter_on_quantized_experts(models, rec, monkeypatch, capsys, tmp_path):
    """LoRA over quantized experts (``QuantizedExpertLinear``): an mlx_lm.convert -q folder in both."""
    q = tmp_path / "q8"
    monkeypatch.setattr(sys, "argv", ["mlx_lm.convert", "--hf-path", str(models["plain"]), "--mlx-path", str(q),
                                      "-q", "--q-bits", "8", "--q-group-size", "32"])
    importlib.import_module("mlx_lm.convert").main()
    capsys.readouterr()
    path, _ = make_adapter(models, tmp_path / "adapter", seed=2)
    args = ["--model", str(q), "--prompt", PROMPT, "--max-tokens", str(N)]
    plain, _ = run_ours(rec, capsys, args)
    ours, theirs = both(rec, monkeypatch, capsys, args + ["--adapter-path", str(path)])
    assert ours["tokens"] == theirs["tokens"] != plain["tokens"]


# --- speculative decoding ---------------------------------------------------------------------

def test_draft_model(models, rec, monkeypatch, capsys, greedy):
    args = base_args(models) + ["--draft-model", str(models["plain"]), "--num-draft-tokens", "4"]
    ours, theirs = both(rec, monkeypatch, capsys, args)
    assert ours["tokens"] == theirs["tokens"] == greedy  # greedy speculation changes nothing
    assert ours["kwargs"]["draft_model"] is not None and ours["kwargs"]["num_draft_tokens"] == 4
    assert ours["from_draft"] == theirs["from_draft"] > N // 2  # a model agrees with itself


@pytest.fixture(scope="module")
def dense_draft(models):
    """A tiny dense Llama (random weights) on the default model's tokenizer: a draft model that
    only mlx-lm can load."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_model

    config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
              "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 2048,
              "tie_word_embeddings": False, "rope_theta": 10000.0}
    mx.random.seed(3)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    path = models["root"] / "dense"
    path.mkdir()
    save_model(path, model)
    (path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models["plain"] / f, path / f)
    return path


def test_draft_model_dense_from_mlx_lm(models, dense_draft, rec, monkeypatch, capsys, greedy):
    """Our MoE as target, an mlx-lm (dense) model as draft: greedy tokens unchanged."""
    args = base_args(models) + ["--draft-model", str(dense_draft), "--num-draft-tokens", "2"]
    ours, theirs = both(rec, monkeypatch, capsys, args)
    assert ours["tokens"] == theirs["tokens"] == greedy
    assert ours["from_draft"] == theirs["from_draft"]
    assert type(ours["kwargs"]["draft_model"]).__module__ == "mlx_lm.models.llama"


def test_our_model_as_draft_for_mlx_lm(models, greedy):
    """Our model drafting for mlx-lm's (through mlx-lm's own speculative_generate_step)."""
    import mlx_moe

    target, _ = mlx_lm_load(str(models["plain"]))
    draft, tok = mlx_moe.load(models["plain"], progress=False)
    out = list(lm_generate.speculative_generate_step(mx.array(tok.encode(PROMPT)), target, draft,
                                                      num_draft_tokens=3, max_tokens=N))
    assert [int(t) for t, _, _ in out] == greedy[:N]
    assert sum(d for _, _, d in out) > N // 2


# --- --verbose --------------------------------------------------------------------------------

def test_verbose_values(models, capsys):
    args = base_args(models, n=4)
    assert moe_generate.normalize_verbose(["--verbose", "F"]) == ["--verbose=False"]
    assert moe_generate.normalize_verbose(["--verbose", "True"]) == ["--verbose"]
    with pytest.raises(SystemExit) as e:
        moe_generate.cli(args + ["--verbose", "False"])
    assert e.value.code == 0
    quiet = capsys.readouterr().out
    assert "=====" not in quiet and "Generation:" not in quiet and quiet.strip()
    for v in ([], ["--verbose"], ["--verbose", "T"]):
        with pytest.raises(SystemExit):
            moe_generate.cli(args + v)
        out = capsys.readouterr().out
        assert out.startswith("=" * 10) and "Generation: 4 tokens" in out and quiet.strip() in out
    # A user error: a traceback with --verbose / --verbose T, none with --verbose False.
    for v, traceback in ((["--verbose"], True), (["--verbose", "T"], True), (["--verbose", "False"], False), ([], False)):
        with pytest.raises(SystemExit) as e:
            moe_generate.cli(["--model", str(models["root"] / "nope")] + v)
        err = capsys.readouterr().err
        assert e.value.code == 2 and ("Traceback" in err) == traceback, v


# --- bad values -------------------------------------------------------------------------------

BAD = {
    "top-k-negative": (["--top-k", "-1"], r"argument --top-k: must be a whole number >= 0, got -1"),
    "top-k-text": (["--top-k", "x"], r"argument --top-k: must be a whole number >= 0, got 'x'"),
    "min-p-above-1": (["--min-p", "1.5"], r"argument --min-p: must be a number in \[0, 1\], got 1.5"),
    "min-tokens": (["--min-tokens-to-keep", "0"], r"argument --min-tokens-to-keep: must be a whole number >= 1"),
    "max-kv-size-zero": (["--max-kv-size", "0"], r"argument --max-kv-size: must be a whole number >= 1, got 0"),
    "kv-bits": (["--kv-bits", "7"], r"argument --kv-bits: must be one of 2, 3, 4, 5, 6, 8, got 7"),
    "kv-group-size": (["--kv-group-size", "48"], r"argument --kv-group-size: must be one of 32, 64, 128, got 48"),
    "quantized-kv-start": (["--quantized-kv-start", "-1"], r"argument --quantized-kv-start: must be a whole number >= 0"),
    "kv-group-size-head-dim": (["--kv-bits", "4", "--kv-group-size", "64"],
                               r"argument --kv-group-size: 64 does not divide the model's head dimension 32"),
    "kv-bits-rotating": (["--kv-bits", "4", "--max-kv-size", "64"], r"argument --kv-bits: a rotating cache"),
    "num-draft-tokens": (["--num-draft-tokens", "0"], r"argument --num-draft-tokens: must be a whole number >= 1"),
    "draft-rotating": (["--draft-model", "x", "--max-kv-size", "64"], r"argument --max-kv-size: speculative decoding"),
    "draft-cache": (["--draft-model", "x", "--prompt-cache-file", "c.safetensors"],
                    r"argument --prompt-cache-file: cannot be combined with --draft-model"),
    "cache-and-max-kv": (["--prompt-cache-file", "c.safetensors", "--max-kv-size", "64"],
                         r"argument --max-kv-size: the cache's size is set when it is made"),
    "chat-template-config-json": (["--chat-template-config", "{bad"], r"argument --chat-template-config: must be a JSON object, got invalid JSON"),
    "chat-template-config-list": (["--chat-template-config", "[1]"], r"argument --chat-template-config: must be a JSON object, got list"),
    "extra-eos-none": (["--extra-eos-token"], r"argument --extra-eos-token: expected at least one argument"),
    "extra-eos-unknown": (["--extra-eos-token", "<no such token>"], r"argument --extra-eos-token: '<no such token>' is not a token"),
    "verbose-value": (["--verbose", "maybe"], r"argument --verbose: must be True, T, False or F \(or no value\), got 'maybe'"),
    "prompt-cache-missing": (["--prompt-cache-file", "{tmp}/none.safetensors"], r"error: --prompt-cache-file .*none.safetensors: no such file$"),
    "prompt-cache-garbage": (["--prompt-cache-file", "{tmp}/garbage.safetensors"], r"error: .*garbage.safetensors"),
    "adapter-missing": (["--adapter-path", "{tmp}/none"], r"error: no such adapter folder: .*none$"),
    "adapter-no-config": (["--adapter-path", "{tmp}"], r"error: .*: no adapter_config.json"),
    "adapter-bad-weights": (["--adapter-path", "{tmp}/badadapter"], r"error: .*adapters.safetensors does not fit the model: .*nope"),
    "draft-missing": (["--draft-model", "{tmp}/none"], r"error: no such folder: .*none$"),
}

BAD_CACHE_PROMPT = {
    "no-file": (["--prompt", "x"], r"the following arguments are required: --prompt-cache-file"),
    "suffix": (["--prompt", "x", "--prompt-cache-file", "{tmp}/c.bin"], r"argument --prompt-cache-file: must end in .safetensors"),
    "folder": (["--prompt", "x", "--prompt-cache-file", "{tmp}/no/c.safetensors"], r"error: --prompt-cache-file .*: no such folder"),
    "kv-bits": (["--prompt", "x", "--prompt-cache-file", "{tmp}/c.safetensors", "--kv-bits", "1"], r"argument --kv-bits: must be one of"),
    "eos": (["--prompt", "x", "--prompt-cache-file", "{tmp}/c.safetensors", "--eos-token", "<nope>"],
            r"argument --eos-token: '<nope>' is not a token"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp / "badadapter").mkdir()
    (tmp / "badadapter" / "adapter_config.json").write_text(json.dumps(
        {"num_layers": 2, "lora_parameters": {"rank": 4, "scale": 1.0, "dropout": 0.0}}))
    mx.save_safetensors(str(tmp / "badadapter" / "adapters.safetensors"), {"nope.lora_a": mx.zeros((2, 2))})
    return tmp


def check_error(cli, argv, pattern, capsys):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert re.search(pattern, err[-1]), err
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(("mlx_moe.generate: error: ", "mlx_moe.cache_prompt: error: "))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_values(name, bad_files, capsys):
    argv, pattern = BAD[name]
    check_error(moe_generate.cli, ["--max-tokens", "2"] + [a.replace("{tmp}", str(bad_files)) for a in argv],
                pattern, capsys)


@pytest.mark.parametrize("name", sorted(BAD_CACHE_PROMPT))
def test_cache_prompt_bad_values(name, bad_files, capsys):
    argv, pattern = BAD_CACHE_PROMPT[name]
    check_error(moe_cache_prompt.cli, [a.replace("{tmp}", str(bad_files)) for a in argv], pattern, capsys)
