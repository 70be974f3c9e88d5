"""What every rank must agree on before a step may touch memory: the same settings, and finite gradients.

Compressed communication is fragile in two ways plain all-reduce is not:

* **Settings that differ between ranks** (density, method, parameter shapes)
  make ranks issue collectives of different sizes: gloo and NCCL then hang
  or read garbage.  At its first step a front door exchanges a fingerprint
  (:func:`settings_of`: the method's configuration and every parameter's
  name, shape and dtype) and every rank raises :class:`SettingsMismatchError`
  naming what differs, before the first payload is sent.
* **A NaN or Inf** in one rank's gradient would enter its residuals and
  momenta for good, and through the average every rank's model.  Each step
  the ranks agree on whether any of them holds a non-finite gradient, before
  any memory changes, and then all skip the step, as
  ``torch.amp.GradScaler`` skips a step whose gradients overflowed.

:class:`StepGuard` does both for the front doors whose ranks step together
(DDP hook, :class:`~gradcomp.DistributedOptimizer`, the simulator's
synchronous workers), through :class:`~gradcomp.core.Step`.
``nonfinite="skip"`` (the default) costs one all-reduce of one int32 per rank
per step (control traffic, not counted in ``bytes_sent``), issued after the
step's last exchange: the exchanges start bucket by bucket and overlap
backward, what they may change in memory is saved first, and a skipped step
puts it back.  ``nonfinite="raise"`` sends nothing extra: the rank that sees
the NaN raises :class:`~gradcomp.NonFiniteGradientError` with its memory
untouched and the launcher (``torchrun``, :func:`gradcomp.launch.spawn`)
ends the job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from .compressors.dense import NoCompression

__all__ = ["NONFINITE", "NONFINITE_KEY", "Nonfinite", "NonFiniteGradientError", "SettingsMismatchError", "StepGuard",
           "check_nonfinite", "check_settings", "flag_exchange", "mismatches", "non_finite", "nonfinite_flags",
           "nonfinite_in", "nonfinite_step", "settings_of"]

log = logging.getLogger(__name__)

#: What a front door does with a non-finite gradient: skip the step on every rank, or raise.
Nonfinite = Literal["skip", "raise"]
#: The values of :data:`Nonfinite`, for the checks at run time.
NONFINITE: tuple[Nonfinite, ...] = get_args(Nonfinite)

#: The key under which a delayed step's non-finite verdict travels with its average (not a parameter name:
#: it holds a NUL).
NONFINITE_KEY = "\0nonfinite"


class SettingsMismatchError(ValueError):
    """The ranks were started with different settings (raised on every rank, at the first step).

    The message has a line per setting that differs, with every rank's value (:func:`mismatches`).

    Example:
        What a front door does at its first step (:func:`check_settings`), with a stand-in for the
        communicator whose other rank was started with another density:

        >>> import torch, gradcomp
        >>> from gradcomp.guard import check_settings, settings_of
        >>> params = {"fc.weight": torch.zeros(2, 8)}
        >>> class TwoRanks:
        ...     def all_objects(self, mine):  # every rank's fingerprint, in rank order
        ...         return [mine, settings_of(gradcomp.as_method(gradcomp.get("topk", density=0.1)), params)]
        >>> check_settings(TwoRanks(), gradcomp.as_method(gradcomp.get("topk", density=0.01)), params)
        Traceback (most recent call last):
        ...
        gradcomp.guard.SettingsMismatchError: the ranks were started with different settings:
          method.density: rank 0 0.01, rank 1 0.1
    """


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or Inf; raised before it reaches any memory.

    A front door with ``nonfinite="raise"`` raises it on the rank that sees one (:func:`nonfinite_in`);
    with ``"skip"``, the default, every rank skips the step instead.

    Example:
        >>> import torch, gradcomp
        >>> from gradcomp.guard import nonfinite_in
        >>> grads = {"fc.weight": torch.tensor([1.0, float("inf")]), "fc.bias": torch.zeros(2)}
        >>> nonfinite_in(grads, "skip", "rank 0, step 7")
        ['fc.weight']
        >>> try:
        ...     nonfinite_in(grads, "raise", "rank 0, step 7")
        ... except gradcomp.NonFiniteGradientError as error:
        ...     print(error)
        rank 0, step 7: non-finite gradient (NaN or Inf) in fc.weight; no memory was changed
    """


def _values(g: Tensor) -> Tensor:
    """The stored entries of ``g`` (a sparse COO gradient's values; a dense tensor itself)."""
    return g.coalesce().values() if g.is_sparse else g


def non_finite(grads: Mapping[str, Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an Inf.

    One sum per tensor (a read of memory, no temporary): a finite sum means
    every entry is finite.  A sum that is not finite (a NaN or Inf inside, or
    large finite values overflowing) is confirmed entry by entry.

    Args:
        grads: tensors by name (a sparse COO tensor's stored values are read).

    Returns:
        The names of those holding a NaN or an Inf, in ``grads``' order.
    """
    if not grads:
        return []
    sums = torch.stack([_values(g).sum().double() for g in grads.values()])
    if bool(torch.isfinite(sums).all()):
        return []
    return [name for name, g in grads.items() if not bool(torch.isfinite(_values(g)).all())]


def nonfinite_flags(grads: Mapping[str, Tensor]) -> Tensor:
    """Which tensors of ``grads`` hold a NaN or an Inf, without reading a value on the host.

    One float64 sum per tensor: no sum of finite float32 or 16-bit values reaches float64's range, so the sum
    is finite exactly when every entry is.

    Args:
        grads: tensors by name, at least one, all on one device.

    Returns:
        An int32 tensor on their device, one flag per tensor: 1 where it holds a NaN or an Inf.
    """
    return torch.stack([~torch.isfinite(_values(g).sum(dtype=torch.float64)) for g in grads.values()]).int()


def check_nonfinite(owner: str, value: str) -> Nonfinite:
    """Check a ``nonfinite`` setting (callers without a type checker pass any string).

    Args:
        owner: the class or function the setting belongs to, for the message.
        value: the setting.

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not one of :data:`NONFINITE`; one line naming it.
    """
    if value not in NONFINITE:
        raise ValueError(f"{owner}: nonfinite must be one of {', '.join(map(repr, NONFINITE))}, got {value!r}")
    return value


def nonfinite_in(grads: Mapping[str, Tensor], nonfinite: Nonfinite, where: str) -> list[str]:
    """The names of the gradients holding a NaN or Inf, or with ``nonfinite="raise"`` an error naming them.

    Args:
        grads: gradients by name.
        nonfinite: ``"skip"`` (return the names) or ``"raise"``.
        where: the rank or worker and step, put first in the message.

    Returns:
        The names of the non-finite gradients (empty when all are finite).

    Raises:
        NonFiniteGradientError: with ``nonfinite="raise"``, when one is not finite.
    """
    bad = non_finite(grads)
    if bad and nonfinite == "raise":
        raise NonFiniteGradientError(f"{where}: non-finite gradient (NaN or Inf) in {', '.join(bad)}; no memory "
                                     "was changed")
    return bad


def nonfinite_step(local: Mapping[str, Tensor], nonfinite: Nonfinite, where: str, what_now: str) -> bool:
    """For the doors that decide alone (delayed averaging, local steps, the simulator's workers): whether
    ``local`` holds a NaN or Inf, logged as a warning.

    Args:
        local: this rank's gradients by name.
        nonfinite: ``"skip"`` or ``"raise"``.
        where: the rank or worker and step, for the message.
        what_now: what the door does about it, for the message.

    Returns:
        True when a gradient is not finite.

    Raises:
        NonFiniteGradientError: with ``nonfinite="raise"``, when one is not finite.
    """
    bad = nonfinite_in(local, nonfinite, where)
    if bad:
        log.warning("%s: non-finite gradient (NaN or Inf) in %s; %s", where, ", ".join(bad[:5]), what_now)
    return bool(bad)


def flag_exchange(bad: bool, device: torch.device):
    """The exchange of a delayed step's non-finite verdict (dense float32, so it joins the step's dense
    all-reduce, under :data:`NONFINITE_KEY`).

    Args:
        bad: whether this rank saw a non-finite gradient.
        device: where the gradients are.

    Yields:
        The one payload: 1.0 from a rank that saw one, else 0.0.

    Returns:
        The sum over ranks, a 1-entry tensor (above 0 when any rank saw one).
    """
    result = yield from NoCompression().exchange(torch.full((1,), float(bad), device=device))
    return result.total


def settings_of(method: Any, params: Mapping[str, Tensor], **extra: Any) -> dict[str, Any]:
    """The fingerprint ranks compare (:func:`check_settings`).

    Args:
        method: the method as the user gave it (before :meth:`~gradcomp.Method.for_rank` offsets per-rank
            seeds): anything with ``config()``.
        params: the parameters (or gradients) by name.
        **extra: more settings every rank must share.

    Returns:
        ``{"method": method.config(), "parameters": {name: "shape dtype"}, **extra}``: plain values.
    """
    return {"method": method.config(),
            "parameters": {name: f"{list(p.shape)} {str(p.dtype).removeprefix('torch.')}{' sparse' * p.is_sparse}"
                           for name, p in params.items()},
            **extra}


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def mismatches(every_rank: list[Mapping[str, Any]], limit: int = 8) -> list[str]:
    """What differs between the ranks' fingerprints.

    Args:
        every_rank: each rank's fingerprint (:func:`settings_of`), in rank order; nested dicts are flattened
            to dotted keys.
        limit: how many lines to spell out; a last line counts the others.

    Returns:
        One line per setting that is not the same on every rank, by key (empty when they agree).

    Example:
        >>> from gradcomp.guard import mismatches
        >>> mismatches([{"method": {"density": 0.001}, "delay": 2}, {"method": {"density": 0.01}, "delay": 2}])
        ['method.density: rank 0 0.001, rank 1 0.01']
    """
    flat = [_flatten(s) for s in every_rank]
    missing = object()
    lines = []
    for key in sorted(set().union(*flat)):
        values = [f.get(key, missing) for f in flat]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r} {'(none)' if v is missing else repr(v)}" for r, v in enumerate(values))
            lines.append(f"{key}: {shown}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def check_settings(comm, method: Any, params: Mapping[str, Tensor], **extra: Any) -> None:
    """Exchange the fingerprint (:func:`settings_of`) and raise on every rank if any setting differs (one
    ``all_gather_object``: call it at the first step, before any payload).

    Args:
        comm: the communicator (anything with ``all_objects``, :meth:`~gradcomp.comm.Communicator.all_objects`).
        method: the method as the user gave it.
        params: the parameters (or gradients) by name.
        **extra: more settings every rank must share.

    Raises:
        SettingsMismatchError: a setting differs; the message names each one with every rank's value.
    """
    lines = mismatches(comm.all_objects(settings_of(method, params, **extra)))
    if lines:
        raise SettingsMismatchError("the ranks were started with different settings:\n  " + "\n  ".join(lines))


class StepGuard:
    """What the doors whose ranks step together keep of the guard: whether the settings were checked (at the
    first step), what to do with a non-finite gradient, and how many steps every rank skipped.

    Args:
        nonfinite: ``"skip"`` or ``"raise"``.
        scaled: the gradients carry a ``torch.amp.GradScaler``'s loss scale, whose overflows are routine
            (logged at INFO, not WARNING: the scaler skips the step too and lowers its scale).

    Raises:
        ValueError: ``nonfinite`` is not ``"skip"`` or ``"raise"``.
    """

    def __init__(self, nonfinite: Nonfinite = "skip", *, scaled: bool = False) -> None:
        self.nonfinite = check_nonfinite("StepGuard", nonfinite)
        self.scaled = scaled
        self.settings_checked = False
        self.skipped = 0

    def record_skip(self, counts: list[int], bad: list[str], corrupt: Sequence[str] = ()) -> None:
        """Count a step every rank skipped, and log why.

        Args:
            counts: each rank's number of non-finite gradients, in rank order.
            bad: the names of this rank's.
            corrupt: the averages decoded non-finite while every gradient was finite (a payload damaged on the
                wire).
        """
        self.skipped += 1
        if corrupt:
            log.warning("step skipped on every rank: the decoded average holds NaN or Inf in %s (a payload damaged "
                        "on the wire?); no memory was changed (%d steps skipped so far)", ", ".join(corrupt[:5]),
                        self.skipped)
            return
        ranks = ", ".join(str(r) for r, c in enumerate(counts) if c)
        log.log(logging.INFO if self.scaled else logging.WARNING,
                "step skipped on every rank: non-finite gradient (NaN or Inf) on rank %s%s; no memory was "
                "changed (%d steps skipped so far)%s", ranks, f" (here in {', '.join(bad[:5])})" if bad else "",
                self.skipped, "; the GradScaler skips it too and lowers its scale" if self.scaled else "")

    def state_dict(self) -> dict[str, Any]:
        """The count of skipped steps, for checkpoints.

        Returns:
            ``{"skipped": int}``.
        """
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned (a missing count counts as 0).
        """
        self.skipped = int(state.get("skipped", 0))
