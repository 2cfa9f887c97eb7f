"""The ablation's peers, built as their users build them: modelopt's INT8_DEFAULT_CFG calibrated
by running the whole sampler, onnxruntime's quantize_static; modelopt's configs as its diffusers
example runs them (EXAMPLE_PEERS: the same calibration, its skipped layers in full precision),
measured on the fake-quant model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import ort_quantize_static
from flowpress.calibration import CalibrationSet
from flowpress.compress import QuantizedModel
from flowpress.engines import OrtEngine
from flowpress.export import ExportConfig, export_onnx, save_ort_engine
from flowpress.models import DiffusersDenoiser, StepModel
from flowpress.sampling import Cond, Sampler

# modelopt's configs as its diffusers example runs them on a CPU (fake-quant), by peer name: (mtq
# config, setting).  NVFP4 (NVFP4_DEFAULT_CFG, NVFP4_SVDQUANT_DEFAULT_CFG) needs CUDA in modelopt 0.47
# ("amax must be a CUDA tensor for dynamic block quantization"): a row for a GPU host.
EXAMPLE_PEERS = {
    "modelopt-int8-example": ("INT8_DEFAULT_CFG", "w8a8"),
    "modelopt-int4-awq": ("INT4_AWQ_CFG", "w4a16"),
    "modelopt-w4a8-awq": ("W4A8_AWQ_BETA_CFG", "w4a8"),
}


def _trajectories(
    model: DiffusersDenoiser, sampler: Sampler, guidance: float, seed: int, budget: int
) -> tuple[StepModel, list[int]]:
    """The FP step model and as many whole-sampler trajectory seeds as the input budget allows."""
    n_traj = max(1, budget // (sampler.n_evaluations * (2 if guidance != 1.0 else 1)))
    return StepModel(model, sampler).eval(), list(range(seed, seed + n_traj))


def modelopt_default(
    model: DiffusersDenoiser,
    sampler: Sampler,
    guidance: float,
    seed: int,
    budget: int,
    conditions: Callable[[int], Cond],
    null: Cond,
) -> QuantizedModel:
    """modelopt's own recipe (compress.modelopt.modelopt_default) on as many whole-sampler
    trajectories as the input budget allows; conditions(n): the conditioning of n trajectories
    (classes or calibration prompts cycling), null: guidance's."""
    from flowpress.compress.modelopt import modelopt_default as run_modelopt

    fp, seeds = _trajectories(model, sampler, guidance, seed, budget)
    return run_modelopt(fp, sampler, conditions(len(seeds)), null, guidance, seeds)


def modelopt_example(
    model: DiffusersDenoiser,
    sampler: Sampler,
    guidance: float,
    seed: int,
    budget: int,
    peer: str,
    conditions: Callable[[int], Cond],
    null: Cond,
) -> StepModel:
    """The fake-quant model of one of modelopt's configs (EXAMPLE_PEERS), calibrated the way
    modelopt_default is, with the layers modelopt's diffusers example skips left in full precision
    (as flowpress's low-bit recipes leave or widen the input and output layers)."""
    from flowpress.compress.modelopt import MODELOPT_DIFFUSERS_SKIP, modelopt_fake_quant

    fp, seeds = _trajectories(model, sampler, guidance, seed, budget)
    return modelopt_fake_quant(
        fp, sampler, conditions(len(seeds)), null, guidance, seeds, EXAMPLE_PEERS[peer][0], MODELOPT_DIFFUSERS_SKIP
    )


def modelopt_engine(
    qmodel: QuantizedModel, sampler: Sampler, workdir: Path, name: str = "modelopt-default"
) -> OrtEngine:
    """The modelopt model as its user runs it on a CPU: Q/DQ on the inputs and weights of every
    Conv / Linear (the placement modelopt exports), its own 8-bit weights, onnxruntime's optimizer."""
    graph = export_onnx(qmodel.fp_module, workdir / "modelopt.onnx", ExportConfig("tensorrt"), qmodel)
    save_ort_engine(graph, workdir / "modelopt.opt.onnx")
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
