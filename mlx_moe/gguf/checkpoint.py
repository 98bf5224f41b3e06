"""A GGUF seen as a ``Checkpoint`` under our tensor names, for ``StreamingLoader``.

``get(name)`` returns each tensor in the form its module will hold, so the
streaming loader places it as it is:

* a quantized module whose planned quantization is the tensor's exact
  transcode (``quants.native_params``): the transcoded ``QuantizedTensor``;
* a quantized module with another target: float sources as they are (the
  loader quantizes them exactly as it does safetensors), quantized sources
  dequantized to float32 and re-quantized here one expert at a time, with the
  error recorded in ``report``;
* a float module: float types in their dtype, quantized ones as float32.

Tensor data is memory-mapped; nothing is read before ``get``.
"""

import math
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from ..quantization import QuantizedTensor
from . import quants
from .names import NameMap, unpermute_rows
from .reader import GGUFError, GGUFFile


def check_types(gf: GGUFFile):
    """Every tensor's type is one we can read; else an error naming tensor, type and shape."""
    for g, info in gf.tensors.items():
        try:
            quants.check_supported(info.type_name)
        except quants.UnsupportedType as e:
            raise GGUFError(f"{info.file}: tensor '{g}' {list(info.shape)}: {e}") from None


class GGUFCheckpoint:
    def __init__(self, gf: GGUFFile, names: NameMap, config: dict):
        self.gf, self.namemap, self.config = gf, names, config
        self.folder = gf.path  # what StreamingLoader's errors name
        self.shapes: Dict[str, tuple] = {}
        self.source: Dict[str, str] = {}  # ours -> GGUF name
        check_types(gf)
        for g, info in gf.tensors.items():
            ours = names.ours(g)
            if ours is not None:
                self.source[ours] = g
                self.shapes[ours] = info.shape
        self.targets: Dict[str, Optional[dict]] = {}  # module path -> planned params
        self.expected: Dict[str, tuple] = {}  # our name -> the model's shape (set by the loader)
        self.report: Dict[str, dict] = {}  # re-quantized tensors -> error

    # -- Checkpoint interface -------------------------------------------------
    def names(self):
        return self.shapes.keys()

    def __contains__(self, name):
        return name in self.shapes

    def release(self):
        """Nothing to drop: views are memory-mapped and released with their arrays."""

    def type_of(self, name) -> str:
        return self.gf.tensors[self.source[name]].type_name

    def get(self, name):
        g = self.source[name]
        info = self.gf.tensors[g]
        t = info.type_name
        raw = self.gf.raw(g)
        heads = self.namemap.permutation(g, self.config)
        if heads:
            raw = unpermute_rows(np.asarray(raw), heads)
        path, attr = name.rsplit(".", 1)
        target = self.targets.get(path) if attr == "weight" else None
        try:
            if target is not None and quants.native_params(t) == target:
                return quants.transcode(raw, t)
            if target is not None and t not in quants.FLOAT_TYPES:
                return self._requantize(name, raw, t, target)
            value = quants.to_float(raw, t)
        except (quants.UnsupportedType, ValueError) as e:
            raise GGUFError(f"{info.file}: tensor '{g}' ({t}, shape {list(info.shape)}): {e}") from None
        want = self.expected.get(name)
        if want is not None and tuple(value.shape) != tuple(want) and value.size == math.prod(want):
            value = value.reshape(want)  # e.g. qwen2moe's shared_expert_gate stored as [H], ours [1, H]
        return value

    def _requantize(self, name, raw, t, target):
        """Dequantize (float32) and re-quantize to ``target``, one expert (leading slice) at a time."""
        g, bits, mode = target["group_size"], target["bits"], target["mode"]
        parts = [raw[i] for i in range(raw.shape[0])] if raw.ndim == 3 else [raw]
        out, err2, ref2, worst = [], 0.0, 0.0, 0.0
        for p in parts:
            v = mx.array(quants.dequantize(p, t))
            q = mx.quantize(v, g, bits, mode=mode)
            d = mx.dequantize(*q, group_size=g, bits=bits, mode=mode) - v
            stats = mx.stack([(d * d).sum(), (v * v).sum(), mx.abs(d).max()])
            mx.eval(q, stats)
            e2, r2, mx_abs = stats.tolist()
            err2, ref2, worst = err2 + e2, ref2 + r2, max(worst, mx_abs)
            out.append(q)
        arrays = [mx.stack(a) for a in zip(*out)] if raw.ndim == 3 else list(out[0])
        w, scales, *biases = arrays
        self.report[name] = {
            "gguf_name": self.source[name],
            "type": t,
            "to": dict(target),
            "rel_rms_error": math.sqrt(err2 / ref2) if ref2 else 0.0,
            "max_abs_error": worst,
        }
        return QuantizedTensor(w, scales, biases[0] if biases else None, g, bits, mode)
