"""``mlx_moe.convert``: write an mlx-lm format folder (optionally quantized),
streaming layer by layer. The folder loads with ``mlx_lm.load`` and mlx-swift."""

import argparse
import json
import shutil
import sys

from mlx.utils import tree_flatten

from .cli import UsageError, add_quantize_args, add_verbose, dash_values, positive_float, quantize_spec, run
from .loading import folder_loader, load_model, resolve_path
from .offload import write_offload_folder
from .safe_write import check_destination, refuse_existing, staged_folder, writing
from .safetensors_io import save_sharded

# Everything a model folder carries besides weights and config.
SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}


def convert(hf_path, mlx_path, quantize=None, force=False, max_shard_gb=5.0, progress=True,
            expert_file_layout=False, requantize=False):
    """Write ``hf_path`` as an mlx-lm folder at ``mlx_path``; return its path.

    ``safe_write.staged_folder`` guarantees that the source and anything not
    created by this run survive (``force`` replaces an existing ``mlx_path``
    only), and that a failure leaves nothing behind. ``requantize``: experts
    that arrive quantized (gpt-oss MXFP4, mlx-lm folders) are kept as they are
    unless it is set.
    """
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
            model, config = load_model(src, quantize=quantize, progress=progress, requantize=requantize)
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
    dst = convert(args.hf_path, args.mlx_path, quantize, args.force, args.max_shard_gb,
                  expert_file_layout=args.expert_file_layout, requantize=args.requantize)
    print(f"Saved {dst}")


def cli(argv=None):
    """The ``mlx_moe.convert`` command: exits 0, 2 (user error) or 130 (interrupted)."""
    sys.exit(run(PROG, main, argv))


if __name__ == "__main__":
    cli()
