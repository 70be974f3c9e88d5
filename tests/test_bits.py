"""Bit packing against numpy's packbits, across the block boundary of the general widths."""

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
