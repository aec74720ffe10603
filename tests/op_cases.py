"""The one case grid of the operator tests: transforms, bias modes, kernels, layouts and geometries.

Imported by the CPU tests (test_op_grid, test_conv_transpose, test_cpu_algorithms), the CUDA tests
(test_cuda) and the CUDA emulation tests (test_cuda_emulation); no test module imports another.
The checks that run these cases against the float64 oracle (tests/reference.py) are in
tests/parity.py. ``DEVICES`` parametrizes a test by device: the "cuda" parameter is skipped unless
a GPU and a build with the CUDA kernels are present.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fusedtie

# --- what the operator is called with ------------------------------------------------------------

TRANSFORMS = fusedtie.available_transforms()
BIAS_MODES = ("none", "identity", "transform")
KERNELS = [(1, 1), (3, 3), (3, 1), (5, 4)]
PADDINGS = [1, (2, 1), "same", "valid"]
LAYOUTS = ("unbatched", "channels_last", "non_contiguous", "expanded")
# the CUDA dispatcher's choices (fusedtie.use_cuda_conv_algorithm; "autotune" has tests of its own)
ALGORITHMS = ("fused", "library", "auto")

# --- devices ---------------------------------------------------------------------------------------

CUDA_READY = torch.cuda.is_available() and bool(fusedtie.cuda_compiled)
needs_cuda = pytest.mark.skipif(
    not CUDA_READY,
    reason="needs a CUDA GPU and fusedtie built with its CUDA kernels "
    f"(torch.cuda.is_available()={torch.cuda.is_available()}, fusedtie.cuda_compiled={fusedtie.cuda_compiled})",
)
DEVICES = ("cpu", pytest.param("cuda", marks=needs_cuda))

# --- tied_conv2d geometries --------------------------------------------------------------------------

# stride x dilation x groups x padding, each with every kernel in KERNELS (test_op_grid.test_geometry)
PRODUCT_GEOMETRIES = [
    dict(stride=s, dilation=d, groups=g, padding=p)
    for s, d, g, p in itertools.product([1, 2, (2, 1)], [1, 2, (1, 2)], [1, 2], [1, (0, 2)])
]

# Named geometries, each a dict of overrides of GEOMETRY_DEFAULTS (the parity grid on every device,
# and the emulated CUDA kernels).
GEOMETRY_DEFAULTS = dict(
    kernel=(3, 3), stride=1, padding=0, dilation=1, groups=1, batch=3, cin=8, cout=12, hw=(9, 8), layout="contiguous"
)

GEOMETRIES = [
    dict(id="1x1", kernel=(1, 1), hw=(7, 6)),
    dict(id="3x3-p1", padding=1),
    dict(id="3x3-s2-p(2,1)-b1", stride=2, padding=(2, 1), batch=1),
    dict(id="5x4-same", kernel=(5, 4), padding="same"),
    dict(id="5x4-s(2,1)-valid-g2", kernel=(5, 4), stride=(2, 1), padding="valid", groups=2, hw=(11, 10)),
    dict(id="3x3-same-d2-b1", padding="same", dilation=2, batch=1, hw=(11, 9)),
    dict(id="3x3-p2-d2-g2", padding=2, dilation=2, groups=2),
    dict(id="1x1-s2-g2-b1", kernel=(1, 1), stride=2, groups=2, batch=1),
    dict(id="dw3x3-p1", padding=1, cin=8, cout=8, groups=8),
    dict(id="dw3x3-x2-s2-b1", padding=1, stride=2, cin=8, cout=16, groups=8, batch=1),
    dict(id="dw5x4-same-b1", kernel=(5, 4), padding="same", cin=6, cout=6, groups=6, batch=1),
    dict(id="3x3-p1-batch0", padding=1, batch=0),
    dict(id="5x4-s2-batch0", kernel=(5, 4), stride=2, batch=0),
    dict(id="3x3-p1-unbatched", padding=1, layout="unbatched"),
    dict(id="5x4-p(1,2)-g2-unbatched", kernel=(5, 4), padding=(1, 2), groups=2, layout="unbatched"),
    dict(id="3x3-p1-channels_last", padding=1, layout="channels_last"),
    dict(
        id="5x4-s(2,1)-p(1,2)-d2-channels_last",
        kernel=(5, 4),
        stride=(2, 1),
        padding=(1, 2),
        dilation=2,
        hw=(13, 12),
        layout="channels_last",
        batch=1,
    ),
    dict(id="dw3x3-p1-channels_last", padding=1, cin=8, cout=8, groups=8, layout="channels_last"),
    dict(id="3x3-p1-non_contiguous", padding=1, layout="non_contiguous"),
    dict(id="1x1-s2-non_contiguous", kernel=(1, 1), stride=2, layout="non_contiguous"),
    # a Linear as tied_linear runs it: a matrix product on (N, C, 1, 1) views (the CPU's skinny GEMMs
    # up to 8 rows, BLAS above; the fused CUDA kernels or cuBLAS)
    dict(id="linear-b5", kernel=(1, 1), hw=(1, 1), batch=5, cin=40, cout=24),
    dict(id="linear-b12", kernel=(1, 1), hw=(1, 1), batch=12, cin=24, cout=40),
    # channel counts and sizes that are not multiples of any tile, and ones that are
    dict(id="3x3-p1-24to40-17x13", padding=1, cin=24, cout=40, hw=(17, 13), batch=2),
    dict(id="3x3-p1-64to64-16x16", padding=1, cin=64, cout=64, hw=(16, 16), batch=2),
    dict(
        id="5x4-s2-p(2,1)-20to36-21x18", kernel=(5, 4), stride=2, padding=(2, 1), cin=20, cout=36, hw=(21, 18), batch=2
    ),
    # strided, with channel counts the tensor-core input gradient takes in every precision
    dict(id="3x3-s2-p1-16to32-11x10", stride=2, padding=1, cin=16, cout=32, hw=(11, 10), batch=2),
]

# the geometry of the every-transform-and-bias test
TRANSFORM_BIAS_GEOMETRY = dict(id="3x3-p1-8to12-10x9", padding=1, batch=2, cin=8, cout=12, hw=(10, 9))

# --- tied_conv_transpose2d geometries ----------------------------------------------------------------

# (input shape, weight shape (in, out/groups, kH, kW), stride, padding, output_padding, groups, dilation)
TRANSPOSE_PRODUCT_GEOMETRIES = [
    ((2, 4, 5, 6), (4, 3, 3, 3), 1, 0, 0, 1, 1),
    ((2, 4, 5, 6), (4, 3, 3, 3), 2, 1, 1, 1, 1),
    ((1, 4, 5, 4), (4, 2, 3, 2), (2, 1), (1, 0), (1, 0), 1, 1),
    ((2, 6, 4, 5), (6, 2, 3, 3), 2, 1, 0, 3, 1),  # groups 3
    ((2, 4, 5, 5), (4, 1, 3, 3), 1, 1, 0, 4, 1),  # depthwise
    ((1, 4, 6, 5), (4, 3, 1, 1), 2, 0, 1, 1, 1),  # 1x1 kernel
    ((2, 3, 4, 4), (3, 2, 2, 2), 2, 0, 0, 1, 1),  # 2x2 kernel, stride 2
    ((1, 3, 4, 5), (3, 2, 4, 4), 2, 1, 0, 1, 1),  # 4x4 kernel
    ((1, 4, 5, 5), (4, 2, 3, 3), 2, 2, 1, 2, 2),  # dilation 2 with groups and output_padding
    ((4, 5, 5), (4, 3, 3, 3), 2, 1, 1, 1, 1),  # unbatched
    ((0, 4, 5, 5), (4, 3, 3, 3), 2, 1, 1, 1, 1),  # empty batch
]
TRANSPOSE_GRID_TRANSFORMS = ["identity", "square", "tanh", "scale", "exp"]

# Named transposed geometries (the transposed parity grid on every device, and the emulated kernels):
# (id, input shape, weight shape (in, out/groups, kH, kW), stride, padding, output_padding, groups,
# dilation, layout)
TRANSPOSE_GEOMETRIES = [
    ("3x3-s1-p1", (3, 16, 9, 8), (16, 8, 3, 3), 1, 1, 0, 1, 1, "contiguous"),
    ("3x3-s2-p1-op1", (3, 16, 7, 6), (16, 8, 3, 3), 2, 1, 1, 1, 1, "contiguous"),
    ("4x4-s2-p1", (2, 24, 6, 5), (24, 40, 4, 4), 2, 1, 0, 1, 1, "contiguous"),
    ("5x4-s(2,1)-p(2,1)-op(1,0)", (2, 8, 6, 7), (8, 12, 5, 4), (2, 1), (2, 1), (1, 0), 1, 1, "contiguous"),
    ("3x3-s2-d2-g2-op1", (2, 16, 6, 6), (16, 6, 3, 3), 2, 2, 1, 2, 2, "contiguous"),
    # output_padding >= stride (allowed below the dilation): the fused kernels refuse, the library runs
    ("3x3-s1-d2-op1-fallback", (2, 8, 6, 6), (8, 8, 3, 3), 1, 0, 1, 1, 2, "contiguous"),
    ("dw3x3-s2-p1-op1", (2, 8, 6, 6), (8, 1, 3, 3), 2, 1, 1, 8, 1, "contiguous"),
    ("1x1-s2", (2, 16, 5, 5), (16, 16, 1, 1), 2, 0, 0, 1, 1, "contiguous"),
    ("64to64-3x3-s1-p1", (2, 64, 16, 16), (64, 64, 3, 3), 1, 1, 0, 1, 1, "contiguous"),
    ("3x3-s1-p1-channels_last", (2, 16, 9, 8), (16, 24, 3, 3), 1, 1, 0, 1, 1, "channels_last"),
    ("4x4-s2-p1-channels_last", (2, 16, 6, 5), (16, 8, 4, 4), 2, 1, 0, 1, 1, "channels_last"),
    ("3x3-s2-p1-non_contiguous", (2, 16, 6, 6), (16, 8, 3, 3), 2, 1, 1, 1, 1, "non_contiguous"),
    ("3x3-s2-p1-batch0", (0, 16, 6, 6), (16, 8, 3, 3), 2, 1, 1, 1, 1, "contiguous"),
    # tied_linear's decoder (transpose=True): a matrix product on (N, C, 1, 1) views
    ("linear-decoder-b5", (5, 24, 1, 1), (24, 40, 1, 1), 1, 0, 0, 1, 1, "contiguous"),
    ("linear-decoder-b12", (12, 40, 1, 1), (40, 24, 1, 1), 1, 0, 0, 1, 1, "contiguous"),
]


# --- layouts ------------------------------------------------------------------------------------


def non_contiguous(t):
    """The same values, viewed with a gap in every row (a strided slice of a wider tensor)."""
    wide = t.new_zeros(*t.shape[:-1], t.shape[-1] * 2)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


def with_layout(layout, x, w):
    """x and w as "contiguous", "channels_last" or "non_contiguous" tensors of the same values."""
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        return non_contiguous(x), non_contiguous(w)
    assert layout == "contiguous", layout
    return x, w
