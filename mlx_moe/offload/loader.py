"""Loading expert-file folders (resident or budgeted) and writing them."""

import atexit
import math
import weakref
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..experts import PROJECTIONS, MoEExperts, QuantizedExpertLinear
from ..loading import (
    FolderLoader,
    StreamingLoader,
    load_config,
    plan,
    prepare,
    resolve_path,
    set_backend,
)
from ..models import MoEBlock, build_model
from ..quantization import apply_plan, module_params
from ..safetensors_io import Checkpoint, CheckpointError, save_sharded
from .cache import ExpertCache
from .layout import INDEX, ExpertFileError, ExpertFileWriter, ExpertIndex, is_offload_folder
from .module import OffloadedExperts

# Options of ExpertCache a caller may pass through ``expert_options``.
OPTIONS = ("io_threads", "io_mode", "verify", "predictor", "lookahead", "half_life",
           "pin_fraction", "pin_ratio", "decode_max_tokens", "track_all_predictors")


def parse_budget(budget, routed_bytes: int) -> Optional[int]:
    """Budget in bytes from GB (float / "12", "12GB") or a share of the routed experts
    ("50%"); a ValueError naming the value unless it is a positive finite number."""
    if budget is None:
        return None
    share = False
    if isinstance(budget, str):
        b = budget.strip().lower()
        share = b.endswith("%")
        if share:
            b = b[:-1]
        elif b.endswith("gb"):
            b = b[:-2]
        try:
            value = float(b)
        except ValueError:
            raise ValueError(
                f"expert budget {budget!r} is not a number of GB (e.g. 12 or 12GB) "
                "or a share of the routed experts (e.g. 50%)"
            ) from None
    elif isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = float(budget)
    else:
        raise ValueError(f"expert budget must be a number of GB or a string such as '50%', got {budget!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expert budget must be a positive finite {'share' if share else 'number of GB'}, got {budget!r}")
    if share:
        return int(value / 100 * routed_bytes)
    return int(round(value * 1e9))


def top_k(config) -> int:
    for key in ("num_experts_per_tok", "experts_per_token", "moe_topk"):
        if config.get(key):
            return int(config[key])
    raise ValueError("config has no num_experts_per_tok: cannot size the expert budget")


def moe_blocks(model, arch):
    out = {}
    for idx, layer in enumerate(model.layers):
        block = getattr(layer, arch.moe_attr, None)
        if isinstance(block, MoEBlock):
            out[idx] = block
    return out


def _quantize_experts(experts: MoEExperts, entry, layer):
    """Give the lazy experts module the index's quantization and check shapes."""
    for proj in PROJECTIONS:
        q = entry.quantization.get(proj)
        m = experts[proj]
        if q and not isinstance(m, QuantizedExpertLinear):
            setattr(experts, proj, m.to_quantized(**q))
    for t in entry.tensors:
        proj, attr = t.name.split(".")
        arr = experts[proj].get(attr) if attr in experts[proj] else None
        if arr is None or tuple(arr.shape[1:]) != tuple(t.shape) or arr.shape[0] != entry.num_experts:
            raise ExpertFileError(
                f"layer {layer}: expert tensor {t.name} in the expert file has shape "
                f"{[entry.num_experts, *t.shape]} but the model expects "
                f"{None if arr is None else list(arr.shape)}",
                layer=layer,
            )


class _Loader(StreamingLoader):
    """Non-expert tensors from safetensors; experts from the expert file (resident)
    or not at all (budgeted: they stream at run time)."""

    def __init__(self, model, arch, config, ckpt, index, resident):
        super().__init__(model, arch, config, ckpt)
        self.index, self.resident = index, resident

    def load_experts(self, layer, block, names):
        if self.resident and layer in self.index.layers:
            arrays = self.index.read_layer(layer)
            base = f"model.layers.{layer}.{self.arch.experts_prefix}"
            for proj in PROJECTIONS:
                self.place_all({f"{base}.{k}": arrays.pop(k) for k in list(arrays) if k.startswith(proj + ".")})
        return set()


def _q_flag(folder) -> str:
    """`` -q`` for the convert command we suggest, unless the folder is already an
    mlx-lm quantized one (-q would only say it keeps what is quantized)."""
    try:
        return "" if "quantization" in load_config(folder) else " -q"
    except (OSError, ValueError):
        return " -q"


def load_offloaded(path_or_repo, expert_budget_gb=None, quantize=None, backend="auto",
                   progress=False, expert_options: Optional[dict] = None, requantize=False):
    """Load an expert-file folder: resident (``expert_budget_gb=None``) or with the
    routed experts streamed through a cache of ``expert_budget_gb`` GB (or "50%").
    ``requantize`` is refused with ``quantize`` below: such a folder is converted already."""
    folder = resolve_path(path_or_repo)
    if not is_offload_folder(folder):
        raise ValueError(
            f"{folder}: expert_budget_gb needs a folder in the expert-file layout; write one with "
            f"`python -m mlx_moe.convert --hf-path {folder} --mlx-path OUT{_q_flag(folder)} --expert-file-layout`"
        )
    if quantize is not None or requantize:
        raise ValueError(
            f"{folder} is already converted (expert-file layout); load it without quantize, "
            "or convert from the original weights"
        )
    options = dict(expert_options or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"Unknown expert options {sorted(unknown)}; expected some of {OPTIONS}")
    config = load_config(folder)
    index = ExpertIndex(folder)
    budget = parse_budget(expert_budget_gb, index.routed_bytes())
    model, arch = build_model(config)
    blocks = moe_blocks(model, arch)
    if set(blocks) != set(index.layers):
        missing = sorted(set(blocks) - set(index.layers))
        extra = sorted(set(index.layers) - set(blocks))
        raise ExpertFileError(
            f"{folder / INDEX}: MoE layers {missing} have no expert file entry"
            + (f"; entries for non-MoE layers {extra}" if extra else ""),
            layer=(missing or extra or [None])[0],
        )
    for idx, block in blocks.items():
        _quantize_experts(block.routed, index.layers[idx], idx)
    cache = None
    if budget is not None:
        cache = ExpertCache(index, budget, top_k(config), **options)
        order = sorted(blocks)
        for i, idx in enumerate(order):
            block = blocks[idx]
            old = block.routed
            new = OffloadedExperts(cache, idx, old.num_experts, old.hidden_size,
                                   old.intermediate_size, old.activation_name, backend)
            setattr(block, block.experts_attr, new)
        for i, idx in enumerate(order):
            if i + 1 < len(order):
                blocks[idx].routed._next_route = blocks[order[i + 1]].route
    ckpt = Checkpoint(folder)
    module_plan, config = plan(model, config, ckpt, None)
    apply_plan(model, module_plan)
    set_backend(model, backend)
    try:
        _Loader(model, arch, config, ckpt, index, resident=cache is None).run(progress)
        if cache is not None and cache.full:
            cache.preload_all()
    except BaseException:
        if cache is not None:
            cache.shutdown()
        raise
    model.eval()
    if cache is not None:
        model.expert_cache = cache
        _register(cache)
    return model, config


def claims(folder, expert_budget_gb) -> bool:
    """``load_model`` hands a folder here when a budget is asked for (refused
    below if the folder is not in the expert-file layout) or it is one."""
    return expert_budget_gb is not None or is_offload_folder(folder)


# Registered with ``mlx_moe.loading`` by ``mlx_moe/__init__.py``.
FOLDER_LOADER = FolderLoader(claims, load_offloaded)

_LIVE = weakref.WeakSet()


def _register(cache):
    _LIVE.add(cache)


@atexit.register
def _shutdown_all():
    for c in list(_LIVE):
        try:
            c.shutdown()
        except Exception:  # noqa: BLE001 -- best effort at exit
            pass


def get_cache(model) -> Optional[ExpertCache]:
    return getattr(model, "expert_cache", None)


def stats(model) -> Optional[dict]:
    """The expert cache's statistics (None for a resident model)."""
    c = get_cache(model)
    return None if c is None else c.summary()


def close(model):
    """Stop the reader threads and close the expert files of ``model``."""
    c = get_cache(model)
    if c is not None:
        c.shutdown()


# ------------------------------------------------------------------ writing


class _WritingLoader(StreamingLoader):
    """Streams the source; each layer's experts go to the expert file, then are dropped."""

    def __init__(self, model, arch, config, ckpt, writer: ExpertFileWriter):
        super().__init__(model, arch, config, ckpt)
        self.writer = writer
        self.expert_names = set()

    def load_experts(self, layer, block, names):
        consumed = super().load_experts(layer, block, names)
        if not consumed:
            return consumed
        experts = block.routed
        base = f"model.layers.{layer}.{self.arch.experts_prefix}"
        arrays, quant = {}, {}
        for proj in PROJECTIONS:
            m = experts[proj]
            quant[proj] = module_params(m) if isinstance(m, QuantizedExpertLinear) else None
            for attr in ("weight", "scales", "biases", "bias"):
                if attr in m and m[attr] is not None:
                    arrays[f"{proj}.{attr}"] = m[attr]
        self.writer.write_layer(layer, base, arrays, quant)
        for name in arrays:
            proj, attr = name.split(".")
            experts[proj][attr] = mx.zeros((0,), dtype=arrays[name].dtype)
            self.expert_names.add(f"{base}.{name}")
        del arrays
        mx.clear_cache()
        return consumed


def write_offload_folder(hf_path, dst, quantize=None, max_shard_gb=5.0, progress=True,
                         requantize=False) -> dict:
    """Convert ``hf_path`` into ``dst`` (an existing empty folder) in the expert-file
    layout; returns the config to save. Peak memory: one layer's experts."""
    src = resolve_path(hf_path)
    if is_offload_folder(src):
        raise ValueError(f"{src} is already in the expert-file layout")
    model, arch, config, ckpt = prepare(src, quantize, requantize)
    dst = Path(dst)
    writer = ExpertFileWriter(dst)
    loader = _WritingLoader(model, arch, config, ckpt, writer)
    loader.run(progress)
    if not writer.layers:
        raise CheckpointError(f"{src}: no routed experts found; the expert-file layout needs an MoE model")
    rest = [(k, v) for k, v in tree_flatten(model.parameters()) if k not in loader.expert_names]
    save_sharded(rest, dst, int(max_shard_gb * (1 << 30)))
    writer.finish()
    config = dict(config)
    config["mlx_moe_expert_files"] = str(INDEX)
    return config
