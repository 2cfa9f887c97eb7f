"""Export: torch -> ONNX with Q/DQ flavours, and checks of the graphs onnxruntime runs."""

from export.onnx import ExportConfig, Flavour, StepModel, export_onnx, insert_qdq
from export.validate import Parity, check_parity, cosine_per_sample, float_weight_ops, ort_session

__all__ = [
    "ExportConfig",
    "Flavour",
    "Parity",
    "StepModel",
    "check_parity",
    "cosine_per_sample",
    "export_onnx",
    "float_weight_ops",
    "insert_qdq",
    "ort_session",
]
