"""The ablation's peers, built as their users build them: modelopt's INT8_DEFAULT_CFG calibrated
by running the whole sampler, onnxruntime's quantize_static."""

from __future__ import annotations

from pathlib import Path

import torch

from flowpress.calibration import CalibrationSet
from flowpress.compress import QuantizedModel
from flowpress.engines import OrtEngine
from flowpress.experiments.common import ort_quantize_static
from flowpress.export import ExportConfig, build_ort_engine, export_onnx
from flowpress.models import DiffusersDenoiser, StepModel
from flowpress.sampling import Sampler


def modelopt_default(
    model: DiffusersDenoiser, sampler: Sampler, guidance: float, seed: int, budget: int
) -> QuantizedModel:
    """modelopt's own recipe (compress.modelopt.modelopt_default) on as many whole-sampler
    trajectories as the input budget allows."""
    from flowpress.compress.modelopt import modelopt_default as run_modelopt

    n_traj = max(1, budget // (sampler.n_evaluations * (2 if guidance != 1.0 else 1)))
    fp = StepModel(model, sampler).eval()
    seeds = list(range(seed, seed + n_traj))
    return run_modelopt(fp, sampler, model.cycling_condition(n_traj), model.null_condition(), guidance, seeds)


def modelopt_engine(
    qmodel: QuantizedModel, sampler: Sampler, workdir: Path, name: str = "modelopt-default"
) -> OrtEngine:
    """The modelopt model as its user runs it on a CPU: Q/DQ on the inputs and weights of every
    Conv / Linear (the placement modelopt exports), its own 8-bit weights, onnxruntime's optimizer."""
    graph = export_onnx(qmodel.fp_module, workdir / "modelopt.onnx", ExportConfig("tensorrt"), qmodel)
    build_ort_engine(graph, workdir / "modelopt.opt.onnx")
    return OrtEngine(workdir / "modelopt.opt.onnx", sampler, name)


def ort_static_engine(
    model: DiffusersDenoiser,
    sampler: Sampler,
    full: CalibrationSet,
    seed: int,
    budget: int,
    workdir: Path,
    op_types: tuple[str, ...] | None = None,
) -> OrtEngine:
    """onnxruntime's quantize_static on `budget` inputs drawn at random steps of the captured FP
    trajectories, as its engine."""
    fp = export_onnx(StepModel(model, sampler), workdir / "fp32.onnx")
    index = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:budget]
    static = ort_quantize_static(fp, full.subset(index), workdir / "ort_static.onnx", op_types)
    return OrtEngine(static, sampler, "ort-quantize-static")
