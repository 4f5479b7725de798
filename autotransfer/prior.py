"""The size x similarity prior: which quadrant the data is in, measured in seconds from cached activations.

Classic advice (Yosinski et al. 2014; cs231n): small data similar to the source -> linear classifier on
the final features; small and different -> linear classifier on earlier activations; large and similar ->
fine-tune the upper layers; large and different -> fine-tune everything from the pretrained weights.

Similarity is measured, not guessed: every group's pooled activations get a LogME evidence score (You et
al., 2021) and a closed-form ridge-probe accuracy on the validation split. When an earlier group's probe
clearly beats the final features, the data is "different" from the source. The scores then narrow the
search: taps far below the best probe are not searched.

On imbalanced data (the train split's largest class more than 3x its smallest) the search also chooses
`class_weight`, and the recommended strategy is tried with class-balanced loss weights as well.

The quadrant is a prior, not a rule: whatever the quadrant, the first trials also include a full fine-tune
with augmentation (the careful hand recipe: AdamW, frozen BatchNorm statistics, label smoothing, random
shifts), because on few images with a strong shift from ImageNet that beat every linear probe by 9-11 points.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from autotransfer.features import ActivationCache
from autotransfer.fidelity import step_ladder
from autotransfer.metrics import is_imbalanced
from autotransfer.strategy import DEFAULT_PROBE_L2, SearchSpace, Strategy

SMALL_PER_CLASS = 1000  # training images per class below which data counts as "small"
SIMILAR_MARGIN = 0.01  # final features within 1 point of the best group's probe: "similar"
TAP_MARGIN = 0.05  # taps whose probe is more than 5 points below the best are not searched
RIDGE_PENALTIES = (1e-2, 1e-1, 1.0, 10.0)  # per-sample L2 penalties tried by the ridge probe


def class_sums(x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, d]: the sum of the rows of `x` of each class, i.e. one_hot(labels).T @ x without the
    [n, num_classes] one-hot matrix (1,000 classes would make it the largest array of the prior)."""
    sums = torch.zeros((num_classes, x.shape[1]), dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(np.asarray(labels, dtype=np.int64)), torch.from_numpy(x.astype(np.float64)))
    return sums.numpy()


def _evidence_fixed_point(sigma: np.ndarray, z2: np.ndarray, outside: np.ndarray, n: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """LogME's fixed-point updates of (alpha, beta) for every class at once; each class stops when it converges."""
    alpha, beta = np.ones(len(z2)), np.ones(len(z2))
    active = np.arange(len(z2))
    for _ in range(100):
        a, b, z = alpha[active, None], beta[active, None], z2[active]
        t = a + b * sigma
        gamma = (b * sigma / t).sum(1)
        m2 = (b ** 2 * sigma * z / t ** 2).sum(1)
        res2 = (z * (a / t) ** 2).sum(1) + outside[active]
        new_alpha, new_beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        converged = (np.abs(new_alpha - a[:, 0]) / a[:, 0] < 1e-3) & (np.abs(new_beta - b[:, 0]) / b[:, 0] < 1e-3)
        alpha[active], beta[active] = new_alpha, new_beta
        active = active[~converged]
        if len(active) == 0:
            break
    return alpha, beta


def logme(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """LogME: log marginal evidence per sample of a Bayesian linear model from features to one-hot labels.

    Higher means the labels are better explained linearly by the features. Follows You et al. (2021):
    per class, fixed-point updates of the prior precision alpha and noise precision beta, using one SVD.
    All classes are updated together (arrays of [classes, rank]), so 1,000 classes are no Python loop.
    """
    f = features.astype(np.float64)
    n, d = f.shape
    # Eigen-decomposition of the smaller Gram matrix instead of an SVD of f: same spectrum, several times faster.
    if d <= n:
        sigma, v = np.linalg.eigh(f.T @ f)
        keep = sigma > sigma.max() * 1e-12
        sigma, project = sigma[keep], (f @ v[:, keep] / np.sqrt(sigma[keep])).T  # rows: left singular vectors
    else:
        sigma, u = np.linalg.eigh(f @ f.T)
        keep = sigma > sigma.max() * 1e-12
        sigma, project = sigma[keep], u[:, keep].T
    z2 = class_sums(project.T, labels, num_classes) ** 2  # [classes, rank]: (project @ one_hot_c) ** 2
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)  # y_c @ y_c
    outside = np.maximum(counts - z2.sum(1), 0.0)
    alpha, beta = _evidence_fixed_point(sigma, z2, outside, n)
    t = alpha[:, None] + beta[:, None] * sigma
    m2 = (beta[:, None] ** 2 * sigma * z2 / t ** 2).sum(1)
    res2 = (z2 * (alpha[:, None] / t) ** 2).sum(1) + outside
    log_det = np.log(t).sum(1) + (d - len(sigma)) * np.log(alpha)  # zero eigenvalues add log(alpha)
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - alpha / 2 * m2 - beta / 2 * res2
                - log_det / 2 - n / 2 * math.log(2 * math.pi))
    return float(np.mean(evidence / n))


def ridge_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                num_classes: int) -> float:
    """Validation accuracy of the best closed-form ridge classifier (one-vs-all least squares)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_val - mean) / std
    a = np.hstack([a, np.ones((len(a), 1))])
    b = np.hstack([b, np.ones((len(b), 1))])
    evals, v = np.linalg.eigh(a.T @ a)  # one decomposition serves every penalty
    rhs = v.T @ class_sums(a, y_train, num_classes).T  # v.T @ a.T @ one_hot(y_train)
    best = 0.0
    for penalty in RIDGE_PENALTIES:
        w = v @ (rhs / (evals + penalty * len(a))[:, None])
        best = max(best, float(((b @ w).argmax(1) == y_val).mean()))
    return best


@dataclass(frozen=True)
class GroupScore:
    group: int  # tap index 1..G
    name: str
    channels: int
    logme: float
    probe_accuracy: float  # ridge probe on avg-pooled features, validation split


@dataclass(frozen=True)
class Prior:
    """Measured data size and similarity, the quadrant, and what the search should try first."""

    scores: list[GroupScore]
    num_classes: int
    train_images: int
    size: str  # "small" or "large"
    similarity: str  # "similar" or "different"
    recommended: Strategy
    reason: str
    first_strategies: list[Strategy]
    space: SearchSpace

    @property
    def quadrant(self) -> str:
        return f"{self.size} & {self.similarity}"

    @property
    def images_per_class(self) -> float:
        return self.train_images / self.num_classes

    @property
    def best(self) -> GroupScore:
        return max(self.scores, key=lambda g: (g.probe_accuracy, g.logme))

    @property
    def final(self) -> GroupScore:
        return self.scores[-1]


def score_groups(cache: ActivationCache) -> list[GroupScore]:
    """LogME and ridge-probe accuracy of every group's avg-pooled activations (seconds, from the cache)."""
    backbone, num_classes = cache.backbone, len(cache.data.classes)
    scores = []
    for k in range(1, backbone.num_groups + 1):
        x_train, y_train = (t.numpy() for t in cache.pooled(k, "avg", "train"))
        x_val, y_val = (t.numpy() for t in cache.pooled(k, "avg", "val"))
        scores.append(GroupScore(group=k, name=backbone.group_names[k - 1], channels=backbone.channels[k - 1],
                                 logme=logme(x_train, y_train, num_classes),
                                 probe_accuracy=ridge_probe(x_train, y_train, x_val, y_val, num_classes)))
    return scores


def _quadrant_strategy(size: str, similarity: str, scores: list[GroupScore], per_class: float, steps: int,
                       seed: int) -> tuple[Strategy, str]:
    """The textbook strategy of the quadrant, and why, in words."""
    g, final = len(scores), scores[-1]
    best = max(scores, key=lambda s: (s.probe_accuracy, s.logme))
    probe = dict(head="linear", weight_decay=DEFAULT_PROBE_L2, seed=seed)
    fine_tune = dict(head="linear", optimizer="sgd", lr=0.005, weight_decay=1e-4, steps=steps, seed=seed)
    images = f"{per_class:.0f} training images per class"
    gap = f"final features {final.probe_accuracy:.1%} vs {best.name} {best.probe_accuracy:.1%} (ridge probe, val)"
    if size == "small" and similarity == "similar":
        return Strategy(tap=g, freeze=g, pool="avg", **probe), (
            f"{images} is small and the final features are as good as any ({gap}): a linear classifier on the "
            "final features; fine-tuning risks over-fitting.")
    if size == "small":
        return Strategy(tap=best.group, freeze=best.group, pool="avgmax", **probe), (
            f"{images} is small and earlier activations transfer better ({gap}): a linear classifier on "
            f"{best.name}, whose features are less specific to the source task.")
    if similarity == "similar":
        return Strategy(tap=g, freeze=max(0, g - 2), pool="avg", lr_ratio=0.1, **fine_tune), (
            f"{images} is enough to adapt and the final features fit ({gap}): fine-tune the upper groups after "
            "a linear probe, 10x smaller LR below the head.")
    return Strategy(tap=g, freeze=0, pool="avg", lr_ratio=0.01, **fine_tune), (
        f"{images} is enough to retrain and the data differs from the source ({gap}): fine-tune every group "
        "from the pretrained weights after a linear probe, 100x smaller LR at the bottom.")


# DANN at a weight that helped every fine-tune measured on the digits pair of `benchmarks/adapt.py` (0.538 ->
# 0.674, 0.451 -> 0.525, 0.625 -> 0.719 target accuracy); 0.3 and 1.0 lost up to 17 points there.
_DANN = dict(dann_weight=0.1, dann_hidden=256, dann_schedule="ramp")


def _unlabeled_candidates(recommended: Strategy, best_probe: Strategy, full: Strategy) -> list[Strategy]:
    """First trials with unlabelled images: AdaBN on the best probe (seconds) and on the recommended strategy and
    the full fine-tune, those two with DANN when they fine-tune; the recommended strategy self-trained."""
    def adapted(s: Strategy) -> Strategy:
        return dataclasses.replace(s, adapt="adabn", **(_DANN if s.trains_backbone else {}))

    return [adapted(best_probe), adapted(recommended), adapted(full),
            dataclasses.replace(recommended, adapt="pseudo_label", pseudo_fraction=0.5, pseudo_rounds=2)]


def build_prior(cache: ActivationCache, *, max_steps: int | None = None, seed: int = 0) -> Prior:
    """Measure the data, place it in the quadrant, and derive the first trials and the narrowed space.

    `max_steps` overrides the fine-tuning schedule that the step ladder derives from the data size.
    """
    with torch.no_grad():
        scores = score_groups(cache)
    g = len(scores)
    num_classes = len(cache.data.classes)
    train_images = len(cache.data.split["train"])
    steps = step_ladder(train_images, max_steps=max_steps).max_steps
    best = max(scores, key=lambda s: (s.probe_accuracy, s.logme))
    final = scores[-1]
    size = "small" if train_images / num_classes < SMALL_PER_CLASS else "large"
    similarity = "similar" if final.probe_accuracy >= best.probe_accuracy - SIMILAR_MARGIN else "different"
    kept = [s.group for s in scores if s.probe_accuracy >= best.probe_accuracy - TAP_MARGIN]
    imbalanced = is_imbalanced(cache.data.labels[cache.data.split["train"]], num_classes)
    space = SearchSpace(num_groups=g, max_steps=steps, min_tap=min(kept), max_tap=max(kept), seed=seed,
                        imbalanced=imbalanced, unlabeled=cache.data.unlabeled_count > 0)

    probe = dict(head="linear", weight_decay=DEFAULT_PROBE_L2, seed=seed)
    adapt = dict(head="linear", optimizer="sgd", lr=0.02, weight_decay=1e-4, bn="frozen", steps=steps, seed=seed)
    # The careful hand recipe: every group under the tap, AdamW, frozen BatchNorm statistics, label smoothing,
    # random shifts (no flips: they are wrong for digits and text).
    hand = dict(head="linear", optimizer="adamw", lr=1e-3, lr_ratio=0.1, weight_decay=1e-2, bn="frozen",
                label_smoothing=0.1, augment="shift", steps=steps, seed=seed)
    textbook = Strategy(tap=g, freeze=g, pool="avg", **probe)
    best_probe = Strategy(tap=best.group, freeze=best.group, pool="avgmax", **probe)
    recommended, reason = _quadrant_strategy(size, similarity, scores, train_images / num_classes, steps, seed)
    second = max((s for s in scores if s.group != best.group), key=lambda s: (s.probe_accuracy, s.logme))
    depth = min(2, best.group)
    candidates = [
        recommended,
        *([dataclasses.replace(recommended, class_weight="balanced")] if imbalanced else []),
        textbook,
        best_probe,
        Strategy(tap=best.group, freeze=0, pool="avgmax", **hand),
        Strategy(tap=second.group, freeze=second.group, pool="avgmax", **probe),
        Strategy(tap=best.group, freeze=best.group - depth, pool="avgmax", lr_ratio=0.3, **adapt),
        Strategy(tap=g, freeze=0, pool="avg", **hand),
    ]
    if space.unlabeled:
        candidates[1:1] = _unlabeled_candidates(recommended, best_probe, candidates[-1])
    first = list(dict.fromkeys(candidates))  # de-duplicated, in order
    taps = kept + [s.tap for s in first]  # the space holds every enqueued strategy
    space = dataclasses.replace(space, min_tap=min(taps), max_tap=max(taps))
    return Prior(scores=scores, num_classes=num_classes, train_images=train_images, size=size,
                 similarity=similarity, recommended=recommended, reason=reason, first_strategies=first, space=space)
