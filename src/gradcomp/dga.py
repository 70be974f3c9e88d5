"""Delayed Gradient Averaging (Zhu, Lin, Lu, Han; NeurIPS 2021): train through network latency.

Each worker keeps computing while the average of its gradient travels, and
applies that average ``D`` steps later, corrected by its own newer gradient::

    w <- w - lr * (g_i - g_{i-D} + avg(g_{i-D}))      (i >= D)
    w <- w - lr * g_i                                  (i < D)

``g_i`` is this worker's gradient at step i and ``avg(g_{i-D})`` the average
over workers started D steps earlier.  Without the correction the update is
``avg(g_{i-D})`` alone (the paper's "w/o correction" row).  ``delay=0`` is
synchronous data-parallel SGD.

::

    opt = gradcomp.DelayedGradientAveraging(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                            model.named_parameters(), delay=5)
    loss.backward(); opt.step(); opt.zero_grad()

The workers' models differ by their local terms; momentum and weight decay
stay the wrapped optimizer's, applied to the corrected gradient.

:class:`FedAvg` is local SGD: ``period=K`` local steps, then the weights'
average.  With ``delay=D`` it combines with DGA (the paper's "DGA (K = 5,
D = 20)"): every K steps worker k starts averaging its delta since its
previous snapshot, ``Delta^k_r = w^k - s^k_{r-1}``, and D steps later swaps
its own delta for the average, keeping its progress since::

    w^k <- w^k - Delta^k_r + mean_j Delta^j_r

``delay=0`` is FedAvg as McMahan et al. define it (the weights replaced by
their average).

Non-finite gradients (``nonfinite="skip"``, the default): the ranks cannot
agree on a step before it is taken without paying the latency DGA hides, so
the verdict travels with the step's average (one float32 more in its dense
all-reduce).  The rank that sees a NaN or Inf applies and sends zeros
instead (through a spare copy of its method: its own memory untouched); when
the step's average arrives, ``delay`` steps later, every rank learns of it,
applies no average for that step and withdraws its own gradient of it (the
correction term), so the step leaves no trace on any rank's weights beyond
the ``delay`` steps it was applied locally.  With a method that keeps memory
(residuals, DGC's momentum), the other ranks' memory has taken that step
before they could know.  ``nonfinite="raise"`` raises at once.

Mixed precision: use bf16 autocast, which needs no loss scaling.  A
``torch.amp.GradScaler`` does not fit these doors: its ``scaler.step(opt)``
skips ``opt.step()`` on a rank whose local gradient overflowed, so that rank
leaves the step's exchange and its peers fail at the collective timeout (the
DDP hook and :class:`~gradcomp.DistributedOptimizer` take the scaler instead).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import Communicator, Pending
from .compressors.base import Compressor, check_int
from .core import Core, Door
from .guard import NONFINITE_KEY, Nonfinite, flag_exchange, non_finite, nonfinite_step
from .method import Method
from .optim import OptimizerWrapper, trained_parameters

__all__ = ["DelayedGradientAveraging", "FedAvg", "delayed_update"]

log = logging.getLogger(__name__)

def delayed_update(average: Tensor, local: Tensor, stale_local: Tensor, correct: bool) -> Tensor:
    """What a worker applies when the average of step i - D arrives at step i.  The one place of DGA's rule,
    for the real ranks and the simulator alike.

    Args:
        average: ``avg(g_{i-D})``, the average over workers of step i - D's gradients.
        local: ``g_i``, this worker's gradient now.
        stale_local: ``g_{i-D}``, this worker's gradient of step i - D.
        correct: apply the paper's correction.

    Returns:
        ``avg(g_{i-D}) + g_i - g_{i-D}``, or with ``correct=False`` the average alone (``average`` itself).

    Example:
        >>> import torch
        >>> from gradcomp.dga import delayed_update
        >>> delayed_update(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0]), correct=True)
        tensor([-0.5000])
    """
    return average + local - stale_local if correct else average


def _check_saved(tensors: dict[str, Tensor], params: dict[str, Tensor], entries: str, entry: str, *,
                 verb: str = "do", besides: frozenset[str] = frozenset()) -> None:
    """A one-line ValueError unless a checkpoint's ``tensors`` hold one tensor of each parameter's size and
    nothing else (but the keys ``besides``), naming the ``entries`` or the ``entry``."""
    unknown = (set(tensors) - besides) ^ set(params)
    if unknown:
        raise ValueError(f"the checkpoint's {entries} {verb} not match the parameters: "
                         f"{', '.join(sorted(unknown)[:5])}")
    for n, p in params.items():
        t = tensors[n]
        if not isinstance(t, Tensor) or t.numel() != p.numel():
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"the checkpoint's {entry} {n!r} is {got}, the parameter {list(p.shape)}")


class _Finished:
    """A pending average that has already arrived (restored from a checkpoint)."""

    def __init__(self, result: dict[str, Tensor]) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def wait(self) -> dict[str, Tensor]:
        return self._result


class DelayedGradientAveraging(OptimizerWrapper, Door):
    """Wrap ``optimizer``: each ``step()`` starts averaging this step's gradients (``async_op``) and applies
    the average started ``delay`` steps ago, with the correction term unless ``correction=False``.

    ``method`` compresses the average (any compressor name or instance, or
    :class:`~gradcomp.DGC`; None: plain averaging), so latency hiding and
    bandwidth reduction combine.  A method whose memory needs the received
    result (a multi-round compressor with memory: PowerSGD) cannot have two
    steps in flight: each step then waits for the previous step's exchange,
    and latency is not hidden.  ``emulate_latency_ms`` is the communicator's
    latency emulation (experiments only; see :mod:`gradcomp.comm`);
    ``nonfinite`` is ``"skip"`` or ``"raise"`` (see the module docstring).

    Args:
        optimizer: the optimizer to wrap (its momentum and weight decay act on the corrected gradient).
        named_parameters: the model's ``named_parameters()``; those that require grad must be in
            ``optimizer``.
        delay: ``D``, the steps between starting an average and applying it (>= 0; 0: synchronous SGD).
        method: what compresses the average (None: plain dense averaging).
        correction: apply the correction term ``g_i - g_{i-D}``.
        process_group: the group to average over (None: the default group), or a communicator already made.
        emulate_latency_ms: see :class:`~gradcomp.comm.Communicator` (experiments only).
        nonfinite: ``"skip"`` or ``"raise"``.

    Raises:
        ValueError: a bad setting (``delay`` < 0, say), a parameter not in ``optimizer``, or an optimizer the
            method cannot be paired with.

    Example:
        In a process group of one (under ``torchrun`` every rank runs the same lines, without the first and
        the last): the first ``delay`` steps apply the local gradient, later ones the average of ``delay``
        steps ago, corrected.

        >>> import torch, torch.distributed as dist, gradcomp
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = gradcomp.DelayedGradientAveraging(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        ...                                         model.named_parameters(), delay=2, method="fp16")
        >>> for _ in range(3):
        ...     model(torch.randn(4, 8)).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> opt.steps, len(opt.state_dict()["pending"])  # two averages in flight
        (3, 2)
        >>> dist.destroy_process_group()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]],
                 delay: int, method: Method | Compressor | str | None = None, correction: bool = True,
                 process_group: dist.ProcessGroup | Communicator | None = None, *, emulate_latency_ms: float = 0.0,
                 nonfinite: Nonfinite = "skip") -> None:
        check_int("DelayedGradientAveraging", "delay", delay, 0)
        self.optimizer = optimizer
        self.delay = delay
        self.correction = bool(correction)
        self.core = Core(method if method is not None else "none", process_group, owner="DelayedGradientAveraging",
                         nonfinite=nonfinite, emulate_latency_ms=emulate_latency_ms, optimizer=optimizer)
        self._spare: Method | None = None  # sends the zeros of a step this rank skips
        self.params = trained_parameters(named_parameters, optimizer)
        # (this step's local gradients, the pending average of them), oldest first
        self._pending: deque[tuple[dict[str, Tensor], Pending | _Finished]] = deque()
        self.skipped = 0

    def synchronize(self) -> None:
        """Start averaging this step's gradients; write the (corrected) average of step ``i - delay`` to
        ``p.grad`` (``step()`` then steps the wrapped optimizer)."""
        self.step_skipped = False
        local = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in self.params.items()}
        core = self.core
        # at the first step (also after a resume), before any payload
        core.check_settings(local, delay=self.delay, correction=self.correction)
        method = core.method
        if nonfinite_step(local, core.guard.nonfinite, f"rank {core.rank}, step {self.steps}",
                          "this rank sends zeros and every rank skips the step when its average arrives"):
            local = {n: torch.zeros_like(g) for n, g in local.items()}  # nothing of it enters memory or weights
            if self._spare is None:
                self._spare = core.configured.for_rank(core.rank)
            method, self._spare.epoch, self._spare.steps = self._spare, core.method.epoch, core.method.steps
        prepared = method.prepare(local, core.world_size)
        if method.memory_waits_for_result and self._pending:
            self._pending[-1][1].wait()  # its memory must be settled before this step compensates
        gens = core.exchanges(prepared, list(self.params), method=method)
        if core.guard.nonfinite == "skip":
            gens[NONFINITE_KEY] = flag_exchange(method is self._spare, next(iter(local.values())).device)
        self._pending.append((local, core.comm.exchange_later(gens)))
        core.end_step()
        if len(self._pending) > self.delay:
            old, pending = self._pending.popleft()
            average = pending.wait()
            corrupt = non_finite({n: a for n, a in average.items() if n != NONFINITE_KEY})  # every rank alike
            if average.get(NONFINITE_KEY, 0) or corrupt:
                self.skipped += 1
                log.warning("step %d skipped on every rank: %s", self.steps - 1 - self.delay,
                            f"the decoded average holds NaN or Inf in {', '.join(corrupt[:5])} (a payload damaged "
                            "on the wire?)" if corrupt else "a rank's gradient was not finite")
                if self.delay == 0:
                    self.step_skipped = True  # synchronous: the optimizer does not step, as GradScaler skips
                    return
                average = {n: torch.zeros_like(g) for n, g in old.items()}  # and the correction withdraws old
            for n, p in self.params.items():
                self._write(p, delayed_update(average[n].view_as(p), local[n], old[n],
                                              self.correction and self.delay > 0))
        else:
            for n, p in self.params.items():
                self._write(p, local[n])

    @staticmethod
    def _write(p: Tensor, update: Tensor) -> None:
        update = update.to(p.dtype)
        if p.grad is None:
            p.grad = update
        else:
            p.grad.copy_(update)

    def finish(self) -> None:
        """Wait for every average in flight (they stay queued for their steps)."""
        for _, pending in self._pending:
            pending.wait()

    def state_dict(self) -> dict[str, Any]:
        """This rank's state, for checkpoints.

        Returns:
            The optimizer's and the method's state and the ``delay`` pending steps: their local gradients and
            their averages (in-flight ones are waited for first, on every rank alike).
        """
        self.finish()
        return {"optimizer": self.optimizer.state_dict(), "method": self.core.state_dict()["method"],
                "delay": self.delay, "steps": self.steps,
                "pending": [{"local": local, "average": pending.wait()} for local, pending in self._pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (its pending averages count as arrived), after checking it fits.

        Args:
            state: what :meth:`state_dict` returned (on this rank).

        Raises:
            ValueError: it was saved with another ``delay``, its gradients do not fit the parameters, or its
                method state does not fit; nothing is changed.
        """
        if state["delay"] != self.delay:
            raise ValueError(f"the checkpoint was saved with delay={state['delay']}, this optimizer has "
                             f"delay={self.delay}")
        for entry in state["pending"]:
            for key in ("local", "average"):
                _check_saved(entry[key], self.params, f"pending {key} gradients", f"pending {key} gradient",
                             besides=frozenset({NONFINITE_KEY}))  # the non-finite verdict travels beside them
        self.core.check_state({"method": state["method"]}, self.params)  # before anything changes
        self.finish()
        self.optimizer.load_state_dict(state["optimizer"])
        self.core.load_state_dict({"method": state["method"]}, self.params)
        self._pending = deque((dict(e["local"]), _Finished(dict(e["average"]))) for e in state["pending"])


class _Round:
    """One FedAvg round: the step it started, this worker's weights at the start of its window (``start``) and
    at its end (``sent``), and the pending average of every worker's ``sent``."""

    def __init__(self, step: int, start: dict[str, Tensor], sent: dict[str, Tensor],
                 pending: Pending | _Finished) -> None:
        self.step, self.start, self.sent, self.pending = step, start, sent, pending


class FedAvg(OptimizerWrapper, Door):
    """Local SGD / federated averaging (McMahan et al. 2017), the other way to save communication rounds:
    every worker takes ``period`` optimizer steps on its own gradients, then the workers' weights are
    averaged (one dense all-reduce of the parameters, through the same communicator)::

        opt = gradcomp.FedAvg(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), period=10)
        loss.backward(); opt.step(); opt.zero_grad()

    With ``delay=D`` the average arrives ``D`` steps after it started, as in delayed gradient averaging (Zhu et
    al. 2021, "DGA (K = 5, D = 20)" in its second table), and the worker keeps training meanwhile.  Round r
    starts at step rK: worker k snapshots its weights and starts averaging its delta since the previous
    snapshot (the first: its weights at the first step), ``Delta^k_r = w^k - s^k_{r-1}``.  At step rK + D it
    replaces its own delta by the average, keeping its local progress since (DGA's correction, in weight
    space)::

        w^k <- w^k - Delta^k_r + mean_j Delta^j_r

    A correction that arrives inside a window moves that window's snapshot too, so a delta is always the
    worker's own local progress; any ``D >= 0`` works, with ``ceil(D / K)`` rounds in flight at most (D = 20,
    K = 5: four; D need not be a multiple of K).  What crosses the wire is each round's weights, as without a
    delay (the same bytes): ``mean_j Delta^j_r`` is the difference of two consecutive rounds' averages, the
    mean of the snapshots being the previous round's average.  ``delay=0`` is plain FedAvg, bit for bit: the
    weights replaced by their average.  Workers whose first weights differ are drawn together by the first
    round's average.  Rounds still in flight when training stops are not applied: each worker's model then
    holds its own last deltas (as it holds its local steps after the last average).

    Optimizer state (momentum) stays local.  ``emulate_latency_ms``: see :mod:`gradcomp.comm`.  A worker whose
    gradient holds a NaN or Inf skips that local step (``nonfinite="skip"``; the others need not know, nothing is
    exchanged) or raises (``"raise"``).  An average of the weights that holds a NaN or Inf (a payload damaged on
    the wire; every rank decodes the same bytes) is refused on every rank: each keeps its own weights (that
    round's correction is not applied) and its delta joins the next round's, as weights are averaged whole
    without a delay.

    Args:
        optimizer: the optimizer of the local steps.
        named_parameters: the model's ``named_parameters()``; those that require grad must be in
            ``optimizer``.
        period: ``K``, local steps between two averages (>= 1).
        process_group: the group to average over (None: the default group), or a communicator already made.
        delay: ``D``, the steps between starting an average and applying it (>= 0).
        emulate_latency_ms: see :class:`~gradcomp.comm.Communicator` (experiments only).
        nonfinite: ``"skip"`` or ``"raise"``.

    Raises:
        ValueError: ``period`` < 1 or ``delay`` < 0 (naming the value), or a parameter not in ``optimizer``.

    Example:
        In a process group of one (under ``torchrun`` every rank runs the same lines, without the first and
        the last):

        >>> import torch, torch.distributed as dist, gradcomp
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = gradcomp.FedAvg(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), period=2)
        >>> for _ in range(4):  # the weights are averaged after steps 2 and 4
        ...     model(torch.randn(4, 8)).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> opt.steps, opt.comm.bytes_sent  # 2 rounds of 18 float32 weights
        (4, 144)
        >>> dist.destroy_process_group()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]],
                 period: int, process_group: dist.ProcessGroup | Communicator | None = None, *, delay: int = 0,
                 emulate_latency_ms: float = 0.0, nonfinite: Nonfinite = "skip") -> None:
        check_int("FedAvg", "period", period, 1)
        check_int("FedAvg", "delay", delay, 0)
        self.optimizer = optimizer
        self.period = period
        self.delay = delay
        # the weights are averaged densely ("none"): the core keeps the step count, the guard, the communicator
        self.core = Core("none", process_group, owner="FedAvg", nonfinite=nonfinite,
                         emulate_latency_ms=emulate_latency_ms)
        self.params = trained_parameters(named_parameters, optimizer)
        self.skipped = 0  # local steps skipped for a non-finite gradient, and averages refused as non-finite
        self._snapshot: dict[str, Tensor] | None = None  # the open window's start (taken at the first step)
        self._last: dict[str, Tensor] | None = None  # the last average applied (at first: the first snapshot)
        self._rounds: deque[_Round] = deque()  # in flight, oldest first

    def _weights(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def _begin(self) -> None:
        """The first snapshot, once (not after a load that holds one): the weights now, also the last average."""
        if self._snapshot is None:
            self._snapshot = self._weights()
            self._last = dict(self._snapshot)

    def synchronize(self) -> None:
        """Nothing to exchange before a local step: the settings check (first step) and this rank's own
        non-finite check."""
        core = self.core
        core.check_settings(self.params, period=self.period, delay=self.delay)
        self._begin()
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        self.step_skipped = nonfinite_step(grads, core.guard.nonfinite, f"rank {core.rank}, step {self.steps}",
                                           "this rank skips its local step")
        self.skipped += self.step_skipped

    def step_optimizer(self, closure: Callable[[], float] | None = None) -> Any:
        """The local step; every ``period`` steps a round starts; the round started ``delay`` steps ago is
        applied.

        Args:
            closure: as for the wrapped optimizer's ``step``.

        Returns:
            What the wrapped optimizer's ``step`` returned (None when this rank skipped its local step).
        """
        out = super().step_optimizer(closure)
        self.core.end_step()
        if self.steps % self.period == 0:
            self.average()
        else:
            self.apply_due()
        return out

    @torch.no_grad()
    def average(self) -> None:
        """Start a round now (snapshot, exchange of the weights); apply every round due (with ``delay=0``:
        this one, every worker's weights replaced by their average)."""
        self._begin()  # (a round before any synchronize())
        assert self._snapshot is not None  # _begin took it
        sent = self._weights()
        core = self.core
        pending = core.comm.exchange_later(core.exchanges(core.method.prepare(sent, core.world_size)))  # NaN raise
        self._rounds.append(_Round(self.steps, self._snapshot, sent, pending))
        self._snapshot = dict(sent)
        self.apply_due()

    @torch.no_grad()
    def apply_due(self) -> None:
        """Apply the rounds started ``delay`` steps ago or earlier (``step_optimizer`` calls it every step)."""
        while self._rounds and self.steps - self._rounds[0].step >= self.delay:
            self._apply(self._rounds.popleft())

    def _apply(self, done: _Round) -> None:
        assert self._snapshot is not None and self._last is not None  # _begin took them before the first round
        averages = done.pending.wait()
        corrupt = non_finite(averages)  # the same on every rank: every rank decodes the same bytes
        if corrupt:
            self.skipped += 1
            log.warning("rank %d keeps its own weights: their average holds NaN or Inf in %s (a payload damaged "
                        "on the wire?)", self.core.rank, ", ".join(corrupt[:5]))
            # the round's delta joins the next one's: that round's start moves back to this one's
            later = self._rounds[0].start if self._rounds else self._snapshot
            moved = {n: done.start[n] + (later[n] - done.sent[n]) for n in self.params}
            if self._rounds:
                self._rounds[0].start = moved
            else:
                self._snapshot = moved
            return
        snapshot, last = {}, {}
        for n, p in self.params.items():
            w, average = p.detach(), averages[n].view_as(p)
            # w - Delta^k_r + mean_j Delta^j_r, written so that delay=0 gives the average exactly (both terms 0)
            new = average + ((w - done.sent[n]) + (done.start[n] - self._last[n]))
            snapshot[n] = new + (self._snapshot[n] - w)  # the open window keeps its local progress
            last[n] = average
            p.copy_(new)
        self._snapshot, self._last = snapshot, last

    def finish(self) -> None:
        """Wait for every round in flight (they stay queued for their steps)."""
        for r in self._rounds:
            r.pending.wait()

    def state_dict(self) -> dict[str, Any]:
        """This rank's state, for checkpoints.

        Returns:
            The optimizer's state, the counters, the open window's snapshot, the last average applied and
            every round in flight (its average waited for first, on every rank alike).
        """
        self.finish()
        return {"optimizer": self.optimizer.state_dict(), "period": self.period, "delay": self.delay,
                "steps": self.steps, "snapshot": self._snapshot, "last": self._last,
                "rounds": [{"step": r.step, "start": r.start, "sent": r.sent, "average": r.pending.wait()}
                           for r in self._rounds]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (its rounds in flight count as arrived), after checking it fits.

        Args:
            state: what :meth:`state_dict` returned (on this rank).

        Raises:
            ValueError: it was saved with another ``period`` or ``delay``, or its weights do not fit the
                parameters; nothing is changed.
        """
        if state["period"] != self.period:
            raise ValueError(f"the checkpoint was saved with period={state['period']}, this FedAvg has "
                             f"period={self.period}")
        if state.get("delay", 0) != self.delay:
            raise ValueError(f"the checkpoint was saved with delay={state.get('delay', 0)}, this FedAvg has "
                             f"delay={self.delay}")
        rounds = state.get("rounds", [])
        named = [("snapshot", state.get("snapshot")), ("last", state.get("last"))]
        named += [(f"round {i} {key}", r[key]) for i, r in enumerate(rounds) for key in ("start", "sent", "average")]
        for what, tensors in named:
            if tensors is not None:
                _check_saved(tensors, self.params, f"FedAvg {what}", f"FedAvg {what}", verb="does")
        self.finish()
        self.optimizer.load_state_dict(state["optimizer"])
        self.core.load_state_dict({"method": {**self.core.state_dict()["method"], "steps": int(state["steps"])}})
        self._snapshot = None if state.get("snapshot") is None else dict(state["snapshot"])
        self._last = None if state.get("last") is None else dict(state["last"])
        self._rounds = deque(_Round(int(r["step"]), dict(r["start"]), dict(r["sent"]), _Finished(dict(r["average"])))
                             for r in rounds)
