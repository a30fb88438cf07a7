"""exitwise finetune on the tiny random Llama: exits learn, the final layer stays, resume, output dir."""

from __future__ import annotations

import json

import pytest
import torch

from exitwise.cli import main
from exitwise.models.loading import load_model
from exitwise.training.finetune import FinetuneConfig, finetune
from exitwise.training.manifest import MANIFEST, read_manifest
from server_helpers import load_tokenizer, tiny_backbone

EXITS = [1, 2]


def _slice(src, dst, start: int, n: int) -> None:
    text = src.read_text(encoding="utf-8")
    dst.write_text(text[start:start + n], encoding="utf-8")


@pytest.fixture(scope="module")
def files(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    train, test = d / "train.txt", d / "test.txt"
    _slice(data_dir / "text" / "train.txt", train, 500_000, 60_000)  # not the head of the file
    _slice(data_dir / "text" / "test.txt", test, 200_000, 8_000)
    return d, train, test


def _agreement_and_kl(bb, ref, ids: torch.Tensor) -> tuple[list[float], float]:
    """Per exit layer top-1 agreement with the original's final layer, and the final layer's KL to it."""
    with torch.inference_mode():
        target = ref.logits(ids)
        agree = [float((bb.logits(ids, stop=x).argmax(-1) == target.argmax(-1)).float().mean()) for x in EXITS]
        p = torch.log_softmax(target.flatten(0, 1), -1)
        q = torch.log_softmax(bb.logits(ids).flatten(0, 1), -1)
        kl = float(torch.nn.functional.kl_div(q, p, reduction="batchmean", log_target=True))
    return agree, kl


def _cfg(steps: int) -> FinetuneConfig:
    return FinetuneConfig(exit_layers=EXITS, lr=3e-3, max_steps=steps, warmup_steps=2, micro_batch=4,
                          grad_accum=1, seq_len=64, save_every=5, progress=False)


def test_finetune_end_to_end(files, capsys):
    d, train, test = files
    tok = load_tokenizer()
    ref = tiny_backbone(tok)  # the original, untouched
    ids = torch.tensor(tok(test.read_text())["input_ids"][:512]).view(4, 128)
    before, _ = _agreement_and_kl(ref, ref, ids)

    out = d / "model"
    first = finetune(tiny_backbone(tok), [train], out, _cfg(10))  # the "interrupted" run: 10 of 40 steps
    assert first["steps"] == 10 and (out / "checkpoint" / "state.json").is_file()
    m = finetune(tiny_backbone(tok), [train], out, _cfg(40), resume=True)
    losses = json.loads((out / "losses.json").read_text())
    assert [row["step"] for row in losses] == list(range(1, 41))  # continued from step 10, not restarted
    assert m["steps"] == 40 and m["tokens"] == 40 * 4 * 64

    tuned = load_model(str(out))
    after, kl = _agreement_and_kl(tuned, ref, ids)
    # a random 4-layer model's layer 1 is barely trainable in 40 steps: the exits' mean must rise
    assert sum(after) / len(after) > sum(before) / len(before) + 0.02, f"agreement {before} -> {after}"
    assert kl < 0.5, f"final-layer KL to the original {kl:.3f}"

    manifest = read_manifest(out)
    assert manifest["exit_layers"] == EXITS and manifest["base_model"] == "tiny"
    assert manifest["data"]["files"][0]["name"] == "train.txt" and (out / MANIFEST).is_file()

    # speculative generate picks its draft layers from the manifest and equals plain greedy generate
    args = ["generate", "--model", str(out), "--prompt", "The game was", "--max-tokens", "24", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--speculative"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["token_ids"] == plain["token_ids"]
    assert "[speculative:" in captured.err


def _tiny_cfg(**kw) -> FinetuneConfig:
    base = dict(exit_layers=EXITS, lr=3e-3, max_steps=3, warmup_steps=1, micro_batch=2, grad_accum=1, seq_len=16,
                save_every=0, progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_lora_merges_on_save(files, tmp_path):
    pytest.importorskip("peft")
    from safetensors import safe_open

    _, train, test = files
    tok = load_tokenizer()
    out = tmp_path / "lora"
    m = finetune(tiny_backbone(tok), [train], out, _tiny_cfg(lora_rank=4))
    assert m["config"]["lora_rank"] == 4 and m["config"]["lr"] == 3e-3
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora" in k], "LoRA weights must be merged into a plain model"
    tuned, ref = load_model(str(out)), tiny_backbone(tok)
    ids = torch.tensor([tok(test.read_text())["input_ids"][:32]])
    with torch.inference_mode():
        assert not torch.allclose(tuned.logits(ids), ref.logits(ids), atol=1e-4), "LoRA training changed nothing"
    # only the adapted linear layers moved; the frozen embeddings did not
    assert torch.equal(tuned.model.get_input_embeddings().weight, ref.model.get_input_embeddings().weight)


def test_self_generate_is_seeded_and_trained_on(files, tmp_path, monkeypatch):
    import exitwise.training.finetune as ft

    _, train, _ = files
    tok = load_tokenizer()
    small = tmp_path / "small.txt"
    small.write_text(train.read_text()[:400])  # a handful of 16-token chunks, so every row gets drawn
    teacher = tiny_backbone(tok)
    data = ft.corpus(teacher, [small], 16)
    gen = ft.self_generated(teacher, data, 4, seed=0)
    assert gen.shape == (4, 16)
    assert torch.equal(gen, ft.self_generated(teacher, data, 4, seed=0)), "not deterministic by seed"
    assert not torch.equal(gen, ft.self_generated(teacher, data, 4, seed=1))
    assert all(any(torch.equal(g[:8], d[:8]) for d in data) for g in gen), "prompts come from the corpus"

    seen: list[torch.Tensor] = []
    real = ft.micro_step

    def recording(bb, teacher, ids, *a, **kw):
        seen.extend(ids.cpu())
        return real(bb, teacher, ids, *a, **kw)

    monkeypatch.setattr(ft, "micro_step", recording)
    rows = data.shape[0] + 4
    m = finetune(tiny_backbone(tok), [small], tmp_path / "sg", _tiny_cfg(self_generate=4, micro_batch=rows,
                                                                         max_steps=1))
    assert m["data"]["self_generated"] == 4 and m["data"]["sequences"] == data.shape[0]
    assert all(any(torch.equal(g, s) for s in seen) for g in gen), "the sampled sequences were not trained on"
