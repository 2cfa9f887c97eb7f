import json

import pytest
import torch

from examples.digits.classifier import classifier_accuracy, load_classifier
from examples.digits.data import NULL_LABEL, load_digits
from flowpress.errors import FlowpressError
from flowpress.models import StepModel, load_model
from flowpress.sampling import Schedule

from .conftest import CLASSIFIER, TEACHER


def test_digits_are_16x16_in_range_with_a_disjoint_holdout():
    data = load_digits("all")
    assert data.images.shape == (1797, 1, 16, 16)
    assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
    assert sorted(data.labels.unique().tolist()) == list(range(10))
    train, test = load_digits("train"), load_digits("test")
    assert len(train.labels) + len(test.labels) == 1797 and len(test.labels) == 359
    train_rows = {tuple(r.flatten().tolist()) for r in train.images}
    assert sum(tuple(r.flatten().tolist()) in train_rows for r in test.images) < 5  # a few duplicates exist in the data


def test_diffusers_adapter_scales_time_at_the_boundary(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert model.time_scale == 1000.0 and model.null_label == NULL_LABEL and model.num_classes == 10
    assert model.cond_names == ("class_labels",) and model.null_condition()["class_labels"].tolist() == [NULL_LABEL]
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([0.25, 0.9]), torch.tensor([3, NULL_LABEL])
    cond = model.class_condition(labels)
    with torch.no_grad():
        expected = model.net(x, t * 1000.0, class_labels=labels).sample
        torch.testing.assert_close(model(x, t, cond), expected)
        other = load_model(tiny_model_dir, time_scale=999.0)
        torch.testing.assert_close(other(x, t, cond), model.net(x, t * 999.0, class_labels=labels).sample)


def test_step_model_looks_up_the_schedule_time_of_each_step(tiny_model_dir):
    """The engine-facing model takes the step index; the time it stands for is the sampler's."""
    model = load_model(tiny_model_dir)
    schedule = Schedule(4)
    step_model = StepModel(model, schedule)
    x, step, labels = torch.randn(3, 1, 16, 16), torch.tensor([0, 3, 1]), torch.tensor([3, 7, NULL_LABEL])
    with torch.no_grad():
        expected = model(x, schedule.model_times[step], {"class_labels": labels})
        torch.testing.assert_close(step_model(x, step, labels), expected)  # positional, as a graph takes it
        torch.testing.assert_close(step_model.run(x, step, {"class_labels": labels}), expected)
        # a negative step would wrap around the tables: off the schedule it gives NaN for that sample
        off = step_model(x, torch.tensor([0, -1, 1]), labels)
    assert torch.isnan(off[1]).all() and torch.isfinite(off[[0, 2]]).all()


def test_missing_or_corrupt_checkpoint_is_a_one_line_error(tiny_model_dir, tmp_path):
    with pytest.raises(FlowpressError, match="no config.json"):
        load_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FlowpressError, match="cannot load UNet2DModel weights") as err:
        load_model(broken)
    assert str(broken) in str(err.value) and "\n" not in str(err.value)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(FlowpressError, match="not valid JSON"):
        load_model(broken)


def test_model_that_rejects_x_t_cond_is_refused(tiny_model_dir, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in tiny_model_dir.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config["in_channels"] = 3  # weights no longer fit the declared input
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlowpressError):
        load_model(odd)


def test_committed_classifier_recognises_held_out_digits():
    test = load_digits("test")
    assert classifier_accuracy(load_classifier(CLASSIFIER), test.images, test.labels) >= 0.97


@pytest.mark.slow
def test_committed_teacher_meets_its_bar():
    """20 Euler steps, guidance 2: >= 95% of samples recognised as the requested class."""
    from examples.digits.__main__ import teacher_accuracy
    from examples.digits.teacher import TeacherConfig

    config = TeacherConfig(eval_samples=200, eval_steps=20, eval_guidance=2.0)
    accuracy = teacher_accuracy(TEACHER, config, str(CLASSIFIER))
    assert accuracy >= 0.95


def test_quantizing_shares_the_weights_and_leaves_the_fp_model_as_it_was(tiny_model_dir):
    from flowpress.compress import Int8Config, quantize

    from .conftest import TINY_SCHEDULE, feeds_of, tiny_calibration

    model = load_model(tiny_model_dir).eval()
    calib = tiny_calibration(model)
    feeds = feeds_of(calib)
    fp = StepModel(model, TINY_SCHEDULE).eval()
    with torch.no_grad():
        before = fp(*feeds.values())
        qmodel = quantize(model, Int8Config(bias_correction=True), calib, TINY_SCHEDULE)
        qmodel.bias_calibration = calib
        after = fp(*feeds.values())
        fake_quant = qmodel.module(*feeds.values())
    weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}
    for copy in (qmodel.module, qmodel.fp_module):  # one set of weights for the three models
        layers = [(n, m) for n, m in copy.model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
        copied = [n for n, m in layers if id(m.weight) not in weights and ".conv_shortcut." not in n]  # split: new
        assert len(layers) > 20 and copied == []
    assert torch.equal(before, after)  # calibration and bias correction changed no shared tensor
    assert 0 < float((fake_quant - before).abs().max()) < float(before.abs().max())
