"""The study's models as Optuna artifacts: the best trial's checkpoint and the exported ONNX files.

With them `export` and `report` on any machine use the stored model instead of training it again, and
optuna-dashboard (`--artifact-dir`) lists and serves them. The store is a `FileSystemArtifactStore` in
`<out>/artifacts`, beside search's default SQLite study; for a shared storage (PostgreSQL, ...) it is the one
the user names with `--artifacts` (a folder every machine sees, or `s3://bucket`), since a folder on one machine
is of no use to another. Search records the location in the study, so later commands find it without the flag.

Where things are recorded: a trial's checkpoint is an artifact of that trial, its id in the trial's user
attribute `checkpoint_artifact`; an export is a set of artifacts of the study (model.onnx, its variants and the
json files), their ids in the study's user attribute `export:<trial>:refit<N>`, with the precisions it holds.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from autotransfer.errors import ConfigError
from autotransfer.storage import sqlite_path

logger = logging.getLogger(__name__)
ARTIFACTS_DIR = "artifacts"  # the default store's folder, in the study's output folder
LOCATION_ATTR = "artifacts"  # study user attribute: where search stored the artifacts
CHECKPOINT_ATTR = "checkpoint_artifact"  # trial user attribute: the artifact id of the trial's checkpoint
ArtifactStore = FileSystemArtifactStore | Boto3ArtifactStore


def check_location(text: str) -> str:
    """A valid `--artifacts` value: an absolute folder path, or `s3://bucket` as given. Raises ConfigError."""
    text = text.strip()
    if text.startswith("s3://"):
        bucket = text[len("s3://"):]
        if not bucket or "/" in bucket.rstrip("/"):
            raise ConfigError(f"--artifacts {text!r}: an S3 store is a bare bucket, e.g. --artifacts s3://my-bucket "
                              "(Optuna's Boto3ArtifactStore takes no key prefix).")
        return f"s3://{bucket.rstrip('/')}"
    if not text or "://" in text:
        raise ConfigError(f"--artifacts {text!r}: expected a folder (shared by the machines of a study) or "
                          "s3://bucket, e.g. --artifacts /mnt/shared/artifacts.")
    path = Path(text).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--artifacts {text!r} is a file, not a folder; pass a folder for the artifact store.")
    return str(path)


def resolve_location(study: optuna.Study, requested: str | None, out: Path, storage: str) -> str | None:
    """Where this command keeps or finds artifacts: `--artifacts`, else where the study says search kept them,
    else `<out>/artifacts` for a SQLite study; None (no artifacts) for a shared storage without a named store."""
    if requested is not None:
        return check_location(requested)
    recorded = study.user_attrs.get(LOCATION_ATTR)
    if recorded:
        return recorded
    return str((Path(out) / ARTIFACTS_DIR).resolve()) if sqlite_path(storage) is not None else None


def record_location(study: optuna.Study, location: str | None) -> None:
    """Remember the store in the study (the first location given wins, so all machines agree)."""
    if location is not None and not study.user_attrs.get(LOCATION_ATTR):
        study.set_user_attr(LOCATION_ATTR, location)


def open_store(location: str | None) -> ArtifactStore | None:
    """The artifact store at `location` (see `check_location`); None for None."""
    if location is None:
        return None
    if location.startswith("s3://"):
        try:
            return Boto3ArtifactStore(location[len("s3://"):])
        except ImportError:
            raise ConfigError(f"--artifacts {location}: an S3 store needs boto3 (pip install boto3).") from None
    Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)


def upload_checkpoint(store: ArtifactStore, trial: optuna.Trial, path: Path) -> str:
    """Upload a running trial's checkpoint as its artifact and note the id in its user attributes."""
    artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                  mimetype="application/octet-stream")
    trial.set_user_attr(CHECKPOINT_ATTR, artifact_id)
    return artifact_id


def download_checkpoint(store: ArtifactStore | None, trial: optuna.trial.FrozenTrial, folder: Path) -> Path | None:
    """The trial's stored checkpoint, downloaded into `folder`; None when it has none or the store lacks it."""
    artifact_id = trial.user_attrs.get(CHECKPOINT_ATTR)
    if store is None or artifact_id is None:
        return None
    dest = Path(folder) / f"trial_{trial.number}.pt"
    return dest if _download(store, artifact_id, dest) else None


def available(store: ArtifactStore | None, artifact_id: str | None) -> bool:
    """Whether the store holds the artifact (the study may record one whose file is gone, or another store)."""
    if store is None or artifact_id is None:
        return False
    try:
        store.open_reader(artifact_id).close()
    except ArtifactNotFound:
        return False
    return True


def _download(store: ArtifactStore, artifact_id: str, dest: Path) -> bool:
    dest.unlink(missing_ok=True)
    try:
        download_artifact(artifact_store=store, file_path=str(dest), artifact_id=artifact_id)
    except ArtifactNotFound:
        dest.unlink(missing_ok=True)
        logger.warning("artifact %s (%s) is recorded in the study but missing from its store", artifact_id, dest.name)
        return False
    return True


def _recipe(refits: int, distill: bool) -> str:
    return f"refit{refits}" + ("_distil" if distill else "")


def export_key(number: int, refits: int, distill: bool = False) -> str:
    """The study attribute of trial `number`'s export with `refits` members, distilled into one or not."""
    return f"export:{number}:{_recipe(refits, distill)}"


def stored_export(study: optuna.Study, number: int, refits: int, precisions: tuple[str, ...], *,
                  distill: bool = False) -> dict[str, Any] | None:
    """The stored export of trial `number` made with `refits` (`distill`) and exactly `precisions`, if any."""
    found = study.user_attrs.get(export_key(number, refits, distill))
    return found if found and tuple(found.get("precisions", ())) == tuple(precisions) else None


def export_available(store: ArtifactStore | None, study: optuna.Study, number: int, refits: int,
                     precisions: tuple[str, ...], *, distill: bool = False) -> bool:
    """Whether `stored_export` finds one and `store` holds all its files."""
    record = stored_export(study, number, refits, precisions, distill=distill)
    return record is not None and all(available(store, i) for i in record["files"].values())


def upload_export(store: ArtifactStore, study: optuna.Study, number: int, refits: int,
                  precisions: tuple[str, ...], folder: Path, *, distill: bool = False) -> dict[str, Any]:
    """Upload every file of an export folder as an artifact of the study; record their ids under `export_key`.

    The artifacts are named `trial<N>_refit<R>[_distil]_<file>`, so the dashboard tells a study's exports apart.
    """
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in sorted(Path(folder).iterdir()):
            if p.is_file():
                named = Path(tmp) / f"trial{number}_{_recipe(refits, distill)}_{p.name}"
                shutil.copyfile(p, named)
                files[p.name] = upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)
                named.unlink()
    record = {"precisions": list(precisions), "files": files}
    study.set_user_attr(export_key(number, refits, distill), record)
    return record


def download_export(store: ArtifactStore, record: dict[str, Any], folder: Path) -> bool:
    """Download a stored export's files into the empty `folder`; False when any is missing from the store."""
    return all(_download(store, artifact_id, Path(folder) / name) for name, artifact_id in record["files"].items())


def stored_file(store: ArtifactStore | None, record: dict[str, Any] | None, name: str) -> bytes | None:
    """One file of a stored export (e.g. metrics.json for `report`), or None."""
    if store is None or record is None or name not in record["files"]:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / name
        return dest.read_bytes() if _download(store, record["files"][name], dest) else None
