"""Every user error of the command lines is one line ``mlx_moe.X: error: ...`` and
exit 2 (traceback only with --verbose / MLX_MOE_DEBUG=1); Ctrl-C and SIGTERM exit
130 with one line; flag values, configs, prompts, tokenizers and the Hub are checked.

The subprocess cases run concurrently (one pool, started once) to keep the module
near 30 s on 2 cores; pure argparse checks run in-process through the same entry
point the console scripts call (``generate.cli``, ``convert.cli``, ``bench.cli.main``).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_moe.loading import DEFAULT_MODEL

BASE_CONFIG = json.loads((DEFAULT_MODEL / "config.json").read_text())
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
PROXY_LIMIT_S = 30


def make_folder(path: Path, config=None, raw=None, tokenizer=True) -> Path:
    """The default model's weights (linked) under another config / without tokenizer."""
    path.mkdir(parents=True)
    (path / "model.safetensors").symlink_to(DEFAULT_MODEL / "model.safetensors")
    if tokenizer:
        for f in TOKENIZER:
            shutil.copy(DEFAULT_MODEL / f, path / f)
    (path / "config.json").write_text(raw if raw is not None else json.dumps({**BASE_CONFIG, **(config or {})}))
    return path


class SilentProxy:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


def base_env(tmp):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLX_MOE_DEBUG", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_PROXY", "no_proxy")
           and not k.lower().endswith("_proxy")}
    env["HF_HOME"] = str(tmp / "hf-home")  # an empty Hub cache
    return env


# name -> (command, args, stdin, extra env, expected rc, pattern of the last stderr line)
G, C, B = "mlx_moe.generate", "mlx_moe.convert", "mlx_moe.bench"
CASES = {
    "temp-negative": (G, ["--temp", "-1"], None, {}, 2, r"argument --temp: must be a number >= 0, got -1"),
    "budget-negative-share": (G, ["--expert-budget", "-5%"], None, {}, 2,
                              r"argument --expert-budget: expert budget must be a positive finite share, got '-5%'"),
    "config-top-k-above-experts": (G, ["--model", "{tmp}/topk9"], None, {}, 2,
                                   r"topk9/config\.json: num_experts_per_tok .* from 1 to num_experts = 8, got 9$"),
    "no-tokenizer": (G, ["--model", "{tmp}/notok"], None, {}, 2,
                     r"notok: no tokenizer files \(none of tokenizer\.json, tokenizer\.model"),
    "empty-stdin": (G, ["--prompt", "-"], "", {}, 2, r"error: the prompt is empty \(stdin gave no text\)$"),
    "missing-dot-path": (G, ["--model", "./nope"], None, {}, 2, r"error: no such folder: \./nope$"),
    "missing-parent-exists": (G, ["--model", "org/model"], None, {}, 2,
                              r"no such folder: org/model \('org' exists here, so this is read as a path"),
    "hub-offline": (G, ["--model", "someorg/somerepo"], None, {"HF_HUB_OFFLINE": "1"}, 2,
                    r"HF_HUB_OFFLINE is set: the Hugging Face repo 'someorg/somerepo' is not in the local cache$"),
    "hub-silent-proxy": (G, ["--model", "someorg/somerepo"], None, {"PROXY": "1", "MLX_MOE_HUB_TIMEOUT": "5"}, 2,
                         r"could not reach the Hugging Face Hub for 'someorg/somerepo': no answer within \d+ s"),
    "verbose-traceback": (G, ["--model", "{tmp}/topk0", "--verbose"], None, {}, 2, r"got 0$"),
    "debug-env-traceback": (G, ["--model", "{tmp}/topk0"], None, {"MLX_MOE_DEBUG": "1"}, 2, r"got 0$"),
    "convert-missing-source": (C, ["--hf-path", "{tmp}/nope", "--mlx-path", "{tmp}/out"], None, {}, 2,
                               r"^mlx_moe\.convert: error: no such folder: .*/nope$"),
    "bench-missing-config": (B, ["--e2e", "--config", "{tmp}/nope.json"], None, {}, 2,
                             r"^mlx_moe\.bench: error: --config: Unknown config '.*nope\.json'"),
    # warnings, not errors
    "non-utf8-stdin": (G, ["--prompt", "-", "--max-tokens", "2"], b"\xff\xfeA list is", {}, 0,
                       r"Peak memory|Generation"),
    "prompt-beyond-context": (G, ["--model", "{tmp}/shortctx", "--max-tokens", "2", "--prompt",
                                  "A list is a list is a list is a list"], None, {}, 0, r"."),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    make_folder(tmp / "topk0", {"num_experts_per_tok": 0})
    make_folder(tmp / "topk9", {"num_experts_per_tok": 9})
    make_folder(tmp / "badjson", raw='{"model_type": "qwen3_moe",\n "num_experts": 8,,}')
    make_folder(tmp / "notok", tokenizer=False)
    make_folder(tmp / "shortctx", {"max_position_embeddings": 8})
    (tmp / "cwd" / "org").mkdir(parents=True)
    return tmp


@pytest.fixture(scope="module")
def results(folders):
    """Every case of CASES, run concurrently; name -> (rc, stdout, stderr, seconds)."""
    proxy = SilentProxy()
    env0 = base_env(folders)

    def one(name):
        module, args, stdin, extra, _, _ = CASES[name]
        env = {**env0, **extra}
        if env.pop("PROXY", None):
            url = f"http://127.0.0.1:{proxy.port}"
            env.update(HTTPS_PROXY=url, HTTP_PROXY=url, https_proxy=url, http_proxy=url, ALL_PROXY=url)
        args = [a.replace("{tmp}", str(folders)) for a in args]
        data = stdin.encode() if isinstance(stdin, str) else stdin
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", module, *args], input=data, capture_output=True,
                               env=env, cwd=folders / "cwd", timeout=90)
        except subprocess.TimeoutExpired as e:  # reported by the case's test
            return None, (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace") + \
                "\n(timed out)", time.perf_counter() - t
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), time.perf_counter() - t

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            # the slow Hub case first: it mostly waits
            names = sorted(CASES, key=lambda n: n != "hub-silent-proxy")
            futures = {n: pool.submit(one, n) for n in names}
            return {n: f.result() for n, f in futures.items()}
    finally:
        proxy.close()


def error_lines(stderr):
    return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[4] == 2])
def test_user_error_is_one_line_exit_2(results, name):
    module, _, _, extra, rc, pattern = CASES[name]
    got_rc, out, err, _ = results[name]
    assert got_rc == rc, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"{module}: error: "), err[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    assert len(error_lines(err)) == 1
    verbose = "--verbose" in CASES[name][1] or extra.get("MLX_MOE_DEBUG") == "1"
    assert ("Traceback (most recent call last)" in err) == verbose, err[-3000:]
    if not verbose:  # the message, and argparse's usage lines at most
        assert all(line.startswith(("usage:", " ", f"{module}: error: ")) for line in lines), err


def test_silent_proxy_fails_within_30_s(results):
    """The wait is wall-clock bounded (mlx_moe.hub): 5 s here to keep the test short
    on a loaded machine, 15 s by default; the rest is start-up."""
    from mlx_moe import hub

    assert hub.DEFAULT_TIMEOUT_S <= 20
    assert results["hub-silent-proxy"][3] < PROXY_LIMIT_S


def test_non_utf8_stdin_is_decoded_with_replacement(results):
    rc, out, err, _ = results["non-utf8-stdin"]
    assert rc == 0, err
    assert "mlx_moe.generate: warning: stdin is not valid UTF-8 (byte 0); invalid bytes were replaced by U+FFFD" in err
    assert "Generation: 2 tokens" in out


def test_prompt_longer_than_context_warns(results):
    rc, out, err, _ = results["prompt-beyond-context"]
    assert rc == 0, err
    assert re.search(r"warning: the prompt has 11 tokens, more than the model's max_position_embeddings = 8", err), err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_with_one_line(sig):
    """--max-tokens -1 runs without a limit (as mlx-lm) until interrupted."""
    p = subprocess.Popen([sys.executable, "-m", "mlx_moe.generate", "--max-tokens", "-1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "=" * 10  # generating
        p.stdout.read(20)  # a few tokens in
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "mlx_moe.generate: interrupted"
    assert "Traceback" not in err


# ------------------------------------------------------------- in-process


def run_entry(capsys, entry, argv):
    with pytest.raises(SystemExit) as e:
        entry(argv)
    return e.value.code, capsys.readouterr().err


def generate_cli():
    from mlx_moe import generate

    return generate.cli


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "2"], "argument --top-p: must be a number in (0, 1], got 2"),
    (["--top-p", "-1"], "argument --top-p: must be a number in (0, 1], got -1"),
    (["--top-p", "0"], "argument --top-p: must be a number in (0, 1], got 0"),
    (["--temp", "nan"], "argument --temp: must be a number >= 0, got nan"),
    (["--max-tokens", "-5"], "argument --max-tokens/-m: must be a whole number >= 1, or -1 for no limit, got -5"),
    (["--max-tokens", "0"], "argument --max-tokens/-m: must be a whole number >= 1, or -1 for no limit, got 0"),
    (["--seed", "-1"], "argument --seed: must be a whole number >= 0, got -1"),
    (["--expert-budget", "abc"], "argument --expert-budget: expert budget 'abc' is not a number of GB"),
    (["--expert-budget", "nan"], "argument --expert-budget: expert budget must be a positive finite number of GB, got 'nan'"),
    (["--expert-budget", "inf"], "argument --expert-budget: expert budget must be a positive finite number of GB, got 'inf'"),
    (["--expert-budget", "0"], "argument --expert-budget: expert budget must be a positive finite number of GB, got '0'"),
    (["-q", "--q-bits", "0"], "argument --q-bits: must be a whole number >= 1, got 0"),
    (["-q", "--q-group-size", "0"], "argument --q-group-size: must be a whole number >= 1, got 0"),
    (["-q", "--q-group-size", "48"], "argument --q-group-size: Unsupported group_size=48"),
    (["--backend", "bogus"], "argument --backend: unknown MoE backend 'bogus'; available: auto, "),
])
def test_generate_flag_values(capsys, argv, message):
    code, err = run_entry(capsys, generate_cli(), argv)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"mlx_moe.generate: error: {message}"), err


@pytest.mark.parametrize("name, config, message", [
    ("experts0", {"num_experts": 0}, "num_experts (number of experts) must be an integer >= 1, got 0"),
    ("topk-1", {"num_experts_per_tok": -1}, "num_experts_per_tok (experts per token) must be an integer from 1 to num_experts = 8, got -1"),
    ("topk2.5", {"num_experts_per_tok": 2.5}, "num_experts_per_tok (experts per token) must be an integer from 1 to num_experts = 8, got 2.5"),
    ("experts-str", {"num_experts": "8"}, "num_experts (number of experts) must be an integer >= 1, got '8'"),
])
def test_generate_config_values(capsys, tmp_path, name, config, message):
    folder = make_folder(tmp_path / name, config)
    code, err = run_entry(capsys, generate_cli(), ["--model", str(folder)])
    assert code == 2
    assert err.strip().splitlines() == [f"mlx_moe.generate: error: {folder}/config.json: {message}"]


def test_generate_empty_prompt(capsys):
    code, err = run_entry(capsys, generate_cli(), ["--prompt", ""])
    assert (code, err) == (2, "mlx_moe.generate: error: the prompt is empty (--prompt)\n")


def test_q_flags_imply_quantize():
    from mlx_moe import cli, generate

    p = generate.build_parser()
    args = p.parse_args(["--q-bits", "8"])
    assert cli.quantize_spec(p, args) == {"bits": 8, "group_size": None, "mode": "affine"}
    assert cli.quantize_spec(p, p.parse_args([])) is None
    assert "implies -q" in p.format_help()


@pytest.mark.parametrize("arch, key", [
    ("qwen3_moe", "num_experts"), ("qwen2_moe", "num_experts"), ("olmoe", "num_experts"),
    ("mixtral", "num_local_experts"), ("gpt_oss", "num_local_experts"), ("deepseek_v3", "n_routed_experts"),
])
def test_config_checks_per_architecture(arch, key):
    from fixtures.configs import tiny_config
    from mlx_moe.config_checks import ConfigError, check_config

    good = tiny_config(arch)
    check_config(good, "x/config.json")
    n = good[key]
    for bad, message in [({key: 0}, f"{key} (number of experts) must be an integer >= 1, got 0"),
                         ({"num_experts_per_tok": n + 1}, f"from 1 to {key} = {n}, got {n + 1}"),
                         ({"num_experts_per_tok": 0}, f"from 1 to {key} = {n}, got 0")]:
        with pytest.raises(ConfigError) as e:
            check_config({**good, **bad}, "x/config.json")
        assert str(e.value).startswith("x/config.json: ") and message in str(e.value)


def test_load_model_without_tokenizer_still_allowed(tmp_path):
    from mlx_moe import load, load_model

    folder = make_folder(tmp_path / "weights-only", tokenizer=False)
    model, config = load_model(folder)
    assert config["num_experts"] == 8
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load(folder)


def test_convert_q_mode_without_q_and_bad_shard(capsys, tmp_path):
    from mlx_moe import convert

    code, err = run_entry(capsys, convert.cli, ["--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(tmp_path / "o"),
                                                "--q-mode", "mxfp4", "--q-bits", "8"])
    assert code == 2 and "argument --q-bits: Unsupported bits=8 for mode 'mxfp4'" in err
    code, err = run_entry(capsys, convert.cli, ["--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(tmp_path / "o"),
                                                "--max-shard-gb", "-1"])
    assert code == 2 and "argument --max-shard-gb: must be a positive number, got -1" in err
    assert not (tmp_path / "o").exists()


def test_in_process_errors(capsys, folders, tmp_path):
    """The same one-line errors through the console scripts' entry points."""
    from mlx_moe import convert
    from mlx_moe.bench import cli as bench_cli

    cases = [
        (generate_cli(), ["--q-bits", "7"], "mlx_moe.generate: error: argument --q-bits: Unsupported bits=7 for mode 'affine'"),
        (generate_cli(), ["--model", str(folders / "badjson")],
         f"mlx_moe.generate: error: {folders}/badjson/config.json: invalid JSON at line 2 column 19: "
         "Expecting property name enclosed in double quotes"),
        (generate_cli(), ["--model", str(folders / "nope" / "model")], f"mlx_moe.generate: error: no such folder: {folders}/nope/model"),
        (generate_cli(), ["--model", "nope"],
         "mlx_moe.generate: error: no such folder: nope (a Hugging Face repo id has the form owner/name)"),
        (generate_cli(), ["--model", str(DEFAULT_MODEL / "config.json")],
         f"mlx_moe.generate: error: {DEFAULT_MODEL}/config.json: not a folder"),
        (convert.cli, ["--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(folders / "topk0")],
         f"mlx_moe.convert: error: {folders}/topk0 already exists; pass --force to replace it"),
        (convert.cli, ["--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(tmp_path / "o"), "-q", "--q-bits", "0"],
         "mlx_moe.convert: error: argument --q-bits: must be a whole number >= 1, got 0"),
        (bench_cli.main, ["--layer", "--group-size", "0"],
         "mlx_moe.bench: error: argument --group-size: must be a whole number >= 1, got 0"),
        (bench_cli.main, ["--e2e", "--config", str(folders / "topk9" / "config.json")],
         f"mlx_moe.bench: error: --config: {folders}/topk9/config.json: num_experts_per_tok"),
    ]
    for entry, argv, message in cases:
        code, err = run_entry(capsys, entry, argv)
        assert code == 2, (argv, err)
        assert err.strip().splitlines()[-1].startswith(message), (argv, err)
        assert "Traceback" not in err
