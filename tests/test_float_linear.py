"""models/float_linear.py: float weights behind QuantizedLinear's call interface. The engine's float32
layers and the Hugging Face modules hold one copy of the weights, the HF forward is unchanged bit for
bit, and a single row is ``F.linear``'s result whatever the packing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exitwise.engine import LLM, SamplingParams
from exitwise.models.float_linear import FloatLinear, onednn_ok
from exitwise.models.quantize import QuantizedLinear
from tiny_models import qwen2, tiny_llama


def _storages(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _engine_tensors(decoder):
    return [t for lw in decoder.layers for lin in lw.linears for t in (lin.weight, lin.bias)]


def test_cat_stacks_rows_and_fills_missing_biases():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4, bias=False), nn.Linear(8, 6)
    f = FloatLinear.cat([a, b])
    assert f.out_features == 10 and f.in_features == 8
    assert torch.equal(f.weight, torch.cat([a.weight, b.weight]))
    assert torch.equal(f.bias[:4], torch.zeros(4)) and torch.equal(f.bias[4:], b.bias)
    x = torch.randn(1, 8)
    assert torch.equal(f(x), F.linear(x, f.weight, f.bias))


def test_view_into_makes_one_copy_and_keeps_values_and_grad_flags():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 6)
    b.weight.requires_grad_(False)
    want = [p.detach().clone() for p in (a.weight, a.bias, b.weight, b.bias)]
    f = FloatLinear.cat([a, b])
    f.view_into([a, b])
    assert a.weight.data_ptr() == f.weight.data_ptr() and b.weight.data_ptr() == f.weight[4:].data_ptr()
    assert b.bias.data_ptr() == f.bias[4:].data_ptr()
    assert all(torch.equal(p, w) for p, w in zip((a.weight, a.bias, b.weight, b.bias), want, strict=True))
    assert a.weight.requires_grad and not b.weight.requires_grad
    with torch.no_grad():
        a.weight[0, 0] = 5.0  # an update through the module is the engine's too
    assert f.weight[0, 0] == 5.0


@pytest.mark.skipif(not onednn_ok("cpu", torch.float32), reason="needs oneDNN's packed float32 linear")
def test_one_row_is_f_linear_and_many_rows_run_the_packed_copy():
    torch.manual_seed(0)
    f = FloatLinear(torch.randn(48, 32), torch.randn(48))
    f.add_batch_copy()
    assert f.packed is not None
    x = torch.randn(5, 32)
    assert torch.equal(f(x[:1]), F.linear(x[:1], f.weight, f.bias))
    torch.testing.assert_close(f(x), F.linear(x, f.weight, f.bias), atol=1e-5, rtol=1e-5)
    head = f.first_rows(16)
    assert head.weight.data_ptr() == f.weight.data_ptr() and torch.equal(head(x[:1]), f(x[:1])[:, :16])


@pytest.mark.parametrize("make", [tiny_llama, qwen2], ids=["llama", "qwen2"])
def test_float32_engine_holds_the_layer_weights_once(make):
    bb = make()
    hf = [p for p in bb.model.model.layers.parameters()]
    before = _storages(hf)
    llm = LLM(bb, num_kv_blocks=8, block_size=4)
    dec = llm.engine.runner.model
    assert all(isinstance(lin, FloatLinear) for lw in dec.layers for lin in lw.linears)
    layer_params = list(bb.model.model.layers.parameters())
    # HF parameters and the engine's linears together: the bytes of the HF layers before, no more
    assert _storages(layer_params + _engine_tensors(dec)) == before
    attn = bb.model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == dec.layers[0].linears[0].weight[attn.q_proj.out_features:].data_ptr()


def test_float32_hf_forward_is_unchanged_by_the_engine():
    bb = qwen2()
    ids = torch.tensor([[5, 17, 3, 60, 2, 9, 33]])
    with torch.no_grad():
        before = bb.model(ids).logits
    llm = LLM(bb, num_kv_blocks=8, block_size=4)
    with torch.no_grad():
        assert torch.equal(bb.model(ids).logits, before)
    greedy = bb.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert llm.generate([ids[0].tolist()], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids == greedy


def test_low_bit_layers_of_a_float_model_are_quantised_beside_it():
    bb = tiny_llama()
    q = bb.model.model.layers[0].self_attn.q_proj
    w = q.weight.detach().clone()
    dec = LLM(bb, num_kv_blocks=8, block_size=4, weight_dtype="int8").engine.runner.model
    assert all(isinstance(lin, QuantizedLinear) and lin.weight_dtype == "int8"
               for lw in dec.layers for lin in lw.linears)
    assert isinstance(q, nn.Linear) and torch.equal(q.weight, w)  # the float model is left as it was
