"""Study -> tidy leaderboard (a pure function), the writers that put it on disk, `trial_line`, the
one-line summary of a trial that `search` and its workers print as trials finish, and `recall_line`, the one
line on an export's per-class test recall.

Columns (stable; `COLUMNS`): `rank` (1.. for complete trials, empty otherwise), `trial` (Optuna trial
number), `state` (complete, pruned, fail, running), `val_score` (the objective value in the study's metric, see
`metrics.py`; for pruned and running trials the last reported one; with `--unlabeled`, the mean of the
validation score and `reverse_accuracy`), `val_accuracy` (plain validation accuracy; the same as `val_score` in a
study whose metric is accuracy), `val_margin` (orders equal scores, see `ranking.py`), `reverse_accuracy`
and `reverse_margin` (reverse validation on the unlabelled images, see `adapt.py`; empty without them), one
column per `Strategy` field (tap, freeze, pool, head, ..., class_weight, steps, seed),
`steps_run` (optimizer steps of a fine-tune; 0 for a head fitted to convergence), `pruned_at` (steps run when
pruned, empty otherwise), `seconds`, `note` (why it failed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd

from autotransfer.atomic import replacing_file
from autotransfer.ranking import ranked
from autotransfer.strategy import Strategy

STRATEGY_COLUMNS = [f for f in Strategy.__dataclass_fields__]
# Whole-number fields stay whole numbers (nullable) even when a failed trial has no strategy.
_INT_COLUMNS = {f.name: "Int64" for f in Strategy.__dataclass_fields__.values() if f.type in ("int", int)}
COLUMNS = ["rank", "trial", "state", "val_score", "val_accuracy", "val_margin", "reverse_accuracy", "reverse_margin",
           *STRATEGY_COLUMNS, "steps_run", "pruned_at", "seconds", "note"]
TABLE_FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.html", "leaderboard.parquet", "leaderboard.json")


def _row(t: optuna.trial.FrozenTrial, metric: str) -> dict:
    value = t.value if t.value is not None else (
        t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
    note = t.user_attrs.get("fail_reason") or ""
    steps = t.user_attrs.get("steps_run")
    accuracy = t.user_attrs.get("val_accuracy", value if metric == "accuracy" else None)
    return {"trial": t.number, "state": t.state.name.lower(), "val_score": value, "val_accuracy": accuracy,
            "val_margin": t.user_attrs.get("val_margin"), "reverse_accuracy": t.user_attrs.get("reverse_accuracy"),
            "reverse_margin": t.user_attrs.get("reverse_margin"),
            **t.user_attrs.get("strategy", {}), "steps_run": steps,
            "pruned_at": steps if t.state == optuna.trial.TrialState.PRUNED else None,
            "seconds": t.user_attrs.get("seconds"), "note": str(note).splitlines()[0][:120] if note else ""}


def trial_line(trial: optuna.trial.FrozenTrial, backbone, best: optuna.trial.FrozenTrial | None = None) -> str:
    """One line per finished trial: number, state, accuracy (and the best so far), seconds, strategy, why it failed.

    `backbone` names the groups in the strategy's description (anything with `group_names`).
    """
    described = Strategy.from_dict(trial.user_attrs["strategy"]).describe(backbone.group_names) \
        if "strategy" in trial.user_attrs else ""
    value = f"{trial.value:.4f}" if trial.value is not None else "  -   "
    best_text = f" (best {best.value:.4f})" if best is not None else ""
    reason = trial.user_attrs.get("fail_reason")
    reverse = trial.user_attrs.get("reverse_accuracy")
    value += f" (val {trial.user_attrs['val_score']:.4f}, reverse {reverse:.4f})" if reverse is not None else ""
    return (f"trial {trial.number:3d} {trial.state.name.lower():8s} val {value}{best_text}  "
            f"{trial.user_attrs.get('seconds', 0):6.1f}s  {described}{f'  [{reason}]' if reason else ''}")


def recall_line(metrics: dict, worst: int = 5) -> str:
    """Test balanced accuracy and the classes with the lowest test recall (all of them when there are few)."""
    recall = {c: r for c, r in metrics.get("test_per_class_recall", {}).items() if r is not None}
    if not recall:
        return "per-class test recall: no test images"
    lowest = sorted(recall.items(), key=lambda item: (item[1], item[0]))[:worst]
    which = "per-class test recall" if len(recall) <= worst else f"lowest test recall ({worst} of {len(recall)})"
    return (f"test balanced accuracy {metrics['test_balanced_accuracy']:.4f}, macro F1 "
            f"{metrics['test_macro_f1']:.4f}; "
            f"{which}: " + ", ".join(f"{c} {r:.3f}" for c, r in lowest) + "  (all in metrics.json)")


def leaderboard(study: optuna.Study | str, storage: str | None = None) -> pd.DataFrame:
    """One row per trial, best first, with the columns in `COLUMNS` (see the module docstring).

    Complete trials are ranked as `study.best_trial` ranks them (`ranking.ranked`: `val_score`, the study's
    metric, then `val_margin` within its standard error, then the earlier trial); pruned, failed and
    running trials follow, unranked. `study` is an Optuna study or a study name, which is looked up like
    `autotransfer report` does (default storage `studies/<name>/study.db`).

    Example:
        >>> board = autotransfer.leaderboard("digits")
        >>> board[board.state == "complete"].groupby("head").val_accuracy.max()
    """
    if isinstance(study, str):
        from autotransfer.studies import load

        study, _ = load(study, storage)
    metric = study.user_attrs.get("metric", "accuracy")  # studies from before `--metric` were scored by accuracy
    rows = [_row(t, metric) for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING]
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    df = df.astype({"trial": "int64", "val_score": "float64", "val_accuracy": "float64", "val_margin": "float64",
                    "reverse_accuracy": "float64", "reverse_margin": "float64", **_INT_COLUMNS, "steps_run": "Int64",
                    "pruned_at": "Int64", "seconds": "float64"})
    position = {t.number: i for i, t in enumerate(ranked(study.get_trials(deepcopy=False)))}
    df["_order"] = [position.get(n, len(position)) for n in df["trial"]]  # complete trials, then the rest
    df = df.sort_values(["_order", "val_score", "trial"], ascending=[True, False, True], na_position="last")
    df = df.drop(columns="_order").reset_index(drop=True)
    df.insert(0, "rank", pd.array([i + 1 if c else pd.NA for i, c in enumerate(df["state"] == "complete")],
                                  dtype="Int64"))
    return df


def _blank(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype(object).where(df.notna(), "")


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown table with empty cells (not `<NA>`) for unranked trials and unset values."""
    return _blank(df).to_markdown(index=False, floatfmt=".4g")


def to_html(df: pd.DataFrame) -> str:
    """An HTML <table> (no page around it), empty cells for unset values, 4 significant digits."""
    return _blank(df).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="leaderboard",
                              escape=True)


def _write_files(out: Path, writers: dict[str, Callable[[Path], object]]) -> list[Path]:
    """Each `writers[name](path)` writes a temporary file that then replaces `out/name` (`replacing_file`)."""
    for name, write in writers.items():
        with replacing_file(out / name) as tmp:
            write(tmp)
    return [out / name for name in writers]


def write_leaderboard(df: pd.DataFrame, out: Path) -> list[Path]:
    """leaderboard.csv and leaderboard.md in `out`; written to temporary files first, then renamed."""
    return _write_files(out, {"leaderboard.csv": lambda p: df.to_csv(p, index=False),
                              "leaderboard.md": lambda p: p.write_text(to_markdown(df) + "\n")})


def write_tables(df: pd.DataFrame, out: Path) -> list[Path]:
    """The leaderboard as CSV, Markdown, HTML, Parquet and JSON (records; null for unset) in `out`."""
    html = f"<!doctype html>\n<meta charset='utf-8'>\n<title>leaderboard</title>\n{to_html(df)}\n"
    return write_leaderboard(df, out) + _write_files(out, {
        "leaderboard.html": lambda p: p.write_text(html),
        "leaderboard.parquet": lambda p: df.to_parquet(p, index=False),
        "leaderboard.json": lambda p: df.to_json(p, orient="records", indent=2)})
