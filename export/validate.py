"""Check exported graphs as onnxruntime runs them: parity with torch, integer kernels."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sampling import FlowpressError

OPT_LEVELS = ("disabled", "all")
WEIGHT_OPS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul")


def ort_session(path: str | Path, optimization: str = "all", threads: int = 0, optimized_path: str | None = None):  # noqa: ANN201
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cosine_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """(B,) cosine similarity between a[i] and b[i], flattened."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@dataclass(frozen=True)
class Parity:
    """min_cosine: worst per-sample cosine(ORT, reference); noise_ratio: mean over samples of
    ||ORT - fake-quant|| / ||fake-quant - FP|| (None for FP graphs)."""

    optimization: str
    min_cosine: float
    noise_ratio: float | None


def check_parity(
    path: str | Path,
    reference: nn.Module,
    feeds: dict[str, Tensor],
    fp_reference: nn.Module | None = None,
    max_noise_ratio: float = 2.0,
    min_cosine: float = 0.99999,
) -> list[Parity]:
    """Run the graph with onnxruntime optimizations off and on and compare every forward.

    reference: a StepModel (x, step[, class_labels]) -> v.  For a Q/DQ graph pass the fake-quant
    model as `reference` and the FP model as `fp_reference`: rounding flips amplify through
    chained 8-bit quantizers, so the graph need not match fake-quant bit for bit, only stay
    within `max_noise_ratio` times the quantization noise itself.  FP graphs need `min_cosine`.
    """
    with torch.no_grad():
        expected = reference(*feeds.values())
        fp = None if fp_reference is None else fp_reference(*feeds.values())
    results = []
    for level in OPT_LEVELS:
        session = ort_session(path, level)
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        cos = float(cosine_per_sample(got, expected).min())
        ratio = None
        if fp is not None:
            noise = (expected - fp).flatten(1).norm(dim=1).clamp_min(1e-12)
            ratio = float(((got - expected).flatten(1).norm(dim=1) / noise).mean())
        results.append(Parity(level, cos, ratio))
        broken = (ratio is not None and not ratio <= max_noise_ratio) or (ratio is None and not cos >= min_cosine)
        if broken:
            measure = (
                f"noise ratio {ratio:.3f} > {max_noise_ratio}"
                if ratio is not None
                else f"min cosine {cos:.6f} < {min_cosine}"
            )
            raise FlowpressError(
                f"{path}: onnxruntime (optimizations {level}) disagrees with the torch model ({measure}); the export is broken"
            )
    return results


def float_weight_ops(path: str | Path) -> list[str]:
    """Names of float Conv / MatMul / Gemm nodes whose weight is a constant (or a dequantized
    constant) in the graph onnxruntime runs; activation x activation MatMuls are not counted."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "optimized.onnx")
        ort_session(path, "extended", optimized_path=out)
        graph = onnx.load(out).graph
    constants = {init.name for init in graph.initializer}
    constants |= {
        o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants for o in n.output
    }
    return [n.name for n in graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in constants]
