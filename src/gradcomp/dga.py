"""Delayed Gradient Averaging (Zhu, Lin, Lu, Han; NeurIPS 2021): train through network latency.

Each worker keeps computing while the average of its gradient travels, and
applies that average ``D`` steps later, corrected by its own newer gradient::

    w <- w - lr * (g_i - g_{i-D} + avg(g_{i-D}))      (i >= D)
    w <- w - lr * g_i                                  (i < D)

``g_i`` is this worker's gradient at step i and ``avg(g_{i-D})`` the average
over workers started D steps earlier.  Without the correction the update is
``avg(g_{i-D})`` alone (the paper's "w/o correction" row).  ``delay=0`` is
synchronous data-parallel SGD.

>>> opt = gradcomp.DelayedGradientAveraging(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
...                                         model.named_parameters(), delay=5)
>>> loss.backward(); opt.step(); opt.zero_grad()

The workers' models differ by their local terms; momentum and weight decay
stay the wrapped optimizer's, applied to the corrected gradient.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import Communicator, Pending
from .compressors.base import Compressor, check_int
from .method import Method, as_method, check_optimizer
from .optim import OptimizerWrapper, trained_parameters

__all__ = ["DelayedGradientAveraging", "FedAvg", "delayed_update"]


def delayed_update(average: Tensor, local: Tensor, stale_local: Tensor, correct: bool) -> Tensor:
    """What a worker applies when the average of step i - D arrives at step i: ``avg(g_{i-D}) + g_i - g_{i-D}``
    (the paper's correction) or, with ``correct=False``, the average alone.  The one place of DGA's rule,
    for the real ranks and the simulator alike."""
    return average + local - stale_local if correct else average


class _Finished:
    """A pending average that has already arrived (restored from a checkpoint)."""

    def __init__(self, result: dict[str, Tensor]) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def wait(self) -> dict[str, Tensor]:
        return self._result


class DelayedGradientAveraging(OptimizerWrapper):
    """Wrap ``optimizer``: each ``step()`` starts averaging this step's gradients (``async_op``) and applies
    the average started ``delay`` steps ago, with the correction term unless ``correction=False``.

    ``method`` compresses the average (any compressor name or instance, or
    :class:`~gradcomp.DGC`; None: plain averaging), so latency hiding and
    bandwidth reduction combine.  A method whose memory needs the received
    result (a multi-round compressor with memory: PowerSGD) cannot have two
    steps in flight: each step then waits for the previous step's exchange,
    and latency is not hidden.  ``emulate_latency_ms`` is the communicator's
    latency emulation (experiments only; see :mod:`gradcomp.comm`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]],
                 delay: int, method: Method | Compressor | str | None = None, correction: bool = True,
                 process_group: dist.ProcessGroup | None = None, *, emulate_latency_ms: float = 0.0) -> None:
        check_int("DelayedGradientAveraging", "delay", delay, 0)
        self.optimizer = optimizer
        self.delay = delay
        self.correction = bool(correction)
        self.comm = Communicator(process_group, emulate_latency_ms=emulate_latency_ms)
        self.method = as_method(method if method is not None else "none").for_rank(self.comm.rank)
        check_optimizer(self.method, optimizer)
        self.params = trained_parameters(named_parameters, optimizer)
        # (this step's local gradients, the pending average of them), oldest first
        self._pending: deque[tuple[dict[str, Tensor], Pending | _Finished]] = deque()
        self.steps = 0

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Start averaging this step's gradients; apply the (corrected) average of step ``i - delay``."""
        local = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in self.params.items()}
        world = self.comm.world_size
        prepared = self.method.prepare(local, world)  # raises on NaN/Inf before any memory changes
        if self.method.memory_waits_for_result and self._pending:
            self._pending[-1][1].wait()  # its memory must be settled before this step compensates
        gens = {n: self.method.exchange(n, prepared[n], world) for n in self.params}
        self._pending.append((local, self.comm.exchange_later(gens)))
        self.method.end_step()
        self.steps += 1
        if len(self._pending) > self.delay:
            old, pending = self._pending.popleft()
            average = pending.wait()
            for n, p in self.params.items():
                self._write(p, delayed_update(average[n].view_as(p), local[n], old[n],
                                              self.correction and self.delay > 0))
        else:
            for n, p in self.params.items():
                self._write(p, local[n])
        return self.optimizer.step(closure)

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
        """Optimizer, method and the ``delay`` pending steps: their local gradients and their averages
        (in-flight ones are waited for first, on every rank alike)."""
        self.finish()
        return {"optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "delay": self.delay, "steps": self.steps,
                "pending": [{"local": local, "average": pending.wait()} for local, pending in self._pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["delay"] != self.delay:
            raise ValueError(f"the checkpoint was saved with delay={state['delay']}, this optimizer has "
                             f"delay={self.delay}")
        for entry in state["pending"]:
            for key in ("local", "average"):
                unknown = set(entry[key]) ^ set(self.params)
                if unknown:
                    raise ValueError(f"the checkpoint's pending {key} gradients do not match the parameters: "
                                     f"{', '.join(sorted(unknown)[:5])}")
        self.finish()
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.steps = int(state["steps"])
        self._pending = deque((dict(e["local"]), _Finished(dict(e["average"]))) for e in state["pending"])


class FedAvg(OptimizerWrapper):
    """Local SGD / federated averaging (McMahan et al. 2017), the other way to save communication rounds:
    every worker takes ``period`` optimizer steps on its own gradients, then the workers' weights are
    averaged (one dense all-reduce of the parameters, through the same communicator).

    >>> opt = gradcomp.FedAvg(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), period=10)
    >>> loss.backward(); opt.step(); opt.zero_grad()

    Optimizer state (momentum) stays local.  ``emulate_latency_ms``: see :mod:`gradcomp.comm`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]],
                 period: int, process_group: dist.ProcessGroup | None = None, *,
                 emulate_latency_ms: float = 0.0) -> None:
        check_int("FedAvg", "period", period, 1)
        self.optimizer = optimizer
        self.period = period
        self.comm = Communicator(process_group, emulate_latency_ms=emulate_latency_ms)
        self.params = trained_parameters(named_parameters, optimizer)
        self._average = as_method("none")
        self.steps = 0

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        out = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.period == 0:
            self.average()
        return out

    @torch.no_grad()
    def average(self) -> None:
        """Replace every worker's weights by their average now."""
        world = self.comm.world_size
        weights = self._average.prepare({n: p.detach() for n, p in self.params.items()}, world)  # NaN/Inf raise
        averages = self.comm.exchange({n: self._average.exchange(n, w, world) for n, w in weights.items()}).wait()
        for n, p in self.params.items():
            p.copy_(averages[n].view_as(p))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "period": self.period, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["period"] != self.period:
            raise ValueError(f"the checkpoint was saved with period={state['period']}, this FedAvg has "
                             f"period={self.period}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
