"""The process-wide settings of the operators and what they choose: the CPU and CUDA convolution
algorithms (context managers that restore the previous setting), the CPU's description, and the
CPU algorithm a given call would run. Re-exported by fusedtie.ops and fusedtie."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor

from ._library import LIB
from ._op_args import IntOrPair, PaddingLike, TransformLike, _pair, normalize_padding
from .transforms import Transform


@contextlib.contextmanager
def use_cpu_conv_algorithm(name: str) -> Iterator[None]:
    """Run the CPU path's convolutions with ``name`` inside the block (process-wide), then restore.

    ``"auto"`` (the default) picks per shape: ``"linear"`` wherever it applies, and the GEMM path
    only where torch's BLAS is MKL on an Intel CPU at its full instruction set (``cpu_info()`` says
    whether and why);
    ``"library"`` is ``at::convolution`` (oneDNN);
    ``"gemm"`` is fusedtie's im2col + BLAS GEMM (``csrc/cpu/gemm_conv2d.cpp``), where it applies
    (groups 1, float32/float64, contiguous NCHW); ``"depthwise"`` is fusedtie's depthwise kernel with
    f and f' fused into it (``csrc/cpu/depthwise_conv2d.cpp``), where it applies (groups ==
    in_channels, float32/float64, contiguous NCHW); ``"brgemm"`` is im2col and oneDNN's brgemm
    micro-kernel with f applied to each weight tile as it is packed and f' to each weight-gradient
    tile as it is written (``csrc/cpu/brgemm_conv2d.cpp``), where it applies (groups 1, float32,
    contiguous NCHW, batch 1 or outputs under 32x32); ``"linear"`` is fused skinny GEMMs for a
    convolution that is a matrix product (a 1x1 kernel on 1x1 images, no padding, groups 1:
    ``tied_linear``'s calls) with up to 8 rows (float32/float64, contiguous NCHW, built-in transforms;
    ``csrc/cpu/linear_conv2d.cpp``; ``tied_conv_transpose2d`` runs it too), and the library computes
    a larger matrix product as f(W) and BLAS. Where the forced one does not apply, the library
    runs. All compute the same convolution; this is a knob for benchmarks and tests. See
    docs/cpu-algorithms.md.

    Args:
        name: ``"auto"``, ``"library"``, ``"gemm"``, ``"depthwise"``, ``"brgemm"`` or ``"linear"``.

    Yields:
        Nothing; the setting holds inside the ``with`` block and the previous one is restored on
            exit, however the block ends.

    Raises:
        ValueError: an unknown name (on entering the block).

    Examples:
        >>> x, w = torch.randn(1, 8, 16, 16), torch.randn(8, 1, 3, 3)
        >>> with fusedtie.use_cpu_conv_algorithm("depthwise"):
        ...     y = fusedtie.tied_conv2d(x, w, transform="tanh", padding=1, groups=8)
        ...     fusedtie.cpu_conv_algorithm_for(x, w, padding=1, groups=8)
        'depthwise'
    """
    previous = LIB.set_cpu_conv_algorithm(name)
    try:
        yield
    finally:
        LIB.set_cpu_conv_algorithm(previous)


def cpu_info() -> dict:
    """What the CPU path runs on and how ``auto`` chooses there.

    Returns:
        A dict with ``vendor`` and ``model`` (cpuid's strings), ``blas`` (``"MKL"`` or ``"other"``),
            ``gemm_under_auto`` (whether ``auto`` may take the GEMM path), ``reason`` (why, in words),
            ``brgemm_micro_kernel`` (whether oneDNN's micro-kernel runs the brgemm path), and
            ``transform_capability`` (the instruction set of the transform passes: ``"DEFAULT"``,
            ``"AVX2"`` or ``"AVX512"``).

    Examples:
        >>> info = fusedtie.cpu_info()
        >>> sorted(info)
        ['blas', 'brgemm_micro_kernel', 'gemm_under_auto', 'model', 'reason', 'transform_capability', 'vendor']
        >>> isinstance(info["gemm_under_auto"], bool)  # False on AMD CPUs
        True
    """
    info = dict(LIB.gemm_blas_assessment())
    info["brgemm_micro_kernel"] = LIB.brgemm_micro_kernel_available()
    info["transform_capability"] = LIB.cpu_transform_capability()
    return info


def cpu_conv_algorithm_for(
    input: Tensor,
    weight: Tensor,
    stride: IntOrPair = 1,
    padding: PaddingLike = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    transform: TransformLike = "square",
    backward: bool = False,
    input_gradient: bool = True,
) -> str:
    """The CPU algorithm ``tied_conv2d`` runs for this call's forward or, with ``backward=True``,
    its backward, under the current setting (``use_cpu_conv_algorithm``).

    Nothing is computed: the rule ``auto`` applies (or the forced setting, where it applies) is
    evaluated on the tensors' shapes, dtypes and layouts.

    Args:
        input: a 4-D input ``(N, C_in, H, W)`` (or a meta tensor of that shape).
        weight: the source weight, as ``tied_conv2d`` takes it.
        stride: as ``tied_conv2d`` takes it.
        padding: as ``tied_conv2d`` takes it.
        dilation: as ``tied_conv2d`` takes it.
        groups: as ``tied_conv2d`` takes it.
        transform: f, as ``tied_conv2d`` takes it (and with its default): the brgemm forward runs
            only where there is an f to apply.
        backward: name the backward's algorithm rather than the forward's.
        input_gradient: with ``backward=True``, whether the backward computes the input gradient
            (False: only the weight and bias gradients, as for a network's first layer).

    Returns:
        ``"library"``, ``"gemm"``, ``"depthwise"``, ``"brgemm"`` or ``"linear"``, ``auto``'s choice or the forced
            setting where it applies (where it does not, ``"library"``).

    Examples:
        >>> x, w = torch.randn(1, 64, 56, 56), torch.randn(64, 1, 3, 3)
        >>> fusedtie.cpu_conv_algorithm_for(x, w, padding=1, groups=64)
        'depthwise'
    """
    stride2 = _pair(stride, "stride")
    dilation2 = _pair(dilation, "dilation")
    padding4 = normalize_padding(padding, weight.shape[2:], stride2, dilation2)
    t = Transform.parse(transform)
    return LIB.cpu_conv_algorithm_for(
        input, weight, t.name, t.op_alpha, stride2, padding4, dilation2, groups, backward, input_gradient
    )


@contextlib.contextmanager
def use_cuda_conv_algorithm(name: str) -> Iterator[None]:
    """Run the CUDA path's convolutions with ``name`` inside the block (process-wide), then restore.

    ``"auto"`` (the default) picks per shape by a heuristic; ``"autotune"`` times both choices once
    per (device, shape, dtype, layout, transform) and keeps the faster for the process, like
    ``torch.backends.cudnn.benchmark``; ``"fused"`` runs fusedtie's implicit-GEMM kernels, which
    apply f while loading the weight tiles and f' in the weight gradient's epilogue, wherever they
    support the call; ``"library"`` runs one elementwise kernel for f(W), then cuDNN
    (``at::convolution``), then one for f'(W) * dL/dW. All compute the same convolution. It applies
    to both operators (``tied_conv2d`` and ``tied_conv_transpose2d``). In a build without CUDA the
    setting is kept and has nothing to act on. ``fusedtie.clear_cuda_autotune_cache()`` forgets the
    choices ``"autotune"`` measured.

    Args:
        name: ``"auto"``, ``"autotune"``, ``"fused"`` or ``"library"``.

    Yields:
        Nothing; the setting holds inside the ``with`` block and the previous one is restored on
            exit, however the block ends.

    Raises:
        ValueError: an unknown name (on entering the block).

    Examples:
        >>> conv = nn.Conv2d(16, 16, 3, padding=1)
        >>> tied = fusedtie.FusedTiedConv2d(conv, "tanh")
        >>> with fusedtie.use_cuda_conv_algorithm("autotune"):  # on CUDA tensors
        ...     y = tied(torch.randn(2, 16, 32, 32))
    """
    previous = LIB.set_cuda_conv_algorithm(name)
    try:
        yield
    finally:
        LIB.set_cuda_conv_algorithm(previous)
