"""Shared fixtures: a tiny diffusers UNet (random weights) and the committed classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import save_model
from models.teacher import TeacherConfig, build_unet

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
