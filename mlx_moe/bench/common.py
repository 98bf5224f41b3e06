"""What every benchmark of ``mlx_moe.bench`` shares: units, statistics and
the interleaving of repeats, the usage error, and the Linux process and
page-cache probes."""

import functools
import gc
import os
import statistics
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import mlx.core as mx

from ..kernels.common import gpu_backend

GB = 1e9


class UsageError(SystemExit):
    """A mistake in the command line. The CLI prints ``mlx_moe.bench: error:
    <message>`` and exits 2; a SystemExit so that a library caller who does
    not catch it still stops with the message."""


def on_gpu() -> bool:
    return gpu_backend() is not None


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def sample_stats(xs: Sequence[float]) -> dict:
    """Median, min, max, every sample and the spread (max - min) / median of
    repeated measurements: a ratio between two figures means little when
    their spreads are wider than its distance from 1."""
    xs = [float(x) for x in xs]
    med = median(xs)
    return {"median": med, "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / med if med else float("nan"), "samples": xs}


def fmt_range(st: dict, fmt: str = ".1f") -> str:
    """``median (min–max)`` of :func:`sample_stats`, for the text tables."""
    return f"{st['median']:{fmt}} ({st['min']:{fmt}}–{st['max']:{fmt}})"


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict:
    """``num`` / ``den`` of paired samples (one pair per interleaved round): the
    ratio of the medians, and the min and max of the per-round ratios."""
    per_round = [a / b for a, b in zip(num, den)]
    return {"median": median(num) / median(den), "round_min": min(per_round), "round_max": max(per_round),
            "rounds": per_round}


def interleaved_order(impls: Sequence[str], round_index: int) -> list:
    """The order of ``impls`` in repeat ``round_index``: reversed every other
    round, so no implementation always runs first (after a pause, on a fresher
    or a hotter machine) and neighbours stay neighbours (the per-round ratio
    compares runs seconds apart)."""
    return list(impls) if round_index % 2 == 0 else list(reversed(impls))


def release_memory() -> None:
    """Between timed runs: free Python garbage and MLX's buffer cache, so the
    allocator state one run leaves does not speed up or slow down the next."""
    gc.collect()
    mx.clear_cache()


def speedup(ours_seconds: float, ref_seconds: float) -> float:
    """mlx-lm's time / ours: > 1 means ours is faster."""
    return ref_seconds / ours_seconds


def parse_list(text, cast=str) -> Optional[list]:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return list(text)
    return [cast(t.strip()) for t in str(text).split(",") if t.strip()]


@functools.lru_cache(maxsize=None)
def gen_rate(dtype) -> float:
    """Elements per second this device generates + quantizes random weights at
    (to skip layers and models that would take too long to build)."""
    from ..synthetic import random_quantized

    n = 1 << 22 if not on_gpu() else 1 << 26
    random_quantized("calibration", (n // 1024, 1024), 64, 4, dtype=dtype)  # warm-up
    t0 = time.perf_counter()
    random_quantized("calibration2", (n // 1024, 1024), 64, 4, dtype=dtype)
    return n / (time.perf_counter() - t0)


def drop_page_cache(files: Iterable) -> bool:
    """Ask the kernel to drop ``files`` from the page cache, so the next read
    hits the disk. False where it could not (no posix_fadvise, a file not
    readable)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                try:
                    os.fsync(fd)  # dirty pages cannot be dropped
                except OSError:
                    pass
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            ok = False
    return ok


def proc_status(key: str) -> Optional[int]:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
