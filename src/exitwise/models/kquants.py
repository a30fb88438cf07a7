"""Weights kept in GGUF's k-quant super-blocks (Q4_K, Q6_K), the layouts most GGUF files ship (Q4_K_M).

Each row holds, per 256 input columns, one super-block:

* **Q4_K** (144 bytes, 4.5 bits a weight): d and dmin (float16), 12 bytes packing eight 6-bit sub-block
  scales sc_j and mins m_j, 128 bytes of 4-bit values; w = d sc_j q - dmin m_j per sub-block of 32.
* **Q6_K** (210 bytes, 6.56 bits): 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales (one per
  16 columns), d (float16); w = d sc_j (q - 32).

:class:`KQuantLinear` keeps the file's bytes as they are and runs them on the kernel's k-quant path
(``kernels.kquant_mm``): a super-block's products stay integer and are scaled once; activations are
quantised per 256 columns with an integer sub-scale per 32 (models/kernels/lowbit_cpu.cpp says why). The
alternatives cost more: Q4_K in the group layout of
:class:`~exitwise.models.quantize.QuantizedLinear` (float32 scale and zero per 32 columns) reads 6 bits a
weight and scales every 32 columns in float; Q6_K re-quantised to int8 per channel reads 8 bits and is
no longer the file's weights (docs/models.md has the measurements, ``benchmarks/kquants.py``). Used where
the kernel runs (:func:`kernel_ok`); elsewhere these matrices load in the group / int8 layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from exitwise.models import kernels
from exitwise.models.quantize import KeptLinear, QuantizedLinear

SUPER = 256  # input columns per super-block


def fp16_field(b: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 field at byte ``at`` of every block (..., bytes) as float32 (...)."""
    return b[..., at:at + 2].contiguous().view(torch.float16)[..., 0].float()


def q4k_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks (rows, nb, 144) uint8 -> the 4-bit values q (rows, nb * 256) uint8 and per
    sub-block of 32 the scale d sc and the offset -dmin m (rows, nb * 8) float32, w = scale q + offset.
    The 6-bit fields unpack as gguf's Q4_K.get_scale_min."""
    rows = b.shape[0]
    d, dmin = fp16_field(b, 0), fp16_field(b, 2)  # (rows, nb)
    lo, hi, mix = b[..., 4:8], b[..., 8:12], b[..., 12:16]
    sc = torch.cat([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], -1).float()  # (rows, nb, 8)
    mn = torch.cat([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], -1).float()
    qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)  # sub-block 2c: low nibbles of bytes 32c..; 2c + 1: high
    q = torch.cat([qs & 15, qs >> 4], 3).reshape(rows, -1)
    return q, (d[..., None] * sc).reshape(rows, -1), (-(dmin[..., None] * mn)).reshape(rows, -1)


def _q4k_values(b: torch.Tensor) -> torch.Tensor:
    q, s, m = q4k_parts(b)
    return (q.float().view(q.shape[0], -1, 32) * s[..., None] + m[..., None]).view(q.shape[0], -1)


def _q6k_values(b: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks (rows, nb, 210) -> float32 (rows, nb * 256), in gguf's order of operations."""
    rows, nb = b.shape[:2]
    ql = b[..., :128].reshape(rows, nb, 2, 1, 64)  # per half: low nibbles (quarters 0, 1), high (2, 3)
    ql = torch.cat([ql & 15, ql >> 4], 3).reshape(rows, nb, 2, 4, 32)
    qh = b[..., 128:192].reshape(rows, nb, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], 3)  # quarter i: bits 2i, 2i + 1
    q = ((ql | (qh << 4)).to(torch.int16) - 32).float().reshape(rows, nb, 16, 16)
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # (rows, nb, 16)
    d = fp16_field(b, 208)[..., None] * sc  # (rows, nb, 16)
    return (d[..., None] * q).reshape(rows, -1)


@dataclass(frozen=True)
class BlockType:
    """One k-quant block type: its GGUF name, bytes per super-block, the dtype class it stands in for, the
    byte offsets of its float16 d and dmin (None: no dmin) and its reference de-quantiser."""

    gguf: str
    nbytes: int
    dtype: str
    d_at: int
    dmin_at: int | None
    values: Callable[[torch.Tensor], torch.Tensor]


BLOCKS = {"q4k": BlockType("Q4_K", 144, "int4", 0, 2, _q4k_values),
          "q6k": BlockType("Q6_K", 210, "int8", 208, None, _q6k_values)}
# GGUF type -> the layout that keeps its blocks
LAYOUT_OF = {b.gguf: kind for kind, b in BLOCKS.items()}


def kernel_ok(rows: int, cols: int) -> bool:
    """Whether a rows x cols k-quant matrix runs on the kernel's k-quant path here (built, enabled, this
    CPU)."""
    return cols % SUPER == 0 and rows > 0 and kernels.ready()


class KQuantLinear(KeptLinear):

    """A linear whose weight is k-quant super-blocks (out, in / 256 * bytes) uint8, as in the GGUF file;
    ``kernel_scale`` holds each super-block's d and dmin as float32 (out, in / 256, 2), read by the kernel.
    Same call interface as :class:`QuantizedLinear`; ``weight_dtype`` is the dtype it stands in for (Q4_K:
    "int4", Q6_K: "int8"). Where the kernel does not take an input (gradients, the kernel switched off)
    the weight is de-quantised for the call."""

    def __init__(self, blocks: torch.Tensor, bias: torch.Tensor | None, kind: str):
        torch.nn.Module.__init__(self)
        spec = BLOCKS[kind]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % spec.nbytes:
            raise ValueError(f"{spec.gguf} blocks must be (out, in / 256 * {spec.nbytes}) uint8, got "
                             f"{tuple(blocks.shape)} {blocks.dtype}")
        self.kind, self.weight_dtype = kind, spec.dtype
        b = blocks.view(blocks.shape[0], -1, spec.nbytes)
        d = fp16_field(b, spec.d_at)
        dmin = torch.zeros_like(d) if spec.dmin_at is None else fp16_field(b, spec.dmin_at)
        self._register(blocks, None, bias, blocks.shape[1] // spec.nbytes * SUPER,
                       torch.stack([d, dmin], -1).contiguous())

    @property
    def layout(self) -> str:
        return self.kind

    @classmethod
    def _stack(cls, parts: list[QuantizedLinear], bias: torch.Tensor | None) -> QuantizedLinear:
        return cls(torch.cat([p.weight for p in parts]), bias, parts[0].kind)

    def first_rows(self, n: int) -> KQuantLinear:
        """The first ``n`` output rows as a linear of their own, viewing this one's blocks."""
        return KQuantLinear(self.weight[:n], None if self.bias is None else self.bias[:n], self.kind)

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return kernels.kquant_mm(self.kind, x2, self.weight, self.kernel_scale)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (out, in), or its ``rows``: gguf's reference values, bit for bit (the
        kernel's de-quantiser where it runs, the torch reference elsewhere)."""
        w = self.weight if rows is None else self.weight[rows]
        if w.is_cpu and kernels.ready():
            return kernels.kquant_values(w, self.kernel_scale if rows is None else self.kernel_scale[rows], self.kind)
        return BLOCKS[self.kind].values(w.view(w.shape[0], -1, BLOCKS[self.kind].nbytes))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {BLOCKS[self.kind].gguf} blocks"
