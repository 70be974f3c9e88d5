"""Worker functions for tests/test_guard.py (module level, so spawned processes can import them)."""

import copy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from conftest import batches, ce, mlp
from dist_workers import build_method, digits64


def guarded_train(rank, world, front, spec, steps, momentum=0.0, nan_at=None, nan_rank=1, drop=(),
                  nonfinite="skip", lr=0.1, batch_size=64, nan_in=None, bucket_cap_mb=25.0, corrupt_at=None):
    """Train ``steps`` batches through ``front`` ('hook' or 'optim'); on rank ``nan_rank`` the loss of step
    ``nan_at`` is multiplied by NaN (every gradient of that rank non-finite), or with ``nan_in`` (a parameter
    name) that parameter's gradient alone; batches in ``drop`` are left out (the reference for a skipped step).
    ``bucket_cap_mb``: DDP's (and DistributedOptimizer's) bucket size.  Returns the parameters, the skipped
    count, around the NaN step whether this rank's method memory (and per-tensor compressor state) stayed bit
    for bit the same, and for the hook the bytes each step had sent before its last bucket came.
    ``corrupt_at``: at that step rank ``nan_rank`` puts a NaN into the first floating entry of every payload it
    sends, after compression (its gradients are finite: the damage is on the wire); ``nan_at`` should name the
    same step, with ``nan_in`` unset and the loss then left alone."""
    x, y = digits64()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    early = []
    if front == "hook":
        net = DDP(model, bucket_cap_mb=bucket_cap_mb)
        state = gradcomp.HookState(build_method(spec), model=net, nonfinite=nonfinite)

        def hook(state, bucket):
            fut = gradcomp.ddp_comm_hook(state, bucket)
            if not bucket.is_last():
                early.append(state.comm.bytes_sent - start[0])
            return fut

        net.register_comm_hook(state, hook)
        method, skipped = (lambda: state.method), (lambda: state.guard.skipped)
    else:
        net = model
        opt = gradcomp.DistributedOptimizer(opt, model.named_parameters(), build_method(spec), nonfinite=nonfinite,
                                            bucket_cap_mb=bucket_cap_mb)
        method, skipped = (lambda: opt.method), (lambda: opt.guard.skipped)
    if corrupt_at is not None:
        comm = state.comm if front == "hook" else opt.comm
        damage_on_the_wire(comm, lambda: rank == nan_rank and current[0] == corrupt_at)
    current = [0]
    if nan_in is not None:
        poisoned = dict(model.named_parameters())[nan_in]
        poisoned.register_hook(lambda g: g * float("nan") if poison[0] else g)
    poison, start, sent_early = [False], [0], []
    memory_kept = None
    for step, (xb, yb) in enumerate(batches(x, y, batch_size, steps)):
        if step in drop:
            continue
        shard = (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])
        opt.zero_grad()
        loss = ce(net, shard)
        current[0] = step
        if step == nan_at:
            before = copy.deepcopy(method().state_dict())
            if rank == nan_rank and nan_in is None and corrupt_at is None:
                loss = loss * float("nan")
            poison[0] = rank == nan_rank and nan_in is not None
        if front == "hook":
            start[0], early[:] = (state.comm.bytes_sent if state.core.bound else 0), []
        loss.backward()
        poison[0] = False
        sent_early.append(max(early, default=0))
        if front == "hook":
            if not state.step_skipped:
                opt.step()
        else:
            opt.step()
        if step == nan_at:
            after = method().state_dict()
            memory_kept = _same(before, after)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "skipped": skipped(),
            "memory_kept": memory_kept, "sent_early": sent_early}


def damage_on_the_wire(comm, when):
    """Make ``comm`` put a NaN into the first floating entry of every payload it sends while ``when()`` holds."""
    launch = comm._launch

    def damaged(payloads):
        if when():  # copies: the damage is on the wire, not in what the sender keeps
            payloads = {name: p.replace(*_nan_in_first_float(p.tensors)) for name, p in payloads.items()}
        return launch(payloads)

    comm._launch = damaged


def _nan_in_first_float(tensors):
    """Copies of ``tensors``, the first floating one with a NaN in its first entry."""
    out, done = [], False
    for t in tensors:
        if not done and t.is_floating_point() and t.numel():
            t, done = t.clone(), True
            t.view(-1)[0] = float("nan")
        out.append(t)
    return out


def _same(before, after):
    """Whether two method states hold the same tensors, bit for bit, under the same keys (memory, per-tensor
    compressor state, DGC's dense momentum)."""
    keys = ("memory", "compressor_state", "dense_momentum")
    flat = [[(k, t) for key in keys for k, t in _named(a.get(key, {}), key)] for a in (before, after)]
    return [k for k, _ in flat[0]] == [k for k, _ in flat[1]] and all(
        torch.equal(a, b) for (_, a), (_, b) in zip(*flat))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _named(obj, prefix):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _named(obj[key], f"{prefix}.{key}")


def dga_guarded(rank, world, delay, steps, nan_at, nan_rank=1, momentum=0.9, lr=0.1, batch_size=64):
    """Delayed averaging (method none) with a NaN on ``nan_rank`` at step ``nan_at``: every rank's model, and
    how many steps each skipped."""
    x, y = digits64()
    model = mlp()
    opt = gradcomp.DelayedGradientAveraging(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
                                            model.named_parameters(), delay)
    for step, (xb, yb) in enumerate(batches(x, y, batch_size, steps)):
        opt.zero_grad()
        loss = ce(model, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank]))
        if step == nan_at and rank == nan_rank:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "skipped": opt.skipped,
            "bytes": opt.comm.bytes_sent}


def mismatched(rank, world, front, density_on_rank1=0.01, hidden_on_rank1=48, delay_on_rank1=2):
    """Start the ranks with different settings; return the error each rank raised (or None)."""
    x, y = digits64()
    model = mlp(hidden=48 if rank == 0 else hidden_on_rank1)
    spec = ("DGC", {"density": 0.001 if rank == 0 else density_on_rank1, "warmup_epochs": 0})
    try:
        if front == "hook":
            net = DDP(model)
            gradcomp.register_ddp_hook(net, build_method(spec))
            ce(net, (x[:32], y[:32])).backward()
        elif front == "optim":
            opt = gradcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                model.named_parameters(), build_method(spec))
            ce(model, (x[:32], y[:32])).backward()
            opt.step()
        else:
            opt = gradcomp.DelayedGradientAveraging(torch.optim.SGD(model.parameters(), lr=0.1),
                                                    model.named_parameters(), 2 if rank == 0 else delay_on_rank1)
            ce(model, (x[:32], y[:32])).backward()
            opt.step()
    except gradcomp.SettingsMismatchError as error:
        return str(error)
    return None


def nan_raises(rank, world):
    """``nonfinite="raise"``: the rank with the NaN raises; the job ends (the launcher stops the others)."""
    x, y = digits64()
    model = mlp()
    net = DDP(model)
    gradcomp.register_ddp_hook(net, gradcomp.DGC(density=0.01, warmup_epochs=0), nonfinite="raise")
    loss = ce(net, (x[:32], y[:32]))
    (loss * float("nan") if rank == 1 else loss).backward()
    return True


def runs(rank, world, jobs):
    """Several guarded_train runs in one process group."""
    return [guarded_train(rank, world, **job) for job in jobs]


def outer_damaged(rank, world, door, steps, corrupt_at, nan_rank=1, lr=0.1, batch_size=64):
    """DelayedGradientAveraging (delay 1, method none) or FedAvg (period 2) where rank ``nan_rank`` damages what it
    sends at step ``corrupt_at``: every rank's weights, the skipped count, and whether they stayed finite."""
    x, y = digits64()
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    opt = (gradcomp.DelayedGradientAveraging(sgd, model.named_parameters(), 1) if door == "dga"
           else gradcomp.FedAvg(sgd, model.named_parameters(), 2))
    current = [0]
    damage_on_the_wire(opt.comm, lambda: rank == nan_rank and current[0] == corrupt_at)
    for step, (xb, yb) in enumerate(batches(x, y, batch_size, steps)):
        current[0] = step
        opt.zero_grad()
        ce(model, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])).backward()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "skipped": opt.skipped}
