"""Reflow pairs: the teacher's samples from seeded noise, in shards written atomically, checked on read."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from flowpress.compress.distributed import _why
from flowpress.errors import FlowpressError
from flowpress.files import staged_file
from flowpress.models import DiffusersDenoiser, StepModel
from flowpress.ranks import barrier, dist_info
from flowpress.sampling import Schedule, noise_for_seeds, sample


@dataclass(frozen=True)
class PairConfig:
    """Reflow pairs: pair i has noise from seed seed_base + i, label i % (the teacher's classes) and the teacher's sample
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
    teacher: DiffusersDenoiser,
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
    if not teacher.num_classes:
        raise FlowpressError("reflow pairs: the teacher must be class-conditional (num_class_embeds unset)")
    num_classes = teacher.num_classes
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
            problem = read_shard(path, config, s, teacher.sample_shape, num_classes)[1]
            if not problem:
                continue
            print(f"[flowpress] {path}: {problem}; regenerating it")
            path.unlink()
        mine.append(s)
    schedule = Schedule(config.steps, config.method)
    step_model = StepModel(teacher, schedule)
    dev = next(teacher.parameters()).device
    for shard in tqdm(mine, desc="reflow pairs", disable=not (progress and dist.main)):
        index = torch.arange(shard * config.shard_size, min(config.n_pairs, (shard + 1) * config.shard_size))
        noise = noise_for_seeds((config.seed_base + index).tolist(), teacher.sample_shape)
        labels = index % num_classes
        samples = []
        for start in range(0, len(index), config.batch_size):
            chunk = slice(start, start + config.batch_size)
            null = {k: v.to(dev) for k, v in teacher.null_condition().items()}
            cond = {"class_labels": labels[chunk].to(dev)}
            traj = sample(schedule, step_model.run, noise[chunk].to(dev), cond, config.guidance, null)
            samples.append(traj.final.cpu())
        with staged_file(shard_path(root, shard)) as tmp:
            tensors = {"noise": noise, "sample": torch.cat(samples).contiguous(), "labels": labels, "index": index}
            save_file(tensors, str(tmp))
        if on_shard is not None:
            on_shard(shard)
    barrier()
    return root


PAIR_KEYS = ("noise", "sample", "labels", "index")


def read_shard(
    path: Path, config: PairConfig, shard: int, sample_shape: tuple[int, ...] | None = None, num_classes: int = 10
) -> tuple[dict[str, Tensor], str]:
    """(tensors, "") for a whole pair shard, ({}, what is wrong) otherwise: a readable safetensors file
    holding exactly PAIR_KEYS, index = the shard's pair indices, labels = index % num_classes, noise float32
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
    if labels.dtype != torch.int64 or not torch.equal(labels, index % num_classes):
        return {}, f"labels are not index % {num_classes}"
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


def load_pairs(
    root: str | Path, config: PairConfig, sample_shape: tuple[int, ...] | None = None, num_classes: int = 10
) -> Pairs:
    """All pairs of a finished generate_pairs run, in index order; every shard is checked by read_shard
    (sample_shape: the teacher's (C, H, W), else that of shard 0)."""
    root = Path(root)
    n_shards = math.ceil(config.n_pairs / config.shard_size)
    missing = [s for s in range(n_shards) if not shard_path(root, s).is_file()]
    if missing:
        raise FlowpressError(f"{root}: {len(missing)} of {n_shards} pair shards missing; re-run to generate them")
    shards = []
    for s in range(n_shards):
        tensors, problem = read_shard(shard_path(root, s), config, s, sample_shape, num_classes)
        if problem:
            raise FlowpressError(f"{shard_path(root, s)}: bad pair shard ({problem}); re-run to regenerate it")
        sample_shape = tuple(tensors["noise"].shape[1:])
        shards.append(tensors)
    pairs = Pairs(*(torch.cat([s[k] for s in shards]) for k in PAIR_KEYS))
    if not torch.equal(pairs.index, torch.arange(config.n_pairs)):
        raise FlowpressError(f"{root}: pair indices are not 0..{config.n_pairs - 1}; delete the directory")
    return pairs
