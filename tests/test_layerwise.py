import numpy as np
import pytest
import torch

from exitwise.raee.layerwise import layer_label_probs, predict_at_layers
from tiny_models import tiny_llama

LABELS = [11, 23, 42]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(5, 32)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 97, size=int(n)).tolist() for n in rng.integers(2, 12, size=13)]


def test_layer_probs_shape_and_normalised(tiny, prompts):
    p = layer_label_probs(tiny, prompts, LABELS, batch_size=4)
    assert p.shape == (13, 6, 3)
    assert np.allclose(p.sum(-1), 1.0, atol=1e-5)


def test_batching_does_not_change_results(tiny, prompts):
    a = layer_label_probs(tiny, prompts, LABELS, batch_size=1)
    b = layer_label_probs(tiny, prompts, LABELS, batch_size=8)
    assert np.abs(a - b).max() < 1e-4


def test_shared_prefix_is_exact(tiny, prompts):
    shared = [5, 6, 7, 8, 9, 10]
    with_prefix = [shared + p for p in prompts]
    a = layer_label_probs(tiny, with_prefix, LABELS, batch_size=4, reuse_prefix=False)
    b = layer_label_probs(tiny, with_prefix, LABELS, batch_size=4, reuse_prefix=True)
    assert np.abs(a - b).max() < 1e-4
    layers = np.array([i % 6 for i in range(len(prompts))])
    pa, ca = predict_at_layers(tiny, with_prefix, LABELS, layers, reuse_prefix=False)
    pb, cb = predict_at_layers(tiny, with_prefix, LABELS, layers, reuse_prefix=True)
    assert np.array_equal(pa, pb) and np.allclose(ca, cb, atol=1e-5)


def test_last_layer_equals_model_logits(tiny, prompts):
    p = layer_label_probs(tiny, prompts, LABELS, batch_size=5)
    for i, toks in enumerate(prompts[:4]):
        logits = tiny.model(torch.tensor([toks])).logits[0, -1, LABELS]
        assert np.allclose(p[i, -1], logits.softmax(-1).detach().numpy(), atol=1e-5)


def test_truncated_prediction_matches_layer_readout(tiny, prompts):
    p = layer_label_probs(tiny, prompts, LABELS, batch_size=4)
    layers = np.array([i % 6 for i in range(len(prompts))])
    preds, conf = predict_at_layers(tiny, prompts, LABELS, layers, batch_size=3)
    rows = np.arange(len(prompts))
    assert np.array_equal(preds, p[rows, layers].argmax(-1))
    assert np.allclose(conf, p[rows, layers].max(-1), atol=1e-5)


def test_truncated_forward_really_stops(tiny, prompts):
    """Layers above the exit layer are never called."""
    calls: list[int] = []
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
             for i, layer in enumerate(tiny.layers)]
    try:
        predict_at_layers(tiny, prompts, LABELS, np.full(len(prompts), 2), batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls and max(calls) == 1  # layers 0 and 1 produce hidden state 2


def test_bad_inputs(tiny, prompts):
    with pytest.raises(ValueError, match="exit layers must lie in 0..5"):
        predict_at_layers(tiny, prompts, LABELS, np.full(len(prompts), 6))
    with pytest.raises(ValueError, match="empty after tokenisation"):
        layer_label_probs(tiny, [[1, 2], []], LABELS)
    with pytest.raises(ValueError, match="distinct"):
        layer_label_probs(tiny, prompts, [5, 5])


def test_log_bias_shifts_truncated_predictions(tiny, prompts):
    from exitwise.raee.calibration import corrected_probs, layer_log_bias

    p = layer_label_probs(tiny, prompts, LABELS, batch_size=4)
    bias = layer_log_bias(p)
    layers = np.array([i % 6 for i in range(len(prompts))])
    preds, conf = predict_at_layers(tiny, prompts, LABELS, layers, log_bias=bias)
    q = corrected_probs(p, bias)[np.arange(len(prompts)), layers]
    assert np.array_equal(preds, q.argmax(-1))
    assert np.allclose(conf, q.max(-1), atol=1e-4)
