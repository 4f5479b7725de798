"""The exported model: the chosen strategy refit on train+val, averaged over seeds, shared frozen groups."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from autotransfer.cli import main
from autotransfer.export import cpu_session, export_onnx, verify
from autotransfer.features import TRAIN_AND_VAL, ActivationCache
from autotransfer.model import TransferModel
from autotransfer.preprocess import normalise
from autotransfer.refit import Ensemble, member_count, refit, refit_schedule
from autotransfer.strategy import Strategy
from autotransfer.trainer import train_trial
from tests.conftest import TINY

FINE_TUNE = Strategy(tap=3, freeze=1, head="linear", pool="avgmax", lr=0.005, lr_ratio=0.1, steps=20)


def test_train_and_val_is_the_train_rows_then_the_val_rows(tiny_cache):
    for k in (0, 2):
        both, labels = tiny_cache.split(k, TRAIN_AND_VAL)
        (xt, yt), (xv, yv) = tiny_cache.split(k, "train"), tiny_cache.split(k, "val")
        assert torch.equal(both, torch.cat([xt, xv])) and torch.equal(labels, torch.cat([yt, yv]))
    pooled, _ = tiny_cache.pooled(2, "avg", TRAIN_AND_VAL)
    assert torch.equal(pooled, torch.cat([tiny_cache.pooled(2, "avg", s)[0] for s in ("train", "val")]))


@pytest.mark.parametrize("strategy", [FINE_TUNE, Strategy(tap=2, freeze=2)], ids=["fine-tune", "head"])
def test_a_refit_trains_on_exactly_the_train_and_val_rows(strategy, tiny, digits16):
    refitted = refit(strategy, tiny, ActivationCache(tiny, digits16), members=1).model
    stretched = ActivationCache(tiny, digits16)  # a cache whose "train" is train+val: the same rows, same order
    stretched.slices["train"] = stretched.slices[TRAIN_AND_VAL]
    expected = train_trial(refit_schedule(strategy, ActivationCache(tiny, digits16)), tiny, stretched).model
    searched = train_trial(strategy, tiny, ActivationCache(tiny, digits16)).model
    assert isinstance(refitted, TransferModel)
    for name, value in expected.state_dict().items():
        assert torch.equal(refitted.state_dict()[name], value), name
    assert not torch.equal(refitted.head[-1].weight, searched.head[-1].weight), "more rows, another model"


def test_the_ensemble_averages_probabilities_and_runs_the_frozen_groups_once(tiny, digits16):
    cache = ActivationCache(tiny, digits16)
    members = [train_trial(dataclasses.replace(FINE_TUNE, seed=i), tiny, cache).model for i in range(3)]
    ensemble = Ensemble(members).eval()
    x = normalise(digits16.images[:9], tiny.mean, tiny.std)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        got = ensemble(x)
    torch.testing.assert_close(got.softmax(1), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(9), atol=1e-5, rtol=0)
    assert not torch.equal(members[0].head[-1].weight, members[1].head[-1].weight), "seeds differ"
    trunk = sum(p.numel() for p in members[0].groups[:1].parameters())
    per_member = sum(p.numel() for p in members[0].parameters()) - trunk
    assert sum(p.numel() for p in ensemble.parameters()) == trunk + 3 * per_member


def test_members_of_different_strategies_are_refused(tiny, digits16):
    cache = ActivationCache(tiny, digits16)
    a = train_trial(Strategy(tap=2, freeze=2), tiny, cache).model
    b = train_trial(Strategy(tap=2, freeze=1, steps=2), tiny, cache).model
    with pytest.raises(ValueError, match="share one strategy"):
        Ensemble([a, b])


def test_an_ensemble_exports_to_onnx_with_parity(tiny, digits16, tmp_path):
    model = refit(FINE_TUNE, tiny, ActivationCache(tiny, digits16), members=2).model
    path = export_onnx(model, tmp_path / "m.onnx", image_size=16, metadata={})
    x, y = digits16.subset("test")
    out = verify(model, path, normalise(x, tiny.mean, tiny.std), y)
    assert out["onnx_max_abs_diff"] < 1e-4 and out["top1_agreement"] == 1.0 and out["test_accuracy"] > 0.5
    logits = cpu_session(path).run(["logits"], {"input": normalise(x[:4], tiny.mean, tiny.std).numpy()})[0]
    np.testing.assert_allclose(np.exp(logits).sum(1), 1.0, atol=1e-5)


def _search(out, *extra):
    return main(["search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "2", "--max-steps", "20",
                 "--out", str(out), *extra])


def test_search_exports_the_refit_and_refit_0_the_trial_as_searched(tmp_path, capsys):
    assert _search(tmp_path / "a", "--refit", "2", "--no-distill") == 0  # distillation: tests/test_distill.py
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "a" / "best" / "metrics.json").read_text())
    strategy = Strategy.from_dict(json.loads((tmp_path / "a" / "best" / "strategy.json").read_text()))
    n = member_count(strategy, 2)
    assert metrics["refits"] == n and metrics["trained_on"] == "train+val"
    assert f"{n} time(s) on train+val" in out and f"({n} refit{'s' if n > 1 else ''} on train+val)" in out

    assert _search(tmp_path / "b", "--refit", "0") == 0
    assert "train+val" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "b" / "best" / "metrics.json").read_text())
    assert metrics["refits"] == 0 and metrics["trained_on"] == "train" and metrics["retrained"] is False


def test_a_negative_refit_count_fails_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _search(tmp_path / "run", "--refit", "-1")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--refit must be at least 0, got -1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_seed_independent_strategy_is_refit_once(tiny, digits16):
    head_only = Strategy(tap=2, freeze=2, head="linear")
    outcome = refit(head_only, tiny, ActivationCache(tiny, digits16), members=3)
    assert outcome.seeds == (0,) and not isinstance(outcome.model, Ensemble)
    assert member_count(head_only, 3) == 1 and member_count(head_only, 0) == 0
    assert member_count(dataclasses.replace(head_only, head="mlp", mlp_hidden=8), 3) == 3, "MLP: seeded init"
    assert member_count(FINE_TUNE, 3) == 3


def test_a_refit_keeps_the_trials_epochs_on_its_larger_data(tiny, digits16):
    cache = ActivationCache(tiny, digits16)
    train, both = len(digits16.split["train"]), len(digits16.split["train"]) + len(digits16.split["val"])
    assert refit_schedule(FINE_TUNE, cache).steps == round(FINE_TUNE.steps * both / train) > FINE_TUNE.steps
    head = Strategy(tap=2, freeze=2)
    assert refit_schedule(head, cache) == head, "a head fitted to convergence has no schedule to scale"


def test_members_that_fit_their_data_worse_than_the_trial_are_retrained_then_refused(tiny, digits16):
    cache = ActivationCache(tiny, digits16)
    searched = train_trial(FINE_TUNE, tiny, cache)
    good = refit(FINE_TUNE, tiny, cache, members=2, reference_train_accuracy=searched.train_accuracy)
    assert good.model is not None and good.seeds == (0, 1) and good.rejected == ()
    impossible = refit(FINE_TUNE, tiny, cache, members=2, reference_train_accuracy=1.2)
    assert impossible.model is None and len(impossible.rejected) == 4, "each member retried once, then refused"
    assert "seed 3: accuracy on its training data" in impossible.failure


def test_a_diverging_refit_ships_the_searched_trial_and_says_so(tmp_path, capsys, monkeypatch):
    """The refit diverges for real (a learning rate of 1e30 gives a NaN loss): every member and every retry fails
    its check, and the export falls back to the searched trial's own model, in one line and in metrics.json."""
    import autotransfer.prior as prior_module
    import autotransfer.refit as refit_module

    build_prior = prior_module.build_prior
    monkeypatch.setattr("autotransfer.study.build_prior", lambda *a, **k: dataclasses.replace(
        build_prior(*a, **k), first_strategies=[dataclasses.replace(FINE_TUNE, steps=20)]))
    real = refit_module.train_trial
    monkeypatch.setattr(refit_module, "train_trial", lambda s, *a, **k: real(dataclasses.replace(s, lr=1e30), *a, **k))
    assert main(["search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "1", "--max-steps", "20",
                 "--out", str(tmp_path), "--refit", "2"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert metrics["refits"] == 0 and metrics["trained_on"] == "train"
    assert metrics["refit_fallback"].count("loss became nan") == 4
    lines = [line for line in out.splitlines() if "refit on train+val rejected" in line]
    assert len(lines) == 1 and "shipped the searched trial's own model" in lines[0]
    assert metrics["test_accuracy"] > 0.5, "the searched trial's model, not the diverged one"
