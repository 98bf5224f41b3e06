"""``mlx_moe.generate``: generate text with an MoE model (flags follow mlx_lm.generate)."""

import argparse
import json
import sys
import time

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from . import offload
from .loading import DEFAULT_MODEL, load


def build_parser():
    p = argparse.ArgumentParser(prog="mlx_moe.generate", description=__doc__)
    p.add_argument("--model", default=None, help=f"local folder or Hugging Face repo (default: the tiny model shipped in {DEFAULT_MODEL.name}/)")
    p.add_argument("--prompt", "-p", default="A list is", help="prompt text, or '-' to read stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize while loading")
    p.add_argument("--q-bits", type=int, default=None)
    p.add_argument("--q-group-size", type=int, default=None)
    p.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "nvfp4", "mxfp8"])
    p.add_argument("--backend", default="auto", help="MoE backend: auto, gather, loop, fused, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--expert-budget", default=None, metavar="GB|N%",
                   help="keep only this much of the routed experts in memory, stream the rest "
                        "from an --expert-file-layout folder (docs/OFFLOAD.md)")
    return p


def prompt_tokens(tokenizer, prompt, ignore_chat_template):
    if not ignore_chat_template and tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(prompt)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    quantize = None
    if args.quantize:
        quantize = {"bits": args.q_bits, "group_size": args.q_group_size, "mode": args.q_mode}
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, quantize=quantize, backend=args.backend, progress=not args.json,
                            expert_budget_gb=args.expert_budget)
    load_s = time.perf_counter() - t0

    ids = prompt_tokens(tokenizer, prompt, args.ignore_chat_template)
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
        offload.close(model)
        return
    print("\n" + "=" * 10)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    print(f"Peak memory: {last.peak_memory:.3f} GB")
    if offload.stats(model):
        print(offload.format_stats(offload.stats(model)))
    offload.close(model)


if __name__ == "__main__":
    main()
