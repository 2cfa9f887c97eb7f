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
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.digits import NUM_CLASSES
from models.teacher import TeacherConfig, build_unet
from models.velocity import DiffusersVelocity
from sampling import FlowpressError, Schedule, interpolate, noise_for_seeds, sample

Anneal = Literal["linear", "exponential", "cosine"]
Distance = Literal["l2", "pseudo_huber", "classifier"]


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class PairConfig:
    """Reflow pairs: pair i has noise from seed seed_base + i, label i % 10 and the teacher's sample
    from `steps` Heun steps at `guidance`; shards of shard_size pairs are written atomically."""

    n_pairs: int = 4000
    steps: int = 16
    method: Literal["euler", "heun"] = "heun"
    guidance: float = 2.0
    seed_base: int = 1_000_000  # disjoint from compare (0..) and calibration (100000..) seeds
    shard_size: int = 250
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.shard_size < 1 or self.batch_size < 1 or self.steps < 1:
            raise FlowpressError(
                f"pairs: n_pairs, shard_size, batch_size and steps must be >= 1, got "
                f"{self.n_pairs}, {self.shard_size}, {self.batch_size}, {self.steps}"
            )


@dataclass(frozen=True)
class StudentConfig:
    """The student UNet (built like the teacher, models/teacher.py); out: where the one-step student goes."""

    out: str = "checkpoints/digits-slimflow"
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    attention_levels: tuple[int, ...] = (1,)
    layers_per_block: int = 1
    max_param_fraction: float = 0.25  # of the teacher's parameters; a larger student is an error

    def teacher_config(self) -> TeacherConfig:
        return TeacherConfig(
            block_out_channels=self.block_out_channels,
            attention_levels=self.attention_levels,
            layers_per_block=self.layers_per_block,
        )


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
    distance: l2 | pseudo_huber (c = 0.00054 sqrt(d)) | classifier (pseudo-Huber plus the digit
    classifier's feature L2)."""

    iterations: int = 1200
    batch_size: int = 128
    lr: float = 5e-4
    ema_decay: float = 0.998
    guide_weight: float = 1.0
    t_min: float = 0.2
    t_max: float = 0.8
    distance: Distance = "pseudo_huber"
    classifier_path: str = "checkpoints/digits-classifier"
    checkpoint_every: int = 250
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.t_min <= self.t_max < 1.0:
            raise FlowpressError(f"distill: need 0 < t_min <= t_max < 1, got {self.t_min}, {self.t_max}")


# ---------------------------------------------------------------- distributed helpers


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> Dist:
    """Rank and world size of the torch.distributed group (initialised by `init_distributed`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Dist()


def init_distributed() -> Dist:
    """Join the torchrun group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if torch.cuda.is_available() and torch.cuda.device_count() < local:
            raise FlowpressError(
                f"torchrun started {local} processes on this host, which has {torch.cuda.device_count()} CUDA "
                f"GPU(s): nccl needs one GPU per process; use --nproc_per_node={torch.cuda.device_count()}, "
                "or CUDA_VISIBLE_DEVICES= to train on the CPU (gloo)"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return dist_info()


def barrier() -> None:
    if dist_info().world > 1:
        torch.distributed.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def config_hash(*parts: Any) -> str:
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _why(error: Exception) -> str:
    """The first line of an exception's message (its type when the message is empty), at most 200 characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


# ---------------------------------------------------------------- reflow pairs


@dataclass(frozen=True)
class Pairs:
    """noise: (N, C, H, W) the sampler's start z; sample: (N, C, H, W) the teacher's x0; labels, index: (N,)."""

    noise: Tensor
    sample: Tensor
    labels: Tensor
    index: Tensor

    def __len__(self) -> int:
        return len(self.index)

    def select(self, keep: Tensor) -> Pairs:
        return Pairs(self.noise[keep], self.sample[keep], self.labels[keep], self.index[keep])


def shard_path(root: Path, shard: int) -> Path:
    return root / f"pairs-{shard:05d}.safetensors"


@torch.no_grad()
def generate_pairs(
    teacher: DiffusersVelocity,
    config: PairConfig,
    root: str | Path,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> Path:
    """Write the teacher's reflow pairs into root/pairs-*.safetensors, skipping shards already there.

    Shard s holds pairs [s * shard_size, (s + 1) * shard_size); rank r writes shards s = r mod world.
    A shard is written to a temporary file and renamed, so an interrupted run leaves only whole
    shards, and every pair depends only on its seed: resuming neither duplicates nor loses pairs.
    A shard already there that fails read_shard (truncated, NaN, ...) is deleted and written again.
    on_shard(s) is called after shard s is written (tests interrupt there).
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"pairs": asdict(config), "teacher": teacher.flowpress_config()}
    meta_file = root / "pairs.json"
    dist = dist_info()
    if dist.main:
        if meta_file.is_file() and json.loads(meta_file.read_text())["pairs"] != meta["pairs"]:
            raise FlowpressError(f"{root}: holds pairs of another pair config; delete it or change the run name")
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    n_shards = math.ceil(config.n_pairs / config.shard_size)
    mine = []
    for s in range(dist.rank, n_shards, dist.world):
        path = shard_path(root, s)
        if path.is_file():
            problem = read_shard(path, config, s, teacher.sample_shape)[1]
            if not problem:
                continue
            print(f"[flowpress] {path}: {problem}; regenerating it")
            path.unlink()
        mine.append(s)
    schedule = Schedule(config.steps, config.method)
    dev = next(teacher.parameters()).device
    for shard in tqdm(mine, desc="reflow pairs", disable=not (progress and dist.main)):
        index = torch.arange(shard * config.shard_size, min(config.n_pairs, (shard + 1) * config.shard_size))
        noise = noise_for_seeds((config.seed_base + index).tolist(), teacher.sample_shape)
        labels = index % NUM_CLASSES
        samples = []
        for start in range(0, len(index), config.batch_size):
            chunk = slice(start, start + config.batch_size)
            traj = sample(
                teacher,
                noise[chunk].to(dev),
                labels[chunk].to(dev),
                schedule,
                config.guidance,
                teacher.null_label,
            )
            samples.append(traj.final.cpu())
        tmp = shard_path(root, shard).with_suffix(".tmp")
        save_file(
            {"noise": noise, "sample": torch.cat(samples).contiguous(), "labels": labels, "index": index}, str(tmp)
        )
        os.replace(tmp, shard_path(root, shard))
        if on_shard is not None:
            on_shard(shard)
    barrier()
    return root


PAIR_KEYS = ("noise", "sample", "labels", "index")


def read_shard(
    path: Path, config: PairConfig, shard: int, sample_shape: tuple[int, ...] | None = None
) -> tuple[dict[str, Tensor], str]:
    """(tensors, "") for a whole pair shard, ({}, what is wrong) otherwise: a readable safetensors file
    holding exactly PAIR_KEYS, index = the shard's pair indices, labels = index % 10, noise float32
    (N, *sample_shape) (any (N, C, H, W) when sample_shape is None), sample a float tensor of the
    same shape, both finite."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError for a bad header, OSError for a bad file
        return {}, f"unreadable safetensors ({_why(e)})"
    if sorted(tensors) != sorted(PAIR_KEYS):
        return {}, f"keys {sorted(tensors)}, expected {sorted(PAIR_KEYS)}"
    noise, samples, labels, index = (tensors[k] for k in PAIR_KEYS)
    expected = torch.arange(shard * config.shard_size, min(config.n_pairs, (shard + 1) * config.shard_size))
    shape = (len(expected), *sample_shape) if sample_shape is not None else None
    if index.dtype != torch.int64 or index.shape != expected.shape:
        return {}, f"index is {index.dtype} {tuple(index.shape)}, expected torch.int64 ({len(expected)},)"
    if not torch.equal(index, expected):
        return {}, f"index is not {int(expected[0])}..{int(expected[-1])}"
    if labels.dtype != torch.int64 or not torch.equal(labels, index % NUM_CLASSES):
        return {}, f"labels are not index % {NUM_CLASSES}"
    if noise.dtype != torch.float32 or noise.dim() != 4 or len(noise) != len(expected):
        return {}, f"noise is {noise.dtype} {tuple(noise.shape)}, expected torch.float32 ({len(expected)}, C, H, W)"
    if shape is not None and noise.shape != shape:
        return {}, f"noise has shape {tuple(noise.shape)}, expected {shape}"
    if not samples.dtype.is_floating_point or samples.shape != noise.shape:
        return {}, f"sample is {samples.dtype} {tuple(samples.shape)}, expected a float tensor of {tuple(noise.shape)}"
    for name in ("noise", "sample"):
        if not bool(torch.isfinite(tensors[name]).all()):
            return {}, f"{name} holds NaN or inf"
    return tensors, ""


def load_pairs(root: str | Path, config: PairConfig, sample_shape: tuple[int, ...] | None = None) -> Pairs:
    """All pairs of a finished generate_pairs run, in index order; every shard is checked by read_shard
    (sample_shape: the teacher's (C, H, W), else that of shard 0)."""
    root = Path(root)
    n_shards = math.ceil(config.n_pairs / config.shard_size)
    missing = [s for s in range(n_shards) if not shard_path(root, s).is_file()]
    if missing:
        raise FlowpressError(f"{root}: {len(missing)} of {n_shards} pair shards missing; re-run to generate them")
    shards = []
    for s in range(n_shards):
        tensors, problem = read_shard(shard_path(root, s), config, s, sample_shape)
        if problem:
            raise FlowpressError(f"{shard_path(root, s)}: bad pair shard ({problem}); re-run to regenerate it")
        sample_shape = tuple(tensors["noise"].shape[1:])
        shards.append(tensors)
    pairs = Pairs(*(torch.cat([s[k] for s in shards]) for k in PAIR_KEYS))
    if not torch.equal(pairs.index, torch.arange(config.n_pairs)):
        raise FlowpressError(f"{root}: pair indices are not 0..{config.n_pairs - 1}; delete the directory")
    return pairs


# ---------------------------------------------------------------- students


def build_student(config: StudentConfig, teacher_params: int | None = None) -> DiffusersVelocity:
    """A class-conditional UNet2DModel like the teacher's, with the student's width and depth."""
    student = build_unet(config.teacher_config())
    params = count_params(student)
    if teacher_params is not None and params > config.max_param_fraction * teacher_params:
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


def _lr_at(step: int, total: int) -> float:
    """Warm-up over 5%, then cosine to 5% of the peak (the teacher's schedule)."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(frac * math.pi)) * 0.95 + 0.05


@dataclass
class TrainState:
    model: DiffusersVelocity
    ema: DiffusersVelocity
    opt: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)


STATE_FORMAT = "flowpress-train-state/1"


@dataclass(frozen=True)
class SavedState:
    """A training state as written by _save_state: tensors named model/<key>, ema/<key> and
    opt/<param>/<key>; meta: the JSON rest (format, step, losses, param_groups, opt_state, sha256)."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]

    def part(self, prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _state_digest(tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
    """sha256 over the name, dtype, shape and bytes of every tensor (in name order) and the JSON rest."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_state(state: TrainState, path: Path) -> None:
    """Write `state` to `path` without pickle: one safetensors file of every tensor (model, EMA, optimizer
    moments) whose metadata holds the rest as JSON, with the sha256 of both; temporary file, then rename."""
    from safetensors.torch import save_file

    opt = state.opt.state_dict()
    tensors = {f"model/{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in state.ema.state_dict().items()})
    opt_state: dict[str, dict[str, Any]] = {}
    for param, entry in opt["state"].items():
        opt_state[str(param)] = {k: v for k, v in entry.items() if not isinstance(v, Tensor)}
        tensors.update({f"opt/{param}/{k}": v for k, v in entry.items() if isinstance(v, Tensor)})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": STATE_FORMAT,
        "step": state.step,
        "losses": state.losses,
        "param_groups": opt["param_groups"],
        "opt_state": opt_state,
    }
    meta = json.loads(json.dumps(meta))  # what reading it back gives (tuples become lists), for the digest
    meta["sha256"] = _state_digest(tensors, meta)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"flowpress": json.dumps(meta)})
    os.replace(tmp, path)


def read_state(path: Path) -> SavedState:
    """A _save_state file, read without pickle and checked against its sha256; an unreadable,
    truncated or altered file is a FlowpressError."""
    from safetensors import safe_open

    def bad(reason: str) -> FlowpressError:
        return FlowpressError(f"{path}: not a whole training state ({reason}); delete it to start that stage afresh")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["flowpress"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError (header, size), KeyError / ValueError (metadata), OSError
        raise bad(_why(e)) from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != STATE_FORMAT:
        raise bad(f"format {found!r}, expected {STATE_FORMAT!r}")
    sha = meta.pop("sha256", None)
    if sha != _state_digest(tensors, meta):
        raise bad("sha256 mismatch")
    return SavedState(tensors, meta)


def _load_state(state: TrainState, path: Path) -> None:
    """Restore `state` from read_state(path); a state of another model or optimizer is a FlowpressError."""
    saved = read_state(path)
    try:
        opt_state = {
            int(param): {**rest, **saved.part(f"opt/{param}/")} for param, rest in saved.meta["opt_state"].items()
        }
        state.model.load_state_dict(saved.part("model/"))
        state.ema.load_state_dict(saved.part("ema/"))
        state.opt.load_state_dict({"state": opt_state, "param_groups": saved.meta["param_groups"]})
        state.step, state.losses = int(saved.meta["step"]), [float(x) for x in saved.meta["losses"]]
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # another model's or optimizer's state
        raise FlowpressError(
            f"{path}: training state does not fit this model ({_why(e)}); delete it to start that stage afresh"
        ) from None


def _batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator that depends only on (seed, step, rank): resumed runs draw what uninterrupted ones would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)


@contextmanager
def _ddp(model: DiffusersVelocity) -> Iterator[torch.nn.Module]:
    dist = dist_info()
    if dist.world == 1:
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [model.net.device.index] if torch.cuda.is_available() else None
    yield DistributedDataParallel(model, device_ids=ids)


def _train(
    name: str,
    model: DiffusersVelocity,
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, iterations), last_epoch=-1)
    for group in opt.param_groups:
        group["lr"] = lr * _lr_at(state.step, iterations)
    sched.last_epoch = state.step
    end = iterations if stop_at is None else min(iterations, stop_at)
    with _ddp(model) as wrapped:
        wrapped.train()
        bar = tqdm(range(state.step, end), desc=name, disable=not (progress and dist.main), initial=state.step)
        for step in bar:
            loss = loss_fn(wrapped, step, _batch_generator(seed, step, dist.rank))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - ema_decay)
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
    student: DiffusersVelocity,
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
        return F.mse_loss(model(interpolate(x0, z, t), t, labels), z - x0)

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
    return z - model(z, torch.ones(len(z), device=z.device), labels)


def distill(
    student: DiffusersVelocity,
    guide: DiffusersVelocity | None,
    pairs: Pairs,
    config: DistillConfig,
    checkpoint: str | Path,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainState:
    """Flow-guided distillation of `student` (initialised from the reflow model) to one step.

    guide: the frozen reflow model for the 2-step term (None when guide_weight is 0).
    """
    dev = next(student.parameters()).device
    local = _to(rank_pairs(pairs), dev)
    per_rank = max(1, config.batch_size // dist_info().world)
    if config.guide_weight > 0 and guide is None:
        raise FlowpressError("distill: guide_weight > 0 needs the frozen reflow model as guide")
    if guide is not None:
        guide = guide.eval().requires_grad_(False)
    features = None
    if config.distance == "classifier":
        from models.classifier import load_classifier

        classifier = load_classifier(config.classifier_path).to(dev).requires_grad_(False)
        features = classifier.embed

    def loss_fn(model: torch.nn.Module, step: int, gen: torch.Generator) -> Tensor:
        index = torch.randint(0, len(local), (per_rank,), generator=gen)
        z, labels = local.noise[index], local.labels[index]
        if config.guide_weight > 0:  # fresh noise and labels for the guidance term, in the same forward
            z = torch.cat([z, torch.randn((per_rank, *student.sample_shape), generator=gen).to(dev)])
            labels = torch.cat([labels, torch.randint(0, NUM_CLASSES, (per_rank,), generator=gen).to(dev)])
        v = model(z, torch.ones(len(z), device=dev), labels)  # one forward: DDP allows one per backward
        x0_student = z - v
        loss = distance(x0_student[:per_rank], local.sample[index], config.distance, features)
        if config.guide_weight > 0:
            assert guide is not None
            z_new, v_new, labels_new = z[per_rank:], v[per_rank:], labels[per_rank:]
            t_mid = (config.t_min + (config.t_max - config.t_min) * torch.rand(per_rank, generator=gen)).to(dev)
            with torch.no_grad():  # move along the student's line to t', finish with the guide's Euler step
                x_mid = z_new - (1 - t_mid).view(-1, 1, 1, 1) * v_new
                x0_guide = x_mid - t_mid.view(-1, 1, 1, 1) * guide(x_mid, t_mid, labels_new)
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
