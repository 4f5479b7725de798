import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from autotransfer.errors import ConfigError
from autotransfer.metrics import (
    balanced_class_weights,
    choose_metric,
    confusion,
    imbalance_ratio,
    per_class_recall,
    score,
)


def test_metrics_on_hand_made_predictions():
    # 8 images of class 0, 2 of class 1; the model always answers 0
    y = [0] * 8 + [1] * 2
    p = [0] * 10
    assert score("accuracy", p, y, 2) == pytest.approx(0.8)
    assert score("balanced_accuracy", p, y, 2) == pytest.approx(0.5), "recall 1.0 and 0.0, averaged"
    assert score("macro_f1", p, y, 2) == pytest.approx((2 * 8 / (8 + 10) + 0.0) / 2)
    assert per_class_recall(p, y, 2) == [1.0, 0.0]
    # one of the two rare images found: accuracy barely moves, balanced accuracy jumps
    p2 = [0] * 9 + [1]
    assert score("accuracy", p2, y, 2) == pytest.approx(0.9)
    assert score("balanced_accuracy", p2, y, 2) == pytest.approx(0.75)
    assert confusion(p2, y, 2).tolist() == [[8, 0], [1, 1]]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_agree_with_scikit_learn_with_absent_classes():
    rng = np.random.default_rng(0)
    y = rng.choice(7, size=400, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0])  # class 6 never true
    p = np.where(rng.random(400) < 0.6, y, rng.integers(0, 7, 400))  # and sometimes predicted
    assert score("balanced_accuracy", p, y, 7) == pytest.approx(balanced_accuracy_score(y, p))
    assert score("macro_f1", p, y, 7) == pytest.approx(f1_score(y, p, average="macro"))
    recall = per_class_recall(torch.as_tensor(p), torch.as_tensor(y), 7)
    assert recall[:6] == pytest.approx(list(recall_score(y, p, average=None, labels=range(6))))
    assert recall[6] is None, "a class without a true example has no recall"


def test_default_metric_switches_above_three_times_imbalance():
    at_three = [0] * 9 + [1] * 3
    above = [0] * 10 + [1] * 3
    assert imbalance_ratio(at_three, 2) == 3.0
    assert choose_metric(None, None, at_three, 2)[0] == "accuracy"
    assert choose_metric(None, None, above, 2)[0] == "balanced_accuracy"
    assert "3.3x" in choose_metric(None, None, above, 2)[1]
    assert choose_metric("macro_f1", None, above, 2) == ("macro_f1", "--metric")


def test_a_study_keeps_its_metric():
    balanced = [0] * 5 + [1] * 5
    assert choose_metric(None, "macro_f1", balanced, 2)[0] == "macro_f1"
    assert choose_metric("macro_f1", "macro_f1", balanced, 2)[0] == "macro_f1"
    with pytest.raises(ConfigError, match="--metric accuracy differs from this study's metric 'macro_f1'"):
        choose_metric("accuracy", "macro_f1", balanced, 2)
    # a study with trials but no stored metric predates --metric: its values are accuracies
    assert choose_metric(None, None, [0] * 20 + [1] * 2, 2, has_trials=True)[0] == "accuracy"
    with pytest.raises(ConfigError, match="Unknown metric 'bogus'"):
        choose_metric("bogus", None, balanced, 2)


def test_balanced_class_weights_equalise_the_classes():
    y = torch.tensor([0] * 6 + [1] * 2 + [2] * 4)
    w = balanced_class_weights(y, 3)
    assert w.tolist() == pytest.approx([12 / 18, 12 / 6, 12 / 12])
    totals = torch.bincount(y, minlength=3).float() * w
    assert torch.allclose(totals, torch.full((3,), 4.0)), "each class carries the same total weight"
