"""Denoisers: the adapter for diffusers UNet2DModel / DiT checkpoints, loading and saving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from flowpress.errors import FlowpressError
from flowpress.files import staged_dir

FLOWPRESS_JSON = "flowpress.json"


@runtime_checkable
class Denoiser(Protocol):
    """out = model(x, t, cond): x (B, C, H, W); t (B,) in the sampler's time units; cond the
    conditioning tensors by input name (cond_names), e.g. {"class_labels": (B,) int64}."""

    sample_shape: tuple[int, int, int]
    cond_names: tuple[str, ...]

    def null_condition(self) -> dict[str, Tensor]: ...

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor: ...


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

    @property
    def cond_names(self) -> tuple[str, ...]:
        return ("class_labels",) if self.num_classes else ()

    def null_condition(self) -> dict[str, Tensor]:
        """The null class of classifier-free guidance, (1,) int64; {} when unconditional."""
        return {"class_labels": torch.tensor([self.null_label])} if self.num_classes else {}

    def example_condition(self, batch: int) -> dict[str, Tensor]:
        """Conditioning inputs of `batch` rows with the right dtype and shape (class 0)."""
        return self.class_condition(torch.zeros(batch, dtype=torch.int64))

    def cycling_condition(self, n: int, offset: int = 0) -> dict[str, Tensor]:
        """The conditioning of samples offset..offset+n-1: sample i draws class i % classes
        ({} when unconditional)."""
        if not self.num_classes:
            return {}
        return self.class_condition(torch.arange(offset, offset + n, dtype=torch.int64) % self.num_classes)

    def class_condition(self, labels: Tensor | None) -> dict[str, Tensor]:
        """{"class_labels": labels} for a class-conditional model, {} otherwise."""
        return {"class_labels": labels} if self.num_classes and labels is not None else {}

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.net(x, t * self.time_scale, **cond).sample

    def flowpress_config(self) -> dict[str, Any]:
        return {
            "adapter": f"diffusers-{self.architecture}",
            "time_scale": self.time_scale,
            "null_label": self.null_label,
        }


def save_model(model: DiffusersVelocity, path: str | Path) -> Path:
    """Write a diffusers directory (config.json + safetensors) plus flowpress.json, atomically."""
    with staged_dir(path) as tmp:
        model.net.save_pretrained(tmp, safe_serialization=True)
        (tmp / FLOWPRESS_JSON).write_text(json.dumps(model.flowpress_config(), indent=2) + "\n")
    return Path(path)


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
def check_velocity_model(model: DiffusersVelocity, where: str) -> None:
    """Probe model(x, t, cond) once; a model that cannot take them fails with one line."""
    x = torch.zeros(2, *model.sample_shape)
    t = torch.tensor([1.0, 0.5])
    cond = model.class_condition(torch.zeros(2, dtype=torch.int64))
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
