"""Measured numbers live only in results/ (written by the tools); docs, code and recipes link to the file.

`python tools/check_figures.py [root]` prints `path:line: text` for each line of docs/**/*.md, the
.py files of flowpress/, compress/, export/, engines/, validation/, calibration/ and examples/, and the .yaml
files of examples/ and recipes/ that states a figure with a unit, and exits 1 if there is any.

A figure is a number followed (optionally after a space) by a unit: dB; a time (ns, µs, us, ms, s,
sec, seconds, min, minutes, hours); a memory size (KB, KiB, MB, MiB, GB, GiB, TB, TiB); a ratio ×/x;
a percentage.  What is not a measurement is left alone:
- a bound: the number right after >=, <=, ≥, ≤, <, > (not ->), "at least", "at most" or "past";
- a memory size that is a whole power of two (a limit or a setting: 2 GB, 512 MB, 4 KiB);
- ×/x between numbers (1×1, 2 × 255, 3x3), or a bare whole multiple (10x, 2x batch): a ×/x
  ratio is measured when it has decimals, is approximate (~, about) or is followed by faster/slower;
- a bare whole percentage (a 5% warm-up, the worst 1% of samples): a percentage is measured when
  it is signed, has decimals, is approximate or a range (10-80%), or speed, time, size or an engine
  is named beside it.
Any other line that states a setting opts out with `# figure: setting` (YAML, Python) or
`<!-- figure: setting -->` (markdown).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

CODE_DIRS = ("flowpress", "compress", "export", "engines", "validation", "calibration", "examples")
RECIPE_DIRS = ("examples", "recipes")
OPT_OUT = re.compile(r"(?:#|<!--)\s*figure:\s*setting\b")

FIGURE = re.compile(
    r"(?<![\w.:])(?P<sign>[+\-±]?)(?P<num>\d+(?:\.\d+)?)[ \u00a0]?"
    r"(?P<unit>dB|[nµu]s|ms|s|secs?|seconds?|mins?|minutes?|hours?|[KMGT]i?B|×|x|%)"
    r"(?![\w])"
)
BOUND = re.compile(r"(?:>=|<=|≥|≤|(?<![-=])>|<|\bat least|\bat most|\bpast)\s*~?\s*$")
APPROX = re.compile(r"(?:~|\babout|\baround|\broughly|\bapproximately|\d\s?[-–])\s*$")
MEMORY = re.compile(r"[KMGT]i?B")
SPEED_AFTER = re.compile(r"\s*(?:faster|slower|quicker|as fast|speed)")
PERCENT_CONTEXT = re.compile(r"\b(?:faster|slower|quicker|speed|engine|time|size|bytes|smaller|larger|bigger)\b")


def is_measured(line: str, match: re.Match[str]) -> bool:
    """Whether the figure `match` on `line` reads as a measurement rather than a bound or setting."""
    before, after = line[: match.start()], line[match.end() :]
    if BOUND.search(before):
        return False
    unit, number = match["unit"], match["num"]
    whole = "." not in number
    approx = bool(APPROX.search(before))
    if MEMORY.fullmatch(unit):
        value = int(number) if whole else 0
        return not (value > 0 and value & (value - 1) == 0)
    if unit in ("×", "x"):
        if re.match(r"\s*\d", after):  # a product or a shape: 2 × 255, 1×1
            return False
        return not whole or approx or bool(SPEED_AFTER.match(after))
    if unit == "%":
        window = before[-30:] + " " + after[:30]
        return bool(match["sign"]) or not whole or approx or bool(PERCENT_CONTEXT.search(window))
    return True


def figures(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line of `text` that states a measured figure and does not opt out."""
    for number, line in enumerate(text.splitlines(), start=1):
        if OPT_OUT.search(line):
            continue
        if any(is_measured(line, m) for m in FIGURE.finditer(line)):
            yield number, line


def files(root: Path) -> list[Path]:
    """The files scanned under `root`: docs/**/*.md, the code's .py and the recipes' .yaml (symlinked
    folders are not followed: flowpress/compress is compress/)."""
    wanted: set[Path] = set()
    for folder, suffixes in (
        [("docs", (".md",))] + [(d, (".py",)) for d in CODE_DIRS] + [(d, (".yaml", ".yml")) for d in RECIPE_DIRS]
    ):
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            wanted.update(Path(dirpath) / f for f in filenames if f.endswith(suffixes))
    return sorted(wanted)


def find_figures(root: Path) -> list[str]:
    """Every finding under `root` as `path:line: text` (path relative to `root`)."""
    return [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in files(root)
        for number, line in figures(path.read_text(encoding="utf-8"))
    ]


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    findings = find_figures(root)
    for finding in findings:
        print(finding)
    if findings:
        print(
            f"{len(findings)} measured figure(s) outside results/: point at the results/ file instead, "
            "or mark a setting with '# figure: setting' ('<!-- figure: setting -->' in markdown)",
            file=sys.stderr,
        )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
