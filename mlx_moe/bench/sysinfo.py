"""The machine a benchmark ran on (recorded in every ``--json`` report) and
the memory it may use."""

import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..experts import BACKENDS
from .common import GB, on_gpu


def memory_budget() -> int:
    """Bytes this run may use: the GPU's memory, or the host's available memory."""
    info = {}
    try:
        info = mx.device_info()
    except Exception:
        pass
    if on_gpu():
        for key in ("memory_size", "total_memory", "max_recommended_working_set_size"):
            if info.get(key):
                return int(info[key])
        if shutil.which("nvidia-smi"):
            r = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                return int(float(r.stdout.split()[0]) * (1 << 20))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def _gpu_name() -> Optional[str]:
    if not on_gpu():
        return None
    try:
        name = mx.device_info().get("device_name")
        if name:
            return str(name)
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    return "unknown GPU"


def machine_info() -> dict:
    import mlx_lm

    from .. import __version__

    commit, dirty = None, None
    try:
        here = Path(__file__).parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
        commit = r.stdout.strip() or None
        if commit:
            r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here)
            dirty = bool(r.stdout.strip())
    except OSError:
        pass
    try:
        info = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()}
    except Exception:
        info = {}
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(mx.default_device()),
        "gpu": _gpu_name(),
        "device_info": info,
        "memory_budget_gb": memory_budget() / GB,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_moe": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "backends": sorted(BACKENDS),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
    }


def loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


