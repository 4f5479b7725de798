"""The tie-break score: scale-free, ordered by how clearly images are classified, alive with two classes."""

import torch

from autotransfer.calibration import validation_margin


def test_the_margin_ignores_the_logit_scale_and_ranks_clear_above_borderline():
    labels = torch.tensor([0, 1, 2, 0])
    clear = torch.tensor([[4.0, 0, 0], [0, 4, 0], [0, 0, 4], [4, 0, 0]])
    borderline = torch.tensor([[4.0, 0, 0], [0, 4, 0], [0, 0, 4], [1.1, 1.0, 0]])  # still right, barely
    assert abs(validation_margin(clear, labels) - validation_margin(10 * clear, labels)) < 1e-5
    assert validation_margin(clear, labels) > validation_margin(borderline, labels) > 0
    wrong = clear.clone()
    wrong[3] = torch.tensor([0.0, 4, 0])
    assert validation_margin(wrong, labels) < validation_margin(borderline, labels)


def test_two_classes_do_not_make_the_margin_a_constant():
    labels = torch.tensor([0, 1, 0, 1])
    even = torch.tensor([[2.0, -2], [-2, 2], [2, -2], [-2, 2]])
    uneven = torch.tensor([[3.9, -3.9], [-0.1, 0.1], [2, -2], [-2, 2]])  # all right, one barely
    assert validation_margin(even, labels) > validation_margin(uneven, labels) > 0
