"""Part codecs against numpy written here: positions as a mask or escaped gaps, codes bit-packed."""

import numpy as np
import pytest
import torch

from lccompress.schemes.codecs import RAW, Codes, Positions, decode_part, delta_decode, delta_encode


def _bits_lsb_first(codes: np.ndarray, b: int) -> np.ndarray:
    """Reference bit packing: code j's bit i is stream bit j·b + i, bytes little-endian in bits."""
    bits = np.array([(int(c) >> i) & 1 for c in codes for i in range(b)], np.uint8)
    return np.packbits(bits, bitorder="little")


@pytest.mark.parametrize("k,dtype", [(2, torch.uint8), (3, torch.uint8), (16, torch.uint8), (300, torch.int32)])
def test_codes_pack_at_ceil_log2_k_bits(k, dtype):
    g = torch.Generator().manual_seed(k)
    z = torch.randint(0, k, (37,), generator=g).to(dtype)
    s, info = Codes(k).encode(z, 37)
    b = max(1, int(np.ceil(np.log2(k))))
    assert info["enc"] == "bitpack" and info["bits"] == b
    assert np.array_equal(s.numpy(), _bits_lsb_first(z.numpy(), b))
    assert torch.equal(decode_part(s, info, 37), z)


def test_bool_codes_pack_at_one_bit_and_stay_bool():
    z = torch.tensor([True, False, True, True, False, False, False, True, True])
    s, info = Codes(2).encode(z, z.numel())
    assert info["bits"] == 1 and info["dtype"] == "bool" and s.numel() == 2
    assert np.array_equal(s.numpy(), _bits_lsb_first(z.numpy().astype(np.uint8), 1))
    out = decode_part(s, info, z.numel())
    assert out.dtype == torch.bool and torch.equal(out, z)


@pytest.mark.parametrize("n,idx", [(20, [0, 3, 4, 19]), (100_000, [5, 70_000, 99_999]), (10, list(range(10)))])
def test_positions_take_the_smaller_of_mask_and_gaps(n, idx):
    t = torch.tensor(idx)
    s, info = Positions().encode(t, n)
    gaps = np.diff(np.array(idx), prepend=-1) - 1
    mask_bytes = (n + 7) // 8
    gap_bytes = min(sum(int(g) // (2 ** (8 * w) - 1) + 1 for g in gaps) * w for w in (1, 2, 4))
    assert info["enc"] == ("mask" if mask_bytes <= gap_bytes else "delta")
    assert s.numel() * s.element_size() == min(mask_bytes, gap_bytes)
    assert torch.equal(decode_part(s, info, n), t)


def test_escaped_gaps_by_hand():
    stream = delta_encode(np.array([0, 3, 300]), np.uint8)  # gaps 0, 2, 296 = 255 + 41
    assert stream.tolist() == [0, 2, 255, 41]
    assert delta_decode(stream).tolist() == [0, 3, 300]
    with pytest.raises(ValueError, match="escape"):
        delta_decode(np.array([1, 255], np.uint8))


def test_unsorted_positions_and_floats_stay_raw():
    for t, codec in ((torch.tensor([3, 1]), Positions()), (torch.randn(4), Codes(4)), (torch.tensor([-1, 2]), Codes(4))):
        s, info = codec.encode(t, 10)
        assert info["enc"] == "raw" and s is t
    s, info = RAW.encode(torch.arange(3), 3)
    with pytest.raises(ValueError, match="unknown encoding"):
        decode_part(s, {**info, "enc": "zip"}, 3)
