"""Existing studies: find and open them with `search`'s defaults, list them, and rebuild their inputs.

`search` records where its data and backbone came from (`record_source`), so `report` needs no data at all
and `export` of any trial, even on another machine, rebuilds exactly the inputs the trial was trained on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from autotransfer.errors import ConfigError
from autotransfer.storage import STUDY_FILE, default_storage, sqlite_path, unopenable

DEFAULT_STUDY = "digits"  # search's default study name: the default data set's name
STUDIES_ROOT = Path("studies")  # search's default parent of `<study-name>/`
SOURCE = "source"  # study user attribute written by `record_source`
_STATES = ("complete", "pruned", "fail", "running")


def _check_storage(storage: str) -> None:
    """Refuse a SQLite file that does not exist: opening it would silently create an empty database."""
    path = sqlite_path(storage)
    if path is not None and not path.is_file():
        raise ConfigError(f"No study database at {str(path)!r}; run `autotransfer search` first, or pass the "
                          "--out folder (or --storage URL) that search used.")


def study_names(storage: str) -> list[str]:
    _check_storage(storage)
    try:
        return optuna.study.get_all_study_names(storage=storage)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy, drivers and Optuna each raise their own types
        raise unopenable(storage, e) from None


def locate(study_name: str | None = None, storage: str | None = None,
           out: Path | None = None) -> tuple[str, str, Path]:
    """(study name, storage URL, output folder), defaulting like `search`: `studies/<name>/study.db`.

    Without a name, the storage's only study is taken (or `digits`, search's default, when it has several).
    """
    if storage is None:
        folder = out or STUDIES_ROOT / (study_name or DEFAULT_STUDY)
        storage = default_storage(folder)
    names = study_names(storage)
    if study_name is None:
        if len(names) == 1:
            study_name = names[0]
        elif DEFAULT_STUDY in names:
            study_name = DEFAULT_STUDY
        else:
            raise ConfigError(f"Storage {storage!r} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                              "pass --study-name with one of them (`autotransfer studies` lists them).")
    if study_name not in names:
        raise ConfigError(f"No study named {study_name!r} in storage {storage!r} (it has: {', '.join(names) or 'none'}"
                          "); check --study-name and --storage, or run `autotransfer search` first.")
    return study_name, storage, out or STUDIES_ROOT / study_name


def open_existing(study_name: str, storage: str) -> optuna.Study:
    """Load a study to read it: never creates one, and never samples (so no sampler state is built)."""
    _check_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        raise ConfigError(f"No study named {study_name!r} in storage {storage!r}; check --study-name and "
                          "--storage, or run `autotransfer search` first.") from None


def load(study_name: str | None = None, storage: str | None = None, out: Path | None = None
         ) -> tuple[optuna.Study, Path]:
    """The study and its output folder, found with `locate`."""
    name, url, folder = locate(study_name, storage, out)
    return open_existing(name, url), folder


def summary(study: optuna.Study) -> dict[str, Any]:
    """Trial counts by state and the best trial (ties: earlier trial), for listings."""
    from autotransfer.study import best_trial

    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name.lower() == s for t in trials) for s in _STATES}
    best = best_trial(study)
    return {"study": study.study_name, "trials": sum(t.state != TrialState.WAITING for t in trials), **counts,
            "best_value": best.value if best else None, "best_trial": best.number if best else None,
            "data": study.user_attrs.get(SOURCE, {}).get("data", study.user_attrs.get("data")),
            "backbone": study.user_attrs.get("backbone")}


def list_studies(storage: str | None = None, *, root: Path = STUDIES_ROOT) -> pd.DataFrame:
    """One row per study: counts by state and best value; without `storage`, every `root/*/study.db`."""
    urls = [storage] if storage else [default_storage(p.parent) for p in sorted(root.glob(f"*/{STUDY_FILE}"))]
    rows = [{**summary(open_existing(name, url)), "storage": url} for url in urls for name in study_names(url)]
    columns = ["study", "trials", *_STATES, "best_value", "best_trial", "data", "backbone", "storage"]
    df = pd.DataFrame(rows, columns=columns)
    return df.astype({"best_trial": "Int64"})


def record_source(study: optuna.Study, *, data: str, image_size: int, seed: int, backbone: str,
                  weights: str | None, group_names: tuple[str, ...], unlabeled: str | None = None,
                  val: str | None = None, test: str | None = None) -> None:
    """Store how to rebuild the study's inputs (absolute paths, so it works from any folder)."""
    from autotransfer.data import EMBEDDED

    def absolute(p: str | None) -> str | None:
        return p if p is None or p in EMBEDDED or p == "random" or not Path(p).exists() else str(Path(p).resolve())

    source = {"data": absolute(data), "image_size": image_size, "seed": seed, "backbone": backbone,
              "weights": absolute(weights), "group_names": list(group_names)}
    for key, path in (("unlabeled", unlabeled), ("val", val), ("test", test)):
        if path is not None:  # only then: the source of a study without them is what it always was
            source[key] = absolute(path)
    if study.user_attrs.get(SOURCE) != source:
        study.set_user_attr(SOURCE, source)


def group_names(study: optuna.Study) -> tuple[str, ...] | None:
    names = study.user_attrs.get(SOURCE, {}).get("group_names")
    return tuple(names) if names else None


def load_inputs(study: optuna.Study, *, data: str | None = None, backbone: str | None = None,
                weights: str | None = None, image_size: int | None = None, seed: int | None = None,
                memory_limit: int | None = None, spill: Path | None = None):
    """(Backbone, ImageData) the study was made with; arguments override what the study recorded.

    `memory_limit` and `spill` bound the decoded images as in `load_data`.

    Raises ConfigError when the result is not what the study was made with (its data fingerprint or
    weights differ), since a trial retrained or evaluated on other inputs would not be that trial.
    """
    from autotransfer.backbones import get_backbone
    from autotransfer.data import load_data

    source = study.user_attrs.get(SOURCE, {})
    data = data or source.get("data")
    if data is None:
        raise ConfigError(f"Study {study.study_name!r} does not record its data (it predates `source`); pass "
                          "--data, --backbone, --weights, --image-size and --seed as given to `search`.")
    seed = seed if seed is not None else source.get("seed", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = load_data(data, image_size=image_size or source.get("image_size"), seed=seed,
                           memory_limit=memory_limit, spill=spill, unlabeled=source.get("unlabeled"),
                           val=source.get("val"), test=source.get("test"))
    net = get_backbone(backbone or source.get("backbone") or study.user_attrs["backbone"],
                       weights or source.get("weights"))
    made_with = {"data": study.user_attrs.get("data"), "weights": study.user_attrs.get("weights")}
    now = {"data": images.fingerprint, "weights": net.weights_id}
    differ = [k for k in made_with if made_with[k] is not None and made_with[k] != now[k]]
    if differ:
        raise ConfigError(f"The {' and '.join(differ)} given for study {study.study_name!r} differ from what it was "
                          f"made with ({', '.join(f'{k} {made_with[k]!r}, got {now[k]!r}' for k in differ)}); pass "
                          "the same --data, --image-size, --seed and --weights as `search` got.")
    return net, images
