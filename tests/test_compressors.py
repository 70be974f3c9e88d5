"""Properties every registered compressor must have, checked through the Method front (1-4 workers)."""

import copy
import io

import pytest
import torch

import gradcomp
from gradcomp import Method, NonFiniteGradientError
from gradcomp.compressors.base import Payload
from helpers import exchange_step

OPTIONS = {
    "topk": {"density": 0.05},
    "sampled-topk": {"density": 0.05},
    "randomk": {"density": 0.05},
    "threshold": {"tau": 0.5},
    "dryden": {"proportion": 0.05},
    "powersgd": {"rank": 2, "min_compression_rate": 1.0},
}
ALL = [name for name in gradcomp.available() if name != "dgc"]  # the compressors ("dgc" is the whole method)


def make(name):
    return gradcomp.get(name, **OPTIONS.get(name, {}))


def grads(seed, shapes=((40, 30), (30,), (8, 3, 3, 3))):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def test_registry_lists_the_mission():
    assert set(ALL) >= {"none", "fp16", "topk", "sampled-topk", "threshold", "dryden", "randomk", "onebit", "terngrad",
                        "qsgd", "powersgd", "adacomp", "dorefa"}
    with pytest.raises(ValueError, match="available: .*topk"):
        gradcomp.get("nope")
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        gradcomp.get("topk", bogus=1)


@pytest.mark.parametrize("name", ["topk", "sampled-topk", "randomk", "dgc"])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(name, density):
    with pytest.raises(ValueError, match="density must be in \\(0.0, 1.0\\]"):
        gradcomp.get(name, density=density)
    with pytest.raises(ValueError, match="DGC.density"):
        gradcomp.DGC(density=density)


@pytest.mark.parametrize("name", ALL)
def test_nbytes_counts_the_tensors_on_the_wire(name):
    c = make(name)
    x = torch.randn(64, 50)
    gen = c.exchange(x, {})
    p = next(gen)
    while True:
        assert isinstance(p, Payload)
        assert p.nbytes == sum(t.numel() * t.element_size() for t in p.tensors)
        try:
            p = gen.send([p] if p.op != "gather" else [p])
        except StopIteration as stop:
            assert stop.value.total.shape == x.shape
            break


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("workers", [1, 3])
def test_odd_inputs(name, workers):
    shapes = {"empty": (0, 5), "scalar": (), "one": (1,), "t": (7, 9), "bf16": (6, 10), "f16": (12,)}
    methods = [Method(make(name)) for _ in range(workers)]
    for step in range(2):
        per_worker = []
        for w in range(workers):
            g = torch.Generator().manual_seed(10 * step + w)
            gs = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
            gs["t"] = gs["t"].t()  # non-contiguous view
            gs["bf16"] = gs["bf16"].bfloat16()
            gs["f16"] = gs["f16"].half()
            per_worker.append(gs)
        avg, _ = exchange_step(methods, per_worker)
        for k in shapes:
            assert avg[k].shape == per_worker[0][k].shape
            assert torch.isfinite(avg[k]).all()


@pytest.mark.parametrize("name", ALL)
def test_non_finite_gradient_changes_no_memory(name):
    method = Method(make(name))
    exchange_step([method], [grads(0)])
    before = copy.deepcopy(method.state_dict())
    bad = grads(1)
    bad["p0"][3, 4] = float("nan")
    bad["p2"].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="p0, p2"):
        exchange_step([method], [bad])
    after = method.state_dict()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_finite_check_is_exact_for_large_finite_and_half_precision_values():
    from gradcomp.guard import non_finite

    big = torch.full((10,), 3e38)  # finite, but its float32 sum overflows to inf
    half = torch.full((100,), 60000.0, dtype=torch.float16)  # finite, its fp16 sum overflows
    assert non_finite({"big": big, "half": half, "empty": torch.zeros(0)}) == []
    assert torch.isinf(big.sum()) and torch.isinf(half.sum())  # the fast path really was not enough
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = big.clone()
        bad[7] = value
        assert non_finite({"big": big, "bad": bad, "half": half}) == ["bad"]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ALL + ["DGC"])
def test_state_dict_round_trip_continues_identically(name):
    def build():
        return gradcomp.DGC(density=0.05, min_numel=100, warmup_epochs=1, steps_per_epoch=4) if name == "DGC" \
            else Method(make(name))

    torch.manual_seed(0)
    a = [build() for _ in range(2)]
    for step in range(3):
        exchange_step(a, [grads(2 * step), grads(2 * step + 1)])
    b = [build() for _ in range(2)]
    for mb, ma in zip(b, a):
        mb.load_state_dict(_roundtrip(ma.state_dict()))
    torch.manual_seed(1)
    out_a, _ = exchange_step(a, [grads(10), grads(11)])
    torch.manual_seed(1)
    out_b, _ = exchange_step(b, [grads(10), grads(11)])
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k
    torch.testing.assert_close(_roundtrip(a[0].state_dict()), _roundtrip(b[0].state_dict()), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["topk", "sampled-topk", "threshold", "onebit"])
def test_error_feedback_conserves(name):
    """After T steps: what was sent + what stays in memory == what entered (float64)."""
    method = Method(make(name))
    entered = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in grads(0).items()}
    sent = {k: torch.zeros_like(v) for k, v in entered.items()}
    for step in range(25):
        g = {k: v.double() for k, v in grads(step).items()}
        avg, _ = exchange_step([method], [g])
        for k in g:
            entered[k] += g[k]
            sent[k] += avg[k]
    for k in entered:
        kept = method.memory.residuals[k]
        torch.testing.assert_close(sent[k] + kept, entered[k], rtol=0, atol=1e-10)
        assert kept.abs().sum() > 0  # something really stayed behind
