"""AdaComp (Chen et al. 2018) and DoReFa-Net gradients (Zhou et al. 2016) against float64 recomputations of
the papers' equations, written here from the equations, not from the compressors."""

import math

import numpy
import pytest
import torch

import gradcomp
from conftest import batches, ce, mlp
from gradcomp import Simulator, split_batch

# ------------------------------------------------------------------ AdaComp


def adacomp_reference(residue, dw, bin_size, scale="mean"):
    """One step of AdaComp in float64 with Python loops: (sent tensor, new residue, sent mask)."""
    r = residue.double().reshape(-1).tolist()
    d = dw.double().reshape(-1).tolist()
    n = len(d)
    g = [r[i] + d[i] for i in range(n)]
    h = [g[i] + d[i] for i in range(n)]
    mask = [False] * n
    for start in range(0, n, bin_size):
        g_max = max(abs(v) for v in g[start:start + bin_size])
        for i in range(start, min(n, start + bin_size)):
            mask[i] = abs(h[i]) >= g_max and g[i] != 0
    chosen = [abs(g[i]) for i in range(n) if mask[i]]
    if scale == "mean":
        s = sum(chosen) / len(chosen) if chosen else 0.0
    else:
        s = max(abs(v) for v in g)
    s = float(torch.tensor(s, dtype=torch.float32))  # the scale crosses the wire as fp32
    sent = [math.copysign(s, g[i]) if mask[i] else 0.0 for i in range(n)]
    new_residue = [g[i] - sent[i] for i in range(n)]
    shape = dw.shape
    as_t = lambda v: torch.tensor(v, dtype=torch.float64).reshape(shape)  # noqa: E731
    return as_t(sent), as_t(new_residue), torch.tensor(mask).reshape(shape)


@pytest.mark.parametrize("shape,bin_size,scale", [((7, 9), 5, "mean"), ((50,), 50, "mean"), ((4, 3, 5), 7, "max"),
                                                  ((13,), 1, "mean"), ((6, 6), 100, "max")])
def test_adacomp_matches_the_papers_algorithm_over_steps(shape, bin_size, scale):
    torch.manual_seed(0)
    comp = gradcomp.get("adacomp", bin_size=bin_size, scale=scale)
    state, residue = {}, torch.zeros(shape, dtype=torch.float64)
    for _ in range(5):
        dw = torch.randn(shape, dtype=torch.float64)
        payload = comp.compress(dw, state)
        sent, residue, mask = adacomp_reference(residue, dw, bin_size, scale)
        torch.testing.assert_close(comp.decompress([payload], like=dw), sent, rtol=0, atol=1e-15)
        torch.testing.assert_close(state["residue"], residue, rtol=0, atol=1e-14)
        k = int(mask.sum())
        assert payload.nbytes == 4 * k + 4  # one int32 word (index and sign) per sent entry, one fp32 scale
        assert payload.op == "gather" and payload.variable


def test_adacomp_error_feedback_keeps_everything_not_sent():
    """sum of what was sent + residue == sum of the gradients (nothing lost), to float64 rounding."""
    torch.manual_seed(1)
    comp = gradcomp.get("adacomp", bin_size=8)
    state, sent_total, grad_total = {}, torch.zeros(10, 12, dtype=torch.float64), torch.zeros(10, 12,
                                                                                              dtype=torch.float64)
    for _ in range(20):
        dw = torch.randn(10, 12, dtype=torch.float64)
        grad_total += dw
        sent_total += comp.decompress([comp.compress(dw, state)], like=dw)
    torch.testing.assert_close(sent_total + state["residue"], grad_total, rtol=0, atol=1e-12)
    assert not comp.error_feedback  # it keeps its own residue: no second residual memory in front of it


def test_adacomp_sums_workers_and_is_stateless_without_state():
    torch.manual_seed(2)
    comp = gradcomp.get("adacomp", bin_size=6)
    grads = [torch.randn(5, 8, dtype=torch.float64) for _ in range(3)]
    payloads = [comp.compress(g) for g in grads]
    expected = sum(adacomp_reference(torch.zeros_like(g), g, 6)[0] for g in grads)
    torch.testing.assert_close(comp.decompress(payloads, like=grads[0]), expected, rtol=0, atol=1e-14)
    again = comp.compress(grads[0])
    assert all(torch.equal(a, b) for a, b in zip(again.tensors, payloads[0].tensors))


def test_adacomp_float32_and_half_gradients():
    torch.manual_seed(3)
    comp = gradcomp.get("adacomp", bin_size=10)
    g32 = torch.randn(40)
    state = {}
    out = comp.decompress([comp.compress(g32, state)], like=g32)
    ref = adacomp_reference(torch.zeros(40), g32, 10)[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
    assert state["residue"].dtype == torch.float32
    half = torch.randn(40).half()
    hs = {}
    out = comp.decompress([comp.compress(half, hs)], like=half)
    assert out.dtype == torch.float16 and hs["residue"].dtype == torch.float32


def test_adacomp_rejects_bad_options_and_payloads():
    with pytest.raises(ValueError, match=r"adacomp\.bin_size must be an integer >= 1, got 0"):
        gradcomp.get("adacomp", bin_size=0)
    with pytest.raises(ValueError, match=r"adacomp\.scale must be one of \('mean', 'max'\), got 'median'"):
        gradcomp.get("adacomp", scale="median")
    comp = gradcomp.get("adacomp")
    like = torch.zeros(4)
    p = comp.compress(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    with pytest.raises(ValueError, match="adacomp: corrupt payload: codes"):
        comp.decompress([p.replace(torch.tensor([8], dtype=torch.int32), p.tensors[1])], like=like)
    with pytest.raises(ValueError, match="adacomp: corrupt payload: expected 2 tensor"):
        comp.decompress([p.replace(p.tensors[0])], like=like)
    with pytest.raises(ValueError, match="adacomp: corrupt payload: scale"):
        comp.decompress([p.replace(p.tensors[0], torch.ones(2))], like=like)
    with pytest.raises(ValueError, match="adacomp: state residue of shape"):
        comp.compress(torch.zeros(3), {"residue": torch.zeros(4)})


def _train(x, y, method, steps=60, workers=4):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sim = Simulator(model, method, workers, optimizer=opt)
    for xb, yb in batches(x, y, 64, steps):
        sim.step(split_batch((xb, yb), workers), ce)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    return acc, sim


def test_adacomp_trains_in_the_simulator_and_compresses(digits):
    x, y = digits
    acc, sim = _train(x, y, gradcomp.get("adacomp", bin_size=50))
    assert acc > 0.6
    assert sim.dense_bytes / max(sim.bytes_sent) > 4  # print(sim.compression_ratio)


# ------------------------------------------------------------------- DoReFa


def dorefa_reference(g, bits, u, per_row=False):
    """DoReFa-Net's gradient quantizer in float64 from uniform draws ``u`` (one per entry, flattened order)."""
    n = 2 ** bits - 1
    m = g.double().reshape(g.shape[0], -1) if per_row and g.dim() >= 2 else g.double().reshape(1, -1)
    u = u.double().reshape(m.shape)
    out = torch.empty_like(m)
    for r in range(m.shape[0]):
        exact = m[r].abs().max().item()
        mx = numpy.float32(exact)  # the scale crosses the wire as fp32, rounded up
        mx = float(mx if float(mx) >= exact else numpy.nextafter(mx, numpy.float32(math.inf)))
        for j in range(m.shape[1]):
            sigma = u[r, j].item() - 0.5
            x = m[r, j].item() / (2 * mx) + 0.5 + sigma / n if mx > 0 else 0.5 + sigma / n
            x = min(max(x, 0.0), 1.0)
            q = round(n * x) / n  # Python's round: half to even, as torch.round
            out[r, j] = 2 * mx * (q - 0.5)
    return out.reshape(g.shape)


@pytest.mark.parametrize("shape,bits,per_row", [((5, 7), 1, False), ((5, 7), 2, False), ((33,), 3, False),
                                                ((4, 3, 5), 6, True), ((6, 9), 8, True), ((10, 10), 16, False)])
def test_dorefa_matches_the_papers_equation(shape, bits, per_row):
    torch.manual_seed(20)
    g = torch.randn(shape, dtype=torch.float64)
    comp = gradcomp.get("dorefa", bits=bits, per_row=per_row)  # seed=None: torch's global generator
    torch.manual_seed(21)
    payload = comp.compress(g)
    torch.manual_seed(21)
    u = torch.rand(g.numel(), dtype=torch.float64)
    expected = dorefa_reference(g, bits, u, per_row)
    torch.testing.assert_close(comp.decompress([payload], like=g), expected, rtol=0, atol=1e-14)
    rows = shape[0] if per_row else 1
    assert payload.nbytes == math.ceil(g.numel() * bits / 8) + 4 * rows


def test_dorefa_is_unbiased_and_on_the_grid():
    torch.manual_seed(22)
    g = torch.randn(4, 25, dtype=torch.float64)
    comp = gradcomp.get("dorefa", bits=2, seed=5)
    state, total, trials = {}, torch.zeros_like(g), 4000
    m = g.abs().max().item()
    grid = torch.tensor([2 * m * (c / 3 - 0.5) for c in range(4)], dtype=torch.float64)
    for _ in range(trials):
        out = comp.decompress([comp.compress(g, state)], like=g)
        assert torch.isclose(out.unsqueeze(-1), grid, rtol=0, atol=1e-6 * m).any(-1).all()  # float32 scale
        total += out
    # each entry's error has standard deviation <= 2m/3 * 1/2: its mean over the trials within 5 sigma
    assert ((total / trials - g).abs() <= 5 * (m / 3) / math.sqrt(trials)).all()
    assert not comp.error_feedback


def test_dorefa_seeds_workers_and_sums_them():
    comp = gradcomp.get("dorefa", bits=4, seed=7)
    a, b = comp.for_rank(0), comp.for_rank(1)
    assert (a.seed, b.seed) == (7, 8)
    g = torch.randn(50, dtype=torch.float64)
    pa, pb = a.compress(g), b.compress(g)
    assert not torch.equal(pa.tensors[1], pb.tensors[1])
    assert torch.equal(a.compress(g).tensors[1], pa.tensors[1])  # state=None: step 0 every time
    torch.testing.assert_close(comp.decompress([pa, pb], like=g),
                               comp.decompress([pa], like=g) + comp.decompress([pb], like=g), rtol=0, atol=1e-14)


def test_dorefa_zero_and_half_tensors():
    comp = gradcomp.get("dorefa", bits=3, seed=0)
    z = torch.zeros(3, 4)
    assert torch.equal(comp.decompress([comp.compress(z)], like=z), z)
    h = torch.randn(3, 4).half()
    out = comp.decompress([comp.compress(h)], like=h)
    assert out.dtype == torch.float16 and (out.float().abs() <= h.float().abs().max() * (1 + 1e-3)).all()


def test_dorefa_rejects_bad_options_and_payloads():
    with pytest.raises(ValueError, match=r"dorefa\.bits must be in \[1, 16\], got 17"):
        gradcomp.get("dorefa", bits=17)
    with pytest.raises(ValueError, match=r"dorefa\.bits must be an integer >= 1, got 0"):
        gradcomp.get("dorefa", bits=0)
    with pytest.raises(ValueError, match=r"dorefa\.per_row must be True or False, got 1"):
        gradcomp.get("dorefa", per_row=1)
    with pytest.raises(ValueError, match=r"dorefa\.seed must be an integer >= 0, got -1"):
        gradcomp.get("dorefa", seed=-1)
    comp = gradcomp.get("dorefa", bits=3)
    g = torch.randn(6)
    p = comp.compress(g)
    with pytest.raises(ValueError, match="dorefa: corrupt payload: packed codes size must be 3, got 4"):
        comp.decompress([p.replace(p.tensors[0], torch.zeros(4, dtype=torch.uint8))], like=g)
    with pytest.raises(ValueError, match="dorefa: corrupt payload: scales size must be 1, got 2"):
        comp.decompress([p.replace(torch.ones(2), p.tensors[1])], like=g)


def test_dorefa_trains_in_the_simulator(digits):
    x, y = digits
    acc, sim = _train(x, y, gradcomp.get("dorefa", bits=4, seed=0))
    assert acc > 0.6
    assert sim.dense_bytes / max(sim.bytes_sent) > 7  # 4 bits of 32, plus a few scales
