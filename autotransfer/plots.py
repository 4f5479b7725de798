"""Study -> PNG figures: Optuna's own plots, and pandas views of accuracy against each strategy knob.

A figure that the study cannot support yet (too few complete trials, no fine-tuning trial) is skipped with
a reason instead of failing the report. Call `matplotlib.use("Agg")` first where there is no display.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

logger = logging.getLogger(__name__)
# Parameters every trial has (conditional ones like lr_ratio would drop trials from these views).
SHARED_PARAMS = ("tap", "trainable_groups", "head", "pool", "probe_l2", "optimizer", "weight_decay", "augment")
DPI = 110
TARGET = "validation accuracy"  # the objective's name on Optuna's axes (instead of "Objective Value")


@dataclass(frozen=True)
class Plot:
    name: str  # file stem, e.g. "history"
    title: str  # what it shows, as a caption
    path: Path | None  # None when skipped
    note: str = ""  # why it was skipped


def _figure(axes):
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def _wide(fig, n: int):
    fig.set_size_inches(max(8.0, 1.1 * n + 3), 5.0)
    return fig


def _by(board: pd.DataFrame, column: str, title: str, labels: dict | None = None):
    """Box plot of validation accuracy per value of `column`, every trial drawn on top as a dot."""
    import matplotlib.pyplot as plt

    done = board[board.state == "complete"]
    keys = sorted({int(k) if isinstance(k, float) and k.is_integer() else k for k in done[column].dropna()})
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(keys) + 2), 3.8))
    groups = [done.loc[done[column] == k, "val_accuracy"] for k in keys]
    ax.boxplot(groups, showfliers=False, widths=0.5)
    for i, g in enumerate(groups, start=1):
        ax.plot([i] * len(g), g, "o", alpha=0.6, color="tab:blue", markersize=4)
    names = [f"{(labels or {}).get(k, k)}\nn={len(g)}" for k, g in zip(keys, groups, strict=True)]
    ax.set_xticks(range(1, len(keys) + 1), names, rotation=30 if len(keys) > 5 else 0)
    ax.set_xlabel(column)
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _tuned(board: pd.DataFrame) -> pd.DataFrame:
    """Complete trials that fine-tune at least one backbone group (the only ones with an LR ratio)."""
    return board[((board.state == "complete") & (board.freeze < board.tap)).fillna(False).astype(bool)]


def _lr_ratio(board: pd.DataFrame):
    import matplotlib.pyplot as plt

    tuned = _tuned(board)
    depth = (tuned.tap - tuned.freeze).astype(float)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    points = ax.scatter(tuned.lr_ratio, tuned.val_accuracy, c=depth, cmap="viridis", s=28)
    depth = sorted(depth.unique())
    fig.colorbar(points, ax=ax, label="groups fine-tuned", ticks=depth)
    ax.set_xscale("log")
    ax.set_xlabel("lr_ratio (lowest trainable group's LR / head LR)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy vs LR ratio (fine-tuning trials)")
    ax.grid(alpha=0.3)
    return fig


def _importances(study: optuna.Study):
    from optuna.visualization.matplotlib import plot_param_importances

    if not any(v > 0 for v in optuna.importance.get_param_importances(study).values()):
        raise _Skip("no parameter explains any variation of the accuracy yet")
    return _figure(plot_param_importances(study, target_name=TARGET))


class _Skip(Exception):
    """This figure has nothing to show for this study yet."""


def _over(plot: Callable, study: optuna.Study, params: list[str]):
    if not params:
        raise _Skip("no trial has Optuna parameters")
    return _figure(plot(study, params=params, target_name=TARGET))


def figures(study: optuna.Study, board: pd.DataFrame, group_names: tuple[str, ...] | None = None
            ) -> list[tuple[str, str, Callable, int]]:
    """(name, title, draw, complete trials needed) for every figure of the report, in report order."""
    from optuna.visualization.matplotlib import plot_optimization_history, plot_parallel_coordinate, plot_slice

    complete = int((board.state == "complete").sum())
    taps = {i + 1: f"{i + 1} {n}" for i, n in enumerate(group_names or ())}
    freezes = {0: "0 (none)", **{i + 1: f"{i + 1} (..{n})" for i, n in enumerate(group_names or ())}}
    params = [p for p in SHARED_PARAMS if any(p in t.params for t in study.get_trials(deepcopy=False))]
    return [
        ("history", "Optimization history: validation accuracy of each trial and the best so far",
         lambda: _figure(plot_optimization_history(study, target_name=TARGET)), 1),
        ("importances", f"Parameter importances (Optuna's default evaluator; from {complete} complete trials, "
         "so a rough guide until there are dozens)", lambda: _importances(study), 3),
        ("by_tap", "Validation accuracy by tap group (complete trials)",
         lambda: _by(board, "tap", "Validation accuracy by tap group", taps), 1),
        ("by_freeze", "Validation accuracy by freeze depth: groups kept pretrained (complete trials)",
         lambda: _by(board, "freeze", "Validation accuracy by freeze depth", freezes), 1),
        ("by_head", "Validation accuracy by head type (complete trials)",
         lambda: _by(board, "head", "Validation accuracy by head type"), 1),
        ("lr_ratio", "Validation accuracy vs LR ratio (complete fine-tuning trials; colour: groups fine-tuned)",
         lambda: _lr_ratio(board), 1),
        ("slice", "Slice plot: validation accuracy against each shared parameter",
         lambda: _over(plot_slice, study, params), 1),
        ("parallel", "Parallel coordinates of the shared parameters, coloured by validation accuracy",
         lambda: _wide(_over(plot_parallel_coordinate, study, params), len(params)), 2),
    ]


def write_plots(study: optuna.Study, board: pd.DataFrame, out: Path,
                group_names: tuple[str, ...] | None = None) -> list[Plot]:
    """Draw every figure of `figures` into `out/<name>.png`; a figure that cannot be drawn gets a note."""
    import matplotlib.pyplot as plt

    complete = int((board.state == "complete").sum())
    tuned = len(_tuned(board))
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, title, draw, needed in figures(study, board, group_names):
        note = ""
        if complete < needed:
            note = f"needs {needed} complete trial(s), the study has {complete}"
        elif name == "lr_ratio" and not tuned:
            note = "no complete trial fine-tunes a backbone group, so no LR ratio was used"
        if note:
            plots.append(Plot(name, title, None, note))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
                fig = draw()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
            plt.close(fig)
            plots.append(Plot(name, title, path))
        except (_Skip, ValueError, RuntimeError) as e:
            plt.close("all")
            logger.debug("plot %s skipped", name, exc_info=True)
            plots.append(Plot(name, title, None, str(e) or type(e).__name__))
    return plots
