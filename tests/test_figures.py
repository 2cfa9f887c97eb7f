"""tools/check_figures.py: measured figures live in results/, not in docs, code comments or recipes."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def checker():
    spec = importlib.util.spec_from_file_location("check_figures", ROOT / "tools" / "check_figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_the_measured_line_and_not_the_opted_out_one(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n"
        "The int8 engine gave 50.49 dB against FP.\n"
        "The gate asks 40 dB of every engine. <!-- figure: setting -->\n"
        "A 1×1 conv, a 5% warm-up and protobuf's 2 GB limit.\n"
    )
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "r.yaml").write_text("steps: 20  # 20 steps at >= 1.1x as fast\n")
    assert checker().find_figures(tmp_path) == ["docs/page.md:2: The int8 engine gave 50.49 dB against FP."]


@pytest.mark.parametrize(
    "line",
    [
        "8.20 vs 8.94 ms per forward",
        "one thread took 7 s",
        "peaked at 10.45 GB",
        "the portable twin took 1.06x the full-range engine's time",
        "about 5x",
        "2.3x faster",
        "measured 10-80% faster",
        "+7 % engine bytes",
        "3.5 % of the weights",
    ],
)
def test_measured_figures_are_found(line):
    assert [n for n, _ in checker().figures(line)] == [1]


@pytest.mark.parametrize(
    "line",
    [
        "final PSNR >= 50 dB",
        "grew past 1.5 × the recorded figure",
        "a 2 GiB workspace, 512 MB of tables, 4 KiB aligned",
        "2 × 255 × 127 = 64770",
        "u8 x s8 pairs, a 3x3 min, 10x for 100x fewer steps",
        "warm-up over 5%, the worst 1% of samples",
        'print(f"accuracy {accuracy:.2%}")',
        "20 steps, 64 x 20 steps x 2",
        "a measured 44 dB  # figure: setting",
    ],
)
def test_settings_and_shapes_are_not_figures(line):
    assert list(checker().figures(line)) == []


def test_repository_has_no_measured_figures_outside_results():
    assert checker().find_figures(ROOT) == []
