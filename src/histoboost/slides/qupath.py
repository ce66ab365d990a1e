"""A Groovy script for QuPath 0.5 and 0.6 that scores the image open in QuPath with a histoboost bundle and imports
the result: the way QuPath users run an outside tool (the BIOP/Cellpose pattern, qupath#1640).

The script takes the image's file (`GeneralTools.toPath` of the server's URI), the selected annotation as `--roi` if
there is one (`exportObjectsToGeoJson`, QuPath's own frame: the one `slide` reads and writes, after OpenSlide's
bounds crop), runs `histoboost slide` as a list of arguments (no shell), and imports the tiles and regions from the
`.geojson.gz` it wrote (`importObjectsFromFile` reads gzip since QuPath 0.4). Every path and value is written as a
single-quoted Groovy literal (no interpolation), escaped here: no template library writes Groovy literals.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..version import __version__

_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def groovy_string(text: str) -> str:
    """`text` as a single-quoted Groovy string literal: backslash, quote and control characters escaped, nothing
    interpolated (`$` is plain text in single quotes)."""
    body = "".join(
        _ESCAPES.get(c, c if c.isprintable() or c == " " else f"\\u{ord(c):04x}") if ord(c) <= 0xFFFF else c
        for c in text
    )
    return f"'{body}'"


def groovy_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(groovy_string(item) for item in items) + "]"


def qupath_script(histoboost: Sequence[str], model: str, sha256: str, slide_options: Sequence[str] = ()) -> str:
    """The script's text: `histoboost` is the command that runs histoboost (e.g. [python, "-m", "histoboost.cli"]),
    `model` the bundle's absolute path, `sha256` its identity (checked by `slide --expect-sha256` before use), and
    `slide_options` more `histoboost slide` flags."""
    return f"""// Score the image open in QuPath with a histoboost bundle and import its tiles and carcinoma regions.
// Written by `histoboost qupath-script` (histoboost {__version__}) for QuPath 0.5 and 0.6.
// Research use only: histoboost is not a medical device and must not be used for diagnosis.
// Automate > Script editor > Run, with a slide open; select an annotation first to score only inside it.
// Then Measure > Show measurement maps > p_carcinoma colours the tiles by probability.
import java.nio.file.Files
import qupath.lib.common.GeneralTools

def HISTOBOOST = {groovy_list(histoboost)}
def MODEL = {groovy_string(model)}
def MODEL_SHA256 = {groovy_string(sha256)}
def SLIDE_OPTIONS = {groovy_list(slide_options)}

def server = getCurrentServer()
if (server == null)
    throw new IllegalStateException('histoboost: open a slide first')
def slide = GeneralTools.toPath(server.getURIs()[0])
if (slide == null)
    throw new IllegalStateException('histoboost: the image is not a local file; open the slide file itself')
def work = Files.createTempDirectory('histoboost-').toFile()
def out = new File(work, 'results')
def command = HISTOBOOST + ['slide', MODEL, slide.toString(), '--out', out.getPath(), '--expect-sha256',
                            MODEL_SHA256, '--quiet'] + SLIDE_OPTIONS
def selected = getSelectedObject()
if (selected != null && selected.isAnnotation()) {{
    def roi = new File(work, 'roi.geojson')
    exportObjectsToGeoJson([selected], roi.getPath(), 'FEATURE_COLLECTION')
    command += ['--roi', roi.getPath()]
    println 'histoboost: scoring inside the selected annotation'
}}
println 'histoboost: ' + command.join(' ')
def process = new ProcessBuilder(command).redirectErrorStream(true).start()
def log = Thread.start {{ process.inputStream.eachLine {{ println it }} }}  // the wait below stays interruptible
try {{
    if (process.waitFor() != 0) {{
        log.join()
        throw new RuntimeException('histoboost slide failed (exit ' + process.exitValue() + '): see the lines above')
    }}
    log.join()
}} catch (InterruptedException stopped) {{  // the script editor's Stop button
    process.descendants().forEach {{ it.destroy() }}
    process.destroy()
    throw stopped
}}
def found = []
out.eachFileRecurse {{ if (it.name.endsWith('.geojson.gz')) found << it }}
if (found.size() != 1)
    throw new RuntimeException('histoboost: expected one .geojson.gz in ' + out + ', found ' + found.size())
importObjectsFromFile(found[0].getPath())
println 'histoboost: imported ' + found[0] + ' (all outputs: ' + out + ')'
"""
