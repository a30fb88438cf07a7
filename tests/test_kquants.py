"""Weights kept in GGUF's k-quant super-blocks (models/kquants.py): the file's bytes, gguf's reference values,
the kernel's arithmetic against a float64 model of it, the same bits for a row at every row count, and
whole files whose Q4_K / Q6_K matrices load, fuse and run in that layout."""

from pathlib import Path

import pytest
import torch

from exitwise.models import gguf as G
from exitwise.models import kernels
from exitwise.models.kquants import KQuantLinear
from exitwise.models.quantize import QuantizedLinear, StackedLinear
from test_gguf import blocks, reference, write_tiny_gguf

needs_kernel = pytest.mark.skipif(not kernels.ready(), reason="the CPU kernel does not run here (no AVX2 or no build)")


KINDS = {"q4k": "Q4_K", "q6k": "Q6_K"}


def kq_layer(kind: str = "q4k", rows: int = 32, cols: int = 512, seed: int = 0,
             bias: bool = False) -> tuple[KQuantLinear, G.Tensor]:
    t = blocks(KINDS[kind], rows, cols, seed=seed)
    b = torch.randn(rows, generator=torch.Generator().manual_seed(seed)) if bias else None
    return G.to_linear(t, kind, b, Path("x.gguf")), t


def q8k_reference(lin: KQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: each row quantised to int8 per 256 columns against a unit u
    (max|x| / (127 * 31)) times an integer sub-scale per 32 columns (ceil(31 max|x_g| / max|x|), 1..31),
    each step in float32 as the kernel does (round half to even), times the file's weights."""
    m, k = x.shape
    xg = x.view(m, k // 256, 8, 32)
    gmax = xg.abs().amax(-1, keepdim=True)  # (m, nb, 8, 1)
    amax = gmax.amax(-2, keepdim=True)  # (m, nb, 1, 1)
    r = torch.where(amax > 0, 31.0 / amax, torch.zeros_like(amax))
    sub = torch.ceil(gmax * r).clamp(1, 31)
    unit = amax / (127.0 * 31)
    dg = unit * sub
    inv = torch.where(dg > 0, 1.0 / dg, torch.zeros_like(dg))
    xq = torch.round(xg * inv).clamp(-127, 127)
    xhat = (xq.double() * sub.double() * unit.double()).view(m, k)
    return xhat @ lin.dequantize().double().t()


@pytest.mark.parametrize("kind", KINDS)
def test_the_weight_is_the_files_blocks_and_dequantises_to_the_reference_bit_for_bit(kind):
    lin, t = kq_layer(kind)
    assert isinstance(lin, KQuantLinear) and lin.layout == kind
    assert lin.weight_dtype == {"q4k": "int4", "q6k": "int8"}[kind]
    assert (lin.out_features, lin.in_features) == (32, 512)
    assert torch.equal(lin.weight, torch.from_numpy(t.raw.copy()))
    assert torch.equal(lin.dequantize(), reference(t))
    rows = torch.tensor([3, 0, 17])
    assert torch.equal(lin.dequantize(rows), reference(t)[rows])
    head = lin.first_rows(5)
    assert torch.equal(head.dequantize(), reference(t)[:5]) and head.weight.data_ptr() == lin.weight.data_ptr()


def test_bad_blocks_are_refused_naming_the_shape():
    with pytest.raises(ValueError, match=r"Q4_K blocks must be \(out, in / 256 \* 144\) uint8, got \(4, 100\)"):
        KQuantLinear(torch.zeros(4, 100, dtype=torch.uint8), None, "q4k")


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
def test_kernel_computes_q8_k_activations_times_the_files_weights(kind, rows):
    # every row count, on every CPU: blocks never take a bfloat16 copy (QuantizedLinear._in_blocks)
    lin, _ = kq_layer(kind, rows=36, bias=True)  # 36 outputs: not a multiple of the 8-row tile
    x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(rows))
    x[0, :256] = 0  # an all-zero super-block has scale 0
    y = lin(x)
    ref = q8k_reference(lin, x) + lin.bias.double()
    assert y.dtype == torch.float32 and y.shape == (rows, lin.out_features)
    # integer super-block sums, float32 scaling once per super-block: a few float32 ulps of the result
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    exact = x.double() @ lin.dequantize().double().t() + lin.bias.double()
    assert (y.double() - exact).norm() / exact.norm() < 0.01  # the activations' rounding: ~0.5%


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_a_row_has_the_same_bits_at_every_row_count_and_thread_count(kind):
    lin, _ = kq_layer(kind, rows=64, cols=768, seed=4)
    x = torch.randn(20, lin.in_features, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([lin(x[i:i + 1]) for i in range(len(x))])
    for n in range(1, 18):
        for start in (0, 20 - n):
            assert torch.equal(lin(x[start:start + n]), alone[start:start + n]), (n, start)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(lin(x), alone)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_off_the_kernel_the_weight_is_dequantised(monkeypatch, kind):
    lin, t = kq_layer(kind)
    monkeypatch.setattr(kernels, "enabled", False)
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(lin(x), x @ reference(t).t(), rtol=1e-5, atol=1e-5)


def test_stacking_and_sharing_rows_keep_one_copy():
    parts = [kq_layer(rows=r, seed=s)[0] for r, s in ((32, 1), (16, 2), (16, 3))]
    want = torch.cat([p.dequantize() for p in parts])
    fused = QuantizedLinear.cat(parts)
    assert isinstance(fused, KQuantLinear) and torch.equal(fused.dequantize(), want)
    start = 0
    for p in parts:
        p.share_rows_of(fused, start)
        assert p.weight.data_ptr() == fused.weight[start:].data_ptr()
        assert torch.equal(p.dequantize(), want[start:start + p.out_features])
        start += p.out_features



def test_parts_of_different_block_types_stack_each_in_its_own_layout():
    q, k = kq_layer(rows=32, seed=1)[0], kq_layer(rows=16, seed=2)[0]
    v = kq_layer("q6k", rows=16, seed=3)[0]
    want = torch.cat([p.dequantize() for p in (q, k, v)])
    x = torch.randn(3, q.in_features)
    want_y = torch.cat([q(x), k(x), v(x)], -1)
    fused = QuantizedLinear.cat([q, k, v])
    assert isinstance(fused, StackedLinear) and [r.layout for r in fused.runs] == ["q4k", "q6k"]
    assert fused.runs[1] is v  # a part alone in its run is the run: no copy
    fused.view_into([q, k, v])
    assert q.weight.data_ptr() == fused.runs[0].weight.data_ptr()  # Q|K stacked once, Q and K view it
    assert torch.equal(fused.dequantize(), want) and torch.equal(fused.dequantize(torch.tensor([40, 3])), want[[40, 3]])
    assert torch.equal(fused(x), want_y)


def test_fused_groups_keep_blocks_when_every_part_keeps_its_own():
    types = {"a.q": "Q4_K", "a.k": "Q4_K", "a.v": "Q6_K", "m.g": "Q4_K", "m.u": "Q4_K", "m.d": "Q6_K",
             "o": "Q4_K", "o2": "Q4_0", "head": "Q6_K"}
    groups = [["a.q", "a.k", "a.v"], ["m.g", "m.u"]]
    ready = frozenset(n for n, k in types.items() if k in ("Q4_K", "Q6_K"))
    plan = G.plan_layouts(types, "auto", groups, {"head"}, ready)
    assert plan == {"a.q": "q4k", "a.k": "q4k", "a.v": "q6k", "m.g": "q4k", "m.u": "q4k", "m.d": "q6k",
                    "o": "q4k", "o2": "int4", "head": "q6k"}
    mixed = G.plan_layouts({**types, "m.u": "Q4_0"}, "auto", groups, {"head"}, ready)
    assert mixed["m.g"] == mixed["m.u"] == "int4"  # a part in a plain dtype: the group shares the widest
    no_kernel = G.plan_layouts(types, "auto", groups, {"head"})
    assert no_kernel["o"] == "int4" and no_kernel["m.d"] == no_kernel["head"] == "int8"
    # a dtype asked for other than the one the blocks stand in for: that dtype
    assert G.plan_layouts(types, "int4", groups, {"head"}, ready)["m.d"] == "int4"
    assert G.plan_layouts(types, "int8", groups, {"head"}, ready)["o"] == "int8"


@needs_kernel
def test_a_k_quant_file_loads_its_matrices_as_blocks_and_runs_them(tmp_path):
    from exitwise.engine import LLM, SamplingParams
    from exitwise.models.backbone import Backbone
    from test_gguf import float32_reference

    path = tmp_path / "tiny.gguf"
    q4 = dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"), "Q4_K")
    write_tiny_gguf(path, "qwen2", {**q4, "ffn_down": "Q6_K", "output": "Q6_K"}, tied=False)
    loaded = G.load(path, "auto")
    model = loaded.model
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert all(isinstance(m, KQuantLinear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.down_proj))
    assert mlp.down_proj.layout == model.lm_head.layout == "q6k" and attn.q_proj.layout == "q4k"
    ref = float32_reference(path)
    ids = torch.tensor([[5, 17, 3, 60, 2, 9, 33]])
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert (got - want).norm() / want.norm() < 0.05  # the file's weights; activations rounded per 256
    llm = LLM(Backbone(model, loaded.tokenizer), kv_cache_bytes=1 << 20)
    fused = llm.engine.runner.model.layers[0].linears[0]
    assert isinstance(fused, KQuantLinear) and attn.q_proj.weight.data_ptr() == fused.weight.data_ptr()
    alone = llm.generate([[5, 17, 3]], SamplingParams(max_tokens=6))[0].token_ids
    batch = llm.generate([[5, 17, 3], [9, 2, 60, 4], [33, 1]], SamplingParams(max_tokens=6))
    assert batch[0].token_ids == alone  # batch-invariant: the same greedy tokens in company


@needs_kernel
def test_a_q4_k_m_style_q_k_v_keeps_each_block_type_and_the_engine_computes_what_hf_does(tmp_path):
    from engine_helpers import engine_logits_vs_hf, greedy_equals_hf
    from exitwise.models.backbone import Backbone

    path = tmp_path / "mixed.gguf"  # V in Q6_K, Q and K in Q4_K: half the layers of a Q4_K_M file
    q4 = dict.fromkeys(("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"), "Q4_K")
    write_tiny_gguf(path, "qwen2", {**q4, "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}, tied=False)
    loaded = G.load(path, "auto")
    attn = loaded.model.model.layers[0].self_attn
    assert (attn.q_proj.layout, attn.k_proj.layout, attn.v_proj.layout) == ("q4k", "q4k", "q6k")
    bb = Backbone(loaded.model, loaded.tokenizer)
    # the same weights and int8 activations on both sides, in other orders: within 1.5% of the largest
    # logit (~14 here; 0.08 measured), and the same greedy tokens
    assert engine_logits_vs_hf(bb, [[5, 17, 3, 60], [2, 9]], steps=3) < 0.2
    greedy_equals_hf(bb, [[5, 17, 3, 60], [2, 9]], 8)
    from exitwise.engine import LLM

    fused = LLM(bb, kv_cache_bytes=1 << 20).engine.runner.model.layers[0].linears[0]
    assert isinstance(fused, StackedLinear) and attn.q_proj.weight.data_ptr() == fused.runs[0].weight.data_ptr()
    assert fused.runs[1] is attn.v_proj  # one copy of every weight


@needs_kernel
def test_a_mixed_q_k_v_runs_in_the_one_call_layer_with_the_op_by_op_bits(tmp_path, monkeypatch):
    from engine_helpers import one_call_matches_op_by_op
    from exitwise.models.backbone import Backbone

    path = tmp_path / "mixed.gguf"
    q4 = dict.fromkeys(("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"), "Q4_K")
    write_tiny_gguf(path, "qwen2", {**q4, "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}, tied=False)
    loaded = G.load(path, "auto")
    bb = Backbone(loaded.model, loaded.tokenizer)
    model = one_call_matches_op_by_op(bb, monkeypatch, [[5, 17, 3, 60], [2, 9], [33, 1, 8, 8, 40, 2, 7]])
    assert isinstance(model.layers[0].linears[0], StackedLinear)  # the Q4_K | Q6_K Q|K|V took it too


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_the_kernel_dequantises_to_the_torch_reference_bit_for_bit(kind):
    from exitwise.models.kquants import BLOCKS

    lin, t = kq_layer(kind, rows=24, cols=768, seed=5)
    ref = BLOCKS[kind].values(lin.weight.view(24, -1, BLOCKS[kind].nbytes))
    assert torch.equal(lin.dequantize(), ref) and torch.equal(ref, reference(t))
    rows = torch.tensor([23, 0, 7])
    assert torch.equal(lin.dequantize(rows), ref[rows])
