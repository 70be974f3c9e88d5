"""The compressor protocol, the wire payload and the registry.

A :class:`Compressor` is a pure tensor transform: it turns one gradient tensor
into a :class:`Payload` (the tensors that really cross the network) and turns
the payloads of all workers back into a tensor.  It runs no collective and
holds no global state; per-parameter state (PowerSGD's warm-start factor,
random-k's step counter) lives in the ``state`` dict its caller passes in,
which the caller keys by parameter name.

How workers' payloads are combined is part of the payload (``Payload.op``):

``"sum"``
    element-wise sum over workers (an all-reduce); the receiver gets one
    payload holding the sums.
``"max"``
    element-wise maximum over workers (an all-reduce with MAX).
``"gather"``
    the receiver gets every worker's payload, in rank order (an all-gather).

Most compressors need one exchange: :meth:`Compressor.exchange` yields the
payload of :meth:`Compressor.compress`, receives the combined payloads and
returns the decompressed sum.  Methods that need several rounds (TernGrad's
shared scale, PowerSGD's two factors) override :meth:`Compressor.exchange`
and yield once per round.  The code that drives the exchange (the simulator
or the communicator) is the only place where payloads meet collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, get_args

import torch
from torch import Tensor

__all__ = [
    "Compressor",
    "DtypeKind",
    "Exchange",
    "Exchanged",
    "Payload",
    "available",
    "check_indices",
    "check_payloads",
    "check_tensor",
    "device_path",
    "valid_indices",
    "forced_device_path",
    "generator",
    "mark_corrupt",
    "get",
    "register",
    "tensors_of",
]

#: How the workers' payloads are combined (see the module docstring).
Op = Literal["sum", "max", "gather"]
_OPS: tuple[Op, ...] = get_args(Op)


@dataclass(frozen=True)
class Payload:
    """What one worker puts on the wire for one tensor in one round.

    ``tensors`` are exactly the bytes sent; ``meta`` is local bookkeeping and
    is never sent: what every rank already knows (shapes, counts, shared
    random indices), or what the sender's own payload decodes to (for its
    error feedback).  A received payload is the receiver's own with the
    sender's ``tensors`` put in (:meth:`replace`), so decoding reads the
    tensors, never ``meta``.
    ``variable`` marks payloads whose sizes differ between ranks (the
    communicator then exchanges their lengths first); ``last`` is False on
    every round of a multi-round exchange but its final one.

    Args:
        tensors: the tensors sent, exactly the bytes on the wire.
        op: how the workers' payloads are combined: ``"sum"``, ``"max"`` or ``"gather"`` (see the module
            docstring).
        meta: local bookkeeping, never sent.
        variable: True when the sizes of ``tensors`` differ between ranks.
        last: False on every round of a multi-round exchange but its final one.

    Raises:
        ValueError: ``op`` is not one of ``"sum"``, ``"max"``, ``"gather"``.
        TypeError: ``tensors`` is not a tuple of tensors.

    Example:
        >>> import torch
        >>> from gradcomp import Payload
        >>> payload = Payload((torch.zeros(4, dtype=torch.float16),), op="sum")
        >>> payload.nbytes
        8
        >>> payload.replace(torch.ones(2)).tensors
        (tensor([1., 1.]),)
    """

    tensors: tuple[Tensor, ...]
    op: Op = "gather"
    meta: Any = None
    variable: bool = False
    last: bool = True

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Payload.op must be one of {_OPS}, got {self.op!r}")
        if not isinstance(self.tensors, tuple) or not all(isinstance(t, Tensor) for t in self.tensors):
            raise TypeError("Payload.tensors must be a tuple of tensors")

    @property
    def nbytes(self) -> int:
        """Exact number of bytes this payload puts on the wire."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def replace(self, *tensors: Tensor) -> Payload:
        """The same payload (op, meta) carrying other tensors: a combined result.

        Args:
            *tensors: the tensors the new payload carries.

        Returns:
            A new payload; this one is unchanged (payloads are frozen).
        """
        return dataclasses.replace(self, tensors=tuple(tensors))


@dataclass(frozen=True)
class Exchanged:
    """Result of one tensor's exchange.

    ``total`` is the *sum* over workers of what they sent, in a new tensor the
    caller may change in place (it divides by the number of workers); ``sent`` describes this worker's own
    contribution, so error feedback can remove it from the accumulator with
    :meth:`Compressor.subtract_sent`.

    Args:
        total: the sum over workers of what they sent, shaped and typed like the exchanged tensor.
        sent: this worker's own payload, which ``decompress([sent], like)`` decodes to its contribution.
    """

    total: Tensor
    sent: Payload


# A generator that yields payloads, receives the combined payloads of all
# workers for each (a list: one entry for "sum"/"max", one per worker in rank
# order for "gather") and returns the Exchanged result.
Exchange = Generator[Payload, Sequence[Payload], Exchanged]


class Compressor:
    """Base class of every compressor.

    Subclasses are ``@dataclass(kw_only=True)`` configs, set ``name`` and
    implement :meth:`compress` and :meth:`decompress` (or :meth:`exchange` for
    several rounds).  ``error_feedback`` says whether the method, as its paper
    defines it, keeps what was not sent in a residual; a front door pairs the
    compressor with residual memory accordingly.

    A compressor sums what the workers send: the caller divides by their number.  Build one by name
    with :func:`gradcomp.get` (:func:`gradcomp.available` lists the names); :func:`gradcomp.register`
    shows a compressor of your own.

    Example:
        One worker's round trip through top-k (two of four entries), then two workers' sum in float16:

        >>> import torch, gradcomp
        >>> topk = gradcomp.get("topk", density=0.5)
        >>> grad = torch.tensor([0.5, -2.0, 0.25, 4.0])
        >>> topk.decompress([topk.compress(grad)], like=grad)
        tensor([ 0., -2.,  0.,  4.])
        >>> fp16 = gradcomp.get("fp16")
        >>> payload = fp16.compress(grad)
        >>> payload.op, payload.nbytes
        ('sum', 8)
        >>> fp16.decompress([payload, payload], like=grad).tolist()
        [1.0, -4.0, 0.5, 8.0]
    """

    name: ClassVar[str] = ""
    error_feedback: ClassVar[bool] = False

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        """The payload this worker sends for ``tensor`` (the one round of a single-round compressor).

        Args:
            tensor: the tensor to send (a gradient, or its error-compensated accumulator); any shape.
            state: this parameter's state, kept by the caller between steps (PowerSGD's warm-start
                factor, the step counter of seeded draws); ``None`` keeps none (seeded draws then repeat).

        Returns:
            What crosses the network, and how the workers' payloads combine (``Payload.op``).

        Raises:
            NotImplementedError: the compressor implements neither this nor :meth:`exchange`.
        """
        raise NotImplementedError

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        """Sum over ``payloads`` of what each decodes to, shaped and typed like ``like``.

        Args:
            payloads: the combined payloads of one round: one for ``"sum"``/``"max"``, one per worker in
                rank order for ``"gather"``; or ``[sent]``, this worker's own (its contribution).
            like: a tensor of the shape, dtype and device to decode to (the tensor that was compressed).

        Returns:
            A new tensor like ``like``: the sum of what the payloads decode to.

        Raises:
            ValueError: a payload is corrupt (wrong count, size or type, an index or code out of range), on
                the CPU; off it the first entry of the result is NaN instead
                (:func:`~gradcomp.compressors.base.mark_corrupt`).
            NotImplementedError: the compressor does not implement it (the base class).
        """
        raise NotImplementedError

    def exchange(self, tensor: Tensor, state: dict | None = None) -> Exchange:
        """The whole exchange of ``tensor``, as a generator the caller drives round by round.

        The caller sends each yielded payload, combines it with the other workers' payloads of the round
        (``Payload.op``) and sends the combined payloads back in; the generator's return value is the result.
        This default is one round: :meth:`compress`, then :meth:`decompress`.

        Args:
            tensor: the tensor to exchange; any shape.
            state: this parameter's state, as for :meth:`compress`.

        Yields:
            The payload of each round; receives the round's combined payloads (a list).

        Returns:
            ``Exchanged(total, sent)``: the sum over workers, and this worker's own payload.
        """
        payload = self.compress(tensor, state)
        received = yield payload
        return Exchanged(self.decompress(received, like=tensor), payload)

    @property
    def single_round(self) -> bool:
        """True when one payload, known before anything is received, is all this compressor sends
        (it keeps the default :meth:`exchange`)."""
        return type(self).exchange is Compressor.exchange

    def subtract_sent(self, accumulator: Tensor, sent: Payload) -> None:
        """Remove this worker's own contribution from ``accumulator`` in place (error feedback).

        Args:
            accumulator: the error-compensated tensor that was exchanged; changed in place.
            sent: ``Exchanged.sent`` of its exchange.
        """
        accumulator.sub_(self.decompress([sent], like=accumulator))

    def for_rank(self, rank: int) -> Compressor:
        """The compressor worker ``rank`` runs.

        Stochastic compressors whose workers must draw independently (TernGrad, QSGD) offset their seed by
        the rank; all others are the same on every rank.

        Args:
            rank: the worker's rank.

        Returns:
            This compressor, or a copy with the rank's seed.
        """
        return self

    def options(self) -> dict[str, Any]:
        """The configuration as plain values (for fingerprints and run configs).

        Returns:
            The dataclass fields given to the constructor, by name (empty for a compressor that is not a
            dataclass).
        """
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


# ---------------------------------------------------------------- validation


def check_range(owner: str, field: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Check that a setting is a finite number in a range.

    Args:
        owner: the class or function the setting belongs to, for the message.
        field: the setting's name, for the message.
        value: the value to check.
        low: the lower bound.
        high: the upper bound.
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.

    Raises:
        ValueError: ``value`` is not a finite int or float (bools are not) within the range; the message
            names ``owner.field``.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{owner}.{field} must be in {lo}{low}, {high}{hi}, got {value!r}")


def check_int(owner: str, field: str, value: int, low: int) -> None:
    """Check that a setting is an integer of at least ``low``.

    Args:
        owner: the class or function the setting belongs to, for the message.
        field: the setting's name, for the message.
        value: the value to check.
        low: the smallest value allowed.

    Raises:
        ValueError: ``value`` is not an int (bools are not) or is below ``low``.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}.{field} must be an integer >= {low}, got {value!r}")


def num_selected(density: float, numel: int) -> int:
    """How many entries a density selects: ``ceil(density * numel)``, at least one of a non-empty tensor.

    Args:
        density: the share of entries to keep.
        numel: the number of entries.

    Returns:
        ``k``, between 1 and ``numel`` (0 for an empty tensor).
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(density * numel)))


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest index type that addresses ``numel`` entries.

    Args:
        numel: the number of entries to address.

    Returns:
        ``torch.int32``, or ``torch.int64`` beyond ``2**31 - 1`` entries.
    """
    return torch.int32 if numel <= 2**31 - 1 else torch.int64


# ---------------------------------------------------------- the device path
#
# Where tensors live on an accelerator, every read of a tensor's value by the host (``.item()``, ``int()``,
# ``bool()``, ``nonzero``, boolean-mask indexing, ``bincount``, a blocking copy) stalls the host until the
# device has caught up, and then the device idles until the host launches again.  So off the CPU the
# compressors run a fixed-shape formulation whose every size is known from shapes and settings (exact
# ``torch.topk`` and ``sort`` for selection, ``cumsum`` and ``scatter`` for decoding, random draws with a
# generator of the tensor's device, one accumulation per rank in rank order), and checks of received
# payloads become device-side flags (:func:`mark_corrupt`).  On the CPU, where reading a value costs nothing,
# the host formulation runs (with the compiled kernel where it applies) and a corrupt payload raises.

_forced = False


def device_path(t: Tensor) -> bool:
    """Whether the fixed-shape, sync-free formulation runs for ``t``.

    Args:
        t: the tensor being compressed or decoded.

    Returns:
        True for tensors that are not on the CPU, and for CPU tensors inside :func:`forced_device_path`.
    """
    return _forced or t.device.type != "cpu"


@contextlib.contextmanager
def forced_device_path(enabled: bool = True):
    """Run the device formulation on CPU tensors too, inside a ``with`` block.

    Tests check it there against the CPU formulation; benchmarks time it.  Process-wide, not thread-local:
    for tests and benchmarks only.

    Args:
        enabled: force the device formulation (False: the CPU's own, e.g. inside an enclosing block).
    """
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before


def generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A ``torch.Generator`` of ``device`` seeded with ``seed``.

    Draws stay on the device, and the same seed gives the same draws on every rank of one device type.

    Args:
        device: the device the draws are made on.
        seed: the seed.

    Returns:
        The generator, or ``None`` for the ``meta`` device, which holds no data (no generator exists for it,
        and the ops that draw ignore it there).
    """
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def mark_corrupt(total: Tensor, ok: Tensor | None) -> Tensor:
    """The device path's answer to a corrupt payload: ``total`` with NaN as its first entry unless ``ok``
    (a 0-d bool on the device) holds.

    Raising would need the host to read the verdict (a sync per tensor), so the verdict travels in the
    data: a NaN in the decoded gradient is seen by every non-finite check downstream (``GradScaler``
    skips the step, the front doors' guard stops training), at the cost of one entry, not a pass over the
    tensor.  The decoders never read or write out of bounds either way: entries that fail a check are
    dropped before they index anything.

    Args:
        total: the decoded tensor; changed in place.
        ok: the verdict of the payloads' checks, a 0-d bool on the device; ``None`` when nothing was checked.

    Returns:
        ``total`` itself.
    """
    if ok is not None and total.numel():
        head = total.view(-1)[:1]
        head.copy_(torch.where(ok, head, torch.full_like(head, math.nan)))
    return total


# ------------------------------------------------------- received payloads
#
# A received payload came over the network: decoders check it before they index with it, so that a corrupt
# one raises ValueError naming the field, what was expected and what came, and never writes out of bounds
# (on CPU torch would raise an opaque IndexError; on CUDA an out-of-range index is a device-side assert that
# kills the process's CUDA context).  The checks are O(1) or one vectorized min/max: no loop over entries.
# Checks of sizes and types read no values and run everywhere; those that read values (``check_indices``)
# raise on the CPU path, and on the device path keep their verdict on the device (:func:`valid_indices`,
# :func:`mark_corrupt`).


def check_payloads(owner: str, payloads: Sequence[Payload]) -> None:
    """Check that a round handed back at least one payload, as a collective always does (one for sum/max,
    one per worker for gather).

    Args:
        owner: the compressor, for the message.
        payloads: the combined payloads of a round.

    Raises:
        ValueError: ``payloads`` is empty.
    """
    if len(payloads) == 0:
        raise ValueError(f"{owner}: corrupt exchange: expected at least 1 payload, got 0")


def tensors_of(owner: str, payload: Payload, count: int) -> tuple[Tensor, ...]:
    """The payload's tensors, which must number ``count``.

    Args:
        owner: the compressor, for the message.
        payload: a received payload.
        count: how many tensors the compressor's payloads hold.

    Returns:
        ``payload.tensors``.

    Raises:
        ValueError: the payload holds another number of tensors.
    """
    if len(payload.tensors) != count:
        raise ValueError(f"{owner}: corrupt payload: expected {count} tensor(s), got {len(payload.tensors)}")
    return payload.tensors


#: The kinds of dtype :func:`check_tensor` tells apart.
DtypeKind = Literal["floating-point", "integer"]

_KINDS: dict[DtypeKind, Callable[[torch.dtype], bool]] = {
    "floating-point": lambda d: d.is_floating_point,
    "integer": lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool}


def check_tensor(owner: str, field: str, t: Tensor, *, numel: int | None = None, shape: tuple | None = None,
                 dtype: torch.dtype | None = None, kind: DtypeKind | None = None, dim: int | None = None) -> None:
    """Check a received tensor's size, shape and type (which reads no value: it runs on every device).

    Args:
        owner: the compressor, for the message.
        field: the tensor's role in the payload (``"values"``, ``"indices"``), for the message.
        t: the tensor to check.
        numel: the number of entries it must have (None: any).
        shape: the shape it must have (None: any).
        dtype: the dtype it must have (None: any).
        kind: the kind of dtype it must have, ``"floating-point"`` or ``"integer"`` (None: any).
        dim: the number of dimensions it must have (None: any).

    Raises:
        ValueError: ``t`` differs from what is asked; the message names ``owner``'s payload ``field``, what
            was expected and what came.
    """
    def bad(what: str, expected: Any, got: Any) -> ValueError:
        return ValueError(f"{owner}: corrupt payload: {field} {what} must be {expected}, got {got}")

    if dtype is not None and t.dtype != dtype:
        raise bad("dtype", dtype, t.dtype)
    if kind is not None and not _KINDS[kind](t.dtype):
        raise bad("dtype", f"an {kind} type" if kind == "integer" else f"a {kind} type", t.dtype)
    if dim is not None and t.dim() != dim:
        raise bad("dimension", dim, t.dim())
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise bad("shape", tuple(shape), tuple(t.shape))
    if numel is not None and t.numel() != numel:
        raise bad("size", numel, t.numel())


def check_indices(owner: str, field: str, indices: Tensor, numel: int) -> None:
    """Check received indices: integer, 1-d, every entry in ``[0, numel)`` (one min and one max, read on the
    host: the CPU path's check; the device path's is :func:`valid_indices`).

    Args:
        owner: the compressor, for the message.
        field: the tensor's role in the payload, for the message.
        indices: the indices to check.
        numel: the number of entries of the tensor they index.

    Raises:
        ValueError: ``indices`` is not a 1-d integer tensor, or one of them lies outside ``[0, numel)``.
    """
    check_tensor(owner, field, indices, kind="integer", dim=1)
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= numel:
            raise ValueError(f"{owner}: corrupt payload: {field} must lie in [0, {numel}) for a tensor of {numel} "
                             f"entries, got an index of {low if low < 0 else high} (out of range)")


def valid_indices(indices: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """The device path's :func:`check_indices`, which reads no value on the host.

    Args:
        indices: the received indices.
        numel: the number of entries of the tensor they index.

    Returns:
        ``indices`` with every entry outside ``[0, numel)`` replaced by 0 (safe to index with), and a 0-d
        bool on the device, True when there was no such entry.
    """
    inside = (indices >= 0) & (indices < numel)
    return torch.where(inside, indices, torch.zeros_like(indices)), inside.all()


# ------------------------------------------------------------------ registry

_REGISTRY: dict[str, type] = {}

#: A class :func:`register` takes: one with a class attribute ``name``.
_Registered = TypeVar("_Registered", bound="type[Any]")


def register(cls: _Registered) -> _Registered:
    """Class decorator: make ``cls`` (a compressor, or a whole method such as :class:`gradcomp.DGC`)
    available as ``gradcomp.get(cls.name)``.

    Args:
        cls: the class; its class attribute ``name`` is the name to register it under.

    Returns:
        ``cls`` itself.

    Raises:
        ValueError: ``cls.name`` is empty, or another class is registered under it.

    Example:
        A compressor of your own: signs, summed (a ``@dataclass(kw_only=True)``, as the built-in ones):

        >>> import torch, gradcomp
        >>> from dataclasses import dataclass
        >>> @gradcomp.register
        ... @dataclass(kw_only=True)
        ... class Sign(gradcomp.Compressor):
        ...     name = "sign"
        ...     def compress(self, tensor, state=None):
        ...         return gradcomp.Payload((tensor.sign().to(torch.int8).reshape(-1),), op="sum")
        ...     def decompress(self, payloads, like):
        ...         total = sum(p.tensors[0].to(like.dtype) for p in payloads)
        ...         return total.reshape(like.shape)
        >>> "sign" in gradcomp.available()
        True
        >>> sign = gradcomp.get("sign")
        >>> grad = torch.tensor([0.5, -3.0, 0.0])
        >>> sign.decompress([sign.compress(grad)], like=grad)
        tensor([ 1., -1.,  0.])
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"compressor name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """The names :func:`get` accepts.

    Returns:
        The registered names, sorted.

    Example:
        >>> import gradcomp
        >>> names = gradcomp.available()
        >>> "dgc" in names and "powersgd" in names and "qsgd" in names
        True
    """
    return sorted(_REGISTRY)


def get(name: str, **options: Any) -> Any:
    """Build the compressor (or method) registered as ``name`` with ``options``.

    Args:
        name: a name of :func:`available`.
        **options: the class's arguments.

    Returns:
        A new instance of the class registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered, or an option is not one of the class's arguments (the message
            lists the names, or the options); the class raises ``ValueError`` for a bad value.

    Example:
        >>> import gradcomp
        >>> gradcomp.get("qsgd", levels=4)
        QSGD(levels=4, bucket_size=512, seed=None)
        >>> type(gradcomp.get("dgc", density=0.001)).__name__  # the whole of DGC: a gradcomp.DGC
        'DGC'
        >>> gradcomp.get("qsgd", bits=4)
        Traceback (most recent call last):
        ...
        ValueError: compressor 'qsgd' has no option 'bits'; its options are: levels, bucket_size, seed
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressor or method {name!r}; available: {', '.join(available())}") from None
    allowed = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"compressor {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(allowed) or '(none)'}"
        )
    return cls(**options)
