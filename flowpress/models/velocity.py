"""Denoisers: one adapter for the diffusers denoiser families, loading and saving their directories."""

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


ARCHITECTURES = {
    "UNet2DModel": "unet",
    "UNet2DConditionModel": "unet-cond",
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "PixArtTransformer2DModel": "pixart",
    "FluxTransformer2DModel": "flux",
}
TEXT_ARCHITECTURES = ("unet-cond", "sd3", "pixart", "flux")
PACKED = ("flux",)  # 2x2 latent patches packed into channels around the network (FluxPipeline._pack_latents)
CondSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # input name -> (shape without the batch, dtype)


class DiffusersDenoiser(nn.Module):
    """A diffusers denoiser (UNet2DModel, UNet2DConditionModel, DiT, SD3, PixArt) behind one call:
    out = model(x, t, cond) with t in the sampler's units and cond the conditioning by input name.

    The network sees timesteps t * time_scale: 1000 for flowpress's rectified flows (t in [0, 1]),
    1 for models driven by their diffusers scheduler (t is already the scheduler's timestep).
    Class-conditional models reserve a null class for classifier-free guidance; text-conditioned
    ones take encoder_hidden_states (and pooled / time-id inputs) whose shapes the loader sets from
    the pipeline's encoders (cond_spec).  A learned-variance output (2C channels) gives its first C.
    """

    net: Any
    architecture: str
    time_scale: float
    sample_shape: tuple[int, int, int]
    num_classes: int | None
    null_label: int | None

    def __init__(
        self,
        net: Any,
        time_scale: float = 1000.0,
        null_label: int | None = None,
        cond_spec: CondSpec | None = None,
        sample_size: int | None = None,
    ):
        super().__init__()
        self.net = net
        self.architecture = ARCHITECTURES[type(net).__name__]
        self.time_scale = float(time_scale)
        cfg = net.config
        packing = 4 if self.architecture in PACKED else 1
        size = int(sample_size or cfg.sample_size)  # a Flux config has none: the loader gives the pipeline's
        self.sample_shape = (int(cfg.in_channels) // packing, size, size)
        self.out_channels = int(getattr(cfg, "out_channels", None) or cfg.in_channels) // packing
        n_embeds: int | None = getattr(cfg, "num_class_embeds", None)
        if self.architecture == "dit":  # DiT's label embedding adds the null class itself, after num_embeds_ada_norm
            self.num_classes = cfg.num_embeds_ada_norm
        else:
            self.num_classes = (n_embeds - 1) if n_embeds else None
        self.null_label = null_label if null_label is not None else self.num_classes
        spec: CondSpec = dict(cond_spec or {})
        if self.num_classes:
            spec = {"class_labels": ((), torch.int64), **spec}
        self.cond_spec = spec

    @property
    def cond_names(self) -> tuple[str, ...]:
        return tuple(self.cond_spec)

    @property
    def text_conditioned(self) -> bool:
        return self.architecture in TEXT_ARCHITECTURES

    def null_condition(self) -> dict[str, Tensor]:
        """The null class of classifier-free guidance, (1,) int64; {} when not class-conditional
        (a text model's null condition is its empty prompt: the conditioner's)."""
        return {"class_labels": torch.tensor([self.null_label])} if self.num_classes else {}

    def example_condition(self, batch: int) -> dict[str, Tensor]:
        """Conditioning inputs of `batch` rows with the right dtype and shape (class 0, zero embeddings)."""
        return {name: torch.zeros(batch, *shape, dtype=dtype) for name, (shape, dtype) in self.cond_spec.items()}

    def cycling_condition(self, n: int, offset: int = 0) -> dict[str, Tensor]:
        """The conditioning of samples offset..offset+n-1: sample i draws class i % classes
        ({} when not class-conditional)."""
        if not self.num_classes:
            return {}
        return self.class_condition(torch.arange(offset, offset + n, dtype=torch.int64) % self.num_classes)

    def class_condition(self, labels: Tensor | None) -> dict[str, Tensor]:
        """{"class_labels": labels} for a class-conditional model, {} otherwise."""
        return {"class_labels": labels} if self.num_classes and labels is not None else {}

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        timestep = t * self.time_scale
        arch = self.architecture
        if arch in ("unet", "dit"):
            out = self.net(x, timestep, **cond).sample
        elif arch == "unet-cond":
            added_text = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
            out = self.net(
                x,
                timestep,
                encoder_hidden_states=cond["encoder_hidden_states"],
                class_labels=cond.get("class_labels"),
                added_cond_kwargs=added_text or None,
            ).sample
        elif arch == "sd3":
            out = self.net(
                hidden_states=x,
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
                timestep=timestep,
            ).sample
        elif arch == "flux":
            out = self._flux(x, timestep, cond)
        else:  # pixart
            added: dict[str, Tensor | None] = {
                "resolution": cond.get("resolution"),
                "aspect_ratio": cond.get("aspect_ratio"),
            }
            out = self.net(
                x,
                encoder_hidden_states=cond["encoder_hidden_states"],
                timestep=timestep,
                added_cond_kwargs=added,
                encoder_attention_mask=cond.get("encoder_attention_mask"),
            ).sample
        if self.out_channels == 2 * self.sample_shape[0]:  # learned variance: the mean prediction is the first half
            out = out[:, : self.sample_shape[0]]
        return out

    def _flux(self, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        _export_safe_rotary()
        """FluxPipeline's call around the network: the latents packed in 2x2 patches, each patch's
        (0, row, column) position and zero text positions for the rotary embedding, the timestep
        over 1000, the distilled guidance scale as an input (`guidance`, when the model embeds it)."""
        _, c, h, w = x.shape  # the batch stays symbolic (-1) for the ONNX export
        packed = (
            x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, (h // 2) * (w // 2), c * 4)
        )
        rows = torch.arange(h // 2, dtype=x.dtype).reshape(-1, 1).expand(h // 2, w // 2)
        columns = torch.arange(w // 2, dtype=x.dtype).reshape(1, -1).expand(h // 2, w // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
        text = cond["encoder_hidden_states"]
        out = self.net(
            hidden_states=packed,
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_projections"],
            timestep=timestep / 1000,
            img_ids=img_ids,
            txt_ids=torch.zeros(text.shape[1], 3, dtype=x.dtype),
            guidance=cond.get("guidance"),
        ).sample
        return out.reshape(-1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, h, w)

    def flowpress_config(self) -> dict[str, Any]:
        return {
            "adapter": f"diffusers-{self.architecture}",
            "time_scale": self.time_scale,
            "null_label": self.null_label,
        }


def _rotary(x: Tensor, freqs_cis: tuple[Tensor, Tensor], sequence_dim: int) -> Tensor:
    """diffusers' apply_rotary_emb (real form, pairs along the last dim), with the pairs split by
    unflatten: its reshape to (*x.shape[:-1], -1, 2) is recorded by the TorchScript exporter with
    the traced batch as a constant, so the graph refused any other batch.  Same arithmetic."""
    cos, sin = freqs_cis
    index = (None, slice(None), None, slice(None)) if sequence_dim == 1 else (None, None, slice(None), slice(None))
    cos, sin = cos[index].to(x.device), sin[index].to(x.device)
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _export_safe_rotary() -> None:
    """Flux's attention looks apply_rotary_emb up in its module: answer its (real, last-dim) calls
    with `_rotary`, anything else with diffusers' own."""
    import diffusers.models.transformers.transformer_flux as flux

    original = flux.apply_rotary_emb
    if getattr(original, "export_safe", False):
        return

    def apply_rotary_emb(
        x: Tensor, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1, sequence_dim: int = 2
    ) -> Tensor:
        if use_real and use_real_unbind_dim == -1 and sequence_dim in (1, 2):
            return _rotary(x, freqs_cis, sequence_dim)
        return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)  # type: ignore[return-value]

    apply_rotary_emb.export_safe = True  # type: ignore[attr-defined]
    flux.apply_rotary_emb = apply_rotary_emb  # type: ignore[assignment]


def save_model(model: DiffusersDenoiser, path: str | Path) -> Path:
    """Write a diffusers directory (config.json + safetensors) plus flowpress.json, atomically."""
    with staged_dir(path) as tmp:
        model.net.save_pretrained(tmp, safe_serialization=True)
        (tmp / FLOWPRESS_JSON).write_text(json.dumps(model.flowpress_config(), indent=2) + "\n")
    return Path(path)


def load_net(class_name: str, path: Path, fix: str) -> Any:
    """diffusers' `class_name` from `path` (offline), its weights checked finite; a failure is one
    line ending in `fix`."""
    import diffusers

    try:
        net = getattr(diffusers, class_name).from_pretrained(path, local_files_only=True, low_cpu_mem_usage=True)
    except Exception as err:  # diffusers raises many types for missing / corrupt weights
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlowpressError(f"{path}: cannot load {class_name} weights ({reason}); {fix}") from None
    check_finite_weights(net, str(path))
    return net.eval()


def load_model(path: str | Path, time_scale: float | None = None) -> DiffusersDenoiser:
    """Load a diffusers UNet2DModel / DiTTransformer2DModel directory (ours or the user's) as a VelocityModel.

    time_scale overrides flowpress.json; without either, 1000 is assumed.
    """
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
    net = load_net(
        class_name, path, "re-create them with `make teacher` or save the model with diffusers' save_pretrained"
    )
    scale = time_scale if time_scale is not None else float(extra.get("time_scale", 1000.0))
    model = DiffusersDenoiser(net, scale, extra.get("null_label")).eval()
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
def check_velocity_model(model: DiffusersDenoiser, where: str) -> None:
    """Probe model(x, t, cond) once; a model that cannot take them fails with one line."""
    x = torch.zeros(2, *model.sample_shape)
    t = torch.tensor([1.0, 0.5])
    cond = model.example_condition(2)
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
