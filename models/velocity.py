"""`VelocityModel`: the one interface everything inside flowpress sees, and its adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sampling import FlowpressError

FLOWPRESS_JSON = "flowpress.json"


@runtime_checkable
class VelocityModel(Protocol):
    """v = model(x, t, cond).  x: (B, C, H, W); t: (B,) in [0, 1], 1 = noise; cond: (B,) int64."""

    sample_shape: tuple[int, int, int]
    num_classes: int | None
    null_label: int | None

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor: ...


ARCHITECTURES = {"UNet2DModel": "unet", "DiTTransformer2DModel": "dit"}


class DiffusersVelocity(nn.Module):
    """A diffusers UNet2DModel or DiTTransformer2DModel behind the flowpress time convention.

    The network sees timesteps t * time_scale (diffusers models are trained on 0..999 or
    0..1000); nothing else in flowpress knows about that scale.  Class-conditional models
    reserve their last class id for the null class of classifier-free guidance.
    """

    net: Any
    architecture: str
    time_scale: float
    sample_shape: tuple[int, int, int]
    num_classes: int | None
    null_label: int | None

    def __init__(self, net: Any, time_scale: float = 1000.0, null_label: int | None = None):
        super().__init__()
        self.net = net
        self.architecture = ARCHITECTURES[type(net).__name__]
        self.time_scale = float(time_scale)
        cfg = net.config
        self.sample_shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
        if self.architecture == "unet":
            n_embeds: int | None = cfg.num_class_embeds
            self.num_classes = (n_embeds - 1) if n_embeds else None
        else:  # DiT's label embedding adds the null class itself, after num_embeds_ada_norm
            self.num_classes = cfg.num_embeds_ada_norm
        self.null_label = null_label if null_label is not None else self.num_classes

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.net(x, t * self.time_scale, class_labels=cond).sample

    def flowpress_config(self) -> dict[str, Any]:
        return {
            "adapter": f"diffusers-{self.architecture}",
            "time_scale": self.time_scale,
            "null_label": self.null_label,
        }


def save_model(model: DiffusersVelocity, path: str | Path) -> Path:
    """Write a diffusers directory (config.json + safetensors) plus flowpress.json, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.net.save_pretrained(tmp, safe_serialization=True)
    (tmp / FLOWPRESS_JSON).write_text(json.dumps(model.flowpress_config(), indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_model(path: str | Path, time_scale: float | None = None) -> DiffusersVelocity:
    """Load a diffusers UNet2DModel / DiTTransformer2DModel directory (ours or the user's) as a VelocityModel.

    time_scale overrides flowpress.json; without either, 1000 is assumed.
    """
    import diffusers

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FlowpressError(
            f"{path}: no config.json; point model.path at a diffusers UNet2DModel directory "
            "(or run `make teacher` to train the default one)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise FlowpressError(f"{config_file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name not in ARCHITECTURES:
        raise FlowpressError(
            f"{config_file}: model class {class_name!r} is not supported; use a diffusers {' or '.join(ARCHITECTURES)}"
        )
    extra: dict[str, Any] = {}
    if (path / FLOWPRESS_JSON).is_file():
        extra = json.loads((path / FLOWPRESS_JSON).read_text())
    try:
        net = getattr(diffusers, class_name).from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as err:  # diffusers raises many types for missing / corrupt weights
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlowpressError(
            f"{path}: cannot load {class_name} weights ({reason}); re-create them with `make teacher` "
            "or save the model with diffusers' save_pretrained"
        ) from None
    check_finite_weights(net, str(path))
    scale = time_scale if time_scale is not None else float(extra.get("time_scale", 1000.0))
    model = DiffusersVelocity(net, scale, extra.get("null_label")).eval()
    check_velocity_model(model, str(path))
    return model


@torch.no_grad()
def check_finite_weights(net: nn.Module, where: str) -> None:
    """Every parameter and buffer finite, none so large that a forward overflows float32 (|w| >= 1e18)."""
    for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise FlowpressError(
                f"{where}: weight {name} holds {bad} NaN / Inf value(s); the checkpoint is corrupt: re-save or retrain it"
            )
        if tensor.numel() and float(tensor.abs().max()) >= 1e18:
            raise FlowpressError(
                f"{where}: weight {name} reaches {float(tensor.abs().max()):.3g}, which overflows float32 in a "
                "forward; the checkpoint is corrupt: re-save or retrain it"
            )


@torch.no_grad()
def check_velocity_model(model: VelocityModel, where: str) -> None:
    """Probe model(x, t, cond) once; a model that cannot take them fails with one line."""
    x = torch.zeros(2, *model.sample_shape)
    t = torch.tensor([1.0, 0.5])
    cond = torch.zeros(2, dtype=torch.int64) if model.num_classes else None
    try:
        v = model(x, t, cond)
    except Exception as err:
        raise FlowpressError(
            f"{where}: model does not accept (x {tuple(x.shape)}, t (2,), cond) -> v: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if tuple(v.shape) != tuple(x.shape):
        raise FlowpressError(
            f"{where}: model returned shape {tuple(v.shape)} for input {tuple(x.shape)}; a velocity model must return x's shape"
        )
    if not bool(torch.isfinite(v).all()):
        raise FlowpressError(f"{where}: model returns NaN / Inf for a probe input; check its weights and config")
