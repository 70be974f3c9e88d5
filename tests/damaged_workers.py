"""Run by tests/test_damaged.py in a subprocess, so that a kernel writing out of bounds shows as a crash (a
negative return code) instead of taking pytest down: states that do not fit are loaded through the public
``load_state_dict`` of DGC, a plain Method (residual memory) and a DDP HookState; each must raise a one-line
ValueError naming the entry (at the load, or at the first step where the names were not known then), and a
correct state loaded afterwards must step exactly as a fresh copy loaded with it does.  Prints one line per
case: ``<door> <entry> <bad>: <message>``."""

import copy
import sys

import torch
import torch.distributed as dist
from torch import nn

import gradcomp
import gradcomp.kernels
import gradcomp.launch
from gradcomp.compressors.base import get
from gradcomp.method import DGC, Method
from helpers import exchange_step

NAME = "0.weight"
BAD = {
    "shape": lambda t: torch.zeros(3),
    "dtype": lambda t: t.double(),
    "device": lambda t: torch.zeros_like(t, device="meta"),
    "non-tensor": lambda t: t.tolist()[:2],
    "integer": lambda t: t.to(torch.int32),
}


def grads(seed):
    g = torch.Generator().manual_seed(seed)
    return {NAME: torch.randn(64, 64, generator=g), "0.bias": torch.randn(64, generator=g)}


def with_entry(state, path, value):
    state = copy.deepcopy(state)
    at = state
    for key in path[:-1]:
        at = at[key]
    at[path[-1]] = value
    return state


def entry(state, path):
    for key in path:
        state = state[key]
    return state


def method_case(door, make, path):
    """Load each bad variant of ``path`` into a method that stepped once, step it; then the good state."""
    method = make()
    exchange_step([method], [grads(0)])
    good = method.state_dict()
    expected = make()
    expected.load_state_dict(good)
    want, _ = exchange_step([expected], [grads(1)])
    for bad, damage in BAD.items():
        m = make()
        try:
            m.load_state_dict(with_entry(good, path, damage(entry(good, path))))
            exchange_step([m], [grads(1)])
        except ValueError as error:
            print(f"{door} {'.'.join(path)} {bad}: {error}", flush=True)
        else:
            raise AssertionError(f"{door} {bad}: no error")
        m.load_state_dict(good)
        got, _ = exchange_step([m], [grads(1)])
        assert all(torch.equal(got[n], want[n]) for n in want), f"{door} {bad}: the good state steps differently"


def hook_case():
    """The DDP hook on one gloo rank: a bad DGC memory through HookState.load_state_dict, then a good one."""
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64))

    def trained(state_dict=None, steps=1):
        model = copy.deepcopy(base)
        ddp = nn.parallel.DistributedDataParallel(model)
        state = gradcomp.register_ddp_hook(ddp, DGC(density=0.01, min_numel=16, momentum=0.9, warmup_steps=0),
                                           optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1))
        if state_dict is not None:
            state.load_state_dict(state_dict)
        for i in range(steps):
            ddp(torch.randn(8, 64, generator=torch.Generator().manual_seed(i))).square().sum().backward()
        return ddp, state

    _, state = trained()
    good = state.state_dict()
    path = ("method", "memory", "v", NAME)
    want = trained(good)[0].module[0].weight.grad
    for bad, damage in BAD.items():
        try:
            trained(with_entry(good, path, damage(entry(good, path))))
        except ValueError as error:  # at the load: the hook knows the model's parameters
            print(f"hook {'.'.join(path)} {bad}: {error}", flush=True)
        else:
            raise AssertionError(f"hook {bad}: no error")
    assert torch.equal(trained(good)[0].module[0].weight.grad, want)
    del _, state  # no DDP model may outlive its process group: its reducer's teardown could then hang at exit
    gradcomp.launch.shutdown()


if __name__ == "__main__":
    method_case("dgc", lambda: DGC(density=0.01, min_numel=16, warmup_steps=0), ("memory", "u", NAME))
    method_case("dgc-dense", lambda: DGC(density=0.01, min_numel=16, warmup_steps=0),
                ("dense_momentum", "buffers", "0.bias"))
    method_case("topk", lambda: Method(get("topk", density=0.01)), ("memory", "residuals", NAME))
    hook_case()
    print(f"done, compiled kernel {'used' if gradcomp.kernels.library() is not None else 'absent'}", flush=True)
