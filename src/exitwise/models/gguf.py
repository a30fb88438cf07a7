"""GGUF files straight into the engine's weights, tensor by tensor from the memory-mapped file.

The float32 route (transformers de-quantises the whole file, exitwise caches it as safetensors and
re-quantises) costs 4 bytes per weight in memory and on disk before the engine sees a low-bit byte.
Here each matrix goes from its GGUF blocks to a :class:`QuantizedLinear` on its own; only one matrix at
a time is ever float. The input embedding stays in its blocks (:class:`BlockEmbedding`), its rows
de-quantised when gathered.

How each block type maps (``LAYOUTS``, at ``dtype="auto"``):

* Q4_K / Q6_K, where the exitwise kernel runs -> their super-blocks as the file has them
  (:mod:`exitwise.models.kquants`, layouts "q4k" / "q6k"), standing in for int4 / int8.
* Q4_0 / Q4_1 (and Q4_K off the kernel) -> int4 (nibbles, groups of 32, w = (q - 8) * scale + zero): the
  file's own 4-bit values with float32 scales and zeros. Q4_0: scale d, zero 0; Q4_1: scale d, zero
  m + 8 d; Q4_K: each super-block's 8 sub-blocks of 32 carry a 6-bit scale and min, so scale = d * sc
  (exact in float32) and zero = 8 d sc - dmin * m.
* Q8_0, where the exitwise kernel runs -> int8 with a float32 scale per 32 columns (layout "int8g"): the
  file's own levels and scales d, w = d q exactly.
* Q5_0, where the exitwise kernel runs -> its 5-bit levels and scales d as they are (layout "q5",
  :mod:`exitwise.models.q5`, standing in for int8): 6 bits a weight where int8 per 32 columns read 9.
* Q5_1 (and Q5_0 / Q6_K / Q8_0 off the kernel) -> int8 per output channel, re-quantised from the
  tensor's float32 values (docs/models.md has the measured agreement against the float32 model).
* F16 / BF16 / F32 matrices -> bfloat16 in a model that has low-bit ones; a GGUF whose matrices are all
  float loads as float32 (the float32 route: it is exact).

Norms and biases become float32 (exact for every block type); so does an embedding stored as float.
The model skeleton is the Hugging Face class built without weights (meta device), its config and
tokenizer read from the GGUF metadata by transformers, which does not touch the tensors for those.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exitwise.errors import ExitwiseError
from exitwise.models import kernels, kquants, q5
from exitwise.models.q5 import Q5Linear
from exitwise.models.quantize import (
    QuantizedLinear,
    _set_module,
    _targets,
    head_dtype,
    int8_rows,
    kernel_shape_ok,
)

# the engine layout each GGUF block type gets at dtype "auto" (see the module docstring)
LAYOUTS: dict[str, str] = {
    "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4",
    "Q5_0": "int8", "Q5_1": "int8", "Q6_K": "int8", "Q8_0": "int8",
    "F16": "bfloat16", "BF16": "bfloat16", "F32": "bfloat16",
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# how wide each layout is: a fused projection (Q|K|V, gate|up) whose parts differ takes the widest
_WIDTH = {"int4": 0, "int8": 1, "bfloat16": 2}
# GGUF type -> the layout that keeps its values as the file has them on the exitwise kernel: Q8_0's int8
# levels times a float16 d per 32 columns as "int8g" (int8 with a float32 scale per 32 columns), Q5_0 as
# "q5" (models/q5.py), Q4_K / Q6_K as their super-blocks (models/kquants.py)
_KEPT = {"Q8_0": "int8g", "Q5_0": "q5", **kquants.LAYOUT_OF}
# the block-keeping layouts and the plain dtype each stands in for
_STANDS_FOR = {"int8g": "int8", "q5": "int8", **{kind: b.dtype for kind, b in kquants.BLOCKS.items()}}
# rows de-quantised at once where a whole tensor in float32 would be large (embeddings, heads): the
# transient float32 stays ~32 MB however large the vocabulary
_CHUNK_BYTES = 32 << 20


class GGUFTensorError(ExitwiseError):
    """A tensor of a GGUF file that the direct loader cannot read (type, shape, missing)."""


@dataclass(frozen=True)
class Tensor:
    """One GGUF tensor: its name, block type, shape (rows = output features, columns) and raw bytes
    (rows, bytes per row) uint8: a view of the memory-mapped file, or a torch tensor of gathered rows."""

    name: str
    type: str
    rows: int
    cols: int
    raw: np.ndarray | torch.Tensor


# ------------------------------------------------------------------------------------------ the file
# GGUF metadata value types -> struct formats (8 string, 9 array: parsed by hand)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class Field:
    """One metadata entry, shaped like gguf's ReaderField as transformers reads it (``parts[i]`` for ``i``
    in ``data``, ``types``): scalars as one-item lists, strings as bytes."""

    name: str
    types: list[int]
    parts: list
    data: list[int]


@dataclass
class TensorInfo:
    """One tensor entry, shaped like gguf's ReaderTensor where transformers reads it (``name``)."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: list[int]  # GGUF order: columns first
    data: np.ndarray  # its raw bytes, uint8, a view of the memory-mapped file


class Reader:
    """A GGUF file's metadata and tensor table, parsed once; tensor bytes stay in the memory map.

    gguf's own GGUFReader makes a numpy view of every item of every metadata array: Qwen2.5's 151,936
    tokens and 151,387 merges took it 37 s and 490 MB here, and transformers builds three of them to read a
    config and a tokenizer. This reads the same file in about a second; :func:`_transformers_reads` hands
    it to transformers for those."""

    def __init__(self, path: Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        self.data = np.memmap(path, mode="r")
        self._buf = memoryview(self.data)
        self._pos = 0
        try:
            magic, version = self._read("<4sI")
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"magic {magic!r}, version {version}")
            n_tensors, n_kv = self._read("<QQ")
            self.fields: dict[str, Field] = {}
            for _ in range(n_kv):
                name = self._string().decode()
                (kind,) = self._read("<I")
                self.fields[name] = self._field(name, kind)
            infos = []
            for _ in range(n_tensors):
                name = self._string().decode()
                (ndim,) = self._read("<I")
                shape = list(self._read(f"<{ndim}Q"))
                kind, offset = self._read("<IQ")
                infos.append((name, shape, GGMLQuantizationType(kind), offset))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise GGUFTensorError(f"{path}: not a readable GGUF file ({exc})") from exc
        align = int(self.fields["general.alignment"].parts[0][0]) if "general.alignment" in self.fields else 32
        start = -(-self._pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, shape, kind, offset in infos:
            block, size = GGML_QUANT_SIZES[kind]
            nbytes = int(np.prod(shape)) // block * size
            lo = start + offset
            if lo + nbytes > self.data.size:
                raise GGUFTensorError(f"{path}: tensor {name} ends at byte {lo + nbytes}, past the end of the "
                                      f"file ({self.data.size} bytes; truncated?)")
            self.tensors.append(TensorInfo(name, kind, shape, self.data[lo:lo + nbytes]))

    def _read(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> bytes:
        (n,) = self._read("<Q")
        out = bytes(self._buf[self._pos:self._pos + n])
        if len(out) != n:
            raise ValueError("string past the end of the file")
        self._pos += n
        return out

    def _value(self, kind: int):
        if kind == 8:
            return self._string()
        if kind not in _SCALARS:
            raise ValueError(f"metadata value type {kind}")
        return list(self._read("<" + _SCALARS[kind]))

    def _field(self, name: str, kind: int) -> Field:
        if kind != 9:
            return Field(name, [kind], [self._value(kind)], [0])
        item, n = self._read("<IQ")
        if item in _SCALARS:  # numbers in one read; each wrapped as a one-item list like a scalar
            fmt = _SCALARS[item]
            parts = [[v] for v in self._read(f"<{n}{fmt}")]
        else:
            parts = [self._value(item) for _ in range(n)]
        return Field(name, [9, item], parts, list(range(n)))

    def string(self, key: str) -> str:
        return self.fields[key].parts[0].decode()


def _tensors(reader: Reader) -> dict[str, Tensor]:
    out = {}
    for t in reader.tensors:
        cols = t.shape[0]
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        out[t.name] = Tensor(t.name, t.tensor_type.name, rows, cols, t.data.reshape(rows, -1))
    return out


@contextlib.contextmanager
def _transformers_reads(reader: Reader):
    """Within this block transformers' GGUF metadata reader (``gguf.GGUFReader``, imported by
    ``load_gguf_checkpoint`` at each call) is ``reader``: the config and tokenizer come from transformers'
    own GGUF mapping, without its three slow parses of the file."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = lambda *args, **kwargs: reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


# ------------------------------------------------------------------------------------------ block types
def _blocks(t: Tensor, size: int) -> torch.Tensor:
    """The raw rows as (rows, blocks, bytes per block) uint8 (the file's bytes copied: a torch tensor
    cannot view a read-only map)."""
    raw = t.raw if isinstance(t.raw, torch.Tensor) else torch.from_numpy(np.array(t.raw))
    return raw.view(t.rows, -1, size)


_fp16 = kquants.fp16_field  # a block's float16 field as float32 (every block type here reads them so)


def _nibbles(qs: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows, blocks, 16) bytes -> (rows, cols) 4-bit values, a block's low nibbles first."""
    return torch.cat([qs & 15, qs >> 4], -1).reshape(rows, cols)


def _q40(t: Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Q4_0 blocks (d, 16 bytes: element j low nibble of byte j, j + 16 the high one), w = d (q - 8)."""
    b = _blocks(t, 18)
    d = _fp16(b, 0)
    return _nibbles(b[..., 2:], t.rows, t.cols), d, torch.zeros_like(d), 8


def _q41(t: Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Q4_1 blocks (d, m, 16 bytes as Q4_0), w = d q + m."""
    b = _blocks(t, 20)
    return _nibbles(b[..., 4:], t.rows, t.cols), _fp16(b, 0), _fp16(b, 2), 0


def _q4k(t: Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Q4_K super-blocks of 256 (models/kquants.py has the layout), w = (d sc) q - dmin m per sub-block."""
    return (*kquants.q4k_parts(_blocks(t, kquants.BLOCKS["q4k"].nbytes)), 0)


# 4-bit block type -> its parts (q (rows, cols) uint8 nibbles; per group of 32, s and m (rows, cols / 32);
# c) with w = s (q - c) + m, each product and sum in the order gguf's reference de-quantisers use
_Q4_PARTS = {"Q4_0": _q40, "Q4_1": _q41, "Q4_K": _q4k}


def int4_blocks(t: Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit block type in the int4 layout w = (q - 8) scale + zero: the file's 4-bit values (rows,
    cols) uint8 and per group of 32 the scale and zero (rows, cols / 32), float32 (exact: a float16 times
    a 6-bit integer fits float32's mantissa; a Q4_1 / Q4_K zero is one rounding of an exact sum)."""
    q, s, m, c = _Q4_PARTS[t.type](t)
    return q, s, m + (8 - c) * s


def dequantize_rows(t: Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of ``t`` in float32 (gguf's reference de-quantisers; F32/F16/BF16 as they are)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = t.raw[start:stop]
    w = dequantize(np.ascontiguousarray(raw), GGMLQuantizationType[t.type])
    w = np.asarray(w, dtype=np.float32)
    if not w.flags.writeable:  # F32 tensors come back as views of the read-only map
        w = w.copy()
    return torch.from_numpy(np.ascontiguousarray(w)).reshape(raw.shape[0], t.cols)


def dequantize_chunked(t: Tensor) -> torch.Tensor:
    """All of ``t`` in float32, de-quantised a few rows at a time into one tensor (the reference
    de-quantisers' numpy temporaries are several times their output)."""
    out = torch.empty(t.rows, t.cols)
    step = max(1, _CHUNK_BYTES // (4 * t.cols))
    for start in range(0, t.rows, step):
        out[start:start + step] = dequantize_rows(t, start, start + step)
    return out


def _check(t: Tensor, path: Path) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if t.type not in LAYOUTS:
        raise GGUFTensorError(f"{path}: tensor {t.name} has GGUF type {t.type}, which exitwise does not read "
                              f"(supported: {', '.join(LAYOUTS)})")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.type]]
    if t.cols % block or t.raw.nbytes != t.rows * t.cols // block * size:
        raise GGUFTensorError(f"{path}: tensor {t.name} ({t.type}) has {t.raw.nbytes} bytes for a {t.rows} x {t.cols} "
                              "matrix (truncated or damaged file)")


def to_linear(t: Tensor, layout: str, bias: torch.Tensor | None, path: Path,
              rows: torch.Tensor | None = None) -> QuantizedLinear:
    """A GGUF matrix as a :class:`QuantizedLinear` in ``layout``: int4 from 4-bit blocks keeps the
    file's values; anything else goes through float32 a few rows at a time. ``rows``: a permutation of
    the output rows (Llama's q/k rows, stored permuted in GGUF)."""
    _check(t, path)
    if rows is not None:
        t = Tensor(t.name, t.type, t.rows, t.cols, t.raw[rows.numpy()])
    if layout in kquants.BLOCKS:  # the file's super-blocks as they are
        return kquants.KQuantLinear(_blocks(t, kquants.BLOCKS[layout].nbytes).view(t.rows, -1), bias, layout)
    if layout == "int4" and t.type in _Q4_PARTS:
        q, scale, zero = int4_blocks(t)
        return QuantizedLinear.from_int4(q, scale, zero, bias)
    if layout == "int8g":
        return QuantizedLinear(*int8_groups(t), bias, "int8")
    if layout == "q5":
        return Q5Linear.from_blocks(_blocks(t, q5.BLOCK_BYTES).view(t.rows, -1), bias)
    if layout == "int8":
        w = torch.empty(t.rows, t.cols, dtype=torch.int8)
        s = torch.empty(t.rows)
        step = max(1, _CHUNK_BYTES // (4 * t.cols))
        for start in range(0, t.rows, step):  # per-row scales: chunks of rows quantise as the whole
            w[start:start + step], s[start:start + step] = int8_rows(dequantize_rows(t, start, start + step))
        return QuantizedLinear(w, s, bias, "int8")
    return QuantizedLinear.from_float(dequantize_chunked(t), bias, layout)


def int8_groups(t: Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 (or Q5_0: the layout it had before models/q5.py, which benchmarks/kquants.py times) matrix as
    its int8 levels (rows, cols) and float32 scales d (rows, cols / 32), w = d q exactly: the levels are
    the de-quantised values over d (Q5_0's 5-bit level minus 16), a few rows at a time."""
    d = _fp16(_blocks(t, {"Q8_0": 34, "Q5_0": q5.BLOCK_BYTES}[t.type]), 0)  # (rows, cols / 32)
    q = torch.empty(t.rows, t.cols, dtype=torch.int8)
    step = max(1, _CHUNK_BYTES // (4 * t.cols))
    for start in range(0, t.rows, step):
        w = dequantize_rows(t, start, start + step).view(-1, t.cols // 32, 32)
        dd = d[start:start + step, :, None]
        q[start:start + step] = torch.where(dd != 0, w / dd, 0).round().view(-1, t.cols).to(torch.int8)
    return q, d


def exact_layout(t: Tensor) -> str | None:
    """The layout that keeps ``t``'s values as the file has them on the exitwise kernel, where it runs
    here: Q4_K / Q6_K super-blocks (models/kquants.py), Q8_0 as int8 per 32 columns ("int8g"), Q5_0's
    levels ("q5", models/q5.py)."""
    kind = _KEPT.get(t.type)
    if kind in kquants.BLOCKS:
        return kind if kquants.kernel_ok(t.rows, t.cols) else None
    if kind is not None and kernel_shape_ok(t.rows, t.cols) and kernels.ready():
        return kind
    return None


# ------------------------------------------------------------------------------------------ embeddings
def _q80_rows(t: Tensor) -> torch.Tensor:
    """Q8_0 blocks (d, 32 int8), w = d q, as float32 (rows, cols)."""
    b = _blocks(t, 34)
    q = b[..., 2:].contiguous().view(torch.int8).float()  # (rows, nb, 32)
    return (_fp16(b, 0)[..., None] * q).reshape(t.rows, t.cols)


def _float_rows(t: Tensor) -> torch.Tensor:
    """``t`` in float32: the 4-bit and 8-bit block types through torch (the kernels' own readers, a few
    microseconds for a decode step's rows), the others through gguf's numpy de-quantisers."""
    if t.type in _Q4_PARTS:
        q, s, m, c = _Q4_PARTS[t.type](t)
        return ((q.view(t.rows, -1, 32).float() - c) * s[..., None] + m[..., None]).reshape(t.rows, t.cols)
    if t.type == "Q8_0":
        return _q80_rows(t)
    raw = t.raw.cpu().numpy() if isinstance(t.raw, torch.Tensor) else t.raw
    return dequantize_rows(Tensor(t.name, t.type, t.rows, t.cols, raw)).to(_device(t.raw))


def _device(raw) -> torch.device:
    return raw.device if isinstance(raw, torch.Tensor) else torch.device("cpu")


class BlockRows:
    """The float32 rows of a GGUF matrix kept in the file's own blocks, de-quantised when gathered
    (``rows[idx]``, idx of any shape -> (*idx.shape, cols)). The embedding's float32 copy is the largest
    tensor of a low-bit model with a large vocabulary (Qwen2.5-Coder-1.5B: 933 MB against 131 MB of
    Q4_K blocks), and an embedding is only ever read a few rows at a time. The rows are the values
    :func:`dequantize_rows` gives, so the model computes what it computed from the float32 copy."""

    def __init__(self, raw: torch.Tensor, gguf_type: str, cols: int):
        self.raw = raw  # (rows, bytes per row) uint8
        self.type = gguf_type
        self.shape = torch.Size((raw.shape[0], cols))
        self.device = raw.device
        self.dtype = torch.float32

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, device=self.device)
        raw = self.raw.index_select(0, idx.reshape(-1))
        return _float_rows(Tensor("rows", self.type, raw.shape[0], self.shape[1], raw)).view(*idx.shape, self.shape[1])


class BlockEmbedding(nn.Module):
    """An input embedding whose table stays in GGUF blocks (:class:`BlockRows`); ``weight`` gives the
    rows object the engine and re-scoring gather from. ``embed_scale``: Gemma's scaled embedding, applied
    as Hugging Face's ``Gemma3TextScaledWordEmbedding`` does."""

    def __init__(self, raw: torch.Tensor, gguf_type: str, cols: int, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("raw", raw, persistent=False)
        self.gguf_type = gguf_type
        self.num_embeddings, self.embedding_dim = raw.shape[0], cols
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale, persistent=False)
        else:
            self.embed_scale = None

    @property
    def weight(self) -> BlockRows:
        return BlockRows(self.raw, self.gguf_type, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.weight[input_ids]
        return x if self.embed_scale is None else x * self.embed_scale.to(x.dtype)


# ---------------------------------------------------------------------------------------- whole files
def plan_layouts(types: dict[str, str], dtype: str, groups: list[list[str]], heads: set[str],
                 blocks_ready: frozenset[str] = frozenset()) -> dict[str, str]:
    """The layout of each linear (name -> GGUF type in ``types``): LAYOUTS at "auto", else ``dtype``
    (the heads: :func:`head_dtype`). A matrix named in ``blocks_ready`` (the kernel runs its
    :func:`exact_layout`) whose layout is the dtype its blocks stand in for keeps them: Q4_K / Q6_K as
    "q4k" / "q6k" (int4 / int8, models/kquants.py), Q8_0 as "int8g", Q5_0 as "q5" (int8). The parts of a fused
    group (``groups``) keep their blocks if every part does (a fused projection of several block types
    runs each on its own kernel, models/quantize.py StackedLinear), else share the widest of their plain
    dtypes."""
    out = {}
    for name, kind in types.items():
        want = LAYOUTS[kind] if dtype == "auto" else dtype
        out[name] = head_dtype(want) if name in heads else want
        keep = _KEPT.get(kind)
        if keep and name in blocks_ready and out[name] == _STANDS_FOR[keep]:
            out[name] = keep
    for group in groups:
        kinds = {out[n] for n in group}
        if len(kinds) > 1 and not kinds <= set(_STANDS_FOR):
            plain = {_STANDS_FOR.get(k, k) for k in kinds}
            out.update(dict.fromkeys(group, max(plain, key=_WIDTH.__getitem__)))
    return out


def _gguf_names(model: nn.Module, arch: str) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, from gguf's name table for ``arch`` (what transformers'
    get_gguf_hf_weights_map does, with one table instead of one per submodule: 11 s -> 0.1 s on Qwen2.5)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        raise GGUFTensorError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    table = get_tensor_name_map(key, model.config.num_hidden_layers)
    out = {}
    for hf in model.state_dict():
        base, dot, suffix = hf.rpartition(".")
        gguf_name = table.get_name(base) if dot else None
        if gguf_name is not None:
            out[hf] = f"{gguf_name}.{suffix}"
    return out


def _fused_groups(model: nn.Module) -> list[list[str]]:
    """Q|K|V and gate|up of every layer: the engine concatenates them, so they share a layout."""
    groups = []
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}"
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj"):
            groups.append([f"{pre}.self_attn.{p}_proj" for p in "qkv"])
        if hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj"):
            groups.append([f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"])
    return groups


def _row_permutation(processor, name: str, rows: int) -> torch.Tensor | None:
    """The output-row order transformers' tensor processor gives the matrix ``name`` (Llama: q and k
    rows are stored permuted for llama.cpp's RoPE), found by processing the row indices; None if it
    keeps them. A processor that changes values rather than order cannot be applied to blocks."""
    idx = np.arange(rows, dtype=np.float64)[:, None]
    out = np.asarray(processor.process(idx, name).weights)
    if out.shape != idx.shape:
        raise GGUFTensorError(f"{name}: transformers reshapes this tensor; exitwise cannot load it from blocks")
    perm = out[:, 0].astype(np.int64)
    if not np.array_equal(np.sort(perm), np.arange(rows)) or not np.array_equal(perm, out[:, 0]):
        raise GGUFTensorError(f"{name}: transformers changes this tensor's values; exitwise cannot load it "
                              "from blocks")
    return None if np.array_equal(perm, np.arange(rows)) else torch.from_numpy(perm)


def _release(reader, t: Tensor) -> None:
    """Drop the file pages of ``t`` from this process's resident set (they stay in the page cache): a
    read-only mapping's pages count towards RSS once touched, and a whole file of them would add the
    GGUF's size to the peak."""
    mm = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
    if mm is None or not hasattr(mm, "madvise"):
        return
    base = reader.data.ctypes.data
    start = t.raw.ctypes.data - base
    page = mmap.PAGESIZE
    lo = start // page * page
    with contextlib.suppress(OSError, ValueError):  # only memory accounting is at stake
        mm.madvise(mmap.MADV_DONTNEED, lo, start + t.raw.nbytes - lo)


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, or None elsewhere (then the heap is left as it is)."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None
    except OSError:
        return None


def _large_allocations_mapped() -> None:
    """Allocations of 1 MB and more get their own pages, returned to the system when freed. glibc's
    default threshold rises to the largest block freed so far (up to 32 MB), after which each tensor's
    float32 temporaries land in the heap and leave it fragmented: the load's peak RSS was ~500 MB above
    what it held at the end."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _trim_heap() -> None:
    """Hand the heap's freed memory back to the system. Each tensor's float32 and numpy temporaries are
    freed, but glibc keeps the space: measured on Qwen2.5-Coder-0.5B, 560 MB of RSS after loading was
    such space. Trimmed after the float tensors and after the matrices (after each matrix it cost a
    second or more each on a heap this size)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass
class GGUFModel:
    """What :func:`load` returns: the model (its linears QuantizedLinear or float) and tokenizer."""

    model: nn.Module
    tokenizer: object
    layouts: dict[str, str]  # linear name -> layout ("int4", "int8", "bfloat16")
    types: dict[str, str]  # linear name -> GGUF block type it came from


def all_float(path: Path) -> bool:
    """Whether every matrix of the GGUF ``path`` is stored in a float type (F32/F16/BF16)."""
    reader = Reader(path)
    return all(t.tensor_type.name in FLOAT_TYPES for t in reader.tensors if len(t.shape) > 1
               and t.name != "token_embd.weight")


def _skeleton(path: Path, reader: Reader):
    """Config, tokenizer and a weightless model (parameters on the meta device, buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings(), _transformers_reads(reader):
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return config, tokenizer, model.eval()


def _progress(items: list, path: Path) -> Iterator:
    from tqdm import tqdm

    return tqdm(items, desc=f"loading {path.name}", unit="tensor", leave=False, mininterval=0.5)


def load(path: Path, dtype: str = "auto") -> GGUFModel:
    """The model of the GGUF file ``path`` with its matrices in ``dtype`` ("auto": :data:`LAYOUTS`;
    "bfloat16", "int8", "int4": every matrix, heads as :func:`head_dtype`), on the CPU."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    _large_allocations_mapped()
    reader = Reader(path)
    tensors = _tensors(reader)
    config, tokenizer, model = _skeleton(path, reader)
    arch = reader.string("general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    from_hf = {hf: g for hf, g in _gguf_names(model, arch).items() if g in tensors}
    linears = _targets(model)
    head = next(n for n in linears if not n.startswith("model.layers."))
    sources = {}
    for name in linears:
        g = from_hf.get(f"{name}.weight")
        if g is None and name == head and getattr(config, "tie_word_embeddings", False):
            g = from_hf.get("model.embed_tokens.weight", "token_embd.weight")  # tied: the head is the embedding
        if g is None or g not in tensors:
            raise GGUFTensorError(f"{path}: no tensor for {name}.weight (looked for {g or 'a GGUF name'})")
        sources[name] = tensors[g]
    for t in sources.values():
        _check(t, path)
    types = {n: t.type for n, t in sources.items()}
    ready = frozenset(n for n, t in sources.items() if exact_layout(t) is not None)
    layouts = plan_layouts(types, dtype, _fused_groups(model), {head}, ready)
    _embedding_in_blocks(model, from_hf, tensors, processor, reader, path)
    floats = _float_params(model, linears, from_hf, tensors, processor, reader, path)
    model.load_state_dict(floats, assign=True, strict=False)
    with torch.no_grad():
        for name in _progress(list(linears), path):
            t = sources[name]
            bias = floats.get(f"{name}.bias")
            perm = _row_permutation(processor, t.name, t.rows)
            _set_module(model, name, to_linear(t, layouts[name], bias, path, perm))
            _release(reader, t)
    _trim_heap()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise GGUFTensorError(f"{path}: no tensor for {missing[0]}" + (f" and {len(missing) - 1} more"
                                                                     if len(missing) > 1 else ""))
    return GGUFModel(model, tokenizer, layouts, types)


def _embedding_in_blocks(model: nn.Module, from_hf: dict[str, str], tensors: dict[str, Tensor], processor,
                         reader, path: Path) -> None:
    """Put the input embedding in a :class:`BlockEmbedding` of its GGUF blocks when they are a quantised
    type and transformers' tensor processor leaves the tensor as it is (else it loads as float32)."""
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    t = tensors.get(from_hf.get(f"{name}.weight", ""))
    if t is None or t.type in FLOAT_TYPES or t.raw.ndim != 2:
        return
    _check(t, path)
    sample = dequantize_rows(t, 0, 4).numpy()
    processed = np.asarray(processor.process(sample.copy(), t.name).weights)
    if not np.array_equal(processed, sample) or _row_permutation(processor, t.name, t.rows) is not None:
        return
    raw = torch.from_numpy(np.array(t.raw))  # a copy: the file's pages are dropped from the resident set
    _set_module(model, name, BlockEmbedding(raw, t.type, t.cols, getattr(emb, "embed_scale", None)))
    _release(reader, t)


def _float_params(model: nn.Module, linears: dict, from_hf: dict[str, str], tensors: dict[str, Tensor],
                  processor, reader, path: Path) -> dict[str, torch.Tensor]:
    """Every parameter that is not a linear's weight (embeddings, norms, biases), in float32."""
    out = {}
    for hf, param in model.named_parameters(remove_duplicate=False):
        module = hf.rpartition(".")[0]
        if module in linears and hf.endswith(".weight"):
            continue
        g = from_hf.get(hf)
        if g is None:
            continue  # reported as missing after the linears are placed (a tied head has none)
        t = tensors[g]
        _check(t, path)
        w = dequantize_chunked(t) if t.raw.ndim == 2 else dequantize_rows(t).reshape(-1)
        w = torch.from_numpy(np.asarray(processor.process(w.numpy(), g).weights, dtype=np.float32))
        if w.numel() != param.numel():
            raise GGUFTensorError(f"{path}: tensor {g} has {w.numel()} values, {hf} needs {tuple(param.shape)}")
        out[hf] = w.reshape(param.shape)
        _release(reader, t)
    _trim_heap()
    return out

