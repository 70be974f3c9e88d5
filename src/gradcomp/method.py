"""A method: a compressor paired with memory, applied per named gradient.

Every front door (simulator, DDP hook, DistributedOptimizer, DGA) drives a
:class:`Method` the same way each step::

    grads = method.prepare(named_grads, world_size)    # checks; DGC: local clipping and this worker's step
    for name, g in grads.items():                       # each exchange is a generator:
        gen = method.exchange(name, g, world_size)      #   it yields payloads and
        ...                                             #   receives the combined ones
    method.end_step()

and hands the returned averages to the optimizer.  :class:`DGC` is the whole
Deep Gradient Compression method in this shape.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypedDict, get_args

import torch
from torch import Tensor

from .compressors.base import Compressor, Payload, check_int, check_range, device_path, get, register
from .compressors.dense import NoCompression
from .compressors.sparse import DGCSelect, SharedSelect, Wire, check_wire
from .guard import NonFiniteGradientError, non_finite
from .memory import _HALF, MASKINGS, DGCMemory, Masking, Memory, Momentum, Residual
from .schedule import SparsityWarmup

__all__ = ["Method", "DGC", "NonFiniteGradientError", "as_method", "check_optimizer", "Aggregate", "SGDSettings"]

MethodExchange = Generator[Payload, Sequence[Payload], Tensor]

#: How DGC combines the workers' selections (see :class:`DGC`).
Aggregate = Literal["gather", "shared"]
#: The values of :data:`Aggregate`, for the checks at run time.
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)


def _working(grad: Tensor, scale: Tensor | None = None, *, upcast: bool = True) -> Tensor:
    """Contiguous, divided by the loss ``scale`` (if any), and float32 for 16-bit gradients unless ``upcast`` is
    False: residuals and momenta must not round to 8 bits.  A new tensor whenever it differs from ``grad``."""
    if not grad.is_floating_point():
        raise TypeError(f"gradients must be floating point, got {grad.dtype}")
    if upcast and grad.dtype in _HALF:
        grad = grad.float()
        return grad if scale is None else grad.div_(scale)
    return grad.contiguous() if scale is None else grad.div(scale).contiguous()


class Method:
    """A compressor with the memory its paper pairs it with (residual error
    feedback for ``error_feedback`` compressors, none otherwise).

    Args:
        compressor: the compressor.
        memory: the memory; ``None``: :class:`~gradcomp.memory.Residual` for an ``error_feedback``
            compressor, :class:`~gradcomp.memory.Memory` (none) otherwise.

    Raises:
        TypeError: when ``compressor`` is not a :class:`~gradcomp.compressors.base.Compressor`.

    Example:
        One worker's exchange, driven by hand (a front door sends the payload to every worker):

        >>> import torch
        >>> from gradcomp import Method
        >>> from gradcomp.compressors.sparse import TopK
        >>> method = Method(TopK(density=0.5))
        >>> type(method.memory).__name__
        'Residual'
        >>> grads = method.prepare({"w": torch.tensor([1.0, -4.0, 2.0, 0.5])}, world_size=1)
        >>> exchange = method.exchange("w", grads["w"], world_size=1)
        >>> payload = next(exchange)
        >>> try:
        ...     exchange.send([payload])
        ... except StopIteration as done:
        ...     print(done.value)
        tensor([ 0., -4.,  2.,  0.])
        >>> method.memory.residuals["w"]
        tensor([1.0000, 0.0000, 0.0000, 0.5000])
    """

    #: True when the method applies momentum itself (the optimizer must not).
    owns_momentum = False
    #: True when :meth:`prepare` needs every gradient of the step at once
    #: (front doors then wait for the last one before exchanging any).
    needs_all_gradients = False
    #: The momentum factor of a method that owns momentum (:class:`DGC`'s): declared here for the type
    #: checker, set only by such a method (read where ``owns_momentum`` is True).
    momentum: float

    def __init__(self, compressor: Compressor, *, memory: Memory | None = None) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(f"Method takes a Compressor, got {type(compressor).__name__} (a whole method already?)")
        self.compressor = compressor
        self.memory = memory if memory is not None else (Residual() if compressor.error_feedback else Memory())
        self.compressor_state: dict[str, dict[str, Any]] = {}
        self.epoch = 0.0
        self.steps = 0
        self._epoch_origin = (0.0, 0)  # (epoch, steps) when the epoch was last set: epochs advance from there

    # -- per step ---------------------------------------------------------

    def prepare(self, grads: Mapping[str, Tensor], world_size: int, scale: Tensor | None = None, *,
                check: bool = True) -> dict[str, Tensor]:
        """Check this worker's gradients and bring them to working precision and units.

        Every tensor is checked before any of them touches memory, so a NaN or
        Inf raises :class:`NonFiniteGradientError` with nothing changed
        (``check=False``: a front door's guard has seen to them, see
        :class:`~gradcomp.core.Step`).
        ``scale``: the loss scale the gradients carry (``torch.amp.GradScaler``'s),
        divided out here, so that memory holds unscaled values whatever the scale does.
        16-bit gradients are computed on in float32, except by a method without
        memory that sends them as they are (``"none"``): it keeps their dtype, and
        so their bytes on the wire.

        Args:
            grads: this worker's gradients by parameter name.
            world_size: the number of workers.
            scale: the loss scale the gradients carry, or ``None``.
            check: check the gradients for NaN and Inf.

        Returns:
            The gradients in working precision and units, by name.

        Raises:
            NonFiniteGradientError: when a gradient holds a NaN or Inf (``check=True``); nothing is changed.
            ValueError: when a held buffer does not fit its gradient (a loaded state for another model).
        """
        bad = non_finite(grads) if check else []
        if bad:
            raise NonFiniteGradientError(f"non-finite gradient (NaN or Inf) in {', '.join(bad)}; no memory was changed")
        upcast = not (type(self.compressor) is NoCompression and type(self.memory) is Memory)
        grads = {name: _working(g, scale, upcast=upcast) for name, g in grads.items()}
        self.memory.check_fits(grads)  # a loaded state that does not fit: refused before anything changes
        return grads

    def exchange(self, name: str, grad: Tensor, world_size: int) -> MethodExchange:
        """Generator: compensate, exchange, keep the rest; returns the averaged gradient.

        Args:
            name: the parameter's name.
            grad: its gradient, as :meth:`prepare` returned it.
            world_size: the number of workers.

        Yields:
            The payload to send, one per round of the compressor; each ``send`` takes back what the round's
            collective gives every worker (a list: every worker's payload for a gather, one summed payload
            for an all-reduce).

        Returns:
            The gradient averaged over the workers.
        """
        if grad.numel() == 0:
            return torch.zeros_like(grad)
        accumulator = self.memory.compensate(name, grad)
        state = self.compressor_state.setdefault(name, {})
        total = yield from self._exchange(name, accumulator, self.compressor, state)
        return total.div_(world_size)

    def _exchange(self, name: str, accumulator: Tensor, compressor: Compressor, state: dict) -> MethodExchange:
        """Exchange ``accumulator``; returns the sum over workers.  Memory learns what was sent as soon as
        that is known: for a single-round compressor before the payload goes out, so the next step can
        start before this one's exchange ends (delayed gradient averaging) and find its memory up to date."""
        if compressor.single_round:
            payload = compressor.compress(accumulator, state)
            self.memory.update(name, accumulator, compressor, payload)
            received = yield payload
            return compressor.decompress(received, like=accumulator)
        result = yield from compressor.exchange(accumulator, state)
        self.memory.update(name, accumulator, compressor, result.sent)
        return result.total

    @property
    def memory_waits_for_result(self) -> bool:
        """True when this method's memory needs the received result (a multi-round compressor with memory,
        PowerSGD's residual): a step must then wait for the previous step's exchange to end."""
        return not self.compressor.single_round and type(self.memory) is not Memory

    def end_step(self) -> None:
        """Count a step done (a front door calls it once per step): schedules advance with it."""
        self.steps += 1

    def buffers(self) -> list[dict[str, Tensor]]:
        """Every per-name buffer a step changes (the memory's).

        Returns:
            The buffer dicts by parameter name.
        """
        return self.memory.buffers()

    def save(self, names: Iterable[str]) -> Callable[[], None]:
        """Save what exchanging ``names`` may change (their buffers and compressor state); the function
        returned puts it back, for a step that every rank skips after its exchanges began
        (:class:`~gradcomp.core.Step`).  A name without memory yet gets none back.

        Args:
            names: the parameters' names.

        Returns:
            A function of no arguments that restores what was saved.
        """
        names = list(names)
        kept = [(buffers, {n: buffers[n].clone() for n in names if n in buffers}) for buffers in self.buffers()]
        states = {n: copy.deepcopy(self.compressor_state[n]) for n in names if n in self.compressor_state}

        def restore() -> None:
            for buffers, saved in kept:
                for n in names:
                    if n not in saved:
                        buffers.pop(n, None)
                    elif n in buffers and buffers[n].shape == saved[n].shape:
                        buffers[n].copy_(saved[n])  # in place: whoever holds the buffer sees it restored
                    else:
                        buffers[n] = saved[n]
            for n in names:
                if n in states:
                    self.compressor_state[n] = states[n]
                else:
                    self.compressor_state.pop(n, None)

        return restore

    def for_rank(self, rank: int) -> Method:
        """This method as worker ``rank`` runs it (see :meth:`Compressor.for_rank`); a copy, with fresh memory
        if none was used yet.

        Args:
            rank: the worker's rank.

        Returns:
            A copy of this method whose compressor is ``rank``'s.
        """
        method = copy.deepcopy(self)
        method.compressor = self.compressor.for_rank(rank)
        return method

    def set_epoch(self, epoch: float) -> None:
        """Tell schedules where training is (fractional epochs allowed), like ``DistributedSampler.set_epoch``.

        Args:
            epoch: the epoch, finite and >= 0.
        """
        check_range(type(self).__name__, "epoch", epoch, 0.0, math.inf, high_open=True)
        self.epoch = float(epoch)
        self._epoch_origin = (self.epoch, self.steps)

    # -- description and state ---------------------------------------------

    def config(self) -> dict[str, Any]:
        """The method's settings, as a run's record shows them.

        Returns:
            ``{"method": name, **options}``.
        """
        return {"method": self.compressor.name, **self.compressor.options()}

    def state_dict(self) -> dict[str, Any]:
        """The method's state: memory, compressor state, epoch and steps (the tensors themselves).

        Returns:
            A dict that :meth:`load_state_dict` takes back.
        """
        return {
            "memory": self.memory.state_dict(),
            "compressor_state": {n: dict(s) for n, s in self.compressor_state.items()},
            "epoch": self.epoch,
            "steps": self.steps,
            "epoch_origin": list(self._epoch_origin),
        }

    def check_state(self, state: Any, params: Mapping[str, Tensor] | None = None) -> None:
        """Raise a one-line ``ValueError`` naming the entry unless ``state`` is a state of this method: every
        entry present and of its type, every memory buffer a floating-point tensor holding data; with
        ``params`` (the model's named parameters), each buffer named by one of them and of its shape and
        working dtype.  :meth:`load_state_dict` checks this before it changes anything; what it cannot know
        (the gradients' shapes) is checked at each step, before any kernel touches the memory.

        Args:
            state: the state to check.
            params: the model's parameters by name, or ``None``.

        Raises:
            ValueError: when ``state`` is not one this method loads.
        """
        where = f"{type(self).__name__} state"
        if not isinstance(state, Mapping):
            raise ValueError(f"{where} is a {type(state).__name__}, expected a dict")
        missing = [k for k in ("memory", "compressor_state", "epoch", "steps") if k not in state]
        if missing:
            raise ValueError(f"{where} has no {', '.join(map(repr, missing))} entry")
        self.memory.check_state(state["memory"], params, f"{where} memory")
        compressor_state = state["compressor_state"]
        if not isinstance(compressor_state, Mapping) or not all(isinstance(v, Mapping)
                                                                 for v in compressor_state.values()):
            raise ValueError(f"{where} compressor_state is not a dict of dicts by parameter name")
        for key, low in (("epoch", 0.0), ("steps", 0)):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, float) if key == "epoch" else int) \
                    or not low <= value < math.inf:
                raise ValueError(f"{where} {key} is {value!r}, expected a finite number >= 0"
                                 + ("" if key == "epoch" else " (an integer)"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a state from :meth:`state_dict`, checked first (:meth:`check_state`).

        Args:
            state: the state to load.

        Raises:
            ValueError: when ``state`` is not one this method loads; the method is then unchanged.
        """
        self.check_state(state)
        self.memory.load_state_dict(state["memory"])
        self.compressor_state = {n: dict(s) for n, s in state["compressor_state"].items()}
        self.epoch = float(state["epoch"])
        self.steps = int(state["steps"])
        origin = state.get("epoch_origin", (self.epoch, self.steps))
        self._epoch_origin = (float(origin[0]), int(origin[1]))

    def __repr__(self) -> str:
        return f"Method({self.compressor!r}, memory={type(self.memory).__name__})"


#: The steps of DGC's default sparsity warm-up (the paper's four stages, 250 steps each).
DEFAULT_WARMUP_STEPS = 1000


@register
@dataclass(kw_only=True, eq=False, repr=False)
class DGC(Method):
    """Deep Gradient Compression (Lin, Han, Mao, Wang, Dally; ICLR 2018).

    Tensors with ``dim() > 1`` and at least ``min_numel`` entries are
    sparsified on worker k with momentum correction and factor masking::

        g = clip(g)                    # local clipping: global norm <= clip_norm * sqrt(N) (see below)
        u = m*u + g;  v = v + u        # Nesterov: u = m*(u + g); v = v + u + g
        send v[idx], idx = top-k |v|,  k = ceil(density * numel)
        v[idx] = 0;  u[idx] = 0        # masking (not on a lookup table: see momentum_masking)
        G = (1/N) sum_k sparse_k       # the update; no second momentum

    Other tensors (biases, norm layers, small ones) are averaged densely and
    then get ordinary momentum, unless ``sparsify_all=True``: then every
    tensor goes through the steps above (the paper sends them dense; with
    accumulation nothing of them is lost, and for ResNet-50 they are 53 % of
    what DGC sends otherwise).  The method therefore owns momentum: pair it
    with ``torch.optim.SGD(momentum=0)`` and the weight decay that
    :func:`sgd_settings` scales to match momentum SGD's; it stays in the
    optimizer and is never sent.

    ``min_entries``: each sparsified tensor sends at least this many entries
    a step (all of a smaller one), so that small layers are not starved: at
    density 0.001 a 2,560-entry classifier sends 3 a step, each of its entries
    once in ~850 steps on average.

    Warm-up: the density follows :class:`~gradcomp.schedule.SparsityWarmup`
    (25%, 6.25%, 1.5625%, 0.39%, then ``density``), advancing by itself with
    the steps the front door takes (:meth:`end_step`):

    * ``warmup_steps=N``: the four stages over the first N steps;
    * ``warmup_epochs=E`` with ``steps_per_epoch=S``: over the first E
      epochs of S steps (:meth:`set_epoch` may also set the epoch, like
      ``DistributedSampler.set_epoch``); ``warmup_epochs`` without
      ``steps_per_epoch`` is refused, since the warm-up could not advance;
    * neither: the paper's four stages over the first
      :data:`DEFAULT_WARMUP_STEPS` (1,000) steps, 250 each;
    * ``warmup_epochs=0`` or ``warmup_steps=0``: none.

    With Adam or AdamW, which keep moments of their own, use
    ``DGC(momentum=0)``: error-feedback top-k with DGC's sampled selection,
    warm-up and clipping, the optimizer's moments on the averaged sparse
    gradient.  DGC with momentum refuses an optimizer that has momentum
    (:func:`check_optimizer`).

    ``wire`` is the sparse wire format (see :mod:`gradcomp.compressors.sparse`):
    ``"compact"`` (float16 values, Elias-Fano coded indices, ~3.5 bytes per
    entry at density 0.001, the float16 rounding kept in the residual) or
    ``"plain"`` (float32 values and int32 indices, 8 bytes, as the paper's code).

    ``aggregate`` is how the workers' selections are combined: ``"gather"``
    (the paper: every worker sends its own top-k, all-gathered, so each rank
    receives ``N - 1`` payloads) or ``"shared"`` (one worker per step, in
    turn, picks the indices and every worker's values there are all-reduced:
    bytes per worker that do not grow with ``N``; see
    :class:`~gradcomp.compressors.sparse.SharedSelect`).

    ``momentum_correction=False`` and ``accumulate=False`` switch off the
    corresponding technique for the paper's ablation.

    ``momentum_masking``: ``"auto"`` (default) masks as the paper does on
    every tensor except a lookup table, one whose gradient leaves most of its
    rows at zero in that step (``nn.Embedding``: the tokens not in the batch);
    ``True`` masks every tensor, the paper's rule as written; ``False`` none.
    Masking zeroes ``u`` where an entry is sent, so a row sent the step its
    gradient arrives (an embedding's) carries no momentum and trains ``1 - m``
    times slower than under the dense momentum SGD DGC replaces; the paper
    trained its language model with vanilla SGD, where masking does nothing.
    See ``notes/embedding-divergence.md``.

    Args:
        density: the fraction of each sparsified tensor's entries sent a step, after the warm-up.
        momentum: the momentum factor ``m``.
        nesterov: Nesterov's momentum.
        sample_ratio: the fraction of entries sampled to estimate the top-k threshold.
        momentum_masking: momentum factor masking (:data:`~gradcomp.memory.Masking`).
        clip_norm: local gradient clipping's norm, or ``None`` for none.
        warmup_epochs: the warm-up's length in epochs.
        warmup_steps: the warm-up's length in steps.
        min_numel: the smallest tensor sparsified.
        momentum_correction: momentum correction (ablation).
        accumulate: keep what was not sent (ablation).
        steps_per_epoch: the steps of an epoch, for ``warmup_epochs``.
        wire: the sparse wire format, ``"compact"`` or ``"plain"``.
        sparsify_all: sparsify every tensor, small and 1-D ones too.
        min_entries: the fewest entries a sparsified tensor sends a step.
        aggregate: ``"gather"`` or ``"shared"``.

    Raises:
        ValueError: when a setting is out of range, or both ``warmup_steps`` and ``warmup_epochs`` are given.

    Example:
        >>> import torch
        >>> from gradcomp import DGC, sgd_settings
        >>> dgc = DGC(density=0.25, warmup_steps=0, min_numel=16)
        >>> grads = dgc.prepare({"w": torch.randn(4, 4), "b": torch.randn(4)}, world_size=1)
        >>> dgc.sparsified(grads["w"]), dgc.sparsified(grads["b"])
        (True, False)
        >>> exchange = dgc.exchange("w", grads["w"], world_size=1)
        >>> payload = next(exchange)
        >>> try:
        ...     exchange.send([payload])
        ... except StopIteration as done:
        ...     average = done.value
        >>> average.shape, int(average.count_nonzero())
        (torch.Size([4, 4]), 4)
        >>> dgc.end_step()
        >>> {k: round(v, 4) for k, v in sgd_settings(dgc, momentum=0.9, weight_decay=1e-4).items()}
        {'momentum': 0.0, 'weight_decay': 0.001}
    """

    name: ClassVar[str] = "dgc"

    density: float = 0.001
    momentum: float = 0.9
    nesterov: bool = False
    sample_ratio: float = 0.01
    momentum_masking: Masking = "auto"
    clip_norm: float | None = None
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    min_numel: int = 1024
    momentum_correction: bool = True
    accumulate: bool = True
    steps_per_epoch: int | None = None
    wire: Wire = "compact"
    sparsify_all: bool = False
    min_entries: int = 1
    aggregate: Aggregate = "gather"

    def __post_init__(self) -> None:
        check_range("DGC", "density", self.density, 0.0, 1.0, low_open=True)
        check_range("DGC", "momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("DGC", "sample_ratio", self.sample_ratio, 0.0, 1.0, low_open=True)
        if self.clip_norm is not None:
            check_range("DGC", "clip_norm", self.clip_norm, 0.0, math.inf, low_open=True, high_open=True)
        if self.warmup_epochs is not None and self.warmup_steps is not None:
            raise ValueError(f"DGC takes warmup_steps or warmup_epochs, not both (got warmup_steps="
                             f"{self.warmup_steps!r}, warmup_epochs={self.warmup_epochs!r})")
        if self.warmup_epochs is None and self.warmup_steps is None:
            self.warmup_steps = DEFAULT_WARMUP_STEPS
        span: float  # the warm-up's length: steps with warmup_steps, epochs with warmup_epochs
        if self.warmup_steps is not None:
            check_int("DGC", "warmup_steps", self.warmup_steps, 0)
            span = self.warmup_steps
        else:
            assert self.warmup_epochs is not None  # neither given: warmup_steps was set above
            check_range("DGC", "warmup_epochs", self.warmup_epochs, 0.0, math.inf, high_open=True)
            span = self.warmup_epochs
            if self.warmup_epochs > 0 and self.steps_per_epoch is None:
                raise ValueError(f"DGC.warmup_epochs={self.warmup_epochs!r} needs steps_per_epoch (the optimizer "
                                 "steps in one epoch) so the warm-up can advance; or give warmup_steps=N, or "
                                 "warmup_epochs=0 for no warm-up")
        if self.momentum_masking not in MASKINGS or type(self.momentum_masking) not in (bool, str):
            raise ValueError(f"DGC.momentum_masking must be 'auto', True or False, got {self.momentum_masking!r}")
        check_int("DGC", "min_numel", self.min_numel, 1)
        check_int("DGC", "min_entries", self.min_entries, 1)
        check_wire("DGC", self.wire)
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"DGC.aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.steps_per_epoch is not None:
            check_int("DGC", "steps_per_epoch", self.steps_per_epoch, 1)
        if self.nesterov and self.momentum == 0:
            raise ValueError("DGC.nesterov needs DGC.momentum > 0")
        # the schedule's unit is steps with warmup_steps, epochs with warmup_epochs
        self.warmup = SparsityWarmup(final_density=self.density, initial_density=max(self.density, 0.25),
                                     warmup_epochs=float(span))
        memory = DGCMemory(momentum=self.momentum, nesterov=self.nesterov, masking=self.momentum_masking,
                           correction=self.momentum_correction, accumulate=self.accumulate)
        select = SharedSelect if self.aggregate == "shared" else DGCSelect
        super().__init__(select(density=self.density, sample_ratio=self.sample_ratio, wire=self.wire,
                                min_entries=self.min_entries), memory=memory)
        self.dense_momentum = Momentum(self.momentum, self.nesterov)
        self.owns_momentum = self.momentum > 0
        self.needs_all_gradients = self.clip_norm is not None
        self._sent: dict[str, Payload] = {}  # prepare's payloads, each taken by its tensor's exchange
        self._wire: dict[str, torch.dtype] = {}  # the 16-bit dtypes of prepare's dense tensors, taken likewise

    @property
    def current_density(self) -> float:
        """The density of this step: the warm-up's at this step (``warmup_steps``) or epoch."""
        return self.warmup.density(self.steps if self.warmup_steps is not None else self.epoch)

    @property
    def _selector(self) -> DGCSelect:
        """The compressor, DGC's selection (a :class:`DGCSelect`, or :class:`SharedSelect`)."""
        assert isinstance(self.compressor, DGCSelect)  # set so by __post_init__ and for_rank
        return self.compressor

    @property
    def _dgc_memory(self) -> DGCMemory:
        """The memory, momentum correction and masking (a :class:`DGCMemory`)."""
        assert isinstance(self.memory, DGCMemory)  # set so by __post_init__
        return self.memory

    def sparsified(self, grad: Tensor) -> bool:
        """Whether DGC sparsifies this tensor (as the paper: not 1-D, not small; or every one with ``sparsify_all``).

        Args:
            grad: the tensor's gradient.

        Returns:
            True when it is sparsified, False when it is averaged densely.
        """
        return self.sparsify_all or (grad.dim() > 1 and grad.numel() >= self.min_numel)

    def prepare(self, grads: Mapping[str, Tensor], world_size: int, scale: Tensor | None = None, *,
                check: bool = True) -> dict[str, Tensor]:
        # dense tensors go out in their own dtype (a bf16 bias as 2 bytes an entry), computed on in float32
        self._wire = {name: g.dtype for name, g in grads.items() if g.dtype in _HALF and not self.sparsified(g)}
        grads = super().prepare(grads, world_size, scale, check=check)
        self.dense_momentum.check_fits(grads)
        if self.clip_norm is not None and grads:
            # Local gradient clipping (section 3.2).  The paper sums the nodes' shares
            # G_k = g_k / N of the gradient and clips each share at clip_norm * N^-1/2 (with
            # independent noise, |sum_k G_k| ~ sqrt(N) |G_k|).  Here g_k is the worker's mean
            # gradient, so the same clip reads |g_k| <= clip_norm * sqrt(N).
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
            if device_path(total):  # the same factor, kept on the device: no sync (a factor of 1 changes nothing)
                scale = (self.clip_norm * world_size**-0.5 / (total.double() / world_size + 1e-6)).clamp(max=1.0)
                grads = {name: g * scale.to(g.dtype) for name, g in grads.items()}
            else:
                scale = self.clip_norm * world_size**-0.5 / (float(total) / world_size + 1e-6)
                if scale < 1.0:
                    grads = {name: g * scale for name, g in grads.items()}
        self._selector.density = self.current_density  # warm-up: a setting of the selector, set every step
        if self.compressor.single_round:  # this worker's part of the step, every tensor in one kernel call
            self._sent = self.sparsify({name: g for name, g in grads.items() if g.numel() and self.sparsified(g)})
        return grads

    def exchange(self, name: str, grad: Tensor, world_size: int) -> MethodExchange:
        if grad.numel() == 0:
            return torch.zeros_like(grad)
        if not self.sparsified(grad):
            result = yield from NoCompression().exchange(grad.to(self._wire.pop(name, grad.dtype)))
            return self.dense_momentum.apply(name, result.total.to(grad.dtype).div_(world_size))
        selector = self._selector
        selector.density = self.current_density
        if isinstance(selector, SharedSelect):  # two rounds: the leader's indices, then everyone's values there
            selector.lead = self.steps % world_size == selector.rank  # the ranks choose in turn
            accumulator = self.memory.compensate(name, grad)
            result = yield from selector.exchange(accumulator, {}, workspace=self._dgc_memory.workspace)
            self.memory.update(name, accumulator, selector, result.sent)
            total = result.total
        else:
            payload = self._sent.pop(name, None)  # sparsified by prepare, unless exchange is called alone
            received = yield payload if payload is not None else self.sparsify({name: grad})[name]
            total = selector.decompress(received, like=grad)
        average = total.div_(world_size)
        return average if self.momentum_correction else self.dense_momentum.apply(name, average)

    def sparsify(self, grads: Mapping[str, Tensor]) -> dict[str, Payload]:
        """This worker's part of a step for sparsified tensors: momentum correction, selection at the
        selector's density, the payloads, and masking of what they send.

        One call of the compiled kernel does it for all of them where it applies
        (:meth:`DGCMemory.fused_steps`); torch ops otherwise, tensor by tensor.  Either way what is kept
        between steps, the speed-only scratch and kernel plans too, is the memory's; the selector is only
        read.

        Args:
            grads: the sparsified tensors' gradients by name (working precision, after local clipping).

        Returns:
            Each tensor's payload by name, ready to send; the memory already holds what was not sent.

        Raises:
            ValueError: when a held buffer does not fit its gradient (a loaded state for another model), found
                before the kernel writes any (:meth:`prepare` checks the same for the torch ops).
        """
        memory, selector = self._dgc_memory, self._selector
        payloads = memory.fused_steps(grads, selector) if grads else {}
        if payloads is None:
            payloads = {}
            for name, grad in grads.items():
                accumulator = memory.compensate(name, grad)
                payloads[name] = selector.compress(accumulator, {}, workspace=memory.workspace)
                memory.update(name, accumulator, selector, payloads[name])
        return payloads

    def end_step(self) -> None:
        super().end_step()
        if self.steps_per_epoch is not None:  # counted from integers: no drift from adding 1/S again and again
            epoch, steps = self._epoch_origin
            self.epoch = epoch + (self.steps - steps) / self.steps_per_epoch

    def config(self) -> dict[str, Any]:
        fields = ("density", "momentum", "nesterov", "sample_ratio", "momentum_masking", "clip_norm",
                  "warmup_epochs", "warmup_steps", "min_numel", "momentum_correction", "accumulate",
                  "steps_per_epoch", "wire", "sparsify_all", "min_entries", "aggregate")
        return {"method": "dgc", **{f: getattr(self, f) for f in fields}}

    def buffers(self) -> list[dict[str, Tensor]]:
        return [*super().buffers(), self.dense_momentum.buffers]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dense_momentum": self.dense_momentum.state_dict()}

    def check_state(self, state: Any, params: Mapping[str, Tensor] | None = None) -> None:
        super().check_state(state, params)
        if "dense_momentum" not in state:
            raise ValueError("DGC state has no 'dense_momentum' entry")
        self.dense_momentum.check_state(state["dense_momentum"], params, "DGC state dense_momentum")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # checks all of it (check_state), dense momentum too, before any change
        self.dense_momentum.load_state_dict(state["dense_momentum"])

    def __repr__(self) -> str:
        return "DGC(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method") + ")"


def as_method(method: Method | Compressor | str) -> Method:
    """Accept a Method, a Compressor or a registered name (``"dgc"``: the whole of :class:`DGC`).

    Args:
        method: a method, a compressor or a registered compressor's name.

    Returns:
        ``method`` itself, or a :class:`Method` around the compressor (with its paper's memory).

    Raises:
        TypeError: when ``method`` is none of these.

    Example:
        >>> from gradcomp import as_method
        >>> type(as_method("dgc")).__name__, type(as_method("topk").memory).__name__
        ('DGC', 'Residual')
    """
    if isinstance(method, str):
        method = get(method)
    if isinstance(method, Method):
        return method
    if isinstance(method, Compressor):
        return Method(method)
    raise TypeError(f"expected a gradcomp Method, Compressor or compressor name, got {type(method).__name__}")


class SGDSettings(TypedDict):
    """``torch.optim.SGD``'s ``momentum`` and ``weight_decay``, as :func:`sgd_settings` gives them."""

    momentum: float
    weight_decay: float


def sgd_settings(method: Method | Compressor | str, momentum: float = 0.0, weight_decay: float = 0.0
                 ) -> SGDSettings:
    """``torch.optim.SGD``'s ``momentum`` and ``weight_decay`` for training through ``method`` what dense
    training runs with ``SGD(momentum=momentum, weight_decay=weight_decay)``.

    A method that owns momentum (DGC) gets ``momentum=0`` and the weight decay
    scaled by ``1 / (1 - m)``, ``m`` the method's own momentum.  In momentum SGD
    the decay ``wd * p`` goes through the momentum buffer, so a step applies
    ``lr * wd * p / (1 - m)`` once the buffer has settled (exactly, for ``p``
    held still); an optimizer without momentum and with the same ``wd`` would
    decay ``1 / (1 - m)`` times (10x at 0.9) less than the dense run DGC is
    compared with.  The paper's code keeps a momentum buffer for the decay term
    alone, to the same effect.  Either way weight decay is never sent: each rank
    applies it to its own weights, identical on every rank.  Other methods keep
    both values.

    Args:
        method: a method, a compressor or a registered name (:func:`as_method`).
        momentum: the dense run's momentum.
        weight_decay: the dense run's weight decay.

    Returns:
        ``{"momentum": ..., "weight_decay": ...}`` for ``torch.optim.SGD``.

    Example:
        >>> import torch
        >>> from gradcomp import DGC, sgd_settings
        >>> model = torch.nn.Linear(4, 2)
        >>> settings = sgd_settings(DGC(momentum=0.9), momentum=0.9, weight_decay=1e-4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, **settings)
        >>> settings["momentum"], round(settings["weight_decay"], 6)
        (0.0, 0.001)
        >>> sgd_settings("topk", momentum=0.9, weight_decay=1e-4)
        {'momentum': 0.9, 'weight_decay': 0.0001}
    """
    check_range("sgd_settings", "momentum", momentum, 0.0, 1.0, high_open=True)
    check_range("sgd_settings", "weight_decay", weight_decay, 0.0, math.inf, high_open=True)
    method = as_method(method)  # a compressor or a name: the plain method around it
    if not method.owns_momentum:
        return {"momentum": momentum, "weight_decay": weight_decay}
    return {"momentum": 0.0, "weight_decay": weight_decay / (1.0 - method.momentum)}


def check_optimizer(method: Method, optimizer: torch.optim.Optimizer | None) -> None:
    """A method that applies momentum itself must not be paired with a momentum optimizer.

    Args:
        method: the method.
        optimizer: the optimizer, or ``None``.

    Raises:
        ValueError: when ``method`` owns momentum and the optimizer has momentum or moments (Adam's).
    """
    if optimizer is None or not method.owns_momentum:
        return
    for i, group in enumerate(optimizer.param_groups):
        if "betas" in group:
            raise ValueError(
                f"{type(method).__name__} applies momentum itself (momentum correction), and "
                f"{type(optimizer).__name__} keeps moments of its own (param group {i}); with Adam or AdamW use "
                f"{type(method).__name__}(momentum=0) (error-feedback top-k, the optimizer's moments on the "
                "averaged gradient), or torch.optim.SGD(params, lr, **gradcomp.sgd_settings(method, momentum, "
                "weight_decay))"
            )
        if group.get("momentum", 0):
            raise ValueError(
                f"{type(method).__name__} applies momentum itself (momentum correction), but the optimizer's "
                f"param group {i} has momentum too ({type(optimizer).__name__}); use "
                "torch.optim.SGD(params, lr, **gradcomp.sgd_settings(method, momentum, weight_decay)) or set the "
                "method's momentum=0"
            )
