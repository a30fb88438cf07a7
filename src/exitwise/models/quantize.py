"""Weight-only low precision: every weight matmul in bfloat16, int8 or int4, activations in float32.

On CPU a decode step costs the bytes of its weights (SmolLM2-135M: 538 MB per token in float32), so
the lever is bytes: bfloat16 halves them, int8 quarters them, int4 eighths them.

* ``int8``: symmetric per-output-channel int8 with bfloat16 scales, run by ``aten._weight_int8pack_mm``
  with bfloat16 activations (the fastest activation dtype the kernel has on CPU: with float32 ones it
  is not vectorised and 3-10x slower than a float32 matmul).
* ``int4``: the layers asymmetric 4-bit per group of 32 input columns, run by
  ``aten._weight_int4pack_mm_for_cpu``; the heads stay int8 (:func:`head_dtype`). On a model that came
  from a Q4_1 GGUF (the bundled SmolLM2) the min/max grid recovers the file's own 4-bit values, so the
  smallest dtype is also the one closest to the weights as shipped.

* On x86 CPUs with AVX2 + FMA both run exitwise's own kernel instead (:mod:`exitwise.models.kernels`):
  activations quantised to int8 per 32 columns against the exact int4 / int8 weights (integer group
  products, llama.cpp's Q8 scheme), at every row count, so one row's result is bit-identical in a
  decode step, a verification pass, a batch and a prefill. aten's kernels and the bfloat16 copy
  (BATCH_ROWS) stay for the rest: CUDA, gradients, CPUs without AVX2, a failed build.

Per-row scales make quantisation commute with stacking rows, so fused projections (Q|K|V, gate|up)
are the concatenation of the quantised parts, bit for bit. A low-precision head's top logits are
recomputed from float32 rows (:func:`rescore_top`), which keeps its argmax float32's.

:class:`QuantizedLinear` is an ``nn.Module`` with ``nn.Linear``'s call signature, so the Hugging Face
model's own forward (RAEE, heads training) and the engine's fused layers use the same tensors.
:func:`quantize_model` swaps a model's decoder and head ``nn.Linear`` modules for them; the quantised
tensors are cached as safetensors beside the float32 cache, with a manifest that says what made them and
the file's sha256, checked before the file is used: a damaged cache is rebuilt with a one-line warning.
torchao is not a dependency: these aten ops are the kernels (gpt-fast calls them the same way), and
the engine fuses projections by concatenating plain tensors, which a tensor subclass would hide.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from exitwise.models import kernels
from exitwise.models.float_linear import onednn_ok, stack_biases

WEIGHT_DTYPES = ("float32", "bfloat16", "int8", "int4")
INT4_GROUP = 32  # int4: one scale and zero point per 32 input columns (the GGUF Q4_0 / Q4_1 block)
# From this many rows on, int8 / int4 matmuls run on a bfloat16 copy of their weights: the int kernels
# are matrix-vector kernels whose time grows with the rows (a 3072 x 576 weight, one thread: int4 102 /
# 373 / 2756 us at 1 / 8 / 64 rows, bfloat16 317 / 330 / 569 us), so batched decode and prefill would be
# slower than float32 without it. The copy costs memory (2 bytes per weight), never bandwidth at 1 row.
BATCH_ROWS = 8
# how many of a low-precision head's largest logits are recomputed from float32 rows (rescore_top)
DEFAULT_HEAD_RESCORE = 16
# bump when the quantised layout or its manifest changes; 4: the file's sha256 in the manifest (older
# caches, without it, are rebuilt)
CACHE_FORMAT = 4


def _int4_shape_ok(n: int, k: int) -> bool:
    """The CPU int4 kernel's shapes: input columns in whole groups, output rows in sixteens."""
    return k % INT4_GROUP == 0 and n % 16 == 0


def kernel_shape_ok(n: int, k: int) -> bool:
    """Whether the exitwise kernel's int8 / int4 paths take an n x k weight: whole groups of input
    columns, output rows in fours."""
    return k % INT4_GROUP == 0 and n % 4 == 0


def _check_int4_shape(n: int, k: int) -> None:
    if not _int4_shape_ok(n, k):
        raise ValueError(f"int4 needs input sizes divisible by {INT4_GROUP} and output sizes by 16, "
                         f"got a {n} x {k} weight")


def _int4_grid(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A float weight (n, k) on its per-group min/max grid: the groups (n, k/G, G), their levels q in
    0..15 (uint8, same shape), and per group the min and the step (max - min) / 15, each (n, k/G)."""
    n, k = w.shape
    g = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return g, q, lo, scale


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a float weight (out, in): the integers (out, in) and the float32 values
    of their bfloat16 scales max|row| / 127 (out,). The kernels multiply by the bfloat16 scale, so the
    integers are rounded against that scale. Rows are independent: chunks of rows quantise as the whole."""
    scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127.0).to(torch.bfloat16).float()  # (out,)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def head_dtype(dtype: str) -> str:
    """The dtype of vocabulary-sized matrices (output head, exit heads) in a model run at ``dtype``: int4
    models keep int8 heads. A 4-bit head is what broke int4 before (76.6% top-1 agreement with float32
    on SmolLM2, whose GGUF stores its tied embedding in 8 bits, Q8_0), and int8 + re-scoring is exact
    where it matters."""
    return "int8" if dtype == "int4" else dtype


class QuantizedLinear(nn.Module):

    """A linear layer with bfloat16, int8 or int4 weights; float32 (or any float) in, float32 out.

    ``weight``: bfloat16 (out, in); int8 (out, in) with ``scale`` (out,), or with float32 ``scale`` (out,
    in / INT4_GROUP), one per row and group of columns (layout "int8g": GGUF's Q8_0 blocks as
    they are, run on the exitwise kernel only); int4 two 4-bit values per byte
    (out, in / 2) uint8, column 2j in the low nibble and 2j + 1 in the high one, with ``scale`` holding
    scales and zero points (in / INT4_GROUP, out, 2) as the kernel takes them; the kernel's own packing
    of the same values (``packed``) is derived, so files do not depend on its layout."""

    batch_rows = BATCH_ROWS  # from this many rows on, the bfloat16 copy (see int_kernels_only)
    # up to this many rows, the exitwise kernel where it runs (None: every input). Every input by default:
    # the same arithmetic for a row at every row count is what makes batches, verification passes and
    # served requests give the tokens a request gets alone. On CPUs with bfloat16 hardware oneDNN's
    # bfloat16 copy beats the AVX2 path on large inputs (a 3072 x 576 int4 matrix at 64 rows: 1381 against
    # 2643 us, docs/dtypes.md) but rounds differently; set this to trade invariance for it.
    kernel_rows: int | None = None

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, dtype: str):
        super().__init__()
        if dtype not in WEIGHT_DTYPES[1:]:
            raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES[1:]} here, got {dtype!r}")
        if (dtype != "bfloat16") != (scale is not None):
            raise ValueError(f"{dtype} weights need their scales (and bfloat16 weights none)")
        self.weight_dtype = dtype
        # int4 scales and zeros stay float32 when given so (the exact ones of GGUF blocks, models/gguf.py);
        # everything else holds bfloat16 scales, as the aten kernels take them
        if scale is not None and dtype == "int8" and scale.dim() == 2:  # per group: GGUF's own scales
            scale = scale.float()
            if scale.shape != (weight.shape[0], weight.shape[1] // INT4_GROUP) or weight.shape[1] % INT4_GROUP:
                raise ValueError(f"int8 group scales must be (out, in / {INT4_GROUP}), got {tuple(scale.shape)} "
                                 f"for a {tuple(weight.shape)} weight")
        elif scale is not None and not (dtype == "int4" and scale.dtype == torch.float32):
            scale = scale.to(torch.bfloat16)
        in_features = weight.shape[1] * (2 if dtype == "int4" else 1)
        if dtype == "int4":
            _check_int4_shape(weight.shape[0], in_features)
            if weight.device.type != "cpu":
                raise ValueError(f"int4 runs on the CPU kernel only, not on {weight.device}")
        # the exitwise kernel's view of the scales (int4: (out, in / G) int32 pairs; int8: float32 (out,)),
        # derived; None where its shapes do not fit (it takes whole groups and outputs in fours)
        kscale = None
        if dtype != "bfloat16" and weight.device.type == "cpu" and kernel_shape_ok(weight.shape[0], in_features):
            kscale = kernels.int4_scales(scale) if dtype == "int4" else scale.float()
        self._register(weight, None if scale is None else scale.contiguous(), bias, in_features, kscale)

    def _register(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                  in_features: int, kernel_scale: torch.Tensor | None) -> None:
        """The tensors and sizes every low-precision linear has (subclasses keep other weight layouts)."""
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.float())
        # bfloat16 (out, in) for >= BATCH_ROWS rows (add_batch_copy), oneDNN-packed when _onednn;
        # derived, so not saved
        self.register_buffer("batch_weight", None, persistent=False)
        self._onednn = False
        self.out_features, self.in_features = weight.shape[0], in_features
        # aten's packing of the int4 values, made on first use (:attr:`packed`): where the exitwise kernel
        # runs it is never read, and it is as large as the weight itself
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("kernel_scale", kernel_scale, persistent=False)

    @property
    def layout(self) -> str:
        """How the weight is stored: its dtype, or "int8g" for int8 with a scale per group of columns;
        subclasses that keep a file's blocks name them."""
        return "int8g" if self.weight_dtype == "int8" and self.scale.dim() == 2 else self.weight_dtype

    @property
    def packed(self) -> torch.Tensor | None:
        """The int4 values in aten's own layout (``_weight_int4pack_mm_for_cpu``), made on first use."""
        if self._packed is None and self.weight_dtype == "int4":
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._nibbles().to(torch.int32), 1)
        return self._packed

    def _nibbles(self) -> torch.Tensor:
        """int4 values (out, in) uint8 in 0..15 from the two-per-byte ``weight``."""
        w = self.weight
        return torch.stack([w & 15, w >> 4], dim=-1).view(w.shape[0], -1)

    @classmethod
    def from_int4(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bias: torch.Tensor | None) -> QuantizedLinear:
        """int4 from its parts: values ``q`` (out, in) in 0..15 and per group of INT4_GROUP input
        columns ``scale`` and ``zero`` (out, in / INT4_GROUP), w = (q - 8) * scale + zero. float32 scales
        stay float32 (GGUF blocks, exact), bfloat16 ones bfloat16."""
        n, k = q.shape
        _check_int4_shape(n, k)
        q = q.to(torch.uint8)
        two = q[:, 0::2] | (q[:, 1::2] << 4)  # (n, k/2): column 2j in the low nibble
        return cls(two, torch.stack([scale.t(), zero.t()], -1), bias, "int4")  # scales (k/G, n, 2)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: str) -> QuantizedLinear:
        """Quantise a float weight (out, in): bfloat16 by rounding; int8 with scale = max|row| / 127;
        int4 per group (:meth:`_int4`)."""
        w = weight.detach().float()
        if dtype == "bfloat16":
            return cls(w.to(torch.bfloat16), None, bias, dtype)
        if dtype == "int4":
            return cls._int4(w, bias)
        if dtype != "int8":
            raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES[1:]} here, got {dtype!r}")
        return cls(*int8_rows(w), bias, dtype)

    @staticmethod
    def int4_is_lossless(w: torch.Tensor, tol: float = 1e-5) -> bool:
        """Whether the int4 grid (per group of INT4_GROUP: min + q (max - min) / 15) holds ``w`` exactly:
        true of weights de-quantised from Q4_1 blocks, false of trained float weights."""
        if not _int4_shape_ok(*w.shape):
            return False
        g, q, lo, scale = _int4_grid(w.detach().float())
        back = lo[..., None] + q.float() * scale[..., None]
        return bool(((back - g).abs() <= tol * (15 * scale[..., None])).all())

    @classmethod
    def _int4(cls, w: torch.Tensor, bias: torch.Tensor | None) -> QuantizedLinear:
        """Asymmetric int4 per group of INT4_GROUP input columns, scale = (max - min) / 15, zero = min,
        in the CPU kernel's layout (it computes w = (q - 8) * scale + (min + 8 scale)). This is how
        llama.cpp makes Q4_1 blocks, so a model de-quantised from Q4_1 gets its own 4-bit values back
        (only the scales are rounded to bfloat16): lossless where int8 per channel is not."""
        n, k = w.shape
        _check_int4_shape(n, k)
        _, q, lo, scale = _int4_grid(w)
        bf = torch.bfloat16  # the layout of float weights quantised here (and of their caches): bfloat16 scales
        return cls.from_int4(q.view(n, k), scale.to(bf), (lo + 8 * scale).to(bf), bias)

    @classmethod
    def cat(cls, parts: list[QuantizedLinear]) -> QuantizedLinear | StackedLinear:
        """Rows of several layers stacked into one (the fused Q|K|V and gate|up projections); parts of
        different layouts (GGUF blocks of different types kept as the file has them) make a
        :class:`StackedLinear`."""
        if len({p.layout for p in parts}) == 1:
            return type(parts[0])._stack(parts, stack_biases(parts))
        return StackedLinear(parts)

    @classmethod
    def _stack(cls, parts: list[QuantizedLinear], bias: torch.Tensor | None) -> QuantizedLinear:
        """:meth:`cat` of parts of this class and one dtype, the bias already stacked."""
        dim = 1 if parts[0].weight_dtype == "int4" else 0  # int4 scales are (groups, out, 2)
        scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts], dim=dim)
        return cls(torch.cat([p.weight for p in parts]), scale, bias, parts[0].weight_dtype)

    def share_rows_of(self, fused: QuantizedLinear, start: int) -> None:
        """Point this module's tensors at its rows ``start:start + out_features`` of ``fused`` (a Q|K|V or
        gate|up stacked by :meth:`cat` from this module and others), so that the Hugging Face modules and
        the engine's fused ones hold one copy of the weights. The values are the same: stacking rows is
        exact, scales included."""
        stop = start + self.out_features
        self.weight = fused.weight[start:stop]
        if self.scale is not None:
            self.scale = fused.scale[:, start:stop] if self.weight_dtype == "int4" else fused.scale[start:stop]
        if self.kernel_scale is not None and fused.kernel_scale is not None:
            self.kernel_scale = fused.kernel_scale[start:stop]
        if self.bias is not None:
            self.bias = fused.bias[start:stop]
        self._packed = None  # made again, from the shared values, if aten's kernel runs

    def view_into(self, parts: list[QuantizedLinear]) -> None:
        """:meth:`share_rows_of` for each of ``parts``, the modules :meth:`cat` stacked into this one, in
        order."""
        start = 0
        for part in parts:
            part.share_rows_of(self, start)
            start += part.out_features

    def first_rows(self, n: int) -> QuantizedLinear:
        """The first ``n`` output rows as a linear of their own: views of this one's tensors (int4 scales,
        laid out by group, are re-laid)."""
        scale = None if self.scale is None else self.scale[:, :n] if self.weight_dtype == "int4" else self.scale[:n]
        bias = None if self.bias is None else self.bias[:n]
        return QuantizedLinear(self.weight[:n], scale, bias, self.weight_dtype)

    def add_batch_copy(self) -> None:
        """Keep a bfloat16 copy of an int8 / int4 weight for inputs of BATCH_ROWS rows or more, packed
        for oneDNN where it runs; a bfloat16 weight gets its packed copy, used at every row count. None
        where the exitwise kernel takes every input (:meth:`_kernel_takes_all`).

        oneDNN's packed bfloat16 matmul (AMX on this CPU) against ``F.linear``'s, one thread, 8 / 64
        rows: the 49k-row head 2.5 / 3.8 ms vs 7.1 / 10.5 ms, a 3072 x 576 weight 168 / 230 vs 256 /
        429 us, bit-identical results; at 1 row 293 vs 457 us."""
        if self.batch_weight is not None or self._kernel_takes_all():
            return
        w = self.weight if self.weight_dtype == "bfloat16" else self._bf16_copy()
        self._onednn = onednn_ok(w.device, torch.bfloat16)
        if self._onednn:
            self.batch_weight = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_ROWS)
        elif self.weight_dtype != "bfloat16":
            self.batch_weight = w

    def _kernel_takes_all(self) -> bool:
        """Whether the exitwise kernel takes every input of this module (the default where it runs): there
        a bfloat16 copy would never be read, and it costs 2 bytes a weight (Qwen2.5-Coder-0.5B: 1 GB
        beside its 0.5 GB of int8 / int4 weights)."""
        return self.kernel_scale is not None and self.kernel_rows is None and kernels.ready()

    # by layout: kernels.layer_plan's kinds
    KERNEL_KINDS = {"int4": 0, "int8": 1, "int8g": 1, "q4k": 2, "q6k": 3, "q5": 4}

    def kernel_spec(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] | None:
        """This linear's parts as :func:`kernels.layer_plan` takes them, one (kind, weight, kernel scales,
        bias) here, where the kernel can compute it; else None (bfloat16 weights, shapes or devices the
        kernel does not take). Whether it may run a given input (the kernel switched on, ``kernel_rows``,
        int4 on the AVX512-BF16 path or not) is decided per call."""
        kind = self.KERNEL_KINDS.get(self.layout)
        if kind is None or self.kernel_scale is None:
            return None
        return [(kind, self.weight, self.kernel_scale, self.bias)]

    def _bf16_copy(self) -> torch.Tensor:
        """The weight in bfloat16, de-quantised a few thousand rows at a time (never all in float32)."""
        out = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16, device=self.weight.device)
        step = max(1, (8 << 20) // self.in_features)
        for start in range(0, self.out_features, step):
            rows = torch.arange(start, min(start + step, self.out_features), device=self.weight.device)
            out[start:start + step] = self.dequantize(rows).to(torch.bfloat16)
        return out

    def _batch_matmul(self, xb: torch.Tensor) -> torch.Tensor:
        if not self._onednn:
            return F.linear(xb, self.batch_weight)
        shape = xb.shape
        y = torch.ops.mkldnn._linear_pointwise(xb.reshape(-1, shape[-1]), self.batch_weight, None, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.kernel_scale is None or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            return False
        return (self.kernel_rows is None or x.numel() <= self.kernel_rows * self.in_features) and kernels.ready()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel path is a decode step's ~120 calls: kept to a few attribute reads (each op of Python
        # here is ~1 us, the call of a 576-wide layer at one row ~10 us)
        if self._use_kernel(x):
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            if x2.dtype != torch.float32 or not x2.is_contiguous():
                x2 = x2.to(torch.float32).contiguous()
            y = self._kernel_matmul(x2)
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return self._off_kernel(x)

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) contiguous float32 rows through the exitwise kernel -> (M, N) float32, no bias."""
        return (kernels.int4_mm if self.weight_dtype == "int4" else kernels.int8_mm)(x2, self.weight, self.kernel_scale)

    def _off_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """An input the exitwise kernel does not take: aten's int kernels or the bfloat16 copy."""
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if self.batch_weight is not None and (self.weight_dtype == "bfloat16"
                                              or x.numel() >= self.batch_rows * self.in_features):
            y = self._batch_matmul(xb)
        elif self.layout == "int8g":  # aten has no int8 kernel with group scales: the float weight
            y = F.linear(x.float(), self.dequantize())
        elif self.scale is not None:
            shape = xb.shape
            x2 = xb.reshape(-1, shape[-1])
            if self.weight_dtype == "int4":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, INT4_GROUP, self.scale.to(x2.dtype))
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
            y = y.view(*shape[:-1], self.out_features)
        else:
            y = F.linear(xb, self.weight)
        y = y.float()
        return y if self.bias is None else y + self.bias

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (out, in) these low-precision tensors stand for, or only ``rows`` of it.
        int4: (q - 8) * scale + zero per group, as the kernel computes it."""
        if self.weight_dtype == "int4":
            q = self._nibbles() if rows is None else self._nibbles()[rows]
            sz = self.scale.float() if rows is None else self.scale.float()[:, rows]  # (k/G, n, 2)
            g = (q.float() - 8).view(q.shape[0], -1, INT4_GROUP)
            return (g * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(q.shape[0], -1)
        w = self.weight if rows is None else self.weight[rows]
        w = w.float()
        if self.scale is not None:
            s = (self.scale if rows is None else self.scale[rows]).float()
            if s.dim() == 2:  # per group of columns
                return (w.view(w.shape[0], -1, INT4_GROUP) * s[..., None]).view(w.shape)
            w = w * s[:, None]
        return w

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight_dtype}"


class KeptLinear(QuantizedLinear):
    """A linear whose weight keeps a GGUF block format as the file has it (models/kquants.py,
    models/q5.py): ``weight`` and ``kernel_scale`` are the whole of it (no ``scale``), rows independent.
    aten has no kernel for these formats, so off the exitwise kernel the weight is de-quantised for the
    call (or its bfloat16 copy read, where one was made)."""

    @property
    def packed(self) -> None:
        return None

    def share_rows_of(self, fused: QuantizedLinear, start: int) -> None:
        stop = start + self.out_features
        self.weight = fused.weight[start:stop]
        self.kernel_scale = fused.kernel_scale[start:stop]
        if self.bias is not None:
            self.bias = fused.bias[start:stop]

    def _off_kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_weight is not None and x.numel() >= self.batch_rows * self.in_features:
            y = self._batch_matmul(x.to(torch.bfloat16)).float()
            return y if self.bias is None else y + self.bias
        return F.linear(x.float(), self.dequantize(), self.bias)


def _runs(parts: list[QuantizedLinear]) -> list[list[QuantizedLinear]]:
    """Consecutive parts of one layout, in order."""
    return [list(g) for _, g in itertools.groupby(parts, key=lambda p: p.layout)]


class StackedLinear(nn.Module):
    """Rows of linears of different layouts as one linear: a fused Q|K|V whose parts a GGUF file keeps in
    different block types (Q4_K_M files keep V in Q6_K on half the layers and Q, K in Q4_K). Each run of
    consecutive parts of one layout is stacked by :meth:`QuantizedLinear.cat` and runs its own kernel;
    the outputs are concatenated. Every part keeps the file's blocks: a mixed Q|K|V of
    Qwen2.5-Coder-1.5B reads 1.87 MB a layer where re-quantised to int8 per channel it read 3.15 MB."""

    def __init__(self, parts: list[QuantizedLinear]):
        super().__init__()
        self.runs = nn.ModuleList([g[0] if len(g) == 1 else QuantizedLinear.cat(g) for g in _runs(parts)])
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    @property
    def bias(self) -> torch.Tensor | None:
        return stack_biases(list(self.runs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([run(x) for run in self.runs], dim=-1)

    def kernel_spec(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] | None:
        """Each run's part in order (the one-call layer concatenates their outputs as :meth:`forward`
        does), or None where the kernel cannot compute one of them."""
        specs = [run.kernel_spec() for run in self.runs]
        return None if any(s is None for s in specs) else [part for spec in specs for part in spec]

    def view_into(self, parts: list[QuantizedLinear]) -> None:
        """The parts of each stacked run view its rows (one copy); parts alone in a run are the run."""
        for run, group in zip(self.runs, _runs(parts), strict=True):
            if len(group) > 1:
                run.view_into(group)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (out, in), or its ``rows``."""
        w = torch.cat([run.dequantize() for run in self.runs])
        return w if rows is None else w[rows]

    def add_batch_copy(self) -> None:
        for run in self.runs:
            run.add_batch_copy()


def top_indices(x: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """The indices of the ``k`` largest entries of each row of x (B, V), as ``x.topk(k).indices`` (the same
    set; ties may pick other equal entries), without aten's CPU top-k over the whole row: on a 151,936-id
    row of real logits it took 2.2 ms, longer than the head's bytes take to stream. The k largest entries
    lie in the k chunks of ``chunk`` ids with the largest maxima, so the top-k runs over those chunks'
    ids (and the last partial chunk) only: ~0.15 ms."""
    b, v = x.shape
    n = v // chunk
    if n < 4 * k:
        return x.topk(k, dim=-1).indices
    chunks = x[:, :n * chunk].view(b, n, chunk).amax(-1).topk(k, dim=-1).indices  # (B, k)
    cand = (chunks[..., None] * chunk + torch.arange(chunk, device=x.device)).view(b, k * chunk)
    if n * chunk < v:
        cand = torch.cat([cand, torch.arange(n * chunk, v, device=x.device).expand(b, -1)], 1)
    return cand.gather(1, x.gather(1, cand).topk(k, dim=-1).indices)


def rescore_top(x: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                top: int) -> torch.Tensor:
    """``logits`` (B, V) of a low-precision head with its ``top`` largest entries recomputed exactly
    from the float32 ``weight`` rows (V, D) and input x (B, D), in place.

    A bfloat16 result carries 8 bits of mantissa (logits near 20 are rounded to 1/16) and int8 weights
    add their own error, so near-ties flip the argmax: on SmolLM2 the int8 head alone agrees with the
    float32 head's top-1 on 96.5% of tokens, bfloat16 on 97.9%. Gathering ``top`` float32 rows costs
    top x D x 4 bytes (16 rows: 37 KB against the int8 head's 28 MB), and the argmax is then the
    float32 head's whenever it is among them."""
    idx = top_indices(logits, top)  # (B, top)
    exact = torch.einsum("bd,btd->bt", x.float(), weight[idx])  # (B, top)
    if bias is not None:
        exact = exact + bias[idx]
    return logits.scatter_(1, idx, exact)


@contextlib.contextmanager
def int_kernels_only():
    """Within this block every int8 / int4 matmul runs on the kernel batch-1 decode uses, whatever its
    rows (the exitwise kernel where it runs, else aten's int kernels, never the bfloat16 copy): what a
    quality measurement by prefill (perplexity) uses to score the arithmetic of batch-1 decode."""
    before = QuantizedLinear.batch_rows, QuantizedLinear.kernel_rows
    QuantizedLinear.batch_rows = QuantizedLinear.kernel_rows = 1 << 62
    try:
        yield
    finally:
        QuantizedLinear.batch_rows, QuantizedLinear.kernel_rows = before


class FloatRows:
    """The float32 rows of a :class:`QuantizedLinear`, de-quantised when gathered (``rows[idx]``): what
    re-scoring and shortlists read from a low-bit head, without a float32 copy of all of it (the
    151,936 x 896 head of Qwen2.5-Coder-0.5B: 545 MB). The rows are the ones ``dequantize`` gives."""

    def __init__(self, lin: QuantizedLinear):
        self.lin = lin
        self.shape = torch.Size((lin.out_features, lin.in_features))
        self.device = lin.weight.device
        self.dtype = torch.float32

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, device=self.device)
        return self.lin.dequantize(idx.reshape(-1)).view(*idx.shape, self.shape[1])


def float_weight(module: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight of an ``nn.Linear`` or :class:`QuantizedLinear` (only ``rows`` if given):
    what readouts of a few vocabulary rows multiply by."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize(rows)
    w = module.weight if rows is None else module.weight[rows]
    return w if w.dtype == torch.float32 else w.float()


def weight_dtype_of(module: nn.Module) -> str:
    """The weight dtype of a module's linear layers (the first QuantizedLinear in it decides)."""
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            return m.weight_dtype
    return "float32"


def kernel_supported(dtype: str, device: torch.device | str) -> bool:
    """Whether the ``dtype`` weight-only kernel runs (and is close to float32) on ``device``."""
    try:
        w = torch.randn(16, 64, device=device)
        x = torch.randn(2, 64, device=device)
        y = F.linear(x, w)
        return bool((QuantizedLinear.from_float(w, None, dtype)(x) - y).norm() / y.norm() < 0.2)
    except (RuntimeError, NotImplementedError, ValueError):
        return False


def auto_dtype(model: nn.Module) -> str:
    """``--dtype auto``: int4 where int4 holds every layer matrix exactly (weights that came from 4-bit
    GGUF blocks, such as the bundled SmolLM2) and its kernel runs; float32 otherwise, so that weights
    are never re-rounded without being asked. Exact weights are not float32's outputs: the measured
    speed and top-1 agreement with float32 are in docs/results.md."""
    device = next(model.parameters()).device
    try:
        linears = [m for m in _targets(model).values()][:-1]  # the layers' (the head stays int8 anyway)
    except ValueError:
        return "float32"
    lossless = bool(linears) and all(QuantizedLinear.int4_is_lossless(m.weight) for m in linears)
    return "int4" if lossless and kernel_supported("int4", device) else "float32"


def usable_dtype(dtype: str, device: torch.device | str) -> str:
    """``dtype``, or bfloat16 with a one-line warning where its kernel does not run on ``device``."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    if dtype in ("int8", "int4") and not kernel_supported(dtype, device):
        warnings.warn(f"{dtype} weight-only matmul does not run on {device}; using bfloat16", stacklevel=3)
        return "bfloat16"
    return dtype


# ------------------------------------------------------------------------------- whole models
def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The matmuls a decode step streams: every nn.Linear inside the decoder layers, and the head."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers (model.model.layers) to quantise")
    found = {f"model.layers.{name}": mod for name, mod in layers.named_modules() if isinstance(mod, nn.Linear)}
    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if head_name is None or not isinstance(model.get_output_embeddings(), nn.Linear):
        raise ValueError(f"{type(model).__name__}: no linear output head to quantise")
    found[head_name] = model.get_output_embeddings()
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


SCHEMES = {"bfloat16": "bfloat16",
           "int8": "symmetric per-output-channel int8, bfloat16 scales",
           "int4": f"layers: asymmetric int4 per {INT4_GROUP} input columns, bfloat16 scales and zeros (CPU kernel "
                   "layout); head: int8 per output channel"}


def _manifest(dtype: str, source: dict) -> dict:
    from exitwise import __version__

    return {"format": CACHE_FORMAT, "kind": "exitwise-quantized-weights", "dtype": dtype,
            "scheme": SCHEMES[dtype],
            "exitwise": __version__, "torch": torch.__version__.split("+")[0], "source": source}


def _damaged(path: Path, why: str) -> None:
    warnings.warn(f"the quantised weights cache {path} {why}; rebuilding it", stacklevel=4)


def _load_cached(path: Path, manifest: dict, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The cached tensors if ``path`` was made by this version from the same float32 weights and still
    matches its checksum; None (rebuilt) otherwise, with a warning where the file is damaged.

    The sha256 costs 0.08-0.11 s for SmolLM2's 95 MB int4 file (measured on a busy 2-core machine, file
    in the page cache), against seconds to quantise again, and it catches what loading would not: a truncated,
    emptied or random file (a SafetensorError before), another dtype's file copied over this one (an
    IndexError before), tensors of two layers swapped or bytes flipped (used silently before)."""
    from safetensors import safe_open

    from exitwise.artifacts import sha256_file

    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None  # no manifest: never finished writing (the manifest goes last), or never made
    if not isinstance(meta, dict):
        _damaged(path, f"has a malformed manifest {meta_path}")
        return None
    digest = meta.pop("sha256", None)
    if meta != manifest:
        return None  # another version, dtype, scheme or source: rebuilt, never misread
    try:
        if digest is None or sha256_file(path) != digest:
            _damaged(path, "does not match its checksum (truncated, damaged or replaced)")
            return None
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            wanted = {k for n in names for k in (f"{n}.weight", f"{n}.scale", f"{n}.bias") if k in keys}
            if not all(f"{n}.weight" in keys for n in names):
                _damaged(path, "lacks tensors of this model")
                return None
            return {k: f.get_tensor(k) for k in wanted}
    except Exception as exc:  # safetensors raises its own SafetensorError, among others
        _damaged(path, f"cannot be read ({' '.join(str(exc).split()) or exc.__class__.__name__})")
        return None


def _from_cache(cached: dict[str, torch.Tensor], targets: dict[str, nn.Linear], dtypes: dict[str, str],
                device: torch.device, path: Path) -> dict[str, QuantizedLinear] | None:
    """The modules of the cached tensors, each checked against the layer it replaces; None (and a
    warning) if any does not fit, so that a cache that passed its checksum but not the model is rebuilt."""
    modules = {}
    try:
        for name, lin in targets.items():
            q = QuantizedLinear(cached[f"{name}.weight"].to(device), cached.get(f"{name}.scale"),
                                cached.get(f"{name}.bias"), dtypes[name]).to(device)
            if (q.out_features, q.in_features) != (lin.out_features, lin.in_features):
                raise ValueError(f"{name} is {q.out_features} x {q.in_features}, the model's "
                                 f"{lin.out_features} x {lin.in_features}")
            modules[name] = q
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        _damaged(path, f"does not fit the model ({' '.join(str(exc).split())})")
        return None
    return modules


def _write_cache(path: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors first, then the manifest with their sha256, each by rename: a half-written cache never has a
    manifest."""
    from safetensors.torch import save_file

    from exitwise.artifacts import sha256_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = path.with_suffix(".json")
    meta_path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    digest = sha256_file(tmp)
    tmp.replace(path)
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps({**manifest, "sha256": digest}, indent=1))
    tmp_meta.replace(meta_path)


def quantize_model(model: nn.Module, dtype: str, cache: Path | None = None,
                   source: dict | None = None, batch_copy: bool = True) -> str:
    """Swap the decoder layers' and the head's ``nn.Linear`` modules of a Hugging Face causal LM for
    :class:`QuantizedLinear` in ``dtype``, in place; returns the dtype used (bfloat16 where int8 does
    not run on the model's device). Embeddings, norms and everything else stay float32.

    ``batch_copy``: int8 / int4 modules keep a bfloat16 copy for multi-row inputs (see BATCH_ROWS).
    ``cache``: a ``.safetensors`` path to reuse (if its manifest matches ``source``, a description of
    the float32 weights, and this version) or to write. Without it the weights are quantised in memory.
    """
    device = next(model.parameters()).device
    dtype = usable_dtype(dtype, device)
    if dtype == "float32":
        return dtype
    targets = _targets(model)
    layer_names = {n for n in targets if n.startswith("model.layers.")}
    manifest = _manifest(dtype, source or {})
    cached = _load_cached(cache, manifest, list(targets)) if cache is not None and source is not None else None
    tensors: dict[str, torch.Tensor] = {}
    dtypes = {name: dtype if name in layer_names else head_dtype(dtype) for name in targets}
    with torch.no_grad():
        modules = None if cached is None else _from_cache(cached, targets, dtypes, device, cache)
        if modules is None:
            cached = None
        for name, lin in targets.items():
            if modules is not None:
                q = modules[name]
            else:
                q = QuantizedLinear.from_float(lin.weight, lin.bias, dtypes[name])
                tensors.update({f"{name}.{k}": v for k, v in q.state_dict().items() if v is not None})
            if batch_copy:
                q.add_batch_copy()
            _set_module(model, name, q)
    if cached is None and cache is not None and source is not None:
        try:
            _write_cache(cache, manifest, tensors)
        except OSError as exc:  # a read-only cache costs the quantisation time, nothing else
            warnings.warn(f"could not cache quantised weights at {cache}: {exc}", stacklevel=2)
    return dtype
