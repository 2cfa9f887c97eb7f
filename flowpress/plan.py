"""Plan before work: what a run will hold in memory, read from the model's files before anything
is loaded, and refused in one line when the machine cannot hold it.

The estimate: every component's weights in fp32 (the pipeline as loaded), plus the denoiser's
fp32 bytes as many more times as the stage with the largest peak holds beside it (the export's
parity checks in onnxruntime; NNCF quantizing the OpenVINO int8 engine, when OpenVINO engines
are built), plus RUNTIME_BYTES for the interpreter, the libraries and the activations of
small-resolution runs.  The copies are what an SD 1.5-sized run measured (results/scale.md).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from flowpress.errors import FlowpressError
from flowpress.export.graphfile import large_bytes

PEAK_DENOISER_COPIES = {"onnxruntime": 1.7, "openvino": 2.7}  # by the engines built; results/scale.md
RUNTIME_BYTES = 2 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DENOISER_ROLES = ("unet", "transformer")


def _safetensors_elements(path: Path) -> tuple[int, int]:
    """(elements, float elements) of a .safetensors file, from its header alone."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise FlowpressError(f"{path}: not a readable safetensors file ({err}); re-save the model") from None
    total = floats = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = math.prod(entry["shape"])
        total += count
        floats += count if entry["dtype"] in ("F64", "F32", "F16", "BF16") else 0
    return total, floats


def folder_weights(folder: Path) -> tuple[int, int]:
    """(parameters, fp32 bytes as loaded) of the weight files directly in `folder` (a diffusers
    component); a safetensors variant beside its .bin twin is counted once."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix == ".safetensors"]
    params = nbytes = 0
    for path in files:
        if path.suffix == ".safetensors":
            total, floats = _safetensors_elements(path)
            params += total
            nbytes += 4 * floats + (total - floats) * 8
        else:  # pickled weights: their size on disk (fp32 checkpoints are what diffusers saves)
            params += path.stat().st_size // 4
            nbytes += path.stat().st_size
    return params, nbytes


@dataclass(frozen=True)
class MemoryPlan:
    """denoiser_*: the UNet / transformer; pipeline_fp32_bytes: every component as loaded;
    peak_bytes: the estimate; available_bytes: what the machine had free when planned; openvino:
    the run builds NNCF's int8 OpenVINO engine."""

    denoiser_parameters: int
    denoiser_fp32_bytes: int
    pipeline_fp32_bytes: int
    peak_bytes: int
    available_bytes: int
    openvino: bool = True

    def line(self) -> str:
        return (
            f"plan: denoiser {self.denoiser_parameters / 1e9:.2f} B parameters ({self.denoiser_fp32_bytes / 1e9:.2f} GB "
            f"fp32), pipeline {self.pipeline_fp32_bytes / 1e9:.2f} GB; peak resident about "
            f"{self.peak_bytes / 1e9:.1f} GB of {self.available_bytes / 1e9:.1f} GB available"
        )

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self)


def available_bytes() -> int:
    """MemAvailable of this machine (Linux), else its physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_memory(model: Path, openvino: bool = True, nncf_when_large: bool = False) -> MemoryPlan:
    """The memory plan of a run on `model` (a pipeline directory or a bare denoiser directory);
    openvino: the run builds OpenVINO engines too (NNCF's quantization is its largest peak; a
    large model's candidates leave NNCF's int8 out unless `nncf_when_large`: the recipe's own engine)."""
    model = Path(model)
    if (model / "model_index.json").is_file():
        index = json.loads((model / "model_index.json").read_text())
        components = [model / name for name, entry in index.items() if isinstance(entry, list) and entry[0]]
        roles = [model / role for role in DENOISER_ROLES if role in index]
        denoiser = roles[0] if roles else model
    else:
        components, denoiser = [model], model
    measured = {c: folder_weights(c) for c in components if c.is_dir()}
    params, fp32 = measured.get(denoiser) or folder_weights(denoiser)
    pipeline = sum(nbytes for _, nbytes in measured.values()) or fp32
    nncf = openvino and (nncf_when_large or fp32 <= large_bytes())
    copies = PEAK_DENOISER_COPIES["openvino" if nncf else "onnxruntime"]
    peak = int(pipeline + copies * fp32 + RUNTIME_BYTES)
    return MemoryPlan(params, fp32, pipeline, peak, available_bytes(), nncf)


def check_memory(plan: MemoryPlan, model: Path) -> None:
    """Refuse, before any work, a run whose estimated peak exceeds the memory available."""
    if plan.peak_bytes > plan.available_bytes:
        raise FlowpressError(
            f"{model}: this run needs about {plan.peak_bytes / 1e9:.1f} GB of memory (denoiser "
            f"{plan.denoiser_fp32_bytes / 1e9:.1f} GB in fp32, pipeline {plan.pipeline_fp32_bytes / 1e9:.1f} GB) and "
            f"{plan.available_bytes / 1e9:.1f} GB is available; "
            + ("build the onnxruntime engine only (--no-openvino, engine.candidates: false), " if plan.openvino else "")
            + "run it on a machine with more memory, or free some"
        )
