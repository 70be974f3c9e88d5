"""Bit packing against numpy's packbits, across the block boundary of the general widths."""

import math

import numpy as np
import pytest
import torch

from gradcomp.compressors import bits


def reference(codes, width):
    as_bits = ((codes[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(as_bits)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("n", [0, 1, 9, 1000, bits._BLOCK + 3])
def test_pack_matches_numpy_and_round_trips(width, n):
    codes = np.random.default_rng(width * 7 + n).integers(0, 1 << width, n)
    packed = bits.pack(torch.from_numpy(codes), width)
    assert packed.numel() == bits.packed_nbytes(n, width)
    np.testing.assert_array_equal(packed.numpy(), reference(codes, width))
    np.testing.assert_array_equal(bits.unpack(packed, width, n).numpy(), codes)


def test_unpack_checks_the_length():
    with pytest.raises(ValueError, match="take 2 bytes"):
        bits.unpack(torch.zeros(3, dtype=torch.uint8), 5, 3)


def sorted_sets():
    rng = np.random.default_rng(0)
    yield 1, np.array([0])
    yield 10, np.arange(10)  # every index: no low bits
    yield 1000, np.array([999])
    yield 1000, np.array([0, 999])
    yield 7, np.array([1, 2, 6])
    for n, k in [(64, 1), (1 << 20, 1000), (2_359_296, 2360), (100_003, 50_000)]:
        yield n, np.sort(rng.choice(n, k, replace=False))


def test_elias_fano_round_trips_within_its_size_bound():
    for n, idx in sorted_sets():
        k = idx.size
        code = bits.encode_sorted(torch.from_numpy(idx), n)
        assert code.dtype == torch.uint8 and code.numel() == bits.sorted_nbytes(n, k)
        # at most 2 + log2(n / k) bits per index, plus the two byte roundings
        assert code.numel() * 8 <= k * (2 + math.log2(n / k)) + 16
        np.testing.assert_array_equal(bits.decode_sorted(code, n, k).numpy(), idx)
    assert bits.encode_sorted(torch.zeros(0, dtype=torch.int64), 10).numel() == 0
    assert bits.decode_sorted(torch.zeros(0, dtype=torch.uint8), 10, 0).numel() == 0


def test_elias_fano_rejects_corrupt_codes():
    n, idx = 1000, torch.tensor([3, 500, 998])
    code = bits.encode_sorted(idx, n)
    with pytest.raises(ValueError, match="take"):
        bits.decode_sorted(code[:-1], n, 3)
    with pytest.raises(ValueError, match="7 entries where 3"):  # l = 8: 3 low bytes, then 7 unary bits, all set
        bits.decode_sorted(torch.cat([code[:-1], torch.tensor([0xFE], dtype=torch.uint8)]), n, 3)
    high_only = bits.encode_sorted(torch.tensor([999]), 1000)  # low bits 1111100111, one unary bit
    with pytest.raises(ValueError, match="out of range"):  # the same high part with low bits pointing past n
        bits.decode_sorted(torch.cat([torch.tensor([255, 255], dtype=torch.uint8), high_only[2:]]), 1000, 1)
    with pytest.raises(TypeError, match="uint8"):
        bits.decode_sorted(code.to(torch.int32), n, 3)


def test_elias_fano_decodes_a_stack_of_codes_at_once():
    rng = np.random.default_rng(1)
    n, k = 100_003, 97
    sets = [np.sort(rng.choice(n, k, replace=False)) for _ in range(5)]
    codes = torch.stack([bits.encode_sorted(torch.from_numpy(s), n) for s in sets])
    np.testing.assert_array_equal(bits.decode_sorted(codes, n, k).numpy(), np.stack(sets))
    bad = codes.clone()
    bad[3, -1] ^= 0x80  # one flipped unary bit in one row: that row has a wrong count
    with pytest.raises(ValueError, match="corrupt index code"):
        bits.decode_sorted(bad, n, k)
