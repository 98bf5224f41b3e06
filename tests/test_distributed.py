"""Expert parallel across processes (``mlx_moe.distributed``) on this machine's CPU:
2 and 4 ranks on 127.0.0.1 with MLX's ring backend, every run bounded in time.

Greedy tokens of each rank equal the single-process tokens (the default model,
in bf16 and quantized while streaming, and tiny checkpoints of other
architectures in float32 and mlx-lm 4-bit); each rank holds 1/N of the routed
expert bytes and reads only its own experts; ``mlx.launch ... -m
mlx_moe.generate --parallel ep`` prints once; a killed or hung rank makes the
others exit non-zero with a message; ranks given different model folders refuse.

This file is also the ranks' worker: ``python test_distributed.py SPEC.json``.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = [1, 44, 73, 80, 80, 83, 4, 91, 83, 86, 80, 72]
STEPS = 12
RUN_TIMEOUT = 240  # seconds any one multi-process run may take
# An expert tensor (not a shared expert): "<container>.<e>." or a stacked one.
EXPERT_NAME = re.compile(r"(?<!shared_)(?:experts|switch_mlp)\.(?:(\d+)\.)?")


def replicated_bytes(model):
    """Bytes of the experts' down_proj bias (gpt-oss): tensor parallel keeps it whole
    on every rank (divided by N, as mlx-lm's shard() does)."""
    from mlx_moe.experts import MoEExperts

    return sum(m.down_proj["bias"].nbytes for _, m in model.named_modules()
               if isinstance(m, MoEExperts) and "bias" in m.down_proj)


def greedy(model, steps=STEPS):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=steps)]


# ---------------------------------------------------------------- the ranks' worker


def worker(spec_file):
    """Load each case with ``parallel="ep"``, decode greedily, write rank<r>.json."""
    import mlx.core as mx

    from mlx_moe.distributed import barrier, expert_bytes
    from mlx_moe.loading import load_model
    from mlx_moe.safetensors_io import Checkpoint

    spec = json.loads(Path(spec_file).read_text())
    group = mx.distributed.init(strict=True, backend="ring")
    fetched = []
    get = Checkpoint.get
    Checkpoint.get = lambda self, name: (fetched.append(name), get(self, name))[1]
    out = {}
    for case in spec["cases"]:
        fetched.clear()
        model, _ = load_model(case["folder"], quantize=case.get("quantize"), group=group,
                              parallel=case.get("parallel", "ep"))
        ranges = sorted({(m.lo, m.hi) for _, m in model.named_modules() if hasattr(m, "total_experts")})
        out[case["name"]] = {
            "tokens": greedy(model),
            "expert_bytes": expert_bytes(model),
            "replicated_bytes": replicated_bytes(model),
            "ranges": ranges,
            "fetched_experts": [n for n in fetched if EXPERT_NAME.search(n)],
        }
    barrier(group)  # no rank exits while another still decodes
    Path(spec["out"], f"rank{group.rank()}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------- launching

from mlx_moe.distributed.group import free_ports, write_local_hostfile  # noqa: E402


def start(tmp_path, commands, env=None, tag="run"):
    """One process per rank (``commands[r]``), ring over 127.0.0.1; stdout/stderr to files."""
    n = len(commands)
    hostfile = write_local_hostfile(tmp_path / f"{tag}-hosts.json", n)
    procs = []
    for r, cmd in enumerate(commands):
        e = {**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(REPO),
             **(env or {})}
        out = open(tmp_path / f"{tag}-{r}.out", "wb")
        err = open(tmp_path / f"{tag}-{r}.err", "wb")
        procs.append(subprocess.Popen(cmd, env=e, stdout=out, stderr=err, cwd=tmp_path))
    return procs


def finish(procs, timeout=RUN_TIMEOUT):
    """Wait for every rank (all killed once ``timeout`` has passed); return codes."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"distributed run did not finish in {timeout} s")
    return codes


def output(tmp_path, tag, r, which="err"):
    return (tmp_path / f"{tag}-{r}.{which}").read_text(errors="replace")


# ---------------------------------------------------------------- tests

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cases(checkpoint):
    from mlx_moe.loading import DEFAULT_MODEL

    return [
        {"name": "default", "folder": str(DEFAULT_MODEL)},
        {"name": "default-q4", "folder": str(DEFAULT_MODEL), "quantize": {"bits": 4, "group_size": 32}},
        {"name": "mixtral-per_expert", "folder": str(checkpoint("mixtral", "per_expert"))},
        {"name": "gpt_oss-stacked", "folder": str(checkpoint("gpt_oss", "gpt_oss"))},
        {"name": "deepseek_v3-stacked", "folder": str(checkpoint("deepseek_v3", "stacked"))},
        {"name": "qwen3_moe-mlx4", "folder": str(checkpoint("qwen3_moe", "mlx"))},
    ]


@pytest.fixture(scope="module")
def single(cases):
    """Single-process tokens and expert bytes of each case."""
    from mlx_moe.distributed import expert_bytes
    from mlx_moe.loading import load_model

    out = {}
    for c in cases:
        model, _ = load_model(c["folder"], quantize=c.get("quantize"))
        out[c["name"]] = {"tokens": greedy(model), "expert_bytes": expert_bytes(model),
                          "replicated_bytes": replicated_bytes(model)}
    return out


TP_CASES = ("default", "gpt_oss-stacked", "deepseek_v3-stacked")  # mlx-lm has shard() for these


@pytest.mark.parametrize("n, parallel", [(2, "ep"), (4, "ep"), (2, "tp"), (2, "ep+tp")])
def test_parallel_tokens_and_bytes_match_single_process(tmp_path, cases, single, n, parallel):
    if parallel != "ep":
        cases = [{**c, "parallel": parallel} for c in cases if c["name"] in TP_CASES]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(tmp_path)}))
    procs = start(tmp_path, [[sys.executable, __file__, str(spec)]] * n)
    codes = finish(procs)
    assert codes == [0] * n, [output(tmp_path, "run", r) for r in range(n)]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    for c in cases:
        name, ref = c["name"], single[c["name"]]
        for r, res in enumerate(ranks):
            got = res[name]
            assert got["tokens"] == ref["tokens"], (name, r)
            # 1/N of the routed expert bytes on each rank (E divisible by N here)
            if parallel == "tp":  # experts split along I (down_proj's bias kept whole); all is read
                split = got["expert_bytes"] - got["replicated_bytes"]
                assert split * n == ref["expert_bytes"] - ref["replicated_bytes"], (name, r)
                assert got["ranges"] == []
                continue
            assert got["expert_bytes"] * n == ref["expert_bytes"], (name, r, got["expert_bytes"], ref["expert_bytes"])
            (lo, hi), = got["ranges"]
            # Only this rank's experts were fetched: per-expert tensors in [lo, hi),
            # stacked ones by byte range (never whole through the checkpoint).
            for t in got["fetched_experts"]:
                m = EXPERT_NAME.search(t)
                assert m.group(1) is not None and lo <= int(m.group(1)) < hi, (name, r, t)


def test_mlx_launch_cli_rank0_prints(tmp_path):
    launch = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    if launch is None:
        pytest.skip("mlx.launch not installed")
    args = ["-m", "mlx_moe.generate", "--max-tokens", "10", "--json", "--ignore-chat-template"]
    ref = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert ref.returncode == 0, ref.stderr
    (port,) = free_ports(1)
    run = subprocess.run(
        [launch, "-n", "2", "--backend", "ring", "-p", str(port), "--", sys.executable, *args, "--parallel", "ep"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    lines = [l for l in run.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, run.stdout  # rank 0 prints, rank 1 is silent
    assert json.loads(lines[0])["tokens"] == json.loads(ref.stdout)["tokens"]


def _generate_forever():
    return [sys.executable, "-m", "mlx_moe.generate", "--parallel", "ep", "--max-tokens", "-1",
            "--ignore-chat-template"]


def _wait_for_output(tmp_path, tag, r, procs, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (tmp_path / f"{tag}-{r}.out").read_text(errors="replace").count("=" * 10) >= 1 \
                and len((tmp_path / f"{tag}-{r}.out").read_text(errors="replace")) > 40:
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    raise AssertionError(f"no generation output: {output(tmp_path, tag, r)}")


@pytest.mark.parametrize("n", [2, 4])
def test_killed_rank_makes_the_others_exit(tmp_path, n):
    procs = start(tmp_path, [_generate_forever()] * n, tag="kill")
    _wait_for_output(tmp_path, "kill", 0, procs)
    t = time.monotonic()
    victim = n // 2
    procs[victim].send_signal(signal.SIGKILL)
    try:
        codes = [p.wait(timeout=60) for r, p in enumerate(procs) if r != victim]
    finally:
        for p in procs:
            p.kill()
    assert codes == [2] * (n - 1)
    for r in range(n):
        if r != victim:
            err = output(tmp_path, "kill", r)
            assert f"rank {r}/{n}" in err and "another rank has died" in err, err
    assert time.monotonic() - t < 60


def test_hung_rank_trips_the_watchdog(tmp_path):
    procs = start(tmp_path, [_generate_forever()] * 2, env={"MLX_MOE_DIST_TIMEOUT": "5"}, tag="hang")
    _wait_for_output(tmp_path, "hang", 0, procs)
    t = time.monotonic()
    procs[1].send_signal(signal.SIGSTOP)
    try:
        code = procs[0].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert code == 1
    err = output(tmp_path, "hang", 0)
    assert "no progress for 5 s" in err, err
    assert time.monotonic() - t < 30


def test_mismatched_model_folders_are_refused(tmp_path):
    from mlx_moe.loading import DEFAULT_MODEL

    other = tmp_path / "other"
    shutil.copytree(DEFAULT_MODEL, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (other / "config.json").write_text(json.dumps(cfg))
    base = [sys.executable, "-m", "mlx_moe.generate", "--parallel", "ep", "--max-tokens", "2"]
    procs = start(tmp_path, [base + ["--model", str(DEFAULT_MODEL)], base + ["--model", str(other)]], tag="mismatch")
    codes = finish(procs, timeout=120)
    assert codes == [2, 2], [output(tmp_path, "mismatch", r) for r in range(2)]
    for r in range(2):
        err = output(tmp_path, "mismatch", r)
        assert "differs between ranks" in err and "ranks [1]" in err, err
    assert output(tmp_path, "mismatch", 1, "out") == ""  # rank 1 prints nothing on stdout


def test_tp_refused_without_mlx_lm_shard(checkpoint):
    import mlx.core as mx

    from mlx_moe.loading import load_model

    with pytest.raises(ValueError, match="no shard"):
        load_model(checkpoint("mixtral", "per_expert"), group=mx.distributed.init(), parallel="tp")


def test_bench_distributed_runs(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "mlx_moe.bench", "distributed", "--ranks", "1,2", "--tokens", "4",
                          "--prompt-tokens", "8", "--repeats", "1", "--timeout", "120", "--json", str(out)],
                         capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "not the speed-up" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["parallel"]) for r in rows] == [(1, "none"), (2, "ep")]
    one, two = rows[0]["ranks"][0], rows[1]["ranks"]
    assert all(r["expert_bytes"] * 2 == one["expert_bytes"] for r in two)


def test_expert_range():
    from mlx_moe.distributed import expert_range

    assert [expert_range(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [expert_range(10, r, 4) for r in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(ValueError, match="at least 4 experts"):
        expert_range(2, 0, 4)


if __name__ == "__main__":
    worker(sys.argv[1])
