"""N data-parallel workers in one process, for fast accuracy studies.

The workers are the real front doors on an in-process group: each worker is
a :class:`~gradcomp.core.Core` (synchronous steps; the DDP hook's and
:class:`~gradcomp.DistributedOptimizer`'s rule), a
:class:`~gradcomp.DelayedGradientAveraging` (``delay=D``) or a
:class:`~gradcomp.FedAvg` (``local_steps=K``, with ``delay=D`` its delayed rounds) whose communicator is a
:class:`LocalCommunicator`.  The workers take turns on the calling thread
(greenlets); a :class:`LocalGroup` meets their collectives and combines the
payloads exactly as the collectives would across real ranks: summed in rank
order for ``"sum"``, maximum for ``"max"``, listed in rank order for
``"gather"``.  So the maths, the memory, the guard (settings and non-finite
agreement) and the byte counts are the real path's, and a test checks the
simulator against real gloo processes step for step.

With ``delay`` or ``local_steps`` the workers' models drift apart, so each
worker trains its own copy of the model with its own copy of the optimizer
(worker 0's are the ones passed in).  Each algorithm is a small private class
that places the models and steps them (``_Synchronous``, ``_DelayedAveraging``,
``_FederatedAveraging``); :class:`Simulator` is the public front that checks
the arguments once, picks one and delegates to it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.futures import Future

from .comm import Communicator
from .compressors.base import Compressor, Payload, check_int
from .core import Core
from .dga import DelayedGradientAveraging, FedAvg
from .guard import Nonfinite, check_nonfinite
from .method import Method, MethodExchange, as_method

__all__ = ["LocalCommunicator", "LocalGroup", "Simulator", "combine", "run_exchanges", "split_batch"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def combine(payloads: Sequence[Payload]) -> list[Payload]:
    """Combine one tensor's payloads from every worker (rank order) as the collectives would.

    Args:
        payloads: every worker's payload of one tensor and round, in rank order.

    Returns:
        What each worker receives: the payloads themselves for ``"gather"``, else one payload holding their
        sum (``"sum"``) or entry-wise maximum (``"max"``).

    Raises:
        ValueError: when the workers' payloads differ in kind, or (summed or maxed) in shapes or dtypes.

    Example:
        >>> import torch
        >>> from gradcomp.compressors.base import Payload
        >>> from gradcomp.simulator import combine
        >>> [p.tensors for p in combine([Payload((torch.ones(2),), op="sum"), Payload((torch.ones(2),), op="sum")])]
        [(tensor([2., 2.]),)]
    """
    first = payloads[0]
    for rank, p in enumerate(payloads[1:], 1):
        if p.op != first.op or len(p.tensors) != len(first.tensors):
            raise ValueError(f"worker {rank} sent a payload of another kind than worker 0 ({p.op} vs {first.op})")
        if p.op != "gather" and any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(p.tensors, first.tensors)):
            raise ValueError(f"worker {rank} sent {p.op} tensors whose shapes or dtypes differ from worker 0's")
    if first.op == "gather":
        return list(payloads)
    tensors = [t.clone() for t in first.tensors]
    for p in payloads[1:]:
        for acc, t in zip(tensors, p.tensors):
            if first.op == "sum":
                acc.add_(t)
            else:
                torch.maximum(acc, t, out=acc)
    return [first.replace(*tensors)]


def _combine_round(every: list[Mapping[str, Payload]]) -> list[dict[str, list[Payload]]]:
    """One round of every worker's payloads; what each worker receives."""
    names = list(every[0])
    for rank, payloads in enumerate(every[1:], 1):
        if list(payloads) != names:
            raise RuntimeError(f"worker {rank} exchanged {sorted(payloads)[:5]} where worker 0 exchanged "
                               f"{sorted(names)[:5]}")
    combined = {name: combine([payloads[name] for payloads in every]) for name in names}
    # a reduced tensor is every worker's own (decoding may write to it), gathered payloads are shared: each is
    # read, never written, by every worker's decode (N^2 copies otherwise)
    return [{name: [p.replace(*(t.clone() for t in p.tensors)) if p.op != "gather" else p for p in received]
             for name, received in combined.items()} for _ in every]


def _greenlet() -> Any:
    """The ``greenlet`` class, an optional dependency of the simulator alone (``pip install 'gradcomp[train]'``)."""
    try:
        from greenlet import greenlet
    except ImportError:
        raise ImportError("gradcomp's Simulator runs its workers as greenlets: pip install greenlet (or "
                          "'gradcomp[train]')") from None
    return greenlet


class LocalGroup:
    """``world_size`` workers of one process whose collectives meet here: the n-th collective of every worker
    completes once all have issued it, combined in rank order.

    :meth:`run` runs ``fn(rank)`` for every worker, each as a greenlet on the calling thread: one worker runs
    at a time, worker 0 until its first collective, then worker 1, and so on; the worker that completes a
    collective goes on, and the others resume in rank order after it.  So a run is deterministic (draws from
    torch's global generator, the order of log lines), the workers never touch what they share at the same
    time, and torch's intra-op threads stay the calling thread's (new threads would start new OpenMP pools:
    3x slower on small models).  Each worker keeps its own grad mode (``torch.no_grad`` is thread-local
    state, which greenlets on one thread would otherwise share).  A worker that fails ends the run with its
    error; workers waiting in collectives no other worker will join are an error naming them, never a hang.

    Args:
        world_size: the number of workers.

    Example:
        >>> from gradcomp.simulator import LocalGroup
        >>> group = LocalGroup(3)
        >>> group.run(lambda rank: group.comms[rank].all_objects(rank * 10))
        [[0, 10, 20], [0, 10, 20], [0, 10, 20]]
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.comms = [LocalCommunicator(self, rank) for rank in range(world_size)]
        self._rounds: dict[int, tuple[str, list[Any]]] = {}
        self._waiting: dict[int, Any] = {}  # worker -> what it receives, once its collective completed
        self._scheduler: Any = None  # the greenlet that runs the workers in turns

    def meet(self, rank: int, seq: int, kind: str, value: Any,
             combine_all: Callable[[list[Any]], list[Any]]) -> Any:
        """Worker ``rank``'s part of collective number ``seq``; what it receives, once every worker joined.

        Args:
            rank: the worker's rank.
            seq: the collective's number, counted by each worker.
            kind: the collective's kind (every worker's must be the same).
            value: what this worker puts in.
            combine_all: every worker's value (rank order) to what each receives.

        Returns:
            What worker ``rank`` receives.

        Raises:
            RuntimeError: when the workers issued collectives of different kinds as number ``seq``.
        """
        first_kind, values = self._rounds.setdefault(seq, (kind, [_MISSING] * self.world_size))
        if kind != first_kind:
            raise RuntimeError(f"worker {rank} issued {kind} as collective {seq}, another worker {first_kind}: "
                               "the workers disagree on their exchanges")
        values[rank] = value
        if any(v is _MISSING for v in values):
            self._waiting[rank] = _MISSING
            return self._scheduler.switch()  # the others' turns; back here with what this worker receives
        del self._rounds[seq]
        received = combine_all(values)
        for other in self._waiting:
            self._waiting[other] = received[other]
        return received[rank]

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """``fn(rank)`` for every worker, in turns (see the class); the results in rank order, or the first
        failure raised.

        Args:
            fn: what a worker runs, given its rank.

        Returns:
            ``fn``'s results in rank order.

        Raises:
            RuntimeError: when workers wait in collectives that no other worker will join; a worker's own
                error is raised as it is.
        """
        n = self.world_size
        self._rounds.clear()
        self._waiting.clear()
        for comm in self.comms:
            comm.seq = 0
        greenlet = _greenlet()
        self._scheduler = greenlet.getcurrent()
        workers = [greenlet(lambda rank=rank: fn(rank)) for rank in range(n)]
        results: list[Any] = [None] * n
        started, done = [False] * n, [False] * n
        caller_grad_mode = torch.is_grad_enabled()
        grad_modes = [caller_grad_mode] * n
        rank = 0
        try:
            while not all(done):
                ready = [r % n for r in range(rank, rank + n)
                         if not done[r % n] and self._waiting.get(r % n, None) is not _MISSING]
                if not ready:
                    where = "; ".join(f"collective {seq} ({kind}) has workers "
                                      f"{[r for r, v in enumerate(values) if v is not _MISSING]}"
                                      for seq, (kind, values) in sorted(self._rounds.items()))
                    raise RuntimeError(f"workers {sorted(self._waiting)} wait in collectives no other worker will "
                                       f"join ({where}): the workers disagree on their exchanges")
                rank = ready[0]
                torch.set_grad_enabled(grad_modes[rank])  # thread-local, so each worker's is kept here
                out = workers[rank].switch(*(() if not started[rank] else (self._waiting.pop(rank),)))
                grad_modes[rank] = torch.is_grad_enabled()
                torch.set_grad_enabled(caller_grad_mode)
                started[rank] = True
                if workers[rank].dead:
                    results[rank], done[rank] = out, True
                rank += 1
        finally:
            torch.set_grad_enabled(caller_grad_mode)
            self._scheduler = None
            for w in workers:  # a failed run: unwind the others (GreenletExit in each)
                if not w.dead:
                    w.throw()
        return results


_MISSING = object()


class LocalCommunicator(Communicator):
    """Worker ``rank``'s :class:`~gradcomp.comm.Communicator` on a :class:`LocalGroup`: the same driving of
    the exchange generators and the same byte count, with the collectives met in this process.

    Args:
        group: the workers' group.
        rank: this worker's rank.
    """

    def __init__(self, group: LocalGroup, rank: int) -> None:  # no process group: nothing of Communicator's
        self.local, self.rank, self.world_size = group, rank, group.world_size
        self.latency, self.bytes_sent, self.seq = 0.0, 0, 0

    def _meet(self, kind: str, value: Any, combine_all: Callable[[list[Any]], list[Any]]) -> Any:
        self.seq += 1
        return self.local.meet(self.rank, self.seq, kind, value, combine_all)

    def all_objects(self, obj: Any) -> list[Any]:
        return self._meet("all_objects", copy.deepcopy(obj), lambda every: [list(every)] * len(every))

    def count_per_rank_async(self, count: Tensor) -> Future:
        every = self._meet("count_per_rank", int(count), lambda every: [list(every)] * len(every))
        fut: Future = Future()
        fut.set_result(torch.tensor(every, dtype=torch.int32))
        return fut

    def _launch(self, payloads: Mapping[str, Payload]) -> Future:
        self.bytes_sent += sum(p.nbytes for p in payloads.values())
        fut: Future = Future()
        fut.set_result(self._meet("exchange", dict(payloads), _combine_round))
        return fut


def run_exchanges(workers: Sequence[dict[str, MethodExchange]]) -> tuple[list[dict[str, Tensor]], list[int]]:
    """Drive every worker's exchange generators on a :class:`LocalGroup`; each worker's results and bytes
    sent.

    Args:
        workers: per worker (rank order), its exchange generators by parameter name.

    Returns:
        Each worker's averaged gradients by name, and each worker's bytes sent.
    """
    group = LocalGroup(len(workers))
    results = group.run(lambda rank: group.comms[rank].exchange(workers[rank]).wait())
    return results, [c.bytes_sent for c in group.comms]


def split_batch(batch: Any, num_workers: int) -> list[Any]:
    """Split a tensor, or a tuple/list of tensors, along dim 0 into ``num_workers`` shards.

    Args:
        batch: a tensor, or a tuple or list of them (nested too).
        num_workers: the number of shards.

    Returns:
        The shards, one per worker; a tuple or list batch gives shards of its type.

    Raises:
        ValueError: when a tensor has fewer samples than ``num_workers``.
        TypeError: when ``batch`` is of another type.

    Example:
        >>> import torch
        >>> from gradcomp import split_batch
        >>> shards = split_batch((torch.zeros(10, 3), torch.arange(10)), 4)
        >>> [tuple(x.shape) for x, _ in shards], shards[3][1].tolist()
        ([(3, 3), (3, 3), (2, 3), (2, 3)], [8, 9])
    """
    if isinstance(batch, Tensor):
        shards = batch.tensor_split(num_workers)
        if any(s.shape[0] == 0 for s in shards):
            raise ValueError(f"a batch of {batch.shape[0]} samples cannot feed {num_workers} workers")
        return list(shards)
    if isinstance(batch, (tuple, list)):
        return [type(batch)(parts) for parts in zip(*(split_batch(b, num_workers) for b in batch))]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def _optimizer_for(optimizer: torch.optim.Optimizer, model: nn.Module, replica: nn.Module) -> torch.optim.Optimizer:
    """``optimizer`` (its class, param groups and state) over ``replica``'s parameters instead of ``model``'s."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(replica.parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [params[position[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
    clone = type(optimizer)(groups, **optimizer.defaults)
    clone.load_state_dict(optimizer.state_dict())
    return clone


_Door = DelayedGradientAveraging | FedAvg


class _Workers:
    """How the simulator's workers hold their models and step: one subclass per algorithm.

    A subclass places the models, optimizers and cores (``models[0]`` and ``optimizers[0]`` are the caller's),
    turns every worker's gradients into what its optimizer applies (:meth:`apply`), steps the optimizers
    (:meth:`optimizer_step`) and saves what is its own (:meth:`state_dict`).  :class:`Simulator` validates the
    arguments, counts the bytes and keeps the state format.
    """

    #: the models the workers train (one shared, or one per worker)
    models: list[nn.Module]
    #: the optimizers over ``models`` (none when the caller gave none)
    optimizers: list[torch.optim.Optimizer]
    #: every worker's core: its method, guard and communicator
    cores: list[Core]
    #: every worker's front door (none when the workers share one model)
    doors: list[_Door]

    def __init__(self, group: LocalGroup) -> None:
        self.group = group

    def model_of(self, rank: int) -> nn.Module:
        """The model worker ``rank`` computes its gradients on.

        Args:
            rank: the worker, ``0 <= rank < num_workers``.

        Returns:
            The worker's own model, or the one all share.
        """
        raise NotImplementedError

    def shared_buffers(self) -> list[Tensor]:
        """The buffers every worker's forward starts from alike (DDP's ``broadcast_buffers``).

        Returns:
            The shared model's buffers; none where each worker has its own model.
        """
        return []

    def apply(self, grads: Sequence[dict[str, Tensor]], params: Mapping[str, Tensor]) -> bool:
        """Every worker's step up to its optimizer: the exchanges, and what to apply left in ``p.grad``.

        Args:
            grads: every worker's gradients by parameter name, in rank order.
            params: the trained parameters of ``models[0]`` by name.

        Returns:
            Whether worker 0 skips this step (a non-finite gradient).
        """
        raise NotImplementedError

    def optimizer_step(self, skipped: bool) -> None:
        """Step the optimizers after :meth:`apply` (the gradients are cleared by the caller).

        Args:
            skipped: what :meth:`apply` returned.
        """
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Steps worker 0 skipped for a non-finite gradient since it was made or loaded."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Workers 1..N-1's models and every worker's door, without the methods (the simulator saves those).

        Returns:
            ``{"replicas": [...], "doors": [...]}``, both empty where the workers share one model.
        """
        return {"replicas": [m.state_dict() for m in self.models[1:]],
                "doors": [{k: v for k, v in door.state_dict().items() if k != "method"} for door in self.doors]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every worker's method, then :meth:`state_dict`'s doors and models.

        Args:
            state: a :meth:`Simulator.state_dict`.

        Raises:
            ValueError: the state holds another number of models or doors (saved with other ``delay`` or
                ``local_steps``), or a door refuses its part.
        """
        if len(state["replicas"]) != len(self.models) - 1 or len(state["doors"]) != len(self.doors):
            raise ValueError(f"state holds {len(state['replicas'])} worker models besides worker 0's, this "
                             f"simulator has {len(self.models) - 1} (delay or local_steps differ)")
        for core, method in zip(self.cores, state["methods"]):
            core.load_state_dict({"method": method})
        for door, method, saved in zip(self.doors, state["methods"], state["doors"]):
            door.load_state_dict({**saved, "method": method})
        for model, saved in zip(self.models[1:], state["replicas"]):
            model.load_state_dict(saved)


class _Synchronous(_Workers):
    """Synchronous steps on one shared model and optimizer (the DDP hook's and
    :class:`~gradcomp.DistributedOptimizer`'s rule): every worker's core exchanges its gradients and every
    worker applies the same average, so worker 0's is applied once."""

    def __init__(self, group: LocalGroup, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 method: Method, nonfinite: Nonfinite) -> None:
        super().__init__(group)
        self.model, self.optimizer = model, optimizer
        self.models, self.optimizers, self.doors = [model], [] if optimizer is None else [optimizer], []
        self.cores = [Core(method, comm, owner="Simulator", nonfinite=nonfinite, optimizer=optimizer)
                      for comm in group.comms]

    def model_of(self, rank: int) -> nn.Module:
        return self.model

    def shared_buffers(self) -> list[Tensor]:
        return [b for _, b in self.model.named_buffers()]

    def apply(self, grads: Sequence[dict[str, Tensor]], params: Mapping[str, Tensor]) -> bool:
        average = self.group.run(lambda rank: self._average(self.cores[rank], grads[rank]))[0]
        for name, p in params.items():
            p.grad = None if average is None else average[name].view_as(p).to(p.dtype)
        return average is None

    @staticmethod
    def _average(core: Core, grads: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """One worker's synchronous step (the hook's rule: one exchange of every gradient, then the guard's
        verdict).

        Args:
            core: the worker's core.
            grads: the worker's gradients by parameter name.

        Returns:
            The average of every worker's gradients, or None when every worker skips the step.
        """
        step = core.step()
        average = step.add(grads)[0]
        skipped = step.end().wait()
        core.end_step()
        return None if skipped else average.wait()

    def optimizer_step(self, skipped: bool) -> None:
        if self.optimizer is not None and not skipped:
            self.optimizer.step()

    @property
    def skipped(self) -> int:
        return self.cores[0].guard.skipped


class _Replicated(_Workers):
    """Each worker trains its own copy of the model with its own copy of the optimizer, behind its own front
    door (``make_door``); worker 0's model and optimizer are the caller's."""

    def __init__(self, group: LocalGroup, model: nn.Module, optimizer: torch.optim.Optimizer,
                 make_door: Callable[[nn.Module, torch.optim.Optimizer, LocalCommunicator], _Door]) -> None:
        super().__init__(group)
        self.models = [model] + [copy.deepcopy(model) for _ in range(group.world_size - 1)]
        self.optimizers = [optimizer] + [_optimizer_for(optimizer, model, m) for m in self.models[1:]]
        self.doors = [make_door(m, o, comm) for m, o, comm in zip(self.models, self.optimizers, group.comms)]
        self.cores = [door.core for door in self.doors]

    def model_of(self, rank: int) -> nn.Module:
        return self.models[rank]

    def apply(self, grads: Sequence[dict[str, Tensor]], params: Mapping[str, Tensor]) -> bool:
        for model, worker in zip(self.models, grads):
            for name, p in model.named_parameters():
                if name in params:
                    p.grad = worker[name]
        self.group.run(lambda rank: self.doors[rank].synchronize())
        return self.doors[0].step_skipped

    def optimizer_step(self, skipped: bool) -> None:
        self.group.run(lambda rank: self.doors[rank].step_optimizer())

    @property
    def skipped(self) -> int:
        return self.doors[0].skipped


class _DelayedAveraging(_Replicated):
    """DGA: each worker's :class:`~gradcomp.DelayedGradientAveraging` applies the average ``delay`` steps
    late."""

    def __init__(self, group: LocalGroup, model: nn.Module, optimizer: torch.optim.Optimizer, method: Method,
                 delay: int, correction: bool, nonfinite: Nonfinite) -> None:
        super().__init__(group, model, optimizer, lambda m, o, comm: DelayedGradientAveraging(
            o, m.named_parameters(), delay, method, correction, comm, nonfinite=nonfinite))


class _FederatedAveraging(_Replicated):
    """FedAvg: each worker's :class:`~gradcomp.FedAvg` averages the weights every ``local_steps`` steps
    (applied ``delay`` steps late)."""

    def __init__(self, group: LocalGroup, model: nn.Module, optimizer: torch.optim.Optimizer, local_steps: int,
                 delay: int, nonfinite: Nonfinite) -> None:
        super().__init__(group, model, optimizer, lambda m, o, comm: FedAvg(
            o, m.named_parameters(), local_steps, comm, delay=delay, nonfinite=nonfinite))


class Simulator:
    """N virtual data-parallel workers running ``method`` in one process.

    :meth:`step` runs forward and backward per worker shard, exchanges through the method, writes the averaged
    gradient to ``p.grad`` and, when an optimizer is given, steps it.  With :class:`~gradcomp.DGC` the method
    owns momentum: use ``torch.optim.SGD`` with ``momentum=0`` (a momentum optimizer raises ``ValueError``).
    Buffers (batch-norm statistics) follow DDP's ``broadcast_buffers=True``: every worker starts from worker
    0's.  With ``delay`` or ``local_steps`` the workers' models drift apart, so each worker trains its own copy
    of the model with its own copy of the optimizer (worker 0's are the ones passed in).

    Args:
        model: the model; worker 0's with ``delay`` or ``local_steps``, every worker's otherwise.
        method: a :class:`~gradcomp.Method`, a compressor or a registered name (``"none"``, ``"topk"``, ...).
        num_workers: the number of virtual workers (each batch is split into as many shards).
        optimizer: steps ``model``; without it :meth:`step` leaves the average in ``p.grad``.
        delay: run :class:`~gradcomp.DelayedGradientAveraging` with this delay (with ``local_steps``:
            FedAvg's rounds applied ``delay`` steps late).
        correction: DGA's correction (``w -= lr * (g_i - g_{i-D} + avg(g_{i-D}))``); False applies the stale
            average alone.
        local_steps: run :class:`~gradcomp.FedAvg`, averaging the weights every ``local_steps`` steps.
        nonfinite: ``"skip"`` or ``"raise"`` as at every front door (see :mod:`gradcomp.guard`).

    Raises:
        ValueError: ``num_workers`` is not an integer >= 1, ``delay`` or ``local_steps`` is out of range or
            given without an optimizer, ``correction=False`` with ``local_steps``, or ``nonfinite`` unknown.

    Example:
        >>> import torch, torch.nn.functional as F, gradcomp
        >>> model = torch.nn.Linear(256, 10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)  # momentum=0: DGC owns momentum
        >>> sim = gradcomp.Simulator(model, gradcomp.DGC(density=0.01, warmup_epochs=0), num_workers=4,
        ...                          optimizer=opt)
        >>> x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))
        >>> loss = sim.step(gradcomp.split_batch((x, y), 4), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        >>> sim.steps, sim.compression_ratio > 50  # 1 % of the weight's entries and their indices, dense bias
        (1, True)
    """

    def __init__(self, model: nn.Module, method: Method | Compressor | str, num_workers: int, *,
                 optimizer: torch.optim.Optimizer | None = None, delay: int | None = None,
                 correction: bool = True, local_steps: int | None = None, nonfinite: Nonfinite = "skip") -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        method = as_method(method)
        check_nonfinite("Simulator", nonfinite)
        for field, value in (("delay", delay), ("local_steps", local_steps)):
            if value is not None:
                check_int("Simulator", field, value, 0 if field == "delay" else 1)
                if optimizer is None:
                    raise ValueError(f"Simulator({field}=...) needs the optimizer: every worker steps its own copy")
        if local_steps is not None and not correction:
            raise ValueError("Simulator(correction=False) is DGA's without local_steps: FedAvg's delayed rounds "
                             "always swap a worker's own delta for the average")
        self.model = model
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.group = LocalGroup(num_workers)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._workers: _Workers
        if local_steps is not None and optimizer is not None:  # (checked above: both or neither)
            self._workers = _FederatedAveraging(self.group, model, optimizer, local_steps, delay or 0, nonfinite)
        elif delay is not None and optimizer is not None:
            self._workers = _DelayedAveraging(self.group, model, optimizer, method, delay, correction, nonfinite)
        else:
            self._workers = _Synchronous(self.group, model, optimizer, method, nonfinite)
        self.dense_bytes = 0  # fp32 bytes of the gradients one worker would send uncompressed
        self.step_skipped = False

    @property
    def models(self) -> list[nn.Module]:
        """The models the workers train: ``[model]``, or one per worker with ``delay`` or ``local_steps``."""
        return self._workers.models

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers over :attr:`models` (none when no optimizer was given)."""
        return self._workers.optimizers

    @property
    def cores(self) -> list[Core]:
        """Every worker's :class:`~gradcomp.core.Core` (its method, guard and communicator)."""
        return self._workers.cores

    @property
    def doors(self) -> list[DelayedGradientAveraging | FedAvg]:
        """Every worker's front door with ``delay`` or ``local_steps``; empty otherwise."""
        return self._workers.doors

    @property
    def methods(self) -> list[Method]:
        """Every worker's own copy of the method (its memory and counters)."""
        return [core.method for core in self.cores]

    @property
    def method(self) -> Method:
        """Worker 0's method (all workers share configuration and schedules)."""
        return self.cores[0].method

    @property
    def steps(self) -> int:
        """Steps worker 0's core has taken."""
        return self.cores[0].steps

    @property
    def skipped(self) -> int:
        """Steps worker 0 skipped for a non-finite gradient since it was made or loaded (every worker's,
        except with ``local_steps``)."""
        return self._workers.skipped

    @property
    def bytes_sent(self) -> list[int]:
        """Per worker, whole run."""
        return [core.comm.bytes_sent for core in self.cores]

    def set_epoch(self, epoch: float) -> None:
        """Set every worker's method's epoch (its warm-up schedules).

        Args:
            epoch: the epoch, fractional within one.
        """
        for m in self.methods:
            m.set_epoch(epoch)

    def compute_gradients(self, shards: Sequence[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
                          ) -> tuple[list[dict[str, Tensor]], Tensor]:
        """Each worker's gradients on its shard; a shared model's buffers end as worker 0's (DDP).

        Args:
            shards: one batch per worker (:func:`split_batch`).
            loss_fn: ``loss_fn(model, shard)``, the loss to differentiate.

        Returns:
            Every worker's gradients by parameter name (zeros for parameters without one) and the workers'
            mean loss.

        Raises:
            ValueError: not one shard per worker.
        """
        if len(shards) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} shards (one per worker), got {len(shards)}")
        buffers = self._workers.shared_buffers()
        start = [b.clone() for b in buffers]
        after_worker0: list[Tensor] = []
        grads, losses = [], []
        for rank, shard in enumerate(shards):
            model = self._workers.model_of(rank)
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            for b, s in zip(buffers, start):
                b.copy_(s)
            for p in params.values():
                p.grad = None
            loss = loss_fn(model, shard)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()})
            if rank == 0:
                after_worker0 = [b.clone() for b in buffers]
        for b, s in zip(buffers, after_worker0):
            b.copy_(s)
        return grads, torch.stack(losses).mean()

    def apply(self, grads: Sequence[dict[str, Tensor]]) -> None:
        """Every worker's step up to its optimizer: the exchanges, and what to apply in ``p.grad`` (worker
        0's average on the shared model; with ``delay`` or ``local_steps``, each worker's on its own).
        :attr:`step_skipped` tells whether worker 0 skips the step.

        Args:
            grads: every worker's gradients (:meth:`compute_gradients`).

        Raises:
            ValueError: not one worker's gradients per worker.
        """
        if len(grads) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} workers' gradients, got {len(grads)}")
        self.dense_bytes += sum(p.numel() * 4 for p in self.params.values())
        self.step_skipped = self._workers.apply(grads, self.params)

    def optimizer_step(self) -> None:
        """Step every worker's optimizer (not where the step was skipped) and clear the gradients."""
        self._workers.optimizer_step(self.step_skipped)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self, shards: Sequence[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> Tensor:
        """One data-parallel step: :meth:`compute_gradients`, :meth:`apply`, :meth:`optimizer_step`.

        Args:
            shards: one batch per worker (:func:`split_batch`).
            loss_fn: ``loss_fn(model, shard)``, the loss to differentiate.

        Returns:
            The workers' mean loss.
        """
        grads, loss = self.compute_gradients(shards, loss_fn)
        self.apply(grads)
        self.optimizer_step()
        return loss

    @property
    def compression_ratio(self) -> float:
        """Dense fp32 bytes over the bytes one worker actually sent (mean over workers)."""
        sent = sum(self.bytes_sent) / self.num_workers
        return self.dense_bytes / sent if sent else float("inf")

    def state_dict(self) -> dict[str, Any]:
        """Every worker's method, the byte counts and, with ``delay`` or ``local_steps``, workers
        1..N-1's models and every worker's front door (its optimizer, DGA's pending steps); worker 0's model
        and optimizer are the caller's to save.

        Returns:
            ``{"methods", "bytes_sent", "dense_bytes", "replicas", "doors"}``.
        """
        return {
            "methods": [m.state_dict() for m in self.methods],
            "bytes_sent": self.bytes_sent,
            "dense_bytes": self.dense_bytes,
            **self._workers.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Args:
            state: a simulator's :meth:`state_dict` with the same number of workers and settings.

        Raises:
            ValueError: an entry is missing, or the state was saved with another number of workers or
                other ``delay`` or ``local_steps``, or a worker's part does not fit.
        """
        missing = [k for k in ("methods", "bytes_sent", "dense_bytes", "replicas", "doors")
                   if k not in state]
        if missing:
            raise ValueError(f"not a Simulator state (no {', '.join(missing)}): saved by another gradcomp version?")
        if len(state["methods"]) != self.num_workers:
            raise ValueError(f"state holds {len(state['methods'])} workers, this simulator has {self.num_workers}")
        self._workers.load_state_dict(state)
        for core, sent in zip(self.cores, state["bytes_sent"]):
            core.comm.bytes_sent = int(sent)
        self.dense_bytes = int(state["dense_bytes"])
