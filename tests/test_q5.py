"""GGUF Q5_0 kept in its 5-bit levels (exitwise.models.q5): packing that round-trips, the file's values bit
for bit, the kernel's arithmetic against the int8-per-32 layout of the same levels, a row's bits at
every row count, and a Q5_0 model through the engine and its one-call layer."""

from pathlib import Path

import numpy as np
import pytest
import torch

from exitwise.models import gguf as G
from exitwise.models import kernels
from exitwise.models.q5 import Q5Linear, pack, row_bytes, unpack, vector_columns
from exitwise.models.quantize import QuantizedLinear, StackedLinear
from test_gguf import blocks, reference, write_tiny_gguf

needs_kernel = pytest.mark.skipif(not kernels.ready(), reason="the CPU kernel does not run here (no AVX2 or no build)")

# group counts: paired, one unpaired last group, fewer than a chunk, a chunk and a tail, Qwen's 896 and 4864
WIDTHS = (64, 96, 160, 288, 896, 4864)


@pytest.mark.parametrize("k", WIDTHS)
def test_packing_round_trips_and_every_column_has_one_place(k):
    q = torch.randint(0, 32, (12, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    rows = pack(q)
    assert rows.shape == (12, row_bytes(k)) and torch.equal(unpack(rows, k), q)
    assert sorted(vector_columns(k).reshape(-1).tolist()) == list(range(k))


def test_the_levels_and_scales_are_the_files_bit_for_bit():
    t = blocks("Q5_0", 24, 288, seed=3)
    lin = G.to_linear(t, "q5", None, Path("x.gguf"))
    assert isinstance(lin, Q5Linear) and lin.layout == "q5" and lin.weight_dtype == "int8"
    assert torch.equal(lin.dequantize(), reference(t))
    rows = torch.tensor([23, 0, 7])
    assert torch.equal(lin.dequantize(rows), reference(t)[rows])
    assert row_bytes(4864) * 8 == 4864 * 5  # 5 bits a weight where the vectors fill whole planes


def test_stacking_and_sharing_rows_keep_one_copy():
    parts = [G.to_linear(blocks("Q5_0", r, 160, seed=s), "q5", None, Path("x.gguf")) for r, s in ((8, 1), (4, 2))]
    want = torch.cat([p.dequantize() for p in parts])
    fused = QuantizedLinear.cat(parts)
    assert isinstance(fused, Q5Linear) and torch.equal(fused.dequantize(), want)
    fused.view_into(parts)
    assert parts[1].weight.data_ptr() == fused.weight[8:].data_ptr()
    assert torch.equal(parts[1].dequantize(), want[8:]) and torch.equal(fused.first_rows(8).dequantize(), want[:8])
    mixed = QuantizedLinear.cat([parts[0], G.to_linear(blocks("Q8_0", 4, 160), "int8g", None, Path("x.gguf"))])
    assert isinstance(mixed, StackedLinear) and [r.layout for r in mixed.runs] == ["q5", "int8g"]


def test_bad_rows_or_scales_are_refused_naming_the_shapes():
    with pytest.raises(ValueError, match=r"Q5_0 rows for 64 columns must be \(4, 64\) uint8, got \(4, 40\)"):
        Q5Linear(torch.zeros(4, 40, dtype=torch.uint8), torch.ones(4, 2), None, 64)
    with pytest.raises(ValueError, match=r"Q5_0 scales must be \(4, 2\), got \(4, 3\)"):
        Q5Linear(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3), None, 64)


@needs_kernel
@pytest.mark.parametrize("k", WIDTHS)
def test_kernel_computes_what_int8_per_32_computes_on_the_same_levels(k):
    gen = torch.Generator().manual_seed(k)
    q = torch.randint(0, 32, (20, k), dtype=torch.uint8, generator=gen)
    d = torch.rand(20, k // 32, generator=gen) * 0.01
    lin = Q5Linear(pack(q), d, None, k)
    same = QuantizedLinear((q.to(torch.int16) - 16).to(torch.int8), d, None, "int8")  # "int8g", one value each
    x = torch.randn(9, k, generator=gen)
    got, want = lin(x), same(x)
    # the same integer group sums; only the -16 term is summed in another order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    exact = x.double() @ lin.dequantize().double().t()
    assert ((got.double() - exact).norm() / exact.norm()) < 0.02  # int8 activations' rounding
    for r in (1, 2, 5, 8):  # a row's bits at every row count
        assert torch.equal(lin(x[:r]), got[:r])
    assert torch.equal(lin(x[4:5])[0], got[4])


def test_off_the_kernel_the_weight_is_dequantised(monkeypatch):
    t = blocks("Q5_0", 8, 96, seed=4)
    lin = G.to_linear(t, "q5", None, Path("x.gguf"))
    monkeypatch.setattr(kernels, "enabled", False)
    x = torch.randn(3, 96)
    torch.testing.assert_close(lin(x), x @ reference(t).t(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_q5_0_model_keeps_its_levels_and_runs_in_the_one_call_layer_as_op_by_op(tmp_path, monkeypatch):
    from engine_helpers import greedy_equals_hf, one_call_matches_op_by_op
    from exitwise.models.backbone import Backbone

    path = tmp_path / "q5.gguf"
    q5 = dict.fromkeys(("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down"), "Q5_0")
    write_tiny_gguf(path, "qwen2", {**q5, "attn_v": "Q8_0", "output": "Q8_0"}, tied=False)
    loaded = G.load(path, "auto")
    attn = loaded.model.model.layers[0].self_attn
    assert (attn.q_proj.layout, attn.v_proj.layout, loaded.model.model.layers[1].mlp.down_proj.layout) == (
        "q5", "int8g", "q5")
    bb = Backbone(loaded.model, loaded.tokenizer)
    greedy_equals_hf(bb, [[5, 17, 3, 60], [2, 9]], 8)  # the engine computes what HF does on these weights
    model = one_call_matches_op_by_op(bb, monkeypatch, [[5, 17, 3, 60], [2, 9], [33, 1, 8, 8, 40, 2, 7]])
    assert isinstance(model.layers[0].linears[0], StackedLinear)  # Q5_0 Q|K, Q8_0 V


def test_from_blocks_reads_gguf_s_layout():
    """Column j < 16 is byte j's low nibble, 16 + j its high one; the fifth bit of column j is bit j."""
    raw = np.zeros((1, 22), dtype=np.uint8)
    raw[0, :2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    raw[0, 6] = 0x21  # column 0: 1, column 16: 2
    raw[0, 2:6] = np.array([1 | (1 << 16)], dtype=np.uint32).view(np.uint8)  # fifth bits of columns 0, 16
    lin = Q5Linear.from_blocks(torch.from_numpy(raw))
    w = lin.dequantize()[0]
    assert w[0] == 17 - 16 and w[16] == 18 - 16 and w[1] == -16 and w[17] == -16
    assert torch.equal(w, reference(G.Tensor("w", "Q5_0", 1, 32, raw))[0])
