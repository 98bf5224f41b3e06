"""``mlx_moe.generate``: generate text with an MoE model (flags follow mlx_lm.generate)."""

import argparse
import json
import math
import sys
import time

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache
from mlx_lm.sample_utils import make_sampler

from . import offload
from .cli import VERBOSE_HELP, UsageError, add_backend_arg, add_quantize_args, checked, dash_values, quantize_spec, run
from .loading import DEFAULT_MODEL, load
from .offload.loader import parse_budget

PROG = "mlx_moe.generate"
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's
KV_BITS = (2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)
# What transformers' tokenizers used as their default chat template (ChatML) before it was
# removed: --use-default-chat-template applies it to a tokenizer that has none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRUE, FALSE = ("true", "t"), ("false", "f")
EPILOG = (
    "Where this differs from mlx_lm.generate 0.32.2: --verbose alone (or T/True) also prints the "
    "traceback of a user error, F/False prints only the generated text as in mlx-lm, and other "
    "values are refused (mlx-lm reads them as True); --use-default-chat-template gives a tokenizer "
    "without a chat template ChatML (mlx-lm's generate ignores the flag); --extra-eos-token refuses "
    "text that is not a token (mlx-lm maps it to the unknown token); flags that mlx-lm would ignore "
    "or fail on later are refused together: --draft-model with --max-kv-size, --prompt-cache-file "
    "or --expert-budget, --kv-bits with --max-kv-size, --prompt-cache-file with --max-kv-size."
)


def verbose_value(text):
    """mlx-lm's ``--verbose True|T|False|F`` (case-insensitive)."""
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"must be True, T, False or F (or no value), got {text!r}")


def json_object(text):
    """``--chat-template-config``: a JSON object of keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def budget(text):
    """``--expert-budget``: checked now (syntax, positive, finite); sized at load."""
    try:
        parse_budget(text, 100)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_kv_quantize_args(p):
    """``--kv-bits``, ``--kv-group-size``, ``--quantized-kv-start`` as mlx-lm (generate and cache_prompt)."""
    p.add_argument("--kv-bits", type=checked(int, lambda v: v in KV_BITS, "one of 2, 3, 4, 5, 6, 8"), default=None,
                   help="quantize the KV cache to this many bits (default: not quantized)")
    p.add_argument("--kv-group-size", type=checked(int, lambda v: v in KV_GROUP_SIZES, "one of 32, 64, 128"),
                   default=64, help="group size of KV cache quantization (default: 64)")
    p.add_argument("--quantized-kv-start", type=checked(int, lambda v: v >= 0, "a whole number >= 0"),
                   default=DEFAULT_QUANTIZED_KV_START,
                   help=f"with --kv-bits, quantize the KV cache from this many tokens on (default: {DEFAULT_QUANTIZED_KV_START})")


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG)
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
    p.add_argument("--top-k", type=checked(int, lambda v: v >= 0, "a whole number >= 0"), default=0,
                   help="sample from the k most likely tokens with --temp > 0; 0: off (default)")
    p.add_argument("--min-p", type=checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), default=0.0,
                   help="min-p sampling with --temp > 0; 0: off (default)")
    p.add_argument("--min-tokens-to-keep", type=checked(int, lambda v: v >= 1, "a whole number >= 1"), default=1,
                   help="tokens --min-p always keeps (default: 1)")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="use the raw prompt without the tokenizer's chat template")
    p.add_argument("--use-default-chat-template", action="store_true",
                   help="a tokenizer without a chat template gets the default one (ChatML)")
    p.add_argument("--chat-template-config", type=json_object, default=None, metavar="JSON",
                   help="extra keyword arguments of apply_chat_template, as a JSON object")
    p.add_argument("--extra-eos-token", nargs="+", default=(), metavar="TOKEN",
                   help="more tokens (text or id) that stop generation")
    p.add_argument("--max-kv-size", type=checked(int, lambda v: v >= 1, "a whole number >= 1"), default=None,
                   help="bound the KV cache to this many tokens (a rotating cache that keeps the first 4)")
    add_kv_quantize_args(p)
    p.add_argument("--prompt-cache-file", default=None, metavar="FILE",
                   help="a KV cache saved by mlx_moe.cache_prompt (or mlx_lm.cache_prompt): the prompt continues it")
    p.add_argument("--adapter-path", default=None, metavar="DIR",
                   help="LoRA adapters trained by mlx_lm.lora (adapter_config.json, adapters.safetensors), "
                        "experts included, applied unfused")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="a small model with the same tokenizer for speculative decoding "
                        "(an mlx-moe architecture, or any model mlx-lm loads)")
    p.add_argument("--num-draft-tokens", type=checked(int, lambda v: v >= 1, "a whole number >= 1"), default=3,
                   help="tokens the draft model proposes per step (default: 3)")
    add_quantize_args(p)
    add_backend_arg(p)
    p.add_argument("--parallel", choices=("ep", "tp", "ep+tp"), default=None,
                   help="under mlx.launch: ep = expert parallel (each rank holds E/N routed experts), "
                        "tp = tensor parallel (mlx-lm's shard()), ep+tp = both; rank 0 prints "
                        "(README: Running across machines)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="write an expert-usage profile (JSON, see mlx_moe/profile.py) of this generation to "
                        "FILE and print its summary table on stderr")
    p.add_argument("--expert-budget", default=None, metavar="GB|N%", type=budget,
                   help="keep only this much of the routed experts in memory (a positive number of GB, "
                        "e.g. 12 or 12GB, or a share such as 50%%), stream the rest from an "
                        "--expert-file-layout folder (docs/OFFLOAD.md)")
    p.add_argument("--verbose", nargs="?", const=True, default=None, type=verbose_value, metavar="T|F",
                   help=f"alone or T/True: {VERBOSE_HELP}; F/False: print only the generated text "
                        "(mlx-lm's --verbose False)")
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


def prompt_tokens(tokenizer, prompt, ignore_chat_template, system_prompt=None, template_kwargs=None,
                  using_cache=False):
    """The prompt's token ids, as mlx_lm.generate makes them: through the chat template (with
    the system prompt and ``template_kwargs``) unless ignored or absent; with a prompt cache,
    only the part of the templated text after the cached prefix."""
    use_template = not ignore_chat_template and tokenizer.chat_template is not None
    if not use_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
        if using_cache:
            # The cache holds the conversation up to the user's text: keep what follows it.
            messages[-1]["content"] = "<query>"
            probe = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            text = text[probe.index("<query>"):]
    except (TypeError, ValueError) as e:
        raise UsageError(f"the chat template failed: {e}") from None
    except Exception as e:  # jinja2's TemplateError and friends
        if type(e).__module__.startswith("jinja2"):
            raise UsageError(f"the chat template failed: {e}") from None
        raise
    return tokenizer.encode(text, add_special_tokens=False)


def context_length(model):
    args = getattr(model, "args", None)
    n = getattr(args, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_combinations(parser, args):
    """Flags that cannot go together: an argparse error naming them (mlx-lm would ignore one
    silently, or fail later)."""
    if args.draft_model is not None:
        if args.max_kv_size is not None:
            parser.error("argument --max-kv-size: speculative decoding (--draft-model) needs a trimmable "
                         "cache; a rotating cache is not")
        if args.prompt_cache_file is not None:
            parser.error("argument --prompt-cache-file: cannot be combined with --draft-model "
                         "(the cache holds no draft-model state)")
        if args.expert_budget is not None:
            parser.error("argument --draft-model: cannot be combined with --expert-budget")
    if args.kv_bits is not None and args.max_kv_size is not None:
        parser.error("argument --kv-bits: a rotating cache (--max-kv-size) cannot be quantized")
    if args.prompt_cache_file is not None and args.max_kv_size is not None:
        parser.error("argument --max-kv-size: the cache's size is set when it is made "
                     "(mlx_moe.cache_prompt --max-kv-size); drop it with --prompt-cache-file")
    if args.adapter_path is not None and args.expert_budget is not None:
        parser.error("argument --adapter-path: cannot be combined with --expert-budget")


def read_prompt_cache(args):
    """``(cache, metadata)`` of ``--prompt-cache-file``, checked against --kv-bits/--kv-group-size
    and --model as mlx_lm.generate checks them; the model to load."""
    from pathlib import Path

    f = Path(args.prompt_cache_file)
    if not f.is_file():
        raise FileNotFoundError(f"--prompt-cache-file {f}: no such file")
    try:
        cache, metadata = load_prompt_cache(str(f), return_metadata=True)
    except (KeyError, IndexError, TypeError, RuntimeError, ValueError) as e:
        raise UsageError(f"--prompt-cache-file {f}: not a prompt cache ({e})") from None
    if not cache:
        raise UsageError(f"--prompt-cache-file {f}: the cache is empty")
    if isinstance(cache[0], QuantizedKVCache):
        if args.kv_bits is not None and args.kv_bits != cache[0].bits:
            raise UsageError(f"--kv-bits {args.kv_bits} does not match the cache in {f} "
                             f"({cache[0].bits} bits)")
        if args.kv_group_size != cache[0].group_size:
            raise UsageError(f"--kv-group-size {args.kv_group_size} does not match the cache in {f} "
                             f"(group size {cache[0].group_size})")
    cached_model = metadata.get("model")
    model = args.model
    if model is None:
        model = cached_model or None
    elif cached_model and model != cached_model:
        raise UsageError(f"--model {model} is not the model that made {f} ({cached_model})")
    return cache, metadata, model


def add_eos_token(tokenizer, token, flag):
    """``tokenizer.add_eos_token(token)`` (a token's text or id), refusing what the vocabulary
    lacks (transformers would map it to the unknown token)."""
    try:
        ok = 0 <= int(token) < len(tokenizer.get_vocab())
    except ValueError:
        ok = token in tokenizer.get_vocab()
    if not ok:
        raise UsageError(f"argument {flag}: {token!r} is not a token of the tokenizer")
    tokenizer.add_eos_token(token)


def load_draft(args, tokenizer):
    """The draft model: ours when its architecture is an MoE we support, else mlx-lm's."""
    from .loading import resolve_path
    from .models import ARCHITECTURES

    folder = resolve_path(args.draft_model)
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # our loader names the problem
    if model_type is None or model_type in ARCHITECTURES or not folder.is_dir():
        draft, draft_tokenizer = load(folder, backend=args.backend, progress=False)
    else:
        from mlx_lm import load as mlx_lm_load

        draft, draft_tokenizer = mlx_lm_load(str(folder))
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise UsageError(f"--draft-model {args.draft_model}: its tokenizer ({draft_tokenizer.vocab_size} tokens) "
                         f"does not match the model's ({tokenizer.vocab_size})")
    return draft


def main(argv=None):
    """Parse ``argv`` and generate; errors raise (``cli`` is the command line)."""
    parser = build_parser()
    args = parser.parse_args(dash_values(parser, sys.argv[1:] if argv is None else list(argv)))
    quantize = quantize_spec(parser, args)
    check_combinations(parser, args)
    if args.profile is not None:
        from .profile import check_output

        check_output(args.profile, "--profile")  # fail before loading the model
    if args.adapter_path is not None:
        from .adapters import read_config

        read_config(args.adapter_path)  # fail before loading the model
    prompt = read_prompt(args.prompt)
    group = None
    if args.parallel is not None:
        from .distributed import cli_setup

        group, args.seed = cli_setup(args.seed)  # joins the group; ranks > 0 go quiet
    if args.seed is not None:
        mx.random.seed(args.seed)
    cache = metadata = None
    model_path = args.model
    if args.prompt_cache_file is not None:
        cache, metadata, model_path = read_prompt_cache(args)
    quiet = args.json or args.verbose is False
    t0 = time.perf_counter()
    model, tokenizer = load(model_path, quantize=quantize, backend=args.backend, progress=not quiet,
                            expert_budget_gb=args.expert_budget, adapter_path=args.adapter_path,
                            group=group, parallel=args.parallel)
    load_s = time.perf_counter() - t0
    try:
        if cache is not None:
            n_layers = len(model.layers)
            if len(cache) != n_layers:
                raise UsageError(f"--prompt-cache-file {args.prompt_cache_file}: {len(cache)} layers of "
                                 f"cache for a model of {n_layers} layers")
            eos = json.loads(metadata.get("tokenizer_config") or "{}").get("eos_token")
            if eos:
                tokenizer.add_eos_token(eos)
        for token in args.extra_eos_token:
            add_eos_token(tokenizer, token, "--extra-eos-token")
        if args.use_default_chat_template and tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
            tokenizer.has_chat_template = True
        draft = load_draft(args, tokenizer) if args.draft_model is not None else None
        from .distributed import session

        with session(model):  # nothing unless --parallel
            _generate(args, model, tokenizer, prompt, load_s, cache, draft)
    finally:
        offload.close(model)


def check_kv_group_size(model, group_size):
    """--kv-group-size must divide the width of the cached keys and values (the head dimension),
    or MLX fails in the middle of generation."""
    a = getattr(model, "args", None)
    if a is None or getattr(a, "kv_lora_rank", None):  # multi-head latent attention: other widths
        return
    width = getattr(a, "head_dim", None)
    if not width and getattr(a, "hidden_size", None) and getattr(a, "num_attention_heads", None):
        width = a.hidden_size // a.num_attention_heads
    if isinstance(width, int) and width > 0 and width % group_size:
        raise UsageError(f"argument --kv-group-size: {group_size} does not divide the model's head "
                         f"dimension {width} (KV cache quantization groups run along it)")


def _generate(args, model, tokenizer, prompt, load_s, cache=None, draft=None):
    ids = prompt_tokens(tokenizer, prompt, args.ignore_chat_template, args.system_prompt,
                        args.chat_template_config, using_cache=cache is not None)
    if len(ids) == 0:
        raise UsageError("the prompt encodes to no tokens")
    limit = context_length(model)
    cached = cache[0].offset if cache is not None else 0
    if limit is not None and cached + len(ids) > limit:
        print(f"{PROG}: warning: the prompt has {cached + len(ids)} tokens, more than the model's "
              f"max_position_embeddings = {limit}; output past that length may be meaningless",
              file=sys.stderr)
    sampler = make_sampler(args.temp, args.top_p if args.top_p < 1.0 else 0.0, args.min_p,
                           args.min_tokens_to_keep, top_k=args.top_k)
    kwargs = dict(max_tokens=args.max_tokens, sampler=sampler, kv_bits=args.kv_bits,
                  kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start)
    if cache is not None:
        kwargs["prompt_cache"] = cache
    if draft is not None:
        kwargs.update(draft_model=draft, num_draft_tokens=args.num_draft_tokens)
    else:
        kwargs["max_kv_size"] = args.max_kv_size
    if args.kv_bits is not None:
        check_kv_group_size(model, args.kv_group_size)
    stream = not args.json and args.verbose is not False
    tokens, text, last, from_draft = [], "", None, 0
    profiler = None
    if args.profile is not None:
        from .profile import ExpertProfiler

        profiler = ExpertProfiler(model).attach()
        profiler.begin(len(ids))
    if stream:
        print("=" * 10)
    try:
        for r in stream_generate(model, tokenizer, ids, **kwargs):
            tokens.append(r.token)
            text += r.text
            from_draft += bool(r.from_draft)
            last = r
            if stream:
                print(r.text, end="", flush=True)
    finally:
        if profiler is not None:
            profiler.detach()
    if profiler is not None:
        from .profile import summary, write_json

        result = profiler.result(args.model or "default_model")
        result["generated_tokens"] = len(tokens)
        write_json(result, args.profile)
        print(summary(result), file=sys.stderr)
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
            "cached_tokens": cached,
            "draft_tokens_accepted": from_draft if draft is not None else None,
        }))
        return
    if not stream:  # --verbose False: the text only, as mlx_lm.generate prints it
        print(text)
        return
    print("\n" + "=" * 10)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    if draft is not None:
        print(f"Draft: {from_draft} of {len(tokens)} tokens accepted from the draft model")
    print(f"Peak memory: {last.peak_memory:.3f} GB")
    if offload.stats(model):
        print(offload.format_stats(offload.stats(model)))


def normalize_verbose(argv):
    """``--verbose False`` means mlx-lm's quiet output, not tracebacks: ``cli.run`` shows a
    traceback for a bare ``--verbose``, so spell the false forms ``--verbose=False``."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--verbose" and nxt is not None and nxt.lower() in TRUE + FALSE:
            out.append("--verbose" if nxt.lower() in TRUE else "--verbose=False")
            i += 2
            continue
        if a.startswith("--verbose="):
            value = a.split("=", 1)[1].lower()
            a = "--verbose" if value in TRUE else a
        out.append(a)
        i += 1
    return out


def cli(argv=None):
    """The ``mlx_moe.generate`` command: exits 0, 2 (user error) or 130 (interrupted)."""
    sys.exit(run(PROG, main, normalize_verbose(sys.argv[1:] if argv is None else list(argv))))


if __name__ == "__main__":
    cli()
