"""``DistributedOptimizer``: gradcomp for training loops without DDP (Horovod style)::

    opt = gradcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        model.named_parameters(), gradcomp.DGC(density=0.001))
    loss.backward(); opt.step(); opt.zero_grad()

Parameters are grouped into buckets (reverse registration order, about
``bucket_cap_mb`` each, like DDP).  A post-accumulate-grad hook counts each
parameter's backward passes; when every parameter of a bucket has its
gradient for the step, the bucket's exchange starts, while backward goes on.
Buckets start strictly in order so every rank issues the same collectives
in the same order.  ``step()`` starts any bucket still waiting (parameters
that got no gradient count as zero), waits, writes the averaged gradients
to ``p.grad`` and steps the wrapped optimizer.

With ``nonfinite="skip"`` (the default) the ranks agree after the last
bucket that none of them held a NaN or Inf (see :class:`~gradcomp.core.Step`).
A step where one did is skipped on every rank: memory put back as it was,
``p.grad`` set to None, the wrapped optimizer not stepped, ``step_skipped``
True.

Mixed precision: given the ``torch.amp.GradScaler`` (``scaler=``), the method
works on gradients with the loss scale divided out and ``p.grad`` gets the
average times the scale, as with the DDP hook (see :mod:`gradcomp.ddp_hook`);
a skipped step leaves Inf in every ``p.grad``.  The scaler must read the
averaged gradients, so synchronize before it steps::

    scaler.scale(loss).backward()
    opt.synchronize()       # p.grad: the scaled average (Inf on a skipped step)
    scaler.step(opt)        # unscales, checks, and steps the wrapped optimizer (step() does not exchange again)
    scaler.update()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from .compressors.base import Compressor
from .core import Core, Door, Step
from .guard import Nonfinite
from .method import Method

__all__ = ["DistributedOptimizer", "OptimizerWrapper"]


def trained_parameters(named_parameters: Iterable[tuple[str, Tensor]], optimizer: torch.optim.Optimizer
                       ) -> dict[str, Tensor]:
    """The parameters a wrapper exchanges: those that require grad.

    Args:
        named_parameters: the model's ``named_parameters()``.
        optimizer: the optimizer every one of them must be in.

    Returns:
        ``{name: parameter}`` of those that require grad, in order.

    Raises:
        ValueError: a name comes twice, or a parameter is not in ``optimizer`` (the message names it).
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("named_parameters holds a name twice")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in named if id(p) not in in_optimizer]
    if missing:
        raise ValueError(f"parameters not in the optimizer: {', '.join(missing[:5])}")
    return dict(named)


class OptimizerWrapper:
    """What gradcomp's optimizer wrappers share: ``step()`` is :meth:`synchronize` (the exchanges, the
    gradients written to ``p.grad``) then :meth:`step_optimizer` (the wrapped optimizer's step, unless every
    rank skipped it), so a caller may act on the gradients in between (clip them, for example)."""

    optimizer: torch.optim.Optimizer
    #: True when this step was skipped (a non-finite gradient): the wrapped optimizer does not step
    step_skipped: bool = False

    def synchronize(self) -> None:
        """This step's exchanges; the gradients to apply end in ``p.grad``.

        Raises:
            NotImplementedError: in this base class; each wrapper implements it.
        """
        raise NotImplementedError

    def step_optimizer(self, closure: Callable[[], float] | None = None) -> Any:
        """The wrapped optimizer's step after :meth:`synchronize` (none when the step was skipped).

        Args:
            closure: as for the wrapped optimizer's ``step``.

        Returns:
            What the wrapped optimizer's ``step`` returned; None when the step was skipped.
        """
        return self.optimizer.step(closure) if not self.step_skipped else None

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """:meth:`synchronize`, then :meth:`step_optimizer`.

        Args:
            closure: as for the wrapped optimizer's ``step``.

        Returns:
            What :meth:`step_optimizer` returned.
        """
        self.synchronize()
        return self.step_optimizer(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``.

        Args:
            set_to_none: set the gradients to None rather than to zero.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's param groups (learning-rate schedulers change them here)."""
        return self.optimizer.param_groups


class DistributedOptimizer(OptimizerWrapper, Door):
    """Wrap ``optimizer`` so its gradients are averaged across ranks through ``method``.

    ``backward_passes_per_step`` backward passes accumulate locally before
    the exchange (gradient accumulation).  With :class:`~gradcomp.DGC` the
    method owns momentum: the wrapped optimizer must be SGD with
    ``momentum=0`` (weight decay stays there, never sent, scaled by
    :func:`~gradcomp.sgd_settings`).  ``nonfinite``: ``"skip"`` or ``"raise"``
    (see :mod:`gradcomp.guard`).  ``scaler``: the ``torch.amp.GradScaler`` that scales the loss, if one
    does (see the module docstring).

    Args:
        optimizer: the optimizer to wrap; it steps on the averaged gradients.
        named_parameters: the model's ``named_parameters()``; those that require grad must be in
            ``optimizer``, and their names key the memory.
        method: a :class:`~gradcomp.Method` (e.g. :class:`~gradcomp.DGC`), a :class:`~gradcomp.Compressor`
            or a registered name.
        process_group: the group to average over (None: the default group).
        backward_passes_per_step: backward passes accumulated locally before each exchange (>= 1).
        bucket_cap_mb: the size of a bucket of parameters exchanged together, in MiB (> 0).
        nonfinite: ``"skip"`` or ``"raise"``.
        scaler: the ``torch.amp.GradScaler`` that scales the loss, or None.

    Raises:
        TypeError: a scaler that is not a ``torch.amp.GradScaler``.
        ValueError: a bad setting, a parameter not in ``optimizer``, an optimizer the method cannot be
            paired with, or a scaler with ``nonfinite="raise"``.

    Example:
        QSGD in a process group of one (under ``torchrun`` every rank runs the same lines, without the first
        and the last two):

        >>> import torch, torch.distributed as dist, gradcomp
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = gradcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                     model.named_parameters(), gradcomp.get("qsgd", levels=4, seed=0))
        >>> for _ in range(2):
        ...     model(torch.randn(4, 8)).square().mean().backward()
        ...     opt.step()  # exchanges, writes the averages to p.grad, steps SGD
        ...     opt.zero_grad()
        >>> opt.steps, opt.step_skipped
        (2, False)
        >>> opt.remove_hooks()
        >>> dist.destroy_process_group()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]],
                 method: Method | Compressor | str, process_group: dist.ProcessGroup | None = None, *,
                 backward_passes_per_step: int = 1, bucket_cap_mb: float = 25.0, nonfinite: Nonfinite = "skip",
                 scaler: torch.amp.GradScaler | None = None) -> None:
        if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        self.optimizer = optimizer
        self.core = Core(method, process_group, owner="DistributedOptimizer", nonfinite=nonfinite,
                         optimizer=optimizer, scaler=scaler)
        self._synchronized = False  # synchronize() ran since the last backward: step() does not exchange again
        self.backward_passes_per_step = backward_passes_per_step
        self.params = trained_parameters(named_parameters, optimizer)
        self.buckets = self._make_buckets(list(self.params.items())[::-1], bucket_cap_mb * 2**20)
        self._bucket_of = {n: b for b, bucket in enumerate(self.buckets) for n in bucket}
        self._passes = dict.fromkeys(self.params, 0)
        self._ready = [0] * len(self.buckets)
        self._futures: list[Future | None] = [None] * len(self.buckets)
        self._next = 0  # first bucket not started yet
        self._step: Step | None = None  # the step in progress
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(n)) for n, p in self.params.items()]

    @staticmethod
    def _make_buckets(named: list[tuple[str, Tensor]], cap_bytes: float) -> list[list[str]]:
        buckets: list[list[str]] = [[]]
        size = 0
        for name, p in named:
            if buckets[-1] and size + p.numel() * p.element_size() > cap_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(name)
            size += p.numel() * p.element_size()
        return buckets

    def _make_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:
            self._synchronized = False
            self._passes[name] += 1
            if self._passes[name] == self.backward_passes_per_step:
                self._ready[self._bucket_of[name]] += 1
                if not self.core.defer:
                    self._start_ready_buckets()
        return hook

    def _start_ready_buckets(self, *, all_remaining: bool = False) -> None:
        while self._next < len(self.buckets) and (
                all_remaining or self._ready[self._next] == len(self.buckets[self._next])):
            if self._step is None:
                self._step = self.core.step()
            if self.core.defer:  # every bucket at once, with the last gradient (the settings check sees them all)
                self._futures = list(self._step.add({n: self._grad(n) for n in self.params}, self.buckets))
                self._next = len(self.buckets)
                return
            self._futures[self._next] = self._step.add({n: self._grad(n) for n in self.buckets[self._next]})[0]
            self._next += 1

    def _grad(self, name: str) -> Tensor:
        p = self.params[name]
        if p.grad is None:  # no gradient this step: it counts as zero (and is exchanged in place)
            p.grad = torch.zeros_like(p)
        return p.grad

    def synchronize(self) -> None:
        """Finish every exchange of this step and write the averaged gradients to ``p.grad`` (times the loss
        scale, with a scaler)."""
        self._start_ready_buckets(all_remaining=True)
        step, self._step = self._step, None
        try:
            assert step is not None  # _start_ready_buckets started it, with the first bucket
            self.step_skipped = step.end().wait()
            for b, names in enumerate(self.buckets):
                future = self._futures[b]
                assert future is not None  # every bucket was started
                averages = future.wait()
                for n in names:
                    p = self.params[n]
                    if self.step_skipped:
                        p.grad = None if step.scale is None else torch.full_like(p, self.core.skipped_fill)
                        continue
                    grad = p.grad
                    assert grad is not None  # _grad gave it one when its bucket started
                    grad.copy_(averages[n].view_as(p))
                    if step.scale is not None:
                        grad.mul_(step.scale)
        finally:
            self._passes = dict.fromkeys(self.params, 0)
            self._ready = [0] * len(self.buckets)
            self._futures = [None] * len(self.buckets)
            self._next = 0
            self._synchronized = True
            self.core.end_step()

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """:meth:`synchronize`, unless it already ran for this step's gradients, then the wrapped optimizer's step.

        Args:
            closure: as for the wrapped optimizer's ``step``.

        Returns:
            What the wrapped optimizer's ``step`` returned; None when the step was skipped.

        Raises:
            SettingsMismatchError: at the first step, a setting differs between ranks.
            NonFiniteGradientError: with ``nonfinite="raise"``, a gradient holds a NaN or Inf.
        """
        if not self._synchronized:
            self.synchronize()
        self._synchronized = False
        return self.step_optimizer(closure)

    def state_dict(self) -> dict[str, Any]:
        """This rank's state, for checkpoints (:mod:`gradcomp.checkpoint` keeps one per rank).

        Returns:
            The wrapped optimizer's state (``"optimizer"``), and the method's and the guard's.
        """
        return {"optimizer": self.optimizer.state_dict(), **self.core.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the method's state is checked against the parameters first.

        Args:
            state: what :meth:`state_dict` returned (on this rank).

        Raises:
            ValueError: the method's state is not one of this method, or does not fit the parameters; nothing
                is changed.
        """
        self.core.check_state(state, self.params)  # before the optimizer changes
        self.optimizer.load_state_dict(state["optimizer"])
        self.core.load_state_dict(state, self.params)

    def remove_hooks(self) -> None:
        """Remove the gradient hooks from the parameters (backward then starts no exchange)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
