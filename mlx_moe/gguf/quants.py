"""GGUF quant types -> MLX arrays.

Exact transcodes (no dequantization). Every type below stores, per 32
consecutive values of a row, integer codes ``q`` and one (scale, offset) pair:

    Q8_0  v = d * (q8 - 128)        q8 = int8 + 128          -> affine 8 bit
    Q4_0  v = d * (q4 - 8)                                   -> affine 4 bit
    Q5_0  v = d * (q5 - 16)                                  -> affine 5 bit
    Q4_1  v = d * q4 + m                                     -> affine 4 bit
    Q5_1  v = d * q5 + m                                     -> affine 5 bit
    Q4_K  v = (d*sc_j) * q4 - (dmin*m_j)   per 32-value sub-block j -> affine 4 bit
    Q5_K  v = (d*sc_j) * q5 - (dmin*m_j)                      -> affine 5 bit

which is MLX affine quantization with group size 32, ``v = scale * q + bias``,
with ``scale = d`` (``d*sc_j``) and ``bias = -8d`` / ``-16d`` / ``-128d`` / ``m`` /
``-(dmin*m_j)``. The codes are copied bit for bit; only their packing changes.

Why it is exact, and why scales/biases are float32: d, dmin, m are float16
(11 significant bits) and sc_j, m_j are 6-bit integers, so ``d*sc_j`` and
``dmin*m_j`` have at most 17 significant bits and ``scale*q`` (q < 2^8) at most
19: all exact in float32 (24 bits). ``gguf.quants.dequantize`` computes the
same products in float32 and then one rounded addition (``d*q + m``,
``d*q - dm``) — MLX's ``scale*q + bias`` is that same single rounding (with or
without FMA, since ``scale*q`` is exact), and for the symmetric types the sum
``d*q' - 8d = d*(q'-8)`` is representable, so it is exact too. Hence
``mx.dequantize`` equals ``gguf.quants.dequantize`` value for value (the sign
of a zero may differ: ``d*8 - 8d`` is +0 where llama.cpp gets ``d*0`` = -0 for
negative d). In bfloat16 (8 bits) neither d nor d*sc_j fits; float16 holds d
but not d*sc_j (17 bits), nor ``-128d`` near the f16 maximum, and MLX would then
compute ``scale*q`` in float16 and round it. So scales and biases stay float32:
2 extra bits per weight at group 32 (Q4_0's 4.5 bpw becomes 6), the price of
exactness. MLX's CPU ``quantized_matmul`` / ``gather_qmm`` take float32
scales; with bfloat16 activations they promote the output to float32.

MXFP4 (gpt-oss) is MLX ``mxfp4`` exactly: an e8m0 scale byte and 32 e2m1
codes per block, repacked.

Everything else (Q6_K, Q2_K, Q3_K: scales per 16 values, which MLX's group
sizes 32/64/128 cannot express; IQ*, TQ*) is dequantized with
``gguf.quants.dequantize`` and re-quantized; the loader reports the error.
"""

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from ..quantization import QuantizedTensor

GROUP = 32
FLOAT_TYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
# type -> bits of its exact affine transcode
EXACT_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
# The affine bits a lossy type is re-quantized to when no target is asked for:
# one or two bits above the source's, so the re-quantization adds little error.
REQUANT_BITS = {"Q2_K": 4, "Q3_K": 5, "Q6_K": 8}
REQUANT_DEFAULT_BITS = 8
# Values per transcoding chunk: bounds the numpy temporaries of one tensor.
CHUNK_VALUES = 1 << 24


class UnsupportedType(ValueError):
    pass


def native_params(type_name: str) -> Optional[dict]:
    """The MLX quantization a type transcodes to exactly; None for float or lossy types."""
    if type_name in EXACT_BITS:
        return {"group_size": GROUP, "bits": EXACT_BITS[type_name], "mode": "affine"}
    if type_name == "MXFP4":
        return {"group_size": GROUP, "bits": 4, "mode": "mxfp4"}
    return None


def default_params(type_name: str) -> Optional[dict]:
    """What a tensor of this type becomes when no quantization is asked for."""
    if type_name in FLOAT_TYPES:
        return None
    native = native_params(type_name)
    if native:
        return native
    check_supported(type_name)
    return {"group_size": GROUP, "bits": REQUANT_BITS.get(type_name, REQUANT_DEFAULT_BITS), "mode": "affine"}


def check_supported(type_name: str):
    import gguf

    if type_name in FLOAT_TYPES or type_name in EXACT_BITS or type_name == "MXFP4":
        return
    qtype = gguf.GGMLQuantizationType[type_name]
    if qtype not in gguf.quants._type_traits:
        raise UnsupportedType(f"GGUF type {type_name} is not supported (the gguf package cannot dequantize it)")


def _f16(blocks, start):
    return np.ascontiguousarray(blocks[..., start : start + 2]).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs):
    """[..., 16] bytes -> [..., 32] codes: low nibbles are values 0-15, high 16-31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _k_scales(scales):
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit sub-block scales and 8 mins."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low(qs):
    """Q4_K/Q5_K: 128 bytes -> 256 low nibbles (64-value chunks: 32 low, then 32 high)."""
    q = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([q & 15, q >> 4], axis=-2).reshape(*qs.shape[:-1], 256)


def affine_parts(blocks: np.ndarray, type_name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``blocks [N, type_size]`` uint8 -> ``(codes [N, B], scales [N, B/32], biases [N, B/32])``,
    ``v = scales * codes + biases`` per 32 values (float32)."""
    t = type_name
    if t == "Q8_0":
        d = _f16(blocks, 0)[:, None]
        return blocks[:, 2:] ^ np.uint8(0x80), d, -128 * d
    if t == "Q4_0":
        d = _f16(blocks, 0)[:, None]
        return _nibbles(blocks[:, 2:]), d, -8 * d
    if t == "Q4_1":
        return _nibbles(blocks[:, 4:]), _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]
    if t in ("Q5_0", "Q5_1"):
        off = 2 if t == "Q5_0" else 4
        qh = np.ascontiguousarray(blocks[:, off : off + 4]).view("<u4")
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = _nibbles(blocks[:, off + 4 :]) | (high << 4)
        d = _f16(blocks, 0)[:, None]
        return codes, d, (-16 * d if t == "Q5_0" else _f16(blocks, 2)[:, None])
    if t in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]
        sc, mn = _k_scales(blocks[:, 4:16])
        if t == "Q4_K":
            codes = _k_low(blocks[:, 16:144])
        else:  # qh bit j of byte l is the high bit of value l of sub-block j
            qh = blocks[:, 16:48]
            high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
            codes = _k_low(blocks[:, 48:176]) | (high.reshape(-1, 256) << 4)
        return codes, d * sc, -(dmin * mn)
    raise UnsupportedType(f"GGUF type {t} has no exact affine transcode")


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's affine packing: each row's codes as a little-endian bit stream in uint32 words."""
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)).view(np.uint32)
    stream = ((codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(*codes.shape[:-1], -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


def _type_size(type_name):
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def _rows(raw, type_name):
    """``raw [..., bytes_per_row]`` -> ``(lead shape, row count, values per row, block view)``."""
    block, size = _type_size(type_name)
    lead, nbytes = raw.shape[:-1], raw.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    return lead, rows, nbytes // size * block, np.asarray(raw).reshape(rows, nbytes // size, size)


def transcode(raw: np.ndarray, type_name: str) -> QuantizedTensor:
    """An exact type's raw blocks as MLX quantized arrays (see the module docstring)."""
    if type_name == "MXFP4":
        return _mxfp4(raw)
    bits = EXACT_BITS[type_name]
    lead, rows, n, blocks = _rows(raw, type_name)
    w = np.empty((rows, n * bits // 32), np.uint32)
    scales = np.empty((rows, n // GROUP), np.float32)
    biases = np.empty((rows, n // GROUP), np.float32)
    step = max(1, CHUNK_VALUES // n)
    for r in range(0, rows, step):  # chunks of rows bound the temporaries
        b = blocks[r : r + step]
        codes, s, c = affine_parts(b.reshape(-1, b.shape[-1]), type_name)
        k = b.shape[0]
        w[r : r + k] = pack(codes.reshape(k, n), bits)
        scales[r : r + k] = s.reshape(k, -1)
        biases[r : r + k] = c.reshape(k, -1)
    shape = lambda a: mx.array(a.reshape(*lead, a.shape[-1]))
    return QuantizedTensor(shape(w), shape(scales), shape(biases), GROUP, bits, "affine")


def _mxfp4(raw):
    """gguf MXFP4 block: e8m0 exponent byte, then 16 bytes of e2m1 pairs (value j low, j+16 high)."""
    lead, rows, n, blocks = _rows(raw, "MXFP4")
    codes = _nibbles(blocks[..., 1:]).reshape(rows, n)
    w = pack(codes, 4)
    scales = np.ascontiguousarray(blocks[..., 0])
    return QuantizedTensor(
        mx.array(w.reshape(*lead, -1)), mx.array(scales.reshape(*lead, -1)), None, GROUP, 4, "mxfp4"
    )


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """float32 values of any type the gguf package can dequantize."""
    import gguf

    check_supported(type_name)
    if type_name == "F32":
        return np.asarray(raw, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType[type_name])


def to_float(raw: np.ndarray, type_name: str) -> mx.array:
    """Float types keep their dtype; quantized ones are dequantized to float32."""
    if type_name == "BF16":
        return mx.array(np.ascontiguousarray(raw).view(np.uint16)).view(mx.bfloat16)
    if type_name == "F16":
        return mx.array(np.ascontiguousarray(raw).view(np.float16))
    return mx.array(dequantize(raw, type_name))
