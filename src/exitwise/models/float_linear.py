"""Float weights behind :class:`~exitwise.models.quantize.QuantizedLinear`'s call interface, so the
engine's decoder layer (models/llama.py) has one path for every weight dtype.

A float32 matmul of one row runs ``F.linear`` (HF's rounding: the engine's float32 greedy tokens equal
HF ``generate``'s). From two rows on, a CPU with oneDNN runs its linear on a copy of the weight
packed once for it (:meth:`FloatLinear.add_batch_copy`): for 2-16 rows ~20-40% faster than MKL's
sgemm behind ``F.linear``, measured at 8 rows on SmolLM2 shapes with one thread (2.99 -> 2.12 ms for a
layer's four matmuls). :func:`onednn_ok` is the one probe of whether that linear runs, and agrees with
``F.linear``, for a weight dtype on a device; the bfloat16 copies of int weights use it too.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 8  # the batch size oneDNN's packing is tuned for (any row count runs on it)


@functools.lru_cache(maxsize=8)
def onednn_ok(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed linear runs on ``device`` for ``dtype`` weights and agrees with
    ``F.linear`` (float32: to 1e-5; bfloat16: to its rounding). CPU only; ``EXITWISE_ONEDNN=0`` turns
    it off."""
    if os.environ.get("EXITWISE_ONEDNN", "1") == "0" or torch.device(device).type != "cpu":
        return False
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        w, x = torch.randn(16, 32).to(dtype), torch.randn(3, 32).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS), None,
                                               "none", [], "")
        atol = 1e-5 if dtype == torch.float32 else 1e-2
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=atol))
    except (RuntimeError, AttributeError):
        return False


def stack_biases(parts: list[nn.Module]) -> torch.Tensor | None:
    """The biases of linears whose rows are stacked (a fused projection), zeros for a part without one;
    None if no part has a bias."""
    given = [p.bias for p in parts if p.bias is not None]
    if not given:
        return None
    zeros = {"dtype": given[0].dtype, "device": given[0].device}
    return torch.cat([p.bias.detach() if p.bias is not None else torch.zeros(p.out_features, **zeros)
                      for p in parts])


class FloatLinear(nn.Module):

    """A float weight (out, in) and bias, called like :class:`QuantizedLinear`. ``weight`` may be a view
    of another module's tensor (the Hugging Face linears and the engine's fused Q|K|V and gate|up
    share one copy, see :meth:`view_into`); ``packed`` is oneDNN's copy for inputs of 2+ rows
    (:meth:`add_batch_copy`), None where oneDNN does not run."""

    weight_dtype = "float32"  # the float path's name, whatever the float dtype of the tensor
    layout = "float32"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer("packed", None, persistent=False)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def of(cls, linear: nn.Module) -> FloatLinear:
        """An ``nn.Linear``'s weight and bias (the same tensors)."""
        return cls(linear.weight, linear.bias)

    @classmethod
    def cat(cls, parts: list[nn.Module]) -> FloatLinear:
        """The rows of several ``nn.Linear`` (or FloatLinear) stacked into one: the fused projections. A
        part without a bias gets zeros where another has one."""
        return cls(torch.cat([p.weight.detach() for p in parts]), stack_biases(parts))

    def view_into(self, parts: list[nn.Linear]) -> None:
        """Point each of ``parts`` (the modules :meth:`cat` stacked, in order) at its rows of this one, so
        the two hold one copy. The values are the same; their ``requires_grad`` is kept."""
        start = 0
        for part in parts:
            stop = start + part.out_features
            part.weight = nn.Parameter(self.weight[start:stop], requires_grad=part.weight.requires_grad)
            if part.bias is not None:
                part.bias = nn.Parameter(self.bias[start:stop], requires_grad=part.bias.requires_grad)
            start = stop

    def first_rows(self, n: int) -> FloatLinear:
        """The first ``n`` output rows as a linear of their own (views)."""
        return FloatLinear(self.weight[:n], None if self.bias is None else self.bias[:n])

    def add_batch_copy(self) -> None:
        """Pack the weight for oneDNN's linear, read by inputs of 2+ rows (where oneDNN runs)."""
        if self.packed is None and onednn_ok(self.weight.device, self.weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_ROWS)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (out, in), or only ``rows`` of it (the name :class:`QuantizedLinear` uses)."""
        w = self.weight if rows is None else self.weight[rows]
        return w.float()

    def kernel_spec(self) -> None:
        """Float weights have no low-bit kernel matmul (see :meth:`QuantizedLinear.kernel_spec`)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and x.shape[0] > 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"
