"""Property-based tests (hypothesis): fusedtie against the float64 reference over random geometry.

``test_matches_reference`` draws a whole call: batch (0 and unbatched included), channels, groups
(depthwise included), spatial size, kernel, stride, padding (int, pair, "same", "valid"), dilation,
padding_mode, transform, bias mode, functional call or layer, memory layout and the forced CPU
algorithm; it compares the float64 forward and the input, weight and bias gradients with the
reference (tests/reference.py: PyTorch's own F.conv2d on f(W) written in torch ops, autograd's
gradients). Only geometry that PyTorch accepts is drawn; ``test_rejects_what_conv2d_rejects`` draws
from a wider space and checks that fusedtie raises a clear error wherever F.conv2d raises, and gives
F.conv2d's result wherever it does not (except where PyTorch skips a hyper-parameter check on an
empty batch: fusedtie checks those on every call).

The runs are derandomized (a fixed seed per test), so CI sees the same 300 cases every time. For a
wider search set FUSEDTIE_PROPERTY_EXAMPLES (say 5000) and FUSEDTIE_PROPERTY_RANDOM=1.

**Keeping a failure.** When hypothesis reports ``Falsifying example: test_matches_reference(
case=Case(...))``, paste that ``Case(...)`` into ``REGRESSIONS`` below (with a comment saying what
it caught); ``test_regression`` runs every entry on every run, whatever hypothesis draws.

The end of the file has the items of the project's edge-case list (NaN/Inf in weights or input,
sizes past 2^31 elements, kernel larger than the padded input, non-floating dtypes) that
tests/test_bad_input.py does not already cover.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import nonfinite_mask_differences, reference_conv2d, reference_f, transform_arg

import fusedtie
from fusedtie import FusedTiedConv2d

# PyTorch's own note on even kernels with padding="same" (the reference pads a copy, as it says)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

TRANSFORMS = fusedtie.available_transforms()
ALGORITHMS = ["auto", "library", "gemm", "depthwise"]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
EXAMPLES = int(os.environ.get("FUSEDTIE_PROPERTY_EXAMPLES", "300"))
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FUSEDTIE_PROPERTY_RANDOM", "") != "1",
    database=None,  # nothing kept between runs: failures to keep go into REGRESSIONS
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TOL = dict(rtol=1e-9, atol=1e-9)

Pair = Union[int, tuple]


@dataclasses.dataclass(frozen=True)
class Case:
    """One call. ``n=None`` is an unbatched (C, H, W) input. ``bias``: "none", "identity" (the
    source's bias as it is) or "transform" (f(bias)). ``via``: "functional" (fusedtie.tied_conv2d)
    or "module" (FusedTiedConv2d on an nn.Conv2d source; the only way to a padding_mode)."""

    n: Optional[int]
    groups: int
    cin_per_group: int
    cout_per_group: int
    h: int
    w: int
    kernel: tuple
    stride: Pair = 1
    padding: Union[int, tuple, str] = 0
    dilation: Pair = 1
    padding_mode: str = "zeros"
    transform: str = "square"
    bias: str = "identity"
    via: str = "functional"
    layout: str = "contiguous"
    algorithm: str = "auto"
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads for the call; None: leave as it is

    @property
    def cin(self):
        return self.groups * self.cin_per_group

    @property
    def cout(self):
        return self.groups * self.cout_per_group


# Every entry runs on every run (test_regression). Add failures found by hypothesis here, each with
# a comment on what it caught. None so far: 14,000 random examples passed when this was written.
REGRESSIONS = [
    # Hand-picked corners kept always-on: an empty grouped batch; the depthwise kernel with an even
    # kernel and "same" (asymmetric padding); reflect with "same" and an even dilated kernel;
    # circular padding as wide as the input; an unbatched, strided, dilated call forced to gemm.
    Case(
        n=0,
        groups=3,
        cin_per_group=2,
        cout_per_group=1,
        h=4,
        w=5,
        kernel=(3, 2),
        padding=(1, 0),
        transform="tanh",
        bias="transform",
    ),
    Case(
        n=2,
        groups=3,
        cin_per_group=1,
        cout_per_group=2,
        h=11,
        w=12,
        kernel=(4, 2),
        padding="same",
        transform="softplus",
        bias="identity",
        algorithm="depthwise",
    ),
    Case(
        n=1,
        groups=1,
        cin_per_group=2,
        cout_per_group=3,
        h=6,
        w=7,
        kernel=(2, 4),
        padding="same",
        dilation=(3, 1),
        padding_mode="reflect",
        via="module",
        transform="exp",
        bias="transform",
    ),
    Case(
        n=2,
        groups=2,
        cin_per_group=1,
        cout_per_group=1,
        h=2,
        w=3,
        kernel=(3, 3),
        padding=(2, 3),
        padding_mode="circular",
        via="module",
        transform="abs",
        bias="none",
    ),
    Case(
        n=None,
        groups=1,
        cin_per_group=3,
        cout_per_group=2,
        h=9,
        w=8,
        kernel=(3, 3),
        stride=(2, 3),
        padding=1,
        dilation=2,
        transform=TRANSFORMS[-1],
        bias="identity",
        algorithm="gemm",
    ),
]


# --- the strategy: only geometry F.conv2d accepts ---------------------------------------------------


def _as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _padding_sides(padding, kernel, dilation):
    """(top, bottom, left, right) as F.conv2d / nn.Conv2d split it."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        sides = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    ph, pw = _as_pair(padding)
    return (ph, ph, pw, pw)


def _int_or_pair(low, high):
    return st.one_of(st.integers(low, high), st.tuples(st.integers(low, high), st.integers(low, high)))


@st.composite
def cases(draw):
    groups = draw(st.integers(1, 3))
    cin_per_group = draw(st.integers(1, 3))
    cout_per_group = draw(st.integers(1, 3))
    kernel_sizes = st.sampled_from([1, 1, 2, 3, 3, 4, 5, 7])  # 3, 5, 7: the depthwise kernel's unrolled taps
    kernel = (draw(kernel_sizes), draw(kernel_sizes))
    stride = draw(_int_or_pair(1, 3))
    dilation = draw(_int_or_pair(1, 3))
    padding_kinds = ["int", "pair", "valid"] + (["same"] if _as_pair(stride) == (1, 1) else [])
    kind = draw(st.sampled_from(padding_kinds))
    padding = {
        "int": lambda: draw(st.integers(0, 3)),
        "pair": lambda: (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
        "valid": lambda: "valid",
        "same": lambda: "same",
    }[kind]()
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    top, bottom, left, right = _padding_sides(padding, kernel, _as_pair(dilation))
    size = []
    for k, d, before, after in (
        (kernel[0], _as_pair(dilation)[0], top, bottom),
        (kernel[1], _as_pair(dilation)[1], left, right),
    ):
        smallest = max(1, d * (k - 1) + 1 - before - after)  # the dilated kernel fits the padded input
        if padding_mode == "reflect":
            smallest = max(smallest, before + 1, after + 1)  # reflect: padding < input size
        elif padding_mode == "circular":
            smallest = max(smallest, before, after)  # circular: padding <= input size
        size.append(smallest + draw(st.integers(0, 8)))
    n = draw(st.sampled_from([None, 0, 1, 2, 3]))
    via = "module" if padding_mode != "zeros" else draw(st.sampled_from(["functional", "module"]))
    layout = "contiguous" if n is None else draw(st.sampled_from(["contiguous", "channels_last", "non_contiguous"]))
    return Case(
        n=n,
        groups=groups,
        cin_per_group=cin_per_group,
        cout_per_group=cout_per_group,
        h=size[0],
        w=size[1],
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
        transform=draw(st.sampled_from(TRANSFORMS)),
        bias=draw(st.sampled_from(["none", "identity", "transform"])),
        via=via,
        layout=layout,
        algorithm=draw(st.sampled_from(ALGORITHMS)),
        seed=draw(st.integers(0, 2**31 - 1)),
        # Mostly one thread: on these tiny tensors a thread pool costs more than the work (4x the
        # run time on a loaded 2-core machine); every fourth case keeps two for the parallel splits.
        threads=draw(st.sampled_from([1, 1, 1, 2])),
    )


# --- one case against the reference ------------------------------------------------------------------


def _reference(case, x4, w, b):
    """(out, grads_fn) in float64 for a 4-D input, by tests/reference.py where it applies."""
    bias_transform = case.transform if case.bias == "transform" else "identity"
    if case.padding_mode == "zeros" or not isinstance(case.padding, str):
        return reference_conv2d(
            x4,
            w,
            b,
            case.transform,
            bias_transform,
            case.stride,
            case.padding,
            case.dilation,
            case.groups,
            case.padding_mode,
        )
    # "same"/"valid" with a padding_mode: nn.Conv2d's own padding (a meta conv, weights unused),
    # on f(W) and g(b) written in torch ops.
    conv = nn.Conv2d(
        case.cin,
        case.cout,
        case.kernel,
        case.stride,
        case.padding,
        case.dilation,
        case.groups,
        bias=False,
        padding_mode=case.padding_mode,
        device="meta",
    )
    x64 = x4.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    out = conv._conv_forward(
        x64, reference_f(case.transform, w64), None if b64 is None else reference_f(bias_transform, b64)
    )

    def grads(grad_out):
        inputs = [x64, w64] + ([b64] if b64 is not None else [])
        g = torch.autograd.grad(out, inputs, grad_out.double(), retain_graph=True)
        return g[0], g[1], (g[2] if b64 is not None else None)

    return out.detach(), grads


def _with_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":  # the same values seen through a strided slice of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    return t


def check_case(case: Case) -> None:
    previous_threads = torch.get_num_threads()
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    try:
        _check_case(case)
    finally:
        torch.set_num_threads(previous_threads)


def _check_case(case: Case) -> None:
    g = torch.Generator().manual_seed(case.seed)
    batch = 1 if case.n is None else case.n
    x4 = torch.randn(batch, case.cin, case.h, case.w, dtype=torch.float64, generator=g)
    w = torch.randn(case.cout, case.cin_per_group, *case.kernel, dtype=torch.float64, generator=g) * 0.5
    has_bias = case.bias != "none"
    b = torch.randn(case.cout, dtype=torch.float64, generator=g) * 0.5 if has_bias else None
    grad_out_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    ref_out, ref_grads = _reference(case, x4, w, b)

    x = (x4[0].clone() if case.n is None else _with_layout(x4.clone(), case.layout)).requires_grad_(True)
    with fusedtie.use_cpu_conv_algorithm(case.algorithm):
        if case.via == "functional":
            w_in = _with_layout(w, case.layout).requires_grad_(True)
            b_in = None if b is None else b.clone().requires_grad_(True)
            bias_transform = case.transform if case.bias == "transform" else "identity"
            out = fusedtie.tied_conv2d(
                x,
                w_in,
                b_in,
                transform_arg(case.transform),
                transform_arg(bias_transform),
                case.stride,
                case.padding,
                case.dilation,
                case.groups,
            )
            params = [w_in] + ([b_in] if b_in is not None else [])
        else:
            source = nn.Conv2d(
                case.cin,
                case.cout,
                case.kernel,
                case.stride,
                case.padding,
                case.dilation,
                case.groups,
                bias=True,
                padding_mode=case.padding_mode,
                dtype=torch.float64,
            )
            with torch.no_grad():
                source.weight = nn.Parameter(_with_layout(w, case.layout).clone())
                source.bias.copy_(b if has_bias else torch.zeros(case.cout, dtype=torch.float64))
            mode = {"none": None, "identity": "same", "transform": "transform"}[case.bias]
            layer = FusedTiedConv2d(source, transform_arg(case.transform), bias=mode)
            out = layer(x)
            params = [source.weight] + ([source.bias] if has_bias else [])
        assert out.dtype == torch.float64
        assert tuple(out.shape) == (tuple(ref_out.shape[1:]) if case.n is None else tuple(ref_out.shape))
        torch.testing.assert_close(out.reshape(ref_out.shape), ref_out, **TOL)
        grad_out = torch.randn(
            ref_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_out_seed)
        )
        grads = torch.autograd.grad(out, [x] + params, grad_out.reshape(out.shape))
    expected = ref_grads(grad_out)
    torch.testing.assert_close(
        grads[0].reshape(expected[0].shape), expected[0], **TOL, msg=lambda m: "input grad: " + m
    )
    torch.testing.assert_close(grads[1], expected[1], **TOL, msg=lambda m: "weight grad: " + m)
    if has_bias:
        torch.testing.assert_close(grads[2], expected[2], **TOL, msg=lambda m: "bias grad: " + m)


@PROPERTY_SETTINGS
@given(case=cases())
def test_matches_reference(case):
    check_case(case)


@pytest.mark.parametrize("case", REGRESSIONS, ids=[f"regression{i}" for i in range(len(REGRESSIONS))])
def test_regression(case):
    check_case(case)


# --- geometry PyTorch rejects ---------------------------------------------------------------------


def _clear(error: BaseException) -> bool:
    message = str(error)
    return bool(message.strip()) and "INTERNAL ASSERT" not in message


@st.composite
def raw_calls(draw):
    """Channels, groups, sizes and hyper-parameters drawn independently, so that many calls are
    invalid: channel mismatch, groups not dividing, zero/negative values, kernel larger than the
    padded input, "same" with a stride, a wrong bias size, an unknown padding string."""
    groups = draw(st.integers(0, 3))
    cin = draw(st.integers(1, 6))
    w_in = draw(st.integers(1, 3))
    cout = draw(st.integers(1, 6))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    hw = (draw(st.integers(0, 6)), draw(st.integers(0, 6)))
    stride = draw(_int_or_pair(-1, 3))
    dilation = draw(_int_or_pair(-1, 3))
    padding = draw(st.one_of(_int_or_pair(-1, 3), st.sampled_from(["same", "valid", "full"])))
    bias_size = draw(st.sampled_from([None, cout, cout, cout + 1]))
    return dict(
        n=draw(st.integers(0, 2)),
        cin=cin,
        w_in=w_in,
        cout=cout,
        kernel=kernel,
        hw=hw,
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
        bias_size=bias_size,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(PROPERTY_SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(call=raw_calls())
def test_rejects_what_conv2d_rejects(call):
    g = torch.Generator().manual_seed(call["seed"])
    x = torch.randn(call["n"], call["cin"], *call["hw"], dtype=torch.float64, generator=g)
    w = torch.randn(call["cout"], call["w_in"], *call["kernel"], dtype=torch.float64, generator=g)
    b = None if call["bias_size"] is None else torch.randn(call["bias_size"], dtype=torch.float64, generator=g)
    geometry = (call["stride"], call["padding"], call["dilation"], call["groups"])
    try:
        expected = F.conv2d(x, torch.tanh(w), b, *geometry)
    except Exception as torch_error:
        with pytest.raises((ValueError, TypeError, RuntimeError)) as ours:
            fusedtie.tied_conv2d(x, w, b, "tanh", "identity", *geometry)
        assert _clear(ours.value), f"unclear error {ours.value!r} where F.conv2d said {torch_error}"
        return
    broken = _broken_rule(call)
    if broken:
        # PyTorch skips some checks on an empty batch (dilation 0 is accepted with N = 0);
        # fusedtie checks the hyper-parameters whatever the batch.
        assert call["n"] == 0, f"F.conv2d accepted {broken} on a non-empty batch"
        with pytest.raises(ValueError, match=broken.split()[0]):
            fusedtie.tied_conv2d(x, w, b, "tanh", "identity", *geometry)
        return
    out = fusedtie.tied_conv2d(x, w, b, "tanh", "identity", *geometry)
    torch.testing.assert_close(out, expected, **TOL)


def _broken_rule(call):
    """The hyper-parameter rule a call breaks whatever its tensors ("dilation <= 0", ...), or None."""
    for name in ("stride", "dilation"):
        if min(_as_pair(call[name])) <= 0:
            return f"{name} <= 0"
    if call["groups"] <= 0:
        return "groups <= 0"
    if not isinstance(call["padding"], str) and min(_as_pair(call["padding"])) < 0:
        return "padding < 0"
    return None


@settings(PROPERTY_SETTINGS, max_examples=max(1, EXAMPLES // 3))
@given(
    mode=st.sampled_from(PADDING_MODES[1:]),
    padding=_int_or_pair(0, 4),
    kernel=st.integers(1, 3),
    hw=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    unbatched=st.booleans(),
)
def test_padding_mode_input_too_small_errors_like_conv2d(mode, padding, kernel, hw, unbatched):
    """reflect needs padding < input size, circular padding <= input size: checked at forward. The
    layer raises where nn.Conv2d raises, and agrees where it does not."""
    conv = nn.Conv2d(2, 3, kernel, padding=padding, padding_mode=mode, dtype=torch.float64)
    layer = FusedTiedConv2d(conv, "identity")
    x = torch.randn(*(() if unbatched else (2,)), 2, *hw, dtype=torch.float64)
    try:
        expected = conv(x)
    except Exception as torch_error:
        with pytest.raises((ValueError, RuntimeError)) as ours:
            layer(x)
        assert _clear(ours.value), f"unclear error {ours.value!r} where nn.Conv2d said {torch_error}"
        return
    torch.testing.assert_close(layer(x), expected, **TOL)


# --- edge cases (the edge-case list) not covered by tests/test_bad_input.py ---------------------------

NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _nonfinite_params():
    params = []
    for algorithm in ALGORITHMS:
        for dtype in (torch.float32, torch.float64):
            for where, value in (
                ("weight", "nan"),
                ("weight", "inf"),
                ("weight", "-inf"),
                ("input", "nan"),
                ("input", "inf"),
                ("input", "-inf"),
                ("bias", "nan"),
                ("bias", "-inf"),
            ):
                params.append(
                    pytest.param(algorithm, dtype, where, value, id=f"{algorithm}-{str(dtype)[6:]}-{where}-{value}")
                )
    return params


@pytest.mark.parametrize("algorithm,dtype,where,value", _nonfinite_params())
def test_nan_and_inf_propagate_like_conv2d(algorithm, dtype, where, value):
    """NaN/Inf in the source weight, the input or the bias: the NaN, +Inf and -Inf masks of the
    output and of every gradient equal F.conv2d's on f(W) in the same dtype (PyTorch's own autograd),
    under each CPU algorithm. The geometry is one where the forced algorithm applies (depthwise for
    depthwise/auto: stride 1 and a 12x12 output, which auto sends to the depthwise kernel)."""
    groups = 4 if algorithm in ("depthwise", "auto") else 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 12, dtype=dtype, generator=g)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=dtype, generator=g)
    b = torch.randn(4, dtype=dtype, generator=g)
    v = NONFINITE[value]
    if where == "weight":
        w[1, 0, 0, 0] = v  # a corner tap: it reaches the zero padding at the borders
        w[2, 0, 1, 1] = v  # the centre tap
    elif where == "input":
        x[0, 1, 0, 5] = v  # on the border
        x[1, 2, 6, 6] = v
        x[1, 3, 4, 4] = -v if value != "nan" else v
    else:
        b[2] = v
    transform = bias_transform = "identity" if value == "-inf" else "square"  # square(-inf) = +inf
    ref_params = [t.clone().requires_grad_(True) for t in (x, w, b)]
    ref = F.conv2d(
        ref_params[0],
        reference_f(transform, ref_params[1]),
        reference_f(bias_transform, ref_params[2]),
        padding=1,
        groups=groups,
    )
    grad_out = torch.randn(ref.shape, dtype=dtype, generator=g)
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out)
    ours_params = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        out = fusedtie.tied_conv2d(
            ours_params[0], ours_params[1], ours_params[2], transform, bias_transform, padding=1, groups=groups
        )
        grads = torch.autograd.grad(out, ours_params, grad_out)
    differences = nonfinite_mask_differences(
        zip(("output", "input grad", "weight grad", "bias grad"), (out, *grads), (ref, *ref_grads))
    )
    assert not differences, "; ".join(differences)
    assert torch.isfinite(ref).sum() > 0  # the check is not vacuous: some outputs stay finite


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.complex64,
        torch.complex128,
        torch.float8_e4m3fn,
    ],
)
def test_non_floating_dtypes_raise_clear_errors(dtype):
    """Integer, bool, complex and float8 tensors: a TypeError naming the supported dtypes, from the
    function, the layer (a source converted in place) and apply_transform."""
    x = torch.randn(1, 2, 5, 5).to(dtype)
    w = torch.randn(3, 2, 3, 3).to(dtype)
    pattern = r"supports floating-point tensors \(float32, float64, bfloat16, float16\)"
    with pytest.raises(TypeError, match=pattern):
        fusedtie.tied_conv2d(x, w)
    with pytest.raises(TypeError, match=pattern):
        fusedtie.apply_transform(w, "square")
    with pytest.raises(TypeError, match=pattern):
        torch.ops.fusedtie.tied_conv2d(
            x.to("meta"), w.to("meta"), None, "square", 1.0, "identity", 1.0, [1, 1], [0, 0, 0, 0], [1, 1], 1
        )
    source = nn.Conv2d(2, 3, 3, bias=False)
    source.weight = nn.Parameter(w, requires_grad=False)
    with pytest.raises(TypeError, match=pattern):
        FusedTiedConv2d(source, "square")(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_floating_input_with_non_floating_weight_names_both(dtype):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3).to(dtype)
    with pytest.raises(TypeError, match=r"same dtype, got input (Float|float32) and weight"):
        fusedtie.tied_conv2d(x, w)


@pytest.mark.parametrize("padding,dilation", [(0, 1), ((1, 0), 2), ("same", 3), ("valid", (1, 2))], ids=str)
def test_kernel_larger_than_padded_input_matches_conv2d(padding, dilation):
    """The dilated kernel one pixel wider than the padded input raises where F.conv2d raises, with
    its message; one pixel smaller works (and "same" always fits)."""
    w = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    d = _as_pair(dilation)
    top, bottom, left, right = _padding_sides(padding, (3, 4), d)
    fit = (d[0] * 2 + 1 - top - bottom, d[1] * 3 + 1 - left - right)
    for shrink in (0, 1):
        hw = (max(fit[0] - shrink, 0), max(fit[1] - shrink, 0))
        x = torch.randn(1, 2, *hw, dtype=torch.float64)
        try:
            expected = F.conv2d(x, w, None, 1, padding, dilation)
        except RuntimeError as error:
            assert shrink == 1 and "Kernel size can't be greater than actual input size" in str(error)
            with pytest.raises(ValueError, match=r"Kernel size can't be greater than actual input size"):
                fusedtie.tied_conv2d(x, w, None, "identity", "identity", 1, padding, dilation)
            continue
        out = fusedtie.tied_conv2d(x, w, None, "identity", "identity", 1, padding, dilation)
        torch.testing.assert_close(out, expected, **TOL)


# Sizes past 2^31 elements. A real tensor that large needs 8 GiB in float32 (4 GiB in bfloat16)
# before any copy a convolution path makes, so by default only the shape arithmetic is checked
# (meta tensors) and the strided-sampling check below runs at a small size; FUSEDTIE_LARGE_TESTS=1
# runs it past 2^31 elements where the memory is there.

BIG = 2**31


def test_sizes_past_2_31_elements_on_meta():
    """Shape and memory-format arithmetic in 64 bits: a 2^32-element input (and output) on meta."""
    cases = [
        ((1, 1, 2**16, 2**16), (1, 1, 3, 3), dict(padding=1)),
        ((2**16, 4, 128, 64), (8, 4, 1, 1), dict()),
        ((1, 2, 2**17, 2**15), (4, 1, 3, 2), dict(stride=(1, 2), padding="valid", groups=2)),
    ]
    for xs, ws, kw in cases:
        x, w = torch.empty(xs, device="meta"), torch.empty(ws, device="meta")
        assert x.numel() >= BIG
        ours = fusedtie.tied_conv2d(x, w, None, "square", **kw)
        theirs = F.conv2d(x, w, None, **kw)
        assert ours.shape == theirs.shape and ours.numel() >= BIG and ours.device.type == "meta"
        conv = nn.Conv2d(ws[1] * kw.get("groups", 1), ws[0], ws[2:], bias=False, device="meta", **kw)
        assert FusedTiedConv2d(conv, "tanh")(x).shape == theirs.shape


def _strided_sampling_check(h, w, algorithm):
    """A 1x1 conv with strides (h-1, w-1) on a (1, 1, h, w) input reads its four corners only, the
    last at flat index h*w - 1; output and weight gradient are known in closed form."""
    x = torch.zeros(1, 1, h, w)
    corners = torch.tensor([1.0, -2.0, 3.0, -4.0])
    x[0, 0, 0, 0], x[0, 0, 0, -1], x[0, 0, -1, 0], x[0, 0, -1, -1] = corners
    weight = torch.full((1, 1, 1, 1), 1.5, requires_grad=True)
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        out = fusedtie.tied_conv2d(x, weight, None, "square", stride=(h - 1, w - 1))
        assert out.shape == (1, 1, 2, 2)
        torch.testing.assert_close(out.flatten(), 2.25 * corners)
        grad_out = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        (grad_w,) = torch.autograd.grad(out, weight, grad_out)
    torch.testing.assert_close(grad_w.flatten(), (2 * 1.5 * (grad_out.flatten() * corners).sum()).reshape(1))


@pytest.mark.parametrize("algorithm", ["library", "gemm", "depthwise"])
def test_strided_sampling_small(algorithm):
    _strided_sampling_check(65, 130, algorithm)


def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(
    os.environ.get("FUSEDTIE_LARGE_TESTS") != "1", reason="needs 8+ GiB of RAM; set FUSEDTIE_LARGE_TESTS=1 to run"
)
@pytest.mark.parametrize("algorithm", ["library", "gemm", "depthwise"])
def test_strided_sampling_past_2_31_elements(algorithm):
    h, w = 2**15 + 1, 2**16  # 2^31 + 2^16 elements; the last corner's flat index is past 2^31
    need = 3 * h * w * 4
    if _available_memory_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB available")
    assert h * w > BIG
    _strided_sampling_check(h, w, algorithm)
