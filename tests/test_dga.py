"""Delayed gradient averaging on real gloo processes: against DDP, a float64 reference and emulated latency."""

import pytest
import torch

import gradcomp
from gradcomp.launch import spawn
from conftest import batches, ce, mlp
from dist_workers import DGA_DGC, build_method, dga_all, dga_step_times, digits64, least_squares_data


def assert_close(a, b, tol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module", params=[2, 4])
def runs(request):
    return request.param, spawn(dga_all, request.param, timeout_s=240)


def test_delay_zero_equals_synchronous_ddp(runs):
    _, out = runs
    for r in out:
        assert_close(r["dga0"], r["ddp"]["params"], 1e-6)


def test_delay_zero_with_a_method_equals_the_distributed_optimizer(runs):
    _, out = runs
    for r in out:
        assert_close(r["dga0_dgc"], r["dgc_optim"]["params"], 1e-6)
        assert_close(r["dga0_psgd"], r["psgd_optim"]["params"], 1e-6)


def test_powersgd_with_delay_trains_and_ranks_apply_the_same_average(runs):
    """PowerSGD's residual needs each step's result, so its steps wait in turn; the delayed average is the
    same on every rank, so the ranks' weights differ only by their local correction terms."""
    _, out = runs
    for r in out:
        assert all(torch.isfinite(t).all() for t in r["dga2_psgd"].values())
    assert any(not torch.equal(out[0]["dga2_psgd"][n], out[1]["dga2_psgd"][n]) for n in out[0]["dga2_psgd"])


def reference_dga(world, delay, correction, steps, lr):
    """Float64 recomputation of the paper's update on the least-squares model: per rank weights, the
    gradient written out (X^T (X w - y) / rows), the average of step i - D applied at step i."""
    w = [torch.zeros(5, dtype=torch.float64) for _ in range(world)]
    grads = []  # grads[i][k]: rank k's gradient at step i
    history = [[] for _ in range(world)]
    for i in range(steps):
        grads.append([])
        for k in range(world):
            x, y = least_squares_data(k, i)
            grads[i].append(x.T @ (x @ w[k] - y) / x.shape[0])
        for k in range(world):
            if i < delay:
                update = grads[i][k]
            else:
                update = sum(grads[i - delay]) / world
                if correction:
                    update = update + grads[i][k] - grads[i - delay][k]
            w[k] = w[k] - lr * update
            history[k].append(w[k].clone())
    return [torch.stack(h) for h in history]


@pytest.mark.parametrize("correction", [True, False])
def test_each_step_applies_the_average_from_delay_steps_before(runs, correction):
    world, out = runs
    expected = reference_dga(world, 3, correction, 10, 0.2)
    for rank, r in enumerate(out):
        torch.testing.assert_close(r[f"lsq_{correction}"], expected[rank], rtol=1e-12, atol=1e-12)
    # the reference tells the delays apart: a delay off by one would fail
    off = reference_dga(world, 2, correction, 10, 0.2)
    assert not torch.allclose(off[0], expected[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("key", ["plain", "dgc"])
def test_state_dict_round_trip_mid_run_continues_identically(runs, key):
    """Checkpointed at step 7 with 3 averages pending, rebuilt and restored: bit-identical at the end."""
    _, out = runs
    for r in out:
        assert_close(r[f"resumed_{key}"], r[f"straight_{key}"], 0.0)


def simulate_dga(spec, world, delay, steps, momentum, lr=0.1, correction=True, resume_at=None):
    """dist_workers.dga_train in the simulator: every worker's parameters (and the simulator)."""
    x, y = digits64()

    def build():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        method = "none" if spec is None else build_method(spec)
        return gradcomp.Simulator(model, method, world, optimizer=opt, delay=delay, correction=correction), opt

    sim, opt = build()
    for step, (xb, yb) in enumerate(batches(x, y, 64, steps)):
        if step == resume_at:
            saved = {"model": sim.model.state_dict(), "opt": opt.state_dict(), "sim": sim.state_dict()}
            sim, opt = build()
            sim.model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            sim.load_state_dict(saved["sim"])
        sim.step(gradcomp.split_batch((xb, yb), world), ce)
    return [{n: p.detach().clone() for n, p in m.named_parameters()} for m in sim.models], sim


@pytest.mark.parametrize("key", ["plain", "dgc"])
def test_the_simulator_runs_dga_as_the_real_ranks_do(runs, key):
    world, out = runs
    spec, momentum = (None, 0.9) if key == "plain" else (DGA_DGC, 0.0)
    workers, _ = simulate_dga(spec, world, 3, 15, momentum)
    for rank, r in enumerate(out):
        assert_close(r[f"straight_{key}"], workers[rank], 1e-5)
    assert any(not torch.allclose(workers[0][n], workers[1][n]) for n in workers[0])  # the copies drift apart
    resumed, _ = simulate_dga(spec, world, 3, 15, momentum, resume_at=7)
    for a, b in zip(resumed, workers):
        assert_close(a, b, 0.0)


def test_the_simulator_without_correction_applies_the_stale_average_alone():
    """correction=False: every worker applies the same average, so the copies stay identical after D steps
    only if they started equal -- they do not (D local steps first), but their differences stop changing."""
    workers, _ = simulate_dga(None, 2, 2, 8, 0.0, correction=False)
    later, _ = simulate_dga(None, 2, 2, 12, 0.0, correction=False)
    diff = {n: workers[0][n] - workers[1][n] for n in workers[0]}
    later_diff = {n: later[0][n] - later[1][n] for n in later[0]}
    assert_close(diff, later_diff, 1e-9)
    assert any(d.abs().max() > 0 for d in diff.values())


def test_fedavg_every_step_with_plain_sgd_equals_synchronous_sgd(runs):
    """Averaging the weights after each plain SGD step from equal weights is averaging the gradients."""
    _, out = runs
    for r in out:
        assert_close(r["fedavg1"]["params"], r["ddp_sgd"]["params"], 1e-6)


def test_fedavg_real_ranks_match_the_simulator(runs):
    """K=3, 10 steps: averaged at steps 3, 6 and 9, then one local step; each rank as its simulated worker."""
    world, out = runs
    x, y = digits64()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sim = gradcomp.Simulator(model, "none", world, optimizer=opt, local_steps=3)
    for xb, yb in batches(x, y, 64, 10):
        sim.step(gradcomp.split_batch((xb, yb), world), ce)
    for rank, r in enumerate(out):
        assert_close(r["fedavg3"]["params"], dict(sim.models[rank].named_parameters()), 1e-6)
        assert r["fedavg3"]["bytes"] == sim.bytes_sent[rank] == 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    assert any(not torch.equal(out[0]["fedavg3"]["params"][n], out[1]["fedavg3"]["params"][n])
               for n in out[0]["fedavg3"]["params"])  # the last step was local


def test_delay_hides_emulated_latency_that_synchronous_sgd_pays():
    """Latency L emulated, compute c per step, D c >= L: DGA's step time stays near the zero-latency one;
    synchronous SGD pays about L per step.  (Generous bounds: behaviour, not speed; the benchmark prints
    the ratios.)"""
    latency, compute, delay, steps = 120, 0.04, 4, 16
    per_rank = spawn(dga_step_times, 2, [(delay, 0.0), (delay, latency), (0, latency)], compute, steps, 2,
                     timeout_s=120)
    base, hidden, sync = (max(r[i] for r in per_rank) for i in range(3))  # the slowest rank sets the pace
    seconds = f"zero-latency {1e3 * base:.1f} ms, DGA {1e3 * hidden:.1f} ms, synchronous {1e3 * sync:.1f} ms"
    assert sync > compute + 0.8 * latency / 1e3, seconds
    assert hidden < base + 0.3 * latency / 1e3, seconds  # far below the latency it would otherwise pay


def test_bad_settings_name_the_value():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="DelayedGradientAveraging.delay"):
        gradcomp.DelayedGradientAveraging(opt, model.named_parameters(), delay=-1)
    for bad in (-1.0, float("nan"), "10"):
        with pytest.raises(ValueError, match="emulate_latency_ms"):
            gradcomp.DelayedGradientAveraging(opt, model.named_parameters(), delay=2, emulate_latency_ms=bad)
    with pytest.raises(ValueError, match="FedAvg.period"):
        gradcomp.FedAvg(opt, model.named_parameters(), period=0)
    with pytest.raises(ValueError, match="not both"):
        gradcomp.Simulator(model, "none", 2, optimizer=opt, delay=1, local_steps=2)
