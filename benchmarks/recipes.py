"""The searched strategy against fixed transfer recipes, on the same split, per data set.

For each data set (the embedded default, and `digits_shifted`: inverted contrast and rotation, a real
domain shift built from sklearn's digits) this runs a budget-50 search and exports its best model
(test accuracy through onnxruntime), then trains five fixed recipes on the same split, each twice: on
train, and on train+val as the exported model is (after any choice that needs validation):

  (a) linear classifier on the final features      (b) the same on the best earlier group (ridge probe)
  (c) fast.ai-style: one frozen epoch, then all layers with a 100x LR spread (AdamW)
  (d) full fine-tune, SGD lr 0.01 momentum 0.9 wd 1e-4  (e) the quadrant recipe alone (`autotransfer recommend`)

    python benchmarks/recipes.py [--budget 50] [--max-steps N] [--seed 0] [--data digits digits_shifted]
    python benchmarks/recipes.py --data FOLDER --recipes-only --json FILE    # what benchmarks/suite.py runs

`--data` takes embedded names or folders (as `autotransfer search`); small images get the product's upscaling
choice. `--max-steps` is the search's and the fine-tuning recipes' optimizer steps (default: the product's
ladder from the data size) and `--seed` the seed of the split and the search, both as in `autotransfer search`.
`--recipes-only` skips the search; `--json FILE` writes {recipe: test accuracy}, the better of its two fits.

The search's "fit on train" column is its best trial as searched; its "fit on train+val" column is the
exported model (`--refit`, default 3 seeds averaged). A fixed recipe is one model, as a user would train it.

Last line: margin=<exported model's test acc - best recipe test acc over both fits> (worst over data sets).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import torch

from autotransfer.backbones import get_backbone
from autotransfer.data import load_data
from autotransfer.device import configure_threads
from autotransfer.features import TRAIN_AND_VAL, ActivationCache
from autotransfer.pipeline import finish_study
from autotransfer.prior import build_prior
from autotransfer.resolution import choose_resolution
from autotransfer.strategy import Strategy
from autotransfer.study import StudyConfig, default_storage, load_trial_model, open_study, run_study
from autotransfer.trainer import accuracy, train_trial


def recipes(prior, num_groups: int) -> dict[str, Strategy]:
    """The fixed recipes; the fine-tunes run the same optimizer steps as the search's (the prior's ladder)."""
    g, steps = num_groups, prior.space.max_steps
    earlier = max((s for s in prior.scores if s.group < g), key=lambda s: (s.probe_accuracy, s.logme))
    head = dict(head="linear", pool="avg")
    return {
        "(a) linear on final features": Strategy(tap=g, freeze=g, **head),
        f"(b) linear on {earlier.name}": Strategy(tap=earlier.group, freeze=earlier.group, **head),
        "(c) fast.ai-style fine-tune": Strategy(tap=g, freeze=0, optimizer="adamw", lr=1e-3, lr_ratio=0.01,
                                               weight_decay=1e-2, bn="train", steps=steps, **head),
        "(d) full fine-tune, SGD 0.01": Strategy(tap=g, freeze=0, optimizer="sgd", lr=0.01, lr_ratio=1.0,
                                                weight_decay=1e-4, bn="train", steps=steps, **head),
        "(e) quadrant recipe": prior.recommended,
    }


def load(name: str, seed: int, backbone):
    """The data as the search sees it: embedded name or folder, small images upscaled as the product chooses."""
    data = load_data(name, seed=seed)
    return choose_resolution(data, lambda size: load_data(name, image_size=size, seed=seed), backbone)[0]


def test_accuracy(strategy: Strategy, backbone, cache: ActivationCache, fit_split: str) -> tuple[float, float]:
    """(validation accuracy, test accuracy) of `strategy` trained on `fit_split`."""
    result = train_trial(strategy, backbone, cache, fit_split=fit_split)
    x, y = cache.split(0, "test")
    return result.val_accuracy, accuracy(result.model, x, y, cache)


def run_recipes(name: str, cache: ActivationCache, backbone, max_steps: int | None, seed: int) -> list[dict]:
    prior = build_prior(cache, max_steps=max_steps, seed=seed)
    print(f"{name}: quadrant {prior.quadrant}, {cache.data.image_size}px, fine-tunes {prior.space.max_steps} steps",
          flush=True)
    rows = []
    for label, strategy in recipes(prior, backbone.num_groups).items():
        start = time.perf_counter()
        val, test = test_accuracy(strategy, backbone, cache, "train")
        _, test_all = test_accuracy(strategy, backbone, cache, TRAIN_AND_VAL)
        rows.append({"data": name, "method": label, "val": val, "test, fit on train": test,
                     "test, fit on train+val": test_all, "seconds": time.perf_counter() - start})
        print(f"  {label:34s} val {val:.4f} test {test:.4f}, fit on train+val {test_all:.4f}", flush=True)
    return rows


def run(name: str, budget: int, max_steps: int | None, seed: int, folder: Path,
        recipes_only: bool = False) -> tuple[pd.DataFrame, float]:
    backbone = get_backbone("efficientnet_lite0")
    data = load(name, seed, backbone)
    folder.mkdir(parents=True)
    cache = ActivationCache(backbone, data, folder=folder / "cache")
    rows = []
    if not recipes_only:
        start = time.perf_counter()
        config = StudyConfig(study_name="bench", storage=default_storage(folder), out=folder, budget=budget,
                             max_steps=max_steps, seed=seed)
        study = run_study(config, backbone, cache, study=open_study(config, backbone=backbone,
                                                                     data_fingerprint=data.fingerprint))
        exported = finish_study(study, config, backbone, cache)
        m = exported.metrics
        searched, _ = load_trial_model(study, m["trial"], backbone, cache, folder)
        x, y = cache.split(0, "test")
        rows.append({"data": name, "method": f"search, budget {budget}; refit: exported ONNX",
                     "val": m["val_accuracy"], "test, fit on train": accuracy(searched, x, y, cache),
                     "test, fit on train+val": m["test_accuracy"], "seconds": time.perf_counter() - start})
        print(f"{name}: search best: trial {m['trial']} val {m['val_accuracy']:.4f} test "
              f"{rows[0]['test, fit on train']:.4f} as searched, {m['test_accuracy']:.4f} exported "
              f"({m['refits']} refits on train+val)", flush=True)
    rows += run_recipes(name, cache, backbone, max_steps, seed)
    table = pd.DataFrame(rows)
    tests = table[["test, fit on train", "test, fit on train+val"]]
    margin = math.nan if recipes_only else table["test, fit on train+val"].iloc[0] - tests.iloc[1:].to_numpy().max()
    return table, margin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", nargs="+", default=["digits", "digits_shifted"])
    parser.add_argument("--recipes-only", action="store_true", help="skip the search")
    parser.add_argument("--json", type=Path, default=None, help="write the recipes' test accuracies here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    configure_threads()
    torch.manual_seed(0)
    tables, margins = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.data):
            table, margin = run(name, args.budget, args.max_steps, args.seed, Path(tmp) / str(i), args.recipes_only)
            tables.append(table)
            margins.append(margin)
    table = pd.concat(tables)
    print()
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if args.json is not None:
        recipe_rows = table[~table.method.str.startswith("search")]
        args.json.write_text(json.dumps({r.method: max(r["test, fit on train"], r["test, fit on train+val"])
                                         for _, r in recipe_rows.iterrows()}, indent=2) + "\n")
    if args.recipes_only:
        return
    for name, margin in zip(args.data, margins, strict=True):
        print(f"{name}: margin {margin:+.4f}")
    print(f"max_steps={args.max_steps} seed={args.seed}")
    print(f"margin={min(margins):.4f}")


if __name__ == "__main__":
    main()
