"""Write to a temporary sibling, then rename: a reader never sees a half-written file or folder.

Two context managers; each yields the temporary path to write, and only a body that ends without an
exception puts it in place. On any exception (KeyboardInterrupt and SystemExit included) the temporary
file or folder is deleted, the exception propagates, and what was at the destination is left untouched.

    with replacing_file(out / "leaderboard.csv") as tmp:
        board.to_csv(tmp, index=False)

    with replacing_folder(out / "best") as tmp:
        export_onnx(model, tmp / "model.onnx", ...)
        (tmp / "metrics.json").write_text(...)

`replacing_file(path)`: the temporary file is `.<name>.tmp` beside `path`; on success it replaces `path`
in one atomic rename (POSIX). The parent folder is created if needed.

`replacing_folder(dest)`: the temporary folder is `.<name>.tmp` beside `dest`, emptied first (a killed
run may have left one) and created. On success the old `dest`, if any, is moved aside to `.<name>.old`,
the temporary folder is renamed to `dest`, and the old one is deleted: `dest` is never half-written, and is
absent only between two renames.

`replacing_folder(dest, keep_existing=True)`: for content that several processes may build at the same
moment and that is the same whoever builds it (an activation cache). Each call writes into its own fresh
`.<name>.XXXXXXXX` folder (so concurrent writers never share one); on success it becomes `dest` unless
`dest` exists by then, in which case the first writer's `dest` is kept and this copy is deleted.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing_file(path: Path) -> Iterator[Path]:
    """Yield `.<name>.tmp` beside `path` to write; it replaces `path` only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staged(path.with_name(f".{path.name}.tmp"), discard=lambda tmp: tmp.unlink(missing_ok=True),
                 commit=lambda tmp: tmp.replace(path)) as tmp:
        yield tmp


@contextlib.contextmanager
def replacing_folder(dest: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; it becomes `dest` only if the body succeeds.

    See the module docstring for `keep_existing` (first writer wins, for identical content built concurrently).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if keep_existing:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    else:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    with _staged(tmp, discard=lambda t: shutil.rmtree(t, ignore_errors=True),
                 commit=lambda t: _move_unless_present(t, dest) if keep_existing else _swap_in(t, dest)) as staged:
        yield staged


@contextlib.contextmanager
def _staged(tmp: Path, *, discard: Callable[[Path], object], commit: Callable[[Path], object]) -> Iterator[Path]:
    """Yield `tmp`; if the body raises anything, `discard(tmp)` and re-raise, else `commit(tmp)`."""
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    commit(tmp)


def _swap_in(tmp: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.replace(old)
    tmp.replace(dest)
    shutil.rmtree(old, ignore_errors=True)


def _move_unless_present(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        try:
            tmp.rename(dest)
            return
        except OSError:  # another writer renamed its copy in between
            pass
    shutil.rmtree(tmp, ignore_errors=True)
