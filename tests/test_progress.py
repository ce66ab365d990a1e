"""Progress: a bar where a person watches, one line per stage in a log, nothing when quiet."""

from __future__ import annotations

import re

from test_cli import run_cli
from tqdm import tqdm

from histoboost.progress import StageLine, meter, track


def test_off_a_terminal_a_stage_is_one_line_with_its_count_and_time(capsys):
    bar = meter("features", 5, "img", True, initial=2)
    assert isinstance(bar, StageLine)
    for _ in range(3):
        bar.update()
    bar.close()
    bar.close()  # once only
    assert list(track(range(4), "predicting")) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"features: 5 img \(2 done before\) in \d+\.\d s", lines[0])
    assert re.fullmatch(r"predicting: 4 img in \d+\.\d s", lines[1]) and len(lines) == 2


def test_quiet_writes_nothing_and_bars_can_be_forced(capsys):
    with meter("features", 3, progress=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    forced = meter("features", 3, progress="bars")
    assert isinstance(forced, tqdm)
    forced.update(3)
    forced.close()
    assert "3/3" in capsys.readouterr().err


def test_a_command_logs_a_line_per_stage_not_a_bar_refresh(small_folder):
    """stderr that is not a terminal (a log file, CI): `inspect` writes one line per stage, not tqdm's refreshes
    (a 268-image inspect: 17,391 bytes of bars, 373 of lines: docs/performance.md)."""
    logged = run_cli("inspect", small_folder)
    assert logged.returncode == 0, logged.stderr
    lines = logged.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["reading images", "checking stain"]
    assert all(re.search(r": 8 img in \d+\.\d s$", line) for line in lines) and len(logged.stderr) < 120
    assert run_cli("inspect", small_folder, "--quiet").stderr == ""
    bars = run_cli("inspect", small_folder, "--progress").stderr
    assert "0/8" in bars and "%|" in bars
    both = run_cli("inspect", small_folder, "--quiet", "--progress")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
