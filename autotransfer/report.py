"""Study -> tidy leaderboard (a pure function), and the writers that put it on disk."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

from autotransfer.strategy import Strategy

STRATEGY_COLUMNS = [f for f in Strategy.__dataclass_fields__]
COLUMNS = ["rank", "trial", "state", "val_accuracy", *STRATEGY_COLUMNS, "epochs_run", "seconds", "note"]


def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, best first: rank, trial, state, val_accuracy, every strategy field, epochs, seconds.

    Complete trials are ranked by validation accuracy (ties: earlier trial first); pruned, failed and
    running trials follow, unranked, with their last reported accuracy where there is one.
    """
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        note = t.user_attrs.get("fail_reason") or ""
        rows.append({"trial": t.number, "state": t.state.name.lower(), "val_accuracy": value,
                     **t.user_attrs.get("strategy", {}), "epochs_run": t.user_attrs.get("epochs_run"),
                     "seconds": t.user_attrs.get("seconds"), "note": str(note).splitlines()[0][:120] if note else ""})
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    complete = df["state"] == "complete"
    df["_order"] = (~complete).astype(int)
    df = df.sort_values(["_order", "val_accuracy", "trial"], ascending=[True, False, True], na_position="last")
    df = df.drop(columns="_order").reset_index(drop=True)
    df.insert(0, "rank", pd.array([i + 1 if c else pd.NA for i, c in enumerate(df["state"] == "complete")],
                                  dtype="Int64"))
    return df


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown table with empty cells (not `<NA>`) for unranked trials and unset values."""
    return df.astype(object).where(df.notna(), "").to_markdown(index=False, floatfmt=".4g")


def write_leaderboard(df: pd.DataFrame, out: Path) -> list[Path]:
    """leaderboard.csv and leaderboard.md in `out`; written to temporary files first, then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "leaderboard.csv", out / "leaderboard.md"]
    tmp_csv, tmp_md = (p.with_name(f".{p.name}.tmp") for p in paths)
    df.to_csv(tmp_csv, index=False)
    tmp_md.write_text(to_markdown(df) + "\n")
    tmp_csv.replace(paths[0])
    tmp_md.replace(paths[1])
    return paths
