"""Delayed gradient averaging on real gloo processes: against DDP, a float64 reference and emulated latency."""

import pytest
import torch

import gradcomp
from conftest import batches, ce, mlp
from dist_workers import DGA_DGC, build_method, dga_all, dga_step_times, digits64, least_squares_data
from gradcomp.launch import spawn


def assert_close(a, b, tol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


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


def simulate(world, steps, momentum, spec=None, lr=0.1, resume_at=None, **options):
    """dist_workers.dga_train or fedavg_train in the simulator (``options``: the Simulator's delay, correction,
    local_steps): every worker's parameters, the simulator and (with ``resume_at``) the state it resumed from."""
    x, y = digits64()

    def build():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        method = "none" if spec is None else build_method(spec)
        return gradcomp.Simulator(model, method, world, optimizer=opt, **options), opt

    sim, opt = build()
    saved = None
    for step, (xb, yb) in enumerate(batches(x, y, 64, steps)):
        if step == resume_at:
            saved = {"model": sim.model.state_dict(), "opt": opt.state_dict(), "sim": sim.state_dict()}
            sim, opt = build()
            sim.model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            sim.load_state_dict(saved["sim"])
        sim.step(gradcomp.split_batch((xb, yb), world), ce)
    return [{n: p.detach().clone() for n, p in m.named_parameters()} for m in sim.models], sim, saved


def simulate_dga(spec, world, delay, steps, momentum, lr=0.1, correction=True, resume_at=None):
    """dist_workers.dga_train in the simulator: every worker's parameters (and the simulator)."""
    return simulate(world, steps, momentum, spec, lr, resume_at, delay=delay, correction=correction)[:2]


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
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert r["fedavg3"]["bytes"] == sim.bytes_sent[rank] == 3 * weights
    assert any(not torch.equal(out[0]["fedavg3"]["params"][n], out[1]["fedavg3"]["params"][n])
               for n in out[0]["fedavg3"]["params"])  # the last step was local


def reference_fedavg(world, period, delay, steps, lr, refused=()):
    """Float64 recomputation of FedAvg with delayed rounds on the least-squares model, written as what each
    worker's weights are: the sum over windows (K steps each) of the workers' mean progress for the windows
    whose average has arrived (D steps after the window's last step) and of this worker's own progress for the
    others.  A window in ``refused`` (0-based) has its average arrive with the next window's."""

    def arrived(r, i):
        while r in refused:
            r += 1
        return (r + 1) * period + delay <= i + 1

    progress = [[] for _ in range(world)]  # progress[k][r]: rank k's summed SGD updates in window r
    w = [torch.zeros(5, dtype=torch.float64) for _ in range(world)]
    history = [[] for _ in range(world)]
    for i in range(steps):
        for k in range(world):
            x, y = least_squares_data(k, i)
            if i % period == 0:
                progress[k].append(torch.zeros(5, dtype=torch.float64))
            progress[k][-1] = progress[k][-1] - lr * x.T @ (x @ w[k] - y) / x.shape[0]
        for k in range(world):
            w[k] = sum(sum(progress[j][r] for j in range(world)) / world if arrived(r, i) else progress[k][r]
                       for r in range(len(progress[k])))
            history[k].append(w[k].clone())
    return [torch.stack(h) for h in history]


@pytest.mark.parametrize("delay", [0, 3])
def test_fedavg_with_delay_swaps_each_workers_delta_for_the_average_delay_steps_late(runs, delay):
    """K = 2: rounds at steps 2, 4, ...; with D = 3 each arrives in the middle of a later window."""
    world, out = runs
    expected = reference_fedavg(world, 2, delay, 10, 0.2)
    for rank, r in enumerate(out):
        torch.testing.assert_close(r[f"lsq_fedavg_{delay}"], expected[rank], rtol=1e-12, atol=1e-12)
    for off in (delay - 1, delay + 1):  # the reference tells the delays apart
        if off >= 0:
            other = reference_fedavg(world, 2, off, 10, 0.2)
            assert not torch.allclose(other[0], expected[0], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(expected[0], expected[1], rtol=1e-6, atol=1e-9)  # the workers differ
    # the round of step 4 damaged on the wire: refused on every rank, its window's progress joins the next round
    refused = reference_fedavg(world, 2, delay, 10, 0.2, refused={1})
    for rank, r in enumerate(out):
        torch.testing.assert_close(r[f"lsq_fedavg_{delay}_damaged"], refused[rank], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(refused[0], expected[0], rtol=1e-6, atol=1e-9)


def test_fedavg_delay_zero_is_plain_fedavg_bit_for_bit(runs):
    """Against torch.optim.SGD and one all-reduce of the parameters every K steps."""
    _, out = runs
    for r in out:
        assert_close(r["fedavg3"]["params"], r["fedavg3_plain"], 0.0)


def test_fedavg_with_delay_real_ranks_match_the_simulator(runs):
    """K = 2, D = 3, 12 steps, momentum 0.9: each rank as its simulated worker, six rounds of the weights sent
    (the last two still in flight at the end)."""
    world, out = runs
    workers, sim, _ = simulate(world, 12, 0.9, local_steps=2, delay=3)
    dense = sum(p.numel() * p.element_size() for p in mlp().parameters())
    for rank, r in enumerate(out):
        assert_close(r["fedavg2_d3"]["params"], workers[rank], 1e-6)
        assert r["fedavg2_d3"]["bytes"] == sim.bytes_sent[rank] == 6 * dense
    assert all(isinstance(d, gradcomp.FedAvg) and d.delay == 3 for d in sim.doors)


def test_fedavg_with_delay_resumes_mid_run_with_rounds_in_flight_bit_identically(runs):
    """K = 2, D = 3, checkpointed after 8 steps: the rounds of steps 6 and 8 in flight."""
    world, out = runs
    for r in out:
        assert_close(r["fedavg2_d3_resumed"]["params"], r["fedavg2_d3"]["params"], 0.0)
    straight, _, _ = simulate(world, 12, 0.9, local_steps=2, delay=3)
    resumed, _, saved = simulate(world, 12, 0.9, resume_at=8, local_steps=2, delay=3)
    assert [[r["step"] for r in door["rounds"]] for door in saved["sim"]["doors"]] == [[6, 8]] * world
    for a, b in zip(resumed, straight):
        assert_close(a, b, 0.0)


def test_fedavg_ranks_started_with_different_delays_all_raise_naming_them(runs):
    world, out = runs
    for r in out:
        assert r["fedavg_mismatch"] is not None and "delay: rank 0 3, rank 1 2" in r["fedavg_mismatch"]


# slow-marked (10 s): the default suite checks the same on real ranks, FedAvg too, through the benchmark
# (tests/test_bench.py::test_bench_latency_quick_dga_hides_what_synchronous_sgd_pays)
@pytest.mark.slow
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
    with pytest.raises(ValueError, match="FedAvg.delay must .*-1"):
        gradcomp.FedAvg(opt, model.named_parameters(), period=2, delay=-1)
    with pytest.raises(ValueError, match="Simulator.delay must .*-2"):
        gradcomp.Simulator(model, "none", 2, optimizer=opt, delay=-2, local_steps=2)
    with pytest.raises(ValueError, match="correction=False"):
        gradcomp.Simulator(model, "none", 2, optimizer=opt, delay=1, local_steps=2, correction=False)
    saved = gradcomp.FedAvg(opt, model.named_parameters(), period=2, delay=3).state_dict()
    with pytest.raises(ValueError, match=r"saved with delay=3, this FedAvg has delay=2"):
        gradcomp.FedAvg(opt, model.named_parameters(), period=2, delay=2).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"FedAvg snapshot 'weight' is \[3\]"):
        gradcomp.FedAvg(opt, model.named_parameters(), period=2, delay=3).load_state_dict(
            {**saved, "snapshot": {"weight": torch.zeros(3), "bias": torch.zeros(2)}})
