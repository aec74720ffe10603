"""The crash fuzzer of issue 18: a seeded generator of one-line calls into every public entry point
of fusedtie, and a runner that executes them in a child worker process, so that a signal or a hang
is reported with the line that reproduces it.

    python tests/fuzzing.py --seed 1 --seconds 80    # a bounded run, as tests/test_fuzz.py does
    python tests/fuzzing.py --long --seed 2           # 20 minutes over seeds 2..5 (FUSEDTIE_FUZZ_LONG=1)
    python tests/fuzzing.py --seed 3 --show 20        # print cases 0..19 of seed 3, run nothing

A case is one line of Python run after PRELUDE (with torch's RNG seeded afresh); case i of seed s
is the same line on every run. A Python exception is the clear error the library owes bad input
and only counted; a signal is a crash, a case that does not finish in time a hang, and a
SystemError or an "INTERNAL ASSERT FAILED" an internal finding. The exit status is 1 when any case
crashed or hung.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import faulthandler
import json
import os
import random
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

import fusedtie

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELUDE = "import torch, fusedtie; torch.manual_seed(0)"
CASE_TIMEOUT_S = 20.0  # the slowest legitimate case takes a few seconds on 2 shared cores
STARTUP_TIMEOUT_S = 180.0  # importing torch and fusedtie while other jobs hold both cores
MEMORY_ABOVE_IMPORT_GB = 3.0  # address space a case may use on top of the worker's own
LONG_SECONDS, LONG_SEEDS = 1200.0, 4
PR_SET_PDEATHSIG = 1  # prctl(2)

# --- the generator ----------------------------------------------------------------------------------

# Each extreme integer and how a case writes it.
EXTREME_INTS = {
    0: "0", 1: "1", -1: "-1", 2: "2", 3: "3", 7: "7", 2**15: "2**15", 2**31 - 1: "2**31 - 1", 2**31: "2**31",
    2**31 + 1: "2**31 + 1", 2**32: "2**32", 2**62: "2**62", -(2**31): "-2**31", 2**63 - 1: "2**63 - 1",
}  # fmt: skip
# Alphas for transforms with a constant (scale); the raw operators take any float.
EXTREME_ALPHAS = (
    "float('inf')", "float('-inf')", "float('nan')", "-0.0", "0.0", "1e308", "-1e308", "5e-324", "0.5", "-2.0",
)  # fmt: skip
# (dtype, weight): float32 mostly; the types no operator takes, rarely
DTYPES = {
    "float32": 60, "float64": 10, "float16": 8, "bfloat16": 8, "int64": 3, "int32": 3, "uint8": 2, "bool": 2,
    "complex64": 4,
}  # fmt: skip
DIFFERENTIABLE_DTYPES = ("float32", "float64", "float16", "bfloat16", "complex64")
# (layout, weight): contiguous mostly; sparse and mkldnn tensors no operator takes, so rarely
LAYOUTS = {
    "contiguous": 70, "channels_last": 8, "transposed": 6, "sliced": 6, "expanded": 6, "sparse_coo": 2, "mkldnn": 2,
}  # fmt: skip
SPECIAL_FILLS = ("float('nan')", "float('inf')", "float('-inf')", "0.0", "65504.0", "1e38")
CPU_ALGORITHMS = ("library", "gemm", "brgemm", "depthwise", "linear", "auto")
BAD_TRANSFORM_NAMES = ("bogus", "", "Square", "scale ")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular", "bogus")
TRANSFORMS = tuple(fusedtie.available_transforms())
DEVICES = ("cpu", "meta") + (("cuda",) if torch.cuda.is_available() else ())


def written(value: int) -> str:
    """An integer as a case writes it: 2**31 rather than 2147483648."""
    return EXTREME_INTS.get(value, str(value))


def case(seed: int, index: int) -> str:
    """Case ``index`` of ``seed``: one line of Python calling one entry point."""
    return _CaseDraw(seed, index).line()


class _CaseDraw:
    """The random choices of one case. Its own random.Random, seeded by (seed, index), makes case i
    independent of the cases before it; ordinary values dominate each choice, so that most calls
    get past the first check and reach the kernels with the odd value that remains."""

    def __init__(self, seed: int, index: int) -> None:
        self.rng = random.Random(f"fusedtie-fuzz:{seed}:{index}")
        self.dtype = self.rng.choices(list(DTYPES), weights=list(DTYPES.values()))[0]
        self.device = "cpu" if self.chance(0.85) else self.rng.choice(DEVICES[1:])
        # How often an integer argument is extreme, per case: most cases keep ordinary geometry
        # everywhere, so they reach the kernels; the others mix extremes in at various densities.
        self.extreme_rate = self.rng.choice((0.0, 0.0, 0.03, 0.1, 0.3))
        self.statements: list[str] = []

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def line(self) -> str:
        entry_points = (
            self.tied_conv2d,
            self.tied_conv_transpose2d,
            self.apply_transform,
            self.conv2d_backward_op,
            self.conv_transpose2d_backward_op,
            self.transform_ops,
            self.layer_forward_backward,  # twice: it stands for both layer classes
            self.layer_forward_backward,
            self.cached_layer,
            self.baked_model,
        )
        return self.rng.choice(entry_points)()

    def joined(self, context: Optional[str] = None) -> str:
        """The statements as one line, inside ``with context:`` if given (its body may hold several
        simple statements on the same line)."""
        body = "; ".join(self.statements)
        return f"with {context}: {body}" if context else body

    def algorithm_context(self) -> Optional[str]:
        """Most convolutions run under a forced CPU algorithm, so each one meets every input."""
        if self.chance(0.3):
            return None
        name = "bogus" if self.chance(0.02) else self.rng.choice(CPU_ALGORITHMS)
        return f"fusedtie.use_cpu_conv_algorithm({name!r})"

    # --- values ---

    def integer_value(self, ordinary: int) -> int:
        return self.rng.choice(list(EXTREME_INTS)) if self.chance(self.extreme_rate) else ordinary

    def integer(self, ordinary: int) -> str:
        return written(self.integer_value(ordinary))

    def pair(self, ordinary: tuple[int, int]) -> str:
        """An int or a sequence of one or two of them, as F.conv2d takes; now and then something
        that is not."""
        if self.chance(0.04):
            return self.rng.choice(("()", "(1, 1, 1)", "[]", "1.5", "'2'", "(1, None)", "True", "torch.tensor(2)"))
        first, second = self.integer(ordinary[0]), self.integer(ordinary[1])
        if first == second and self.chance(0.6):
            return first
        return self.rng.choice((f"({first}, {second})", f"[{first}, {second}]", f"({first},)"))

    def int_list(self, values: Iterable[int]) -> str:
        """An ``int[n]`` argument of a raw operator: exact length mostly, sometimes one off."""
        items = [written(v) for v in values]
        if self.chance(0.03):
            items = items[:-1] if self.chance(0.5) else items + [items[0]]
        return "[" + ", ".join(items) + "]"

    def transform(self) -> str:
        """A ``transform=`` value: a built-in name mostly, else a bad name or a scale constant."""
        roll = self.rng.random()
        if roll < 0.9:
            name = self.rng.choice(TRANSFORMS)
            return f"fusedtie.Transform('scale', alpha={self.alpha()})" if name == "scale" else repr(name)
        if roll < 0.94:
            return repr(self.rng.choice(BAD_TRANSFORM_NAMES))
        if roll < 0.98:
            return f"fusedtie.Transform('scale', alpha={self.rng.choice(EXTREME_ALPHAS + ('2**1024', 'None'))})"
        return self.rng.choice(("None", "3", "fusedtie.Transform('square', alpha=1.0)", "('square',)"))

    def alpha(self) -> str:
        return self.rng.choice(EXTREME_ALPHAS) if self.chance(0.4) else self.rng.choice(("0.5", "2.0", "-1.0"))

    def raw_transform(self) -> tuple[str, str]:
        """A raw operator's (transform, alpha): any string and any float, unchecked by Python."""
        name = self.rng.choice(TRANSFORMS) if self.chance(0.95) else self.rng.choice(BAD_TRANSFORM_NAMES)
        alpha = self.alpha() if name == "scale" or self.chance(0.2) else "1.0"
        return repr(name), alpha

    # --- tensors ---

    def tensor(self, shape: list, differentiable: bool = False) -> str:
        """A tensor of ``shape`` (ints or source strings) in the case's dtype and device (sometimes
        another: a mismatch), in some layout, with its shape mutated now and then: a 0 anywhere,
        one dimension fewer or more, an extreme size where no memory backs it."""
        dtype = self.dtype if self.chance(0.97) else self.rng.choice(list(DTYPES))
        device = self.device if self.chance(0.97) else self.rng.choice(DEVICES)
        shape = [str(size) for size in shape]
        if shape:
            roll = self.rng.random()
            if roll < 0.04:
                shape[self.rng.randrange(len(shape))] = "0"
            elif roll < 0.06:
                shape = shape[1:] if self.chance(0.5) else ["2"] + shape
            elif roll < 0.1 and device == "meta":
                shape[self.rng.randrange(len(shape))] = written(self.rng.choice(list(EXTREME_INTS)))
        layout = self.rng.choices(list(LAYOUTS), weights=list(LAYOUTS.values()))[0]
        source = self.layout(layout, shape, dtype, device)
        if differentiable and dtype in DIFFERENTIABLE_DTYPES and self.chance(0.8):
            source += ".requires_grad_()"
        return source

    def layout(self, layout: str, shape: list[str], dtype: str, device: str) -> str:
        rank = len(shape)
        if layout == "channels_last" and rank == 4:
            return self.created(shape, dtype, device) + ".to(memory_format=torch.channels_last)"
        if layout == "transposed" and rank >= 2:
            swapped = shape[:-2] + [shape[-1], shape[-2]]
            return self.created(swapped, dtype, device) + ".transpose(-1, -2)"
        if layout == "sliced" and rank >= 1:
            last = str(2 * int(shape[-1])) if shape[-1].isdigit() else f"2 * ({shape[-1]})"
            return self.created(shape[:-1] + [last], dtype, device) + "[..., ::2]"
        if layout == "expanded" and rank >= 1:
            # stride 0 along one dimension; its size may be extreme, since no memory backs it
            dim = self.rng.randrange(rank)
            base = shape[:dim] + ["1"] + shape[dim + 1 :]
            if self.chance(0.15):
                # sizes whose output no allocation can hold: a merely large one (2**15 images) is
                # a legitimately slow call, not a hang
                shape = shape[:dim] + [self.rng.choice(("2**31", "2**40"))] + shape[dim + 1 :]
            return self.created(base, dtype, device) + f".expand({', '.join(shape)})"
        if layout == "sparse_coo" and device != "meta":
            return self.created(shape, dtype, device) + ".to_sparse()"
        if layout == "mkldnn" and device == "cpu" and dtype in ("float32", "bfloat16"):
            return self.created(shape, dtype, device) + ".to_mkldnn()"
        return self.created(shape, dtype, device)

    def created(self, shape: list[str], dtype: str, device: str) -> str:
        size = "(" + ", ".join(shape) + ("," if len(shape) == 1 else "") + ")"
        options = ("" if dtype == "float32" else f", dtype=torch.{dtype}") + (
            "" if device == "cpu" else f", device={device!r}"
        )
        if dtype in ("int64", "int32"):
            return f"torch.randint(-3, 4, {size}{options})"
        if dtype in ("uint8", "bool"):
            return f"torch.randint(0, 2, {size}{options})"
        if self.chance(0.06):
            return f"torch.full({size}, {self.rng.choice(SPECIAL_FILLS)}{options})"
        return f"torch.randn({size}{options})"

    # --- geometry ---

    def conv_shapes(self) -> dict:
        """An ordinary convolution problem: groups, channels, kernel, input size and geometry that
        fit one another (depthwise in a fifth of the cases); the fuzzing replaces pieces of it."""
        if self.chance(0.2):
            groups = self.rng.choice((2, 3, 4, 8))
            in_per_group, out_per_group = 1, self.rng.choice((1, 2))
        else:
            groups = self.rng.choice((1, 1, 1, 2))
            in_per_group, out_per_group = self.rng.choice((1, 2, 3, 4)), self.rng.choice((1, 2, 3))
        kernel = (self.rng.choice((1, 2, 3, 3, 5)), self.rng.choice((1, 2, 3, 3, 5)))
        return {
            "groups": groups,
            "in_channels": in_per_group * groups,
            "out_channels": out_per_group * groups,
            "kernel": kernel,
            "batch": self.rng.choice((1, 1, 2, 3)),
            "size": (self.rng.randint(kernel[0], 12), self.rng.randint(kernel[1], 12)),
            "stride": (self.rng.choice((1, 1, 2, 3)), self.rng.choice((1, 1, 2, 3))),
            "padding": (self.rng.choice((0, 0, 1, 2)), self.rng.choice((0, 0, 1, 2))),
            "dilation": (self.rng.choice((1, 1, 1, 2)), self.rng.choice((1, 1, 1, 2))),
        }

    def output_padding(self, p: dict) -> tuple[int, int]:
        """An output padding that fits the stride and dilation (it must be below one of them)."""
        return tuple(self.rng.randrange(max(s, d)) for s, d in zip(p["stride"], p["dilation"]))

    def input_shape(self, p: dict, channels: int) -> list:
        shape = [p["batch"], channels, *p["size"]]
        return shape[1:] if self.chance(0.1) else shape  # unbatched, as F.conv2d takes it

    def bias(self, channels: int, differentiable: bool) -> str:
        return "None" if self.chance(0.3) else self.tensor([channels], differentiable)

    def padding(self, ordinary: tuple[int, int]) -> str:
        if self.chance(0.06):
            return repr(self.rng.choice(("same", "valid", "bogus", "")))
        return self.pair(ordinary)

    def with_backward(self, call: str, weight: str = "w") -> None:
        """The call as the case's last statement, differentiated most of the time: a backward, or a
        double backward (create_graph) through the source weight."""
        roll = self.rng.random()
        if roll < 0.45:
            self.statements.append(call)
        elif roll < 0.92:
            self.statements.append(f"{call}.sum().backward()")
        else:
            grad = f"torch.autograd.grad({call}.sum(), {weight}, create_graph=True)[0]"
            self.statements.append(f"{grad}.sum().backward()")

    # --- the entry points ---

    def tied_conv2d(self) -> str:
        p = self.conv_shapes()
        self.statements += [
            f"x = {self.tensor(self.input_shape(p, p['in_channels']), differentiable=True)}",
            f"w = {self.tensor([p['out_channels'], p['in_channels'] // p['groups'], *p['kernel']], True)}",
            f"b = {self.bias(p['out_channels'], differentiable=True)}",
        ]
        options = {
            "stride": self.pair(p["stride"]),
            "padding": self.padding(p["padding"]),
            "dilation": self.pair(p["dilation"]),
            "groups": self.integer(p["groups"]),
        }
        arguments = ["x", "w", "b", self.transform(), self.transform()]
        arguments += [f"{name}={value}" for name, value in options.items() if self.chance(0.7)]
        self.with_backward(f"fusedtie.tied_conv2d({', '.join(arguments)})")
        return self.joined(self.algorithm_context())

    def tied_conv_transpose2d(self) -> str:
        p = self.conv_shapes()
        output_padding = self.output_padding(p)
        self.statements += [
            f"x = {self.tensor(self.input_shape(p, p['out_channels']), differentiable=True)}",
            f"w = {self.tensor([p['out_channels'], p['in_channels'] // p['groups'], *p['kernel']], True)}",
            f"b = {self.bias(p['in_channels'], differentiable=True)}",
        ]
        options = {
            "stride": self.pair(p["stride"]),
            "padding": self.pair(p["padding"]),
            "output_padding": self.pair(output_padding),
            "groups": self.integer(p["groups"]),
            "dilation": self.pair(p["dilation"]),
        }
        arguments = ["x", "w", "b", self.transform()]
        arguments += [f"{name}={value}" for name, value in options.items() if self.chance(0.7)]
        self.with_backward(f"fusedtie.tied_conv_transpose2d({', '.join(arguments)})")
        return self.joined(self.algorithm_context())

    def apply_transform(self) -> str:
        shape = [self.rng.randint(0, 5) for _ in range(self.rng.choice((0, 1, 2, 4, 4, 5)))]
        self.statements.append(f"w = {self.tensor(shape, differentiable=True)}")
        self.with_backward(f"fusedtie.apply_transform(w, {self.transform()})")
        return self.joined()

    def output_mask(self) -> str:
        return "[" + ", ".join(self.rng.choice(("True", "False")) for _ in range(3)) + "]"

    def grad_output(self, batch: int, channels: int, spatial: Iterable[int]) -> str:
        """A grad_output of the output's shape (its sizes clamped to 1..64, so that where extreme
        geometry makes the output empty or huge it is a near miss), now and then one size off."""
        shape = [batch, channels, *(min(max(size, 1), 64) for size in spatial)]
        if self.chance(0.05):
            shape[self.rng.randrange(4)] += self.rng.choice((-1, 1))
        return self.tensor(shape)

    def conv2d_backward_op(self) -> str:
        p = self.conv_shapes()
        stride = [self.integer_value(v) for v in p["stride"]]
        padding = [self.integer_value(v) for v in (p["padding"][0],) * 2 + (p["padding"][1],) * 2]
        dilation = [self.integer_value(v) for v in p["dilation"]]
        spatial = [
            (n + before + after - d * (k - 1) - 1) // s + 1 if s > 0 else 1
            for n, before, after, d, k, s in zip(p["size"], padding[::2], padding[1::2], dilation, p["kernel"], stride)
        ]
        (transform, alpha), (bias_transform, bias_alpha) = self.raw_transform(), self.raw_transform()
        self.statements += [
            f"g = {self.grad_output(p['batch'], p['out_channels'], spatial)}",
            f"x = {self.tensor([p['batch'], p['in_channels'], *p['size']])}",
            f"w = {self.tensor([p['out_channels'], p['in_channels'] // p['groups'], *p['kernel']])}",
            f"b = {self.bias(p['out_channels'], differentiable=False)}",
        ]
        arguments = [
            "g", "x", "w", "b", transform, alpha, bias_transform, bias_alpha, self.int_list(stride),
            self.int_list(padding), self.int_list(dilation), self.integer(p["groups"]), self.output_mask(),
        ]  # fmt: skip
        self.statements.append(f"torch.ops.fusedtie._tied_conv2d_backward({', '.join(arguments)})")
        return self.joined(self.algorithm_context())

    def conv_transpose2d_backward_op(self) -> str:
        p = self.conv_shapes()
        stride = [self.integer_value(v) for v in p["stride"]]
        padding = [self.integer_value(v) for v in p["padding"]]
        dilation = [self.integer_value(v) for v in p["dilation"]]
        output_padding = [self.integer_value(v) for v in self.output_padding(p)]
        spatial = [
            (n - 1) * s - 2 * pad + d * (k - 1) + extra + 1
            for n, s, pad, d, k, extra in zip(p["size"], stride, padding, dilation, p["kernel"], output_padding)
        ]
        transform, alpha = self.raw_transform()
        self.statements += [
            # the transposed convolution maps the weight's C_out (its dim 0) back to its C_in
            f"g = {self.grad_output(p['batch'], p['in_channels'], spatial)}",
            f"x = {self.tensor([p['batch'], p['out_channels'], *p['size']])}",
            f"w = {self.tensor([p['out_channels'], p['in_channels'] // p['groups'], *p['kernel']])}",
            f"b = {self.bias(p['in_channels'], differentiable=False)}",
        ]
        arguments = [
            "g", "x", "w", "b", transform, alpha, self.int_list(stride), self.int_list(padding),
            self.int_list(output_padding), self.int_list(dilation), self.integer(p["groups"]), self.output_mask(),
        ]  # fmt: skip
        self.statements.append(f"torch.ops.fusedtie._tied_conv_transpose2d_backward({', '.join(arguments)})")
        return self.joined(self.algorithm_context())

    def transform_ops(self) -> str:
        shape = [self.rng.randint(0, 5) for _ in range(self.rng.choice((0, 1, 2, 4, 4, 5)))]
        name, alpha = self.raw_transform()
        self.statements.append(f"w = {self.tensor(shape)}")
        if self.chance(0.4):
            self.statements.append(f"torch.ops.fusedtie.transform(w, {name}, {alpha})")
        else:
            # the grad's shape, dtype or layout may differ from the source's: the fused pass must refuse
            grad_shape = shape
            if shape and self.chance(0.15):
                grad_shape = shape[1:] if self.chance(0.5) else [size + 1 for size in shape]
            self.statements.append(f"g = {self.tensor(grad_shape)}")
            self.statements.append(f"torch.ops.fusedtie._transform_backward(g, w, {name}, {alpha})")
        return self.joined()

    def source_conv(self, p: dict) -> str:
        """The nn.Conv2d a layer ties to, with ordinary geometry (nn.Conv2d checks its own); now and
        then a module that is no valid source."""
        if self.chance(0.04):
            return self.rng.choice(("torch.nn.Linear(3, 4)", "torch.nn.ConvTranspose2d(4, 4, 3)", "None"))
        in_channels = self.integer(p["in_channels"])
        out_channels = self.integer(p["out_channels"])
        options = [
            f"stride={p['stride']}",
            f"padding={p['padding']}",
            f"dilation={p['dilation']}",
            f"groups={p['groups']}",
            f"bias={self.rng.choice(('True', 'False'))}",
        ]
        if self.chance(0.2):
            options.append(f"padding_mode={self.rng.choice(PADDING_MODES[:4])!r}")
        if self.dtype in DIFFERENTIABLE_DTYPES[1:]:  # nn.Conv2d cannot hold integers: x alone has them
            options.append(f"dtype=torch.{self.dtype}")
        if self.device != "cpu":
            options.append(f"device={self.device!r}")
        return f"torch.nn.Conv2d({in_channels}, {out_channels}, {p['kernel']}, {', '.join(options)})"

    def conv2d_layer(self, p: dict) -> str:
        """A FusedTiedConv2d of a new source named ``conv``; geometry overrides carry the extremes."""
        bias = self.rng.choices(("same", "transform", None, False, "bogus"), weights=(8, 4, 2, 1, 1))[0]
        options = [self.transform(), f"bias={bias!r}"]
        overrides = {
            "stride": lambda: self.pair(p["stride"]),
            "padding": lambda: self.padding(p["padding"]),
            "dilation": lambda: self.pair(p["dilation"]),
            "groups": lambda: self.integer(p["groups"]),
            "padding_mode": lambda: repr(self.rng.choice(PADDING_MODES)),
            "in_channels": lambda: self.integer(p["in_channels"]),
            "out_channels": lambda: self.integer(p["out_channels"]),
            "kernel_size": lambda: self.pair(p["kernel"]),
        }
        options += [f"{name}={value()}" for name, value in overrides.items() if self.chance(0.15)]
        return f"fusedtie.FusedTiedConv2d(conv := {self.source_conv(p)}, {', '.join(options)})"

    def conv_transpose2d_layer(self, p: dict) -> str:
        """A FusedTiedConvTranspose2d of a new source named ``conv``."""
        bias = self.rng.choices(("True", "False", "None", "1"), weights=(8, 4, 1, 1))[0]
        options = [self.transform(), f"bias={bias}"]
        overrides = {
            "stride": lambda: self.pair(p["stride"]),
            "padding": lambda: self.padding(p["padding"]),
            "output_padding": lambda: self.pair(self.output_padding(p)),
            "dilation": lambda: self.pair(p["dilation"]),
            "groups": lambda: self.integer(p["groups"]),
            "padding_mode": lambda: repr(self.rng.choice(PADDING_MODES)),
        }
        options += [f"{name}={value()}" for name, value in overrides.items() if self.chance(0.15)]
        return f"fusedtie.FusedTiedConvTranspose2d(conv := {self.source_conv(p)}, {', '.join(options)})"

    def layer(self, p: dict) -> tuple[str, str]:
        """(a tied layer of either kind, the arguments of a call of it: an input that fits it mostly)."""
        if self.chance(0.5):
            return self.conv2d_layer(p), self.tensor(self.input_shape(p, p["in_channels"]), True)
        arguments = self.tensor(self.input_shape(p, p["out_channels"]), True)
        if self.chance(0.2):
            size = [self.integer(self.rng.randint(1, 30)) for _ in range(self.rng.choice((1, 2, 2, 4)))]
            arguments += f", output_size=[{', '.join(size)}]"
        return self.conv_transpose2d_layer(p), arguments

    def layer_forward_backward(self) -> str:
        """A tied layer's constructor, its forward, and most of the time a backward to the source."""
        layer, arguments = self.layer(self.conv_shapes())
        self.statements.append(f"layer = {layer}")
        self.with_backward(f"layer({arguments})", weight="conv.weight")
        return self.joined(self.algorithm_context())

    def cached_layer(self) -> str:
        """Two calls in a ``cached()`` scope, under no_grad mostly (where the cache is used), with an
        in-place write to the source between them now and then (which must invalidate it)."""
        layer, arguments = self.layer(self.conv_shapes())
        # the layer is built in the scope's own arguments where the scope names it: `with` cannot
        # follow another statement on one line
        scopes = ("", f"layer := {layer}", f"torch.nn.Sequential(layer := {layer})", "3")
        scope = self.rng.choices(scopes, weights=(4, 4, 2, 1))[0]
        if not scope.startswith(("layer", "torch")):
            self.statements.append(f"layer = {layer}")
        self.statements.append(f"layer({arguments})")
        if self.chance(0.3):
            self.statements.append("conv.weight.add_(1)")
        self.statements.append(f"layer({arguments})")
        contexts = (self.algorithm_context(), "torch.no_grad()" if self.chance(0.8) else None)
        return self.joined(", ".join(c for c in (*contexts, f"fusedtie.cached({scope})") if c))

    def baked_model(self) -> str:
        """bake() of a tied layer, or of a Sequential of the source and the layer, then a forward."""
        p = self.conv_shapes()
        layer, arguments = self.layer(p)
        self.statements.append(f"layer = {layer}")
        if self.chance(0.05):
            self.statements.append("fusedtie.bake(3)")
        elif self.chance(0.4):
            x = self.tensor(self.input_shape(p, p["in_channels"]))
            self.statements.append(f"fusedtie.bake(torch.nn.Sequential(conv, layer))({x})")
        else:
            self.statements.append(f"fusedtie.bake(layer)({arguments})")
        return self.joined(self.algorithm_context())


# --- the runner ---------------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # "crash", "hang" or "internal"
    label: str  # "<seed>:<index>", or the caller's name for a line it gave
    source: str
    detail: str  # the signal, the wait, or the error
    log: str = ""  # the end of the worker's stderr: faulthandler's stack, a C++ message
    alone: Optional[bool] = None  # crash or hang: whether the line alone, in a fresh worker, does it again

    def __str__(self) -> str:
        again = {None: "", True: "; the line alone does it again", False: "; the line alone does NOT"}[self.alone]
        text = f"{self.kind.upper()} {self.label} ({self.detail}{again})\n    {PRELUDE}\n    {self.source}"
        return text + ("\n    | " + self.log.replace("\n", "\n    | ") if self.log else "")


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # "ok" or the exception type
    findings: list[Finding] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")  # (seconds, label) of the slowest case that finished

    def count(self, kind: str) -> int:
        return sum(finding.kind == kind for finding in self.findings)

    def merge(self, other: Report) -> None:
        self.cases += other.cases
        self.seconds += other.seconds
        self.outcomes += other.outcomes
        self.findings += other.findings
        self.slowest = max(self.slowest, other.slowest)

    def summary(self) -> str:
        per_case = 1000 * self.seconds / max(self.cases, 1)
        lines = [
            f"fuzz: {self.cases} cases in {self.seconds:.1f} s ({per_case:.1f} ms a case; slowest "
            f"{self.slowest[0]:.2f} s, case {self.slowest[1]})",
            f"fuzz: crashes {self.count('crash')}, hangs {self.count('hang')}, "
            f"internal findings {self.count('internal')}",
            "fuzz: outcomes " + ", ".join(f"{name} {n}" for name, n in self.outcomes.most_common()),
        ]
        return "\n".join(lines + [str(finding) for finding in self.findings])


@dataclass
class _Result:
    outcome: str  # "ok", an exception type, "crash" or "hang"
    detail: str = ""
    log: str = ""
    internal: Optional[str] = None  # the message of a SystemError or an internal assert


class _Worker:
    """A child process running cases in sequence (``fuzzing.py --worker``), seen through its protocol
    lines: READY once, then START <label> and END <label> <outcome> around each case."""

    def __init__(self, memory_above_import_gb: float) -> None:
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--memory-gb", str(memory_above_import_gb)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env
        )
        self.pending = b""
        try:
            ready = self.read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        except TimeoutError:
            ready = None
        if ready != "READY":
            self.process.kill()
            message = f"the fuzz worker did not start:\n{self.log_tail()}"
            self.close()
            raise RuntimeError(message)

    def read_line(self, deadline: float) -> Optional[str]:
        """The next protocol line, or None at the end of the output (the worker is gone); TimeoutError
        past the deadline."""
        stdout = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([stdout], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(stdout, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(self, label: str, source: str, timeout: float) -> _Result:
        try:
            self.process.stdin.write(f"{label}\t{source}\n".encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # gone already: the read below meets the end of its output
        deadline, started, internal = time.monotonic() + timeout, False, None
        while True:
            try:
                line = self.read_line(deadline)
            except TimeoutError:
                self.process.kill()
                return _Result("hang", f"no END within {timeout:g} s")
            if line is None:
                status = self.process.wait()
                name = signal.Signals(-status).name if status < 0 else f"exit status {status}"
                when = "" if started else ", before the case started"
                return _Result("crash", name + when, self.log_tail())
            kind, _, rest = line.partition(" ")
            if kind == "START":
                started = True
            elif kind == "INTERNAL":
                internal = json.loads(rest.split(" ", 1)[1])
            elif kind == "END":
                return _Result(rest.split(" ", 1)[1], internal=internal)

    def log_tail(self, lines: int = 25) -> str:
        self.log.seek(0)
        return b"\n".join(self.log.read().splitlines()[-lines:]).decode(errors="replace")

    def close(self) -> None:
        """Ends the worker (closing its input ends its loop) and releases its pipes and log."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.log.close()


def run_cases(
    labelled_sources: Iterable[tuple[str, str]],
    seconds: Optional[float] = None,
    timeout: float = CASE_TIMEOUT_S,
    memory_above_import_gb: float = MEMORY_ABOVE_IMPORT_GB,
    progress=None,
    rerun_alone: bool = True,
) -> Report:
    """Runs (label, one line of Python) pairs in a worker until they or ``seconds`` run out. A case
    that crashes or hangs costs the worker (the next case gets a fresh one) and, with
    ``rerun_alone``, is run once more, alone in a fresh worker, to tell whether the line does it by
    itself or earlier cases set it up. ``progress``, if given, is called with each finding as it
    comes."""
    report, start, worker = Report(), time.monotonic(), None
    try:
        for label, source in labelled_sources:
            assert "\n" not in source, "a case is one line"
            if seconds is not None and time.monotonic() - start >= seconds:
                break
            worker = worker or _Worker(memory_above_import_gb)
            case_start = time.monotonic()
            result = worker.run(label, source, timeout)
            report.cases += 1
            report.outcomes[result.outcome] += 1
            finding = None
            if result.outcome in ("crash", "hang"):
                worker.close()
                worker = None
                finding = Finding(result.outcome, label, source, result.detail, result.log)
                if rerun_alone:
                    alone_worker = _Worker(memory_above_import_gb)
                    finding.alone = alone_worker.run(label, source, timeout).outcome == result.outcome
                    alone_worker.close()
            else:
                report.slowest = max(report.slowest, (time.monotonic() - case_start, label))
                if result.internal is not None:
                    finding = Finding("internal", label, source, result.internal)
            if finding is not None:
                report.findings.append(finding)
                if progress:
                    progress(finding)
    finally:
        if worker is not None:
            worker.close()
    report.seconds = time.monotonic() - start
    return report


def fuzz(
    seeds: Iterable[int],
    seconds: Optional[float] = None,
    cases_per_seed: Optional[int] = None,
    timeout: float = CASE_TIMEOUT_S,
    progress=None,
) -> Report:
    """The generated cases of each seed, from case 0, for ``cases_per_seed`` cases or an equal share
    of ``seconds``."""
    seeds = list(seeds)
    report = Report()
    for seed in seeds:
        labelled = ((f"{seed}:{index}", case(seed, index)) for index in range(cases_per_seed or sys.maxsize))
        share = None if seconds is None else seconds / len(seeds)
        report.merge(run_cases(labelled, seconds=share, timeout=timeout, progress=progress))
    return report


# --- the worker ---------------------------------------------------------------------------------------


def _worker_main(memory_above_import_gb: float) -> None:
    """The child: reads "<label>\\t<source>" lines from stdin and runs each, writing the protocol
    lines to its original stdout; anything else a case prints goes to stderr."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # no orphan when the parent is killed
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # line-buffered: each line reaches the parent at once
    os.dup2(2, 1)
    faulthandler.enable()  # a crash's Python stack lands in the log the report quotes
    warnings.simplefilter("ignore")  # warnings are not findings, and would fill the log
    # One ordinary call first, so that the thread pool exists before the address space is capped.
    fusedtie.tied_conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3))
    # A case asking for an enormous output fails at once with a clear error instead of swapping.
    limit = _address_space_bytes() + int(memory_above_import_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    protocol.write("READY\n")
    for request in sys.stdin:
        label, source = request.rstrip("\n").split("\t", 1)
        protocol.write(f"START {label}\n")
        torch.manual_seed(0)
        namespace = {"torch": torch, "fusedtie": fusedtie}
        outcome = "ok"
        try:
            exec(compile(source, f"<case {label}>", "exec"), namespace)
        except Exception as error:
            outcome = type(error).__name__
            if isinstance(error, SystemError) or "INTERNAL ASSERT FAILED" in str(error):
                protocol.write(f"INTERNAL {label} {json.dumps(_internal_description(error))}\n")
        namespace.clear()  # the case's tensors die here, so a crash in a destructor is still its own
        protocol.write(f"END {label} {outcome}\n")


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _internal_description(error: Exception) -> str:
    """The error's first lines and whose code raised it: the file of a C++ assert, else the innermost
    Python frame."""
    message = "\n".join(str(error).splitlines()[:3])
    assertion = re.search(r'INTERNAL ASSERT FAILED at "([^"]+)"', message)
    if assertion:
        where = assertion.group(1)
        owner = "PyTorch" if re.search(r"/(aten|c10|torch)/", where) else "fusedtie"
    else:
        where = traceback.extract_tb(error.__traceback__)[-1].filename
        packages = {"fusedtie": os.path.dirname(fusedtie.__file__), "PyTorch": os.path.dirname(torch.__file__)}
        owner = next((name for name, path in packages.items() if where.startswith(path)), "the case")
    return f"{type(error).__name__}: {message} [{owner}: {where}]"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seeds", type=int, help=f"how many seeds from --seed (default 1; {LONG_SEEDS} with --long)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cases", type=int, help="cases per seed")
    budget.add_argument("--seconds", type=float, help="the time budget, shared evenly by the seeds")
    budget.add_argument("--long", action="store_true", help=f"the long run: {LONG_SECONDS / 60:g} minutes")
    budget.add_argument("--show", type=int, metavar="N", help="print the first N cases of each seed; run nothing")
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds a case may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-gb", type=float, default=MEMORY_ABOVE_IMPORT_GB, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.memory_gb)
        return 0
    seeds = range(args.seed, args.seed + (args.seeds or (LONG_SEEDS if args.long else 1)))
    if args.show:
        for seed in seeds:
            for index in range(args.show):
                print(f"{seed}:{index}\t{case(seed, index)}")
        return 0
    seconds = LONG_SECONDS if args.long else args.seconds
    if seconds is None and args.cases is None:
        parser.error("give --cases, --seconds, --long or --show")
    report = fuzz(
        seeds,
        seconds=seconds,
        cases_per_seed=args.cases,
        timeout=args.timeout,
        progress=lambda finding: print(finding, flush=True),
    )
    print(report.summary())
    return 1 if report.count("crash") or report.count("hang") else 0


if __name__ == "__main__":
    sys.exit(main())
