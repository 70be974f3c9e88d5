"""Real multi-process training with gloo: the hook and DistributedOptimizer against DDP and the simulator."""

import pytest
import torch

import gradcomp
from conftest import batches, ce, mlp
from dist_workers import build_method, digits64
from gradcomp.launch import WorkerError, spawn

STEPS = 20
DGC_SPARSE = ("DGC", {"density": 0.001, "warmup_epochs": 1, "steps_per_epoch": 8})
# local clipping waits for every bucket (the global norm) before any is compressed: the hook's deferred path
# one rank per step picks the indices for all (the ranks' own selections differ: the real path must follow rank order)
DGC_SHARED = ("DGC", {"density": 0.01, "aggregate": "shared", "warmup_epochs": 0})
DGC_CLIP = ("DGC", {"density": 0.01, "clip_norm": 0.05, "warmup_epochs": 1, "steps_per_epoch": 8})
COMPRESSORS = [name for name in gradcomp.available() if name != "dgc"]  # DGC itself: the DGC_* runs
EACH = {"sampled-topk": {"density": 0.01}, "topk": {"density": 0.01}, "randomk": {"density": 0.05, "seed": 2},
        "terngrad": {"seed": 3}, "qsgd": {"seed": 4, "levels": 4}, "threshold": {"tau": 0.005},
        "dryden": {"proportion": 0.02}, "powersgd": {"rank": 2}, "adacomp": {"bin_size": 50},
        "dorefa": {"bits": 4, "seed": 5}}


def simulate(spec, workers, steps=STEPS, momentum=0.0, lr=0.1):
    x, y = digits64()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    sim = gradcomp.Simulator(model, build_method(spec), workers, optimizer=opt)
    for xb, yb in batches(x, y, 64, steps):
        sim.step(gradcomp.split_batch((xb, yb), workers), ce)
    return {n: p.detach() for n, p in model.named_parameters()}, sim


def assert_close(a, b, tol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module", params=[2, 4])
def runs(request):
    world = request.param
    plan = {
        "ddp": dict(front="ddp", spec=None, steps=STEPS, momentum=0.0),
        "none": dict(front="hook", spec=("none", {}), steps=STEPS, momentum=0.0),
        "ddp_momentum": dict(front="ddp", spec=None, steps=STEPS, momentum=0.9),
        "dgc_dense": dict(front="hook", spec=("DGC", {"density": 1.0, "momentum_masking": False, "wire": "plain"}),
                          steps=STEPS, momentum=0.0),
        "dgc_hook": dict(front="hook", spec=DGC_SPARSE, steps=STEPS, momentum=0.0),
        "dgc_hook_again": dict(front="hook", spec=DGC_SPARSE, steps=STEPS, momentum=0.0),
        "dgc_optim": dict(front="optim", spec=DGC_SPARSE, steps=STEPS, momentum=0.0),
        "shared_hook": dict(front="hook", spec=DGC_SHARED, steps=10, momentum=0.0),
        "clip_hook": dict(front="hook", spec=DGC_CLIP, steps=10, momentum=0.0),
        "clip_optim": dict(front="optim", spec=DGC_CLIP, steps=10, momentum=0.0),
        "psgd_hook": dict(front="hook", spec=("powersgd", {"rank": 2}), steps=10, momentum=0.9),
        "psgd_hook_again": dict(front="hook", spec=("powersgd", {"rank": 2}), steps=10, momentum=0.9),
        "psgd_optim": dict(front="optim", spec=("powersgd", {"rank": 2}), steps=10, momentum=0.9),
        "tern_hook": dict(front="hook", spec=("terngrad", {"seed": 1}), steps=10, momentum=0.9),
        "tern_optim": dict(front="optim", spec=("terngrad", {"seed": 1}), steps=10, momentum=0.9),
        "thr_hook": dict(front="hook", spec=("threshold", {"tau": 0.01}), steps=10, momentum=0.0),
        "thr_optim": dict(front="optim", spec=("threshold", {"tau": 0.01}), steps=10, momentum=0.0),
        "none_accumulate": dict(front="optim", spec=("none", {}), steps=STEPS, momentum=0.0, accumulate=2),
        **{f"each_{name}": dict(front="hook", spec=(name, EACH.get(name, {})), steps=5, momentum=0.9)
           for name in COMPRESSORS},
    }
    from dist_workers import run_all

    results = spawn(run_all, world, list(plan.values()), timeout_s=240)
    return world, {name: [r[i] for r in results] for i, name in enumerate(plan)}


def test_every_rank_holds_the_same_parameters(runs):
    _, out = runs
    for per_rank in out.values():
        for other in per_rank[1:]:
            assert_close(other["params"], per_rank[0]["params"], 0.0)


def test_the_hook_is_bit_reproducible(runs):
    """The same run twice (same seed, fresh model and method) ends with identical bits: DGC and gradcomp's
    PowerSGD (PyTorch's own powerSGD_hook is not, which `gradcomp bench network` reports)."""
    _, out = runs
    for name in ("dgc_hook", "psgd_hook"):
        assert_close(out[f"{name}_again"][0]["params"], out[name][0]["params"], 0.0)
        assert any(not torch.equal(p, q) for p, q in zip(out[name][0]["params"].values(),
                                                         out["ddp"][0]["params"].values()))  # it did train


def test_none_hook_equals_plain_ddp(runs):
    _, out = runs
    assert_close(out["none"][0]["params"], out["ddp"][0]["params"], 1e-6)


def test_dgc_dense_without_masking_equals_ddp_with_momentum_sgd(runs):
    _, out = runs
    assert_close(out["dgc_dense"][0]["params"], out["ddp_momentum"][0]["params"], 1e-6)


def test_dgc_sparse_real_run_equals_the_simulator(runs):
    world, out = runs
    expected, sim = simulate(DGC_SPARSE, world)
    assert_close(out["dgc_hook"][0]["params"], expected, 1e-5)
    assert out["dgc_hook"][0]["bytes"] == sim.bytes_sent[0]


def test_dgc_shared_aggregation_real_run_equals_the_simulator(runs):
    world, out = runs
    expected, sim = simulate(DGC_SHARED, world, steps=10)
    assert_close(out["shared_hook"][0]["params"], expected, 1e-5)
    assert out["shared_hook"][0]["bytes"] == sim.bytes_sent[0]


def test_dgc_with_local_clipping_through_the_hook_equals_the_simulator(runs):
    world, out = runs
    expected, sim = simulate(DGC_CLIP, world, steps=10)
    unclipped, _ = simulate(("DGC", {**DGC_CLIP[1], "clip_norm": None}), world, steps=10)
    assert any(not torch.allclose(expected[n], unclipped[n]) for n in expected)  # the clip binds
    assert_close(out["clip_hook"][0]["params"], expected, 1e-5)
    assert out["clip_hook"][0]["bytes"] == sim.bytes_sent[0]


@pytest.mark.parametrize("method", ["dgc", "psgd", "tern", "thr", "clip"])
def test_hook_and_distributed_optimizer_agree(runs, method):
    _, out = runs
    hook, optim = out[f"{method}_hook"], out[f"{method}_optim"]
    assert_close(hook[0]["params"], optim[0]["params"], 1e-6)
    assert hook[0]["bytes"] == optim[0]["bytes"]


def test_gradient_accumulation_equals_one_large_batch(runs):
    _, out = runs
    assert_close(out["none_accumulate"][0]["params"], out["ddp"][0]["params"], 1e-6)


@pytest.mark.parametrize("name", COMPRESSORS)
def test_every_compressor_through_the_hook_equals_the_simulator(runs, name):
    world, out = runs
    expected, sim = simulate((name, EACH.get(name, {})), world, steps=5, momentum=0.9)
    # gloo sums in its own order: fp16 payloads then round differently at half precision (eps ~1e-3)
    assert_close(out[f"each_{name}"][0]["params"], expected, 1e-3 if name == "fp16" else 1e-5)
    assert out[f"each_{name}"][0]["bytes"] == sim.bytes_sent[0]


def test_teardown_is_clean_every_time():
    """Exiting without destroy_process_group aborts gloo now and then ("terminate called without an active
    exception", SIGABRT); the launcher's wait -> barrier -> destroy order must never abort (spawn raises
    WorkerError on any non-zero exit)."""
    from dist_workers import async_all_reduces

    for _ in range(4):
        assert spawn(async_all_reduces, 2, timeout_s=30) == [4.0, 4.0]


def test_shutdown_ends_gloo_threads_after_ddp():
    """The cause of the teardown abort: a gloo worker thread drops a finished collective's tensors (taking the
    GIL) after completing it, and dies inside that C++ destructor if the interpreter is finalizing.  Destroying
    the group must end those threads; DDP would pin the group for good through torch.distributed.nn's default
    arguments were that module first imported after init_process_group (gradcomp imports it first)."""
    from dist_workers import hook_then_shutdown

    for before, after, warned in spawn(hook_then_shutdown, 2, False, timeout_s=60):
        assert before > 0 and after == 0 and warned == []


def test_shutdown_warns_when_the_group_outlives_it():
    from dist_workers import hook_then_shutdown

    for before, after, warned in spawn(hook_then_shutdown, 2, True, timeout_s=60):
        assert after == before > 0
        assert len(warned) == 1 and "outlived destroy_process_group" in warned[0] and "DDP model" in warned[0]


def test_a_failing_rank_fails_the_job_instead_of_hanging():
    from dist_workers import fail_on_rank

    with pytest.raises(WorkerError, match="rank 1 fails on purpose"):
        spawn(fail_on_rank, 2, 1, timeout_s=20)
