"""The product tests' fixtures: a tiny diffusers UNet (random weights), one thread per test."""

from tests.conftest import _threads, tiny_model_dir, tiny_tensorrt_export  # noqa: F401
