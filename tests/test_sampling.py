import math

import pytest
import torch

from flowpress.errors import FlowpressError
from flowpress.sampling import (
    Guided,
    Schedule,
    interpolate,
    noise_for_seeds,
    sample,
    target_velocity,
)


def exponential_field(x, step, cond):
    """dx/dt = x: from t = 1 to t = 0 the exact solution is x(0) = x(1) / e."""
    return x


@pytest.mark.parametrize("n", [1, 4, 20])
def test_euler_and_heun_match_their_closed_forms_on_a_linear_field(n):
    x1 = torch.ones(3, 1, 2, 2)
    h = 1.0 / n
    euler = sample(Schedule(n, "euler"), exponential_field, x1, {}).final
    heun = sample(Schedule(n, "heun"), exponential_field, x1, {}).final
    torch.testing.assert_close(euler, x1 * (1 - h) ** n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heun, x1 * (1 - h + h * h / 2) ** n, rtol=1e-5, atol=1e-6)
    exact = math.exp(-1)
    assert abs(float(heun[0, 0, 0, 0]) - exact) < abs(float(euler[0, 0, 0, 0]) - exact)


def test_heun_is_second_order():
    exact = math.exp(-1)
    errors = [
        abs(float(sample(Schedule(n, "heun"), exponential_field, torch.ones(1, 1, 1, 1), {}).final) - exact)
        for n in (10, 20)
    ]
    assert 3.5 < errors[0] / errors[1] < 4.5  # halving h quarters the error


def test_time_convention_straight_path_is_integrated_exactly():
    """x_t = (1 - t) x0 + t eps: with the true velocity, Euler lands on x0 for any step count.
    The model is handed the step index; the time it stands for is the schedule's model_times."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 4, 4, generator=gen), torch.randn(4, 1, 4, 4, generator=gen)
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)
    torch.testing.assert_close(target_velocity(x0, eps), eps - x0)
    schedule = Schedule(7)

    def true_velocity(x, step, cond):  # (x_t - x0) / t = eps - x0 along the path
        assert step.dtype == torch.int64 and step.shape == (4,)
        return (x - x0) / schedule.model_times[step].reshape(-1, 1, 1, 1)

    traj = sample(schedule, true_velocity, eps, {})
    torch.testing.assert_close(traj.final, x0, rtol=1e-5, atol=1e-5)
    times = schedule.state_times
    torch.testing.assert_close(traj.xs[3], interpolate(x0, eps, torch.full((4,), times[3])), rtol=1e-5, atol=1e-5)
    assert times[0] == 1.0 and times[-1] == 0.0 and len(times) == len(traj.xs) == 8


def test_classifier_free_guidance_combines_cond_and_uncond():
    def model(x, step, cond):
        labels = cond["class_labels"].reshape(-1, 1)
        return torch.where(labels == 9, torch.full_like(x, 1.0), torch.full_like(x, 3.0))

    call = Guided(model, 2.5, {"class_labels": torch.tensor([9])})
    step = torch.tensor([3, 3])
    v, seen = call(torch.zeros(2, 4), step, {"class_labels": torch.tensor([0, 1])})
    assert seen.model_x.shape[0] == 4 and seen.model_cond["class_labels"].tolist() == [0, 1, 9, 9]
    assert seen.model_step.tolist() == [3, 3, 3, 3] and seen.step == 3
    torch.testing.assert_close(v, torch.full((2, 4), 1.0 + 2.5 * (3.0 - 1.0)))


def test_the_sampler_hands_the_model_the_step_index():
    calls, steps = [], []

    def model(x, step, cond):
        steps.append(step.clone())
        return -x

    null = {"class_labels": torch.tensor([10])}
    sample(Schedule(5), model, torch.ones(2, 1, 2, 2), {"class_labels": torch.tensor([1, 2])}, 2.0, null, calls.append)
    assert [c.step for c in calls] == [0, 1, 2, 3, 4]
    # under guidance the model sees the doubled batch, every row at the same int64 step index
    assert [s.tolist() for s in steps] == [[k] * 4 for k in range(5)] and all(s.dtype == torch.int64 for s in steps)
    assert [round(t, 6) for t in Schedule(5).model_times.tolist()] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert calls[0].model_x.shape[0] == 4 and calls[0].model_cond["class_labels"].tolist() == [1, 2, 10, 10]
    heun = []
    sample(Schedule(2, "heun"), lambda x, s, c: -x, torch.ones(1, 1, 1, 1), {}, callback=heun.append)
    assert [c.step for c in heun] == [0, 1, 1, 2]
    assert Schedule(2, "heun").n_evaluations == 3 and Schedule(2, "heun").model_times.tolist() == [1.0, 0.5, 0.0]


def test_noise_depends_only_on_its_seed():
    both = noise_for_seeds([3, 5], (1, 4, 4))
    assert torch.equal(both[1], noise_for_seeds([5], (1, 4, 4))[0])
    assert not torch.equal(both[0], both[1])


def test_bad_schedule_is_an_error():
    with pytest.raises(FlowpressError, match="steps must be an integer >= 1, got 0"):
        Schedule(0)
    with pytest.raises(FlowpressError, match="method"):
        Schedule(4, "rk4")  # type: ignore[arg-type]
    with pytest.raises(FlowpressError, match="null"):
        Guided(lambda x, s, c: x, 2.0, None)(
            torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), {"class_labels": torch.tensor([1])}
        )
