"""Sparse selection and codes against independent references."""

import math

import pytest
import torch

import gradcomp
from gradcomp.compressors.sparse import select_dgc, select_topk
from helpers import compact_nbytes


def tensors():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(100_000, generator=g)
    yield "heavy", torch.distributions.StudentT(1.5).sample((50_000,))
    yield "ties", torch.randint(-3, 4, (30_000,), generator=g).float()
    yield "sparse", torch.where(torch.rand(40_000, generator=g) < 0.001, torch.randn(40_000, generator=g), 0.0)
    yield "zeros", torch.zeros(5_000)
    yield "ramp", torch.linspace(-1, 2, 20_001)  # sorted: the strided sample sees it evenly


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("sample_ratio", [0.01, 0.05])
def test_dgc_selection_exact_count_distinct_and_large(density, sample_ratio):
    for label, x in tensors():
        k = max(1, math.ceil(density * x.numel()))
        idx = select_dgc(x, k, sample_ratio)
        assert idx.numel() == k, label
        assert idx.unique().numel() == k, label
        assert 0 <= int(idx.min()) and int(idx.max()) < x.numel(), label
        ranked = x.abs().sort(descending=True).values
        bound = ranked[min(x.numel() - 1, math.ceil(1.3 * k) - 1)]
        assert x.abs()[idx].min() >= bound, label


def test_dgc_selection_agrees_with_topk_at_full_sample():
    for label, x in tensors():
        if label in ("ties", "zeros", "sparse"):
            continue  # ties (many equal values or zeros) make "the" top-k ambiguous
        for density in (0.001, 0.02):
            k = math.ceil(density * x.numel())
            a = set(select_dgc(x, k, 1.0).tolist())
            b = set(torch.argsort(x.abs(), descending=True)[:k].tolist())
            assert a == b, label
            # and the DGC compressor payload holds exactly those entries
            p = gradcomp.get("sampled-topk", density=density, sample_ratio=1.0).compress(x)
            assert set(p.tensors[1].tolist()) == b
            q = gradcomp.get("topk", density=density).compress(x)
            assert set(q.tensors[1].tolist()) == b


def test_sampled_selection_is_exact_on_normal_data():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3))
    k = 200
    assert set(select_dgc(x, k, 0.01).tolist()) == set(select_topk(x, k).tolist())


def test_sparse_payload_wire_format():
    x = torch.randn(300, 70)
    p = gradcomp.get("sampled-topk", density=0.001).compress(x)  # the compressor's default wire is "plain"
    k = math.ceil(0.001 * x.numel())
    assert p.op == "gather" and p.tensors[1].dtype == torch.int32
    assert p.nbytes == k * 4 + k * 4
    torch.testing.assert_close(p.tensors[0], x.view(-1)[p.tensors[1].long()])


@pytest.mark.parametrize("compressor", ["topk", "sampled-topk"])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_compact_wire_sends_scaled_float16_values_and_a_coded_index_set(compressor, scale):
    x = torch.randn(300, 70, generator=torch.Generator().manual_seed(5)) * scale
    density = 0.01
    c = gradcomp.get(compressor, density=density, wire="compact")
    p = c.compress(x)
    k = math.ceil(density * x.numel())
    top = torch.argsort(x.abs().view(-1), descending=True)[:k].sort().values
    half, pow2, code = p.tensors
    assert half.dtype == torch.float16 and pow2.dtype == torch.float32 and code.dtype == torch.uint8
    # the scale is a power of two putting the largest magnitude in [2**14, 2**15): no overflow at any scale
    mantissa, _ = torch.frexp(pow2)
    assert float(mantissa) == 0.5 and 2**14 <= float(half.float().abs().max()) < 2**15
    assert p.nbytes == compact_nbytes(x.numel(), k)  # the code is Elias-Fano
    expected = torch.zeros(x.numel())
    expected[top] = (x.view(-1)[top] / pow2).half().float() * pow2
    torch.testing.assert_close(c.decompress([p], like=x).view(-1), expected, rtol=0, atol=0)
    # error feedback: the accumulator keeps exactly what float16 rounding took off the sent values
    acc = x.clone()
    c.subtract_sent(acc, p)
    torch.testing.assert_close(acc.view(-1), x.view(-1) - expected, rtol=0, atol=0)
    assert torch.equal(c.sent_indices(p, x.numel()), top)


def test_corrupt_sparse_payloads_raise_instead_of_writing_out_of_bounds():
    x = torch.randn(100, 10)
    like = torch.zeros_like(x)
    plain = gradcomp.get("topk", density=0.05)
    p = plain.compress(x)
    bad = p.replace(p.tensors[0], p.tensors[1].clone().fill_(1000))
    with pytest.raises(ValueError, match="out of range"):
        plain.decompress([bad], like=like)
    with pytest.raises(ValueError, match="50 values but 49 indices"):
        plain.decompress([p.replace(p.tensors[0], p.tensors[1][:-1])], like=like)
    compact = gradcomp.get("topk", density=0.05, wire="compact")
    q = compact.compress(x)
    half, scale, code = q.tensors
    with pytest.raises(ValueError, match="take"):
        compact.decompress([q.replace(half, scale, code[:-1])], like=like)
    with pytest.raises(ValueError, match="corrupt index code"):
        compact.decompress([q.replace(half, scale, torch.full_like(code, 255))], like=like)
    with pytest.raises(ValueError, match="corrupt index code"):  # one bad payload among good ones, decoded together
        compact.decompress([q, q.replace(half, scale, torch.full_like(code, 255)), q], like=like)
    with pytest.raises(ValueError, match="2 scales"):
        compact.decompress([q.replace(half, torch.ones(2), code)], like=like)
    with pytest.raises(ValueError, match="take"):  # a payload with other sizes than the rest
        compact.decompress([q, q.replace(half[:-1], scale, code)], like=like)
    with pytest.raises(ValueError, match="topk.wire must be one of"):
        gradcomp.get("topk", wire="zip")
    with pytest.raises(ValueError, match="DGC.wire must be one of"):
        gradcomp.DGC(wire="zip")


def test_sparse_decompress_sums_workers():
    c = gradcomp.get("topk", density=0.1)
    xs = [torch.randn(20, 10) for _ in range(3)]
    ps = [c.compress(x) for x in xs]
    expected = torch.zeros(200)
    for p in ps:
        for v, i in zip(p.tensors[0].tolist(), p.tensors[1].tolist()):
            expected[i] += v
    torch.testing.assert_close(c.decompress(ps, like=xs[0]), expected.view(20, 10))


def test_randomk_same_indices_on_every_rank_new_each_step():
    c = gradcomp.get("randomk", density=0.01, seed=7)
    s0, s1 = {}, {}
    a, b = torch.randn(5000), torch.randn(5000)
    pa, pb = c.compress(a, s0), c.compress(b, s1)
    assert torch.equal(pa.meta, pb.meta) and pa.meta.unique().numel() == 50
    assert pa.op == "sum" and pa.nbytes == 50 * 4  # values only: indices come from the shared seed
    assert not torch.equal(c.compress(a, s0).meta, pa.meta)
    summed = pa.replace(pa.tensors[0] + pb.tensors[0])
    expected = torch.zeros(5000)
    expected[pa.meta] = a[pa.meta] + b[pa.meta]
    torch.testing.assert_close(c.decompress([summed], like=a), expected)


def test_threshold_sends_signed_tau():
    tau = 0.7
    c = gradcomp.get("threshold", tau=tau)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    p = c.compress(x)
    assert p.nbytes == 4 * int((x.abs() >= tau).sum())
    expected = torch.where(x.abs() >= tau, tau * torch.sign(x), torch.zeros_like(x))
    torch.testing.assert_close(c.decompress([p], like=x), expected)


def test_dryden_sends_a_proportion_of_each_sign_as_its_mean():
    c = gradcomp.get("dryden", proportion=0.1)
    x = torch.randn(2000, generator=torch.Generator().manual_seed(2))
    pos, neg = x[x > 0].sort(descending=True).values, x[x < 0].sort().values
    kp, kn = math.ceil(0.1 * pos.numel()), math.ceil(0.1 * neg.numel())
    expected = torch.zeros_like(x)
    expected[x >= pos[kp - 1]] = pos[:kp].mean()
    expected[x <= neg[kn - 1]] = neg[:kn].mean()
    p = c.compress(x)
    assert p.nbytes == 4 * (kp + kn) + 2 * 4
    torch.testing.assert_close(c.decompress([p], like=x), expected)


def test_out_of_range_codes_are_rejected():
    c = gradcomp.get("threshold", tau=0.1)
    bad = gradcomp.Payload((torch.tensor([2 * 50], dtype=torch.int32),))
    with pytest.raises(ValueError, match="out of range"):
        c.decompress([bad], like=torch.zeros(50))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
@pytest.mark.parametrize("p", [0.0, 0.001, 0.3, 1.0])
def test_sparse_nonzero_equals_nonzero(n, p):
    from gradcomp.compressors.sparse import _sparse_nonzero

    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < p
    assert torch.equal(_sparse_nonzero(mask), mask.nonzero().view(-1))
    assert torch.equal(_sparse_nonzero(mask[3:]), mask[3:].nonzero().view(-1))  # unaligned view


@pytest.mark.parametrize("wire", ["plain", "compact"])
def test_received_payloads_are_decoded_from_their_bytes_not_from_local_meta(wire):
    """The communicator hands back other ranks' payloads as ``local.replace(*their tensors)``, which keeps
    this rank's ``meta``: decompress must read the bytes."""
    c = gradcomp.get("sampled-topk", density=0.01, sample_ratio=1.0, wire=wire)
    mine, theirs = torch.randn(50, 40), torch.randn(50, 40)
    local, remote = c.compress(mine), c.compress(theirs)
    received = local.replace(*remote.tensors)
    torch.testing.assert_close(c.decompress([received], like=theirs), c.decompress([remote], like=theirs),
                               rtol=0, atol=0)
    assert not torch.equal(c.decompress([received], like=theirs), c.decompress([local], like=mine))
