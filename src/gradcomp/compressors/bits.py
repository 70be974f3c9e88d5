"""Vectorized bit packing: small unsigned codes packed densely into bytes.

``pack(codes, width)`` stores each code in ``width`` bits, most significant
bit first, so ``n`` codes take exactly ``ceil(n * width / 8)`` bytes.
``encode_sorted`` codes a sorted set of indices in about ``2 + log2(n / k)``
bits each (Elias-Fano).  Only torch ops are used: no Python loop over entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack", "unpack", "packed_nbytes", "encode_sorted", "decode_sorted", "decode_sorted_flagged",
           "sorted_nbytes"]

_BLOCK = 1 << 20  # codes per block for the general widths; a multiple of 8


def packed_nbytes(n: int, width: int) -> int:
    """Bytes taken by ``n`` codes of ``width`` bits.

    Args:
        n: the number of codes.
        width: bits per code.

    Returns:
        ``ceil(n * width / 8)``.
    """
    return math.ceil(n * width / 8)


def pack(codes: Tensor, width: int) -> Tensor:
    """Pack the integers in ``codes`` into a uint8 tensor, ``width`` bits each, most significant bit first.

    Args:
        codes: integers, each in ``[0, 2**width)`` (not checked: wider values corrupt their neighbours); any
            shape, read flattened.
        width: bits per code, in [1, 32].

    Returns:
        :func:`packed_nbytes` ``(codes.numel(), width)`` bytes, on the device of ``codes``.

    Raises:
        ValueError: ``width`` is outside [1, 32].

    Example:
        >>> import torch
        >>> from gradcomp.compressors import bits
        >>> packed = bits.pack(torch.tensor([3, 0, 2, 1, 1]), 2)  # 11 00 10 01 | 01 000000
        >>> packed
        tensor([201,  64], dtype=torch.uint8)
        >>> bits.unpack(packed, 2, 5)
        tensor([3, 0, 2, 1, 1])
    """
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
    """Inverse of :func:`pack`.

    Args:
        packed: the packed codes, uint8.
        width: bits per code, as packed.
        n: the number of codes.

    Returns:
        The ``n`` codes, int64, 1-d.

    Raises:
        TypeError: ``packed`` is not uint8.
        ValueError: ``packed`` does not hold exactly :func:`packed_nbytes` ``(n, width)`` bytes.
    """
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


# ------------------------------------------------------ sorted index sets

_BIT_SHIFTS: dict[torch.device, Tensor] = {}


def _bit_matrix(rows: Tensor, n: int) -> Tensor:
    """The first ``n`` bits of each row of packed bytes (most significant first): a uint8 [rows, n] of 0/1."""
    shifts = _BIT_SHIFTS.get(rows.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[rows.device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=rows.device)
    return ((rows.unsqueeze(2) >> shifts) & 1).view(rows.shape[0], -1)[:, :n]  # uint8: 1 byte per bit, not 8


def _low_width(numel: int, k: int) -> int:
    """Elias-Fano's low-bit width, floor(log2(numel / k)) (0 when k >= numel)."""
    return max(0, (numel // k).bit_length() - 1)


def _high_bits(numel: int, k: int, low: int) -> int:
    """Length of the unary-coded high parts: one 1 per entry, one 0 per bucket of 2**low."""
    return k + ((numel - 1) >> low) + 1


def sorted_nbytes(numel: int, k: int) -> int:
    """Bytes :func:`encode_sorted` takes for ``k`` distinct indices below ``numel``.

    Args:
        numel: the number of entries the indices address.
        k: the number of indices.

    Returns:
        The length of the code in bytes (0 for no index).
    """
    if k == 0:
        return 0
    low = _low_width(numel, k)
    return packed_nbytes(k, low) + packed_nbytes(_high_bits(numel, k, low), 1)


def encode_sorted(indices: Tensor, numel: int) -> Tensor:
    """Elias-Fano code of strictly increasing ``indices`` in ``[0, numel)``, as uint8.

    With ``low = floor(log2(numel / k))``, each index keeps its ``low`` low bits
    verbatim (packed) and its high part ``i >> low`` in unary: bit
    ``(i >> low) + j`` is set for the j-th index.  That is at most
    ``2 + log2(numel / k)`` bits per index, against 32 for an int32.  The
    caller guarantees the order (see :func:`decode_sorted` for the checks).

    Args:
        indices: strictly increasing integers in ``[0, numel)``, any shape (read flattened).
        numel: the number of entries they address.

    Returns:
        The code: :func:`sorted_nbytes` ``(numel, k)`` bytes, uint8, on the device of ``indices``.

    Example:
        Four indices below 64 in 3 bytes (4 low bits each, then 8 unary bits), not 16:

        >>> import torch
        >>> from gradcomp.compressors import bits
        >>> code = bits.encode_sorted(torch.tensor([2, 5, 11, 40]), 64)
        >>> code.numel(), bits.sorted_nbytes(64, 4)
        (3, 3)
        >>> bits.decode_sorted(code, 64, 4)
        tensor([ 2,  5, 11, 40])
        >>> bits.decode_sorted_flagged(code, 64, 4)
        (tensor([ 2,  5, 11, 40]), tensor(True))
    """
    k = indices.numel()
    if k == 0:
        return torch.zeros(0, dtype=torch.uint8, device=indices.device)
    indices = indices.reshape(-1).to(torch.int64)
    low = _low_width(numel, k)
    # set bit (i >> low) + j of the unary part: OR one bit into its byte (the positions are distinct,
    # so a sum of the bits is their OR); O(k), the 0 bits are never touched
    positions = (indices >> low) + torch.arange(k, device=indices.device)
    high = torch.zeros(packed_nbytes(_high_bits(numel, k, low), 1), dtype=torch.int32, device=indices.device)
    high.index_add_(0, positions >> 3, (128 >> (positions & 7)).to(torch.int32))
    high = high.to(torch.uint8)
    if low == 0:
        return high
    return torch.cat([pack(indices & ((1 << low) - 1), low), high])


def _check_code(data: Tensor, numel: int, k: int) -> Tensor:
    """``data`` as [rows, bytes], after the checks of its type and length (which read no values)."""
    if data.dtype != torch.uint8:
        raise TypeError(f"coded indices must be uint8, got {data.dtype}")
    rows = data.view(1, -1) if data.dim() == 1 else data
    if rows.dim() != 2 or rows.shape[1] != sorted_nbytes(numel, k):
        raise ValueError(f"{k} indices below {numel} take {sorted_nbytes(numel, k)} bytes, got {rows.shape[-1]}")
    return rows


def _with_low_bits(high: Tensor, rows: Tensor, k: int, low: int) -> Tensor:
    """The indices: their high parts ``high`` [rows, k] joined with the ``low`` low bits packed first in
    ``rows``."""
    indices = high << low
    if low:
        low_bits = _bit_matrix(rows[:, :packed_nbytes(k, low)], k * low).view(rows.shape[0], k, low)
        for b in range(low):  # most significant first
            indices |= low_bits[:, :, b].to(torch.int64) << (low - 1 - b)
    return indices


def decode_sorted(data: Tensor, numel: int, k: int) -> Tensor:
    """Inverse of :func:`encode_sorted`: the ``k`` indices, as int64.

    ``data`` may also be a [rows, bytes] stack of codes of the same ``numel``
    and ``k`` (every worker's payload of one tensor): then all of them are
    decoded at once, as a [rows, k] tensor, in a fixed number of operations.
    A corrupt code raises ``ValueError`` (wrong length, wrong count, indices
    out of range or out of order); it never yields an index outside ``[0, numel)``.
    (The checks read values on the host: off the CPU, :func:`decode_sorted_flagged`.)

    Args:
        data: one code (1-d), or a [rows, bytes] stack of codes.
        numel: the number of entries the indices address.
        k: the number of indices of each code.

    Returns:
        The indices, int64: ``[k]`` for one code, ``[rows, k]`` for a stack.

    Raises:
        TypeError: ``data`` is not uint8.
        ValueError: a code is corrupt (as above).
    """
    rows = _check_code(data, numel, k)
    n_rows = rows.shape[0]
    if k == 0:
        out = torch.zeros(n_rows, 0, dtype=torch.int64, device=data.device)
        return out[0] if data.dim() == 1 else out
    low = _low_width(numel, k)
    split = packed_nbytes(k, low)
    row_of, position = _bit_matrix(rows[:, split:], _high_bits(numel, k, low)).nonzero(as_tuple=True)
    counts = torch.bincount(row_of, minlength=n_rows)
    if row_of.numel() != n_rows * k or bool((counts != k).any()):
        found = int(counts[counts != k][0]) if bool((counts != k).any()) else row_of.numel()
        raise ValueError(f"corrupt index code: {found} entries where {k} were expected")
    indices = _with_low_bits(position.view(n_rows, k) - torch.arange(k, device=data.device), rows, k, low)
    if bool((indices[:, -1] >= numel).any()) or (k > 1 and not bool((indices[:, 1:] > indices[:, :-1]).all())):
        raise ValueError(f"corrupt index code: indices out of range [0, {numel}) or not increasing")
    return indices[0] if data.dim() == 1 else indices


def decode_sorted_flagged(data: Tensor, numel: int, k: int) -> tuple[Tensor, Tensor]:
    """:func:`decode_sorted` without reading a value on the host: fixed shapes, no ``nonzero``.

    The j-th set bit of a row's unary part is where the running count of its
    bits first reaches j + 1 (``cumsum``, then ``searchsorted``).  Returns the
    indices and a 0-d bool on the device, True when every code was valid (k
    set bits, indices increasing and below ``numel``).  Where it is False,
    the indices are still all in ``[0, numel)``, so indexing with them is
    safe (see :func:`gradcomp.compressors.base.mark_corrupt`).  A wrong
    length or type, which the host knows, raises as in :func:`decode_sorted`.

    Args:
        data: one code (1-d), or a [rows, bytes] stack of codes.
        numel: the number of entries the indices address.
        k: the number of indices of each code.

    Returns:
        The indices (int64, ``[k]`` or ``[rows, k]``, every one in ``[0, numel)``) and the verdict.

    Raises:
        TypeError: ``data`` is not uint8.
        ValueError: a code has the wrong length.
    """
    rows = _check_code(data, numel, k)
    n_rows, device = rows.shape[0], data.device
    if k == 0:
        out = torch.zeros(n_rows, 0, dtype=torch.int64, device=device)
        return (out[0] if data.dim() == 1 else out), torch.ones((), dtype=torch.bool, device=device)
    low = _low_width(numel, k)
    unary = _bit_matrix(rows[:, packed_nbytes(k, low):], _high_bits(numel, k, low))
    seen = unary.cumsum(1, dtype=torch.int32)  # set bits up to each position
    nth = torch.arange(1, k + 1, dtype=torch.int32, device=device).expand(n_rows, k).contiguous()
    position = torch.searchsorted(seen, nth)  # where the count first reaches j + 1; past the end if it never does
    indices = _with_low_bits(position - torch.arange(k, device=device), rows, k, low)
    inside = indices < numel  # never negative: the j-th set bit lies at j or later
    ok = (seen[:, -1] == k).all() & inside.all()
    if k > 1:
        ok &= (indices[:, 1:] > indices[:, :-1]).all()
    indices = torch.where(inside, indices, torch.zeros_like(indices))
    return (indices[0] if data.dim() == 1 else indices), ok
