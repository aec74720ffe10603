"""A convolutional autoencoder whose decoder is tied to its encoder, on scikit-learn's 8x8 digits.

Each decoder layer is a ``fusedtie.FusedTiedConvTranspose2d`` of an encoder ``nn.Conv2d``: it
computes ``conv_transpose2d(h, f(W_enc))`` with the encoder's own weight, so the decoder adds only
its biases to the parameter count. An untied twin (the same network with ``nn.ConvTranspose2d``
decoder layers of their own) trains beside it on the same batches, for comparison.

    python examples/tied_autoencoder.py                 # 20 epochs, about half a minute on one CPU core
    python examples/tied_autoencoder.py --epochs 1 --png /tmp/digits.png

Prints the reconstruction loss (mean squared error on held-out digits) per epoch for both models,
both parameter counts, and writes a PNG: originals above the tied and untied reconstructions.
The data ship with scikit-learn (1797 images, no download); the PNG needs matplotlib.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fusedtie


def load_digits_tensor() -> torch.Tensor:
    """The 1797 digits as a float32 tensor (N, 1, 8, 8) scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8), integers 0..16
    return torch.from_numpy(images).float().div_(16.0).unsqueeze(1)


class Encoder(nn.Module):
    """8x8 digits -> 8x8x16 -> 4x4x32 -> a 2x2x8 code (32 numbers for 64 pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class AutoEncoder(nn.Module):
    """The encoder, and a decoder mirroring it: tied (FusedTiedConvTranspose2d of each encoder
    conv, f = ``transform``) or untied (nn.ConvTranspose2d layers with their own weights)."""

    def __init__(self, tied: bool, transform: str = "identity") -> None:
        super().__init__()
        self.encoder = Encoder()
        e = self.encoder
        if tied:
            # Each layer takes its geometry from its source; output_padding=1 undoes the rounding
            # of the stride-2 convs (4x4 -> 2x2 -> 4x4 -> 8x8).
            self.decoder = nn.ModuleList(
                [
                    fusedtie.FusedTiedConvTranspose2d(e.conv3, transform, output_padding=1),
                    fusedtie.FusedTiedConvTranspose2d(e.conv2, transform, output_padding=1),
                    fusedtie.FusedTiedConvTranspose2d(e.conv1, transform),
                ]
            )
        else:
            self.decoder = nn.ModuleList(
                [
                    nn.ConvTranspose2d(8, 32, 3, stride=2, padding=1, output_padding=1),
                    nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1),
                    nn.ConvTranspose2d(16, 1, 3, padding=1),
                ]
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for i, layer in enumerate(self.decoder):
            h = F.relu(h) if i else h
            h = layer(h)
        return torch.sigmoid(h)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def reconstruction_loss(model: nn.Module, images: torch.Tensor) -> float:
    model.eval()
    loss = F.mse_loss(model(images), images).item()
    model.train()
    return loss


def train(epochs: int, seed: int, transform: str, batch_size: int = 32, lr: float = 3e-3, log=print) -> dict:
    """Trains the tied model and its untied twin on the same batches; returns their history."""
    images = load_digits_tensor()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    test, train_set = images[order[:297]], images[order[297:]]  # 1500 to train on, 297 held out

    models = {}
    for name, tied in (("tied", True), ("untied", False)):
        torch.manual_seed(seed)  # the same encoder initialisation for both
        models[name] = AutoEncoder(tied, transform)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    history = {name: [reconstruction_loss(m, test)] for name, m in models.items()}
    counts = {name: parameter_count(m) for name, m in models.items()}
    log(
        f"parameters: tied {counts['tied']:,}, untied {counts['untied']:,} "
        f"(the tied decoder adds only its biases to the encoder's {parameter_count(models['tied'].encoder):,})"
    )
    log(f"epoch  0: held-out MSE  tied {history['tied'][0]:.5f}   untied {history['untied'][0]:.5f}")
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        permutation = torch.randperm(len(train_set), generator=generator)
        for first in range(0, len(train_set), batch_size):
            batch = train_set[permutation[first : first + batch_size]]
            for name, model in models.items():
                optimizers[name].zero_grad(set_to_none=True)
                F.mse_loss(model(batch), batch).backward()
                optimizers[name].step()
        for name, model in models.items():
            history[name].append(reconstruction_loss(model, test))
        log(
            f"epoch {epoch:2d}: held-out MSE  tied {history['tied'][-1]:.5f}   "
            f"untied {history['untied'][-1]:.5f}   ({time.perf_counter() - start:.1f} s)"
        )
    return {"models": models, "history": history, "parameters": counts, "test": test}


def save_png(path: str, models: dict, test: torch.Tensor, count: int = 10) -> None:
    """Originals (top row) above the tied and untied reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    originals = test[:count]
    rows = [("original", originals)]
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            rows.append((name, model(originals)))
    figure, axes = plt.subplots(len(rows), count, figsize=(count * 0.9, len(rows) * 1.0))
    for r, (label, batch) in enumerate(rows):
        for c in range(count):
            axis = axes[r][c]
            axis.imshow(batch[c, 0].numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--transform", default="identity", help=f"f for the tie, one of {', '.join(fusedtie.available_transforms())}"
    )
    parser.add_argument("--png", default="tied_autoencoder.png", help="where to write the picture")
    # One thread: on 8x8 images every op is tiny, and waking a second thread costs more than it
    # saves (measured: 1.2 s an epoch on one thread, 7-13 s on two of a busy 2-core machine).
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = train(args.epochs, args.seed, args.transform)
    save_png(args.png, result["models"], result["test"])
    print(f"wrote {args.png}; {time.perf_counter() - start:.1f} s in all")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
