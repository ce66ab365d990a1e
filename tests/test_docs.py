"""The Python example in docs/python.md runs as written and its assertions hold (arrays and files agree)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.heavy
def test_the_python_page_example_runs(tmp_path, monkeypatch, capsys, demo_data, demo_cache):
    (example,) = python_blocks(DOCS / "python.md")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # its work folder lands in the test's own
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    mkdtemp = tempfile.mkdtemp

    def work_folder(*args, **kwargs) -> str:
        """Its work folder, holding the session's demo set and features already (make_demo_data keeps them)."""
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
        work = Path(mkdtemp(*args, **kwargs))
        shutil.copytree(demo_data, work / "data")
        shutil.copytree(demo_cache, work / "cache")
        return str(work)

    monkeypatch.setattr(tempfile, "mkdtemp", work_folder)
    exec(compile(example, "docs/python.md", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert "48 images, 0 warnings" in printed
    assert re.search(r"accuracy \d+\.\d% on 48 held-out images", printed)
    assert "no such file or folder" in printed
