"""Worker functions for test_lightning.py (module level, so spawned processes can import them).

The workers already share a gloo process group (gradcomp.launch.spawn); with ``LOCAL_RANK`` set,
Lightning's default LightningEnvironment takes the processes as launched externally (no launcher of
its own) and its DDPStrategy finds torch.distributed initialised and uses that world.
"""

import copy
import logging
import os
import warnings

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.warnings import PossibleUserWarning
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import gradcomp
from conftest import ce, mlp
from dist_workers import build_method, digits64
from gradcomp.lightning import GradientCompression

SAMPLES, BATCH = 512, 32  # 256 samples per rank: 8 steps an epoch
DGC = ("DGC", {"density": 0.01, "warmup_epochs": 0})  # memory from the first step, no schedule involved
TOPK = ("topk", {"density": 0.05})

# The README's Lightning example, run as written: by every worker of run_all (last, as it ends the process group)
# and, under torchrun, by test_lightning.test_torchrun_example (slow).
README_EXAMPLE = '''\
# run with: torchrun --standalone --nproc-per-node 2 lightning_example.py
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import gradcomp
from gradcomp.lightning import GradientCompression

dgc = gradcomp.DGC(density=0.01, warmup_epochs=0)


class Digits(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # DGC applies momentum itself: SGD gets momentum=0 and a matching decay
        return torch.optim.SGD(self.parameters(), lr=0.1, **gradcomp.sgd_settings(dgc, momentum=0.9, weight_decay=1e-4))


digits = load_digits()
data = TensorDataset(torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target))
compression = GradientCompression(dgc)  # registers gradcomp's DDP hook on CPU too; checkpoints every rank's memory
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[compression],
                     logger=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Digits(), DataLoader(data, batch_size=32, shuffle=True))
print(f"rank {trainer.global_rank}: sent {compression.state.comm.bytes_sent} bytes")
gradcomp.shutdown()  # barrier, then destroy_process_group: gloo's threads end before the interpreter does
'''


def shard_loader(rank, world):
    """This rank's shard (Lightning is told not to add a DistributedSampler, so plain DDP sees the same batches)."""
    x, y = digits64()
    return DataLoader(TensorDataset(x[:SAMPLES][rank::world], y[:SAMPLES][rank::world]), batch_size=BATCH)


class Digits(pl.LightningModule):
    """The digits MLP of conftest (float64); rank 1 multiplies its loss by Inf at step ``inf_at``."""

    def __init__(self, momentum=0.0, weight_decay=0.0, inf_at=None, seed=0):
        super().__init__()
        self.net = mlp(seed)
        self.momentum, self.weight_decay, self.inf_at = momentum, weight_decay, inf_at

    def training_step(self, batch, batch_idx):
        loss = ce(self.net, batch)
        if self.global_step == self.inf_at and dist.get_rank() == 1:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum, weight_decay=self.weight_decay)


class Record(pl.Callback):
    """The parameters after every step, and the gradcomp state at the end of the first epoch and at train start."""

    def __init__(self, compression=None):
        self.compression, self.steps, self.epoch0, self.at_start = compression, [], None, None

    def on_train_start(self, trainer, pl_module):
        if self.compression is not None:
            self.at_start = copy.deepcopy(self.compression.state.state_dict())  # its tensors change in place

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(params(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0 and self.compression is not None:
            self.epoch0 = copy.deepcopy(self.compression.state.state_dict())


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def fit(rank, world, module, epochs, callbacks=(), ckpt_path=None, checkpoint_dir=None, plugins=None):
    callbacks = list(callbacks)
    if checkpoint_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1))
    precision = {} if plugins else {"precision": "64-true"}  # a precision plugin says it itself
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=epochs, plugins=plugins,
                         **precision, callbacks=callbacks, use_distributed_sampler=False,
                         enable_checkpointing=bool(checkpoint_dir), enable_progress_bar=False,
                         enable_model_summary=False, logger=False, default_root_dir=checkpoint_dir)
    trainer.fit(module, shard_loader(rank, world), ckpt_path=ckpt_path)
    return params(module)


def plain_ddp(rank, world, spec, epochs, momentum=0.0, weight_decay=0.0, inf_at=None):
    """The same training as ``fit`` with plain DistributedDataParallel and gradcomp.register_ddp_hook."""
    model = mlp()
    net = DDP(model)
    state = gradcomp.register_ddp_hook(net, build_method(spec))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    step = 0
    for _ in range(epochs):
        for batch in shard_loader(rank, world):
            opt.zero_grad()
            loss = ce(net, batch)
            if step == inf_at and rank == 1:
                loss = loss * float("inf")
            loss.backward()
            if not state.step_skipped:
                opt.step()
            step += 1
    del net
    return params(model), state.comm.bytes_sent, state.guard.skipped


def error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return None


def run_all(rank, world, root):
    """Every multi-process case of test_lightning.py in one process group (one start-up, one Lightning import)."""
    os.environ["LOCAL_RANK"] = str(rank)  # LightningEnvironment: processes launched externally, this one is `rank`
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)  # few dataloader workers, tiny batches
    warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")  # no ModelCheckpoint on resume
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("gradcomp.lightning").addHandler(handler)
    out = {}

    # Dense DDP under Lightning: what the run would be if the hook were not registered.
    out["dense"] = fit(rank, world, Digits(), 3)

    # DGC through the callback, checkpointed every epoch; the same with plain DDP + register_ddp_hook.
    compression = GradientCompression(build_method(DGC))
    record = Record(compression)
    checkpoints = os.path.join(root, "checkpoints")
    out["dgc"] = fit(rank, world, Digits(), 3, [compression, record], checkpoint_dir=checkpoints)
    out["dgc_bytes"], out["dgc_epoch0"] = compression.state.comm.bytes_sent, record.epoch0
    out["ref"], out["ref_bytes"], _ = plain_ddp(rank, world, DGC, 3)

    # Resume from the end of the first epoch, into a fresh model (another init) and a fresh callback.
    first = os.path.join(checkpoints, "epoch=0.ckpt")
    compression = GradientCompression(build_method(DGC))
    record = Record(compression)
    out["resumed"] = fit(rank, world, Digits(seed=1), 3, [compression, record], ckpt_path=first)
    out["restored"] = record.at_start

    # The same checkpoint without gradcomp's entry: memory starts empty, and the run ends elsewhere.
    amnesic = os.path.join(root, "amnesic.ckpt")
    if rank == 0:
        saved = torch.load(first, weights_only=False)
        del saved["callbacks"]["GradientCompression"]
        torch.save(saved, amnesic)
    dist.barrier()
    del warned[:]
    out["amnesic"] = fit(rank, world, Digits(seed=1), 3, [GradientCompression(build_method(DGC))], ckpt_path=amnesic)
    out["amnesic_warned"] = list(warned)

    # A NaN/Inf on rank 1 at step 3, momentum SGD with weight decay: the step must not move the weights.
    compression = GradientCompression(build_method(TOPK))
    record = Record()
    out["skip_final"] = fit(rank, world, Digits(momentum=0.9, weight_decay=1e-2, inf_at=3), 1, [compression, record])
    out["skip_steps"], out["skip_count"] = record.steps, compression.state.guard.skipped
    out["skip_ref"], _, out["skip_ref_count"] = plain_ddp(rank, world, TOPK, 1, momentum=0.9, weight_decay=1e-2,
                                                          inf_at=3)

    # The same under precision "16-mixed" (Lightning's GradScaler, here a CPU one): the callback hands the
    # scaler to the hook, so the Inf reaches both ranks' scalers, which skip the step and halve their scale.
    amp = MixedPrecision("16-mixed", "cpu")
    compression = GradientCompression(build_method(TOPK))
    out["amp_final"] = fit(rank, world, Digits(momentum=0.9, weight_decay=1e-2, inf_at=3), 1, [compression],
                           plugins=[amp])
    out["amp_scale"], out["amp_skipped"] = amp.scaler.get_scale(), compression.state.guard.skipped

    # Refusals, each on every rank before any collective.
    out["momentum_error"] = error_of(lambda: fit(rank, world, Digits(momentum=0.9), 1,
                                                 [GradientCompression(build_method(DGC))]))
    other = ("DGC", {**DGC[1], "density": 0.02})
    out["config_error"] = error_of(lambda: fit(rank, world, Digits(), 3, [GradientCompression(build_method(other))],
                                               ckpt_path=first))
    out["world_error"] = error_of(lambda: GradientCompression(build_method(DGC)).load_state_dict(
        {"world_size": 4, "method": build_method(DGC).config(), "ranks": [None] * 4}))
    logging.getLogger("gradcomp.lightning").removeHandler(handler)

    # The README example (it writes Lightning's default checkpoint into the working directory).
    os.chdir(root)
    namespace = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        exec(compile(README_EXAMPLE, "README example", "exec"), namespace)
    out["readme_bytes"] = namespace["compression"].state.comm.bytes_sent
    out["readme_warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    out["readme_ended_group"] = not dist.is_initialized()
    return out
