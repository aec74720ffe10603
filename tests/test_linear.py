"""tied_linear and FusedTiedLinear (a 1x1 convolution on (N, C, 1, 1) views, or its transpose for the
tied decoder): forward and every gradient over a grid, under the linear algorithm's fused skinny GEMMs
(up to 8 rows) and its BLAS path (above), the module's semantics, bad input, opcheck, torch.compile and
gradcheck, checkpoints and bake.

Every result is compared with F.linear on PyTorch's own f(W) in float64 (tests/reference.py's
reference_linear), never with fusedtie's own result.
"""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_f, reference_linear, transform_arg

import fusedtie
from fusedtie import FusedTiedLinear

TRANSFORMS = fusedtie.available_transforms()
F64 = dict(rtol=1e-9, atol=1e-9)
TOLERANCE = {torch.float64: F64, torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _algorithm(rows, weight, transform, transpose):
    """The CPU algorithm the call runs, from the 2-d operator's own rule (the transposed operator
    runs linear exactly where the forward one does for the same 1x1 shapes)."""
    w = weight if not transpose else weight.t()
    x = torch.empty(rows, w.shape[1], 1, 1, dtype=weight.dtype)
    return fusedtie.cpu_conv_algorithm_for(x, w.detach()[:, :, None, None].contiguous(), transform=transform)


def _check(x, w, b, transform, bias_transform="identity", transpose=False, dtype=torch.float64):
    """tied_linear's output and its gradients with respect to x, W and b against the float64 oracle."""
    tol = TOLERANCE[dtype]
    x = x.to(dtype).requires_grad_(True)
    w = w.to(dtype).requires_grad_(True)
    b = None if b is None else b.to(dtype).requires_grad_(True)
    out = fusedtie.tied_linear(x, w, b, transform_arg(transform), transform_arg(bias_transform), transpose=transpose)
    ref, ref_grads = reference_linear(x, w, b, transform, bias_transform, transpose)
    assert out.dtype == dtype and out.shape == ref.shape
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    inputs = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype), allow_unused=True)
    for name, ours, theirs in zip(("input", "weight", "bias"), grads, ref_grads(grad_out)):
        if theirs is None:
            continue
        ours = torch.zeros_like(theirs) if ours is None else ours.double()
        scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
        torch.testing.assert_close(
            ours, theirs, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m, name=name: f"{name} gradient: {m}"
        )


# --- the operator over a grid ------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True], ids=["linear", "decoder"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_both_paths(transform, transpose):
    # 3 rows: the fused skinny GEMMs; 11 rows: the library, f(W) and BLAS. 37 columns: a vector tail.
    for rows in (3, 11):
        w = torch.randn(19, 37, dtype=torch.float64) * 0.7
        x = torch.randn(rows, 19 if transpose else 37, dtype=torch.float64)
        b = torch.randn(37 if transpose else 19, dtype=torch.float64)
        assert _algorithm(rows, w, transform_arg(transform), transpose) == ("linear" if rows <= 8 else "library")
        bias_transform = "identity" if transpose else transform
        _check(x, w, b, transform, bias_transform, transpose)


# Every row count the skinny kernels instantiate (1..8), and either side of the BLAS switch, on shapes
# with and without vector tails, rows of W in blocks and left over, both dtypes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 16), (33, 70), (130, 17)])
@pytest.mark.parametrize("transpose", [False, True], ids=["linear", "decoder"])
def test_row_counts_and_shapes(rows, shape, dtype, transpose):
    w = torch.randn(shape, dtype=torch.float64)
    x = torch.randn(rows, shape[0] if transpose else shape[1], dtype=torch.float64)
    b = torch.randn(shape[1] if transpose else shape[0], dtype=torch.float64)
    _check(x, w, b, "square", "identity", transpose, dtype)
    _check(x, w, None, "tanh", "identity", transpose, dtype)


def test_a_large_weight_split_across_threads():
    # Enough rows of W that the pass is split into chunks (one per thread), each summing its own
    # part of the input gradient.
    w = torch.randn(600, 300, dtype=torch.float64) * 0.1
    for rows, transpose in ((1, False), (8, False), (5, True)):
        x = torch.randn(rows, 600 if transpose else 300, dtype=torch.float64)
        _check(x, w, None, "softplus", "identity", transpose)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 7), (0, 7), (2, 0, 7), (1, 1, 1, 7)])
def test_leading_dimensions(shape):
    w = torch.randn(5, 7, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    _check(torch.randn(shape, dtype=torch.float64), w, b, "exp")
    _check(
        torch.randn(shape[:-1] + (5,), dtype=torch.float64),
        w,
        torch.randn(7, dtype=torch.float64),
        "exp",
        transpose=True,
    )


def test_non_contiguous_tensors_and_other_layouts():
    x = torch.randn(7, 4, dtype=torch.float64).t()  # (4, 7), transposed strides
    w = torch.randn(5, 14, dtype=torch.float64)[:, ::2]  # (5, 7), a strided view
    b = torch.randn(10, dtype=torch.float64)[::2]
    _check(x, w, b, "square")
    _check(x[:, :5], w, torch.randn(7, dtype=torch.float64), "square", transpose=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_run_the_library(dtype):
    w = torch.randn(6, 9)
    x = torch.randn(3, 9)
    out = fusedtie.tied_linear(x.to(dtype), w.to(dtype), None, "square")
    ref = F.linear(x.to(dtype).double(), w.to(dtype).double() ** 2)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=5e-2)


def test_user_transform_runs_the_blas_path_at_any_row_count():
    chain = fusedtie.Transform.chain("tanh", ("scale", 2.0))
    for rows in (2, 12):
        x = torch.randn(rows, 9, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
        out = fusedtie.tied_linear(x, w, None, chain)
        w64 = w.detach().clone().requires_grad_(True)
        ref = F.linear(x.detach(), 2 * torch.tanh(w64))
        torch.testing.assert_close(out, ref, **F64)
        g = torch.randn_like(ref)
        (gw,) = torch.autograd.grad(out, [w], g)
        (rw,) = torch.autograd.grad(ref, [w64], g)
        torch.testing.assert_close(gw, rw, **F64)


@pytest.mark.parametrize("algorithm", ["library", "linear", "auto"])
def test_forced_algorithms_agree_with_the_reference(algorithm):
    w = torch.randn(12, 20, dtype=torch.float64)
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        for rows in (2, 10):
            expected = "linear" if algorithm != "library" and rows <= 8 else "library"
            assert _algorithm(rows, w, "relu", False) == expected
            _check(torch.randn(rows, 20, dtype=torch.float64), w, torch.randn(12, dtype=torch.float64), "relu")
            _check(torch.randn(rows, 12, dtype=torch.float64), w, None, "relu", transpose=True)


@pytest.mark.parametrize("transpose", [False, True], ids=["linear", "decoder"])
def test_the_library_computes_a_matrix_product_with_blas(transpose):
    # Above 8 rows (and for a forced library) a matrix product is at::addmm / at::mm on the views,
    # not at::convolution, whose oneDNN path re-packs W on every call.
    w = torch.randn(16, 24, requires_grad=True)
    x = torch.randn(12, 16 if transpose else 24, requires_grad=True)
    with torch.profiler.profile() as prof:
        fusedtie.tied_linear(x, w, None, "square", transpose=transpose).sum().backward()
    names = {event.name for event in prof.events()}
    assert "aten::mm" in names and not names & {"aten::convolution", "aten::convolution_backward"}, names


def test_only_the_wanted_gradients():
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    for rows in (2, 12):
        x = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
        ref, ref_grads = reference_linear(x, w, None, "square")
        g = torch.randn_like(ref)
        (gx,) = torch.autograd.grad(fusedtie.tied_linear(x, w, None, "square"), [x], g)
        (gw,) = torch.autograd.grad(fusedtie.tied_linear(x, w, None, "square"), [w], g)
        rx, rw, _ = ref_grads(g)
        torch.testing.assert_close(gx, rx, **F64)
        torch.testing.assert_close(gw, rw, **F64)


def test_meta_tensors_give_linear_shapes():
    w = torch.empty(16, 8, device="meta")
    b = torch.empty(16, device="meta")
    assert fusedtie.tied_linear(torch.empty(2, 5, 8, device="meta"), w, b, "tanh").shape == (2, 5, 16)
    out = fusedtie.tied_linear(torch.empty(3, 16, device="meta"), w, torch.empty(8, device="meta"), transpose=True)
    assert out.shape == (3, 8) and out.device.type == "meta"


# --- bad input -----------------------------------------------------------------------------------


def _op_cases():
    x, w, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6)
    op = fusedtie.tied_linear
    return [
        (
            "weight not 2-D",
            lambda: op(x, w[None], b),
            ValueError,
            r"expected a 2-D weight \(out_features, in_features\)",
        ),
        ("empty weight", lambda: op(x[:, :0], w[:, :0], b), ValueError, "at least one feature on each side"),
        (
            "wrong features",
            lambda: op(x[:, :5], w, b),
            ValueError,
            r"expected input with 8 features .* got input of size \[3, 5\]",
        ),
        ("decoder features", lambda: op(x, w, None, transpose=True), ValueError, r"expected input with 6 features"),
        ("0-d input", lambda: op(torch.tensor(1.0), w, b), ValueError, "expected input with 8 features"),
        ("bias of wrong size", lambda: op(x, w, b[:5]), ValueError, r"expected bias of size \[6\]"),
        (
            "decoder bias transform",
            lambda: op(x[:, :6], w, None, "identity", "square", transpose=True),
            ValueError,
            "takes its bias as it is",
        ),
        ("dtype mismatch", lambda: op(x.double(), w, b), TypeError, "same dtype"),
        ("integer dtype", lambda: op(x.long(), w.long(), None), TypeError, "float"),
        ("unknown transform", lambda: op(x, w, b, "cube"), ValueError, "unknown transform 'cube'"),
        ("transpose not a bool", lambda: op(x, w, b, transpose="yes"), TypeError, "transpose must be True or False"),
        ("input not a tensor", lambda: op([1.0] * 8, w, b), TypeError, "input must be a tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_op_cases())), ids=[c[0] for c in _op_cases()])
def test_op_bad_input(case):
    _, call, exc, pattern = _op_cases()[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_source_must_be_a_linear():
    for bad in (nn.Conv2d(3, 3, 3), nn.Bilinear(3, 3, 3), torch.zeros(3, 3), None):
        with pytest.raises(TypeError, match="FusedTiedLinear ties to an nn.Linear source"):
            FusedTiedLinear(bad)
    layer = FusedTiedLinear(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="must be an nn.Linear that owns its parameters, got another FusedTiedLinear"):
        FusedTiedLinear(layer)


def test_module_construction_errors():
    lin = nn.Linear(4, 6)
    with pytest.raises(ValueError, match=r"in_features=5 \(the tie gives 4\)"):
        FusedTiedLinear(lin, in_features=5)
    with pytest.raises(ValueError, match=r"maps 6 to 4 features; asked for out_features=6 \(the tie gives 4\)"):
        FusedTiedLinear(lin, transpose=True, out_features=6)
    with pytest.raises(ValueError, match="the source has no bias"):
        FusedTiedLinear(nn.Linear(4, 6, bias=False), bias="transform")
    with pytest.raises(ValueError, match="the decoder's bias is its own"):
        FusedTiedLinear(lin, bias="transform", transpose=True)
    with pytest.raises(ValueError, match="bias must be 'same', 'transform' or None"):
        FusedTiedLinear(lin, bias="own")
    with pytest.raises(TypeError, match="transpose must be True or False"):
        FusedTiedLinear(lin, transpose=1)
    with pytest.raises(ValueError, match="not initialised yet"):
        FusedTiedLinear(nn.LazyLinear(6))
    with pytest.raises(ValueError, match="no features"):
        FusedTiedLinear(nn.Linear(0, 6))
    FusedTiedLinear(lin, in_features=4, out_features=6)
    FusedTiedLinear(lin, transpose=True, in_features=6, out_features=4)


def test_wrong_features_through_the_module():
    layer = FusedTiedLinear(nn.Linear(16, 8), transpose=True)
    with pytest.raises(ValueError, match=r"expected input with 8 features .* got input of size \[2, 16\]"):
        layer(torch.randn(2, 16))


# --- the module ----------------------------------------------------------------------------------


class TiedAutoencoder(nn.Module):
    """An encoder Linear, a layer tied to it with f, and the tied decoder."""

    def __init__(self, transform="softplus", bias="same"):
        super().__init__()
        self.encoder = nn.Linear(12, 12)
        self.middle = FusedTiedLinear(self.encoder, transform, bias)
        self.decoder = FusedTiedLinear(self.encoder, transform, transpose=True)

    def forward(self, x):
        return self.decoder(torch.tanh(self.middle(torch.relu(self.encoder(x)))))


def reference_autoencoder(net, x, transform="softplus", bias_transform="identity"):
    e = net.encoder
    w, b = e.weight.detach().double(), e.bias.detach().double()
    fw = reference_f(transform, w)
    h = torch.relu(F.linear(x.double(), w, b))
    mid_bias = None if net.middle.bias_mode is None else reference_f(bias_transform, b)
    h = torch.tanh(F.linear(h, fw, mid_bias))
    return h @ fw + net.decoder.bias.detach().double()


def test_parameters_and_state_dict_are_the_sources():
    net = TiedAutoencoder()
    assert [n for n, _ in net.named_parameters()] == ["encoder.weight", "encoder.bias", "decoder.bias"]
    assert list(net.state_dict()) == ["encoder.weight", "encoder.bias", "decoder.bias"]
    alone = FusedTiedLinear(nn.Linear(3, 4), "abs")
    assert list(alone.state_dict()) == ["source.weight", "source.bias"]
    assert net.middle.weight.shape == (12, 12) and net.decoder.weight.shape == (12, 12)
    rect = FusedTiedLinear(nn.Linear(3, 5), "exp", transpose=True)
    torch.testing.assert_close(
        rect.weight.double(), torch.exp(rect.source.weight.double()).t(), **TOLERANCE[torch.float32]
    )


@pytest.mark.parametrize("bias", ["same", "transform", None])
def test_module_forward_and_gradients_reach_the_source(bias):
    net = TiedAutoencoder("softplus", bias).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    out = net(x)
    bias_transform = "softplus" if bias == "transform" else "identity"
    torch.testing.assert_close(out, reference_autoencoder(net, x, "softplus", bias_transform), **F64)
    out.square().sum().backward()
    e = net.encoder
    w = e.weight.detach().clone().requires_grad_(True)
    b = e.bias.detach().clone().requires_grad_(True)
    db = net.decoder.bias.detach().clone().requires_grad_(True)
    fw = F.softplus(w)
    h = torch.tanh(
        F.linear(torch.relu(F.linear(x, w, b)), fw, None if bias is None else reference_f(bias_transform, b))
    )
    (h @ fw + db).square().sum().backward()
    torch.testing.assert_close(e.weight.grad, w.grad, **F64)
    torch.testing.assert_close(e.bias.grad, b.grad, **F64)
    torch.testing.assert_close(net.decoder.bias.grad, db.grad, **F64)


def test_decoder_bias_is_its_own_and_initialised_as_linear():
    enc = nn.Linear(400, 30)
    dec = FusedTiedLinear(enc, transpose=True)
    assert dec.bias.shape == (400,) and dec.bias is not enc.bias
    bound = 1 / math.sqrt(30)
    assert dec.bias.abs().max() <= bound and dec.bias.std() > bound / 4
    assert FusedTiedLinear(enc, transpose=True, bias=False).bias is None
    assert FusedTiedLinear(enc, transpose=True, bias=None).bias is None
    dec.reset_parameters()
    assert dec.bias.abs().max() <= bound
    with pytest.raises(RuntimeError, match="owns no parameters"):
        FusedTiedLinear(enc).reset_parameters()


def test_derived_attributes_and_fixed_geometry():
    layer = FusedTiedLinear(nn.Linear(3, 4), "square")
    for name in ("weight", "bias"):
        with pytest.raises(AttributeError, match=f"FusedTiedLinear.{name} is derived from its source"):
            setattr(layer, name, None)
    for name in ("in_features", "transform", "transpose"):
        with pytest.raises(AttributeError, match=f"FusedTiedLinear.{name} is fixed at construction"):
            setattr(layer, name, 5)
    assert repr(layer).startswith("FusedTiedLinear(\n  in_features=3, out_features=4, transform=square, bias='same'")
    dec = FusedTiedLinear(nn.Linear(3, 4), transpose=True, bias=False)
    assert "in_features=4, out_features=3, transform=identity, bias=False, transpose=True" in repr(dec)


def test_to_dtype_deepcopy_and_cached_keep_the_tie():
    net = TiedAutoencoder().double()
    assert net.middle.source is net.encoder and net.encoder.weight.dtype == torch.float64
    twin = copy.deepcopy(net)
    assert twin.middle.source is twin.encoder and twin.decoder.source is twin.encoder
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(twin(x), reference_autoencoder(net, x), **F64)
    with torch.no_grad(), fusedtie.cached():
        first = net(x)
        second = net(x)
    torch.testing.assert_close(first, reference_autoencoder(net, x), **F64)
    torch.testing.assert_close(second, first, **F64)


def test_whole_model_save_load_and_state_dict_round_trip():
    net = TiedAutoencoder()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.middle.source is loaded.encoder
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded(x).double(), reference_autoencoder(net, x), **TOLERANCE[torch.float32])
    fresh = TiedAutoencoder()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x).double(), reference_autoencoder(net, x), **TOLERANCE[torch.float32])
    alone = FusedTiedLinear(nn.Linear(5, 2), "exp", transpose=True)
    other = FusedTiedLinear(nn.Linear(5, 2), "exp", transpose=True)
    other.load_state_dict(alone.state_dict())
    assert list(alone.state_dict()) == ["bias", "source.weight", "source.bias"]
    torch.testing.assert_close(other.source.weight, alone.source.weight)
    torch.testing.assert_close(other.bias, alone.bias)


def test_parametrized_source_is_read_through_its_parametrization():
    lin = nn.Linear(6, 4).double()
    nn.utils.parametrize.register_parametrization(lin, "weight", nn.Tanh())
    layer = FusedTiedLinear(lin, "square")
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(
        layer(x), F.linear(x, torch.tanh(lin.parametrizations.weight.original) ** 2, lin.bias), **F64
    )


def test_bake_gives_linear_equal_to_the_reference():
    net = TiedAutoencoder("exp", "transform")
    baked = fusedtie.bake(net)
    assert type(baked.middle) is nn.Linear and type(baked.decoder) is nn.Linear
    assert (baked.decoder.in_features, baked.decoder.out_features) == (12, 12)
    x = torch.randn(3, 12)
    torch.testing.assert_close(baked(x).double(), reference_autoencoder(net, x, "exp", "exp"), rtol=1e-4, atol=1e-4)
    rect = FusedTiedLinear(nn.Linear(7, 3), "abs", transpose=True).to_linear()
    assert (rect.in_features, rect.out_features) == (3, 7)


# --- opcheck, torch.compile, gradcheck ---------------------------------------------------------------


@pytest.mark.parametrize("rows", [3, 10])
def test_opcheck_on_the_linear_views(rows):
    w = torch.randn(6, 5, 1, 1, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    x = torch.randn(rows, 5, 1, 1, requires_grad=True)
    args = (x, w, b, "softplus", 1.0, "square", 1.0, [1, 1], [0, 0, 0, 0], [1, 1], 1)
    torch.library.opcheck(torch.ops.fusedtie.tied_conv2d.default, args)
    xt = torch.randn(rows, 6, 1, 1, requires_grad=True)
    bt = torch.randn(5, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fusedtie.tied_conv_transpose2d.default, (xt, w, bt, "tanh", 1.0, [1, 1], [0, 0], [0, 0], [1, 1], 1)
    )


@pytest.mark.parametrize("rows", [4, 12])
def test_torch_compile_fullgraph_matches_the_reference(rows):
    torch._dynamo.reset()
    net = TiedAutoencoder("square", "transform")
    x = torch.randn(rows, 12, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *net.parameters()])
    torch.testing.assert_close(out.double(), reference_autoencoder(net, x, "square", "square"), rtol=1e-4, atol=1e-4)
    eager = torch.autograd.grad(net(x).square().sum(), [x, *net.parameters()])
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transform", ["square", "softplus", "scale"])
def test_gradcheck_float64(transform):
    t = transform_arg(transform)
    w = (torch.randn(5, 4, dtype=torch.float64) * 0.5).requires_grad_(True)
    for rows in (3, 9):
        x = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: fusedtie.tied_linear(x, w, b, t, t), (x, w, b))
        xt = torch.randn(rows, 5, dtype=torch.float64, requires_grad=True)
        bt = torch.randn(4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: fusedtie.tied_linear(x, w, b, t, transpose=True), (xt, w, bt))


# --- checkpoints of every kind, autocast, export ----------------------------------------------------


def test_meta_construction_then_to_empty_and_load_keeps_the_tie():
    trained = TiedAutoencoder()
    with torch.device("meta"):
        net = TiedAutoencoder()
    assert net.encoder.weight.is_meta and list(net.state_dict()) == list(trained.state_dict())
    net.to_empty(device="cpu")
    net.load_state_dict(trained.state_dict())
    assert net.middle.source is net.encoder and net.decoder.source is net.encoder
    x = torch.randn(3, 12)
    torch.testing.assert_close(net(x).double(), reference_autoencoder(trained, x), rtol=1e-5, atol=1e-5)


def test_safetensors_round_trip(tmp_path):
    import safetensors.torch

    net, fresh = TiedAutoencoder(), TiedAutoencoder()
    path = tmp_path / "net.safetensors"
    safetensors.torch.save_model(net, path)
    assert sorted(safetensors.torch.load_file(path)) == sorted(net.state_dict())
    missing, unexpected = safetensors.torch.load_model(fresh, path)
    assert not missing and not unexpected and fresh.middle.source is fresh.encoder
    x = torch.randn(2, 12)
    torch.testing.assert_close(fresh(x).double(), reference_autoencoder(net, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 10])
def test_autocast_bfloat16_runs_in_bfloat16_like_nn_linear(rows):
    net = TiedAutoencoder("square")
    x = torch.randn(rows, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.middle(x)
        plain = F.linear(x, net.encoder.weight**2, net.encoder.bias)
    assert out.dtype == plain.dtype == torch.bfloat16
    w = net.encoder.weight.detach().to(torch.bfloat16).double()
    ref = F.linear(x.to(torch.bfloat16).double(), w**2, net.encoder.bias.detach().to(torch.bfloat16).double())
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


def test_torch_export_keeps_the_operator():
    net = TiedAutoencoder("softplus").eval()
    x = torch.randn(4, 12)
    exported = torch.export.export(net, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("fusedtie.tied_conv2d" in t for t in targets) and any("tied_conv_transpose2d" in t for t in targets)
    torch.testing.assert_close(exported.module()(x).double(), reference_autoencoder(net, x), rtol=1e-5, atol=1e-5)
