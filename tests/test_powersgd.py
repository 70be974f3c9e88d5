"""PowerSGD against independent references: SVD, plain matrix formulas, float64 sums."""

from __future__ import annotations

import io

import pytest
import torch

from gradcomp.compressors.base import Exchanged, Payload
from gradcomp.compressors.powersgd import PowerSGD

# ------------------------------------------------------------------ helpers


def combine(payloads: list[Payload]) -> Payload:
    """What an all-reduce / all-gather delivers for one round."""
    op = payloads[0].op
    assert all(p.op == op for p in payloads)
    if op == "gather":
        raise AssertionError("powersgd only uses 'sum' rounds")
    tensors = []
    for i in range(len(payloads[0].tensors)):
        stacked = torch.stack([p.tensors[i] for p in payloads])
        tensors.append(stacked.sum(0) if op == "sum" else stacked.amax(0))
    return payloads[0].replace(*tensors)


def run_workers(c: PowerSGD, tensors: list[torch.Tensor], states: list[dict] | None = None):
    """Drive one exchange per worker in lockstep; returns (results, rounds) where rounds[k] lists the
    payloads every worker yielded in round k."""
    if states is None:
        states = [{} for _ in tensors]
    gens = [c.exchange(t, s) for t, s in zip(tensors, states)]
    payloads = [next(g) for g in gens]
    rounds = []
    results: list[Exchanged | None] = [None] * len(gens)
    while True:
        rounds.append(payloads)
        combined = combine(payloads)
        nxt = []
        for i, g in enumerate(gens):
            try:
                nxt.append(g.send([combined]))
            except StopIteration as stop:
                results[i] = stop.value
        if len(nxt) == 0:
            break
        assert len(nxt) == len(gens), "workers went out of lockstep"
        payloads = nxt
    return results, rounds


def exchange1(c, t, state=None):
    (res,), rounds = run_workers(c, [t], [state if state is not None else {}])
    return res, rounds


def best_rank_error(m: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return float(s[r:].pow(2).sum().sqrt())


def low_rank(n, m, r, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, r, generator=g, dtype=torch.float64)
            @ torch.randn(r, m, generator=g, dtype=torch.float64)).to(dtype)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------ options


def test_registered_and_defaults():
    import gradcomp.compressors as comps

    c = comps.get("powersgd", rank=2)
    assert isinstance(c, PowerSGD) and c.rank == 2
    assert PowerSGD.error_feedback is True
    d = PowerSGD()
    assert (d.rank, d.min_compression_rate, d.warm_start, d.seed) == (1, 2.0, True, 0)


@pytest.mark.parametrize(
    "field,value",
    [("rank", 0), ("rank", -1), ("rank", 1.5), ("rank", True),
     ("min_compression_rate", 0.5), ("min_compression_rate", float("nan")), ("min_compression_rate", "2"),
     ("warm_start", 1), ("seed", -1), ("seed", 0.5)],
)
def test_invalid_options(field, value):
    with pytest.raises(ValueError, match=field):
        PowerSGD(**{field: value})


# ------------------------------------------------------------------ accuracy


def test_rank_r_matrix_exact_after_one_step():
    for r in (1, 2, 3):
        m = low_rank(64, 40, r, seed=r)
        res, rounds = exchange1(PowerSGD(rank=r), m)
        assert len(rounds) == 2
        torch.testing.assert_close(res.total, m, rtol=1e-5, atol=1e-5 * float(m.abs().max()))


def test_error_shrinks_with_rank():
    m = rand(64, 48, seed=3)
    errors = []
    for r in (1, 2, 4, 8):
        res, _ = exchange1(PowerSGD(rank=r), m)
        err = float(torch.linalg.matrix_norm(m - res.total))
        # a projection onto span(P^): never worse than the best rank-r error, never above ||M||
        assert best_rank_error(m, r) - 1e-4 <= err <= float(torch.linalg.matrix_norm(m)) + 1e-4
        errors.append(err)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] * 0.95, errors


@pytest.mark.parametrize("r", [1, 4])
def test_warm_start_converges_to_best_rank_r(r):
    # a spectrum with gaps so subspace iteration converges quickly
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(60, 30, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(50, 30, generator=g, dtype=torch.float64))
    s = 0.8 ** torch.arange(30, dtype=torch.float64)
    m = (u * s) @ v.T
    c, state = PowerSGD(rank=r), {}
    for _ in range(20):
        res, _ = exchange1(c, m, state)
    err = float(torch.linalg.matrix_norm(m - res.total))
    best = best_rank_error(m, r)
    assert best <= err * (1 + 1e-9) and err <= best * 1.01, (err, best)


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_warm_start_on_gaussian_matrix_reaches_svd_error(r):
    m = rand(64, 48, seed=11)
    c, state = PowerSGD(rank=r), {}
    errors = []
    for _ in range(20):
        res, _ = exchange1(c, m, state)
        errors.append(float(torch.linalg.matrix_norm(m - res.total)))
    best = best_rank_error(m, r)
    assert errors[-1] <= best * 1.01, (errors[-1], best)
    assert errors[-1] <= errors[0] * (1 + 1e-6)


def test_without_warm_start_each_step_draws_a_new_q():
    m = rand(40, 30, seed=1)
    c, state = PowerSGD(rank=1, warm_start=False), {}
    first, _ = exchange1(c, m, state)
    second, _ = exchange1(c, m, state)
    assert set(state) == {"step"} and int(state["step"]) == 2
    assert not torch.allclose(first.total, second.total)
    # same step counter -> same draw (every rank draws the same Q)
    again, _ = exchange1(c, m, {})
    torch.testing.assert_close(again.total, first.total, rtol=0, atol=0)


# ------------------------------------------------------------------ multi-worker


def test_three_workers_match_formulas():
    r, workers = 2, 3
    ms = [rand(32, 24, seed=10 + w, dtype=torch.float64) for w in range(workers)]
    c = PowerSGD(rank=r, seed=5)
    results, rounds = run_workers(c, ms)
    assert len(rounds) == 2 and all(p.op == "sum" for rnd in rounds for p in rnd)

    # independent recomputation: the seeded initial Q, then Algorithm 1 by hand
    q0 = torch.randn(24, r, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p_sum = sum(m @ q0 for m in ms)
    torch.testing.assert_close(sum(p.tensors[0] for p in rounds[0]), p_sum)
    p_hat = results[0].sent.tensors[0]
    # P^ has orthonormal columns spanning sum_w P_w
    torch.testing.assert_close(p_hat.T @ p_hat, torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(p_hat @ (p_hat.T @ p_sum), p_sum)
    q_locals = [m.T @ p_hat for m in ms]
    expected = p_hat @ sum(q_locals).T
    for w, res in enumerate(results):
        torch.testing.assert_close(res.total, expected)
        torch.testing.assert_close(res.sent.tensors[0], p_hat)  # identical on every rank
        torch.testing.assert_close(res.sent.tensors[1], q_locals[w])
    # the total is the projection of the summed gradient onto span(P^)
    total_m = sum(ms)
    torch.testing.assert_close(expected, p_hat @ p_hat.T @ total_m)
    # linearity: the workers' own decodes sum to the total
    decoded = sum(c.decompress([res.sent], like=ms[0]) for res in results)
    torch.testing.assert_close(decoded, results[0].total)
    torch.testing.assert_close(c.decompress([res.sent for res in results], like=ms[0]), results[0].total)


def test_error_feedback_conserves_mass():
    workers, steps = 3, 6
    shapes = [(24, 18), (20,), (8, 3, 2, 2), (3, 2)]
    c = PowerSGD(rank=2)
    states = [[{} for _ in shapes] for _ in range(workers)]
    errors = [[torch.zeros(s, dtype=torch.float64) for s in shapes] for _ in range(workers)]
    sent_sum = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    total_sum = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    input_sum = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for step in range(steps):
        for k, shape in enumerate(shapes):
            accs = []
            for w in range(workers):
                g = rand(*shape, seed=1000 * step + 10 * w + k, dtype=torch.float64)
                input_sum[k] += g
                accs.append(g + errors[w][k])
            results, _ = run_workers(c, accs, [states[w][k] for w in range(workers)])
            total_sum[k] += results[0].total
            for w, res in enumerate(results):
                decoded = c.decompress([res.sent], like=accs[w])
                sent_sum[k] += decoded
                errors[w][k] = accs[w] - decoded
                # the base-class helper does the same subtraction in place
                acc = accs[w].clone()
                c.subtract_sent(acc, res.sent)
                torch.testing.assert_close(acc, errors[w][k])
    for k in range(len(shapes)):
        residual = sum(errors[w][k] for w in range(workers))
        torch.testing.assert_close(sent_sum[k] + residual, input_sum[k], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(total_sum[k], sent_sum[k], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ bytes


def test_payload_bytes():
    n, m, r = 64, 40, 3
    c = PowerSGD(rank=r)
    res, rounds = exchange1(c, rand(n, m))
    assert [p.nbytes for rnd in rounds for p in rnd] == [n * r * 4, m * r * 4]
    assert sum(p.nbytes for rnd in rounds for p in rnd) == (n * r + m * r) * 4 == res.sent.nbytes
    # conv kernel: n = out channels, m = the rest
    res, rounds = exchange1(c, rand(16, 8, 3, 3, dtype=torch.float64))
    assert sum(p.nbytes for rnd in rounds for p in rnd) == (16 * r + 72 * r) * 8
    # dense: a bias, and a small matrix failing min_compression_rate ((6+5)*3*2 = 66 > 30)
    for t in (rand(100), rand(6, 5), rand(6, 5, dtype=torch.float16)):
        res, rounds = exchange1(c, t)
        assert len(rounds) == 1
        assert rounds[0][0].nbytes == t.numel() * t.element_size() == res.sent.nbytes
        torch.testing.assert_close(res.total, t, rtol=0, atol=0)


def test_min_compression_rate_boundary():
    # numel / ((n + m) * r) = 400 / 40 = 10
    t = rand(20, 20)
    assert PowerSGD(rank=1, min_compression_rate=10.0).matrix_shape(t) == (20, 20)
    assert PowerSGD(rank=1, min_compression_rate=10.5).matrix_shape(t) is None
    assert PowerSGD(rank=1).matrix_shape(rand(5, 4, 3)) == (5, 12)


# ------------------------------------------------------------------ state


def test_state_round_trip_gives_identical_next_step():
    c = PowerSGD(rank=2)
    ms = [rand(30, 20, seed=s) for s in range(3)]
    state = {}
    exchange1(c, ms[0], state)
    assert set(state) == {"q"} and all(isinstance(v, torch.Tensor) for v in state.values())
    assert torch.isfinite(state["q"]).all() and state["q"].shape == (20, 2)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    a, _ = exchange1(c, ms[1], state)
    b, _ = exchange1(c, ms[1], loaded)
    torch.testing.assert_close(a.total, b.total, rtol=0, atol=0)
    torch.testing.assert_close(state["q"], loaded["q"], rtol=0, atol=0)

    c2 = PowerSGD(rank=2, warm_start=False)
    s2 = {}
    exchange1(c2, ms[0], s2)
    buf = io.BytesIO()
    torch.save(s2, buf)
    buf.seek(0)
    l2 = torch.load(buf, weights_only=True)
    a, _ = exchange1(c2, ms[2], s2)
    b, _ = exchange1(c2, ms[2], l2)
    torch.testing.assert_close(a.total, b.total, rtol=0, atol=0)


def test_warm_start_uses_state_and_dense_leaves_it_alone():
    c = PowerSGD(rank=1)
    m = rand(30, 20)
    state = {}
    first, _ = exchange1(c, m, state)
    second, _ = exchange1(c, m, state)
    # power iteration on the same matrix: the second step is at least as good
    assert torch.linalg.matrix_norm(m - second.total) <= torch.linalg.matrix_norm(m - first.total) * (1 + 1e-6)
    dense_state = {}
    exchange1(c, rand(7), dense_state)
    assert dense_state == {}
    # a stored Q of the wrong shape (rank changed) is replaced by a fresh draw
    bad = {"q": torch.ones(3, 3)}
    res, _ = exchange1(c, m, bad)
    ref, _ = exchange1(c, m, {})
    torch.testing.assert_close(res.total, ref.total, rtol=0, atol=0)


# ------------------------------------------------------------------ odd inputs


@pytest.mark.parametrize(
    "t",
    [torch.tensor(3.5), torch.tensor([2.0]), torch.empty(0), torch.empty(0, 5), torch.empty(4, 0),
     torch.ones(1, 1)],
    ids=["0d", "1elem", "empty", "empty-rows", "empty-cols", "1x1"],
)
def test_odd_shapes_go_dense(t):
    c = PowerSGD()
    results, rounds = run_workers(c, [t, 2 * t])
    assert len(rounds) == 1
    for res in results:
        assert res.total.shape == t.shape and res.total.dtype == t.dtype
        torch.testing.assert_close(res.total, 3 * t)
    torch.testing.assert_close(c.decompress([results[0].sent], like=t), t)


def test_non_contiguous_view():
    base = low_rank(40, 64, 2, seed=4)
    t = base.T  # (64, 40), not contiguous
    assert not t.is_contiguous()
    res, _ = exchange1(PowerSGD(rank=2), t)
    torch.testing.assert_close(res.total, t, rtol=1e-5, atol=1e-4)
    sliced = rand(64, 80)[:, ::2]
    res, _ = exchange1(PowerSGD(rank=2), sliced)
    ref, _ = exchange1(PowerSGD(rank=2), sliced.contiguous())
    torch.testing.assert_close(res.total, ref.total)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    m = low_rank(48, 32, 1, seed=2).to(dtype)
    c, state = PowerSGD(rank=1), {}
    res, rounds = exchange1(c, m, state)
    assert res.total.dtype == dtype and res.total.shape == m.shape
    assert all(p.tensors[0].dtype == torch.float32 for rnd in rounds for p in rnd)
    assert state["q"].dtype == torch.float32
    ref = m.float()
    tol = 2e-2 * float(ref.abs().max())
    torch.testing.assert_close(res.total.float(), ref, rtol=0, atol=tol)
    decoded = c.decompress([res.sent], like=m)
    assert decoded.dtype == dtype


def test_zero_and_rank_deficient_inputs_stay_finite():
    c = PowerSGD(rank=3)
    state = {}
    z = torch.zeros(30, 20)
    res, _ = exchange1(c, z, state)
    assert torch.equal(res.total, z)
    assert torch.isfinite(state["q"]).all() and torch.isfinite(res.sent.tensors[0]).all()
    # next step: a rank-1 matrix with rank-3 compression still works and is exact
    m = low_rank(30, 20, 1, seed=9)
    for _ in range(2):
        res, _ = exchange1(c, m, state)
        assert torch.isfinite(res.total).all()
    torch.testing.assert_close(res.total, m, rtol=1e-4, atol=1e-4)
    # a non-finite step does not poison the warm-start factor
    bad = m.clone()
    bad[0, 0] = float("inf")
    exchange1(c, bad, state)
    assert torch.isfinite(state["q"]).all()
    res, _ = exchange1(c, m, state)
    assert torch.isfinite(res.total).all()


def test_standalone_compress_and_decompress():
    c = PowerSGD(rank=2)
    m = rand(30, 20)
    state = {}
    p = c.compress(m, state)
    assert state == {}  # compress alone changes no state
    first, rounds = exchange1(c, m, {})
    torch.testing.assert_close(p.tensors[0], rounds[0][0].tensors[0], rtol=0, atol=0)
    assert p.nbytes == 30 * 2 * 4
    with pytest.raises(NotImplementedError, match="exchange"):
        c.decompress([p], like=m)
    # dense tensors need one round: compress + decompress work alone
    b = rand(9)
    torch.testing.assert_close(c.decompress([c.compress(b)], like=b), b, rtol=0, atol=0)


def test_total_is_a_fresh_tensor():
    # callers divide ``total`` in place; it must not alias the input or the shared combined payload
    c = PowerSGD(rank=1)
    for t in (rand(10), rand(30, 20)):
        gens = [c.exchange(t, {}) for _ in range(2)]
        payloads = [next(g) for g in gens]
        results = [None, None]
        while any(r is None for r in results):
            combined = combine(payloads)
            nxt = []
            for i, g in enumerate(gens):
                try:
                    nxt.append(g.send([combined]))
                except StopIteration as stop:
                    results[i] = stop.value
                    stop.value.total.div_(2)  # as a front door does, before the next worker finishes
            payloads = nxt
        torch.testing.assert_close(results[0].total, results[1].total, rtol=0, atol=0)
        torch.testing.assert_close(results[0].total, exchange1(c, t)[0].total)
