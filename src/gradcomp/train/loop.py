"""``gradcomp train``: one data-parallel training job with a chosen method.

The same loop runs in three ways:

* ``workers`` local processes it starts itself (gloo, :func:`gradcomp.launch.spawn`),
* one rank of a ``torchrun`` launch (``RANK``/``WORLD_SIZE`` in the environment),
* the :class:`~gradcomp.Simulator` (``simulate=True``): N virtual workers in one process.

Real ranks train a DDP model with gradcomp's communication hook; rank 0
evaluates, writes the run directory (config, metrics, checkpoint, plot) and
returns the summary.  Every epoch ends with a checkpoint holding the model,
the optimizer, every rank's method memory and the RNG states, so
``resume`` continues exactly where the last epoch ended.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from ..compressors.base import available, check_int, check_range, get
from ..method import DGC, Method
from ..schedule import LinearLRWarmup
from .data import (DATASETS, PARTITIONS, Dataset, batchify, image_batches, lm_batches, lm_steps, load_dataset,
                   skewed_parts, speaker_grouped, steps_per_epoch)
from .models import DEFAULT_MODEL, MODELS, build_model, detach_hidden
from .report import RunDir, format_summary, plot_run

__all__ = ["TrainConfig", "run", "train_worker"]

log = logging.getLogger(__name__)

#: Methods whose payloads are summed with an all-reduce (the rest are all-gathered).
ALLREDUCE_METHODS = {"none", "fp16", "powersgd", "randomk"}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run depends on; saved as the run's ``config.json``."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    #: options of the model, overriding its per-dataset defaults (``build_model(model, data, **model_options)``)
    model_options: dict[str, Any] = field(default_factory=dict)
    method: str = "dgc"
    #: compressor options (``gradcomp.get(method, **options)``) or DGC's options for ``method="dgc"``
    options: dict[str, Any] = field(default_factory=dict)
    workers: int = 4
    epochs: int = 20
    batch_size: int = 32  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_warmup_epochs: float = 0.0
    #: multiply the learning rate by ``lr_decay`` at each of these epochs (step decay, like ``MultiStepLR``)
    lr_milestones: list[int] = field(default_factory=list)
    lr_decay: float = 0.1
    clip_norm: float | None = None
    bptt: int = 35
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    simulate: bool = False
    #: delayed gradient averaging: apply each step's average this many steps later (None: synchronous)
    dga_delay: int | None = None
    dga_correction: bool = True
    #: FedAvg / local SGD instead of averaging gradients: average the weights every this many steps
    fedavg_period: int | None = None
    #: how the training data is split among workers: "iid" or "skewed" (see :class:`Task`)
    partition: str = "iid"
    #: experiments only: each collective completes no earlier than this many ms after it is issued
    emulate_latency_ms: float = 0.0
    link_gbps: float = 1.0
    run_dir: str | None = None
    progress: bool = True
    label: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"TrainConfig.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.method not in available():
            raise ValueError(f"TrainConfig.method must be one of {', '.join(available())}, got {self.method!r}")
        check_int("TrainConfig", "workers", self.workers, 1)
        check_int("TrainConfig", "epochs", self.epochs, 1)
        check_int("TrainConfig", "batch_size", self.batch_size, 1)
        check_int("TrainConfig", "bptt", self.bptt, 1)
        check_int("TrainConfig", "seed", self.seed, 0)
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                check_int("TrainConfig", name, getattr(self, name), 1)
        check_range("TrainConfig", "lr", self.lr, 0.0, math.inf, low_open=True, high_open=True)
        check_range("TrainConfig", "momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("TrainConfig", "weight_decay", self.weight_decay, 0.0, math.inf, high_open=True)
        check_range("TrainConfig", "lr_warmup_epochs", self.lr_warmup_epochs, 0.0, math.inf, high_open=True)
        check_range("TrainConfig", "lr_decay", self.lr_decay, 0.0, 1.0, low_open=True)
        self.lr_milestones = list(self.lr_milestones)
        for m in self.lr_milestones:
            check_int("TrainConfig", "lr_milestones", m, 1)
        if self.lr_milestones != sorted(set(self.lr_milestones)):
            raise ValueError(f"TrainConfig.lr_milestones must increase strictly, got {self.lr_milestones}")
        check_range("TrainConfig", "link_gbps", self.link_gbps, 0.0, math.inf, low_open=True, high_open=True)
        if self.dga_delay is not None:
            check_int("TrainConfig", "dga_delay", self.dga_delay, 0)
            if self.clip_norm is not None and self.method != "dgc":
                raise ValueError("TrainConfig.clip_norm with dga_delay: only DGC clips (locally); the delayed "
                                 "average is not clipped")
        elif not self.dga_correction:
            raise ValueError("TrainConfig.dga_correction=False needs dga_delay")
        if self.fedavg_period is not None:
            check_int("TrainConfig", "fedavg_period", self.fedavg_period, 1)
            if self.dga_delay is not None or self.method != "none":
                raise ValueError("TrainConfig.fedavg_period averages weights, dense: it takes method='none' and no "
                                 "dga_delay")
            if self.clip_norm is not None:
                raise ValueError("TrainConfig.clip_norm with fedavg_period: there is no averaged gradient to clip")
        if self.model_options:
            model = self.model or DEFAULT_MODEL[self.dataset]
            unknown = sorted(set(self.model_options) - set(MODELS[model].options())) if model in MODELS else []
            if unknown:
                raise ValueError(f"TrainConfig.model_options: {model!r} has no option {', '.join(map(repr, unknown))} "
                                 f"(it takes {', '.join(MODELS[model].options())})")
        if self.partition not in PARTITIONS:
            raise ValueError(f"TrainConfig.partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.partition == "skewed" and self.dataset == "ptb":
            raise ValueError("TrainConfig.partition='skewed' needs classes (images) or speakers (shakespeare); "
                             "ptb has neither")
        check_range("TrainConfig", "emulate_latency_ms", self.emulate_latency_ms, 0.0, math.inf, high_open=True)
        if self.emulate_latency_ms and self.simulate:
            raise ValueError("TrainConfig.emulate_latency_ms needs real processes (the simulator has no network)")
        if self.clip_norm is not None:
            check_range("TrainConfig", "clip_norm", self.clip_norm, 0.0, math.inf, low_open=True, high_open=True)
        self.build_method(steps_per_epoch=1)  # options are checked now, not in a worker

    def build_method(self, steps_per_epoch: int) -> Method:
        """The method: DGC (momentum, clipping and warm-up its own) or a compressor with its memory."""
        if self.method == "dgc":
            opts = {"momentum": self.momentum, "clip_norm": self.clip_norm, **self.options}
            try:
                return DGC(steps_per_epoch=steps_per_epoch, **opts)
            except TypeError as error:
                fields = [f.name for f in dataclasses.fields(DGC) if f.name != "steps_per_epoch"]
                raise ValueError(f"bad DGC option ({error}); DGC's options are: {', '.join(fields)}") from None
        return Method(get(self.method, **self.options))

    @property
    def collective(self) -> str:
        return "allreduce" if self.method in ALLREDUCE_METHODS else "allgather"

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}({opts})" if opts else self.method


# ------------------------------------------------------------------ data steps


class Task:
    """Loss, batches and evaluation for one kind of dataset.

    ``config.partition="skewed"`` gives each worker its own part of the training data:
    :func:`~gradcomp.train.data.skewed_parts` (a few classes each) for images,
    :func:`~gradcomp.train.data.speaker_grouped` (a few speakers each) for Tiny Shakespeare.
    """

    def __init__(self, data: Dataset, config: TrainConfig, workers: int) -> None:
        self.data, self.config, self.workers = data, config, workers
        self.global_batch = config.batch_size * workers
        skewed = config.partition == "skewed"
        self.parts = skewed_parts(data.y_train, workers, config.seed) if skewed and data.kind != "lm" else None
        if data.kind == "lm":  # TrainConfig allows "skewed" only where there are classes or speakers
            train = speaker_grouped(data.train, data.vocab, workers) if skewed else data.train
            self.train_rows = batchify(train, self.global_batch)
            self.steps = lm_steps(self.train_rows, config.bptt)
            self.hidden: dict[int, Any] = {}
        elif self.parts is not None:
            self.steps = min(len(p) for p in self.parts) // config.batch_size
        else:
            self.steps = steps_per_epoch(len(data.y_train), self.global_batch)
            if self.steps == 0:
                raise ValueError(f"a global batch of {self.global_batch} is larger than the "
                                 f"{len(data.y_train)} training samples; lower batch_size or workers")

    def epoch(self, epoch: int) -> Any:
        """Per step: one shard per worker, each tagged with its worker index."""
        if self.data.kind == "lm":
            self.hidden = {}
            batches = lm_batches(self.train_rows, self.config.bptt, self.workers)
        else:
            batches = image_batches(self.data.x_train, self.data.y_train, self.global_batch, self.workers, epoch,
                                    self.config.seed, parts=self.parts)
        for shards in batches:
            yield [(w, *shard) for w, shard in enumerate(shards)]

    def loss(self, model: nn.Module, shard: tuple) -> Tensor:
        worker, x, y = shard
        if self.data.kind != "lm":
            return F.cross_entropy(model(x), y)
        logits, hidden = model(x, self.hidden.get(worker))
        self.hidden[worker] = detach_hidden(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            limit = self.config.limit_test
            if self.data.kind == "lm":
                rows = batchify(self.data.test[:limit], 10)
                total, count, hidden = 0.0, 0, None
                for [(x, y)] in lm_batches(rows, self.config.bptt, 1):
                    logits, hidden = model(x, hidden)
                    total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             reduction="sum").item()
                    count += y.numel()
                loss = total / count
                return {"test_loss": loss, "test_perplexity": math.exp(loss) if loss < 709 else math.inf}
            losses, correct = 0.0, 0
            x_test, y_test = self.data.x_test[:limit], self.data.y_test[:limit]
            for start in range(0, len(y_test), 1000):
                x, y = x_test[start:start + 1000], y_test[start:start + 1000]
                out = model(x)
                losses += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
            n = len(y_test)
            return {"test_loss": losses / n, "test_accuracy": correct / n}
        finally:
            model.train(was_training)


# ------------------------------------------------------------------ the loop


def _rng_state() -> dict[str, Tensor]:
    return {"torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["torch"])


class _Front:
    """The front door a worker trains through: DDP + hook on a real rank, or the simulator."""

    def __init__(self, model: nn.Module, config: TrainConfig, method: Method, task: Task, rank: int,
                 world: int) -> None:
        self.config, self.task, self.rank, self.world = config, task, rank, world
        momentum = 0.0 if method.owns_momentum else config.momentum
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=momentum,
                                         weight_decay=config.weight_decay)
        self.clip_after_average = config.clip_norm if config.method != "dgc" else None
        #: DGA or FedAvg on a real rank: an optimizer wrapper that does its own exchanges (every rank's model
        #: differs, so each rank's model is checkpointed beside its state, under ``wrapper_key``)
        self.wrapper, self.wrapper_key = None, None
        if config.simulate:
            from ..simulator import Simulator

            self.sim = Simulator(model, method, world, optimizer=self.optimizer, delay=config.dga_delay,
                                 correction=config.dga_correction, local_steps=config.fedavg_period)
            self.methods = self.sim.methods
        elif config.dga_delay is not None:
            from ..dga import DelayedGradientAveraging

            self.wrapper = DelayedGradientAveraging(self.optimizer, model.named_parameters(), config.dga_delay,
                                                    method, config.dga_correction,
                                                    emulate_latency_ms=config.emulate_latency_ms)
            self.wrapper_key, self.methods = "dga", [self.wrapper.method]
        elif config.fedavg_period is not None:
            from ..dga import FedAvg

            self.wrapper = FedAvg(self.optimizer, model.named_parameters(), config.fedavg_period,
                                  emulate_latency_ms=config.emulate_latency_ms)
            self.wrapper_key, self.methods = "fedavg", []
        else:
            from torch.nn.parallel import DistributedDataParallel

            from ..ddp_hook import register_ddp_hook

            self.net = DistributedDataParallel(model)
            self.state = register_ddp_hook(self.net, method, emulate_latency_ms=config.emulate_latency_ms)
            self.methods = [self.state.method]
        self.dense_per_step = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)

    def set_epoch(self, epoch: int) -> None:
        for m in self.methods:
            m.set_epoch(epoch)

    def set_lr(self, lr: float) -> None:
        for optimizer in self.sim.optimizers if self.config.simulate else [self.optimizer]:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def step(self, shards: list[tuple]) -> float:
        if self.config.simulate:
            grads, loss = self.sim.compute_gradients(shards, self.task.loss)
            self.sim.apply(grads)
            if self.clip_after_average is not None:
                for model in self.sim.models:
                    nn.utils.clip_grad_norm_(model.parameters(), self.clip_after_average)
            self.sim.optimizer_step()
            return float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if self.wrapper is not None:
            loss = self.task.loss(self.model, shards[self.rank])
            loss.backward()
            self.wrapper.step()
            return float(loss.detach())
        loss = self.task.loss(self.net, shards[self.rank])
        loss.backward()
        if self.clip_after_average is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_after_average)
        self.optimizer.step()
        return float(loss.detach())

    @property
    def comm(self):
        """This rank's communicator (real ranks)."""
        return self.wrapper.comm if self.wrapper is not None else self.state.comm

    @property
    def bytes_sent(self) -> int:
        return self.sim.bytes_sent[0] if self.config.simulate else self.comm.bytes_sent

    def method_states(self) -> list[dict]:
        """Every worker's method state (gathered to rank 0 on real ranks)."""
        if self.config.simulate:
            return [m.state_dict() for m in self.methods]
        states = [None] * self.world if self.rank == 0 else None
        mine = self.methods[0].state_dict() if self.wrapper is None else \
            {"model": self.model.state_dict(), self.wrapper_key: self.wrapper.state_dict()}
        dist.gather_object(mine, states, dst=0)
        return states

    def load_method_states(self, states: list[dict]) -> None:
        if len(states) != self.world:
            raise ValueError(f"the checkpoint holds {len(states)} workers' method state, this run has {self.world}")
        if self.config.simulate:
            for m, s in zip(self.methods, states):
                m.load_state_dict(s)
        elif self.wrapper is not None:
            self.model.load_state_dict(states[self.rank]["model"])
            self.wrapper.load_state_dict(states[self.rank][self.wrapper_key])
        else:
            self.methods[0].load_state_dict(states[self.rank])


def train_worker(rank: int, world: int, config: dict[str, Any], run_dir: str, resume: bool = False
                 ) -> dict[str, Any] | None:
    """Train on this rank (or, simulated, on every worker); rank 0 returns the summary."""
    cfg = TrainConfig(**config)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train)
    task = Task(data, cfg, world)
    model = build_model(cfg.model, data, **cfg.model_options)
    method = cfg.build_method(steps_per_epoch=task.steps)
    front = _Front(model, cfg, method, task, rank, world)
    warmup = LinearLRWarmup(warmup_epochs=cfg.lr_warmup_epochs) if cfg.lr_warmup_epochs > 0 else None
    rd = RunDir(run_dir)
    start_epoch, elapsed, steps_done = 0, 0.0, 0
    if resume:
        ckpt = rd.load_checkpoint()
        model.load_state_dict(ckpt["model"])
        front.optimizer.load_state_dict(ckpt["optimizer"])
        front.load_method_states(ckpt["methods"])
        if warmup is not None:
            warmup.load_state_dict(ckpt["lr_warmup"])
        _set_rng_state(ckpt["rng"][rank if not cfg.simulate else 0])
        start_epoch, elapsed, steps_done = ckpt["epoch"], ckpt["seconds"], ckpt["steps"]
        if cfg.simulate:
            front.sim.load_state_dict({"methods": ckpt["methods"], **ckpt["simulator"]})
        else:
            front.comm.bytes_sent = ckpt["bytes_sent"]
    lead = rank == 0
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        front.set_epoch(epoch)
        bar = tqdm(task.epoch(epoch), total=task.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (lead and cfg.progress), leave=False, dynamic_ncols=True)
        losses = []
        start = time.perf_counter()
        for i, shards in enumerate(bar):
            if warmup is not None or cfg.lr_milestones:
                t = epoch + i / task.steps
                lr = cfg.lr * (warmup.factor(t) if warmup is not None else 1.0) \
                    * cfg.lr_decay ** sum(t >= m for m in cfg.lr_milestones)
                front.set_lr(lr)
            losses.append(front.step(shards))
            if i % 5 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", MB=f"{front.bytes_sent / 1e6:.2f}",
                                **{k.removeprefix("test_"): f"{metrics[k]:.4g}" for k in ("test_accuracy",
                                   "test_perplexity") if k in metrics})
        elapsed += time.perf_counter() - start
        steps_done += task.steps
        states = front.method_states()
        rngs = [None] * world if lead and not cfg.simulate else None
        if not cfg.simulate:
            dist.gather_object(_rng_state(), rngs, dst=0)
        else:
            rngs = [_rng_state()]
        if lead:
            metrics = {"epoch": epoch + 1, "step": steps_done, "train_loss": sum(losses) / len(losses),
                       **task.evaluate(model), "bytes_sent": front.bytes_sent,
                       "dense_bytes": front.dense_per_step * steps_done,
                       "compression_ratio": front.dense_per_step * steps_done / max(1, front.bytes_sent),
                       "seconds": elapsed, "time_per_step": elapsed / steps_done}
            ckpt = {"model": model.state_dict(), "optimizer": front.optimizer.state_dict(), "methods": states,
                    "rng": rngs, "epoch": epoch + 1, "steps": steps_done, "seconds": elapsed,
                    "bytes_sent": front.bytes_sent,
                    "lr_warmup": warmup.state_dict() if warmup is not None else {}}
            if cfg.simulate:
                ckpt["simulator"] = {k: v for k, v in front.sim.state_dict().items() if k != "methods"}
            rd.save_checkpoint(ckpt)
            rd.append_metrics(metrics)
            shown = {k: metrics[k] for k in ("test_accuracy", "test_perplexity") if k in metrics}
            # one line per epoch, also without progress bars
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.4f} "
                       + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
                       + f" sent {front.bytes_sent / 1e6:.3f} MB")
    if not lead:
        return None
    if not metrics:  # resumed a finished run
        metrics = rd.read_metrics()[-1]
    summary = {"dataset": cfg.dataset, "model": cfg.model or type(model).__name__.lower(), "method": cfg.method,
               "method_options": cfg.options, "label": cfg.label, "workers": world, "epochs": cfg.epochs,
               "steps": metrics["step"], "bytes_sent": metrics["bytes_sent"], "dense_bytes": metrics["dense_bytes"],
               "compression_ratio": metrics["compression_ratio"], "time_per_step": metrics["time_per_step"],
               "collective": cfg.collective, "link_gbps": [cfg.link_gbps], "simulated": cfg.simulate,
               **{k: metrics[k] for k in ("test_accuracy", "test_perplexity", "test_loss") if k in metrics}}
    rd.write_summary(summary)
    plot_run(rd)
    return summary


def default_run_dir(cfg: TrainConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{cfg.dataset}-{cfg.method}-{cfg.workers}w-{stamp}")


def run(config: TrainConfig | None = None, *, resume: str | None = None, timeout_s: float = 3600.0,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a training job (new, or resumed from ``resume``'s checkpoint) and return its summary.

    Inside a ``torchrun`` launch (``RANK`` and ``WORLD_SIZE`` set) this
    process is one rank; otherwise it starts ``config.workers`` local gloo
    processes, or runs the simulator when ``config.simulate``.
    """
    if resume is not None:
        rd = RunDir(resume)
        if not rd.has_checkpoint():
            raise FileNotFoundError(f"no checkpoint to resume from in {resume!r}")
        saved = rd.read_config()
        if config is not None:  # only the length of training and the display may change on resume
            saved.update(epochs=config.epochs, progress=config.progress)
        cfg = TrainConfig(**saved)
        done = rd.load_checkpoint()["epoch"]
        rd.truncate_metrics(done)
        run_dir = resume
    else:
        cfg = config or TrainConfig()
        run_dir = cfg.run_dir or default_run_dir(cfg)
        cfg = dataclasses.replace(cfg, run_dir=run_dir)
    load_dataset(cfg.dataset, cfg.data_dir, limit_train=1)  # a missing dataset fails here, before any worker starts
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if resume is None and (not under_torchrun or int(os.environ["RANK"]) == 0):
        RunDir.create(run_dir).write_config(dataclasses.asdict(cfg))
    config_dict = dataclasses.asdict(cfg)
    if under_torchrun:
        from ..launch import init_from_env, shutdown

        rank, world = init_from_env()
        config_dict["workers"] = world
        dist.barrier()  # rank 0 has created the run directory
        try:
            summary = train_worker(rank, world, config_dict, run_dir, resume is not None)
        finally:
            shutdown()
    elif cfg.simulate:
        summary = train_worker(0, cfg.workers, config_dict, run_dir, resume is not None)
    else:
        from ..launch import spawn

        summary = spawn(train_worker, cfg.workers, config_dict, run_dir, resume is not None, timeout_s=timeout_s)[0]
    if summary is not None:
        echo(format_summary(summary, link_gbps=cfg.link_gbps))
        echo(f"run directory: {run_dir}")
    return summary or {}
