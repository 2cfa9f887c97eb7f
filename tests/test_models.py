import json

import pytest
import torch

from models import NULL_LABEL, load_digits, load_model
from models.classifier import classifier_accuracy, load_classifier
from sampling import FlowpressError

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
    x, t, cond = torch.randn(2, 1, 16, 16), torch.tensor([0.25, 0.9]), torch.tensor([3, NULL_LABEL])
    with torch.no_grad():
        expected = model.net(x, t * 1000.0, class_labels=cond).sample
        torch.testing.assert_close(model(x, t, cond), expected)
        other = load_model(tiny_model_dir, time_scale=999.0)
        torch.testing.assert_close(other(x, t, cond), model.net(x, t * 999.0, class_labels=cond).sample)


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
    from flowpress.pipeline import teacher_accuracy

    accuracy = teacher_accuracy(load_model(TEACHER), load_classifier(CLASSIFIER), 200, 20, 2.0)
    assert accuracy >= 0.95
