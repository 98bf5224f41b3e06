"""Experts that arrive quantized are kept under ``-q`` (issue 11, part 4).

gpt-oss's MXFP4 experts stay MXFP4 and the folder then equals ``mlx_lm.convert
-q`` on the same checkpoint (config, every weight, greedy tokens); an mlx-lm
folder that is already quantized keeps what is quantized and says so;
``--requantize`` asks for the old behaviour explicitly.
"""

import contextlib
import io
import json
import re
import shlex

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import dequantize_model, quantize_model
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_moe import cli, load_model
from mlx_moe.convert import main

PROMPT = [3, 17, 42, 5, 88, 1, 60]


def run_cli(argv):
    """``mlx_moe.convert`` as a user runs it: (exit code, stderr lines but the progress bar)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.run("mlx_moe.convert", main, argv)
    return rc, [l for l in err.getvalue().replace("\r", "\n").splitlines() if l and not l.startswith("Loading")]


def with_modes(entry: dict) -> dict:
    """mlx-lm records a predicate's ``{"group_size": 64, "bits": 8}`` without its
    mode, which ``to_quantized`` then takes as affine; we write it out."""
    return {k: {"mode": "affine", **v} if isinstance(v, dict) else v for k, v in entry.items()}


def weights(folder):
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_same_weights(ours, theirs):
    a, b = weights(ours), weights(theirs)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


def greedy(model, n=12):
    tokens = list(PROMPT)
    for _ in range(n):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1]).item()))
    return tokens[len(PROMPT):]


@pytest.fixture(scope="module")
def mlx_lm_q(tmp_path_factory):
    """``mlx_lm.convert -q`` of a source folder, once per source."""
    done = {}

    def make(src):
        if src not in done:
            out = tmp_path_factory.mktemp("mlx_lm") / "out"
            with contextlib.redirect_stdout(io.StringIO()):
                mlx_lm_convert(str(src), str(out), quantize=True)
            done[src] = out
        return done[src]

    return make


# ----------------------------------------------------------------- gpt-oss MXFP4


def test_mxfp4_experts_kept_under_q_equal_mlx_lm_convert(checkpoint, mlx_lm_q, tmp_path):
    src = checkpoint("gpt_oss", "mxfp4")
    dst = tmp_path / "out"
    rc, err = run_cli(["--hf-path", str(src), "--mlx-path", str(dst), "-q"])
    assert rc == 0, err
    ref = mlx_lm_q(src)
    ours_q = json.loads((dst / "config.json").read_text())["quantization"]
    theirs_q = json.loads((ref / "config.json").read_text())["quantization"]
    assert ours_q["mode"] == "mxfp4" and with_modes(ours_q) == with_modes(theirs_q)
    assert_same_weights(dst, ref)
    ours, _ = mlx_lm_load_model(dst)
    theirs, _ = mlx_lm_load_model(ref)
    assert greedy(ours) == greedy(theirs)
    again, _ = load_model(dst)  # and our loader reads it back to the same tokens
    assert greedy(again) == greedy(theirs)
    assert len(err) == 1 and "routed experts are already MXFP4 and are kept" in err[0] and "--requantize" in err[0]


def test_requantize_re_quantizes_mxfp4_experts(checkpoint, tmp_path):
    src = checkpoint("gpt_oss", "mxfp4")
    dst = tmp_path / "out"
    rc, err = run_cli(["--hf-path", str(src), "--mlx-path", str(dst), "-q", "--requantize"])
    assert rc == 0 and err == []
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["mode"] == "affine" and not any(isinstance(v, dict) and v.get("mode") == "mxfp4" for v in q.values())
    # mlx-lm's way to the same: dequantize its mxfp4 load, then quantize.
    model, config = mlx_lm_load_model(src)
    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = quantize_model(dequantize_model(model), config, 64, 4)
    theirs = dict(tree_flatten(model.parameters()))
    ours = weights(dst)
    for k in ("model.layers.0.mlp.experts.gate_proj.weight", "model.layers.1.mlp.experts.down_proj.scales"):
        assert mx.array_equal(ours[k], theirs[k]).item(), k


# ----------------------------------------------------------------- mlx-lm folders


def test_quantized_mlx_folder_with_q_keeps_what_is_quantized(checkpoint, mlx_lm_q, tmp_path):
    src = checkpoint("qwen3_moe", "mlx")  # affine 4-bit, group size 32
    dst = tmp_path / "out"
    rc, err = run_cli(["--hf-path", str(src), "--mlx-path", str(dst), "-q"])
    assert rc == 0, err
    assert len(err) == 1
    assert re.search(r"is already quantized \(affine 4-bit, group size 32\): its \d+ quantized layers are kept", err[0])
    assert_same_weights(dst, src)  # not a bit changed
    ref = mlx_lm_q(src)
    ours_q = json.loads((dst / "config.json").read_text())["quantization"]
    theirs_q = json.loads((ref / "config.json").read_text())["quantization"]
    assert with_modes(ours_q) == with_modes(theirs_q)
    assert_same_weights(dst, ref)


def test_requantize_of_an_mlx_folder_is_refused_in_one_line(checkpoint, tmp_path):
    src = checkpoint("qwen3_moe", "mlx")
    rc, err = run_cli(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "-q", "--requantize"])
    assert rc == 2 and len(err) == 1
    assert "already quantized (affine 4-bit, group size 32)" in err[0] and "original weights" in err[0]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- the hint


@pytest.mark.parametrize("layout", ["mlx", None], ids=["mlx-quantized", "float"])
def test_expert_budget_hint_suggests_a_command_that_works(checkpoint, tmp_path, layout):
    src = checkpoint("qwen3_moe", layout)
    with pytest.raises(ValueError, match="expert-file layout; write one with") as e:
        load_model(src, expert_budget_gb="50%")
    command = shlex.split(re.search(r"`(.*)`", str(e.value)).group(1))
    assert command[:3] == ["python", "-m", "mlx_moe.convert"]
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command[3:]]
    assert ("-q" in args) == (layout is None)
    rc, err = run_cli(args)
    assert rc == 0, err
    model, _ = load_model(tmp_path / "out", expert_budget_gb="50%")
    resident, _ = load_model(tmp_path / "out")
    assert greedy(model, 4) == greedy(resident, 4)
