"""Worker functions for the multi-process tests (module level, so spawned processes can import them)."""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from conftest import batches, ce, mlp


def digits64():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float64) / 16.0, torch.tensor(data.target)


def build_method(spec):
    kind, options = spec
    return gradcomp.DGC(**options) if kind == "DGC" else gradcomp.get(kind, **options)


def train(rank, world, front, spec, steps, momentum, lr=0.1, batch_size=64, accumulate=1):
    """One run on this rank: front is 'ddp' (plain DDP), 'hook' (DDP + gradcomp hook) or 'optim'
    (DistributedOptimizer; ``accumulate`` micro-batches per step, each loss scaled by 1/accumulate)."""
    x, y = digits64()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    sent = None
    if front == "ddp":
        net = DDP(model)
    elif front == "hook":
        net = DDP(model)
        state = gradcomp.register_ddp_hook(net, build_method(spec))
    else:
        net = model
        opt = gradcomp.DistributedOptimizer(opt, model.named_parameters(), build_method(spec),
                                            backward_passes_per_step=accumulate)
    for xb, yb in batches(x, y, batch_size, steps):
        shard = (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])
        opt.zero_grad()
        for xm, ym in zip(shard[0].tensor_split(accumulate), shard[1].tensor_split(accumulate)):
            (ce(net, (xm, ym)) / accumulate).backward()
        opt.step()
    if front == "hook":
        sent = state.comm.bytes_sent
    elif front == "optim":
        sent = opt.comm.bytes_sent
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "bytes": sent}


def run_all(rank, world, runs):
    """Several runs in one process group (saves process start-ups)."""
    out = []
    for run in runs:
        out.append(train(rank, world, **run))
        dist.barrier()
    return out


def fail_on_rank(rank, world, bad_rank):
    if rank == bad_rank:
        raise ValueError(f"rank {rank} fails on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # the others wait here until the timeout
    return t


def async_all_reduces(rank, world):
    xs = [torch.ones(1 << 18) for _ in range(2)]
    works = [dist.all_reduce(x, async_op=True) for x in xs]
    for w in works:
        w.wait()
    return float(sum(x[0] for x in xs))


def timed_all_reduce(rank, world, numel):
    """Seconds one all-reduce of ``numel`` floats takes (after a warm-up one), measured between barriers."""
    import time

    x = torch.ones(numel)
    dist.all_reduce(x)
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(x)
    return time.perf_counter() - start
