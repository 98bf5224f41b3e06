"""The GGUF container, read with the ``gguf`` package's ``GGUFReader``.

One ``GGUFFile`` is a model: a single ``.gguf`` or the parts of a split file
(``name-00001-of-00003.gguf`` ...; metadata lives in the first part, tensors in
all). Tensor data is memory-mapped: ``raw(name)`` returns a view, nothing is
read until it is used, so loading can stream layer by layer.

Shapes are given in numpy order (outermost first, ``[E, out, in]`` for stacked
experts), the reverse of ggml's ``ne``; a quantized tensor's raw view is
``uint8 [..., rows, bytes_per_row]``.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ..safetensors_io import CheckpointError

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")


class GGUFError(CheckpointError):
    """A GGUF file or tensor is unusable; the message names which and why."""


def _gguf():
    try:
        import gguf
    except ImportError:  # the optional extra
        raise ImportError(
            "Reading GGUF files needs the `gguf` package: pip install 'mlx-moe-engine[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def is_gguf(path) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" and p.is_file()


def split_parts(path: Path) -> List[Path]:
    """All parts of a split GGUF given any one of them (or the file itself)."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    parts = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise GGUFError(f"{path}: split GGUF of {n} parts, missing {missing}")
    return parts


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: object  # gguf.GGMLQuantizationType
    shape: Tuple[int, ...]  # numpy order, logical (dequantized) shape
    file: Path

    @property
    def type_name(self) -> str:
        return self.qtype.name


class GGUFFile:
    """Metadata and lazily mapped tensors of a (possibly split) GGUF model."""

    def __init__(self, path):
        gguf = _gguf()
        self.path = Path(path)
        self.parts = split_parts(self.path)
        self.metadata: Dict[str, object] = {}
        self.tensors: Dict[str, TensorInfo] = {}
        self._data: Dict[str, object] = {}
        for i, part in enumerate(self.parts):
            try:
                reader = gguf.GGUFReader(part, "r")
            except (ValueError, OSError, IndexError) as e:  # bad magic / version / truncated header
                raise GGUFError(f"{part}: not a readable GGUF file ({e})") from None
            if i == 0:
                self.metadata = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            size = part.stat().st_size
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{part}: tensor '{t.name}' also in {self.tensors[t.name].file}")
                if t.data_offset + t.n_bytes > size:
                    raise GGUFError(
                        f"{part}: truncated: tensor '{t.name}' ({t.tensor_type.name}) ends at byte "
                        f"{t.data_offset + t.n_bytes} but the file has {size}"
                    )
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                self.tensors[t.name] = TensorInfo(t.name, t.tensor_type, shape, part)
                self._data[t.name] = t.data
        if "general.architecture" not in self.metadata:
            raise GGUFError(f"{self.path}: no general.architecture in the GGUF metadata")

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def arch_key(self, key, default=None):
        """``{arch}.{key}`` metadata, e.g. ``arch_key("expert_count")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, name) -> np.ndarray:
        """The tensor's data as stored (memory-mapped, not copied)."""
        return self._data[name]

    def names(self):
        return self.tensors.keys()

    def __contains__(self, name):
        return name in self.tensors


def _value(field):
    """A metadata field as a Python value (str, int, float, bool, or a list of them)."""
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    gguf = _gguf()  # older gguf: decode from the parts
    T = gguf.GGUFValueType
    def one(idx, vtype):
        part = field.parts[idx]
        return bytes(part).decode("utf-8", "replace") if vtype == T.STRING else part.tolist()[0]
    if field.types[0] == T.ARRAY:
        return [one(i, field.types[-1]) for i in field.data]
    return one(field.data[0], field.types[0])
