"""What stays on a worker between steps, keyed by parameter name.

A memory turns the local gradient into the *accumulator* the compressor sees
(:meth:`compensate`) and, once the exchange is done, keeps what was not sent
(:meth:`update`).  Names, not DDP bucket indices, key every buffer, so buffers
survive bucket rebuilds and load into another front door.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor

from .compressors.base import Compressor, Payload
from .compressors.sparse import DGCSelect, Workspace, fusable, fused_dgc_steps

__all__ = ["Memory", "NoMemory", "Residual", "DGCMemory", "Momentum", "Masking", "MASKINGS"]

#: DGC's momentum factor masking (:class:`DGCMemory`'s ``masking``, ``gradcomp.DGC``'s ``momentum_masking``): the
#: paper's except on lookup tables, the paper's everywhere, none.
Masking = Literal["auto", True, False]
#: The values of :data:`Masking`, for the checks at run time.
MASKINGS: tuple[Masking, ...] = get_args(Masking)

_HALF = (torch.float16, torch.bfloat16)


@runtime_checkable
class _SentIndices(Protocol):
    """A compressor that tells which entries its payload sent (DGC's selectors): what masking needs."""

    def sent_indices(self, payload: Payload, numel: int) -> Tensor: ...


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def check_buffers(where: str, buffers: Any, params: Mapping[str, Tensor] | None = None) -> None:
    """Raise a one-line ``ValueError`` naming the entry unless ``buffers`` is a dict of dense floating-point
    tensors that hold data (not on the ``meta`` device) keyed by name; with ``params`` (the model's
    parameters), every name must be a parameter's and every buffer its shape, in its working dtype (float32
    for a 16-bit parameter).

    Args:
        where: how the message names ``buffers`` (``"Residual.residuals"``).
        buffers: the value to check.
        params: the model's parameters by name, or ``None`` to check the form alone.

    Raises:
        ValueError: when ``buffers`` is not such a dict, or (with ``params``) does not fit the parameters.
    """
    if not isinstance(buffers, Mapping):
        raise ValueError(f"{where} is a {type(buffers).__name__}, expected a dict of tensors by parameter name")
    for name, t in buffers.items():
        entry = f"{where}[{name!r}]"
        if not isinstance(name, str):
            raise ValueError(f"{where} has the key {name!r}, expected parameter names (str)")
        if not isinstance(t, Tensor):
            raise ValueError(f"{entry} is a {type(t).__name__}, expected a floating-point tensor")
        if not t.is_floating_point() or t.layout is not torch.strided or t.is_meta:
            raise ValueError(f"{entry} is a {t.dtype} {str(t.layout).removeprefix('torch.')} tensor on "
                             f"{t.device}, expected a dense floating-point tensor holding data")
        if params is None:
            continue
        if name not in params:
            raise ValueError(f"{entry} names no parameter of the model")
        p = params[name]
        dtype = torch.float32 if p.dtype in _HALF else p.dtype
        if t.shape != p.shape or t.dtype != dtype:
            raise ValueError(f"{entry} is {_shape(t)} {t.dtype}, its parameter {_shape(p)} {dtype}")


def check_like(where: str, name: str, buffer: Tensor, grad: Tensor) -> Tensor:
    """``buffer``, raising a one-line ``ValueError`` unless it has ``grad``'s shape, dtype and device: a loaded
    state that does not fit the gradients is refused before any kernel or in-place op touches it.

    Args:
        where: how the message names the dict that holds ``buffer``.
        name: the parameter's name.
        buffer: the held buffer.
        grad: its parameter's gradient.

    Returns:
        ``buffer`` itself.

    Raises:
        ValueError: when ``buffer`` differs from ``grad`` in shape, dtype or device.
    """
    if buffer.shape != grad.shape or buffer.dtype != grad.dtype or buffer.device != grad.device:
        raise ValueError(f"{where}[{name!r}] is {_shape(buffer)} {buffer.dtype} on {buffer.device}, its gradient "
                         f"{_shape(grad)} {grad.dtype} on {grad.device}: the loaded state does not fit this model")
    return buffer


def check_fits(owner: Any, keys: tuple[str, ...], grads: Mapping[str, Tensor]) -> None:
    """Every buffer of ``owner``'s dicts ``keys`` that ``grads`` names checked against its gradient
    (:func:`check_like`): a method calls it before a step touches any memory.

    Args:
        owner: the memory (or :class:`Momentum`) that holds the dicts.
        keys: the names of its attributes that are per-name buffer dicts.
        grads: this step's gradients by parameter name.
    """
    for key in keys:
        buffers = getattr(owner, key)
        for name, grad in grads.items():
            buffer = buffers.get(name)
            if buffer is not None:
                check_like(f"{type(owner).__name__}.{key}", name, buffer, grad)


def _entry(where: str, state: Any, key: str) -> Any:
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} is a {type(state).__name__}, expected a dict")
    if key not in state:
        raise ValueError(f"{where} has no {key!r} entry")
    return state[key]


def _load(target: dict[str, Tensor], source: dict[str, Tensor]) -> None:
    target.clear()  # contiguous copies: the compiled kernel takes them as they are
    target.update({name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in source.items()})


class Memory:
    """Base: no state; the accumulator is the gradient itself.

    Example:
        >>> import torch
        >>> from gradcomp import Memory
        >>> memory = Memory()
        >>> grad = torch.ones(3)
        >>> memory.compensate("w", grad) is grad, memory.state_dict()
        (True, {})
    """

    def compensate(self, name: str, grad: Tensor) -> Tensor:
        """The accumulator the compressor sees for ``name`` this step (it may change the memory's buffers).

        Args:
            name: the parameter's name.
            grad: its local gradient (working precision).

        Returns:
            The accumulator: here ``grad`` itself.
        """
        return grad

    def update(self, name: str, accumulator: Tensor, compressor: Compressor, sent: Payload) -> None:
        """Keep what was not sent of ``accumulator`` once ``compressor`` has sent ``sent``.

        Args:
            name: the parameter's name.
            accumulator: what :meth:`compensate` returned for it (changed in place by a subclass).
            compressor: the compressor that made ``sent``.
            sent: the payload it sent.
        """
        pass

    def buffers(self) -> list[dict[str, Tensor]]:
        """Every per-name buffer this memory changes in a step (saved and put back around a skipped one): its
        state's entries.

        Returns:
            The buffer dicts, one per entry of :meth:`state_dict`.
        """
        return [getattr(self, key) for key in self._ENTRIES]

    def state_dict(self) -> dict[str, Any]:
        """The memory's state: its per-name buffer dicts by entry name (the tensors themselves, not copies).

        Returns:
            A dict of dicts of tensors; empty for the base.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a state from :meth:`state_dict`, checked first (:meth:`check_state`) and copied.

        Args:
            state: the state to load.

        Raises:
            ValueError: when ``state`` is not one this memory loads; the memory is then unchanged.
        """
        self.check_state(state)

    def check_state(self, state: Any, params: Mapping[str, Tensor] | None = None, where: str | None = None
                    ) -> None:
        """Raise a one-line ``ValueError`` naming the entry unless ``state`` is one this memory loads (with
        ``params``, one that fits those parameters); :meth:`load_state_dict` checks before it changes anything.

        Args:
            state: the state to check.
            params: the model's parameters by name, or ``None``.
            where: how the message names the state (the class's name by default).
        """
        for key in self._ENTRIES:
            check_buffers(f"{where or type(self).__name__}.{key}", _entry(where or type(self).__name__, state, key),
                          params)

    def check_fits(self, grads: Mapping[str, Tensor]) -> None:
        """Raise a one-line ``ValueError`` naming the buffer unless every buffer held for a name of ``grads``
        has its gradient's shape, dtype and device (a loaded state for another model).

        Args:
            grads: this step's gradients by parameter name.
        """
        check_fits(self, self._ENTRIES, grads)

    #: the per-name buffer dicts, by attribute name (as in :meth:`state_dict`)
    _ENTRIES: tuple[str, ...] = ()


NoMemory = Memory


class Residual(Memory):
    """Error feedback (Seide 2014; Strom 2015): what is not sent is added to the next gradient.

    ``acc = g + r``;  after sending C(acc):  ``r = acc - C(acc)``.

    Example:
        Top-1 of three entries is sent; the other two wait for the next step:

        >>> import torch
        >>> from gradcomp import Residual
        >>> from gradcomp.compressors.sparse import TopK
        >>> memory, topk = Residual(), TopK(density=0.3)
        >>> acc = memory.compensate("w", torch.tensor([1.0, -3.0, 2.0]))
        >>> memory.update("w", acc, topk, topk.compress(acc))
        >>> memory.residuals["w"]
        tensor([1., 0., 2.])
        >>> memory.compensate("w", torch.ones(3))
        tensor([2., 1., 3.])
    """

    def __init__(self) -> None:
        self.residuals: dict[str, Tensor] = {}

    _ENTRIES = ("residuals",)

    def compensate(self, name: str, grad: Tensor) -> Tensor:
        residual = self.residuals.get(name)
        return grad.clone() if residual is None else residual.add_(grad)

    def update(self, name: str, accumulator: Tensor, compressor: Compressor, sent: Payload) -> None:
        compressor.subtract_sent(accumulator, sent)
        self.residuals[name] = accumulator

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        _load(self.residuals, state["residuals"])


def lookup_table(grad: Tensor) -> Tensor:
    """Whether ``grad`` leaves most of its rows (slices along the first dimension) at zero, as an embedding's
    gradient does for the tokens not in the batch: a 0-dim bool tensor on ``grad``'s device (nothing waits for
    it).  A weight matrix leaves a row at zero only for a unit no example reached (a dead ReLU): a few.

    Args:
        grad: a gradient.

    Returns:
        A 0-dim bool tensor; false for fewer than two dimensions or rows.
    """
    if grad.dim() < 2 or grad.shape[0] < 2:
        return torch.zeros((), dtype=torch.bool, device=grad.device)
    rows = grad.reshape(grad.shape[0], -1)
    return rows.any(1).sum() * 2 < rows.shape[0]  # any(): nonzero (NaN too), no full-size bool copy


class DGCMemory(Memory):
    """DGC's momentum correction and momentum factor masking (Lin et al. 2018, eq. 4-5).

    Per sparsified tensor on worker k::

        u = m*u + g          (Nesterov: u = m*(u + g))
        v = v + u            (Nesterov: v = v + u + g)
        send top-k of v;  v[idx] = 0;  u[idx] = 0   (masking)

    ``correction=False`` accumulates the gradient itself (``v += g``; the
    caller applies momentum after averaging); ``accumulate=False`` drops what
    was not sent (naive pruning).  Both exist for the paper's ablation.

    ``masking="auto"`` (DGC's default) masks as the paper does except on a
    *lookup table*: a tensor whose gradient this step leaves most of its rows
    (slices along the first dimension) at zero, as ``nn.Embedding``'s does for
    the tokens not in the batch.  A table's rows get gradient in bursts and are
    sent when it arrives, so masking would zero their momentum every time and
    train them by momentum-less SGD, ``1 - m`` times the step of the dense
    momentum SGD DGC stands in for (``notes/embedding-divergence.md``).  Other
    weights leave a row at zero only for a unit that no example in the batch
    reached (a dead ReLU), so for them ``"auto"`` is the paper's masking.

    ``workspace`` (a :class:`~gradcomp.compressors.sparse.Workspace`) is what
    the step keeps between calls for speed alone: the selection's scratch
    buffers, and per list of tensors the compiled kernel's plan with each
    tensor's hint (:meth:`fused_steps`).  It is not part of the state
    (:meth:`state_dict`), and a deep copy of the memory gets a fresh one.

    Args:
        momentum: the momentum factor ``m``.
        nesterov: Nesterov's momentum.
        masking: momentum factor masking (:data:`Masking`).
        correction: momentum correction (``False``: accumulate the gradient itself).
        accumulate: keep what was not sent (``False``: drop it).

    Example:
        >>> import torch
        >>> from gradcomp import DGCMemory
        >>> from gradcomp.compressors.sparse import TopK
        >>> memory, topk = DGCMemory(momentum=0.9), TopK(density=0.5)
        >>> acc = memory.compensate("w", torch.tensor([4.0, -1.0]))
        >>> memory.update("w", acc, topk, topk.compress(acc))
        >>> memory.u["w"], memory.v["w"]  # the sent entry's momentum masked, the other kept
        (tensor([ 0., -1.]), tensor([ 0., -1.]))
    """

    def __init__(self, *, momentum: float, nesterov: bool = False, masking: Masking = "auto",
                 correction: bool = True, accumulate: bool = True) -> None:
        self.momentum = momentum
        self.nesterov = nesterov
        self.masking = masking
        self.correction = correction
        self.accumulate = accumulate
        self.u: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self._tables: dict[str, Tensor] = {}  # masking="auto": compensate's lookup_table(grad), taken by update
        self.workspace = Workspace()  # speed alone: scratch buffers, the kernel's plans and hints; never saved

    _ENTRIES = ("u", "v")

    def compensate(self, name: str, grad: Tensor) -> Tensor:
        increment = grad
        if self.masking == "auto" and self.correction:
            self._tables[name] = lookup_table(grad)
        if self.correction:
            u = self.u.get(name)
            if u is None:
                u = self.u[name] = torch.zeros_like(grad)
            if self.nesterov:
                u.add_(grad).mul_(self.momentum)
                increment = u + grad
            else:
                torch.add(grad, u, alpha=self.momentum, out=u)  # u = m*u + g in one pass
                increment = u
        if not self.accumulate:
            return increment.clone()
        v = self.v.get(name)
        if v is None:
            v = self.v[name] = torch.zeros_like(grad)
        return v.add_(increment)

    def fused_steps(self, grads: Mapping[str, Tensor], selector: DGCSelect) -> dict[str, Payload] | None:
        """:meth:`compensate`, ``selector.compress`` and :meth:`update` for every tensor of ``grads`` in one
        call of the compiled kernel (:func:`~gradcomp.compressors.sparse.fused_dgc_steps`, with this
        memory's ``workspace``); with ``masking="auto"``, one call for the lookup tables and one for the rest.

        Args:
            grads: this step's gradients by parameter name (working precision).
            selector: DGC's selection at this step's density: its settings alone are read.

        Returns:
            The payloads by name, in the order of ``grads``; ``None`` where the kernel does not apply (momentum
            correction or accumulation off, a tensor not float32, contiguous and on CPU, or no kernel): then
            the memory holds what it held, zero buffers for new names aside.

        Raises:
            ValueError: when a held buffer does not fit its gradient (a loaded state for another model).
        """
        held = [b[n] for b in (self.u, self.v) for n in grads if n in b]
        if not (self.correction and self.accumulate and fusable([*grads.values(), *held])):
            return None
        self.check_fits(grads)  # as Method.prepare does; the kernel writes a gradient's size into each buffer
        for name, grad in grads.items():
            for buffers in (self.u, self.v):
                if name not in buffers:
                    buffers[name] = torch.zeros_like(grad)
        if self.masking == "auto":  # one call for the lookup tables (unmasked), one for the rest
            tables = {n: bool(lookup_table(g)) for n, g in grads.items()}
            groups = [([n for n in grads if tables[n] is table], not table) for table in (False, True)]
        else:
            groups = [(list(grads), bool(self.masking))]
        payloads: dict[str, Payload] = {}
        for names, masking in groups:
            if not names:
                continue
            sent = fused_dgc_steps(selector, self.workspace, [grads[n] for n in names], [self.u[n] for n in names],
                                   [self.v[n] for n in names], momentum=self.momentum, nesterov=self.nesterov,
                                   masking=masking, key=tuple(names))
            if sent is None:  # no kernel: the first call changed nothing, and a later one is never reached
                return None
            payloads.update(zip(names, sent))
        return {n: payloads[n] for n in grads}

    def update(self, name: str, accumulator: Tensor, compressor: Compressor, sent: Payload) -> None:
        if self.accumulate:
            compressor.subtract_sent(accumulator, sent)
        table = self._tables.pop(name, None)
        if self.masking and self.correction:
            assert isinstance(compressor, _SentIndices)  # masking pairs DGCMemory with a selector (DGC's)
            u, indices = self.u[name].view(-1), compressor.sent_indices(sent, accumulator.numel())
            if table is None:
                u.index_fill_(0, indices, 0)
            else:  # "auto": a lookup table keeps its momentum (a multiply, not a branch: no wait on a GPU)
                u[indices] *= table.to(u.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"u": dict(self.u), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        _load(self.u, state["u"])
        _load(self.v, state["v"])


class Momentum:
    """Ordinary heavy-ball momentum on an averaged gradient, as ``torch.optim.SGD``
    (dampening 0): ``b = m*b + g``; the update is ``b`` (Nesterov: ``g + m*b``).

    Args:
        momentum: the momentum factor ``m`` (0: the update is the gradient).
        nesterov: Nesterov's momentum.

    Example:
        >>> import torch
        >>> from gradcomp import Momentum
        >>> momentum = Momentum(0.9)
        >>> momentum.apply("w", torch.ones(2))
        tensor([1., 1.])
        >>> momentum.apply("w", torch.ones(2))
        tensor([1.9000, 1.9000])
    """

    def __init__(self, momentum: float, nesterov: bool = False) -> None:
        self.momentum = momentum
        self.nesterov = nesterov
        self.buffers: dict[str, Tensor] = {}

    def apply(self, name: str, grad: Tensor) -> Tensor:
        """The update for ``name`` from its averaged gradient, advancing its buffer.

        Args:
            name: the parameter's name.
            grad: its averaged gradient.

        Returns:
            The update (a new tensor unless ``momentum`` is 0, when it is ``grad``).
        """
        if self.momentum == 0:
            return grad
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = grad.clone()
        else:
            buf.mul_(self.momentum).add_(grad)
        return grad.add(buf, alpha=self.momentum) if self.nesterov else buf.clone()

    def state_dict(self) -> dict[str, Any]:
        """The momentum buffers by name under ``"buffers"`` (the tensors themselves).

        Returns:
            ``{"buffers": {name: tensor}}``.
        """
        return {"buffers": dict(self.buffers)}

    def check_fits(self, grads: Mapping[str, Tensor]) -> None:
        """As :meth:`Memory.check_fits`.

        Args:
            grads: this step's gradients by parameter name.
        """
        check_fits(self, ("buffers",), grads)

    def check_state(self, state: Any, params: Mapping[str, Tensor] | None = None, where: str = "Momentum") -> None:
        """As :meth:`Memory.check_state`.

        Args:
            state: the state to check.
            params: the model's parameters by name, or ``None``.
            where: how the message names the state.
        """
        check_buffers(f"{where}.buffers", _entry(where, state, "buffers"), params)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As :meth:`Memory.load_state_dict`.

        Args:
            state: the state to load.

        Raises:
            ValueError: when ``state`` is not one this loads; the buffers are then unchanged.
        """
        self.check_state(state)
        _load(self.buffers, state["buffers"])
