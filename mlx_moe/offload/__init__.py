"""Experts beyond memory: a budgeted expert cache with prefetch.

``mlx_moe.load(folder, expert_budget_gb=X)`` keeps attention, norms,
embeddings, routers and shared experts resident and streams the routed experts
from an expert-file folder (``python -m mlx_moe.convert ... --expert-file-layout``)
through a preallocated pool of ``X`` GB (or ``"50%"`` of the routed experts).
See docs/OFFLOAD.md.
"""

from .cache import ExpertCache
from .layout import ExpertFileError, ExpertIndex, ExpertFileWriter, is_offload_folder
from .loader import FOLDER_LOADER, close, get_cache, load_offloaded, parse_budget, stats, write_offload_folder
from .module import OffloadedExperts
from .prefetch import PREDICTORS


def format_stats(s: dict) -> str:
    """A few human lines from ``stats(model)``."""
    if not s:
        return ""
    d = s["decode"]
    acc = ", ".join(f"{k} {v:.0%}" for k, v in s["prediction_accuracy"].items() if v is not None)
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"
    num = lambda v, f: "n/a" if v is None else format(v, f)
    return "\n".join([
        f"Expert cache: {s['pool_gb']:.2f} GB pool ({s['slots']} of {s['experts']} experts), "
        f"{s['pinned']} pinned, io {s['io_mode']}, predictor {s['predictor']}",
        f"Decode: hit rate {pct(d['hit_rate'])}, read {d['bytes_read'] / 1e9:.2f} GB "
        f"at {num(d['read_gbps'], '.2f')} GB/s, stall {num(d['stall_ms_per_token'], '.1f')} ms/token, "
        f"prefetch {d['prefetch_used']}/{d['prefetch_issued']} used",
        f"Prediction accuracy: {acc or 'n/a'}",
    ])


__all__ = [
    "ExpertCache", "ExpertFileError", "ExpertFileWriter", "ExpertIndex", "FOLDER_LOADER", "OffloadedExperts",
    "PREDICTORS", "close", "format_stats", "get_cache", "is_offload_folder", "load_offloaded",
    "parse_budget", "stats", "write_offload_folder",
]
