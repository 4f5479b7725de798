"""The tie-break score: scale-free, ordered by how clearly images are classified, alive with two classes."""

import torch

from autotransfer.calibration import validation_margin


def margin(logits, labels):
    return validation_margin(logits, labels).mean


def test_the_margin_ignores_the_logit_scale_and_ranks_clear_above_borderline():
    labels = torch.tensor([0, 1, 2, 0])
    clear = torch.tensor([[4.0, 0, 0], [0, 4, 0], [0, 0, 4], [4, 0, 0]])
    borderline = torch.tensor([[4.0, 0, 0], [0, 4, 0], [0, 0, 4], [1.1, 1.0, 0]])  # still right, barely
    assert abs(margin(clear, labels) - margin(10 * clear, labels)) < 1e-5
    assert margin(clear, labels) > margin(borderline, labels) > 0
    wrong = clear.clone()
    wrong[3] = torch.tensor([0.0, 4, 0])
    assert margin(wrong, labels) < margin(borderline, labels)


def test_two_classes_do_not_make_the_margin_a_constant():
    labels = torch.tensor([0, 1, 0, 1])
    even = torch.tensor([[2.0, -2], [-2, 2], [2, -2], [-2, 2]])
    uneven = torch.tensor([[3.9, -3.9], [-0.1, 0.1], [2, -2], [-2, 2]])  # all right, one barely
    assert margin(even, labels) > margin(uneven, labels) > 0


def test_the_standard_error_shrinks_with_agreeing_images_and_is_zero_when_all_agree():
    labels = torch.tensor([0, 1, 0, 1])
    assert validation_margin(torch.tensor([[2.0, -2], [-2, 2], [2, -2], [-2, 2]]), labels).se < 1e-6
    uneven = validation_margin(torch.tensor([[3.9, -3.9], [-0.1, 0.1], [2, -2], [-2, 2]]), labels)
    assert uneven.se > 0.1
