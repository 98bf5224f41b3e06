"""Loading one rank's share of a model: ``load_parallel``.

Built on ``mlx_moe.loading``: ``prepare`` gives the lazy, quantization-planned
skeleton, ``shard_experts`` shrinks its routed experts to this rank's slice, and
``RankLoader`` (a ``StreamingLoader``) fills it one layer at a time. The expert
formats see a view of the checkpoint that holds only this rank's experts:
per-expert tensors of other ranks are left out (never read), and stacked
``[E, ...]`` tensors are read from disk by byte range, rows ``[lo, hi)`` only.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..experts import MoEExperts
from ..formats import EXTRA_CONTAINERS
from ..loading import StreamingLoader, folder_loader, prepare, resolve_path, set_backend
from ..safetensors_io import read_header
from .experts import ShardedExperts, shard_experts
from .group import agree, folder_hash
from .tensor import check_shardable, tensor_parallel

PARALLEL = ("ep", "tp", "ep+tp")


@dataclass(frozen=True)
class Parallel:
    """``model.parallel`` of a model loaded by ``load_parallel``."""

    mode: str
    group: object

    @property
    def rank(self):
        return self.group.rank()

    @property
    def size(self):
        return self.group.size()

# safetensors dtype -> (numpy dtype to read, mlx dtype to view as)
_RAW = {
    "F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, mx.bfloat16),
    "U8": (np.uint8, None), "I8": (np.int8, None), "U16": (np.uint16, None), "I16": (np.int16, None),
    "U32": (np.uint32, None), "I32": (np.int32, None), "I64": (np.int64, None), "U64": (np.uint64, None),
}


class _Headers:
    def __init__(self):
        self._cache = {}

    def get(self, path):
        if path not in self._cache:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
            self._cache[path] = (8 + n, read_header(path))
        return self._cache[path]


class RankView:
    """The layer's checkpoint as this rank sees it: experts ``[lo, hi)`` renumbered
    from 0. Has what ``StreamingLoader.load_experts`` uses of a ``Checkpoint``."""

    def __init__(self, ckpt, headers, prefix, names, containers, total, lo, hi):
        self.ckpt, self.folder, self.headers = ckpt, ckpt.folder, headers
        self.total, self.lo, self.hi, self.prefix = total, lo, hi, prefix
        self.to_orig = {}  # our name -> checkpoint name
        self.sliced = set()  # stacked [E, ...] tensors read by rows
        self.dropped = {}  # container -> other ranks' per-expert names
        self.shapes = {}
        pats = [(c, re.compile(rf"^{re.escape(prefix + c)}\.(\d+)\.(.+)$")) for c in containers]
        under = tuple(prefix + c + "." for c in containers)
        for n in names:
            m = next(((c, p.match(n)) for c, p in pats if p.match(n)), None)
            if m is not None:
                c, mm = m
                e = int(mm.group(1))
                if lo <= e < hi:
                    ours = f"{prefix}{c}.{e - lo}.{mm.group(2)}"
                    self.to_orig[ours] = n
                    self.shapes[ours] = ckpt.shapes[n]
                else:
                    self.dropped.setdefault(c, set()).add(n)
                continue
            shape = ckpt.shapes[n]
            self.to_orig[n] = n
            if n.startswith(under) and len(shape) >= 1 and shape[0] == total:
                self.sliced.add(n)
                shape = (hi - lo, *shape[1:])
            self.shapes[n] = shape

    def names(self):
        return self.shapes.keys()

    def __contains__(self, name):
        return name in self.shapes

    def get(self, name):
        orig = self.to_orig[name]
        if name not in self.sliced:
            return self.ckpt.get(orig)
        return self._rows(orig)

    def _rows(self, name):
        """Rows ``[lo, hi)`` of a stacked tensor, read by byte range."""
        f = self.ckpt._file_of[name]
        base, header = self.headers.get(f)
        info = header[name]
        shape = tuple(info["shape"])
        raw = _RAW.get(info["dtype"])
        if raw is None:  # e.g. FP8: read whole, keep the rows
            return mx.contiguous(self.ckpt.get(name)[self.lo:self.hi])
        np_dtype, view = raw
        start, end = info["data_offsets"]
        row = (end - start) // shape[0]
        count = (self.hi - self.lo) * row // np.dtype(np_dtype).itemsize
        data = np.fromfile(f, dtype=np_dtype, count=count, offset=base + start + self.lo * row)
        arr = mx.array(data.reshape(self.hi - self.lo, *shape[1:]))
        return arr.view(view) if view is not None else arr

    def consumed(self, names):
        """The checkpoint names behind our consumed ``names``, with the other ranks'
        experts of every container the format read from."""
        out = {self.to_orig[n] for n in names}
        for c, others in self.dropped.items():
            if any(n.startswith(f"{self.prefix}{c}.") for n in out):
                out |= others
        return out

    def release(self):
        self.ckpt.release()


class RankLoader(StreamingLoader):
    """A ``StreamingLoader`` that reads only this rank's routed experts."""

    def __init__(self, model, arch, config, ckpt):
        super().__init__(model, arch, config, ckpt)
        self._headers = _Headers()
        self.read_expert_bytes = 0

    def load_experts(self, layer, block, names):
        experts = block.routed
        if not isinstance(experts, ShardedExperts):
            return super().load_experts(layer, block, names)
        prefix = f"model.layers.{layer}."
        containers = self.arch.layout.hf_containers + EXTRA_CONTAINERS + (self.arch.experts_prefix,)
        view = RankView(self.ckpt, self._headers, prefix, names, containers,
                        experts.total_experts, experts.lo, experts.hi)
        real = self.ckpt
        self.ckpt = view
        try:
            taken = super().load_experts(layer, block, list(view.names()))
        finally:
            self.ckpt = real
        return view.consumed(taken)


def load_parallel(path_or_repo, group, parallel="ep", quantize=None, backend="auto", progress=False,
                  requantize=False):
    """``(model, config)`` holding this rank's share of the model; every rank must
    call it with the same folder (checked: a hash of config and index)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r} is not supported; expected one of {PARALLEL}")
    if group is None:
        group = mx.distributed.init()
    folder = resolve_path(path_or_repo)
    if folder_loader(folder) is not None:
        raise ValueError(f"{folder}: parallel={parallel!r} loads plain safetensors folders only "
                         "(not the expert-file layout or GGUF)")
    agree(group, f"the model folder ({folder.name}: config.json + index)", folder_hash(folder))
    model, arch, config, ckpt = prepare(Path(folder), quantize, requantize)
    if parallel != "tp":
        # ep+tp: the MoE block's own all_sum (tensor.py) adds the experts too
        shard_experts(model, group, all_sum=parallel == "ep")
    if parallel != "ep":
        check_shardable(model, group, config)  # refuse before reading anything
    set_backend(model, backend)
    loader = RankLoader(model, arch, config, ckpt)
    loader.run(progress and group.rank() == 0)
    if parallel != "ep":
        tensor_parallel(model, group, config, experts_whole=parallel == "ep+tp")
    model.eval()
    model.parallel = Parallel(parallel, group)
    return model, config


def expert_bytes(model) -> int:
    """Bytes of the routed experts this process holds."""
    from mlx.utils import tree_flatten

    total = 0
    for _, m in model.named_modules():
        if isinstance(m, MoEExperts):
            total += sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    return total
