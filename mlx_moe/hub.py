"""Hugging Face Hub look-ups with bounded waits.

``resolve_path`` (``mlx_moe.loading``) sends a name here only when it cannot be
a local path (:func:`local_reason`). The first request (the repo's metadata)
has a timeout of ``MLX_MOE_HUB_TIMEOUT`` seconds (default 15): behind a dead
network or a proxy that never answers, the command fails with a message
instead of hanging; downloads then use huggingface_hub's own per-request
timeouts (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``).
``HF_HUB_OFFLINE=1``: only the local cache is used.
"""

import os
import re
import sys
import threading
from pathlib import Path
from typing import Optional

TIMEOUT_ENV = "MLX_MOE_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 15.0
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def timeout_s() -> float:
    try:
        t = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return t if t > 0 else DEFAULT_TIMEOUT_S


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def local_reason(name: str) -> Optional[str]:
    """Why ``name`` (which does not exist) is a local path and no Hub repo id, or None."""
    if name.startswith(("/", "~", ".")) or "\\" in name or os.sep != "/" and os.sep in name:
        return "a path"
    parts = name.split("/")
    if len(parts) != 2:
        return "a Hugging Face repo id has the form owner/name"
    if not all(_REPO_PART.fullmatch(p) for p in parts):
        return "not a valid Hugging Face repo id"
    if Path(parts[0]).exists():
        return f"'{parts[0]}' exists here, so this is read as a path, not a Hugging Face repo id"
    return None


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _within(seconds: float, fn):
    """``fn()``, or TimeoutError after ``seconds`` of wall time: the client's own
    timeouts apply per phase (connect, proxy, read), so they can add up."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, name="mlx_moe-hub", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def download(repo_id: str, patterns) -> Path:
    """The local snapshot of ``repo_id`` (downloaded if needed); OSError on any failure."""
    from huggingface_hub import HfApi, snapshot_download

    def cached() -> Optional[Path]:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 -- not in the cache, whatever the reason
            return None

    if offline():
        path = cached()
        if path is None:
            raise FileNotFoundError(
                f"no such folder '{repo_id}', and HF_HUB_OFFLINE is set: the Hugging Face repo "
                f"'{repo_id}' is not in the local cache"
            )
        return path
    timeout = timeout_s()
    try:
        sha = _within(timeout, lambda: HfApi().model_info(repo_id, timeout=timeout).sha)
    except Exception as e:  # noqa: BLE001 -- the client raises many types
        kind = type(e).__name__
        status = getattr(getattr(e, "response", None), "status_code", None)
        if kind in ("RepositoryNotFoundError", "GatedRepoError") or status in (401, 403, 404):
            raise FileNotFoundError(
                f"no such folder or Hugging Face repo '{repo_id}' ({_first_line(e)})"
            ) from None
        path = cached()
        if path is not None:
            print(f"mlx_moe: the Hugging Face Hub did not answer ({_first_line(e)}); "
                  f"using the cached copy of {repo_id}", file=sys.stderr)
            return path
        why = f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) or "Timeout" in kind else _first_line(e)
        raise ConnectionError(
            f"could not reach the Hugging Face Hub for '{repo_id}': {why}; check the network or proxy (HTTPS_PROXY), set {TIMEOUT_ENV} "
            "to wait longer, or HF_HUB_OFFLINE=1 to use the local cache"
        ) from None
    try:
        return Path(snapshot_download(repo_id, revision=sha, allow_patterns=patterns, etag_timeout=timeout))
    except Exception as e:  # noqa: BLE001
        raise ConnectionError(f"downloading Hugging Face repo '{repo_id}' failed ({_first_line(e)})") from None
