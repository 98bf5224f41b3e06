"""``load_model`` for GGUF files: config from metadata, the quantization plan from
the file's tensor types (or the requested target), then the same layer-by-layer
``StreamingLoader`` as safetensors — so the same memory bound holds."""

import logging
from collections import Counter
from pathlib import Path

from mlx.utils import tree_flatten

from ..loading import StreamingLoader, set_backend
from ..models import build_model
from ..quantization import QuantSpec, apply_plan, config_entry, plan_quantization
from . import quants
from .checkpoint import GGUFCheckpoint, check_types
from .config import build_config
from .names import NameMap, arch_names
from .reader import SPLIT_RE, GGUFError, GGUFFile

log = logging.getLogger("mlx_moe.gguf")


def find_gguf(path) -> Path:
    """``path`` itself if it is a ``.gguf`` file; in a folder without safetensors,
    its one GGUF model (the first part of a split one); else None."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return None
    firsts = lambda f: not SPLIT_RE.match(f.name) or SPLIT_RE.match(f.name).group("idx") == "00001"
    files = sorted(f for f in p.glob("*.gguf") if firsts(f))
    if len(files) > 1:
        raise GGUFError(f"{p}: several GGUF models {[f.name for f in files]}; pass the file's path")
    return files[0] if files else None


def file_plan(model, ckpt: GGUFCheckpoint) -> dict:
    """Each quantizable module as the file stores it: exact types at their own
    bits (group 32), lossy ones at ``quants.default_params``; float ones stay float."""
    plan = {}
    for path, module in model.named_modules():
        name = f"{path}.weight"
        if not hasattr(module, "to_quantized") or name not in ckpt:
            continue
        params = quants.default_params(ckpt.type_of(name))
        if params and module.weight.shape[-1] % params["group_size"] == 0:
            plan[path] = params
    return plan


def prepare(path, quantize=None, requantize=False):
    """``(model skeleton with its quantization applied, arch, config to save, checkpoint)``.

    No ``quantize``: every module as the file stores it (``file_plan``). With one,
    as for safetensors folders, weights that arrive quantized exactly (the types
    ``quants.native_params`` transcodes) are kept as they are and ``quantize``
    applies to the rest; ``requantize`` applies it to every module."""
    gf = GGUFFile(path)
    names = arch_names(gf.architecture, gf.path)
    check_types(gf)  # before any work
    config = build_config(gf)
    model, arch = build_model(config)
    ckpt = GGUFCheckpoint(gf, NameMap(names, arch.moe_attr, arch.experts_prefix, str(gf.path)), config)
    spec = QuantSpec.parse(quantize)
    if spec is None:
        plan = file_plan(model, ckpt)
        if plan:  # the file's most common type is the default entry
            spec = QuantSpec(**dict(Counter(tuple(sorted(p.items())) for p in plan.values()).most_common(1)[0][0]))
    else:
        plan = plan_quantization(model, spec)
        if not requantize:
            kept = {p: v for p, v in file_plan(model, ckpt).items()
                    if quants.native_params(ckpt.type_of(f"{p}.weight")) == v}
            if kept and any(plan.get(p) != v for p, v in kept.items()):
                log.warning(
                    "%s: %d modules arrive exactly quantized and are kept as they are; %s applies to the "
                    "others (requantize=True re-quantizes them too)", gf.path, len(kept), spec.params(),
                )
            plan.update(kept)
    if plan:
        config["quantization"] = config_entry(spec, plan)
        config["quantization_config"] = config["quantization"]
    apply_plan(model, plan)
    ckpt.targets = plan
    ckpt.expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    return model, arch, config, ckpt


def load_gguf(path, expert_budget_gb=None, quantize=None, backend="auto", progress=False, expert_options=None,
              requantize=False):
    """``(model, config)`` from a GGUF file (or split set, or a folder holding one);
    ``quantize`` / ``requantize`` as in ``prepare``."""
    if expert_budget_gb is not None:
        raise ValueError(
            f"{path}: expert_budget_gb needs the expert-file layout; convert the GGUF first: "
            f"python -m mlx_moe.convert --hf-path {path} --mlx-path OUT --expert-file-layout"
        )
    model, arch, config, ckpt = prepare(find_gguf(path) or path, quantize, requantize)
    set_backend(model, backend)
    StreamingLoader(model, arch, config, ckpt).run(progress)
    model.eval()
    model.gguf_requantized = dict(ckpt.report)
    if ckpt.report:
        worst = max(ckpt.report.values(), key=lambda r: r["rel_rms_error"])
        log.warning(
            "%s: %d tensors re-quantized from lossy GGUF types (%s); worst relative RMS error %.3g (%s, %s -> %s bits)",
            path, len(ckpt.report), ", ".join(sorted({r["type"] for r in ckpt.report.values()})),
            worst["rel_rms_error"], worst["gguf_name"], worst["type"], worst["to"]["bits"],
        )
    return model, config


def claims(path, expert_budget_gb=None) -> bool:
    try:
        return find_gguf(path) is not None
    except GGUFError:
        return True  # ours to refuse, with the message

