"""Which of a finished study's tied-best trials generalise, and does an ensemble of distinct ones do better?

On few-shot data the validation split saturates: dozens of trials score 1.000 on 30-150 validation images and
the search cannot tell them apart. This script takes a finished search (its output folder, as the suite leaves
it) and the same data, retrains the first `--top` distinct strategies among the trials tied at the best
validation value (in trial order: the prior's recipes first), and prints for each its test accuracy and two
validation-only tie-break scores; then the test accuracy of ensembles (mean probabilities) of the first k.

    python benchmarks/selection.py --data benchmarks/.data/shapes --study benchmarks/.work/shapes/search

It trains on train only (as the search scored them), so it measures the choice, not the refit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import torch

from autotransfer.backbones import get_backbone
from autotransfer.calibration import validation_margin
from autotransfer.data import load_data
from autotransfer.device import configure_threads
from autotransfer.features import ActivationCache
from autotransfer.preprocess import normalise
from autotransfer.strategy import Strategy
from autotransfer.trainer import train_trial


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, mean, std) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalise(x[i:i + 128], mean, std)) for i in range(0, len(x), 128)])


def tied_strategies(study: optuna.Study, top: int) -> list[tuple[int, Strategy]]:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(t.value for t in complete)
    seen, picked = set(), []
    for t in sorted(complete, key=lambda t: t.number):
        s = Strategy.from_dict(t.user_attrs["strategy"])
        key = json.dumps({k: v for k, v in s.to_dict().items() if k != "seed"}, sort_keys=True)
        if t.value == best and key not in seen:
            seen.add(key)
            picked.append((t.number, s))
    return picked[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--study", type=Path, required=True, help="the search's output folder")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--trials", default=None, help="comma-separated trial numbers instead of the tied best")
    parser.add_argument("--save", type=Path, default=None, help="write every trial's val/test logits here (.pt)")
    args = parser.parse_args()
    configure_threads()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    resolution = args.study / "resolution.json"
    size = json.loads(resolution.read_text())["chosen"] if resolution.is_file() else None
    data = load_data(args.data, image_size=size)
    backbone = get_backbone("efficientnet_lite0", None)
    cache = ActivationCache(backbone, data, folder=args.study / "cache")
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{args.study / 'study.db'}")
    x_val, y_val = data.subset("val")
    x_test, y_test = data.subset("test")
    rows, probs, saved = [], [], []
    chosen = tied_strategies(study, args.top) if args.trials is None else [
        (int(n), Strategy.from_dict(study.trials[int(n)].user_attrs["strategy"])) for n in args.trials.split(",")]
    for number, s in chosen:
        model = train_trial(s, backbone, cache).model
        val, test = (_logits(model, x, backbone.mean, backbone.std) for x in (x_val, x_test))
        probs.append(test.softmax(1))
        saved.append({"trial": number, "val": val, "test": test})
        rows.append((number, s.describe(backbone.group_names), float((val.argmax(1) == y_val).float().mean()),
                     validation_margin(val, y_val).mean, float((test.argmax(1) == y_test).float().mean())))
        print(f"trial {number:3d}  val {rows[-1][2]:.4f}  margin {rows[-1][3]:.3f}  test {rows[-1][4]:.4f}  "
              f"{rows[-1][1]}", flush=True)
    if args.save is not None:
        torch.save({"y_val": y_val, "y_test": y_test, "trials": saved}, args.save)
    for k in range(1, len(probs) + 1):
        ensemble = torch.stack(probs[:k]).mean(0)
        print(f"ensemble of the first {k}: test {float((ensemble.argmax(1) == y_test).float().mean()):.4f}")
    by_margin = max(rows, key=lambda r: r[3])
    print(f"data={data.name} first={rows[0][4]:.4f} best_margin={by_margin[4]:.4f} (trial {by_margin[0]}) "
          f"oracle={max(r[4] for r in rows):.4f} mean={sum(r[4] for r in rows) / len(rows):.4f}")


if __name__ == "__main__":
    main()
