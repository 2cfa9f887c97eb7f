"""--lora: a LoRA fused into the pipeline before calibration (diffusers + peft), at its scale,
hashed in the manifest; a wrong file is one line."""

import json

import pytest
import torch

from flowpress.cli import main
from flowpress.errors import FlowpressError
from flowpress.models import load_source

from . import pipelines

RANK, ALPHA = 2, 2.0  # alpha = rank: diffusers saves no alpha, and loads scaling alpha / rank = 1
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def pipe_and_lora(tmp_path_factory):
    """The tiny SD pipeline and a LoRA of its UNet's attention projections (random, non-zero)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    pipe = pipelines.sd_pipeline(root / "sd")
    unet = UNet2DConditionModel.from_pretrained(pipe / "unet")
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=layers)
    return pipe, root / "lora" / "pytorch_lora_weights.safetensors"


def _to_q(source) -> torch.Tensor:  # noqa: ANN001
    return dict(source.denoiser.net.named_modules())[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ].weight


def test_the_lora_is_fused_at_its_scale(pipe_and_lora):
    from safetensors.torch import load_file

    pipe, lora = pipe_and_lora
    base = _to_q(load_source(pipe)).detach().clone()
    fused = _to_q(load_source(pipe, lora=lora, lora_scale=0.5)).detach()
    state = load_file(str(lora))
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = state[f"{prefix}.lora.down.weight"], state[f"{prefix}.lora.up.weight"]
    expected = base + 0.5 * (ALPHA / RANK) * up @ down
    assert (fused - base).abs().max() > 1e-3  # the LoRA moves the weight
    assert torch.allclose(fused, expected, atol=1e-6), float((fused - expected).abs().max())
    assert torch.equal(_to_q(load_source(pipe, lora=lora, lora_scale=0.0)).detach(), base)


def test_a_file_that_is_not_a_lora_is_one_line(pipe_and_lora, tmp_path):
    pipe, _ = pipe_and_lora
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(b"not a safetensors file")
    with pytest.raises(
        FlowpressError, match=r"^--lora .*wrong\.safetensors: cannot fuse it into this StableDiffusionPipeline"
    ):
        load_source(pipe, lora=wrong)
    with pytest.raises(FlowpressError, match=r"^--lora .*missing\.safetensors: no such file"):
        load_source(pipe, lora=tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_quantize_with_a_lora_records_it(pipe_and_lora, tmp_path, capsys):
    pipe, lora = pipe_and_lora
    out = tmp_path / "run"
    command = ["quantize", "--model", str(pipe), "--lora", str(lora), "--lora-scale", "0.7", "--steps", "4"]
    code = main([*command, "--samples", "4", "--no-openvino", "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["gate"]["passed"] else 1), capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["model"]["lora"] == str(lora) and manifest["recipe"]["model"]["lora_scale"] == 0.7
    import hashlib

    assert manifest["inputs"]["lora"] == {lora.name: hashlib.sha256(lora.read_bytes()).hexdigest()}
