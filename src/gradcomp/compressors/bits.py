"""Vectorized bit packing: small unsigned codes packed densely into bytes.

``pack(codes, width)`` stores each code in ``width`` bits, most significant
bit first, so ``n`` codes take exactly ``ceil(n * width / 8)`` bytes.  Only
torch ops are used: no Python loop over entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack", "unpack", "packed_nbytes"]

_BLOCK = 1 << 20  # codes per block for the general widths; a multiple of 8


def packed_nbytes(n: int, width: int) -> int:
    """Bytes taken by ``n`` codes of ``width`` bits."""
    return math.ceil(n * width / 8)


def pack(codes: Tensor, width: int) -> Tensor:
    """Pack the integers in ``codes`` (each in ``[0, 2**width)``) into a uint8 tensor."""
    if not 1 <= width <= 32:
        raise ValueError(f"width must be in [1, 32], got {width}")
    codes = codes.reshape(-1).to(torch.int64)
    n = codes.numel()
    if width == 8:
        return codes.to(torch.uint8)
    if width in (1, 2, 4):
        per = 8 // width  # codes per byte
        pad = (-n) % per
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        shifts = torch.arange(8 - width, -1, -width, device=codes.device)
        return (codes.view(-1, per) << shifts).sum(1).to(torch.uint8)
    # General widths, a block of codes at a time (a multiple of 8 codes ends on a byte
    # boundary) to bound the temporaries.
    if width < 8:
        # 8 codes make ``width`` bytes: gather them in one int64 (<= 56 bits), then cut it into bytes.
        code_shifts = width * torch.arange(7, -1, -1, device=codes.device)
        byte_shifts = 8 * torch.arange(width - 1, -1, -1, device=codes.device)
        out = []
        for block in codes.split(_BLOCK):
            m = block.numel()
            if m % 8:
                block = torch.cat([block, block.new_zeros(8 - m % 8)])
            group = (block.view(-1, 8) << code_shifts).sum(1)
            out.append(((group.unsqueeze(1) >> byte_shifts) & 255).to(torch.uint8).view(-1)[:packed_nbytes(m, width)])
        return torch.cat(out) if out else codes.new_zeros(0, dtype=torch.uint8)
    # Wider codes: expand to bits, then pack 8 bits per byte.
    shifts = torch.arange(width - 1, -1, -1, device=codes.device)
    return torch.cat([pack(((block.unsqueeze(1) >> shifts) & 1).view(-1), 1) for block in codes.split(_BLOCK)])


def unpack(packed: Tensor, width: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes, as int64."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.numel() != packed_nbytes(n, width):
        raise ValueError(f"{n} codes of {width} bits take {packed_nbytes(n, width)} bytes, got {packed.numel()}")
    data = packed.reshape(-1).to(torch.int64)
    if width == 8:
        return data
    if width in (1, 2, 4):
        shifts = torch.arange(8 - width, -1, -width, device=packed.device)
        return ((data.unsqueeze(1) >> shifts) & ((1 << width) - 1)).view(-1)[:n]
    weights = 1 << torch.arange(width - 1, -1, -1, device=packed.device)
    code_shifts = width * torch.arange(7, -1, -1, device=packed.device)
    byte_shifts = 8 * torch.arange(width - 1, -1, -1, device=packed.device)
    data = packed.reshape(-1)
    step = _BLOCK * width // 8  # bytes holding one block of codes
    out = []
    for start in range(0, n, _BLOCK):
        count = min(_BLOCK, n - start)
        raw = data[start * width // 8:start * width // 8 + step][:packed_nbytes(count, width)]
        if width < 8:  # the inverse of pack's fast path: ``width`` bytes -> one int64 -> 8 codes
            raw = raw.to(torch.int64)
            if raw.numel() % width:
                raw = torch.cat([raw, raw.new_zeros(width - raw.numel() % width)])
            group = (raw.view(-1, width) << byte_shifts).sum(1)
            out.append(((group.unsqueeze(1) >> code_shifts) & ((1 << width) - 1)).view(-1)[:count])
        else:
            out.append((unpack(raw, 1, count * width).view(count, width) * weights).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=packed.device)
