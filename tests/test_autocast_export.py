"""Drop-in everywhere: torch.autocast, channels_last and torch.export.

Autocast (csrc/autocast.cpp): the operator casts like the built-in convolution, but computes f on the
float32 source before rounding, round(f(W_fp32)), never f(round(W)). Judged against a float64 oracle
of exactly that arithmetic, with PyTorch's own F.conv2d under the same autocast as the yardstick
(at most 2x its error). channels_last: output and gradient layouts as F.conv2d gives them, the fake
kernels agreeing with the real ones. export: the op stays in the graph and the source weight stays a
parameter.
"""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from op_cases import needs_cuda
from reference import reference_conv2d, reference_f, transform_arg
from torch._dynamo.backends.common import aot_autograd
from torch._prims_common import check_significant_strides, suggest_memory_format
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedtie

TRANSFORMS = fusedtie.available_transforms()
# Where round(f(w)) == f(round(w)) for every w: the autocast kernel keeps these fused.
COMMUTING = ("identity", "neg", "abs", "relu")


def _op_args(transform, bias_transform="identity", padding=1, groups=1):
    t = fusedtie.Transform.parse(transform_arg(transform))
    bt = fusedtie.Transform.parse(transform_arg(bias_transform))
    return (t.name, t.op_alpha, bt.name, bt.op_alpha, [1, 1], [padding] * 4, [1, 1], groups)


# --- autocast -------------------------------------------------------------------------------------


def _rounded(t64, dtype):
    """t64 rounded to dtype, with the rounding's gradient the identity (as autocast's cast has)."""
    return t64 + (t64.to(dtype).double() - t64).detach()


def _autocast_oracle(x, w, b, transform, bias_transform, dtype, grad_out, padding=1):
    """float64 conv2d(round(x), round(f(W)), round(g(b))) and its gradients w.r.t. x, W, b."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    out = F.conv2d(
        _rounded(x64, dtype),
        _rounded(reference_f(transform, w64), dtype),
        _rounded(reference_f(bias_transform, b64), dtype),
        padding=padding,
    )
    grads = torch.autograd.grad(out, (x64, w64, b64), grad_out.double())
    return out.detach(), grads


def _run_autocast(fn, x, w, b, device, dtype, grad_out):
    with torch.autocast(device, dtype=dtype):
        out = fn(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b), grad_out)
    return out, grads


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item()


def _check_autocast_against_oracle(device, dtype, transform, bias_transform):
    x = torch.randn(2, 8, 10, 10, device=device, requires_grad=True)
    w = (torch.randn(8, 8, 3, 3, device=device) * 0.5).requires_grad_(True)
    b = (torch.randn(8, device=device) * 0.5).requires_grad_(True)
    t, bt = transform_arg(transform), transform_arg(bias_transform)
    grad_out = torch.randn(2, 8, 10, 10, device=device).to(dtype)

    ours, our_grads = _run_autocast(
        lambda x, w, b: fusedtie.tied_conv2d(x, w, b, t, bt, padding=1), x, w, b, device, dtype, grad_out
    )
    # PyTorch's own convolution under the same autocast, on f(W) and g(b) computed in float32
    builtin, builtin_grads = _run_autocast(
        lambda x, w, b: F.conv2d(x, reference_f(transform, w), reference_f(bias_transform, b), padding=1),
        x,
        w,
        b,
        device,
        dtype,
        grad_out,
    )
    oracle, oracle_grads = _autocast_oracle(x, w, b, transform, bias_transform, dtype, grad_out)

    assert ours.dtype == dtype and ours.shape == oracle.shape
    for g, src in zip(our_grads, (x, w, b)):  # gradients reach the float32 tensors in float32
        assert g.dtype == torch.float32 and g.shape == src.shape
    eps = torch.finfo(dtype).eps
    pairs = [(ours, builtin, oracle)] + list(zip(our_grads, builtin_grads, oracle_grads))
    for name, (mine, theirs, ref) in zip(("output", "grad x", "grad w", "grad b"), pairs):
        err, builtin_err = _max_err(mine, ref), _max_err(theirs, ref)
        scale = ref.abs().max().item()
        assert builtin_err <= 8 * eps * scale, f"{name}: the yardstick itself is off ({builtin_err})"
        assert err <= 2 * builtin_err + 1e-3 * eps * scale, (
            f"{name}: error {err:.3g} against the float64 oracle, F.conv2d's is {builtin_err:.3g}"
        )


@pytest.mark.parametrize(
    "transform, bias_transform",
    [
        ("square", "identity"),  # unfused under autocast (f in float32, then cast)
        ("tanh", "softplus"),  # both unfused
        ("abs", "square"),  # weight fused (abs commutes with rounding), bias unfused
        ("scale", "neg"),
    ],
)
def test_autocast_cpu_bf16_matches_oracle(transform, bias_transform):
    _check_autocast_against_oracle("cpu", torch.bfloat16, transform, bias_transform)


def _check_f_in_float32_before_rounding(device, dtype, transform):
    """Each output of conv(ones, W) with a 1x1 kernel and one input channel is round(f(w)) exactly.

    The expected value is fusedtie's own float32 f, rounded: whether f(W) is accurate is
    test_transform_accuracy's business; this test checks *where* the rounding happens.
    """
    t = transform_arg(transform)
    w = (torch.randn(256, 1, 1, 1, device=device) * 2).requires_grad_(True)
    b = (torch.randn(256, device=device) * 2).requires_grad_(True)
    ones, zeros = torch.ones(1, 1, 1, 1, device=device), torch.zeros(1, 1, 1, 1, device=device)
    with torch.autocast(device, dtype=dtype):
        out_w = fusedtie.tied_conv2d(ones, w, None, t)
        out_b = fusedtie.tied_conv2d(zeros, w, b, t, bias_transform=t)
    assert out_w.dtype == dtype and out_b.dtype == dtype
    with torch.no_grad():
        expected_w = fusedtie.apply_transform(w, t).to(dtype)
        expected_b = fusedtie.apply_transform(b, t).to(dtype)
        wrong_w = fusedtie.apply_transform(w.to(dtype), t)  # f(round(W))
    assert torch.equal(out_w.flatten(), expected_w.flatten())
    assert torch.equal(out_b.flatten(), expected_b)
    if transform not in COMMUTING:  # the test can tell the two orders apart
        assert not torch.equal(expected_w, wrong_w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_autocast_cpu_rounds_f_computed_in_float32(transform, dtype):
    _check_f_in_float32_before_rounding("cpu", dtype, transform)


def test_autocast_cpu_every_entry_point_and_the_layer():
    """torch.ops, the _C eager binding the layer uses, and the layer: the same bf16 results."""
    conv_1 = nn.Conv2d(8, 8, 3, padding=1)
    tied = fusedtie.FusedTiedConv2d(conv_1, "exp", bias="transform")
    x = torch.randn(2, 8, 10, 10)
    args = (x, conv_1.weight, conv_1.bias, *_op_args("exp", "exp"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        via_op = torch.ops.fusedtie.tied_conv2d(*args)
        via_binding = fusedtie._LIB.tied_conv2d_eager(*args)
        via_layer = tied(x)
        with torch.autocast("cpu", enabled=False):  # a disabled region inside is plain float32
            plain = tied(x)
    assert via_op.dtype == via_binding.dtype == via_layer.dtype == torch.bfloat16
    assert torch.equal(via_op, via_binding) and torch.equal(via_op, via_layer)
    assert plain.dtype == torch.float32
    # inputs that autocast does not cast (float64) are left alone, as for F.conv2d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusedtie.tied_conv2d(x.double(), conv_1.weight.double(), transform="exp").dtype == torch.float64


class _Net(nn.Module):
    def __init__(self, transform="square", bias="transform"):
        super().__init__()
        self.conv_1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_2 = fusedtie.FusedTiedConv2d(self.conv_1, transform, bias)

    def forward(self, x):
        return self.conv_2(torch.relu(self.conv_1(x)))


def test_autocast_cpu_torch_compile_matches_eager():
    torch._dynamo.reset()
    net = _Net("square")
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    params = [x, *net.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = net(x)
    eager_grads = torch.autograd.grad(eager.float().square().sum(), params)

    # aot_eager that keeps the forward graph, then inductor
    graphs = []

    def keep_forward(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep_forward)
    for compiler in (backend, "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(net, fullgraph=True, backend=compiler)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
        grads = torch.autograd.grad(out.float().square().sum(), params)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
        for g, e in zip(grads, eager_grads):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, e, rtol=5e-2, atol=5e-2)
    # The traced forward keeps f in float32: fusedtie.transform on the float32 source, then the cast,
    # then the convolution on the derived weight with the identity transform.
    code = graphs[0].code
    assert "fusedtie.transform.default" in code and "fusedtie.tied_conv2d.default" in code
    transform_nodes = [n for n in graphs[0].graph.nodes if n.target is torch.ops.fusedtie.transform.default]
    assert len(transform_nodes) == 2 and all(n.meta["val"].dtype == torch.float32 for n in transform_nodes)
    conv_nodes = [n for n in graphs[0].graph.nodes if n.target is torch.ops.fusedtie.tied_conv2d.default]
    assert [n.args[3] for n in conv_nodes] == ["identity"]
    assert conv_nodes[0].meta["val"].dtype == torch.bfloat16
    for derived in conv_nodes[0].args[1:3]:  # weight and bias: the cast of a float32 transform
        assert derived.meta["val"].dtype == torch.bfloat16 and derived.args[0] in transform_nodes


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transform, bias_transform", [("square", "identity"), ("abs", "tanh")])
def test_autocast_cuda_matches_oracle(dtype, transform, bias_transform):
    _check_autocast_against_oracle("cuda", dtype, transform, bias_transform)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transform", ["square", "exp", "tanh", "abs"])
def test_autocast_cuda_rounds_f_computed_in_float32(transform, dtype):
    _check_f_in_float32_before_rounding("cuda", dtype, transform)


@needs_cuda
def test_autocast_cuda_torch_compile():
    torch._dynamo.reset()
    net = _Net("tanh").cuda()
    x = torch.randn(2, 8, 10, 10, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        eager = net(x)
        out = torch.compile(net, fullgraph=True)(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)


# --- channels_last --------------------------------------------------------------------------------

LAYOUT_SHAPES = {  # (input, weight, groups, padding)
    "3x3": ((2, 8, 10, 10), (8, 8, 3, 3), 1, 1),
    "pointwise": ((2, 8, 10, 10), (16, 8, 1, 1), 1, 0),  # the GEMM path where it applies
    "depthwise": ((2, 8, 12, 12), (8, 1, 3, 3), 8, 1),  # the depthwise kernel where it applies
}


def _same_layout(a, b):
    return check_significant_strides(a, b, only_cuda=False)[0]


@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("input_cl, weight_cl", [(True, False), (True, True), (False, True)])
def test_channels_last_layouts_match_conv2d_and_fake(shape, input_cl, weight_cl):
    xs, ws, groups, padding = LAYOUT_SHAPES[shape]
    cl = torch.channels_last
    x0, w0, b0 = torch.randn(xs), torch.randn(ws) * 0.5, torch.randn(ws[0])
    x = (x0.to(memory_format=cl) if input_cl else x0).requires_grad_(True)
    w = (w0.to(memory_format=cl) if weight_cl else w0).requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    out = fusedtie.tied_conv2d(x, w, b, "tanh", padding=padding, groups=groups)
    grad_out = torch.randn(out.shape).to(memory_format=suggest_memory_format(out))
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad_out, retain_graph=True)

    # F.conv2d on f(W) laid out as W is laid out
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = F.conv2d(xr, torch.empty_like(wr).copy_(torch.tanh(wr)), b0, padding=padding, groups=groups)
    rgx, rgw = torch.autograd.grad(ref, (xr, wr), grad_out, retain_graph=True)
    assert _same_layout(out, ref), f"output strides {out.stride()}, F.conv2d's {ref.stride()}"
    if input_cl:  # a channels_last input's gradient is channels_last, as F.conv2d's
        assert _same_layout(gx, rgx)
    # Each raw source gradient is laid out like its own tensor (F.conv2d lays a weight gradient out
    # channels_last whenever the input is); .grad, after AccumulateGrad, is the same for both.
    assert _same_layout(gw, w)
    (out.square().sum()).backward()
    (ref.square().sum()).backward()
    assert _same_layout(x.grad, xr.grad) and _same_layout(w.grad, wr.grad)

    # values against the float64 oracle
    oracle, grads_fn = reference_conv2d(x, w, b, "tanh", padding=padding, groups=groups)
    torch.testing.assert_close(out.double(), oracle, rtol=1e-4, atol=1e-4)
    for g, r in zip((gx, gw, gb), grads_fn(grad_out)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-3)

    # the fake kernels give the real kernels' layouts
    args = _op_args("tanh", padding=padding, groups=groups)
    real = (x.detach(), w.detach(), b.detach(), grad_out)
    with FakeTensorMode() as mode:
        fx, fw, fb, fg = (mode.from_tensor(t) for t in real)
        fake_out = torch.ops.fusedtie.tied_conv2d(fx, fw, fb, *args)
        fake_grads = torch.ops.fusedtie._tied_conv2d_backward(fg, fx, fw, fb, *args, [True, True, True])
    assert _same_layout(fake_out, out)
    for fake, real in zip(fake_grads, (gx, gw, gb)):
        assert _same_layout(fake, real)


# --- torch.export ---------------------------------------------------------------------------------


def _export_oracle(net, x):
    x64 = x.detach().double()
    w64, b64 = net.conv_1.weight.detach().double(), net.conv_1.bias.detach().double()
    h = torch.relu(F.conv2d(x64, w64, b64, padding=1))
    return F.conv2d(h, w64.square(), b64.square(), padding=1)


def _tied_nodes(ep):
    return [n for n in ep.graph.nodes if n.target is torch.ops.fusedtie.tied_conv2d.default]


def _check_exported(ep, net, x):
    # the fusedtie op is in the graph, on the source parameter, with nothing baked into constants
    (node,) = _tied_nodes(ep)
    assert node.args[3] == "square"
    sig = ep.graph_signature
    assert not ep.constants and not sig.inputs_to_lifted_tensor_constants
    weight_arg, bias_arg = node.args[1], node.args[2]
    for arg, source in ((weight_arg, net.conv_1.weight), (bias_arg, net.conv_1.bias)):
        assert arg.op == "placeholder" and arg.name in sig.inputs_to_parameters
        assert ep.state_dict[sig.inputs_to_parameters[arg.name]] is source
    # the tie is one tensor, under every name export gives it
    assert "conv_1.weight" in sig.parameters
    assert all(ep.state_dict[n] is net.conv_1.weight for n in sig.parameters if n.endswith("weight"))
    out = ep.module()(x)
    torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), _export_oracle(net, x), rtol=1e-4, atol=1e-4)


def test_export_keeps_the_op_and_the_source_parameter():
    net = _Net("square", "transform")
    x = torch.randn(2, 8, 10, 10)
    ep = torch.export.export(net, (x,))
    _check_exported(ep, net, x)

    # run_decompositions keeps it: a custom op without a decomposition is a leaf of every opset
    decomposed = ep.run_decompositions()
    _check_exported(decomposed, net, x)
    assert not any("aten.pow" in str(n.target) or "aten.mul" in str(n.target) for n in decomposed.graph.nodes)

    # the unflattened module trains the one source parameter
    module = ep.module()
    assert module.conv_1.weight is module.conv_2.source.weight
    xg = x.clone().requires_grad_(True)
    grads = torch.autograd.grad(module(xg).square().sum(), (xg, module.conv_1.weight))
    eager_grads = torch.autograd.grad(net(xg).square().sum(), (xg, net.conv_1.weight))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    # save/load keeps the op and the tie; a dynamic batch works
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert len(_tied_nodes(loaded)) == 1
    sd = loaded.state_dict
    assert (
        sd["conv_1.weight"].data_ptr()
        == sd[loaded.graph_signature.inputs_to_parameters[_tied_nodes(loaded)[0].args[1].name]].data_ptr()
    )
    torch.testing.assert_close(loaded.module()(x), net(x), rtol=1e-5, atol=1e-5)
    dynamic = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    x3 = torch.randn(3, 8, 10, 10)
    torch.testing.assert_close(dynamic.module()(x3), net(x3), rtol=1e-5, atol=1e-5)


def test_export_of_a_forward_under_autocast():
    """autocast inside forward: export keeps it as a region; decomposing applies the autocast kernel."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _Net("square", "transform")

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x)

    model, x = Mixed(), torch.randn(2, 8, 10, 10)
    eager = model(x)
    decomposed = torch.export.export(model, (x,)).run_decompositions()
    out = decomposed.module()(x)
    assert out.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    (node,) = _tied_nodes(decomposed)
    assert node.args[3:7] == ("identity", 1.0, "identity", 1.0)  # f and g ran before the cast ...
    transforms = [n for n in decomposed.graph.nodes if n.target is torch.ops.fusedtie.transform.default]
    assert len(transforms) == 2 and all(n.meta["val"].dtype == torch.float32 for n in transforms)  # ... in fp32
    assert all(n.args[0].name in decomposed.graph_signature.inputs_to_parameters for n in transforms)
