"""``mlx_moe.bench server``: mlx_moe.server against mlx_lm.server, same folder, same prompts.

Each server runs as a fresh child process (``python -m mlx_moe.server`` / ``python -m
mlx_lm server``) on 127.0.0.1 and a free port, with the same environment. For each number of
concurrent clients (default 1, 4, 16) every client sends one streamed text completion
(greedy, --tokens new tokens) at the same moment, after one warm-up round; figures:
aggregate generated tok/s (all tokens / wall time of the round), time to first token (p50,
p95) and per-token latency (p50, p95 of each request's (end - first token) / (tokens - 1)).
Then a two-turn conversation on each: time to first token of the first and of the second
turn (the second shares the first turn's prompt and answer: a prefix cache skips them).
"""

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

from ..loading import DEFAULT_MODEL

PROMPT = "A list is"
LONG_SYSTEM = "You explain Python's documentation, briefly and exactly. " * 60


def build_parser():
    p = argparse.ArgumentParser(prog="mlx_moe.bench server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per round (default: 1,4,16)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request (default: 128)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per client count (default: 2; figures pool them)")
    p.add_argument("--impls", default="mlx_moe,mlx_lm", help="servers to run (default: mlx_moe,mlx_lm)")
    p.add_argument("--extra", default="", help="extra flags for mlx_moe.server (e.g. '--expert-budget 50%%')")
    p.add_argument("--json", help="write the figures to this file")
    return p


def float32_copy(src: Path, dst: Path) -> Path:
    """``src`` with every float tensor in float32: MLX's CPU gather_mm (mlx-lm's SwitchGLU) takes
    float32 only, so mlx_lm.server cannot run the bf16 default model on the CPU."""
    import shutil

    import mlx.core as mx

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            w = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in mx.load(str(f)).items()}
            mx.save_safetensors(str(dst / f.name), w, metadata={"format": "mlx"})
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def start(impl, model, extra=""):
    folder = str(model or DEFAULT_MODEL)
    if impl == "mlx_moe":
        cmd = [sys.executable, "-m", "mlx_moe.server", "--port", "0", "--log-level", "WARNING", "--model", folder,
               "--max-tokens", "4096", *extra.split()]
        pat = r"on http://127\.0\.0\.1:(\d+)/v1"
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", folder, "--port", str(port),
               "--log-level", "WARNING", "--max-tokens", "4096"]
        pat = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if pat:
        for line in proc.stdout:
            m = re.search(pat, line)
            if m:
                port = int(m.group(1))
                break
        else:
            raise RuntimeError(f"{impl} server did not start")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{impl} server did not answer")


def stream_request(port, path, body):
    """One streamed request: (seconds to first token, seconds to end, tokens)."""
    t0 = time.perf_counter()
    for attempt in range(50):  # a burst of connections can overflow a listen backlog: retry as clients do
        try:
            c = HTTPConnection("127.0.0.1", port, timeout=600)
            c.request("POST", path, body=json.dumps(dict(body, stream=True, stream_options={"include_usage": True})),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            break
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            time.sleep(0.05)
    else:
        raise RuntimeError("could not connect after 50 attempts")
    assert r.status == 200, r.read()[:300]
    first, chunks, usage = None, 0, None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            if line == b"data: [DONE]":
                break
            continue
        obj = json.loads(line[6:])
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices") or []:
            piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
            if piece:
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    c.close()
    n = usage["completion_tokens"] if usage else chunks
    return first or (time.perf_counter() - t0), time.perf_counter() - t0, n


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def concurrency_round(port, clients, tokens):
    results = [None] * clients
    barrier = threading.Barrier(clients)

    def one(i):
        barrier.wait()
        results[i] = stream_request(port, "/v1/completions",
                                    {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def bench_impl(impl, args, log):
    proc, port = start(impl, args.model, args.extra if impl == "mlx_moe" else "")
    out = {"concurrency": []}
    try:
        for n in args.clients:
            concurrency_round(port, n, 8)  # warm-up at this batch size (kernels compiled on first use)
            walls, res = [], []
            for _ in range(args.rounds):
                wall, r = concurrency_round(port, n, args.tokens)
                walls.append(wall)
                res += r
            toks = sum(r[2] for r in res)
            ttft = [r[0] for r in res]
            itl = [(r[1] - r[0]) / (r[2] - 1) for r in res if r[2] > 1]
            row = {"clients": n, "tok_s": toks / sum(walls), "ttft_p50_ms": 1000 * pct(ttft, 0.5),
                   "ttft_p95_ms": 1000 * pct(ttft, 0.95), "itl_p50_ms": 1000 * pct(itl, 0.5),
                   "itl_p95_ms": 1000 * pct(itl, 0.95), "tokens": toks}
            out["concurrency"].append(row)
            log(f"[{impl}] {n:>2} clients: {row['tok_s']:8.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms "
                f"p95 {row['ttft_p95_ms']:.0f} ms, per token p50 {row['itl_p50_ms']:.1f} ms p95 {row['itl_p95_ms']:.1f} ms")
        # two turns of one conversation; the same shapes once before, untimed (kernels compiled on first use)
        conversation(port, LONG_SYSTEM.replace("briefly", "clearly"))
        out["turns"] = conversation(port, LONG_SYSTEM)
        t = out["turns"]
        log(f"[{impl}] conversation ({t['prompt_tokens_turn1']}-token first prompt): TTFT turn 1 "
            f"{t['ttft_turn1_ms']:.0f} ms, turn 2 {t['ttft_turn2_ms']:.0f} ms")
    finally:
        proc.terminate()
        try:
            out["exit_code"] = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def conversation(port, system):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What is a list?"}]
    t1 = stream_request(port, "/v1/chat/completions", {"messages": msgs, "max_tokens": 32, "temperature": 0})
    c = HTTPConnection("127.0.0.1", port, timeout=600)  # the first answer's text, for the history
    c.request("POST", "/v1/chat/completions", body=json.dumps({"messages": msgs, "max_tokens": 32, "temperature": 0}),
              headers={"Content-Type": "application/json"})
    resp = json.loads(c.getresponse().read())
    answer = resp["choices"][0]["message"]["content"]
    prompt_tokens = resp["usage"]["prompt_tokens"]
    msgs2 = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a tuple?"}]
    t2 = stream_request(port, "/v1/chat/completions", {"messages": msgs2, "max_tokens": 32, "temperature": 0})
    return {"prompt_tokens_turn1": prompt_tokens, "ttft_turn1_ms": 1000 * t1[0], "ttft_turn2_ms": 1000 * t2[0]}


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",") if x]
    from .sysinfo import machine_info

    report = {"meta": machine_info(), "settings": vars(args).copy(), "impls": {}}
    tmp = None
    if args.model is None:
        import tempfile

        import mlx.core as mx

        if not mx.metal.is_available() and not mx.cuda.is_available():
            tmp = tempfile.TemporaryDirectory()
            args.model = str(float32_copy(DEFAULT_MODEL, Path(tmp.name) / "default_model_f32"))
            print("default model in float32 (mlx_lm.server cannot run bf16 experts on the CPU)", flush=True)
    log = lambda s: print(s, flush=True)
    for impl in [x for x in args.impls.split(",") if x]:
        report["impls"][impl] = bench_impl(impl, args, log)
    ours, theirs = report["impls"].get("mlx_moe"), report["impls"].get("mlx_lm")
    print()
    print("| clients | impl | tok/s | TTFT p50 / p95 ms | per-token p50 / p95 ms |")
    print("|---|---|---|---|---|")
    for impl, r in report["impls"].items():
        for row in r["concurrency"]:
            print(f"| {row['clients']} | {impl} | {row['tok_s']:.1f} | {row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} "
                  f"| {row['itl_p50_ms']:.1f} / {row['itl_p95_ms']:.1f} |")
    if ours and theirs:
        for a, b in zip(ours["concurrency"], theirs["concurrency"]):
            print(f"{a['clients']} clients: mlx_moe / mlx_lm aggregate tok/s = {a['tok_s'] / b['tok_s']:.2f}")
    for impl, r in report["impls"].items():
        if "turns" in r:
            t = r["turns"]
            print(f"{impl}: second-turn TTFT {t['ttft_turn2_ms']:.0f} ms vs first turn {t['ttft_turn1_ms']:.0f} ms "
                  f"({t['prompt_tokens_turn1']}-token first prompt)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
