import numpy as np

from exitwise.raee.calibration import ExitSpace, allowed_layers, corrected_probs, exit_space, layer_log_bias


def _probs():
    # 4 examples, 3 layers (0..2), 2 classes. Layer 1 always prefers class 0 but less so for class-1
    # examples; layer 2 is right; layer 0 is uninformative.
    labels = np.array([0, 0, 1, 1])
    p = np.zeros((4, 3, 2), dtype=np.float32)
    p[:, 0] = [0.5, 0.5]
    p[:, 1] = [[0.95, 0.05], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4]]
    p[:, 2] = [[0.8, 0.2], [0.7, 0.3], [0.3, 0.7], [0.2, 0.8]]
    return p, labels


def test_calibration_removes_a_layer_prior():
    p, labels = _probs()
    raw_acc = (p[:, 1].argmax(-1) == labels).mean()
    q = corrected_probs(p, layer_log_bias(p))
    assert raw_acc == 0.5  # always class 0
    assert (q[:, 1].argmax(-1) == labels).all()  # after dividing out the prior it separates the classes
    assert np.allclose(q.sum(-1), 1.0, atol=1e-6)


def test_allowed_layers_tolerance():
    p, labels = _probs()
    assert allowed_layers(p, labels, None).all()
    assert allowed_layers(p, labels, 0.1).tolist() == [False, False, True]
    assert allowed_layers(p, labels, 0.5).tolist() == [True, True, True]


def test_exit_space_tables():
    p, labels = _probs()
    table, bias, allowed = exit_space(p, labels, ExitSpace())
    assert bias is None and allowed.all()
    # Faithful table: layer 1 counts as correct for the class-0 examples only.
    assert table.entries(0)[0].tolist() == [0, 1, 2] and table.entries(2)[0].tolist() == [2]
    table, bias, allowed = exit_space(p, labels, ExitSpace(calibrate=True, tolerance=0.0))
    assert bias.shape == (3, 2)
    assert allowed.tolist() == [False, True, True]
    assert all(0 not in table.entries(i)[0].tolist() for i in range(4))  # disallowed layer never enters
    assert table.entries(2)[0].tolist() == [1, 2]
