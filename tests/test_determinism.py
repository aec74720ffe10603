"""Bitwise repeatability on the CPU under torch.use_deterministic_algorithms(True).

For each CPU convolution algorithm (fusedtie.use_cpu_conv_algorithm: "library", "gemm",
"depthwise", and "auto"), on a geometry where it applies, the forward output and the input, weight
and bias gradients of repeated runs are bitwise equal. Between repeats other calls of a different
size and transform run, so the per-thread scratch buffer of f(W) and the allocator's blocks hold
other values at each repeat: a kernel that read uninitialised scratch or depended on the previous
call would differ. The algorithms differ from each other in rounding (they are compared with the
float64 reference in tests/test_cpu_algorithms.py), so repeatability is required within each.

Every test restores the global deterministic flag (and its warn_only setting) and the algorithm.
"""

import pytest
import torch
import torch.nn as nn

import fusedtie
from fusedtie import FusedTiedConv2d

REPEATS = 4
_FLAG_AT_IMPORT = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.fixture
def deterministic():
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


# (algorithm, name, batch, cin, cout, hw, kernel, stride, padding, groups); each applies where
# named: gemm needs groups 1 and NCHW, depthwise groups == in_channels.
CASES = [
    ("library", "3x3", 4, 16, 24, (20, 20), 3, 1, 1, 1),
    ("library", "grouped-strided", 3, 12, 12, (17, 15), (3, 2), 2, (1, 0), 3),
    ("gemm", "3x3-im2col", 4, 16, 24, (20, 20), 3, 1, 1, 1),
    ("gemm", "3x3-per-image", 2, 8, 8, (34, 33), 3, 1, 1, 1),  # >= 1024 outputs: one GEMM per image
    ("gemm", "pointwise-batched", 8, 32, 16, (9, 9), 1, 1, 0, 1),
    ("gemm", "strided-same-even", 3, 8, 12, (16, 16), (4, 2), 1, "same", 1),
    ("depthwise", "3x3", 4, 16, 16, (28, 28), 3, 1, 1, 16),
    ("depthwise", "5x5-multiplier2-strided", 3, 8, 16, (19, 21), 5, 2, 2, 8),
    ("auto", "weight-heavy", 1, 128, 128, (7, 7), 3, 1, 1, 1),
    ("auto", "depthwise", 2, 32, 32, (14, 14), 3, 1, 1, 32),
]


def _inputs(batch, cin, cout, hw, kernel, groups, dtype):
    g = torch.Generator().manual_seed(1234)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(batch, cin, *hw, dtype=dtype, generator=g)
    w = torch.randn(cout, cin // groups, kh, kw, dtype=dtype, generator=g) * 0.3
    b = torch.randn(cout, dtype=dtype, generator=g)
    grad_out_gen = torch.Generator().manual_seed(99)
    return x, w, b, grad_out_gen


def _run_once(x, w, b, grad_out_gen, stride, padding, groups):
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = fusedtie.tied_conv2d(xs, ws, bs, "tanh", "tanh", stride, padding, 1, groups)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=grad_out_gen.manual_seed(99))
    grads = torch.autograd.grad(out, (xs, ws, bs), grad_out)
    return (out.detach(),) + grads


def _perturb(dtype, step):
    """Calls of other sizes and transforms, leaving other values in the scratch buffer and heap."""
    x = torch.randn(2, 24, 13 + step, 13, dtype=dtype)
    w = torch.randn(40, 24, 3, 3, dtype=dtype, requires_grad=True)
    fusedtie.tied_conv2d(x, w, None, "exp", padding=1).sum().backward()
    fusedtie.apply_transform(torch.randn(64, 64, 5, 5, dtype=dtype), "softplus")


def _assert_bitwise_equal(runs, label):
    names = ("output", "input grad", "weight grad", "bias grad")
    first = runs[0]
    for i, run in enumerate(runs[1:], start=1):
        for name, a, b in zip(names, first, run):
            assert a.shape == b.shape and a.stride() == b.stride(), f"{label}: {name} layout differs in run {i}"
            if not torch.equal(a, b):
                diff = (a.double() - b.double()).abs().max().item()
                raise AssertionError(f"{label}: {name} of run {i} differs from run 0 (max |diff| {diff:.3g})")
    for name, t in zip(names, first):
        assert torch.isfinite(t).all() and t.abs().sum() > 0, f"{label}: {name} is degenerate"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_repeated_runs_are_bitwise_equal(deterministic, case, dtype):
    algorithm, name, batch, cin, cout, hw, kernel, stride, padding, groups = case
    x, w, b, gen = _inputs(batch, cin, cout, hw, kernel, groups, dtype)
    runs = []
    for step in range(REPEATS):
        with fusedtie.use_cpu_conv_algorithm(algorithm):
            runs.append(_run_once(x, w, b, gen, stride, padding, groups))
        _perturb(dtype, step)
    _assert_bitwise_equal(runs, f"{algorithm}/{name}")
    assert fusedtie._LIB.cpu_conv_algorithm() == "auto"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "depthwise"], ids=lambda c: c[1])
def test_depthwise_is_bitwise_equal_across_thread_counts(deterministic, case):
    """The README says the depthwise kernel's sums run in a fixed order whatever the thread count."""
    _, name, batch, cin, cout, hw, kernel, stride, padding, groups = case
    x, w, b, gen = _inputs(batch, cin, cout, hw, kernel, groups, torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with fusedtie.use_cpu_conv_algorithm("depthwise"):
                runs.append(_run_once(x, w, b, gen, stride, padding, groups))
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(runs, f"depthwise/{name} over 1, 2, 3 threads")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_1 = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.tied_1 = FusedTiedConv2d(self.conv_1, "square", bias="transform")
        self.tied_dw = FusedTiedConv2d(self.depthwise, "softplus", padding_mode="reflect")

    def forward(self, x):
        h = torch.relu(self.conv_1(x))
        h = torch.relu(self.tied_dw(self.depthwise(h)))
        return self.tied_1(h).mean()


def _train(steps=3):
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = net(x)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    with fusedtie.cached(), torch.no_grad():
        cached_out = net(x)
    return [p.detach().clone() for p in net.parameters()] + losses + [cached_out]


@pytest.mark.parametrize("algorithm", ["auto", "library", "gemm", "depthwise"])
def test_training_steps_are_bitwise_repeatable(deterministic, algorithm):
    """Three SGD steps of a net with two ties (one depthwise, reflect padding), twice from the same
    seed: parameters, losses and a cached inference output are bitwise equal."""
    with fusedtie.use_cpu_conv_algorithm(algorithm):
        first = _train()
        _perturb(torch.float32, 0)
        second = _train()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} differs between two identical training runs"


def test_flag_is_restored():
    """The fixture put the global flag back (this runs after the tests above, in file order)."""
    assert (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) == _FLAG_AT_IMPORT
