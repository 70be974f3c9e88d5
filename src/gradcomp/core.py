"""One rank's gradcomp: the single object behind every front door.

A :class:`Core` owns what each front door (the DDP hook's :class:`~gradcomp.HookState`,
:class:`~gradcomp.DistributedOptimizer`, :class:`~gradcomp.DelayedGradientAveraging`,
:class:`~gradcomp.FedAvg`) would otherwise keep a copy of:

* the method as the user configured it (compared between ranks) and this
  rank's own copy of it (:meth:`~gradcomp.Method.for_rank`: its memory, its
  seeds, its step and epoch counters, which drive the warm-up schedules);
* the guard (:class:`~gradcomp.guard.StepGuard`: settings agreement at the
  first step, the non-finite verdict every step);
* the communicator on the process group;
* the optimizer-pairing check;
* the ``torch.amp.GradScaler``, if the gradients carry its loss scale
  (:meth:`Core.loss_scale`): the method then works on unscaled gradients, so
  memory holds unscaled values whatever the scale does.

It binds to the process group lazily, at the first step, so a front door can
be built before ``torch.distributed.init_process_group`` (Lightning,
Accelerate and ``torchrun`` scripts often build the training objects first).
A state loaded before that is kept and applied when it binds.

Its :meth:`state_dict` is this rank's own state; the checkpoint integrations
(:mod:`gradcomp.checkpoint`, :mod:`gradcomp.lightning`) store one per rank.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from .comm import Communicator, all_done, check_latency, cuda_devices, on_stream
from .compressors.base import Compressor
from .guard import Nonfinite, NonFiniteGradientError, StepGuard, check_settings, nonfinite_flags, nonfinite_in
from .method import Method, MethodExchange, as_method, check_optimizer

__all__ = ["Core", "Door", "Step", "check_scaler"]

log = logging.getLogger(__name__)


def check_scaler(owner: str, scaler: torch.amp.GradScaler | None, nonfinite: Nonfinite
                 ) -> torch.amp.GradScaler | None:
    """Check the ``torch.amp.GradScaler`` a front door is given.

    Args:
        owner: the front door, for the message.
        scaler: the scaler, or None.
        nonfinite: the door's ``nonfinite`` setting.

    Returns:
        ``scaler`` if it is an enabled ``torch.amp.GradScaler``; None if it is None or disabled (it scales
        nothing).

    Raises:
        TypeError: ``scaler`` is not a ``torch.amp.GradScaler``.
        ValueError: an enabled scaler with ``nonfinite`` other than ``"skip"``.
    """
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"{owner}: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    if nonfinite != "skip":
        raise ValueError(f"{owner}: with a GradScaler nonfinite must be 'skip' (an overflow is the scaler's to "
                         f"handle: it skips the step and lowers its scale), got {nonfinite!r}")
    return scaler


class Core:
    """This rank's method, memory, guard, communicator and counters.

    Args:
        method: a :class:`~gradcomp.Method` (e.g. :class:`~gradcomp.DGC`), a
            :class:`~gradcomp.Compressor` or a registered name (``"dgc"``,
            ``"topk"``, ...).
        process_group: the group to communicate on (None: the default group), or
            a :class:`~gradcomp.comm.Communicator` already made (the
            :class:`~gradcomp.Simulator`'s in-process workers).
        owner: the front door's name, for error messages.
        nonfinite: ``"skip"`` or ``"raise"`` (see :mod:`gradcomp.guard`).
        emulate_latency_ms: see :class:`~gradcomp.comm.Communicator` (experiments only).
        optimizer: the optimizer the averaged gradients go to, checked against
            the method (:func:`~gradcomp.method.check_optimizer`).  A door
            that cannot see it passes ``None`` and warns once at the first
            step when the method applies momentum itself.
        scaler: the ``torch.amp.GradScaler`` whose scale the gradients carry (None: unscaled gradients).

    Raises:
        TypeError: a scaler that is not a ``torch.amp.GradScaler``.
        ValueError: a bad setting, or an optimizer the method cannot be paired with.
    """

    def __init__(self, method: Method | Compressor | str,
                 process_group: dist.ProcessGroup | Communicator | None = None, *,
                 owner: str, nonfinite: Nonfinite = "skip", emulate_latency_ms: float = 0.0,
                 optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
        self.owner = owner
        self.configured = as_method(method)  # as given: the same on every rank (the settings check compares it)
        self.scaler = check_scaler(owner, scaler, nonfinite)
        self.guard = StepGuard(nonfinite, scaled=self.scaler is not None)
        self.process_group = process_group
        self.emulate_latency_ms = check_latency(emulate_latency_ms)
        self.optimizer_checked = False
        self.set_optimizer(optimizer)
        self._comm: Communicator | None = None
        self._given = process_group if isinstance(process_group, Communicator) else None
        self._method: Method | None = None
        self._loaded: dict[str, Any] | None = None  # a state loaded before binding

    # -- binding ----------------------------------------------------------------

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Check ``optimizer`` against the method (:func:`~gradcomp.method.check_optimizer`).

        Args:
            optimizer: the optimizer the averaged gradients go to; None checks nothing.

        Raises:
            ValueError: the method cannot be paired with it (momentum applied twice, say); the message names
                the fix.
        """
        if optimizer is not None:
            check_optimizer(self.configured, optimizer)
            self.optimizer_checked = True

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` has run (the first step, or a property that needs the group)."""
        return self._comm is not None

    def bind(self) -> None:
        """Join the process group (once): the communicator and this rank's copy of the method.

        A state loaded before is applied now.  Warns once when the method owns momentum and no optimizer was
        checked.

        Raises:
            RuntimeError: ``torch.distributed`` is not initialized (and no communicator was given).
        """
        if self._comm is not None:
            return
        if self._given is None and not dist.is_initialized():
            raise RuntimeError(f"{self.owner}: torch.distributed is not initialized at the first step; call "
                               "torch.distributed.init_process_group first (torchrun scripts, Lightning and "
                               "Accelerate do it for you)")
        if not self.optimizer_checked and self.configured.owns_momentum:
            warnings.warn(f"{self.owner} cannot see the optimizer: {type(self.configured).__name__} applies "
                          "momentum itself, so the optimizer must have none (torch.optim.SGD(params, lr, "
                          "**gradcomp.sgd_settings(method, momentum, weight_decay))); pass optimizer= to have it "
                          "checked", UserWarning, stacklevel=3)
            self.optimizer_checked = True
        if self._given is not None:
            comm = self._given
        else:
            assert not isinstance(self.process_group, Communicator)  # a Communicator is _given
            comm = Communicator(self.process_group, emulate_latency_ms=self.emulate_latency_ms)
        method = self.configured.for_rank(comm.rank)
        if self._loaded is not None:
            method.load_state_dict(self._loaded)
            self.guard.load_state_dict(self._loaded_guard)
            self._loaded = None
        self._comm, self._method = comm, method

    @property
    def comm(self) -> Communicator:
        """The communicator on the process group (binds to it)."""
        self.bind()
        assert self._comm is not None  # bind() set it
        return self._comm

    @property
    def method(self) -> Method:
        """This rank's copy of the method (binds to the process group)."""
        self.bind()
        assert self._method is not None  # bind() set it
        return self._method

    @property
    def rank(self) -> int:
        """This rank in the process group (binds to it)."""
        return self.comm.rank

    @property
    def world_size(self) -> int:
        """The number of ranks in the process group (binds to it)."""
        return self.comm.world_size

    # -- a step -------------------------------------------------------------------

    def step(self) -> Step:
        """A new synchronous step (the doors whose ranks step together), its loss scale read now.

        Returns:
            The :class:`Step`.
        """
        return Step(self)

    def check_settings(self, params: Mapping[str, Tensor], **extra: Any) -> None:
        """The settings check alone (the doors that decide on non-finite gradients by themselves), at the first
        call only (:func:`~gradcomp.guard.check_settings`).

        Args:
            params: the door's named parameters (or this step's gradients): their names, shapes and dtypes are
                compared.
            **extra: more settings every rank must share (DGA's ``delay``, say).

        Raises:
            SettingsMismatchError: a setting differs between ranks (on every rank).
        """
        if not self.guard.settings_checked:
            self.guard.settings_checked = True
            check_settings(self.comm, self.configured, params, nonfinite=self.guard.nonfinite,
                           loss_scaled=self.scaler is not None, **extra)

    def loss_scale(self) -> Tensor | None:
        """The scale this step's gradients carry: the scaler's scale tensor as it is now (on its device, read
        without a host sync), or None without a scaler.  It changes only in ``scaler.update()``, after the step.

        Returns:
            The scale tensor, or None.

        Raises:
            RuntimeError: the scaler has no scale yet (backward did not run on ``scaler.scale(loss)``).
        """
        if self.scaler is None:
            return None
        scale = self.scaler._get_scale_async()  # get_scale() would sync the host with the device
        if scale is None:
            raise RuntimeError(f"{self.owner}: the GradScaler has no scale yet; run backward on scaler.scale(loss)")
        return scale

    @property
    def skipped_fill(self) -> float:
        """What a skipped step leaves in the gradients: zeros, or with a scaler Inf, so that every rank's
        ``scaler.step`` skips the optimizer step and ``scaler.update`` lowers the scale."""
        return math.inf if self.scaler is not None else 0.0

    @property
    def defer(self) -> bool:
        """Whether a step's exchanges wait for its last gradient: the settings check (first step) and DGC's
        local clipping need every gradient at once.  The non-finite verdict does not (see :class:`Step`)."""
        return self.method.needs_all_gradients or not self.guard.settings_checked

    def exchanges(self, prepared: Mapping[str, Tensor], names: list[str] | None = None,
                  method: Method | None = None) -> dict[str, MethodExchange]:
        """The exchange generators of the ``prepared`` gradients.

        Args:
            prepared: the gradients as :meth:`gradcomp.Method.prepare` returned them, by name.
            names: those to exchange (None: all, in ``prepared``'s order).
            method: the method that exchanges them (None: this rank's).

        Returns:
            ``{name: generator}``, for :meth:`~gradcomp.comm.Communicator.exchange`.
        """
        method = method or self.method
        world = self.world_size
        return {n: method.exchange(n, prepared[n], world) for n in (names if names is not None else prepared)}

    def exchange(self, grads: Mapping[str, Tensor]) -> torch.futures.Future:
        """Prepare and exchange ``grads`` (one bucket), without the non-finite guard of a :class:`Step`.

        Args:
            grads: the bucket's gradients, by name.

        Returns:
            A future of ``{name: average}``.
        """
        return self.comm.exchange(self.exchanges(self.method.prepare(grads, self.world_size)))

    def end_step(self) -> None:
        """The step is over: advance the method's counters (and with them its schedules)."""
        self.method.end_step()

    @property
    def steps(self) -> int:
        """Steps taken (those of a state loaded before binding too); does not bind."""
        return self._method.steps if self._method is not None else int((self._loaded or {}).get("steps", 0))

    # -- state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's own state: the method's memory and counters, the guard's count.

        Returns:
            ``{"method": ..., "guard": ...}``: tensors and plain values (before binding: the state loaded, or
            the configured method's empty one).
        """
        if self._method is None:
            method = self._loaded if self._loaded is not None else self.configured.state_dict()
            return {"method": method, "guard": self.guard.state_dict() if self._loaded is None
                    else self._loaded_guard}
        return {"method": self._method.state_dict(), "guard": self.guard.state_dict()}

    def check_state(self, state: Any, params: Mapping[str, Tensor] | None = None) -> None:
        """Raise a one-line ``ValueError`` naming the entry unless ``state`` is one :meth:`load_state_dict`
        takes: a dict whose ``method`` entry is a state of this method (:meth:`~gradcomp.Method.check_state`;
        with ``params``, the door's named parameters, one that fits them).

        Args:
            state: the state to check.
            params: the door's named parameters (None: not checked against them).

        Raises:
            ValueError: ``state`` is not such a dict, or its method state does not fit.
        """
        if not isinstance(state, Mapping) or "method" not in state:
            got = f"keys {sorted(map(str, state))}" if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{self.owner} state must be a dict with a 'method' entry, got {got}")
        self.configured.check_state(state["method"], params)

    def load_state_dict(self, state: Mapping[str, Any], params: Mapping[str, Tensor] | None = None) -> None:
        """Restore :meth:`state_dict`; before binding, kept and applied at the first step.  A state that is not
        one, or with ``params`` does not fit them (:meth:`check_state`), raises a one-line ``ValueError`` with
        nothing changed; what is not known at the load (the gradients) is checked at each step.

        Args:
            state: what :meth:`state_dict` returned.
            params: the door's named parameters (None: not checked against them).

        Raises:
            ValueError: see :meth:`check_state`.
        """
        self.check_state(state, params)
        if self._method is None:
            self.configured.for_rank(0).load_state_dict(state["method"])  # validates the state now
            self._loaded, self._loaded_guard = dict(state["method"]), dict(state.get("guard", {}))
            return
        self._method.load_state_dict(state["method"])
        self.guard.load_state_dict(state.get("guard", {}))


class Step:
    """One step of a door whose ranks step together (the DDP hook, :class:`~gradcomp.DistributedOptimizer`,
    the :class:`~gradcomp.Simulator`'s synchronous workers), bucket by bucket.

    Each bucket's exchanges start as soon as :meth:`add` gets its gradients,
    while backward goes on.  With ``nonfinite="skip"`` the guard's verdict
    does not hold them back, and a skipped step still changes no memory:

    * each bucket's non-finite flags (one per tensor) stay on the device;
    * what its exchanges may change in the method (memory, per-tensor
      compressor state) is saved first (:meth:`~gradcomp.Method.save`);
    * a NaN or Inf is compressed as 0 (the gradient is overwritten in place:
      the step is skipped anyway), so no exchange depends on it;
    * :meth:`end` agrees on the verdict (one all-reduce of ``world_size``
      int32 after the last bucket) and, where any rank saw a NaN or Inf, puts
      back everything the step changed, on every rank;
    * the decoded averages are checked too: a NaN or Inf there (a payload
      damaged on the wire) skips the step the same way.  Every rank decodes
      the same bytes, so every rank reaches the same verdict without another
      collective.

    A clean step costs a copy of the memory it touches and one host read of
    the verdict, after the last exchange.  (Compressors that draw from torch's
    global generator, ``seed=None``, have drawn on a skipped step.)  With
    ``nonfinite="raise"`` each bucket is checked on the host as it comes: the
    rank that sees a NaN raises before its memory changes.

    Args:
        core: the door's :class:`Core` (:meth:`Core.step` makes the step).
    """

    def __init__(self, core: Core) -> None:
        self.core = core
        self.scale = core.loss_scale()
        self.guarded = core.guard.nonfinite == "skip"
        self._flags: list[Tensor] = []
        self._names: list[str] = []
        self._undo: list[Callable[[], None]] = []
        self._futures: list[Future] = []
        self._devices: set[torch.device] = set()

    def flag(self, grads: Mapping[str, Tensor]) -> None:
        """Count ``grads`` in the verdict (``"raise"``: check them now).  :meth:`add` does it for the gradients
        it exchanges; a door calls it alone for those it averages otherwise (sparse gradients).

        Args:
            grads: gradients, by name.

        Raises:
            NonFiniteGradientError: with ``nonfinite="raise"``, one of them holds a NaN or Inf.
        """
        if not grads:
            return
        if not self.guarded:
            nonfinite_in(grads, "raise", f"rank {self.core.rank}")
            return
        self._devices.update(cuda_devices(grads.values()))
        self._names.extend(grads)
        self._flags.append(nonfinite_flags(grads))

    def include(self, fut: Future) -> None:
        """Have :meth:`end` wait for ``fut`` too (an exchange the door started itself).

        Args:
            fut: the future of that exchange.
        """
        self._futures.append(fut)

    def add(self, grads: Mapping[str, Tensor], buckets: Sequence[Sequence[str]] | None = None) -> list[Future]:
        """Start exchanging ``grads`` (prepared together: DGC's local clipping sees them all), one exchange per
        bucket of names (default: one for all).  At the first step ``grads`` must be all the step's gradients
        (the settings check compares them).

        Args:
            grads: gradients, by name; a NaN or Inf in them is overwritten with 0 in place (``"skip"``).
            buckets: the names of each exchange (None: one exchange of all of ``grads``).

        Returns:
            One future per bucket, of ``{name: average}``, unscaled.

        Raises:
            SettingsMismatchError: at the first step, a setting differs between ranks.
            NonFiniteGradientError: with ``nonfinite="raise"``, a gradient holds a NaN or Inf.
        """
        core = self.core
        if not core.guard.settings_checked:
            core.check_settings(grads)
        method = core.method
        self.flag(grads)
        if self.guarded and grads:
            self._undo.append(method.save(grads))
            for g in grads.values():
                g.nan_to_num_(0.0, 0.0, 0.0)
        prepared = method.prepare(grads, core.world_size, self.scale, check=False)
        futures = [core.comm.exchange(core.exchanges(prepared, list(names))) for names in (buckets or [list(grads)])]
        self._futures += futures
        return futures

    def end(self) -> Future:
        """Agree on the verdict: one all-reduce of every rank's count of non-finite gradients.

        Returns:
            A future of the verdict, True when every rank skips this step, completed once every exchange
            :meth:`add` started has completed and, on a skipped step, every memory they changed is put back.
            (With ``nonfinite="raise"``, an average decoded non-finite completes it with
            :class:`~gradcomp.NonFiniteGradientError`.)
        """
        core = self.core
        devices = sorted(self._devices, key=str)
        stream = core.comm.stream(devices)
        local = torch.cat(self._flags) if self._flags else None
        waits = list(self._futures)
        if local is not None:
            waits.append(core.comm.count_per_rank_async(local.sum(dtype=torch.int32)))

        exchanged = len(self._futures)

        def decide(f: Future) -> bool:
            with on_stream(stream):
                values = f.value()
                averages = {n: a for v in values[:exchanged] for n, a in v.items()}
                parts = [values[-1]] if local is not None else []  # every rank's count of non-finite gradients
                corrupt = nonfinite_flags(averages) if averages else None  # every rank decodes the same bytes
                if corrupt is not None:
                    parts.append(corrupt.sum(dtype=torch.int32).view(1))
                if not parts:
                    return False
                read = torch.cat(parts).tolist()  # the step's one host read
                counts, decoded = (read[:-1], read[-1]) if corrupt is not None else (read, 0)
                if not any(counts) and not decoded:
                    return False
                bad = [n for n, b in zip(averages, corrupt.tolist()) if b] if decoded and corrupt is not None else []
                if not self.guarded:
                    raise NonFiniteGradientError(f"rank {core.rank}: the decoded average holds NaN or Inf in "
                                                 f"{', '.join(bad[:5])} (a payload damaged on the wire?)")
                for undo in reversed(self._undo):
                    undo()
                if any(counts):
                    assert local is not None  # counts are the ranks' counts of local's flags
                    core.guard.record_skip(counts, [n for n, b in zip(self._names, local.tolist()) if b])
                else:
                    core.guard.record_skip([], [], corrupt=bad)
                return True

        return all_done(waits, devices, stream).then(decide)


class Door:
    """What every front door passes through to its :class:`Core` (``self.core``)."""

    core: Core

    @property
    def method(self) -> Method:
        """This rank's copy of the method (its memory and counters; binds to the process group)."""
        return self.core.method

    @property
    def comm(self) -> Communicator:
        """The communicator (``comm.bytes_sent``: the payload bytes this rank sent; binds to the group)."""
        return self.core.comm

    @property
    def guard(self) -> StepGuard:
        """The guard: the ``nonfinite`` setting and the count of skipped steps."""
        return self.core.guard

    @property
    def steps(self) -> int:
        """Steps taken (restored from a checkpoint too)."""
        return self.core.steps
