"""``mlx_moe.convert``: write an mlx-lm format folder (optionally quantized),
streaming layer by layer. The folder loads with ``mlx_lm.load`` and mlx-swift."""

import argparse
import json
import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .cli import UsageError, add_quantize_args, add_verbose, dash_values, positive_float, quantize_spec, run
from .experts import ExpertLinear, QuantizedExpertLinear
from .loading import StreamingLoader, folder_loader, load_model, prepare, resolve_path
from .quantization import QuantizedTensor, is_quantized
from .recipes import RECIPES
from .offload import write_offload_folder
from .safe_write import check_destination, refuse_existing, staged_folder, writing
from .safetensors_io import save_sharded

# Everything a model folder carries besides weights and config.
SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}
DTYPES = ("float16", "bfloat16", "float32")  # mlx_lm.convert's MODEL_CONVERSION_DTYPES


class _CastingLoader(StreamingLoader):
    """Casts float tensors to ``dtype`` as they arrive, before any quantization
    (as ``mlx_lm.convert --dtype`` casts before quantizing), honouring the
    model's ``cast_predicate`` (e.g. float32 score biases kept)."""

    def __init__(self, *args, dtype):
        super().__init__(*args)
        self.dtype = dtype
        self.keep = getattr(self.model, "cast_predicate", lambda _: True)

    def cast(self, name, v):
        if isinstance(v, list):
            return [self.cast(name, x) for x in v]
        if isinstance(v, QuantizedTensor):
            c = lambda a: a if a is None else self.cast(name, a)
            return QuantizedTensor(v.weight, c(v.scales), c(v.biases), v.group_size, v.bits, v.mode)
        if self.keep(name) and mx.issubdtype(v.dtype, mx.floating):
            return v.astype(self.dtype)
        return v

    def place(self, name, value, unit):
        return super().place(name, self.cast(name, value), unit)


def _load(src, quantize, progress, requantize, dtype):
    if dtype is None:
        return load_model(src, quantize=quantize, progress=progress, requantize=requantize)
    dtype = getattr(mx, dtype)
    if folder_loader(src) is None:  # the streaming loader: cast before quantizing
        model, arch, config, ckpt = prepare(src, quantize, requantize)
        _CastingLoader(model, arch, config, ckpt, dtype=dtype).run(progress)
        model.eval()
        return model, config
    model, config = load_model(src, quantize=quantize, progress=progress, requantize=requantize)
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_unflatten([(k, v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v)
                                 for k, v in tree_flatten(model.parameters())]))
    return model, config


def dequantize_model(model):
    """Every quantized module back to float (``mlx_lm.utils.dequantize_model``,
    with our routed experts too): the weights in the scales' dtype."""
    swaps = []
    for name, m in model.named_modules():
        if not is_quantized(m):
            continue
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
        if isinstance(m, QuantizedExpertLinear):
            new = ExpertLinear.from_arrays(w, m.get("bias"))
        elif isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(*w.shape)
            new.weight = w
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            new.weight = w
            if "bias" in m:
                new.bias = m.bias
        swaps.append((name, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def convert(hf_path, mlx_path, quantize=None, force=False, max_shard_gb=5.0, progress=True,
            expert_file_layout=False, requantize=False, dtype=None, dequantize=False):
    """Write ``hf_path`` as an mlx-lm folder at ``mlx_path``; return its path.

    ``safe_write.staged_folder`` guarantees that the source and anything not
    created by this run survive (``force`` replaces an existing ``mlx_path``
    only), and that a failure leaves nothing behind. ``requantize``: experts
    that arrive quantized (gpt-oss MXFP4, mlx-lm folders) are kept as they are
    unless it is set. ``dtype`` (``"float16"``, ``"bfloat16"``, ``"float32"``):
    float tensors cast before quantizing (``mlx_lm.convert --dtype``; unlike
    mlx-lm, None keeps each tensor's own dtype rather than config's
    ``torch_dtype``). ``dequantize``: write every quantized module back in float
    (``mlx_lm.convert -d``). ``quantize`` may name a recipe (``mlx_moe.recipes``).
    """
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dequantize and quantize is not None:
        raise UsageError("choose either quantize or dequantize, not both")
    if expert_file_layout and (dtype is not None or dequantize):
        raise UsageError("--expert-file-layout cannot be combined with --dtype or --dequantize yet")
    dst = check_destination(mlx_path)  # absolute: ``.`` is renamed away at the swap
    refuse_existing(dst, force)  # before a possible download
    src = resolve_path(hf_path)
    layout = folder_loader(src)
    if expert_file_layout and layout is not None and layout.save_tokenizer is not None:
        raise UsageError(f"{src}: --expert-file-layout reads safetensors folders; convert this file "
                         "to an mlx-lm folder first, then that folder with --expert-file-layout")
    with staged_folder(dst, src, force) as tmp:
        if expert_file_layout:  # routed experts in aligned per-layer files (mlx_moe.offload)
            config = write_offload_folder(src, tmp, quantize, max_shard_gb, progress, requantize=requantize)
        else:
            model, config = _load(src, quantize, progress, requantize, dtype)
            if dequantize:
                config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
                model = dequantize_model(model)
            save_sharded(tree_flatten(model.parameters()), tmp, int(max_shard_gb * (1 << 30)))
        if layout is not None and layout.save_tokenizer is not None:  # a GGUF file: no side files
            layout.save_tokenizer(src, tmp)
        for pattern in SIDE_FILES if src.is_dir() else ():
            for f in src.glob(pattern):
                if f.name not in NOT_COPIED:
                    shutil.copy2(f, tmp / f.name)
        with writing(tmp / "config.json") as f:
            f.write_text(json.dumps(config, indent=4, sort_keys=True))
    return dst


PROG = "mlx_moe.convert"


def main(argv=None):
    """Parse ``argv`` and convert; errors raise (``cli`` is the command line)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--hf-path", required=True, help="source folder or Hugging Face repo id owner/name")
    p.add_argument("--mlx-path", required=True, help="destination folder")
    add_quantize_args(p, "quantize")
    p.add_argument("--quant-predicate", default=None, choices=RECIPES, metavar="RECIPE",
                   help="mixed-bit recipe: mlx-lm's " + ", ".join(RECIPES[:4]) + ", or ours, " + ", ".join(RECIPES[4:])
                        + " (routed experts 4 bits; attention, routers, shared experts 8; mlx_moe/recipes.py); "
                        "affine only; implies -q")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="cast float weights to this type before quantizing (default: keep the source's)")
    p.add_argument("-d", "--dequantize", action="store_true", help="write a quantized model back in float")
    p.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="largest safetensors shard (default: 5)")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--requantize", action="store_true",
                   help="with -q, also re-quantize experts that are already quantized (gpt-oss MXFP4); "
                        "by default they are kept as they are, as mlx_lm.convert does")
    p.add_argument("--expert-file-layout", action="store_true",
                   help="write routed experts as aligned per-layer expert files for --expert-budget "
                        "(docs/OFFLOAD.md); such a folder loads in mlx-moe only, not mlx-lm")
    add_verbose(p)
    args = p.parse_args(dash_values(p, sys.argv[1:] if argv is None else list(argv)))
    quantize = quantize_spec(p, args)
    if args.quant_predicate:
        if quantize is None:
            quantize = {"bits": None, "group_size": None, "mode": "affine"}
        if quantize["mode"] != "affine":
            p.error(f"argument --quant-predicate: recipes support only --q-mode affine, not {quantize['mode']}")
        quantize["recipe"] = args.quant_predicate
    if args.dequantize and quantize is not None:
        p.error("argument -d/--dequantize: not allowed with -q/--quantize (choose one)")
    if args.expert_file_layout and (args.dtype or args.dequantize):
        p.error("argument --expert-file-layout: not allowed with --dtype or -d/--dequantize yet")
    dst = convert(args.hf_path, args.mlx_path, quantize, args.force, args.max_shard_gb,
                  expert_file_layout=args.expert_file_layout, requantize=args.requantize,
                  dtype=args.dtype, dequantize=args.dequantize)
    print(f"Saved {dst}")


def cli(argv=None):
    """The ``mlx_moe.convert`` command: exits 0, 2 (user error) or 130 (interrupted)."""
    sys.exit(run(PROG, main, argv))


if __name__ == "__main__":
    cli()
