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


def hook_then_shutdown(rank, world, keep_model):
    """DDP with the DGC hook for 3 steps, then ``gradcomp.shutdown()`` (deleting the model first unless
    ``keep_model``): how many gloo worker threads the OS still lists afterwards, and the warnings raised."""
    import warnings

    from gradcomp.launch import gloo_threads

    x, y = digits64()
    model = DDP(mlp())
    gradcomp.register_ddp_hook(model, gradcomp.DGC(density=0.05, warmup_epochs=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb in batches(x, y, 64, 3):
        opt.zero_grad()
        ce(model, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])).backward()
        opt.step()
    before = gloo_threads()
    if not keep_model:
        del model, opt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradcomp.shutdown()
    return before, gloo_threads(), [str(w.message) for w in caught]


def timed_all_reduce(rank, world, numel):
    """Seconds one all-reduce of ``numel`` floats takes (after a warm-up one), measured between barriers."""
    import time

    x = torch.ones(numel)
    dist.all_reduce(x)
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(x)
    return time.perf_counter() - start


# ------------------------------------------------------------------ delayed gradient averaging


def least_squares_data(rank, step, rows=8, features=5):
    """Rank ``rank``'s float64 batch at ``step`` for the DGA tests (deterministic, different per rank)."""
    g = torch.Generator().manual_seed(7919 * step + rank)
    x = torch.randn(rows, features, generator=g, dtype=torch.float64)
    return x, x @ torch.linspace(-1, 1, features, dtype=torch.float64) + 0.1 * torch.randn(rows, generator=g,
                                                                                           dtype=torch.float64)


def dga_least_squares(rank, world, delay, correction, steps, lr, period=None, damaged_at=None):
    """A bias-free linear model trained by DGA with plain SGD (with ``period``: by FedAvg(period, delay), DGA with
    local steps); every step's weights on this rank.  With ``damaged_at``, rank 1 puts a NaN on the wire in what
    it sends at that step (0-based)."""
    model = torch.nn.Linear(5, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    opt = (gradcomp.DelayedGradientAveraging(sgd, model.named_parameters(), delay=delay, correction=correction)
           if period is None else gradcomp.FedAvg(sgd, model.named_parameters(), period, delay=delay))
    history, current = [], [0]
    if damaged_at is not None:
        from guard_workers import damage_on_the_wire

        damage_on_the_wire(opt.comm, lambda: rank == 1 and current[0] == damaged_at)
    for step in range(steps):
        current[0] = step
        x, y = least_squares_data(rank, step)
        opt.zero_grad()
        (0.5 * (model(x).view(-1) - y).pow(2).mean()).backward()
        opt.step()
        history.append(model.weight.detach().view(-1).clone())
    return torch.stack(history)


def train_resumable(rank, world, build, steps, resume_at=None):
    """Train the (model, optimizer wrapper) that ``build()`` makes on the digits for ``steps``; with
    ``resume_at``, checkpointed there (through torch.save bytes), rebuilt from scratch, restored and finished.
    The model and the wrapper at the end."""
    import io

    x, y = digits64()
    model, opt = build()
    for step, (xb, yb) in enumerate(batches(x, y, 64, steps)):
        if step == resume_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "door": opt.state_dict()}, buffer)
            model, opt = build()
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["door"])
        opt.zero_grad()
        ce(model, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])).backward()
        opt.step()
    return model, opt


def dga_train(rank, world, spec, delay, steps, momentum, lr=0.1, resume_at=None):
    """The digits MLP trained with DGA (spec None: plain averaging), resumed at ``resume_at`` if given."""

    def build():
        model = mlp()
        opt = gradcomp.DelayedGradientAveraging(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
                                                model.named_parameters(), delay=delay,
                                                method=None if spec is None else build_method(spec))
        return model, opt

    model, _ = train_resumable(rank, world, build, steps, resume_at)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fedavg_train(rank, world, period, steps, momentum, lr=0.1, delay=0, resume_at=None):
    """The digits MLP trained with gradcomp.FedAvg, resumed at ``resume_at`` if given: this rank's parameters
    and bytes sent (since the resume)."""

    def build():
        model = mlp()
        return model, gradcomp.FedAvg(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
                                      model.named_parameters(), period=period, delay=delay)

    model, opt = train_resumable(rank, world, build, steps, resume_at)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "bytes": opt.comm.bytes_sent}


def fedavg_plain(rank, world, period, steps, momentum, lr=0.1):
    """FedAvg written out with torch alone: torch.optim.SGD, and every ``period`` steps one all-reduce of the
    parameters laid end to end (as gradcomp's communicator lays a bucket), divided by the world size."""
    x, y = digits64()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for step, (xb, yb) in enumerate(batches(x, y, 64, steps), 1):
        opt.zero_grad()
        ce(model, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])).backward()
        opt.step()
        if step % period == 0:
            with torch.no_grad():
                params = list(model.parameters())
                flat = torch.cat([p.reshape(-1) for p in params])
                dist.all_reduce(flat)
                for p, total in zip(params, flat.split([p.numel() for p in params])):
                    p.copy_(total.view_as(p) / world)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fedavg_mismatched(rank, world):
    """FedAvg started with delay 3 on rank 0, 2 elsewhere: the error each rank raised at its first step."""
    model = torch.nn.Linear(5, 1, bias=False).double()
    opt = gradcomp.FedAvg(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), 2,
                          delay=3 if rank == 0 else 2)
    x, y = least_squares_data(rank, 0)
    (0.5 * (model(x).view(-1) - y).pow(2).mean()).backward()
    try:
        opt.step()
    except gradcomp.SettingsMismatchError as error:
        return str(error)
    return None


def dga_step_times(rank, world, plan, compute_s, steps, rounds):
    """Seconds per step of DGA for each ``(delay, latency_ms)`` of ``plan`` (delay 0: synchronous SGD), with
    ``compute_s`` of work per step: the best of ``rounds``, the plan's entries interleaved so that a change
    in the machine's load falls on all of them alike."""
    import time

    from gradcomp_studies.bench.latency import step_time

    model = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)

    def loss_fn(m):
        time.sleep(compute_s)  # the rest of a step's computation
        return m(x).pow(2).mean()

    best = [float("inf")] * len(plan)
    for _ in range(rounds):
        for i, (delay, latency_ms) in enumerate(plan):
            best[i] = min(best[i], step_time("dga", delay, latency_ms, steps, model, loss_fn))
    return best


DGA_STEPS = 12
DGA_DGC = ("DGC", {"density": 0.01, "warmup_epochs": 1, "steps_per_epoch": 6})


def dga_all(rank, world):
    """Every multi-process case of test_dga.py in one process group (saves start-ups)."""
    out = {
        "ddp": train(rank, world, "ddp", None, DGA_STEPS, momentum=0.9),
        "dga0": dga_train(rank, world, None, 0, DGA_STEPS, momentum=0.9),
        "dgc_optim": train(rank, world, "optim", DGA_DGC, DGA_STEPS, momentum=0.0),
        "dga0_dgc": dga_train(rank, world, DGA_DGC, 0, DGA_STEPS, momentum=0.0),
        "psgd_optim": train(rank, world, "optim", ("powersgd", {"rank": 2}), DGA_STEPS, momentum=0.9),
        "dga0_psgd": dga_train(rank, world, ("powersgd", {"rank": 2}), 0, DGA_STEPS, momentum=0.9),
        "dga2_psgd": dga_train(rank, world, ("powersgd", {"rank": 2}), 2, DGA_STEPS, momentum=0.9),
    }
    out["ddp_sgd"] = train(rank, world, "ddp", None, DGA_STEPS, momentum=0.0)
    out["fedavg1"] = fedavg_train(rank, world, 1, DGA_STEPS, momentum=0.0)
    out["fedavg3"] = fedavg_train(rank, world, 3, 10, momentum=0.9)
    out["fedavg3_plain"] = fedavg_plain(rank, world, 3, 10, momentum=0.9)
    out["fedavg2_d3"] = fedavg_train(rank, world, 2, 12, momentum=0.9, delay=3)
    out["fedavg2_d3_resumed"] = fedavg_train(rank, world, 2, 12, momentum=0.9, delay=3, resume_at=8)
    for delay in (0, 3):
        out[f"lsq_fedavg_{delay}"] = dga_least_squares(rank, world, delay, True, 10, 0.2, period=2)
        # the round of step 4 damaged on the wire (0-based step 3): refused on every rank
        out[f"lsq_fedavg_{delay}_damaged"] = dga_least_squares(rank, world, delay, True, 10, 0.2, period=2,
                                                               damaged_at=3)
    out["fedavg_mismatch"] = fedavg_mismatched(rank, world)
    for correction in (True, False):
        out[f"lsq_{correction}"] = dga_least_squares(rank, world, 3, correction, 10, 0.2)
    for spec, momentum in ((None, 0.9), (DGA_DGC, 0.0)):
        key = "plain" if spec is None else "dgc"
        out[f"straight_{key}"] = dga_train(rank, world, spec, 3, 15, momentum)
        out[f"resumed_{key}"] = dga_train(rank, world, spec, 3, 15, momentum, resume_at=7)
    return out
