"""The transferred network: the first `tap` backbone groups, a global pool and a head, as one module."""

from __future__ import annotations

import copy

import torch
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.heads import GlobalPool, build_head, pooled_dim
from autotransfer.strategy import Strategy


class TransferModel(nn.Module):
    """`groups[:tap]` -> pool -> head. Input: normalised images [N,3,H,W]; output: logits [N,classes]."""

    def __init__(self, groups: nn.ModuleList, pool: GlobalPool, head: nn.Module, *, freeze: int) -> None:
        super().__init__()
        self.groups, self.pool, self.head = groups, pool, head
        self.freeze = freeze  # groups[:freeze] keep pretrained weights and BatchNorm statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run from the input of group `start` (e.g. cached activations at that boundary) to the logits."""
        return self.head(self.features_from(x, start))

    def features_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run from the input of group `start` to the pooled features the head reads."""
        for g in self.groups[start:]:
            x = g(x)
        return self.pool(x)

    def train(self, mode: bool = True) -> TransferModel:
        """Frozen groups stay in eval mode, so their BatchNorm running statistics never move."""
        super().train(mode)
        for g in self.groups[: self.freeze]:
            g.eval()
        return self


def build_model(strategy: Strategy, backbone: Backbone, num_classes: int) -> TransferModel:
    """Fresh copy of the backbone's first `tap` groups plus a new head, frozen groups without gradients."""
    groups = nn.ModuleList(copy.deepcopy(backbone.groups[i]) for i in range(strategy.tap))
    for g in groups[: strategy.freeze]:
        g.requires_grad_(False)
    in_dim = pooled_dim(backbone.channels[strategy.tap - 1], strategy.pool)
    head = build_head(strategy.head, in_dim, num_classes, hidden=strategy.mlp_hidden, dropout=strategy.dropout)
    return TransferModel(groups, GlobalPool(strategy.pool), head, freeze=strategy.freeze)
