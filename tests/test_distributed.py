"""FusedTiedConv2d under DistributedDataParallel and FSDP2 (fully_shard), 2 CPU processes on gloo.

One pair of spawned worker processes (a spawn costs about 10 s here, so the module spawns once and
runs every scenario in it) rendezvous through a file in pytest's tmp_path (no port to find, nothing
left listening) and talk over the loopback interface only (GLOO_SOCKET_IFNAME=lo unless set). The
workers write their gradients and parameters to tmp_path; each test compares them with one process
running the same network *without fusedtie* (the tie by hand: F.conv2d(x, f(W))) on the whole
global batch. Both ranks see equal halves of the batch and the loss is a mean, so the averaged
gradient of the two halves is the gradient of the whole batch. Float64 throughout, so the only
differences are the order of a few additions.

A hung rendezvous or collective fails the tests after a deadline instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import functools
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fusedtie import FusedTiedConv2d

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD_SIZE = 2
DEADLINE_S = 120  # all scenarios, spawn included; about 20 s on a loaded 2-core machine
GLOBAL_BATCH = 4
LR = 0.1


class _Block(nn.Module):
    """A conv and a second conv tied to it: ``tied.weight = f(conv.weight)``."""

    def __init__(self, channels, transform, bias, plain):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.transform, self.bias_mode, self.plain = transform, bias, plain
        if not plain:
            self.tied = FusedTiedConv2d(self.conv, transform, bias=bias, padding_mode="reflect")

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.plain:  # the forum recipe: the tie by hand, plain PyTorch ops only
            f = {"square": torch.square, "tanh": torch.tanh}[self.transform]
            bias = f(self.conv.bias) if self.bias_mode == "transform" else self.conv.bias
            tied = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), f(self.conv.weight), bias)
        else:
            tied = self.tied(h)
        return h + tied


class TiedNet(nn.Module):
    """Two blocks with a tie each, then a linear head; ``plain=True`` is the same net without fusedtie."""

    def __init__(self, plain=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = _Block(4, "square", "same", plain)
        self.block2 = _Block(4, "tanh", "transform", plain)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


def _make_net(plain=False):
    torch.manual_seed(0)
    net = TiedNet(plain).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)  # keep tanh/square of the weights in a tame range
    return net


def _global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 3, 6, 6, dtype=torch.float64, generator=g)
    target = torch.randn(GLOBAL_BATCH, 3, dtype=torch.float64, generator=g)
    return x, target


def _loss(out, target):
    return ((out - target) ** 2).mean()


@functools.lru_cache(maxsize=None)
def _reference_steps(steps=2):
    """One process, the whole batch, no fusedtie: gradients of step 1 and parameters after each step."""
    net = _make_net(plain=True)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    x, target = _global_batch()
    record = {}
    for step in range(steps):
        opt.zero_grad()
        _loss(net(x), target).backward()
        if step == 0:
            record["grads"] = {n: p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
        record[f"params{step + 1}"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    return record


# --- process plumbing ---------------------------------------------------------------------------


def _entry(rank, target, world_size, init_method, out_dir, args):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname resolves to
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        result = target(rank, world_size, *args)
    except BaseException as error:  # report it to the test process, which prints it
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run(target, tmp_path, *args):
    """Runs target(rank, world_size, *args) in WORLD_SIZE spawned processes; returns their results."""
    init_method = f"file://{tmp_path}/rendezvous"
    context = mp.start_processes(
        _entry,
        args=(target, WORLD_SIZE, init_method, str(tmp_path), args),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} workers did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _full(t):
    """A plain tensor from a DTensor (FSDP2's sharded parameters and gradients) or a tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train_steps(net, parameters_of, rank, world_size, steps=2):
    """Runs `steps` SGD steps on this rank's half of the global batch; gradients of step 1 and
    parameters after each step, as plain tensors keyed by the plain net's parameter names."""
    x, target = _global_batch()
    x, target = x.chunk(world_size)[rank], target.chunk(world_size)[rank]
    opt = torch.optim.SGD(parameters_of.parameters(), lr=LR)
    record = {}
    for step in range(steps):
        opt.zero_grad()
        _loss(net(x), target).backward()
        if step == 0:
            record["grads"] = {n: _full(p.grad).clone() for n, p in parameters_of.named_parameters()}
        opt.step()
        record[f"params{step + 1}"] = {n: _full(p.detach()).clone() for n, p in parameters_of.named_parameters()}
    return record


def _check_results(results):
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result.get('traceback', result.get('error'))}"
    reference = _reference_steps()
    assert sorted(results[0]["grads"]) == sorted(reference["grads"])  # the tie adds no parameter
    for rank, result in enumerate(results):
        for key in ("grads", "params1", "params2"):
            for name, expected in reference[key].items():
                torch.testing.assert_close(
                    result[key][name],
                    expected,
                    rtol=1e-10,
                    atol=1e-12,
                    msg=lambda m: f"rank {rank}, {key}, {name}: {m}",
                )


# --- the scenarios, all run by one pair of workers (a spawn costs about 10 s here) -----------------


def _ddp(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _make_net()
    ddp = DDP(net)
    record = _train_steps(ddp, net, rank, world_size)
    record["parameter_names"] = [n for n, _ in ddp.module.named_parameters()]
    record["state_dict_keys"] = list(ddp.module.state_dict())
    record["tie_intact"] = all(
        block.tied.source is block.conv and block.tied.source.weight is block.conv.weight
        for block in (net.block1, net.block2)
    )
    return record


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # the older location
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _fsdp_root(rank, world_size):
    """fully_shard on the parent only: every source and tied layer in one group."""
    net = _make_net()
    _fully_shard()(net)
    return _train_steps(net, net, rank, world_size)


def _fsdp_blocks(rank, world_size):
    """One group per block (a source and its tied layer together), then the root."""
    fully_shard = _fully_shard()
    net = _make_net()
    fully_shard(net.block1)
    fully_shard(net.block2)
    fully_shard(net)
    return _train_steps(net, net, rank, world_size)


def _fsdp_split_unresharded(rank, world_size):
    """The source and its tied layer in separate groups, the source's group kept unsharded after its
    forward (reshard_after_forward=False) and run before the tied layer."""
    fully_shard = _fully_shard()
    net = _make_net()
    fully_shard(net.block1.conv, reshard_after_forward=False)
    fully_shard(net.block1.tied)
    fully_shard(net)
    return _train_steps(net, net, rank, world_size)


def _fsdp_split(rank, world_size):
    """The source and its tied layer in separate groups, FSDP2's defaults."""
    fully_shard = _fully_shard()
    net = _make_net()
    fully_shard(net.block1.conv)
    fully_shard(net.block1.tied)
    fully_shard(net)
    x, target = _global_batch()
    x, target = x.chunk(world_size)[rank], target.chunk(world_size)[rank]
    try:
        _loss(net(x), target).backward()
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None}


# In this order: the one expected to raise last, so that a rank left mid-collective cannot stall the others.
SCENARIOS = [_ddp, _fsdp_root, _fsdp_blocks, _fsdp_split_unresharded, _fsdp_split]


def _all_scenarios(rank, world_size):
    results = {}
    for scenario in SCENARIOS:
        try:
            results[scenario.__name__] = scenario(rank, world_size)
        except Exception as error:
            results[scenario.__name__] = {
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            }
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """{scenario name: [rank 0's result, rank 1's result]}."""
    per_rank = _run(_all_scenarios, tmp_path_factory.mktemp("distributed"))
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"rank {rank} failed:\n{result.get('traceback', result.get('error'))}"
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


def test_ddp_matches_one_process_on_the_global_batch(distributed):
    """DDP, 2 ranks x half the batch: step-1 gradients and the parameters after 2 SGD steps equal one
    process's on the whole batch (the net without fusedtie); DDP sees each source parameter once."""
    results = distributed["_ddp"]
    _check_results(results)
    plain = _make_net(plain=True)
    for result in results:
        assert result["parameter_names"] == [n for n, _ in plain.named_parameters()]
        assert result["state_dict_keys"] == list(plain.state_dict())
        assert result["tie_intact"]


@pytest.mark.parametrize("layout", ["root", "blocks"])
def test_fsdp2_tie_within_one_group_matches_one_process(distributed, layout):
    """FSDP2 (fully_shard) on the parent only, or on each block holding a source and its tied layer:
    sharded training gives the single-process gradients and parameters."""
    _check_results(distributed[f"_fsdp_{layout}"])


def test_fsdp2_tie_across_groups_raises(distributed):
    """The tied layer and its source sharded as separate groups (FSDP2 defaults): after the source's
    forward its group reshards, so the tied layer would read a shard (a DTensor) of the source weight.
    It must raise, never compute with the shard, and say which tie broke (both modules by their
    path in the model) and how to fix it."""
    for rank, result in enumerate(distributed["_fsdp_split"]):
        assert "error" not in result, f"rank {rank} failed:\n{result.get('traceback', result.get('error'))}"
        assert result["raised"] == "RuntimeError", f"rank {rank}: {result}"
        message = result["message"]
        assert "'block1.tied'" in message and "'block1.conv'" in message, message
        assert "reshard_after_forward=False" in message and "one group" in message, message


def test_fsdp2_tie_across_groups_without_reshard_is_correct(distributed):
    """Separate groups work when the source's group is not resharded after its forward
    (reshard_after_forward=False) and the source runs first: the tied layer reads the unsharded
    weight, and its gradient is accumulated before the source's group reduce-scatters."""
    _check_results(distributed["_fsdp_split_unresharded"])
