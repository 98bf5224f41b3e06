"""mlx_moe.server through the official ``openai`` client (and raw HTTP where the client hides
the wire: SSE framing, invalid JSON, body limit), against a server process on 127.0.0.1 and a
free port, started and stopped by the tests. CPU, the shipped default model."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
BODY_LIMIT = 64 * 1024
PROMPT = "A list is"
M = "default_model"


class ServerProc:
    def __init__(self, tmp_path, *extra):
        self.log = open(tmp_path / "server.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_moe.server", "--port", "0", "--log-level", "WARNING", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"server did not start: {line!r}; log: {self.logtext()}")

    def logtext(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProc(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT))
    yield s
    rc = s.stop()
    assert rc == 0, s.logtext()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


class Raw:
    """A raw HTTP exchange (http.client): status, headers, body or lines."""

    def __init__(self, server, method, path, body=None, key=KEY, timeout=30):
        host, port = server.url[len("http://"):].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=body, headers=headers)
        self.resp = self.conn.getresponse()
        self.status_code = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def json(self):
        try:
            return json.loads(self.resp.read())
        finally:
            self.conn.close()

    def iter_lines(self):
        while True:
            line = self.resp.readline()
            if not line:
                return
            yield line.decode().rstrip("\r\n")

    def close(self):
        self.resp.close()  # the response holds the socket (Connection: close responses)
        self.conn.close()


def health(server):
    return Raw(server, "GET", "/health", key=None).json()


def raw_post(server, path, body, key=KEY):
    return Raw(server, "POST", path, body, key=key)


def sse_events(lines):
    """data payloads of an SSE stream, '[DONE]' included."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:])
        else:
            assert line == "", line
    return out


# ---- the endpoints ---------------------------------------------------------------------------

def test_models_list_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["default_model"]
    assert client.models.retrieve("default_model").id == "default_model"
    assert health(server)["status"] == "ok"  # /health needs no key


def test_greedy_text_equals_mlx_moe_generate(client, capsys):
    """Text and chat completions, greedy, equal ``mlx_moe.generate`` on the same prompt and template
    (the default model has no chat template: both render mlx_lm.server's plain USER:/ASSISTANT: text)."""
    from mlx_moe.generate import main as generate_main
    from mlx_moe.server.api import convert_chat

    messages = [{"role": "system", "content": "Answer about Python."}, {"role": "user", "content": "What is a tuple?"}]
    for kind, prompt in (("text", PROMPT), ("chat", convert_chat(messages))):
        generate_main(["--prompt", prompt, "--max-tokens", "24", "--json"])
        ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        if kind == "text":
            r = client.completions.create(model="default_model", prompt=PROMPT, max_tokens=24, temperature=0)
            text, u = r.choices[0].text, r.usage
            assert r.object == "text_completion"
        else:
            r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=24, temperature=0)
            text, u = r.choices[0].message.content, r.usage
            assert r.choices[0].message.role == "assistant"
        assert text == ref["text"], kind
        assert u.prompt_tokens == len(ref["prompt_tokens"]) and u.completion_tokens == len(ref["tokens"])
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert r.choices[0].finish_reason == ("length" if len(ref["tokens"]) == 24 else "stop")


def test_streaming_matches_non_streamed(client):
    kw = dict(max_tokens=16, temperature=0)
    full = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "A dict"}], **kw)
    chunks = list(client.chat.completions.create(model=M, messages=[{"role": "user", "content": "A dict"}], stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    tfull = client.completions.create(model=M, prompt=PROMPT, **kw)
    tchunks = list(client.completions.create(model=M, prompt=PROMPT, stream=True, **kw))
    assert "".join(c.choices[0].text for c in tchunks) == tfull.choices[0].text
    assert tchunks[-1].choices[0].finish_reason == tfull.choices[0].finish_reason


def test_sse_wire_format_ends_with_done(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    r = raw_post(server, "/v1/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.iter_lines())
    r.close()
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[-1]["usage"]["completion_tokens"] == 5 and objs[-1]["choices"] == []
    assert objs[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_are_never_emitted(client):
    base = client.completions.create(model=M, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    # "dictionary containing" spans several tokens; "dictionary" is a prefix of a later word too
    for stop in ("containing", "ry cont", ["zzz", "the dictionary"]):
        first = min(base.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in base)
        r = client.completions.create(model=M, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop)
        assert r.choices[0].text == base[:first] and r.choices[0].finish_reason == "stop", stop
        s = client.completions.create(model=M, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True)
        chunks = list(s)
        assert "".join(c.choices[0].text for c in chunks) == base[:first]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model="default_model", messages=[{"role": "user", "content": "A set"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob
        assert abs(c.top_logprobs[0].logprob - c.logprob) < 1e-4  # greedy: the sampled token is the top one
    t = client.completions.create(model=M, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens).lstrip() == t.choices[0].text.lstrip()  # the detokenizer drops a leading space


def test_sampling_seed_is_per_request(client):
    kw = dict(prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95, extra_body={"top_k": 50, "min_p": 0.01})
    a = client.completions.create(model=M, seed=7, **kw).choices[0].text
    with ThreadPoolExecutor(3) as ex:  # same seed, now sharing decode steps with other requests
        futs = [ex.submit(client.completions.create, model=M, seed=s, **kw) for s in (7, 8, 7)]
        b, _, c = [f.result().choices[0].text for f in futs]
    assert a == b == c


def test_prefix_cache_second_turn(client):
    msgs = [{"role": "system", "content": "You explain Python. " * 20},
            {"role": "user", "content": "What does the for statement do?"}]
    r1 = client.chat.completions.create(model=M, messages=msgs, max_tokens=20, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens < r1.usage.prompt_tokens / 2  # a few shared by earlier tests
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And the while statement?"}]
    r2 = client.chat.completions.create(model=M, messages=msgs, max_tokens=20, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens, (cached, r1.usage, r2.usage)


def test_sixteen_concurrent_clients(server, client):
    solo = client.completions.create(model=M, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text

    def one(i):
        c = openai.OpenAI(base_url=str(client.base_url), api_key=KEY, max_retries=0, timeout=120)
        if i % 2:
            chunks = list(c.completions.create(model=M, prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
            return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
        r = c.completions.create(model=M, prompt=PROMPT + " " * (i % 3), max_tokens=20 + i, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    steps0 = health(server)["steps"]
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(16)))
    assert all(fr == "length" for _, fr in results)
    # 16 x 20+ tokens in far fewer steps: the requests shared decode steps
    assert health(server)["steps"] - steps0 < 16 * 20 / 3
    for i, (text, _) in enumerate(results):
        if i % 2:  # same prompt as solo: batching does not change greedy tokens
            assert text == solo, (i, text, solo)


def test_disconnect_mid_stream_frees_the_slot(server, client):
    mem0 = health(server)["active_memory_bytes"]
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": True})
    r = raw_post(server, "/v1/completions", body)
    it = r.iter_lines()
    got = [next(it) for _ in range(6)]
    assert any(g.startswith("data: ") for g in got)
    assert health(server)["active"] == 1
    r.close()
    t0 = time.time()
    while health(server)["active"] and time.time() - t0 < 3:
        time.sleep(0.05)
    assert health(server)["active"] == 0, "the disconnected request still holds its slot"
    assert time.time() - t0 < 2  # 2000 tokens would take several seconds
    assert health(server)["active_memory_bytes"] <= mem0 + (256 << 10), "the request's KV cache was kept"
    r = client.completions.create(model=M, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, param", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(max_tokens="ten"), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=2), "n"),
    (dict(model="gpt-4o"), "model"),
    (dict(stop=[1, 2]), "stop"),
    (dict(messages="hi"), "messages"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages"),
])
def test_bad_chat_input_is_400(client, kw, param):
    args = dict(model="default_model", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    args.update(kw)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default_model", prompt=[5] * 2100, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default_model", prompt=["one", "two"], max_tokens=2)


def test_invalid_json_body_limit_and_routes(server):
    for body in (b"{not json", b"[1, 2]", "{\"prompt\": \"\xff\"".encode("latin-1")):
        r = raw_post(server, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", body
    big = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)}).encode()
    r = raw_post(server, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert raw_post(server, "/v1/nope", b"{}").status_code == 404
    assert Raw(server, "GET", "/v1/nope").status_code == 404


def test_api_key(server, client):
    for key in ("wrong", None):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        if key is None:  # no Authorization header at all
            r = raw_post(server, "/v1/completions", json.dumps({"prompt": PROMPT}).encode(), key=None)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert Raw(server, "GET", "/v1/models", key=None).status_code == 401
            continue
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="default_model", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert client.completions.create(model=M, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


# ---- shutdown --------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_cleanly_and_exits_0(tmp_path, sig):
    s = ServerProc(tmp_path)
    try:
        assert "127.0.0.1" in s.url  # the default bind
        events, done = [], threading.Event()

        def reader():
            body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": True})
            r = raw_post(s, "/v1/completions", body, key=None)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        done.set()
            r.close()
            done.set()

        t = threading.Thread(target=reader)
        t.start()
        assert done.wait(30)
        s.proc.send_signal(sig)
        t.join(30)
        rc = s.proc.wait(20)
    finally:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)
    assert rc == 0, s.logtext()
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert len(events) < 2000


# ---- the scheduler in process: every architecture, experts beyond memory ----------------------

def run_jobs(model, tokenizer, jobs, max_batch=8):
    from mlx_moe.server.scheduler import Scheduler

    sch = Scheduler(model, tokenizer, max_batch=max_batch)
    for j in jobs:
        sch.submit(j)
    sch.run(until_idle=True)  # on this (the main) thread, as the server runs it
    out = []
    for j in jobs:
        evs = list(j.events.queue)
        assert evs[-1][0] == "end", evs[-1]
        out.append(("".join(e[1] for e in evs if e[0] == "delta"), evs[-1][1], j.completion_tokens))
    return out


def solo(model, tokenizer, ids, n):
    from mlx_lm.generate import stream_generate

    rs = list(stream_generate(model, tokenizer, ids, max_tokens=n))
    return "".join(r.text for r in rs), rs[-1].finish_reason, len(rs)


PROMPTS = [[5, 9, 17, 33, 2 + 40], [7, 8], list(range(10, 40)), [100, 3, 4, 5, 6, 7]]


def check_batched_equals_solo(model, tokenizer, max_batch=8):
    from mlx_moe.server.scheduler import Job, make_sampler

    vocab = tokenizer.vocab_size
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    jobs = [Job(p, 6) for p in prompts] + [Job(prompts[0], 6, sampler=make_sampler(1.0, seed=3))]
    got = run_jobs(model, tokenizer, jobs, max_batch)
    for p, g in zip(prompts, got):
        assert g == solo(model, tokenizer, p, 6), (p, g)
    assert got[-1][2] >= 1


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_batching_every_architecture(tmp_path, arch):
    """Greedy requests decoded together (different lengths, joining and leaving) give the tokens each
    gives alone, for each architecture (tiny random checkpoints with a tokenizer)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from fixtures.writers import write_checkpoint

    import mlx_moe

    model, tokenizer = mlx_moe.load(str(write_checkpoint(tmp_path / arch, arch)), progress=False)
    check_batched_equals_solo(model, tokenizer, max_batch=3)  # 5 jobs, 3 slots: some wait for a slot


def test_batching_with_expert_budget(tmp_path):
    """--expert-budget: the scheduler on a model streaming its experts from disk."""
    sys.path.insert(0, os.path.dirname(__file__))
    from fixtures.writers import write_checkpoint

    import mlx_moe
    from mlx_moe import offload
    from mlx_moe.convert import convert

    hf = write_checkpoint(tmp_path / "hf", "qwen3_moe")
    off = convert(hf, tmp_path / "off", quantize={"bits": 4, "group_size": 64}, progress=False,
                  expert_file_layout=True)
    model, tokenizer = mlx_moe.load(str(off), progress=False, expert_budget_gb="50%")
    assert offload.stats(model), "not offloaded"
    check_batched_equals_solo(model, tokenizer)
    offload.close(model)
