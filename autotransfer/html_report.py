"""The report folder: leaderboard tables, plots and one self-contained `report.html` (images inlined).

Everything is written into a temporary sibling folder that replaces `<out>/report/` only when complete
(`atomic.replacing_folder`), so a reader never sees a half-written report, and a running study can be
reported again at any time.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from autotransfer.artifacts import ArtifactStore, export_key, stored_file
from autotransfer.atomic import replacing_folder
from autotransfer.plots import Plot, write_plots
from autotransfer.report import leaderboard, recall_line, to_html, write_tables
from autotransfer.strategy import Strategy
from autotransfer.studies import SOURCE, group_names
from autotransfer.study import best_trial

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:right}
.scroll{overflow-x:auto}dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dt{color:#666}
figure{margin:1.5em 0}figure img{max-width:100%}figcaption{color:#555}.note{color:#a60}"""


@dataclass(frozen=True)
class ReportFiles:
    """What `write_report` wrote: the folder, the leaderboard in it, its plots (skipped ones too) and the best trial."""

    folder: Path  # <out>/report
    board: pd.DataFrame
    plots: list[Plot]
    best: dict[str, Any] | None  # best trial: number, value, strategy in words, test metrics if exported (or stored)


def _refit_note(test: dict[str, Any]) -> str:
    """The exported model is not the trial's own when it was refit on train+val (see `refit.py`)."""
    n = test.get("refits", 0)
    if n == 1:
        return "; the strategy refit once on train+val"
    distillation = test.get("distillation") or {}
    if distillation.get("shipped") == "student":
        return (f"; one student distilled from {n} refits on train+val (ensemble's test accuracy "
                f"{distillation['ensemble_test_accuracy']:.4f})")
    return f"; the strategy refit {n} times on train+val, averaged" if n else ""


def _test_metrics(out: Path, number: int) -> tuple[dict[str, Any] | None, Path | None]:
    """metrics.json of an export of trial `number` (search's best/, or export's trial_<N>/), if any."""
    for folder in (out / "best", out / f"trial_{number}"):
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if metrics.get("trial") == number:
            return metrics, folder
    return None, None


def _stored_metrics(study: optuna.Study, number: int, store: ArtifactStore | None) -> dict[str, Any] | None:
    """metrics.json of an export of trial `number` stored in the study's artifacts (made on any machine)."""
    prefix = export_key(number, 0).rsplit(":", 1)[0] + ":"
    for key in sorted((k for k in study.user_attrs if k.startswith(prefix)), reverse=True):  # most refits first
        raw = stored_file(store, study.user_attrs[key], "metrics.json")
        if raw is not None:
            return json.loads(raw)
    return None


def _best(study: optuna.Study, out: Path, store: ArtifactStore | None = None) -> dict[str, Any] | None:
    trial = best_trial(study)
    if trial is None:
        return None
    strategy = Strategy.from_dict(trial.user_attrs["strategy"]) if "strategy" in trial.user_attrs else None
    metrics, folder = _test_metrics(out, trial.number)
    if metrics is None:
        metrics = _stored_metrics(study, trial.number, store)
        folder = "(the study's artifacts)" if metrics is not None else None
    return {"trial": trial.number, "val_accuracy": trial.user_attrs.get("val_accuracy", trial.value),
            "metric": study.user_attrs.get("metric", "accuracy"), "val_score": trial.value,
            "description": strategy.describe(group_names(study)) if strategy else "(no strategy recorded)",
            "strategy": strategy.to_dict() if strategy else {}, "test": metrics, "export": folder}


def _facts(study: optuna.Study, board: pd.DataFrame, storage: str | None) -> dict[str, str]:
    source = study.user_attrs.get(SOURCE, {})
    counts = board.state.value_counts()
    prior = study.user_attrs.get("prior", {})
    facts = {"study": study.study_name, "storage": storage or "",
             "data": f"{source.get('data', '?')} (image size {source.get('image_size', '?')}, seed "
                     f"{source.get('seed', '?')})" if source else str(study.user_attrs.get("data", "?")),
             "backbone": f"{study.user_attrs.get('backbone', '?')} (weights {study.user_attrs.get('weights', '?')})",
             "trials": ", ".join(f"{n} {s}" for s, n in counts.items()) or "none",
             "prior": f"{prior.get('quadrant')}: {prior.get('reason')}" if prior else "",
             "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    return {k: v for k, v in facts.items() if v}


def _best_html(best: dict[str, Any] | None) -> str:
    if best is None:
        return "<p class='note'>No complete trial yet.</p>"
    e = html.escape
    score = "" if best["metric"] == "accuracy" else f" ({e(best['metric'])} {best['val_score']:.4f}, the objective)"
    parts = [f"<p><b>Trial {best['trial']}</b>, validation accuracy <b>{best['val_accuracy']:.4f}</b>{score}: "
             f"{e(best['description'])}.</p>"]
    test = best["test"]
    if test:
        parts.append(f"<p>Test accuracy <b>{test['test_accuracy']:.4f}</b> on {test.get('test_images', '?')} held-out "
                     f"images, measured through onnxruntime on <code>{e(str(best['export']))}/model.onnx</code> (max "
                     f"|onnx - torch| {test.get('onnx_max_abs_diff', float('nan')):.1e}"
                     f"{', retrained from its strategy' if test.get('retrained') else ''}"
                     f"{_refit_note(test)}).</p>")
        if "test_per_class_recall" in test:
            parts.append(f"<p>{e(recall_line(test))}</p>")
    else:
        parts.append(f"<p class='note'>Test metrics: not measured yet (no export of trial {best['trial']} in this "
                     f"folder); run <code>autotransfer export --trial {best['trial']}</code>.</p>")
    settings = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in best["strategy"].items())
    return "\n".join(parts) + f"\n<details><summary>all settings</summary><dl>{settings}</dl></details>"


def _plot_html(plot: Plot) -> str:
    caption = html.escape(plot.title)
    if plot.path is None:
        return f"<p class='note'>{caption}: skipped ({html.escape(plot.note)}).</p>"
    data = base64.b64encode(plot.path.read_bytes()).decode()
    return (f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def render(study: optuna.Study, board: pd.DataFrame, plots: list[Plot], best: dict[str, Any] | None, *,
           storage: str | None = None, top: int = 10) -> str:
    """The report page: facts, best strategy in words with its test metrics, top `top` trials, plots."""
    e = html.escape
    facts = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _facts(study, board, storage).items())
    shown = f"top {min(top, len(board))} of {len(board)}" if len(board) > top else f"all {len(board)}"
    return "\n".join([
        "<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>autotransfer report: {e(study.study_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>autotransfer report: {e(study.study_name)}</h1><dl>{facts}</dl>",
        "<h2>Best strategy</h2>", _best_html(best),
        f"<h2>Leaderboard ({shown} trials; all in leaderboard.csv)</h2>",
        f"<div class='scroll'>{to_html(board.head(top))}</div>",
        "<h2>Plots</h2>", *(_plot_html(p) for p in plots), "</body></html>", ""])


def write_report(study: optuna.Study, out: Path, *, storage: str | None = None, top: int = 10,
                 store: ArtifactStore | None = None) -> ReportFiles:
    """Write `out/report/`: leaderboard.{csv,md,html,parquet,json}, the PNG plots and report.html.

    The best trial's test figures come from an export in `out`, else from one stored in the artifact `store`.
    """
    board = leaderboard(study)
    dest = out / "report"
    with replacing_folder(dest) as tmp:
        write_tables(board, tmp)
        plots = write_plots(study, board, tmp, group_names(study))
        best = _best(study, out, store)
        (tmp / "report.html").write_text(render(study, board, plots, best, storage=storage, top=top))
    plots = [Plot(p.name, p.title, dest / p.path.name if p.path else None, p.note) for p in plots]
    return ReportFiles(dest, board, plots, best)
