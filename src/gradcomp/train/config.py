"""``gradcomp train``'s settings: :class:`TrainConfig`, one small dataclass per section.

=================  ===============================================================================
:class:`Data`      the dataset, its split among the workers, the batches
:class:`Model`     the model and its options
:class:`Exchange`  the method that exchanges the gradients, and what a NaN or Inf gradient does
:class:`Averaging` delayed gradient averaging (DGA) and FedAvg / local SGD
:class:`Optim`     the optimizer, the learning rate, clipping
:class:`Schedule`  how long to train, the learning rate's warm-up and step decay
:class:`Launch`    the workers: how many, simulated or not, on which device, the seed
:class:`Output`    the run directory, checkpoints, progress bars, the report
=================  ===============================================================================

Each section checks its own fields when it is built (a one-line ``ValueError`` naming the field as
``TrainConfig.SECTION.FIELD`` and the bad value); :class:`TrainConfig` checks the rules that join two
sections, and builds the method once so that its options fail now, not in a worker::

    config = TrainConfig(data=Data(dataset="mnist"), exchange=Exchange(method="dgc", options={"density": 0.001}),
                         launch=Launch(workers=8, simulate=True))
    longer = config.replace(schedule={"epochs": 40})  # a copy with fields of a section changed, checked again

A run's ``config.json`` holds the sections (``dataclasses.asdict``).  Earlier versions wrote one flat
mapping of setting names (``"lr"``, ``"dga_delay"``, ...: :data:`SETTINGS`); :meth:`TrainConfig.from_dict`
reads both, and the settings a resumed checkpoint is compared on (:meth:`TrainConfig.fingerprint`) stay flat,
so runs written before and after compare equal when their settings are.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..compressors.base import available, check_int, check_range, get
from ..guard import Nonfinite, check_nonfinite
from ..launch import DEVICES, DeviceRequest
from ..method import DGC, Method
from .data import DATASET_INFO, DATASETS, PARTITIONS, DatasetName, Partition
from .models import DEFAULT_MODEL, MODELS

__all__ = ["OPTIMIZERS", "RESUMABLE", "SETTINGS", "Averaging", "Data", "Exchange", "Launch", "Model", "Optim",
           "OptimizerName", "Output", "Schedule", "TrainConfig", "flat_settings"]

#: Methods whose payloads are summed with an all-reduce (the rest are all-gathered).
ALLREDUCE_METHODS = {"none", "fp16", "powersgd", "randomk"}
#: The optimizers ``Optim.name`` names.
OptimizerName = Literal["sgd", "adamw"]
#: The values of :data:`OptimizerName`, for the checks at run time.
OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)
#: Settings a resumed run may change (flat names, :data:`SETTINGS`): the length of training, how often it
#: checkpoints, the display, the device.
RESUMABLE = ("epochs", "max_steps", "checkpoint_every", "progress", "device")
#: Settings that do not decide what a checkpoint holds (not compared on resume).
NOT_CHECKED = (*RESUMABLE, "run_dir", "data_dir", "label", "link_gbps")


def _check_optional_int(owner: str, section: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) is not None:
            check_int(owner, name, getattr(section, name), 1)


@dataclass(kw_only=True)
class Data:
    """What is trained on, how it is split among the workers and batched.

    Raises:
        ValueError: a field out of its range or set, named with its value.

    Example:
        >>> from gradcomp.train.config import Data
        >>> Data(dataset="mnist", batch_size=64, limit_train=1000).batch_size
        64
        >>> Data(batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.data.batch_size must be an integer >= 1, got 0
    """

    #: ``digits`` (scikit-learn's bundled copy: offline anywhere), ``mnist``, ``fashion-mnist``, ``ptb`` (word
    #: language model) or ``shakespeare`` (character language model): :data:`~gradcomp.train.data.DATASETS`
    dataset: DatasetName = "digits"
    #: the folder holding ``mnist/``, ``fashion-mnist/``, ``ptb/``, ``tinyshakespeare/`` (None: ``$GRADCOMP_DATA``,
    #: then ``../shared/data`` beside the checkout)
    data_dir: str | None = None
    #: samples per worker and step (language models: rows of text, each a window of ``bptt`` tokens)
    batch_size: int = 32
    #: language models: tokens per window, the length backpropagation runs through
    bptt: int = 35
    #: how the training data is split among workers: ``"iid"``, or ``"skewed"``: each worker a few classes
    #: (images) or speakers (shakespeare) (see :class:`~gradcomp.train.loop.Task`)
    partition: Partition = "iid"
    #: use only the first this many training samples (language models: tokens); None: all
    limit_train: int | None = None
    #: evaluate on the first this many test samples (language models: tokens) only; None: all
    limit_test: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"TrainConfig.data.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        check_int("TrainConfig.data", "batch_size", self.batch_size, 1)
        check_int("TrainConfig.data", "bptt", self.bptt, 1)
        _check_optional_int("TrainConfig.data", self, ("limit_train", "limit_test"))
        if self.partition not in PARTITIONS:
            raise ValueError(f"TrainConfig.data.partition must be one of {', '.join(PARTITIONS)}, got "
                             f"{self.partition!r}")
        if self.partition == "skewed" and self.dataset == "ptb":
            raise ValueError("TrainConfig.data.partition='skewed' needs classes (images) or speakers (shakespeare); "
                             "ptb has neither")


@dataclass(kw_only=True)
class Model:
    """The model (its kind and options are checked against the dataset by :class:`TrainConfig`).

    Raises:
        ValueError: a name not in :data:`~gradcomp.train.models.MODELS`.

    Example:
        >>> from gradcomp.train.config import Data, Model, TrainConfig
        >>> TrainConfig(data=Data(dataset="shakespeare"), model=Model(name="gpt", options={"layers": 2})).model
        Model(name='gpt', options={'layers': 2})
        >>> TrainConfig(data=Data(dataset="ptb"), model=Model(name="cnn"))
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.model.name 'cnn' is a model for image datasets, but data.dataset 'ptb' is ... lstm, gpt)
    """

    #: one of :data:`~gradcomp.train.models.MODELS`; None: the dataset's default
    #: (:data:`~gradcomp.train.models.DEFAULT_MODEL`: mlp for digits, cnn for (fashion-)mnist, lstm for text)
    name: str | None = None
    #: options of the model, overriding its per-dataset defaults (``build_model(name, data, **options)``)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in MODELS:
            raise ValueError(f"TrainConfig.model.name must be one of {', '.join(MODELS)} or None, got {self.name!r}")


@dataclass(kw_only=True)
class Exchange:
    """How the workers exchange their gradients.

    Raises:
        ValueError: a field out of its range or set, named with its value.

    Example:
        >>> from gradcomp.train.config import Exchange
        >>> Exchange(method="powersgd", options={"rank": 2})
        Exchange(method='powersgd', options={'rank': 2}, nonfinite='skip')
        >>> Exchange(method="gzip")
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.exchange.method must be one of adacomp, dgc, ..., got 'gzip'
    """

    #: ``"dgc"`` (the whole of DGC: momentum correction and factor masking, local clipping, sparsity warm-up)
    #: or any compressor of :func:`gradcomp.available`; ``"none"`` is the dense fp32 all-reduce
    method: str = "dgc"
    #: compressor options (``gradcomp.get(method, **options)``) or DGC's options (:class:`gradcomp.DGC`) for
    #: ``method="dgc"``
    options: dict[str, Any] = field(default_factory=dict)
    #: a NaN or Inf gradient on any rank: ``"skip"`` the step on every rank (memory and weights unchanged, and
    #: logged) or ``"raise"``
    nonfinite: Nonfinite = "skip"

    def __post_init__(self) -> None:
        if self.method not in available():
            raise ValueError(f"TrainConfig.exchange.method must be one of {', '.join(available())}, got "
                             f"{self.method!r}")
        check_nonfinite("TrainConfig.exchange", self.nonfinite)


@dataclass(kw_only=True)
class Averaging:
    """When the average is applied: delayed gradient averaging (DGA), FedAvg / local SGD, or both.

    With either, the workers' models differ; each epoch is scored on their average.

    Raises:
        ValueError: a field out of its range, or ``dga_correction=False`` without ``dga_delay`` or with
            ``fedavg_period``.

    Example:
        >>> from gradcomp.train.config import Averaging
        >>> Averaging(dga_delay=4).dga_correction  # DGA with its correction term
        True
        >>> Averaging(dga_delay=-1)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.averaging.dga_delay must be an integer >= 0, got -1
    """

    #: delayed gradient averaging (Zhu et al. 2021): apply each step's average this many steps later, corrected
    #: by the newer local gradient (None: synchronous; 0 is synchronous too, through DGA's door)
    dga_delay: int | None = None
    #: with ``dga_delay``: swap the worker's own stale gradient for the average (DGA's correction); False
    #: applies the stale average alone (the paper's "w/o correction")
    dga_correction: bool = True
    #: FedAvg / local SGD instead of averaging gradients: each worker steps on its own gradients and the
    #: weights are averaged every this many steps (``Exchange.method="none"``); with ``dga_delay`` each round's
    #: average is applied that many steps later, the worker's own delta swapped for it
    fedavg_period: int | None = None

    def __post_init__(self) -> None:
        if self.dga_delay is not None:
            check_int("TrainConfig.averaging", "dga_delay", self.dga_delay, 0)
        elif not self.dga_correction:
            raise ValueError("TrainConfig.averaging.dga_correction=False needs dga_delay")
        if self.fedavg_period is not None:
            check_int("TrainConfig.averaging", "fedavg_period", self.fedavg_period, 1)
            if not self.dga_correction:
                raise ValueError("TrainConfig.averaging.dga_correction=False with fedavg_period: FedAvg's delayed "
                                 "rounds (dga_delay) always swap a worker's own delta for the average")


@dataclass(kw_only=True)
class Optim:
    """The optimizer each worker steps with.

    Raises:
        ValueError: a field out of its range or set, named with its value.

    Example:
        >>> from gradcomp.train.config import Optim
        >>> Optim(lr=0.05, weight_decay=1e-4).lr
        0.05
        >>> Optim(lr=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.optim.lr must be in (0.0, inf), got -1.0
    """

    #: ``"sgd"`` (``torch.optim.SGD``, momentum from ``momentum``) or ``"adamw"`` (``torch.optim.AdamW``, its
    #: own moments: ``momentum`` must be 0, and DGC is then built with momentum 0, error-feedback top-k)
    name: OptimizerName = "sgd"
    #: the learning rate (the peak one with :class:`Schedule`'s warm-up and decay)
    lr: float = 0.1
    #: SGD's momentum; DGC applies it itself (momentum correction), the optimizer then runs without
    momentum: float = 0.9
    #: SGD's L2 weight decay (scaled for DGC, see :func:`~gradcomp.sgd_settings`), or AdamW's decoupled one;
    #: applied locally, never sent
    weight_decay: float = 0.0
    #: clip gradients to this norm (None: no clipping): other methods clip the averaged gradient, DGC each
    #: worker's gradient before compressing, to ``clip_norm * sqrt(N)``
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        check_range("TrainConfig.optim", "lr", self.lr, 0.0, math.inf, low_open=True, high_open=True)
        check_range("TrainConfig.optim", "momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("TrainConfig.optim", "weight_decay", self.weight_decay, 0.0, math.inf, high_open=True)
        if self.name == "adamw" and self.momentum != 0:
            raise ValueError(f"TrainConfig.optim.momentum={self.momentum} with name='adamw': AdamW keeps moments of "
                             f"its own, set momentum=0 (DGC then runs as error-feedback top-k)")
        if self.clip_norm is not None:
            check_range("TrainConfig.optim", "clip_norm", self.clip_norm, 0.0, math.inf, low_open=True,
                        high_open=True)


@dataclass(kw_only=True)
class Schedule:
    """How long training runs, and the learning rate's course over it.

    Raises:
        ValueError: a field out of its range or set, named with its value.

    Example:
        >>> from gradcomp.train.config import Schedule
        >>> Schedule(epochs=40, lr_milestones=[20, 30]).lr_milestones
        [20, 30]
        >>> Schedule(epochs=0)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.schedule.epochs must be an integer >= 1, got 0
    """

    #: epochs to train
    epochs: int = 20
    #: stop after this many steps in total, with a checkpoint there (None: train all ``epochs``); resume
    #: continues the run
    max_steps: int | None = None
    #: ramp the learning rate up linearly over this many epochs (0: no warm-up)
    lr_warmup_epochs: float = 0.0
    #: multiply the learning rate by ``lr_decay`` at each of these epochs (step decay, like ``MultiStepLR``)
    lr_milestones: list[int] = field(default_factory=list)
    #: the factor of each step of ``lr_milestones``
    lr_decay: float = 0.1

    def __post_init__(self) -> None:
        check_int("TrainConfig.schedule", "epochs", self.epochs, 1)
        _check_optional_int("TrainConfig.schedule", self, ("max_steps",))
        check_range("TrainConfig.schedule", "lr_warmup_epochs", self.lr_warmup_epochs, 0.0, math.inf,
                    high_open=True)
        check_range("TrainConfig.schedule", "lr_decay", self.lr_decay, 0.0, 1.0, low_open=True)
        self.lr_milestones = list(self.lr_milestones)
        for m in self.lr_milestones:
            check_int("TrainConfig.schedule", "lr_milestones", m, 1)
        if self.lr_milestones != sorted(set(self.lr_milestones)):
            raise ValueError(f"TrainConfig.schedule.lr_milestones must increase strictly, got {self.lr_milestones}")


@dataclass(kw_only=True)
class Launch:
    """The workers: how many, where they run, the seed.

    Raises:
        ValueError: a field out of its range or set, named with its value.

    Example:
        >>> from gradcomp.train.config import Launch
        >>> Launch(workers=2, simulate=True).workers
        2
        >>> Launch(workers=0)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.launch.workers must be an integer >= 1, got 0
    """

    #: data-parallel workers N: local processes started by :func:`~gradcomp.train.loop.run`, simulated ones, or
    #: (under torchrun) the world size, which replaces it
    workers: int = 4
    #: N simulated workers in one process (:class:`~gradcomp.Simulator`) instead of N processes
    simulate: bool = False
    #: ``"cpu"`` (gloo), ``"cuda"`` (local rank r on ``cuda:r``, NCCL) or ``"auto"``: CUDA where every local rank
    #: gets a GPU (:func:`gradcomp.launch.device_kind`); a run's ``config.json`` records the device it resolved to
    device: DeviceRequest = "auto"
    #: seeds the model's initial weights, the order and split of the data, and the methods' sampling
    seed: int = 0
    #: experiments only: each collective completes no earlier than this many ms after it is issued (real
    #: processes only)
    emulate_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        check_int("TrainConfig.launch", "workers", self.workers, 1)
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig.launch.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check_int("TrainConfig.launch", "seed", self.seed, 0)
        check_range("TrainConfig.launch", "emulate_latency_ms", self.emulate_latency_ms, 0.0, math.inf,
                    high_open=True)
        if self.emulate_latency_ms and self.simulate:
            raise ValueError("TrainConfig.launch.emulate_latency_ms needs real processes (the simulator has no "
                             "network)")


@dataclass(kw_only=True)
class Output:
    """What the run writes and shows.

    Raises:
        ValueError: a field out of its range, named with its value.

    Example:
        >>> from gradcomp.train.config import Output
        >>> Output(run_dir="runs/first", progress=False).run_dir
        'runs/first'
        >>> Output(link_gbps=0.0)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.output.link_gbps must be in (0.0, inf), got 0.0
    """

    #: the run directory (None: ``runs/DATASET-METHOD-Nw-STAMP``, :func:`~gradcomp.train.loop.default_run_dir`)
    run_dir: str | None = None
    #: the run's label in plots and tables (None: the method and its options)
    label: str | None = None
    #: also write a checkpoint every this many steps (None: at epoch ends only); resume continues mid-epoch
    checkpoint_every: int | None = None
    #: show progress bars (rank 0)
    progress: bool = True
    #: the link speed (Gbit/s) the summary estimates a step on
    link_gbps: float = 1.0

    def __post_init__(self) -> None:
        _check_optional_int("TrainConfig.output", self, ("checkpoint_every",))
        check_range("TrainConfig.output", "link_gbps", self.link_gbps, 0.0, math.inf, low_open=True, high_open=True)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run depends on, by section; saved as the run's ``config.json``.

    Each section checks its own fields; this checks the rules across sections (the model's options against the
    model and ``bptt``, FedAvg and clipping against the method, AdamW against DGC's momentum) and the method's
    options (the method is built once).  Build one from sections, derive one with :meth:`replace`, read a saved
    one with :meth:`from_dict`.

    Raises:
        TypeError: a section of the wrong type.
        ValueError: sections that do not go together, or a method option the method does not take.

    Example:
        >>> from gradcomp.train.config import Data, Exchange, Schedule, TrainConfig
        >>> config = TrainConfig(data=Data(dataset="mnist"), exchange=Exchange(method="topk"),
        ...                      schedule=Schedule(epochs=5))
        >>> config.replace(schedule={"epochs": 40}).schedule.epochs
        40
        >>> TrainConfig.from_dict(config.flat()) == config  # a flat config.json of earlier versions
        True
        >>> TrainConfig(exchange=Exchange(method="topk", options={"rank": 2}))
        Traceback (most recent call last):
        ...
        ValueError: compressor 'topk' has no option 'rank'; its options are: density, wire
    """

    #: the dataset, its split and batches
    data: Data = field(default_factory=Data)
    #: the model
    model: Model = field(default_factory=Model)
    #: the method and its options
    exchange: Exchange = field(default_factory=Exchange)
    #: DGA and FedAvg
    averaging: Averaging = field(default_factory=Averaging)
    #: the optimizer
    optim: Optim = field(default_factory=Optim)
    #: the length of training and the learning rate's schedule
    schedule: Schedule = field(default_factory=Schedule)
    #: the workers
    launch: Launch = field(default_factory=Launch)
    #: the run directory and what is shown
    output: Output = field(default_factory=Output)

    def __post_init__(self) -> None:
        for name, kind in _sections().items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"TrainConfig.{name} must be a {kind.__name__}, got "
                                f"{type(getattr(self, name)).__name__} (TrainConfig.from_dict reads mappings)")
        exchange, averaging, optim = self.exchange, self.averaging, self.optim
        if averaging.dga_delay is not None and optim.clip_norm is not None and exchange.method != "dgc":
            raise ValueError("TrainConfig.optim.clip_norm with averaging.dga_delay: only DGC clips (locally); the "
                             "delayed average is not clipped")
        if averaging.fedavg_period is not None:
            if exchange.method != "none":
                raise ValueError(f"TrainConfig.averaging.fedavg_period averages weights, dense: it takes "
                                 f"exchange.method='none', got method={exchange.method!r}")
            if optim.clip_norm is not None:
                raise ValueError("TrainConfig.optim.clip_norm with averaging.fedavg_period: there is no averaged "
                                 "gradient to clip")
        self._check_model_options()
        method = self.build_method(steps_per_epoch=1)  # options are checked now, not in a worker
        if optim.name == "adamw" and method.owns_momentum:
            raise ValueError(f"TrainConfig.exchange.options momentum={method.momentum} with optim.name='adamw': DGC "
                             f"with momentum and AdamW's moments would apply momentum twice; use momentum 0")

    def _check_model_options(self) -> None:
        options, bptt, dataset = self.model.options, self.data.bptt, self.data.dataset
        model = self.model.name or DEFAULT_MODEL[dataset]
        kind = DATASET_INFO[dataset]["kind"]
        if MODELS[model].kind != kind:
            raise ValueError(f"TrainConfig.model.name {model!r} is a model for {MODELS[model].kind} datasets, but "
                             f"data.dataset {dataset!r} is an {kind} dataset (its models: "
                             f"{', '.join(m for m, spec in MODELS.items() if spec.kind == kind)})")
        if not options:
            return
        unknown = sorted(set(options) - set(MODELS[model].options()))
        context = MODELS[model].context_option
        if context in options and isinstance(options[context], int) and options[context] < bptt:
            raise ValueError(f"TrainConfig.model.options {context}={options[context]} is shorter than "
                             f"TrainConfig.data.bptt={bptt}: the model cannot read a whole window")
        if unknown:
            raise ValueError(f"TrainConfig.model.options: {model!r} has no option {', '.join(map(repr, unknown))} "
                             f"(it takes {', '.join(MODELS[model].options())})")

    def build_method(self, steps_per_epoch: int) -> Method:
        """The method: DGC (momentum, clipping and warm-up its own) or a compressor with its memory.

        Args:
            steps_per_epoch: the steps of one epoch, for DGC's warm-up in epochs.

        Returns:
            A fresh :class:`~gradcomp.DGC` or :class:`~gradcomp.Method`.

        Raises:
            ValueError: an option the method does not take, or a value it refuses.
        """
        method, options = self.exchange.method, self.exchange.options
        if method == "dgc":
            opts = {"momentum": self.optim.momentum, "clip_norm": self.optim.clip_norm, **options}
            if "warmup_steps" not in opts:
                opts.setdefault("warmup_epochs", 4.0)  # the paper's: four epochs
            try:
                return DGC(steps_per_epoch=steps_per_epoch, **opts)
            except TypeError as error:
                fields = [f.name for f in dataclasses.fields(DGC) if f.name != "steps_per_epoch"]
                raise ValueError(f"bad DGC option ({error}); DGC's options are: {', '.join(fields)}") from None
        return Method(get(method, **options))

    @property
    def collective(self) -> str:
        """How the method's payloads travel, for the step-time model: ``"allreduce"`` (summable payloads) or
        ``"allgather"``."""
        return "allreduce" if self.exchange.method in ALLREDUCE_METHODS else "allgather"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``, checked again: each keyword a section's name, its value a new section or a
        mapping of the fields to change in it (the others kept), e.g.
        ``config.replace(schedule={"epochs": 40}, launch=Launch(workers=8))``.

        Args:
            **changes: section name -> a new section, or a mapping of the fields to change in it.

        Returns:
            The new config (this one is unchanged).

        Raises:
            TypeError: a keyword that names no section, or a field a section does not have.
            ValueError: the changed config is refused by a section's or the cross-section checks.
        """
        unknown = sorted(set(changes) - set(_sections()))
        if unknown:
            raise TypeError(f"TrainConfig has no section {', '.join(map(repr, unknown))} (its sections: "
                            f"{', '.join(_sections())})")
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **change) if isinstance(change, Mapping) else change
            for name, change in changes.items()})

    def flat(self) -> dict[str, Any]:
        """Every setting under its flat name (:data:`SETTINGS`), as earlier versions' flat ``config.json``
        held them.

        Returns:
            flat name -> value.
        """
        return {key: getattr(getattr(self, section), name) for key, (section, name) in SETTINGS.items()}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainConfig:
        """The config ``saved`` holds: a ``config.json`` by section (``dataclasses.asdict`` of a TrainConfig),
        or flat, one key per setting (:data:`SETTINGS`), as earlier versions wrote it.  A setting it lacks
        (added since) takes its default.

        Args:
            saved: the mapping read from a ``config.json``.

        Returns:
            The config, checked.

        Raises:
            TypeError: a key it does not know, named.
            ValueError: a value a section refuses.
        """
        parts: dict[str, dict[str, Any]] = {}
        for key, value in flat_settings(saved).items():
            if key not in SETTINGS:
                raise TypeError(f"TrainConfig has no setting {key!r}")
            section, name = SETTINGS[key]
            parts.setdefault(section, {})[name] = value
        return cls(**{section: kind(**parts.get(section, {})) for section, kind in _sections().items()})

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must have been written with to be resumed by this run (plain JSON values,
        under their flat names, as checkpoints of earlier versions hold them).

        Returns:
            flat name -> value, without the settings a resumed run may change.
        """
        return json.loads(json.dumps({k: v for k, v in self.flat().items() if k not in NOT_CHECKED}))

    def describe(self) -> str:
        """The method and its options as one line, e.g. ``"dgc(density=0.001)"``.

        Returns:
            The text.
        """
        opts = ", ".join(f"{k}={v}" for k, v in self.exchange.options.items())
        return f"{self.exchange.method}({opts})" if opts else self.exchange.method


def _sections() -> dict[str, type]:
    """TrainConfig's sections: attribute name -> class (each field's default factory)."""
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


#: Fields whose flat name (below) is not their own: (section, field) -> flat name.
_RENAMED = {("model", "name"): "model", ("model", "options"): "model_options", ("optim", "name"): "optimizer"}
#: Every setting's flat name -> (section, field): the keys of the flat ``config.json`` earlier versions wrote,
#: of :meth:`TrainConfig.fingerprint` and of :data:`RESUMABLE`, and the names ``resume_config`` takes.
SETTINGS: dict[str, tuple[str, str]] = {
    _RENAMED.get((section, f.name), f.name): (section, f.name)
    for section, kind in _sections().items() for f in dataclasses.fields(kind)}


def flat_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A ``config.json``'s mapping with one key per setting: a TrainConfig's sections flattened to the names of
    :data:`SETTINGS` (a field no section has as ``"section.field"``); flat entries (earlier versions' files,
    another tool's) as they are.

    Args:
        saved: a ``config.json``'s mapping, by section or flat.

    Returns:
        flat name -> value.

    Example:
        >>> from gradcomp.train.config import flat_settings
        >>> flat_settings({"data": {"dataset": "mnist", "batch_size": 64}, "model": {"name": "cnn", "options": {}}})
        {'dataset': 'mnist', 'batch_size': 64, 'model': 'cnn', 'model_options': {}}
        >>> flat_settings({"dataset": "mnist", "lr": 0.1})  # an earlier version's flat file: as it is
        {'dataset': 'mnist', 'lr': 0.1}
    """
    sections, out = _sections(), {}
    for key, value in saved.items():
        if key not in sections or not isinstance(value, Mapping):  # a flat setting ("model": its name)
            out[key] = value
            continue
        names = {f.name for f in dataclasses.fields(sections[key])}
        for name, setting in value.items():
            flat = _RENAMED.get((key, name), str(name)) if name in names else f"{key}.{name}"
            out[flat] = setting
    return out
