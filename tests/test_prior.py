import math

import numpy as np
import pytest

from autotransfer.cli import main
from autotransfer.prior import GroupScore, build_prior, logme, ridge_probe


def _naive_evidence(f, y, alpha, beta):
    """Bayesian linear regression evidence straight from its definition (matrix inverse, no SVD)."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - beta / 2 * np.sum((f @ m - y) ** 2)
            - alpha / 2 * m @ m - np.linalg.slogdet(a)[1] / 2 - n / 2 * math.log(2 * math.pi)) / n


def test_logme_is_the_maximised_evidence_of_each_class():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(60, 5))
    labels = (f[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int)
    grid = np.logspace(-3, 3, 121)
    best = [max(_naive_evidence(f, (labels == c).astype(float), a, b) for a in grid for b in grid) for c in (0, 1)]
    assert logme(f, labels, 2) >= np.mean(best) - 1e-3, "the fixed point is at least as good as a fine grid"
    assert logme(f, labels, 2) <= np.mean(best) + 5e-3


def test_logme_and_probe_rank_informative_features_above_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=400)
    informative = np.eye(4)[labels] * 3 + rng.normal(size=(400, 4))
    noise = rng.normal(size=(400, 4))
    assert logme(informative, labels, 4) > logme(noise, labels, 4) + 0.1
    tr, va = slice(0, 300), slice(300, 400)
    assert ridge_probe(informative[tr], labels[tr], informative[va], labels[va], 4) > 0.9
    assert ridge_probe(noise[tr], labels[tr], noise[va], labels[va], 4) < 0.45


def test_prior_places_the_data_and_enqueues_its_recommendation_first(tiny_cache):
    prior = build_prior(tiny_cache, max_steps=30)
    assert prior.size == "small" and prior.images_per_class < 1000
    best = max(prior.scores, key=lambda s: s.probe_accuracy)
    assert prior.first_strategies[0] == prior.recommended
    assert len(set(prior.first_strategies)) == len(prior.first_strategies)
    low, high = prior.space.tap_range
    assert low <= best.group <= high and prior.space.max_steps == 30
    hand = [s for s in prior.first_strategies if s.freeze == 0 and s.augment == "shift"]
    assert hand and all(s.optimizer == "adamw" and s.bn == "frozen" and s.label_smoothing == 0.1 and not s.flip
                        for s in hand), "the careful hand recipe is always among the first trials"
    assert all(s.steps == 30 for s in prior.first_strategies if s.trains_backbone)
    assert all(0 < s.probe_accuracy <= 1 for s in prior.scores)


def test_recommend_prints_the_quadrant_and_the_first_trials(tmp_path, capsys):
    from tests.conftest import TINY

    assert main(["recommend", "--backbone", TINY, "--image-size", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "quadrant: small & " in out and "recommended: " in out and "the search tries first:" in out
    assert "probe_val_acc" in out and "logme" in out
    assert list((tmp_path / "cache").iterdir()), "the forward pass is kept for the search that follows"


@pytest.mark.parametrize("final, size, similarity, recommended", [
    (0.895, "small", "similar", (3, 3)),  # within a point of the best group: linear on the final features
    (0.85, "small", "different", (2, 2)),  # an earlier group is clearly better: linear on that group
])
def test_the_quadrant_follows_the_measured_scores(tiny_cache, monkeypatch, final, size, similarity, recommended):
    scores = [GroupScore(group=1, name="g1", channels=8, logme=-1.0, probe_accuracy=0.5),
              GroupScore(group=2, name="g2", channels=16, logme=-0.5, probe_accuracy=0.9),
              GroupScore(group=3, name="g3", channels=24, logme=-0.6, probe_accuracy=final)]
    monkeypatch.setattr("autotransfer.prior.score_groups", lambda cache: scores)
    prior = build_prior(tiny_cache)
    assert (prior.size, prior.similarity) == (size, similarity)
    assert (prior.recommended.tap, prior.recommended.freeze) == recommended
    assert prior.space.tap_range == (2, 3), "group 1, 40 points below the best probe, is not searched"
