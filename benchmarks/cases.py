"""What the benchmark measures: the transforms, the shapes, the --quick and --full grids, the modes
and one case (shape, transform, dtype, mode). benchmarks/README.md says why these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

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
]
# --compile some: the weight-heaviest 3x3, where recomputing f(W) costs most (the seed's f(W) is
# negligible next to its conv, so compile can only match forum there).
COMPILE_SOME_SHAPES = ("conv5_x 3x3 b1",)


def quick_shapes(device: torch.device) -> list[ShapeCase]:
    by_name = {s.name: s for s in full_shapes(device)}
    return [by_name[name] for name in QUICK_SHAPE_NAMES]


def compiles_on(compile_on: str, shape: ShapeCase) -> bool:
    return compile_on == "all" or (compile_on == "some" and shape.name in COMPILE_SOME_SHAPES)


# --quick finishes in about 2 minutes on a 2-core CPU, busy or not (benchmarks/README.md, "--quick and its
# 2-minute budget"). Budgets: seconds of timed repetitions per case; harness.Pacer shares out run_target_s.
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
