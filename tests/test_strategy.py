import math

import optuna
import pytest

from autotransfer.errors import ConfigError
from autotransfer.strategy import SearchSpace, Strategy, default_strategies, enqueue_params, suggest_strategy

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
        assert ("warmup_epochs" in params) == s.trains_backbone
        assert ("label_smoothing" in params) == (s.head != "svm")
        if not s.trains_backbone:
            assert s.lr_ratio == 1.0 and s.l2sp_alpha == 0.0
    ratios = [s.lr_ratio for s, _ in samples if s.trains_backbone]
    assert min(ratios) < 0.02 and max(ratios) > 0.5, "10x and 100x smaller must be inside the range"
    assert {s.head for s, _ in samples} == {"linear", "svm", "mlp"}
    assert {s.optimizer for s, _ in samples} == {"sgd", "adamw"}
    assert {s.bn for s, _ in samples if s.trains_backbone} == {"train", "frozen"}
    assert any(s.l2sp_alpha > 0 for s, _ in samples) and any(s.warmup_epochs > 0 for s, _ in samples)


@pytest.mark.parametrize("strategy", default_strategies(SPACE) + [
    Strategy(tap=4, freeze=1, head="mlp", mlp_hidden=256, dropout=0.3, lr=0.001, lr_ratio=0.01, optimizer="adamw",
             l2sp_alpha=0.01, bn="train", warmup_epochs=1, epochs=3, label_smoothing=0.1),
    Strategy(tap=2, freeze=2, head="svm", lr=0.1),
])
def test_enqueue_params_reproduce_the_strategy(strategy):
    trial = optuna.trial.FixedTrial(enqueue_params(strategy))
    assert suggest_strategy(trial, SpaceWithSeed(strategy.seed)) == strategy


def SpaceWithSeed(seed):  # noqa: N802 - reads like a constructor
    return SearchSpace(num_groups=9, max_epochs=6, seed=seed)


def test_default_strategies_start_with_the_classic_feature_extractor():
    first, *_ = default_strategies(SPACE)
    assert first.tap == first.freeze == 9 and first.head == "linear"
    assert all(s.tap <= 9 for s in default_strategies(SPACE))


@pytest.mark.parametrize("kwargs, field", [
    (dict(tap=3, freeze=4), "freeze"), (dict(tap=0, freeze=0), "tap"), (dict(tap=2, freeze=2, head="knn"), "head"),
    (dict(tap=2, freeze=1, lr_ratio=2.0), "lr_ratio"), (dict(tap=2, freeze=2, head="mlp"), "mlp_hidden"),
    (dict(tap=2, freeze=2, lr=math.nan), "lr"), (dict(tap=2, freeze=1, epochs=2, warmup_epochs=2), "warmup_epochs"),
])
def test_invalid_strategies_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Strategy(**kwargs)


def test_strategy_round_trips_through_a_dict():
    s = Strategy(tap=3, freeze=1, head="mlp", mlp_hidden=128, lr_ratio=0.1, epochs=4)
    assert Strategy.from_dict({**s.to_dict(), "unknown_key": 1}) == s
