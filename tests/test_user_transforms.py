"""User transforms: Transform.from_expression (f and f' compiled from C++ expressions) and
Transform.chain (compositions of built-ins), against float64 references written in torch ops.

Each distinct pair of expressions compiles once per test session (a few seconds): the libraries go
to a session-wide cache folder (FUSEDTIE_CACHE_DIR), and the transforms are module-scoped fixtures.
Compiled here: cube, quad, the wrong-derivative cube, log, and one expression that fails to compile.
Registrations last for the process, so the names carry a user_ prefix that no other test uses (some
use "cube" as their example of an unknown transform).
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedtie
from fusedtie import Transform

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
    return Transform.from_expression("user_quad", forward="a * x + b * x * x", derivative="a + 2 * b * x",
                                     a=QUAD_A, b=QUAD_B)


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
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2))
    torch.testing.assert_close(got.double(), expected, **tol)


def test_gradcheck(user_transform):
    t, _ = user_transform
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fusedtie.tied_conv2d(x, w, b, transform=t, bias_transform=t, padding=1), (x, w, b))
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

    args = (torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(5, 4, 3, 3, requires_grad=True),
            torch.randn(5, requires_grad=True), cube.name, 1.0, tanh2.name, 1.0, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.fusedtie.tied_conv2d.default, args)
    torch.library.opcheck(torch.ops.fusedtie.transform.default, (torch.randn(5, 4, requires_grad=True), cube.name, 1.0))


def test_wrong_derivative_is_a_value_error_with_the_worst_point(cache_dir):
    with pytest.raises(ValueError, match=r"transform 'user_cube_wrong': the derivative '2 \* x \* x' disagrees with the "
                                         r"forward 'x \* x \* x' at \d+ of 1000 points.*worst at x = .*"
                                         r"central difference"):
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


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="square", forward="x", derivative="1"), "'square' is a built-in transform"),
    (dict(name="two words", forward="x", derivative="1"), "must be an identifier"),
    (dict(name="t", forward="x; x", derivative="1"), "a single C\\+\\+ expression in x, without ';'"),
    (dict(name="t", forward="", derivative="1"), "non-empty C\\+\\+ expression"),
    (dict(name="t", forward="x", derivative="1", int=1.0), "'int' is a C\\+\\+ keyword"),
    (dict(name="t", forward="x", derivative="1", fusedtie_a=1.0), "reserved"),
    (dict(name="t", forward="x", derivative="1", a=float("nan")), "parameter a must be a finite real number"),
    (dict(name="t", forward="x", derivative="1", a=True), "parameter a must be a finite real number"),
])
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
    with pytest.raises(ValueError, match=r"transform 'user_cube' is already defined as from_expression\(forward='x \* x \* x', "
                                         r"derivative='3 \* x \* x'\); cannot redefine it as from_expression\("
                                         r"forward='x \* x', derivative='2 \* x'\)"):
        Transform.from_expression("user_cube", forward="x * x", derivative="2 * x")
    with pytest.raises(ValueError, match="'tanh' is a built-in transform"):
        Transform.chain("exp", "neg", name="tanh")
    assert calls.count == 0


def test_second_creation_does_not_compile(monkeypatch, cube, quad):
    calls = CompilerCalls(monkeypatch)
    # the same definition: the registered transform
    assert Transform.from_expression("user_cube", forward="x * x * x", derivative="3 * x * x") == cube
    # new names for compiled expressions, other parameter values: the cached library
    quad2 = Transform.from_expression("user_quad2", forward="a * x + b * x * x", derivative="a + 2 * b * x", a=-1.0, b=2.0)
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
    run = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=300)
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
    model = nn.Sequential(source, fusedtie.FusedTiedConv2d(source, quad, bias="transform"),
                          fusedtie.FusedTiedConv2d(source, tanh2))
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
    assert rows["user_quad"] == {"name": "user_quad", "forward": "a * x + b * x * x", "derivative": "a + 2 * b * x",
                            "uses_alpha": False, "builtin": False, "params": {"a": QUAD_A, "b": QUAD_B}}
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
    with pytest.raises(ValueError, match=r"transform 'user_log_t': the forward 'log\(x\)' is not finite anywhere on the "
                                         r"check domain \(-2.0, -1.0\)"):
        Transform.from_expression("user_log_t", forward="log(x)", derivative="1 / x", check_domain=(-2, -1))
    log_t = Transform.from_expression("user_log_t", forward="log(x)", derivative="1 / x", check_domain=(0.1, 4))
    w = torch.linspace(0.1, 4, 100, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fusedtie.apply_transform(w, log_t), torch.log(w))
    assert torch.autograd.gradcheck(lambda w: fusedtie.apply_transform(w, log_t), (w,))
