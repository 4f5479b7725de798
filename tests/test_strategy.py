import math

import optuna
import pytest

from autotransfer.errors import ConfigError
from autotransfer.strategy import SearchSpace, Strategy, enqueue_params, suggest_strategy

SPACE = SearchSpace(num_groups=9, max_steps=120)


def _sample(n=300, seed=0, space=SPACE):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((suggest_strategy(trial, space), trial.params))
        study.tell(trial, 0.0)
    return out


def test_space_is_conditional_and_covers_the_textbook_ranges():
    samples = _sample()
    taps = {s.tap for s, _ in samples}
    assert taps == set(range(1, 10))
    assert all(0 <= s.freeze <= s.tap for s, _ in samples)
    assert any(s.freeze == s.tap for s, _ in samples) and any(s.freeze == 0 for s, _ in samples)
    for s, params in samples:
        assert ("mlp_hidden" in params) == (s.head == "mlp")
        assert ("lr_ratio" in params) == s.trains_backbone
        assert ("augment" in params) == s.trains_backbone and ("flip" in params) == (s.augment != "none")
        assert ("probe_l2" in params) == (not s.trains_backbone), "a head-only fit has only its L2 strength"
        lr_names = [k for k in params if "lr_" in k and k != "lr_ratio"]
        assert lr_names == ([f"ft_lr_{s.optimizer}"] if s.trains_backbone else [])
        assert ("label_smoothing" in params) == (s.head != "svm")
        if not s.trains_backbone:
            assert s.lr_ratio == 1.0 and s.l2sp_alpha == 0.0 and s.steps == 0 and s.augment == "none"
        else:
            assert s.steps == SPACE.max_steps, "every fine-tune runs the ladder's full schedule (the pruner cuts it)"
    ratios = [s.lr_ratio for s, _ in samples if s.trains_backbone]
    assert min(ratios) < 0.02 and max(ratios) > 0.5, "10x and 100x smaller must be inside the range"
    assert {s.head for s, _ in samples} == {"linear", "svm", "mlp"}
    assert {s.optimizer for s, _ in samples} == {"sgd", "adamw"}
    assert {s.bn for s, _ in samples if s.trains_backbone} == {"train", "frozen"}
    assert any(s.l2sp_alpha > 0 for s, _ in samples)
    assert {s.augment for s, _ in samples if s.trains_backbone} == {"none", "shift", "crop", "trivial"}
    assert {s.flip for s, _ in samples if s.augment != "none"} == {True, False}
    assert not any(s.flip for s, _ in samples if s.augment == "none"), "flips only as a choice on top of augmenting"


@pytest.mark.parametrize("strategy", [
    Strategy(tap=9, freeze=9, pool="avg", weight_decay=0.05),
    Strategy(tap=6, freeze=4, pool="avgmax", lr=0.005, lr_ratio=0.3, steps=120, seed=3),
    Strategy(tap=4, freeze=1, head="mlp", mlp_hidden=256, dropout=0.3, lr=0.001, lr_ratio=0.01, optimizer="adamw",
             l2sp_alpha=0.01, bn="train", steps=120, label_smoothing=0.1, augment="trivial", flip=True),
    Strategy(tap=5, freeze=0, lr=0.01, lr_ratio=0.1, augment="shift", steps=120),
    Strategy(tap=2, freeze=2, head="svm", weight_decay=0.3),
])
def test_enqueue_params_reproduce_the_strategy(strategy):
    trial = optuna.trial.FixedTrial(enqueue_params(strategy))
    assert suggest_strategy(trial, SpaceWithSeed(strategy.seed)) == strategy


def SpaceWithSeed(seed):  # noqa: N802 - reads like a constructor
    return SearchSpace(num_groups=9, max_steps=120, seed=seed)


@pytest.mark.parametrize("kwargs, field", [
    (dict(tap=3, freeze=4), "freeze"), (dict(tap=0, freeze=0), "tap"), (dict(tap=2, freeze=2, head="knn"), "head"),
    (dict(tap=2, freeze=1, lr_ratio=2.0), "lr_ratio"), (dict(tap=2, freeze=2, head="mlp"), "mlp_hidden"),
    (dict(tap=2, freeze=2, lr=math.nan), "lr"), (dict(tap=2, freeze=1, steps=0), "steps"),
    (dict(tap=2, freeze=1, steps=10, augment="mixup"), "augment"),
    (dict(tap=2, freeze=2, class_weight="auto"), "class_weight"),
])
def test_invalid_strategies_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Strategy(**kwargs)


def test_strategy_round_trips_through_a_dict():
    s = Strategy(tap=3, freeze=1, head="mlp", mlp_hidden=128, lr_ratio=0.1, steps=40, augment="crop")
    assert Strategy.from_dict({**s.to_dict(), "unknown_key": 1}) == s


def test_a_narrowed_space_keeps_taps_and_fine_tuning_depth_inside_its_bounds():
    space = SearchSpace(num_groups=9, min_tap=4, max_tap=7, max_trainable=2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    strategies = []
    for _ in range(200):
        trial = study.ask()
        strategies.append(suggest_strategy(trial, space))
        study.tell(trial, 0.0)
    assert {s.tap for s in strategies} == {4, 5, 6, 7}
    assert {s.tap - s.freeze for s in strategies} == {0, 1, 2}
    assert all(s.steps == space.max_steps for s in strategies if s.trains_backbone)


def _draw(space, n=120):
    return _sample(n, seed=2, space=space)


def test_class_weight_is_searched_only_on_imbalanced_data():
    balanced = _draw(SearchSpace(num_groups=9, max_steps=120))
    assert all("class_weight" not in params and s.class_weight == "none" for s, params in balanced), \
        "balanced data keeps today's space"
    imbalanced = _draw(SearchSpace(num_groups=9, max_steps=120, imbalanced=True))
    assert all("class_weight" in params for _, params in imbalanced)
    for frozen in (True, False):  # head-only fits and fine-tunes both get the choice
        assert {s.class_weight for s, _ in imbalanced if s.trains_backbone != frozen} == {"none", "balanced"}


@pytest.mark.parametrize("strategy", [Strategy(tap=3, freeze=3, class_weight="balanced"),
                                      Strategy(tap=3, freeze=3), Strategy(tap=4, freeze=1, steps=120,
                                                                          class_weight="balanced")])
def test_enqueue_params_reproduce_class_weights_on_an_imbalanced_space(strategy):
    space = SearchSpace(num_groups=9, max_steps=120, imbalanced=True)
    params = enqueue_params(strategy, space)
    assert params["class_weight"] == strategy.class_weight
    assert suggest_strategy(optuna.trial.FixedTrial(params), space) == strategy
    assert "class_weight" not in enqueue_params(Strategy(tap=3, freeze=3), SearchSpace(num_groups=9))


def test_adapt_is_searched_only_with_unlabelled_images():
    plain = _sample(200, space=SearchSpace(num_groups=9, max_steps=120))
    adapt_names = ("adapt", "pseudo_fraction", "pseudo_rounds", "dann", "dann_weight", "dann_hidden", "dann_schedule",
                   "im", "im_weight")
    assert all(not any(k in p for k in adapt_names) for _, p in plain)
    assert all(s.adapt == "none" and s.dann_weight == 0 and s.im_weight == 0 for s, _ in plain)
    space = SearchSpace(num_groups=9, max_steps=120, unlabeled=True)
    drawn = _sample(300, space=space)
    for frozen in (True, False):
        assert {s.adapt for s, _ in drawn if s.trains_backbone != frozen} == {"none", "adabn", "pseudo_label"}
    assert {s.dann_weight > 0 for s, _ in drawn if s.trains_backbone} == {False, True}
    assert all(s.dann_weight == 0 and "dann" not in p for s, p in drawn if not s.trains_backbone), "fine-tunes only"
    assert {s.im_weight > 0 for s, _ in drawn if s.trains_backbone} == {False, True}
    assert all(s.im_weight == 0 and "im" not in p for s, p in drawn if not s.trains_backbone), "fine-tunes only"
    for s, p in drawn:
        assert ("pseudo_fraction" in p) == (s.adapt == "pseudo_label")
        assert ("dann_weight" in p) == (s.dann_weight > 0)
        assert ("im_weight" in p) == (s.im_weight > 0)
        assert suggest_strategy(optuna.trial.FixedTrial(enqueue_params(s, space)), space) == s
