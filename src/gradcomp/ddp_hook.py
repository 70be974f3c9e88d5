"""gradcomp as a DDP communication hook.

>>> ddp = DistributedDataParallel(model)
>>> state = gradcomp.HookState(gradcomp.DGC(density=0.001), model=ddp)
>>> ddp.register_comm_hook(state, gradcomp.ddp_comm_hook)

Works wherever DDP does: plain DDP, Lightning (``DDPStrategy(ddp_comm_hook=
gradcomp.ddp_comm_hook, ddp_comm_state=state)``) and Accelerate (register on the
model ``prepare()`` returns).  Memory is keyed by parameter name, so DDP's
bucket rebuild after the first iteration changes nothing: every step, the
first one included, runs the method as configured.

Before any memory changes, the ranks check their settings agree (first step)
and that no rank holds a NaN or Inf (every step, :class:`~gradcomp.guard.StepGuard`).
A step with a non-finite gradient on any rank is skipped on every rank: the
hook leaves every memory as it was and hands DDP zero gradients, and
``state.step_skipped`` tells the loop not to step the optimizer (momentum and
weight decay would still move the weights)::

    loss.backward()
    if not state.step_skipped:
        optimizer.step()

``nonfinite="raise"`` raises instead, on the rank that saw it.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future

from .comm import Communicator
from .compressors.base import Compressor
from .guard import StepGuard
from .method import Method, as_method

__all__ = ["HookState", "ddp_comm_hook", "register_ddp_hook"]


def _write(names: list[str], grads: list[Tensor], averages: dict[str, Tensor]) -> None:
    """Put the averaged gradients into the bucket's gradient views."""
    for name, grad in zip(names, grads):
        grad.copy_(averages[name].view_as(grad))


class HookState:
    """What the hook keeps between calls: the method (this rank's copy), the communicator and parameter names.

    Pass ``model`` (the DDP model or the module it wraps) so memory is keyed by
    the real parameter names; without it, names are ``param0, param1, ...``
    in the order DDP first hands the parameters to the hook (deterministic
    for a given model, but not the names other front doors use).
    """

    def __init__(self, method: Method | Compressor | str, process_group: dist.ProcessGroup | None = None, *,
                 model: nn.Module | None = None, emulate_latency_ms: float = 0.0, nonfinite: str = "skip") -> None:
        self.guard = StepGuard(nonfinite)
        self.comm = Communicator(process_group, emulate_latency_ms=emulate_latency_ms)
        self.configured = as_method(method)  # as given: the same on every rank (the settings check compares it)
        self.method = self.configured.for_rank(self.comm.rank)
        #: True when the last step was skipped on every rank (a non-finite gradient somewhere)
        self.step_skipped = False
        self.names: dict[int, str] = {}
        if model is not None:
            module = getattr(model, "module", model)
            self.names = {id(p): name for name, p in module.named_parameters()}
        self._deferred: list = []  # (names, grads, bucket buffer, future) waiting for the last bucket

    @property
    def defer(self) -> bool:
        """Whether this step's buckets wait for the last one: the guard (and DGC's clipping) needs every
        gradient; with ``nonfinite="raise"`` and no clipping, only the first step (the settings check) waits."""
        return self.method.needs_all_gradients or self.guard.nonfinite == "skip" or not self.guard.settings_checked

    def name_of(self, param: Tensor) -> str:
        return self.names.setdefault(id(param), f"param{len(self.names)}")

    def run(self, names: list[str], grads: list[Tensor], out: Tensor) -> Future:
        """Exchange one bucket; the future completes with ``out`` (the bucket buffer) holding the averages."""
        world = self.comm.world_size
        prepared = self.method.prepare(dict(zip(names, grads)), world)
        future = self.comm.exchange({n: self.method.exchange(n, prepared[n], world) for n in names})

        def write(f: Future) -> Tensor:
            _write(names, grads, f.value())
            return out

        return future.then(write)

    def run_deferred(self) -> None:
        """Methods that need every gradient first (DGC's local clipping by the global norm) run at the last bucket."""
        buckets, self._deferred = self._deferred, []
        world = self.comm.world_size
        names = [n for b in buckets for n in b[0]]
        grads = [g for b in buckets for g in b[1]]
        self.step_skipped = not self.guard.check(self.comm, self.configured, dict(zip(names, grads)))
        if self.step_skipped:
            for _, bucket_grads, out, placeholder in buckets:
                out.zero_()
                for g in bucket_grads:  # views into ``out`` on CPU and CUDA alike, but not promised by DDP
                    g.zero_()
                placeholder.set_result(out)
            return
        prepared = self.method.prepare(dict(zip(names, grads)), world)
        for bucket_names, bucket_grads, out, placeholder in buckets:
            future = self.comm.exchange({n: self.method.exchange(n, prepared[n], world) for n in bucket_names})

            def complete(f: Future, bucket_names=bucket_names, bucket_grads=bucket_grads, out=out,
                         placeholder=placeholder) -> None:
                try:
                    _write(bucket_names, bucket_grads, f.value())
                    placeholder.set_result(out)
                except Exception as error:  # noqa: BLE001 - DDP must see it, not hang
                    placeholder.set_exception(error)

            future.then(complete)

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.guard.load_state_dict(state.get("guard", {}))


# No ``from __future__ import annotations`` here: DDP checks the hook's annotations as objects.
def ddp_comm_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compress, exchange and average one bucket with ``state.method``."""
    names = [state.name_of(p) for p in bucket.parameters()]
    grads = list(bucket.gradients())
    try:
        if state.defer:
            placeholder: Future = Future()
            state._deferred.append((names, grads, bucket.buffer(), placeholder))
            if bucket.is_last():
                state.run_deferred()
            return placeholder
        return state.run(names, grads, bucket.buffer())
    finally:
        if bucket.is_last():
            state.method.end_step()


def register_ddp_hook(model: nn.parallel.DistributedDataParallel, method: Method | Compressor | str,
                      process_group: dist.ProcessGroup | None = None, *,
                      emulate_latency_ms: float = 0.0, nonfinite: str = "skip") -> HookState:
    """Register gradcomp's hook on a DDP model, with memory keyed by its parameter names; returns the state.
    ``emulate_latency_ms``: see :class:`~gradcomp.comm.Communicator` (experiments only); ``nonfinite``:
    ``"skip"`` or ``"raise"`` (see the module docstring)."""
    state = HookState(method, process_group, model=model, emulate_latency_ms=emulate_latency_ms,
                      nonfinite=nonfinite)
    model.register_comm_hook(state, ddp_comm_hook)
    return state
