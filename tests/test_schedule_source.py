"""The run's sampler is the only source of time: the TensorRT plan records it, the drop-in counts calls."""

from types import SimpleNamespace

import pytest
import torch

from flowpress.dropin import EngineForward
from flowpress.engines.tensorrt import check_manifest
from flowpress.errors import FlowpressError
from flowpress.export.tensorrt import GpuIdentity, TensorRTConfig, plan_manifest
from flowpress.models import load_source
from flowpress.recipe import load_recipe
from flowpress.sampling import Schedule
from flowpress.sampling.schedulers import DiffusersSampler, schedule_from_dict

GPU = GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0), "10.7.0")


def test_a_plan_built_for_a_diffusers_scheduler_run_is_accepted(tmp_path):
    recipe = load_recipe("examples/digits/recipes/digits-ddpm-int8.yaml")  # DDIM from the pipeline's DDPM config
    source = load_source(recipe.model.path, recipe.model.time_scale, recipe.model.scheduler)
    sampler = source.sampler(recipe.sampling.steps, recipe.sampling.method)
    (tmp_path / "model.plan").write_bytes(b"plan")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    manifest = plan_manifest(tmp_path / "model.plan", tmp_path / "model.onnx", "int8", GPU, sampler, TensorRTConfig())
    assert manifest["schedule"]["method"] == "DDIMScheduler" and manifest["schedule"]["n_steps"] == 20
    check_manifest(manifest, sampler, GPU, "plan")  # the run's engine checks against the run's sampler
    check_manifest(manifest, schedule_from_dict(manifest["schedule"]), GPU, "plan")  # and a reloaded run's record
    with pytest.raises(FlowpressError, match="20-step DDIMScheduler schedule, 20-step euler requested"):
        check_manifest(manifest, Schedule(20, "euler"), GPU, "plan")


class Recorder:
    """An engine that records the step index it is called with."""

    def __init__(self, sampler):
        self.schedule, self.steps = sampler, []

    def __call__(self, x, step, cond):
        self.steps.append(step.tolist())
        return torch.zeros_like(x)


def _pipeline_calls(forward, sampler, batch=2):
    scheduler = sampler._fresh()  # what the pipeline does: its own copy, set_timesteps, one call per timestep
    for t in scheduler.timesteps:
        forward(torch.zeros(batch, 1, 4, 4), t)


def test_heun_calls_at_one_timestep_are_two_steps():
    from diffusers import HeunDiscreteScheduler

    sampler = DiffusersSampler(HeunDiscreteScheduler(num_train_timesteps=1000), 4)
    times = sampler.model_times.tolist()
    assert len(times) == 7 and times[1] == times[2]  # the second call repeats the first's timestep
    engine = Recorder(sampler)
    forward = EngineForward(engine, SimpleNamespace(config=SimpleNamespace(out_channels=1)), (1, 4, 4), "heun")
    _pipeline_calls(forward, sampler)
    _pipeline_calls(forward, sampler)  # a second pipeline call starts over at step 0
    assert engine.steps == [[k, k] for k in range(7)] * 2


def test_a_new_pipeline_call_after_an_interrupted_one_restarts_at_step_0():
    from diffusers import HeunDiscreteScheduler

    sampler = DiffusersSampler(HeunDiscreteScheduler(num_train_timesteps=1000), 4)
    engine = Recorder(sampler)
    forward = EngineForward(engine, SimpleNamespace(config=SimpleNamespace(out_channels=1)), (1, 4, 4), "heun")
    for t in sampler.model_times[:4]:  # stopped after 4 of 7 calls
        forward(torch.zeros(1, 1, 4, 4), t)
    _pipeline_calls(forward, sampler, batch=1)
    assert engine.steps == [[0], [1], [2], [3]] + [[k] for k in range(7)]
    with pytest.raises(FlowpressError, match="is not on the schedule"):
        forward(torch.zeros(1, 1, 4, 4), torch.tensor(3.5))
