"""SlimFlow distillation: reflow pairs from the teacher, annealing reflow of a small student,
flow-guided distillation to one step, and the 2-rectified-flow + plain-distillation baseline.

Time convention is flowpress's (sampling/): t = 1 noise, t = 0 data, x_t = (1 - t) x0 + t z,
v = z - x0, one Euler step from t = 1 gives x0 = z - v(z, 1, c).  SlimFlow's own code runs
t = 0 noise -> t = 1 data; every formula here is written in ours.

Everything runs unchanged under `torchrun --nproc_per_node=N` (DistributedDataParallel, gloo on
CPU, nccl on GPU): pair shards are split between ranks, each rank trains on the pairs whose index
is congruent to its rank, rank 0 writes checkpoints and draws progress bars.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flowpress.compress.pairs import Pairs
from flowpress.compress.train_state import TrainState, _load_state, _save_state
from flowpress.errors import FlowpressError
from flowpress.models import DiffusersDenoiser, UNetSpec, build_unet
from flowpress.ranks import barrier, dist_info
from flowpress.sampling import interpolate

Anneal = Literal["linear", "exponential", "cosine"]
Distance = Literal["l2", "pseudo_huber", "features"]


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class StudentConfig:
    """The student: a class-conditional UNet2DModel of the teacher's shape and classes
    (flowpress.models.build_unet); out: where the one-step student goes; max_param_fraction:
    of the teacher's parameters, a larger student is an error."""

    out: str
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    attention_levels: tuple[int, ...] = (1,)
    layers_per_block: int = 1
    max_param_fraction: float = 0.25

    @property
    def spec(self) -> UNetSpec:
        return UNetSpec(self.block_out_channels, self.attention_levels, self.layers_per_block)


@dataclass(frozen=True)
class ReflowConfig:
    """Reflow training on the pairs: loss ||v(x_t, t, c) - (z_beta - x0)||^2, x_t = (1 - t) x0 + t z_beta,
    z_beta = sqrt(1 - beta^2) z_pair + beta eps, beta annealed 1 -> 0 over anneal_steps
    (anneal_steps 0 = plain 2-rectified flow, beta = 0 throughout)."""

    iterations: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.999
    anneal_steps: int = 1000
    anneal: Anneal = "linear"
    hflip: bool = False  # joint flip of image and noise; off for digits (a flip changes the digit)
    checkpoint_every: int = 250
    seed: int = 0


@dataclass(frozen=True)
class DistillConfig:
    """Flow-guided distillation to one step.  loss_a = d(z - v(z, 1, c), x0_pair);
    loss_b (weight guide_weight) = d(student one-step x0, x0 from moving along the student's line
    to t' ~ U(t_min, t_max) and finishing with one Euler step of the frozen reflow model);
    guide_weight 0 = plain one-step distillation (the baseline).
    distance: l2 | pseudo_huber (c = 0.00054 sqrt(d)) | features (pseudo-Huber plus the L2 of
    the recipe evaluator's image features, e.g. the digit classifier's)."""

    iterations: int = 1200
    batch_size: int = 128
    lr: float = 5e-4
    ema_decay: float = 0.998
    guide_weight: float = 1.0
    t_min: float = 0.2
    t_max: float = 0.8
    distance: Distance = "pseudo_huber"
    checkpoint_every: int = 250
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.t_min <= self.t_max < 1.0:
            raise FlowpressError(f"distill: need 0 < t_min <= t_max < 1, got {self.t_min}, {self.t_max}")


def build_student(config: StudentConfig, teacher: DiffusersDenoiser) -> DiffusersDenoiser:
    """A class-conditional UNet2DModel of the teacher's shape, classes and time scale, with the
    student's width and depth (random weights)."""
    if not teacher.num_classes:
        raise FlowpressError("distill: the teacher must be class-conditional (num_class_embeds unset)")
    student = build_unet(config.spec, teacher.sample_shape, teacher.num_classes, teacher.time_scale)
    params, teacher_params = count_params(student), count_params(teacher)
    if params > config.max_param_fraction * teacher_params:
        raise FlowpressError(
            f"student: {params} parameters exceed {config.max_param_fraction:g} of the teacher's {teacher_params}; "
            "reduce student.block_out_channels or layers_per_block"
        )
    return student


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def anneal_beta(step: int, config: ReflowConfig) -> float:
    """beta at iteration `step`: 1 at step 0, 0 from anneal_steps on (0 throughout when anneal_steps is 0)."""
    if config.anneal_steps <= 0:
        return 0.0
    frac = min(1.0, step / config.anneal_steps)
    if config.anneal == "linear":
        return 1.0 - frac
    if config.anneal == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    a = 5.0  # exponential: fast early decay, normalised to reach exactly 0 at anneal_steps
    return (math.exp(-a * frac) - math.exp(-a)) / (1.0 - math.exp(-a))


def blend_noise(z_pair: Tensor, beta: float, eps: Tensor) -> Tensor:
    """z_beta = sqrt(1 - beta^2) z_pair + beta eps: still N(0, I), coupled to x0 by 1 - beta."""
    return math.sqrt(max(0.0, 1.0 - beta * beta)) * z_pair + beta * eps


def distance(a: Tensor, b: Tensor, kind: Distance, features: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Mean over the batch of d(a_i, b_i); a, b: (B, C, H, W)."""
    if kind == "l2":
        return (a - b).pow(2).flatten(1).mean(1).mean()
    c = 0.00054 * math.sqrt(a[0].numel())  # pseudo-Huber scale of improved consistency training
    huber = (torch.sqrt((a - b).pow(2).flatten(1).sum(1) + c * c) - c).mean()
    if kind == "pseudo_huber":
        return huber
    assert features is not None
    return huber + (features(a) - features(b)).pow(2).mean()


def warmup_cosine(step: int, total: int) -> float:
    """Warm-up over 5%, then cosine to 5% of the peak (the teacher's schedule)."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(frac * math.pi)) * 0.95 + 0.05


def train_step(
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    loss: Tensor,
    ema_decay: float,
) -> None:
    """One optimizer step on `loss` (gradients clipped to norm 1), the schedule stepped, `ema`
    moved towards `model` by 1 - ema_decay."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p, 1 - ema_decay)


def _batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator that depends only on (seed, step, rank): resumed runs draw what uninterrupted ones would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)


@contextmanager
def _ddp(model: DiffusersDenoiser) -> Iterator[torch.nn.Module]:
    dist = dist_info()
    if dist.world == 1:
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [model.net.device.index] if torch.cuda.is_available() else None
    yield DistributedDataParallel(model, device_ids=ids)


def _train(
    name: str,
    model: DiffusersDenoiser,
    config: ReflowConfig | DistillConfig,
    checkpoint: Path,
    loss_fn: Callable[[torch.nn.Module, int, torch.Generator], Tensor],
    progress: bool,
    stop_at: int | None = None,
) -> TrainState:
    """The shared loop: AdamW, warm-up + cosine, grad clip 1, EMA, resumable checkpoints (rank 0 writes);
    iterations, lr, ema_decay, checkpoint_every and seed come from `config`."""
    iterations, lr, ema_decay = config.iterations, config.lr, config.ema_decay
    checkpoint_every, seed = config.checkpoint_every, config.seed
    from tqdm import tqdm

    dist = dist_info()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state = TrainState(model, ema, opt)
    if checkpoint.is_file():
        _load_state(state, checkpoint)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, iterations), last_epoch=-1)
    for group in opt.param_groups:
        group["lr"] = lr * warmup_cosine(state.step, iterations)
    sched.last_epoch = state.step
    end = iterations if stop_at is None else min(iterations, stop_at)
    with _ddp(model) as wrapped:
        wrapped.train()
        bar = tqdm(range(state.step, end), desc=name, disable=not (progress and dist.main), initial=state.step)
        for step in bar:
            loss = loss_fn(wrapped, step, _batch_generator(seed, step, dist.rank))
            train_step(model, ema, opt, sched, loss, ema_decay)
            state.step = step + 1
            state.losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
            if dist.main and (state.step % checkpoint_every == 0 or state.step == end):
                _save_state(state, checkpoint)
    model.eval()
    barrier()
    return state


def _to(pairs: Pairs, dev: torch.device) -> Pairs:
    return Pairs(pairs.noise.to(dev), pairs.sample.to(dev), pairs.labels.to(dev), pairs.index)


def rank_pairs(pairs: Pairs) -> Pairs:
    """The pairs this rank trains on: index = rank (mod world)."""
    dist = dist_info()
    return pairs.select(pairs.index % dist.world == dist.rank) if dist.world > 1 else pairs


def reflow(
    student: DiffusersDenoiser,
    pairs: Pairs,
    config: ReflowConfig,
    checkpoint: str | Path,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainState:
    """(Annealing) reflow of `student` from scratch on the pairs; returns the state (ema = the model to use)."""
    local = _to(rank_pairs(pairs), next(student.parameters()).device)
    per_rank = max(1, config.batch_size // dist_info().world)

    def loss_fn(model: torch.nn.Module, step: int, gen: torch.Generator) -> Tensor:
        index = torch.randint(0, len(local), (per_rank,), generator=gen)
        x0, z_pair, labels = local.sample[index], local.noise[index], local.labels[index]
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.rand(per_rank, generator=gen).to(x0.device)
        if config.hflip:
            flip = (torch.rand(per_rank, generator=gen) < 0.5).to(x0.device).view(-1, 1, 1, 1)
            x0, z_pair, eps = (torch.where(flip, a.flip(-1), a) for a in (x0, z_pair, eps))
        z = blend_noise(z_pair, anneal_beta(step, config), eps)
        return F.mse_loss(model(interpolate(x0, z, t), t, {"class_labels": labels}), z - x0)

    return _train(
        "reflow" if config.anneal_steps else "2-rectified flow",
        student,
        config,
        Path(checkpoint),
        loss_fn,
        progress,
        stop_at,
    )


def one_step(model: Callable[..., Tensor], z: Tensor, labels: Tensor) -> Tensor:
    """x0 = z - v(z, 1, c): one Euler step from t = 1 to t = 0."""
    return z - model(z, torch.ones(len(z), device=z.device), {"class_labels": labels})


def distill(
    student: DiffusersDenoiser,
    guide: DiffusersDenoiser | None,
    pairs: Pairs,
    config: DistillConfig,
    checkpoint: str | Path,
    progress: bool = True,
    stop_at: int | None = None,
    features: Callable[[Tensor], Tensor] | None = None,
) -> TrainState:
    """Flow-guided distillation of `student` (initialised from the reflow model) to one step.

    guide: the frozen reflow model for the 2-step term (None when guide_weight is 0);
    features: image features for distance 'features' (the recipe evaluator's).
    """
    dev = next(student.parameters()).device
    local = _to(rank_pairs(pairs), dev)
    per_rank = max(1, config.batch_size // dist_info().world)
    if config.guide_weight > 0 and guide is None:
        raise FlowpressError("distill: guide_weight > 0 needs the frozen reflow model as guide")
    if guide is not None:
        guide = guide.eval().requires_grad_(False)
    if config.distance == "features" and features is None:
        raise FlowpressError("distill.distance 'features' needs an evaluator with image features in the recipe")
    num_classes = student.num_classes or 1

    def loss_fn(model: torch.nn.Module, step: int, gen: torch.Generator) -> Tensor:
        index = torch.randint(0, len(local), (per_rank,), generator=gen)
        z, labels = local.noise[index], local.labels[index]
        if config.guide_weight > 0:  # fresh noise and labels for the guidance term, in the same forward
            z = torch.cat([z, torch.randn((per_rank, *student.sample_shape), generator=gen).to(dev)])
            labels = torch.cat([labels, torch.randint(0, num_classes, (per_rank,), generator=gen).to(dev)])
        v = model(
            z, torch.ones(len(z), device=dev), {"class_labels": labels}
        )  # one forward: DDP allows one per backward
        x0_student = z - v
        loss = distance(x0_student[:per_rank], local.sample[index], config.distance, features)
        if config.guide_weight > 0:
            assert guide is not None
            z_new, v_new, labels_new = z[per_rank:], v[per_rank:], labels[per_rank:]
            t_mid = (config.t_min + (config.t_max - config.t_min) * torch.rand(per_rank, generator=gen)).to(dev)
            with torch.no_grad():  # move along the student's line to t', finish with the guide's Euler step
                x_mid = z_new - (1 - t_mid).view(-1, 1, 1, 1) * v_new
                x0_guide = x_mid - t_mid.view(-1, 1, 1, 1) * guide(x_mid, t_mid, {"class_labels": labels_new})
            loss = loss + config.guide_weight * distance(x0_student[per_rank:], x0_guide, config.distance, features)
        return loss

    return _train(
        "flow-guided distill" if config.guide_weight > 0 else "one-step distill",
        student,
        config,
        Path(checkpoint),
        loss_fn,
        progress,
        stop_at,
    )
