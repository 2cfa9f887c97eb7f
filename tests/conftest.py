"""Shared fixtures: a tiny diffusers UNet (random weights) and the committed classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calibration import CalibrationConfig, capture
from compress import PORTABLE_WEIGHT_BITS, QuantConfig, quantize, set_weight_bits
from engines.isa import host_isa
from engines.portability import resolve_portable
from export import ExportConfig, export_onnx
from models import load_model, save_model
from models.teacher import TeacherConfig, build_unet
from sampling import Schedule

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "checkpoints" / "digits-classifier"
TEACHER = ROOT / "checkpoints" / "digits-unet"

TINY = TeacherConfig(block_out_channels=(8, 16), attention_levels=(1,), layers_per_block=1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional UNet2DModel saved as a diffusers directory (random weights)."""
    torch.manual_seed(0)
    return save_model(build_unet(TINY), tmp_path_factory.mktemp("tiny") / "unet")


TINY_SCHEDULE = Schedule(4)


def for_this_host(qmodel):
    """The int8 weight form `make quantize` ships on this host (7-bit where 8-bit saturates)."""
    set_weight_bits(qmodel, PORTABLE_WEIGHT_BITS if resolve_portable(None, host_isa()) else 8)
    return qmodel


def tiny_calibration(model):
    """8 trajectories of the tiny model on TINY_SCHEDULE at guidance 2, every step."""
    return capture(
        model,
        model.sample_shape,
        model.num_classes,
        TINY_SCHEDULE,
        CalibrationConfig(n_samples=8),
        2.0,
        model.null_label,
    )


@pytest.fixture(scope="session")
def tiny_tensorrt_export(tiny_model_dir, tmp_path_factory):
    """(tensorrt-flavour int8 Q/DQ graph path, fp32 graph path, feeds as tensors) of the tiny
    UNet on TINY_SCHEDULE: 16 calibration inputs spread over the steps."""
    model = load_model(tiny_model_dir)
    calib = tiny_calibration(model)
    qmodel = quantize(model, QuantConfig(), calib)
    tmp = tmp_path_factory.mktemp("tensorrt-export")
    path = export_onnx(qmodel.fp_module, TINY_SCHEDULE, tmp / "model.tensorrt.onnx", ExportConfig("tensorrt"), qmodel)
    fp32 = export_onnx(qmodel.fp_module, TINY_SCHEDULE, tmp / "fp32.onnx")
    index = torch.linspace(0, len(calib) - 1, 16).long()
    return path, fp32, {"x": calib.x[index], "step": calib.step[index], "class_labels": calib.cond[index]}
