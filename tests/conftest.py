"""Shared fixtures: a tiny diffusers UNet (random weights) and the committed classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowpress.calibration import CalibrationConfig, capture
from flowpress.compress import PORTABLE_WEIGHT_BITS, Int8Config, quantize, set_weight_bits
from flowpress.engines.isa import host_isa
from flowpress.engines.portability import resolve_portable
from flowpress.export import ExportConfig, export_onnx
from flowpress.models import StepModel, UNetSpec, build_unet, load_model, save_model
from flowpress.sampling import Schedule

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
CLASSIFIER = DIGITS / "checkpoints" / "digits-classifier"
TEACHER = DIGITS / "checkpoints" / "digits-unet"
EVALUATOR = f"{{name: 'examples.digits.evaluator:DigitsEvaluator', options: {{classifier: {CLASSIFIER}}}}}"

TINY = UNetSpec(block_out_channels=(8, 16), attention_levels=(1,), layers_per_block=1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional UNet2DModel (16x16, 10 classes) saved as a diffusers directory (random weights)."""
    torch.manual_seed(0)
    return save_model(build_unet(TINY, (1, 16, 16), 10), tmp_path_factory.mktemp("tiny") / "unet")


TINY_SCHEDULE = Schedule(4)


def labels_of(n: int) -> dict[str, torch.Tensor]:
    """The conditioning of n samples, classes cycling (sample i draws class i % 10)."""
    return {"class_labels": torch.arange(n) % 10}


def calibrate(model, schedule=TINY_SCHEDULE, n_samples: int = 8, guidance: float = 2.0):
    """n_samples trajectories of `model` on `schedule` at `guidance`, every step."""
    return capture(
        StepModel(model, schedule),
        schedule,
        model.sample_shape,
        labels_of(n_samples),
        CalibrationConfig(n_samples=n_samples),
        guidance,
        model.null_condition(),
    )


def tiny_calibration(model):
    """8 trajectories of the tiny model on TINY_SCHEDULE at guidance 2, every step."""
    return calibrate(model)


def for_this_host(qmodel):
    """The int8 weight form `make quantize` ships on this host (7-bit where 8-bit saturates)."""
    set_weight_bits(qmodel, PORTABLE_WEIGHT_BITS if resolve_portable(None, host_isa()) else 8)
    return qmodel


def feeds_of(calib, n: int = 16) -> dict[str, torch.Tensor]:
    """n calibration inputs spread over the steps, as engine feeds (x, step, class_labels)."""
    x, step, cond = calib.feeds(n)
    return {"x": x, "step": step, **cond}


@pytest.fixture(scope="session")
def tiny_tensorrt_export(tiny_model_dir, tmp_path_factory):
    """(tensorrt-flavour int8 Q/DQ graph path, fp32 graph path, feeds as tensors) of the tiny
    UNet on TINY_SCHEDULE: 16 calibration inputs spread over the steps."""
    model = load_model(tiny_model_dir)
    calib = tiny_calibration(model)
    qmodel = quantize(model, Int8Config(), calib, TINY_SCHEDULE)
    tmp = tmp_path_factory.mktemp("tensorrt-export")
    path = export_onnx(qmodel.fp_module, tmp / "model.tensorrt.onnx", ExportConfig("tensorrt"), qmodel)
    fp32 = export_onnx(StepModel(model, TINY_SCHEDULE), tmp / "fp32.onnx")
    return path, fp32, feeds_of(calib)
