"""N data-parallel workers in one process, for fast accuracy studies.

Each worker computes its gradient on its own shard, runs its own copy of the
method (its own memory), and the payloads are combined exactly as the
communicator combines them across real ranks: summed in rank order for
``"sum"``, maximum for ``"max"``, listed in rank order for ``"gather"``.  So
the maths is the real path's, and a test checks it against real gloo
processes step for step.  Bytes are counted from the real payloads.

With ``delay=D`` the workers run delayed gradient averaging
(:class:`gradcomp.DelayedGradientAveraging`): their models drift apart by
their local correction terms, so each worker trains its own copy of the
model with its own copy of the optimizer (worker 0's are the ones passed in).
With ``local_steps=K`` they run local SGD / FedAvg (:class:`gradcomp.FedAvg`)
the same way: each worker steps on its own gradient, and every K steps the
workers' weights are averaged.

Non-finite gradients follow the real front doors (``nonfinite="skip"`` or
``"raise"``, see :mod:`gradcomp.guard`): a NaN or Inf on any worker skips the
step for every worker, memory unchanged (with ``delay``: as
:class:`~gradcomp.DelayedGradientAveraging`; with ``local_steps``: that
worker's local step only).
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .compressors.base import Compressor, Payload, check_int
from .dga import delayed_update
from .guard import NONFINITE_KEY, check_nonfinite, flag_exchange, nonfinite_step
from .method import Method, MethodExchange, as_method, check_optimizer

__all__ = ["Simulator", "combine", "split_batch"]

log = logging.getLogger(__name__)


def combine(payloads: Sequence[Payload]) -> list[Payload]:
    """Combine one tensor's payloads from every worker (rank order) as the collectives would."""
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


def run_exchanges(workers: Sequence[dict[str, MethodExchange]]) -> tuple[list[dict[str, Tensor]], list[int]]:
    """Drive every worker's exchange generators in lockstep; returns each worker's results and bytes sent."""
    results: list[dict[str, Tensor]] = [{} for _ in workers]
    sent = [0] * len(workers)
    for name in workers[0]:
        received: list[Payload] | None = None
        while True:
            payloads = []
            for rank, gens in enumerate(workers):
                try:
                    payload = gens[name].send(received)
                except StopIteration as stop:
                    results[rank][name] = stop.value
                    continue
                payloads.append(payload)
                sent[rank] += payload.nbytes
            if not payloads:
                break
            if len(payloads) != len(workers):
                raise RuntimeError(f"workers disagree on the number of exchange rounds for {name!r}")
            received = combine(payloads)
    return results, sent


def split_batch(batch: Any, num_workers: int) -> list[Any]:
    """Split a tensor, or a tuple/list of tensors, along dim 0 into ``num_workers`` shards."""
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


class Simulator:
    """N virtual data-parallel workers running ``method`` in one process.

    >>> sim = gradcomp.Simulator(model, gradcomp.DGC(density=0.001), num_workers=4, optimizer=opt)
    >>> loss = sim.step(split_batch((x, y), 4), lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    ``step`` runs forward and backward per worker shard, exchanges through
    the method, writes the averaged gradient to ``p.grad`` and, when an
    optimizer is given, steps it.  With :class:`~gradcomp.DGC` the method owns
    momentum: use ``torch.optim.SGD`` with ``momentum=0`` (a momentum optimizer
    raises ``ValueError``).  Buffers (batch-norm statistics) follow DDP's
    ``broadcast_buffers=True``: every worker starts from worker 0's.
    """

    def __init__(self, model: nn.Module, method: Method | Compressor | str, num_workers: int, *,
                 optimizer: torch.optim.Optimizer | None = None, delay: int | None = None,
                 correction: bool = True, local_steps: int | None = None, nonfinite: str = "skip") -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        method = as_method(method)
        check_optimizer(method, optimizer)
        for field, value in (("delay", delay), ("local_steps", local_steps)):
            if value is not None:
                check_int("Simulator", field, value, 0 if field == "delay" else 1)
                if optimizer is None:
                    raise ValueError(f"Simulator({field}=...) needs the optimizer: every worker steps its own copy")
        if delay is not None and local_steps is not None:
            raise ValueError("Simulator takes delay (DGA) or local_steps (FedAvg), not both")
        self.nonfinite = check_nonfinite("Simulator", nonfinite)
        self.model = model
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.delay, self.correction, self.local_steps = delay, bool(correction), local_steps
        #: every worker's model and optimizer: one shared pair, or one pair per worker with delay or local_steps
        self.models = [model] if delay is None and local_steps is None else \
            [model] + [copy.deepcopy(model) for _ in range(num_workers - 1)]
        self.optimizers = [] if optimizer is None else [optimizer] + [_optimizer_for(optimizer, model, m)
                                                                      for m in self.models[1:]]
        self._pending: deque[tuple[list[dict[str, Tensor]], dict[str, Tensor]]] = deque()
        self.methods = [method.for_rank(rank) for rank in range(num_workers)]
        self._spares = [method.for_rank(rank) for rank in range(num_workers)] if delay is not None else []
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.bytes_sent = [0] * num_workers  # per worker, whole run
        self.dense_bytes = 0  # fp32 bytes of the gradients one worker would send uncompressed
        self.steps = 0
        self.skipped = 0  # steps skipped for a non-finite gradient

    @property
    def method(self) -> Method:
        """Worker 0's method (all workers share configuration and schedules)."""
        return self.methods[0]

    def set_epoch(self, epoch: float) -> None:
        for m in self.methods:
            m.set_epoch(epoch)

    def compute_gradients(self, shards: Sequence[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
                          ) -> tuple[list[dict[str, Tensor]], Tensor]:
        """Each worker's gradients on its shard; the model's buffers end as worker 0's (DDP)."""
        if len(shards) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} shards (one per worker), got {len(shards)}")
        shared = len(self.models) == 1
        buffers = [b for _, b in self.model.named_buffers()] if shared else []
        start = [b.clone() for b in buffers]
        after_worker0: list[Tensor] = []
        grads, losses = [], []
        for rank, shard in enumerate(shards):
            model = self.models[0 if shared else rank]
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
        """Exchange the workers' gradients through the method and write the average to ``p.grad``
        (local SGD: each worker's own gradient, nothing exchanged)."""
        bad = [nonfinite_step(g, self.nonfinite, f"worker {rank}, step {self.steps}", "the step is skipped")
               for rank, g in enumerate(grads)]  # every check before any memory
        self.dense_bytes += sum(p.numel() * 4 for p in self.params.values())
        self.steps += 1
        if self.local_steps is not None:
            for model, worker, skip in zip(self.models, grads, bad):
                for name, p in model.named_parameters():
                    if name in self.params:
                        p.grad = worker[name] if not skip else None
            return
        n = self.num_workers
        if any(bad) and self.delay is None:
            self.skipped += 1
            for m in self.methods:
                m.end_step()
            for p in self.params.values():
                p.grad = None
            return
        methods, grads = list(self.methods), list(grads)
        for rank, skip in enumerate(bad):  # delayed: the worker sends zeros through a spare method (as dga.py)
            if skip:
                grads[rank] = {name: torch.zeros_like(g) for name, g in grads[rank].items()}
                spare = methods[rank] = self._spares[rank]
                spare.epoch, spare.steps = self.methods[rank].epoch, self.methods[rank].steps
        prepared = [m.prepare(g, n) for m, g in zip(methods, grads)]
        gens = [{name: m.exchange(name, g[name], n) for name in self.params} for m, g in zip(methods, prepared)]
        if self.delay is not None and self.nonfinite == "skip":
            for worker, skip, g in zip(gens, bad, prepared):
                worker[NONFINITE_KEY] = flag_exchange(skip, next(iter(g.values())).device)
        results, sent = run_exchanges(gens)
        for m in self.methods:
            m.end_step()
        if self.delay is None:
            for name, p in self.params.items():
                p.grad = results[0][name].view_as(p).to(p.dtype)
        else:
            self._apply_delayed(grads, results[0])
        for rank, b in enumerate(sent):
            self.bytes_sent[rank] += b

    def _apply_delayed(self, grads: Sequence[dict[str, Tensor]], average: dict[str, Tensor]) -> None:
        """Delayed gradient averaging: worker k gets g_k,i - g_k,i-D + avg(g_i-D) (g_k,i while i < D)."""
        self._pending.append(([{n: g.detach().clone() for n, g in worker.items()} for worker in grads], average))
        old, avg = self._pending.popleft() if len(self._pending) > self.delay else (None, None)
        if avg is not None and avg.get(NONFINITE_KEY, 0):
            self.skipped += 1
            if self.delay == 0:
                for model in self.models:
                    for p in model.parameters():
                        p.grad = None
                return
            avg = {name: torch.zeros_like(g) for name, g in old[0].items()}  # the correction withdraws old
        for rank, model in enumerate(self.models):
            for name, p in model.named_parameters():
                if name not in self.params:
                    continue
                local = grads[rank][name]
                update = local if old is None else delayed_update(avg[name].view_as(p), local, old[rank][name],
                                                                  self.correction and self.delay > 0)
                p.grad = update.to(p.dtype).clone()

    def optimizer_step(self) -> None:
        """Step every worker's optimizer and clear the gradients."""
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.local_steps is not None and self.steps % self.local_steps == 0:
            self.average_models()

    @torch.no_grad()
    def average_models(self) -> None:
        """FedAvg: every worker's weights become their average, exchanged as :class:`gradcomp.FedAvg` does
        (a dense ``"none"`` exchange of the weights, summed in rank order); bytes counted from the payloads."""
        n = self.num_workers
        average = as_method("none")  # stateless: one for every worker
        named = [{name: p for name, p in m.named_parameters() if name in self.params} for m in self.models]
        weights = [average.prepare({name: p.detach() for name, p in worker.items()}, n) for worker in named]
        results, sent = run_exchanges([{name: average.exchange(name, w[name], n) for name in w} for w in weights])
        for worker, result in zip(named, results):
            for name, p in worker.items():
                p.copy_(result[name].view_as(p))
        for rank, b in enumerate(sent):
            self.bytes_sent[rank] += b

    def step(self, shards: Sequence[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> Tensor:
        """One data-parallel step; returns the workers' mean loss."""
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
        """Methods, counters and, with ``delay``, workers 1..N-1's models and optimizers and the pending
        steps (worker 0's model and optimizer are the caller's to save)."""
        return {
            "methods": [m.state_dict() for m in self.methods],
            "bytes_sent": list(self.bytes_sent),
            "dense_bytes": self.dense_bytes,
            "steps": self.steps,
            "replicas": [m.state_dict() for m in self.models[1:]],
            "optimizers": [o.state_dict() for o in self.optimizers[1:]],
            "pending": [{"grads": g, "average": a} for g, a in self._pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["methods"]) != self.num_workers:
            raise ValueError(f"state holds {len(state['methods'])} workers, this simulator has {self.num_workers}")
        if len(state.get("replicas", [])) != len(self.models) - 1:  # checked before anything is loaded
            raise ValueError(f"state holds {len(state.get('replicas', []))} worker models besides worker 0's, this "
                             f"simulator has {len(self.models) - 1} (delay={self.delay})")
        for m, s in zip(self.methods, state["methods"]):
            m.load_state_dict(s)
        self.bytes_sent = list(state["bytes_sent"])
        self.dense_bytes = int(state["dense_bytes"])
        self.steps = int(state["steps"])
        for model, s in zip(self.models[1:], state.get("replicas", [])):
            model.load_state_dict(s)
        for optimizer, s in zip(self.optimizers[1:], state.get("optimizers", [])):
            optimizer.load_state_dict(s)
        self._pending = deque((list(e["grads"]), dict(e["average"])) for e in state.get("pending", []))
