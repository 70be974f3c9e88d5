"""Dense baselines: ``none`` (the tensor as it is) and ``fp16`` (half precision on the wire)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Compressor, Payload, check_payloads, check_tensor, device_path, register, tensors_of

__all__ = ["NoCompression", "FP16"]


def _sum_dense(owner: str, payloads: Sequence[Payload], like: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Sum of the payloads' tensors (each ``like.numel()`` entries of ``dtype``; None: ``like``'s)."""
    check_payloads(owner, payloads)
    values = []
    for p in payloads:
        (t,) = tensors_of(owner, p, 1)
        check_tensor(owner, "values", t, dtype=dtype or like.dtype, numel=like.numel())
        values.append(t)
    total = values[0].to(like.dtype).reshape(like.shape).clone()
    for t in values[1:]:
        total.add_(t.reshape(like.shape).to(like.dtype))
    return total


@register
@dataclass(kw_only=True)
class NoCompression(Compressor):
    """Dense all-reduce of the tensor in its own dtype: the baseline every ratio is measured against.

    Example:
        >>> import torch
        >>> from gradcomp.compressors.dense import NoCompression
        >>> none = NoCompression()
        >>> grad = torch.tensor([0.5, -3.0])
        >>> payload = none.compress(grad)
        >>> payload.nbytes
        8
        >>> none.decompress([payload, payload], like=grad)  # two workers' payloads: their sum
        tensor([ 1., -6.])
    """

    name = "none"

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        return Payload((tensor.reshape(-1),), op="sum")

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        return _sum_dense("none", payloads, like, None)


@register
@dataclass(kw_only=True)
class FP16(Compressor):
    """Dense all-reduce in float16 (as PyTorch's ``fp16_compress_hook``): half the bytes of fp32.

    Values beyond float16's range (``|x| > 65504``) would become infinite, so they are
    rejected with an error rather than silently sent as Inf (on the CPU only: off
    it the check would read a value on the host each step, and the Inf sent instead
    is seen by the receivers' non-finite checks).  Loss-scaled gradients are not
    such values: given the ``torch.amp.GradScaler`` (``register_ddp_hook(...,
    scaler=)``), the front door divides the scale out before compressing, so fp16
    carries the unscaled gradient whatever the scale, and an overflow of the scaled
    gradient reaches the scaler, which skips the step and lowers the scale.

    Raises:
        ValueError: (from :meth:`compress`, on the CPU) a finite entry beyond float16's range.

    Example:
        >>> import torch
        >>> from gradcomp.compressors.dense import FP16
        >>> fp16 = FP16()
        >>> grad = torch.tensor([1 / 3, 2.0])
        >>> payload = fp16.compress(grad)
        >>> payload.tensors[0].dtype, payload.nbytes
        (torch.float16, 4)
        >>> fp16.decompress([payload], like=grad)
        tensor([0.3333, 2.0000])
        >>> fp16.compress(torch.tensor([1e5]))
        Traceback (most recent call last):
        ...
        ValueError: fp16: a gradient entry exceeds float16's range (65504); ...
    """

    name = "fp16"

    def compress(self, tensor: Tensor, state: dict | None = None) -> Payload:
        half = tensor.reshape(-1).to(torch.float16)
        if (tensor.numel() and not device_path(tensor) and not torch.isfinite(half).all()
                and torch.isfinite(tensor).all()):
            raise ValueError("fp16: a gradient entry exceeds float16's range (65504); with a GradScaler, give it to "
                             "the front door (scaler=) so the loss scale is divided out first; otherwise use 'none'")
        return Payload((half,), op="sum")

    def decompress(self, payloads: Sequence[Payload], like: Tensor) -> Tensor:
        return _sum_dense("fp16", payloads, like, torch.float16)
