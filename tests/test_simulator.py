"""The simulator and DGC against plain torch.optim.SGD on the averaged gradient."""

import pytest
import torch

import gradcomp
from conftest import batches, ce, mlp
from gradcomp import DGC, Simulator, split_batch


def reference_sgd(x, y, steps, momentum, nesterov=False, lr=0.1, batch_size=64, weight_decay=0.0):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for xb, yb in batches(x, y, batch_size, steps):
        opt.zero_grad()
        ce(model, (xb, yb)).backward()
        opt.step()
    return model


def simulated(x, y, steps, method, workers, lr=0.1, momentum=0.0, nesterov=False, batch_size=64, weight_decay=0.0):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    sim = Simulator(model, method, workers, optimizer=opt)
    for xb, yb in batches(x, y, batch_size, steps):
        sim.step(split_batch((xb, yb), workers), ce)
    return model, sim


def assert_same_params(a, b, rtol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("workers", [1, 4])
def test_none_equals_full_batch_training(digits, workers):
    x, y = digits
    ref = reference_sgd(x, y, steps=30, momentum=0.9)
    model, sim = simulated(x, y, 30, "none", workers, momentum=0.9)
    assert_same_params(model, ref, rtol=1e-9)
    assert sim.compression_ratio == pytest.approx(0.5)  # float64 grads go as they are: twice the fp32 bytes


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_dense_without_masking_is_momentum_sgd(digits, nesterov):
    """DGC at density 1 without masking is SGD with momentum on the averaged gradient (50 steps)."""
    x, y = digits
    method = DGC(density=1.0, momentum=0.9, nesterov=nesterov, momentum_masking=False, warmup_epochs=0,
                 wire="plain")
    assert method.sparsified(torch.zeros(48, 64)) and not method.sparsified(torch.zeros(48))
    ref = reference_sgd(x, y, steps=50, momentum=0.9, nesterov=nesterov)
    model, _ = simulated(x, y, 50, method, workers=4)
    assert_same_params(model, ref, rtol=1e-5)


def test_sgd_settings_give_dgc_the_weight_decay_of_momentum_sgd(digits):
    """DGC owns momentum, so the optimizer's weight decay acts without it: sgd_settings scales it by 1/(1 - m).
    Against momentum SGD with weight decay (torch's), DGC at density 1 without masking ends ~3x closer after 100
    steps with the scaled decay than with the same decay unscaled.  What is left is the momentum buffer's start:
    momentum SGD decays each weight lr * wd * m / (1 - m)^2 (0.9 % here) less in total while its buffer fills, a
    constant, where the unscaled decay falls behind by lr * wd * m / (1 - m) more at every step."""
    x, y = digits
    wd, steps = 1e-3, 100
    ref = reference_sgd(x, y, steps=steps, momentum=0.9, weight_decay=wd)

    def dgc_run(weight_decay):
        method = DGC(density=1.0, momentum=0.9, momentum_masking=False, warmup_epochs=0, wire="plain")
        return simulated(x, y, steps, method, workers=2, weight_decay=weight_decay)[0]

    def distance(model):
        return sum((p - q).norm() ** 2 for p, q in zip(model.parameters(), ref.parameters())).sqrt().item()

    settings = gradcomp.sgd_settings(DGC(momentum=0.9), momentum=0.9, weight_decay=wd)
    assert settings == {"momentum": 0.0, "weight_decay": pytest.approx(wd / (1 - 0.9), rel=1e-12)}
    scaled, unscaled = distance(dgc_run(settings["weight_decay"])), distance(dgc_run(wd))
    assert scaled < 0.4 * unscaled, (scaled, unscaled)


def test_sgd_settings_leave_other_methods_alone():
    for method in [gradcomp.Method(gradcomp.get("none")), DGC(momentum=0.0), gradcomp.get("topk"), "qsgd"]:
        assert gradcomp.sgd_settings(method, 0.9, 1e-4) == {"momentum": 0.9, "weight_decay": 1e-4}
    assert gradcomp.sgd_settings("dgc", 0.9, 1e-4) == gradcomp.sgd_settings(DGC(), 0.9, 1e-4)
    for kwargs, name in [({"momentum": 1.0}, "momentum"), ({"weight_decay": -1e-4}, "weight_decay")]:
        with pytest.raises(ValueError, match=name):
            gradcomp.sgd_settings(DGC(), **kwargs)


def test_dgc_sparse_trains_and_counts_bytes(digits):
    x, y = digits
    method = DGC(density=0.01, warmup_epochs=0, min_numel=256, wire="plain")
    model, sim = simulated(x, y, 60, method, workers=4)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    assert acc > 0.6
    # Per step and worker: k values (fp64) + k int32 indices for the two weights, the biases dense in fp64.
    k = [-(-64 * 48 // 100), -(-48 * 10 // 100)]
    per_step = sum(kk * (8 + 4) for kk in k) + (48 + 10) * 8
    assert sim.bytes_sent == [60 * per_step] * 4
    assert sim.dense_bytes == 60 * 4 * sum(p.numel() for p in model.parameters())


def test_momentum_optimizer_with_dgc_is_rejected():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        Simulator(model, DGC(), 2, optimizer=opt)
    Simulator(model, DGC(momentum=0.0), 2, optimizer=opt)  # no momentum of its own: allowed


def test_batchnorm_buffers_follow_worker_zero():
    """Like DDP's broadcast_buffers: running statistics end as worker 0's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(16, 4)
    sim = Simulator(model, "none", 2)
    sim.step(split_batch(x, 2), lambda m, b: m(b).square().mean())
    ref(x[:8])
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="num_workers"):
        Simulator(model, "none", 0)
    with pytest.raises(ValueError, match="unknown compressor"):
        Simulator(model, "nope", 2)
    sim = Simulator(model, "none", 2)
    with pytest.raises(ValueError, match="2 shards"):
        sim.step([None], ce)
    with pytest.raises(ValueError, match="cannot feed"):
        split_batch(torch.zeros(1, 3), 2)


def test_workers_draw_independently_but_randomk_shares_indices():
    model = mlp()
    tern = Simulator(model, gradcomp.get("terngrad", seed=3), 3)
    assert [m.compressor.seed for m in tern.methods] == [3, 4, 5]
    rk = Simulator(model, gradcomp.get("randomk", density=0.1, seed=3), 3)
    assert [m.compressor.seed for m in rk.methods] == [3, 3, 3]


def test_simulator_state_round_trip_continues_identically(digits, tmp_path):
    x, y = digits
    stream = list(batches(x, y, 64, 16))

    def build():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
        return model, opt, Simulator(model, DGC(density=0.01, min_numel=256, warmup_epochs=1, steps_per_epoch=4),
                                     4, optimizer=opt)

    model_a, _, sim_a = build()
    for xb, yb in stream[:8]:
        sim_a.step(split_batch((xb, yb), 4), ce)
    torch.save({"model": model_a.state_dict(), "sim": sim_a.state_dict()}, tmp_path / "ckpt.pt")
    for xb, yb in stream[8:]:
        sim_a.step(split_batch((xb, yb), 4), ce)

    model_b, _, sim_b = build()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b.load_state_dict(ckpt["model"])
    sim_b.load_state_dict(ckpt["sim"])
    for xb, yb in stream[8:]:
        sim_b.step(split_batch((xb, yb), 4), ce)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    assert sim_a.bytes_sent == sim_b.bytes_sent and sim_a.method.epoch == sim_b.method.epoch


def test_simulator_workers_are_the_real_front_doors():
    """The simulated workers are the library's own doors on an in-process group: the sync rule's cores, a
    DelayedGradientAveraging or a FedAvg per worker, each with its own copy of the method."""
    from gradcomp.simulator import LocalCommunicator

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = Simulator(model, DGC(momentum=0.0), 3, optimizer=opt)
    assert [c.rank for c in (core.comm for core in sync.cores)] == [0, 1, 2]
    assert all(isinstance(core.comm, LocalCommunicator) for core in sync.cores)
    assert len({id(m) for m in sync.methods}) == 3 and len({id(m.compressor) for m in sync.methods}) >= 1
    dga = Simulator(model, "topk", 3, optimizer=opt, delay=2)
    assert all(isinstance(d, gradcomp.DelayedGradientAveraging) and d.delay == 2 for d in dga.doors)
    fed = Simulator(model, "none", 3, optimizer=opt, local_steps=4)
    assert all(isinstance(d, gradcomp.FedAvg) and d.period == 4 for d in fed.doors)


def test_local_group_is_deterministic_with_the_global_generator(digits):
    """One worker runs at a time in a fixed order: TernGrad drawing from torch's global generator (seed=None)
    gives the same weights twice."""
    x, y = digits

    def run():
        torch.manual_seed(0)
        model, sim = simulated(x, y, 5, gradcomp.get("terngrad"), 3)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_local_group_names_workers_that_disagree_and_never_hangs():
    """Workers that issue different collectives, or fail, end the run with an error naming them."""
    from gradcomp.simulator import LocalGroup

    group = LocalGroup(3)
    with pytest.raises(RuntimeError, match=r"workers \[1\] wait in collectives no other worker will join"):
        group.run(lambda rank: group.comms[rank].all_objects(rank) if rank == 1 else None)
    with pytest.raises(RuntimeError, match="worker 2 issued count_per_rank as collective 1, another worker "
                                           "all_objects"):
        group.run(lambda rank: group.comms[rank].count_per_rank(rank) if rank == 2 else
                  group.comms[rank].all_objects(rank))

    def fail_on_2(rank):
        if rank == 2:
            raise KeyError("worker two")
        return group.comms[rank].all_objects(rank)

    with pytest.raises(KeyError, match="worker two"):
        group.run(fail_on_2)
    assert group.run(lambda rank: group.comms[rank].all_objects(rank * 10)) == [[0, 10, 20]] * 3  # usable again
    assert group.run(lambda rank: group.comms[rank].count_per_rank(rank + 1)) == [[1, 2, 3]] * 3


def test_local_group_keeps_each_workers_grad_mode():
    """torch.no_grad is thread-local: a worker inside it across a collective must still be inside it when it
    resumes, whatever the others did meanwhile (FedAvg averages weights under no_grad)."""
    from gradcomp.simulator import LocalGroup

    group = LocalGroup(3)

    def fn(rank):
        if rank == 1:
            group.comms[rank].count_per_rank(0)
            return torch.is_grad_enabled()
        with torch.no_grad():
            group.comms[rank].count_per_rank(0)
            return torch.is_grad_enabled()

    assert group.run(fn) == [False, True, False] and torch.is_grad_enabled()
