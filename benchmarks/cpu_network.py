"""A tied layer among plain ones: the whole network's time against the same network untied.

The quick benchmark times one layer per call, interleaving its contenders call by call, so each
contender also inherits the caches the previous one left (oneDNN's re-packed weight buffer stays warm
from one plain convolution to the next; a path that does not use it leaves it cold for the next).
This script times what a user runs: a stack of ResNet-50-sized convolutions where the second layer
is tied to the first, under each CPU algorithm, against the same stack with an untied second layer.
Each round runs every network once, in a rotated order; the table gives each network's median over
the rounds divided by the untied network's.

    python benchmarks/cpu_network.py                          # square, library and auto, inference
    python benchmarks/cpu_network.py --mode train             # forward and every parameter's gradient
    python benchmarks/cpu_network.py --transform tanh --algorithms library,brgemm,auto --rounds 400
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fusedtie  # noqa: E402
from cpu_bench_common import add_common_arguments, interleaved_medians, machine_line  # noqa: E402

# name: (input shape, channels, kernel, padding) of a stack of four layers
STACKS = {
    "conv5_x 3x3 b1": ((1, 512, 7, 7), 512, 3, 1),
    "conv4_x 3x3 b1": ((1, 256, 14, 14), 256, 3, 1),
}


def stack(channels: int, kernel: int, padding: int, transform: str | None) -> nn.Sequential:
    """Four convolutions; with a transform, the second is tied to the first."""
    layers = [nn.Conv2d(channels, channels, kernel, padding=padding) for _ in range(4)]
    if transform is not None:
        layers[1] = fusedtie.FusedTiedConv2d(layers[0], transform)
    return nn.Sequential(*layers).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, rounds=300, algorithms="library,auto")
    parser.add_argument("--mode", choices=("inference", "train"), default="inference")
    args = parser.parse_args(argv)
    algorithms = args.algorithms.split(",")
    print(f"{machine_line(args)}, {args.mode}; median / the untied network's median\n")
    header = ["stack"] + [f"tied, {a}" for a in algorithms] + ["untied ms"]
    print("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1))
    for name, (x_shape, channels, kernel, padding) in STACKS.items():
        torch.manual_seed(0)
        x = torch.randn(x_shape)
        untied = stack(channels, kernel, padding, None)
        tied = stack(channels, kernel, padding, args.transform)

        def run(model, algorithm):
            params = list(model.parameters())

            def call():
                with fusedtie.use_cpu_conv_algorithm(algorithm):
                    if args.mode == "inference":
                        with torch.no_grad():
                            return model(x)
                    # The input is data: the first layer's backward computes no input gradient.
                    return torch.autograd.grad(model(x).sum(), params)

            return call

        calls = {"untied": run(untied, "library")} | {a: run(tied, a) for a in algorithms}
        median = interleaved_medians(calls, args.rounds)
        cells = [f"{median[a] / median['untied']:.2f}" for a in algorithms]
        print(f"| {name} | " + " | ".join(cells) + f" | {1e3 * median['untied']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
