"""What users bring: diffusers pipelines of every supported family (tiny random configs), run
through `flowpress quantize --model`, sampled by their own schedulers, dropped back in."""

import functools
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import flowpress
from flowpress import defaults
from flowpress.cli import main
from flowpress.compress import W4A8Config
from flowpress.compress.backends.int8 import UNET_FLOAT_LAYERS
from flowpress.errors import FlowpressError
from flowpress.export.graphfile import LARGE_BYTES_ENV, MIN_INLINE_BYTES, graph_files
from flowpress.models import StepModel, load_source
from flowpress.sampling import noise_for_seeds, sample

from . import pipelines

FAMILIES = {
    "ddpm": pipelines.ddpm_pipeline,
    "sd": pipelines.sd_pipeline,
    "dit": pipelines.dit_pipeline,
    "sd3": pipelines.sd3_pipeline,
    "pixart": pipelines.pixart_pipeline,
    "flux": pipelines.flux_pipeline,
}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, build in FAMILIES.items()}


def quantize_model(model, out, capsys, *options):
    code = main(
        ["quantize", "--model", str(model), "--steps", "4", "--samples", "4", "--out", str(out), "--quiet", *options]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_quantizes_from_its_pipeline_directory(pipes, tmp_path, capsys, family):
    # Flux at another size than its default (its VAE's 16 px): 12x12 latents, 6x6 packed patches
    side = 24 if family == "flux" else 16
    options = ("--height", str(side)) if family == "flux" else ()
    code, out, err = quantize_model(pipes[family], tmp_path / "run", capsys, "--no-openvino", *options)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert code == (0 if report["gate"]["passed"] else 1), err  # the gate, and nothing else, picks 0 or 1
    assert report["schedule"]["sampler"] == "diffusers" and len(report["per_step"]) == 5
    assert report["per_step"][0]["rel_l2"] == 0.0 and np.isfinite(report["final"]["psnr_db"])
    # random tiny weights: measured 23-55 dB; a wrong wiring (conditioning, timestep units) lands near 0-10
    assert report["final"]["psnr_db"] > 15 and 0 <= report["fp_samples"]["outside_range"] < 0.5
    samples = np.load(tmp_path / "run" / "samples.npz")
    latent = family != "ddpm"
    assert samples["fp"].shape == ((4, 3, side, side) if latent else (4, 1, 8, 8))  # decoded by the pipeline's VAE
    assert ("prompts" in samples) is (family in ("sd", "sd3", "pixart", "flux"))
    assert f"model: {report['model']}" in out
    # a scheduler-driven UNet's first try keeps the layers modelopt's diffusers example keeps in full precision
    recipe = json.loads((tmp_path / "run" / "manifest.json").read_text())["recipe"]
    unet = family in ("ddpm", "sd")
    assert tuple(recipe["quantize"]["exclude"]) == (UNET_FLOAT_LAYERS if unet else ())
    if family == "flux":  # guidance-distilled: its scale is an input, no classifier-free guidance
        assert recipe["sampling"]["guidance"] == 1.0 and samples["cond_guidance"].tolist() == [3.5] * 4
        assert recipe["model"]["resolution"] == side
        # the drop-in answers FluxPipeline's packed call with the run's engine: its samples, to rounding
        pipe = flowpress.load_pipeline(tmp_path / "run", "ort-int8")
        images = pipe(
            list(samples["prompts"]),
            num_inference_steps=4,
            height=side,
            width=side,
            generator=[torch.Generator().manual_seed(s) for s in samples["seeds"].tolist()],
            output_type="np",
        ).images
        got = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        # measured max |diff| 6e-8 (Zen 3)
        assert float((got - torch.from_numpy(samples["samples_ort-int8"]).clamp(-1, 1)).abs().max()) < 1e-4


@pytest.mark.slow
def test_the_drop_in_pipeline_draws_the_run_engines_samples(pipes, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(LARGE_BYTES_ENV, "1")  # every graph's weights in a data file beside it, as past 2 GB
    code, out, err = quantize_model(
        pipes["sd"], tmp_path / "built", capsys, "--no-openvino", "--guidance", "3.0", "--modelopt-peer"
    )
    report = json.loads((tmp_path / "built" / "report.json").read_text())
    assert code == (0 if report["gate"]["passed"] else 1), err
    shutil.move(tmp_path / "built", tmp_path / "run")  # data files at relative locations: the run can move
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["plan"]["released_before_engines"] is True  # engines built and judged without torch
    outputs = manifest["outputs"]
    for graph in ("fp32.onnx", "model.onnx", "model.tensorrt.onnx", "engine/model.opt.onnx"):
        files = graph_files(tmp_path / "run" / graph)
        assert files[1:] == [tmp_path / "run" / f"{graph}.data"] and f"{graph}.data" in outputs, graph
        inline = onnx.load(str(files[0]), load_external_data=False).graph.initializer
        assert max(len(t.raw_data) for t in inline) <= MIN_INLINE_BYTES, graph  # the weights are in the data file
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    every_layer, example = report["peers"]  # modelopt's default recipe, judged on the same seeds: on every
    assert "skipped layers in full precision" in example["peer"]  # layer, and as its diffusers example runs it
    for peer in (every_layer, example):
        assert peer["final_psnr_db"] > 15 and "modelopt INT8_DEFAULT_CFG" in peer["peer"]
        assert peer["margin_db"] == pytest.approx(report["final"]["psnr_db"] - peer["final_psnr_db"])
    e2e = report["end_to_end_ms_per_image"]  # text encoder + loop + VAE decode, each way
    recommended = {report["recommendation"]["engine"]} - {None, report["engine"]}
    assert set(e2e) == {"torch_fp32", "ort_fp32", "engine", *recommended} and all(v > 0 for v in e2e.values())
    assert "peer modelopt" in out and "end to end ms / image" in out
    samples = np.load(tmp_path / "run" / "samples.npz")
    pipe = flowpress.load_pipeline(tmp_path / "run", "ort-int8")
    seeds = samples["seeds"].tolist()
    images = pipe(
        list(samples["prompts"]),
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    got = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    # measured max |diff| 6e-8: the same engine, noise and conditioning the diffusers way
    assert float((got - torch.from_numpy(samples["samples_ort-int8"]).clamp(-1, 1)).abs().max()) < 1e-4
    with pytest.raises(FlowpressError, match="num_inference_steps=4"):
        pipe(["a red car"], num_inference_steps=6, output_type="np")


def test_the_flux_trajectory_is_the_pipelines_own(pipes):
    """Packing, position ids, the shifted sigmas, the distilled guidance input: flowpress's FP
    trajectory must end where FluxPipeline's own latents do."""
    source = load_source(pipes["flux"])
    sampler = source.sampler(4, "")
    conditions = source.conditioner.conditions(2)
    seeds = [3, 4]
    model = StepModel(source.denoiser, sampler).run
    ours = sample(sampler, model, noise_for_seeds(seeds, (4, 8, 8)), conditions.model, seeds=seeds).final
    pipe = source.pipe
    packed = pipe(
        list(conditions.prompts), num_inference_steps=4, height=16, width=16, output_type="latent",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images  # fmt: skip
    theirs = pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)
    assert float((ours - theirs).abs().max()) < 1e-5 * float(theirs.abs().max())  # measured: equal (Zen 3)


@pytest.mark.parametrize(
    "options, said",
    [
        (("--height", "24", "--width", "32"), "non-square images are not supported yet"),
        (("--height", "26"), "resolution 26 px is not a multiple of 4"),  # the VAE's 2, and 2 for the packing
        (("--width", "-8"), "give the image side in pixels, >= 1"),
    ],
)
def test_a_resolution_the_model_cannot_take_is_one_line(pipes, tmp_path, capsys, options, said):
    code, _, err = quantize_model(pipes["flux"], tmp_path / "bad", capsys, "--no-openvino", *options)
    line = err.splitlines()[-1]  # after diffusers' loading bars, when the pipeline had to be read first
    assert code == 2 and line.startswith("flowpress: error: ") and said in line, err
    assert not (tmp_path / "bad").exists()


def test_fluxs_rotary_embedding_is_diffusers_own_with_a_symbolic_batch():
    from diffusers.models.embeddings import apply_rotary_emb

    from flowpress.models.velocity import _rotary

    x = torch.randn(3, 10, 2, 8)
    freqs = (torch.randn(10, 8), torch.randn(10, 8))
    for dim, shaped in ((1, x), (2, x.transpose(1, 2))):
        assert torch.equal(_rotary(shaped, freqs, dim), apply_rotary_emb(shaped, freqs, sequence_dim=dim))


def test_the_ddpm_sampler_is_the_pipelines_own(pipes):
    """DDPM is stochastic: flowpress's FP trajectory must be the pipeline's, noise and all."""
    from diffusers import DDPMPipeline

    source = load_source(pipes["ddpm"])
    sampler = source.sampler(5, "")
    seeds = [3, 4]
    ours = sample(
        sampler, StepModel(source.denoiser, sampler).run, noise_for_seeds(seeds, (1, 8, 8)), {}, seeds=seeds
    ).final
    pipe = DDPMPipeline.from_pretrained(pipes["ddpm"], local_files_only=True)
    theirs = pipe(
        batch_size=2,
        num_inference_steps=5,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    expected = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    assert float((ours.clamp(-1, 1) - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("component", ["vae", "text_encoder"])
def test_a_component_that_is_not_a_denoiser_is_refused_in_one_line(pipes, tmp_path, capsys, component):
    code, _, err = quantize_model(pipes["sd"] / component, tmp_path / "run", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "not a denoiser" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--steps", "sampling.steps must be"),
        ("--samples", "n_samples must be"),
        ("--calibration-samples", "n_samples and batch_size must be >= 1"),
        ("--batch", "n_samples and batch_size must be >= 1"),
    ],
)
def test_zero_steps_or_samples_are_refused_not_taken_for_the_default(pipes, tmp_path, capsys, option, message):
    code, _, err = quantize_model(pipes["ddpm"], tmp_path / "run", capsys, option, "0")
    last = err.splitlines()[-1]  # after diffusers' own "Loading pipeline components" bar
    assert code == 2 and last.startswith("flowpress: error:") and message in last
    assert not (tmp_path / "run").exists()


def test_an_unsupported_class_names_the_supported_ones(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "UNet1DModel"}))
    code, _, err = quantize_model(tmp_path / "m", tmp_path / "run", capsys)
    assert code == 2 and "'UNet1DModel' is not supported" in err and "SD3Transformer2DModel" in err


def test_a_bare_denoiser_must_be_told_its_scheduler(pipes, tmp_path, capsys):
    bare = tmp_path / "unet"
    shutil.copytree(pipes["ddpm"] / "unet", bare)
    code, _, err = quantize_model(bare, tmp_path / "run", capsys)
    assert code == 2 and "never guesses" in err and "prediction_type" in err
    told = load_source(bare, scheduler="ddim", prediction_type="v_prediction")
    sampler = told.sampler(4, "")
    assert sampler.as_dict()["scheduler"] == "DDIMScheduler" and sampler.prediction_type == "v_prediction"


@pytest.mark.slow
def test_w4a8_without_a_recipe_keeps_its_linear_edge_exact_on_every_host(pipes, tmp_path, capsys, monkeypatch):
    # PixArt's output layer is a Linear: with 8-bit weights onnxruntime runs it as MatMulIntegerToFloat,
    # which saturated on an AVX2 host (noise ratio 4.10, exit 3); the default 7-bit edges are exact there.
    # The edges' form does not depend on learned rounding: 20 iterations per block instead of 500
    fewer = functools.partial(W4A8Config, recon_iters=20)
    monkeypatch.setattr(defaults, "PRECISIONS", {**defaults.PRECISIONS, "w4a8": fewer})
    code, _, err = quantize_model(pipes["pixart"], tmp_path / "run", capsys, "--precision", "w4a8", "--no-openvino")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert code == (0 if report["gate"]["passed"] else 1), err  # random tiny weights: below the gate so far
    graph = onnx.load(str(tmp_path / "run" / "model.onnx")).graph
    edges = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".weight_int8")}
    assert len(edges) == 2 and all(np.abs(w).max() <= 63 for w in edges.values()), sorted(edges)
