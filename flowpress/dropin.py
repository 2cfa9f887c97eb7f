"""Drop-in: the user's diffusers pipeline with its denoiser answered by a run's engine.

    pipe = flowpress.load_pipeline("runs/my-model")
    images = pipe(prompt, num_inference_steps=N, generator=torch.Generator().manual_seed(s), output_type="np").images

The pipeline keeps everything else of its own (text encoders, scheduler, VAE, guidance); only
the denoiser's forward is replaced.  A diffusers pipeline hands its denoiser the timestep value,
not the step index.  The wrapper counts the pipeline's calls: a call whose timestep is the one the
schedule expects next is that index (Heun-type schedulers call twice at one timestep, and the second
call is its own step, with its own activation scales); any other timestep is looked up in the
schedule's table (a new pipeline call restarts at step 0), and a value that is not there — another
number of steps or another scheduler than the run was built for — is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowpress.engines import Engine
from flowpress.errors import FlowpressError
from flowpress.models.velocity import ARCHITECTURES, PACKED

COND_INPUTS = ("encoder_hidden_states", "pooled_projections", "class_labels", "encoder_attention_mask", "guidance")


def _output_class() -> Any:
    from diffusers.utils import BaseOutput

    @dataclass
    class EngineOutput(BaseOutput):  # .sample and [0], as diffusers' own outputs
        sample: Tensor

    return EngineOutput


class EngineForward:
    """The denoiser's forward(sample, timestep, ...) answered by `engine`."""

    def __init__(self, engine: Engine, net: Any, shape: tuple[int, ...], where: str):
        self.engine, self.shape, self.where = engine, shape, where
        self.times = engine.schedule.model_times.double()
        self.learned_sigma = int(getattr(net.config, "out_channels", None) or shape[0]) == 2 * shape[0]
        self.output = _output_class()
        # Flux's pipeline hands its transformer 2x2-packed latents and the timestep over 1000
        self.packed = ARCHITECTURES.get(type(net).__name__) in PACKED
        self.next = 0  # the call index the schedule expects next

    def step_of(self, timestep: Tensor | float, batch: int) -> Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        if float((t - self.times[self.next]).abs().max()) <= 1e-3:
            step = torch.full((batch,), self.next, dtype=torch.int64)
        else:
            step = self.lookup(t)
        self.next = (int(step[-1]) + 1) % len(self.times)
        return step

    def unpacked(self, x: Tensor) -> Tensor:
        """(B, C, H, W) latents of the pipeline's (B, H/2 * W/2, 4C) packed ones (FluxPipeline._unpack_latents)."""
        c, h, w = self.shape
        if x.dim() != 3 or tuple(x.shape[1:]) != ((h // 2) * (w // 2), c * 4):
            raise FlowpressError(
                f"{self.where}: this engine takes {(h // 2) * (w // 2)} packed patches of {c * 4} values, the "
                f"pipeline passed {tuple(x.shape[1:])}; call it with the height / width the run was built for"
            )
        return x.reshape(-1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, h, w)

    def lookup(self, t: Tensor) -> Tensor:
        gap, step = (t.reshape(-1, 1) - self.times.reshape(1, -1)).abs().min(dim=1)
        if float(gap.max()) > 1e-3:
            raise FlowpressError(
                f"{self.where}: timestep {float(t[int(gap.argmax())]):g} is not on the schedule this engine was built "
                f"for ({len(self.times)} evaluations: {self.engine.schedule.as_dict().get('method')}); call the pipeline "
                f"with num_inference_steps={self.engine.schedule.as_dict().get('n_steps')} and its original scheduler"
            )
        return step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = ("sample", "timestep")
        given = dict(zip(names, args, strict=False)) | kwargs
        x = given.get("sample", given.get("hidden_states"))
        if x is None or "timestep" not in given:
            raise FlowpressError(f"{self.where}: the pipeline called its denoiser without a sample and a timestep")
        timestep = given["timestep"]
        if self.packed:
            x, timestep = self.unpacked(x), timestep * 1000
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise FlowpressError(
                f"{self.where}: this engine takes {tuple(self.shape)} samples, the pipeline passed {tuple(x.shape[1:])}; "
                "call it with the height / width the run was built for"
            )
        cond = {name: given[name] for name in COND_INPUTS if given.get(name) is not None}
        cond |= {k: v for k, v in (given.get("added_cond_kwargs") or {}).items() if isinstance(v, Tensor)}
        names_in = getattr(self.engine, "input_names", None)
        if names_in is not None:
            cond = {k: v for k, v in cond.items() if k in names_in}
        if "encoder_attention_mask" in cond and cond["encoder_attention_mask"].dtype != torch.int64:
            cond["encoder_attention_mask"] = cond["encoder_attention_mask"].long()
        out = self.engine(x.float(), self.step_of(timestep, x.shape[0]), cond)
        if self.packed:
            c, h, w = self.shape
            out = (
                out.reshape(-1, c, h // 2, 2, w // 2, 2)
                .permute(0, 2, 4, 1, 3, 5)
                .reshape(-1, (h // 2) * (w // 2), c * 4)
            )
        if self.learned_sigma:  # the pipeline splits [mean, variance]; its schedulers read the mean only
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        out = out.to(x.dtype)
        return self.output(sample=out) if given.get("return_dict", True) else (out,)


def load_pipeline(run_dir: str | Path, engine: str | None = None) -> Any:
    """The diffusers pipeline of a finished run's model with its denoiser replaced by the run's CPU
    engine `engine` (default: the one the report recommends)."""
    from flowpress.api import Run
    from flowpress.models import load_source

    run = Run.load(run_dir)
    section = run.recipe.model
    source = load_source(
        Path(section.path), section.time_scale, section.scheduler, section.prediction_type, section.resolution,
        section.lora, section.lora_scale,
    )  # fmt: skip
    if source.pipe is None:
        raise FlowpressError(
            f"{run_dir}: its model ({section.path}) is not a diffusers pipeline directory; sample the engine "
            "directly: flowpress.load_run(...).engine()"
        )
    pipe = source.pipe
    sampler = source.sampler(run.recipe.sampling.steps, run.recipe.sampling.method)
    pipe.scheduler = getattr(sampler, "scheduler", pipe.scheduler)  # the run's scheduler (a --scheduler choice too)
    chosen = run.engine(engine)
    role = "unet" if hasattr(pipe, "unet") else "transformer"
    net = getattr(pipe, role)
    net.forward = EngineForward(chosen, net, source.denoiser.sample_shape, f"{run_dir}: {chosen.name}")
    return pipe
