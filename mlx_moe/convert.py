"""``mlx_moe.convert``: write an mlx-lm format folder (optionally quantized),
streaming layer by layer. The folder loads with ``mlx_lm.load`` and mlx-swift."""

import argparse
import json
import os
import shutil
from pathlib import Path

from mlx.utils import tree_flatten

from .loading import load_model, resolve_path
from .offload import write_offload_folder
from .safetensors_io import save_sharded

# Everything a model folder carries besides weights and config.
SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}


def convert(hf_path, mlx_path, quantize=None, force=False, max_shard_gb=5.0, progress=True,
            expert_file_layout=False):
    src, dst = resolve_path(hf_path), Path(mlx_path)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to replace it")
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if expert_file_layout:  # routed experts in aligned per-layer files (mlx_moe.offload)
            config = write_offload_folder(src, tmp, quantize, max_shard_gb, progress)
        else:
            model, config = load_model(src, quantize=quantize, progress=progress)
            save_sharded(tree_flatten(model.parameters()), tmp, int(max_shard_gb * (1 << 30)))
        for pattern in SIDE_FILES:
            for f in src.glob(pattern):
                if f.name not in NOT_COPIED:
                    shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst


def main(argv=None):
    p = argparse.ArgumentParser(prog="mlx_moe.convert", description=__doc__)
    p.add_argument("--hf-path", required=True, help="source folder or Hugging Face repo")
    p.add_argument("--mlx-path", required=True, help="destination folder")
    p.add_argument("-q", "--quantize", action="store_true")
    p.add_argument("--q-bits", type=int, default=None)
    p.add_argument("--q-group-size", type=int, default=None)
    p.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "nvfp4", "mxfp8"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--expert-file-layout", action="store_true",
                   help="write routed experts as aligned per-layer expert files for --expert-budget "
                        "(docs/OFFLOAD.md); such a folder loads in mlx-moe only, not mlx-lm")
    args = p.parse_args(argv)
    quantize = None
    if args.quantize:
        quantize = {"bits": args.q_bits, "group_size": args.q_group_size, "mode": args.q_mode}
    dst = convert(args.hf_path, args.mlx_path, quantize, args.force, args.max_shard_gb,
                  expert_file_layout=args.expert_file_layout)
    print(f"Saved {dst}")


if __name__ == "__main__":
    main()
