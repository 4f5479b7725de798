import math

import optuna
import pytest

from autotransfer.errors import ConfigError
from autotransfer.strategy import SearchSpace, Strategy, enqueue_params, suggest_strategy

SPACE = SearchSpace(num_groups=9, max_epochs=6)


def _sample(n=300, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((suggest_strategy(trial, SPACE), trial.params))
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
        assert ("probe_epochs" in params) == s.trains_backbone
        lr_name = f"{'ft_' if s.trains_backbone else ''}lr_{s.optimizer}"
        assert [k for k in params if "lr_" in k and k != "lr_ratio"] == [lr_name]
        assert ("label_smoothing" in params) == (s.head != "svm")
        if not s.trains_backbone:
            assert s.lr_ratio == 1.0 and s.l2sp_alpha == 0.0
    ratios = [s.lr_ratio for s, _ in samples if s.trains_backbone]
    assert min(ratios) < 0.02 and max(ratios) > 0.5, "10x and 100x smaller must be inside the range"
    assert {s.head for s, _ in samples} == {"linear", "svm", "mlp"}
    assert {s.optimizer for s, _ in samples} == {"sgd", "adamw"}
    assert {s.bn for s, _ in samples if s.trains_backbone} == {"train", "frozen"}
    assert any(s.l2sp_alpha > 0 for s, _ in samples) and any(s.probe_epochs for s, _ in samples)


@pytest.mark.parametrize("strategy", [
    Strategy(tap=9, freeze=9, pool="avg", lr=0.05),
    Strategy(tap=6, freeze=4, pool="avgmax", lr=0.005, lr_ratio=0.3, probe_epochs=15, epochs=4, seed=3),
    Strategy(tap=4, freeze=1, head="mlp", mlp_hidden=256, dropout=0.3, lr=0.001, lr_ratio=0.01, optimizer="adamw",
             l2sp_alpha=0.01, bn="train", probe_epochs=15, epochs=3, label_smoothing=0.1),
    Strategy(tap=2, freeze=2, head="svm", lr=0.1),
])
def test_enqueue_params_reproduce_the_strategy(strategy):
    trial = optuna.trial.FixedTrial(enqueue_params(strategy))
    assert suggest_strategy(trial, SpaceWithSeed(strategy.seed)) == strategy


def SpaceWithSeed(seed):  # noqa: N802 - reads like a constructor
    return SearchSpace(num_groups=9, max_epochs=6, seed=seed)


@pytest.mark.parametrize("kwargs, field", [
    (dict(tap=3, freeze=4), "freeze"), (dict(tap=0, freeze=0), "tap"), (dict(tap=2, freeze=2, head="knn"), "head"),
    (dict(tap=2, freeze=1, lr_ratio=2.0), "lr_ratio"), (dict(tap=2, freeze=2, head="mlp"), "mlp_hidden"),
    (dict(tap=2, freeze=2, lr=math.nan), "lr"), (dict(tap=2, freeze=1, epochs=0), "epochs"),
])
def test_invalid_strategies_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Strategy(**kwargs)


def test_strategy_round_trips_through_a_dict():
    s = Strategy(tap=3, freeze=1, head="mlp", mlp_hidden=128, lr_ratio=0.1, epochs=4)
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
    assert all(s.epochs <= space.max_epochs for s in strategies if s.trains_backbone)
