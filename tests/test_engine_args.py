"""engine(x, step, cond) takes what users pass (or refuses it in one line naming what it takes); the
onnxruntime engine's I/O binding; the interleaved timing of several engines."""

from types import SimpleNamespace

import pytest
import torch

from flowpress.engines import OrtEngine
from flowpress.engines.base import engine_args
from flowpress.errors import FlowpressError
from flowpress.sampling import Schedule
from flowpress.validation import interleaved_step_times

from .conftest import TINY_SCHEDULE

ENGINE = SimpleNamespace(name="ort-int8", schedule=SimpleNamespace(n_evaluations=20, n_steps=20))
X = torch.zeros(3, 1, 8, 8)
LABELS = torch.tensor([0, 1, 2])


def test_an_int_step_and_the_one_inputs_tensor_are_taken():
    x, step, cond = engine_args(ENGINE, X, 4, LABELS, ["class_labels"])
    assert step.tolist() == [4, 4, 4] and step.dtype == torch.int64 and cond["class_labels"] is LABELS
    _, step, cond = engine_args(ENGINE, X, torch.tensor(7), None, [])
    assert step.tolist() == [7, 7, 7] and cond == {}


@pytest.mark.parametrize(
    "step, cond, names, said",
    [
        (0, LABELS, ["encoder_hidden_states", "encoder_attention_mask"], "got a Tensor"),
        (0, {"labels": LABELS}, ["class_labels"], "got keys ['labels']"),
        (0.5, {"class_labels": LABELS}, ["class_labels"], "not a timestep"),
        (torch.tensor([981.0, 981.0, 981.0]), {"class_labels": LABELS}, ["class_labels"], "not a timestep"),
        (torch.tensor([1, 2]), {"class_labels": LABELS}, ["class_labels"], "a (3,) integer tensor"),
    ],
)
def test_what_it_cannot_take_is_refused_naming_what_it_takes(step, cond, names, said):
    with pytest.raises(FlowpressError) as err:
        engine_args(ENGINE, X, step, cond, names)
    line = str(err.value)
    assert "\n" not in line and said in line and "it takes x (B, C, H, W), step (int or (B,) int64), cond {" in line
    assert all(repr(n) in line for n in names)


def test_x_must_be_a_batch_of_images():
    with pytest.raises(FlowpressError, match=r"x must be a \(B, C, H, W\) tensor"):
        engine_args(ENGINE, torch.zeros(1, 8, 8), 0, None, [])


def test_io_binding_matches_run_and_never_aliases_its_buffer(tiny_tensorrt_export):
    _, fp32, feeds = tiny_tensorrt_export
    bound = OrtEngine(fp32, TINY_SCHEDULE, io_binding=True)
    plain = OrtEngine(fp32, TINY_SCHEDULE, io_binding=False)
    x, step, cond = feeds["x"][:4], feeds["step"][:4], {"class_labels": feeds["class_labels"][:4]}
    first = bound(x, step, cond)
    assert torch.equal(first, plain(x, step, cond))
    kept = first.clone()
    bound(x.flip(0), step, cond)  # same shape: the output buffer is reused
    assert torch.equal(first, kept)


def test_interleaved_timing_rotates_the_engines_and_times_runs_each():
    calls = []

    class Probe:
        def __init__(self, name):
            self.name, self.schedule = name, Schedule(3)

        def __call__(self, x, step, cond):
            calls.append((self.name, int(step[0])))
            return x

    engines = {name: Probe(name) for name in "abc"}
    times = interleaved_step_times(engines, 2, (1, 4, 4), lambda b: {}, runs=7, warmup=2, block=3, settle=2)
    assert {name: len(t) for name, t in times.items()} == {"a": 7, "b": 7, "c": 7}
    assert all((t > 0).all() for t in times.values())
    timed = calls[6:]  # after 2 warm-up forwards each
    # rounds of 2 untimed + 3 timed forwards (the last round: 2 + 1), starting engine rotating
    firsts = [timed[0][0], timed[15][0], timed[30][0]]
    assert firsts == ["a", "b", "c"] and len(timed) == 3 * (5 + 5 + 3)
    assert [s for n, s in calls if n == "a"][:5] == [0, 1, 2, 0, 1]  # steps cycle through the schedule
