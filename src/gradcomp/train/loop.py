"""``gradcomp train``: one data-parallel training job with a chosen method.

The same loop runs in three ways:

* ``workers`` local processes it starts itself (gloo, :func:`gradcomp.launch.spawn`),
* one rank of a ``torchrun`` launch (``RANK``/``WORLD_SIZE`` in the environment),
* the :class:`~gradcomp.Simulator` (``simulate=True``): N virtual workers in one process.

``device`` says where: on CUDA, local rank ``r`` trains on ``cuda:r`` (under
torchrun ``cuda:LOCAL_RANK``; simulated, every worker on the current device)
with NCCL, its model, batches and method memory there; on the CPU with gloo.
``"auto"`` is CUDA where every local rank gets a GPU of its own
(:func:`gradcomp.launch.device_kind`); the run's ``config.json`` records the
device it resolved to.

Real ranks train a DDP model with gradcomp's communication hook; rank 0
evaluates, writes the run directory (config, metrics, checkpoint, plot) and
returns the summary.  Every epoch ends with a checkpoint (and, with
``checkpoint_every``, every that many steps), holding the model, the
optimizer, every rank's method memory, the RNG states (CUDA's too) and LSTM
states, the learning-rate schedule and the data position, so ``resume``
continues exactly where the checkpoint was written, mid-epoch too: the result
is bit-identical to a run that never stopped.  The checkpoint holds CPU
tensors only: each rank copies its part to the CPU before it is gathered to
rank 0 (no rank's CUDA tensors are unpickled in another rank's process), and
on resume each rank puts its own part back on its own device.

Restarts after a failure resume from the last checkpoint: under ``torchrun
--max-restarts K`` (``TORCHELASTIC_RESTART_COUNT > 0`` and a checkpoint in the
run directory) and with ``run(max_restarts=K)`` for the workers started here.
Each failed attempt of those workers leaves its full report, every rank's
traceback included, in the run directory's ``worker-errors.log``
(:data:`WORKER_ERRORS`); the :class:`~gradcomp.launch.WorkerError` raised keeps
the one-line ``summary``.  Ctrl-C raises :class:`TrainingInterrupted` (a
``KeyboardInterrupt``) naming the step rank 0 reached; the last checkpoint is
whole, and :meth:`TrainingInterrupted.describe` gives the command that resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from ..checkpoint import non_finite_entries, state_tensors, state_to_cpu, state_to_device
from ..compressors.base import check_int, check_range
from ..launch import DeviceRequest, device_kind
from ..method import Method, sgd_settings
from ..schedule import LinearLRWarmup
from .config import OPTIMIZERS, RESUMABLE, OptimizerName, TrainConfig, flat_settings
from .data import (
    Dataset,
    batchify,
    image_batches,
    lm_batches,
    lm_steps,
    load_dataset,
    skewed_parts,
    speaker_grouped,
    steps_per_epoch,
)
from .models import build_model, detach_hidden
from .report import format_summary, plot_run
from .rundir import RunDir

if TYPE_CHECKING:  # imported where they are built (as at run time)
    from ..comm import Communicator
    from ..dga import DelayedGradientAveraging, FedAvg
    from ..simulator import Simulator

__all__ = ["OPTIMIZERS", "OptimizerName", "TrainConfig", "TrainingInterrupted", "build_optimizer", "resumable",
           "resume_config", "run", "train_worker"]

log = logging.getLogger(__name__)


def build_optimizer(config: TrainConfig, model: nn.Module, method: Method) -> torch.optim.Optimizer:
    """The optimizer ``config.optim.name`` names over ``model``'s parameters: ``torch.optim.SGD`` with
    :func:`~gradcomp.sgd_settings` (momentum 0 and scaled weight decay for DGC, which owns momentum), or
    ``torch.optim.AdamW`` with ``lr`` and (decoupled) ``weight_decay``, its default betas and eps.

    Args:
        config: the run's settings (``config.optim``: name, lr, momentum, weight decay).
        model: the model whose parameters it updates.
        method: the run's method (DGC owns momentum: SGD then has none).

    Returns:
        The optimizer, not yet stepped.
    """
    optim = config.optim
    if optim.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=optim.lr, **sgd_settings(method, optim.momentum, optim.weight_decay))


# ------------------------------------------------------------------ data steps


def _image(data: Dataset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x_train, y_train, x_test, y_test`` of an image dataset (which holds them: :class:`Dataset` checks)."""
    assert (data.x_train is not None and data.y_train is not None and data.x_test is not None
            and data.y_test is not None)
    return data.x_train, data.y_train, data.x_test, data.y_test


class Task:
    """Loss, batches and evaluation for one kind of dataset.

    ``config.data.partition="skewed"`` gives each worker its own part of the training data:
    :func:`~gradcomp.train.data.skewed_parts` (a few classes each) for images,
    :func:`~gradcomp.train.data.speaker_grouped` (a few speakers each) for Tiny Shakespeare.

    Args:
        data: the dataset (images, or a language model's tokens).
        config: the run's settings (batch size, partition, bptt, seed, test limit).
        workers: the number of workers the global batch is split among.
        device: where the loss and evaluation move their batches.

    Raises:
        ValueError: an epoch would have no step: the global batch (or, skewed, one worker's batch) is larger than
            the training data (or that worker's part).
    """

    def __init__(self, data: Dataset, config: TrainConfig, workers: int, device: torch.device | str = "cpu"
                 ) -> None:
        self.data, self.config, self.workers, self.device = data, config, workers, torch.device(device)
        self.global_batch = config.data.batch_size * workers
        skewed = config.data.partition == "skewed"
        self.parts = skewed_parts(_image(data)[1], workers, config.launch.seed) if skewed and data.kind != "lm" \
            else None
        #: language models: each worker's LSTM state, carried from step to step within an epoch
        self.hidden: dict[int, Any] = {}
        if data.kind == "lm":  # TrainConfig allows "skewed" only where there are classes or speakers
            assert data.train is not None  # an lm dataset holds it (Dataset checks)
            train = speaker_grouped(data.train, data.vocab, workers) if skewed else data.train
            self.train_rows = batchify(train, self.global_batch)
            self.steps = lm_steps(self.train_rows, config.data.bptt)
        elif self.parts is not None:
            self.steps = min(len(p) for p in self.parts) // config.data.batch_size
            if self.steps == 0:
                raise ValueError(f"TrainConfig.data.batch_size={config.data.batch_size} is larger than the smallest "
                                 f"worker's part of the training set ({min(len(p) for p in self.parts)} samples, "
                                 f"partition='skewed'); lower batch_size or workers")
        else:
            y_train = _image(data)[1]
            self.steps = steps_per_epoch(len(y_train), self.global_batch)
            if self.steps == 0:
                raise ValueError(f"TrainConfig.data.batch_size={config.data.batch_size}: a global batch of "
                                 f"{self.global_batch} ({workers} workers) is larger than the {len(y_train)} training "
                                 f"samples; lower batch_size or workers")

    def epoch(self, epoch: int, start: int = 0) -> Any:
        """Per step: one shard per worker, each tagged with its worker index; from step ``start`` on (a
        mid-epoch resume: the LSTM states ``hidden`` are then the restored ones, not reset).

        Args:
            epoch: the epoch's index (it seeds the order of the image batches).
            start: the first step to give (0: the whole epoch).

        Yields:
            One list per step: a ``(worker, x, y)`` shard for each worker.
        """
        if self.data.kind == "lm":
            if start == 0:
                self.hidden = {}
            batches = lm_batches(self.train_rows, self.config.data.bptt, self.workers)
        else:
            x_train, y_train, _, _ = _image(self.data)
            batches = image_batches(x_train, y_train, self.global_batch, self.workers, epoch,
                                    self.config.launch.seed, parts=self.parts)
        for shards in itertools.islice(batches, start, None):
            yield [(w, *shard) for w, shard in enumerate(shards)]

    def loss(self, model: nn.Module, shard: tuple) -> Tensor:
        """The mean cross-entropy of ``model`` on one worker's shard; a language model carries that worker's LSTM
        state on (detached) to its next step.

        Args:
            model: the worker's model (or its DDP wrapper).
            shard: ``(worker, x, y)``, as :meth:`epoch` gives it.

        Returns:
            The loss, a scalar tensor to backpropagate.
        """
        worker, x, y = shard
        x, y = x.to(self.device), y.to(self.device)  # a real rank moves its own shard only
        if self.data.kind != "lm":
            return F.cross_entropy(model(x), y)
        logits, hidden = model(x, self.hidden.get(worker))
        self.hidden[worker] = detach_hidden(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Score ``model`` on the test set (its first ``config.data.limit_test`` samples), without gradients; the
        model's training mode is restored after.

        Args:
            model: the model to score.

        Returns:
            ``test_loss`` and ``test_accuracy`` for images; ``test_loss``, ``test_perplexity`` and
            ``test_token_accuracy`` for a language model.
        """
        was_training = model.training
        model.eval()
        try:
            limit = self.config.data.limit_test
            if self.data.kind == "lm":
                assert self.data.test is not None  # an lm dataset holds it (Dataset checks)
                rows = batchify(self.data.test[:limit], 10)
                total, correct, count, hidden = 0.0, 0, 0, None
                for [(x, y)] in lm_batches(rows, self.config.data.bptt, 1):
                    x, y = x.to(self.device), y.to(self.device)
                    logits, hidden = model(x, hidden)
                    total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             reduction="sum").item()
                    correct += (logits.argmax(-1) == y).sum().item()
                    count += y.numel()
                loss = total / count
                return {"test_loss": loss, "test_perplexity": math.exp(loss) if loss < 709 else math.inf,
                        "test_token_accuracy": correct / count}
            losses, correct = 0.0, 0
            _, _, x_test, y_test = _image(self.data)
            x_test, y_test = x_test[:limit], y_test[:limit]
            for start in range(0, len(y_test), 1000):
                x, y = x_test[start:start + 1000].to(self.device), y_test[start:start + 1000].to(self.device)
                out = model(x)
                losses += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
            n = len(y_test)
            return {"test_loss": losses / n, "test_accuracy": correct / n}
        finally:
            model.train(was_training)


# ------------------------------------------------------------------ the loop


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """The CPU's RNG state and, training on a GPU, that GPU's (dropout, sampling run there)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Restore :func:`_rng_state`; a GPU's state only onto a GPU (a CUDA run resumed on the CPU continues
    exactly the same only where nothing random ran on the GPU)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _average_into(model: nn.Module, replicas: list[nn.Module]) -> nn.Module:
    """A copy of ``model`` whose parameters and floating-point buffers are the mean of ``replicas``'."""
    out = copy.deepcopy(model)
    tensors = [dict([*m.named_parameters(), *m.named_buffers()]) for m in replicas]
    with torch.no_grad():
        for name, t in [*out.named_parameters(), *out.named_buffers()]:
            if t.is_floating_point():
                t.copy_(torch.stack([r[name].detach() for r in tensors]).mean(0))
    return out


class _Front:
    """The front door a worker trains through (:func:`_front` picks one): one training step, the counters
    and every worker's method state.  Subclasses differ in how a step exchanges."""

    #: what the steps go through (set by the subclasses that count skipped steps here; the DDP hook's is its state)
    door: Simulator | DelayedGradientAveraging | FedAvg

    def __init__(self, model: nn.Module, config: TrainConfig, method: Method, task: Task, rank: int,
                 world: int) -> None:
        self.config, self.task, self.rank, self.world = config, task, rank, world
        self.model, self.given = model, method  # the method as configured; each door makes its own copies
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(config, model, method)
        self.clip_after_average = config.optim.clip_norm if config.exchange.method != "dgc" else None
        self.optimizers = [self.optimizer]
        self.methods: list[Method] = []
        self.dense_per_step = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.skipped_before = 0  # steps skipped for a non-finite gradient before a resume

    def eval_model(self) -> nn.Module:
        """The model an epoch is scored on (every rank calls it): the workers share one model here."""
        return self.model

    def set_epoch(self, epoch: int) -> None:
        for m in self.methods:
            m.set_epoch(epoch)

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def step(self, shards: list[tuple]) -> float:
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite gradient (FedAvg: this rank's local steps), the whole run."""
        return self.skipped_before + self.door.skipped

    @property
    def bytes_sent(self) -> int:
        return self.comm.bytes_sent

    @property
    def comm(self) -> Communicator:
        """This rank's communicator (real ranks)."""
        from ..simulator import Simulator

        assert not isinstance(self.door, Simulator)  # the simulator's workers have one each (_Simulated never asks)
        return self.door.comm

    def my_state(self) -> dict:
        """This rank's method state (what a checkpoint keeps per rank)."""
        return self.methods[0].state_dict()

    def method_states(self) -> list[dict] | None:
        """Every worker's method state (gathered to rank 0 on real ranks, each copied to the CPU first; None on
        the other ranks)."""
        states: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(state_to_cpu(self.my_state()), states, dst=0)
        return states

    def load_method_states(self, states: list[dict]) -> None:
        """This rank's part of every worker's states (their number is checked by :func:`check_checkpoint`),
        onto this rank's device."""
        self.load_my_state(state_to_device(states[self.rank], self.device))

    def load_my_state(self, state: dict) -> None:
        self.methods[0].load_state_dict(state)


class _Simulated(_Front):
    """Every worker in this process: the :class:`~gradcomp.Simulator` (DGC, DGA or FedAvg)."""

    door: Simulator

    def __init__(self, *args) -> None:
        super().__init__(*args)
        from ..simulator import Simulator

        averaging = self.config.averaging
        self.sim = self.door = Simulator(self.model, self.given, self.world, optimizer=self.optimizer,
                                         delay=averaging.dga_delay, correction=averaging.dga_correction,
                                         local_steps=averaging.fedavg_period, nonfinite=self.config.exchange.nonfinite)
        self.methods, self.optimizers = self.sim.methods, self.sim.optimizers

    def step(self, shards: list[tuple]) -> float:
        grads, loss = self.sim.compute_gradients(shards, self.task.loss)
        self.sim.apply(grads)
        if self.clip_after_average is not None:
            for model in self.sim.models:
                nn.utils.clip_grad_norm_(model.parameters(), self.clip_after_average)
        self.sim.optimizer_step()
        return float(loss.detach())

    @property
    def bytes_sent(self) -> int:
        return self.sim.bytes_sent[0]

    def eval_model(self) -> nn.Module:
        """With DGA or FedAvg the workers' models differ (by their own unaveraged steps): scored on their
        average, the model one all-reduce of the weights would give every worker."""
        return self.model if len(self.sim.models) == 1 else _average_into(self.model, self.sim.models)

    def method_states(self) -> list[dict] | None:
        # copied once the Simulator's state is whole: its doors finish their exchanges, moving the methods' memory
        return state_to_cpu(self.sim.state_dict()["methods"])


class _Hooked(_Front):
    """A real rank: DDP with gradcomp's communication hook."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        from torch.nn.parallel import DistributedDataParallel

        from ..ddp_hook import register_ddp_hook

        self.net = DistributedDataParallel(self.model,
                                           device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.state = register_ddp_hook(self.net, self.given, optimizer=self.optimizer,
                                       emulate_latency_ms=self.config.launch.emulate_latency_ms,
                                       nonfinite=self.config.exchange.nonfinite)
        self.methods = [self.state.method]

    def step(self, shards: list[tuple]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task.loss(self.net, shards[self.rank])
        loss.backward()
        if self.state.step_skipped:  # a non-finite gradient on some rank: every rank skips the step
            return float(loss.detach())
        if self.clip_after_average is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_after_average)
        self.optimizer.step()
        return float(loss.detach())

    @property
    def skipped(self) -> int:
        return self.skipped_before + self.state.guard.skipped

    @property
    def comm(self) -> Communicator:
        return self.state.comm


class _Wrapped(_Front):
    """A real rank whose optimizer wrapper does its own exchanges (DGA, FedAvg): every rank's model differs,
    so each rank's model is checkpointed beside its state, under ``key``."""

    door: DelayedGradientAveraging | FedAvg

    def __init__(self, *args) -> None:
        super().__init__(*args)
        from ..dga import DelayedGradientAveraging, FedAvg

        averaging = self.config.averaging
        latency, nonfinite = self.config.launch.emulate_latency_ms, self.config.exchange.nonfinite
        if averaging.fedavg_period is None:
            assert averaging.dga_delay is not None  # _front: one of the two is given
            self.door = DelayedGradientAveraging(self.optimizer, self.model.named_parameters(), averaging.dga_delay,
                                                 self.given, averaging.dga_correction,
                                                 emulate_latency_ms=latency, nonfinite=nonfinite)
            self.key, self.methods = "dga", [self.door.method]
        else:
            self.door = FedAvg(self.optimizer, self.model.named_parameters(), averaging.fedavg_period,
                               delay=averaging.dga_delay or 0, emulate_latency_ms=latency, nonfinite=nonfinite)
            self.key = "fedavg"

    def step(self, shards: list[tuple]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model, shards[self.rank])
        loss.backward()
        self.door.synchronize()
        if self.clip_after_average is not None and not self.door.step_skipped:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_after_average)
        self.door.step_optimizer()
        return float(loss.detach())

    def eval_model(self) -> nn.Module:
        """The workers' average (one all-reduce of the weights into a copy; every rank calls it): each rank's
        model differs from it by its own unaveraged steps, under skewed data a lean to its own classes."""
        out = copy.deepcopy(self.model)
        with torch.no_grad():
            for t in [*out.parameters(), *out.buffers()]:
                if t.is_floating_point():
                    dist.all_reduce(t)
                    t.div_(self.world)
        return out

    def my_state(self) -> dict:
        return {"model": self.model.state_dict(), self.key: self.door.state_dict()}

    def load_my_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.door.load_state_dict(state[self.key])


def _front(model: nn.Module, config: TrainConfig, method: Method, task: Task, rank: int, world: int) -> _Front:
    """The front door for ``config``: simulated workers, an optimizer wrapper (DGA, FedAvg) or the DDP hook."""
    averaging = config.averaging
    kind = _Simulated if config.launch.simulate else _Wrapped if (averaging.dga_delay is not None or
                                                                   averaging.fedavg_period is not None) else _Hooked
    return kind(model, config, method, task, rank, world)


@dataclass
class _Position:
    """Where training is: ``step`` steps into epoch ``epoch`` (= epochs completed), ``steps`` in all, and the
    running sums of the epoch in progress (its losses) and of the run (seconds)."""

    epoch: int = 0
    step: int = 0
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def _checkpoint(cfg: TrainConfig, front: _Front, warmup: LinearLRWarmup | None, pos: _Position
                ) -> dict[str, Any] | None:
    """The checkpoint at ``pos``, CPU tensors only: rank 0 gets it, the other ranks None.  Every rank must call
    it (it gathers each rank's method memory, RNG state and LSTM states, each copied to the CPU first)."""
    states = front.method_states()
    mine = state_to_cpu({"rng": _rng_state(front.device), "hidden": front.task.hidden})
    ranks: list[Any] | None
    if cfg.launch.simulate:
        ranks = [mine]
    else:
        ranks = [None] * front.world if front.rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
    if front.rank != 0:
        return None
    assert ranks is not None  # gathered to rank 0
    here = {"model": front.model.state_dict(), "optimizer": front.optimizer.state_dict()}  # on rank 0's device
    if cfg.launch.simulate:
        assert isinstance(front, _Simulated)  # _front: a simulated run
        here["simulator"] = {k: v for k, v in front.sim.state_dict().items() if k != "methods"}
    ckpt = {**state_to_cpu(here), "methods": states,
            "rng": [r["rng"] for r in ranks], "hidden": [r["hidden"] for r in ranks],
            "epoch": pos.epoch, "epoch_step": pos.step, "epoch_losses": list(pos.losses) if pos.step else [],
            "steps": pos.steps, "seconds": pos.seconds, "bytes_sent": front.bytes_sent, "skipped": front.skipped,
            "lr_warmup": warmup.state_dict() if warmup is not None else {}, "config": cfg.fingerprint()}
    return ckpt


def _restore(ckpt: dict[str, Any], cfg: TrainConfig, front: _Front, warmup: LinearLRWarmup | None) -> _Position:
    """Load a checkpoint written by :func:`_checkpoint` into this rank, its tensors onto this rank's device
    (the model's and the optimizer's own ``load_state_dict`` place theirs); return where training continues."""
    device = front.device
    front.model.load_state_dict(ckpt["model"])
    front.optimizer.load_state_dict(ckpt["optimizer"])
    if warmup is not None:
        warmup.load_state_dict(ckpt["lr_warmup"])
    me = 0 if cfg.launch.simulate else front.rank
    _set_rng_state(ckpt["rng"][me], device)
    front.task.hidden = state_to_device(dict(ckpt["hidden"][me]), device) if "hidden" in ckpt else {}
    if cfg.launch.simulate:  # every worker's method, models and doors (checks the number of workers)
        assert isinstance(front, _Simulated)  # _front: a simulated run
        front.sim.load_state_dict(state_to_device({"methods": ckpt["methods"], **ckpt["simulator"]}, device))
    else:
        front.load_method_states(ckpt["methods"])
        front.comm.bytes_sent = ckpt["bytes_sent"]
    where = sorted({str(t.device) for t in state_tensors(front.my_state()) if t.is_floating_point()})
    log.info("rank %d resumed at step %d, its gradcomp state on %s", front.rank, ckpt["steps"],
             ", ".join(where) or "no device (none yet)")
    front.skipped_before = ckpt.get("skipped", 0)
    return _Position(epoch=ckpt["epoch"], step=ckpt.get("epoch_step", 0), steps=ckpt["steps"],
                     seconds=ckpt["seconds"], losses=list(ckpt.get("epoch_losses", [])))


def check_checkpoint(ckpt: dict[str, Any], cfg: TrainConfig, model: nn.Module, world: int, name: str) -> None:
    """Refuse (``ValueError`` naming the mismatch) a checkpoint that another run wrote: other method or
    settings, other model (parameter names and shapes), other number of workers, or one that lacks a part.

    Args:
        ckpt: the loaded checkpoint.
        cfg: this run's settings.
        model: this run's model (its parameter names and shapes).
        world: this run's number of workers.
        name: what the messages call the checkpoint (its path).

    Raises:
        ValueError: the checkpoint does not fit this run, or holds a bad value (:func:`check_values`).
    """
    missing = [k for k in ("model", "optimizer", "methods", "rng", "epoch", "steps", "seconds") if k not in ckpt]
    if missing:
        raise ValueError(f"{name} is not a gradcomp train checkpoint (it has no {', '.join(map(repr, missing))})")
    saved = ckpt.get("config")  # absent in checkpoints written before it was stored
    if saved is not None and saved.get("method") != cfg.exchange.method:
        raise ValueError(f"{name} was written by method {saved.get('method')!r}, this run uses "
                         f"{cfg.exchange.method!r}")
    theirs, ours = ckpt["model"], model.state_dict()
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        if key not in theirs or key not in ours:
            where = "the checkpoint" if key in theirs else "the model"
            raise ValueError(f"{name} does not fit this run's model: parameter {key!r} is only in {where}")
        if theirs[key].shape != ours[key].shape:
            raise ValueError(f"parameter {key!r} has shape {list(theirs[key].shape)} in {name}, "
                             f"{list(ours[key].shape)} in the model")
    if len(ckpt["methods"]) != world:
        raise ValueError(f"{name} holds the state of {len(ckpt['methods'])} workers, this run has {world}")
    if saved is not None:
        differ = [f"{k}={saved[k]!r} in the checkpoint, {v!r} in this run"
                  for k, v in cfg.fingerprint().items() if k in saved and saved[k] != v]
        if differ:
            raise ValueError(f"{name} was written with other settings: {'; '.join(differ)}")
    check_values(ckpt, cfg, model, name)


def check_values(ckpt: dict[str, Any], cfg: TrainConfig, model: nn.Module, name: str) -> None:
    """Refuse (``ValueError`` naming the entry) a checkpoint holding a NaN or Inf anywhere (weights, optimizer
    or method state: every step would be skipped), or a method state that does not fit the model (names,
    shapes, dtypes; :meth:`~gradcomp.Method.check_state`), before any worker or kernel sees it.

    Args:
        ckpt: the loaded checkpoint.
        cfg: this run's settings (the method its states are checked with).
        model: this run's model.
        name: what the messages call the checkpoint (its path).

    Raises:
        ValueError: a non-finite value, or a worker's method state that does not fit the model.
    """
    bad = [entry for key in ("model", "optimizer", "methods", "simulator") if key in ckpt
           for entry in non_finite_entries(ckpt[key], key)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{name} holds non-finite values (NaN or Inf) in {', '.join(bad[:3])}{more}; refusing "
                         "to train from it")
    method, params = cfg.build_method(steps_per_epoch=1), dict(model.named_parameters())
    for rank, state in enumerate(ckpt["methods"]):
        state = state.get("dga", {}).get("method") if isinstance(state, dict) and "model" in state else state
        if state is not None:  # FedAvg keeps no method state
            try:
                method.check_state(state, params)
            except ValueError as error:
                raise ValueError(f"{name}: worker {rank}'s {error}") from None


def load_checked(rd: RunDir, cfg: TrainConfig, model: nn.Module, world: int) -> dict[str, Any]:
    """``rd``'s checkpoint, checked against this run (:func:`check_checkpoint`).

    Args:
        rd: the run directory holding the checkpoint.
        cfg: this run's settings.
        model: this run's model.
        world: this run's number of workers.

    Returns:
        The checkpoint, as loaded (CPU tensors).
    """
    ckpt = rd.load_checkpoint()
    check_checkpoint(ckpt, cfg, model, world, str(rd.checkpoint_path))
    return ckpt


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training in ``run_dir`` after ``steps`` steps (None: before the first step, or
    not known); :meth:`describe` says how to continue.

    Args:
        steps: the steps rank 0 had finished (None: not known, or none).
        run_dir: the run's directory.
    """

    def __init__(self, steps: int | None, run_dir: str) -> None:
        super().__init__(steps, run_dir)
        self.steps, self.run_dir = steps, run_dir

    def __str__(self) -> str:
        return "interrupted" if self.steps is None else f"interrupted at step {self.steps}"

    def describe(self) -> str:
        """One line: where training stopped and the command that continues it from the last checkpoint
        (whose step is named when it is behind).

        Returns:
            The line, e.g. ``interrupted at step 40; resume with: gradcomp train --resume runs/x``.
        """
        try:
            saved = RunDir(self.run_dir).load_checkpoint()["steps"]
        except (FileNotFoundError, ValueError, KeyError):
            return f"{self}, before the first checkpoint: nothing to resume in {self.run_dir}"
        behind = f" (from its checkpoint at step {saved})" if saved != self.steps else ""
        return f"{self}; resume with: gradcomp train --resume {self.run_dir}{behind}"


class _Interrupt:
    """Where a Ctrl-C stops a run (:func:`_interruptible`): the position training has reached, and the
    interrupt a simulated run holds until its step is done."""

    def __init__(self, run_dir: str, defer: bool) -> None:
        self.run_dir, self.defer = run_dir, defer
        self.position: _Position | None = None
        self.raised: TrainingInterrupted | None = None

    def signal(self) -> None:
        self.raised = TrainingInterrupted(self.position.steps if self.position else None, self.run_dir)
        if not self.defer:
            raise self.raised

    def at_step_boundary(self) -> None:
        """Raise the interrupt a simulated run held (None: no Ctrl-C came)."""
        if self.raised is not None:
            raise self.raised


@contextmanager
def _interruptible(run_dir: str, defer: bool) -> Iterator[_Interrupt]:
    """Within: SIGINT (Ctrl-C) raises :class:`TrainingInterrupted` naming the steps done, once: a second SIGINT
    (gradcomp's launcher forwards it to its workers, which a terminal signals too) is ignored until the previous
    handler is back.  With ``defer`` (a simulated run: no peer waits on this process) it is raised at the next
    step boundary (:meth:`_Interrupt.at_step_boundary`), never from inside the exchange, where a raise in a
    future's callback leaves the future unfinished; real ranks raise at once, and their peers' collectives
    fail when this rank leaves.  In the main thread only."""
    interrupt = _Interrupt(run_dir, defer)
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupt.signal()

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield interrupt
    except Exception:  # raised inside a future's callback, the interrupt comes wrapped in torch's RuntimeError
        if interrupt.raised is not None:
            raise interrupt.raised from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def train_worker(rank: int, world: int, config: dict[str, Any], run_dir: str, resume: bool = False
                 ) -> dict[str, Any] | None:
    """Train on this rank (or, simulated, on every worker); rank 0 returns the summary (or, stopped by
    ``max_steps`` before the end, ``{"stopped_after_step": n}``).  Ctrl-C raises :class:`TrainingInterrupted`.

    Args:
        rank: this process's rank (0 when simulated).
        world: the number of workers.
        config: the run's settings, as ``dataclasses.asdict`` of a :class:`TrainConfig`.
        run_dir: the run directory (rank 0 writes it).
        resume: continue from the directory's checkpoint.

    Returns:
        On rank 0 the summary (or the step ``max_steps`` stopped after); None on the other ranks.
    """
    with _interruptible(run_dir, defer=bool(config["launch"]["simulate"])) as interrupt:
        return _train(rank, world, config, run_dir, resume, interrupt)


def _train(rank: int, world: int, config: dict[str, Any], run_dir: str, resume: bool, interrupt: _Interrupt
           ) -> dict[str, Any] | None:
    cfg = TrainConfig.from_dict(config)
    schedule, output = cfg.schedule, cfg.output
    # the launcher made this rank's GPU the current device (gradcomp.launch); simulated, every worker is on it
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.launch.device == "cuda" else torch.device("cpu")
    torch.manual_seed(cfg.launch.seed)  # the CPU's and every GPU's generator
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, limit_train=cfg.data.limit_train)
    task = Task(data, cfg, world, device)
    # built on the CPU: the same weights
    model = build_model(cfg.model.name, data, bptt=cfg.data.bptt, **cfg.model.options).to(device)
    method = cfg.build_method(steps_per_epoch=task.steps)
    front = _front(model, cfg, method, task, rank, world)
    warmup = LinearLRWarmup(warmup_epochs=schedule.lr_warmup_epochs) if schedule.lr_warmup_epochs > 0 else None
    rd = RunDir(run_dir)
    pos = _restore(load_checked(rd, cfg, model, world), cfg, front, warmup) if resume else _Position()
    interrupt.position = pos
    lead = rank == 0
    metrics: dict[str, Any] = {}
    stop = schedule.max_steps is not None and pos.steps >= schedule.max_steps
    for epoch in range(pos.epoch, schedule.epochs):
        if stop:
            break
        first = pos.step  # > 0: resumed mid-epoch, the method's schedule and the losses so far are restored
        if first == 0:
            front.set_epoch(epoch)
            pos.losses = []
        bar = tqdm(task.epoch(epoch, start=first), total=task.steps, initial=first,
                   desc=f"epoch {epoch + 1}/{schedule.epochs}", disable=not (lead and output.progress), leave=False,
                   dynamic_ncols=True)
        start = time.perf_counter()
        for i, shards in enumerate(bar, start=first):
            if warmup is not None or schedule.lr_milestones:
                front.set_lr(_learning_rate(cfg, warmup, epoch + i / task.steps))
            pos.losses.append(front.step(shards))
            pos.step, pos.steps = i + 1, pos.steps + 1
            interrupt.at_step_boundary()
            if i % 5 == 0:
                bar.set_postfix(loss=f"{pos.losses[-1]:.3f}", MB=f"{front.bytes_sent / 1e6:.2f}",
                                **{k.removeprefix("test_"): f"{metrics[k]:.4g}" for k in ("test_accuracy",
                                   "test_perplexity") if k in metrics})
            end = pos.step == task.steps
            stop = schedule.max_steps is not None and pos.steps >= schedule.max_steps
            if not (end or stop or (output.checkpoint_every and pos.steps % output.checkpoint_every == 0)):
                continue
            pos.seconds += time.perf_counter() - start
            if end:
                losses, pos.epoch, pos.step = pos.losses, epoch + 1, 0
            ckpt = _checkpoint(cfg, front, warmup, pos)
            scored = front.eval_model() if end else None  # a collective with DGA or FedAvg on real ranks
            if lead and end:  # the record first: a crash before the checkpoint leaves a record that resume drops
                assert scored is not None  # scored at the epoch's end
                metrics = {"epoch": epoch + 1, "step": pos.steps, "train_loss": sum(losses) / len(losses),
                           **task.evaluate(scored), **_traffic(front, pos)}
                rd.append_metrics(metrics)
            if lead:
                assert ckpt is not None  # the lead is rank 0, which gets the checkpoint
                rd.save_checkpoint(ckpt)
            if lead and end:
                shown = {k: metrics[k] for k in ("test_accuracy", "test_perplexity") if k in metrics}
                # one line per epoch, also without progress bars
                tqdm.write(f"epoch {epoch + 1}/{schedule.epochs}: loss {metrics['train_loss']:.4f} "
                           + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
                           + f" sent {front.bytes_sent / 1e6:.3f} MB")
            if stop:
                break
            start = time.perf_counter()  # the time to checkpoint (and evaluate) is not training time
    if not lead:
        return None
    if pos.epoch < schedule.epochs:
        return {"stopped_after_step": pos.steps}
    summary = _summary(cfg, model, world, metrics or rd.read_metrics()[-1])  # none: resumed a finished run
    rd.write_summary(summary)
    return summary


def _learning_rate(cfg: TrainConfig, warmup: LinearLRWarmup | None, t: float) -> float:
    """The learning rate at ``t`` epochs: the base rate, warmed up, decayed at each milestone passed."""
    schedule = cfg.schedule
    return cfg.optim.lr * (warmup.factor(t) if warmup is not None else 1.0) \
        * schedule.lr_decay ** sum(t >= m for m in schedule.lr_milestones)


def _traffic(front: _Front, pos: _Position) -> dict[str, Any]:
    """An epoch record's bytes and time: what was sent, what dense fp32 would have sent, seconds per step."""
    dense = front.dense_per_step * pos.steps
    return {"bytes_sent": front.bytes_sent, "dense_bytes": dense,
            "compression_ratio": dense / max(1, front.bytes_sent), "seconds": pos.seconds,
            "time_per_step": pos.seconds / pos.steps, "skipped_steps": front.skipped}


def _summary(cfg: TrainConfig, model: nn.Module, world: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` of a finished run: its settings and the last epoch's ``metrics``."""
    return {"dataset": cfg.data.dataset, "model": cfg.model.name or type(model).__name__.lower(),
            "method": cfg.exchange.method, "method_options": cfg.exchange.options, "label": cfg.output.label,
            "workers": world, "epochs": cfg.schedule.epochs,
            "steps": metrics["step"], "bytes_sent": metrics["bytes_sent"], "dense_bytes": metrics["dense_bytes"],
            "compression_ratio": metrics["compression_ratio"], "time_per_step": metrics["time_per_step"],
            "collective": cfg.collective, "link_gbps": [cfg.output.link_gbps], "simulated": cfg.launch.simulate,
            **{k: metrics[k] for k in ("test_accuracy", "test_perplexity", "test_token_accuracy", "test_loss")
               if k in metrics}}


def _torchrun_restart() -> int:
    """How many times torchrun has restarted this job's workers (0: first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def default_run_dir(cfg: TrainConfig) -> str:
    """``runs/DATASET-METHOD-Nw-STAMP``: STAMP is the time, or under torchrun its run id, the same on every
    rank and every restart (so a restarted job finds its checkpoint).

    Args:
        cfg: the run's settings (dataset, method, workers).

    Returns:
        The directory's path (not created).
    """
    stamp = os.environ.get("TORCHELASTIC_RUN_ID") or datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{cfg.data.dataset}-{cfg.exchange.method}-{cfg.launch.workers}w-{stamp}")


def run(config: TrainConfig | None = None, *, resume: str | None = None, timeout_s: float = 3600.0,
        max_restarts: int = 0, plot: bool = True, echo: Callable[[str], None] = print,
        oversubscribe: bool = False) -> dict[str, Any]:
    """Run a training job (new, or resumed from ``resume``'s checkpoint) and return its summary.

    Inside a ``torchrun`` launch (``RANK`` and ``WORLD_SIZE`` set) this
    process is one rank; when torchrun restarts it (``--max-restarts``) and
    the run directory holds a checkpoint, it resumes from there.  Otherwise
    it starts ``config.launch.workers`` local gloo processes, restarting them all
    from the last checkpoint up to ``max_restarts`` times when one fails, or
    runs the simulator when ``config.launch.simulate``.  ``timeout_s`` is how long a
    rank waits for a peer (to join, inside a collective) before it fails.
    A finished run's curves are drawn to ``curves.png`` unless ``plot`` is
    False (a study of many runs draws its own figures).  A run stopped by
    ``max_steps`` returns ``{"stopped_after_step": n}``.

    Resumed, the run keeps its ``config.json``; only :data:`RESUMABLE` come
    from ``config`` (when given), each change logged in one line and recorded
    in ``config.json``.  A run directory without a checkpoint (the run failed
    before its first) is started again from step 0 with its config.

    Everything that can fail is checked before the run directory is made or
    changed (``ValueError`` naming the value): the data fits the batch, the
    device exists, the directory is writable, a torchrun-style rank 0's
    ``MASTER_PORT`` is free, and at most :data:`MAX_WORKERS_PER_CPU` worker
    processes per CPU core (``oversubscribe=True`` lifts that).  Temporary
    files that a killed run left in the directory are removed.

    Args:
        config: the run's settings (None: the defaults); resumed, only its :data:`RESUMABLE` settings count.
        resume: a run directory to continue from its checkpoint.
        timeout_s: how long a rank waits for a peer, in seconds.
        max_restarts: how many times the local workers are started again from the last checkpoint after a
            failure (0 under torchrun and simulated).
        plot: draw ``curves.png`` once the run finishes.
        echo: where the summary and the resume hint are printed.
        oversubscribe: allow more than :data:`MAX_WORKERS_PER_CPU` worker processes per CPU core.

    Returns:
        The summary of the finished run, ``{"stopped_after_step": n}`` when ``max_steps`` stopped it, or ``{}``
        on a rank other than 0.

    Raises:
        ValueError: a setting, the data, the device, the run directory or the checkpoint does not allow the run.
        TrainingInterrupted: Ctrl-C stopped it.
        gradcomp.launch.WorkerError: a local worker failed (after ``max_restarts`` restarts).

    Example:
        Four simulated workers, DGC (the default method), one epoch of 256 digits (two steps), in a run directory
        of its own:

        >>> import tempfile
        >>> from gradcomp.train.config import Data, Launch, Output, Schedule, TrainConfig
        >>> from gradcomp.train.loop import run
        >>> config = TrainConfig(data=Data(limit_train=256), schedule=Schedule(epochs=1),
        ...                      launch=Launch(workers=4, simulate=True),
        ...                      output=Output(run_dir=tempfile.mkdtemp() + "/run", progress=False))
        >>> summary = run(config, plot=False, echo=lambda line: None)
        epoch 1/1: loss ... test_accuracy ... sent ... MB
        >>> summary["method"], summary["workers"], summary["steps"], summary["bytes_sent"] < summary["dense_bytes"]
        ('dgc', 4, 2, True)
    """
    check_range("run", "timeout_s", timeout_s, 0.0, math.inf, low_open=True, high_open=True)
    check_int("run", "max_restarts", max_restarts, 0)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    start = _settle(config, resume, max_restarts, under_torchrun)
    cfg, run_dir = start.cfg, start.run_dir
    lead = not under_torchrun or int(os.environ["RANK"]) == 0
    _preflight(cfg, run_dir, under_torchrun, oversubscribe, lead)
    _prepare(start, lead)
    config_dict = dataclasses.asdict(cfg)
    if under_torchrun:
        summary = _torchrun_rank(config_dict, run_dir, start.resume, timeout_s, cfg.launch.device)
    elif cfg.launch.simulate:
        summary = train_worker(0, cfg.launch.workers, config_dict, run_dir, start.resume)
    else:
        summary = _spawn(config_dict, run_dir, start.resume, timeout_s, max_restarts, echo)
    if summary and "stopped_after_step" in summary:
        echo(f"stopped after step {summary['stopped_after_step']} (max_steps); continue with: "
             f"gradcomp train --resume {run_dir}")
    elif summary is not None:
        if plot:
            plot_run(run_dir)
        echo(format_summary(summary, link_gbps=cfg.output.link_gbps))
        echo(f"run directory: {run_dir}")
    return summary or {}


@dataclass(frozen=True)
class _Start:
    """Where and how :func:`run` starts: the settled config and its run directory."""

    cfg: TrainConfig
    run_dir: str
    resume: bool  # continue from the checkpoint in run_dir
    saved: dict[str, Any]  # run_dir's config.json, when it has one
    restarted: bool  # run_dir exists already (a torchrun restart, or a run that stopped before its checkpoint)


def _settle(config: TrainConfig | None, resume: str | None, max_restarts: int, under_torchrun: bool) -> _Start:
    """The config and run directory of :func:`run`: a resumed run's saved config with its :data:`RESUMABLE`
    changes, the world size torchrun gives, and the device resolved (``ValueError`` when it is absent)."""
    cfg = config or TrainConfig()
    if max_restarts and (under_torchrun or cfg.launch.simulate):
        raise ValueError(f"max_restarts={max_restarts} restarts the worker processes gradcomp starts itself; "
                         + ("under torchrun use torchrun's --max-restarts" if under_torchrun
                            else "the simulator (simulate=True) has none"))
    restarted = under_torchrun and _torchrun_restart() > 0
    if resume is None and restarted:
        run_dir = cfg.output.run_dir or default_run_dir(cfg)
        if RunDir(run_dir).has_checkpoint():
            log.warning("torchrun restart %d: resuming from the checkpoint in %s", _torchrun_restart(), run_dir)
            resume = run_dir
    saved: dict[str, Any] = {}
    if resume is not None:
        rd = resumable(resume)
        saved = rd.read_config()
        changes = {k: v for k, v in config.flat().items() if k in RESUMABLE} if config is not None else {}
        cfg = _saved_config(rd, saved, run_dir=str(resume), **changes)
        run_dir = str(resume)
        if not rd.has_checkpoint():
            log.warning("%s holds no checkpoint (its run stopped before the first): starting it again from step 0 "
                        "with its config", run_dir)
            resume = None
            restarted = True  # into the directory that exists
    else:
        run_dir = cfg.output.run_dir or default_run_dir(cfg)
        cfg = cfg.replace(output={"run_dir": run_dir})
    if under_torchrun:
        cfg = cfg.replace(launch={"workers": int(os.environ["WORLD_SIZE"])})
    local_ranks = 1 if cfg.launch.simulate else int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if under_torchrun \
        else cfg.launch.workers
    try:  # "cuda" where it is absent fails here, before anything is written
        cfg = cfg.replace(launch={"device": device_kind(cfg.launch.device, local_ranks)})
    except ValueError as error:
        raise ValueError(f"TrainConfig.launch.{error}") from None
    return _Start(cfg, run_dir, resume is not None, saved, restarted)


def _prepare(start: _Start, lead: bool) -> None:
    """Check the data and the checkpoint (``ValueError``), then make or mend the run directory (rank 0 only):
    a resumed run's metrics are cut back to its checkpoint, a new run's config is written."""
    cfg, run_dir = start.cfg, start.run_dir
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, limit_train=cfg.data.limit_train)  # a missing dataset
    Task(data, cfg, cfg.launch.workers)  # a batch larger than the data
    if start.resume:  # a foreign or damaged checkpoint fails here, before anything is written
        rd = RunDir(run_dir)
        model = build_model(cfg.model.name, data, bptt=cfg.data.bptt, **cfg.model.options)
        done = load_checked(rd, cfg, model, cfg.launch.workers)["epoch"]
        if lead:
            rd.remove_temporaries()
            rd.truncate_metrics(done)
            _record_changes(rd, start.saved, cfg)
    elif lead:  # a torchrun restart before the first checkpoint starts again in the same directory
        fresh = RunDir.create(run_dir, exist_ok=start.restarted)
        fresh.remove_temporaries()
        if start.saved:
            _record_changes(fresh, start.saved, cfg)
        else:
            fresh.write_config(dataclasses.asdict(cfg))
        fresh.truncate_metrics(0)


def _torchrun_rank(config: dict[str, Any], run_dir: str, resume: bool, timeout_s: float,
                   device: DeviceRequest) -> dict[str, Any] | None:
    """Train as the rank torchrun started: join its process group, wait for rank 0's run directory, train, and
    leave the group (not after Ctrl-C: torchrun signals every rank, so there is no final barrier to meet)."""
    from ..launch import init_from_env, shutdown

    rank, world = init_from_env(timeout_s=timeout_s, device=device)
    dist.barrier()  # rank 0 has created the run directory
    try:
        summary = train_worker(rank, world, config, run_dir, resume)
    except KeyboardInterrupt:
        raise
    except BaseException:
        shutdown()
        raise
    shutdown()
    return summary


def resumable(run_dir: str | os.PathLike[str]) -> RunDir:
    """``run_dir`` as a :class:`RunDir` to resume, or a one-line ``ValueError`` saying why it is not: missing,
    not a directory, no ``config.json``, ``checkpoint.pt`` not a file, or ``checkpoint.pt`` missing beside a
    ``checkpoint.prev.pt`` (the message says how to resume from that one).  A directory with a config and no
    checkpoint at all is resumable: its run stopped before its first checkpoint and starts again.

    Args:
        run_dir: the run directory.

    Returns:
        The run directory, checked.

    Raises:
        ValueError: it cannot be resumed (why, in one line).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"cannot resume {str(run_dir)!r}: " + ("it is not a directory" if path.exists()
                                                                 else "no such directory"))
    rd = RunDir(path)
    if not rd.config_path.is_file():
        raise ValueError(f"cannot resume {str(run_dir)!r}: it has no config.json (not a gradcomp train run "
                         f"directory, or its config was removed)")
    ckpt, prev = rd.checkpoint_path, rd.prev_checkpoint_path
    if ckpt.exists() and not ckpt.is_file():
        raise ValueError(f"cannot resume {str(run_dir)!r}: {str(ckpt)!r} is not a file")
    if not ckpt.exists() and prev.is_file():
        raise ValueError(f"cannot resume {str(run_dir)!r}: {str(ckpt)!r} is missing; the checkpoint saved before "
                         f"it is kept: to resume from it, move {str(prev)!r} to {str(ckpt)!r}")
    return rd


def _saved_config(rd: RunDir, saved: dict[str, Any], **changes: Any) -> TrainConfig:
    """The run's config as saved in ``rd``, with ``changes``; a config that is not a TrainConfig's is a
    ``ValueError`` naming the file."""
    try:
        return TrainConfig.from_dict({**flat_settings(saved), **changes})
    except TypeError as error:
        raise ValueError(f"{str(rd.config_path)!r} is not a gradcomp train config: {error}") from None


def resume_config(run_dir: str | os.PathLike[str], **changes: Any) -> TrainConfig:
    """The config that resuming ``run_dir`` trains with: its ``config.json``, with ``changes`` to
    :data:`RESUMABLE` settings only (another is a ``ValueError`` naming it).  ``max_steps`` is a stop for one
    invocation: without a new one the resumed run trains to its end.  See :func:`resumable` for the checks.

    Args:
        run_dir: the run directory.
        **changes: new values of :data:`RESUMABLE` settings, by flat name.

    Returns:
        The config, with ``run_dir`` set and ``max_steps`` None unless changed.

    Raises:
        ValueError: a change to a setting that is not resumable, a directory that cannot be resumed, or a
            ``config.json`` that is not a TrainConfig's.
    """
    other = sorted(set(changes) - set(RESUMABLE))
    if other:
        raise ValueError(f"resuming {str(run_dir)!r} keeps its settings: {', '.join(other)} may not change (only "
                         f"{', '.join(RESUMABLE)} may)")
    rd = resumable(run_dir)
    return _saved_config(rd, rd.read_config(), run_dir=str(run_dir), **{"max_steps": None, **changes})


def _record_changes(rd: RunDir, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Say in one line each what a resume changes in the run's config (:data:`RESUMABLE` only), and write
    the config that now holds to ``config.json``."""
    saved, now = flat_settings(saved), cfg.flat()
    for k in RESUMABLE:
        if k in saved and saved[k] != now[k]:  # a setting added since the run started is not a change
            log.warning("%s: %s changes from %r to %r on resume (recorded in config.json)", rd.path, k,
                        saved.get(k), now[k])
    rd.write_config(dataclasses.asdict(cfg))


#: worker processes per CPU core that :func:`run` starts at most without ``oversubscribe=True`` (at least 8)
MAX_WORKERS_PER_CPU = 4


def _preflight(cfg: TrainConfig, run_dir: str, under_torchrun: bool, oversubscribe: bool, lead: bool) -> None:
    """The checks of :func:`run` that need no data, each a one-line ``ValueError`` before anything is written."""
    workers = cfg.launch.workers
    if not (under_torchrun or cfg.launch.simulate or oversubscribe):
        cores = os.cpu_count() or 1
        limit = max(8, MAX_WORKERS_PER_CPU * cores)
        if workers > limit:
            raise ValueError(f"TrainConfig.launch.workers={workers} would start {workers} processes on {cores} CPU "
                             f"core(s), more than {limit} ({MAX_WORKERS_PER_CPU} per core): use simulate (--simulate) "
                             f"or fewer workers, or allow it (--allow-oversubscribe)")
    if under_torchrun:
        from ..launch import check_master_port

        check_master_port()
    if not lead:
        return
    path = Path(run_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path and not path.is_dir():
        raise ValueError(f"run directory {run_dir!r} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(existing) else "permission denied"
        where = "" if existing == path else f" (to hold run directory {run_dir!r})"
        raise ValueError(f"cannot write to {str(existing)!r}{where}: {why}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _spawn(config: dict[str, Any], run_dir: str, resume: bool, timeout_s: float, max_restarts: int,
           echo: Callable[[str], None]) -> dict[str, Any]:
    """Start the local workers; when one fails, start them all again from the last checkpoint, up to
    ``max_restarts`` times (like ``torchrun --max-restarts``)."""
    from ..launch import WorkerError, WorkerInterrupted, spawn

    rd = RunDir(run_dir)
    for attempt in range(max_restarts + 1):
        try:
            return spawn(train_worker, config["launch"]["workers"], config, run_dir, resume,
                         device=config["launch"]["device"], timeout_s=timeout_s, crash_log=rd.path / WORKER_ERRORS)[0]
        except KeyboardInterrupt as stop:  # rank 0 says where it stopped (WorkerInterrupted), if it had started
            reports = stop.reports if isinstance(stop, WorkerInterrupted) else {}
            found = re.search(r"TrainingInterrupted: interrupted at step (\d+)", reports.get(0, ""))
            raise TrainingInterrupted(int(found[1]) if found else None, run_dir) from None
        except WorkerError as error:
            errors = _log_worker_error(rd, error, attempt)
            if attempt == max_restarts:
                error.summary += f" (every rank's report and traceback: {errors})"
                raise
            resume = rd.has_checkpoint()
            done = rd.load_checkpoint() if resume else {"epoch": 0, "steps": 0}
            rd.remove_temporaries()  # a rank 0 killed while writing a checkpoint leaves its temporary file
            rd.truncate_metrics(done["epoch"])
            echo(f"{error.summary}; restart {attempt + 1} of {max_restarts} from "
                 + (f"the checkpoint at step {done['steps']}" if resume else "the start (no checkpoint yet)")
                 + f" (tracebacks: {errors})")
    raise AssertionError("unreachable")


#: The file in a run directory that keeps every failed attempt's full worker report (tracebacks included).
WORKER_ERRORS = "worker-errors.log"


def _log_worker_error(rd: RunDir, error: Exception, attempt: int) -> Path:
    """Append ``error``'s whole report to the run directory's :data:`WORKER_ERRORS`; return its path."""
    path = rd.path / WORKER_ERRORS
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== attempt {attempt + 1}, {datetime.now().isoformat(timespec='seconds')}: {error}\n\n")
    return path
