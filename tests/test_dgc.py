"""DGC's memory, masking, clipping and warm-up against float64 recomputations of the paper's equations."""

import math

import numpy as np
import pytest
import torch

from gradcomp import DGC, LinearLRWarmup, SparsityWarmup
from helpers import compact_nbytes, exchange_step


def worker_grads(step, workers, shapes):
    out = []
    for w in range(workers):
        g = torch.Generator().manual_seed(1000 * step + w)
        out.append({k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()})
    return out


def to_wire_half(values):
    """The compact wire's values: float16 after a power-of-two scale that puts max |value| in [2**14, 2**15)."""
    peak = float(values.abs().max())
    if peak == 0:
        return values.clone()
    scale = 2.0 ** (math.floor(math.log2(peak)) - 14)
    # float64 -> float32 -> float16, as torch converts (a float32 accumulator, the usual case, rounds once)
    return torch.from_numpy((values.numpy() / scale).astype(np.float32).astype(np.float16).astype(np.float64) * scale)


def reference_dgc(grads_by_step, density, m, nesterov, masking, clip=None, wire="plain", sparsify_all=False,
                  shared=False):
    """Lin et al. 2018, written out independently: per worker u, v; exact top-k; dense tensors momentum after mean.

    ``wire="compact"`` sends the values rounded to float16 (scaled) and keeps the rounding error in v.
    ``shared``: at step s every worker sends its v at worker (s mod N)'s top-k indices."""
    workers = len(grads_by_step[0])
    u = [{} for _ in range(workers)]
    v = [{} for _ in range(workers)]
    buf = {}
    outputs = []
    for step, grads in enumerate(grads_by_step):
        if clip is not None:
            grads = [dict(g) for g in grads]
            for g in grads:
                # the paper's terms: node k's share of the summed gradient is G_k = g_k / N, and each
                # share is clipped at clip * N^-1/2 (torch's clip_grad_norm_ epsilon)
                share_norm = math.sqrt(sum(float((t / workers).pow(2).sum()) for t in g.values()))
                coef = clip * workers**-0.5 / (share_norm + 1e-6)
                if coef < 1:
                    for k in g:
                        g[k] = g[k] * coef
        out = {}
        for name in grads[0]:
            if grads[0][name].dim() <= 1 and not sparsify_all:
                mean = sum(g[name] for g in grads) / workers
                b = buf[name] = mean.clone() if name not in buf else m * buf[name] + mean
                out[name] = mean + m * b if nesterov else b.clone()
                continue
            total = torch.zeros_like(grads[0][name])
            accumulated = []
            for w, g in enumerate(grads):
                uu = u[w].get(name, torch.zeros_like(g[name]))
                vv = v[w].get(name, torch.zeros_like(g[name]))
                if nesterov:
                    uu = m * (uu + g[name])
                    vv = vv + uu + g[name]
                else:
                    uu = m * uu + g[name]
                    vv = vv + uu
                accumulated.append((uu, vv))
            k = math.ceil(density * grads[0][name].numel())
            top = [torch.argsort(vv.abs().view(-1), descending=True)[:k] for _, vv in accumulated]
            for w, (g, (uu, vv)) in enumerate(zip(grads, accumulated)):
                idx = top[step % workers] if shared else top[w]
                sent = torch.zeros_like(vv).view(-1)
                sent[idx] = vv.view(-1)[idx] if wire == "plain" else to_wire_half(vv.view(-1)[idx])
                total += sent.view_as(vv)
                vv = vv.clone().view(-1)
                vv[idx] -= sent[idx]  # plain: 0; compact: the rounding error stays
                uu = uu.clone().view(-1)
                if masking:
                    uu[idx] = 0
                u[w][name], v[w][name] = uu.view_as(g[name]), vv.view_as(g[name])
            out[name] = total / workers
        outputs.append(out)
    return outputs


SHAPES = {"w1": (30, 40), "b1": (30,), "w2": (10, 30, 2, 2)}


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("masking", [False, True])
@pytest.mark.parametrize("clip", [None, 5.0, 20.0])
def test_dgc_matches_the_papers_equations(nesterov, masking, clip):
    steps, workers, density = 12, 3, 0.02
    grads = [worker_grads(s, workers, SHAPES) for s in range(steps)]
    expected = reference_dgc(grads, density, 0.9, nesterov, masking, clip)
    methods = [DGC(density=density, nesterov=nesterov, momentum_masking=masking, clip_norm=clip,
                   sample_ratio=1.0, warmup_epochs=0, min_numel=100, wire="plain") for _ in range(workers)]
    for step in range(steps):
        out, _ = exchange_step(methods, grads[step])
        for name in SHAPES:
            torch.testing.assert_close(out[name], expected[step][name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("sparsify_all", [False, True])
def test_dgc_compact_wire_keeps_the_float16_rounding_in_the_accumulator(nesterov, sparsify_all):
    steps, workers, density = 12, 3, 0.02
    grads = [worker_grads(s, workers, SHAPES) for s in range(steps)]
    expected = reference_dgc(grads, density, 0.9, nesterov, True, wire="compact", sparsify_all=sparsify_all)
    methods = [DGC(density=density, nesterov=nesterov, sample_ratio=1.0, warmup_epochs=0, min_numel=100,
                   wire="compact", sparsify_all=sparsify_all) for _ in range(workers)]
    for step in range(steps):
        out, sent = exchange_step(methods, grads[step])
        for name in SHAPES:
            torch.testing.assert_close(out[name], expected[step][name], rtol=1e-10, atol=1e-12)
    # the compact wire per sparsified tensor; the 1-D one dense in float64 unless sparsify_all
    per_worker = sum(8 * math.prod(shape) if len(shape) == 1 and not sparsify_all
                     else compact_nbytes(math.prod(shape), math.ceil(density * math.prod(shape)))
                     for shape in SHAPES.values())
    assert sent == [per_worker] * workers


def test_dgc_without_momentum_conserves_the_gradient():
    """momentum=0: every gradient entry is sent eventually; sent + v == sum of g."""
    method = DGC(density=0.01, momentum=0.0, warmup_epochs=0, min_numel=100)
    entered = torch.zeros(30, 40, dtype=torch.float64)
    sent = torch.zeros_like(entered)
    for step in range(30):
        g = worker_grads(step, 1, {"w": (30, 40)})[0]
        out, _ = exchange_step([method], [g])
        entered += g["w"]
        sent += out["w"]
    torch.testing.assert_close(sent + method.memory.v["w"], entered, rtol=0, atol=1e-10)


def test_ablation_switches():
    g = [{"w": torch.arange(1.0, 2001.0, dtype=torch.float64).view(40, 50)}]
    naive = DGC(density=0.01, momentum=0.9, accumulate=False, momentum_correction=False, warmup_epochs=0,
                min_numel=100)
    out, _ = exchange_step([naive], g)
    assert naive.memory.v == {} and naive.memory.u == {}  # nothing kept: small gradients are dropped
    assert int((out["w"] != 0).sum()) == 20
    # without momentum correction the momentum acts after averaging (ordinary momentum on the sparse mean)
    accum = DGC(density=0.01, momentum=0.9, momentum_correction=False, warmup_epochs=0, min_numel=100)
    first, _ = exchange_step([accum], g)
    second, _ = exchange_step([accum], g)
    assert accum.memory.u == {}
    sparse_second = torch.zeros(2000, dtype=torch.float64)
    v = g[0]["w"].view(-1).clone()
    v[first["w"].view(-1) != 0] = 0
    v += g[0]["w"].view(-1)
    top = torch.argsort(v.abs(), descending=True)[:20]
    sparse_second[top] = v[top]
    torch.testing.assert_close(second["w"].view(-1), 0.9 * first["w"].view(-1) + sparse_second)


def test_warmup_density_follows_the_paper():
    w = SparsityWarmup(final_density=0.001)
    assert [w.density(e) for e in (0, 1, 2, 3, 3.99, 4, 100)] == [
        0.25, 0.0625, 0.015625, 0.00390625, 0.00390625, 0.001, 0.001]
    assert SparsityWarmup(final_density=0.001, warmup_epochs=0).density(0) == 0.001
    assert w.mean_density(8) == pytest.approx((0.25 + 0.0625 + 0.015625 + 0.00390625 + 4 * 0.001) / 8, rel=1e-3)
    with pytest.raises(ValueError, match="SparsityWarmup.final_density"):
        SparsityWarmup(final_density=2)


def test_dgc_sends_the_warmup_density():
    per_entry = 8 + 4  # plain wire: a float64 value and an int32 index
    k = [math.ceil(d * 10_000) for d in (0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.00390625, 0.00390625,
                                         0.001, 0.001)]
    method2 = DGC(density=0.001, warmup_epochs=4, steps_per_epoch=2, min_numel=100, wire="plain")
    sizes = [exchange_step([method2], worker_grads(s, 1, {"w": (100, 100)}))[1][0] for s in range(10)]
    assert sizes == [kk * per_entry for kk in k]
    assert method2.epoch == pytest.approx(5.0)


def test_min_entries_sends_at_least_that_many_of_every_tensor_all_of_a_smaller_one():
    method = DGC(density=0.001, warmup_epochs=0, sparsify_all=True, min_entries=32, wire="plain")
    shapes = {"big": (100, 1_000), "head": (10, 256), "bias": (7,)}
    sizes = exchange_step([method], worker_grads(0, 1, shapes))[1][0]
    per_entry = 8 + 4  # plain wire: a float64 value and an int32 index
    assert sizes == (100 + 32 + 7) * per_entry  # ceil(0.001 * 100,000) = 100; 3 -> 32; 1 -> all 7
    # the ranks' settings check sees it
    assert DGC(min_entries=32).config()["min_entries"] == 32


def test_lr_warmup():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    warm = LinearLRWarmup(warmup_epochs=4, start_factor=0.25)
    lrs = []
    for e in (0, 1, 2, 4, 9):
        warm.apply(opt, e)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.175, 0.25, 0.4, 0.4])
    other = LinearLRWarmup()
    other.load_state_dict(torch.load(_save(warm.state_dict()), weights_only=True))
    assert other == warm
    with pytest.raises(ValueError, match="LinearLRWarmup.start_factor"):
        LinearLRWarmup(start_factor=0)


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_dgc_bad_values_name_the_field():
    for kwargs, field in [({"momentum": 1.0}, "momentum"), ({"sample_ratio": 0}, "sample_ratio"),
                          ({"clip_norm": -1.0}, "clip_norm"), ({"min_numel": 0}, "min_numel"),
                          ({"warmup_epochs": -1}, "warmup_epochs"), ({"momentum": 0.0, "nesterov": True}, "nesterov"),
                          ({"aggregate": "allreduce"}, "aggregate"), ({"min_entries": 0}, "min_entries"),
                          ({"min_entries": 2.5}, "min_entries")]:
        with pytest.raises(ValueError, match=f"DGC.{field}"):
            DGC(**kwargs)
    with pytest.raises(ValueError, match="DGC.epoch"):
        DGC().set_epoch(-1)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_dgc_shared_aggregation_sends_every_worker_at_the_leaders_indices(workers):
    """aggregate="shared": worker (step mod N) picks the indices, every worker's v there is summed exactly;
    each sends the leader's index code and its values, whatever the number of workers."""
    steps, density = 9, 0.02
    grads = [worker_grads(s, workers, SHAPES) for s in range(steps)]
    expected = reference_dgc(grads, density, 0.9, False, True, shared=True)
    methods = [DGC(density=density, sample_ratio=1.0, warmup_epochs=0, min_numel=100,
                   aggregate="shared").for_rank(w) for w in range(workers)]
    for step in range(steps):
        out, sent = exchange_step(methods, grads[step])
        for name in SHAPES:
            torch.testing.assert_close(out[name], expected[step][name], rtol=1e-10, atol=1e-12)
    per_worker = 0
    for shape in SHAPES.values():
        n = math.prod(shape)
        if len(shape) == 1:
            per_worker += 8 * n  # dense, float64
        else:
            k = math.ceil(density * n)
            per_worker += compact_nbytes(n, k) - 2 * k - 4 + 8 * k  # the index code, then float64 values
    assert sent == [per_worker] * workers


def test_dgc_shared_aggregation_rejects_two_leaders():
    """Ranks that disagree on whose turn it is (a rank's step count off) get an error, not a silent mix."""
    methods = [DGC(density=0.02, sample_ratio=1.0, warmup_epochs=0, min_numel=100, aggregate="shared").for_rank(w)
               for w in range(2)]
    methods[1].steps = 1  # both lead
    with pytest.raises(ValueError, match="corrupt index code"):
        exchange_step(methods, worker_grads(0, 2, {"w": (30, 40)}))
