"""The benchmark suite: autotransfer's search against fixed recipes and two peers, on seven data sets.

Every cell (data set x column) trains on the same train/val/test folders, built by `suite_data.py` from
data that installed packages ship (see `python benchmarks/suite_data.py` for the table: 8 to 128 px,
10 to 240 training images per class, grey scans, photos, textures, rendered and drawn images, three sets
whose test images come from fonts, regions/lighting or a drawing style that train never shows).

Columns (test accuracy on the data set's test folder):

  search         `python -m autotransfer search DATA --budget 50 --seed 0 --out WORK/<data>/search`, the
                 exported ONNX model's test accuracy through onnxruntime (`best/metrics.json`), wall time
                 of the whole command (search + refits + export)
  recipes        `python benchmarks/recipes.py --data DATA --recipes-only --json FILE --seed 0`: one column
                 per recipe label in the JSON it writes
  hand           the hand fine-tune (f) of `peers.py`: all layers, AdamW 1e-3/1e-4, frozen BN statistics,
                 label smoothing 0.1, random shifts, 50 epochs, batch 32, 64 px for images under 64 px
  fastai         fastai's `fine_tune` + `lr_find` valley + `aug_transforms`, epochs from {5, 10, 20} on
                 validation, the same Lite0 weights with BatchNorm momentum 0.1 (`peers.py`)
  fastai_bn0.01  the same with the port's TensorFlow BatchNorm momentum 0.01

Each cell runs as its own subprocess (a crash or a hang costs one cell: `--cell-timeout`) with its log in
WORK/<data>/<column>.log. Finished cells are appended to a JSON-lines file (default
benchmarks/results/suite.jsonl: data, column, status, test_accuracy, val_accuracy, seconds, date,
settings, detail) and skipped when the suite runs again with the same settings; `--redo` reruns them.
A search cell always starts from an empty output folder, so its wall time is one whole search.

The whole suite takes hours on 2 CPU cores (each budget-50 search is tens of minutes; each fastai cell
trains three fine-tunes). Run parts of it:

    python benchmarks/suite.py                                  # everything not yet done
    python benchmarks/suite.py --data glyphs,textures --columns search,hand
    python benchmarks/suite.py --list                           # cells and their status, runs nothing
    python benchmarks/suite.py --report                         # only the tables from the results file
    python benchmarks/suite.py --data shapes --budget 3 --hand-epochs 1 --fastai-epochs 1 \\
        --results /tmp/smoke.jsonl --work /tmp/smoke           # a smoke run: minutes

It ends with two tables (test accuracy; wall minutes, with the search's time over fastai's) and the line

    suite_margin=<worst over data sets of (search - best other column)> mean_gain=<mean of the same>

over the data sets where the search and at least one other column finished (the line before it says how
many).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import suite_data  # noqa: E402  (a sibling module, not a package)

from autotransfer.defaults import DEFAULT_PATIENCE  # noqa: E402

COLUMNS = ("search", "recipes", "hand", "fastai", "fastai_bn0.01")
PEER_COLUMNS = ("hand", "fastai", "fastai_bn0.01")
FASTAI_MISSING = "fastai not installed: pip install -e '.[bench]'"
EXIT_MISSING = 3  # peers.py's exit status when its optional dependency is missing
DEFAULT_RESULTS = HERE / "results" / "suite.jsonl"
DEFAULT_WORK = HERE / ".work"


# --- cells ----------------------------------------------------------------------------------------------


def settings(column: str, args: argparse.Namespace, data: str) -> dict:
    """What a cell's result depends on besides its data and column; a stored cell counts only if they match."""
    version = suite_data.SPECS[data].version
    if column == "search":
        return dict(data_version=version, seed=args.seed, budget=args.budget, max_steps=args.max_steps,
                    refit=args.refit, timeout=args.search_timeout, image_size=args.image_size,
                    patience=args.patience)
    if column == "recipes":
        return dict(data_version=version, seed=args.seed, max_steps=args.max_steps)
    if column == "hand":
        return dict(data_version=version, seed=args.seed, epochs=args.hand_epochs)
    return dict(data_version=version, seed=args.seed, epochs=list(args.fastai_epochs))


def command(column: str, data_dir: Path, out: Path, args: argparse.Namespace) -> list[str]:
    py = sys.executable
    if column == "search":
        cmd = [py, "-m", "autotransfer", "search", str(data_dir), "--budget", str(args.budget), "--out", str(out),
               "--seed", str(args.seed), "--patience", str(args.patience)]
        for flag, value in (("--max-steps", args.max_steps), ("--refit", args.refit),
                            ("--timeout", args.search_timeout), ("--image-size", args.image_size)):
            if value is not None:
                cmd += [flag, str(value)]
        return cmd
    if column == "recipes":
        cmd = [py, str(HERE / "recipes.py"), "--data", str(data_dir), "--recipes-only", "--json", str(out),
               "--seed", str(args.seed)]
        return cmd + (["--max-steps", str(args.max_steps)] if args.max_steps is not None else [])
    cmd = [py, str(HERE / "peers.py"), column, str(data_dir), "--seed", str(args.seed), "--json", str(out)]
    if column == "hand":
        cmd += ["--epochs", str(args.hand_epochs)]
    else:
        cmd += ["--fastai-epochs", ",".join(map(str, args.fastai_epochs))]
    return cmd + (["--threads", str(args.cpus)] if args.cpus else [])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _run(cmd: list[str], log: Path, timeout: float, cpus: int | None) -> tuple[int | None, float]:
    """Run `cmd` in its own process group with output to `log`; (exit status or None on timeout, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def limit() -> None:  # the product sizes its threads from the affinity mask
        if cpus and allowed:
            os.sched_setaffinity(0, allowed[:cpus])

    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=limit if cpus else None)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return None, time.perf_counter() - start
        except BaseException:  # Ctrl-C: stop the cell's processes, record nothing
            _stop(proc)
            raise
    return rc, time.perf_counter() - start


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def run_cell(data: str, column: str, args: argparse.Namespace) -> dict:
    """Run one cell; returns its record (status ok, failed, timeout or missing)."""
    data_dir = suite_data.ensure(data, args.data_root)
    work = args.work / data
    log = work / f"{column}.log"
    record = dict(data=data, column=column, test_accuracy=None, val_accuracy=None, seconds=None,
                  date=dt.datetime.now().astimezone().isoformat(timespec="seconds"), status="failed",
                  settings=settings(column, args, data), detail={})
    if column.startswith("fastai") and importlib.util.find_spec("fastai") is None:
        print(f"  {data} / {column}: {FASTAI_MISSING}", flush=True)
        return {**record, "status": "missing", "detail": {"message": FASTAI_MISSING}}
    if column == "search":
        out = work / "search"
        shutil.rmtree(out, ignore_errors=True)  # a fresh study: the wall time is one whole search
    else:
        out = work / f"{column}.json"
        out.unlink(missing_ok=True)
    rc, seconds = _run(command(column, data_dir, out, args), log, args.cell_timeout, args.cpus)
    record["seconds"] = round(seconds, 1)
    record["detail"]["log"] = str(log)
    if rc is None:
        return {**record, "status": "timeout",
                "detail": {**record["detail"], "message": f"killed after --cell-timeout {args.cell_timeout:g}s"}}
    if rc == EXIT_MISSING and column in PEER_COLUMNS:
        return {**record, "status": "missing", "detail": {**record["detail"], "message": _tail(log, 3)}}
    if rc != 0:
        return {**record, "detail": {**record["detail"], "message": f"exit status {rc}: {_tail(log)}"}}
    try:
        if column == "search":
            m = json.loads((out / "best" / "metrics.json").read_text())
            record.update(test_accuracy=m["test_accuracy"], val_accuracy=m.get("val_accuracy"))
            record["detail"].update({k: m.get(k) for k in ("trial", "refits", "trained_on", "test_images")})
            record["detail"]["out"] = str(out)
        elif column == "recipes":
            scores = _flatten(json.loads(out.read_text()))
            if not scores:
                raise ValueError(f"{out} holds no recipe accuracies")
            record["test_accuracy"] = max(scores.values())
            record["detail"]["recipes"] = scores
        else:
            r = json.loads(out.read_text())
            record.update(test_accuracy=r["test_accuracy"], val_accuracy=r["val_accuracy"])
            record["detail"].update(r.get("detail", {}), peer_seconds=r.get("seconds"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {**record, "detail": {**record["detail"], "message": f"finished but unreadable result: {e!r}"}}
    record["status"] = "ok"
    return record


def _flatten(obj, prefix: str = "") -> dict[str, float]:
    """{label: accuracy} from recipes.py's JSON; nested dicts become 'outer / inner' labels."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object of recipe label -> test accuracy, got {type(obj).__name__}")
    out: dict[str, float] = {}
    for k, v in obj.items():
        label = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{label} / "))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[label] = float(v)
    return out


# --- results file ---------------------------------------------------------------------------------------


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                print(f"warning: {path}:{i} is not JSON, ignored", file=sys.stderr)
    return records


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def latest(records: list[dict], args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """The last record of each cell whose settings are the current ones."""
    out = {}
    for r in records:
        key = (r.get("data"), r.get("column"))
        stored = r.get("settings")
        if key[1] == "search" and isinstance(stored, dict):
            stored = {"patience": 0, **stored}  # cells from before `--patience` ran the whole budget
        if key[0] in suite_data.SPECS and key[1] in COLUMNS and stored == settings(key[1], args, key[0]):
            out[key] = r
    return out


def stale(records: list[dict], args: argparse.Namespace) -> set[tuple[str, str]]:
    current = latest(records, args)
    return {(r.get("data"), r.get("column")) for r in records} - set(current)


# --- tables ---------------------------------------------------------------------------------------------


def _cell_text(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["status"] == "ok":
        return f"{r['test_accuracy']:.4f}"
    return {"timeout": "timeout", "missing": "missing"}.get(r["status"], "FAIL")


def tables(done: dict, names: list[str], columns: list[str]):
    """(accuracy table, time table, per-data-set gains) as pandas objects."""
    import pandas as pd

    recipe_labels: list[str] = []
    for n in names:
        r = done.get((n, "recipes"))
        if r is not None and r["status"] == "ok":
            recipe_labels += [label for label in r["detail"]["recipes"] if label not in recipe_labels]
    acc_rows, time_rows, gains = [], [], {}
    for n in names:
        row: dict[str, object] = {"data": n}
        scores: dict[str, float] = {}
        for c in columns:
            r = done.get((n, c))
            if c == "recipes":
                ok = r is not None and r["status"] == "ok"
                for label in recipe_labels:
                    value = r["detail"]["recipes"].get(label) if ok else None
                    row[label] = f"{value:.4f}" if value is not None else ("-" if ok or r is None else _cell_text(r))
                    if value is not None:
                        scores[label] = value
                if not recipe_labels:
                    row["recipes"] = _cell_text(r)
            else:
                row[c] = _cell_text(r)
                if r is not None and r["status"] == "ok":
                    scores[c] = r["test_accuracy"]
        others = {k: v for k, v in scores.items() if k != "search"}
        if "search" in scores and others:
            best = max(others, key=others.get)
            gains[n] = (scores["search"] - others[best], best)
            row["search - best other"] = f"{gains[n][0]:+.4f} ({best})"
        else:
            row["search - best other"] = "-"
        acc_rows.append(row)
        trow: dict[str, object] = {"data": n}
        for c in columns:
            r = done.get((n, c))
            trow[c] = f"{r['seconds'] / 60:.1f}" if r is not None and r.get("seconds") is not None else "-"
        s, f = done.get((n, "search")), done.get((n, "fastai"))
        if s and f and s["status"] == f["status"] == "ok" and f.get("seconds"):
            trow["search / fastai time"] = f"{s['seconds'] / f['seconds']:.2f}x"
        else:
            trow["search / fastai time"] = "-"
        time_rows.append(trow)
    return pd.DataFrame(acc_rows), pd.DataFrame(time_rows), gains


def short_labels(labels) -> dict[str, str]:
    """'(c) fast.ai-style fine-tune / train+val' -> '(c) train+val': recipe labels that start with a tag."""
    short = {}
    for label in labels:
        head, _, tail = label.partition(" / ")
        tag = head.split(" ", 1)[0]
        s = tag + (f" {tail}" if tail else "") if tag.startswith("(") and tag.endswith(")") else label
        short[label] = s if s not in short.values() else label
    return short


def report(done: dict, names: list[str], columns: list[str], args: argparse.Namespace) -> None:
    acc, wall, gains = tables(done, names, columns)
    recipe_columns = [c for c in acc.columns if c not in ("data", "search - best other", *COLUMNS)]
    short = short_labels(recipe_columns)
    acc = acc.rename(columns=short)
    gains_text = acc["search - best other"].astype(str)
    for long, s in short.items():
        gains_text = gains_text.str.replace(f"({long})", f"({s})", regex=False)
    acc["search - best other"] = gains_text
    print(f"\nTest accuracy (search: budget {args.budget}, seed {args.seed}; hand: {args.hand_epochs} epochs; "
          f"fastai: epochs from {{{', '.join(map(str, args.fastai_epochs))}}} on val)")
    print(acc.to_markdown(index=False, disable_numparse=True))
    tags = {}
    for long, s in short.items():
        if s != long:
            tags.setdefault(s.split(" ", 1)[0], long.partition(" / ")[0].split(" ", 1)[1])
    if tags:
        print("recipes (benchmarks/recipes.py): " + "; ".join(f"{t} {d}" for t, d in tags.items()))
    print("\nWall time, minutes (each cell a subprocess; recipes = all recipes of the data set)")
    print(wall.to_markdown(index=False, disable_numparse=True))
    problems = [r for r in done.values() if r["status"] != "ok" and r["data"] in names and r["column"] in columns]
    for r in problems:
        message = r.get("detail", {}).get("message", "").strip().splitlines()
        print(f"{r['data']} / {r['column']}: {r['status']}: {message[-1] if message else ''}")
    if gains:
        values = [g for g, _ in gains.values()]
        margin, mean = min(values), sum(values) / len(values)
        print(f"\nmargin over {len(gains)} of {len(names)} data sets (those with search and another column): "
              + ", ".join(f"{n} {g:+.4f}" for n, (g, _) in gains.items()))
        print(f"suite_margin={margin:.4f} mean_gain={mean:.4f}")
    else:
        print(f"\nmargin over 0 of {len(names)} data sets (none has both search and another column)")
        print("suite_margin=nan mean_gain=nan")


def list_cells(cells: list[tuple[str, str]], done: dict, old: set, args: argparse.Namespace) -> None:
    import pandas as pd

    rows = []
    for data, column in cells:
        r = done.get((data, column))
        if r is None:
            status = "stale (other settings)" if (data, column) in old else "todo"
        else:
            status = r["status"] if r["status"] == "ok" or not args.skip_failed else f"{r['status']} (skipped)"
        message = (r or {}).get("detail", {}).get("message", "").strip().splitlines()
        rows.append(dict(data=data, column=column, status=status,
                         test_accuracy=f"{r['test_accuracy']:.4f}" if r and r.get("test_accuracy") is not None else "",
                         minutes=f"{r['seconds'] / 60:.1f}" if r and r.get("seconds") is not None else "",
                         date=(r or {}).get("date", ""), note=(message[-1][:80] if message else "")))
    print(pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True))


# --- main -----------------------------------------------------------------------------------------------


def _names(text: str | None, known, what: str, parser: argparse.ArgumentParser) -> list[str]:
    if not text:
        return list(known)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def _epochs_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch counts, e.g. 5,10,20; got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"epoch counts must be at least 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pick = parser.add_argument_group("which cells")
    pick.add_argument("--data", default=None,
                      help=f"comma-separated data sets (default: all: {', '.join(suite_data.SPECS)})")
    pick.add_argument("--columns", default=None, help=f"comma-separated columns (default: all: {', '.join(COLUMNS)})")
    pick.add_argument("--redo", action="store_true", help="rerun the selected cells even if done")
    pick.add_argument("--skip-failed", action="store_true",
                      help="do not rerun cells whose last run failed or timed out (default: rerun them)")
    pick.add_argument("--list", action="store_true", help="print the selected cells and their status; run nothing "
                      "(a cell run with other settings flags shows as stale)")
    pick.add_argument("--report", action="store_true", help="print the tables from the results file for these "
                      "settings flags; run nothing")
    search = parser.add_argument_group("search column (passed to `autotransfer search`)")
    search.add_argument("--budget", type=_positive(int), default=50, help="finished trials (default: 50)")
    search.add_argument("--patience", type=int, choices=range(0, 1000), metavar="N", default=DEFAULT_PATIENCE,
                        help="stop once validation saturated and N trials did not displace the leader; 0 runs the "
                             f"whole budget (default: {DEFAULT_PATIENCE}, the product's)")
    search.add_argument("--max-steps", type=_positive(int), default=None,
                        help="optimizer steps of a fine-tuning trial; also passed to recipes.py (default: the "
                             "product's ladder from the data size)")
    search.add_argument("--refit", type=int, choices=range(0, 100), metavar="N", default=None,
                        help="refits of the export, 0 = the trial as searched (default: the product's)")
    search.add_argument("--search-timeout", type=_positive(float), default=None,
                        help="search --timeout: stop starting trials after this many seconds")
    search.add_argument("--image-size", type=_positive(int), default=None,
                        help="search --image-size (default: the product's choice per data set)")
    peers = parser.add_argument_group("peer columns")
    peers.add_argument("--hand-epochs", type=_positive(int), default=50, help="hand fine-tune epochs (default: 50)")
    peers.add_argument("--fastai-epochs", type=_epochs_list, default=(5, 10, 20),
                       help="fastai fine_tune epoch counts, chosen on val (default: 5,10,20)")
    run = parser.add_argument_group("running")
    run.add_argument("--seed", type=int, default=0, help="seed of every column (default: 0)")
    run.add_argument("--cpus", type=_positive(int), default=None,
                     help="CPU cores per cell (affinity mask; peers also get as many torch threads) "
                          "(default: all)")
    run.add_argument("--cell-timeout", type=_positive(float), default=6 * 3600,
                     help="seconds before a cell is killed and recorded as timeout (default: 21600)")
    run.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"JSON lines (default: {DEFAULT_RESULTS})")
    run.add_argument("--work", type=Path, default=DEFAULT_WORK,
                     help=f"search outputs and logs (default: {DEFAULT_WORK})")
    run.add_argument("--data-root", type=Path, default=suite_data.DEFAULT_ROOT,
                     help=f"data set cache (default: {suite_data.DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    names = _names(args.data, suite_data.SPECS, "data set(s)", parser)
    columns = _names(args.columns, COLUMNS, "column(s)", parser)
    args.work, args.results, args.data_root = args.work.resolve(), args.results.resolve(), args.data_root.resolve()
    cells = [(n, c) for n in names for c in columns]

    records = load_results(args.results)
    done = latest(records, args)
    if args.list:
        list_cells(cells, done, stale(records, args), args)
        return 0
    if args.report:
        report(done, names, columns, args)
        return 0

    if any(c.startswith("fastai") for c in columns) and importlib.util.find_spec("fastai") is None:
        print(f"{FASTAI_MISSING} (the fastai columns are recorded as missing)", flush=True)
    todo = []
    for cell in cells:
        r = done.get(cell)
        if args.redo or r is None or (r["status"] != "ok" and not args.skip_failed):
            todo.append(cell)
    print(f"{len(todo)} of {len(cells)} selected cell(s) to run; results in {args.results}", flush=True)
    for i, (data, column) in enumerate(todo, start=1):
        print(f"[{i}/{len(todo)}] {data} / {column} ...", flush=True)
        record = run_cell(data, column, args)
        append_result(args.results, record)
        done[(data, column)] = record
        took = f"{record['seconds'] / 60:.1f} min" if record.get("seconds") is not None else "not run"
        if record["status"] == "ok":
            print(f"[{i}/{len(todo)}] {data} / {column}: test {record['test_accuracy']:.4f} ({took})", flush=True)
        else:
            message = record["detail"].get("message", "").strip().splitlines()
            print(f"[{i}/{len(todo)}] {data} / {column}: {record['status']} ({took}): "
                  f"{message[-1] if message else ''}", flush=True)
    report(done, names, columns, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
