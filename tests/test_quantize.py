"""Tests of the quantizers (onebit, terngrad, qsgd) against independent float64 references.

The references below unpack bits with numpy and recompute every formula in
float64; they never call the code under test.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from gradcomp.compressors import get
from gradcomp.compressors.quantize import QSGD, OneBit, TernGrad

SHAPES = [(0,), (), (1,), (7,), (9,), (3, 5), (0, 5), (5, 0), (4, 3, 2), (2, 3, 4, 5)]


# ----------------------------------------------------------- references


def np_unpack(packed: torch.Tensor, width: int, n: int) -> np.ndarray:
    """Codes of ``width`` bits, most significant bit first, packed back to back."""
    assert packed.dtype == torch.uint8
    b = np.unpackbits(packed.cpu().numpy())[: n * width].reshape(n, width).astype(np.int64)
    return b @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def matrix_shape(shape) -> tuple[int, int]:
    if len(shape) < 2:
        return math.prod(shape), 1
    return shape[0], math.prod(shape[1:])


def onebit_reference(t: torch.Tensor) -> np.ndarray:
    """Per column: mean of the entries >= 0 where the entry is >= 0, mean of the negative ones elsewhere."""
    m = t.detach().double().cpu().numpy().reshape(matrix_shape(t.shape))
    out = np.empty_like(m)
    for j in range(m.shape[1]):
        col = m[:, j]
        pos, neg = col[col >= 0], col[col < 0]
        a = pos.mean() if pos.size else 0.0
        b = neg.mean() if neg.size else 0.0
        out[:, j] = np.where(col >= 0, a, b)
    return out.reshape(t.shape)


def terngrad_decode(payload, n: int) -> np.ndarray:
    packed, scale = payload.tensors
    return (np_unpack(packed, 2, n) - 1) * float(scale.item())


def qsgd_decode(payload, n: int, levels: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(decoded values, signed levels) of one QSGD payload."""
    norms, packed = payload.tensors
    width = math.ceil(math.log2(2 * levels + 1))
    signed = np_unpack(packed, width, n) - levels
    per_entry = np.repeat(norms.double().numpy(), bucket)[:n]
    return per_entry * signed / levels, signed


def bucket_norms(x: np.ndarray, bucket: int) -> np.ndarray:
    nb = -(-x.size // bucket)
    pad = np.zeros(nb * bucket)
    pad[: x.size] = x
    return np.sqrt((pad.reshape(nb, bucket) ** 2).sum(1))


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# ---------------------------------------------------------- wire sizes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_onebit_nbytes(shape, dtype):
    t = torch.randn(shape).to(dtype)
    p = OneBit().compress(t)
    _, cols = matrix_shape(shape)
    n = math.prod(shape)
    assert p.nbytes == math.ceil(n / 8) + 2 * cols * torch.empty((), dtype=dtype).element_size()
    assert p.nbytes == sum(x.numel() * x.element_size() for x in p.tensors)
    assert p.op == "gather"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_terngrad_nbytes(shape, dtype):
    t = torch.randn(shape).to(dtype)
    p = TernGrad(seed=0).compress(t)
    n = math.prod(shape)
    assert p.nbytes == math.ceil(2 * n / 8) + 4
    assert p.nbytes == sum(x.numel() * x.element_size() for x in p.tensors)
    assert p.op == "gather"


@pytest.mark.parametrize("shape", SHAPES + [(1000,), (33, 31)])
@pytest.mark.parametrize("levels", [1, 2, 3, 7, 8, 16, 127, 128, 1000])
@pytest.mark.parametrize("bucket", [1, 5, 512])
def test_qsgd_nbytes(shape, levels, bucket):
    t = torch.randn(shape)
    p = QSGD(levels=levels, bucket_size=bucket, seed=0).compress(t)
    n = math.prod(shape)
    width = math.ceil(math.log2(2 * levels + 1))
    assert p.nbytes == 4 * math.ceil(n / bucket) + math.ceil(n * width / 8)
    assert p.nbytes == sum(x.numel() * x.element_size() for x in p.tensors)
    assert p.op == "gather"


# ---------------------------------------------------------------- 1-bit


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_onebit_matches_reference(shape, dtype, tol):
    torch.manual_seed(1)
    t = torch.randn(shape, dtype=dtype)
    if t.numel() > 2:
        t.view(-1)[::3] = 0.0  # zeros count as non-negative
    c = OneBit()
    out = c.decompress([c.compress(t)], like=t)
    assert out.shape == t.shape and out.dtype == dtype
    np.testing.assert_allclose(as_np(out), onebit_reference(t), rtol=tol, atol=tol)


def test_onebit_one_sided_columns():
    t = torch.tensor([[1.0, -1.0, 0.0], [3.0, -5.0, 0.0]], dtype=torch.float64)
    c = OneBit()
    out = c.decompress([c.compress(t)], like=t)
    np.testing.assert_array_equal(as_np(out), [[2.0, -3.0, 0.0], [2.0, -3.0, 0.0]])


def test_onebit_sums_several_payloads():
    torch.manual_seed(2)
    ts = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    c = OneBit()
    out = c.decompress([c.compress(t) for t in ts], like=ts[0])
    np.testing.assert_allclose(as_np(out), sum(onebit_reference(t) for t in ts), rtol=1e-12, atol=1e-12)


def test_onebit_error_feedback_conserves():
    assert OneBit.error_feedback is True
    torch.manual_seed(3)
    c = OneBit()
    residual = torch.zeros(8, 5, dtype=torch.float64)
    sent_sum = torch.zeros_like(residual)
    input_sum = torch.zeros_like(residual)
    for _ in range(20):
        g = torch.randn(8, 5, dtype=torch.float64)
        input_sum += g
        acc = g + residual
        payload = c.compress(acc)
        decoded = c.decompress([payload], like=acc)
        sent_sum += decoded
        residual = acc - decoded
    np.testing.assert_allclose(as_np(sent_sum + residual), as_np(input_sum), rtol=0, atol=1e-9)
    # And the residual stays bounded: error feedback does not let it grow without limit.
    assert residual.abs().max() < 20


def test_onebit_subtract_sent():
    torch.manual_seed(4)
    t = torch.randn(5, 3, dtype=torch.float64)
    c = OneBit()
    acc = t.clone()
    c.subtract_sent(acc, c.compress(t))
    np.testing.assert_allclose(as_np(acc), as_np(t) - onebit_reference(t), atol=1e-12)


# ---------------------------------------------------------------- TernGrad


def test_terngrad_unbiased_and_ternary():
    # 2000 independent draws: 20 calls (fresh numbers through ``state``) on 100 stacked
    # copies of g; the copies share max|g|, so each row is one draw of TernGrad(g).
    assert TernGrad.error_feedback is False
    torch.manual_seed(5)
    g = torch.randn(40, dtype=torch.float64)
    g[3] = 0.0
    c = TernGrad(seed=123)
    state: dict = {}
    calls, copies = 20, 100
    stacked = g.repeat(copies, 1)
    x = as_np(g)
    s = float(np.abs(x).max())
    total = np.zeros(40)
    for _ in range(calls):
        p = c.compress(stacked, state)
        out = as_np(c.decompress([p], like=stacked))
        # only {-s, 0, +s}, and never the opposite sign of g
        assert np.all(np.isclose(np.abs(out), s, rtol=1e-6, atol=0) | (out == 0))
        assert np.all(out * x >= 0)
        assert np.all(out[:, 3] == 0)
        total += out.sum(0)
    draws = calls * copies
    var = s * np.abs(x) - x**2  # Var[s * sign(g) * Bernoulli(|g|/s)]
    tol = 5 * np.sqrt(np.maximum(var, 0) / draws) + 1e-6 * s
    assert np.all(np.abs(total / draws - x) <= tol)


def test_terngrad_decompress_sums_workers():
    torch.manual_seed(6)
    ts = [torch.randn(3, 7) * (k + 1) for k in range(3)]
    c = TernGrad(seed=7)
    ps = [c.compress(t, {}) for t in ts]
    out = c.decompress(ps, like=ts[0])
    ref = sum(terngrad_decode(p, 21) for p in ps).reshape(3, 7)
    np.testing.assert_allclose(as_np(out), ref, rtol=1e-6, atol=1e-6)
    for p, t in zip(ps, ts):
        assert float(p.tensors[1]) == float(t.abs().max())


def _drive_terngrad(ts, comps, states, combine_max=None):
    gens = [c.exchange(t, st) for c, t, st in zip(comps, ts, states)]
    first = [next(g) for g in gens]
    for p in first:
        assert p.op == "max" and p.nbytes == 4 and p.tensors[0].dtype == torch.float32
    m = torch.stack([p.tensors[0] for p in first]).amax(0) if combine_max is None else combine_max
    second = [g.send([first[0].replace(m)]) for g in gens]
    for p, t in zip(second, ts):
        assert p.op == "gather" and p.nbytes == math.ceil(2 * t.numel() / 8)
    results = []
    for g in gens:
        with pytest.raises(StopIteration) as stop:
            g.send(second)
        results.append(stop.value.value)
    return first, second, results


def test_terngrad_exchange_three_workers():
    torch.manual_seed(8)
    ts = [torch.randn(4, 6) * scale for scale in (0.5, 3.0, 1.0)]
    comps = [TernGrad(seed=100 + k) for k in range(3)]
    first, second, results = _drive_terngrad(ts, comps, [{}, {}, {}])
    shared = max(float(t.abs().max()) for t in ts)
    n = 24
    codes = [np_unpack(p.tensors[0], 2, n) - 1 for p in second]
    for k, t in enumerate(ts):
        x = as_np(t).reshape(-1)
        assert set(np.unique(codes[k])) <= {-1, 0, 1}
        assert np.all(codes[k] * x >= 0)
    expected = shared * sum(codes).reshape(4, 6).astype(np.float64)
    for k, r in enumerate(results):
        assert r.total.shape == ts[k].shape and r.total.dtype == torch.float32
        np.testing.assert_allclose(as_np(r.total), expected, rtol=1e-6, atol=0)
        assert float(r.sent.tensors[-1]) == shared
        mine = comps[k].decompress([r.sent], like=ts[k])
        np.testing.assert_allclose(as_np(mine), shared * codes[k].reshape(4, 6), rtol=1e-6, atol=0)


def test_terngrad_exchange_unbiased_with_larger_shared_scale():
    # A shared scale above the local max: entries become +-S with probability |g|/S.
    torch.manual_seed(9)
    g = torch.randn(30, dtype=torch.float64)
    shared = 4.0 * float(g.abs().max())
    c = TernGrad(seed=11)
    state: dict = {}
    calls, copies = 20, 100
    stacked = g.repeat(copies, 1)
    total = np.zeros(30)
    for _ in range(calls):
        _, _, (r,) = _drive_terngrad([stacked], [c], [state], combine_max=torch.tensor([shared], dtype=torch.float32))
        total += as_np(r.total).sum(0)
    draws = calls * copies
    x = as_np(g)
    s = float(np.float32(shared))
    tol = 5 * np.sqrt((s * np.abs(x) - x**2) / draws) + 1e-6 * s
    assert np.all(np.abs(total / draws - x) <= tol)


# -------------------------------------------------------------------- QSGD


@pytest.mark.parametrize("levels", [1, 4, 16])
def test_qsgd_unbiased_and_levels(levels):
    # 2000 draws: 20 calls on 100 stacked copies of g (21 entries = 3 buckets of 7, so
    # every copy is bucketed like g alone).  A partial last bucket is checked below.
    assert QSGD.error_feedback is False
    torch.manual_seed(10 + levels)
    bucket, n = 7, 21
    g = torch.randn(n, dtype=torch.float64)
    g[5] = 0.0
    c = QSGD(levels=levels, bucket_size=bucket, seed=levels)
    x = as_np(g)
    ref_norm = np.repeat(bucket_norms(x, bucket), bucket)[:n]
    r = np.abs(x) / ref_norm * levels
    calls, copies = 20, 100
    stacked = g.repeat(copies, 1)
    state: dict = {}
    total = np.zeros(n)
    for _ in range(calls):
        p = c.compress(stacked, state)
        np.testing.assert_allclose(p.tensors[0].double().numpy(), np.tile(bucket_norms(x, bucket), copies), rtol=1e-6)
        decoded, signed = qsgd_decode(p, n * copies, levels, bucket)
        out = as_np(c.decompress([p], like=stacked))
        np.testing.assert_allclose(out.reshape(-1), decoded, rtol=1e-12, atol=1e-12)
        signed = signed.reshape(copies, n)
        # level is floor(r) or floor(r) + 1, with g's sign
        assert np.all((np.abs(signed) == np.floor(r)) | (np.abs(signed) == np.floor(r) + 1))
        assert np.all(np.abs(signed) <= levels)
        assert np.all(signed * x >= 0)
        total += out.sum(0)
    draws = calls * copies
    frac = r - np.floor(r)
    var = (ref_norm / levels) ** 2 * frac * (1 - frac)
    tol = 5 * np.sqrt(var / draws) + 1e-6 * ref_norm
    assert np.all(np.abs(total / draws - x) <= tol)


def test_qsgd_partial_bucket_unbiased():
    torch.manual_seed(15)
    bucket, n, levels = 8, 21, 3  # buckets of 8, 8 and 5 entries
    g = torch.randn(n, dtype=torch.float64)
    c = QSGD(levels=levels, bucket_size=bucket, seed=9)
    state: dict = {}
    draws = 600
    total = np.zeros(n)
    for _ in range(draws):
        p = c.compress(g, state)
        assert p.tensors[0].numel() == 3
        total += as_np(c.decompress([p], like=g))
    x = as_np(g)
    ref_norm = np.repeat(bucket_norms(x, bucket), bucket)[:n]
    np.testing.assert_allclose(p.tensors[0].double().numpy(), bucket_norms(x, bucket), rtol=1e-6)
    r = np.abs(x) / ref_norm * levels
    frac = r - np.floor(r)
    tol = 5 * np.sqrt((ref_norm / levels) ** 2 * frac * (1 - frac) / draws) + 1e-6 * ref_norm
    assert np.all(np.abs(total / draws - x) <= tol)


def test_qsgd_decompress_sums_workers():
    torch.manual_seed(12)
    ts = [torch.randn(5, 9) * (k + 1) for k in range(3)]
    c = QSGD(levels=5, bucket_size=10, seed=3)
    ps = [c.compress(t, {}) for t in ts]
    out = c.decompress(ps, like=ts[0])
    ref = sum(qsgd_decode(p, 45, 5, 10)[0] for p in ps).reshape(5, 9)
    np.testing.assert_allclose(as_np(out), ref, rtol=1e-6, atol=1e-6)


def test_qsgd_extreme_magnitudes():
    # The norm of tiny/huge float32 entries must not underflow/overflow.
    for scale in (1e-30, 1e30):
        t = torch.tensor([scale, -scale, 0.5 * scale], dtype=torch.float32)
        c = QSGD(levels=4, bucket_size=4, seed=0)
        out = c.decompress([c.compress(t)], like=t)
        assert torch.isfinite(out).all()
        norm = scale * math.sqrt(2.25)
        np.testing.assert_allclose(float(c.compress(t).tensors[0]), norm, rtol=1e-6)


# -------------------------------------------------------- randomness and state


@pytest.mark.parametrize("make", [lambda: TernGrad(seed=5), lambda: QSGD(levels=3, bucket_size=4, seed=5)])
def test_seeded_stream(make):
    g = torch.randn(50)
    c = make()
    a, b = {}, {}
    seq_a = [c.compress(g, a).tensors for _ in range(3)]
    seq_b = [c.compress(g, b).tensors for _ in range(3)]
    for x, y in zip(seq_a, seq_b):  # same seed, fresh state: same sequence
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert not all(torch.equal(u, v) for u, v in zip(seq_a[0], seq_a[1]))  # consecutive calls differ
    # state holds only plain values / tensors, and resuming continues the stream exactly
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    resumed = torch.load(buf, weights_only=True)
    nxt = c.compress(g, a).tensors
    assert all(torch.equal(u, v) for u, v in zip(c.compress(g, resumed).tensors, nxt))
    # without state every call repeats the same draws
    assert all(torch.equal(u, v) for u, v in zip(c.compress(g).tensors, c.compress(g).tensors))


def test_unseeded_uses_global_generator():
    g = torch.randn(50)
    c = QSGD(levels=2, bucket_size=8)
    torch.manual_seed(0)
    first = c.compress(g).tensors[1]
    torch.manual_seed(0)
    assert torch.equal(c.compress(g).tensors[1], first)


# -------------------------------------------------------------- odd inputs


def _all():
    return [OneBit(), TernGrad(seed=1), QSGD(levels=4, bucket_size=3, seed=1)]


@pytest.mark.parametrize("c", _all(), ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0), ()])
def test_empty_and_scalar(c, shape):
    t = torch.randn(shape)
    out = c.decompress([c.compress(t, {})], like=t)
    assert out.shape == t.shape and out.dtype == t.dtype


@pytest.mark.parametrize("c", _all(), ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_single_entry_is_exact(c, shape):
    # one entry: its column mean, the max scale and the bucket norm all equal |x|
    for value in (0.75, -2.5, 0.0):
        t = torch.full(shape, value)
        out = c.decompress([c.compress(t, {})], like=t)
        assert out.shape == t.shape
        assert float(out) == value


@pytest.mark.parametrize("c", _all(), ids=lambda c: c.name)
def test_non_contiguous_input(c):
    torch.manual_seed(13)
    base = torch.randn(6, 5, dtype=torch.float64)
    t = base.t()
    assert not t.is_contiguous()
    p, q = c.compress(t, {}), c.compress(t.contiguous(), {})
    assert all(torch.equal(u, v) for u, v in zip(p.tensors, q.tensors))
    out = c.decompress([p], like=t)
    assert out.shape == (5, 6)
    if c.name == "onebit":
        np.testing.assert_allclose(as_np(out), onebit_reference(t.contiguous()), atol=1e-12)
    elif c.name == "terngrad":
        np.testing.assert_allclose(as_np(out), terngrad_decode(p, 30).reshape(5, 6), atol=1e-12)
        assert np.all(as_np(out) * as_np(t) >= 0)
    else:
        np.testing.assert_allclose(as_np(out), qsgd_decode(p, 30, 4, 3)[0].reshape(5, 6), atol=1e-12)
        assert np.all(as_np(out) * as_np(t) >= 0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs(dtype, rtol):
    torch.manual_seed(14)
    t = torch.randn(7, 6).to(dtype)
    x = as_np(t)

    ob = OneBit()
    p = ob.compress(t)
    assert p.tensors[1].dtype == dtype
    out = ob.decompress([p], like=t)
    assert out.dtype == dtype
    np.testing.assert_allclose(as_np(out), onebit_reference(t), rtol=rtol, atol=1e-6)

    tg = TernGrad(seed=2)
    p = tg.compress(t)
    out = tg.decompress([p], like=t)
    assert out.dtype == dtype
    s = np.abs(x).max()
    assert float(p.tensors[1]) == s
    assert np.all((np.abs(as_np(out)) == s) | (as_np(out) == 0))
    assert np.all(as_np(out) * x >= 0)

    qs = QSGD(levels=8, bucket_size=10, seed=2)
    p = qs.compress(t)
    out = qs.decompress([p], like=t)
    assert out.dtype == dtype
    np.testing.assert_allclose(p.tensors[0].double().numpy(), bucket_norms(x.reshape(-1), 10), rtol=1e-6)
    np.testing.assert_allclose(as_np(out), qsgd_decode(p, 42, 8, 10)[0].reshape(7, 6), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("c", _all(), ids=lambda c: c.name)
def test_non_finite_input_is_not_hidden(c):
    t = torch.tensor([1.0, float("nan"), -2.0, 0.5])
    out = c.decompress([c.compress(t, {})], like=t)
    assert not torch.isfinite(out).all()


@pytest.mark.parametrize("c", _all(), ids=lambda c: c.name)
def test_integer_input_rejected(c):
    with pytest.raises(TypeError):
        c.compress(torch.arange(4))


# ----------------------------------------------------- options and registry


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (QSGD, {"levels": 0}, "levels"),
        (QSGD, {"levels": -3}, "levels"),
        (QSGD, {"levels": 2.0}, "levels"),
        (QSGD, {"levels": True}, "levels"),
        (QSGD, {"levels": 2**31}, "levels"),
        (QSGD, {"bucket_size": 0}, "bucket_size"),
        (QSGD, {"bucket_size": 1.5}, "bucket_size"),
        (QSGD, {"seed": -1}, "seed"),
        (QSGD, {"seed": "x"}, "seed"),
        (TernGrad, {"seed": -1}, "seed"),
        (TernGrad, {"seed": 2**64}, "seed"),
        (TernGrad, {"seed": 1.0}, "seed"),
    ],
)
def test_invalid_options(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_registry():
    c = get("qsgd", levels=4)
    assert isinstance(c, QSGD) and c.levels == 4 and c.bucket_size == 512
    assert isinstance(get("onebit"), OneBit)
    assert isinstance(get("terngrad", seed=3), TernGrad)
    with pytest.raises(ValueError, match="bogus"):
        get("qsgd", bogus=1)
    with pytest.raises(ValueError, match="levels"):
        get("qsgd", levels=0)
    assert get("qsgd", levels=4).options() == {"levels": 4, "bucket_size": 512, "seed": None}
