"""Block-wise weight quantization into onnxruntime's ``MatMulNBits`` layout, in numpy.

For a weight ``W`` of shape ``(N, K)`` (Hugging Face ``(out, in)``), ``MatMulNBits`` computes
``Y = A @ dequant(W).T`` with ``dequant(W)[n, k] = (q[n, k] - zp[n, b]) * scale[n, b]`` where
``b = k // block_size``. Its operands:

* ``B``: uint8 ``(N, n_blocks, block_size * bits // 8)``; for 4 bits element ``2j`` is the low
  nibble and ``2j + 1`` the high nibble of byte ``j``.
* ``scales``: float32 ``(N * n_blocks,)``.
* ``zero_points``: uint8, ``N * ceil(n_blocks * bits / 8)`` bytes, packed like ``B``; absent
  for symmetric quantization (the kernel then uses ``2 ** (bits - 1)``).

Quantization is round-to-nearest, computed a few hundred rows at a time so the 151936-row LM
head of a Qwen model never needs more than a few MB of temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ROWS_PER_CHUNK = 4096


@dataclass
class PackedWeight:
    """Operands of one ``MatMulNBits`` node (see module docstring for layouts)."""

    bits: int
    block_size: int
    N: int
    K: int
    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        """Return the float32 ``(N, K)`` matrix the kernel multiplies by (for tests/reports)."""
        nb = self.data.shape[1]
        q = unpack_bits(self.data, self.bits).reshape(self.N, nb, self.block_size).astype(np.float32)
        if self.zero_points is None:
            zp = np.full((self.N, nb), 2 ** (self.bits - 1), np.float32)
        else:
            zp = unpack_bits(self.zero_points.reshape(self.N, -1), self.bits)[:, :nb].astype(np.float32)
        w = (q - zp[..., None]) * self.scales.reshape(self.N, nb)[..., None]
        return w.reshape(self.N, -1)[:, : self.K]


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 values ``< 2**bits`` along the last axis (4 bits: two per byte, low first)."""
    if bits == 8:
        return q.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"bits={bits}; allowed 4 or 8")
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_bits(p: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (4 bits: returns twice as many values on the last axis)."""
    if bits == 8:
        return p
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def quantize_blockwise(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> PackedWeight:
    """Round-to-nearest block quantization of ``w`` (float32 ``(N, K)``) along K.

    Args:
        w: weight matrix ``(N, K)``.
        bits: 4 or 8.
        block_size: power of two, at least 16.
        symmetric: no zero points (levels centred on ``2 ** (bits - 1)``).

    Returns:
        The ``MatMulNBits`` operands.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}; allowed 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}; allowed a power of two >= 16")
    N, K = w.shape
    nb = -(-K // block_size)
    data = np.empty((N, nb, block_size * bits // 8), np.uint8)
    scales = np.empty((N, nb), np.float32)
    zps = None if symmetric else np.empty((N, -(-nb * bits // 8)), np.uint8)
    for r in range(0, N, _ROWS_PER_CHUNK):
        rows = np.asarray(w[r : r + _ROWS_PER_CHUNK], dtype=np.float32)
        if K % block_size:
            rows = np.pad(rows, ((0, 0), (0, nb * block_size - K)))
        blocks = rows.reshape(len(rows), nb, block_size)
        q, s, z = _quantize_blocks(blocks, bits, symmetric)
        data[r : r + len(rows)] = pack_bits(q, bits)
        scales[r : r + len(rows)] = s
        if zps is not None:
            zps[r : r + len(rows)] = pack_bits(z, bits)
    return PackedWeight(bits, block_size, N, K, data, scales.reshape(-1),
                        None if zps is None else zps.reshape(-1))


def _quantize_blocks(blocks: np.ndarray, bits: int, symmetric: bool):
    qmax = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        amax = np.abs(blocks).max(axis=-1)
        scale = amax / (mid - 1)
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.rint(blocks / safe[..., None]) + mid, 0, qmax).astype(np.uint8)
        return q, scale.astype(np.float32), None
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = (hi - lo) / qmax
    safe = np.where(scale == 0, 1.0, scale)
    zp = np.clip(np.rint(-lo / safe), 0, qmax)
    q = np.clip(np.rint(blocks / safe[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    return q, scale.astype(np.float32), zp.astype(np.uint8)


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Stack several packed weights with the same K, bits and block size along N (fused QKV)."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.block_size, p.K) != (first.bits, first.block_size, first.K):
            raise ValueError("cannot fuse weights quantized differently")
    sym = [p.zero_points is None for p in parts]
    if any(sym) and not all(sym):
        raise ValueError("cannot fuse symmetric and asymmetric weights")
    return PackedWeight(
        first.bits, first.block_size, sum(p.N for p in parts), first.K,
        np.concatenate([p.data for p in parts]),
        np.concatenate([p.scales for p in parts]),
        None if sym[0] else np.concatenate([p.zero_points for p in parts]),
    )
