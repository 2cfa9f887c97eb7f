"""Input = what diffusers saves: a pipeline directory (model_index.json), a bare denoiser directory
(config.json of a supported class, its scheduler config beside it or named), or a flowpress
rectified flow (flowpress.json).  One LoadedModel: the denoiser behind its adapter, how to sample
it, its conditioning and, for latent pipelines, the VAE decode."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from flowpress.errors import FlowpressError
from flowpress.extras import need
from flowpress.models.conditioning import ClassConditioner, Conditioner, NoConditioner, PromptConditioner
from flowpress.models.velocity import (
    ARCHITECTURES,
    FLOWPRESS_JSON,
    PACKED,
    DiffusersDenoiser,
    check_finite_weights,
    check_velocity_model,
    load_net,
)
from flowpress.sampling import DiffusersSampler, Sampler, Schedule, scheduler_named

Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]
NOT_DENOISERS = {
    "AutoencoderKL": "a VAE",
    "AutoencoderTiny": "a VAE",
    "CLIPTextModel": "a text encoder",
    "CLIPTextModelWithProjection": "a text encoder",
    "T5EncoderModel": "a text encoder",
}
SUPPORTED = ", ".join(ARCHITECTURES)


@dataclass
class LoadedModel:
    """denoiser: the network behind (x, t, cond) -> out; sampler(steps, method): the sampler the
    model is driven by (its scheduler's, or flowpress's flow sampler); conditioner: its
    conditioning; decode: latents -> images in [-1, 1] for latent pipelines (None: pixel space);
    pipe: the diffusers pipeline when the input was one; kind: what was loaded, in words."""

    denoiser: DiffusersDenoiser
    sampler: Callable[[int, str], Sampler]
    conditioner: Conditioner
    decode: Callable[[Tensor], Tensor] | None
    pipe: Any
    kind: str
    path: Path


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FlowpressError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise FlowpressError(f"{path}: not a diffusers config (a JSON object)")
    return config


def _class_of(config: dict[str, Any]) -> str:
    return str(config.get("_class_name") or (config.get("architectures") or ["?"])[0])


def _refuse_other_classes(name: str, where: Path) -> None:
    if name in NOT_DENOISERS:
        raise FlowpressError(
            f"{where}: {name} is {NOT_DENOISERS[name]}, not a denoiser; point at the pipeline directory "
            "(model_index.json) or its unet / transformer folder"
        )
    if name not in ARCHITECTURES:
        raise FlowpressError(f"{where}: model class {name!r} is not supported; supported denoisers: {SUPPORTED}")


def _diffusers_sampler(
    base: Any, scheduler: str | None, prediction: Prediction | None, image_tokens: int | None = None
) -> Callable[[int, str], Sampler]:
    """The sampler factory of a diffusers scheduler; image_tokens: the denoiser's image sequence
    length, which a scheduler with dynamic shifting (Flux's) needs to place its sigmas."""
    if scheduler is not None and scheduler != "pipeline":
        base = scheduler_named(scheduler, base)
    if prediction is not None:
        base = type(base).from_config(base.config, prediction_type=prediction)

    def make(steps: int, _method: str) -> Sampler:
        return DiffusersSampler(base, steps, _shifted_sigmas(base, steps, image_tokens))

    return make


def _shifted_sigmas(base: Any, steps: int, image_tokens: int | None) -> dict[str, Any]:
    """What FluxPipeline hands set_timesteps when the scheduler shifts by resolution: sigmas from 1
    to 1/steps and mu from the image sequence length ({} for any other scheduler)."""
    config = base.config
    if not config.get("use_dynamic_shifting") or image_tokens is None:
        return {}
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist(), "mu": mu}


def _flow_sampler(steps: int, method: str) -> Sampler:
    return Schedule(steps, method)  # type: ignore[arg-type]


def _latent_decoder(pipe: Any) -> Callable[[Tensor], Tensor]:
    vae = pipe.vae.eval()
    scaling = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def decode(latents: Tensor) -> Tensor:
        images = [vae.decode(chunk / scaling + shift).sample for chunk in latents.split(16)]
        return torch.cat(images)  # unclamped: the report shows how much of the FP output leaves [-1, 1]

    return decode


def load_source(
    path: str | Path,
    time_scale: float | None = None,
    scheduler: str | None = None,
    prediction_type: Prediction | None = None,
    resolution: int | None = None,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> LoadedModel:
    """Whatever diffusers saved at `path` (or a flowpress flow model), ready to sample and compare
    (a pipeline with the LoRA file `lora` fused in at `lora_scale`: fuse_lora).

    scheduler: None = the model's own (its pipeline's scheduler, the scheduler config beside a bare
    denoiser, flowpress's flow sampler for flowpress models), 'flow', or a name of SCHEDULERS built
    from the model's scheduler config.  prediction_type overrides the scheduler's (a bare denoiser
    with a scheduler name but no scheduler config must be given one).  resolution: the image side
    in pixels to sample at (a pipeline's latents are its VAE's scale smaller); None: the model's."""
    path = Path(path)
    if lora is not None:
        need("peft", "lora", "--lora (diffusers fuses a LoRA through peft)")  # before the pipeline loads
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, scheduler, prediction_type, resolution, lora, lora_scale)
    if lora is not None:
        raise FlowpressError(
            f"{path}: a LoRA is fused into a diffusers pipeline (model_index.json), not a bare denoiser directory; "
            "point --model at the pipeline"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FlowpressError(
            f"{path}: no model_index.json and no config.json; point at a diffusers pipeline directory or a "
            f"denoiser directory ({SUPPORTED})"
        )
    name = _class_of(_config(config_file))
    _refuse_other_classes(name, config_file)
    denoiser_extra = _config(path / FLOWPRESS_JSON) if (path / FLOWPRESS_JSON).is_file() else {}
    flow = scheduler == "flow" or (scheduler is None and bool(denoiser_extra))
    net = load_net(name, path, "save the model with diffusers' save_pretrained")
    if flow:
        scale = time_scale if time_scale is not None else float(denoiser_extra.get("time_scale", 1000.0))
        denoiser = DiffusersDenoiser(net, scale, denoiser_extra.get("null_label"), sample_size=resolution).eval()
        make: Callable[[int, str], Sampler] = _flow_sampler
        kind = f"flowpress rectified flow ({name})"
    else:
        base = _scheduler_beside(path, scheduler, prediction_type)
        denoiser = DiffusersDenoiser(net, 1.0 if time_scale is None else time_scale, sample_size=resolution).eval()
        make = _diffusers_sampler(base, scheduler, prediction_type)
        kind = f"{name} with {type(base).__name__} ({getattr(base.config, 'prediction_type', 'flow')})"
    if denoiser.text_conditioned:
        raise FlowpressError(
            f"{path}: a bare {name} takes text embeddings; point at its pipeline directory (model_index.json), "
            "whose text encoder flowpress runs for the prompts"
        )
    check_velocity_model(denoiser, str(path))
    conditioner: Conditioner = (
        ClassConditioner(denoiser.num_classes, int(denoiser.null_label))  # type: ignore[arg-type]
        if denoiser.num_classes
        else NoConditioner()
    )
    return LoadedModel(denoiser, make, conditioner, None, None, kind, path)


def _latent_size(pipe: Any, net: Any, resolution: int | None, path: Path) -> int | None:
    """The latent side the pipeline samples: `resolution` pixels over the VAE's scale (a multiple of
    it, and of 2 more for Flux's packing), else its denoiser's config, or (Flux, whose config has
    none) its VAE's image size over the VAE's scale."""
    vae = getattr(pipe, "vae", None)
    scale = int(getattr(pipe, "vae_scale_factor", 8)) if vae is not None else 1
    if resolution is not None:
        multiple = scale * (2 if ARCHITECTURES.get(type(net).__name__) in PACKED else 1)
        if resolution % multiple:
            raise FlowpressError(
                f"{path}: resolution {resolution} px is not a multiple of {multiple} (the VAE's scale"
                f"{' x 2 for the packing' if multiple != scale else ''}); pick one that is"
            )
        return resolution // scale
    if getattr(net.config, "sample_size", None):
        return None
    if vae is None or not getattr(vae.config, "sample_size", None):
        raise FlowpressError(f"{type(net).__name__}: neither it nor the pipeline's VAE says the sample size")
    return int(vae.config.sample_size) // int(getattr(pipe, "vae_scale_factor", 8))


def _image_tokens(denoiser: DiffusersDenoiser, net: Any) -> int:
    """The image sequence length of a transformer (patches of its latents; Flux packs 2x2)."""
    _, h, w = denoiser.sample_shape
    patch = 2 if denoiser.architecture in PACKED else int(getattr(net.config, "patch_size", 1) or 1)
    return (h // patch) * (w // patch)


def _scheduler_beside(path: Path, scheduler: str | None, prediction: Prediction | None) -> Any:
    """The scheduler config in path/scheduler/, path/../scheduler/ or path/scheduler_config.json;
    without one, a named scheduler with its default training schedule and the given prediction type."""
    import diffusers

    for folder in (path / "scheduler", path.parent / "scheduler", path):
        file = folder / "scheduler_config.json"
        if file.is_file():
            name = _class_of(_config(file))
            try:
                return getattr(diffusers, name).from_pretrained(folder, local_files_only=True)
            except Exception as err:  # noqa: BLE001 - diffusers' own error for a foreign config
                raise FlowpressError(f"{file}: cannot load scheduler {name!r} ({err})") from None
    if scheduler is None or scheduler in ("pipeline", "flow") or prediction is None:
        raise FlowpressError(
            f"{path}: no scheduler config beside this denoiser; tell flowpress how it was trained: "
            "model.scheduler (e.g. ddim) and model.prediction_type (epsilon, v_prediction or sample), "
            "or --scheduler / --prediction-type; it never guesses"
        )
    import diffusers as d

    from flowpress.sampling.schedulers import SCHEDULERS

    return getattr(d, SCHEDULERS[scheduler])(prediction_type=prediction)


def _load_pipeline(
    path: Path, scheduler: str | None, prediction: Prediction | None, resolution: int | None = None,
    lora: str | Path | None = None, lora_scale: float = 1.0,
) -> LoadedModel:  # fmt: skip
    import diffusers

    index = _config(path / "model_index.json")
    role = "unet" if "unet" in index else "transformer" if "transformer" in index else None
    if role is None:
        raise FlowpressError(f"{path}/model_index.json: no unet or transformer component; not a diffusion pipeline")
    entry = index[role]
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else "?"
    _refuse_other_classes(name, path / role)
    if any(isinstance(entry, list) and entry[:1] == ["transformers"] for entry in index.values()):
        need("transformers", "text", f"{path}: the pipeline's text encoders and tokenizers")
    missing: dict[str, None] = {}
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if pipeline_class is not None:  # optional components a save left out (SD3 without T5): None, as saved
        params = inspect.signature(pipeline_class.__init__).parameters
        absent = [n for n in params if n != "self" and index.get(n, [None, None]) == [None, None]]
        missing = {n: None for n in absent if params[n].default is inspect.Parameter.empty}
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=True, **missing
        )
    except Exception as err:  # noqa: BLE001 - diffusers / transformers raise many types for a broken directory
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlowpressError(f"{path}: diffusers cannot load this pipeline ({reason[:300]})") from None
    if lora is not None:
        fuse_lora(pipe, Path(lora), lora_scale)
    net = getattr(pipe, role)
    check_finite_weights(net, str(path / role))
    if scheduler == "flow":
        raise FlowpressError(f"{path}: a diffusers pipeline samples with a diffusers scheduler, not 'flow'")
    size = _latent_size(pipe, net, resolution, path)
    denoiser = DiffusersDenoiser(net.eval(), 1.0, sample_size=size)
    make = _diffusers_sampler(pipe.scheduler, scheduler, prediction, _image_tokens(denoiser, net))
    conditioner: Conditioner
    if denoiser.text_conditioned:
        pipe.set_progress_bar_config(disable=True)
        prompts = PromptConditioner(pipe, denoiser.architecture, denoiser.sample_shape[1])
        denoiser = DiffusersDenoiser(net, 1.0, cond_spec=prompts.spec(), sample_size=size).eval()
        conditioner = prompts
    elif denoiser.num_classes:
        conditioner = ClassConditioner(denoiser.num_classes, int(denoiser.null_label))  # type: ignore[arg-type]
    else:
        conditioner = NoConditioner()
    check_velocity_model(denoiser, str(path / role))
    latent = getattr(pipe, "vae", None) is not None
    decode = _latent_decoder(pipe) if latent else None
    kind = f"{type(pipe).__name__} ({name}, {type(pipe.scheduler).__name__}, {getattr(pipe.scheduler.config, 'prediction_type', 'flow')})"
    return LoadedModel(denoiser, make, conditioner, decode, pipe, kind, path)


def fuse_lora(pipe: Any, lora: Path, scale: float) -> None:
    """Fuse the LoRA file `lora` into `pipe`'s weights at `scale` (diffusers' load_lora_weights +
    fuse_lora through peft), then drop the adapter: the pipeline is the plain model the LoRA makes."""
    if not lora.is_file():
        raise FlowpressError(f"--lora {lora}: no such file; give the LoRA's .safetensors file")
    if not hasattr(pipe, "load_lora_weights"):
        raise FlowpressError(f"--lora {lora}: {type(pipe).__name__} does not load LoRA; use a pipeline that does")
    from safetensors.torch import load_file

    try:
        pipe.load_lora_weights(load_file(str(lora)), adapter_name="flowpress")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["flowpress"])
        pipe.unload_lora_weights()
    except Exception as err:  # noqa: BLE001 - safetensors, diffusers and peft raise many types for a wrong file
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise FlowpressError(
            f"--lora {lora}: cannot fuse it into this {type(pipe).__name__} ({reason}); give a LoRA trained for "
            "this model's architecture"
        ) from None
