"""The progress of a long step in a log: periodic lines with counts and time left, nothing on silence."""

import io

from autotransfer.progress import progress


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
