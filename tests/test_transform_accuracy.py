"""Accuracy of the float32 CPU transform passes, in ulps of the float64 truth.

The CPU passes use their own vector code (a rational tanh, SLEEF for exp); the operator-level tests
allow 1e-4 relative error, which would hide an approximation that lost several digits. Here each
f in float32 is held to a bound in units in the last place, over a dense grid covering every branch.
"""

import numpy as np
import pytest
import torch
from reference import reference_f, transform_arg

import fusedtie

# Largest error in float32 ulps of the true value. tanh is a rational fit (see transforms.h); the
# rest are exact or SLEEF's 1-ulp functions, composed.
ULP_BOUND = {
    "identity": 0,
    "square": 0.5,
    "abs": 0,
    "neg": 0,
    "scale": 0.5,
    "exp": 1,
    "sigmoid": 3,
    "tanh": 6,
    "softplus": 2,
    "relu": 0,
}

GRID = torch.cat(
    [
        torch.linspace(-30, 30, 200_001),
        torch.logspace(-10, 1.5, 4000),
        -torch.logspace(-10, 1.5, 4000),
        torch.tensor([0.0, -0.0]),
    ]
)


def ulp_error(got: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    spacing = torch.from_numpy(np.spacing(truth.float().abs().numpy())).double()
    return (got.double() - truth).abs() / spacing


@pytest.mark.parametrize("name", sorted(ULP_BOUND))
def test_float32_forward_within_ulp_bound(name):
    assert set(ULP_BOUND) == set(fusedtie.available_transforms())
    got = fusedtie.apply_transform(GRID, transform_arg(name))
    truth = reference_f(name, GRID.double())
    finite = torch.isfinite(truth) & (truth.abs() < torch.finfo(torch.float32).max)
    worst = ulp_error(got, truth)[finite].max().item()
    assert worst <= ULP_BOUND[name], f"{name}: {worst:.2f} ulp"


@pytest.mark.parametrize("name", sorted(ULP_BOUND))
def test_float32_special_values_follow_torch(name):
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 88.0, -104.0])
    got = fusedtie.apply_transform(special, transform_arg(name))
    want = reference_f(name, special)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(got[3:5]), torch.signbit(want[3:5])), "sign of zero"


def test_tanh_derivative_is_one_minus_tanh_squared():
    x = GRID.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fusedtie.apply_transform(x, "tanh"), x, torch.ones_like(x))
    truth = 1 - torch.tanh(GRID.double()) ** 2
    assert (grad.double() - truth).abs().max().item() <= 1.5e-6
