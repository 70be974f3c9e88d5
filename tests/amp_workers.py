"""Worker functions for tests/test_amp.py (module level, so spawned processes can import them)."""

import copy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from conftest import batches, ce, mlp
from dist_workers import build_method, digits64
from guard_workers import _tensors


def amp_train(rank, world, spec=None, steps=8, scaler=None, inf_at=None, inf_rank=1, drop=(), dtype=torch.float32,
              device="cpu", front="hook", lr=0.1, batch_size=64):
    """Train ``steps`` batches through DDP and gradcomp's hook with ``spec`` (None: plain DDP, no hook), or with
    ``front="optim"`` through a DistributedOptimizer (synchronized before the scaler steps).

    ``scaler``: GradScaler options (``{"init_scale": ..., "growth_interval": ...}``) for the usual AMP loop with
    the scaler given to the hook; None: the plain loop (``loss.backward()``; the optimizer steps unless the hook
    skipped).  On rank ``inf_rank`` the loss of step ``inf_at`` is multiplied by Inf; batches in ``drop`` are
    left out (the reference for a skipped step).  Returns the parameters, the method's memory, the bytes sent,
    the scale before and after each step's ``update()``, the largest |gradient| DDP handed the optimizer, and
    whether the step ``inf_at`` changed the weights or the memory."""
    x, y = digits64()
    model = mlp(dtype=dtype).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    amp = torch.amp.GradScaler(device, **scaler) if scaler is not None else None
    if front == "optim":
        net = model
        opt = state = gradcomp.DistributedOptimizer(opt, model.named_parameters(), build_method(spec), scaler=amp)
    else:
        net = DDP(model, device_ids=[0] if device == "cuda" else None)
        state = gradcomp.register_ddp_hook(net, build_method(spec), optimizer=opt, scaler=amp) if spec else None
    out = {"scales": [], "largest_grad": 0.0, "weights_kept": None, "memory_kept": None, "skipped_seen": None}
    for step, (xb, yb) in enumerate(batches(x, y, batch_size, steps)):
        if step in drop:
            continue
        shard = (xb.tensor_split(world)[rank].to(device, dtype), yb.tensor_split(world)[rank].to(device))
        opt.zero_grad()
        loss = ce(net, shard)
        if step == inf_at:
            weights = [p.detach().clone() for p in model.parameters()]
            memory = copy.deepcopy(state.method.state_dict()["memory"])
            if rank == inf_rank:
                loss = loss * float("inf")
        if amp is None:
            loss.backward()
            if state is None or not state.step_skipped:
                opt.step()
        else:
            before = amp.get_scale()
            amp.scale(loss).backward()
            if front == "optim":
                opt.synchronize()
            out["largest_grad"] = max(out["largest_grad"], max(float(p.grad.abs().max()) for p in model.parameters()))
            amp.step(opt)
            amp.update()
            out["scales"].append((before, amp.get_scale()))
        if step == inf_at:
            out["skipped_seen"] = state.step_skipped
            out["weights_kept"] = all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
            out["memory_kept"] = all(torch.equal(a, b) for a, b in zip(_tensors(memory),
                                                                       _tensors(state.method.state_dict()["memory"])))
    out["params"] = {n: p.detach().cpu() for n, p in model.named_parameters()}
    if state is not None:
        out["memory"] = {k: v.detach().cpu() for k, v in _named(state.method.state_dict()["memory"])}
        out["bytes"] = state.comm.bytes_sent
        out["skipped"] = state.guard.skipped
    return out


def _named(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj):
            yield from _named(obj[key], f"{prefix}.{key}")


def runs(rank, world, jobs):
    """Several amp_train runs in one process group (one spawn for the whole module)."""
    return {name: amp_train(rank, world, **job) for name, job in jobs.items()}
