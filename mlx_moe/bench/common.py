"""What every benchmark of ``mlx_moe.bench`` shares: units, statistics, the
usage error, and the Linux process and page-cache probes."""

import functools
import os
import statistics
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

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
