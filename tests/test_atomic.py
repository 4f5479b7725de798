"""Write-then-rename: the destination is replaced only by a complete write, and nothing temporary is left."""

import pytest

from autotransfer.atomic import replacing_file, replacing_folder


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_is_replaced_only_when_the_write_completes(tmp_path):
    path = tmp_path / "sub" / "board.csv"
    with replacing_file(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("first")
        assert not path.exists(), "not in place before the body ends"
    assert path.read_text() == "first" and _names(path.parent) == ["board.csv"]
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), replacing_file(path) as tmp:
            tmp.write_text("half")
            raise error("stopped")
        assert path.read_text() == "first" and _names(path.parent) == ["board.csv"]
    with replacing_file(path) as tmp:
        tmp.write_text("second")
    assert path.read_text() == "second" and _names(path.parent) == ["board.csv"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "best"
    with replacing_folder(dest) as tmp:
        assert tmp.is_dir() and not list(tmp.iterdir()) and tmp.parent == tmp_path
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
        assert not dest.exists()
    assert _names(dest) == ["a", "b"] and _names(tmp_path) == ["best"]
    with pytest.raises(KeyboardInterrupt), replacing_folder(dest) as tmp:
        (tmp / "a").write_text("half")
        raise KeyboardInterrupt
    assert _names(dest) == ["a", "b"] and (dest / "a").read_text() == "1" and _names(tmp_path) == ["best"]
    with replacing_folder(dest) as tmp:
        (tmp / "c").write_text("2")
    assert _names(dest) == ["c"], "the old folder's files do not survive"
    assert _names(tmp_path) == ["best"]


def test_a_killed_run_s_leftover_is_not_reused(tmp_path):
    dest = tmp_path / "report"
    (tmp_path / ".report.tmp").mkdir()
    (tmp_path / ".report.tmp" / "stale.png").write_text("from a killed run")
    (tmp_path / ".report.old").mkdir()
    with replacing_folder(dest) as tmp:
        assert not list(tmp.iterdir())
        (tmp / "report.html").write_text("new")
    assert _names(dest) == ["report.html"] and _names(tmp_path) == ["report"]


def test_keep_existing_lets_the_first_writer_win(tmp_path):
    dest = tmp_path / "cache"
    with replacing_folder(dest, keep_existing=True) as first, replacing_folder(dest, keep_existing=True) as second:
        assert first != second, "concurrent writers never share a temporary folder"
        (first / "b1.npy").write_text("first")
        (second / "b1.npy").write_text("second")
    assert (dest / "b1.npy").read_text() == "second", "the inner block finished first"
    assert _names(tmp_path) == ["cache"]
    with pytest.raises(ValueError), replacing_folder(tmp_path / "other", keep_existing=True) as tmp:
        (tmp / "x").write_text("half")
        raise ValueError
    assert _names(tmp_path) == ["cache"]
