import math

import pytest
import torch

from sampling import FlowpressError, Schedule, guided, interpolate, noise_for_seeds, sample, target_velocity


def exponential_field(x, t, cond):
    """dx/dt = x: from t = 1 to t = 0 the exact solution is x(0) = x(1) / e."""
    return x


@pytest.mark.parametrize("n", [1, 4, 20])
def test_euler_and_heun_match_their_closed_forms_on_a_linear_field(n):
    x1 = torch.ones(3, 1, 2, 2)
    h = 1.0 / n
    euler = sample(exponential_field, x1, None, Schedule(n, "euler")).final
    heun = sample(exponential_field, x1, None, Schedule(n, "heun")).final
    torch.testing.assert_close(euler, x1 * (1 - h) ** n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heun, x1 * (1 - h + h * h / 2) ** n, rtol=1e-5, atol=1e-6)
    exact = math.exp(-1)
    assert abs(float(heun[0, 0, 0, 0]) - exact) < abs(float(euler[0, 0, 0, 0]) - exact)


def test_heun_is_second_order():
    exact = math.exp(-1)
    errors = [
        abs(float(sample(exponential_field, torch.ones(1, 1, 1, 1), None, Schedule(n, "heun")).final) - exact)
        for n in (10, 20)
    ]
    assert 3.5 < errors[0] / errors[1] < 4.5  # halving h quarters the error


def test_time_convention_straight_path_is_integrated_exactly():
    """x_t = (1 - t) x0 + t eps: with the true velocity, Euler lands on x0 for any step count."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 4, 4, generator=gen), torch.randn(4, 1, 4, 4, generator=gen)
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)
    torch.testing.assert_close(target_velocity(x0, eps), eps - x0)

    def true_velocity(x, t, cond):  # (x_t - x0) / t = eps - x0 along the path
        return (x - x0) / t.reshape(-1, 1, 1, 1)

    traj = sample(true_velocity, eps, None, Schedule(7))
    torch.testing.assert_close(traj.final, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        traj.xs[3], interpolate(x0, eps, torch.full((4,), float(traj.times[3]))), rtol=1e-5, atol=1e-5
    )
    assert traj.times[0] == 1.0 and traj.times[-1] == 0.0


def test_classifier_free_guidance_combines_cond_and_uncond():
    def model(x, t, cond):
        return torch.where(cond.reshape(-1, 1) == 9, torch.full_like(x, 1.0), torch.full_like(x, 3.0))

    call = guided(model, 2.5, null_cond=9)
    v, model_x, model_t, model_cond, model_v = call(torch.zeros(2, 4), torch.ones(2), torch.tensor([0, 1]))
    assert model_x.shape[0] == 4 and model_cond.tolist() == [0, 1, 9, 9]
    torch.testing.assert_close(v, torch.full((2, 4), 1.0 + 2.5 * (3.0 - 1.0)))


def test_callback_sees_explicit_steps_and_the_guided_batch():
    calls = []
    sample(lambda x, t, c: -x, torch.ones(2, 1, 2, 2), torch.tensor([1, 2]), Schedule(5), 2.0, 10, calls.append)
    assert [c.step for c in calls] == [0, 1, 2, 3, 4]
    assert [round(c.t, 6) for c in calls] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert calls[0].model_x.shape[0] == 4 and calls[0].model_cond.tolist() == [1, 2, 10, 10]
    heun = []
    sample(lambda x, t, c: -x, torch.ones(1, 1, 1, 1), None, Schedule(2, "heun"), callback=heun.append)
    assert [c.step for c in heun] == [0, 1, 1, 2]


def test_noise_depends_only_on_its_seed():
    both = noise_for_seeds([3, 5], (1, 4, 4))
    assert torch.equal(both[1], noise_for_seeds([5], (1, 4, 4))[0])
    assert not torch.equal(both[0], both[1])


def test_bad_schedule_is_an_error():
    with pytest.raises(FlowpressError, match="steps must be an integer >= 1, got 0"):
        Schedule(0)
    with pytest.raises(FlowpressError, match="method"):
        Schedule(4, "rk4")  # type: ignore[arg-type]
    with pytest.raises((ValueError, FlowpressError), match="null"):
        guided(lambda x, t, c: x, 2.0, None)(torch.zeros(1, 2), torch.ones(1), torch.tensor([1]))
