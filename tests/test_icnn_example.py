"""examples/icnn.py, run for a few epochs: the z-path weights the forward uses are softplus of their
sources (non-negative), the trained network is convex along random segments (and the check finds
the violations of the same network with its raw, signed z weights), it learns, and its output is
the network written by hand with F.linear on softplus of the sources in float64."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import fusedtie

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "icnn.py"
EPOCHS = 4


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("icnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(example):
    threads = torch.get_num_threads()
    try:
        result = example.main(["--epochs", str(EPOCHS), "--samples", "2000"])
    finally:
        torch.set_num_threads(threads)  # main() sets its own; the rest of the suite keeps ours
    return result


def _by_hand(model, x):
    """The ICNN in float64 from its parameters: F.linear with softplus(source) on the z path."""
    x = x.double()
    xs = [(layer.weight.detach().double(), layer.bias.detach().double()) for layer in model.x_layers]
    z = F.softplus(F.linear(x, *xs[0]))
    for i, layer in enumerate(model.z_layers):
        w_z = F.softplus(layer.source.weight.detach().double())
        pre = F.linear(z, w_z) + F.linear(x, *xs[i + 1])
        z = F.softplus(pre) if i + 1 < len(model.z_layers) else pre
    return z.squeeze(-1)


def _worst_convexity_violation(model, x, segments: int = 2000, seed: int = 0) -> float:
    """max over random segments [x0, x1] of the data and t in (0, 1) of
    f(t x0 + (1 - t) x1) - (t f(x0) + (1 - t) f(x1)), which is <= 0 for a convex f."""
    generator = torch.Generator().manual_seed(seed)
    x0 = x[torch.randint(len(x), (segments,), generator=generator)]
    x1 = x[torch.randint(len(x), (segments,), generator=generator)]
    t = torch.rand(segments, 8, 1, generator=generator)
    between = t * x0[:, None] + (1 - t) * x1[:, None]  # (segments, 8, features)
    with torch.no_grad():
        f0, f1 = model(x0)[:, None], model(x1)[:, None]
        f_between = model(between.reshape(-1, x.shape[1])).reshape(segments, 8)
    chord = t[..., 0] * f0 + (1 - t[..., 0]) * f1
    return (f_between - chord).max().item()


def test_z_path_weights_are_softplus_of_their_sources(trained):
    model = trained["models"]["fusedtie"]
    assert len(model.z_layers) == 3
    for layer in model.z_layers:
        assert isinstance(layer, fusedtie.FusedTiedLinear) and layer.bias is None
        weight = layer.weight  # what the forward computes with, derived from the source
        assert weight.min().item() >= 0.0
        torch.testing.assert_close(weight.double(), F.softplus(layer.source.weight.double()), rtol=1e-6, atol=1e-7)
    # the sources are counted once: the x layers' weights and biases and the raw z weights
    names = sorted(name for name, _ in model.named_parameters())
    assert names == sorted(
        [f"x_layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
        + [f"z_layers.{i}.source.weight" for i in range(3)]
    )


def test_output_is_the_network_by_hand(trained):
    model = trained["models"]["fusedtie"]
    x = trained["data"]["x_test"][:256]
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _by_hand(model, x), rtol=1e-5, atol=1e-5)


def test_trained_network_is_convex_along_random_segments(trained):
    model = trained["models"]["fusedtie"]
    x = trained["data"]["x_test"]
    # float32 rounding of outputs of order 1-10 is about 1e-6; a violation of a non-convex net is far larger
    assert _worst_convexity_violation(model, x) <= 1e-4


def test_the_convexity_check_fails_without_the_constraint(example, trained):
    # The same trained network with its raw z weights used as they are (initialised near
    # log(1/width), so mostly negative): not convex, and the check above sees it (by about 60 on
    # outputs of order 1). So the check can fail, and the softplus tie is what passes it.
    model = trained["models"]["fusedtie"]
    x = trained["data"]["x_test"]
    raw = example.twin_of(model, x.shape[1], 64, 3)
    for layer in raw.z_layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert (raw.z_layers[0].weight < 0).any()
    assert _worst_convexity_violation(raw, x) > 1e-2


def test_both_networks_learn_and_agree(trained):
    history = trained["history"]
    for name, losses in history.items():
        assert len(losses) == EPOCHS + 1
        assert losses[-1] < 0.3 * losses[0], f"{name}: held-out MSE {losses[0]:.4f} -> {losses[-1]:.4f}"
        assert losses[-1] < 0.75  # the target is standardised: its mean alone would give 1
    # the twin is the same network from the same values on the same batches
    torch.testing.assert_close(
        torch.tensor(history["fusedtie"]), torch.tensor(history["parametrize"]), rtol=1e-3, atol=1e-4
    )
    assert set(trained["per_epoch"]) == {"fusedtie", "parametrize"} and all(
        s > 0 for s in trained["per_epoch"].values()
    )
