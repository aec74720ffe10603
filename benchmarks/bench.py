"""Benchmark: y = conv(x, f(W), g(b)) with W trainable, fusedtie against the alternatives.

Contenders (all compute the same y, with bias "same": g is the identity; see CONTENDERS):
  plain           nn.Conv2d holding f(W) precomputed once: the floor, what a conv costs with no tie
                  at all. It is the baseline of every ratio and is always run.
  fusedtie        fusedtie.FusedTiedConv2d: f applied inside the one fused operator.
  fusedtie+cache  a second FusedTiedConv2d on the same source, called inside
                  `with fusedtie.cached(layer):`, a scope over that layer alone (inference only;
                  skipped, with a note, while fusedtie has no `cached` that takes modules).
  forum           the forum recipe, F.conv2d(x, f(w), b, ...) recomputing f(W) on every call.
  parametrize     torch.nn.utils.parametrize: a second nn.Conv2d whose "weight" parametrization
                  applies f, with its `original` and its bias set to the source's own tensors; in
                  inference it is called inside `parametrize.cached()`.
  compile         torch.compile of the forum module (mode "default" on CPU, "max-autotune" on CUDA).

Decoder cases (kind "decoder", shapes named "decoder ..."): y = conv_transpose2d(h, f(W), b), the
decoder of a tied autoencoder. The source is the encoder, an nn.Conv2d mapping the decoder's output
channels to its input channels, and h has the encoder output's shape. b is the decoder's own bias
(one Parameter per case, shared by every contender, as the source's bias is in conv cases). The
same contenders, each in its transposed form:
  plain           nn.ConvTranspose2d holding f(W) precomputed once (untied, its own weight): the
                  baseline, as plain is for conv cases.
  fusedtie        fusedtie.FusedTiedConvTranspose2d(encoder, transform, output_padding=...).
  fusedtie+cache  a second one inside fusedtie.cached(layer), as above.
  forum           F.conv_transpose2d(h, f(encoder.weight), b, ...) on every call, the encoder held in
                  a list (out of the module's parameters, the recipe's way of reaching it).
  parametrize     an nn.ConvTranspose2d whose weight parametrization applies f, its original the
                  encoder's weight (the same shape) and its bias the shared one.
  compile         torch.compile of the forum decoder.

Scopes (fusedtie+cache, parametrize in inference) are entered ONCE per case, before the first call,
and left after the case's last call (an ExitStack held by the contender's Runner): the numbers are
the steady state of a server that keeps the scope open, not the cost of entering it, and the f(W)
the scope caches is built on the case's first call, outside the timings and outside the memory
step. Both scopes cache only while they are open (both drop their cache when the outermost scope
exits). Neither changes another contender, so all contenders share the case's one round-robin:
parametrize.cached() affects only parametrized modules, and fusedtie+cache's scope is limited to its
own layer (fusedtie.cached(layer) caches only the FusedTiedConv2d layers inside the modules given),
so the `fusedtie` contender's layer, another instance on the same source, still computes f(W) on
every call. A check on every case, with the scopes open and outside the timings, makes sure of it
(fusedtie.cache._in_scope must be True for fusedtie+cache's layer and False for fusedtie's) and
aborts the run otherwise.

compile: every case builds a new module, so a compilation per case is expected; torch._dynamo is
reset before and after each case that compiles, so the recompile limit is never reached. The first
call (dynamo tracing + inductor + C++ compilation) happens before the warm-up and its wall time is
reported as the compile time (JSON "compile_s", and a summary line). Inductor's freezing stays off
(the default): with it, f(W) would be folded into a constant, which is the plain floor, not a tie.
Inductor's other defaults stay too: on CPU its layout optimisation runs the conv channels-last, so
the compiled graph copies f(W) and x into channels-last buffers and the output back, every call
(this, not f, is most of what compile costs over forum at batch 1). Each run compiles into a
private, empty inductor cache directory (deleted afterwards), so the compile time is inductor's
real cost every run, not a hit in /tmp/torchinductor_$USER left by an earlier run (which makes it
0.1-0.3 s); set TORCHINDUCTOR_CACHE_DIR to use (and keep) a cache of your choosing. Measured on the
2-core machine this was written on: 15-20 s for the run's first compilation (inductor's start-up,
C++ headers), then 2-4 s a case. --compile all|some|none: "some" compiles only on
COMPILE_SOME_SHAPES (conv5_x 3x3 b1) and is the default of --quick, where compiling all 32 cases
would take about 2 minutes on its own; "all" is the default of --full.

Modes: inference (eval, torch.no_grad) and train (forward, then torch.autograd.grad of y.sum() with
respect to the contender's leaves: the source's W and b, or plain's own f(W) and b).

Shapes (float32 on CPU; float32 and bfloat16 on CUDA, see --dtype):
  seed        1x16x300x300, 16->16 3x3 pad 1 (the issue's example).
  ResNet-50   one 3x3 (pad 1) and one 1x1 conv per stage: conv2_x 56x56 (64->64, 256->64),
              conv3_x 28x28 (128->128, 512->128), conv4_x 14x14 (256->256, 1024->256), conv5_x 7x7
              (512->512, 2048->512), each at batch 1, 8 and 32 (and 256 with --device cuda).
  depthwise   256 channels at 28x28, 3x3, groups 256, pad 1, at batch 1 and 8.
  decoders    (decoder_shapes) 3x3 s2 p1 op1 64->32 28x28->56x56 (a conv autoencoder's), 4x4 s2 p1
              128->64 16x16->32x32 (DCGAN's), 3x3 s1 p1 64->64 at 56x56, and two wider ones:
              3x3 s2 p1 op1 256->128 14x14->28x28 and 4x4 s2 p1 512->256 4x4->8x8; at batch 1 and 8
              (and 64 with --device cuda).
  Transforms: square and tanh. --full runs all of them (148 cases on CPU).
  --quick (what `make bench` runs, about 2 minutes on a 2-core CPU) runs QUICK_SHAPE_NAMES: the seed,
  conv5_x 3x3 and 1x1 at batch 1 (the weight-heaviest shapes, where a tie costs most), conv4_x 3x3
  at batch 1, conv5_x 1x1 at batch 8 (the same weights as at batch 1, so the pair shows batch
  amortising the tie), the depthwise at batch 1, and the 3x3 s2 and 4x4 s2 decoders at batch 1 (a
  decoder's tie costs most, relative to its convolution, at batch 1); both transforms, both modes
  (32 cases), with `compile` on conv5_x 3x3 b1 only (--compile some). Its conv cases get at most
  2.5 s of timed repetitions each, its decoder cases at most 1 s (their calls take well under a
  millisecond, so that is still hundreds of repetitions, and the run grows by about 10 s instead of
  25), less when the run falls behind its 120 s target (110 s before the decoder cases: Pacer, a
  busy machine), never fewer than MIN_REPS rotations; an explicit --case-budget (the same for
  every case) turns the pacing off.
  Filters: --shapes SUBSTRING (of a case's description, e.g. "b32", "conv5_x", "1x1 b8", "decoder";
  comma-separated: any of them), --transforms, --contenders, --modes (comma-separated); plain is
  always run.

--cpu-algorithm auto|library|gemm|depthwise (default auto): fusedtie's CPU path chooses per shape
between at::convolution (oneDNN, "library"), its own im2col + BLAS GEMM (csrc/cpu/gemm_conv2d.cpp,
"gemm") and its own depthwise kernel with f fused in (csrc/cpu/depthwise_conv2d.cpp, "depthwise"); the run
is wrapped in fusedtie.use_cpu_conv_algorithm(choice), which forces one for fusedtie's operator
(process-wide) and changes no other contender: plain, forum, parametrize and compile run
nn.Conv2d / F.conv2d, i.e. oneDNN. So on shapes where auto picks the GEMM, the fusedtie/plain ratio
mixes the tie's cost with a convolution algorithm that is faster there than plain's (the same for
the depthwise kernel); a run with
--cpu-algorithm library measures the tie's own cost, on the same algorithm as plain. The choice is
in the table's header line and the JSON settings ("cpu_algorithm"). It has no effect on CUDA.
It does not change the decoder cases: on the CPU fusedtie's transposed operator always takes the
library path, f(W) pass + oneDNN + chain-rule pass (csrc/cpu/tied_conv_transpose2d_kernel.cpp), so
its ratio to plain is the tie's own cost on plain's algorithm.

--cuda-algorithm auto|autotune|fused|library (default auto): the same for the CUDA path
(fusedtie.use_cuda_conv_algorithm), for both operators, decoder cases included: fused = fusedtie's
kernels that apply f on weight-tile load and f' in the weight-gradient epilogue (for the transposed
operator the same kernels with their roles swapped), library = one transform kernel + cuDNN + one
chain-rule kernel, autotune = both timed once per shape, auto = fusedtie's heuristic. In the JSON
settings ("cuda_algorithm"). It has no effect on the CPU.

Method: per case: build every contender on one source conv; open the scopes and check
fusedtie+cache's (above); the first call of each contender (timed: for compile, the compilation); a
correctness guard; warm-up; then many repetitions in which every contender runs once, round-robin,
with the order rotated each repetition; each call is timed on its own with time.perf_counter (CUDA:
synchronised before and after). A case stops early, at a whole rotation but never under MIN_REPS
repetitions, once its timed repetitions exceed the case budget. Reported: the median, the
interquartile range as a percentage of the median, median(contender) / median(plain) from the same
run, and the peak memory of one step.

Guard: every contender's output, and in training the gradients with respect to the source's W and b
of every contender whose leaves are the source's (all but plain), must equal a freshly built forum
module's in the same case (rtol 1e-4, atol 1e-5 x the reference's largest magnitude for float32;
every contender, compile included, stays within it on CPU, so it was not loosened; bfloat16's is
a guess, untested). Decoder cases: the reference is F.conv_transpose2d(h, f(W), b) computed in
float64 on copies of the encoder's W and the decoder's b (decoder_reference), gradients with
respect to those two, at the same tolerances. Any mismatch aborts the run: timings of a wrong
result mean nothing.

Memory (peak of one step, after the timed repetitions, outside the timings, in MiB):
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
        memory_allocated() before the step.
  CPU:  there is no allocator statistic. torch.profiler (profile_memory=True) records every
        allocation and free made through PyTorch's CPU allocator during the step; the peak of their
        running sum, in time order, is what the step allocated beyond what existed before it
        (output included, since it is freed after the step). This covers oneDNN's work buffers as
        PyTorch runs it: ideep allocates its reordered (blocked) copies of the weight and the input
        through PyTorch's allocator (they show up inside aten::mkldnn_convolution in the trace, and
        are why even plain's peak is at least one weight's size). Memory a library takes with its
        own malloc (oneDNN's JIT code and primitive cache, for instance) is not counted, and neither is
        memory a contender keeps from one call to the next: the f(W) a scope caches, or
        fusedtie's per-thread f(W) scratch buffer (allocated once, reused by every call).

Output: a Markdown table on stdout, one row per (shape, transform, mode): plain's median and IQR, and
each contender's ratio to plain (blank where it does not apply); a second table of peak memory;
compile times. --json PATH adds raw samples, full per-contender statistics, first-call times,
compile times, memory, settings and the environment; --plot PATH draws the ratios (matplotlib).
Progress, with an ETA, goes to stderr.

Usage (from the repository root; `make bench` runs the quick set):
  python benchmarks/bench.py [--quick | --full] [--threads N] [--device cpu|cuda] [--json PATH]
      [--plot PNG] [--shapes SUBSTRING] [--contenders a,b] [--compile all|some|none]
      [--cpu-algorithm auto|library|gemm|depthwise] [--cuda-algorithm auto|autotune|fused|library] ...

To extend: add a ShapeCase to full_shapes (kind DECODER for a transposed one), a Contender (with
its build and build_decoder) to CONTENDERS, a Mode to MODES, or a transform to FORUM_TRANSFORMS (the
reference f written with plain torch ops).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Optional

# Benchmark the working tree this file lives in, not whatever `fusedtie` happens to be installed:
# `python benchmarks/bench.py` puts benchmarks/ on sys.path, not the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402  (torch first: the extension needs torch's shared libraries loaded)
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import fusedtie  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
import bench_targets  # noqa: E402  (beside this file)

# --- what is measured -------------------------------------------------------------------------------

# f written with ordinary torch ops: the forum recipe's f, the plain contender's precomputation and
# the reference of the correctness guard. A transform is benchmarked only if it is listed here.
FORUM_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "square": lambda w: w**2,
    "tanh": torch.tanh,
}
TRANSFORMS = ["square", "tanh"]


CONV = "conv"  # y = conv2d(x, f(W), b), the source's own geometry
DECODER = "decoder"  # y = conv_transpose2d(h, f(W), b): the decoder tied to an encoder conv


@dataclass(frozen=True)
class ShapeCase:
    """One timed convolution: its input (batch, in_channels, height, width) and hyper-parameters.

    kind CONV: a conv2d, whose source has this geometry. kind DECODER: a transposed conv2d mapping
    in_channels to out_channels (the decoder of a tied autoencoder); its source is the encoder, an
    nn.Conv2d(out_channels, in_channels, kernel, stride, padding, groups), so the input h has the
    encoder output's shape and the output the encoder input's (with output_padding).
    """

    label: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    output_padding: int = 0  # decoders only
    kind: str = CONV

    @property
    def name(self) -> str:
        return f"{self.label} b{self.batch}"

    def output_hw(self) -> tuple[int, int]:
        """A decoder's output height and width (nn.ConvTranspose2d's formula, dilation 1)."""
        return tuple(
            (n - 1) * self.stride - 2 * self.padding + self.kernel + self.output_padding
            for n in (self.height, self.width)
        )

    def describe(self) -> str:
        extra = ""
        if self.stride != 1:
            extra += f" s{self.stride}"
        if self.groups != 1:
            extra += f" g{self.groups}"
        if self.kind == DECODER:  # the padding decides a decoder's output size: always shown
            extra += f" p{self.padding}" + (f" op{self.output_padding}" if self.output_padding else "")
            extra += " -> {}x{}".format(*self.output_hw())
        return (
            f"{self.name}: {self.batch}x{self.in_channels}x{self.height}x{self.width} "
            f"{self.in_channels}->{self.out_channels} {self.kernel}x{self.kernel}{extra}"
        )

    def source_conv(self, device: torch.device, dtype: torch.dtype) -> nn.Conv2d:
        if self.kind == DECODER:  # the encoder: out_channels -> in_channels
            return nn.Conv2d(
                self.out_channels,
                self.in_channels,
                self.kernel,
                stride=self.stride,
                padding=self.padding,
                groups=self.groups,
                device=device,
                dtype=dtype,
            )
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            device=device,
            dtype=dtype,
        )

    def input(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.randn(self.batch, self.in_channels, self.height, self.width, device=device, dtype=dtype)


def seed_shape() -> ShapeCase:
    return ShapeCase("seed", 1, 16, 16, 300, 300, 3, padding=1)


# ResNet-50's bottleneck stages: (name, spatial size, width, expanded width). Each stage has a 3x3
# width->width conv and a 1x1 expanded->width conv (the block's reducing 1x1).
RESNET50_STAGES = [
    ("conv2_x", 56, 64, 256),
    ("conv3_x", 28, 128, 512),
    ("conv4_x", 14, 256, 1024),
    ("conv5_x", 7, 512, 2048),
]


def resnet50_shapes(batch: int) -> list[ShapeCase]:
    shapes = []
    for stage, size, width, expanded in RESNET50_STAGES:
        shapes.append(ShapeCase(f"{stage} 3x3", batch, width, width, size, size, 3, padding=1))
        shapes.append(ShapeCase(f"{stage} 1x1", batch, expanded, width, size, size, 1))
    return shapes


def depthwise_shape(batch: int) -> ShapeCase:
    return ShapeCase("depthwise 3x3", batch, 256, 256, 28, 28, 3, padding=1, groups=256)


def decoder_shapes(batch: int) -> list[ShapeCase]:
    """Decoder layers of tied autoencoders and DCGAN-style generators (each doubles the size)."""
    d = dict(kind=DECODER)
    return [
        # a conv autoencoder's stride-2 3x3 decoder: 28x28 -> 56x56 (output_padding restores the size)
        ShapeCase("decoder 3x3 s2", batch, 64, 32, 28, 28, 3, stride=2, padding=1, output_padding=1, **d),
        # DCGAN's 4x4 stride-2 padding-1 layer: 16x16 -> 32x32
        ShapeCase("decoder 4x4 s2", batch, 128, 64, 16, 16, 4, stride=2, padding=1, **d),
        # a stride-1 3x3 decoder (same size)
        ShapeCase("decoder 3x3 s1", batch, 64, 64, 56, 56, 3, padding=1, **d),
        # wider layers: more weight per activation, where recomputing f(W) costs more
        ShapeCase("decoder 3x3 s2 wide", batch, 256, 128, 14, 14, 3, stride=2, padding=1, output_padding=1, **d),
        ShapeCase("decoder 4x4 s2 wide", batch, 512, 256, 4, 4, 4, stride=2, padding=1, **d),
    ]


def full_shapes(device: torch.device) -> list[ShapeCase]:
    batches = [1, 8, 32] + ([256] if device.type == "cuda" else [])
    shapes = [seed_shape()]
    for batch in batches:
        shapes += resnet50_shapes(batch)
    shapes += [depthwise_shape(1), depthwise_shape(8)]
    for batch in [1, 8] + ([64] if device.type == "cuda" else []):
        shapes += decoder_shapes(batch)
    return shapes


# --quick: see the module docstring for why these.
QUICK_SHAPE_NAMES = [
    "seed b1",
    "conv5_x 3x3 b1",
    "conv5_x 1x1 b1",
    "conv4_x 3x3 b1",
    "conv5_x 1x1 b8",
    "depthwise 3x3 b1",
    "decoder 3x3 s2 b1",
    "decoder 4x4 s2 b1",
]
# --compile some: the weight-heaviest 3x3, where recomputing f(W) costs most (the seed's f(W) is
# negligible next to its conv, so compile can only match forum there).
COMPILE_SOME_SHAPES = ("conv5_x 3x3 b1",)


def quick_shapes(device: torch.device) -> list[ShapeCase]:
    by_name = {s.name: s for s in full_shapes(device)}
    return [by_name[name] for name in QUICK_SHAPE_NAMES]


@dataclass(frozen=True)
class Mode:
    """How one timed call uses a Runner; `prepare` puts the module in the right state beforehand."""

    name: str
    trains: bool  # whether the step differentiates (the guard then checks gradients too)
    prepare: Callable[["Runner"], None]
    step: Callable[["Runner", Tensor], object]


def _inference_step(runner: Runner, x: Tensor) -> Tensor:
    with torch.no_grad():
        return runner.module(x)


def _train_step(runner: Runner, x: Tensor) -> tuple[Tensor, ...]:
    # autograd.grad returns fresh gradients instead of accumulating into .grad, so no contender pays
    # for an accumulation (or a zero_grad) the others do not.
    y = runner.module(x)
    return torch.autograd.grad(y.sum(), runner.params)


MODES = [
    Mode("inference", False, lambda r: r.module.eval(), _inference_step),
    Mode("train", True, lambda r: r.module.train(), _train_step),
]

# --- the contenders ---------------------------------------------------------------------------------


@dataclass
class Runner:
    """A contender built for one case: the module to call and the leaves a training step needs."""

    module: nn.Module
    params: list[Tensor]
    # Whether `params` are the source's W and b (so their gradients must equal the reference's).
    # The plain floor differentiates with respect to its own f(W), which is not comparable.
    grads_wrt_source: bool = True
    # A context the calls must run in, entered once for the whole case (see the module docstring).
    scope: Optional[Callable[[], ContextManager]] = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def open_scope(self) -> None:
        if self.scope is not None:
            self._stack.enter_context(self.scope())

    def close_scope(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()


@dataclass(frozen=True)
class DecoderTie:
    """What a decoder case's contenders are built on: the encoder conv that owns W, the decoder's
    bias and the one piece of geometry the encoder does not carry (output_padding).

    The bias is the decoder's own parameter (source.in_channels values), one Parameter shared by
    every contender, as the source's bias is in conv cases, so every contender's leaves are the
    same two tensors (source.weight, bias) and their gradients can be compared.
    """

    source: nn.Conv2d
    bias: nn.Parameter
    output_padding: int

    @property
    def leaves(self) -> list[Tensor]:
        return [self.source.weight, self.bias]


def make_decoder_tie(shape: ShapeCase, source: nn.Conv2d) -> DecoderTie:
    # nn.ConvTranspose2d's bias initialisation: uniform in +-1/sqrt(fan_in), fan_in = its
    # weight.size(1) * kH * kW = (source.in_channels / groups) * kH * kW.
    w = source.weight
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    bias = nn.Parameter(torch.empty(source.in_channels, device=w.device, dtype=w.dtype))
    with torch.no_grad():
        bias.uniform_(-(fan_in**-0.5), fan_in**-0.5)
    return DecoderTie(source, bias, shape.output_padding)


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[nn.Conv2d, str, bool], Runner]  # (source, transform, trains)
    # The same contender for a decoder case, (tie, transform, trains); None: not run on decoders.
    build_decoder: Optional[Callable[[DecoderTie, str, bool], Runner]] = None
    modes: tuple[str, ...] = ("inference", "train")
    # Why the contender cannot run in this process (None: it can).
    unavailable: Callable[[], Optional[str]] = lambda: None

    def builder(self, kind: str) -> Optional[Callable[..., Runner]]:
        return self.build_decoder if kind == DECODER else self.build


class ForumConv2d(nn.Module):
    """The forum recipe, in a module so its call overhead matches the other contenders'."""

    def __init__(self, source: nn.Conv2d, transform: str) -> None:
        super().__init__()
        self.source = source
        self.f = FORUM_TRANSFORMS[transform]

    def forward(self, x: Tensor) -> Tensor:
        s = self.source
        return F.conv2d(x, self.f(s.weight), s.bias, s.stride, s.padding, s.dilation, s.groups)


class TransformParametrization(nn.Module):
    """f as a torch.nn.utils.parametrize parametrization (no right_inverse: f is not invertible)."""

    def __init__(self, transform: str) -> None:
        super().__init__()
        self.f = FORUM_TRANSFORMS[transform]

    def forward(self, w: Tensor) -> Tensor:
        return self.f(w)


def _conv_like(source: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(
        source.in_channels,
        source.out_channels,
        source.kernel_size,
        stride=source.stride,
        padding=source.padding,
        dilation=source.dilation,
        groups=source.groups,
        device=source.weight.device,
        dtype=source.weight.dtype,
    )


def build_plain(source: nn.Conv2d, transform: str, trains: bool) -> Runner:
    conv = _conv_like(source)
    with torch.no_grad():
        conv.weight.copy_(FORUM_TRANSFORMS[transform](source.weight))
        conv.bias.copy_(source.bias)  # bias="same": g is the identity
    return Runner(conv, [conv.weight, conv.bias], grads_wrt_source=False)


def build_fusedtie(source: nn.Conv2d, transform: str, trains: bool) -> Runner:
    layer = fusedtie.FusedTiedConv2d(source, transform, bias="same")
    return Runner(layer, [source.weight, source.bias])


def build_fusedtie_cached(source: nn.Conv2d, transform: str, trains: bool) -> Runner:
    # Its own layer (not the `fusedtie` contender's), and a scope over that layer alone: the other
    # FusedTiedConv2d keeps computing f(W) on every call (check_cache_scope makes sure of it).
    layer = fusedtie.FusedTiedConv2d(source, transform, bias="same")
    return Runner(layer, [source.weight, source.bias], scope=lambda: fusedtie.cached(layer))


def fusedtie_cached_unavailable() -> Optional[str]:
    cached = getattr(fusedtie, "cached", None)
    if not callable(cached):
        return "fusedtie.cached does not exist in this build of fusedtie"
    try:
        inspect.signature(cached).bind(nn.Identity())
    except TypeError:
        return "fusedtie.cached takes no modules in this build (its scope would be process-wide)"
    if not callable(getattr(getattr(fusedtie, "cache", None), "_in_scope", None)):
        return "fusedtie.cache._in_scope, which the scope check needs, does not exist in this build"
    return None


def build_forum(source: nn.Conv2d, transform: str, trains: bool) -> Runner:
    return Runner(ForumConv2d(source, transform), [source.weight, source.bias])


def build_parametrize(source: nn.Conv2d, transform: str, trains: bool) -> Runner:
    conv = _conv_like(source)
    parametrize.register_parametrization(conv, "weight", TransformParametrization(transform))
    # The tie: the parametrization's input and the bias become the source's own Parameters.
    conv.parametrizations.weight.original = source.weight
    conv.bias = source.bias
    # parametrize.cached() keeps f(W) only inside the scope; in training it cannot be used (the
    # cached f(W) would carry one autograd graph across steps).
    scope = None if trains else parametrize.cached
    return Runner(conv, [source.weight, source.bias], scope=scope)


def _compile_mode(source: nn.Conv2d) -> str:
    return "max-autotune" if source.weight.device.type == "cuda" else "default"


def build_compile(source: nn.Conv2d, transform: str, trains: bool) -> Runner:
    module = torch.compile(ForumConv2d(source, transform), mode=_compile_mode(source))
    return Runner(module, [source.weight, source.bias])


# --- the same contenders for a decoder case: conv_transpose2d(h, f(W_source), b) ---------------------


class ForumConvTranspose2d(nn.Module):
    """The forum recipe for a tied decoder: F.conv_transpose2d(h, f(encoder.weight), b, ...).

    The encoder is held in a list, out of this module's parameters and state_dict (the recipe's
    way of reaching another layer's weight); the bias is the decoder's own parameter.
    """

    def __init__(self, tie: DecoderTie, transform: str) -> None:
        super().__init__()
        self.encoder = [tie.source]  # a plain list: nn.Module does not register what it holds
        self.bias = tie.bias
        self.output_padding = tie.output_padding
        self.f = FORUM_TRANSFORMS[transform]

    def forward(self, h: Tensor) -> Tensor:
        s = self.encoder[0]
        return F.conv_transpose2d(
            h, self.f(s.weight), self.bias, s.stride, s.padding, self.output_padding, s.groups, s.dilation
        )


def _conv_transpose_like(tie: DecoderTie) -> nn.ConvTranspose2d:
    s = tie.source
    return nn.ConvTranspose2d(
        s.out_channels,
        s.in_channels,
        s.kernel_size,
        stride=s.stride,
        padding=s.padding,
        output_padding=tie.output_padding,
        groups=s.groups,
        dilation=s.dilation,
        device=s.weight.device,
        dtype=s.weight.dtype,
    )


def build_plain_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    # Untied: an nn.ConvTranspose2d owning f(W) (precomputed once) and a copy of the bias.
    conv = _conv_transpose_like(tie)
    with torch.no_grad():
        conv.weight.copy_(FORUM_TRANSFORMS[transform](tie.source.weight))
        conv.bias.copy_(tie.bias)
    return Runner(conv, [conv.weight, conv.bias], grads_wrt_source=False)


def _tied_decoder(tie: DecoderTie, transform: str) -> nn.Module:
    layer = fusedtie.FusedTiedConvTranspose2d(tie.source, transform, output_padding=tie.output_padding)
    layer.bias = tie.bias  # the case's shared decoder bias in place of the one it made
    return layer


def build_fusedtie_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    return Runner(_tied_decoder(tie, transform), tie.leaves)


def build_fusedtie_cached_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    layer = _tied_decoder(tie, transform)  # its own layer, as for conv cases
    return Runner(layer, tie.leaves, scope=lambda: fusedtie.cached(layer))


def build_forum_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    return Runner(ForumConvTranspose2d(tie, transform), tie.leaves)


def build_parametrize_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    # An nn.ConvTranspose2d's weight has the encoder's shape (in, out/groups, kH, kW), so the
    # parametrization's original can be the encoder's own weight, as in build_parametrize.
    conv = _conv_transpose_like(tie)
    parametrize.register_parametrization(conv, "weight", TransformParametrization(transform))
    conv.parametrizations.weight.original = tie.source.weight
    conv.bias = tie.bias
    return Runner(conv, tie.leaves, scope=None if trains else parametrize.cached)


def build_compile_decoder(tie: DecoderTie, transform: str, trains: bool) -> Runner:
    module = torch.compile(ForumConvTranspose2d(tie, transform), mode=_compile_mode(tie.source))
    return Runner(module, tie.leaves)


# The first entry is the baseline of the ratio column. The guard's reference: a fresh forum module
# for conv cases, a float64 F.conv_transpose2d for decoder cases (see guard).
CACHED = "fusedtie+cache"
CONTENDERS = [
    Contender("plain", build_plain, build_plain_decoder),
    Contender("fusedtie", build_fusedtie, build_fusedtie_decoder),
    Contender(
        CACHED,
        build_fusedtie_cached,
        build_fusedtie_cached_decoder,
        modes=("inference",),
        unavailable=fusedtie_cached_unavailable,
    ),
    Contender("forum", build_forum, build_forum_decoder),
    Contender("parametrize", build_parametrize, build_parametrize_decoder),
    Contender("compile", build_compile, build_compile_decoder),
]
BASELINE = "plain"
# What plain is, per kind of case: the same convolution with f(W) computed once and held as the
# module's own weight (no tie at all), for the ratio table's header and the JSON settings.
BASELINE_BY_KIND = {
    CONV: "nn.Conv2d holding f(W), precomputed once",
    DECODER: "nn.ConvTranspose2d holding f(W) of the encoder's W, precomputed once (an untied decoder "
    "with its own weight)",
}
# What each kind's guard compares with.
GUARD_REFERENCE_BY_KIND = {
    CONV: "a fresh forum module, F.conv2d(x, f(W), b), in the case's dtype",
    DECODER: "F.conv_transpose2d(h, f(W), b) in float64 on copies of the leaves",
}
COMPILED = "compile"
CONTENDER_NAMES = [c.name for c in CONTENDERS]

# --- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    shapes: list[ShapeCase]
    transforms: list[str]
    modes: list[Mode]
    contenders: list[Contender]
    dtypes: list[torch.dtype]
    compile_on: str  # "all", "some" (COMPILE_SOME_SHAPES) or "none"
    warmup: int
    reps: int
    # Wall-clock cap per case (seconds, timed repetitions only): on a busy shared machine a case
    # stops early, at a whole rotation, rather than blowing the run's time budget. None: no cap.
    case_budget_s: Optional[float]
    # Target for the whole run (seconds), or None: each case's budget shrinks below the cap when the
    # run is behind schedule (see Pacer).
    run_target_s: Optional[float] = None
    # The cap of decoder cases, when it differs from case_budget_s (--quick: their calls are short,
    # so a smaller cap still gives hundreds of repetitions and keeps the run's growth small).
    decoder_case_budget_s: Optional[float] = None

    def case_cap(self, shape: ShapeCase) -> Optional[float]:
        if shape.kind == DECODER and self.decoder_case_budget_s is not None:
            return self.decoder_case_budget_s
        return self.case_budget_s

    def contenders_for(self, shape: ShapeCase, mode: Mode) -> list[Contender]:
        chosen = []
        for c in self.contenders:
            if mode.name not in c.modes or c.builder(shape.kind) is None:
                continue
            if c.name == COMPILED and not compiles_on(self.compile_on, shape):
                continue
            chosen.append(c)
        return chosen


def compiles_on(compile_on: str, shape: ShapeCase) -> bool:
    return compile_on == "all" or (compile_on == "some" and shape.name in COMPILE_SOME_SHAPES)


# --quick is sized to finish in about 2 minutes on a 2-core CPU machine, busy or not (the budget).
# The quick target was 110 s for the 24 conv cases; the 8 decoder cases add about 10 s (1 s timed and
# about 0.3 s untimed each), so that the conv cases keep the budgets they had.
QUICK = dict(
    shapes=quick_shapes,
    warmup=2,
    reps=300,
    case_budget_s=2.5,
    compile_on="some",
    run_target_s=120.0,
    decoder_case_budget_s=1.0,
)
FULL = dict(
    shapes=full_shapes,
    warmup=10,
    reps=400,
    case_budget_s=30.0,
    compile_on="all",
    run_target_s=None,
    decoder_case_budget_s=None,
)
MIN_REPS = 12  # the budget never cuts a case below this many repetitions

# --- the correctness guard --------------------------------------------------------------------------

# (rtol, atol relative to the reference's largest magnitude: sums over many terms scale with it).
# bfloat16 (CUDA only, not exercised on the CPU machine this was written on): about 2 bfloat16 ulps.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2)}


class GuardError(RuntimeError):
    pass


def _check_close(what: str, got: Tensor, ref: Tensor) -> None:
    """got (the case's dtype) against ref (that dtype, or a float64 oracle), at got's tolerance."""
    rtol, atol_rel = TOLERANCES[got.dtype]
    atol = atol_rel * max(1.0, ref.abs().max().item())
    got = got.to(ref.dtype)
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=rtol, atol=atol):
        err = (got - ref).abs().max().item() if got.shape == ref.shape else float("nan")
        raise GuardError(
            f"{what} does not match the reference (shape {list(got.shape)} vs {list(ref.shape)}, "
            f"max abs error {err:.3g}, rtol={rtol:g}, atol={atol:.3g})"
        )


Reference = tuple[Tensor, tuple[Tensor, ...]]  # (output, gradients of its sum w.r.t. the leaves)


def conv_reference(source: nn.Conv2d, transform: str, x: Tensor) -> Reference:
    """A conv case's reference: a forum module built here, in the case's dtype."""
    y = ForumConv2d(source, transform).train()(x)
    return y.detach(), torch.autograd.grad(y.sum(), [source.weight, source.bias])


def decoder_reference(tie: DecoderTie, transform: str, h: Tensor) -> Reference:
    """A decoder case's reference: F.conv_transpose2d(h, f(W), b) in float64 on copies of the
    leaves, f written in torch ops (FORUM_TRANSFORMS), geometry read from the encoder and the tie,
    never from a contender's module."""
    s = tie.source
    w, b = (t.detach().double().requires_grad_(True) for t in tie.leaves)
    y = F.conv_transpose2d(
        h.detach().double(),
        FORUM_TRANSFORMS[transform](w),
        b,
        s.stride,
        s.padding,
        tie.output_padding,
        s.groups,
        s.dilation,
    )
    return y.detach(), torch.autograd.grad(y.sum(), [w, b])


def guard(runners: dict[str, Runner], reference: Reference, x: Tensor, mode: Mode) -> None:
    """Every contender's output, and when training the gradients with respect to the leaves it
    shares with the case (the source's W and the bias), must equal the reference's.

    The reference is computed by the caller without any contender (conv_reference,
    decoder_reference), so the check does not depend on which contenders were selected. Each
    contender runs as the mode runs it (under no_grad for inference, inside its scope), since that
    is the path being timed and an operator may take another path with autograd off.
    """
    ref_y, ref_grads = reference
    for name, runner in runners.items():
        mode.prepare(runner)
        with torch.set_grad_enabled(mode.trains):
            y = runner.module(x)
        _check_close(f"{name} output", y.detach(), ref_y.detach())
        if mode.trains and runner.grads_wrt_source:
            grads = torch.autograd.grad(y.sum(), runner.params)
            for label, g, rg in zip(("d/dW", "d/db"), grads, ref_grads):
                _check_close(f"{name} gradient {label}", g, rg)


class ScopeError(RuntimeError):
    pass


TIED_LAYERS = (fusedtie.FusedTiedConv2d, fusedtie.FusedTiedConvTranspose2d)


def check_cache_scope(runners: dict[str, Runner]) -> None:
    """With the scopes open: fusedtie+cache's tied layer, and no other, must be in its scope.

    A cached `fusedtie` contender would be timed as something it is not (see the module docstring).
    """
    for name, runner in runners.items():
        for layer in runner.module.modules():
            if not isinstance(layer, TIED_LAYERS):
                continue
            expected = name == CACHED
            if fusedtie.cache._in_scope(layer) != expected:
                raise ScopeError(
                    f"{name}'s {type(layer).__name__} is {'not' if expected else 'also'} cached while "
                    f"{CACHED}'s scope, fusedtie.cached(its own layer), is open "
                    f"(fusedtie.cache._in_scope returned {not expected}), so {name} would not be "
                    "timed as what it claims to be"
                )


# --- timing and memory ------------------------------------------------------------------------------


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs a call and returns its duration in seconds, device work included."""
    if device.type == "cuda":

        def timed(call):
            # Kernels run asynchronously: wait for earlier work before starting the clock, and for
            # this call's work before stopping it.
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            torch.cuda.synchronize(device)
            return time.perf_counter() - start
    else:

        def timed(call):
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

    return timed


@contextlib.contextmanager
def _fd2_silenced() -> Iterator[None]:
    """Silences file descriptor 2 (the profiler's C++ start/stop lines would break the progress bar)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tree_nodes(nodes) -> Iterator:
    for node in nodes:
        yield node
        yield from _tree_nodes(node.children)


def cpu_step_peak_bytes(call: Callable[[], object]) -> int:
    """Peak of the running sum of CPU-allocator allocations and frees during one call (bytes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _fd2_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()  # its result is dropped at once, inside the profile: the output's free is recorded
    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = sorted((n for n in _tree_nodes(tree) if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    running = peak = 0
    for event in events:
        if event.extra_fields.device.type != "cpu":
            continue
        running += event.extra_fields.alloc_size  # negative for a free
        peak = max(peak, running)
    return peak


def cuda_step_peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def step_peak_mib(call: Callable[[], object], device: torch.device) -> Optional[float]:
    """The step's peak memory in MiB; None where this torch lacks the profiler API used on CPU."""
    if device.type == "cuda":
        return cuda_step_peak_bytes(call, device) / 2**20
    try:
        return cpu_step_peak_bytes(call) / 2**20
    except (AttributeError, ImportError) as error:  # private profiler API: may move in a later torch
        _warn_once(f"no CPU memory figures: torch.profiler's event tree is unavailable ({error})")
        return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"\nbench: warning: {message}\n")


# --- one case ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    shape: ShapeCase
    transform: str
    dtype: torch.dtype
    mode: Mode

    def describe(self, with_dtype: bool) -> str:
        dtype = f" | {dtype_name(self.dtype)}" if with_dtype else ""
        return f"{self.shape.describe()} | {self.transform}{dtype} | {self.mode.name}"


@dataclass
class CaseResult:
    """Per contender: timed samples, first-call time and peak step memory."""

    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    first_call_ms: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, Optional[float]] = field(default_factory=dict)
    algorithm: Optional[str] = None  # the CPU algorithm fusedtie ran (auto's choice, or the forced one)

    @property
    def baseline_ms(self) -> float:
        """plain's median: the denominator of every ratio."""
        return statistics.median(self.samples_ms[BASELINE])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_runners(case: Case, contenders: list[Contender], tie) -> dict[str, Runner]:
    """tie: the source nn.Conv2d of a conv case, the DecoderTie of a decoder case."""
    return {c.name: c.builder(case.shape.kind)(tie, case.transform, case.mode.trains) for c in contenders}


def time_round_robin(
    runners: dict[str, Runner],
    x: Tensor,
    mode: Mode,
    settings: Settings,
    budget_s: Optional[float],
    device: torch.device,
) -> dict[str, list[float]]:
    """Warm-up, then the interleaved, rotated repetitions; per-call durations in milliseconds."""
    timed = make_timer(device)
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    # A collection pass in the middle of a timed call would be charged to whichever contender ran.
    gc.collect()
    gc.disable()
    deadline = None
    try:
        for rep in range(settings.warmup + settings.reps):
            timed_reps = rep - settings.warmup
            if timed_reps == 0 and budget_s is not None:
                deadline = time.perf_counter() + budget_s
            if (
                deadline is not None
                and timed_reps >= MIN_REPS
                and timed_reps % len(names) == 0
                and time.perf_counter() > deadline
            ):
                break  # at a whole rotation, so every contender ran equally often in each slot
            # Rotating the order spreads drift (thermal, other tenants) and any after-effect of the
            # previous contender (caches, allocator) evenly over all contenders.
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                runner = runners[name]
                seconds = timed(lambda: mode.step(runner, x))
                if rep >= settings.warmup:
                    samples[name].append(seconds * 1e3)
    finally:
        gc.enable()
    return samples


def run_case(case: Case, settings: Settings, budget_s: Optional[float], device: torch.device) -> CaseResult:
    """Scopes, first calls, guard, timings and memory of every contender on one case."""
    mode = case.mode
    contenders = settings.contenders_for(case.shape, mode)
    compiles = any(c.name == COMPILED for c in contenders)
    if compiles:
        torch._dynamo.reset()  # a new module per case: start each compilation from a clean slate
    torch.manual_seed(0)
    source = case.shape.source_conv(device, case.dtype)
    x = case.shape.input(device, case.dtype)
    if case.shape.kind == DECODER:
        tie = make_decoder_tie(case.shape, source)
        reference = lambda: decoder_reference(tie, case.transform, x)  # noqa: E731
    else:
        tie = source
        reference = lambda: conv_reference(source, case.transform, x)  # noqa: E731
    runners = build_runners(case, contenders, tie)
    timed = make_timer(device)
    result = CaseResult(algorithm=fusedtie_cpu_algorithm(case.shape, source, x))
    try:
        for runner in runners.values():
            mode.prepare(runner)
            runner.open_scope()
        if CACHED in runners:
            check_cache_scope(runners)
        result.first_call_ms = {name: 1e3 * timed(lambda: mode.step(r, x)) for name, r in runners.items()}
        guard(runners, reference(), x, mode)
        for runner in runners.values():
            mode.prepare(runner)
        result.samples_ms = time_round_robin(runners, x, mode, settings, budget_s, device)
        result.peak_mib = {name: step_peak_mib(lambda: mode.step(r, x), device) for name, r in runners.items()}
    finally:
        for runner in runners.values():
            runner.close_scope()
        if compiles:
            torch._dynamo.reset()
    return result


def fusedtie_cpu_algorithm(shape: ShapeCase, source: nn.Conv2d, x: Tensor) -> Optional[str]:
    """The CPU algorithm fusedtie runs on this case, "forward/backward" where the two differ (None
    on CUDA); the transposed operator's CPU path is always the library."""
    if x.device.type != "cpu":
        return None
    if shape.kind == DECODER:
        return "library"
    # The benchmark's training step wants no input gradient (the input is data, not a parameter).
    forward, backward = (
        fusedtie.cpu_conv_algorithm_for(
            x,
            source.weight,
            source.stride,
            source.padding,
            source.dilation,
            source.groups,
            backward=b,
            input_gradient=False,
        )
        for b in (False, True)
    )
    return forward if forward == backward else f"{forward}/{backward}"


def summarise(samples: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_pct": 100.0 * (q3 - q1) / median}


def case_records(case: Case, result: CaseResult) -> list[dict]:
    """One JSON record per contender of a case."""
    records = []
    base = result.baseline_ms
    for name, values in result.samples_ms.items():
        stats = summarise(values)
        record = {
            "shape": case.shape.describe(),
            "shape_name": case.shape.name,
            "shape_params": dataclasses.asdict(case.shape),
            "kind": case.shape.kind,
            "transform": case.transform,
            "dtype": dtype_name(case.dtype),
            "mode": case.mode.name,
            "contender": name,
            "fusedtie_cpu_algorithm": result.algorithm,
            **stats,
            "n": len(values),
            "ratio_to_plain": stats["median_ms"] / base,
            "first_call_ms": result.first_call_ms[name],
            "peak_mib": result.peak_mib[name],
            "loadavg_after": os.getloadavg()[0],
            "samples_ms": values,
        }
        if name == COMPILED:
            record["compile_s"] = result.first_call_ms[name] / 1e3
        records.append(record)
    return records


# --- reporting --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedtie": getattr(fusedtie, "__version__", "unknown"),
        "fusedtie_cuda_compiled": bool(getattr(fusedtie, "cuda_compiled", False)),
        "fusedtie_has_cached": callable(getattr(fusedtie, "cached", None)),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_info": fusedtie.cpu_info(),
        "mkl_env": {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR") if k in os.environ},
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_at_start": os.getloadavg()[0],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _row_key(r: dict) -> tuple:
    return (r["shape"], r["transform"], r["dtype"], r["mode"])


def group_by_case(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(shape, transform, dtype, mode): {contender: record}}, in run order."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in results:
        cases.setdefault(_row_key(r), {})[r["contender"]] = r
    return cases


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _case_cells(key: tuple, with_dtype: bool) -> list[str]:
    shape, transform, dtype, mode = key
    return [shape, transform] + ([dtype] if with_dtype else []) + [mode]


def ratio_table(results: list[dict], contenders: list[str]) -> str:
    """plain's median and IQR, then every other contender's ratio to plain, one row per case."""
    cases = group_by_case(results)
    with_dtype = len({k[2] for k in cases}) > 1
    others = [c for c in contenders if c != BASELINE]
    with_algorithm = any(r.get("fusedtie_cpu_algorithm") for r in results)
    header = (
        ["shape", "f"]
        + (["dtype"] if with_dtype else [])
        + ["mode"]
        + (["algorithm"] if with_algorithm else [])
        + ["plain ms", "IQR %"]
        + others
    )
    align = ["---"] * (3 + with_dtype + with_algorithm) + ["---:"] * (2 + len(others))
    rows = []
    for key, by_name in cases.items():
        base = by_name[BASELINE]
        cells = _case_cells(key, with_dtype) + ([base["fusedtie_cpu_algorithm"] or ""] if with_algorithm else [])
        cells += [f"{base['median_ms']:.3f}", f"{base['iqr_pct']:.0f}"]
        cells += [
            f"{by_name[c]['ratio_to_plain']:.2f}" + (" !" if bench_targets.flagged(c, by_name) else "")
            if c in by_name
            else ""
            for c in others
        ]
        rows.append(cells)
    return _table(header, align, rows)


def target_report(results: list[dict]) -> tuple[list[str], list]:
    """The closing lines (worst ratios) and every missed target (bench_targets)."""
    cases = group_by_case(results)
    with_dtype = len({k[2] for k in cases}) > 1
    described = {" | ".join(_case_cells(key, with_dtype)): by_name for key, by_name in cases.items()}
    return bench_targets.summary(described)


def _mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def memory_table(results: list[dict], contenders: list[str]) -> str:
    cases = group_by_case(results)
    with_dtype = len({k[2] for k in cases}) > 1
    header = ["shape", "f"] + (["dtype"] if with_dtype else []) + ["mode"] + contenders
    align = ["---"] * (3 + with_dtype) + ["---:"] * len(contenders)
    rows = []
    for key, by_name in cases.items():
        cells = _case_cells(key, with_dtype)
        cells += [_mib(by_name[c]["peak_mib"]) if c in by_name else "" for c in contenders]
        rows.append(cells)
    return _table(header, align, rows)


def compile_times(results: list[dict]) -> list[dict]:
    return [
        {
            "shape": r["shape"],
            "transform": r["transform"],
            "dtype": r["dtype"],
            "mode": r["mode"],
            "compile_s": r["compile_s"],
        }
        for r in results
        if r["contender"] == COMPILED
    ]


def compile_summary(times: list[dict], compile_on: str) -> str:
    if not times:
        return f"compile: not run (--compile {compile_on})"
    where = "" if compile_on == "all" else f" (--compile some: only {', '.join(COMPILE_SOME_SHAPES)})"
    first = times[0]["compile_s"]
    text = (
        f"compile: first call (dynamo + inductor), {len(times)} cases{where}, "
        f"{sum(t['compile_s'] for t in times):.0f} s in all: the run's first compilation "
        f"{first:.1f} s (includes inductor's start-up)"
    )
    later = sorted(t["compile_s"] for t in times[1:])
    if later:
        text += f", the others {statistics.median(later):.1f} s median ({later[0]:.1f}-{later[-1]:.1f} s)"
    return text


class Progress:
    """One line per case on stderr, with an ETA; redrawn in place when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        width = 20
        filled = width * done // self.total
        eta = f" ETA {elapsed / done * (self.total - done):4.0f}s" if done else ""
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:5.1f}s{eta} {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(("\r\033[K" if self.tty else "") + f"done: {self.total} cases in {elapsed:.1f}s\n")
        return elapsed


# Ratio ticks for the log axis: readable values, whichever range the data spans.
_RATIO_TICKS = [
    0.1,
    0.2,
    0.25,
    0.33,
    0.5,
    0.67,
    0.8,
    0.9,
    1,
    1.1,
    1.25,
    1.5,
    2,
    2.5,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    50,
    100,
]


def _ratio_ticks(low: float, high: float) -> list[float]:
    inside = [t for t in _RATIO_TICKS if low <= t <= high]
    step = max(1, len(inside) // 9)  # at most about 9 labels a panel
    ticks = inside[::step]
    return sorted(set(ticks) | {1})


def _plot_panel(ax, keys: list[tuple], cases: dict, names: list[str], colors: dict[str, str], with_dtype: bool) -> None:
    """Grouped bars of one mode, each rising or falling from the 1.0 line (plain)."""
    present = [n for n in names if any(n in cases[k] for k in keys)]
    width = 0.8 / max(1, len(present))
    ratios = [cases[k][n]["ratio_to_plain"] for k in keys for n in present if n in cases[k]]
    for j, name in enumerate(present):
        offset = (j - (len(present) - 1) / 2) * width
        points = [(i + offset, cases[k][name]["ratio_to_plain"]) for i, k in enumerate(keys) if name in cases[k]]
        ax.bar(
            [p[0] for p in points], [p[1] - 1 for p in points], bottom=1, width=width, label=name, color=colors[name]
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    low, high = min(ratios + [1]) / 1.08, max(ratios + [1]) * 1.08
    ax.set_ylim(low, high)
    ax.set_yticks(_ratio_ticks(low, high))
    ax.set_yticklabels([f"{t:g}" for t in _ratio_ticks(low, high)])
    ax.minorticks_off()
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(
        [f"{k[0].split(':')[0]}\n{k[1]}" + (f" {k[2]}" if with_dtype else "") for k in keys],
        rotation=90 if len(keys) > 16 else 0,
        fontsize=8,
    )
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_ylabel("median time / plain's (log)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=len(present), fontsize=8, loc="best")


def plot_ratios(results: list[dict], contenders: list[str], env: dict, path: str) -> None:
    """A PNG: per mode a panel of grouped bars (one per contender) of the ratio to plain per case."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench: --plot needs matplotlib, which is not installed (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [c for c in contenders if c != BASELINE]
    colors = {name: f"C{i}" for i, name in enumerate(others)}  # the same colour in every panel
    modes = list(dict.fromkeys(r["mode"] for r in results))
    cases = group_by_case(results)
    groups = {mode: [k for k in cases if k[3] == mode] for mode in modes}
    most = max(len(g) for g in groups.values())
    fig, axes = plt.subplots(
        len(modes), 1, squeeze=False, figsize=(max(8.0, 0.2 * most * len(others) + 2), 4.2 * len(modes))
    )
    with_dtype = len({k[2] for k in cases}) > 1
    for ax, mode in zip(axes[:, 0], modes):
        _plot_panel(ax, groups[mode], cases, others, colors, with_dtype)
        ax.set_title(f"{mode} (below 1: faster than plain)", fontsize=10)
    where = env.get("gpu") or env["cpu"]
    fig.suptitle(
        f"fusedtie benchmark: median time relative to plain (f(W) precomputed), lower is "
        f"better\n{env['device']} ({where}), torch {env['torch']}, {env['threads']} threads, "
        f"{env['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------


def _split(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        help="representative subset, about 2 minutes on 2 CPU cores (default)",
    )
    size.add_argument("--full", dest="size", action="store_const", const="full", help="every shape, more repetitions")
    parser.set_defaults(size="quick")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads value (default: torch's own default)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "both"),
        default="auto",
        help="auto: float32 on CPU, float32 and bfloat16 on CUDA",
    )
    parser.add_argument("--json", metavar="PATH", help="also write results and environment here")
    parser.add_argument("--plot", metavar="PNG", help="also draw the ratios to plain here (matplotlib)")
    parser.add_argument("--reps", type=int, help="override the number of timed repetitions")
    parser.add_argument("--warmup", type=int, help="override the number of warm-up repetitions")
    parser.add_argument(
        "--case-budget", type=float, metavar="SECONDS", help="cap on the timed repetitions of one case (0: no cap)"
    )
    parser.add_argument(
        "--compile",
        dest="compile_on",
        choices=("all", "some", "none"),
        help="cases on which torch.compile runs (default: some for --quick, all "
        f"for --full; some = {', '.join(COMPILE_SOME_SHAPES)})",
    )
    parser.add_argument(
        "--cpu-algorithm",
        choices=("auto", "library", "gemm", "brgemm", "depthwise"),
        default="auto",
        help="force fusedtie's CPU convolution algorithm (fusedtie."
        "use_cpu_conv_algorithm): library = oneDNN, the one plain runs; "
        "gemm = im2col + BLAS; depthwise = fusedtie's fused depthwise kernel; "
        "auto (default) = fusedtie's per-shape choice",
    )
    parser.add_argument(
        "--cuda-algorithm",
        choices=("auto", "autotune", "fused", "library"),
        default="auto",
        help="force fusedtie's CUDA convolution algorithm (fusedtie.use_cuda_conv_algorithm): "
        "fused = fusedtie's fused kernels; library = transform kernel + cuDNN; "
        "autotune = both timed once per shape; auto (default) = the heuristic",
    )
    parser.add_argument(
        "--shapes",
        metavar="SUBSTRING",
        help="only cases whose shape description contains this (e.g. b32, conv5_x, "
        "decoder); several, comma-separated: any of them",
    )
    parser.add_argument("--transforms", metavar="LIST", help=f"comma-separated, of {','.join(TRANSFORMS)}")
    parser.add_argument(
        "--contenders", metavar="LIST", help=f"comma-separated, of {','.join(CONTENDER_NAMES)} (plain always runs)"
    )
    parser.add_argument("--modes", metavar="LIST", help=f"comma-separated, of {','.join(m.name for m in MODES)}")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.reps is not None and args.reps < 4:
        parser.error("--reps must be at least 4 (the quartiles need a few samples)")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be non-negative")
    for option, known in (
        ("transforms", TRANSFORMS),
        ("contenders", CONTENDER_NAMES),
        ("modes", [m.name for m in MODES]),
    ):
        chosen = _split(getattr(args, option))
        unknown = [v for v in chosen or [] if v not in known]
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        setattr(args, option, chosen)
    return args


def select_contenders(wanted: Optional[list[str]]) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run (plain always) and the reasons of those that cannot run here."""
    skipped = {}
    chosen = []
    for c in CONTENDERS:
        if c.name != BASELINE and wanted is not None and c.name not in wanted:
            continue
        reason = c.unavailable()
        if reason:
            skipped[c.name] = reason
            continue
        chosen.append(c)
    return chosen, skipped


def select_dtypes(choice: str, device: torch.device) -> list[torch.dtype]:
    if choice == "auto":
        choice = "both" if device.type == "cuda" else "float32"
    return {"float32": [torch.float32], "bfloat16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[choice]


def make_settings(args: argparse.Namespace, device: torch.device) -> tuple[Settings, dict[str, str]]:
    preset = QUICK if args.size == "quick" else FULL
    shapes = preset["shapes"](device)
    if args.shapes:  # comma-separated alternatives (no description contains a comma)
        wanted = _split(args.shapes)
        shapes = [s for s in shapes if any(w in s.describe() for w in wanted)]
        if not shapes:
            sys.exit(f"bench: --shapes {args.shapes!r} matches no shape of --{args.size}")
    contenders, skipped = select_contenders(args.contenders)
    settings = Settings(
        shapes=shapes,
        transforms=[t for t in (args.transforms or TRANSFORMS) if t in FORUM_TRANSFORMS],
        modes=[m for m in MODES if args.modes is None or m.name in args.modes],
        contenders=contenders,
        dtypes=select_dtypes(args.dtype, device),
        compile_on=args.compile_on or preset["compile_on"],
        warmup=preset["warmup"] if args.warmup is None else args.warmup,
        reps=preset["reps"] if args.reps is None else args.reps,
        case_budget_s=preset["case_budget_s"] if args.case_budget is None else (args.case_budget or None),
        # An explicit --case-budget is taken as it is.
        run_target_s=preset["run_target_s"] if args.case_budget is None else None,
        decoder_case_budget_s=preset["decoder_case_budget_s"] if args.case_budget is None else None,
    )
    return settings, skipped


def check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench: --device cuda, but torch sees no CUDA device")
        if not getattr(fusedtie, "cuda_compiled", False):
            sys.exit("bench: --device cuda, but the fusedtie extension was built without CUDA")


def announce(
    args: argparse.Namespace, settings: Settings, cases: list[Case], env: dict, skipped: dict[str, str]
) -> None:
    sys.stderr.write(
        f"bench ({args.size}): {len(cases)} cases, contenders "
        f"{', '.join(c.name for c in settings.contenders)}; {settings.warmup} warm-up + "
        f"{settings.reps} timed repetitions, {env['threads']} threads on {env['device']}; "
        f"--compile {settings.compile_on}; --cpu-algorithm {args.cpu_algorithm}; "
        f"--cuda-algorithm {args.cuda_algorithm}\n"
    )
    for name, reason in skipped.items():
        sys.stderr.write(f"bench: note: skipping {name}: {reason}\n")
    # Other work on the machine shows up as noise and as a bias against whichever contender happens
    # to be running; say so up front, and keep the load per case in the JSON for the reader.
    if env["loadavg_at_start"] > 0.5 * (os.cpu_count() or 1):
        sys.stderr.write(
            f"bench: warning: load average {env['loadavg_at_start']:.2f} on "
            f"{os.cpu_count()} CPUs before starting; timings will be noisy\n"
        )


class Pacer:
    """Each case's timed budget: the cap, or less when the run is behind its target.

    The time left is shared out equally among the cases left, after reserving for each its
    untimed work (first calls, guard, memory: the median so far, since the first case also
    pays one-off start-up costs) and for each compilation still to come (the median of those after
    the first, which includes inductor's start-up; priors below). Cases whose cap is below the
    equal share (decoder cases in --quick) take only their cap and leave the rest to the others
    (_level). A budget of 0 still runs MIN_REPS rotations, so a very busy machine overruns the
    target rather than measuring nothing.
    """

    FIRST_COMPILE_S = 15.0  # priors, measured on the 2-core CPU machine
    COMPILE_S = 4.0
    UNTIMED_S = 0.5

    def __init__(self, caps: list[Optional[float]], target_s: Optional[float], compiles: list[bool]):
        self.caps = caps  # per case; None: no cap
        self.target_s = target_s
        self.compiles = compiles
        self.start = time.perf_counter()
        self.untimed_s: list[float] = []
        self.compile_s: list[float] = []

    @staticmethod
    def _level(total: float, caps: list[Optional[float]]) -> float:
        """The level s at which sum(min(cap, s) over caps) == total (caps of None: no cap): the
        cases capped below it take their cap, the others share the rest equally."""
        finite = sorted(c for c in caps if c is not None)
        below = 0.0
        for k, cap in enumerate(finite):
            level = (total - below) / (len(caps) - k)
            if level <= cap:
                return level
            below += cap
        if len(finite) == len(caps):
            return float("inf")  # time for every cap
        return (total - below) / (len(caps) - len(finite))

    def budget(self, i: int) -> Optional[float]:
        cap = self.caps[i]
        if self.target_s is None:
            return cap
        left = self.target_s - (time.perf_counter() - self.start)
        to_compile = sum(self.compiles[i:])
        if to_compile and not self.compile_s:
            left -= self.FIRST_COMPILE_S - self.COMPILE_S
        later = self.compile_s[1:]
        left -= to_compile * (statistics.median(later) if later else self.COMPILE_S)
        untimed_each = statistics.median(self.untimed_s) if self.untimed_s else self.UNTIMED_S
        share = self._level(left - untimed_each * (len(self.caps) - i), self.caps[i:])
        share = max(0.0, share)
        return share if cap is None else min(cap, share)

    def record(self, wall_s: float, result: CaseResult) -> None:
        timed_s = sum(sum(v) for v in result.samples_ms.values()) / 1e3
        compile_s = result.first_call_ms.get(COMPILED, 0.0) / 1e3
        if COMPILED in result.first_call_ms:
            self.compile_s.append(compile_s)
        self.untimed_s.append(max(0.0, wall_s - timed_s - compile_s))


def run_all(cases: list[Case], settings: Settings, device: torch.device) -> tuple[list[dict], float]:
    progress = Progress(len(cases))
    pacer = Pacer(
        [settings.case_cap(case.shape) for case in cases],
        settings.run_target_s,
        [any(c.name == COMPILED for c in settings.contenders_for(case.shape, case.mode)) for case in cases],
    )
    with_dtype = len(settings.dtypes) > 1
    results = []
    for i, case in enumerate(cases):
        label = case.describe(with_dtype)
        progress.update(i, label)
        started = time.perf_counter()
        budget = pacer.budget(i)
        try:
            result = run_case(case, settings, budget, device)
        except GuardError as error:
            sys.stderr.write("\n")
            sys.exit(
                f"bench: ABORTED, wrong result in case [{label}]: {error}. "
                "Timings of a kernel that computes the wrong thing mean nothing; fix it first."
            )
        except ScopeError as error:
            sys.stderr.write("\n")
            sys.exit(f"bench: ABORTED in case [{label}]: {error}.")
        pacer.record(time.perf_counter() - started, result)
        for record in case_records(case, result):
            record["case_budget_s"] = budget
            results.append(record)
    return results, progress.finish()


def print_report(
    args: argparse.Namespace, settings: Settings, env: dict, results: list[dict], skipped: dict[str, str]
) -> None:
    ran = [c.name for c in settings.contenders if any(r["contender"] == c.name for r in results)]
    budget = "" if settings.case_budget_s is None else f" (at most {settings.case_budget_s:g}s a case"
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    if budget and DECODER in kinds and settings.decoder_case_budget_s is not None:
        budget += f", {settings.decoder_case_budget_s:g}s a decoder case"
    if settings.run_target_s is not None:
        budget += f", less when behind the run's {settings.run_target_s:g}s target"
    budget += ")" if budget else ""
    info = env["cpu_info"]
    cpu = f"{info['vendor'] or 'unknown vendor'} {env['cpu']}, BLAS {info['blas']}" + "".join(
        f", {k}={v}" for k, v in env["mkl_env"].items()
    )
    print(
        f"fusedtie benchmark ({args.size}): torch {env['torch']}, {env['device']}, "
        f"{env['threads']} threads, {env.get('gpu') or cpu}; {settings.warmup} warm-up + "
        f"{settings.reps} timed repetitions{budget}, contenders interleaved; fusedtie CPU conv "
        f"algorithm: {args.cpu_algorithm}; CUDA conv algorithm: {args.cuda_algorithm}\n"
    )
    for kind in kinds:
        print(f"Baseline (plain) of the {kind} cases: {BASELINE_BY_KIND[kind]}.")
    if env["device"] == "cpu":
        print(f"fusedtie's GEMM path under auto: {'yes' if info['gemm_under_auto'] else 'no'} ({info['reason']}).")
    print(
        "\nTime: plain's median (ms) and IQR, and every contender's median / plain's median "
        "(algorithm: the CPU algorithm fusedtie ran, forward/backward where they differ; ! marks a missed target):\n"
    )
    print(ratio_table(results, ran))
    for name, reason in skipped.items():
        print(f"\nSkipped {name}: {reason}.")
    print("\nPeak memory of one step (MiB allocated beyond what existed before it):\n")
    print(memory_table(results, ran))
    print("\n" + compile_summary(compile_times(results), settings.compile_on))
    # plain runs in every case: its n is the case's repetitions.
    reps = sorted(r["n"] for r in results if r["contender"] == BASELINE)
    cut = sum(n < settings.reps for n in reps)
    if cut:
        print(
            f"Timed repetitions per case: {reps[0]}-{reps[-1]}, median {statistics.median(reps):g}; "
            f"{cut} of {len(reps)} cases cut short by the time budget (each case's n and budget "
            "are in the JSON)"
        )
    lines, misses = target_report(results)
    print(
        "\nTargets (benchmarks/README.md): fusedtie/plain <= 1.05, fusedtie+cache/plain <= 1.02 in "
        "inference, fusedtie <= forum."
    )
    for line in lines:
        print(line)
    if misses:
        print(f"ABOVE TARGET in {len(misses)} place(s):")
        for miss in misses:
            print(miss.line())
    else:
        print("every case within its targets")


def write_json(
    path: str,
    args: argparse.Namespace,
    settings: Settings,
    env: dict,
    results: list[dict],
    skipped: dict[str, str],
    wall: float,
) -> None:
    worst, misses = target_report(results)
    out = {
        "environment": env,
        "settings": {
            "size": args.size,
            "warmup": settings.warmup,
            "reps": settings.reps,
            "min_reps": MIN_REPS,
            "case_budget_s": settings.case_budget_s,
            "run_target_s": settings.run_target_s,
            "shapes": [s.describe() for s in settings.shapes],
            "shapes_filter": args.shapes,
            "transforms": settings.transforms,
            "modes": [m.name for m in settings.modes],
            "dtypes": [dtype_name(d) for d in settings.dtypes],
            "contenders": [c.name for c in settings.contenders],
            "baseline": BASELINE,
            "baseline_by_kind": BASELINE_BY_KIND,
            "guard_reference_by_kind": GUARD_REFERENCE_BY_KIND,
            "decoder_case_budget_s": settings.decoder_case_budget_s,
            "skipped_contenders": skipped,
            "compile_on": settings.compile_on,
            "cpu_algorithm": args.cpu_algorithm,
            "cuda_algorithm": args.cuda_algorithm,
            "compile_some_shapes": list(COMPILE_SOME_SHAPES),
            "tolerances": {dtype_name(d): {"rtol": t[0], "atol_relative": t[1]} for d, t in TOLERANCES.items()},
            "memory": (
                "cuda max_memory_allocated - memory_allocated before the step"
                if env["device"].startswith("cuda")
                else "CPU: peak running sum of torch.profiler allocation events during one step"
            ),
            "wall_seconds": wall,
        },
        "compile_times": compile_times(results),
        "targets": {"worst": worst, "missed": [dataclasses.asdict(m) for m in misses]},
        "results": results,
    }
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    sys.stderr.write(f"wrote {path}\n")


@contextlib.contextmanager
def private_inductor_cache(compiles: bool) -> Iterator[str]:
    """An empty inductor cache directory for this run, unless the user chose one (or none compiles).

    Yields the directory used, for the JSON.
    """
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not compiles or chosen is not None:
        yield chosen or "(not used)"
        return
    with tempfile.TemporaryDirectory(prefix="bench-inductor-", ignore_cleanup_errors=True) as path:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        try:
            yield f"private, fresh: {path}"
        finally:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]


def forced_algorithm(device: str, name: str) -> ContextManager:
    """fusedtie.use_{device}_conv_algorithm(name) for the whole run (auto: fusedtie's own default)."""
    use = getattr(fusedtie, f"use_{device}_conv_algorithm", None)
    if use is None:
        if name != "auto":
            sys.exit(
                f"bench: --{device}-algorithm {name}, but this build of fusedtie has no use_{device}_conv_algorithm"
            )
        return contextlib.nullcontext()
    return use(name)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check_device(device)
    settings, skipped = make_settings(args, device)
    env = environment(device)
    cases = [
        Case(s, t, d, m)
        for s in settings.shapes
        for t in settings.transforms
        for d in settings.dtypes
        for m in settings.modes
    ]
    announce(args, settings, cases, env, skipped)
    compiles = any(c.name == COMPILED for c in settings.contenders) and settings.compile_on != "none"
    with (
        private_inductor_cache(compiles) as inductor_cache,
        forced_algorithm("cpu", args.cpu_algorithm),
        forced_algorithm("cuda", args.cuda_algorithm),
    ):
        env["inductor_cache_dir"] = inductor_cache
        results, wall = run_all(cases, settings, device)
    print_report(args, settings, env, results, skipped)
    if args.json:
        write_json(args.json, args, settings, env, results, skipped, wall)
    if args.plot:
        plot_ratios(results, [c.name for c in settings.contenders], env, args.plot)
        sys.stderr.write(f"wrote {args.plot}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
