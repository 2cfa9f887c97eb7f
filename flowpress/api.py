"""The Python API beside the CLI: quantize a model by a recipe, read a finished run, use its engine.

import flowpress
run = flowpress.quantize("examples/digits/recipes/digits-unet-quick.yaml")
run.report.final["psnr_db"], run.report.passed
engine = run.engine()              # the recommended CPU engine, (x, step, cond) -> out
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowpress.engines import Engine, OrtEngine
from flowpress.errors import FlowpressError
from flowpress.recipe import Recipe, load_recipe
from flowpress.rundir import read_manifest, verify_run
from flowpress.sampling import schedule_from_dict
from flowpress.schema import from_dict
from flowpress.validation.report import Report


@dataclass(frozen=True)
class Run:
    """A finished run directory (runs/<name>/): its recipe, report and engines, checked against
    manifest.json when loaded."""

    dir: Path
    recipe: Recipe
    report: Report
    schedule: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        verify_run(run_dir, manifest)
        recipe = from_dict(Recipe, manifest["recipe"], f"{run_dir}/manifest.json: recipe")
        return cls(run_dir, recipe, Report.load(run_dir / "report.json"), manifest["schedule"])

    @property
    def engines(self) -> list[str]:
        """The CPU engines the report judged, e.g. ['ort-int8', 'openvino-int8', 'openvino-bf16']."""
        return [e["engine"] for e in self.report.cpu_engines]

    def engine(self, name: str | None = None) -> Engine:
        """A CPU engine of the run (default: the one the report recommends, else the gate's)."""
        from flowpress.stages.build import ov_engine

        name = name or self.report.recommendation.get("engine") or self.report.engine
        if name not in self.engines:
            raise FlowpressError(f"{self.dir}: no engine {name!r}; this run has {', '.join(self.engines)}")
        sampler = schedule_from_dict(self.schedule)
        if name.startswith("openvino-"):
            return ov_engine(self.dir, name.removeprefix("openvino-"), self.recipe.engine.openvino, sampler)
        return OrtEngine(self.dir / "engine" / "model.opt.onnx", sampler, name)


def _recipe(recipe: str | Path | Recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def quantize(recipe: str | Path | Recipe, runs: str | Path = "runs", progress: bool = False) -> Run:
    """Calibrate, quantize, export, build and compare as the recipe says, into runs/<name>/.
    A failed gate is in run.report.passed, not an exception; bad input raises FlowpressError."""
    from flowpress.stages.chain import run_quantize

    run_dir, _ = run_quantize(_recipe(recipe), runs, progress)
    return Run.load(run_dir)


def compare(recipe: str | Path | Recipe, runs: str | Path = "runs", progress: bool = False) -> Run:
    """Re-run the comparison of an existing run (its files checked first)."""
    from flowpress.stages.chain import run_compare

    run_dir, _ = run_compare(_recipe(recipe), runs, progress)
    return Run.load(run_dir)


def load_run(run_dir: str | Path) -> Run:
    return Run.load(run_dir)
