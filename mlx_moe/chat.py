"""``mlx_moe.chat``: an interactive terminal chat with an MoE model (like mlx_lm.chat).

Answers stream as they are generated. The KV cache is kept across turns: each turn renders
the whole conversation with the tokenizer's chat template, keeps the cached tokens it shares
with that rendering and prefills only the rest (the new user message and the template's
glue), so history is never prefilled twice. Commands: ``/reset`` (forget the conversation),
``/exit`` or Ctrl-D (quit), ``/help``. Ctrl-C stops the answer being generated, not the program.
"""

import argparse
import json
import signal
import sys
import time

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from . import cli
from .loading import DEFAULT_MODEL
from .server.api import render_chat

HELP = "commands: /reset forget the conversation, /exit (or Ctrl-D) quit, /help this; Ctrl-C stops an answer"


def build_parser():
    p = argparse.ArgumentParser(prog="mlx_moe.chat", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help=f"local folder or Hugging Face repo (default: the tiny model shipped in {DEFAULT_MODEL.name}/)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=cli.positive_int, default=512, help="most tokens per answer (default: 512)")
    p.add_argument("--temp", type=cli.checked(float, lambda v: v >= 0, "a number >= 0"), default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    cli.add_quantize_args(p)
    cli.add_backend_arg(p)
    p.add_argument("--expert-budget", default=None, metavar="GB|N%",
                   help="keep only this much of the routed experts in memory (docs/OFFLOAD.md)")
    p.add_argument("--chat-template-args", default=None, metavar="JSON",
                   type=cli.checked(json.loads, lambda v: isinstance(v, dict), "a JSON object"),
                   help='extra chat template arguments, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--stats", action="store_true", help="print prefilled/cached tokens and speed after each answer")
    cli.add_verbose(p)
    return p


class Conversation:
    """Messages plus the KV cache of their rendering; ``reply`` runs one turn."""

    def __init__(self, model, tokenizer, system_prompt=None, template_args=None):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.template_args = template_args or {}
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = make_prompt_cache(self.model)
        self.cache_tokens = []  # exactly the tokens the cache holds
        self.last = {}

    def _reuse(self, ids):
        """Trim the cache to its longest prefix shared with ``ids``; returns the tokens to prefill."""
        common = 0
        for a, b in zip(self.cache_tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last prompt token must run: its logits start the answer
        extra = len(self.cache_tokens) - common
        if extra:
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, extra)
            else:
                self.cache, common = make_prompt_cache(self.model), 0
        self.cache_tokens = list(ids[:common])
        return ids[common:]

    def reply(self, text, on_text=lambda s: None, should_stop=lambda: False, max_tokens=512, sampler=None):
        """Add the user's message, stream the answer through ``on_text``; returns the answer's text.
        ``should_stop()`` is checked after every token (Ctrl-C): the answer so far is kept."""
        self.messages.append({"role": "user", "content": text})
        ids = render_chat(self.tokenizer, self.messages, self.template_args)
        rest = self._reuse(ids)
        cached = len(ids) - len(rest)
        out, gen, t0, t_first, stopped = [], [], time.perf_counter(), None, False
        gen_iter = stream_generate(self.model, self.tokenizer, mx.array(rest), max_tokens=max_tokens,
                                   sampler=sampler, prompt_cache=self.cache)
        try:
            for r in gen_iter:
                if t_first is None:
                    t_first = time.perf_counter()
                gen.append(r.token)
                out.append(r.text)
                on_text(r.text)
                if should_stop():
                    stopped = True
                    break
        finally:
            gen_iter.close()
        # what the cache now holds: the prompt and the tokens fed back so far
        known = list(ids) + gen
        offset = self.cache[0].offset
        if offset > len(known):
            trim_prompt_cache(self.cache, offset - len(known))
            offset = len(known)
        self.cache_tokens = known[:offset]
        answer = "".join(out)
        self.messages.append({"role": "assistant", "content": answer})
        n = len(gen)
        self.last = {"prompt_tokens": len(ids), "cached_tokens": cached, "prefilled_tokens": len(rest),
                     "generated_tokens": n, "ttft_s": (t_first or time.perf_counter()) - t0,
                     "tps": (n - 1) / (time.perf_counter() - t_first) if n > 1 else 0.0, "stopped": stopped}
        return answer


def chat(argv=None):
    parser = build_parser()
    args = parser.parse_args(cli.dash_values(parser, sys.argv[1:] if argv is None else list(argv)))
    template_args = args.chat_template_args
    if args.seed is not None:
        mx.random.seed(args.seed)
    quantize = cli.quantize_spec(parser, args)
    from .loading import load

    model, tokenizer = load(args.model, quantize=quantize, backend=args.backend, progress=False,
                            expert_budget_gb=args.expert_budget)
    conv = Conversation(model, tokenizer, args.system_prompt, template_args)
    sampler = make_sampler(args.temp, args.top_p if args.top_p < 1.0 else 0.0, args.min_p, top_k=args.top_k)
    print(f"[mlx_moe.chat] {args.model or DEFAULT_MODEL.name}; {HELP}", flush=True)

    interrupted, terminated = [], []

    def on_sigint(signum, frame):
        interrupted.append(True)

    def on_sigterm(signum, frame):  # quits (exit 130, as every mlx_moe command), even at the prompt
        terminated.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)

    while True:
        try:
            line = input(">> ")
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
            if terminated:
                raise
            print(flush=True)
            continue
        except EOFError:
            print(flush=True)
            break
        q = line.strip()
        if not q:
            continue
        if q in ("/exit", "/quit", "/q"):
            break
        if q in ("/reset", "/r"):
            conv.reset()
            print("[conversation reset]", flush=True)
            continue
        if q in ("/help", "/h", "/?"):
            print(HELP, flush=True)
            continue
        interrupted.clear()
        old = signal.signal(signal.SIGINT, on_sigint)  # Ctrl-C: end this answer after the current token
        try:
            conv.reply(q, on_text=lambda s: print(s, end="", flush=True), should_stop=lambda: bool(interrupted),
                       max_tokens=args.max_tokens, sampler=sampler)
        finally:
            signal.signal(signal.SIGINT, old)
        print(" [stopped]" if interrupted else "", flush=True)
        if args.stats:
            s = conv.last
            print(f"[{s['prompt_tokens']} prompt tokens: {s['cached_tokens']} cached, {s['prefilled_tokens']} "
                  f"prefilled; {s['generated_tokens']} generated; first token {s['ttft_s'] * 1000:.0f} ms; "
                  f"{s['tps']:.1f} tok/s]", flush=True)


def main(argv=None):
    sys.exit(cli.run("mlx_moe.chat", chat, argv))


if __name__ == "__main__":
    main()
