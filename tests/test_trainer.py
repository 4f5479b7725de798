import pytest
import torch

from autotransfer.features import ActivationCache
from autotransfer.model import build_model
from autotransfer.preprocess import normalise
from autotransfer.strategy import Strategy
from autotransfer.trainer import TrainingDiverged, l2sp_penalty, param_groups, train_trial

FINE_TUNE = dict(tap=3, freeze=1, head="linear", lr=0.05, lr_ratio=0.1, steps=60, bn="train")


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_groups_are_bit_identical_after_a_trial(tiny, tiny_cache):
    before = _state(tiny.groups)
    result = train_trial(Strategy(**FINE_TUNE), tiny, tiny_cache)
    after = result.model.groups.state_dict()
    frozen = [k for k in before if k.startswith("0.")]
    trained = [k for k in before if k.startswith(("1.", "2.")) and "num_batches" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "weights and BN stats of group 1"
    assert any(not torch.equal(before[k], after[k]) for k in trained), "the trainable groups must move"
    assert all(torch.equal(before[k], v) for k, v in tiny.groups.state_dict().items()), "the backbone is not touched"


def test_bn_frozen_mode_keeps_running_stats_of_trainable_groups(tiny, tiny_cache):
    result = train_trial(Strategy(**{**FINE_TUNE, "bn": "frozen"}), tiny, tiny_cache)
    for i in (1, 2):
        assert torch.equal(result.model.groups[i][1].running_mean, tiny.groups[i][1].running_mean)
        assert not torch.equal(result.model.groups[i][0].weight, tiny.groups[i][0].weight)


def test_discriminative_lrs_reach_the_optimizer(tiny, tiny_cache):
    s = Strategy(tap=3, freeze=0, lr=0.1, lr_ratio=0.01, steps=2)
    groups = {g["name"]: g for g in param_groups(build_model(s, tiny, 10), s)}
    assert groups["head"]["lr"] == pytest.approx(0.1)
    assert groups["group3"]["lr"] == pytest.approx(0.1 * 0.01 ** (1 / 3))
    assert groups["group1"]["lr"] == pytest.approx(0.001), "lowest group: 100x smaller"
    assert groups["group1"]["lr"] < groups["group2"]["lr"] < groups["group3"]["lr"] < groups["head"]["lr"]
    assert all(g["weight_decay"] == 0 for name, g in groups.items() if name.endswith("no_decay"))
    frozen = Strategy(tap=3, freeze=2, lr=0.1, lr_ratio=0.1, steps=2)
    names = {g["name"] for g in param_groups(build_model(frozen, tiny, 10), frozen)}
    assert not any(n.startswith(("group1", "group2")) for n in names)


def test_l2sp_changes_the_loss_and_keeps_weights_near_pretrained(tiny, tiny_cache):
    model = build_model(Strategy(**FINE_TUNE), tiny, 10)
    ref = {n: p.detach().clone() for n, p in model.groups.named_parameters() if p.requires_grad}
    assert l2sp_penalty(model, ref, 1.0).item() == 0.0
    with torch.no_grad():
        model.groups[2][0].weight.add_(0.1)
    expected = 0.5 * 0.3 * (0.1 ** 2) * model.groups[2][0].weight.numel()
    assert l2sp_penalty(model, ref, 0.3).item() == pytest.approx(expected, rel=1e-4)

    def drift(alpha):
        r = train_trial(Strategy(**{**FINE_TUNE, "l2sp_alpha": alpha, "lr": 0.2}), tiny, tiny_cache)
        return sum((r.model.groups[i][0].weight - tiny.groups[i][0].weight).pow(2).sum().item() for i in (1, 2))

    assert drift(5.0) < drift(0.0)


@pytest.mark.parametrize("head", ["linear", "svm", "mlp"])
def test_every_head_learns(head, tiny, tiny_cache):
    s = Strategy(tap=3, freeze=3, head=head, mlp_hidden=64 if head == "mlp" else 0)
    result = train_trial(s, tiny, tiny_cache)
    assert result.val_accuracy > 0.5, "well above the 10 % of chance on digits"
    assert result.steps_run == 0 and result.history == [], "fitted by L-BFGS, not by SGD steps"
    x, y = tiny_cache.pooled(3, "avg", "train")
    with torch.no_grad():
        assert result.train_accuracy == pytest.approx((result.model.head(x).argmax(1) == y).float().mean().item())


@pytest.mark.parametrize("head", ["linear", "svm"])
def test_a_head_fitted_to_convergence_does_not_depend_on_the_seed(head, tiny, tiny_cache):
    runs = [train_trial(Strategy(tap=3, freeze=3, head=head, pool="avgmax", seed=seed), tiny, tiny_cache)
            for seed in (0, 1, 2)]
    assert len({r.val_accuracy for r in runs}) == 1
    for r in runs[1:]:
        assert torch.allclose(r.model.head[2].weight, runs[0].model.head[2].weight, atol=1e-4)


def test_the_head_fit_converges_and_its_l2_strength_matters(tiny, tiny_cache):
    weak, strong = (train_trial(Strategy(tap=3, freeze=3, weight_decay=l2), tiny, tiny_cache) for l2 in (1e-5, 1.0))
    assert weak.train_accuracy > strong.train_accuracy, "a strong L2 penalty fits the training data less closely"
    assert weak.model.head[2].weight.norm() > 3 * strong.model.head[2].weight.norm()


def test_cached_path_equals_full_forward(tiny, tiny_cache, digits16):
    s = Strategy(**FINE_TUNE)
    model = train_trial(s, tiny, tiny_cache).model
    x = normalise(digits16.images[tiny_cache.order[:50]], tiny.mean, tiny.std)
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_from(tiny_cache.boundary(1)[:50], 1), atol=1e-5)


@pytest.mark.parametrize("memory_limit, storage", [(2**30, "float32"), (6_000_000, "float16"), (2_000_000, "disk")])
def test_a_warm_cache_gives_the_same_result_as_the_cold_pass(tiny, digits16, tmp_path, memory_limit, storage):
    s = Strategy(**FINE_TUNE)
    cold = ActivationCache(tiny, digits16, folder=tmp_path, memory_limit=memory_limit)
    a = train_trial(s, tiny, cold)
    assert cold.storage == storage and not cold.loaded_from_disk and cold.seconds > 0
    warm = ActivationCache(tiny, digits16, folder=tmp_path, memory_limit=memory_limit)
    b = train_trial(s, tiny, warm)
    assert warm.loaded_from_disk and warm.storage == storage
    assert b.history == a.history and b.val_accuracy == a.val_accuracy
    free = memory_limit - digits16.images.numel()  # the in-memory images count against the limit
    halves = sum(cold.boundary(k).numel() * 2 for k in cold.stored)  # the boundaries' bytes in float16
    if storage == "float16":
        assert cold.nbytes <= free < cold.nbytes + halves, "float16 because float32 would not fit"
    if storage == "disk":
        assert cold.nbytes > free, "memory-mapped because even float16 would not fit"
        assert sum(f.stat().st_size for f in tmp_path.glob("*/*.npy")) >= cold.nbytes, "the arrays live on disk"
    if storage != "float32":
        assert warm.boundary(1).dtype == torch.float16


def test_cache_key_separates_data_sets_and_a_damaged_cache_is_recomputed(tiny, digits16, tmp_path):
    from autotransfer.data import load_data

    first = ActivationCache(tiny, digits16, folder=tmp_path)
    first.boundary(1)
    other = ActivationCache(tiny, load_data("digits", image_size=16, seed=1), folder=tmp_path)
    other.boundary(1)
    assert not other.loaded_from_disk and len(list(tmp_path.iterdir())) == 2
    (next(tmp_path.glob(f"{first.key}-*")) / "b2.npy").write_bytes(b"truncated")
    again = ActivationCache(tiny, digits16, folder=tmp_path)
    assert torch.equal(again.boundary(2), first.boundary(2)) and not again.loaded_from_disk


def test_a_probe_starts_fine_tuning_from_a_fitted_head(tiny, tiny_cache):
    """LP-FT: with a learning rate too small to move anything, a fine-tune scores what its linear probe does."""
    probe = train_trial(Strategy(tap=3, freeze=3, pool="avg"), tiny, tiny_cache).val_accuracy
    still = train_trial(Strategy(**dict(FINE_TUNE, lr=1e-9, steps=1, bn="frozen")), tiny, tiny_cache).val_accuracy
    assert probe > 0.5 and abs(still - probe) <= 0.02


def test_report_is_called_at_the_rungs_and_can_stop_the_trial(tiny, tiny_cache):
    calls = []

    def report(step, value):
        calls.append((step, value))
        if step == 4:
            raise KeyboardInterrupt  # any exception from the callback ends the trial

    train_trial(Strategy(tap=2, freeze=2), tiny, tiny_cache, report=report, report_at=(2, 4))
    assert calls == [], "head-only trials are not reported (nothing to prune)"
    with pytest.raises(KeyboardInterrupt):
        train_trial(Strategy(tap=2, freeze=1, steps=6), tiny, tiny_cache, report=report, report_at=(2, 4))
    assert [e for e, _ in calls] == [2, 4] and all(0 <= v <= 1 for _, v in calls)
    calls.clear()
    result = train_trial(Strategy(tap=2, freeze=1, steps=3), tiny, tiny_cache, report=report, report_at=(2, 4))
    assert [e for e, _ in calls] == [2, 3] and result.steps_run == 3, "a rung past the schedule is not reached"


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_the_rung_checkpoints_do_not_change_what_is_learned(tiny, tiny_cache, bn):
    """A checkpoint evaluates in eval mode, then training resumes mid-epoch with the BN statistics it had."""
    s = Strategy(**dict(FINE_TUNE, bn=bn, steps=100))  # 40 steps an epoch: rungs land mid-epoch
    seen = []
    reported = train_trial(s, tiny, tiny_cache, report=lambda step, value: seen.append(step), report_at=(11, 33, 60))
    silent = train_trial(s, tiny, tiny_cache)
    assert seen == [11, 33, 60, 100]
    assert [step for step, _ in reported.history] == seen and silent.history == [reported.history[-1]]
    for a, b in zip(reported.model.state_dict().values(), silent.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_nan_loss_raises_training_diverged(tiny, tiny_cache):
    tiny_cache.boundary(2)[:] = float("nan")
    for split in ("train", "val", "test"):  # the pooled features the head fits on are kept apart from boundary 2
        tiny_cache.pooled(2, "avgmax", split)[0][:] = float("nan")
    with pytest.raises(TrainingDiverged, match="loss became nan in the head's L-BFGS fit"):
        train_trial(Strategy(tap=2, freeze=2), tiny, tiny_cache)
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        train_trial(Strategy(tap=3, freeze=2, steps=3, lr=1e30), tiny, tiny_cache)


def test_the_uncached_path_trains_the_same_model(tiny, tiny_cache):
    """`use_cache=False` (the speed benchmark's naive loop) runs every layer from the images: same result (the
    converged head fit amplifies float rounding in the features a little)."""
    for s in (Strategy(tap=2, freeze=2), Strategy(**FINE_TUNE)):
        cached = train_trial(s, tiny, tiny_cache)
        naive = train_trial(s, tiny, tiny_cache, use_cache=False)
        assert abs(cached.val_accuracy - naive.val_accuracy) <= 0.015
    for a, b in zip(cached.model.head.state_dict().values(), naive.model.head.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=0.1)


def test_augmentation_draws_a_new_view_per_image_and_flips_only_when_asked():
    from torchvision.transforms import v2

    from autotransfer.augment import augment_batch, build_augment

    assert build_augment("none", 16) is None
    image = torch.arange(3 * 16 * 16, dtype=torch.uint8).reshape(1, 3, 16, 16)
    torch.manual_seed(0)
    views = augment_batch(image.repeat(8, 1, 1, 1), build_augment("shift", 16))
    assert views.shape == (8, 3, 16, 16) and views.dtype == torch.uint8
    assert len({v.numpy().tobytes() for v in views}) > 4, "each image of a batch gets its own random shift"
    for kind in ("shift", "crop", "trivial"):
        flips = [isinstance(t, v2.RandomHorizontalFlip) for t in build_augment(kind, 16, flip=False).transforms]
        assert not any(flips) and any(isinstance(t, v2.RandomHorizontalFlip)
                                      for t in build_augment(kind, 16, flip=True).transforms)


def test_an_augmenting_fine_tune_trains_from_the_images_and_keeps_frozen_groups(tiny, tiny_cache):
    before = _state(tiny.groups)
    s = dict(FINE_TUNE, steps=40, lr=0.01, bn="frozen")
    plain = train_trial(Strategy(**s), tiny, tiny_cache)
    shifted = train_trial(Strategy(**dict(s, augment="shift")), tiny, tiny_cache)
    frozen = [k for k in before if k.startswith("0.")]
    assert all(torch.equal(before[k], shifted.model.groups.state_dict()[k]) for k in frozen)
    assert not torch.equal(plain.model.groups[2][0].weight, shifted.model.groups[2][0].weight)
    assert shifted.val_accuracy > 0.5 and shifted.steps_run == 40
