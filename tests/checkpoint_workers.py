"""Worker functions for test_checkpoint.py's DCP tests (module level, so spawned processes import them).

The digits data comes from the parent (``data``): importing scikit-learn in every worker would cost a second each.
"""

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from conftest import batches, ce, mlp
from dist_workers import build_method
from gradcomp.checkpoint import RankState

K, N = 3, 7  # checkpoint after K steps; the reference runs on to N
DGC = ("DGC", {"density": 0.01, "warmup_epochs": 0})  # warmup_epochs=0: independent of DGC's warm-up defaults
TOPK = ("topk", {"density": 0.01})
MOMENTUM = {"DGC": 0.0, "topk": 0.9}  # DGC owns momentum; topk's optimizer keeps momentum buffers (DCP saves them)


def snapshot(obj):
    """A deep copy of a (nested) state dict, tensors cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def build(spec, hidden=48):
    """A DDP digits MLP with gradcomp's hook and its SGD optimizer."""
    ddp = DDP(mlp(hidden=hidden))
    state = gradcomp.register_ddp_hook(ddp, build_method(spec))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=MOMENTUM[spec[0]])
    return ddp, opt, state


def train(ddp, opt, data, first, last):
    """Steps ``first`` to ``last - 1`` of the deterministic batch sequence, each rank on its own shard."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for step, (xb, yb) in enumerate(batches(*data, 64, last)):
        if step >= first:
            opt.zero_grad()
            ce(ddp, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])).backward()
            opt.step()


def params(ddp):
    return {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


def app_state(ddp, opt, state, group=None):
    """What goes into dcp.save / dcp.load: model and optimizer keyed by parameter name, and gradcomp's state."""
    return {"model": get_model_state_dict(ddp), "optim": get_optimizer_state_dict(ddp, opt),
            "gradcomp": RankState(state, model=ddp, process_group=group)}


def dcp_save(ddp, opt, state, path, group=None):
    dcp.save(app_state(ddp, opt, state, group), checkpoint_id=path, process_group=group)


def dcp_load(ddp, opt, state, path, group=None):
    sd = app_state(ddp, opt, state, group)
    dcp.load(sd, checkpoint_id=path, process_group=group)
    set_model_state_dict(ddp, sd["model"])
    set_optimizer_state_dict(ddp, opt, sd["optim"])


def refusal(call):
    """The message of the error ``call()`` raises (None if it raises none): a ValueError, or DCP's
    CheckpointException (a BaseException) when its load planner stops first."""
    try:
        call()
    except (ValueError, dcp.CheckpointException) as error:
        return f"{type(error).__name__}: {error}"
    return None


def dcp_two_ranks(rank, world, root, data):
    """Per method: train K steps, dcp.save (model, optimizer, RankState), snapshot this rank's memory, go on to N
    steps (the reference); then a fresh model, optimizer and hook (memory not created yet) dcp.load the checkpoint
    and train K to N.  Then the refusals: another density, another model, and other numbers of ranks: DCP's
    ``process_group`` makes each rank a world of its own (``alone``), so rank 0 saves a 1-rank checkpoint that
    both ranks load (fewer ranks), and each rank alone loads the 2-rank one (more ranks)."""
    alone, _ = dist.new_subgroups(group_size=1)
    out = {}
    for spec in (DGC, TOPK):
        name = spec[0]
        ddp, opt, state = build(spec)
        train(ddp, opt, data, 0, K)
        dcp_save(ddp, opt, state, f"{root}/{name}")
        if name == "DGC" and rank == 0:
            dcp_save(ddp, opt, state, f"{root}/DGC-rank0-alone", group=alone)
        out[name] = {"saved": snapshot(state.state_dict()), "entry": RankState(state).state_dict()}
        train(ddp, opt, data, K, N)
        out[name]["reference"] = params(ddp)
        del ddp

        ddp, opt, state = build(spec)
        out[name]["fresh"] = snapshot(state.state_dict())
        dcp_load(ddp, opt, state, f"{root}/{name}")
        out[name]["restored"] = snapshot(state.state_dict())
        train(ddp, opt, data, K, N)
        out[name]["resumed"] = params(ddp)
        del ddp

    def refused(key, spec, load, hidden=48):
        ddp, opt, state = build(spec, hidden)
        before = params(ddp)
        out[key] = refusal(lambda: load(ddp, opt, state))  # noqa: F821 (called before the del below)
        out[f"{key}_untouched"] = snapshot(state.state_dict())
        out[f"{key}_params_unchanged"] = all(torch.equal(before[n], p) for n, p in params(ddp).items())
        del ddp

    def gradcomp_only(ddp, opt, state):  # another model's entries would stop DCP at their own shapes first
        dcp.load({"gradcomp": RankState(state, model=ddp)}, checkpoint_id=f"{root}/DGC")

    refused("density", ("DGC", {**DGC[1], "density": 0.02}), gradcomp_only)
    refused("model", DGC, gradcomp_only, hidden=32)
    dist.barrier()  # rank 0's 1-rank checkpoint is written
    refused("fewer", DGC, lambda ddp, opt, state: dcp_load(ddp, opt, state, f"{root}/DGC-rank0-alone"))
    refused("more", DGC, lambda ddp, opt, state: dcp_load(ddp, opt, state, f"{root}/DGC", group=alone))
    return out
