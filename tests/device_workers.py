"""One rank of test_devices.py: the DDP hook, a DCP round trip and the Lightning callback on ``device``
(``"cpu"`` on gloo, ``"cuda"`` on NCCL; world size 1, as one GPU holds one NCCL rank)."""

import copy
import logging
import os
import warnings

import pytorch_lightning as pl
import torch
import torch.distributed.checkpoint as dcp
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from conftest import ce, mlp
from gradcomp.checkpoint import RankState, state_tensors
from gradcomp.lightning import GradientCompression
from lightning_workers import Digits, Record, shard_loader

EPOCHS = 3


def method(kind):
    # topk is exact (no sampling), so a CUDA run can be compared with the CPU one; DGC samples its threshold
    # from each device's own generator, so its runs are compared on one device only (resume bit for bit)
    return gradcomp.DGC(density=0.01, warmup_epochs=0) if kind == "dgc" else gradcomp.get("topk", density=0.05)


def batches(rank, world, device):
    return [(x.to(device), y.to(device)) for x, y in shard_loader(rank, world)]


def hooked(rank, world, device, kind, epochs, root=None, stop_after=None, resume_from=None):
    """Plain DDP + register_ddp_hook for ``epochs``; with ``stop_after`` saved (DCP) after that many epochs,
    with ``resume_from`` loaded from such a checkpoint into a fresh model (another init) first."""
    model = mlp(seed=1 if resume_from else 0).to(device)
    net = DDP(model, device_ids=[torch.device(device).index or 0] if device == "cuda" else None)
    chosen = method(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **gradcomp.sgd_settings(chosen, 0.9 if kind == "dgc" else 0.0))
    state = gradcomp.register_ddp_hook(net, chosen, optimizer=opt)

    def app():
        model_sd, optim_sd = get_state_dict(net, opt)  # noqa: F821 (net is deleted only after the last call)
        return {"model": model_sd, "optim": optim_sd, "gradcomp": RankState(state, model=net)}  # noqa: F821

    start = 0
    if resume_from is not None:
        sd = app()
        dcp.load(sd, checkpoint_id=resume_from)
        set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        start = stop_after
    data = batches(rank, world, device)
    for epoch in range(start, epochs):
        for batch in data:
            opt.zero_grad()
            ce(net, batch).backward()
            if not state.step_skipped:
                opt.step()
        if epoch + 1 == stop_after and resume_from is None:
            dcp.save(app(), checkpoint_id=os.path.join(root, "dcp"))
    out = {"params": {n: p.detach().cpu() for n, p in model.named_parameters()}, "bytes": state.comm.bytes_sent,
           "memory_device": sorted({str(t.device) for t in state_tensors(state.state_dict())})}
    del net
    return out


def lightning(rank, world, device, kind, root, ckpt_path=None):
    compression = GradientCompression(method(kind))
    record = Record(compression)
    module = Digits(seed=1 if ckpt_path else 0)
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=world, strategy="ddp",
                         precision="64-true", max_epochs=EPOCHS, use_distributed_sampler=False,
                         callbacks=[compression, record,
                                    pl.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)],
                         enable_progress_bar=False, enable_model_summary=False, logger=False, default_root_dir=root)
    trainer.fit(module, shard_loader(rank, world), ckpt_path=ckpt_path)  # Lightning moves the batches
    return {"params": {n: p.detach().cpu() for n, p in module.net.named_parameters()},
            "bytes": compression.state.comm.bytes_sent, "device": str(next(module.parameters()).device),
            "restored": copy.deepcopy(record.at_start)}


def run_all(rank, world, device, root):
    os.environ["LOCAL_RANK"] = str(rank)
    if device == "cuda":
        torch.cuda.set_device(rank)
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
    out = {}
    for kind in ("topk", "dgc"):
        where = os.path.join(root, kind)
        out[f"{kind}_hook"] = hooked(rank, world, device, kind, EPOCHS, where, stop_after=1)
        out[f"{kind}_hook_resumed"] = hooked(rank, world, device, kind, EPOCHS, stop_after=1,
                                             resume_from=os.path.join(where, "dcp"))
        out[f"{kind}_lightning"] = lightning(rank, world, device, kind, os.path.join(where, "pl"))
        out[f"{kind}_lightning_resumed"] = lightning(rank, world, device, kind, os.path.join(where, "pl2"),
                                                     ckpt_path=os.path.join(where, "pl", "epoch=0.ckpt"))
    gradcomp.shutdown()
    return out
