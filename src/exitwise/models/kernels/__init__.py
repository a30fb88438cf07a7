"""Batch-invariant CPU matmuls for int4 / int8 weights with int8-quantised activations (``lowbit_cpu.cpp``).

aten's weight-only kernels take bfloat16 activations and are matrix-vector kernels: their time grows
with the rows as fast as the matmul's, and a CPU without bfloat16 hardware pays for the conversions.
This kernel quantises each input row to int8 per group of 32 columns (llama.cpp's Q8 activations),
multiplies groups in integers (AVX2 maddubs / madd) and scales the group's sum in float32; it computes
each output with one fixed sequence of operations whatever the number of rows and threads, so a row's
result is bit-identical in a 1-row decode, a 9-row verification pass or a prefill. The weights are the
exact int4 / int8 values (int4: w = (q - 8) * scale + zero per group of 32, scales in float32); the
activations carry a relative error of about 0.5% per matmul (``tests/test_lowbit_kernel.py`` checks the
arithmetic against a float64 reference of the same quantisation).

GGUF's Q4_K / Q6_K super-blocks have their own path (:func:`kquant_mm`, used by models/kquants.py):
integer sums over a whole 256-column super-block, scaled once. GGUF's Q5_0 levels (models/q5.py) run
the int4 path with their fifth bits or-ed in (:func:`q5_mm`).

Where the CPU has AVX512-VNNI, the build multiplies with ``VPDPBUSD`` (the same integers, fewer
instructions). On CPUs with AVX512-BF16 the same source also has a bfloat16 int4 path (:func:`int4_bf16`,
off unless ``EXITWISE_BF16_KERNEL=1`` or ``bf16_enabled = True``): each output's group of 32 weights is
expanded once to bfloat16 and every row costs one ``VDPBF16PS`` per group, so extra rows cost less than
on the int8 path, but the expansion makes one row dearer. On a Zen 4 EPYC it measured slower up to 9
rows (a SmolLM2 decode step 1.28-1.43x in two runs) and faster at 16 (docs/dtypes.md), so the int8
path is the default; the bfloat16 one suits large batches and prefill. The build's flags are chosen
per CPU (:func:`cflags`).

Built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) into
``cache_dir()/kernels/``, under a file lock so that concurrent processes build once. Where it cannot
run, :class:`QuantizedLinear` keeps aten's kernels: tensors not on the CPU, CPUs without AVX2 + FMA, a
failed build (one warning), inputs that need gradients, and ``EXITWISE_NO_KERNEL=1`` in the environment
or ``exitwise.models.kernels.enabled = False`` (benchmarks toggle the module flag).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lowbit_cpu.cpp")
# -fopenmp: at::parallel_for's OpenMP backend is inline in the headers, so it needs the flag to split
# outputs over threads (the engine usually runs one)
CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]  # products and sums as written
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl"]  # the base the two extensions below need
GROUP = 32  # int4 columns per scale / zero pair, as QuantizedLinear.INT4_GROUP

enabled = os.environ.get("EXITWISE_NO_KERNEL", "0") in ("", "0")
# int4 on the AVX512-BF16 path where the CPU has it (EXITWISE_BF16_KERNEL=1); else the int8-activation path
bf16_enabled = os.environ.get("EXITWISE_BF16_KERNEL", "0") not in ("", "0")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (released by the OS if the process dies; none without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's own build baton is the only guard
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cpu_supported() -> bool:
    """Whether this CPU runs the kernel: x86 with AVX2 and FMA (what ATen calls the AVX2 capability)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


_built: dict = {}  # "module": the extension or None, once tried (a dict, not lru_cache: dynamo reads it)


def cflags() -> list[str]:
    """The build's flags on this CPU: :data:`CFLAGS`, plus AVX512-VNNI (the integer products in one
    instruction, the same integers) and AVX512-BF16 (int4's bfloat16 path) where the CPU has them. The
    build folder is named by them, so CPUs of different kinds sharing a cache never share a binary."""
    extra = []
    if torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported():
        extra.append("-mavx512vnni")
    if bf16_supported():
        extra.append("-mavx512bf16")
    return CFLAGS + (AVX512 + extra if extra else [])


def _module():
    """The compiled extension, or None (with one warning if a build was tried and failed)."""
    if "module" not in _built:
        mod = None
        if cpu_supported():
            flags = cflags()
            mod = _build(flags, quiet=flags != CFLAGS)
            if mod is None and flags != CFLAGS:  # a compiler too old for the AVX-512 extensions
                mod = _build(CFLAGS)
        _built["module"] = mod
        # the bfloat16 int4 path: CPUs that have AVX512-BF16, with a build whose compiler knew it
        _built["bf16"] = _built["module"] is not None and bf16_supported() and _built["module"].has_bf16()
    return _built["module"]


def _build(flags: list[str], quiet: bool = False):
    from exitwise.models.loading import cache_dir

    try:
        from torch.utils.cpp_extension import load

        # the source and the torch build decide the binary: a new one of either gets its own folder
        tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()
                             + b"built from a copy")
        name = f"exitwise_lowbit_{tag.hexdigest()[:12]}"
        build = cache_dir() / "kernels" / name
        build.mkdir(parents=True, exist_ok=True)
        with _file_lock(build / "exitwise.lock"):
            # compiled from a copy inside the build folder: every checkout of the same source then runs
            # the same command and shares one build (ninja rebuilds when the command names another path)
            src = build / SOURCE.name
            if not src.exists() or src.read_bytes() != SOURCE.read_bytes():
                src.write_bytes(SOURCE.read_bytes())
            # torch's own build lock, left behind by a process killed mid-build, would block every later
            # load; under our lock no other build can be running
            (build / "lock").unlink(missing_ok=True)
            mod = load(name=name, sources=[str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       build_directory=str(build), verbose=False)
        _register_fakes()
        return mod
    except Exception as exc:  # no compiler, no ninja, a read-only cache: aten's kernels, never a crash
        if quiet:
            return None
        warnings.warn(f"exitwise's {SOURCE.name} CPU kernel could not be built ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); using aten", stacklevel=3)
        return None


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing of the dispatcher ops."""
    def mm(x, w, s):
        return x.new_empty(x.shape[0], w.shape[0])

    for op in ("int4_mm", "int4_bf16_mm", "int8_mm", "q4k_mm", "q6k_mm", "q5_mm"):
        torch.library.register_fake(f"exitwise_lowbit::{op}")(mm)
    torch.library.register_fake("exitwise_lowbit::rms_norm")(lambda x, w, eps: torch.empty_like(x))
    torch.library.register_fake("exitwise_lowbit::attention")(
        lambda q, k, v, idx, start, length, scale: q.new_empty(q.shape[0], q.shape[1] * q.shape[2]))
    torch.library.register_fake("exitwise_lowbit::rope_store")(
        lambda qkv, cos, sin, k, v, slots, heads, kv_heads: qkv.new_empty(qkv.shape[0], heads, k.shape[2]))
    torch.library.register_fake("exitwise_lowbit::silu_mul")(lambda x: x.new_empty(x.shape[0], x.shape[1] // 2))
    torch.library.register_fake("exitwise_lowbit::kquant_values")(
        lambda w, dd, bits: dd.new_empty(w.shape[0], dd.shape[1] * 256))
    torch.library.register_fake("exitwise_lowbit::argmax_rows")(lambda x: x.new_empty(x.shape[0], dtype=torch.long))


def ready() -> bool:
    """Whether the kernel is enabled and built (builds it on the first call)."""
    return enabled and built()


def built() -> bool:
    """Whether the kernel is built here, enabled or not (builds it on the first call)."""
    return _module() is not None


def int4_scales(scale: torch.Tensor) -> torch.Tensor:
    """QuantizedLinear's int4 ``scale`` (K/32, N, 2) (scale, zero) pairs, in any float dtype, as the kernel
    reads them: (N, 2, K/32) float32, an output's scales then its zeros."""
    return scale.permute(1, 2, 0).float().contiguous()


def bf16_supported() -> bool:
    """Whether this CPU has AVX512-BF16, which the bfloat16 int4 path needs."""
    return cpu_supported() and torch.cpu._is_avx512_bf16_supported()


def bf16_built() -> bool:
    """Whether the bfloat16 int4 path runs here if switched on: the CPU has AVX512-BF16 and the build has it."""
    return ready() and _built["bf16"]


def int4_bf16() -> bool:
    """Whether int4 matmuls run the bfloat16 path here (switched on, built) rather than the int8 one."""
    return bf16_enabled and bf16_built()


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ the int4 weight (N, K/2) uint8 (two nibbles a byte, column 2j low) with
    :func:`int4_scales` (N, 2, K/32) -> (M, N) float32. With AVX512-BF16 (:func:`int4_bf16`): weights
    and activations rounded to bfloat16, products summed in float32; else activations quantised to int8
    per 32 columns. Either way a row's result is the same at every row count."""
    name = "int4_bf16_mm" if bf16_enabled and _built["bf16"] else "int4_mm"  # built: callers check ready() first
    if torch.compiler.is_compiling():
        return getattr(torch.ops.exitwise_lowbit, name)(x, weight, scales)
    return getattr(_built["module"], name)(x, weight, scales)


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ the int8 weight (N, K) times its float32 scales, one per row (N,) or one per row
    and group of 32 columns (N, K/32) -> (M, N) float32."""
    if torch.compiler.is_compiling():
        return torch.ops.exitwise_lowbit.int8_mm(x, weight, scale)
    return _built["module"].int8_mm(x, weight, scale)


def kquant_mm(kind: str, x: torch.Tensor, weight: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ a weight kept in GGUF's ``kind`` ("q4k": Q4_K, (N, K/256 * 144) uint8; "q6k":
    Q6_K, (N, K/256 * 210)) super-blocks, with each super-block's d and dmin (Q6_K: d, 0) as float32
    (N, K/256, 2) -> (M, N) float32. Activations are quantised per 256 columns with an integer sub-scale
    per 32 (lowbit_cpu.cpp), so the result differs from :func:`int4_mm` on the same weights by that
    rounding; a row's result is the same at every row count (models/kquants.py)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.exitwise_lowbit, f"{kind}_mm")(x, weight, dd)
    return getattr(_built["module"], f"{kind}_mm")(x, weight, dd)


def q5_mm(x: torch.Tensor, weight: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ GGUF Q5_0 levels packed by models/q5.py (N, K/2 + plane bytes) uint8 with their
    scales d (N, K/32) float32 -> (M, N) float32, w = (q - 16) d; activations quantised per 32 columns, a
    row's result the same at every row count."""
    if torch.compiler.is_compiling():
        return torch.ops.exitwise_lowbit.q5_mm(x, weight, d)
    return _built["module"].q5_mm(x, weight, d)


_NO_WEIGHT = torch.empty(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x (N, D) contiguous float32 CPU rows / sqrt(mean(x^2) + eps) * weight (D,) float32, or no weight."""
    w = _NO_WEIGHT if weight is None else weight
    if torch.compiler.is_compiling():
        return torch.ops.exitwise_lowbit.rms_norm(x, w, eps)
    return _built["module"].rms_norm(x, w, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, start: torch.Tensor,
              length: torch.Tensor, scale: float) -> torch.Tensor:
    """q (N, H, hd) float32 against the K / V pools (S, H_kv, hd): query n reads pool rows
    ``idx[start[n]:start[n] + length[n]]`` (int64), in that order -> (N, H hd). Each query alone, in one
    fixed order: the same bits whatever other queries come with it."""
    if torch.compiler.is_compiling():
        return torch.ops.exitwise_lowbit.attention(q, k, v, idx, start, length, scale)
    return _built["module"].attention(q, k, v, idx, start, length, scale)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               slots: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Q|K|V rows qkv (N, (H + 2 H_kv) hd) float32 with full-width RoPE rows cos, sin (N, hd): writes each
    row's rotated K and its V into the pools (S, H_kv, hd) at ``slots`` (N,) int64 and returns the rotated
    Q (N, H, hd). The bits of ``x * cos + x.roll(hd / 2, -1) * sin`` (models/llama.py)."""
    if torch.compiler.is_compiling():
        return torch.ops.exitwise_lowbit.rope_store(qkv, cos, sin, k_pool, v_pool, slots, heads, kv_heads)
    return _built["module"].rope_store(qkv, cos, sin, k_pool, v_pool, slots, heads, kv_heads)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """gate | up rows x (N, 2F) float32 -> silu(gate) * up (N, F), silu's exp within 2e-7 of exact."""
    if torch.compiler.is_compiling():
        return torch.ops.exitwise_lowbit.silu_mul(x)
    return _built["module"].silu_mul(x)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N,) int64 ``x.argmax(-1)``: the kernel's for contiguous float32 CPU rows where it runs
    (~20 us for a 151,936-id row, aten's ~400), else aten's; the same indices either way."""
    if (x.dim() == 2 and x.dtype == torch.float32 and x.is_cpu and x.is_contiguous() and x.shape[1] > 0
            and not torch.compiler.is_compiling() and ready()):
        return _built["module"].argmax_rows(x)
    return x.argmax(-1)


def layer_plan(in_norm: torch.Tensor, post_norm: torch.Tensor, eps: float, linears: list[list[tuple]],
               k_pool: torch.Tensor, v_pool: torch.Tensor, heads: int, kv_heads: int, scale: float):
    """A Llama-style decoder layer as one kernel call (``LayerPlan.forward(x, cos, sin, slots, idx, start,
    length, bf16)``, see lowbit_cpu.cpp; ``bf16``: int4 parts on the AVX512-BF16 path, :func:`int4_bf16`):
    ``linears`` the four linears' parts (Q|K|V, O, gate|up, down), each a list of
    :meth:`QuantizedLinear.kernel_spec`'s (kind, weight, scales, bias or None) whose outputs are
    concatenated. The kernels models/llama.py's layer calls one by one, in its order: the same bits."""
    parts = [p for linear in linears for p in linear]
    kinds, weights, scales, biases = (list(col) for col in zip(*parts, strict=True))
    return _built["module"].LayerPlan(in_norm, post_norm, eps, [len(linear) for linear in linears], kinds, weights,
                                      scales, biases, k_pool, v_pool, heads, kv_heads, scale)


def kquant_values(weight: torch.Tensor, dd: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows of a ``kind`` ("q4k", "q6k") super-block weight (R, K/256 * bytes) with their d, dmin (R, K/256,
    2) float32 -> the float32 weights (R, K), gguf's values bit for bit (models/kquants.py)."""
    return _built["module"].kquant_values(weight, dd, 4 if kind == "q4k" else 6)
