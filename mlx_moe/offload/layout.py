"""The expert-file layout: one file per MoE layer, one aligned record per expert.

A folder converted with ``python -m mlx_moe.convert --expert-file-layout`` holds
the usual ``config.json`` and safetensors shards for everything *except* the
routed experts (attention, norms, embeddings, routers, shared experts), plus::

    experts/index.json          the index below
    experts/layer-00003.bin     one file per MoE layer

Each layer file starts with a ``HEADER_BYTES`` (16 KiB) header -- magic
``MLXMOEX1``, the layer number, the expert count, the record size and the JSON of
the layer's tensor table -- followed by ``num_experts`` records of
``record_bytes`` each. A record is one expert: its ``gate_proj``, ``up_proj`` and
``down_proj`` weight / scales / biases (and bias, for gpt-oss) back to back, in
the order of the layer's ``tensors`` table, zero-padded to a multiple of
``ALIGN`` (16 KiB, a multiple of every page and logical block size we meet).
Expert ``e`` therefore sits at ``HEADER_BYTES + e * record_bytes`` and is read
with one aligned ``pread`` (O_DIRECT-able on Linux, F_NOCACHE on macOS).

``index.json`` lists, per layer: the file, the model prefix of the experts
module, the tensor table (name, MLX dtype, per-expert shape, offset inside the
record, bytes), the quantization of each projection, and the CRC-32 of every
record's data bytes (padding excluded).

What is checked, and when (see docs/OFFLOAD.md):

* at load: the index parses; every layer file exists (else an error naming the
  layer and its experts); every file is long enough for all its records (else
  an error naming the layer and the first incomplete expert); the header's
  magic, layer, expert count and record size match the index.
* at read: a short read names the layer and expert; the CRC-32 of the record is
  checked the first time each expert is read (``verify="first"``, the default),
  on every read (``"always"``) or never (``"none"``); a mismatch names the layer,
  the expert, the file and the byte offset.

mlx-lm cannot load such a folder (the experts are not in safetensors); our
loader can, fully resident or with an expert budget.
"""

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..experts import PROJECTIONS
from ..safe_write import writing
from ..safetensors_io import CheckpointError

FORMAT = "mlx-moe-expert-files"
VERSION = 1
ALIGN = 16384
HEADER_BYTES = 16384
MAGIC = b"MLXMOEX1"
INDEX = Path("experts") / "index.json"
# Fixed order of the tensors inside a record.
ATTRS = ("weight", "scales", "biases", "bias")

# MLX dtype name -> (mx dtype, numpy dtype used to address its bytes)
DTYPES = {
    "uint32": (mx.uint32, np.uint32),
    "uint8": (mx.uint8, np.uint8),
    "float32": (mx.float32, np.float32),
    "float16": (mx.float16, np.float16),
    "bfloat16": (mx.bfloat16, np.uint16),
}


class ExpertFileError(CheckpointError):
    """An expert file is missing, truncated or does not match its index.

    ``layer`` and ``expert`` name the culprit (``expert`` may be None when the
    whole layer file is unusable).
    """

    def __init__(self, msg, layer=None, expert=None):
        super().__init__(msg)
        self.layer, self.expert = layer, expert


def dtype_name(dt) -> str:
    for name, (m, _) in DTYPES.items():
        if m == dt:
            return name
    raise ValueError(f"dtype {dt} cannot be stored in an expert file")


def round_up(n, a=ALIGN):
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "gate_proj.weight"
    dtype: str  # MLX dtype name
    shape: tuple  # per expert
    offset: int  # inside the record
    nbytes: int

    @property
    def mx_dtype(self):
        return DTYPES[self.dtype][0]

    @property
    def np_dtype(self):
        return DTYPES[self.dtype][1]

    def to_json(self):
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}


@dataclass
class LayerEntry:
    layer: int
    prefix: str  # e.g. "model.layers.3.mlp.switch_mlp"
    file: str
    num_experts: int
    record_bytes: int
    data_bytes: int
    tensors: List[TensorSpec]
    quantization: Dict[str, Optional[dict]]  # proj -> {"group_size", "bits", "mode"} | None
    crc32: List[int]

    @property
    def signature(self):
        """Layers with equal signatures can share one slot pool."""
        return (
            tuple((t.name, t.dtype, t.shape) for t in self.tensors),
            json.dumps(self.quantization, sort_keys=True),
            self.record_bytes,
        )

    @property
    def file_bytes(self):
        return HEADER_BYTES + self.num_experts * self.record_bytes

    def offset(self, expert):
        return HEADER_BYTES + expert * self.record_bytes

    def header_json(self):
        return {"layer": self.layer, "prefix": self.prefix, "num_experts": self.num_experts,
                "record_bytes": self.record_bytes, "data_bytes": self.data_bytes,
                "tensors": [t.to_json() for t in self.tensors],
                "quantization": self.quantization}

    def to_json(self):
        return {**self.header_json(), "file": self.file, "crc32": self.crc32}

    @classmethod
    def from_json(cls, d):
        return cls(
            layer=int(d["layer"]), prefix=d["prefix"], file=d["file"],
            num_experts=int(d["num_experts"]), record_bytes=int(d["record_bytes"]),
            data_bytes=int(d["data_bytes"]),
            tensors=[TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), int(t["offset"]), int(t["nbytes"]))
                     for t in d["tensors"]],
            quantization=d["quantization"], crc32=[int(c) for c in d["crc32"]],
        )


def _header_bytes(entry: LayerEntry) -> bytes:
    meta = json.dumps(entry.header_json(), sort_keys=True).encode()
    head = MAGIC + struct.pack("<IIQQ", entry.layer, entry.num_experts, entry.record_bytes, len(meta)) + meta
    if len(head) > HEADER_BYTES:
        raise ValueError(f"layer {entry.layer}: expert-file header too large ({len(head)} bytes)")
    return head + b"\0" * (HEADER_BYTES - len(head))


def is_offload_folder(folder) -> bool:
    return (Path(folder) / INDEX).exists()


# ------------------------------------------------------------------ writing


NP_NAMES = {np.dtype(np.uint32): "uint32", np.dtype(np.uint8): "uint8",
            np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


def _raw(arr) -> np.ndarray:
    """The bytes of an MLX (or numpy) array as a numpy array (bfloat16 addressed as uint16)."""
    if isinstance(arr, np.ndarray):
        return np.ascontiguousarray(arr)
    name = dtype_name(arr.dtype)
    if name == "bfloat16":
        arr = arr.view(mx.uint16)
    return np.asarray(arr)


class ExpertFileWriter:
    """Writes ``experts/layer-XXXXX.bin`` files and ``experts/index.json``."""

    def __init__(self, folder):
        self.folder = Path(folder)
        (self.folder / INDEX.parent).mkdir(parents=True, exist_ok=True)
        self.layers: List[LayerEntry] = []

    def write_layer(self, layer: int, prefix: str, arrays: Dict[str, mx.array], quantization: Dict[str, Optional[dict]]):
        """``arrays``: ``{"gate_proj.weight": [E, ...], ...}`` (MLX or numpy) for one layer's experts."""
        names = [f"{p}.{a}" for p in PROJECTIONS for a in ATTRS if f"{p}.{a}" in arrays]
        extra = set(arrays) - set(names)
        if extra:
            raise ValueError(f"layer {layer}: unexpected expert tensors {sorted(extra)}")
        E = int(arrays[names[0]].shape[0])
        specs, off = [], 0
        raws = {}
        for n in names:
            a = arrays[n]
            if a.shape[0] != E:
                raise ValueError(f"layer {layer}: {n} has {a.shape[0]} experts, expected {E}")
            if isinstance(a, np.ndarray):
                dname = NP_NAMES[a.dtype]
            else:
                mx.eval(a)
                dname = dtype_name(a.dtype)
            raws[n] = _raw(a).reshape(E, -1).view(np.uint8)
            nbytes = raws[n].shape[1]
            specs.append(TensorSpec(n, dname, tuple(a.shape[1:]), off, nbytes))
            off += (nbytes + 63) // 64 * 64  # 64-byte aligned tensors inside the record
        data_bytes = specs[-1].offset + specs[-1].nbytes
        record = round_up(data_bytes)
        fname = f"layer-{layer:05d}.bin"
        entry = LayerEntry(layer, prefix, fname, E, record, data_bytes, specs, quantization, [])
        path = self.folder / INDEX.parent / fname
        tmp = path.with_name(f".{fname}.tmp")
        buf = np.zeros(record, np.uint8)
        crcs = []
        with writing(tmp), open(tmp, "wb") as f:  # a full disk names the file, nothing partial left
            f.write(_header_bytes(entry))
            for e in range(E):
                buf[:] = 0
                for s in specs:
                    buf[s.offset:s.offset + s.nbytes] = raws[s.name][e]
                crcs.append(zlib.crc32(memoryview(buf)[:data_bytes]))
                f.write(memoryview(buf))
        os.replace(tmp, path)
        entry.crc32 = crcs
        self.layers.append(entry)
        return entry

    def finish(self, extra: Optional[dict] = None):
        index = {"format": FORMAT, "version": VERSION, "alignment": ALIGN, "header_bytes": HEADER_BYTES,
                 "layers": [e.to_json() for e in sorted(self.layers, key=lambda e: e.layer)]}
        if extra:
            index.update(extra)
        path = self.folder / INDEX
        tmp = path.with_name(".index.json.tmp")
        with writing(tmp):
            tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, path)
        return path


# ------------------------------------------------------------------ reading


class ExpertIndex:
    """The validated index of an expert-file folder."""

    def __init__(self, folder, check_files=True):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not path.exists():
            raise ExpertFileError(f"{self.folder}: no {INDEX} (not an expert-file folder)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r} is not {FORMAT!r}")
            if int(raw.get("version", 0)) > VERSION:
                raise ValueError(f"version {raw['version']} is newer than this reader ({VERSION})")
            self.layers: Dict[int, LayerEntry] = {}
            for d in raw["layers"]:
                e = LayerEntry.from_json(d)
                if len(e.crc32) != e.num_experts:
                    raise ValueError(f"layer {e.layer}: {len(e.crc32)} checksums for {e.num_experts} experts")
                self.layers[e.layer] = e
        except (ValueError, KeyError, TypeError) as exc:
            raise ExpertFileError(f"{path}: unreadable expert index ({exc})") from None
        if check_files:
            for e in self.layers.values():
                self.check_file(e)

    def path(self, entry: LayerEntry) -> Path:
        return self.folder / INDEX.parent / entry.file

    def check_file(self, entry: LayerEntry):
        p = self.path(entry)
        L, E = entry.layer, entry.num_experts
        if not p.exists():
            raise ExpertFileError(
                f"layer {L}: expert file {p} is missing (experts 0-{E - 1} of layer {L} live there)",
                layer=L,
            )
        size = p.stat().st_size
        if size < entry.file_bytes:
            first = max(0, (size - HEADER_BYTES) // entry.record_bytes)
            raise ExpertFileError(
                f"layer {L} expert {first}: expert file {p} is truncated ({size} bytes, "
                f"{entry.file_bytes} expected; experts {first}-{E - 1} are incomplete)",
                layer=L, expert=first,
            )
        with open(p, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[:8] != MAGIC:
            raise ExpertFileError(f"layer {L}: {p} is not an expert file (bad magic)", layer=L)
        layer, n, record, _ = struct.unpack("<IIQQ", head[8:32])
        if (layer, n, record) != (L, E, entry.record_bytes):
            raise ExpertFileError(
                f"layer {L}: {p} holds layer {layer} with {n} experts of {record} bytes, but the "
                f"index expects layer {L} with {E} experts of {entry.record_bytes} bytes",
                layer=L,
            )

    def routed_bytes(self) -> int:
        """Bytes of all routed experts (record data, padding excluded)."""
        return sum(e.num_experts * e.data_bytes for e in self.layers.values())

    def read_layer(self, layer) -> Dict[str, mx.array]:
        """All experts of ``layer`` as stacked arrays (CRC-checked): resident loading."""
        e = self.layers[layer]
        p = self.path(e)
        with open(p, "rb") as f:
            f.seek(HEADER_BYTES)
            raw = np.frombuffer(f.read(e.num_experts * e.record_bytes), np.uint8)
        if raw.size < e.num_experts * e.record_bytes:
            self.check_file(e)
        raw = raw.reshape(e.num_experts, e.record_bytes)
        for x in range(e.num_experts):
            crc = zlib.crc32(memoryview(raw[x, :e.data_bytes]))
            if crc != e.crc32[x]:
                raise corrupt(p, e, x, crc)
        out = {}
        for t in e.tensors:
            a = np.ascontiguousarray(raw[:, t.offset:t.offset + t.nbytes]).view(t.np_dtype)
            a = mx.array(a.reshape(e.num_experts, *t.shape))
            out[t.name] = a.view(t.mx_dtype) if t.dtype == "bfloat16" else a
        return out


def corrupt(path, entry: LayerEntry, expert: int, crc: int) -> ExpertFileError:
    return ExpertFileError(
        f"layer {entry.layer} expert {expert}: expert record in {path} at byte "
        f"{entry.offset(expert)} fails its checksum (crc32 {crc:#010x}, index says "
        f"{entry.crc32[expert]:#010x}): the file was modified or is corrupt",
        layer=entry.layer, expert=expert,
    )
