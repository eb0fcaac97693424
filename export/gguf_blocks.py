"""GGUF quantized blocks as MatMulNBits operands, without rounding them a second time.

Every GGUF block format below stores, per block of ``b`` weights along the input dimension,
integer codes ``q`` and per-block floats, with ``w = scale * (q - zero_point) - minimum``:

=======  ============================  ======  =====  ==========  ==============
format   weight                        bits*   block  zero point  minimum
=======  ============================  ======  =====  ==========  ==============
Q4_0     d * (q - 8)                   4       32     8           -
Q4_1     d * q + m                     4       32     0           -m
Q5_0     d * (q - 16)                  8 (5)   32     16          -
Q5_1     d * q + m                     8 (5)   32     0           -m
Q8_0     d * q, q int8                 8       32     128         -
Q4_K     d*sc_j * q - dmin*m_j         4       32     0           dmin*m_j
Q5_K     d*sc_j * q - dmin*m_j         8 (5)   32     0           dmin*m_j
Q6_K     d*sc_j * (q - 32)             8 (6)   16     32          -
=======  ============================  ======  =====  ==========  ==============

(* MatMulNBits holds 4 or 8 bits; 5- and 6-bit codes are stored in 8.) MatMulNBits computes
``scale * (q - zero_point)`` with an integer zero point exactly and fast; a *float* zero point
(which ``minimum`` would need) runs on a slow path (22.7 ms against 0.09 ms for an 8960x1536
matmul on this CPU). So the minimum is applied apart: ``x @ W.T = MatMulNBits(x) -
blocksum(x) @ minimum.T``, where ``blocksum`` sums ``x`` over each block — a matmul ``b`` times
smaller than the weight's.

Scales stay float32 (``d * sc`` is exact in float32, not always in float16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgellm.export.quantize import PackedWeight, pack_bits

QK_K = 256


@dataclass
class NativeWeight:
    """A GGUF tensor's own blocks, shaped for MatMulNBits.

    Attributes:
        bits: 4 or 8 (storage bits per code).
        block_size: weights per block along K.
        codes: ``(N, K)`` uint8 integer codes.
        scales: ``(N, K // block_size)`` float32.
        zero_points: ``(N, K // block_size)`` uint8.
        minimum: ``(N, K // block_size)`` float32 subtracted per block, or ``None``.
        source_type: the GGUF type name (``Q4_K``, ...).
    """

    bits: int
    block_size: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    minimum: np.ndarray | None
    source_type: str

    @property
    def key(self) -> tuple[int, int, bool]:
        """Weights with the same key can be fused into one MatMulNBits (stacked along N)."""
        return self.bits, self.block_size, self.minimum is not None

    def dequantize(self) -> np.ndarray:
        """The float32 ``(N, K)`` weight these blocks encode."""
        n, k = self.codes.shape
        q = self.codes.reshape(n, -1, self.block_size).astype(np.float32)
        w = (q - self.zero_points[..., None]) * self.scales[..., None]
        if self.minimum is not None:
            w = w - self.minimum[..., None]
        return w.reshape(n, k)

    def packed(self) -> PackedWeight:
        """MatMulNBits operands (codes packed, integer zero points packed likewise)."""
        n, k = self.codes.shape
        nb = k // self.block_size
        data = pack_bits(self.codes.reshape(n, nb, self.block_size), self.bits)
        zp = self.zero_points
        if self.bits == 4:  # two 4-bit zero points per byte, each row padded to whole bytes
            zp = np.concatenate([zp, np.zeros((n, nb % 2), np.uint8)], axis=1) if nb % 2 else zp
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        return PackedWeight(self.bits, self.block_size, n, k, data, self.scales.reshape(-1).astype(np.float32),
                            zp.reshape(-1))

    def permute_rows(self, order: np.ndarray) -> "NativeWeight":
        m = None if self.minimum is None else self.minimum[order]
        return NativeWeight(self.bits, self.block_size, self.codes[order], self.scales[order],
                            self.zero_points[order], m, self.source_type)


def stack(parts: list[NativeWeight]) -> NativeWeight:
    """Stack weights with the same :attr:`NativeWeight.key` and K along N (fused QKV, gate/up)."""
    first = parts[0]
    mins = None if first.minimum is None else np.concatenate([p.minimum for p in parts])
    return NativeWeight(first.bits, first.block_size, np.concatenate([p.codes for p in parts]),
                        np.concatenate([p.scales for p in parts]), np.concatenate([p.zero_points for p in parts]),
                        mins, "+".join(sorted({p.source_type for p in parts})))


# ----------------------------------------------------------------------------- block decoders
def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Low nibbles of ``width`` bytes, then their high nibbles (the GGUF layout)."""
    qs = qs.reshape(qs.shape[0], -1, width)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def _q4_0(b: np.ndarray):
    d, qs = _f16(b[:, :2]), b[:, 2:]
    return 4, 32, _nibbles(qs, 16), d, np.full_like(d, 8), None


def _q4_1(b: np.ndarray):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    return 4, 32, _nibbles(qs, 16), d, np.zeros_like(d), -m


def _high_bits(qh: np.ndarray) -> np.ndarray:
    bits = qh.copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _q5_0(b: np.ndarray):
    d, qh, qs = _f16(b[:, :2]), b[:, 2:6], b[:, 6:]
    return 8, 32, _nibbles(qs, 16) | (_high_bits(qh) << 4), d, np.full_like(d, 16), None


def _q5_1(b: np.ndarray):
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    return 8, 32, _nibbles(qs, 16) | (_high_bits(qh) << 4), d, np.zeros_like(d), -m


def _q8_0(b: np.ndarray):
    d, qs = _f16(b[:, :2]), b[:, 2:].copy().view(np.int8)
    return 8, 32, (qs.astype(np.int16) + 128).astype(np.uint8), d, np.full_like(d, 128), None


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-32 scale and minimum of a Q4_K/Q5_K super-block (6-bit packed, see ggml)."""
    from gguf.quants import Q4_K

    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())
    return d * sc.astype(np.float32), dmin * m.astype(np.float32)


def _q4_k(b: np.ndarray):
    scale, mins = _k_scales(b)
    q = _nibbles(b[:, 16:], 32)
    return 4, 32, q, scale, np.zeros_like(scale, np.uint8), mins


def _q5_k(b: np.ndarray):
    scale, mins = _k_scales(b)
    qh, qs = b[:, 16:48], b[:, 48:]
    low = _nibbles(qs, 32).reshape(-1, 8, 32)
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).astype(np.uint8)
    return 8, 32, (low | (high << 4)).reshape(len(b), -1), scale, np.zeros_like(scale, np.uint8), mins


def _q6_k(b: np.ndarray):
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].copy().view(np.int8), _f16(b[:, 208:210])
    n = len(b)
    # 2 halves of 128 weights; each: 64 ql bytes (low/high nibbles) and 32 qh bytes (4 x 2 bits)
    ql = ql.reshape(n, 2, 64)
    qh = qh.reshape(n, 2, 32)
    low = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (low | (high << 4)).reshape(n, QK_K)
    scale = d * sc.astype(np.float32)
    return 8, 16, q, scale, np.full(scale.shape, 32, np.uint8), None


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
            "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def native_weight(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> NativeWeight | None:
    """Decode a GGUF tensor's raw bytes into :class:`NativeWeight`, or ``None`` for other types.

    Args:
        raw: the tensor's bytes as stored (uint8, any shape).
        type_name: GGUF type name (``Q4_K``, ...).
        shape: ``(N, K)``, rows = output features.
    """
    decode = DECODERS.get(type_name)
    if decode is None:
        return None
    n, k = shape
    b = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    blocks = b.reshape(n * k // (QK_K if type_name.endswith("_K") else 32), -1)
    bits, block, q, scale, zp, mins = decode(blocks)
    rows = lambda a: np.ascontiguousarray(a.reshape(n, -1))  # noqa: E731
    return NativeWeight(bits, block, rows(q).astype(np.uint8), rows(scale).astype(np.float32),
                        rows(zp).astype(np.uint8), None if mins is None else rows(mins).astype(np.float32), type_name)
