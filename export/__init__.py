"""Export: torch -> ONNX with Q/DQ flavours, and checks of the graphs onnxruntime runs."""

from flowpress.export.onnx import (
    ExportConfig,
    Flavour,
    export_onnx,
    insert_qdq,
)
from flowpress.export.validate import (
    FP8_DISABLED_OPTIMIZERS,
    Parity,
    check_parity,
    cosine_per_sample,
    float_weight_ops,
    is_fp8_graph,
    non_fp8_quantizers,
    ort_session,
    qdq_types,
    save_ort_engine,
)

__all__ = [
    "FP8_DISABLED_OPTIMIZERS",
    "ExportConfig",
    "Flavour",
    "Parity",
    "save_ort_engine",
    "check_parity",
    "cosine_per_sample",
    "export_onnx",
    "float_weight_ops",
    "insert_qdq",
    "is_fp8_graph",
    "non_fp8_quantizers",
    "ort_session",
    "qdq_types",
]
