"""Quantizers: ``onebit`` (1-bit SGD), ``terngrad`` (TernGrad), ``qsgd`` (QSGD) and ``dorefa`` (DoReFa-Net).

All four send a few bits per gradient entry, packed densely with
:mod:`gradcomp.compressors.bits`, plus a handful of floating-point scales:

=========  ==========================================  ==============  ==============
name       bytes on the wire for ``n`` entries         error feedback  unbiased
=========  ==========================================  ==============  ==============
onebit     ceil(n/8) + 2 * ncols * element_size        yes             no
terngrad   ceil(2n/8) + 4 (one fp32 scale)             no              yes
qsgd       ceil(n*width/8) + 4 * ceil(n/bucket_size)   no              yes
dorefa     ceil(n*bits/8) + 4 * nscales                no              yes
=========  ==========================================  ==============  ==============

with ``width = ceil(log2(2 * levels + 1))`` for QSGD and ``nscales`` 1 (or the
number of rows with ``per_row=True``) for DoReFa.

Common conventions
------------------
* Arithmetic runs in float32 for 16-bit (and narrower) floating inputs and in
  the input's own dtype otherwise (float64 stays float64); decoded tensors take
  ``like.dtype`` and ``like.device``.
* Tensors are read with ``reshape``, so non-contiguous views need no copy by
  the caller; empty, 0-d and 1-element tensors are valid inputs.
* A non-finite gradient entry makes (part of) the decoded tensor NaN rather
  than being silently dropped, so overflow checks downstream (e.g. AMP's
  ``GradScaler``) still see it.
* A corrupt payload (a code beyond the last level) raises ``ValueError`` on
  the CPU; off the CPU, where raising would need a sync, it makes the first
  entry of the decoded tensor NaN
  (:func:`~gradcomp.compressors.base.mark_corrupt`).  No step reads a value
  on the host off the CPU.

Randomness (``terngrad``, ``qsgd``, ``dorefa``)
-----------------------------------
With ``seed=None`` the draws come from torch's global generator of the
tensor's device (so ``torch.manual_seed`` governs them).  With an integer
``seed`` every call builds a ``torch.Generator`` seeded from ``(seed, step)``,
where ``step`` is a call counter kept in the per-parameter ``state`` dict under
``"rng_step"`` (a plain int: the state stays loadable with
``torch.load(weights_only=True)`` and a resumed run draws exactly the numbers
it would have drawn).  Consecutive calls with the same ``state`` therefore draw
fresh numbers; calls with ``state=None`` always use step 0 and repeat the same
draws.  Workers must not share a seed: identical draws on every worker make
the quantization errors correlated, and the variance of the average then no
longer falls as ``1/N``; give each worker its own ``seed`` (e.g. ``base + rank``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import bits
from .base import (
    Compressor,
    Exchange,
    Exchanged,
    Payload,
    check_int,
    check_payloads,
    check_range,
    check_tensor,
    device_path,
    generator,
    mark_corrupt,
    register,
    tensors_of,
)

__all__ = ["OneBit", "TernGrad", "QSGD", "DoReFa"]

_RNG_STEP = "rng_step"
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------ helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit (or narrower) floats, the dtype itself otherwise."""
    if not dtype.is_floating_point:
        raise TypeError(f"quantizers take floating-point gradients, got {dtype}")
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _fp32_at_least(x: Tensor) -> Tensor:
    """``x`` as float32, rounded *up* where float32 cannot hold it exactly.

    A scale sent as fp32 must stay >= the magnitudes it normalises, so that
    probabilities ``|g| / s`` stay <= 1 and the receiver decodes with exactly
    the scale the sender quantized with (this keeps the estimators unbiased
    for float64 gradients too).
    """
    y = x.to(torch.float32)
    if x.dtype == torch.float32:
        return y
    up = torch.nextafter(y, torch.full_like(y, math.inf))
    return torch.where(y.to(x.dtype) < x, up, y)


def _splitmix64(x: int) -> int:
    """One SplitMix64 step: decorrelates neighbouring (seed, step) pairs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _check_seed(owner: str, seed: int | None) -> None:
    if seed is None:
        return
    check_int(owner, "seed", seed, 0)
    if seed > _MASK64:
        raise ValueError(f"{owner}.seed must be an integer in [0, 2**64 - 1] or None, got {seed!r}")


def _uniform(seed: int | None, state: dict | None, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` draws from U[0, 1) (see the module docstring for where they come from)."""
    if seed is None:
        return torch.rand(n, dtype=dtype, device=device)
    step = 0
    if state is not None:
        step = int(state.get(_RNG_STEP, 0))
        state[_RNG_STEP] = step + 1
    gen = generator(device, _splitmix64(_splitmix64(seed) ^ step))
    return torch.rand(n, dtype=dtype, device=device, generator=gen)


def _tensors(payload: Payload, count: int, owner: str) -> tuple[Tensor, ...]:
    return tensors_of(owner, payload, count)


def _unpack(owner: str, packed: Tensor, width: int, n: int, high: int, device: torch.device
            ) -> tuple[Tensor, Tensor | None]:
    """``n`` codes of ``width`` bits from a received payload, each checked to be at most ``high``: on the CPU
    path a larger one raises and the verdict is ``None``; on the device path the verdict is a 0-d device bool
    (see :func:`~gradcomp.compressors.base.mark_corrupt`; a code is only ever multiplied, never indexed with)."""
    check_tensor(owner, "packed codes", packed, dtype=torch.uint8, numel=bits.packed_nbytes(n, width))
    codes = bits.unpack(packed.to(device), width, n)
    if not n or high >= (1 << width) - 1:
        return codes, None
    if device_path(codes):
        return codes, codes.max() <= high
    top = int(codes.max())
    if top > high:
        raise ValueError(f"{owner}: corrupt payload: packed codes must lie in [0, {high}], got {top}")
    return codes, None


def _both(ok: Tensor | None, valid: Tensor | None) -> Tensor | None:
    """The verdicts ``ok`` and ``valid`` together (``None``: nothing checked)."""
    return valid if ok is None else ok if valid is None else ok & valid


# ------------------------------------------------------------------- 1-bit


@register
@dataclass(kw_only=True)
class OneBit(Compressor):
    """1-bit SGD (Seide, Fu, Droppo, Li, Yu, Interspeech 2014), with error feedback.

    The tensor is viewed as a matrix ``M = t.reshape(t.shape[0], -1)`` (0-d and
    1-d tensors as one column).  Every entry is sent as one sign bit, packed 8
    per byte, and every column ``j`` gets two reconstruction values: the means
    of its non-negative and of its negative entries,

        a_j = mean{ M_ij : M_ij >= 0 },   b_j = mean{ M_ij : M_ij < 0 },
        Q(M)_ij = a_j if M_ij >= 0 else b_j,

    (0 for an empty side).  Given the signs, these values minimise the squared
    error ``sum_i (M_ij - Q(M)_ij)**2`` of each column.  The quantization error
    is large and biased, so the paper carries it to the next step
    (``error_feedback = True``): ``residual = acc - Q(acc)``.

    Wire: ``(packed signs: uint8[ceil(n/8)], values: dtype[2, ncols])``, i.e.
    ``ceil(n/8) + 2 * ncols * element_size`` bytes; op ``"gather"``.  Row 0 of
    ``values`` holds ``a``, row 1 holds ``b``.

    Example:
        Each column decodes to the mean of its entries of the same sign:

        >>> import torch
        >>> from gradcomp.compressors.quantize import OneBit
        >>> onebit = OneBit()
        >>> grad = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
        >>> onebit.decompress([onebit.compress(grad)], like=grad)
        tensor([[ 2., -3.],
                [ 2., -3.]])
    """

    name = "onebit"
    error_feedback = True

    @staticmethod
    def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
        if len(shape) < 2:
            return math.prod(shape), 1
        return shape[0], math.prod(shape[1:])

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        cd = _compute_dtype(tensor.dtype)
        m = tensor.reshape(self._matrix_shape(tensor.shape)).to(cd)
        positive = m >= 0
        zero = m.new_zeros(())
        pos_sum = torch.where(positive, m, zero).sum(0)
        neg_sum = torch.where(positive, zero, m).sum(0)
        pos_cnt = positive.sum(0)
        neg_cnt = m.shape[0] - pos_cnt
        values = torch.stack([pos_sum / pos_cnt.clamp(min=1), neg_sum / neg_cnt.clamp(min=1)])
        return Payload((bits.pack(positive, 1), values.to(tensor.dtype)), op="gather")

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        cd = _compute_dtype(like.dtype)
        rows, cols = self._matrix_shape(like.shape)
        total = torch.zeros(rows, cols, dtype=cd, device=like.device)
        check_payloads("onebit", payloads)
        for p in payloads:
            packed, values = _tensors(p, 2, "onebit")
            if values.shape != (2, cols):
                raise ValueError(f"onebit: expected values of shape (2, {cols}), got {tuple(values.shape)}")
            check_tensor("onebit", "values", values, kind="floating-point")
            signs = _unpack("onebit", packed, 1, rows * cols, 1, like.device)[0].view(rows, cols).bool()
            values = values.to(like.device, cd)
            total += torch.where(signs, values[0], values[1])
        return total.reshape(like.shape).to(like.dtype)


# ----------------------------------------------------------------- TernGrad


@register
@dataclass(kw_only=True)
class TernGrad(Compressor):
    """TernGrad (Wen, Xu, Yan, Wu, Wang, Chen, Li, NeurIPS 2017): unbiased stochastic ternary gradients.

    With a scale ``s >= max|g|`` each entry becomes (the paper's Eq. 2)::

        t_i = s * sign(g_i) * b_i,   b_i ~ Bernoulli(|g_i| / s),

    so ``E[t] = g``.  Entries take one of ``{-s, 0, +s}`` and are sent as 2-bit
    codes ``t_i/s + 1``, packed four per byte.  As in the paper, **no error
    feedback** is used (``error_feedback = False``): the estimator is already
    unbiased.  The paper's optional per-layer gradient clipping (to 2.5 standard
    deviations, which trades a bias for lower variance) is not applied.

    Workers share one scale (the paper's "scaler sharing") so that the sum over
    workers is ``s * sum_k codes_k``: integers summed once, scaled once.
    :meth:`exchange` therefore runs two rounds:

    1. ``Payload((s_local,), op="max")`` with ``s_local = max|g|`` as a
       1-element fp32 tensor (4 bytes); receives the maximum over workers;
    2. ``Payload((packed codes,), op="gather")`` (``ceil(2n/8)`` bytes),
       quantized with the shared scale; receives every worker's codes.

    Standalone, :meth:`compress` uses the tensor's own ``max|g|`` and returns
    ``Payload((packed codes, scale), op="gather")``: ``ceil(2n/8) + 4`` bytes,
    the same total as the two rounds.  ``Exchanged.sent`` of :meth:`exchange`
    has this same form, carrying the shared scale, so ``decompress([sent])``
    gives this worker's ternary tensor.

    The fp32 scale is rounded up where the gradient's dtype is wider (float64),
    so the sender quantizes with exactly the scale the receiver decodes with.

    Args:
        seed: the seed of the random draws (None: torch's global generator); see the module docstring for
            the random stream.  Each rank offsets it by its rank (:meth:`for_rank`).

    Raises:
        ValueError: ``seed`` is neither None nor an integer in ``[0, 2**64 - 1]``.

    Example:
        Two workers' exchange, driven by hand: a round of ``"max"`` for the shared scale, then a gather of
        the codes.  Every entry of the sum is a multiple of the scale, 4.0:

        >>> import torch
        >>> from gradcomp.compressors.quantize import TernGrad
        >>> workers = [TernGrad(seed=0).for_rank(rank) for rank in range(2)]
        >>> grads = [torch.tensor([4.0, -1.0, 0.5]), torch.tensor([2.0, 1.0, -3.0])]
        >>> exchanges = [w.exchange(g) for w, g in zip(workers, grads)]
        >>> scales = [next(e) for e in exchanges]
        >>> shared = scales[0].replace(torch.maximum(scales[0].tensors[0], scales[1].tensors[0]))
        >>> codes = [e.send([shared]) for e in exchanges]
        >>> results = []
        >>> for e in exchanges:
        ...     try:
        ...         e.send(codes)
        ...     except StopIteration as done:
        ...         results.append(done.value)
        >>> total = results[0].total
        >>> torch.equal(total, results[1].total), bool(((total / 4) == (total / 4).round()).all())
        (True, True)
    """

    name = "terngrad"
    error_feedback = False

    seed: int | None = None

    def __post_init__(self) -> None:
        _check_seed("TernGrad", self.seed)

    def for_rank(self, rank: int) -> Compressor:
        """Each worker draws its own stream: the seed is offset by the rank.

        Args:
            rank: the worker's rank.

        Returns:
            This compressor with ``seed=None``, else a copy with ``seed + rank``.
        """
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + rank)

    @staticmethod
    def _local_scale(flat: Tensor) -> Tensor:
        amax = flat.abs().amax() if flat.numel() else flat.new_zeros(())
        return _fp32_at_least(amax.reshape(1))

    def _codes(self, flat: Tensor, scale: Tensor, state: dict | None) -> Tensor:
        """2-bit codes in {0, 1, 2} (= ternary value + 1) for ``flat`` at fp32 ``scale``."""
        s = scale.to(flat.device, flat.dtype).reshape(())
        prob = torch.where(s > 0, flat.abs() / s, flat.new_zeros(()))
        keep = _uniform(self.seed, state, flat.numel(), flat.dtype, flat.device) < prob
        return torch.where(keep, torch.where(flat > 0, 2, 0), 1)

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        flat = tensor.reshape(-1).to(_compute_dtype(tensor.dtype))
        scale = self._local_scale(flat)
        return Payload((bits.pack(self._codes(flat, scale, state), 2), scale), op="gather")

    def exchange(self, tensor: Tensor, state: dict | None = None) -> Exchange:
        cd = _compute_dtype(tensor.dtype)
        flat = tensor.reshape(-1).to(cd)
        received = yield Payload((self._local_scale(flat),), op="max", last=False)
        check_payloads("terngrad", received)
        (scale,) = _tensors(received[0], 1, "terngrad")
        check_tensor("terngrad", "scale", scale, kind="floating-point", numel=1)
        scale = scale.to(tensor.device, torch.float32).reshape(1)
        packed = bits.pack(self._codes(flat, scale, state), 2)
        received = yield Payload((packed,), op="gather")
        n = flat.numel()
        ints = torch.zeros(n, dtype=torch.int64, device=tensor.device)
        check_payloads("terngrad", received)
        ok = None
        for p in received:
            (codes,) = _tensors(p, 1, "terngrad")
            codes, valid = _unpack("terngrad", codes, 2, n, 2, tensor.device)
            ints += codes - 1
            ok = _both(ok, valid)
        total = mark_corrupt((scale.to(cd) * ints.to(cd)).reshape(tensor.shape).to(tensor.dtype), ok)
        return Exchanged(total, Payload((packed, scale), op="gather"))

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        cd = _compute_dtype(like.dtype)
        n = like.numel()
        total = torch.zeros(n, dtype=cd, device=like.device)
        check_payloads("terngrad", payloads)
        ok = None
        for p in payloads:
            packed, scale = _tensors(p, 2, "terngrad")
            check_tensor("terngrad", "scale", scale, kind="floating-point", numel=1)
            codes, valid = _unpack("terngrad", packed, 2, n, 2, like.device)
            total += scale.to(like.device, cd).reshape(()) * (codes - 1).to(cd)
            ok = _both(ok, valid)
        return mark_corrupt(total.reshape(like.shape).to(like.dtype), ok)


# --------------------------------------------------------------------- QSGD


@register
@dataclass(kw_only=True)
class QSGD(Compressor):
    """QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017): unbiased stochastic quantization.

    The flattened gradient is cut into buckets of ``bucket_size`` consecutive
    entries (the paper's bucketing, Section 3.1 / 5).  For a bucket ``v`` with
    ``s = levels`` and ``l = floor(|v_i| / ||v||_2 * s)`` (Eq. 1 of the paper)::

        Q_s(v_i) = ||v||_2 * sign(v_i) * xi_i(v, s),
        xi_i = (l + 1)/s  with probability  |v_i|/||v||_2 * s - l,  l/s otherwise,

    so ``E[Q_s(v)] = v`` (unbiased; ``error_feedback = False``) with variance at
    most ``min(d/s**2, sqrt(d)/s) * ||v||**2`` for a bucket of ``d`` entries.

    Each entry is sent as one fixed-width code ``sign * level + s`` in
    ``[0, 2s]``, packed with ``width = ceil(log2(2s + 1))`` bits (the paper's
    Elias coding of the levels is not used: fixed width keeps decoding a pure
    vectorized op), and each bucket's norm as fp32.

    Wire: ``(norms: float32[n_buckets], packed codes: uint8)``, i.e.
    ``4 * ceil(n / bucket_size) + ceil(n * width / 8)`` bytes; op ``"gather"``.
    The norm is computed with max-scaling (no overflow or underflow in
    float32) and rounded up to fp32 where the gradient's dtype is wider, so
    ``|v_i| / ||v|| <= 1`` always holds for the scale actually sent.

    Args:
        levels: ``s``, the number of levels of each sign (>= 1): codes take ``ceil(log2(2s + 1))`` bits.
        bucket_size: entries per bucket (>= 1), each with its own norm.
        seed: the seed of the random draws (None: torch's global generator); see the module docstring for
            the random stream.  Each rank offsets it by its rank (:meth:`for_rank`).

    Raises:
        ValueError: a setting is out of range (``levels`` beyond ``2**31 - 1`` too).

    Example:
        >>> import torch
        >>> from gradcomp.compressors.quantize import QSGD
        >>> qsgd = QSGD(levels=4, bucket_size=8, seed=0)
        >>> grad = torch.randn(16)
        >>> payload = qsgd.compress(grad, state={})
        >>> qsgd.width, payload.nbytes  # 16 codes of 4 bits, two fp32 norms
        (4, 16)
        >>> qsgd.decompress([payload], like=grad).shape
        torch.Size([16])
    """

    name = "qsgd"
    error_feedback = False

    levels: int = 16
    bucket_size: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        check_int("QSGD", "levels", self.levels, 1)
        check_range("QSGD", "levels", self.levels, 1, 2**31 - 1)  # codes of at most 32 bits
        check_int("QSGD", "bucket_size", self.bucket_size, 1)
        _check_seed("QSGD", self.seed)

    def for_rank(self, rank: int) -> Compressor:
        """Each worker draws its own stream: the seed is offset by the rank.

        Args:
            rank: the worker's rank.

        Returns:
            This compressor with ``seed=None``, else a copy with ``seed + rank``.
        """
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + rank)

    @property
    def width(self) -> int:
        """Bits per code: ceil(log2(2 * levels + 1))."""
        return (2 * self.levels).bit_length()

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        cd = _compute_dtype(tensor.dtype)
        flat = tensor.reshape(-1).to(cd)
        n, d, s = flat.numel(), self.bucket_size, self.levels
        nb = -(-n // d)
        buckets = torch.cat([flat, flat.new_zeros(nb * d - n)]).view(nb, d).abs()
        amax = buckets.amax(1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        norm = torch.maximum(safe * torch.linalg.vector_norm(buckets / safe, dim=1, keepdim=True), amax)
        norms = _fp32_at_least(norm.reshape(-1))
        scale = norms.to(cd).unsqueeze(1)
        ratio = torch.where(scale > 0, buckets / scale, buckets.new_zeros(())) * s
        ratio = torch.nan_to_num(ratio.reshape(-1)[:n], nan=0.0).clamp_(0, s)  # NaN/Inf: the norm carries it
        low = ratio.floor()
        up = _uniform(self.seed, state, n, cd, flat.device) < (ratio - low)
        level = (low + up.to(cd)).clamp_(max=s).to(torch.int64)
        codes = torch.where(flat < 0, -level, level) + s
        return Payload((norms, bits.pack(codes, self.width)), op="gather")

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        cd = _compute_dtype(like.dtype)
        n, d, s = like.numel(), self.bucket_size, self.levels
        nb = -(-n // d)
        total = torch.zeros(nb, d, dtype=cd, device=like.device)
        check_payloads("qsgd", payloads)
        ok = None
        for p in payloads:
            norms, packed = _tensors(p, 2, "qsgd")
            if norms.numel() != nb:
                raise ValueError(f"qsgd: {n} entries in buckets of {d} need {nb} norms, got {norms.numel()}")
            check_tensor("qsgd", "norms", norms, kind="floating-point", dim=1)
            codes, valid = _unpack("qsgd", packed, self.width, n, 2 * s, like.device)
            ok = _both(ok, valid)
            levels = torch.cat([codes - s, codes.new_zeros(nb * d - n)]).view(nb, d).to(cd)
            total += norms.to(like.device, cd).unsqueeze(1) * levels / s
        return mark_corrupt(total.reshape(-1)[:n].reshape(like.shape).to(like.dtype), ok)


# ------------------------------------------------------------------- DoReFa


@register
@dataclass(kw_only=True)
class DoReFa(Compressor):
    """DoReFa-Net's gradient quantization (Zhou, Wu, Ni, Zhou, Wen, Zou, arXiv:1606.06160, 2016).

    With ``k = bits``, ``n = 2**k - 1``, ``quantize_k(x) = round(n * x) / n`` for ``x`` in ``[0, 1]`` and
    ``m = max|dr|`` (the paper's ``max_0``)::

        f(dr) = 2 m * [ quantize_k( dr / (2 m) + 1/2 + N(k) ) - 1/2 ],   N(k) = sigma / n,  sigma ~ U(-1/2, 1/2)

    The noise makes the rounding stochastic: ``n * (dr / 2m + 1/2) + sigma`` rounded to the nearest
    integer is ``floor`` or ``ceil`` of ``n * (dr / 2m + 1/2)`` with the probabilities that make its mean
    exact, so ``E[f(dr)] = dr`` (unbiased; no error feedback in the paper: ``error_feedback = False``).
    As in the authors' code (tensorpack's ``dorefa.py``), the argument of ``quantize_k`` is clipped to
    ``[0, 1]`` (it can leave it by at most ``1 / 2n``, which rounds back anyway).

    ``max_0`` is, in the paper, the maximum over every axis but the mini-batch axis: the paper quantizes
    the gradients of activations, one scale per example.  A weight gradient has no mini-batch axis, so
    the default takes one scale per tensor (the layer's max, ``per_row=False``); ``per_row=True`` applies
    the authors' reduction literally to the tensor's first axis, one scale per row (output channel).
    Using the quantizer on the weight gradients that data-parallel workers exchange is this library's
    adaptation; the equation is the paper's.  What was confirmed: ``quantize_k``, the noise, the clipping
    and the reduction of ``max_0`` against the authors' reference code (tensorpack's
    ``examples/DoReFa-Net/dorefa.py``, ``grad_fg``); the paper's own text was not read from this workspace.

    Each entry is sent as its ``k``-bit code ``round(...)`` in ``[0, n]``, packed, and each scale ``m`` as
    fp32 (rounded up where the gradient is wider, so ``|dr| / m <= 1`` for the scale the receiver uses).
    Wire: ``(scales: float32[nscales], packed codes: uint8[ceil(numel * bits / 8)])``; op ``"gather"``.
    Randomness: one ``U[0, 1)`` draw ``u`` per entry in flattened order, ``sigma = u - 1/2`` (see the module
    docstring for ``seed`` and the stream).

    Args:
        bits: ``k``, bits per entry, in [1, 16].
        per_row: one scale per row of the tensor (first axis) instead of one per tensor.
        seed: see the module docstring; each rank offsets it by its rank.

    Raises:
        ValueError: ``bits`` is not an integer in [1, 16], ``per_row`` not a bool, or ``seed`` neither None
            nor an integer in ``[0, 2**64 - 1]``.

    Example:
        >>> import torch
        >>> from gradcomp.compressors.quantize import DoReFa
        >>> dorefa = DoReFa(bits=2, per_row=True, seed=0)
        >>> grad = torch.randn(3, 5)
        >>> payload = dorefa.compress(grad)
        >>> [t.numel() for t in payload.tensors]  # three fp32 scales, 15 codes of 2 bits in 4 bytes
        [3, 4]
        >>> dorefa.decompress([payload], like=grad).shape
        torch.Size([3, 5])
    """

    name = "dorefa"
    error_feedback = False

    bits: int = 8
    per_row: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        check_int("dorefa", "bits", self.bits, 1)
        check_range("dorefa", "bits", self.bits, 1, 16)
        if not isinstance(self.per_row, bool):
            raise ValueError(f"dorefa.per_row must be True or False, got {self.per_row!r}")
        _check_seed("dorefa", self.seed)

    def for_rank(self, rank: int) -> Compressor:
        """Each worker draws its own stream: the seed is offset by the rank.

        Args:
            rank: the worker's rank.

        Returns:
            This compressor with ``seed=None``, else a copy with ``seed + rank``.
        """
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + rank)

    def _rows(self, shape: torch.Size) -> tuple[int, int]:
        n = math.prod(shape)
        if self.per_row and len(shape) >= 2:
            return shape[0], n // shape[0] if shape[0] else 0
        return 1, n

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        cd = _compute_dtype(tensor.dtype)
        rows, cols = self._rows(tensor.shape)
        m = tensor.reshape(rows, cols).to(cd)
        amax = m.abs().amax(1) if cols else m.new_zeros(rows)
        scales = _fp32_at_least(amax)
        s = scales.to(cd).unsqueeze(1)
        n = (1 << self.bits) - 1
        x = torch.where(s > 0, m / torch.where(s > 0, s, torch.ones_like(s)), m.new_zeros(()))
        sigma = _uniform(self.seed, state, rows * cols, cd, tensor.device).view(rows, cols) - 0.5
        y = (x * 0.5 + 0.5 + sigma / n).clamp(0, 1)
        codes = torch.nan_to_num(torch.round(y * n), nan=0.0).to(torch.int64)  # NaN/Inf: the scale carries it
        return Payload((scales, bits.pack(codes, self.bits)), op="gather")

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        cd = _compute_dtype(like.dtype)
        rows, cols = self._rows(like.shape)
        n = (1 << self.bits) - 1
        total = torch.zeros(rows, cols, dtype=cd, device=like.device)
        check_payloads("dorefa", payloads)
        ok = None
        for p in payloads:
            scales, packed = _tensors(p, 2, "dorefa")
            check_tensor("dorefa", "scales", scales, kind="floating-point", numel=rows, dim=1)
            codes, valid = _unpack("dorefa", packed, self.bits, rows * cols, n, like.device)
            ok = _both(ok, valid)
            s = scales.to(like.device, cd).unsqueeze(1)
            total += 2 * s * (codes.view(rows, cols).to(cd) / n - 0.5)
        return mark_corrupt(total.reshape(like.shape).to(like.dtype), ok)
