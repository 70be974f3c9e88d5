"""test_checkpoint.py's Accelerate check, run by a real launcher with 2 CPU processes:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 accelerate_resume.py OUT_DIR
    ACCELERATE_USE_CPU=true torchrun --nproc-per-node 2 accelerate_resume.py OUT_DIR

(``accelerate launch --cpu --num_processes 2`` starts one process: its simple launcher.)  save_state at step K,
go on to N (the reference); a fresh Accelerator, model and hook load_state and train K to N; a checkpoint of
another density is refused.  OUT_DIR/data.pt holds the digits (x, y); each rank writes OUT_DIR/rank<r>.pt.
"""

import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType

import gradcomp
from conftest import batches, ce, mlp
from gradcomp.checkpoint import register_with_accelerate

K, N = 3, 7


def snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    return obj


def params(model):
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


def main(out_dir):
    x, y = torch.load(f"{out_dir}/data.pt", weights_only=True)
    ckpt = f"{out_dir}/ckpt"

    def prepared(density=0.01):
        accelerator = Accelerator()
        model = mlp()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        state = gradcomp.register_ddp_hook(model, gradcomp.DGC(density=density, warmup_epochs=0))
        register_with_accelerate(accelerator, state)
        return accelerator, model, optimizer, state

    def train(accelerator, model, optimizer, first, last):
        rank, world = accelerator.process_index, accelerator.num_processes
        for step, (xb, yb) in enumerate(batches(x, y, 64, last)):
            if step >= first:
                optimizer.zero_grad()
                accelerator.backward(ce(model, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])))
                optimizer.step()

    accelerator, model, optimizer, state = prepared()
    out = {"distributed_type": str(accelerator.distributed_type), "world": accelerator.num_processes,
           "backend": dist.get_backend(), "multi_cpu": accelerator.distributed_type == DistributedType.MULTI_CPU}
    train(accelerator, model, optimizer, 0, K)
    accelerator.save_state(ckpt)
    out["saved"] = snapshot(state.state_dict())
    train(accelerator, model, optimizer, K, N)
    out["reference"] = params(model)

    accelerator, model, optimizer, state = prepared()  # fresh: its memory is made at the first step
    accelerator.load_state(ckpt)
    out["restored"] = snapshot(state.state_dict())
    train(accelerator, model, optimizer, K, N)
    out["resumed"] = params(model)

    accelerator, model, optimizer, state = prepared(density=0.02)
    before = params(model)
    try:
        accelerator.load_state(ckpt)
        out["refused"] = None
    except ValueError as error:
        out["refused"] = str(error)
    out["untouched"] = snapshot(state.state_dict())
    out["params_unchanged"] = all(torch.equal(before[n], p) for n, p in params(model).items())
    torch.save(out, f"{out_dir}/rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    gradcomp.shutdown()  # barrier, then destroy the group with no DDP model left holding it
