"""The tokenizer a GGUF describes (``tokenizer.ggml.*``), built by transformers' own
GGUF support, written out as ordinary HF tokenizer files, and loaded through
mlx-lm's ``load_tokenizer`` so the streaming detokenizer is chosen exactly as for
a folder.

    load_tokenizer("model.gguf")        -> mlx_lm TokenizerWrapper
    save_tokenizer("model.gguf", out)   -> tokenizer.json, tokenizer_config.json (+ chat template)
"""

import tempfile
from pathlib import Path

from .loader import find_gguf
from .reader import GGUFError, GGUFFile, split_parts


def hf_tokenizer(path):
    """A ``PreTrainedTokenizerFast`` for the GGUF at ``path`` (metadata is in the first part)."""
    gguf_path = split_parts(Path(find_gguf(path) or path))[0]
    try:  # transformers >= 5
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        convert_gguf_tokenizer = None
    from transformers import PreTrainedTokenizerFast

    if convert_gguf_tokenizer is None:
        # older transformers: the GGUF tokenizer comes with the config, same converters
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as e:
            raise GGUFError(f"{gguf_path}: transformers cannot build this GGUF's tokenizer ({e})") from None
    try:
        architecture, tokenizer_dict, config = get_gguf_tokenizer(str(gguf_path))
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError) as e:
        raise GGUFError(f"{gguf_path}: cannot build its tokenizer from tokenizer.ggml.* ({e})") from None
    kwargs = {k: v for k, v in {**config, **extra}.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _eos_ids(path):
    meta = GGUFFile(split_parts(Path(find_gguf(path) or path))[0]).metadata
    ids = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    out = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out or None


def save_tokenizer(path, out_dir) -> Path:
    """Write the GGUF's tokenizer as HF files into ``out_dir`` (what ``convert`` copies for a folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer(path).save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(path, eos_token_ids=None):
    """mlx-lm's ``TokenizerWrapper`` for the GGUF at ``path``."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    eos = eos_token_ids if eos_token_ids is not None else _eos_ids(path)
    with tempfile.TemporaryDirectory(prefix="mlx_moe_gguf_tok_") as tmp:
        save_tokenizer(path, tmp)
        return mlx_load_tokenizer(Path(tmp), eos_token_ids=eos)
