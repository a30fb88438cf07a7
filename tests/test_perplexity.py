"""Engine perplexity: the engine's float32 forward scores text as the Hugging Face model does, low
precision weights stay close, bad arguments are refused, and the engine serves as before afterwards."""

import math

import pytest
import torch

from exitwise.analysis.perplexity import perplexity, score_windows, text_tokens, top1_agreement
from exitwise.engine import LLMEngine, SamplingParams


def test_windows_score_every_position_once_hf_style():
    spans = score_windows(10, window=4, stride=2)
    assert spans == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, 10))  # each position after the first exactly once, with context
    # non-overlapping: a window's first token is not scored; a 1-token tail window scores nothing
    assert score_windows(9, window=4, stride=4) == [(0, 4, 1), (4, 8, 5)]


@pytest.fixture(scope="module")
def ids(smollm, data_dir):
    return text_tokens(smollm.tokenizer, data_dir / "text" / "test.txt", 300, seed=0)


@pytest.fixture(scope="module")
def engines(smollm):
    return {d: LLMEngine(smollm, num_kv_blocks=64, weight_dtype=d) for d in ("float32", "bfloat16", "int8", "int4")}


def hf_nll_sum(bb, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Hugging Face's strided-perplexity loop: (summed NLL, tokens scored) from the model's own loss."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-(end - prev_end)] = -100  # only tokens no earlier window scored
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += bb.model(x, labels=labels).loss.item() * n  # the loss is a mean over the n targets
        count += n
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.real_model
def test_text_tokens_is_a_seeded_span_of_the_whole_file(smollm, data_dir):
    path = data_dir / "text" / "test.txt"
    whole = text_tokens(smollm.tokenizer, path)
    a, b = text_tokens(smollm.tokenizer, path, 200, seed=0), text_tokens(smollm.tokenizer, path, 200, seed=1)
    assert len(whole) > 100_000 and len(a) == len(b) == 200
    assert a == text_tokens(smollm.tokenizer, path, 200, seed=0) and a != b
    start = next(i for i in range(len(whole)) if whole[i:i + 200] == a)
    assert start > 0  # not simply the head of the file (seed 0 draws elsewhere)


@pytest.mark.real_model
def test_float32_matches_hugging_face_in_one_window(smollm, engines, ids):
    res = perplexity(engines["float32"], ids, window=len(ids))
    x = torch.tensor([ids])
    with torch.no_grad():
        want = smollm.model(x, labels=x).loss.exp().item()
    assert (res.tokens, res.windows) == (len(ids) - 1, 1)
    assert res.perplexity == pytest.approx(want, rel=1e-4)
    assert res.nll == pytest.approx(math.log(want), rel=1e-4)


@pytest.mark.real_model
@pytest.mark.parametrize("window,stride", [(128, None), (128, 64), (100, 30)])
def test_float32_matches_hugging_face_windowed(smollm, engines, ids, window, stride):
    res = perplexity(engines["float32"], ids, window=window, stride=stride)
    total, count = hf_nll_sum(smollm, ids, window, stride or window)
    assert res.tokens == count
    assert res.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)


@pytest.mark.real_model
def test_overlap_gives_context_and_scores_more_tokens(engines, ids):
    plain = perplexity(engines["float32"], ids, window=64)
    strided = perplexity(engines["float32"], ids, window=64, stride=16)
    assert plain.windows == 5 and plain.tokens == len(ids) - 5
    assert strided.tokens == len(ids) - 1 and strided.windows > plain.windows
    assert strided.perplexity < plain.perplexity  # >= 48 tokens of context for every scored token


@pytest.mark.real_model
@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_low_precision_perplexity_is_close_to_float32(engines, ids, dtype):
    ref = perplexity(engines["float32"], ids, window=150, keep_predictions=True)
    low = perplexity(engines[dtype], ids, window=150, keep_predictions=True)
    assert len(low.predictions) == low.tokens
    assert 0.9 <= top1_agreement(low, ref) < 1.0 and top1_agreement(ref, ref) == 1.0
    assert engines[dtype].runner.model.weight_dtype == dtype
    assert math.isfinite(low.perplexity) and low.tokens == ref.tokens
    assert low.perplexity == pytest.approx(ref.perplexity, rel=0.05)
    assert low.nll != ref.nll  # another computation, not float32 again


@pytest.mark.real_model
@pytest.mark.parametrize("kwargs,name", [({"window": 1}, "window"), ({"window": 0}, "window"),
                                         ({"window": 10_000}, "window"), ({"stride": 0}, "stride"),
                                         ({"window": 8, "stride": 9}, "stride"),
                                         ({"token_ids": []}, "token_ids"), ({"token_ids": [5]}, "token_ids"),
                                         ({"token_ids": [5, 10**9]}, "token_ids")])
def test_bad_arguments_are_refused_by_name(engines, ids, kwargs, name):
    args = {"token_ids": ids, "window": 64} | kwargs
    with pytest.raises(ValueError, match=name):
        perplexity(engines["float32"], **args)


@pytest.mark.real_model
def test_engine_generates_as_before_after_perplexity(smollm, ids):
    prompts = [ids[:40], ids[100:130]]
    params = SamplingParams(max_tokens=10, ignore_eos=True)

    def generate(eng):
        rids = [eng.add_request(p, params) for p in prompts]
        done = {}
        while eng.has_unfinished():
            done |= {o.request_id: o.token_ids for o in eng.step() if o.finished}
        return [done[r] for r in rids]

    want = generate(LLMEngine(smollm, num_kv_blocks=40))
    eng = LLMEngine(smollm, num_kv_blocks=40)  # 40 blocks: a 300-token window takes 19 of them
    assert generate(eng) == want  # leaves its prompts' blocks in the prefix cache
    first = perplexity(eng, ids, window=len(ids))
    assert eng.num_free_blocks == eng.cache.num_blocks
    assert generate(eng) == want
    # mid-flight: between two steps of running requests, on the blocks they do not hold
    rids = [eng.add_request(p, params) for p in prompts]
    eng.step()  # prefill
    eng.step()
    held = eng.num_free_blocks
    again = perplexity(eng, ids, window=200)
    assert eng.num_free_blocks == held
    done = {}
    while eng.has_unfinished():
        done |= {o.request_id: o.token_ids for o in eng.step() if o.finished}
    assert [done[r] for r in rids] == want
    assert perplexity(eng, ids, window=len(ids)) == first and again.tokens < first.tokens
    assert eng.num_free_blocks == eng.cache.num_blocks
