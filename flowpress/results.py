"""results/*.md: the measured tables the tools write for the README to link, each headed by the
machine, commit and date of the run that measured it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from flowpress.engines.isa import host_isa
from flowpress.files import write_text
from flowpress.validation.report import Report, report_markdown


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else "unknown"


def header(title: str, command: str) -> str:
    host = host_isa()
    machine = f"{_cpu_model()}, {os.cpu_count()} cores, ISA class {host.isa_class}"
    if host.emulated:
        machine += " (emulated: FLOWPRESS_ISA)"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"# {title}\n\n_Written by `{command}` on {machine}; commit {_commit()}; {date}._\n\n"


def write_result(results_dir: str | Path, name: str, title: str, command: str, body: str) -> Path:
    """results_dir/<name>.md: the header, then `body` (markdown), written atomically."""
    path = Path(results_dir) / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, header(title, command) + body.lstrip())
    return path


def write_quantize_result(results_dir: str | Path, run_dir: Path, report: Report) -> Path:
    """results/quantize-<recipe>.md: the report of the last `make quantize` of that recipe."""
    body = report_markdown(report, report.recipe).split("\n", 1)[1]  # the header replaces its title
    lines = [line for line in body.splitlines() if not line.startswith("![")]  # the pictures stay in the run
    body = "\n".join(lines) + f"\n\nPictures and samples: {run_dir}/ (not committed).\n"
    return write_result(
        results_dir,
        f"quantize-{report.recipe}",
        f"make quantize: {report.recipe}",
        f"flowpress quantize --recipe ... ({report.recipe})",
        body,
    )
