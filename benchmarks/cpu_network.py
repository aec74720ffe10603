"""A tied layer among plain ones: the whole network's time against the same network untied.

The quick benchmark times one layer per call, interleaving its contenders call by call, so each
contender also inherits the caches the previous one left (oneDNN's re-packed weight buffer stays warm
from one plain convolution to the next; a path that does not use it leaves it cold for the next).
This script times what a user runs: a stack of four ResNet-50-sized convolutions where one layer is
tied to an earlier one of the same shape, under each CPU algorithm, against the same stack untied.
Each round runs every network once, in a rotated order; the table gives each network's median over
the rounds divided by the untied network's.

    python benchmarks/cpu_network.py                          # square, library and auto, inference
    python benchmarks/cpu_network.py --mode train             # forward and every parameter's gradient
    python benchmarks/cpu_network.py --transform tanh --algorithms library,brgemm,auto --rounds 400
    python benchmarks/cpu_network.py --per-layer               # also each layer's own median, in ms
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fusedtie  # noqa: E402
from cpu_bench_common import add_common_arguments, interleaved_medians, machine_line  # noqa: E402

# name: (input shape, four layers as (in, out, kernel, padding), (tied layer, its source))
STACKS = {
    "conv5_x 3x3 b1": ((1, 512, 7, 7), [(512, 512, 3, 1)] * 4, (1, 0)),
    "conv4_x 3x3 b1": ((1, 256, 14, 14), [(256, 256, 3, 1)] * 4, (1, 0)),
    # ResNet-50's conv5_x 1x1 pair twice over: reduce, expand, reduce (tied to the first), expand
    "conv5_x 1x1 b1": ((1, 2048, 7, 7), [(2048, 512, 1, 0), (512, 2048, 1, 0)] * 2, (2, 0)),
}


def stack(layers: list, tie: tuple[int, int], transform: str | None) -> nn.Sequential:
    """Four convolutions; with a transform, layer tie[0] is tied to layer tie[1]."""
    convs = [nn.Conv2d(cin, cout, kernel, padding=padding) for cin, cout, kernel, padding in layers]
    if transform is not None:
        target, source = tie
        convs[target] = fusedtie.FusedTiedConv2d(convs[source], transform)
    return nn.Sequential(*convs).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, rounds=300, algorithms="library,auto")
    parser.add_argument("--mode", choices=("inference", "train"), default="inference")
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="inference only: also time each layer apart, to show what a tied layer costs its neighbours",
    )
    args = parser.parse_args(argv)
    if args.per_layer and args.mode != "inference":
        parser.error("--per-layer times forwards only (use --mode inference)")
    algorithms = args.algorithms.split(",")
    print(f"{machine_line(args)}, {args.mode}; median / the untied network's median\n")
    header = ["stack"] + [f"tied, {a}" for a in algorithms] + ["untied ms"]
    print("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1))
    per_layer: dict[str, dict[str, list[float]]] = {}
    for name, (x_shape, layers, tie) in STACKS.items():
        torch.manual_seed(0)
        x = torch.randn(x_shape)
        untied = stack(layers, tie, None)
        tied = stack(layers, tie, args.transform)

        layer_times: dict[str, list[list[float]]] = {}

        def run(model, algorithm, name):
            params = list(model.parameters())
            layer_times[name] = [[] for _ in model]

            def call():
                with fusedtie.use_cpu_conv_algorithm(algorithm):
                    if args.mode == "inference":
                        with torch.no_grad():
                            if not args.per_layer:
                                return model(x)
                            h = x
                            for layer, samples in zip(model, layer_times[name]):
                                start = time.perf_counter()
                                h = layer(h)
                                samples.append(time.perf_counter() - start)
                            return h
                    # The input is data: the first layer's backward computes no input gradient.
                    return torch.autograd.grad(model(x).sum(), params)

            return call

        calls = {"untied": run(untied, "library", "untied")} | {a: run(tied, a, a) for a in algorithms}
        median = interleaved_medians(calls, args.rounds)
        cells = [f"{median[a] / median['untied']:.2f}" for a in algorithms]
        print(f"| {name} | " + " | ".join(cells) + f" | {1e3 * median['untied']:.3f} |")
        if args.per_layer:
            per_layer[name] = {
                network: [1e3 * statistics.median(samples) for samples in layers]
                for network, layers in layer_times.items()
            }
    if args.per_layer:
        print("\nEach layer's median ms (* the tied one; the layer after it pays for what it left in cache):\n")
        print("| stack | network | layer 0 | layer 1 | layer 2 | layer 3 |\n|---|---|---:|---:|---:|---:|")
        for name, networks in per_layer.items():
            target = STACKS[name][2][0]
            for network, times in networks.items():
                label = network if network == "untied" else f"tied, {network}"
                cells = [f"{t:.3f}" + ("*" if i == target and network != "untied" else "") for i, t in enumerate(times)]
                print(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
