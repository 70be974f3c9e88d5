"""gradcomp as a DDP communication hook::

    ddp = DistributedDataParallel(model)
    method = gradcomp.DGC(density=0.001)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, **gradcomp.sgd_settings(method, momentum=0.9))
    state = gradcomp.register_ddp_hook(ddp, method, optimizer=opt)

Works wherever DDP does: plain DDP, Accelerate (register on the model
``prepare()`` returns) and Lightning (through the callback
:class:`gradcomp.lightning.GradientCompression`: Lightning's own
``ddp_comm_hook`` argument registers hooks on CUDA only).  Memory is keyed by
parameter name, so DDP's bucket rebuild after the first iteration changes
nothing: every step, the first one included, runs the method as configured.
The state can be built before ``init_process_group``: it binds to the group
at the first step.

A bucket of sparse gradients (``nn.Embedding(sparse=True)``) is averaged
as PyTorch's ``allreduce_hook`` averages it, uncompressed (noted once in the
log).

Before any memory changes, the ranks check their settings agree (first step:
its buckets wait for the last one).  From then on each bucket's exchange starts
as DDP hands it over, overlapping the rest of backward, and the ranks agree
after the last one that none of them held a NaN or Inf (:class:`~gradcomp.core.Step`).
A step with a non-finite gradient on any rank is skipped on every rank: the
hook puts back every memory the step changed and hands DDP zero gradients,
and ``state.step_skipped`` tells the loop not to step the optimizer (momentum
and weight decay would still move the weights)::

    loss.backward()
    if not state.step_skipped:
        optimizer.step()

``nonfinite="raise"`` raises instead, on the rank that saw it.

Mixed precision: when the loss is scaled by a ``torch.amp.GradScaler``, give
the hook the scaler (``scaler=``).  The contract:

* The method works on unscaled gradients.  The hook divides each gradient by
  the scaler's current scale (its scale tensor, read without a host sync)
  before the method sees it, so residuals and momenta stay in gradient units
  however the scale changes, and it hands DDP the average multiplied back by
  the same scale, so that ``scaler.step`` unscales and checks it as it would
  any DDP gradient.  GradScaler's scales are powers of two (unless set
  otherwise), which makes both exact: the scaled run sends the same payloads
  and ends at the same weights as the run without a scaler, bit for bit.
* A step with a non-finite gradient (an overflow) on any rank changes no
  memory on any rank and leaves Inf in every rank's gradients: every rank's
  ``scaler.step`` skips the optimizer step and ``scaler.update()`` lowers the
  scale, the same on every rank.  The loop is the usual AMP loop::

      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()

  (``nonfinite`` must be ``"skip"``.)  The average times the scale may still
  overflow (a scale close to the gradient dtype's limit): the scaler then skips
  the step too, but the method's memory has taken it.

16-bit gradients (a bf16 or fp16 model) travel in their own dtype where the
method sends tensors dense (``"none"``, DGC's dense tensors); memory is kept in
float32.
"""

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future

from .comm import cuda_devices, new_future, on_stream
from .compressors.base import Compressor
from .core import Core, Door, Step
from .guard import Nonfinite
from .method import Method

__all__ = ["HookState", "ddp_comm_hook", "register_ddp_hook"]

log = logging.getLogger(__name__)


def _write(names: list[str], grads: list[Tensor], averages: dict[str, Tensor], scale: Tensor | None) -> None:
    """Put the averaged gradients into the bucket's gradient views, times the loss ``scale`` if there is one."""
    for name, grad in zip(names, grads):
        grad.copy_(averages[name].view_as(grad))
        if scale is not None:
            grad.mul_(scale)


def _fill(t: Tensor, value: float) -> None:
    """Set every entry of ``t`` (the stored values of a sparse tensor, as GradScaler reads them) to ``value``."""
    if t.is_sparse:
        t._values().fill_(value)
    else:
        t.fill_(value)


class _Bucket:
    """One bucket DDP handed to the hook: its parameter names, gradient views and buffer, the future of its
    averages, and the future DDP waits on (made with the buffer's device: DDP then waits for its kernels)."""

    def __init__(self, names: list[str], grads: list[Tensor], buffer: Tensor) -> None:
        self.names, self.grads, self.buffer = names, grads, buffer
        self.sparse = buffer.is_sparse or any(g.is_sparse for g in grads)
        self.future: Future = new_future(cuda_devices([buffer]))
        self.averages: Future | None = None

    def write(self, skipped: bool, fill: float, scale: Tensor | None) -> None:
        """The step's outcome into the gradients: ``fill`` where the step was skipped, else the averages
        (times the loss ``scale``, if any, for a dense bucket: the mean of scaled gradients is the scaled mean)."""
        if skipped:
            _fill(self.buffer, fill)
            for g in self.grads:  # views into the buffer on CPU and CUDA alike, but not promised by DDP
                _fill(g, fill)
        else:
            assert self.averages is not None  # set when the bucket's exchange started
            _write(self.names, self.grads, self.averages.value(), None if self.sparse else scale)


class HookState(Door):
    """What the hook keeps between calls: this rank's :class:`~gradcomp.core.Core` and the parameter names.

    Args:
        method: a :class:`~gradcomp.Method` (e.g. :class:`~gradcomp.DGC`), a
            :class:`~gradcomp.Compressor` or a registered name (``"dgc"`` is
            the whole of DGC).
        process_group: the group to average over (None: the default group).
        model: the DDP model or the module it wraps, so memory is keyed by
            the real parameter names; without it, names are ``param0, param1,
            ...`` in the order DDP first hands the parameters to the hook.
        optimizer: the optimizer that applies the averages, checked against
            the method (DGC applies momentum itself; see
            :func:`~gradcomp.sgd_settings`).  Without it a method that owns
            momentum warns once at the first step.
        emulate_latency_ms: see :class:`~gradcomp.comm.Communicator` (experiments only).
        nonfinite: ``"skip"`` or ``"raise"`` (see the module docstring).
        scaler: the ``torch.amp.GradScaler`` that scales the loss, if one does
            (see the module docstring); a disabled one counts as none.

    Raises:
        TypeError: a scaler that is not a ``torch.amp.GradScaler``.
        ValueError: a bad setting, an optimizer the method cannot be paired with, or a scaler with
            ``nonfinite="raise"``.

    Example:
        A state can be made before ``init_process_group``: it binds to the group at the first step.
        :func:`register_ddp_hook` makes one and registers it; :func:`ddp_comm_hook` shows the two steps.

        >>> import torch, gradcomp
        >>> model = torch.nn.Linear(8, 2)
        >>> state = gradcomp.HookState("topk", model=model)
        >>> state.configured
        Method(TopK(density=0.01, wire='plain'), memory=Residual)
        >>> state.steps, state.step_skipped, sorted(state.state_dict())
        (0, False, ['guard', 'method'])
    """

    def __init__(self, method: Method | Compressor | str, process_group: dist.ProcessGroup | None = None, *,
                 model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 emulate_latency_ms: float = 0.0, nonfinite: Nonfinite = "skip",
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.core = Core(method, process_group, owner="HookState", nonfinite=nonfinite,
                         emulate_latency_ms=emulate_latency_ms, optimizer=optimizer, scaler=scaler)
        #: True when the last step was skipped on every rank (a non-finite gradient somewhere)
        self.step_skipped = False
        self.names: dict[int, str] = {}
        self._params: dict[str, Tensor] | None = None  # what a loaded state is checked against
        if model is not None:
            module = getattr(model, "module", model)
            self._params = dict(module.named_parameters())
            self.names = {id(p): name for name, p in self._params.items()}
        self._step: Step | None = None  # the step in progress
        self._buckets: list[_Bucket] = []  # its buckets so far
        self._sparse_noted = False

    @property
    def configured(self) -> Method:
        """The method as configured (the same on every rank)."""
        return self.core.configured

    def name_of(self, param: Tensor) -> str:
        """The name memory is keyed by for ``param``.

        Args:
            param: a parameter DDP handed to the hook.

        Returns:
            Its name in the model given to the constructor; else ``param<i>``, numbered in the order the
            parameters first come.
        """
        return self.names.setdefault(id(param), f"param{len(self.names)}")

    def add(self, bucket: _Bucket, last: bool) -> None:
        """Start exchanging ``bucket`` (at the first step, or with DGC's local clipping, with the last one:
        they need every gradient); after the last, settle every bucket of the step with the guard's verdict.

        Args:
            bucket: the bucket DDP handed over, with its future.
            last: whether it is the step's last bucket.

        Raises:
            SettingsMismatchError: at the first step, a setting differs between ranks.
            NonFiniteGradientError: with ``nonfinite="raise"``, a gradient holds a NaN or Inf.
        """
        core = self.core
        if self._step is None:
            self._step = core.step()
        step = self._step
        self._buckets.append(bucket)
        try:
            if not core.defer:
                self._start(step, [bucket])
            elif last:
                core.check_settings({n: g for b in self._buckets for n, g in zip(b.names, b.grads)})
                self._start(step, self._buckets)
        except BaseException:
            self._buckets, self._step = [], None  # the next backward starts a fresh step
            raise
        if last:
            buckets, self._buckets, self._step = self._buckets, [], None
            self._settle(step, buckets)

    def _start(self, step: Step, buckets: list[_Bucket]) -> None:
        dense = [b for b in buckets if not b.sparse]
        averages = step.add({n: g for b in dense for n, g in zip(b.names, b.grads)}, [b.names for b in dense])
        for b, fut in zip(dense, averages):
            b.averages = fut
        for b in buckets:
            if b.sparse:  # averaged as it is, uncompressed
                step.flag({n: g for n, g in zip(b.names, b.grads)})
                b.averages = self._all_reduce_sparse(b)
                step.include(b.averages)

    def _settle(self, step: Step, buckets: list[_Bucket]) -> None:
        """Once the verdict is in, write every bucket's outcome and complete the futures DDP waits on."""
        core = self.core
        fill, scale = core.skipped_fill, step.scale
        stream = core.comm.stream(cuda_devices([b.buffer for b in buckets]))

        def settle(verdict: Future) -> None:
            try:
                self.step_skipped = skipped = verdict.value()
                with on_stream(stream):
                    for b in buckets:
                        b.write(skipped, fill, scale)
            except Exception as error:  # noqa: BLE001 - DDP must see it, not hang
                for b in buckets:
                    b.future.set_exception(error)
                return
            for b in buckets:
                b.future.set_result(b.buffer)

        step.end().add_done_callback(settle)

    def _all_reduce_sparse(self, bucket: _Bucket) -> Future:
        """A sparse bucket, averaged as PyTorch's ``allreduce_hook`` averages it (not compressed)."""
        if not self._sparse_noted:
            self._sparse_noted = True
            log.info("sparse gradients (%s) are averaged uncompressed, as PyTorch's allreduce_hook does",
                     ", ".join(bucket.names))
        core = self.core
        tensor = bucket.buffer.div_(core.world_size)
        return dist.all_reduce(tensor, group=core.process_group, async_op=True).get_future().then(
            lambda f: {name: f.value()[0] for name in bucket.names})

    def state_dict(self) -> dict:
        """This rank's own state, for checkpoints (:mod:`gradcomp.checkpoint` keeps one per rank).

        Returns:
            The memory, counters and the guard's count: plain tensors and values.
        """
        return self.core.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`.  A state that is not one, or whose memory does not fit the model's
        parameters (names, shapes, dtypes), raises a one-line ``ValueError`` naming the entry, with nothing
        changed.

        Args:
            state: what :meth:`state_dict` returned (on this rank).

        Raises:
            ValueError: ``state`` is not such a state, or does not fit the model.
        """
        self.core.load_state_dict(state, self._params)


# No ``from __future__ import annotations`` here: DDP checks the hook's annotations as objects.
def ddp_comm_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compress, exchange and average one bucket with ``state.method``.

    Register it with ``ddp.register_comm_hook(state, ddp_comm_hook)`` (:func:`register_ddp_hook` does), and
    DDP calls it for each bucket of gradients, as backward produces them.

    Args:
        state: the :class:`HookState`.
        bucket: the bucket of gradients DDP hands over.

    Returns:
        The future DDP waits on: the bucket's buffer, holding the averages once the step's verdict is in (zeros,
        or Inf with a scaler, on a skipped step).

    Raises:
        SettingsMismatchError: at the first step, a setting differs between ranks.
        NonFiniteGradientError: with ``nonfinite="raise"``, a gradient holds a NaN or Inf.

    Example:
        In a process group of one:

        >>> import torch, torch.distributed as dist, gradcomp
        >>> from torch.nn.parallel import DistributedDataParallel
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> ddp = DistributedDataParallel(torch.nn.Linear(8, 2))
        >>> state = gradcomp.HookState(gradcomp.get("qsgd", levels=4, seed=0), model=ddp)
        >>> ddp.register_comm_hook(state, gradcomp.ddp_comm_hook)
        >>> ddp(torch.randn(4, 8)).square().mean().backward()
        >>> state.steps, state.step_skipped
        (1, False)
        >>> del ddp
        >>> dist.destroy_process_group()
    """
    b = _Bucket([state.name_of(p) for p in bucket.parameters()], list(bucket.gradients()), bucket.buffer())
    try:
        state.add(b, bucket.is_last())
        return b.future
    finally:
        if bucket.is_last():
            state.core.end_step()


def register_ddp_hook(model: nn.parallel.DistributedDataParallel, method: Method | Compressor | str,
                      process_group: dist.ProcessGroup | None = None, *,
                      optimizer: torch.optim.Optimizer | None = None, emulate_latency_ms: float = 0.0,
                      nonfinite: Nonfinite = "skip", scaler: torch.amp.GradScaler | None = None) -> HookState:
    """Register gradcomp's hook on a DDP model, with memory keyed by its parameter names; returns the state.

    Args:
        model: the ``DistributedDataParallel`` model.
        method, process_group, optimizer, emulate_latency_ms, nonfinite, scaler: see :class:`HookState`.

    Returns:
        The :class:`HookState`: ``state.step_skipped`` after each backward, ``state.state_dict()`` for checkpoints.

    Raises:
        TypeError: a scaler that is not a ``torch.amp.GradScaler``.
        ValueError: a bad setting, an optimizer the method cannot be paired with, or a scaler with
            ``nonfinite="raise"``.

    Example:
        DGC in a process group of one (under ``torchrun`` every rank runs the same lines, without the first and
        the last two):

        >>> import torch, torch.distributed as dist, gradcomp
        >>> from torch.nn.parallel import DistributedDataParallel
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> ddp = DistributedDataParallel(torch.nn.Linear(8, 2))
        >>> method = gradcomp.DGC(density=0.25, warmup_steps=0)
        >>> opt = torch.optim.SGD(ddp.parameters(), lr=0.1, **gradcomp.sgd_settings(method, momentum=0.9))
        >>> state = gradcomp.register_ddp_hook(ddp, method, optimizer=opt)
        >>> for _ in range(3):
        ...     ddp(torch.randn(4, 8)).square().mean().backward()
        ...     if not state.step_skipped:  # a NaN or Inf on some rank: every rank skips the step
        ...         opt.step()
        ...     opt.zero_grad()
        >>> state.steps, opt.param_groups[0]["momentum"]  # DGC applies the momentum itself
        (3, 0.0)
        >>> del ddp
        >>> dist.destroy_process_group()

        With mixed precision (on GPUs), hand the hook the scaler:

        .. code-block:: python

            scaler = torch.amp.GradScaler("cuda")
            state = gradcomp.register_ddp_hook(ddp, method, optimizer=opt, scaler=scaler)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(ddp(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    """
    state = HookState(method, process_group, model=model, optimizer=optimizer,
                      emulate_latency_ms=emulate_latency_ms, nonfinite=nonfinite, scaler=scaler)
    model.register_comm_hook(state, ddp_comm_hook)
    return state
