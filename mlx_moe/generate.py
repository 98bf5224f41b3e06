"""``mlx_moe.generate``: generate text with an MoE model (flags follow mlx_lm.generate)."""

import argparse
import json
import math
import sys
import time

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from . import offload
from .cli import UsageError, add_quantize_args, add_verbose, checked, dash_values, quantize_spec, run
from .experts import BACKENDS
from .loading import DEFAULT_MODEL, load
from .offload.loader import parse_budget

PROG = "mlx_moe.generate"


def budget(text):
    """``--expert-budget``: checked now (syntax, positive, finite); sized at load."""
    try:
        parse_budget(text, 100)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--model", default=None, help=f"local folder or Hugging Face repo id owner/name (default: the tiny model shipped in {DEFAULT_MODEL.name}/)")
    p.add_argument("--prompt", "-p", default="A list is",
                   help="prompt text, or '-' to read stdin (as UTF-8; invalid bytes are replaced by U+FFFD, with a warning)")
    p.add_argument("--max-tokens", "-m", default=100,
                   type=checked(int, lambda v: v >= 1 or v == -1, "a whole number >= 1, or -1 for no limit"),
                   help="tokens to generate; -1: no limit (default: 100)")
    p.add_argument("--temp", type=checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
                   default=0.0, help="sampling temperature; 0: greedy (default)")
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                   default=1.0, help="nucleus sampling with --temp > 0; 1: off (default)")
    p.add_argument("--seed", type=checked(int, lambda v: v >= 0, "a whole number >= 0"), default=None,
                   help="random seed for sampling (a whole number >= 0)")
    p.add_argument("--ignore-chat-template", action="store_true")
    add_quantize_args(p)
    p.add_argument("--backend", default="auto", help="MoE backend: auto, gather, loop, fused, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--expert-budget", default=None, metavar="GB|N%", type=budget,
                   help="keep only this much of the routed experts in memory (a positive number of GB, "
                        "e.g. 12 or 12GB, or a share such as 50%%), stream the rest from an "
                        "--expert-file-layout folder (docs/OFFLOAD.md)")
    add_verbose(p)
    return p


def read_prompt(text):
    """The prompt: ``text``, or stdin for '-', decoded as UTF-8 with replacement."""
    if text != "-":
        prompt = text
    else:
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            prompt = data.decode("utf-8", errors="replace")
            print(f"{PROG}: warning: stdin is not valid UTF-8 (byte {e.start}); "
                  "invalid bytes were replaced by U+FFFD", file=sys.stderr)
    if not prompt.strip():
        raise UsageError("the prompt is empty" + (" (stdin gave no text)" if text == "-" else " (--prompt)"))
    return prompt


def prompt_tokens(tokenizer, prompt, ignore_chat_template):
    if not ignore_chat_template and tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(prompt)


def context_length(model):
    args = getattr(model, "args", None)
    n = getattr(args, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def main(argv=None):
    """Parse ``argv`` and generate; errors raise (``cli`` is the command line)."""
    parser = build_parser()
    args = parser.parse_args(dash_values(parser, sys.argv[1:] if argv is None else list(argv)))
    quantize = quantize_spec(parser, args)
    if args.backend != "auto" and args.backend not in BACKENDS:
        parser.error(f"argument --backend: unknown MoE backend {args.backend!r}; "
                     f"available: auto, {', '.join(sorted(BACKENDS))}")
    prompt = read_prompt(args.prompt)
    if args.seed is not None:
        mx.random.seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, quantize=quantize, backend=args.backend, progress=not args.json,
                            expert_budget_gb=args.expert_budget)
    load_s = time.perf_counter() - t0
    try:
        _generate(args, model, tokenizer, prompt, load_s)
    finally:
        offload.close(model)


def _generate(args, model, tokenizer, prompt, load_s):
    ids = prompt_tokens(tokenizer, prompt, args.ignore_chat_template)
    if len(ids) == 0:
        raise UsageError("the prompt encodes to no tokens")
    limit = context_length(model)
    if limit is not None and len(ids) > limit:
        print(f"{PROG}: warning: the prompt has {len(ids)} tokens, more than the model's "
              f"max_position_embeddings = {limit}; output past that length may be meaningless",
              file=sys.stderr)
    sampler = make_sampler(args.temp, args.top_p if args.top_p < 1.0 else 0.0)
    tokens, text, last = [], "", None
    if not args.json:
        print("=" * 10)
    for r in stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens, sampler=sampler):
        tokens.append(r.token)
        text += r.text
        last = r
        if not args.json:
            print(r.text, end="", flush=True)
    if args.json:
        print(json.dumps({
            "prompt_tokens": list(ids),
            "tokens": tokens,
            "text": text,
            "prompt_tps": last.prompt_tps,
            "generation_tps": last.generation_tps,
            "peak_memory_gb": last.peak_memory,
            "load_s": load_s,
            "expert_offload": offload.stats(model),
        }))
        return
    print("\n" + "=" * 10)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    print(f"Peak memory: {last.peak_memory:.3f} GB")
    if offload.stats(model):
        print(offload.format_stats(offload.stats(model)))


def cli(argv=None):
    """The ``mlx_moe.generate`` command: exits 0, 2 (user error) or 130 (interrupted)."""
    sys.exit(run(PROG, main, argv))


if __name__ == "__main__":
    cli()
