"""Conditioning as the pipeline does it: class labels, nothing, or prompts encoded by the
pipeline's own text encoder(s) in full precision (the embeddings are engine inputs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from flowpress.errors import FlowpressError
from flowpress.extras import need

Cond = dict[str, Tensor]

# prompts for calibration and for the compare when the recipe names no file: generic scenes, the
# compare's disjoint from the calibration's
CALIBRATION_PROMPTS = (
    "a photograph of a red car on a street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a portrait of an old man with a beard",
    "a cat sleeping on a sofa",
    "a city skyline at night",
    "a watercolor painting of flowers",
    "a close-up of a green leaf",
)
# the distilled guidance scale FluxPipeline passes by default (guidance_scale) to a model that embeds it
FLUX_GUIDANCE = 3.5
COMPARE_PROMPTS = (
    "a lighthouse on a rocky coast",
    "a cup of coffee next to a laptop",
    "a snowy forest path",
    "a dog running on the beach",
    "an astronaut riding a horse",
    "a bicycle leaning against a wall",
    "a plate of pasta with basil",
    "a sailing boat on a calm sea",
)


@dataclass(frozen=True)
class Conditions:
    """The conditioning of n samples: model (engine inputs by name, n rows each) and what a person
    reads (labels or prompts), for the report, the evaluator and samples.npz."""

    model: Cond
    prompts: tuple[str, ...] | None = None
    labels: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def described(self) -> dict[str, Any]:
        """The model conditioning plus the prompts, as an evaluator receives them."""
        return {**self.model, **({"prompts": list(self.prompts)} if self.prompts is not None else {})}


class Conditioner(Protocol):
    """Builds the conditioning of sample i (classes cycling, prompts cycling) and the null one."""

    names: tuple[str, ...]

    def conditions(self, n: int, offset: int = 0, prompts: Sequence[str] | None = None) -> Conditions: ...

    def null(self) -> Cond: ...


class NoConditioner:
    names: tuple[str, ...] = ()

    def conditions(self, n: int, offset: int = 0, prompts: Sequence[str] | None = None) -> Conditions:
        return Conditions({})

    def null(self) -> Cond:
        return {}


class ClassConditioner:
    """Sample i draws class (offset + i) % num_classes; the null class guides."""

    names: tuple[str, ...] = ("class_labels",)

    def __init__(self, num_classes: int, null_label: int):
        self.num_classes, self.null_label = num_classes, null_label

    def conditions(self, n: int, offset: int = 0, prompts: Sequence[str] | None = None) -> Conditions:
        labels = torch.arange(offset, offset + n, dtype=torch.int64) % self.num_classes
        return Conditions({"class_labels": labels}, labels=labels)

    def null(self) -> Cond:
        return {"class_labels": torch.tensor([self.null_label])}


class PromptConditioner:
    """Prompts encoded by the pipeline's own encode_prompt (its text encoder(s), tokenizer(s), the
    extra inputs its denoiser takes); the null condition is what the pipeline guides against: its
    encoding of the empty negative prompt.  Sample i gets prompt (offset + i) % len(prompts)."""

    def __init__(self, pipe: Any, family: str, sample_size: int):
        self.pipe, self.family, self.sample_size = pipe, family, sample_size
        self.names = tuple(self._encode(["x"])[0])
        self._null: Cond | None = None

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Cond, Cond]:
        """(positive, negative) conditioning of `prompts` (negative: the pipeline's default)."""
        transformers = need("transformers", "text", "prompt conditioning (the pipeline's text encoders)")
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the tokenizers' truncation notices: prompts are cut as the pipeline cuts them
        try:
            return self._encode_quietly(prompts)
        finally:
            transformers.logging.set_verbosity(level)

    def _encode_quietly(self, prompts: list[str]) -> tuple[Cond, Cond]:
        pipe, device = self.pipe, torch.device("cpu")
        if self.family == "unet-cond" and hasattr(pipe, "text_encoder_2"):  # SDXL: two encoders, pooled + time ids
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, device=device, do_classifier_free_guidance=True
            )
            size = (self.sample_size * pipe.vae_scale_factor,) * 2
            projection = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids(
                size, (0, 0), size, dtype=pos.dtype, text_encoder_projection_dim=projection
            )
            ids = time_ids.repeat(len(prompts), 1)
            return (
                {"encoder_hidden_states": pos, "text_embeds": pooled, "time_ids": ids},
                {"encoder_hidden_states": neg, "text_embeds": neg_pooled, "time_ids": ids},
            )
        if self.family == "unet-cond":
            pos, neg = pipe.encode_prompt(prompts, device, 1, True)
            return {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg}
        if self.family == "sd3":
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True
            )
            return (
                {"encoder_hidden_states": pos, "pooled_projections": pooled},
                {"encoder_hidden_states": neg, "pooled_projections": neg_pooled},
            )
        if self.family == "flux":  # no negative prompt: guidance-distilled, its scale is an input
            pos, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
            neg, neg_pooled, _ = pipe.encode_prompt(prompt=[""] * len(prompts), prompt_2=None, device=device)
            scale = {"guidance": torch.full((len(prompts),), FLUX_GUIDANCE)} if self._flux_guidance() else {}
            return (
                {"encoder_hidden_states": pos, "pooled_projections": pooled, **scale},
                {"encoder_hidden_states": neg, "pooled_projections": neg_pooled, **scale},
            )
        if self.family == "pixart":
            pos, mask, neg, neg_mask = pipe.encode_prompt(
                prompts, do_classifier_free_guidance=True, device=device, clean_caption=False
            )
            return (
                {"encoder_hidden_states": pos, "encoder_attention_mask": mask},
                {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask},
            )
        raise FlowpressError(f"prompts: a {self.family} denoiser takes no text")

    def _flux_guidance(self) -> bool:
        return bool(getattr(self.pipe.transformer.config, "guidance_embeds", False))

    def conditions(self, n: int, offset: int = 0, prompts: Sequence[str] | None = None) -> Conditions:
        pool = list(prompts or COMPARE_PROMPTS)
        if not pool:
            raise FlowpressError("prompts: the prompt list is empty; give at least one prompt")
        chosen = [pool[(offset + i) % len(pool)] for i in range(n)]
        encoded: list[Cond] = []
        for start in range(0, n, 64):
            encoded.append(self._encode(chosen[start : start + 64])[0])
        cond = {name: torch.cat([e[name] for e in encoded]) for name in self.names}
        return Conditions(cond, prompts=tuple(chosen))

    def null(self) -> Cond:
        if self._null is None:
            negative = self._encode([""])[1]
            self._null = {name: value[:1] for name, value in negative.items()}
        return self._null

    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each input's shape without the batch, and its dtype: the engine graph's inputs."""
        example = self._encode(["x"])[0]
        return {name: (tuple(value.shape[1:]), value.dtype) for name, value in example.items()}


def read_prompts(path: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """One prompt per non-empty line of `path` (default when None)."""
    if path is None:
        return tuple(default)
    from pathlib import Path

    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as err:
        raise FlowpressError(
            f"{path}: cannot read the prompts ({err.strerror}); give a text file, one prompt per line"
        ) from None
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise FlowpressError(f"{path}: no prompts in it; write one prompt per line")
    return prompts
