"""int8 and fp8 fake quantization with nvidia-modelopt, calibrated on the trajectory set."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from flowpress.calibration import CalibrationSet
from flowpress.compress.amax import activation_amax, per_step_absmax
from flowpress.compress.config import Fp8Config, Int8Config
from flowpress.compress.model import (
    LayerQuant,
    QuantizedModel,
    StepScales,
    correct_biases,
    excluded_patterns,
    is_excluded,
)
from flowpress.errors import FlowpressError
from flowpress.models import StepModel, copy_sharing_weights
from flowpress.ranks import agree, reduce_max, shard
from flowpress.sampling import Sampler


def import_modelopt() -> Any:
    """modelopt.torch.quantization, without the notices modelopt prints at import about transformers
    (they concern Hugging Face LLMs, which flowpress does not quantize)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot find transformers package")
        # modelopt's Hugging Face paths are untested with transformers 5; flowpress quantizes plain
        # torch modules (checked: make quantize's numbers are the same with and without transformers)
        warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")
        import modelopt.torch.quantization as mtq
    # under torchrun: modelopt's default data-parallel group is the whole world, which is what flowpress shards over
    warnings.filterwarnings("ignore", message="Distributed training is initialized but no parallel_state is set")
    return mtq


def modelopt_config(config: Int8Config | Fp8Config, exclude: tuple[str, ...]) -> dict:
    """modelopt's quant_cfg: Conv2d / Linear weights and inputs (int8, or E4M3 as in
    FP8_DEFAULT_CFG, whose LLM-specific exclusions do not apply here), everything else off."""
    fp8 = isinstance(config, Fp8Config)
    act = {"num_bits": (4, 3) if fp8 else config.activation_bits, "axis": None}
    weight = {"num_bits": (4, 3), "axis": None} if fp8 else {"num_bits": 8, "axis": 0}
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for parent in ("nn.Conv2d", "nn.Linear"):
        quant_cfg.append({"quantizer_name": "*weight_quantizer", "parent_class": parent, "cfg": weight})
        quant_cfg.append({"quantizer_name": "*input_quantizer", "parent_class": parent, "cfg": act})
    if isinstance(config, Int8Config) and config.conv_output_quant:
        quant_cfg.append({"quantizer_name": "*output_quantizer", "parent_class": "nn.Conv2d", "cfg": act})
    for pattern in exclude:
        quant_cfg.append({"quantizer_name": pattern if pattern.endswith("*") else f"{pattern}.*", "enable": False})
    return {"quant_cfg": quant_cfg, "algorithm": {"method": "max", "distributed_sync": False}}  # ranks: sync_amax


def sync_amax(model: nn.Module) -> None:
    """Every calibrated range becomes its maximum over the ranks, in one collective (exact: every
    rank calibrated on its share of the batches; modelopt's own sync takes one per quantizer)."""
    amaxes: list[torch.Tensor] = [
        module._amax  # type: ignore[misc]
        for module in model.modules()
        if type(module).__name__ == "TensorQuantizer" and isinstance(getattr(module, "_amax", None), torch.Tensor)
    ]
    shapes = ",".join(str(tuple(a.shape)) for a in amaxes)
    agree({"calibrated quantizers": shapes}, "a rank calibrated other quantizers: report it with the recipe")
    reduce_max(amaxes)


def layer_quants(qmodule: StepModel, exclude: tuple[str, ...], config: Int8Config | Fp8Config) -> dict[str, LayerQuant]:
    """Per-layer amax of every Conv2d / Linear whose input and weight quantizers are on."""
    layers: dict[str, LayerQuant] = {}
    for name, module in qmodule.model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or is_excluded(name, exclude):
            continue
        inq: Any = getattr(module, "input_quantizer", None)
        wq: Any = getattr(module, "weight_quantizer", None)
        if inq is None or wq is None or not (inq.is_enabled and wq.is_enabled) or inq.amax is None or wq.amax is None:
            continue
        outq: Any = getattr(module, "output_quantizer", None)
        output_amax = float(outq.amax) if outq is not None and outq.is_enabled and outq.amax is not None else None
        layers[name] = LayerQuant(
            kind="conv" if isinstance(module, nn.Conv2d) else "linear",
            input_amax=float(inq.amax),
            weight_amax=wq.amax.detach().flatten().expand(module.weight.shape[0]).clone(),
            output_amax=output_amax,
            activation_bits=config.activation_bits,
            precision=config.precision,
        )
    return layers


@torch.no_grad()
def quantize_modelopt(
    fp_module: StepModel,
    temporal: list[str],
    calib: CalibrationSet,
    config: Int8Config | Fp8Config,
    progress: bool = False,
) -> QuantizedModel:
    """modelopt's max calibration over `calib` on a copy of the prepared step model; then the
    activation ranges of config.amax when it is not 'max'."""
    mtq = import_modelopt()
    exclude = excluded_patterns(config, temporal)
    qmodule = copy_sharing_weights(fp_module)  # max calibration reads the weights, never writes them

    def forward_loop(_denoiser: nn.Module) -> None:
        """This rank's share of the batches (a rank without one repeats the first: max is idempotent)."""
        from tqdm import tqdm

        batches = list(calib.batches(config.calib_batch_size))
        mine = [batch for _, batch in shard(batches)] or batches[:1]
        for x, step, cond, _k in tqdm(mine, desc="modelopt calibration", disable=not progress):
            qmodule.run(x, step, cond)

    mtq.quantize(qmodule.model, modelopt_config(config, exclude), forward_loop)
    sync_amax(qmodule.model)
    layers = layer_quants(qmodule, exclude, config)
    if not layers:
        raise FlowpressError("quantize: no Conv2d or Linear layer was quantized; check quantize.exclude in the recipe")
    if config.amax != "max":
        ranges = activation_amax(fp_module, list(layers), calib, config, outputs=True)
        modules = dict(qmodule.model.named_modules())
        for name, layer in layers.items():
            module: Any = modules[name]
            module.input_quantizer.amax = torch.tensor(ranges[f"{name}.input"])
            if layer.output_amax is not None:
                module.output_quantizer.amax = torch.tensor(ranges[f"{name}.output"])
        layers = layer_quants(qmodule, exclude, config)
    qmodel = QuantizedModel(qmodule, fp_module, layers, config, temporal)
    if isinstance(config, Int8Config) and config.step_scales:
        add_step_scales(qmodel, calib)
    if isinstance(config, Int8Config) and config.bias_correction:
        qmodel.bias_calibration = calib
        correct_biases(qmodel)
    return qmodel


def add_step_scales(qmodel: QuantizedModel, calib: CalibrationSet) -> None:
    """Per-step input ranges (the abs-max of each step's calibration inputs) for the layers
    step_scales_layers picks, in the layer records and switched on in the torch model.  Conv
    outputs keep their static range (per step there measured worse on the digits UNet)."""
    fp_module = qmodel.fp_module
    steps = torch.unique(calib.step).tolist()
    if steps != list(range(fp_module.n_evaluations)):
        raise FlowpressError(
            f"quantize.step_scales: the calibration set has inputs at {len(steps)} of the schedule's "
            f"{fp_module.n_evaluations} evaluations; use calibration.strategy: all (a scale for every step)"
        )
    names = step_scales_layers(fp_module, list(qmodel.layers), calib)
    stats = per_step_absmax(fp_module, names, calib, qmodel.config.calib_batch_size)
    modules = dict(qmodel.module.model.named_modules())
    tables = {name: stats[f"{name}.input"].clamp_min(1e-8) for name in names}
    static = {name: modules[name].input_quantizer.amax.detach().clone() for name in names}
    for name in names:
        qmodel.layers[name] = replace(qmodel.layers[name], input_amax_steps=tables[name])
    qmodel.step_scales = StepScales(qmodel.module, tables, static)
    qmodel.module.per_step = qmodel.step_scales


@torch.no_grad()
def step_scales_layers(fp_module: StepModel, names: list[str], calib: CalibrationSet) -> list[str]:
    """The layers whose input scale follows the step: every Linear and every Conv without a bias
    (onnxruntime's MatMulIntegerToFloat and QLinearConv read their input scale at run time; it
    fuses a biased Conv only where it can quantize the bias ahead of time, so a run-time scale
    there leaves the Conv on float kernels, markedly slower on the digits DDPM), and
    the layers that read the sample x_t itself, whatever their kind: x_t's range is the one the
    schedule moves most (noise first, the image last), and such a layer is a network's thin input
    layer, cheap on float kernels."""
    modules = dict(fp_module.model.named_modules())
    reads_sample: set[str] = set()
    x, step, cond, _ = next(calib.batches(2))

    def hook(name: str):  # noqa: ANN202
        def record(_m: nn.Module, args: tuple) -> None:
            if args[0].shape == x.shape and torch.equal(args[0], x):
                reads_sample.add(name)

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        fp_module.run(x, step, cond)
    finally:
        for handle in handles:
            handle.remove()
    return [
        n
        for n in names
        if isinstance(modules[n], nn.Linear) or getattr(modules[n], "bias", None) is None or n in reads_sample
    ]


# modelopt's diffusers example (examples/diffusers/quantization, filter_func_default): the layers it
# leaves unquantized in every format — the input / output layers, the shortcut convs and the time /
# class embeddings
MODELOPT_DIFFUSERS_SKIP = (
    r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed|"
    r"time_text_embed|context_embedder|norm_out|x_embedder).*"
)


@torch.no_grad()
def modelopt_fake_quant(
    fp: StepModel,
    sampler: Sampler,
    cond: dict[str, Tensor],
    null: dict[str, Tensor],
    guidance: float,
    seeds: list[int],
    config_name: str = "INT8_DEFAULT_CFG",
    skip: str | None = None,
) -> StepModel:
    """A copy of `fp` quantized with one of modelopt's own configs (mtq.<config_name>) as its
    diffusers example runs it: calibrated by running the whole sampler from `seeds` (cond: their
    conditioning); quantizers whose name matches the regex `skip` are disabled afterwards (the
    example's filter_func)."""
    import re

    from flowpress.sampling import noise_for_seeds, sample

    mtq = import_modelopt()
    qmodule = copy_sharing_weights(fp)
    noise = noise_for_seeds(seeds, fp.sample_shape)

    def forward_loop(_denoiser: nn.Module) -> None:
        sample(sampler, qmodule, noise, cond, guidance, null, seeds=seeds)

    mtq.quantize(qmodule.model, copy.deepcopy(getattr(mtq, config_name)), forward_loop)
    if skip is not None:
        pattern = re.compile(skip)
        mtq.disable_quantizer(qmodule.model, lambda name: pattern.match(name) is not None)
    return qmodule


def modelopt_default(
    fp: StepModel, sampler: Sampler, cond: dict[str, Tensor], null: dict[str, Tensor], guidance: float, seeds: list[int]
) -> QuantizedModel:
    """modelopt's own int8 recipe (INT8_DEFAULT_CFG, modelopt_fake_quant) — the peer flowpress
    reports beside its own engines."""
    qmodule = modelopt_fake_quant(fp, sampler, cond, null, guidance, seeds)
    config = Int8Config(temporal="int8", conv_output_quant=False)  # what INT8_DEFAULT_CFG places
    return QuantizedModel(qmodule, fp, layer_quants(qmodule, (), config), config, [])
