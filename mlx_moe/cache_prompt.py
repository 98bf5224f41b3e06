"""``mlx_moe.cache_prompt``: run a prompt through an MoE model once and save its KV cache, to be
continued by ``mlx_moe.generate --prompt-cache-file`` (flags and file format follow
mlx_lm.cache_prompt: the files load in either)."""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

from .cli import UsageError, add_backend_arg, add_quantize_args, add_verbose, checked, dash_values, quantize_spec, run
from .generate import add_eos_token, add_kv_quantize_args, read_prompt
from .loading import DEFAULT_MODEL, load

PROG = "mlx_moe.cache_prompt"


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--model", default=None,
                   help=f"local folder or Hugging Face repo id (default: the tiny model shipped in {DEFAULT_MODEL.name}/)")
    p.add_argument("--adapter-path", default=None, metavar="DIR",
                   help="LoRA adapters trained by mlx_lm.lora, applied unfused")
    p.add_argument("--eos-token", default=None,
                   help="a token that ends generation, saved with the cache for mlx_moe.generate")
    p.add_argument("--max-kv-size", type=checked(int, lambda v: v >= 1, "a whole number >= 1"), default=None,
                   help="bound the KV cache to this many tokens (a rotating cache)")
    p.add_argument("--prompt-cache-file", required=True, metavar="FILE",
                   help="the .safetensors file to save the cache in")
    p.add_argument("--prompt", "-p", required=True,
                   help="the prompt, or '-' to read stdin")
    add_kv_quantize_args(p)
    add_quantize_args(p)
    add_backend_arg(p)
    add_verbose(p)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(dash_values(parser, sys.argv[1:] if argv is None else list(argv)))
    quantize = quantize_spec(parser, args)
    if args.kv_bits is not None and args.max_kv_size is not None:
        parser.error("argument --kv-bits: a rotating cache (--max-kv-size) cannot be quantized")
    out = Path(args.prompt_cache_file)
    if out.suffix != ".safetensors":  # MLX would add the suffix: say so rather than surprise
        parser.error(f"argument --prompt-cache-file: must end in .safetensors, got {args.prompt_cache_file}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--prompt-cache-file {out}: no such folder {out.parent}")
    prompt = read_prompt(args.prompt)
    model, tokenizer = load(args.model, quantize=quantize, backend=args.backend, progress=True,
                            adapter_path=args.adapter_path)
    tokenizer_config = {"trust_remote_code": False}
    if args.eos_token is not None:
        add_eos_token(tokenizer, args.eos_token, "--eos-token")
        tokenizer_config["eos_token"] = args.eos_token
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    else:
        ids = tokenizer.encode(prompt)
    if len(ids) == 0:
        raise UsageError("the prompt encodes to no tokens")

    cache = make_prompt_cache(model, args.max_kv_size)
    start = time.perf_counter()
    width = 0

    def callback(processed, total):
        nonlocal width
        speed = processed / max(time.perf_counter() - start, 1e-9)
        msg = f"\rProcessed {processed:6d} tokens ({speed:6.2f} tok/s)"
        width = max(width, len(msg))
        print(msg.ljust(width), end="", flush=True)

    for _ in generate_step(mx.array(ids), model, max_tokens=0, prompt_cache=cache, kv_bits=args.kv_bits,
                           kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start,
                           prompt_progress_callback=callback):
        pass
    print()
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    metadata = {"model": args.model or str(DEFAULT_MODEL), "tokenizer_config": json.dumps(tokenizer_config)}
    tmp = out.with_name(f".{out.stem}.tmp.safetensors")
    try:
        save_prompt_cache(str(tmp), cache, metadata)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"Saved the cache of {len(ids)} prompt tokens to {out}")


def cli(argv=None):
    """The ``mlx_moe.cache_prompt`` command: exits 0, 2 (user error) or 130 (interrupted)."""
    sys.exit(run(PROG, main, argv))


if __name__ == "__main__":
    cli()
