"""Sparsifying compressors: ``topk``, ``dgc``, ``randomk``, ``threshold``, ``dryden``.

A sparse payload is ``(values, indices)`` into the flattened tensor, indices in
the narrowest integer type that addresses it (int32 below 2**31 entries).
Workers' payloads are all-gathered and scatter-added in rank order, so every
rank (and the simulator) sums them in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Compressor, Payload, check_range, index_dtype, num_selected, register

__all__ = ["TopK", "DGCSelect", "RandomK", "Threshold", "Dryden", "select_topk", "select_dgc", "sent_indices"]


# ----------------------------------------------------------------- selection


def select_topk(flat: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` entries of largest magnitude (exact, ``torch.topk``)."""
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    return torch.topk(flat.abs(), k, sorted=False).indices


def select_dgc(flat: Tensor, k: int, sample_ratio: float, *, upper: float = 1.3, lower: float = 0.8,
               max_iters: int = 10) -> Tensor:
    """DGC's top-k: estimate the threshold from a strided sample of |x|, then refine.

    The k-th largest magnitude of a ``sample_ratio`` strided sample estimates
    the threshold; it is scaled down by ``lower`` while fewer than k entries
    pass and up by ``upper`` while more than ``upper * k`` pass.  The exact
    top-k is then taken among the candidates, so the result is exactly the
    ``k`` largest entries whenever the candidates cover them (always, unless
    the refinement ran out of iterations, when exact ``torch.topk`` on the
    whole tensor is used instead).  Only a full-tensor comparison and a
    ``nonzero`` touch every entry; the sort runs on ~1% of them.
    """
    n = flat.numel()
    if k >= n or sample_ratio >= 1.0:
        return select_topk(flat, k)
    stride = max(1, int(1.0 / sample_ratio))
    sample = flat[::stride].abs()
    k_sample = max(1, math.ceil(k * sample.numel() / n))
    threshold = float(torch.topk(sample, k_sample, sorted=False).values.min())
    candidates = None
    for _ in range(max_iters):
        candidates = (flat.abs() >= threshold).nonzero().view(-1)
        count = candidates.numel()
        if count < k:
            threshold *= lower
        elif count > upper * k and threshold > 0.0:
            threshold *= upper
        else:
            break
    if candidates is None or candidates.numel() < k:
        return select_topk(flat, k)
    if candidates.numel() == k:
        return candidates
    chosen = torch.topk(flat[candidates].abs(), k, sorted=False).indices
    return candidates[chosen]


# ------------------------------------------------------------ sparse payload


def _sparse_payload(flat: Tensor, indices: Tensor) -> Payload:
    indices = indices.to(index_dtype(flat.numel()))
    return Payload((flat[indices], indices), op="gather")


def sent_indices(payload: Payload) -> Tensor:
    """Flat indices a sparse ``(values, indices)`` payload covers."""
    return payload.tensors[1].long()


def _scatter_sum(payloads: Sequence[Payload], like: Tensor) -> Tensor:
    total = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    if payloads:
        values = torch.cat([p.tensors[0] for p in payloads]).to(like.dtype)
        indices = torch.cat([p.tensors[1] for p in payloads]).long()
        total.index_add_(0, indices, values)
    return total.view(like.shape)


class _Sparse(Compressor):
    """Shared decode for ``(values, indices)`` payloads; what was sent leaves the accumulator exactly."""

    error_feedback = True

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        return _scatter_sum(payloads, like)

    def subtract_sent(self, accumulator: Tensor, sent: Payload) -> None:
        flat = accumulator.view(-1)
        flat.index_put_((sent.tensors[1].long(),), -sent.tensors[0].to(flat.dtype), accumulate=True)


@register
@dataclass(kw_only=True)
class TopK(_Sparse):
    """Exact top-k by magnitude, k = ceil(density * numel).

    With residual memory this is gradient dropping (Aji & Heafield 2017) at a
    fixed density; without memory, small gradients are simply dropped.
    """

    name = "topk"
    density: float = 0.01

    def __post_init__(self) -> None:
        check_range("topk", "density", self.density, 0.0, 1.0, low_open=True)

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        flat = tensor.reshape(-1)
        return _sparse_payload(flat, select_topk(flat, num_selected(self.density, flat.numel())))


@register
@dataclass(kw_only=True)
class DGCSelect(_Sparse):
    """DGC's selection (Lin et al. 2018): exactly k = ceil(density * numel) largest |x|,
    threshold estimated from a strided ``sample_ratio`` sample (see :func:`select_dgc`).

    Every rank sends the same number of entries, so payloads all-gather without
    padding.  ``sample_ratio=1.0`` is exact ``torch.topk``.  This is only the
    selection; the whole method (momentum correction, masking, clipping,
    warm-up) is :class:`gradcomp.DGC`.
    """

    name = "dgc"
    density: float = 0.001
    sample_ratio: float = 0.01

    def __post_init__(self) -> None:
        check_range("dgc", "density", self.density, 0.0, 1.0, low_open=True)
        check_range("dgc", "sample_ratio", self.sample_ratio, 0.0, 1.0, low_open=True)

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        flat = tensor.reshape(-1)
        k = num_selected(self.density, flat.numel())
        return _sparse_payload(flat, select_dgc(flat, k, self.sample_ratio))


@register
@dataclass(kw_only=True)
class RandomK(_Sparse):
    """k entries chosen uniformly at random (a control baseline for top-k).

    Every rank draws the same indices (same seed, same step count kept in the
    per-parameter ``state``), so only the values travel and they are summed
    with an all-reduce: k values, no index bytes.
    """

    name = "randomk"
    density: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("randomk", "density", self.density, 0.0, 1.0, low_open=True)

    def _indices(self, numel: int, state: dict | None, device: torch.device) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        if state is not None:
            if "rng" in state:
                generator.set_state(state["rng"])
        k = num_selected(self.density, numel)
        indices = torch.randperm(numel, generator=generator)[:k]
        if state is not None:
            state["rng"] = generator.get_state()
        return indices.to(device)

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        flat = tensor.reshape(-1)
        indices = self._indices(flat.numel(), state, flat.device)
        return Payload((flat[indices],), op="sum", meta=indices)

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        return _scatter_sum([Payload((p.tensors[0], p.meta), op="gather") for p in payloads], like)

    def subtract_sent(self, accumulator: Tensor, sent: Payload) -> None:
        super().subtract_sent(accumulator, Payload((sent.tensors[0], sent.meta)))


def _signed_codes(indices: Tensor, negative: Tensor, numel: int) -> Tensor:
    """Strom's encoding: index and sign in one integer, ``index * 2 + (value < 0)``."""
    return (indices * 2 + negative.long()).to(index_dtype(2 * numel))


def _split_codes(codes: Tensor) -> tuple[Tensor, Tensor]:
    codes = codes.long()
    return codes >> 1, codes & 1


def _check_codes(payload: Payload, numel: int) -> None:
    if payload.tensors[0].numel() and int(payload.tensors[0].max()) >= 2 * numel:
        raise ValueError(f"corrupt payload: an index is out of range for a tensor of {numel} entries")


@register
@dataclass(kw_only=True)
class Threshold(Compressor):
    """Threshold quantization (Strom 2015): entries with |x| >= tau are sent as ±tau.

    Each entry costs one 32-bit word: index and sign packed together.  The
    count varies by step and rank, so the communicator pads the all-gather.
    """

    name = "threshold"
    error_feedback = True
    tau: float = 0.01

    def __post_init__(self) -> None:
        check_range("threshold", "tau", self.tau, 0.0, math.inf, low_open=True, high_open=True)

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        flat = tensor.reshape(-1)
        indices = (flat.abs() >= self.tau).nonzero().view(-1)
        return Payload((_signed_codes(indices, flat[indices] < 0, flat.numel()),), op="gather")

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        total = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
        for p in payloads:
            _check_codes(p, like.numel())
            indices, negative = _split_codes(p.tensors[0])
            total.index_add_(0, indices, self.tau * (1 - 2 * negative).to(like.dtype))
        return total.view(like.shape)


@register
@dataclass(kw_only=True)
class Dryden(Compressor):
    """Dryden et al. 2016: send a fixed ``proportion`` of the positive and of the
    negative entries (the largest of each), each side reconstructed as its mean.

    Wire: one 32-bit word per entry (index and sign) plus the two means.
    """

    name = "dryden"
    error_feedback = True
    proportion: float = 0.01

    def __post_init__(self) -> None:
        check_range("dryden", "proportion", self.proportion, 0.0, 1.0, low_open=True)

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        flat = tensor.reshape(-1)
        n_pos = int((flat > 0).sum())
        n_neg = int((flat < 0).sum())
        k_pos = math.ceil(self.proportion * n_pos)
        k_neg = math.ceil(self.proportion * n_neg)
        pos = torch.topk(flat, k_pos, sorted=False).indices
        neg = torch.topk(-flat, k_neg, sorted=False).indices
        zero = flat.new_zeros(())
        means = torch.stack([flat[pos].mean() if k_pos else zero, flat[neg].mean() if k_neg else zero])
        indices = torch.cat([pos, neg])
        negative = torch.cat([torch.zeros(k_pos, dtype=torch.bool), torch.ones(k_neg, dtype=torch.bool)])
        return Payload((_signed_codes(indices, negative.to(flat.device), flat.numel()), means), op="gather")

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        total = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
        for p in payloads:
            _check_codes(p, like.numel())
            indices, negative = _split_codes(p.tensors[0])
            total.index_add_(0, indices, p.tensors[1].to(like.dtype)[negative])
        return total.view(like.shape)
