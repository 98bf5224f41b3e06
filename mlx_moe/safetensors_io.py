"""Safetensors checkpoints: validated headers, lazy per-tensor reads, atomic writes.

Headers are checked up front so a truncated or corrupt file fails before any
work, naming the file and tensor. Tensor data is read lazily through ``mx.load``
(only evaluated tensors are read), which keeps loading streaming.
"""

import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, Tuple

import mlx.core as mx

from .safe_write import writing

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor is unusable; the message names which and why."""


def read_header(path) -> Dict[str, dict]:
    """Return ``{name: {"dtype", "shape", "data_offsets"}}`` after validating the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(
                f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor '{name}': {info!r}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor '{name}' has unknown dtype {dtype}")
        count = 1
        for d in shape:
            count *= d
        if end - start != count * DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path}: tensor '{name}' {dtype}{shape} needs {count * DTYPE_BYTES[dtype]} "
                f"bytes but its offsets span {end - start}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of the data "
                f"section but the file holds only {data_size}"
            )
    return header


class Checkpoint:
    """All safetensors tensors of a model folder, by name, read lazily."""

    def __init__(self, folder):
        self.folder = Path(folder)
        files = self._files()
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, str] = {}
        self._file_of: Dict[str, Path] = {}
        for f in files:
            for name, info in read_header(f).items():
                self.shapes[name] = tuple(info["shape"])
                self.dtypes[name] = info["dtype"]
                self._file_of[name] = f
        self._open: Dict[Path, dict] = {}

    def _files(self):
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: lists shard files that are missing: {missing}")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no .safetensors files found")
        return files

    def names(self):
        return self.shapes.keys()

    def __contains__(self, name):
        return name in self.shapes

    def get(self, name) -> mx.array:
        """A lazy array for ``name``: nothing is read until it is evaluated.

        The handle is not kept, so the data is freed as soon as the caller drops it.
        """
        f = self._file_of[name]
        if name not in self._open.get(f, ()):
            self._open[f] = mx.load(str(f))
        return self._open[f].pop(name)

    def release(self):
        """Drop the lazy file handles so evaluated tensors can be freed."""
        self._open.clear()


def save_sharded(
    tensors: Iterable[Tuple[str, mx.array]],
    folder,
    max_shard_bytes: int = 5 << 30,
    metadata=None,
):
    """Write ``(name, array)`` pairs into ``model-XXXXX-of-YYYYY.safetensors`` shards
    plus ``model.safetensors.index.json``. Arrays are evaluated one shard at a time.
    """
    folder = Path(folder)
    metadata = metadata or {"format": "mlx"}
    shards, current, size = [], {}, 0
    tmp_names = []

    def flush():
        nonlocal current, size
        if not current:
            return
        name = f"shard-{len(tmp_names):05d}.tmp.safetensors"
        with writing(folder / name):  # a full disk names the file, no partial shard left
            mx.save_safetensors(str(folder / name), current, metadata=metadata)
        shards.append(list(current))
        tmp_names.append(name)
        current, size = {}, 0

    for name, arr in tensors:
        if current and size + arr.nbytes > max_shard_bytes:
            flush()
        current[name] = arr
        size += arr.nbytes
    flush()
    total = len(tmp_names)
    weight_map, total_size = {}, 0
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(folder / tmp, folder / final)
        total_size += (folder / final).stat().st_size
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with writing(folder / "model.safetensors.index.json") as f:
        f.write_text(json.dumps(index, indent=2))
