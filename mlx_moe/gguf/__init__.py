"""GGUF (llama.cpp) MoE models: read with the ``gguf`` package, transcoded to MLX.

    reader      the container (single or split files), metadata, memory-mapped tensors
    names       llama.cpp tensor names -> ours per architecture; q/k row un-permutation
    config      the HF-style model config from ``{arch}.*`` metadata and tensor shapes
    quants      quant types -> exact MLX affine / mxfp4, or dequantize for re-quantization
    checkpoint  the file as a Checkpoint under our names, for the streaming loader
    loader      load_model's FolderLoader for ``.gguf`` paths
    tokenizer   the tokenizer from ``tokenizer.ggml.*`` (transformers' GGUF support)
"""

from ..loading import FolderLoader
from .loader import claims, find_gguf, load_gguf
from .reader import GGUFError, GGUFFile, is_gguf
from .tokenizer import load_tokenizer, save_tokenizer

# load_model / load / convert reach GGUF files through this (registered in mlx_moe/__init__).
FOLDER_LOADER = FolderLoader(claims, load_gguf, tokenizer=load_tokenizer, save_tokenizer=save_tokenizer)

__all__ = ["FOLDER_LOADER", "GGUFError", "GGUFFile", "find_gguf", "is_gguf", "load_gguf", "load_tokenizer", "save_tokenizer"]
