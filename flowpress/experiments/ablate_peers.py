"""The ablation's peers, built as their users build them: modelopt's INT8_DEFAULT_CFG calibrated
by running the whole sampler, onnxruntime's quantize_static."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from flowpress.calibration import CalibrationSet
from flowpress.compress import Int8Config, QuantizedModel
from flowpress.compress.modelopt import layer_quants
from flowpress.engines import OrtEngine
from flowpress.experiments.common import ort_quantize_static
from flowpress.export import ExportConfig, build_ort_engine, export_onnx
from flowpress.models import DiffusersDenoiser, StepModel
from flowpress.sampling import Sampler, noise_for_seeds, sample


@torch.no_grad()
def modelopt_default(
    model: DiffusersDenoiser, sampler: Sampler, guidance: float, seed: int, budget: int
) -> QuantizedModel:
    """modelopt's own recipe: INT8_DEFAULT_CFG, calibrated by running the whole sampler (its
    diffusers example does this on prompts) on as many trajectories as the input budget allows."""
    from flowpress.compress.modelopt import import_modelopt

    mtq = import_modelopt()

    fp = StepModel(model, sampler).eval()
    qmodule = copy.deepcopy(fp)
    n_traj = max(1, budget // (sampler.n_evaluations * (2 if guidance != 1.0 else 1)))
    noise = noise_for_seeds(range(seed, seed + n_traj), model.sample_shape)
    cond = model.cycling_condition(n_traj)

    def forward_loop(_denoiser: torch.nn.Module) -> None:
        sample(sampler, qmodule, noise, cond, guidance, model.null_condition())

    mtq.quantize(qmodule.model, copy.deepcopy(mtq.INT8_DEFAULT_CFG), forward_loop)
    config = Int8Config(temporal="int8", conv_output_quant=False)  # what INT8_DEFAULT_CFG places
    return QuantizedModel(qmodule, fp, layer_quants(qmodule, (), config), config, [])


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
