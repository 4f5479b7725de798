"""Unlabelled images (`--unlabeled`): loading, the searched `adapt` choice, self-training and reverse validation."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from autotransfer.adapt import confident_rows, reverse_validation, self_train
from autotransfer.data import UNLABELED, load_data
from autotransfer.errors import ConfigError, DataError
from autotransfer.features import ActivationCache
from autotransfer.probe import fit_head
from autotransfer.strategy import DEFAULT_PROBE_L2, Strategy
from autotransfer.trainer import train_trial


def _write_digits(folder, digits, rows, *, labelled: bool):
    for i in rows:
        path = folder / (str(int(digits.labels[i])) if labelled else f"sub{i % 3}") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i].permute(1, 2, 0).numpy()).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits16):
    """Labelled digits as class folders (even rows) and other digits, inverted, in nested folders (odd rows)."""
    root = tmp_path_factory.mktemp("adapt")
    _write_digits(root / "labelled", digits16, range(0, 600, 2), labelled=True)
    inverted = type(digits16)(**{**digits16.__dict__, "images": 255 - digits16.images})
    _write_digits(root / "unlabelled", inverted, range(1, 600, 4), labelled=False)
    return root


def test_unlabelled_images_join_as_their_own_split_and_leave_the_labelled_data_as_it_was(folders):
    plain = load_data(str(folders / "labelled"), image_size=16)
    both = load_data(str(folders / "labelled"), image_size=16, unlabeled=str(folders / "unlabelled"))
    assert both.split_names == ("train", "val", "test", UNLABELED) and plain.split_names == ("train", "val", "test")
    assert both.unlabeled_count == 150 and plain.unlabeled_count == 0
    for s in plain.split_names:
        assert torch.equal(plain.images[plain.split[s]], both.images[both.split[s]])
        assert torch.equal(plain.labels[plain.split[s]], both.labels[both.split[s]])
    assert (both.labels[both.split[UNLABELED]] == -1).all()
    assert both.fingerprint != plain.fingerprint, "the cache must not mix the two"
    csv = folders / "unlabelled.csv"
    csv.write_text("path\n" + "\n".join(str(p) for p in sorted((folders / "unlabelled").rglob("*.png"))) + "\n")
    listed = load_data(str(folders / "labelled"), image_size=16, unlabeled=str(csv))
    assert listed.unlabeled_count == 150 and listed.fingerprint == both.fingerprint


@pytest.mark.parametrize("make, match", [
    (lambda root: root.joinpath("empty").mkdir() or root / "empty", "No images found in --unlabeled"),
    (lambda root: root / "labelled", "holds 300 of the labelled images"),
    (lambda root: root / "labelled" / "3", r"holds \d+ of the labelled images"),
    (lambda root: root / "missing", "does not exist"),
], ids=["empty", "the-labelled-data", "inside-the-labelled-data", "missing"])
def test_bad_unlabelled_folders_are_refused(folders, tmp_path, make, match):
    (tmp_path / "labelled").symlink_to(folders / "labelled")
    with pytest.raises(DataError, match=match):
        load_data(str(folders / "labelled"), image_size=16, unlabeled=str(make(tmp_path)))


def test_unreadable_unlabelled_images_are_refused(folders, tmp_path):
    for name in ("a.png", "b/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"not an image")
    with pytest.raises(DataError, match="None of the 2 images in --unlabeled"):
        load_data(str(folders / "labelled"), image_size=16, unlabeled=str(tmp_path))


def test_confident_rows_take_a_quota_of_every_predicted_class():
    logits = torch.tensor([[9.0, 0, 0], [5, 0, 0], [1, 0, 0], [0.2, 0, 0], [0, 3, 0], [0, 0.1, 0]])
    idx, labels = confident_rows(logits, 0.5)
    assert idx.tolist() == [0, 1, 4] and labels.tolist() == [0, 0, 1], "half of class 0, and one of class 1"


def _blobs(n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) * 0.5
    x[:, 0] += torch.where(y == 1, 2.0, -2.0)
    return x + shift, y


def _fitter(head, strategy):
    return lambda x, y: fit_head(head, x, y, strategy)


def test_self_training_follows_a_shifted_target_that_the_source_fit_misses():
    from autotransfer.heads import build_head

    x, y = _blobs(200, torch.tensor([0.0, 0.0]), 0)
    x_target, y_target = _blobs(400, torch.tensor([1.9, 0.0]), 1)  # the decision boundary moves with the target
    strategy = Strategy(tap=1, freeze=1, weight_decay=1e-3)
    source_only = build_head("linear", 2, 2)
    fit_head(source_only, x, y, strategy)
    before = float((source_only(x_target).argmax(1) == y_target).float().mean())
    head = build_head("linear", 2, 2)
    idx, labels = self_train(_fitter(head, strategy), head, x, y, x_target, fraction=0.5, rounds=3)
    after = float((head(x_target).argmax(1) == y_target).float().mean())
    assert after > before + 0.05, (before, after)
    assert len(idx) == 200 and (labels == y_target[idx]).float().mean() > 0.9


def test_reverse_validation_scores_right_target_predictions_high_and_noise_at_chance():
    x_val, y_val = _blobs(200, torch.tensor([0.0, 0.0]), 2)
    x_target, y_target = _blobs(400, torch.tensor([0.3, 0.3]), 3)
    fit = lambda head, x, y: fit_head(head, x, y, Strategy(tap=1, freeze=1, weight_decay=DEFAULT_PROBE_L2))
    right = torch.nn.functional.one_hot(y_target, 2).float()
    good = reverse_validation(x_target, right, x_val, y_val, fit, 2)
    assert good.accuracy > 0.95 and good.margin.mean > 1.0
    noise = [torch.nn.functional.one_hot(y_target[torch.randperm(400, generator=torch.Generator().manual_seed(s))], 2)
             for s in range(10)]
    scores = [reverse_validation(x_target, n.float(), x_val, y_val, fit, 2) for n in noise]
    assert abs(np.mean([r.accuracy for r in scores]) - 0.5) < 0.15, scores  # any direction: chance on average
    assert abs(np.mean([r.margin.mean for r in scores])) < good.margin.mean / 3, scores  # so is its margin
    # a few wrong predictions keep the accuracy at the top and lower the margin: it still orders saturated trials
    flipped = right.clone()
    flipped[:40] = flipped[:40].flip(1)
    worse = reverse_validation(x_target, flipped, x_val, y_val, fit, 2)
    assert worse.accuracy == pytest.approx(good.accuracy, abs=0.02) and worse.margin.mean < good.margin.mean


def test_adabn_moves_a_heads_standardisation_to_the_target_and_recovers_a_shifted_target():
    from autotransfer.adapt import adabn
    from autotransfer.heads import build_head

    x, y = _blobs(200, torch.tensor([0.0, 0.0]), 0)
    x_target, y_target = _blobs(400, torch.tensor([1.9, 0.0]), 1)
    head = build_head("linear", 2, 2)
    fit_head(head, x, y, Strategy(tap=1, freeze=1, weight_decay=1e-3))
    before = float((head(x_target).argmax(1) == y_target).float().mean())
    adabn(head[0], x_target)
    after = float((head(x_target).argmax(1) == y_target).float().mean())
    assert torch.allclose(head[0].running_mean, x_target.mean(0), atol=1e-5)
    assert before < 0.85 and after > 0.95, (before, after)


def test_the_gradient_reversal_flips_and_scales_the_gradient_and_its_weight_ramps_up():
    from autotransfer.dann import reversal_weight, reverse_gradient

    x = torch.ones(3, requires_grad=True)
    reverse_gradient(x, 0.3).mul(torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.3, -0.6, -0.9]))
    ramp = [reversal_weight(0.5, "ramp", p) for p in (0.0, 0.1, 0.5, 1.0)]
    assert ramp[0] == 0.0 and ramp == sorted(ramp) and ramp[-1] == pytest.approx(0.5, abs=1e-4)
    assert reversal_weight(0.5, "constant", 0.0) == 0.5


@pytest.fixture(scope="module")
def shifted_cache(tiny_module, folders):
    data = load_data(str(folders / "labelled"), image_size=16, unlabeled=str(folders / "unlabelled"))
    return ActivationCache(tiny_module, data)


@pytest.fixture(scope="module")
def tiny_module():
    from tests.conftest import tiny_backbone

    return tiny_backbone()


@pytest.mark.parametrize("strategy", [
    Strategy(tap=3, freeze=3, adapt="pseudo_label", pseudo_fraction=0.5, pseudo_rounds=2),
    Strategy(tap=3, freeze=1, steps=12, lr=0.01, adapt="pseudo_label", pseudo_fraction=0.5, pseudo_rounds=1),
], ids=["head", "fine-tune"])
def test_trials_with_unlabelled_images_are_scored_by_validation_and_reverse_validation(tiny_module, shifted_cache,
                                                                                      strategy):
    plain = train_trial(Strategy(**{**strategy.to_dict(), "adapt": "none", "pseudo_fraction": 0.0,
                                    "pseudo_rounds": 0}), tiny_module, shifted_cache)
    adapted = train_trial(strategy, tiny_module, shifted_cache)
    for r in (plain, adapted):
        assert 0.0 < r.reverse_accuracy <= 1.0
        assert r.objective == pytest.approx((r.val_score + r.reverse_accuracy) / 2)
    assert not np.isclose(plain.val_margin.mean, adapted.val_margin.mean), "self-training changed nothing"
    refit = train_trial(strategy, tiny_module, shifted_cache, fit_split="train+val")
    assert refit.reverse_accuracy is None, "a refit's validation split is training data: nothing to score"


def _without_adapt(strategy):
    return Strategy(**{**strategy.to_dict(), "adapt": "none", "dann_weight": 0.0, "dann_hidden": 0})


@pytest.mark.parametrize("strategy", [
    Strategy(tap=3, freeze=3, adapt="adabn"),
    Strategy(tap=3, freeze=1, steps=12, lr=0.01, bn="train", adapt="adabn"),
], ids=["head", "fine-tune"])
def test_adabn_scores_validation_with_the_labelled_statistics_and_ships_the_unlabelled_ones(tiny_module,
                                                                                           shifted_cache, strategy):
    from autotransfer.evaluation import logits_of

    plain = train_trial(_without_adapt(strategy), tiny_module, shifted_cache)
    adapted = train_trial(strategy, tiny_module, shifted_cache)
    assert adapted.val_accuracy == plain.val_accuracy and adapted.train_accuracy == plain.train_accuracy
    features = logits_of(lambda x: adapted.model.features_from(x, 0), shifted_cache.split(0, UNLABELED)[0],
                         shifted_cache)
    head, before = adapted.model.head[0], plain.model.head[0]
    assert torch.allclose(head.running_mean, features.mean(0), atol=1e-4), "the head standardises the unlabelled"
    assert not torch.allclose(before.running_mean, head.running_mean)
    groups = zip(adapted.model.groups.state_dict().values(), plain.model.groups.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in groups), "the groups keep their weights and statistics"
    assert 0 < adapted.reverse_accuracy <= 1
    refit = train_trial(strategy, tiny_module, shifted_cache, fit_split="train+val")
    assert not torch.allclose(refit.model.head[0].running_mean, _refit_plain(strategy, tiny_module, shifted_cache)), \
        "the refit ships the unlabelled images' statistics too"


def _refit_plain(strategy, backbone, cache):
    return train_trial(_without_adapt(strategy), backbone, cache, fit_split="train+val").model.head[0].running_mean


def test_dann_trains_against_a_domain_classifier_that_the_exported_model_does_not_hold(tiny_module, shifted_cache,
                                                                                     monkeypatch):
    from autotransfer import dann

    losses, loss = [], dann.DomainClassifier.loss
    monkeypatch.setattr(dann.DomainClassifier, "loss", lambda *a: (value := loss(*a), losses.append(value.detach()))[0])
    strategy = Strategy(tap=3, freeze=0, steps=200, lr=0.01, dann_weight=1.0, dann_hidden=64, dann_schedule="constant")
    plain = train_trial(_without_adapt(strategy), tiny_module, shifted_cache)
    assert not losses, "no domain classifier without DANN"
    domain_loss = {}
    for weight in (1e-4, 1.0):
        adversarial = train_trial(dataclasses.replace(strategy, dann_weight=weight), tiny_module, shifted_cache)
        domain_loss[weight] = float(torch.stack(losses[-50:]).mean())
        assert len(losses) == 200 * len(domain_loss) and adversarial.steps_run == 200
    # the classifier tells the inverted digits apart easily; behind a full reversal the features stop telling
    assert domain_loss[1e-4] < 0.1 and domain_loss[1.0] > 0.5, domain_loss
    assert adversarial.model.state_dict().keys() == plain.model.state_dict().keys(), "training-only"
    assert 0 < adversarial.reverse_accuracy <= 1


def test_information_loss_rewards_confident_predictions_spread_over_the_classes():
    from autotransfer.adapt import information_loss

    k = 4
    uniform = torch.zeros(8, k)
    confident_spread = 20.0 * torch.eye(k).repeat(2, 1)  # each row sure, two rows per class
    confident_one_class = 20.0 * torch.eye(k)[[0] * 8]  # each row sure, every row the same class
    assert float(information_loss(uniform)) == pytest.approx(0.0, abs=1e-6)
    assert float(information_loss(confident_spread)) == pytest.approx(-math.log(k), abs=1e-4)
    assert float(information_loss(confident_one_class)) == pytest.approx(0.0, abs=1e-4), "collapse earns nothing"
    logits = torch.randn(8, k, requires_grad=True, generator=torch.Generator().manual_seed(0))
    information_loss(logits).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_a_pass_over_unlabelled_rows_normalises_by_the_batch_and_keeps_the_running_statistics():
    from autotransfer.trainer import running_statistics_kept

    head = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)).train()
    before = head[0].running_mean.clone()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) + 5.0
    with running_statistics_kept(head):
        out = head[0](x)
    assert torch.equal(head[0].running_mean, before) and head[0].momentum == 0.1, "kept, and momentum restored"
    assert float(out.mean().abs()) < 1e-5, "normalised by the batch's own statistics"
    head[0](x)
    assert not torch.equal(head[0].running_mean, before)


def test_information_maximisation_makes_a_fine_tune_confident_on_the_unlabelled_images(tiny_module, shifted_cache):
    strategy = Strategy(tap=3, freeze=0, steps=200, lr=0.01)
    x_unlabeled = shifted_cache.split(0, UNLABELED)[0]

    def unlabelled_entropy(weight: float) -> float:
        model = train_trial(dataclasses.replace(strategy, im_weight=weight), tiny_module, shifted_cache).model
        with torch.no_grad():
            log_p = model.forward_from(shifted_cache.as_input(x_unlabeled), 0).log_softmax(dim=1)
        return float(-(log_p.exp() * log_p).sum(dim=1).mean())

    # a negligible weight draws the same unlabelled batches, so only the loss's weight differs; measured 0.92 ->
    # 0.34 once, 0.68 -> 0.36 in a fresh environment with the same torch (cause not traced): a loss that did
    # nothing would stay near 1x
    barely, maximised = unlabelled_entropy(1e-4), unlabelled_entropy(1.0)
    assert maximised < 0.7 * barely, (barely, maximised)
    with pytest.raises(ConfigError, match="information maximisation needs a fine-tune"):
        Strategy(tap=3, freeze=3, im_weight=0.1)


def test_without_unlabelled_images_the_objective_is_the_validation_score(tiny, tiny_cache):
    r = train_trial(Strategy(tap=3, freeze=3), tiny, tiny_cache)
    assert r.reverse_accuracy is None and r.objective == r.val_score


@pytest.fixture(scope="module")
def target_folders(tmp_path_factory, digits16):
    """Labelled inverted digits as class folders: `val/` (rows 3, 7, ...) and `test/` (rows 603, 607, ...)."""
    root = tmp_path_factory.mktemp("target")
    inverted = type(digits16)(**{**digits16.__dict__, "images": 255 - digits16.images})
    _write_digits(root / "val", inverted, range(3, 600, 4), labelled=True)
    _write_digits(root / "test", inverted, range(603, 900, 4), labelled=True)
    return root


def test_val_and_test_folders_are_those_splits_and_data_trains(folders, target_folders, tmp_path):
    plain = load_data(str(folders / "labelled"), image_size=16)
    both = load_data(str(folders / "labelled"), image_size=16, val=str(target_folders / "val"),
                     test=str(target_folders / "test"))
    assert both.target_val and not plain.target_val
    assert [len(both.split[s]) for s in ("train", "val", "test")] == [300, 150, 75], "DATA's 300 images all train"
    inverted = load_data(str(target_folders / "val"), image_size=16)  # the --val images on their own
    rows = torch.cat([inverted.images[inverted.split[s]] for s in ("train", "val", "test")])
    assert sorted(map(bytes, both.images[both.split["val"]].numpy())) == sorted(map(bytes, rows.numpy()))
    only_val = load_data(str(folders / "labelled"), image_size=16, val=str(target_folders / "val"))
    assert len(only_val.split["val"]) == 150 and len(only_val.split["train"]) + len(only_val.split["test"]) == 300, \
        "without --test, the test split is carved out of DATA"
    (tmp_path / "train").symlink_to(folders / "labelled")
    (tmp_path / "val").symlink_to(target_folders / "val")
    with pytest.raises(DataError, match="has its own val/ folder"):
        load_data(str(tmp_path), image_size=16, val=str(target_folders / "val"))
    with pytest.raises(DataError, match="holds images that DATA"):
        load_data(str(folders / "labelled"), image_size=16, val=str(folders / "labelled"))


def test_with_target_validation_images_the_objective_is_their_score_alone(tiny_module, folders, target_folders):
    data = load_data(str(folders / "labelled"), image_size=16, unlabeled=str(folders / "unlabelled"),
                     val=str(target_folders / "val"))
    r = train_trial(Strategy(tap=3, freeze=3, adapt="adabn"), tiny_module, ActivationCache(tiny_module, data))
    assert r.reverse_accuracy is None and r.objective == r.val_score


def test_search_with_unlabelled_images_records_reverse_validation_and_exports_again_elsewhere(folders, tmp_path):
    import json

    import pandas as pd

    from autotransfer.cli import main

    out = tmp_path / "run"
    assert main(["search", str(folders / "labelled"), "--backbone", "tiny_test_cnn", "--image-size", "16",
                 "--unlabeled", str(folders / "unlabelled"), "--budget", "6", "--max-steps", "20", "--refit", "1",
                 "--out", str(out)]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    complete = board[board.state == "complete"]
    assert complete.reverse_accuracy.notna().all() and complete.reverse_margin.notna().all() \
        and (complete.adapt == "pseudo_label").any(), \
        "the prior's self-trained strategy is among the first trials"
    best = complete.iloc[0]
    assert best.val_score == pytest.approx((best.val_accuracy + best.reverse_accuracy) / 2)
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    # another command rebuilds the inputs (unlabelled images included: the data fingerprint must match)
    assert main(["export", "--out", str(out), "--dest", str(tmp_path / "again"), "--refit", "0"]) == 0
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["trial"] == metrics["trial"]


def test_an_unlabelled_folder_under_a_hidden_folder_loads_and_its_own_hidden_files_are_skipped(folders, tmp_path):
    import shutil

    inside = tmp_path / ".cache" / "unlabelled"
    shutil.copytree(folders / "unlabelled", inside)
    shutil.copytree(inside / "sub0", inside / ".thumbnails")
    data = load_data(str(folders / "labelled"), image_size=16, unlabeled=str(inside))
    assert data.unlabeled_count == 150, "the .thumbnails copies are not read; the hidden parent does not matter"


def test_search_with_target_val_and_test_folders_scores_them_and_exports_again(folders, target_folders, tmp_path,
                                                                               capsys):
    import json

    import pandas as pd

    from autotransfer.cli import main

    out = tmp_path / "run"
    assert main(["search", str(folders / "labelled"), "--backbone", "tiny_test_cnn", "--image-size", "16",
                 "--unlabeled", str(folders / "unlabelled"), "--val", str(target_folders / "val"), "--test",
                 str(target_folders / "test"), "--budget", "3", "--max-steps", "20", "--refit", "1",
                 "--out", str(out)]) == 0
    assert "train/val/test 300/150/75" in capsys.readouterr().out
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.reverse_accuracy.isna().all() and (board.val_score == board.val_accuracy).all()
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert main(["export", "--out", str(out), "--dest", str(tmp_path / "again"), "--refit", "0"]) == 0
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["trial"] == metrics["trial"]
