"""The QuPath script (`histoboost qupath-script`): QuPath cannot run here, so its text is tested: it names only the
bundle (with its identity) and the histoboost it was written by, every value is a Groovy literal that reads back as
given whatever the path holds, and it uses QuPath 0.5/0.6's own calls for the image, the selection and the import."""

from __future__ import annotations

import ast
import re
import sys

import pytest
from test_cli import run_cli

from histoboost.slides.qupath import groovy_string, qupath_script

# What could break out of a Groovy single-quoted string or a line: quotes, backslashes, interpolation, line breaks.
HOSTILE = [
    "a'b",
    "back\\slash",
    "dollar $HOME ${x}",
    "new\nline",
    "tab\tand\rreturn",
    "quote\\'",
    "é ü 病理",
    "bell\x07escape\x1bline\u2028sep",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_a_groovy_literal_reads_back_as_the_text_it_was_given(text):
    """Groovy's single-quoted escapes (\\\\, \\', \\n, \\r, \\t, \\uXXXX) are Python's: reading the literal back with
    Python's parser gives the text; it is one line and interpolates nothing (single quotes)."""
    literal = groovy_string(text)
    assert literal.startswith("'") and literal.endswith("'") and "\n" not in literal and "\r" not in literal
    assert ast.literal_eval(literal) == text


def _literals(script: str) -> list[str]:
    return [ast.literal_eval(m) for m in re.findall(r"'(?:[^'\\\n]|\\.)*'", script)]


def test_the_script_names_only_its_bundle_and_histoboost(model, tmp_path):
    bundle, path = model
    out = tmp_path / "run_histoboost.groovy"
    result = run_cli("qupath-script", path, "--out", out, "--slide-option=--min-tissue=0.3")
    assert result.returncode == 0, result.stderr
    script = out.read_text()
    assert f"def MODEL = {groovy_string(str(path.absolute()))}" in script
    assert f"def MODEL_SHA256 = '{bundle.sha256}'" in script and "'--expect-sha256'" in script
    assert f"def HISTOBOOST = [{groovy_string(sys.executable)}, '-m', 'histoboost.cli']" in script
    assert "def SLIDE_OPTIONS = ['--min-tissue=0.3']" in script
    paths = [v for v in _literals(script) if v.startswith("/")]
    assert sorted(set(paths)) == sorted({sys.executable, str(path.absolute())})  # no other file of this machine
    for call in (
        "GeneralTools.toPath(server.getURIs()[0])",
        "getSelectedObject()",
        "selected.isAnnotation()",
        "exportObjectsToGeoJson([selected], roi.getPath(), 'FEATURE_COLLECTION')",
        "command += ['--roi', roi.getPath()]",
        "new ProcessBuilder(command)",
        "process.waitFor()",
        "process.destroy()",
        "importObjectsFromFile(found[0].getPath())",
    ):
        assert call in script
    assert "not for diagnosis" in run_cli("qupath-script", path).stdout.lower().replace(
        "must not be used for", "not for"
    )


def test_a_hostile_bundle_path_stays_one_literal(model, tmp_path):
    """A bundle under a folder whose name holds a quote, a dollar and a backslash: the script's MODEL reads back as
    that path, and the rest of the script is as for any path."""
    import shutil

    _, path = model
    folder = tmp_path / "lab's $HOME \\ models"
    folder.mkdir()
    copy = shutil.copytree(path, folder / "model") if path.is_dir() else shutil.copy(path, folder / path.name)
    script = run_cli("qupath-script", copy).stdout
    (model_line,) = [line for line in script.splitlines() if line.startswith("def MODEL = ")]
    assert ast.literal_eval(model_line.removeprefix("def MODEL = ")) == str(
        copy.absolute() if hasattr(copy, "absolute") else copy
    )


def test_what_is_not_a_bundle_is_one_line(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    bad = run_cli("qupath-script", tmp_path / "x.zip")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    missing = run_cli("qupath-script", tmp_path / "none.zip")
    assert missing.returncode == 2 and "no such bundle" in missing.stderr


def test_the_script_text_is_pure(tmp_path):
    text = qupath_script(["/opt/hb/bin/histoboost"], "/models/m.zip", "ab" * 32)
    assert text == qupath_script(["/opt/hb/bin/histoboost"], "/models/m.zip", "ab" * 32)
    assert "def SLIDE_OPTIONS = []" in text and "def HISTOBOOST = ['/opt/hb/bin/histoboost']" in text
