"""Forward and backward of fusedtie's CPU algorithms timed apart, against PyTorch's own passes.

The quick benchmark times whole steps; this script separates the passes, which is how `auto`'s
per-pass rule (docs/cpu-algorithms.md) was chosen. Each round runs every contender once, in a
rotated order; the table gives each median over the rounds divided by PyTorch's median on f(W)
precomputed (F.conv2d for the forward, aten.convolution_backward for the backward with every
gradient). Ratios below 1 are faster than PyTorch's own convolution of f(W).

    python benchmarks/cpu_passes.py                      # the ResNet-50 shapes below, square
    python benchmarks/cpu_passes.py --transform tanh --rounds 300 --algorithms library,brgemm,gemm
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedtie  # noqa: E402
from cpu_bench_common import add_common_arguments, interleaved_medians, machine_line  # noqa: E402

# name: (input shape, weight shape, padding)
SHAPES = {
    "conv5_x 3x3 b1": ((1, 512, 7, 7), (512, 512, 3, 3), 1),
    "conv4_x 3x3 b1": ((1, 256, 14, 14), (256, 256, 3, 3), 1),
    "conv3_x 3x3 b1": ((1, 128, 28, 28), (128, 128, 3, 3), 1),
    "conv5_x 1x1 b1": ((1, 2048, 7, 7), (512, 2048, 1, 1), 0),
    "conv4_x 1x1 b1": ((1, 1024, 14, 14), (256, 1024, 1, 1), 0),
    "conv5_x 1x1 b8": ((8, 2048, 7, 7), (512, 2048, 1, 1), 0),
}


def contenders(x, w, b, grad, transform, padding, algorithms):
    derived = fusedtie.apply_transform(w, transform)
    pads = [padding] * 4
    calls = {
        "torch forward": lambda: F.conv2d(x, derived, b, padding=padding),
        "torch backward": lambda: torch.ops.aten.convolution_backward(
            grad, x, derived, [w.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, [True, True, True]
        ),
    }
    for name in algorithms:

        def forward(name=name):
            with fusedtie.use_cpu_conv_algorithm(name):
                return torch.ops.fusedtie.tied_conv2d(x, w, b, transform, 1.0, "identity", 1.0, [1, 1], pads, [1, 1], 1)

        def backward(name=name):
            with fusedtie.use_cpu_conv_algorithm(name):
                return torch.ops.fusedtie._tied_conv2d_backward(
                    grad, x, w, b, transform, 1.0, "identity", 1.0, [1, 1], pads, [1, 1], 1, [True, True, True]
                )

        calls[f"{name} forward"], calls[f"{name} backward"] = forward, backward
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, rounds=150, algorithms="library,brgemm")
    args = parser.parse_args(argv)
    algorithms = args.algorithms.split(",")
    print(f"{machine_line(args)}; median / torch's median on f(W)\n")
    header = (
        ["shape"] + [f"{a} {p}" for p in ("forward", "backward") for a in algorithms] + ["torch fwd ms", "torch bwd ms"]
    )
    print("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1))
    for name, (x_shape, w_shape, padding) in SHAPES.items():
        torch.manual_seed(0)
        x, w, b = torch.randn(x_shape), torch.randn(w_shape) * 0.05, torch.randn(w_shape[0])
        grad = torch.randn(
            x_shape[0], w_shape[0], x_shape[2] + 2 * padding - w_shape[2] + 1, x_shape[3] + 2 * padding - w_shape[3] + 1
        )
        calls = contenders(x, w, b, grad, args.transform, padding, algorithms)
        median = interleaved_medians(calls, args.rounds)
        cells = [
            f"{median[f'{a} {p}'] / median[f'torch {p}']:.2f}" for p in ("forward", "backward") for a in algorithms
        ]
        cells += [f"{1e3 * median['torch forward']:.3f}", f"{1e3 * median['torch backward']:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
