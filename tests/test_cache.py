"""fusedtie.cached(): f(W) reused across no-grad calls, and never a stale f(W) that PyTorch can see.

Every result is compared with the float64 reference on the weights as they are at that moment, so a
stale cached f(W) fails the comparison. Reuse itself is observed by counting calls of the layer's
derive step (how the cache computes f(W)), not by timing.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.init as init
from reference import reference_conv2d

import fusedtie
from fusedtie import FusedTiedConv2d

TOL = dict(rtol=1e-9, atol=1e-9)


def weights_init(m):  # the seed's own initialiser: writes through .data, no version bump
    if isinstance(m, nn.Conv2d):
        init.kaiming_uniform_(m.weight.data)
        m.bias.data.zero_()


def make_layer(transform="tanh", bias="same", dtype=torch.float64):
    source = nn.Conv2d(4, 4, 3, padding=1, dtype=dtype)
    return FusedTiedConv2d(source, transform, bias)


def expected(layer, x):
    bias_transform = layer.transform.name if layer.bias_mode == "transform" else "identity"
    bias = layer.source.bias if layer.bias_mode is not None else None
    out, _ = reference_conv2d(x, layer.source.weight, bias, layer.transform.name, bias_transform, padding=1)
    return out


@pytest.fixture
def derive_calls(monkeypatch):
    """Counts how often the cache computes (f(W), g(b))."""
    calls = []
    original = FusedTiedConv2d._derive

    def counting(self, weight, bias):
        calls.append(self)
        return original(self, weight, bias)

    monkeypatch.setattr(FusedTiedConv2d, "_derive", counting)
    return calls


@pytest.mark.parametrize("bias", ["same", "transform", None])
@pytest.mark.parametrize("transform", ["square", "tanh", "exp"])
def test_cached_calls_match_reference_and_derive_once(transform, bias, derive_calls):
    layer = make_layer(transform, bias)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad(), fusedtie.cached():
        outs = [layer(x) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, expected(layer, x), **TOL)
    assert len(derive_calls) == 1


def test_no_cache_outside_scope(derive_calls):
    layer = make_layer()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert derive_calls == []


def test_weights_init_through_data_between_scopes_is_seen():
    # The seed's weights_init writes through .data: the parameter's version counter does not move,
    # so a cache keyed on versions alone would keep serving f of the old weights.
    layer = make_layer("square")
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad(), fusedtie.cached():
        before = layer(x)
    version = layer.source.weight._version
    layer.source.apply(weights_init)
    assert layer.source.weight._version == version  # the hazard is real in this torch
    with torch.no_grad(), fusedtie.cached():
        after = layer(x)
    torch.testing.assert_close(after, expected(layer, x), **TOL)
    assert not torch.allclose(before, after)


def test_scope_exit_releases_everything():
    layer = make_layer()
    with torch.no_grad(), fusedtie.cached():
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))
        assert fusedtie.cache.is_caching()
    assert not fusedtie.cache.is_caching()
    assert len(fusedtie.cache._entries) == 0


def test_nested_scopes_keep_the_cache_until_the_outermost_exit(derive_calls):
    layer = make_layer()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad(), fusedtie.cached():
        layer(x)
        with fusedtie.cached():
            layer(x)
        layer(x)
    assert len(derive_calls) == 1


def _optimizer_step(layer):
    opt = torch.optim.SGD(layer.source.parameters(), lr=0.1)
    layer.source.weight.grad = torch.randn_like(layer.source.weight)
    layer.source.bias.grad = torch.randn_like(layer.source.bias)
    opt.step()


def _in_place_under_no_grad(layer):
    with torch.no_grad():
        layer.source.weight.mul_(-1.5)


def _bias_only_in_place(layer):
    with torch.no_grad():
        layer.source.bias.add_(3.0)


def _load_state_dict(layer):
    state = {k: torch.randn_like(v) for k, v in layer.source.state_dict().items()}
    layer.source.load_state_dict(state)


def _assign_new_parameter(layer):
    layer.source.weight = nn.Parameter(torch.randn_like(layer.source.weight))


def _copy_into(layer):
    with torch.no_grad():
        layer.source.weight.copy_(torch.randn_like(layer.source.weight))


@pytest.mark.parametrize(
    "change",
    [
        _optimizer_step,
        _in_place_under_no_grad,
        _bias_only_in_place,
        _load_state_dict,
        _assign_new_parameter,
        _copy_into,
    ],
)
def test_changes_inside_the_scope_are_seen(change):
    layer = make_layer("tanh", bias="transform")
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with fusedtie.cached():
        with torch.no_grad():
            first = layer(x)
        change(layer)
        with torch.no_grad():
            second = layer(x)
    torch.testing.assert_close(second, expected(layer, x), **TOL)
    assert not torch.allclose(first, second)


def test_dtype_conversion_inside_the_scope_is_seen():
    layer = make_layer("square", dtype=torch.float32)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad(), fusedtie.cached():
        layer(x)
        layer.double()
        out = layer(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected(layer, x.double()), **TOL)


def test_training_inside_the_scope_is_exact_and_not_cached(derive_calls):
    layer = make_layer("tanh", bias="transform")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grad_out = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with fusedtie.cached():
        for _ in range(2):  # a train step between two calls: each call sees the current weights
            out = layer(x)
            grads = torch.autograd.grad(out, [layer.source.weight, layer.source.bias], grad_out)
            ref_out, ref_grads = reference_conv2d(x, layer.source.weight, layer.source.bias, "tanh", "tanh", padding=1)
            torch.testing.assert_close(out, ref_out, **TOL)
            _, ref_gw, ref_gb = ref_grads(grad_out)
            torch.testing.assert_close(grads[0], ref_gw, **TOL)
            torch.testing.assert_close(grads[1], ref_gb, **TOL)
            with torch.no_grad():
                layer.source.weight.sub_(0.1 * grads[0])
    assert derive_calls == []


def test_frozen_source_is_cached_with_grad_enabled(derive_calls):
    # A source that does not require grad records no graph, so the cache serves it in grad mode too;
    # the input's gradient still flows through the cached f(W).
    layer = make_layer("square")
    layer.source.requires_grad_(False)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with fusedtie.cached():
        out = layer(x)
        out2 = layer(x)
    (gx,) = torch.autograd.grad(out.sum() + out2.sum(), x)
    ref_out, ref_grads = reference_conv2d(x, layer.source.weight, layer.source.bias, "square", padding=1)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(gx, 2 * ref_grads(torch.ones_like(ref_out))[0], **TOL)
    assert len(derive_calls) == 1


def test_inference_mode_then_no_grad():
    layer = make_layer("tanh")
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with fusedtie.cached():
        with torch.inference_mode():
            a = layer(x)
        with torch.no_grad():
            b = layer(x)
    torch.testing.assert_close(a, expected(layer, x), **TOL)
    torch.testing.assert_close(b, expected(layer, x), **TOL)


def test_each_layer_has_its_own_entry_and_copies_do_not_share_it():
    source = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
    square = FusedTiedConv2d(source, "square")
    tanh = FusedTiedConv2d(source, "tanh")
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad(), fusedtie.cached():
        square(x)
        out_tanh = tanh(x)
        clone = copy.deepcopy(square)
        with torch.no_grad():
            clone.source.weight.mul_(2.0)
        out_clone = clone(x)
        out_square = square(x)
    torch.testing.assert_close(out_tanh, expected(tanh, x), **TOL)
    torch.testing.assert_close(out_clone, expected(clone, x), **TOL)
    torch.testing.assert_close(out_square, expected(square, x), **TOL)


def test_torch_compile_inside_the_scope_keeps_the_operator():
    layer = make_layer("square", dtype=torch.float32)
    x = torch.randn(1, 4, 6, 6)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), fusedtie.cached():
        out = compiled(x)
        again = compiled(x)
    torch.testing.assert_close(out.double(), expected(layer, x.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out)
    assert len(fusedtie.cache._entries) == 0


def test_scope_over_given_modules_caches_only_their_layers(derive_calls):
    frozen = make_layer("square")
    training = make_layer("tanh")
    model = nn.Sequential(frozen, nn.Identity())
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad(), fusedtie.cached(model):
        for _ in range(3):
            out_frozen = frozen(x)
            out_training = training(x)
    assert derive_calls == [frozen]
    torch.testing.assert_close(out_frozen, expected(frozen, x), **TOL)
    torch.testing.assert_close(out_training, expected(training, x), **TOL)


def test_scope_arguments_are_checked():
    with pytest.raises(TypeError, match="takes nn.Modules, got Tensor"):
        with fusedtie.cached(torch.zeros(1)):
            pass
    assert not fusedtie.cache.is_caching()
