"""`autotransfer recommend`: the size x similarity quadrant, per-group scores and the first trials."""

from __future__ import annotations

import argparse
from pathlib import Path

from autotransfer.cli.arguments import add_data_arguments, add_max_steps_argument
from autotransfer.cli.common import Command, prepare


class Recommend(Command):
    """Measure DATA against the backbone and print the size x similarity quadrant and what to try first.

    One forward pass caches the activations of every group (kept in --out for a later `search`); each
    group's pooled activations then get a LogME score and a ridge-probe validation accuracy.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("data", nargs="?", default="digits", help="folder, CSV or embedded name (default: digits)")
        parser.add_argument("--backbone", default="efficientnet_lite0", help="see `autotransfer backbones`")
        parser.add_argument("--weights", default=None, help="state dict for the backbone (default: bundled/cache)")
        parser.add_argument("--out", type=Path, default=None, help="output folder (default: studies/<data name>)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
        add_max_steps_argument(parser)
        add_data_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        import pandas as pd

        from autotransfer.prior import SIMILAR_MARGIN, SMALL_PER_CLASS, build_prior

        backbone, cache, _, _ = prepare(args)
        data = cache.data
        prior = build_prior(cache, max_steps=args.max_steps, seed=args.seed)
        table = pd.DataFrame([vars(s) for s in prior.scores]).rename(columns={"probe_accuracy": "probe_val_acc"})
        print(f"{data.name}: {len(data.labels)} images, {prior.num_classes} classes, {prior.images_per_class:.0f} "
              f"training images per class; backbone {backbone.name}")
        print(table.to_markdown(index=False, floatfmt=".4f"))
        print(f"\nquadrant: {prior.quadrant} (small: < {SMALL_PER_CLASS} training images per class; similar: final "
              f"features within {SIMILAR_MARGIN:.0%} of the best group's probe)")
        print(f"recommended: {prior.recommended.describe(backbone.group_names)}\nwhy: {prior.reason}")
        low, high = prior.space.tap_range
        print(f"search space: taps {backbone.group_names[low - 1]}..{backbone.group_names[high - 1]}, "
              f"fine-tunes run {prior.space.max_steps} optimizer steps")
        print("the search tries first:")
        for i, s in enumerate(prior.first_strategies):
            print(f"  {i}. {s.describe(backbone.group_names)}")
        return 0
