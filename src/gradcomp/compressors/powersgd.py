r"""PowerSGD: rank-r gradient compression by one step of power iteration.

Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019.

Each gradient tensor is viewed as a matrix :math:`M_w \in \mathbb{R}^{n \times m}`
on worker :math:`w` (``M = t.reshape(t.shape[0], -1)``; a convolution kernel
``(out, in, kh, kw)`` becomes ``(out, in*kh*kw)``).  With a shared
:math:`Q \in \mathbb{R}^{m \times r}` the paper's Algorithm 1 (the
compressor) is two all-reduces::

    P_w   = M_w Q                      # (n, r)
    P     = sum_w P_w                  # all-reduce 1
    P^    = ORTHOGONALIZE(P)           # columns orthonormal, same on every rank
    Q_w   = M_w^T P^                   # (m, r)
    Q'    = sum_w Q_w                  # all-reduce 2
    total = P^ Q'^T = P^ P^^T sum_w M_w

so ``total`` is the projection of the summed gradient onto the span of ``P^``
(the caller divides by the number of workers).  Warm start (Algorithm 2)
reuses ``Q'`` of the previous step as the next ``Q``: over steps on a slowly
changing gradient this is subspace iteration and approaches the best rank-r
approximation.  The stored ``Q'`` is column-normalised (a positive column
scaling of ``Q`` does not change ``P^``) and non-finite entries are zeroed,
so one bad step (an fp16 overflow) cannot poison every later step.

Error feedback (Algorithm 1, ``e_w = Delta_w - DECOMPRESS(C(Delta_w))``) uses
this worker's own approximation ``P^ Q_w^T``: the ``sent`` payload of
:meth:`PowerSGD.exchange` holds ``(P^, Q_w)`` and
``decompress([sent], like) == P^ @ Q_w.T``.  Summed over workers these are
exactly ``total`` (linearity), so no gradient mass is lost.

A tensor is compressed only if it has ``dim() >= 2`` and
``numel / ((n + m) * r) >= min_compression_rate`` (as in PyTorch's
``powerSGD_hook``); biases, norm layers, small or empty tensors and
non-floating tensors are all-reduced dense in one round.  The rate test with
``min_compression_rate >= 1`` also guarantees ``r < min(n, m)``.

Only :meth:`PowerSGD.exchange` is the real algorithm.  :meth:`PowerSGD.compress`
alone returns the first-round payload ``(P_w,)`` (for inspection); it cannot be
decompressed on its own, because ``P^`` needs the sum over workers and ``Q_w``
a second round, so :meth:`PowerSGD.decompress` raises ``NotImplementedError``
for round payloads.  Dense tensors need one round, and there compress and
decompress work standalone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    Compressor,
    Exchange,
    Exchanged,
    Payload,
    check_int,
    check_payloads,
    check_range,
    check_tensor,
    generator,
    register,
    tensors_of,
)

__all__ = ["PowerSGD"]

# Payload.meta tags (local bookkeeping, never sent).
_DENSE = "powersgd:dense"  # (flat tensor,)           one round, decompressable
_P = "powersgd:p"  # (P_w,)                   round 1 of a matrix
_Q = "powersgd:q"  # (Q_w,)                   round 2 of a matrix
_FACTORS = "powersgd:factors"  # (P^, Q_w)          this worker's contribution

# Golden-ratio increment: seeds of successive fresh draws (warm_start=False) are far apart.
_SEED_STRIDE = 0x9E3779B97F4A7C15


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed (and sent) in float32; float32/float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _orthogonalize(p: Tensor) -> Tensor:
    """Orthonormal columns spanning ``p`` (Householder QR, reduced).

    Deterministic: identical input gives identical output on every rank.
    Householder QR never divides by a column norm, so zero or linearly
    dependent columns yield finite, still orthonormal columns (any direction
    orthogonal to the others) instead of NaN; with warm start that extra
    direction lets the iteration recover rank on the next step.
    """
    return torch.linalg.qr(p, mode="reduced").Q


def _summed(received: Sequence[Payload], field: str, *, numel: int | None = None, shape: tuple | None = None,
            dtype: torch.dtype | None = None) -> Tensor:
    """The combined tensor of a ``"sum"`` round (one payload; several are summed), checked against the
    expected ``numel``, ``shape`` and ``dtype`` (see :func:`~gradcomp.compressors.base.check_tensor`)."""
    if len(received) == 0:
        raise ValueError("powersgd: received no payload for a 'sum' round")
    total: Tensor | None = None
    for p in received:
        (t,) = tensors_of("powersgd", p, 1)
        check_tensor("powersgd", field, t, numel=numel, shape=shape, dtype=dtype)
        total = t if total is None else total + t
    assert total is not None  # received holds at least one payload
    return total


@register
@dataclass(kw_only=True)
class PowerSGD(Compressor):
    r"""Rank-``rank`` PowerSGD with warm start and error feedback (Vogels et al. 2019).

    Args:
        rank: approximation rank r (>= 1).
        min_compression_rate: compress a matrix only if
            ``numel / ((n + m) * rank) >= min_compression_rate`` (>= 1); otherwise send it dense.
        warm_start: reuse the previous step's aggregated Q (``state["q"]``) as the next Q.
        seed: seed of the ``torch.Generator`` that draws an initial Q ~ N(0, 1)^{m x r};
            drawn on the tensor's device with a generator of that device, so every rank gets the same Q
            and no step copies from the host (a CUDA run draws another Q than a CPU run).

    Per-parameter ``state`` (tensors only, ``torch.load(weights_only=True)``-safe):

    - ``"q"``: the warm-start factor (m, r), column-normalised, when ``warm_start``;
    - ``"step"``: an int64 CPU counter of fresh draws, when not ``warm_start``
      (so each step draws a new Q, as the paper's no-warm-start ablation).

    Raises:
        ValueError: ``rank`` or ``seed`` is not an integer of at least 1 or 0, ``min_compression_rate`` is
            below 1 or not finite, or ``warm_start`` is not a bool.

    Example:
        One worker (the sum of each round is its own payload): a rank-1 matrix is recovered, up to float
        rounding, from 8 + 6 numbers instead of 48, and the warm-start factor is kept for the next step.

        >>> import torch
        >>> from gradcomp.compressors.powersgd import PowerSGD
        >>> powersgd = PowerSGD(rank=1)
        >>> grad = torch.outer(torch.arange(1.0, 9.0), torch.ones(6))  # 8 x 6, rank 1
        >>> powersgd.matrix_shape(grad), powersgd.matrix_shape(torch.ones(6))  # a bias is sent dense
        ((8, 6), None)
        >>> state = {}
        >>> def one_worker(tensor):
        ...     exchange = powersgd.exchange(tensor, state)
        ...     payload = next(exchange)
        ...     try:
        ...         while True:
        ...             payload = exchange.send([payload])
        ...     except StopIteration as done:
        ...         return done.value
        >>> result = one_worker(grad)
        >>> torch.allclose(result.total, grad, atol=1e-4), sorted(state)
        (True, ['q'])
        >>> [tuple(t.shape) for t in result.sent.tensors]  # P^ (8 x 1) and Q_w (6 x 1)
        [(8, 1), (6, 1)]
    """

    name = "powersgd"
    error_feedback = True

    rank: int = 1
    min_compression_rate: float = 2.0
    warm_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("PowerSGD", "rank", self.rank, 1)
        check_range("PowerSGD", "min_compression_rate", self.min_compression_rate, 1.0, float("inf"),
                    high_open=True)
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"PowerSGD.warm_start must be a bool, got {self.warm_start!r}")
        check_int("PowerSGD", "seed", self.seed, 0)

    # ------------------------------------------------------------ planning

    def matrix_shape(self, tensor: Tensor) -> tuple[int, int] | None:
        """How ``tensor`` is sent.

        Args:
            tensor: a gradient.

        Returns:
            ``(n, m)`` if ``tensor`` is compressed as an n x m matrix (``n = tensor.shape[0]``), None if it is
            sent dense (fewer than 2 dimensions, empty, not floating-point, or a compression rate below
            ``min_compression_rate``).
        """
        if tensor.dim() < 2 or tensor.numel() == 0 or not tensor.is_floating_point():
            return None
        n = tensor.shape[0]
        m = tensor.numel() // n
        if tensor.numel() < self.min_compression_rate * (n + m) * self.rank:
            return None
        return n, m

    def _draw_q(self, m: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Q ~ N(0, 1)^{m x r}, drawn on ``device`` (no copy from the host)."""
        return torch.randn((m, self.rank), generator=generator(device, seed % 2**63), dtype=dtype, device=device)

    def _initial_q(self, state: dict | None, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Q for this step: the warm-start factor if there is a usable one, else a seeded draw."""
        if self.warm_start:
            q = state.get("q") if state is not None else None
            if isinstance(q, Tensor) and q.shape == (m, self.rank):
                return q.to(device=device, dtype=dtype)
            return self._draw_q(m, self.seed, dtype, device)
        step = int(state["step"]) if state is not None and isinstance(state.get("step"), Tensor) else 0
        return self._draw_q(m, self.seed + step * _SEED_STRIDE, dtype, device)

    def _finish_state(self, state: dict | None, q_sum: Tensor) -> None:
        if state is None:
            return
        if self.warm_start:
            q = torch.nan_to_num(q_sum, nan=0.0, posinf=0.0, neginf=0.0)
            state["q"] = torch.nn.functional.normalize(q, dim=0, eps=torch.finfo(q.dtype).tiny)
        else:
            step = int(state["step"]) if isinstance(state.get("step"), Tensor) else 0
            state["step"] = torch.tensor(step + 1, dtype=torch.int64)

    # ------------------------------------------------------------ protocol

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        """First-round payload only: the dense tensor, or ``(P_w = M_w Q,)`` for a matrix.

        Does not change ``state``.  A matrix payload cannot be decompressed on
        its own; use :meth:`exchange`, which runs both rounds.

        Args:
            tensor: a gradient.
            state: this parameter's state (its warm-start factor); read, not changed.

        Returns:
            A ``"sum"`` payload of the flattened tensor, or of ``P_w`` (n x r).
        """
        shape = self.matrix_shape(tensor)
        if shape is None:
            return Payload((tensor.reshape(-1),), op="sum", meta=_DENSE)
        n, m = shape
        dtype = _compute_dtype(tensor.dtype)
        matrix = tensor.reshape(n, m).to(dtype)
        return Payload((matrix @ self._initial_q(state, m, dtype, tensor.device),), op="sum", meta=_P)

    def exchange(self, tensor: Tensor, state: dict | None = None) -> Exchange:
        """Algorithm 1 with warm start: two ``"sum"`` rounds, ``P_w`` then ``Q_w``.

        Returns ``Exchanged(total, sent)`` with ``total = P^ (sum_w Q_w)^T``
        (the sum over workers, shaped and typed like ``tensor``) and
        ``sent = (P^, Q_w)``, this worker's own approximation ``P^ Q_w^T``.
        ``state`` is updated only once both rounds have completed.

        Args:
            tensor: a gradient (or its error-compensated accumulator).
            state: this parameter's state: ``"q"`` (warm start) or ``"step"``, updated at the end.

        Yields:
            ``Payload((P_w,))`` then ``Payload((Q_w,))`` (both ``"sum"``); a tensor sent dense: one
            payload of the flattened tensor.

        Returns:
            ``Exchanged(total, sent)`` as above.

        Raises:
            ValueError: a combined payload has the wrong count, shape or dtype.
        """
        shape = self.matrix_shape(tensor)
        if shape is None:
            payload = Payload((tensor.reshape(-1),), op="sum", meta=_DENSE)
            received = yield payload
            # a fresh tensor: callers may scale ``total`` in place, and the combined payload is shared
            total = _summed(received, "dense values", numel=tensor.numel()).reshape(tensor.shape).to(
                tensor.dtype, copy=True)
            return Exchanged(total, payload)

        n, m = shape
        dtype = _compute_dtype(tensor.dtype)
        matrix = tensor.reshape(n, m).to(dtype)
        q = self._initial_q(state, m, dtype, tensor.device)

        p_local = matrix @ q  # P_w = M_w Q
        received = yield Payload((p_local,), op="sum", meta=_P, last=False)
        p_hat = _orthogonalize(_summed(received, "P", shape=(n, self.rank), dtype=dtype))  # P^ = ORTH(sum_w P_w)

        q_local = matrix.T @ p_hat  # Q_w = M_w^T P^
        received = yield Payload((q_local,), op="sum", meta=_Q)
        q_sum = _summed(received, "Q", shape=(m, self.rank), dtype=dtype)  # Q' = sum_w Q_w

        total = (p_hat @ q_sum.T).reshape(tensor.shape).to(tensor.dtype)
        self._finish_state(state, q_sum)
        return Exchanged(total, Payload((p_hat, q_local), op="sum", meta=_FACTORS))

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        """Sum over ``payloads`` of ``P @ Q.T`` (factor payloads) or the dense tensor, like ``like``.

        Factor payloads are the ``sent`` of :meth:`exchange`.  Round payloads
        (from :meth:`compress` or the rounds of :meth:`exchange`) raise
        ``NotImplementedError``: PowerSGD needs both rounds of :meth:`exchange`.

        Args:
            payloads: factor payloads ``(P^, Q_w)``, or dense payloads of ``like.numel()`` entries.
            like: the tensor that was exchanged (its shape, dtype and device).

        Returns:
            A new tensor like ``like``.

        Raises:
            NotImplementedError: a payload is one round's factor (``P_w`` or ``Q_w``).
            ValueError: ``payloads`` is empty, or a payload does not decode to ``like``'s shape.
        """
        check_payloads("powersgd", payloads)
        total = torch.zeros(like.shape, dtype=_compute_dtype(like.dtype), device=like.device)
        n = like.shape[0] if like.dim() else 1
        m = like.numel() // n if n else 0
        for payload in payloads:
            if payload.meta in (_P, _Q):
                raise NotImplementedError(
                    "powersgd: a single round's factor cannot be decompressed; PowerSGD needs two "
                    "all-reduce rounds, run Compressor.exchange() and decompress its 'sent' payload"
                )
            if len(payload.tensors) == 2:
                p_hat, q = payload.tensors
                check_tensor("powersgd", "P", p_hat, kind="floating-point", dim=2)
                check_tensor("powersgd", "P", p_hat, shape=(n, p_hat.shape[1]))
                check_tensor("powersgd", "Q", q, kind="floating-point", shape=(m, p_hat.shape[1]))
                total += (p_hat @ q.T).reshape(like.shape).to(total.dtype)
            elif len(payload.tensors) == 1 and payload.tensors[0].numel() == like.numel():
                total += payload.tensors[0].reshape(like.shape).to(total.dtype)
            else:
                raise ValueError(
                    f"powersgd: payload with {len(payload.tensors)} tensor(s) does not decode to shape "
                    f"{tuple(like.shape)}"
                )
        return total.to(like.dtype)
