"""The CUDA path: the operator and the layer on the GPU against the float64 oracle.

Everything here needs a GPU and a build with the CUDA kernels; elsewhere every test is skipped
(they still collect, so a CPU machine checks that this file imports and parametrizes).

- The parity grid: forward output and input, weight and bias gradients under each CUDA algorithm
  ("fused", "library", "auto") in float64, float32 (exact and TF32), float16 and bfloat16, over
  kernels 1x1/3x3/5x4, strides, every padding form, dilation, groups 1/2/depthwise, batch 0/1/3,
  unbatched, channels_last and non-contiguous input, and every transform and bias mode.
  float64 is held to a fixed tolerance. The other precisions are judged by the rule of the CUDA
  issue: the error against a float64 reference computed from the same (rounded) inputs is at most
  2x the error of PyTorch's own ``F.conv2d(x, f(W), g(b))`` in the same dtype, plus a floor of a
  fraction of one unit of the dtype at the tensor's largest magnitude, so that an exact-zero
  error of PyTorch's (an empty batch, a reduction PyTorch happens to get exact) does not fail.
  TF32 (float32 with torch.backends.cudnn.allow_tf32) may also use TF32's own error bound,
  2**-9 * sum|x||f(W)| (and likewise for each gradient): TF32 *allows* tensor cores, so cuDNN
  may run a tiny shape exactly in float32 while fusedtie's kernel rounds its operands to TF32
  (by truncation or to nearest), and both are right; exact float32 gets no such allowance, so a
  kernel that uses TF32 when it is not allowed fails.
- CPU <-> CUDA parity in float64; the layer on CUDA (the seed network against the forum recipe,
  ``.to("cuda")`` keeping the tie); ``apply_transform`` on CUDA; bad input on CUDA.
- Which branch runs: under "library" no fusedtie_conv2d_* kernel, under "fused" the fused fprop
  and wgrad kernels (read from torch.profiler's CUDA kernel names); "auto" runs one of the two;
  the two Python call paths (the _C binding, torch.ops under a TorchFunctionMode) agree.
- The transposed operator (tied_conv_transpose2d): the same parity rule over its own geometry grid
  (strides, output_padding, dilation, groups, depthwise, channels_last, non-contiguous, an empty
  batch, and output_padding >= stride, where the fused kernels refuse), which kernels each branch
  runs, autotune and determinism.
- The autotune cache; bitwise repeatability under torch.use_deterministic_algorithms(True);
  64-bit indexing (an input of more than 2**31 elements, when 40 GiB of GPU memory are free);
  torch.library.opcheck and torch.compile(fullgraph=True) on CUDA.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_conv2d, reference_conv_transpose2d, reference_f, transform_arg
from test_bad_input import _op_cases
from torch.autograd import DeviceType
from torch.overrides import TorchFunctionMode

import fusedtie
from fusedtie import FusedTiedConv2d

# cuBLAS refuses to run under torch.use_deterministic_algorithms(True) without this; it must be
# set before cuBLAS starts, and test modules are imported before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CUDA_READY = torch.cuda.is_available() and bool(fusedtie.cuda_compiled)
pytestmark = pytest.mark.skipif(
    not CUDA_READY,
    reason="needs a CUDA GPU and fusedtie built with its CUDA kernels "
    f"(torch.cuda.is_available()={torch.cuda.is_available()}, fusedtie.cuda_compiled={fusedtie.cuda_compiled})",
)

DEVICE = "cuda"
LIB = fusedtie._LIB
TRANSFORMS = fusedtie.available_transforms()
BIAS_MODES = ("none", "identity", "transform")
ALGORITHMS = ("fused", "library", "auto")

# name -> (dtype, whether cuDNN-style TF32 is allowed)
PRECISIONS = {
    "float64": (torch.float64, False),
    "float32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "float16": (torch.float16, False),
    "bfloat16": (torch.bfloat16, False),
}
# How many times PyTorch's own error ours may be, and the floor, as a fraction of the tensor's
# largest reference magnitude (float32: a few ulp of accumulation-order difference; fp16/bf16: a
# quarter of the dtype's eps, i.e. half a unit roundoff).
ERROR_FACTOR = 2.0
TF32_BOUND = 2.0**-9  # two operands, each rounded to a 10-bit mantissa (truncation: < 2**-10 each)
FLOOR_REL = {"float32": 1e-6, "tf32": 1e-6, "float16": 2.0**-12, "bfloat16": 2.0**-9}
ABS_FLOOR = 1e-6
FLOAT64_REL_TOL = 1e-10


# --- state and helpers ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every process-wide setting a test may change comes back as it was, even on failure."""
    algorithm = LIB.cuda_conv_algorithm()
    tf32 = torch.backends.cudnn.allow_tf32
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    LIB.set_cuda_conv_algorithm(algorithm)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    """torch.backends.cudnn.allow_tf32, which fusedtie's float32 CUDA path follows as cuDNN does."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def cuda_algorithm(name: str):
    with fusedtie.use_cuda_conv_algorithm(name):
        assert LIB.cuda_conv_algorithm() == name
        yield


def randn(shape, dtype=torch.float32, scale=1.0, device=DEVICE):
    """Generated on the CPU (the same values on any GPU), rounded to dtype, then moved."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


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


def max_error(t, ref):
    if ref.numel() == 0:
        return 0.0
    return (t.detach().double().reshape(ref.shape) - ref).abs().max().item()


def check_against_reference(name, ours, theirs, ref, precision, what="", allowance=0.0):
    """float64: a fixed tolerance. Otherwise: at most ERROR_FACTOR x PyTorch's error in the same
    dtype (``theirs``), or ``allowance`` if larger (TF32's own bound), plus the floor. NaN anywhere
    fails (NaN <= tol is False)."""
    dtype = PRECISIONS[precision][0]
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype}, expected {dtype}"
    assert ours.device.type == "cuda", f"{name}: on {ours.device}"
    assert ours.numel() == ref.numel(), f"{name}: {list(ours.shape)} against reference {list(ref.shape)}"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    err = max_error(ours, ref)
    if precision == "float64":
        err_torch = float("nan")
        tol = FLOAT64_REL_TOL * scale + 1e-12
    else:
        err_torch = max_error(theirs, ref)
        tol = max(ERROR_FACTOR * err_torch, allowance) + FLOOR_REL[precision] * scale + ABS_FLOOR
    assert err <= tol, (
        f"{name} ({precision}{', ' + what if what else ''}): max error {err:.4g} against the float64 "
        f"reference; PyTorch's own {precision} error {err_torch:.4g}; TF32 allowance {allowance:.4g}; "
        f"allowed {tol:.4g}; "
        f"largest |reference| {scale:.4g}"
    )


# --- the parity grid -------------------------------------------------------------------------------

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
    # channel counts and sizes that are not multiples of any tile, and ones that are
    dict(id="3x3-p1-24to40-17x13", padding=1, cin=24, cout=40, hw=(17, 13), batch=2),
    dict(id="3x3-p1-64to64-16x16", padding=1, cin=64, cout=64, hw=(16, 16), batch=2),
    dict(
        id="5x4-s2-p(2,1)-20to36-21x18", kernel=(5, 4), stride=2, padding=(2, 1), cin=20, cout=36, hw=(21, 18), batch=2
    ),
    # strided, with channel counts the tensor-core input gradient takes in every precision
    dict(id="3x3-s2-p1-16to32-11x10", stride=2, padding=1, cin=16, cout=32, hw=(11, 10), batch=2),
]


def run_parity(algorithm, precision, transform, bias_mode, geometry):
    dtype, tf32 = PRECISIONS[precision]
    g = {**GEOMETRY_DEFAULTS, **geometry}
    layout = g["layout"]
    batch = 1 if layout == "unbatched" else g["batch"]
    x = randn((batch, g["cin"], *g["hw"]), dtype)
    w = randn((g["cout"], g["cin"] // g["groups"], *g["kernel"]), dtype, 0.5)
    b = None if bias_mode == "none" else randn((g["cout"],), dtype, 0.5)
    bias_transform = transform if bias_mode == "transform" else "identity"
    conv = (g["stride"], g["padding"], g["dilation"], g["groups"])
    # the oracle, from the very values ours gets (already rounded to dtype)
    ref_out, ref_grads = reference_conv2d(x, w, b, transform, bias_transform, *conv)
    grad_out = randn(tuple(ref_out.shape), dtype)
    ref = [ref_out, *ref_grads(grad_out.double())]
    allowances = tf32_allowances(x, w, transform, conv, grad_out) if tf32 else [0.0] * 4

    if layout == "unbatched":
        x = x[0].clone()
    else:
        x, w = with_layout(layout, x, w)
    leaves = [x.requires_grad_(True), w.requires_grad_(True)] + ([b.requires_grad_(True)] if b is not None else [])

    with cudnn_tf32(tf32), cuda_algorithm(algorithm):
        out = fusedtie.tied_conv2d(x, w, b, transform_arg(transform), transform_arg(bias_transform), *conv)
        grads = torch.autograd.grad(out, leaves, grad_out.reshape(out.shape))
        # PyTorch's own computation in the same dtype and layout, for the error rule
        theirs = F.conv2d(x, reference_f(transform, w), None if b is None else reference_f(bias_transform, b), *conv)
        their_grads = torch.autograd.grad(theirs, leaves, grad_out.reshape(theirs.shape))

    assert out.shape == theirs.shape, (list(out.shape), list(theirs.shape))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape
    what = f"{algorithm}, {transform}, bias {bias_mode}, {geometry['id']}"
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, ours, them, r, allowance in zip(names, [out, *grads], [theirs, *their_grads], ref, allowances):
        check_against_reference(name, ours, them, r, precision, what, allowance)


def tf32_allowances(x, w, transform, conv, grad_out):
    """TF32's error bound for the output and the input and weight gradients: TF32_BOUND times the
    largest sum of |operand| products that each is made of (conv(|x|, |f(W)|), its transposed
    conv of |grad_out|, and corr(|x|, |grad_out|) * |f'(W)|). The bias gradient is a plain float32
    reduction of grad_out, with no allowance."""
    w64 = w.detach().double().requires_grad_(True)
    fw = reference_f(transform, w64)
    (fprime,) = torch.autograd.grad(fw.sum(), w64)
    xa = x.detach().double().abs().requires_grad_(True)
    fwa = fw.detach().abs().requires_grad_(True)
    out = F.conv2d(xa, fwa, None, *conv)
    if out.numel() == 0:
        return [0.0] * 4
    gx, gfw = torch.autograd.grad(out, (xa, fwa), grad_out.double().abs())
    bounds = [out.detach(), gx, gfw * fprime.abs()]
    return [TF32_BOUND * t.max().item() for t in bounds] + [0.0]


def _grid():
    """geometry x precision x algorithm, with the transform and the bias mode cycling."""
    params = []
    for gi, geometry in enumerate(GEOMETRIES):
        for pi, precision in enumerate(PRECISIONS):
            for ai, algorithm in enumerate(ALGORITHMS):
                transform = TRANSFORMS[(gi + 2 * pi + 4 * ai) % len(TRANSFORMS)]
                bias_mode = BIAS_MODES[(2 * gi + pi + ai) % len(BIAS_MODES)]
                params.append(
                    pytest.param(
                        algorithm,
                        precision,
                        transform,
                        bias_mode,
                        geometry,
                        id=f"{geometry['id']}-{precision}-{algorithm}-{transform}-bias_{bias_mode}",
                    )
                )
    return params


@pytest.mark.parametrize("algorithm,precision,transform,bias_mode,geometry", _grid())
def test_geometry_grid(algorithm, precision, transform, bias_mode, geometry):
    run_parity(algorithm, precision, transform, bias_mode, geometry)


@pytest.mark.parametrize("bias_mode", BIAS_MODES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_transform_and_bias(algorithm, precision, transform, bias_mode):
    geometry = dict(id="3x3-p1-8to12-10x9", padding=1, batch=2, cin=8, cout=12, hw=(10, 9))
    run_parity(algorithm, precision, transform, bias_mode, geometry)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_channels_last_output_format_matches_conv2d(algorithm):
    x = randn((2, 8, 8, 8)).to(memory_format=torch.channels_last)
    w = randn((12, 8, 3, 3))
    with cuda_algorithm(algorithm):
        out = fusedtie.tied_conv2d(x, w, transform="square", padding=1)
    ref = F.conv2d(x, w * w, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)
    assert out.stride() == ref.stride()


# --- CPU <-> CUDA ---------------------------------------------------------------------------------

CPU_CUDA_CASES = [
    dict(kernel=(3, 3), padding=1, transform="square"),
    dict(kernel=(5, 4), padding="same", transform="tanh"),
    dict(kernel=(3, 3), stride=2, padding=(1, 2), dilation=2, groups=2, transform="softplus", hw=(13, 12)),
    dict(kernel=(3, 3), padding=1, groups=8, cout=16, transform="exp"),
    dict(kernel=(1, 1), stride=2, transform="sigmoid", layout="channels_last"),
    dict(kernel=(3, 3), padding=1, transform="scale", layout="unbatched"),
    dict(kernel=(3, 3), padding=1, transform="abs", batch=0),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", CPU_CUDA_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cpu_and_cuda_agree_in_float64(case, algorithm):
    c = {**GEOMETRY_DEFAULTS, **case}
    t = transform_arg(c["transform"])
    batch = 1 if c["layout"] == "unbatched" else c["batch"]
    x = torch.randn(batch, c["cin"], *c["hw"], dtype=torch.float64)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], *c["kernel"], dtype=torch.float64) * 0.5
    b = torch.randn(c["cout"], dtype=torch.float64) * 0.5
    if c["layout"] == "unbatched":
        x = x[0]
    conv = (c["stride"], c["padding"], c["dilation"], c["groups"])

    def run(device):
        xd, wd, bd = (t_.detach().clone().to(device) for t_ in (x, w, b))
        if c["layout"] == "channels_last":
            xd = xd.to(memory_format=torch.channels_last)
            wd = wd.to(memory_format=torch.channels_last)
        leaves = [xd.requires_grad_(True), wd.requires_grad_(True), bd.requires_grad_(True)]
        out = fusedtie.tied_conv2d(xd, wd, bd, t, t, *conv)
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(device)
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    cpu = run("cpu")
    with cuda_algorithm(algorithm):
        gpu = run(DEVICE)
    for name, a, g in zip(["output", "grad_input", "grad_weight", "grad_bias"], cpu, gpu):
        assert g.is_cuda and g.dtype == torch.float64 and g.shape == a.shape, name
        torch.testing.assert_close(g.cpu(), a, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


# --- the layer on CUDA ----------------------------------------------------------------------------


class SeedNet(nn.Module):
    """The seed's network with compatible shapes: conv_2's weight is conv_1's squared."""

    def __init__(self, transform="square", bias="same"):
        super().__init__()
        self.conv_1 = nn.Conv2d(16, 16, kernel_size=3, padding=1)
        self.conv_2 = FusedTiedConv2d(self.conv_1, transform, bias)

    def forward(self, x):
        return self.conv_2(self.conv_1(x))


class ForumNet(nn.Module):
    """The forum's answer: the source hidden in a list, F.conv2d(x, w ** 2) on every call."""

    def __init__(self):
        super().__init__()
        self.conv_1 = nn.Conv2d(16, 16, 3, padding=1)
        self.other = [self.conv_1]

    def forward(self, x):
        h = self.conv_1(x)
        c = self.other[0]
        return F.conv2d(h, c.weight**2, c.bias, c.stride, c.padding, c.dilation, c.groups)


def _forum_like(net, dtype):
    forum = ForumNet()
    forum.load_state_dict(net.state_dict())  # strict: both save only conv_1's keys
    return forum.to(DEVICE, dtype)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_seed_network_sgd_steps_match_the_forum_recipe_in_float64(algorithm):
    ours = SeedNet().to(DEVICE, torch.float64)
    forum = _forum_like(ours, torch.float64)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9)
    opt_forum = torch.optim.SGD(forum.parameters(), lr=1e-3, momentum=0.9)
    initial = ours.conv_1.weight.detach().clone()
    with cuda_algorithm(algorithm):
        for _ in range(3):
            x = randn((2, 16, 9, 9), torch.float64)
            target = randn((2, 16, 9, 9), torch.float64)
            for net, opt in ((ours, opt_ours), (forum, opt_forum)):
                opt.zero_grad()
                F.mse_loss(net(x), target).backward()
                opt.step()
    for p, q in zip(ours.parameters(), forum.parameters()):
        assert p.is_cuda
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ours.conv_1.weight, initial)


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_seed_network_matches_the_forum_recipe(algorithm, precision):
    dtype = PRECISIONS[precision][0]
    ours = SeedNet().to(DEVICE, dtype)
    forum = _forum_like(ours, dtype)
    reference = _forum_like(ours, torch.float64)  # from the same dtype-rounded parameters
    x = randn((2, 16, 20, 20), dtype)
    grad_out = randn((2, 16, 20, 20), dtype)

    def step(net, xin):
        xin = xin.detach().clone().requires_grad_(True)
        out = net(xin)
        params = list(net.parameters())
        return [out, *torch.autograd.grad(out, [xin, *params], grad_out.to(out.dtype))]

    with cudnn_tf32(False), cuda_algorithm(algorithm):
        got = step(ours, x)
        theirs = step(forum, x)
    ref = step(reference, x.double())
    for name, a, t, r in zip(["output", "grad_x", "grad_conv_1.weight", "grad_conv_1.bias"], got, theirs, ref):
        check_against_reference(name, a, t, r.detach(), precision, f"seed network, {algorithm}")


def test_to_cuda_keeps_the_tie():
    net = SeedNet("tanh", "transform")
    net.to(DEVICE)
    assert net.conv_2.source is net.conv_1
    params = list(net.parameters())
    assert len(params) == 2 and params[0] is net.conv_1.weight and params[1] is net.conv_1.bias
    assert all(p.is_cuda for p in params)
    assert list(net.state_dict()) == ["conv_1.weight", "conv_1.bias"]
    assert net.conv_2.weight.is_cuda  # the derived tensor: f(source.weight) on the source's device
    torch.testing.assert_close(net.conv_2.weight, torch.tanh(net.conv_1.weight), rtol=1e-5, atol=1e-6)

    x = randn((1, 16, 10, 10))
    net(x).square().sum().backward()
    assert net.conv_1.weight.grad is not None and net.conv_1.weight.grad.is_cuda

    # an optimizer step on the source is seen by the tied layer at once
    with torch.no_grad():
        net.conv_1.weight.mul_(0.5)
    torch.testing.assert_close(net.conv_2.weight, torch.tanh(net.conv_1.weight), rtol=1e-5, atol=1e-6)

    # a tied layer alone carries its source with it, and back
    layer = FusedTiedConv2d(nn.Conv2d(4, 4, 3), "square").cuda()
    assert layer.source.weight.is_cuda and layer.source.bias.is_cuda
    xs = randn((1, 4, 8, 8))
    with cudnn_tf32(False):
        torch.testing.assert_close(
            layer(xs), F.conv2d(xs, layer.source.weight**2, layer.source.bias), rtol=1e-5, atol=1e-5
        )
    net.cpu()
    assert net.conv_2.source is net.conv_1 and not net.conv_1.weight.is_cuda
    assert net(x.cpu()).device.type == "cpu"

    # to(device, dtype) in one call
    half = SeedNet().to(DEVICE, torch.bfloat16)
    assert half.conv_2.source is half.conv_1 and half(x.bfloat16()).dtype == torch.bfloat16


def test_cached_scope_on_cuda():
    layer = FusedTiedConv2d(nn.Conv2d(8, 8, 3, padding=1).to(DEVICE, torch.float64), "exp", "transform")
    x = randn((2, 8, 9, 9), torch.float64)
    expected, _ = reference_conv2d(x, layer.source.weight, layer.source.bias, "exp", "exp", padding=1)
    with fusedtie.cached(layer), torch.no_grad():
        first = layer(x)
        second = layer(x)
    torch.testing.assert_close(first, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(second, expected, rtol=1e-9, atol=1e-9)


# --- apply_transform and bad input on CUDA ------------------------------------------------------------

TRANSFORM_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 16 * torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}


@pytest.mark.parametrize("dtype", list(TRANSFORM_RTOL), ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_apply_transform_on_cuda(transform, dtype):
    w = randn((6, 5, 3, 3), dtype, 0.75).requires_grad_(True)
    grad = randn((6, 5, 3, 3), dtype)
    out = fusedtie.apply_transform(w, transform_arg(transform))
    (gw,) = torch.autograd.grad(out, w, grad)
    w64 = w.detach().double().requires_grad_(True)
    ref = reference_f(transform, w64)
    (ref_gw,) = torch.autograd.grad(ref, w64, grad.double())
    assert out.is_cuda and out.dtype == dtype and gw.dtype == dtype
    rtol, atol = TRANSFORM_RTOL[dtype], torch.finfo(dtype).tiny
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=2 * rtol, atol=atol)


BAD_INPUT_CASES = [case[0] for case in _op_cases("cpu")]


@pytest.mark.parametrize("case", range(len(BAD_INPUT_CASES)), ids=BAD_INPUT_CASES)
def test_bad_input_on_cuda_raises_the_cpu_errors(case):
    name, call, exc, pattern = _op_cases(DEVICE)[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_cpu_and_cuda_tensors_mixed_raise():
    x = randn((1, 4, 8, 8))
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="device"):
        fusedtie.tied_conv2d(x, w)
    with pytest.raises(RuntimeError, match="device"):
        fusedtie.tied_conv2d(x, w.to(DEVICE), torch.randn(6))


# --- which branch runs ------------------------------------------------------------------------------

FPROP, DGRAD, WGRAD = "fusedtie_conv2d_fprop", "fusedtie_conv2d_dgrad", "fusedtie_conv2d_wgrad"
TRANSFORM_KERNEL, CHAIN_RULE_KERNEL = "fusedtie_transform_kernel", "fusedtie_chain_rule_kernel"


def cuda_kernels(fn):
    """(names of the CUDA kernels ``fn`` launched, its result), read with torch.profiler."""
    fn()  # warm: cuDNN handles, lazy module loading, the profiler's own first-use cost
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = set()
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            names.add(event.name)
        for kernel in getattr(event, "kernels", None) or ():
            names.add(kernel.name)
    if not names:
        pytest.skip("torch.profiler recorded no CUDA kernels here (CUPTI unavailable?)")
    return names, result


def ran(names, kernel):
    return any(kernel in name for name in names)


def _branch_case(dtype, channels_last=False, input_grad=True):
    x = randn((2, 16, 12, 12), dtype)
    w = randn((24, 16, 3, 3), dtype, 0.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    x.requires_grad_(input_grad)
    w.requires_grad_(True)
    return x, w


def _forward_and_backward_kernels(algorithm, x, w):
    inputs = [t for t in (x, w) if t.requires_grad]
    with cuda_algorithm(algorithm):
        forward, out = cuda_kernels(lambda: fusedtie.tied_conv2d(x, w, None, "square", padding=1))
        grad = torch.ones_like(out)
        backward, _ = cuda_kernels(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))
    return forward, backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_library_branch_runs_no_fused_kernel(dtype):
    x, w = _branch_case(dtype)
    forward, backward = _forward_and_backward_kernels("library", x, w)
    for names in (forward, backward):
        fused = sorted(n for n in names if "fusedtie_conv2d_" in n)
        assert not fused, f"'library' ran fused kernels: {fused}"
    assert ran(forward, TRANSFORM_KERNEL), sorted(forward)
    assert ran(backward, CHAIN_RULE_KERNEL), sorted(backward)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_fused_branch_runs_the_fused_kernels(dtype, channels_last):
    # groups 1, stride 1, 3x3: a case the fused kernels support. The input needs no gradient (a
    # first layer), so the backward is the weight gradient alone, with f' in its epilogue.
    x, w = _branch_case(dtype, channels_last, input_grad=False)
    forward, backward = _forward_and_backward_kernels("fused", x, w)
    assert ran(forward, FPROP), f"no {FPROP} in the forward: {sorted(forward)}"
    assert not ran(forward, TRANSFORM_KERNEL), f"the fused forward still ran {TRANSFORM_KERNEL}: {sorted(forward)}"
    assert ran(backward, WGRAD), f"no {WGRAD} in the backward: {sorted(backward)}"
    assert not ran(backward, CHAIN_RULE_KERNEL), f"the fused weight gradient still ran {CHAIN_RULE_KERNEL}"
    # with the input gradient too: the fused input-gradient kernel, and still the fused weight gradient
    x.requires_grad_(True)
    _, backward = _forward_and_backward_kernels("fused", x, w)
    assert ran(backward, DGRAD), f"no {DGRAD} in the backward: {sorted(backward)}"
    assert ran(backward, WGRAD), sorted(backward)
    assert not ran(backward, TRANSFORM_KERNEL), f"the fused backward still ran {TRANSFORM_KERNEL}"


@pytest.mark.parametrize(
    "shape",
    [
        ((1, 64, 7, 7), (64, 64, 3, 3), 1, 1),
        ((8, 16, 32, 32), (16, 16, 3, 3), 1, 1),
        ((4, 256, 14, 14), (256, 256, 1, 1), 0, 1),
        ((2, 32, 28, 28), (32, 1, 3, 3), 1, 32),
    ],
    ids=str,
)
def test_auto_runs_exactly_one_branch_and_is_right(shape):
    x_shape, w_shape, padding, groups = shape
    x, w = randn(x_shape), randn(w_shape, scale=0.2)
    with cudnn_tf32(False):
        with cuda_algorithm("auto"):
            names, out = cuda_kernels(
                lambda: fusedtie.tied_conv2d(x, w, None, "square", padding=padding, groups=groups)
            )
        ref, _ = reference_conv2d(x, w, None, "square", padding=padding, groups=groups)
    fused, library = ran(names, FPROP), ran(names, TRANSFORM_KERNEL)
    assert fused != library, f"auto: fused fprop {fused}, library transform kernel {library}: {sorted(names)}"
    err, scale = max_error(out, ref), ref.abs().max().item()
    assert err <= 1e-5 * scale, (err, scale)


def test_both_python_call_paths_agree_on_cuda():
    """The _C binding (plain eager calls) and torch.ops (under a TorchFunctionMode) on CUDA."""
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, w, b = randn((2, 8, 10, 10)), randn((12, 8, 3, 3)), randn((12,))
    results = []
    for mode in (contextlib.nullcontext(), Record()):
        wl = w.detach().clone().requires_grad_(True)
        with mode:
            out = fusedtie.tied_conv2d(x, wl, b, "tanh", padding=1)
        (gw,) = torch.autograd.grad(out, wl, torch.ones_like(out))
        results.append((out, gw))
    assert torch.ops.fusedtie.tied_conv2d.default in seen
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


# --- autotune, determinism, 64-bit indexing -----------------------------------------------------------


def _checked_step(x_shape, w_shape, padding=1):
    x = randn(x_shape).requires_grad_(True)
    w = randn(w_shape, scale=0.3).requires_grad_(True)
    b = randn((w_shape[0],), scale=0.3).requires_grad_(True)
    out = fusedtie.tied_conv2d(x, w, b, "tanh", "identity", padding=padding)
    grad_out = randn(tuple(out.shape))
    grads = torch.autograd.grad(out, (x, w, b), grad_out)
    ref_out, ref_grads = reference_conv2d(x, w, b, "tanh", "identity", padding=padding)
    for name, ours, ref in zip(
        ["output", "grad_input", "grad_weight", "grad_bias"], [out, *grads], [ref_out, *ref_grads(grad_out.double())]
    ):
        err, scale = max_error(ours, ref), ref.abs().max().item()
        assert err <= 1e-5 * scale + 1e-6, f"autotune {name}: error {err:.3g}, largest |ref| {scale:.3g}"


def test_autotune_caches_its_choice_and_stays_correct():
    LIB.clear_cuda_autotune_cache()
    assert LIB.cuda_autotune_cache_size() == 0
    try:
        with cudnn_tf32(False), cuda_algorithm("autotune"):
            _checked_step((2, 16, 12, 12), (24, 16, 3, 3))
            after_first = LIB.cuda_autotune_cache_size()
            assert after_first >= 1, "the first autotuned call cached nothing"
            _checked_step((2, 16, 12, 12), (24, 16, 3, 3))  # the same key: served from the cache
            assert LIB.cuda_autotune_cache_size() == after_first
            _checked_step((3, 32, 9, 9), (16, 32, 3, 3))  # a new shape: a new entry
            assert LIB.cuda_autotune_cache_size() > after_first
    finally:
        LIB.clear_cuda_autotune_cache()
    assert LIB.cuda_autotune_cache_size() == 0


def assert_bitwise_repeatable(run):
    """run() twice under torch.use_deterministic_algorithms(True): (output, gradients...) bitwise equal."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
    for name, a, b in zip(["output", "grad_input", "grad_weight", "grad_bias"], first, second):
        assert torch.equal(a, b), f"{name} differs between two runs: max diff {(a - b).abs().max().item()}"


@pytest.mark.parametrize("case", ["3x3", "depthwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_deterministic_mode_is_bitwise_repeatable(algorithm, dtype, case):
    if case == "3x3":  # a long weight-gradient reduction (8 * 32 * 32 positions): split-K territory
        x, w = randn((8, 32, 32, 32), dtype), randn((48, 32, 3, 3), dtype, 0.2)
        groups = 1
    else:
        x, w = randn((8, 32, 32, 32), dtype), randn((32, 1, 3, 3), dtype, 0.5)
        groups = 32
    b = randn((w.shape[0],), dtype)
    grad_out = randn((8, w.shape[0], 32, 32), dtype)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        with cuda_algorithm(algorithm):
            out = fusedtie.tied_conv2d(*leaves, "tanh", "square", padding=1, groups=groups)
            grads = torch.autograd.grad(out, leaves, grad_out)
        torch.cuda.synchronize()
        return [out.detach(), *grads]

    assert_bitwise_repeatable(run)


BIG_FREE_BYTES = 40 * 2**30


@pytest.mark.parametrize(
    "algorithm,dtype", [("fused", torch.float16), ("library", torch.float16), ("fused", torch.bfloat16)], ids=str
)
def test_64bit_indexing(algorithm, dtype):
    """An input (and output) of more than 2**31 elements: 33 x 16 x 2048 x 2048, the last image
    starting at element 2**31. Images 0 and 32 are random, the rest zero; the outputs and input
    gradients of images 0 and 32 are checked against F.conv2d of those slices, the weight gradient
    against theirs (zero images add nothing to it), and an image in between must stay zero."""
    free, _ = torch.cuda.mem_get_info()
    if free < BIG_FREE_BYTES:
        pytest.skip(f"needs {BIG_FREE_BYTES / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    try:
        _check_64bit_indexing(algorithm, dtype)
    finally:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # about 18 GiB back before the next test


def _check_64bit_indexing(algorithm, dtype):
    n, c, hw = 33, 16, 2048
    assert n * c * hw * hw > 2**31 and (n - 1) * c * hw * hw >= 2**31
    precision = "float16" if dtype == torch.float16 else "bfloat16"
    ends = [0, n - 1]
    x = torch.zeros(n, c, hw, hw, dtype=dtype, device=DEVICE)
    grad_out = torch.zeros(n, c, hw, hw, dtype=dtype, device=DEVICE)  # 3x3, padding 1: the output's size
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for i in ends:
        x[i].normal_(generator=gen)
        grad_out[i].normal_(generator=gen)
    w = randn((c, c, 3, 3), dtype, 0.3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with cuda_algorithm(algorithm):
        out = fusedtie.tied_conv2d(x, w, None, "square", padding=1)
        grad_x, grad_w = torch.autograd.grad(out, (x, w), grad_out)
    torch.cuda.synchronize()
    assert out.shape == x.shape and grad_x.shape == x.shape
    middle = n // 2
    assert out[middle].abs().max().item() == 0, "an all-zero image's output is not zero"
    assert grad_x[middle].abs().max().item() == 0, "an all-zero image's input gradient is not zero"
    ours = [out.detach()[ends], grad_x[ends], grad_w]
    del out, grad_x

    xs, gs = x.detach()[ends], grad_out[ends]
    del x, grad_out
    x64, w64 = xs.double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref_out = F.conv2d(x64, w64**2, padding=1)
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, (x64, w64), gs.double())]
    del x64, ref_out
    xt, wt = xs.clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    their_out = F.conv2d(xt, wt**2, padding=1)
    theirs = [their_out.detach(), *torch.autograd.grad(their_out, (xt, wt), gs)]
    for name, a, t, r in zip(["output", "grad_input", "grad_weight"], ours, theirs, ref):
        check_against_reference(name, a, t, r, precision, f"64-bit indexing, {algorithm}")


# --- opcheck and torch.compile on CUDA ----------------------------------------------------------------


def _opcheck_samples():
    def make(
        shape_x,
        shape_w,
        bias,
        transform,
        bias_transform,
        stride,
        padding,
        dilation,
        groups,
        channels_last=False,
        requires_grad=True,
        dtype=torch.float32,
    ):
        x = randn(shape_x, dtype)
        w = randn(shape_w, dtype, 0.5)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        b = randn((shape_w[0],), dtype, 0.5) if bias else None
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(requires_grad)
        return (
            x,
            w,
            b,
            transform,
            0.5 if transform == "scale" else 1.0,
            bias_transform,
            0.5 if bias_transform == "scale" else 1.0,
            stride,
            padding,
            dilation,
            groups,
        )

    return [
        make((2, 8, 8, 8), (12, 8, 3, 3), True, "square", "identity", [1, 1], [1, 1, 1, 1], [1, 1], 1),
        make((1, 4, 9, 7), (4, 2, 2, 3), False, "tanh", "identity", [2, 1], [0, 1, 1, 1], [1, 2], 2),
        make((2, 4, 6, 6), (6, 4, 1, 1), True, "scale", "scale", [1, 1], [0, 0, 0, 0], [1, 1], 1, channels_last=True),
        make((0, 4, 6, 6), (6, 4, 3, 3), True, "softplus", "exp", [1, 1], [1, 1, 1, 1], [1, 1], 1),
        make((2, 4, 6, 6), (6, 4, 3, 3), True, "abs", "sigmoid", [1, 1], [1, 1, 1, 1], [1, 1], 1, requires_grad=False),
        make((2, 8, 7, 6), (8, 1, 3, 3), True, "exp", "tanh", [1, 1], [1, 1, 1, 1], [1, 1], 8, dtype=torch.float64),
    ]


# every sample through the fused kernels (their outputs' layouts are fusedtie's own); two through the
# library path, whose layouts are ATen's (the batch-0 sample runs the library path under "fused" too)
OPCHECK_CASES = [(sample, "fused") for sample in range(6)] + [(0, "library"), (2, "library")]


@pytest.mark.parametrize("sample,algorithm", OPCHECK_CASES)
def test_opcheck_tied_conv2d_on_cuda(sample, algorithm):
    args = _opcheck_samples()[sample]
    with cudnn_tf32(False), cuda_algorithm(algorithm):
        torch.library.opcheck(torch.ops.fusedtie.tied_conv2d.default, args)


def test_opcheck_backward_and_transform_ops_on_cuda():
    x, w, b = randn((2, 4, 8, 8)), randn((6, 4, 3, 3)), randn((6,))
    grad = randn((2, 6, 8, 8))
    with cudnn_tf32(False):
        for algorithm in ("fused", "library"):
            with cuda_algorithm(algorithm):
                for mask in ([True, True, True], [False, True, False], [True, False, True]):
                    torch.library.opcheck(
                        torch.ops.fusedtie._tied_conv2d_backward.default,
                        (grad, x, w, b, "tanh", 1.0, "square", 1.0, [1, 1], [1, 1, 1, 1], [1, 1], 1, mask),
                        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
                    )
    wr = randn((6, 4, 3, 3)).requires_grad_(True)
    torch.library.opcheck(torch.ops.fusedtie.transform.default, (wr, "exp", 1.0))
    torch.library.opcheck(
        torch.ops.fusedtie._transform_backward.default,
        (randn((6, 4, 3, 3)), w, "exp", 1.0),
        test_utils=("test_schema", "test_faketensor"),
    )


class _SmallSeedNet(nn.Module):
    def __init__(self, transform, bias):
        super().__init__()
        self.conv_1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_2 = FusedTiedConv2d(self.conv_1, transform, bias)

    def forward(self, x):
        return self.conv_2(torch.relu(self.conv_1(x)))


@pytest.mark.parametrize("algorithm,transform", [("fused", "square"), ("library", "tanh")])
def test_torch_compile_fullgraph_on_cuda(algorithm, transform):
    torch._dynamo.reset()
    try:
        net = _SmallSeedNet(transform, "transform").to(DEVICE)
        x = randn((2, 8, 10, 10)).requires_grad_(True)
        with cudnn_tf32(False), cuda_algorithm(algorithm):
            eager_out = net(x)
            eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *net.parameters()])
            compiled = torch.compile(net, fullgraph=True)
            out = compiled(x)
            grads = torch.autograd.grad(out.square().sum(), [x, *net.parameters()])
        assert out.is_cuda
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
        # and against the float64 oracle of the two-layer net
        x64 = x.detach().double().requires_grad_(True)
        w64 = net.conv_1.weight.detach().double().requires_grad_(True)
        b64 = net.conv_1.bias.detach().double().requires_grad_(True)
        h = torch.relu(F.conv2d(x64, w64, b64, padding=1))
        ref = F.conv2d(h, reference_f(transform, w64), reference_f(transform, b64), padding=1)
        ref_grads = torch.autograd.grad(ref.square().sum(), [x64, w64, b64])
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3)
    finally:
        torch._dynamo.reset()


# --- the transposed operator ------------------------------------------------------------------------
# tied_conv_transpose2d runs the same kernels as tied_conv2d with their roles swapped (its forward is
# the input-gradient kernel, its input gradient the forward kernel, its weight gradient the
# weight-gradient kernel with x and dy exchanged), so it gets the same parity rule.

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
]


def transpose_tf32_allowances(x, w, transform, conv, grad_out):
    """tf32_allowances for the transposed convolution: TF32_BOUND times the largest sum of |operand|
    products of the output and of the input and weight gradients; none for the bias gradient."""
    w64 = w.detach().double().requires_grad_(True)
    fw = reference_f(transform, w64)
    (fprime,) = torch.autograd.grad(fw.sum(), w64)
    xa = x.detach().double().abs().requires_grad_(True)
    fwa = fw.detach().abs().requires_grad_(True)
    out = F.conv_transpose2d(xa, fwa, None, *conv)
    if out.numel() == 0:
        return [0.0] * 4
    gx, gfw = torch.autograd.grad(out, (xa, fwa), grad_out.double().abs())
    return [TF32_BOUND * t.max().item() for t in (out.detach(), gx, gfw * fprime.abs())] + [0.0]


def run_transpose_parity(algorithm, precision, transform, bias, geometry):
    gid, x_shape, w_shape, stride, padding, output_padding, groups, dilation, layout = geometry
    dtype, tf32 = PRECISIONS[precision]
    x = randn(x_shape, dtype)
    w = randn(w_shape, dtype, 0.5)
    b = randn((w_shape[1] * groups,), dtype, 0.5) if bias else None
    conv = (stride, padding, output_padding, groups, dilation)
    ref_out, ref_grads = reference_conv_transpose2d(x, w, b, transform, *conv)
    grad_out = randn(tuple(ref_out.shape), dtype)
    ref = [ref_out, *ref_grads(grad_out.double())]
    allowances = transpose_tf32_allowances(x, w, transform, conv, grad_out) if tf32 else [0.0] * 4
    x, w = with_layout(layout, x, w)
    leaves = [x.requires_grad_(True), w.requires_grad_(True)] + ([b.requires_grad_(True)] if bias else [])
    with cudnn_tf32(tf32), cuda_algorithm(algorithm):
        out = fusedtie.tied_conv_transpose2d(x, w, b, transform_arg(transform), *conv)
        grads = torch.autograd.grad(out, leaves, grad_out)
        theirs = F.conv_transpose2d(x, reference_f(transform, w), b, *conv)
        their_grads = torch.autograd.grad(theirs, leaves, grad_out)
    assert out.shape == theirs.shape, (list(out.shape), list(theirs.shape))
    # the layout rule of the fake kernel: aten.convolution's output format, each gradient its tensor's
    assert out.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(theirs))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape
    what = f"transposed, {algorithm}, {transform}, bias {bias}, {gid}"
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, ours, them, r, allowance in zip(names, [out, *grads], [theirs, *their_grads], ref, allowances):
        check_against_reference(name, ours, them, r, precision, what, allowance)


def _transpose_grid():
    params = []
    for gi, geometry in enumerate(TRANSPOSE_GEOMETRIES):
        for pi, precision in enumerate(PRECISIONS):
            for ai, algorithm in enumerate(ALGORITHMS):
                transform = TRANSFORMS[(gi + 2 * pi + 4 * ai) % len(TRANSFORMS)]
                bias = (gi + pi + ai) % 2 == 0
                params.append(
                    pytest.param(
                        algorithm,
                        precision,
                        transform,
                        bias,
                        geometry,
                        id=f"{geometry[0]}-{precision}-{algorithm}-{transform}-bias_{bias}",
                    )
                )
    return params


@pytest.mark.parametrize("algorithm,precision,transform,bias,geometry", _transpose_grid())
def test_transpose_geometry_grid(algorithm, precision, transform, bias, geometry):
    run_transpose_parity(algorithm, precision, transform, bias, geometry)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_transpose_every_transform_fused(precision, transform):
    run_transpose_parity("fused", precision, transform, True, TRANSPOSE_GEOMETRIES[1])


def _transpose_kernels(algorithm, dtype, stride, channels_last=False):
    x = randn((2, 16, 8, 8), dtype)
    w = randn((16, 24, 3, 3), dtype, 0.5)
    b = randn((24,), dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with cuda_algorithm(algorithm):
        forward, out = cuda_kernels(lambda: fusedtie.tied_conv_transpose2d(x, w, b, "square", stride=stride, padding=1))
        backward, _ = cuda_kernels(lambda: torch.autograd.grad(out, (x, w), torch.ones_like(out), retain_graph=True))
    return forward, backward


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_transpose_fused_branch_runs_the_fused_kernels(dtype, stride):
    forward, backward = _transpose_kernels("fused", dtype, stride)
    assert ran(forward, DGRAD), f"no {DGRAD} in the transposed forward: {sorted(forward)}"
    assert not ran(forward, TRANSFORM_KERNEL), f"the fused forward still ran {TRANSFORM_KERNEL}: {sorted(forward)}"
    assert ran(backward, FPROP), f"no {FPROP} (the input gradient) in the backward: {sorted(backward)}"
    assert ran(backward, WGRAD), f"no {WGRAD} in the backward: {sorted(backward)}"
    assert not ran(backward, CHAIN_RULE_KERNEL), f"the fused weight gradient still ran {CHAIN_RULE_KERNEL}"
    assert not ran(backward, TRANSFORM_KERNEL), f"the fused backward still ran {TRANSFORM_KERNEL}"


def test_transpose_library_branch_runs_no_fused_kernel():
    forward, backward = _transpose_kernels("library", torch.float32, 2)
    for names in (forward, backward):
        fused = sorted(n for n in names if "fusedtie_conv2d_" in n)
        assert not fused, f"'library' ran fused kernels: {fused}"
    assert ran(forward, TRANSFORM_KERNEL), sorted(forward)
    assert ran(backward, CHAIN_RULE_KERNEL), sorted(backward)


def test_transpose_autotune_caches_its_choice_and_stays_correct():
    LIB.clear_cuda_autotune_cache()
    try:
        with cudnn_tf32(False), cuda_algorithm("autotune"):
            run_transpose_parity("autotune", "float32", "tanh", True, TRANSPOSE_GEOMETRIES[2])
            after_first = LIB.cuda_autotune_cache_size()
            assert after_first >= 2, "the autotuned forward and backward cached nothing"
            run_transpose_parity("autotune", "float32", "tanh", True, TRANSPOSE_GEOMETRIES[2])
            assert LIB.cuda_autotune_cache_size() == after_first
            # another signature (no bias): new entries
            x = randn((2, 24, 6, 5)).requires_grad_(True)
            w = randn((24, 40, 4, 4)).requires_grad_(True)
            fusedtie.tied_conv_transpose2d(x, w, None, "tanh", stride=2, padding=1).sum().backward()
            assert LIB.cuda_autotune_cache_size() > after_first
    finally:
        LIB.clear_cuda_autotune_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_transpose_deterministic_mode_is_bitwise_repeatable(algorithm, dtype):
    x, w = randn((8, 32, 16, 16), dtype), randn((32, 48, 4, 4), dtype, 0.2)
    b = randn((48,), dtype)
    grad_out = randn((8, 48, 32, 32), dtype)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        with cuda_algorithm(algorithm):
            out = fusedtie.tied_conv_transpose2d(*leaves, "tanh", stride=2, padding=1)
            grads = torch.autograd.grad(out, leaves, grad_out)
        torch.cuda.synchronize()
        return [out.detach(), *grads]

    assert_bitwise_repeatable(run)
