"""Engines: the runtimes behind one protocol (torch, onnxruntime, OpenVINO, TensorRT), how a CPU
engine is built from a quantized model, the host's ISA and what is exact on it.  Judging engines
against the FP trajectory is flowpress.validation's."""

from flowpress.engines.base import Engine, OrtEngine, TorchEngine, check_steps

__all__ = ["Engine", "OrtEngine", "TorchEngine", "check_steps"]
