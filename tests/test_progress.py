"""The progress of long steps: periodic lines with counts and time left in a log, a bar on a terminal, nothing
on silence; and where it is shown: each fine-tune's steps, each refit member, the export's phases."""

import io
import re

import pytest

from autotransfer.progress import phase, progress
from autotransfer.refit import refit, refit_schedule
from autotransfer.strategy import Strategy
from autotransfer.trainer import train_trial


def test_log_lines_report_counts_and_time_left(monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    stream = io.StringIO()  # not a terminal: plain lines, no bar
    with progress(4, "decoding", "images", stream=stream, interval=0.0) as p:
        for _ in range(4):
            p.update()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("decoding: 1/4 images (25 %)")
    assert "left" in lines[0]
    assert len(lines) == 3  # the last update (4/4) ends the step and prints nothing


def test_silenced_by_environment(monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "0")
    stream = io.StringIO()
    with progress(3, "x", stream=stream, interval=0.0) as p:
        p.update(3)
    assert stream.getvalue() == ""


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, so `progress` draws its tqdm bar into it."""

    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_lines_mode_gets_lines(monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    bar = _Terminal()
    with progress(5, "trial 3 fine-tune", "steps", stream=bar, interval=0.0) as p:
        for _ in range(5):
            p.update()
    drawn = bar.getvalue()
    assert drawn.startswith("\rtrial 3 fine-tune:   0%|") and "0/5" in drawn, "a tqdm bar, redrawn in place"
    assert drawn.endswith("\r") and drawn.split("\r")[-2].strip() == "", "and erased when the step ends"
    assert "\n" not in drawn
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "lines")  # what --workers sets in its processes
    lines = _Terminal()
    with progress(5, "trial 3 fine-tune", "steps", stream=lines, interval=0.0) as p:
        for _ in range(5):
            p.update()
    assert "\r" not in lines.getvalue()
    assert [line.split(" (")[0] for line in lines.getvalue().splitlines()] == [
        f"trial 3 fine-tune: {k}/5 steps" for k in range(1, 5)]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    for value, expected in (("0", 2), ("3600", 0), ("soon", 0)):  # not a number: the 10 s default
        monkeypatch.setenv("AUTOTRANSFER_PROGRESS_INTERVAL", value)
        stream = io.StringIO()
        with progress(3, "x", stream=stream) as p:
            p.update(1)
            p.update(1)
            p.update(1)
        assert len(stream.getvalue().splitlines()) == expected, value


def test_a_phase_names_itself_and_its_duration_when_long(monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    short, long = io.StringIO(), io.StringIO()
    with phase("export: ONNX export", stream=short):
        pass
    with phase("export: ONNX export", stream=long, long=0.0):
        pass
    assert short.getvalue().splitlines() == ["export: ONNX export ..."]
    assert long.getvalue().splitlines() == ["export: ONNX export ...", "export: ONNX export: done in 0s"]
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "0")
    silent = io.StringIO()
    with phase("export: ONNX export", stream=silent, long=0.0):
        pass
    assert silent.getvalue() == ""


def _steps_shown(err: str, description: str) -> list[tuple[int, int]]:
    """(k, N) of every `<description>: k/N steps` line."""
    return [tuple(map(int, m.groups())) for m in re.finditer(rf"^{re.escape(description)}: (\d+)/(\d+) steps ",
                                                              err, re.MULTILINE)]


def test_a_fine_tune_shows_its_steps_and_a_head_fit_nothing(tiny, tiny_cache, capsys, monkeypatch):
    tiny_cache.load()  # the activation pass shows its own progress (test_the_decoding_and_the_pass_show_progress)
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS_INTERVAL", "0")
    train_trial(Strategy(tap=3, freeze=1, steps=12), tiny, tiny_cache, description="trial 12 fine-tune")
    err = capsys.readouterr().err
    assert _steps_shown(err, "trial 12 fine-tune") == [(k, 12) for k in range(1, 12)]
    assert len(err.splitlines()) == 11, "nothing else, and no line for the last step"
    train_trial(Strategy(tap=2, freeze=2), tiny, tiny_cache, description="trial 13 fine-tune")
    assert capsys.readouterr().err == ""


def test_a_pruned_fine_tune_stops_showing_steps_where_it_stopped(tiny, tiny_cache, capsys, monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS_INTERVAL", "0")

    def prune(step, value):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_trial(Strategy(tap=2, freeze=1, steps=10), tiny, tiny_cache, report=prune, report_at=(4,))
    assert _steps_shown(capsys.readouterr().err, "fine-tune") == [(k, 10) for k in range(1, 5)]


def test_the_suite_is_quiet_by_default(tiny, tiny_cache, capsys):
    """conftest turns progress off: a fine-tune and an export phase print nothing."""
    train_trial(Strategy(tap=3, freeze=1, steps=3), tiny, tiny_cache)
    with phase("export: ONNX export", long=0.0):
        pass
    assert capsys.readouterr().err == ""


def test_each_refit_member_shows_its_steps_or_its_head_fit(tiny, tiny_cache, capsys, monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS_INTERVAL", "0")
    fine_tune = Strategy(tap=3, freeze=1, steps=8)
    steps = refit_schedule(fine_tune, tiny_cache).steps
    assert refit(fine_tune, tiny, tiny_cache, members=2).model is not None
    err = capsys.readouterr().err
    for k in (1, 2):
        assert _steps_shown(err, f"refit member {k}/2") == [(i, steps) for i in range(1, steps)]
    assert refit(Strategy(tap=2, freeze=2), tiny, tiny_cache, members=2).model is not None
    assert capsys.readouterr().err.splitlines() == ["refit member 1/1: head fit ..."], "a convex fit is refit once"
    assert refit(Strategy(tap=2, freeze=2, head="mlp", mlp_hidden=8), tiny, tiny_cache, members=2).model is not None
    assert capsys.readouterr().err.splitlines() == ["refit member 1/2: head fit ...", "refit member 2/2: head fit ..."]
