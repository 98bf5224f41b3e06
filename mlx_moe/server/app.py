"""``mlx_moe.server``: an OpenAI-compatible HTTP server with continuous batching.

The main thread loads the model and runs the scheduler (``scheduler.py``: continuous batching
on mlx-lm's ``BatchGenerator``); HTTP runs on other threads: the standard library's
``ThreadingHTTPServer`` (as mlx_lm.server), one thread per connection. A streamed response is written with blocking ``sendall`` on that thread, so a
slow reader holds back only its own thread (backpressure) while the scheduler keeps
stepping the batch; the client's disconnect is seen both when a write fails and, between
tokens (also during a long prefill, or for a non-streamed request), by polling the socket
for end-of-file. Either way the request leaves the batch at the next step.

SIGINT/SIGTERM: stop accepting, end every request in flight (its stream gets a last chunk with
``finish_reason`` "length", then ``data: [DONE]``), wait for the handlers to write it, exit 0.
"""

import argparse
import hmac
import json
import logging
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx

from .. import cli
from ..loading import DEFAULT_MODEL
from .api import APIError, ResponseBuilder, parse_json, parse_request, usage
from .scheduler import Job, Scheduler, ShuttingDown, make_sampler

log = logging.getLogger("mlx_moe.server")

POLL_S = 0.05


def build_parser():
    p = argparse.ArgumentParser(prog="mlx_moe.server", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help=f"local folder or Hugging Face repo (default: the tiny model shipped in {DEFAULT_MODEL.name}/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=cli.checked(int, lambda v: 0 <= v < 65536, "a port number (0-65535)"), default=8080, help="port (default: 8080; 0 = any free port)")
    cli.add_quantize_args(p)
    cli.add_backend_arg(p)
    p.add_argument("--expert-budget", default=None, metavar="GB|N%",
                   help="keep only this much of the routed experts in memory (docs/OFFLOAD.md)")
    p.add_argument("--max-batch", type=cli.positive_int, default=16, help="most sequences decoded together (default: 16)")
    p.add_argument("--prefill-step-size", type=cli.positive_int, default=2048, help="prompt tokens per prefill chunk (default: 2048, as mlx_lm.server)")
    p.add_argument("--max-tokens", type=cli.positive_int, default=512, help="default max_tokens of a request (default: 512)")
    p.add_argument("--temp", type=cli.checked(float, lambda v: v >= 0, "a number >= 0"), default=0.0, help="default temperature of a request (default: 0, greedy)")
    p.add_argument("--prompt-cache-size", type=cli.checked(int, lambda v: v >= 0, "a whole number >= 0"), default=16,
                   help="KV caches of finished requests kept for prefix reuse (default: 16)")
    p.add_argument("--prompt-cache-bytes", type=cli.positive_int, default=None,
                   help="also bound the kept KV caches by their bytes (default: no bound)")
    p.add_argument("--max-body-bytes", type=cli.positive_int, default=8 << 20, help="request body limit, else 413 (default: 8 MiB)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (else 401)")
    p.add_argument("--chat-template-args", default=None, metavar="JSON",
                   type=cli.checked(json.loads, lambda v: isinstance(v, dict), "a JSON object"),
                   help='extra chat template arguments, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    cli.add_verbose(p)
    return p


class State:
    """What the request handlers share."""

    def __init__(self, args, scheduler, model_id, model_ids, context_length):
        self.args = args
        self.scheduler = scheduler
        self.model_id = model_id
        self.model_ids = model_ids
        self.context_length = context_length
        self.created = int(time.time())
        self.stopping = threading.Event()
        self.inflight = 0  # requests between submit and their last byte
        self.lock = threading.Lock()


def client_gone(sock) -> bool:
    """True when the peer closed its side (readable with nothing to read) or the socket failed."""
    try:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx_moe.server"
    state: State = None  # set on the subclass made by make_server

    def log_message(self, fmt, *a):
        log.debug("%s " + fmt, self.address_string(), *a)

    # ---- plumbing ----
    def _send_json(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError, headers=()):
        self._send_json(e.status, e.body(), headers)

    def _authorized(self):
        key = self.state.args.api_key
        if key is None:
            return True
        got = self.headers.get("Authorization", "")
        ok = got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), key.encode())
        if not ok:
            self._error(APIError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                                 code="invalid_api_key", type="authentication_error"),
                        headers=[("WWW-Authenticate", "Bearer")])
        return ok

    def _read_body(self):
        limit = self.state.args.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise APIError("chunked request bodies are not supported: send Content-Length", status=411)
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise APIError("bad Content-Length") from None
        if n > limit:
            self.close_connection = True
            # read (and drop) a moderate excess so the client sees our answer, not a reset
            left = n if n <= 16 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
            raise APIError(f"request body is {n} bytes; the limit is {limit}", status=413,
                           code="request_too_large")
        return self.rfile.read(n)

    # ---- routes ----
    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            ok = self.state.scheduler.healthy and not self.state.stopping.is_set()
            sch = self.state.scheduler
            return self._send_json(200 if ok else 503, {
                "status": "ok" if ok else "unavailable", "active": sch.active, "queued": sch.inbox.qsize(),
                "steps": sch.steps, "prompt_cache_entries": len(sch.prompt_cache),
                "prompt_cache_bytes": sch.prompt_cache.nbytes, "active_memory_bytes": mx.get_active_memory()})
        if not self._authorized():
            return
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [
                {"id": self.state.model_id, "object": "model", "created": self.state.created, "owned_by": "mlx-moe"}]})
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name in self.state.model_ids:
                return self._send_json(200, {"id": self.state.model_id, "object": "model",
                                             "created": self.state.created, "owned_by": "mlx-moe"})
            return self._error(APIError(f"model '{name}' not found", status=404, code="model_not_found"))
        self._error(APIError(f"no route GET {path}", status=404, code="not_found"))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        kind = {"/v1/chat/completions": "chat", "/chat/completions": "chat",
                "/v1/completions": "text", "/completions": "text"}.get(path)
        try:
            if kind is None:
                self.close_connection = True
                raise APIError(f"no route POST {path}", status=404, code="not_found")
            body = self._read_body()  # before the auth check, so the connection stays usable
            if not self._authorized():
                return
            st = self.state
            request = parse_json(body)
            with st.scheduler.tokenizer_lock:
                params = parse_request(request, kind, tokenizer=st.scheduler.tokenizer, model_ids=st.model_ids,
                                       default_max_tokens=st.args.max_tokens, context_length=st.context_length,
                                       default_temp=st.args.temp, template_args=st.args.chat_template_args)
        except APIError as e:
            return self._error(e)
        job = Job(params.prompt_ids, params.max_tokens,
                  sampler=make_sampler(params.temperature, params.top_p, params.top_k, params.min_p, params.seed),
                  stop=params.stop, logprobs=params.logprobs, top_logprobs=params.top_logprobs)
        st = self.state
        with st.lock:
            st.inflight += 1
        try:
            st.scheduler.submit(job)
        except ShuttingDown:
            with st.lock:
                st.inflight -= 1
            return self._error(APIError("the server is shutting down", status=503, type="server_error"))
        rb = ResponseBuilder(params, st.model_id)
        try:
            if params.stream:
                self._stream(job, rb)
            else:
                self._complete(job, rb)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            log.info("client went away; request cancelled")
            self.close_connection = True
        finally:
            st.scheduler.cancel(job)  # no-op in the scheduler once the job has ended
            with st.lock:
                st.inflight -= 1

    def _events(self, job):
        """The job's events; raises ConnectionResetError as soon as the client is gone."""
        while True:
            try:
                ev = job.events.get(timeout=POLL_S)
            except Exception:  # queue.Empty
                if client_gone(self.connection):
                    raise ConnectionResetError("client disconnected")
                continue
            yield ev
            if ev[0] in ("end", "error"):
                return

    def _complete(self, job, rb):
        text, items = [], []
        for ev in self._events(job):
            if ev[0] == "delta":
                text.append(ev[1])
                items.extend(ev[2])
            elif ev[0] == "error":
                return self._error(APIError(ev[1], status=500, type="server_error"))
            else:
                c = ev[2]
                u = usage(c["prompt_tokens"], c["completion_tokens"], c["cached_tokens"])
                return self._send_json(200, rb.final("".join(text), ev[1], items, u))

    def _sse(self, obj):
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, job, rb):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection closes
        self.end_headers()
        self.close_connection = True
        if rb.p.kind == "chat":
            self._sse(rb.chunk(first=True))
        for ev in self._events(job):
            if ev[0] == "delta":
                if ev[1] or ev[2]:
                    self._sse(rb.chunk(text=ev[1], lp_items=ev[2]))
            elif ev[0] == "error":
                self._sse({"error": APIError(ev[1], status=500, type="server_error").body()["error"]})
                break
            else:
                self._sse(rb.chunk(finish_reason=ev[1]))
                if rb.p.include_usage:
                    c = ev[2]
                    self._sse(rb.usage_chunk(usage(c["prompt_tokens"], c["completion_tokens"], c["cached_tokens"])))
        self._sse("[DONE]")


class Server(ThreadingHTTPServer):
    """Joins its connection threads on close (a daemon thread still running at exit can abort
    the interpreter inside C++ code), and can close idle keep-alive connections to let them end."""
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # listen backlog (socketserver's 5 resets a burst of 16 clients)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.conns = set()
        self.conns_lock = threading.Lock()

    def process_request_thread(self, request, client_address):
        with self.conns_lock:
            self.conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.conns_lock:
                self.conns.discard(request)

    def close_connections(self):
        with self.conns_lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def make_server(state: State, host, port) -> Server:
    handler = type("BoundHandler", (Handler,), {"state": state})
    return Server((host, port), handler)


def model_names(model_arg):
    """The served model's id (what /v1/models lists) and every name a request may use for it."""
    if model_arg is None:
        return "default_model", ["default_model", "mlx_moe/default_model", str(DEFAULT_MODEL)]
    names = [model_arg]
    p = Path(model_arg).expanduser()
    if p.exists():
        names += [str(p.resolve()), p.resolve().name]
    return model_arg, names


def serve(argv=None, ready=None):
    """Load, bind, serve until SIGINT/SIGTERM, then end the streams in flight and return.

    ``ready(server)`` (optional) is called once the socket is bound."""
    parser = build_parser()
    args = parser.parse_args(cli.dash_values(parser, sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    quantize = cli.quantize_spec(parser, args)

    from ..loading import load as load_model
    model, tokenizer = load_model(args.model, quantize=quantize, backend=args.backend, progress=False,
                                  expert_budget_gb=args.expert_budget)
    # The main thread owns the model and runs the scheduler; HTTP runs on other threads.
    scheduler = Scheduler(model, tokenizer, max_batch=args.max_batch, prefill_step_size=args.prefill_step_size,
                          prompt_cache_size=args.prompt_cache_size, prompt_cache_bytes=args.prompt_cache_bytes)
    margs = getattr(model, "args", None)
    context = None
    for name in ("max_position_embeddings", "max_seq_len", "seq_length"):
        context = context or getattr(margs, name, None)
    model_id, model_ids = model_names(args.model)
    state = State(args, scheduler, model_id, model_ids, context)
    server = make_server(state, args.host, args.port)
    host, port = server.server_address[:2]

    def stop(signum, frame):
        if not state.stopping.is_set():
            state.stopping.set()
            log.info("signal %d: stopping (ending %d streams in flight)", signum, scheduler.active)
            scheduler.stop()
            threading.Thread(target=server.shutdown, daemon=True).start()  # stop accepting now

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="mlx_moe-http")
    http.start()
    log.info("serving %s on http://%s:%d (max batch %d)", model_id, host, port, args.max_batch)
    print(f"mlx_moe.server: serving {model_id} on http://{host}:{port}/v1", flush=True)
    if ready is not None:
        ready(server)
    try:
        scheduler.run()  # until stop(): then every job in flight has been ended (finish_reason + [DONE])
    finally:
        state.stopping.set()
        scheduler.stop()
        server.shutdown()  # stop accepting
        http.join()
        deadline = time.time() + 10
        while state.inflight and time.time() < deadline:  # let the handlers write their last bytes
            time.sleep(0.02)
        server.close_connections()  # idle keep-alive connections (and a client that stopped reading)
        server.server_close()       # closes the listening socket, joins the connection threads
        for s, h in old.items():
            signal.signal(s, h)
    log.info("stopped")


def main(argv=None):
    sys.exit(cli.run("mlx_moe.server", serve, argv))


if __name__ == "__main__":
    main()
