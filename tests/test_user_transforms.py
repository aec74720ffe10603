"""User transforms: Transform.from_expression (f and f' compiled from C++ expressions) and
Transform.chain (compositions of built-ins), against float64 references written in torch ops.

Each distinct pair of expressions compiles once per test session (a few seconds): the libraries go
to a session-wide cache folder (FUSEDTIE_CACHE_DIR), and the transforms are module-scoped fixtures.
Compiled here: cube, quad, the wrong-derivative cube, log, one expression that fails to compile,
and the math-function expressions of the vector loops (VECTOR_CASES, two that fall back to scalar
loops; a few again in subprocesses for AVX2 and for scalar-only builds).
Registrations last for the process, so the names carry a user_ prefix that no other test uses (some
use "cube" as their example of an unknown transform).
"""

from __future__ import annotations

import copy
import glob
import math
import os
import pickle
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import nonfinite_mask_differences

import fusedtie
from fusedtie import Transform, user_transforms

QUAD_A, QUAD_B = 0.5, 1.5
# fixture name -> the reference f in torch ops
REFERENCES = {
    "cube": lambda w: w * w * w,
    "quad": lambda w: QUAD_A * w + QUAD_B * w * w,
    "tanh2": lambda w: 2.0 * torch.tanh(w),
    "chain3": lambda w: torch.sigmoid(0.5 * w) ** 2,  # non-linear later stages: the order matters
}
ALGORITHM_CASES = [  # (algorithm, groups, in_channels, out_channels): shapes each algorithm applies to
    ("library", 1, 4, 6),
    ("library", 2, 4, 6),
    ("gemm", 1, 4, 6),
    ("brgemm", 1, 4, 6),
    ("depthwise", 4, 4, 4),
]
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


class CompilerCalls:
    """Counts torch.utils.cpp_extension.load calls (the only way fusedtie invokes a compiler)."""

    def __init__(self, monkeypatch):
        from torch.utils import cpp_extension

        self.count = 0
        real = cpp_extension.load

        def counting_load(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cpp_extension, "load", counting_load)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """One cache folder for the session (and the subprocesses it starts, which inherit it)."""
    path = tmp_path_factory.mktemp("user_transform_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEDTIE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def cube(cache_dir):
    return Transform.from_expression("user_cube", forward="x * x * x", derivative="3 * x * x")


@pytest.fixture(scope="module")
def quad(cache_dir):
    return Transform.from_expression(
        "user_quad", forward="a * x + b * x * x", derivative="a + 2 * b * x", a=QUAD_A, b=QUAD_B
    )


@pytest.fixture(scope="module")
def tanh2():
    return Transform.chain("tanh", ("scale", 2.0))


@pytest.fixture(scope="module")
def chain3():
    return Transform.chain(("scale", 0.5), "sigmoid", "square")


@pytest.fixture(params=list(REFERENCES))
def user_transform(request):
    """(transform, reference f) for each user transform."""
    return request.getfixturevalue(request.param), REFERENCES[request.param]


def reference_conv(x, w, b, f, padding, groups):
    """F.conv2d(x, f(w), f(b)) and its gradients in float64 with f in torch ops."""
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    out = F.conv2d(x64, f(w64), f(b64), padding=padding, groups=groups)
    return out, lambda grad: torch.autograd.grad(out, (x64, w64, b64), grad.double())


def conv_inputs(dtype, groups, in_channels, out_channels):
    x = torch.randn(2, in_channels, 7, 6).to(dtype).requires_grad_(True)
    w = (torch.randn(out_channels, in_channels // groups, 3, 3) * 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(out_channels) * 0.5).to(dtype).requires_grad_(True)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ALGORITHM_CASES, ids=str)
def test_tied_conv2d_matches_reference(user_transform, case, dtype):
    t, f = user_transform
    algorithm, groups, cin, cout = case
    x, w, b = conv_inputs(dtype, groups, cin, cout)
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        out = fusedtie.tied_conv2d(x, w, b, transform=t, bias_transform=t, padding=1, groups=groups)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), grad)
    ref, ref_grads_fn = reference_conv(x, w, b, f, 1, groups)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    for got, expected in zip(grads, ref_grads_fn(grad)):
        torch.testing.assert_close(got.double(), expected, **tol)


def test_fused_tied_conv2d_matches_reference(user_transform):
    t, f = user_transform
    source = nn.Conv2d(4, 6, 3, padding=1)
    layer = fusedtie.FusedTiedConv2d(source, t, bias="transform")
    assert layer.transform == t
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, source.weight, source.bias), grad)
    ref, ref_grads_fn = reference_conv(x, source.weight, source.bias, f, 1, 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for got, expected in zip(grads, ref_grads_fn(grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.double(), f(source.weight.detach().double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_apply_transform_in_every_dtype(user_transform, dtype):
    t, f = user_transform
    # 3000 elements: several blocks of a chain, and more than one vector of every width
    w = torch.linspace(-3, 3, 3000, dtype=torch.float64).to(dtype)
    expected = f(w.double())
    got = fusedtie.apply_transform(w, t)
    assert got.dtype == dtype
    tol = (
        dict(rtol=1e-12, atol=1e-12)
        if dtype == torch.float64
        else (dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2))
    )
    torch.testing.assert_close(got.double(), expected, **tol)


def test_gradcheck(user_transform):
    t, _ = user_transform
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fusedtie.tied_conv2d(x, w, b, transform=t, bias_transform=t, padding=1), (x, w, b)
    )
    assert torch.autograd.gradcheck(lambda w: fusedtie.apply_transform(w, t), (w,))


def test_torch_compile_fullgraph_and_opcheck(cube, tanh2):
    torch._dynamo.reset()
    source = nn.Conv2d(4, 4, 3, padding=1)
    layer = fusedtie.FusedTiedConv2d(source, cube, bias="transform")

    def net(x):
        return fusedtie.tied_conv2d(layer(x), source.weight, transform=tanh2, padding=1)

    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), (x, source.weight, source.bias))
    # against the float64 oracle
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, source.weight, source.bias))
    h = F.conv2d(x64, w64**3, b64**3, padding=1)
    ref = F.conv2d(h, 2 * torch.tanh(w64), padding=1)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x64, w64, b64))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)

    args = (
        torch.randn(2, 4, 6, 6, requires_grad=True),
        torch.randn(5, 4, 3, 3, requires_grad=True),
        torch.randn(5, requires_grad=True),
        cube.name,
        1.0,
        tanh2.name,
        1.0,
        [1, 1],
        [1, 1, 1, 1],
        [1, 1],
        1,
    )
    torch.library.opcheck(torch.ops.fusedtie.tied_conv2d.default, args)
    torch.library.opcheck(torch.ops.fusedtie.transform.default, (torch.randn(5, 4, requires_grad=True), cube.name, 1.0))


def test_wrong_derivative_is_a_value_error_with_the_worst_point(cache_dir):
    with pytest.raises(
        ValueError,
        match=r"transform 'user_cube_wrong': the derivative '2 \* x \* x' disagrees with the "
        r"forward 'x \* x \* x' at \d+ of 1000 points.*worst at x = .*"
        r"central difference",
    ):
        Transform.from_expression("user_cube_wrong", forward="x * x * x", derivative="2 * x * x")
    # nothing was left registered under the name
    with pytest.raises(ValueError, match="unknown transform 'user_cube_wrong'"):
        Transform("user_cube_wrong")
    assert "user_cube_wrong" not in fusedtie.available_transforms(include_user=True)


def test_compile_error_quotes_the_compiler(cache_dir):
    with pytest.raises(ValueError, match=r"do not compile(.|\n)*forward:1:\d+: error: .*'y' was not declared") as info:
        Transform.from_expression("user_broken", forward="x * y", derivative="1")
    assert "ninja" not in str(info.value).splitlines()[1]  # the compiler's lines, not the build tool's
    with pytest.raises(ValueError, match="unknown transform 'user_broken'"):
        Transform("user_broken")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="square", forward="x", derivative="1"), "'square' is a built-in transform"),
        (dict(name="two words", forward="x", derivative="1"), "must be an identifier"),
        (dict(name="t", forward="x; x", derivative="1"), "a single C\\+\\+ expression in x, without ';'"),
        (dict(name="t", forward="", derivative="1"), "non-empty C\\+\\+ expression"),
        (dict(name="t", forward="x", derivative="1", int=1.0), "'int' is a C\\+\\+ keyword"),
        (dict(name="t", forward="x", derivative="1", fusedtie_a=1.0), "reserved"),
        (dict(name="t", forward="x", derivative="1", a=float("nan")), "parameter a must be a finite real number"),
        (dict(name="t", forward="x", derivative="1", a=True), "parameter a must be a finite real number"),
    ],
)
def test_invalid_definitions_raise_before_compiling(monkeypatch, kwargs, message):
    calls = CompilerCalls(monkeypatch)
    with pytest.raises(ValueError, match=message):
        Transform.from_expression(**kwargs)
    assert calls.count == 0


def test_parameter_x_is_refused():
    with pytest.raises(ValueError, match="'x' would shadow"):
        Transform.from_expression("t", forward="x", derivative="1", **{"x": 1.0})


def test_redefinition_names_both_definitions(monkeypatch, cube):
    calls = CompilerCalls(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"transform 'user_cube' is already defined as from_expression\(forward='x \* x \* x', "
        r"derivative='3 \* x \* x'\); cannot redefine it as from_expression\("
        r"forward='x \* x', derivative='2 \* x'\)",
    ):
        Transform.from_expression("user_cube", forward="x * x", derivative="2 * x")
    with pytest.raises(ValueError, match="'tanh' is a built-in transform"):
        Transform.chain("exp", "neg", name="tanh")
    assert calls.count == 0


def test_second_creation_does_not_compile(monkeypatch, cube, quad):
    calls = CompilerCalls(monkeypatch)
    # the same definition: the registered transform
    assert Transform.from_expression("user_cube", forward="x * x * x", derivative="3 * x * x") == cube
    # new names for compiled expressions, other parameter values: the cached library
    quad2 = Transform.from_expression(
        "user_quad2", forward="a * x + b * x * x", derivative="a + 2 * b * x", a=-1.0, b=2.0
    )
    assert calls.count == 0
    w = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(fusedtie.apply_transform(w, quad2), -w + 2 * w * w)
    torch.testing.assert_close(fusedtie.apply_transform(w, quad), QUAD_A * w + QUAD_B * w * w)


def run_python(code: str) -> str:
    """Runs code in a fresh interpreter (inheriting FUSEDTIE_CACHE_DIR) in which calling the compiler
    is an error; returns its stdout."""
    prelude = textwrap.dedent("""
        import torch.utils.cpp_extension as _cpp
        def _no_compiler(*args, **kwargs):
            raise AssertionError("the compiler was invoked")
        _cpp.load = _no_compiler
    """)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_new_process_loads_the_cache_without_compiling(cube, quad):
    out = run_python("""
        import time, torch, fusedtie
        start = time.perf_counter()
        cube = fusedtie.Transform.from_expression("user_cube", forward="x * x * x", derivative="3 * x * x")
        print(f"seconds {time.perf_counter() - start:.4f}")
        w = torch.linspace(-2, 2, 9, dtype=torch.float64)
        print(fusedtie.apply_transform(w, cube).tolist())
    """)
    lines = out.splitlines()
    assert lines[0].startswith("seconds ")
    w = torch.linspace(-2, 2, 9, dtype=torch.float64)
    assert eval(lines[1]) == (w**3).tolist()


def test_pickle_round_trip_in_a_new_process(tmp_path, cube, quad, tanh2):
    source = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(
        source, fusedtie.FusedTiedConv2d(source, quad, bias="transform"), fusedtie.FusedTiedConv2d(source, tanh2)
    )
    x = torch.randn(1, 4, 6, 6)
    path = tmp_path / "model.pt"
    torch.save({"model": model, "x": x, "y": model(x), "transforms": [cube, quad, tanh2]}, path)
    out = run_python(f"""
        import torch, fusedtie
        saved = torch.load({str(path)!r}, weights_only=False)
        torch.testing.assert_close(saved["model"](saved["x"]), saved["y"], rtol=0, atol=0)
        print([str(t) for t in saved["transforms"]])
        print(saved["transforms"][1] == fusedtie.Transform("user_quad"))
    """)
    assert out.splitlines() == [str(["user_cube", "user_quad", "chain(tanh, scale(alpha=2.0))"]), "True"]


def test_copy_pickle_equality_and_str(cube, quad, tanh2):
    for t in (cube, quad, tanh2):
        assert copy.deepcopy(t) == t
        assert pickle.loads(pickle.dumps(t)) == t
        assert hash(Transform(t.name)) == hash(t)
        assert Transform.parse(t.name) == t
    assert str(cube) == "user_cube" and str(tanh2) == "chain(tanh, scale(alpha=2.0))"
    assert Transform.chain("tanh", Transform("scale", alpha=2.0)) == tanh2  # the same definition
    assert Transform("scale", alpha=2.0) == pickle.loads(pickle.dumps(Transform("scale", alpha=2.0)))


def test_tables_list_user_transforms_on_request(cube, quad, tanh2):
    assert "user_cube" not in fusedtie.available_transforms()
    assert {"user_cube", "user_quad", tanh2.name} <= set(fusedtie.available_transforms(include_user=True))
    rows = {row["name"]: row for row in fusedtie.transform_table(include_user=True)}
    quad_row = dict(rows["user_quad"])
    # what its CPU loops are depends on the machine (plain arithmetic vectorises wherever vectors exist)
    assert quad_row.pop("vectorized") is VECTOR_ISA
    assert quad_row.pop("cpu_isa") == (CPU_CAPABILITY if VECTOR_ISA else "DEFAULT")
    assert quad_row == {
        "name": "user_quad",
        "forward": "a * x + b * x * x",
        "derivative": "a + 2 * b * x",
        "uses_alpha": False,
        "builtin": False,
        "params": {"a": QUAD_A, "b": QUAD_B},
    }
    assert rows[tanh2.name]["vectorized"] is True  # chains run the built-in vector passes
    assert rows["tanh"]["builtin"] is True
    assert rows[tanh2.name]["forward"] == "chain(tanh, scale(alpha=2.0))"


def test_chain_validation(cube):
    with pytest.raises(ValueError, match="a chain composes 2 to 8 transforms, got 1"):
        Transform.chain("tanh")
    with pytest.raises(ValueError, match="unknown transform 'nope'"):
        Transform.chain("tanh", "nope")
    with pytest.raises(ValueError, match="'user_cube' is a user transform"):
        Transform.chain("tanh", Transform("user_cube"))
    with pytest.raises(ValueError, match="transform 'scale' needs its constant"):
        Transform.chain("tanh", "scale")


def test_unknown_name_in_the_operator_lists_user_transforms(cube):
    with pytest.raises(ValueError, match="unknown transform 'nope'; valid transforms: identity.*softplus.*user_cube"):
        torch.ops.fusedtie.transform(torch.randn(3), "nope", 1.0)


@pytest.mark.skipif(not (fusedtie.cuda_compiled and torch.cuda.is_available()), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["fused", "library", "auto"])
def test_cuda_matches_reference(user_transform, algorithm):
    # the fused kernels know only the built-ins: user transforms must run the library path whatever
    # the setting (a fused kernel would silently compute the identity)
    t, f = user_transform
    # float64: exact in cuDNN and in the CUDA-core kernels alike (float32 convolutions may use TF32)
    x, w, b = (v.detach().cuda().requires_grad_(True) for v in conv_inputs(torch.float64, 1, 16, 16))
    with fusedtie.use_cuda_conv_algorithm(algorithm):
        out = fusedtie.tied_conv2d(x, w, b, transform=t, bias_transform=t, padding=1)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), grad)
    ref, ref_grads_fn = reference_conv(x.cpu(), w.cpu(), b.cpu(), f, 1, 1)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-7, atol=1e-7)
    for got, expected in zip(grads, ref_grads_fn(grad.cpu())):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-7, atol=1e-7)


def test_check_domain(cache_dir):
    with pytest.raises(
        ValueError,
        match=r"transform 'user_log_t': the forward 'log\(x\)' is not finite anywhere on the "
        r"check domain \(-2.0, -1.0\)",
    ):
        Transform.from_expression("user_log_t", forward="log(x)", derivative="1 / x", check_domain=(-2, -1))
    log_t = Transform.from_expression("user_log_t", forward="log(x)", derivative="1 / x", check_domain=(0.1, 4))
    w = torch.linspace(0.1, 4, 100, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fusedtie.apply_transform(w, log_t), torch.log(w))
    assert torch.autograd.gradcheck(lambda w: fusedtie.apply_transform(w, log_t), (w,))


# ---- vector CPU loops (fusedtie/include/fusedtie_user_vector.h) --------------------------------------
# Expressions calling math functions run as vector loops where ATen's CPU capability is AVX2 or
# AVX512. The references are torch's own functions, in float64 for values and in the computation
# type (float32 for the 16-bit types) for the NaN/Inf patterns, where overflow of an intermediate is
# part of the expression's meaning.

CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
VECTOR_ISA = (
    CPU_CAPABILITY in ("AVX2", "AVX512")
    and sys.platform.startswith("linux")
    and platform.machine().lower() in ("x86_64", "amd64")
    and os.environ.get("FUSEDTIE_USER_VECTORIZE", "1") != "0"
)
needs_vector_isa = pytest.mark.skipif(not VECTOR_ISA, reason="vector loops need AVX2 or AVX-512 (x86-64 Linux)")
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# lengths around every vector width (8 and 16 float lanes) and a long odd one: the empty pass, the
# tail alone, whole vectors, whole vectors and a tail
LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 1001]
VALUE_TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
SOFT_ABS_ALPHA = 0.5
SQRT_PI, LN2, LN10 = math.sqrt(math.pi), math.log(2.0), math.log(10.0)


def _round_half_away(x):
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)  # exact on the grid of quarters used below


# name -> (forward, derivative, params, check_domain, f, f', inputs(n, generator)) with f and f' in torch ops
VECTOR_CASES = {
    "tanh": (
        "tanh(x)",
        "1 - tanh(x) * tanh(x)",
        {},
        None,
        torch.tanh,
        lambda x: 1 - torch.tanh(x) * torch.tanh(x),
        None,
    ),
    "gauss": (
        "exp(-x * x)",
        "-2 * x * exp(-x * x)",
        {},
        None,
        lambda x: torch.exp(-x * x),
        lambda x: -2 * x * torch.exp(-x * x),
        None,
    ),
    "swish": (
        "x / (1 + exp(-x))",
        "(1 + exp(-x) + x * exp(-x)) / ((1 + exp(-x)) * (1 + exp(-x)))",
        {},
        None,
        lambda x: x / (1 + torch.exp(-x)),
        lambda x: (1 + torch.exp(-x) + x * torch.exp(-x)) / ((1 + torch.exp(-x)) * (1 + torch.exp(-x))),
        None,
    ),
    "soft_abs": (
        "sqrt(x * x + alpha)",
        "x / sqrt(x * x + alpha)",
        {"alpha": SOFT_ABS_ALPHA},
        None,
        lambda x: torch.sqrt(x * x + SOFT_ABS_ALPHA),
        lambda x: x / torch.sqrt(x * x + SOFT_ABS_ALPHA),
        None,
    ),
    # the log of test_check_domain: log(0) = -inf, log(-1) = NaN
    "log_t": (
        "log(x)",
        "1 / x",
        {},
        (0.1, 4),
        torch.log,
        lambda x: 1 / x,
        lambda n, g: torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.05,
    ),
    # a mix of functions, and C++'s promotions: 0.5 * x and pow(x, 2) are double for a float x
    "mix": (
        "sin(x) * cos(0.5f * x) + log1p(x * x) + atan(x) + pow(x, 2) + erf(x) + exp2(x) - sinh(0.5 * x)"
        " + 0.25f * cosh(x)",
        "cos(x) * cos(0.5f * x) - 0.5f * sin(x) * sin(0.5f * x) + 2 * x / (1 + x * x) + 1 / (1 + x * x) + 2 * x"
        f" + {2 / SQRT_PI!r} * exp(-x * x) + {LN2!r} * exp2(x) - 0.5 * cosh(0.5 * x) + 0.25f * sinh(x)",
        {},
        None,
        lambda x: (
            torch.sin(x) * torch.cos(0.5 * x)
            + torch.log1p(x * x)
            + torch.atan(x)
            + x**2
            + torch.erf(x)
            + torch.exp2(x)
            - torch.sinh(0.5 * x)
            + 0.25 * torch.cosh(x)
        ),
        lambda x: (
            torch.cos(x) * torch.cos(0.5 * x)
            - 0.5 * torch.sin(x) * torch.sin(0.5 * x)
            + 2 * x / (1 + x * x)
            + 1 / (1 + x * x)
            + 2 * x
            + 2 / SQRT_PI * torch.exp(-x * x)
            + LN2 * torch.exp2(x)
            - 0.5 * torch.cosh(0.5 * x)
            + 0.25 * torch.sinh(x)
        ),
        None,
    ),
    # more functions; the literals are exact in float (0.375f), or double (and the expression with them)
    "mix2": (
        "log(3 + x) + sqrt(3 + x) + cbrt(5 + x) + tan(0.375f * x) + asin(0.25f * x) + acos(0.375f * x) + asinh(x)"
        " + atanh(0.375f * x) + expm1(0.5f * x) + log2(3 + x) + log10(4 + x) + erfc(x) + acosh(2 + x * x)",
        "1 / (3 + x) + 0.5f / sqrt(3 + x) + 1 / (3 * cbrt(5 + x) * cbrt(5 + x))"
        " + 0.375f / (cos(0.375f * x) * cos(0.375f * x)) + 0.25f / sqrt(1 - 0.0625f * x * x)"
        " - 0.375f / sqrt(1 - 0.140625f * x * x) + 1 / sqrt(1 + x * x) + 0.375f / (1 - 0.140625f * x * x)"
        f" + 0.5f * exp(0.5f * x) + 1 / ((3 + x) * {LN2!r}) + 1 / ((4 + x) * {LN10!r})"
        f" - {2 / SQRT_PI!r} * exp(-x * x) + 2 * x / sqrt((2 + x * x) * (2 + x * x) - 1)",
        {},
        None,
        lambda x: (
            torch.log(3 + x)
            + torch.sqrt(3 + x)
            + (5 + x).pow(1 / 3)
            + torch.tan(0.375 * x)
            + torch.asin(0.25 * x)
            + torch.acos(0.375 * x)
            + torch.asinh(x)
            + torch.atanh(0.375 * x)
            + torch.expm1(0.5 * x)
            + torch.log2(3 + x)
            + torch.log10(4 + x)
            + torch.erfc(x)
            + torch.acosh(2 + x * x)
        ),
        lambda x: (
            1 / (3 + x)
            + 0.5 / torch.sqrt(3 + x)
            + 1 / (3 * (5 + x).pow(2 / 3))
            + 0.375 / torch.cos(0.375 * x) ** 2
            + 0.25 / torch.sqrt(1 - 0.0625 * x * x)
            - 0.375 / torch.sqrt(1 - 0.140625 * x * x)
            + 1 / torch.sqrt(1 + x * x)
            + 0.375 / (1 - 0.140625 * x * x)
            + 0.5 * torch.exp(0.5 * x)
            + 1 / ((3 + x) * LN2)
            + 1 / ((4 + x) * LN10)
            - 2 / SQRT_PI * torch.exp(-x * x)
            + 2 * x / torch.sqrt((2 + x * x) ** 2 - 1)
        ),
        lambda n, g: torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2,
    ),
    # exact functions, with C's rules; the derivative keeps its scalar loop (?:), the forward does not
    "rounding": (
        "floor(x) + 2 * ceil(x) + 4 * trunc(x) + 8 * round(x) + fmod(x, 3) + copysign(1.5f, x) + fmin(x, 1)"
        " + fmax(x, -1) + min(x, T(2)) + max(x, T(-2)) + fabs(x - 0.75f) + abs(x)",
        "1 + (x < 1 ? 1 : 0) + (x > -1 ? 1 : 0) + (x < 2 ? 1 : 0) + (x > -2 ? 1 : 0) + (x > 0.75f ? 1 : -1)"
        " + (x > 0 ? 1 : -1)",
        {},
        (0.05, 0.7),
        lambda x: (
            torch.floor(x)
            + 2 * torch.ceil(x)
            + 4 * torch.trunc(x)
            + 8 * _round_half_away(x)
            + torch.fmod(x, 3)
            + torch.copysign(torch.full_like(x, 1.5), x)
            + torch.fmin(x, torch.ones_like(x))
            + torch.fmax(x, -torch.ones_like(x))
            + torch.where(2 < x, 2.0, x).to(x.dtype)
            + torch.where(x < -2, -2.0, x).to(x.dtype)
            + torch.abs(x - 0.75)
            + torch.abs(x)
        ),
        lambda x: (
            1
            + (x < 1).to(x.dtype)
            + (x > -1).to(x.dtype)
            + (x < 2).to(x.dtype)
            + (x > -2).to(x.dtype)
            + torch.where(x > 0.75, 1.0, -1.0).to(x.dtype)
            + torch.where(x > 0, 1.0, -1.0).to(x.dtype)
        ),
        lambda n, g: torch.randint(-40, 41, (n,), generator=g).to(torch.float64) * 0.25,
    ),
}
VECTOR_PASSES = {name: (True, name != "rounding") for name in VECTOR_CASES}  # (forward, chain rule) vectorised


@pytest.fixture(scope="module")
def vector_transforms(cache_dir):
    """name -> Transform for each of VECTOR_CASES, created on first use."""
    created = {}

    def get(name):
        if name not in created:
            forward, derivative, params, domain, *_ = VECTOR_CASES[name]
            created[name] = Transform.from_expression(
                f"user_v_{name}", forward=forward, derivative=derivative, check_domain=domain, **params
            )
        return created[name]

    return get


def _inputs(name, n, dtype, layout, generator):
    """n inputs of the case's domain in dtype, laid out as asked: contiguous, at an odd element offset
    (a misaligned pointer), or every other element of a longer tensor."""
    make = VECTOR_CASES[name][6] or (lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 2)
    values = make(n, generator).to(dtype)
    if layout == "contiguous":
        return values
    if layout == "offset":
        base = torch.zeros(n + 1, dtype=dtype)
        base[1:] = values
        return base[1:]
    base = torch.zeros(2 * n, dtype=dtype)
    base[::2] = values
    return base[::2]


@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(VECTOR_CASES))
def test_vector_passes_match_reference(vector_transforms, name, dtype, layout):
    t = vector_transforms(name)
    f, df = VECTOR_CASES[name][4:6]
    generator = torch.Generator().manual_seed(1)
    for n in LENGTHS:
        x = _inputs(name, n, dtype, layout, generator)
        g = (torch.randn(n, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
        y = fusedtie.apply_transform(x, t)
        chain = torch.ops.fusedtie._transform_backward(g, x, t.name, 1.0)
        assert y.dtype == chain.dtype == dtype and y.shape == chain.shape == (n,)
        x64 = x.double()
        torch.testing.assert_close(y.double(), f(x64), **VALUE_TOLERANCES[dtype], msg=lambda m: f"forward, n={n}: {m}")
        torch.testing.assert_close(
            chain.double(), g.double() * df(x64), **VALUE_TOLERANCES[dtype], msg=lambda m: f"chain rule, n={n}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_values_convert_and_round_as_torch(cache_dir, dtype):
    # every 16-bit pattern (zeros, subnormals, the largest values, infinities, NaNs), times 1.5 in
    # float: an exact product, half of them halfway between two 16-bit values, so the rounding of
    # the result (to nearest, ties to even) shows bit for bit
    t = Transform.from_expression("user_v_scale", forward="x * 1.5f", derivative="1.5f")
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    ours = fusedtie.apply_transform(x, t)
    theirs = (x.float() * 1.5).to(dtype)
    chain = torch.ops.fusedtie._transform_backward(x, x, t.name, 1.0)  # grad * 1.5, the same products
    for got in (ours, chain):
        nan = torch.isnan(theirs)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), theirs[~nan].view(torch.int16))


SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 100.0, -100.0, 1e-30, 0.5]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", ["tanh", "gauss", "swish", "soft_abs", "log_t", "rounding"])
def test_vector_passes_propagate_nan_and_inf_as_torch(vector_transforms, name, dtype):
    t = vector_transforms(name)
    f, df = VECTOR_CASES[name][4:6]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    # every special value in every lane position: 37 elements shifted 0..kLanes times
    for shift in range(17):
        x = torch.tensor((SPECIALS * 3)[shift : shift + 37], dtype=torch.float64).to(dtype)
        g = torch.full_like(x, 1.5)
        ours_f = fusedtie.apply_transform(x, t)
        ours_chain = torch.ops.fusedtie._transform_backward(g, x, t.name, 1.0)
        xo = x.to(opmath)
        theirs_f = f(xo).to(dtype)
        theirs_chain = (g.to(opmath) * df(xo)).to(dtype)
        differences = nonfinite_mask_differences(
            [("forward", ours_f, theirs_f), ("chain rule", ours_chain, theirs_chain)]
        )
        assert not differences, (differences, x, ours_f, theirs_f, ours_chain, theirs_chain)
        finite = torch.isfinite(theirs_f)
        torch.testing.assert_close(
            ours_f[finite].double(), f(x.double())[finite].to(dtype).double(), **VALUE_TOLERANCES[dtype]
        )


@needs_vector_isa
@pytest.mark.parametrize("name", list(VECTOR_CASES))
def test_math_function_expressions_are_vectorized(vector_transforms, name):
    t = vector_transforms(name)
    row = {row["name"]: row for row in fusedtie.transform_table(include_user=True)}[t.name]
    assert row["cpu_isa"] == CPU_CAPABILITY
    forward, chain_rule = VECTOR_PASSES[name]
    assert user_transforms.vectorized(t) is (forward and chain_rule) is row["vectorized"]
    built = user_transforms._BUILT[t.name]
    assert (built.vectorized_forward, built.vectorized_chain_rule) == (forward, chain_rule)


# Expressions with no vector form: `?:` (the requires-expression says no: one build), and
# std::max<T>, which the requires-expression lets through but whose body does not compile for the
# vector type (the vector build fails; the scalar library is built instead).
FALLBACK_CASES = {
    "elu": (
        "x > 0 ? x : exp(x) - 1",
        "x > 0 ? 1 : exp(x)",
        lambda x: torch.where(x > 0, x, torch.expm1(x)),
        lambda x: torch.where(x > 0, 1.0, torch.exp(x)),
    ),
    "relu_std": (
        "std::max<T>(x, T(0)) + 0.5f * x",
        "(x > 0 ? 1 : 0) + 0.5f",
        lambda x: torch.clamp(x, min=0) + 0.5 * x,
        lambda x: (x > 0).double() + 0.5,
    ),
}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(FALLBACK_CASES))
def test_expressions_without_vector_form_fall_back_to_scalar_loops(cache_dir, name, dtype):
    forward, derivative, f, df = FALLBACK_CASES[name]
    t = Transform.from_expression(f"user_fallback_{name}", forward=forward, derivative=derivative)
    assert user_transforms.vectorized(t) is False
    row = {row["name"]: row for row in fusedtie.transform_table(include_user=True)}[t.name]
    assert row["vectorized"] is False
    if VECTOR_ISA:  # ?: keeps the vector library (nothing vectorised); a failed vector build the scalar one
        assert row["cpu_isa"] == (CPU_CAPABILITY if name == "elu" else "DEFAULT")
    generator = torch.Generator().manual_seed(2)
    for n in LENGTHS:
        x = (torch.randn(n, generator=generator, dtype=torch.float64) * 2).to(dtype)
        g = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
        torch.testing.assert_close(fusedtie.apply_transform(x, t).double(), f(x.double()), **VALUE_TOLERANCES[dtype])
        torch.testing.assert_close(
            torch.ops.fusedtie._transform_backward(g, x, t.name, 1.0).double(),
            g.double() * df(x.double()),
            **VALUE_TOLERANCES[dtype],
        )


def test_vectorized_is_for_user_transforms(cube, tanh2):
    assert user_transforms.vectorized(tanh2) is True
    assert user_transforms.vectorized(cube.name) is (VECTOR_ISA is True)
    with pytest.raises(ValueError, match="'tanh' is not a user transform"):
        user_transforms.vectorized("tanh")


CHECK_IN_SUBPROCESS = """
    import torch, fusedtie
    from fusedtie import user_transforms
    t = fusedtie.Transform.from_expression("user_sub_swish", forward="x / (1 + exp(-x))",
        derivative="(1 + exp(-x) + x * exp(-x)) / ((1 + exp(-x)) * (1 + exp(-x)))")
    row = [r for r in fusedtie.transform_table(include_user=True) if r["name"] == t.name][0]
    print(row["cpu_isa"], row["vectorized"], torch.backends.cpu.get_cpu_capability())
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        for n in (0, 1, 7, 8, 9, 15, 16, 17, 1001):
            x = (torch.randn(n, dtype=torch.float64) * 3).to(dtype)
            x64 = x.double()
            s = torch.sigmoid(x64)
            torch.testing.assert_close(fusedtie.apply_transform(x, t).double(), x64 * s, rtol=tol, atol=tol)
            chain = torch.ops.fusedtie._transform_backward(torch.ones_like(x), x, t.name, 1.0)
            torch.testing.assert_close(chain.double(), s * (1 + x64 * (1 - s)), rtol=tol, atol=tol)
"""


@pytest.mark.skipif(
    CPU_CAPABILITY != "AVX512" or not VECTOR_ISA, reason="the AVX2 build is tested from an AVX-512 machine"
)
def test_avx2_vector_loops_in_a_process_capped_at_avx2(cache_dir):
    out = run_python_compiling(CHECK_IN_SUBPROCESS, ATEN_CPU_CAPABILITY="avx2")
    assert out.split() == ["AVX2", "True", "AVX2"]


def test_scalar_loops_only_with_fusedtie_user_vectorize_0(cache_dir):
    out = run_python_compiling(CHECK_IN_SUBPROCESS, FUSEDTIE_USER_VECTORIZE="0")
    assert out.split() == ["DEFAULT", "False", CPU_CAPABILITY]


@needs_vector_isa
def test_loader_refuses_a_library_for_a_wider_instruction_set(vector_transforms):
    library = user_transforms._BUILT[vector_transforms("tanh").name].path
    out = run_python_compiling(
        f"""
        import fusedtie
        from fusedtie._library import LIB
        try:
            LIB._register_compiled_transform("user_isa_probe", "probe", {library!r}, [])
        except RuntimeError as error:
            print(str(error).splitlines()[0])
    """,
        ATEN_CPU_CAPABILITY="default",
    )
    assert f"was compiled for the {CPU_CAPABILITY} instruction set, which this process's CPU capability (DEFAULT" in out


def run_python_compiling(code: str, **env) -> str:
    """Runs code in a fresh interpreter with the given environment (the session's cache folder
    included); compiling is allowed. Returns its stdout."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ, **env, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), os.environ.get("PYTHONPATH", "")])
    )
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_damaged_cached_library_is_rebuilt_never_loaded(cache_dir):
    """A cached library truncated to 1,000 bytes (a build killed mid-write, a full disk) crashed the
    next process that created the same transform with SIGBUS. Now its size and SHA-256 are checked
    against the record written beside it, and a mismatch is rebuilt with one warning."""
    make = """
        import warnings, torch, fusedtie
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = fusedtie.Transform.from_expression("user_damaged", forward="x * x * x + 1", derivative="3 * x * x")
        print(sum("does not match its record; rebuilding it" in str(w.message) for w in caught))
        w = torch.linspace(-2, 2, 9, dtype=torch.float64)
        print(torch.allclose(fusedtie.apply_transform(w, t), w ** 3 + 1))
    """
    before = set(glob.glob(os.path.join(str(cache_dir), "**", "*.so"), recursive=True))
    assert run_python_compiling(make).split() == ["0", "True"]
    built = sorted(set(glob.glob(os.path.join(str(cache_dir), "**", "*.so"), recursive=True)) - before)
    assert built, "the first process built no library"
    for damage in ("truncate", "garbage"):
        for library in built:
            if damage == "truncate":
                os.truncate(library, 1000)
            else:
                with open(library, "r+b") as f:
                    f.seek(4096)
                    f.write(b"\xde\xad\xbe\xef" * 64)
        assert run_python_compiling(make).split() == [str(len(built)), "True"]


def test_two_processes_creating_the_same_transform_build_it_once(cache_dir):
    """Two processes create the same new transform at once: one compiles, the other waits on the
    build folder's lock and then loads what the first recorded; both compute it right."""
    code = """
        import torch, fusedtie
        from fusedtie._catalog import LIBRARIES
        t = fusedtie.Transform.from_expression("user_race", forward="x * x * x - 2 * x", derivative="3 * x * x - 2")
        w = torch.linspace(-2, 2, 9, dtype=torch.float64)
        print(LIBRARIES["user_race"].compiled, torch.allclose(fusedtie.apply_transform(w, t), w ** 3 - 2 * w))
    """
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), os.environ.get("PYTHONPATH", "")]))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=600) for racer in racers]
    for racer, (out, err) in zip(racers, outputs):
        assert racer.returncode == 0, err[-3000:]
    results = sorted(out.split()[-2:] for out, _ in outputs)
    # One compiled each library it needed (vector, else scalar), the other found them; both agree.
    assert results == [["False", "True"], ["True", "True"]], outputs
