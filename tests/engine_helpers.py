"""Helpers shared by the engine tests: prompts, Hugging Face greedy references, and the engine's
prefill/decode logits against the HF forward."""

import torch

from exitwise.engine import LLM, SamplingParams
from exitwise.engine.sequence import Sequence
from exitwise.models.backbone import Backbone

PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], list(range(10, 40)), [42] * 9, [7, 3, 88, 21, 60, 2, 19]]


def hf_greedy(bb: Backbone, prompt: list[int], n: int) -> list[int]:
    out = bb.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_last_logits(bb: Backbone, tokens: list[int]) -> torch.Tensor:
    """(V,) HF logits at the last of ``tokens`` (one unpadded sequence, no cache)."""
    return bb.model(torch.tensor([tokens])).logits[0, -1].float()


@torch.inference_mode()
def engine_logits_vs_hf(bb: Backbone, prompts: list[list[int]], steps: int, **engine_kw) -> float:
    """Prefill ``prompts`` as one batch on the engine's runner, then ``steps`` batched greedy decode
    steps; returns the largest |engine - HF| logit difference over every step and row (HF: a fresh
    forward over each sequence so far)."""
    eng = LLM(bb, num_kv_blocks=256, block_size=4, **engine_kw).engine
    seqs = [Sequence(f"r{i}", list(p), SamplingParams(max_tokens=steps + 1)) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.blocks.allocate(s)
    worst = 0.0
    logits = eng.runner.prefill(seqs)
    for step in range(steps + 1):
        for s, lg in zip(seqs, logits, strict=True):
            worst = max(worst, float((lg.float() - hf_last_logits(bb, s.token_ids)).abs().max()))
        if step == steps:
            break
        for s, lg in zip(seqs, logits, strict=True):
            s.token_ids.append(int(lg.argmax()))
            eng.blocks.append_slot(s)
        logits = eng.runner.decode(seqs)[0]
    return worst


def greedy_equals_hf(bb: Backbone, prompts: list[list[int]], n: int, **engine_kw) -> None:
    """The engine's batched greedy tokens equal HF ``generate`` for each prompt alone."""
    llm = LLM(bb, num_kv_blocks=128, block_size=4, **engine_kw)
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(bb, p, n) for p in prompts]


def always_exit_run(bb, kv_fill: str, prompt: list[int], n: int, exit_layers=(1, 2)):
    """``n`` engine steps of one request where every decode step exits at ``exit_layers[1]``
    (hidden_similarity with an always-met threshold): (engine, its sequence, the last output)."""
    llm = LLM(bb, exit="hidden_similarity", exit_layers=list(exit_layers), exit_threshold=-0.5, kv_fill=kv_fill,
              num_kv_blocks=64, block_size=4)
    eng = llm.engine
    rid = eng.add_request(prompt, SamplingParams(max_tokens=n + 1, ignore_eos=True, return_exit_layers=True))
    out = None
    for _ in range(n):
        out = eng.step()[0]
    return eng, eng.seqs[rid], out


def one_call_matches_op_by_op(bb: Backbone, monkeypatch, prompts: list[list[int]], n: int = 8):
    """Every layer runs in the kernels' one-call layer (asserted), and its greedy tokens equal those of the
    layers op by op: batched, with speculative verification passes (several rows), and the last prompt
    alone. Returns the one-call engine's model (models/llama.py LlamaDecoder)."""
    from exitwise.models.llama import LlamaDecoder

    params = SamplingParams(max_tokens=n, ignore_eos=True)

    def run():
        llm = LLM(bb, kv_cache_bytes=1 << 20, speculative=True, draft="lookup")
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        return llm.engine.runner.model, outs, llm.generate([prompts[-1]], params)[0].token_ids

    model, fused, fused_alone = run()
    assert sum(p is not None for p in model._plans) == bb.num_layers
    monkeypatch.setattr(LlamaDecoder, "_one_call", lambda self, i, x: None)
    _, op_by_op, op_alone = run()
    assert fused == op_by_op and fused_alone == op_alone == fused[-1]
    return model
