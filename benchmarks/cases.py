"""What the benchmark measures: the transforms, the shapes, the --quick and --full grids, the modes
and one case (shape, transform, dtype, mode). benchmarks/README.md says why these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from contenders import Runner

# f written with ordinary torch ops: the forum recipe's f, the plain contender's precomputation and
# the reference of the correctness guard. A transform is benchmarked only if it is listed here.
FORUM_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "square": lambda w: w**2,
    "tanh": torch.tanh,
}
TRANSFORMS = ["square", "tanh"]


CONV = "conv"  # y = conv2d(x, f(W), b), the source's own geometry
DECODER = "decoder"  # y = conv_transpose2d(h, f(W), b): the decoder tied to an encoder conv
LINEAR = "linear"  # y = linear(x, f(W), b)
CONV1D = "conv1d"  # y = conv1d(x, f(W), b), the source's own geometry
# The spatial dimensions of each kind's input (and kernel): a ShapeCase's height is used only at 2,
# its width and kernel from 1 on.
SPATIAL_DIMS = {CONV: 2, DECODER: 2, CONV1D: 1, LINEAR: 0}


@dataclass(frozen=True)
class ShapeCase:
    """One timed layer: its input (batch, in_channels, height, width) and hyper-parameters.

    kind CONV: a conv2d, whose source has this geometry. kind DECODER: a transposed conv2d mapping
    in_channels to out_channels (the decoder of a tied autoencoder); its source is the encoder, an
    nn.Conv2d(out_channels, in_channels, kernel, stride, padding, groups), so the input h has the
    encoder output's shape and the output the encoder input's (with output_padding). kind CONV1D:
    a conv1d on (batch, in_channels, width), height None. kind LINEAR: an nn.Linear(in_channels,
    out_channels) (the features) on (batch, in_channels); height, width and kernel None.
    """

    label: str
    batch: int
    in_channels: int
    out_channels: int
    height: Optional[int]
    width: Optional[int]
    kernel: Optional[int]
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

    def input_shape(self) -> tuple[int, ...]:
        spatial = (self.height, self.width)[2 - SPATIAL_DIMS[self.kind] :]
        return (self.batch, self.in_channels, *spatial)

    def describe(self) -> str:
        dims = SPATIAL_DIMS[self.kind]
        kernel = {2: f" {self.kernel}x{self.kernel}", 1: f" k{self.kernel}", 0: ""}[dims]
        extra = ""
        if self.stride != 1:
            extra += f" s{self.stride}"
        if self.groups != 1:
            extra += f" g{self.groups}"
        if self.kind == DECODER:  # the padding decides a decoder's output size: always shown
            extra += f" p{self.padding}" + (f" op{self.output_padding}" if self.output_padding else "")
            extra += " -> {}x{}".format(*self.output_hw())
        return (
            f"{self.name}: {'x'.join(map(str, self.input_shape()))} "
            f"{self.in_channels}->{self.out_channels}{kernel}{extra}"
        )

    def source_layer(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The layer that owns W (and b): nn.Linear, nn.Conv1d, or nn.Conv2d (a decoder's encoder:
        out_channels -> in_channels)."""
        factory = dict(device=device, dtype=dtype)
        if self.kind == LINEAR:
            return nn.Linear(self.in_channels, self.out_channels, **factory)
        channels = (self.in_channels, self.out_channels)
        if self.kind == DECODER:
            channels = channels[::-1]
        conv = nn.Conv1d if self.kind == CONV1D else nn.Conv2d
        return conv(*channels, self.kernel, stride=self.stride, padding=self.padding, groups=self.groups, **factory)

    def input(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.randn(self.input_shape(), device=device, dtype=dtype)


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


def linear_shapes(batch: int) -> list[ShapeCase]:
    """Linear layers named in x out, as nn.Linear(in, out) takes them (benchmarks/README.md)."""
    d = dict(height=None, width=None, kernel=None, kind=LINEAR)
    return [
        ShapeCase("linear 4096x4096", batch, 4096, 4096, **d),  # a square projection (LLaMA-7B's q, k, v, o)
        ShapeCase("linear 1024x4096", batch, 1024, 4096, **d),  # a transformer FFN's up-projection
    ]


# wav2vec 2.0's feature encoder on one second of 16 kHz audio: 16000 samples -> k10 s5 -> 3199 ->
# four k3 s2 -> 1599, 799, 399, 199 -> two k2 s2 -> 99, 49 frames, 512 channels after the first.
def conv1d_shapes(batch: int) -> list[ShapeCase]:
    d = dict(height=None, kind=CONV1D)
    return [
        ShapeCase("conv1d k10 s5", batch, 1, 512, width=16000, kernel=10, stride=5, **d),  # raw audio in
        ShapeCase("conv1d k3 s2", batch, 512, 512, width=1599, kernel=3, stride=2, **d),  # the third layer
        ShapeCase("conv1d k2 s2", batch, 512, 512, width=99, kernel=2, stride=2, **d),  # the last layer
    ]


def full_shapes(device: torch.device) -> list[ShapeCase]:
    batches = [1, 8, 32] + ([256] if device.type == "cuda" else [])
    shapes = [seed_shape()]
    for batch in batches:
        shapes += resnet50_shapes(batch)
    shapes += [depthwise_shape(1), depthwise_shape(8)]
    for batch in [1, 8] + ([64] if device.type == "cuda" else []):
        shapes += decoder_shapes(batch)
    for batch in (1, 8, 64):
        shapes += linear_shapes(batch)
    for batch in (1, 8):
        shapes += conv1d_shapes(batch)
    return shapes


# --quick: benchmarks/README.md says why these.
QUICK_SHAPE_NAMES = [
    "seed b1",
    "conv5_x 3x3 b1",
    "conv5_x 1x1 b1",
    "conv4_x 3x3 b1",
    "conv5_x 1x1 b8",
    "depthwise 3x3 b1",
    "decoder 3x3 s2 b1",
    "decoder 4x4 s2 b1",
    "linear 4096x4096 b1",
    "linear 4096x4096 b8",
    "linear 1024x4096 b1",
    "conv1d k2 s2 b1",
]
# --compile some: the weight-heaviest 3x3, where recomputing f(W) costs most (the seed's f(W) is
# negligible next to its conv, so compile can only match forum there).
COMPILE_SOME_SHAPES = ("conv5_x 3x3 b1",)


def quick_shapes(device: torch.device) -> list[ShapeCase]:
    by_name = {s.name: s for s in full_shapes(device)}
    return [by_name[name] for name in QUICK_SHAPE_NAMES]


def compiles_on(compile_on: str, shape: ShapeCase) -> bool:
    return compile_on == "all" or (compile_on == "some" and shape.name in COMPILE_SOME_SHAPES)


# --quick finishes in about 3 minutes on a 2-core CPU, busy or not (benchmarks/README.md, "--quick and its
# 3-minute budget"). Budgets: seconds of timed repetitions per case; harness.Pacer shares out run_target_s.
QUICK = dict(
    shapes=quick_shapes,
    warmup=2,
    reps=300,
    case_budget_s=2.5,
    compile_on="some",
    run_target_s=170.0,
    kind_case_budget_s={DECODER: 1.0, CONV1D: 1.0},
)
FULL = dict(
    shapes=full_shapes,
    warmup=10,
    reps=400,
    case_budget_s=30.0,
    compile_on="all",
    run_target_s=None,
    kind_case_budget_s={},
)


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


@dataclass(frozen=True)
class Case:
    shape: ShapeCase
    transform: str
    dtype: torch.dtype
    mode: Mode

    def describe(self, with_dtype: bool) -> str:
        dtype = f" | {dtype_name(self.dtype)}" if with_dtype else ""
        return f"{self.shape.describe()} | {self.transform}{dtype} | {self.mode.name}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
