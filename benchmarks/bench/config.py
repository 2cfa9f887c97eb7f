"""What `python -m benchmarks bench` measures: its models, variants, timing settings and the bars' thresholds.

The thresholds live in recipes/bench.yaml; the defaults here only say what a missing key means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flowpress.errors import FlowpressError
from flowpress.recipe import load_recipe
from flowpress.schema import from_dict, load_yaml

PEERS = ("torch-fp32", "ort-fp32", "ort-quantize-static", "ov-bf16", "ov-nncf-default")
OURS = (
    "flowpress-ort-int8",
    "flowpress-ov-int8",
    "flowpress-ov-qdq",
    "flowpress-ov-bf16",
    "flowpress-fp8",
    "flowpress-w4a8",
    "student",
    "flowpress-ort-int8-portable",
    "flowpress-ov-int8-portable",
)
# the int8 engines' portable form beside the full-range one, built only on hosts whose int8
# kernels are exact with 8-bit weights (elsewhere flowpress's int8 engines are portable already):
# what exactness on every x86 host costs in speed and fidelity there
PORTABLE_TWINS = {
    "flowpress-ort-int8-portable": "flowpress-ort-int8",
    "flowpress-ov-int8-portable": "flowpress-ov-int8",
}
# a different (one-step) network: its rows show what distillation buys, not what an engine of the
# same network runs at, so it is left out of the per-step int8-peak bar
NOT_THE_SAME_NETWORK = ("student",)
# which matrix-multiply peak a variant's arithmetic runs against
ARITHMETIC = {
    "torch-fp32": "fp32",
    "ort-fp32": "fp32",
    "ort-quantize-static": "int8",
    "ov-bf16": "bf16",
    "ov-nncf-default": "int8",
    "flowpress-ort-int8": "int8",
    "flowpress-ov-int8": "int8",
    "flowpress-ov-qdq": "int8",
    "flowpress-ov-bf16": "bf16",
    "flowpress-fp8": "fp32",  # emulated on CPU: fp8 Q/DQ around float Conv / MatMul
    "flowpress-w4a8": "fp32",  # int4 weights dequantized into float Conv / MatMul on CPU
    "student": "int8",
    "flowpress-ort-int8-portable": "int8",
    "flowpress-ov-int8-portable": "int8",
}


@dataclass(frozen=True)
class RandomDit:
    """A DiTTransformer2DModel with seeded random weights: speed needs no training."""

    layers: int = 10
    heads: int = 6
    head_dim: int = 64
    channels: int = 4
    sample_size: int = 32
    patch_size: int = 2
    num_classes: int = 10
    seed: int = 0


@dataclass(frozen=True)
class BenchModel:
    """recipe: sampler, calibration and quantization settings (and the model, unless random_dit);
    steps / guidance override the recipe's; n_samples: seeds for final PSNR."""

    name: str
    recipe: str
    random_dit: RandomDit | None = None
    steps: int | None = None
    guidance: float | None = None
    n_samples: int = 500
    fp8_recipe: str | None = None  # flowpress-fp8 / flowpress-w4a8 quantize with these recipes'
    w4a8_recipe: str | None = None  # settings; a model without one has no such row
    student_recipe: str | None = None  # the distilled student of this model (its own sampler)
    portable_weights: Literal["7-bit", "u8u8"] | None = None  # the recipe's engine.portable_weights, overridden

    def __post_init__(self) -> None:
        for key, precision in (("fp8_recipe", "fp8"), ("w4a8_recipe", "w4a8")):
            path = getattr(self, key)
            found = load_recipe(path).quantize.precision if path else precision
            if found != precision:
                raise FlowpressError(
                    f"bench model {self.name}: {key} {path} quantizes to {found}, not {precision}; "
                    f"name a recipe with quantize.precision: {precision}"
                )


@dataclass(frozen=True)
class Int8PeakBar:
    """The fastest flowpress engine of `model` (same network: not the student) runs its forward
    at >= `min` of this host's int8 GEMM peak (GOP/s); null model: no such bar."""

    model: str | None = "speed-dit"
    min: float = 0.75

    def __post_init__(self) -> None:
        if not 0 < self.min <= 1:
            raise FlowpressError(f"bars.int8_peak_fraction.min must be in (0, 1], got {self.min}")


@dataclass(frozen=True)
class OvInt8VsNncfBar:
    """flowpress-ov-int8 against ov-nncf-default: speed ratio and final PSNR gain at least these."""

    min_speedup: float = 1.0
    min_psnr_gain_db: float = 1.0

    def __post_init__(self) -> None:
        if not self.min_speedup > 0:
            raise FlowpressError(f"bars.ov_int8_vs_nncf.min_speedup must be > 0, got {self.min_speedup}")


@dataclass(frozen=True)
class OrtInt8VsStaticBar:
    """flowpress-ort-int8 against ort-quantize-static: speed ratio and final PSNR gain at least these."""

    min_speedup: float = 1.1
    min_psnr_gain_db: float = 0.0

    def __post_init__(self) -> None:
        if not self.min_speedup > 0:
            raise FlowpressError(f"bars.ort_int8_vs_quantize_static.min_speedup must be > 0, got {self.min_speedup}")


@dataclass(frozen=True)
class BenchBars:
    """The bench's bars (batch 8, ms_per_step_median: the median of the passes' medians)."""

    int8_peak_fraction: Int8PeakBar = field(default_factory=Int8PeakBar)
    ov_int8_vs_nncf: OvInt8VsNncfBar = field(default_factory=OvInt8VsNncfBar)
    ort_int8_vs_quantize_static: OrtInt8VsStaticBar = field(default_factory=OrtInt8VsStaticBar)


@dataclass(frozen=True)
class BenchConfig:
    name: str = "bench"
    models: tuple[BenchModel, ...] = ()
    variants: tuple[str, ...] = PEERS + OURS
    batches: tuple[int, ...] = (1, 8)
    runs: int = 30  # timed forwards per cell per pass
    passes: int = 3  # interleaved timing passes per batch; a row's median is the median of theirs
    warmup: int = 5
    block: int = 10  # timed forwards per engine per interleaved round
    settle: int = 3  # untimed forwards per engine before its block (and before each timed loop)
    loops: int = 3
    threads: int = 2
    sample_batch: int = 50
    profile_runs: int = 10
    bars: BenchBars = field(default_factory=BenchBars)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(PEERS + OURS))
        if unknown:
            raise FlowpressError(f"bench.variants: unknown {unknown[0]!r}; known: {', '.join(PEERS + OURS)}")
        if not self.models:
            raise FlowpressError("bench.models: list at least one model (name, recipe)")
        if self.runs < 30:
            raise FlowpressError(f"bench.runs must be >= 30 for a stable p90, got {self.runs}")
        if not self.batches or min(self.batches) < 1:
            raise FlowpressError(f"bench.batches must list batch sizes >= 1, got {list(self.batches)}")
        for key in ("passes", "warmup", "block", "settle", "loops", "threads", "sample_batch", "profile_runs"):
            if getattr(self, key) < (0 if key == "warmup" else 1):
                raise FlowpressError(f"bench.{key} must be >= {0 if key == 'warmup' else 1}, got {getattr(self, key)}")
        names = [m.name for m in self.models]
        peak_model = self.bars.int8_peak_fraction.model
        if peak_model is not None and peak_model not in names:
            raise FlowpressError(
                f"bench.bars.int8_peak_fraction.model: {peak_model!r} is not a bench model; "
                f"name one of {', '.join(names)} or null"
            )


def load_bench_config(path: str | Path) -> BenchConfig:
    return from_dict(BenchConfig, load_yaml(path), str(path))
