"""Streaming, quantize-on-load model loading.

The model skeleton is built lazily (no memory), its modules are swapped for
quantized ones according to the plan, then the checkpoint is read one decoder
layer at a time: experts are stacked, quantized and evaluated, and the source
tensors released before the next layer. Peak memory stays near the final
quantized size plus one layer's source tensors.

Other folder layouts (``mlx_moe.offload``'s expert files) build on this module
and register a ``FolderLoader`` that ``load_model`` tries first; the package's
``__init__`` registers them, so this module never imports them.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer

from . import hub
from .adapters import load_adapters
from .cli import UsageError, notice
from .config_checks import ConfigError, check_config
from .experts import PROJECTIONS, MoEExperts
from .formats import EXTRA_CONTAINERS, ExpertContext, dequantize_fp8_rest, extract_experts
from .models import MoEBlock, build_model
from .models.base import Architecture
from .quantization import (
    QuantizedTensor,
    QuantSpec,
    apply_plan,
    config_entry,
    is_quantized,
    module_params,
    plan_quantization,
)
from .safetensors_io import Checkpoint, CheckpointError

# Per-expert sources are quantized and evaluated this many at a time.
EVAL_EXPERTS = 8
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
DEFAULT_MODEL = Path(__file__).parent / "default_model"


def resolve_path(path_or_repo) -> Path:
    """A local folder, or a Hugging Face repo id downloaded to the local cache.

    A name that looks local (``/``, ``./``, ``~``, no ``owner/name`` form, or
    whose parent exists) is never sent to the Hub: a clear "no such folder"
    instead. Hub look-ups are bounded in time and honour ``HF_HUB_OFFLINE``
    (``mlx_moe.hub``).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() and folder_loader(path) is not None:  # a model file, e.g. x.gguf
        return path
    if path.exists():
        raise NotADirectoryError(f"{path}: not a folder (a model folder holds config.json and *.safetensors)")
    reason = "a path" if isinstance(path_or_repo, Path) else hub.local_reason(str(path_or_repo))
    if reason is not None:
        hint = "" if reason == "a path" else f" ({reason})"
        raise FileNotFoundError(f"no such folder: {path_or_repo}{hint}")
    return hub.download(str(path_or_repo), HUB_PATTERNS)


def load_config(folder: Path) -> dict:
    """``folder``'s config.json, checked (``mlx_moe.config_checks``): errors name the file."""
    f = Path(folder) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{f}: not UTF-8 text (byte {e.start})") from None
    # Multimodal wrappers keep the LM config under text_config.
    if isinstance(config, dict) and "model_type" not in config and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], **{k: v for k, v in config.items() if k != "text_config"}}
    check_config(config, f)
    return config


def _expert_modules(model):
    """Paths of the quantizable projections inside routed-expert layers."""
    return {
        f"{path}.{proj}"
        for path, m in model.named_modules()
        if isinstance(m, MoEExperts)
        for proj in PROJECTIONS
    }


def plan(model, config: dict, ckpt: Checkpoint, spec: Optional[QuantSpec], requantize: bool = False):
    """Decide each module's quantization; return ``(plan, config to save)``.

    Weights that arrive quantized are kept as they are, as mlx-lm keeps them:
    re-quantizing them only loses accuracy. ``spec`` then applies to the
    modules still in float; ``requantize`` re-quantizes gpt-oss's MXFP4 experts
    to ``spec`` too (an mlx-lm folder's packed weights cannot be: their
    original values are gone).
    """
    config = dict(config)
    qcfg = config.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if "quantization" in config:
        return _plan_mlx_folder(model, config, ckpt, spec, requantize)

    config.pop("quantization_config", None)  # fp8 / mxfp4 sources are rewritten below
    result = plan_quantization(model, spec) if spec else {}
    entry = config_entry(spec, result) if spec else None
    if method == "mxfp4":
        keep = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        if spec is None or spec.params() == keep or not requantize:
            experts = _expert_modules(model)
            result.update({p: keep for p in experts})
            # mlx-lm's entry for mxfp4 experts under -q: the kept format on top,
            # every module quantized by -q listed by path.
            entry = {**keep, **{p: v for p, v in result.items() if p not in experts}}
            if spec is not None and spec.params() != keep:
                notice(
                    f"{ckpt.folder}: the routed experts are already MXFP4 and are kept as they are "
                    f"({_describe(spec.params())} applies to the other layers; --requantize "
                    "re-quantizes the experts too)"
                )
    elif method not in (None, "fp8"):
        raise ValueError(f"Unsupported checkpoint quantization method '{method}'")
    if result:
        config["quantization"] = entry
        config["quantization_config"] = config["quantization"]
    return result, config


def _plan_mlx_folder(model, config, ckpt, spec, requantize):
    """An mlx-format folder: rebuild exactly what was saved (mlx-lm's rule); ``spec``
    quantizes only what is still float, recorded by path (as ``mlx_lm.convert -q``)."""
    q = config["quantization"]
    default = {k: q[k] for k in ("group_size", "bits") if k in q} | {"mode": q.get("mode", "affine")}
    result = {}
    for path, m in model.named_modules():
        if not hasattr(m, "to_quantized"):
            continue
        if isinstance(q.get(path), dict):
            result[path] = {**default, **q[path]}
        elif f"{path}.scales" in ckpt:
            result[path] = default
    if spec is None:
        return result, config
    if requantize:
        raise UsageError(
            f"{ckpt.folder} is already quantized ({_describe(default)}); its original weights are "
            "needed to re-quantize: convert from them, or drop --requantize to keep what is quantized"
        )
    added = {p: v for p, v in plan_quantization(model, spec).items() if p not in result}
    notice(
        f"{ckpt.folder} is already quantized ({_describe(default)}): its {len(result)} quantized "
        f"layers are kept as they are; "
        + (f"{_describe(spec.params())} applies to the {len(added)} others" if added else "nothing else to quantize")
    )
    if added:
        config["quantization"] = {**q, **added}
        config["quantization_config"] = config["quantization"]
    return {**result, **added}, config


def _describe(params: dict) -> str:
    return f"{params['mode']} {params['bits']}-bit, group size {params['group_size']}"


class StreamingLoader:
    """Moves one decoder layer at a time from the checkpoint into the model."""

    def __init__(self, model, arch: Architecture, config: dict, ckpt: Checkpoint):
        self.model, self.arch, self.config, self.ckpt = model, arch, config, ckpt
        self.modules = dict(model.named_modules())
        self.expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
        self.loaded = set()
        block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
        self.fp8_block = tuple(block)

    def units(self):
        """Checkpoint names grouped by decoder layer (``None`` for the rest)."""
        groups: Dict[Optional[int], list] = {}
        for name in self.ckpt.names():
            m = LAYER_RE.match(name)
            groups.setdefault(int(m.group(1)) if m else None, []).append(name)
        n_layers = len(self.model.layers)
        # Layers past the model (e.g. DeepSeek's multi-token-prediction layer) are not ours.
        return [(k, groups[k]) for k in sorted(groups, key=lambda k: -1 if k is None else k) if k is None or k < n_layers]

    def run(self, progress=True):
        units = self.units()
        try:
            from tqdm import tqdm

            units = tqdm(units, desc="Loading", unit="layer", disable=not progress)
        except ImportError:
            pass
        for layer, names in units:
            self.load_unit(layer, names)
            self.ckpt.release()
            mx.clear_cache()
        missing = sorted(set(self.expected) - self.loaded)
        if missing:
            raise CheckpointError(
                f"{self.ckpt.folder}: {len(missing)} model tensors not found in the checkpoint: "
                + ", ".join(missing[:20])
                + (" ..." if len(missing) > 20 else "")
            )

    def load_unit(self, layer, names):
        rest = set(names)
        if layer is not None:
            block = getattr(self.model.layers[layer], self.arch.moe_attr)
            if isinstance(block, MoEBlock):
                rest -= self.load_experts(layer, block, names)
        tensors = {n: self.ckpt.get(n) for n in sorted(rest)}
        tensors = dequantize_fp8_rest(tensors, self.fp8_block)
        if hasattr(self.model, "sanitize"):
            tensors = self.model.sanitize(tensors)
        self.place_all(tensors)

    def load_experts(self, layer, block, names):
        prefix = f"model.layers.{layer}."
        rel = {n[len(prefix):] for n in names}
        experts = block.routed
        layout = self.arch.layout
        ctx = ExpertContext(
            layer=layer,
            names=rel,
            get=lambda n: self.ckpt.get(prefix + n),
            shape=lambda n: self.ckpt.shapes[prefix + n],
            ours=self.arch.experts_prefix,
            containers=layout.hf_containers + EXTRA_CONTAINERS,
            proj_names=layout.proj_names,
            num_experts=experts.num_experts,
            hidden=experts.hidden_size,
            intermediate=experts.intermediate_size,
            orientation=layout.stacked_orientation,
            gate_up=layout.gate_up,
            fp8_block=self.fp8_block,
        )
        values = extract_experts(ctx)
        base = prefix + self.arch.experts_prefix
        # One projection at a time keeps only one stacked source tensor alive.
        for proj in PROJECTIONS:
            self.place_all({f"{base}.{k}": v for k, v in values.items() if k.startswith(proj + ".")})
            for k in [k for k in values if k.startswith(proj + ".")]:
                del values[k]
        return {prefix + n for n in ctx.consumed}

    def place_all(self, tensors):
        placed = []
        for name, value in tensors.items():
            placed += self.place(name, value, tensors)
        mx.eval(placed)

    def place(self, name, value, unit):
        path, attr = name.rsplit(".", 1)
        module = self.modules.get(path)
        if module is None:
            raise CheckpointError(
                f"{self.ckpt.folder}: checkpoint tensor '{name}' has no place in the "
                f"{self.config.get('model_type')} model"
            )
        quantize_here = is_quantized(module) and attr == "weight" and f"{path}.scales" not in unit
        if isinstance(value, QuantizedTensor):
            if quantize_here and value.params == module_params(module):
                return self._set(module, path, {"weight": value.weight, "scales": value.scales, "biases": value.biases})
            value = value.dequantize()
        if quantize_here:
            p = module_params(module)
            parts = value if isinstance(value, list) else [value]
            qs = []
            for i, v in enumerate(parts):
                qs.append(mx.quantize(v, p["group_size"], p["bits"], mode=p["mode"]))
                parts[i] = None
                if (i + 1) % EVAL_EXPERTS == 0:
                    # Bound how many source experts are read ahead of their quantization.
                    mx.eval(qs[-EVAL_EXPERTS:])
            if isinstance(value, list):  # per-expert sources: quantize, then stack
                qs = [[mx.stack(t) for t in zip(*qs)]]
            w, scales, *biases = qs[0]
            return self._set(module, path, {"weight": w, "scales": scales, "biases": biases[0] if biases else None})
        if isinstance(value, list):
            value = mx.stack(value)
        return self._set(module, path, {attr: value})

    def _set(self, module, path, arrays):
        out = []
        for attr, arr in arrays.items():
            if arr is None:
                continue
            name = f"{path}.{attr}"
            want = self.expected.get(name)
            if want is None:
                raise CheckpointError(f"{self.ckpt.folder}: tensor '{name}' has no place in the model")
            if tuple(arr.shape) != tuple(want):
                raise CheckpointError(
                    f"{self.ckpt.folder}: tensor '{name}' has shape {list(arr.shape)}, "
                    f"expected {list(want)}"
                )
            module[attr] = arr
            self.loaded.add(name)
            out.append(arr)
        return out


@dataclass(frozen=True)
class FolderLoader:
    """A layout ``load_model`` hands over to: ``claims(path, expert_budget_gb)``
    says the layout applies, ``load(path, expert_budget_gb, quantize, backend,
    progress, expert_options, requantize=...)`` returns ``(model, config)``.

    Layouts that carry their tokenizer inside (GGUF) also give
    ``tokenizer(path)`` (an mlx-lm ``TokenizerWrapper``) and
    ``save_tokenizer(path, out_dir)`` (the files ``convert`` writes instead of
    copying a folder's side files)."""

    claims: Callable
    load: Callable
    tokenizer: Optional[Callable] = None
    save_tokenizer: Optional[Callable] = None


# name -> FolderLoader, tried in registration order before the plain layout.
FOLDER_LOADERS: Dict[str, FolderLoader] = {}


def register_folder_loader(name: str, loader: FolderLoader):
    FOLDER_LOADERS[name] = loader


# mlx_moe.distributed builds on this module; mlx_moe/__init__ registers its
# ``load_parallel(folder, group, parallel, quantize, backend, progress, requantize)``.
PARALLEL_LOADER: Dict[str, Callable] = {}


def register_parallel_loader(load: Callable):
    PARALLEL_LOADER["load"] = load


def folder_loader(path: Path, expert_budget_gb=None) -> Optional[FolderLoader]:
    """The registered layout that claims ``path``, or None for a plain folder."""
    return next((l for l in FOLDER_LOADERS.values() if l.claims(path, expert_budget_gb)), None)


def load_model(
    path_or_repo=None,
    quantize=None,
    backend: str = "auto",
    progress: bool = False,
    expert_budget_gb=None,
    expert_options=None,
    requantize: bool = False,
    group=None,
    parallel=None,
):
    """Load a model, quantizing while streaming if ``quantize`` is given.

    ``quantize``: None (keep the checkpoint's precision) or e.g.
    ``{"bits": 4, "group_size": 64, "mode": "affine"}``. Returns ``(model, config)``
    where ``config`` is what a converted folder's config.json should hold.
    ``expert_budget_gb`` (GB, or e.g. ``"50%"``): keep only that much of the routed
    experts in memory and stream the rest from disk (``mlx_moe.offload``; needs a
    folder converted with ``--expert-file-layout``, which also loads without it).
    Weights that arrive quantized are kept under ``quantize`` unless ``requantize``
    (see ``plan``). ``parallel="ep"`` with ``group`` (an ``mx.distributed`` group):
    this rank's share of the model (``mlx_moe.distributed``).
    """
    folder = resolve_path(path_or_repo or DEFAULT_MODEL)
    if parallel is not None:
        if expert_budget_gb is not None:
            raise ValueError("expert_budget_gb and parallel cannot be combined yet")
        if PARALLEL_LOADER.get("load") is None:
            raise ValueError("parallel= needs mlx_moe.distributed's loader (import mlx_moe)")
        return PARALLEL_LOADER["load"](folder, group, parallel, quantize, backend, progress, requantize)
    loader = folder_loader(folder, expert_budget_gb)
    if loader is not None:
        return loader.load(folder, expert_budget_gb, quantize, backend, progress, expert_options,
                           requantize=requantize)
    if expert_budget_gb is not None:
        raise ValueError("expert_budget_gb needs mlx_moe.offload's folder loader (import mlx_moe)")
    model, arch, config, ckpt = prepare(folder, quantize, requantize)
    set_backend(model, backend)
    StreamingLoader(model, arch, config, ckpt).run(progress)
    model.eval()
    return model, config


def prepare(folder: Path, quantize=None, requantize: bool = False):
    """The lazy model skeleton with its quantization applied, ready to be filled:
    ``(model, arch, config to save, checkpoint)``. Reads headers only."""
    config = load_config(folder)
    spec = QuantSpec.parse(quantize)
    ckpt = Checkpoint(folder)
    model, arch = build_model(config)
    module_plan, config = plan(model, config, ckpt, spec, requantize)
    apply_plan(model, module_plan)
    return model, arch, config, ckpt


def set_backend(model: nn.Module, backend: str):
    for _, m in model.named_modules():
        if isinstance(m, MoEExperts):
            m.backend = backend


# A folder has a usable tokenizer if it holds one of these (or a *.tiktoken file).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_tokenizer_files(folder: Path):
    """FileNotFoundError naming the expected files when ``folder`` has no tokenizer
    (transformers would quietly build an empty one: every prompt -> [])."""
    names = {p.name for p in Path(folder).iterdir()}
    if names & set(TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names):
        return
    raise FileNotFoundError(
        f"{folder}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}, *.tiktoken); copy them "
        "from the original model (mlx_moe.load_model loads the weights without a tokenizer)"
    )


def load(path_or_repo=None, quantize=None, backend="auto", progress=True, expert_budget_gb=None, expert_options=None,
         adapter_path=None, group=None, parallel=None):
    """``model, tokenizer = mlx_moe.load(path_or_hub_id, quantize=..., expert_budget_gb=...)``;
    ``group=mx.distributed.init(), parallel="ep"``: this rank's share (``load_model``).

    ``adapter_path``: an ``mlx_lm.lora`` adapter folder, applied unfused (``mlx_moe.adapters``)."""
    folder = resolve_path(path_or_repo or DEFAULT_MODEL)
    own_tokenizer = getattr(folder_loader(folder, expert_budget_gb), "tokenizer", None)
    if own_tokenizer is None:
        check_tokenizer_files(folder)
    model, config = load_model(
        folder, quantize=quantize, backend=backend, progress=progress,
        expert_budget_gb=expert_budget_gb, expert_options=expert_options, group=group, parallel=parallel,
    )
    if adapter_path is not None:
        if expert_budget_gb is not None:
            raise UsageError("LoRA adapters (adapter_path) cannot be combined with an expert budget")
        load_adapters(model, adapter_path)
    if own_tokenizer is not None:
        return model, own_tokenizer(folder)
    eos = config.get("eos_token_id")
    tokenizer = load_tokenizer(folder, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return model, tokenizer
