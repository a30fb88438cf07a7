"""The int4 / int8 CPU kernel (exitwise.models.kernels): exact against the de-quantised weights, the
same bits for a row at every row count, and aten's kernels wherever it is turned off."""

import pytest
import torch

from exitwise.models import kernels
from exitwise.models.quantize import QuantizedLinear, int_kernels_only

pytestmark = pytest.mark.skipif(not kernels.ready(), reason="the CPU kernel does not run here (no AVX2 or no build)")


def layer(dtype: str, out: int = 96, inp: int = 160, bias: bool = False, seed: int = 0) -> QuantizedLinear:
    """A random layer; "int8g": int8 levels with a float32 scale per row and 32 columns (GGUF's Q8_0)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    b = torch.randn(out, generator=gen) if bias else None
    if dtype == "int8g":
        q = torch.randint(-127, 128, (out, inp), generator=gen, dtype=torch.int8)
        return QuantizedLinear(q, torch.rand(out, inp // 32, generator=gen) * 0.01, b, "int8")
    return QuantizedLinear.from_float(w, b, dtype)


@pytest.fixture
def kernel_everywhere(monkeypatch):
    """Every row count on the kernel, whatever this CPU's default."""
    monkeypatch.setattr(QuantizedLinear, "kernel_rows", 1 << 30)


def bf16_reference(lin: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """What the AVX512-BF16 int4 path computes, in float64: each group's 16 weight levels (q - 8) s + z
    rounded once to float32 (the FMA) and then to bfloat16, times the activations rounded to bfloat16."""
    sz = lin.kernel_scale.double()  # (N, 2, K/32)
    s, z = sz[:, 0].repeat_interleave(32, 1), sz[:, 1].repeat_interleave(32, 1)
    w = ((lin._nibbles().double() - 8) * s + z).float().to(torch.bfloat16).double()
    return x.to(torch.bfloat16).double() @ w.t()


def q8_reference(lin: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: each row quantised to int8 per group of 32 columns (scale
    max|x| / 127, round half to even, in float32 as the kernel does), times the exact weights; int4's
    zero points multiply the unquantised activations (their group sums). int4 where the bfloat16 path
    runs: :func:`bf16_reference`."""
    if lin.weight_dtype == "int4" and kernels.int4_bf16():
        return bf16_reference(lin, x)
    m, k = x.shape
    xg = x.view(m, k // 32, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xhat = (torch.round(xg * inv).double() * (amax / 127.0).double()).view(m, k)
    w = lin.dequantize().double()
    if lin.weight_dtype == "int8":
        return xhat @ w.t()
    zeros = lin.scale.double()[..., 1].t().repeat_interleave(32, dim=1)  # (out, in)
    return xhat @ (w - zeros).t() + x.double() @ zeros.t()


def int4_path(dtype: str, monkeypatch) -> str:
    """"int4-bf16": int4 on the AVX512-BF16 path (skipped where the CPU or the build has none)."""
    if dtype != "int4-bf16":
        return dtype
    if not kernels.bf16_built():
        pytest.skip("no AVX512-BF16 path here")
    monkeypatch.setattr(kernels, "bf16_enabled", True)
    return "int4"


@pytest.mark.parametrize("dtype", ["int4", "int4-bf16", "int8", "int8g"])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 16, 37])
def test_kernel_computes_int8_activations_times_the_exact_weights(dtype, rows, kernel_everywhere, monkeypatch):
    dtype = int4_path(dtype, monkeypatch)
    lin = layer(dtype, bias=True)
    x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0  # an all-zero group has scale 0
    ref = q8_reference(lin, x) + lin.bias.double()
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (rows, lin.out_features)
    # integer (or bfloat16) products and float32 sums of group terms: a few float32 ulps of the result
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    # and the activations' quantisation costs about 0.5% against the unquantised product
    exact = x.double() @ lin.dequantize().double().t() + lin.bias.double()
    assert (y.double() - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("dtype", ["int4", "int4-bf16", "int8", "int8g"])
def test_a_row_has_the_same_bits_at_every_row_count_and_position(dtype, kernel_everywhere, monkeypatch):
    dtype = int4_path(dtype, monkeypatch)
    lin = layer(dtype, out=64, inp=96, seed=3)
    x = torch.randn(30, lin.in_features, generator=torch.Generator().manual_seed(4))
    alone = torch.cat([lin(x[i:i + 1]) for i in range(len(x))])
    for n in range(1, 17):
        for start in (0, 1, 20 - n):
            assert torch.equal(lin(x[start:start + n]), alone[start:start + n]), (n, start)
    assert torch.equal(lin(x), alone)  # 30 rows: more than either kernel's row tile
    assert torch.equal(lin(x.view(5, 6, -1)), alone.view(5, 6, -1))  # leading dims are rows


def test_same_bits_across_thread_counts(kernel_everywhere):
    lin = layer("int4", out=256, inp=128, seed=5)
    x = torch.randn(9, lin.in_features)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        two = lin(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_inputs_of_other_dtypes_and_layouts_are_float32_rows(kernel_everywhere):
    lin = layer("int4", seed=6)
    x = torch.randn(lin.in_features, 6).t()  # (6, in), not contiguous
    assert torch.equal(lin(x), lin(x.contiguous()))
    xb = x.bfloat16()
    assert torch.equal(lin(xb), lin(xb.float()))


def test_fused_layers_use_the_kernel_on_their_concatenated_scales(kernel_everywhere):
    a, b = layer("int4", out=32, inp=64, seed=7), layer("int4", out=48, inp=64, seed=8)
    both = QuantizedLinear.cat([a, b])
    x = torch.randn(3, 64)
    assert torch.equal(both(x), torch.cat([a(x), b(x)], dim=-1))


def test_shapes_the_kernel_does_not_take_stay_on_aten(kernel_everywhere):
    # (aten's int8 kernel itself crashes on inputs that are not a multiple of 8 wide: 48 is the odd one)
    lin = layer("int8", out=30, inp=48)  # outputs not in fours, inputs not in groups of 32
    assert lin.kernel_scale is None
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(9))
    ref = x @ lin.dequantize().t()
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=0.01 * ref.abs().max().item())  # bfloat16 activations
    with pytest.raises(ValueError, match="divisible"):  # int4 shapes are refused when made, as before
        layer("int4", out=30, inp=64)


def test_disabled_kernel_falls_back_to_aten(monkeypatch, kernel_everywhere):
    lin = layer("int4", bias=True)
    x = torch.randn(2, lin.in_features, generator=torch.Generator().manual_seed(10))
    new = lin(x)
    monkeypatch.setattr(kernels, "enabled", False)
    old = lin(x)  # aten's bfloat16-activation kernel: close, not equal
    assert not torch.equal(new, old)
    torch.testing.assert_close(new, old, rtol=0, atol=0.01 * new.abs().max().item())
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), lin.packed, 32, lin.scale).float() + lin.bias
    assert torch.equal(old, expected)


def test_inputs_that_need_gradients_stay_on_aten(monkeypatch, kernel_everywhere):
    lin = layer("int8")
    x = torch.randn(2, lin.in_features, requires_grad=True)
    with_grad = lin(x).detach()
    monkeypatch.setattr(kernels, "enabled", False)
    assert torch.equal(with_grad, lin(x.detach()))  # aten's path, as before the kernel


def test_int_kernels_only_puts_every_row_count_on_the_decode_kernel(monkeypatch):
    lin = layer("int4")
    monkeypatch.setattr(QuantizedLinear, "kernel_rows", 4)  # a user's choice: the bfloat16 copy from 5 rows
    lin.add_batch_copy()
    assert lin.batch_weight is not None
    x = torch.randn(12, lin.in_features)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(len(x))])
    assert not torch.equal(lin(x), alone)  # 12 rows > kernel_rows: the bfloat16 copy
    with int_kernels_only():
        assert torch.equal(lin(x), alone)


def test_env_var_turns_the_kernel_off():
    import subprocess
    import sys

    code = "from exitwise.models import kernels; print(kernels.enabled, kernels.ready())"
    env = {**__import__("os").environ, "EXITWISE_NO_KERNEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_failed_build_warns_once_and_runs_aten(tmp_path):
    import os
    import subprocess
    import sys

    code = """if True:
        import warnings, torch
        from exitwise.models.quantize import QuantizedLinear
        lin = QuantizedLinear.from_float(torch.randn(64, 64), None, "int4")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            x = torch.randn(2, 64)
            y = lin(x), lin(x[:1])
        want = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), lin.packed, 32, lin.scale).float()
        print(len(rec), torch.equal(y[0], want))
    """
    env = {**os.environ, "CXX": "/bin/false", "EXITWISE_CACHE": str(tmp_path)}  # no working compiler
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True"]


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_aten_and_is_the_same_per_row_in_any_batch(weighted):
    from exitwise.models.llama import rms_norm

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(13, 100, generator=gen) * 3  # 100: a tail past the 8-wide vectors
    w = torch.randn(100, generator=gen) if weighted else None
    y = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (100,), w, 1e-6), rtol=1e-6, atol=1e-6)
    alone = torch.cat([rms_norm(x[i:i + 1], w, 1e-6) for i in range(13)])
    assert torch.equal(y, alone)
    x.requires_grad_(True)  # gradients: aten's differentiable version
    rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("hd", [20, 75, 128])  # 20: 8-wide blocks and a tail; 75 and 128: 64-wide blocks too
def test_attention_matches_sdpa_and_a_query_gets_the_same_bits_in_any_company(hd):
    gen = torch.Generator().manual_seed(11)
    s, hkv, group = 40, 2, 3
    k, v = torch.randn(s, hkv, hd, generator=gen), torch.randn(s, hkv, hd, generator=gen)
    q = torch.randn(6, hkv * group, hd, generator=gen)
    idx = torch.randperm(s, generator=gen)  # pool rows in any order
    lens = torch.tensor([1, 5, 9, 17, 30, 40])
    start = torch.zeros(6, dtype=torch.long)
    out = kernels.attention(q, k, v, idx, start, lens, 0.3)
    for n, t in enumerate(lens.tolist()):
        kk = k[idx[:t]].transpose(0, 1).repeat_interleave(group, 0)  # (H, t, hd)
        vv = v[idx[:t]].transpose(0, 1).repeat_interleave(group, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[n][:, None], kk, vv, scale=0.3)  # (H, 1, hd)
        torch.testing.assert_close(out[n], ref.reshape(-1), rtol=1e-5, atol=1e-5)
        alone = kernels.attention(q[n:n + 1].contiguous(), k, v, idx, start[:1], lens[n:n + 1], 0.3)
        assert torch.equal(alone[0], out[n])
    with pytest.raises(RuntimeError, match="outside"):
        kernels.attention(q[:1].contiguous(), k, v, idx, start[:1], torch.tensor([s + 1]), 0.3)


@pytest.mark.parametrize("hd", [20, 64, 128])  # 20: half a head is not a whole vector, the scalar path
def test_rope_store_has_the_bits_of_the_aten_rotation_and_writes_only_its_slots(hd):
    gen = torch.Generator().manual_seed(hd)
    n, heads, kv_heads, s = 5, 6, 2, 30
    qkv = torch.randn(n, (heads + 2 * kv_heads) * hd, generator=gen)
    ang = torch.rand(n, 1, hd // 2, generator=gen) * 6
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((-ang.sin(), ang.sin()), -1)  # (N, 1, hd)
    k, v = torch.randn(s, kv_heads, hd, generator=gen), torch.randn(s, kv_heads, hd, generator=gen)
    k0, v0 = k.clone(), v.clone()
    slots = torch.tensor([3, 17, 0, 29, 8])
    q = kernels.rope_store(qkv, cos, sin, k, v, slots, heads, kv_heads)
    qk = qkv[:, :(heads + kv_heads) * hd].view(n, -1, hd)
    want = qk * cos + qk.roll(hd // 2, -1) * sin  # models/llama.py's rotation
    assert torch.equal(q, want[:, :heads])
    assert torch.equal(k[slots], want[:, heads:])
    assert torch.equal(v[slots], qkv[:, (heads + kv_heads) * hd:].view(n, kv_heads, hd))
    rest = torch.ones(s, dtype=torch.bool)
    rest[slots] = False
    assert torch.equal(k[rest], k0[rest]) and torch.equal(v[rest], v0[rest])
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.rope_store(qkv, cos, sin, k, v, torch.tensor([1, 2, 3, 4, s]), heads, kv_heads)


def test_silu_mul_matches_aten_and_is_the_same_per_row_in_any_batch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 2 * 1003, generator=gen) * 4  # 1003: a tail past the 8-wide vectors
    x[0, :6] = torch.tensor([-200.0, -88.5, -30.0, 0.0, 30.0, 200.0])  # exp's range ends
    y = kernels.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(y, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-9)
    assert torch.equal(y, torch.cat([kernels.silu_mul(x[i:i + 1]) for i in range(7)]))


def test_argmax_gives_aten_argmax_indices_ties_and_nan_included():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1003, generator=gen)
    x[1, [10, 500, 1001]] = 9.0  # ties: the first
    x[2, 1000] = 9.0  # the largest in the tail past the 8-wide vectors
    x[3, [7, 900]] = float("nan")  # NaN counts as the largest: the first NaN
    x[4] = float("-inf")
    x[5, 0] = float("inf")
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    assert torch.equal(kernels.argmax(x[:, :5]), x[:, :5].argmax(-1))  # not contiguous: aten's


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: Q|K|V with a bias
@pytest.mark.parametrize("dtype", ["int4", "int4-bf16", "int8"])
def test_one_call_layer_gives_the_op_by_op_layers_bits(family, dtype, monkeypatch):
    from exitwise.engine import LLM, SamplingParams
    from exitwise.engine.sequence import Sequence
    from exitwise.models.llama import LlamaDecoder
    from tiny_models import engine_tiny, qwen2

    dtype = int4_path(dtype, monkeypatch)
    bb = engine_tiny(seed=2) if family == "llama" else qwen2(seed=2)
    prompts = [list(range(5, 5 + n)) for n in (7, 19, 3)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def run(one_call: bool):
        if not one_call:
            monkeypatch.setattr(LlamaDecoder, "_one_call", lambda self, i, x: None)
        llm = LLM(bb, num_kv_blocks=64, block_size=4, max_num_seqs=4, weight_dtype=dtype,
                  speculative=True, draft="lookup")  # batched decode steps and multi-row verification passes
        plans = sum(p is not None for p in llm.engine.runner.model._plans)
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        alone = [llm.generate([p], params)[0].token_ids for p in prompts]
        seqs = [Sequence(str(i), p, params) for i, p in enumerate(prompts)]  # a 3-row prefill's logits
        for s in seqs:
            llm.engine.blocks.allocate(s)
        return plans, outs, alone, llm.engine.runner.prefill(seqs)

    plans, fused, fused_alone, fused_logits = run(True)
    assert plans == bb.num_layers  # every layer took the one-call path
    _, op_by_op, op_alone, op_logits = run(False)
    assert fused == op_by_op == fused_alone == op_alone
    assert torch.equal(fused_logits, op_logits)


def test_one_call_layers_follow_the_kernel_switch(monkeypatch):
    from exitwise.engine import LLM, SamplingParams
    from exitwise.models.llama import LlamaDecoder
    from tiny_models import engine_tiny

    calls = []
    one_call = LlamaDecoder._one_call

    def counted(self, i, x):
        plan = one_call(self, i, x)
        calls.append(plan is not None)
        return plan

    monkeypatch.setattr(LlamaDecoder, "_one_call", counted)
    llm = LLM(engine_tiny(seed=3), num_kv_blocks=32, block_size=4, weight_dtype="int4")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    monkeypatch.setattr(kernels, "enabled", False)  # the first steps with the kernel off: op by op, on aten
    off = llm.generate([[5, 6, 7]], params)[0].token_ids
    assert calls and not any(calls)
    monkeypatch.setattr(kernels, "enabled", True)  # plans were built all the same, and now run
    calls.clear()
    llm.generate([[5, 6, 7]], params)
    assert calls and all(calls)
    assert len(off) == 4


@pytest.mark.skipif(not kernels.bf16_built(), reason="no AVX512-BF16 path here")
def test_built_one_call_layers_follow_the_bf16_switch(monkeypatch):
    """The plans are built once; whether their int4 parts take the AVX512-BF16 path is each call's choice,
    so switching it gives what the op-by-op layers give under the same switch."""
    from exitwise.engine import LLM, SamplingParams
    from exitwise.models.llama import LlamaDecoder
    from tiny_models import engine_tiny

    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = [[5, 6, 7, 9, 11], [40, 41]]
    llm = LLM(engine_tiny(seed=4), num_kv_blocks=32, block_size=4, weight_dtype="int4")

    def tokens_and_matmuls():
        model = llm.engine.runner.model
        x = torch.randn(3, model.hidden_size, generator=torch.Generator().manual_seed(0))
        qkv, _, gate_up, _ = model.layers[0].linears  # the two that read the hidden state
        return [o.token_ids for o in llm.generate(prompts, params)], [qkv(x), gate_up(x)]

    fused = {}
    for bf16 in (True, False, True):  # and back: the built plans follow the switch each way
        monkeypatch.setattr(kernels, "bf16_enabled", bf16)
        tokens, mats = tokens_and_matmuls()
        if bf16 in fused:
            assert tokens == fused[bf16][0]
            assert all(torch.equal(a, b) for a, b in zip(mats, fused[bf16][1], strict=True))
        fused[bf16] = tokens, mats
    monkeypatch.setattr(LlamaDecoder, "_one_call", lambda self, i, x: None)
    for bf16 in (True, False):
        monkeypatch.setattr(kernels, "bf16_enabled", bf16)
        tokens, mats = tokens_and_matmuls()
        assert tokens == fused[bf16][0]
        assert all(torch.equal(a, b) for a, b in zip(mats, fused[bf16][1], strict=True))
    # the two paths compute different bits: the switch is real
    assert not all(torch.equal(a, b) for a, b in zip(fused[True][1], fused[False][1], strict=True))


@pytest.mark.skipif(kernels.cflags() == kernels.CFLAGS, reason="the build here has no AVX-512 extensions")
def test_the_avx512_build_computes_the_avx2_builds_bits(tmp_path):
    """VPDPBUSD sums the same integers as maddubs + madd: a build for this CPU and a plain AVX2 build of the
    same source give the same bits (int4, int8 per row and per group, Q5_0, Q4_K and Q6_K)."""
    from torch.utils.cpp_extension import load

    from exitwise.models.q5 import pack
    from test_kquants import kq_layer

    src = kernels.SOURCE.read_text()
    for macro in ("TORCH_LIBRARY(", "TORCH_LIBRARY_IMPL("):  # its own op namespace, beside the loaded build
        src = src.replace(f"{macro}exitwise_lowbit", f"{macro}exitwise_avx2only")
    (tmp_path / "avx2only.cpp").write_text(src)
    plain = load(name="exitwise_avx2only", sources=[str(tmp_path / "avx2only.cpp")], extra_cflags=kernels.CFLAGS,
                 extra_ldflags=["-fopenmp"], build_directory=str(tmp_path))
    assert not plain.has_bf16()
    native = kernels._built["module"]
    gen = torch.Generator().manual_seed(7)
    for rows in (1, 5, 9, 20):
        x = torch.randn(rows, 160, generator=gen)
        for dtype in ("int4", "int8", "int8g"):
            lin = layer(dtype, out=64, inp=160, seed=rows)
            fn = "int4_mm" if dtype == "int4" else "int8_mm"
            a = getattr(native, fn)(x, lin.weight, lin.kernel_scale)
            assert torch.equal(a, getattr(plain, fn)(x, lin.weight, lin.kernel_scale)), (dtype, rows)
        q5, d = pack(torch.randint(0, 32, (64, 160), generator=gen, dtype=torch.uint8)), torch.rand(64, 5) * 0.01
        assert torch.equal(native.q5_mm(x, q5, d), plain.q5_mm(x, q5, d)), rows
        xk = torch.randn(rows, 512, generator=gen)
        for kind in ("q4k", "q6k"):
            lin, _ = kq_layer(kind, rows=32, cols=512, seed=rows)
            a = getattr(native, f"{kind}_mm")(xk, lin.weight, lin.kernel_scale)
            assert torch.equal(a, getattr(plain, f"{kind}_mm")(xk, lin.weight, lin.kernel_scale)), (kind, rows)
