"""Activation ranges: per-step statistics on the FP model, MSE clipping search, and the
reductions QuantConfig.amax names."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from flowpress.calibration import CalibrationSet
from flowpress.compress.config import QuantConfig
from flowpress.models import StepModel
from flowpress.ranks import reduce_max, shard

E4M3_MAX = 448.0  # largest finite float8 e4m3fn value


@torch.no_grad()
def hooked_pass(
    fp_module: StepModel,
    calib: CalibrationSet,
    batch_size: int,
    hooks: dict[str, Callable[..., None]],
    pre: bool = False,
    each_batch: Callable[[int], None] | None = None,
    sharded: bool = False,
) -> None:
    """Run every calibration input through `fp_module` with `hooks` installed (layer name -> a
    forward hook, or a forward pre-hook when `pre`); `each_batch(step)` runs before each batch.
    sharded: this rank's share of the batches only (the first batch on a rank without one: for
    statistics whose reduction over the ranks is idempotent, such as a maximum)."""
    modules = dict(fp_module.model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(h) if pre else modules[n].register_forward_hook(h)
        for n, h in hooks.items()
    ]
    try:
        batches: Iterable[tuple[Tensor, Tensor, dict[str, Tensor], int]] = calib.batches(batch_size)
        if sharded:
            every = list(batches)
            batches = [batch for _, batch in shard(every)] or every[:1]
        for x, step, cond, k in batches:
            if each_batch is not None:
                each_batch(k)
            fp_module.run(x, step, cond)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def per_step_absmax(
    fp_module: StepModel, names: list[str], calib: CalibrationSet, batch_size: int
) -> dict[str, Tensor]:
    """abs-max of each named layer's input and output at every calibration step.

    Returns {f"{name}.input": (S,), f"{name}.output": (S,)}, S = distinct steps in calib, in
    step order; the step comes from calib.batches, never from counting calls.  Under torchrun each
    rank runs its share of the batches and the maxima are reduced over the ranks.
    """
    steps = torch.unique(calib.step).tolist()
    stats = {f"{n}.{io}": torch.zeros(len(steps)) for n in names for io in ("input", "output")}
    current = {"s": 0}

    def hook(name: str):  # noqa: ANN202
        def record(_m: nn.Module, args: tuple, output: Tensor) -> None:
            s = current["s"]
            stats[f"{name}.input"][s] = max(float(stats[f"{name}.input"][s]), float(args[0].abs().max()))
            stats[f"{name}.output"][s] = max(float(stats[f"{name}.output"][s]), float(output.abs().max()))

        return record

    def at_step(k: int) -> None:
        current["s"] = steps.index(k)

    hooked_pass(fp_module, calib, batch_size, {n: hook(n) for n in names}, each_batch=at_step, sharded=True)
    reduce_max([stats[key] for key in sorted(stats)])  # every rank's batches: the maximum is exact
    return stats


@torch.no_grad()
def activation_samples(
    fp_module: StepModel, names: list[str], calib: CalibrationSet, batch_size: int, per_batch: int = 4096
) -> dict[str, Tensor]:
    """A seeded random subsample of each named layer's input and output values over `calib`."""
    gen = torch.Generator().manual_seed(0)
    found: dict[str, list[Tensor]] = {f"{n}.{io}": [] for n in names for io in ("input", "output")}

    def keep(key: str, values: Tensor) -> None:
        flat = values.detach().flatten()
        found[key].append(flat[torch.randint(0, flat.numel(), (min(per_batch, flat.numel()),), generator=gen)])

    def hook(name: str):  # noqa: ANN202
        def record(_m: nn.Module, args: tuple, output: Tensor) -> None:
            keep(f"{name}.input", args[0])
            keep(f"{name}.output", output)

        return record

    hooked_pass(fp_module, calib, batch_size, {n: hook(n) for n in names})
    return {k: torch.cat(v) for k, v in found.items()}


def fake_quant(values: Tensor, amax: float, bits: int = 8, e4m3: bool = False) -> Tensor:
    """values seen through a symmetric per-tensor quantizer of range amax (modelopt's rounding:
    round-half-even to the int grid, or the E4M3 cast with saturation)."""
    if e4m3:
        scale = max(float(amax), 1e-12) / E4M3_MAX
        return (values / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    qmax = 2 ** (bits - 1) - 1
    scale = max(float(amax), 1e-12) / qmax
    return torch.clamp(torch.round(values / scale), -qmax - 1, qmax) * scale


def mse_amax(values: Tensor, amax: float, bits: int, candidates: int = 36, e4m3: bool = False) -> float:
    """The clipping range alpha * amax, alpha in [0.3, 1], minimising the fake-quant MSE of `values`."""
    alphas = torch.linspace(0.3, 1.0, candidates)
    errors = []
    for alpha in alphas:
        quantized = fake_quant(values, float(alpha) * amax, bits, e4m3)
        errors.append(float((quantized - values).pow(2).mean()))
    return float(alphas[int(torch.tensor(errors).argmin())]) * amax


@torch.no_grad()
def weight_mse_amax(weight: Tensor, bits: int, candidates: int = 41, low: float = 0.6) -> Tensor:
    """Per output channel (dim 0), the clipping range alpha * max|w|, alpha in [low, 1], with the
    least squared error of the `bits`-bit weights in [-qmax, qmax] (round half to even; the narrow
    range set_weight_bits gives the quantizer)."""
    flat = weight.detach().flatten(1).float()
    top = flat.abs().amax(1).clamp_min(1e-12)
    qmax = 2 ** (bits - 1) - 1
    best, best_error = top.clone(), torch.full_like(top, float("inf"))
    for alpha in torch.linspace(low, 1.0, candidates):
        scale = (top * alpha / qmax)[:, None]
        error = (torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale - flat).pow(2).sum(1)
        better = error < best_error
        best_error, best = torch.where(better, error, best_error), torch.where(better, top * alpha, best)
    return best


def reduce_per_step(values: Tensor, config: QuantConfig) -> float:
    """One range from per-step abs-maxes (S,), by config.amax: perstep-max / -mean / -percentile;
    'max' and 'mse' start from the overall max."""
    if config.amax == "perstep-mean":
        return float(values.mean())
    if config.amax == "perstep-percentile":
        return float(torch.quantile(values, config.percentile / 100.0))
    return float(values.max())


def activation_amax(
    fp_module: StepModel, names: list[str], calib: CalibrationSet, config: QuantConfig, outputs: bool = False
) -> dict[str, float]:
    """The range of each named layer's input (and output, as f"{name}.output", when `outputs`)
    under config.amax, measured on the FP step model."""
    keys = [f"{n}.input" for n in names] + ([f"{n}.output" for n in names] if outputs else [])
    stats = per_step_absmax(fp_module, names, calib, config.calib_batch_size)
    found = {key: reduce_per_step(stats[key], config) for key in keys}
    if config.amax == "mse":
        from flowpress.compress.backends import backend_of

        samples = activation_samples(fp_module, names, calib, config.calib_batch_size)
        e4m3 = backend_of(config).e4m3
        found = {key: mse_amax(samples[key], found[key], config.activation_bits, e4m3=e4m3) for key in keys}
    return found
