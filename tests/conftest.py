"""Shared fixtures: a tiny 3-group CNN registered as a backbone, and digits at 16 px, so tests run in seconds.

The suite runs quiet: progress is off (also in the CLI subprocesses it starts, which inherit the environment);
a test of progress turns it on with `monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")`.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from autotransfer.backbones import _REGISTRY, Backbone, register_backbone
from autotransfer.data import load_data
from autotransfer.features import ActivationCache

TINY = "tiny_test_cnn"


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def tiny_backbone(weights: str | None = None) -> Backbone:
    torch.manual_seed(0)
    groups = nn.ModuleList([_block(3, 8, 2), _block(8, 16, 2), _block(16, 24, 1)])
    if weights not in (None, "random"):
        groups.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():  # give BatchNorm non-trivial running statistics, like a pretrained net
        for g in groups:
            g[1].running_mean.uniform_(-0.1, 0.1)
            g[1].running_var.uniform_(0.5, 1.5)
    return Backbone(name=TINY, groups=groups, group_names=("g1", "g2", "g3"), channels=(8, 16, 24),
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), weights_id="tiny-seed0")


if TINY not in _REGISTRY:
    register_backbone(TINY, weights_source="test fixture", num_groups=3)(tiny_backbone)


@pytest.fixture(scope="session")
def digits16():
    return load_data("digits", image_size=16, seed=0)


def write_imbalanced_digits(folder, *, common: int = 60, rare: int = 12) -> str:
    """Digits as PNG class folders: `common` images of each of 0-4, `rare` of each of 5-9 (train split 42 vs 8)."""
    import numpy as np
    from PIL import Image

    from autotransfer.data import load_data as load

    digits = load("digits", image_size=16, seed=0)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(digits.labels.numpy() == c)[:common if c < 5 else rare]
        for i in rows:
            Image.fromarray(digits.images[i].permute(1, 2, 0).numpy()).save(folder / str(c) / f"{i}.png")
    return str(folder)


@pytest.fixture(scope="session")
def imbalanced16(tmp_path_factory):
    return load_data(write_imbalanced_digits(tmp_path_factory.mktemp("imbalanced")), image_size=16, seed=0)


@pytest.fixture()
def tiny():
    return tiny_backbone()


@pytest.fixture()
def tiny_cache(tiny, digits16):
    return ActivationCache(tiny, digits16)


def pytest_configure(config):
    """Set here, not at import: `tests.tiny_cli` imports this module in subprocesses that may turn progress on."""
    os.environ["AUTOTRANSFER_PROGRESS"] = "0"
    os.environ.pop("AUTOTRANSFER_PROGRESS_INTERVAL", None)


def pytest_collection_modifyitems(config, items):
    """Fast tests first, the end-to-end suite (real Lite0 weights) after them."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)
