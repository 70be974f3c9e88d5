"""Run under torchrun (2 ranks) by test_doors.py: every front door built BEFORE init_process_group, as users of
torchrun, Lightning and Accelerate do, then trained; writes one JSON file per rank (rankN.json, in the working
directory) with what the test asserts."""

import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp

torch.manual_seed(0)
out = {}

# -- built before the process group exists ------------------------------------------------------------------
model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).double()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dopt = gradcomp.DistributedOptimizer(opt, model.named_parameters(), "topk")
dga = gradcomp.DelayedGradientAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), 2)
fedavg = gradcomp.FedAvg(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), 2)
dgc = gradcomp.DGC(density=0.01, warmup_steps=8)
early = gradcomp.HookState(dgc, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
out["built_before_init"] = not dist.is_initialized()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.randn(64, 64, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(10 + rank))

for door in (dopt, dga, fedavg):  # each binds to the group at its first step
    for _ in range(3):
        door.zero_grad()
        F.cross_entropy(model(x), y).backward()
        door.step()
out["optimizer_doors_bytes"] = [dopt.comm.bytes_sent, dga.comm.bytes_sent, fedavg.comm.bytes_sent]

# -- the DGC warm-up advances with the hook's own steps, to the final density -----------------------------
net = DDP(model)
net.register_comm_hook(early, gradcomp.ddp_comm_hook)
densities, sent = [], []
for _ in range(12):
    before = early.comm.bytes_sent
    F.cross_entropy(net(x), y).backward()
    densities.append(early.method.current_density)
    sent.append(early.comm.bytes_sent - before)
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-0.1)
        p.grad = None
out["densities"], out["sent"], out["steps"] = densities, sent, early.method.steps

# -- the optimizer pairing, at the hook ----------------------------------------------------------------------
try:
    gradcomp.register_ddp_hook(DDP(nn.Linear(4, 4)), gradcomp.DGC(), optimizer=torch.optim.AdamW(model.parameters()))
except ValueError as error:
    out["adamw_refused"] = str(error)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lin = DDP(nn.Linear(40, 40))
    state = gradcomp.register_ddp_hook(lin, gradcomp.DGC(warmup_steps=0))
    for _ in range(2):
        lin(torch.randn(8, 40)).sum().backward()
out["unseen_optimizer_warnings"] = [str(w.message) for w in caught if "cannot see the optimizer" in str(w.message)]


# -- sparse gradients (the model of PyTorch's test_ddp_comm_hook_sparse_gradients, plus a dense layer) --------
class SparseGradientModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.EmbeddingBag(10, 10, sparse=True)
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        return F.softmax(self.head(self.embedding(x)), dim=1)


def sparse_run(method, nonfinite):
    torch.manual_seed(1)
    module = SparseGradientModule().double()
    ddp = DDP(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    if method is not None:
        gradcomp.register_ddp_hook(ddp, method, optimizer=opt, nonfinite=nonfinite)
    idx = torch.randint(0, 10, (16, 4), generator=torch.Generator().manual_seed(rank))
    for _ in range(4):
        opt.zero_grad()
        ddp(idx).sum().mul(torch.arange(10.0, dtype=torch.float64)).sum().backward()
        opt.step()
    return {n: p.detach().clone() for n, p in module.named_parameters()}


reference = sparse_run(None, "skip")
for nonfinite in ("skip", "raise"):
    got = sparse_run("none", nonfinite)
    out[f"sparse_{nonfinite}_max_diff"] = max(float((got[n] - reference[n]).abs().max()) for n in reference)
dgc_sparse = sparse_run(gradcomp.DGC(density=0.1, momentum=0, warmup_steps=0, min_numel=1), "skip")
every = [None] * world
dist.all_gather_object(every, {n: t for n, t in dgc_sparse.items()})
out["sparse_dgc_ranks_agree"] = all(torch.equal(every[0][n], every[1][n]) for n in every[0])

del net, lin
with open(f"rank{rank}.json", "w") as f:  # a file per rank: two ranks' lines on one stdout can interleave
    json.dump({"rank": rank, **out}, f)
gradcomp.shutdown()
sys.exit(0)
