"""ONNX -> OpenVINO IR: NNCF int8 fed flowpress's own calibration set, or plain (bf16 / f32)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flowpress.calibration import CalibrationSet
from flowpress.compress.model import is_excluded
from flowpress.errors import FlowpressError
from flowpress.extras import need
from flowpress.files import staged_dir
from flowpress.models import as_feeds
from flowpress.sampling import batch_cond

OvPrecision = Literal["int8", "bf16", "f32"]


@dataclass(frozen=True)
class OpenVinoConfig:
    """precision: 'int8' (NNCF post-training quantization on the trajectory calibration set),
    'bf16' or 'f32' (no quantization; the inference precision hint is set explicitly, since
    OpenVINO silently runs "fp32" models in bf16 on AMX CPUs).  transformer: NNCF's
    TRANSFORMER model type (keeps attention-sensitive ops in float).  On the digits teachers'
    prepared graphs it measured a higher final PSNR vs FP than NNCF's default type for both the
    UNet and the DiT, so it is the default for both.
    float_precision: what an int8 graph runs its float parts in (norms, softmax, attention
    matmuls NNCF leaves float): 'f32', 'bf16', or 'auto' = bf16 where the CPU plugin lists
    BF16 among its capabilities, else f32 (OpenVINO's own default there, so also what NNCF's
    default flow runs).  On the digits UNet's int8 IR (AVX-512 BF16, no AMX, b8) bf16 measured
    a little faster per forward than f32 at the same final PSNR.
    smooth_quant: the SmoothQuant strength NNCF migrates from MatMul inputs into their weights
    (NNCF's TRANSFORMER default 0.95), or None for none.  Model-dependent (NNCF int8 of the FP
    graph, final PSNR vs FP): it measured better with it on the digits UNet and DiT, and worse on
    the digits SD UNet (text cross-attention), whose recipe turns it off."""

    precision: OvPrecision = "int8"
    transformer: bool = True
    calib_batch_size: int = 32
    float_precision: Literal["auto", "f32", "bf16"] = "auto"
    smooth_quant: float | None = 0.95

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "bf16", "f32"):
            raise FlowpressError(f"openvino.precision must be int8, bf16 or f32, got {self.precision!r}")
        if self.float_precision not in ("auto", "f32", "bf16"):
            raise FlowpressError(f"openvino.float_precision must be auto, f32 or bf16, got {self.float_precision!r}")
        if self.smooth_quant is not None and not 0 < self.smooth_quant <= 1:
            raise FlowpressError(f"openvino.smooth_quant must be in (0, 1] or null (none), got {self.smooth_quant!r}")

    @property
    def inference_hint(self) -> str:
        """Compile-time INFERENCE_PRECISION_HINT: bf16 / f32 as asked; int8 graphs run their
        float parts in float_precision (auto resolved on this machine's CPU)."""
        if self.precision != "int8":
            return self.precision
        if self.float_precision == "auto":
            return "bf16" if cpu_has_bf16() else "f32"
        return self.float_precision


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512 BF16 or AMX)."""
    ov = need("openvino", "openvino", "OpenVINO engines")

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def overflow_fix(portable: bool) -> str:
    """NNCF's overflow fix for an int8 IR: 'enable' (every Conv / MatMul weight in half the int8
    range, exact where the int8 kernels saturate: engines/isa.py) when portable, else NNCF's
    default 'first_layer_only'."""
    return "enable" if portable else "first_layer_only"


def float_ops(model: Any, exclude: tuple[str, ...]) -> list[str]:
    """The Convolution / MatMul ops of an IR read from flowpress's ONNX export whose layer matches
    `exclude` (quantize.exclude's module-name patterns): the exporter names an op after its module's
    path, '/model/net/up_blocks.0/resnets.1/conv_shortcut/Conv/WithoutBiases' for the layer
    'net.up_blocks.0.resnets.1.conv_shortcut'."""
    names = []
    for op in model.get_ops():
        parts = op.get_friendly_name().split("/")
        if op.get_type_name() not in ("Convolution", "MatMul") or parts[:2] != ["", "model"]:
            continue
        ends = [i for i, part in enumerate(parts) if part.split("_")[0] in ("Conv", "Gemm", "MatMul")]
        if ends and is_excluded(".".join(parts[2 : ends[0]]), exclude):
            names.append(op.get_friendly_name())
    return names


def export_openvino(
    onnx_path: str | Path,
    out_xml: str | Path,
    config: OpenVinoConfig,
    calib: CalibrationSet | None = None,
    portable: bool = False,
    exclude: tuple[str, ...] = (),
) -> Path:
    """Read the FP ONNX graph (x, step, *cond) -> v, quantize it with NNCF when
    config.precision is int8 (weights in half range when `portable`; the layers matching
    `exclude`, quantize.exclude's patterns, left in float as flowpress's own engine leaves them),
    and save IR (xml + bin) into a fresh directory atomically."""
    ov = need("openvino", "openvino", "OpenVINO engines")

    out_xml = Path(out_xml)
    model = ov.Core().read_model(str(onnx_path))
    if config.precision == "int8":
        if calib is None:
            raise FlowpressError("openvino int8: needs the calibration set (run the calibrate stage first)")
        import logging

        nncf = need("nncf", "openvino", "OpenVINO int8 (NNCF)")

        nncf.set_log_level(logging.WARNING)  # it lists every op of an ignored scope at INFO
        kept = float_ops(model, exclude)
        if exclude and not kept:
            raise FlowpressError(
                f"openvino int8: quantize.exclude {list(exclude)} names no Conv / Linear layer of {onnx_path}; "
                "check the patterns against the model's module names"
            )

        items = []
        for start in range(0, len(calib), config.calib_batch_size):
            rows = slice(start, start + config.calib_batch_size)
            feeds = as_feeds(calib.x[rows], calib.step[rows], batch_cond(calib.cond, rows))
            items.append({name: value.numpy() for name, value in feeds.items()})
        model = nncf.quantize(
            model,
            nncf.Dataset(items),
            subset_size=len(items),  # NNCF counts dataset items (batches here)
            model_type=nncf.ModelType.TRANSFORMER if config.transformer else None,
            ignored_scope=nncf.IgnoredScope(names=kept) if kept else None,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                overflow_fix=nncf.OverflowFix(overflow_fix(portable)),
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(
                    matmul=-1 if config.smooth_quant is None else config.smooth_quant
                ),
            ),
        )
    try:
        with staged_dir(out_xml.parent) as tmp:
            ov.save_model(model, str(tmp / out_xml.name), compress_to_fp16=False)
    except RuntimeError as err:  # OpenVINO reports a failed write (full disk, no permission) this way
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else "write failed"
        raise FlowpressError(
            f"{out_xml}: OpenVINO could not write the IR ({reason}); free space or make the runs directory writable"
        ) from None
    return out_xml
