"""An input-convex neural network (Amos, Xu and Kolter, 2017) fitting a convex regression target
that scikit-learn generates, its z-path weights kept non-negative by ``fusedtie.FusedTiedLinear``.

The network is a fully input-convex one (FICNN):

    z_1     = softplus(W^x_0 x + b_0)
    z_{i+1} = softplus(W^z_i z_i + W^x_i x + b_i)      i = 1 .. depth - 1
    f(x)    = W^z_depth z_depth + W^x_depth x + b_depth

f is convex in x when every W^z_i is non-negative (a non-negative sum of convex functions, plus an
affine one, through a convex non-decreasing activation is convex). Each W^z_i is
``FusedTiedLinear(source_i, "softplus", bias=None)``: it computes with softplus(source_i.weight) >= 0,
the source an ``nn.Linear`` without bias that holds the unconstrained parameters and that only the
tied layer reads (it is the tied layer's registered submodule, so ``parameters()`` counts it once).
A twin, the same network written with ``torch.nn.utils.parametrize`` (``nn.Softplus`` registered on
the weight of plain ``nn.Linear`` z-layers), starts from the same values and trains on the same
batches; the time each takes per epoch is printed.

The data: ``make_regression`` draws Gaussian inputs and a linear target, ``make_spd_matrix`` a
random positive definite P, and the target adds the convex quadratic 0.5 x^T P x: a convex function
of 4 inputs with noise, which an ICNN can fit and a non-convex model has no advantage on.

    python examples/icnn.py                 # 15 epochs, a few seconds on one CPU core
    python examples/icnn.py --epochs 40 --width 128

Prints per epoch the held-out mean squared error (of the standardised target) of both networks and
the time each took to train, then the mean time per epoch of each and their ratio. At the default
width of 64 the twin is the faster (measured on one core of an AMD EPYC: 0.074 s an epoch for
fusedtie, 0.062 s for parametrize): a 64 x 64 weight costs less to transform than fusedtie's fixed cost per call. At
``--width 1024`` fusedtie was the faster (2.05 s and 2.15 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fusedtie


def convex_regression_data(samples: int = 4000, features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (samples, features) and a convex target (samples,), both float32, the target standardised.

    ``make_regression`` gives Gaussian x and a noisy linear target; ``make_spd_matrix`` a positive
    definite P; the target is their sum with 0.5 x^T P x, convex in x.
    """
    from sklearn.datasets import make_regression, make_spd_matrix

    x, linear = make_regression(
        n_samples=samples, n_features=features, n_informative=features, noise=1.0, random_state=seed
    )
    p = make_spd_matrix(features, random_state=seed)
    x = torch.from_numpy(x)
    linear = torch.from_numpy(linear) / 100.0  # make_regression's coefficients are up to 100
    y = linear + 0.5 * torch.einsum("ni,ij,nj->n", x, torch.from_numpy(p), x)
    y = (y - y.mean()) / y.std()
    return x.float(), y.float()


def _init_z_source(weight: torch.Tensor, width: int) -> None:
    """Raw z-path weights whose softplus averages about 1/width: each z layer then sums its inputs
    to about their mean instead of width * log(2) times it (softplus(0) = log 2), so the depth does
    not blow the activations up at the start."""
    with torch.no_grad():
        weight.normal_(mean=-torch.log(torch.tensor(float(width))).item(), std=0.5)


class ICNN(nn.Module):
    """A fully input-convex network of ``depth`` hidden layers of ``width`` units and a scalar output.

    ``z_layers[i]`` is W^z_{i+1}: with ``twin=False`` a ``FusedTiedLinear(nn.Linear(..., bias=False),
    "softplus", bias=None)`` (the tie), with ``twin=True`` a plain ``nn.Linear`` whose weight is
    parametrized by ``nn.Softplus``. ``x_layers[i]`` is W^x_i and holds the biases b_i.
    """

    def __init__(self, features: int, width: int = 64, depth: int = 3, twin: bool = False) -> None:
        super().__init__()
        widths = [width] * depth + [1]
        self.x_layers = nn.ModuleList(nn.Linear(features, w) for w in widths)
        z_layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            raw = nn.Linear(w_in, w_out, bias=False)
            _init_z_source(raw.weight, w_in)
            if twin:
                parametrize.register_parametrization(raw, "weight", nn.Softplus())
                z_layers.append(raw)
            else:
                z_layers.append(fusedtie.FusedTiedLinear(raw, "softplus", bias=None))
        self.z_layers = nn.ModuleList(z_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.softplus(self.x_layers[0](x))
        for i, z_layer in enumerate(self.z_layers):
            pre = z_layer(z) + self.x_layers[i + 1](x)
            z = F.softplus(pre) if i + 1 < len(self.z_layers) else pre
        return z.squeeze(-1)

    def raw_z_weights(self) -> list[torch.Tensor]:
        """The unconstrained parameters of the z path (softplus of them is W^z)."""
        return [
            layer.parametrizations.weight.original if parametrize.is_parametrized(layer) else layer.source.weight
            for layer in self.z_layers
        ]


def twin_of(model: ICNN, features: int, width: int, depth: int) -> ICNN:
    """The parametrize twin, holding the same values as ``model``."""
    twin = ICNN(features, width, depth, twin=True)
    with torch.no_grad():
        for mine, theirs in zip(twin.x_layers, model.x_layers):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        for mine, theirs in zip(twin.raw_z_weights(), model.raw_z_weights()):
            mine.copy_(theirs)
    return twin


@torch.no_grad()
def held_out_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return F.mse_loss(model(x), y).item()


def train(
    epochs: int,
    seed: int,
    width: int = 64,
    depth: int = 3,
    batch_size: int = 64,
    lr: float = 1e-2,
    samples: int = 4000,
    log=print,
) -> dict:
    """Trains the tied ICNN and its parametrize twin on the same batches; returns both, the loss
    history and each one's training time per epoch."""
    x, y = convex_regression_data(samples, seed=seed)
    features = x.shape[1]
    held_out = len(x) // 4
    x_test, y_test, x_train, y_train = x[:held_out], y[:held_out], x[held_out:], y[held_out:]

    torch.manual_seed(seed)
    models = {"fusedtie": ICNN(features, width, depth)}
    models["parametrize"] = twin_of(models["fusedtie"], features, width, depth)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    history = {name: [held_out_loss(m, x_test, y_test)] for name, m in models.items()}
    seconds = {name: [] for name in models}
    count = sum(p.numel() for p in models["fusedtie"].parameters())
    log(
        f"{len(x_train)} training and {held_out} held-out points of a convex function of {features} inputs; "
        f"an ICNN of depth {depth}, width {width}: {count:,} parameters"
    )
    log(f"epoch  0: held-out MSE  fusedtie {history['fusedtie'][0]:.4f}   parametrize {history['parametrize'][0]:.4f}")
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        permutation = torch.randperm(len(x_train), generator=generator)
        spent = dict.fromkeys(models, 0.0)
        for first in range(0, len(x_train), batch_size):
            index = permutation[first : first + batch_size]
            xb, yb = x_train[index], y_train[index]
            for name, model in models.items():  # interleaved, so both see the same machine
                start = time.perf_counter()
                optimizers[name].zero_grad(set_to_none=True)
                F.mse_loss(model(xb), yb).backward()
                optimizers[name].step()
                spent[name] += time.perf_counter() - start
        for name, model in models.items():
            history[name].append(held_out_loss(model, x_test, y_test))
            seconds[name].append(spent[name])
        log(
            f"epoch {epoch:2d}: held-out MSE  fusedtie {history['fusedtie'][-1]:.4f}   "
            f"parametrize {history['parametrize'][-1]:.4f}   "
            f"(train {spent['fusedtie']:.2f} s fusedtie, {spent['parametrize']:.2f} s parametrize)"
        )
    per_epoch = {name: sum(s) / len(s) for name, s in seconds.items()} if epochs else {}
    if epochs:
        log(
            f"time per epoch: fusedtie {per_epoch['fusedtie']:.3f} s, parametrize {per_epoch['parametrize']:.3f} s "
            f"(parametrize / fusedtie = {per_epoch['parametrize'] / per_epoch['fusedtie']:.2f})"
        )
    return {
        "models": models,
        "history": history,
        "seconds": seconds,
        "per_epoch": per_epoch,
        "data": {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test},
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (z-path ties: depth)")
    parser.add_argument("--samples", type=int, default=4000, help="points generated (a quarter held out)")
    # One thread: every op here is small, and a second thread costs more than it saves.
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = train(args.epochs, args.seed, args.width, args.depth, samples=args.samples)
    print(f"{time.perf_counter() - start:.1f} s in all")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
