"""Weight-only low precision: every weight matmul in bfloat16 or int8, activations in float32.

On CPU a decode step costs the bytes of its weights (SmolLM2-135M: 538 MB per token in float32), so
the lever is bytes: bfloat16 halves them, int8 quarters them. ``int8`` is symmetric per-output-channel
int8 with bfloat16 scales, run by ``aten._weight_int8pack_mm`` with bfloat16 activations (the fastest
activation dtype that kernel has on CPU: with float32 activations it is not vectorised and 3-10x
slower than float32 matmul). Per-row scales make quantisation commute with stacking rows, so fused
projections (Q|K|V, gate|up) are the concatenation of the quantised parts, bit for bit.

:class:`QuantizedLinear` is an ``nn.Module`` with ``nn.Linear``'s call signature, so the Hugging Face
model's own forward (RAEE, heads training) and the engine's fused layers use the same tensors.
:func:`quantize_model` swaps a model's decoder and head ``nn.Linear`` modules for them; the quantised
tensors are cached as safetensors beside the float32 cache, with a manifest that says what made them.

torchao was considered and not used: with the pinned torch its CPU int8 weight-only path dispatches to
this same aten op, behind a tensor subclass that the engine's fused-weight code would have to unwrap.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")
# how many of a low-precision head's largest logits are recomputed from float32 rows (rescore_top)
DEFAULT_HEAD_RESCORE = 16
CACHE_FORMAT = 1  # bump when the quantised layout or its manifest changes


class QuantizedLinear(nn.Module):
    """A linear layer with bfloat16 or int8 weights; float32 (or any float) in, float32 out."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, dtype: str):
        super().__init__()
        if dtype not in WEIGHT_DTYPES[1:]:
            raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES[1:]} here, got {dtype!r}")
        if (dtype == "int8") != (scale is not None):
            raise ValueError("int8 weights need their per-row scales (and bfloat16 weights none)")
        self.weight_dtype = dtype
        self.register_buffer("weight", weight.contiguous())  # (out, in) int8 or bfloat16
        self.register_buffer("scale", None if scale is None else scale.to(torch.bfloat16).contiguous())  # (out,)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: str) -> QuantizedLinear:
        """Quantise a float weight (out, in): bfloat16 by rounding; int8 with scale = max|row| / 127."""
        w = weight.detach().float()
        if dtype == "bfloat16":
            return cls(w.to(torch.bfloat16), None, bias, dtype)
        if dtype != "int8":
            raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES[1:]} here, got {dtype!r}")
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, bias, dtype)

    @classmethod
    def cat(cls, parts: list[QuantizedLinear]) -> QuantizedLinear:
        """Rows of several layers stacked into one (the fused Q|K|V and gate|up projections)."""
        kinds = {p.weight_dtype for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot stack weights of different dtypes {sorted(kinds)}")
        biases = [p.bias for p in parts]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(p.out_features, device=p.weight.device)
                              for b, p in zip(biases, parts, strict=True)])
        scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts])
        return cls(torch.cat([p.weight for p in parts]), scale, bias, kinds.pop())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if self.scale is not None:
            shape = xb.shape
            y = torch.ops.aten._weight_int8pack_mm(xb.reshape(-1, shape[-1]), self.weight, self.scale)
            y = y.view(*shape[:-1], self.out_features)
        else:
            y = F.linear(xb, self.weight)
        y = y.float()
        return y if self.bias is None else y + self.bias

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (out, in) these low-precision tensors stand for, or only ``rows`` of it."""
        w = self.weight if rows is None else self.weight[rows]
        w = w.float()
        if self.scale is not None:
            s = self.scale if rows is None else self.scale[rows]
            w = w * s.float()[:, None]
        return w

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight_dtype}"


def rescore_top(x: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                top: int) -> torch.Tensor:
    """``logits`` (B, V) of a low-precision head with its ``top`` largest entries recomputed exactly
    from the float32 ``weight`` rows (V, D) and input x (B, D), in place.

    A bfloat16 result carries 8 bits of mantissa (logits near 20 are rounded to 1/16) and int8 weights
    add their own error, so near-ties flip the argmax: on SmolLM2 the int8 head alone agrees with the
    float32 head's top-1 on 96.5% of tokens, bfloat16 on 97.9%. Gathering ``top`` float32 rows costs
    top x D x 4 bytes (16 rows: 37 KB against the int8 head's 28 MB), and the argmax is then the
    float32 head's whenever it is among them."""
    idx = logits.topk(top, dim=-1).indices  # (B, top)
    exact = torch.einsum("bd,btd->bt", x.float(), weight[idx])  # (B, top)
    if bias is not None:
        exact = exact + bias[idx]
    return logits.scatter_(1, idx, exact)


def float_weight(module: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight of an ``nn.Linear`` or :class:`QuantizedLinear` (only ``rows`` if given):
    what readouts of a few vocabulary rows multiply by."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize(rows)
    w = module.weight if rows is None else module.weight[rows]
    return w if w.dtype == torch.float32 else w.float()


def weight_dtype_of(module: nn.Module) -> str:
    return module.weight_dtype if isinstance(module, QuantizedLinear) else "float32"


def int8_supported(device: torch.device | str) -> bool:
    """Whether ``_weight_int8pack_mm`` runs (and is right) on ``device``."""
    try:
        w = torch.randn(8, 16, device=device)
        x = torch.randn(2, 16, device=device)
        return bool(torch.allclose(QuantizedLinear.from_float(w, None, "int8")(x), F.linear(x, w), atol=0.1, rtol=0.05))
    except (RuntimeError, NotImplementedError):
        return False


def usable_dtype(dtype: str, device: torch.device | str) -> str:
    """``dtype``, or bfloat16 with a one-line warning where the int8 kernel does not run on ``device``."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    if dtype == "int8" and not int8_supported(device):
        warnings.warn(f"int8 weight-only matmul does not run on {device}; using bfloat16", stacklevel=3)
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


def _manifest(dtype: str, source: dict) -> dict:
    from exitwise import __version__

    return {"format": CACHE_FORMAT, "kind": "exitwise-quantized-weights", "dtype": dtype,
            "scheme": "int8: symmetric per-output-channel, bfloat16 scales" if dtype == "int8" else "bfloat16",
            "exitwise": __version__, "torch": torch.__version__.split("+")[0], "source": source}


def _load_cached(path: Path, manifest: dict, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The cached tensors if ``path`` was made by this version from the same float32 weights."""
    from safetensors import safe_open

    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta != manifest:
        return None  # another version, dtype, scheme or source: rebuilt, never misread
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            wanted = {k for n in names for k in (f"{n}.weight", f"{n}.scale", f"{n}.bias") if k in keys}
            if not all(f"{n}.weight" in keys for n in names):
                return None
            return {k: f.get_tensor(k) for k in wanted}
    except (OSError, RuntimeError, ValueError):
        return None


def _write_cache(path: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors first, then the manifest, each by rename: a half-written cache never has a manifest."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = path.with_suffix(".json")
    meta_path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(manifest, indent=1))
    tmp_meta.replace(meta_path)


def quantize_model(model: nn.Module, dtype: str, cache: Path | None = None,
                   source: dict | None = None) -> str:
    """Swap the decoder layers' and the head's ``nn.Linear`` modules of a Hugging Face causal LM for
    :class:`QuantizedLinear` in ``dtype``, in place; returns the dtype used (bfloat16 where int8 does
    not run on the model's device). Embeddings, norms and everything else stay float32.

    ``cache``: a ``.safetensors`` path to reuse (if its manifest matches ``source``, a description of
    the float32 weights, and this version) or to write. Without it the weights are quantised in memory.
    """
    device = next(model.parameters()).device
    dtype = usable_dtype(dtype, device)
    if dtype == "float32":
        return dtype
    targets = _targets(model)
    manifest = _manifest(dtype, source or {})
    cached = _load_cached(cache, manifest, list(targets)) if cache is not None and source is not None else None
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, lin in targets.items():
            if cached is not None:
                q = QuantizedLinear(cached[f"{name}.weight"].to(device), cached.get(f"{name}.scale"),
                                    cached.get(f"{name}.bias"), dtype).to(device)
            else:
                q = QuantizedLinear.from_float(lin.weight, lin.bias, dtype)
                tensors.update({f"{name}.{k}": v for k, v in q.state_dict().items() if v is not None})
            _set_module(model, name, q)
    if cached is None and cache is not None and source is not None:
        try:
            _write_cache(cache, manifest, tensors)
        except OSError as exc:  # a read-only cache costs the quantisation time, nothing else
            warnings.warn(f"could not cache quantised weights at {cache}: {exc}", stacklevel=2)
    return dtype
