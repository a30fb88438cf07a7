"""GGUF's Q5_0 blocks kept in 5 bits a weight (small models whose widths are not a multiple of 256 ship
most matrices in Q5_0: Qwen2.5-Coder-0.5B's 896-wide layers).

A Q5_0 block is 32 weights, w = (q - 16) d, q in 0..31: a float16 d, 4 bytes of fifth bits and 16 bytes of
low nibbles. :class:`Q5Linear` holds, per row, the low nibbles in the int4 layout of
:class:`~exitwise.models.quantize.QuantizedLinear` (column 2j in the low nibble, 2j + 1 in the high one)
and the fifth bits in 32-byte bit planes, in the order the kernel's vectors read them, each plane just
before the four pairs of groups it serves so that a row is read as one stream (see ``Q5`` in
models/kernels/lowbit_cpu.cpp); d as float32 (N, K/32). 6 bits a weight, the file's values exactly,
where the int8-per-32 layout it replaces read 9. Runs on the kernel's int4 pair path with the
fifth bit or-ed in (``kernels.q5_mm``); elsewhere the weight is de-quantised for the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exitwise.models import kernels
from exitwise.models.kquants import fp16_field
from exitwise.models.quantize import INT4_GROUP, KeptLinear, QuantizedLinear

BLOCK_BYTES = 22  # d (float16), fifth bits (4), low nibbles (16)


def vector_columns(k: int) -> torch.Tensor:
    """(V, 32) the column of each byte of each of the kernel's vectors of a K-column row: pair p's low
    nibbles (vector 2p), its high nibbles (2p + 1), then a last unpaired group's (low nibbles, high)."""
    ng = k // INT4_GROUP
    b = torch.arange(16)
    vecs = []
    for p in range(ng // 2):
        g0, g1 = 2 * p * INT4_GROUP, (2 * p + 1) * INT4_GROUP
        vecs += [torch.cat([g0 + 2 * b, g1 + 2 * b]), torch.cat([g0 + 2 * b + 1, g1 + 2 * b + 1])]
    if ng % 2:
        g = (ng - 1) * INT4_GROUP
        vecs.append(torch.cat([g + 2 * b, g + 2 * b + 1]))
    return torch.stack(vecs)


CHUNK_PAIRS = 4  # pairs of groups a plane serves (8 vectors): a chunk is the plane, then their nibbles


def plane_bytes(k: int) -> int:
    """Bytes of bit planes a row of ``k`` columns carries: one 32-byte plane per 8 vectors (two a pair of
    groups, one a last unpaired group; :func:`vector_columns`)."""
    groups = k // INT4_GROUP
    return (2 * (groups // 2) + groups % 2 + 7) // 8 * 32


def row_bytes(k: int) -> int:
    """Bytes of a packed row of ``k`` columns: K/2 of nibbles and the planes."""
    return k // 2 + plane_bytes(k)


def _chunks(k: int) -> list[tuple[int, int, int]]:
    """Per chunk of a row: (its byte offset, the offset of its nibbles in the K/2 nibble bytes, how many)."""
    nb, out, at = k // 2, [], 0
    for c in range(plane_bytes(k) // 32):
        start = c * CHUNK_PAIRS * 32
        count = min(CHUNK_PAIRS * 32, nb - start)
        out.append((at, start, count))
        at += 32 + count
    return out


def pack(q: torch.Tensor) -> torch.Tensor:
    """Levels q (N, K) in 0..31 -> the kernel's rows (N, row_bytes(K)) uint8: per chunk of four pairs of
    groups, a plane of fifth bits, then those pairs' nibbles (column 2j low, 2j + 1 high)."""
    n, k = q.shape
    q = q.to(torch.uint8)
    low = q & 15
    nibbles = low[:, 0::2] | (low[:, 1::2] << 4)  # (N, K/2)
    cols = vector_columns(k)
    fifth = (q >> 4)[:, cols]  # (N, V, 32) in 0..1
    v = cols.shape[0]
    fifth = F.pad(fifth, (0, 0, 0, (-v) % 8)).view(n, -1, 8, 32)  # (N, P, 8, 32)
    weights = (1 << torch.arange(8, dtype=torch.uint8)).view(1, 1, 8, 1)
    planes = (fifth * weights).sum(2, dtype=torch.uint8)  # (N, P, 32); bits distinct: the sum is an or
    parts = []
    for c, (_, start, count) in enumerate(_chunks(k)):
        parts += [planes[:, c], nibbles[:, start:start + count]]
    return torch.cat(parts, 1).contiguous()


def unpack(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's rows (N, row_bytes(K)) -> levels q (N, K) uint8 in 0..31."""
    n = rows.shape[0]
    chunks = _chunks(k)
    planes = torch.stack([rows[:, at:at + 32] for at, _, _ in chunks], 1)  # (N, P, 32)
    nibbles = torch.cat([rows[:, at + 32:at + 32 + count] for at, _, count in chunks], 1)
    low = torch.stack([nibbles & 15, nibbles >> 4], -1).view(n, k)
    cols = vector_columns(k)
    bits = (planes[:, :, None] >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1  # (N, P, 8, 32)
    fifth = torch.zeros(n, k, dtype=torch.uint8)
    fifth[:, cols.reshape(-1)] = bits.reshape(n, -1, 32)[:, :cols.shape[0]].reshape(n, -1)
    return low | (fifth << 4)


def from_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0 blocks (N, K/32 * 22) uint8 as the file holds them -> levels q (N, K) uint8 in 0..31 and d
    (N, K/32) float32 (gguf's Q5_0: the fifth bit of column j is bit j of the 4-byte field; column j < 16
    is the low nibble of byte j, column 16 + j its high one)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, BLOCK_BYTES)
    d = fp16_field(b, 0)  # (N, nb)
    bits = (b[..., 2:6, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (N, nb, 4, 8): little-endian bits
    bits = bits.reshape(n, -1, 32)
    qs = b[..., 6:]
    q = torch.cat([qs & 15, qs >> 4], -1) | (bits << 4)  # (N, nb, 32)
    return q.view(n, -1), d


class Q5Linear(KeptLinear):

    """A linear whose weight is Q5_0 levels packed by :func:`pack` (out, in / 2 + plane bytes) uint8 with
    ``kernel_scale`` d (out, in / 32) float32, w = (q - 16) d. Same call interface as
    :class:`QuantizedLinear`; ``weight_dtype`` "int8" (the dtype it stands in for, as the int8-per-32 layout
    it replaces)."""

    def __init__(self, weight: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None, in_features: int):
        torch.nn.Module.__init__(self)
        n = weight.shape[0]
        if in_features % INT4_GROUP or weight.dtype != torch.uint8 or tuple(weight.shape) != (
                n, row_bytes(in_features)):
            raise ValueError(f"Q5_0 rows for {in_features} columns must be ({n}, {row_bytes(in_features)}) "
                             f"uint8, got {tuple(weight.shape)} {weight.dtype}")
        if tuple(d.shape) != (n, in_features // INT4_GROUP):
            raise ValueError(f"Q5_0 scales must be ({n}, {in_features // INT4_GROUP}), got {tuple(d.shape)}")
        self.weight_dtype = "int8"
        self._register(weight, None, bias, in_features, d.float().contiguous())

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> Q5Linear:
        q, d = from_blocks(blocks)
        return cls(pack(q), d, bias, q.shape[1])

    @property
    def layout(self) -> str:
        return "q5"

    @classmethod
    def _stack(cls, parts: list[QuantizedLinear], bias: torch.Tensor | None) -> QuantizedLinear:
        return cls(torch.cat([p.weight for p in parts]), torch.cat([p.kernel_scale for p in parts]), bias,
                   parts[0].in_features)

    def first_rows(self, n: int) -> Q5Linear:
        """The first ``n`` output rows as a linear of their own, viewing this one's tensors."""
        return Q5Linear(self.weight[:n], self.kernel_scale[:n], None if self.bias is None else self.bias[:n],
                        self.in_features)

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return kernels.q5_mm(x2, self.weight, self.kernel_scale)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (out, in), or its ``rows``: (q - 16) d, gguf's Q5_0 values."""
        w = self.weight if rows is None else self.weight[rows]
        d = self.kernel_scale if rows is None else self.kernel_scale[rows]
        q = unpack(w, self.in_features).float() - 16
        return (q.view(w.shape[0], -1, INT4_GROUP) * d[..., None]).view(w.shape[0], -1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, Q5_0 levels"
