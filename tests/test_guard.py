"""Settings that differ between ranks, and non-finite gradients: the ranks agree before any memory changes."""

import time

import pytest
import torch

import gradcomp
from conftest import batches, ce, mlp
from gradcomp.guard import mismatches
from gradcomp.launch import WorkerError, spawn

DGC = ("DGC", {"density": 0.01, "warmup_epochs": 0})


def test_mismatches_name_each_differing_setting_on_every_rank():
    ranks = [{"method": {"density": 0.001, "momentum": 0.9}, "parameters": {"w": "[4, 3] float32"}},
             {"method": {"density": 0.01, "momentum": 0.9}, "parameters": {"w": "[4, 2] float32"}},
             {"method": {"density": 0.001, "momentum": 0.9}, "parameters": {"w": "[4, 3] float32", "b": "[4]"}}]
    assert mismatches(ranks) == [
        "method.density: rank 0 0.001, rank 1 0.01, rank 2 0.001",
        "parameters.b: rank 0 (none), rank 1 (none), rank 2 '[4]'",
        "parameters.w: rank 0 '[4, 3] float32', rank 1 '[4, 2] float32', rank 2 '[4, 3] float32'",
    ]
    assert mismatches(ranks[:1] * 3) == []


@pytest.mark.parametrize("front, args, expected", [
    ("hook", (0.01, 48, 2), "method.density: rank 0 0.001, rank 1 0.01"),
    ("optim", (0.001, 32, 2), "parameters.0.weight: rank 0 '[48, 64] float64', rank 1 '[32, 64] float64'"),
    ("dga", (0.001, 48, 3), "delay: rank 0 2, rank 1 3"),
])
def test_ranks_started_with_different_settings_all_raise_naming_the_difference(front, args, expected):
    from guard_workers import mismatched

    start = time.monotonic()
    errors = spawn(mismatched, 2, front, *args, timeout_s=60)
    assert time.monotonic() - start < 60
    for rank, error in enumerate(errors):
        assert error is not None and expected in error, (rank, error)


@pytest.mark.parametrize("front", ["hook", "optim"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank_and_changes_no_memory(front):
    """Reference: the same run without that step's batch.  Every rank's DGC memory (residuals, momenta) is
    bit for bit what it was before the step, and the weights end equal to the reference's."""
    from guard_workers import runs

    jobs = [{"front": front, "spec": DGC, "steps": 6, "nan_at": 2}, {"front": front, "spec": DGC, "steps": 6,
                                                                     "drop": (2,)}]
    for rank, (skipped, reference) in enumerate(spawn(runs, 2, jobs, timeout_s=90)):
        assert (skipped["skipped"], reference["skipped"]) == (1, 0), rank
        assert skipped["memory_kept"] is True, rank
        for name, p in reference["params"].items():
            assert torch.isfinite(p).all()
            assert torch.equal(skipped["params"][name], p), (rank, name)


#: methods whose exchanges change different things: DGC's momenta and residuals (and dense momentum), top-k's
#: residual, PowerSGD's two rounds, residual and warm-started Q, seeded TernGrad's draw counter
SPECS = [DGC, ("topk", {"density": 0.05}), ("powersgd", {"rank": 2, "min_compression_rate": 1.0}),
         ("terngrad", {"seed": 3})]


def _skipped_as_if_dropped(front, specs, fault, **options):
    """Each spec on 2 ranks twice: with ``fault`` at step 2 (guard_workers.guarded_train's options), and without
    that step's batch, the reference.  Every rank skips the faulty step once, keeps its memory and compressor
    state bit for bit, and ends at the reference's weights.  Returns ((rank, method), faulty run) pairs."""
    from guard_workers import runs

    jobs = [job for spec in specs for job in ({"front": front, "spec": spec, "steps": 5, "nan_at": 2, **fault,
                                               **options},
                                              {"front": front, "spec": spec, "steps": 5, "drop": (2,), **options})]
    checked = []
    for rank, results in enumerate(spawn(runs, 2, jobs, timeout_s=120)):
        for spec, faulty, reference in zip(specs, results[::2], results[1::2]):
            where = (rank, spec[0])
            assert (faulty["skipped"], reference["skipped"]) == (1, 0), where
            assert faulty["memory_kept"] is True, where
            for name, p in reference["params"].items():
                assert torch.isfinite(p).all(), where
                assert torch.equal(faulty["params"][name], p), (where, name)
            checked.append((where, faulty))
    return checked


@pytest.mark.parametrize("front", ["hook", "optim"])
def test_exchanges_start_before_the_last_bucket_and_a_skipped_step_still_changes_no_memory(front):
    """Each layer its own bucket (tiny bucket cap); on rank 1 the NaN is in the first layer's weight alone,
    whose bucket comes last.  Reference: the same run without that step's batch.  From the second step on,
    the hook's payloads leave before the last bucket arrives (they used to wait for the verdict); the skipped
    step leaves every rank's memory and compressor state bit for bit as it was, and the weights end equal to
    the reference's, for every method."""
    checked = _skipped_as_if_dropped(front, SPECS, {"nan_in": "0.weight"}, bucket_cap_mb=0.001)  # MB: a layer each
    for where, skipped in checked:
        if front == "hook":
            assert skipped["sent_early"][0] == 0, where  # the first step waits for the settings check
            assert all(sent > 0 for sent in skipped["sent_early"][1:]), (where, skipped["sent_early"])


@pytest.mark.parametrize("front", ["hook", "optim"])
def test_a_payload_damaged_on_the_wire_skips_the_step_on_every_rank_and_changes_no_memory(front):
    """Rank 1 puts a NaN into what it sends at step 2 (its gradients are finite): every rank decodes a non-finite
    average, skips the step and puts its memory back; the weights end equal to the run without that batch."""
    _skipped_as_if_dropped(front, [DGC, ("onebit", {}), ("none", {})], {"corrupt_at": 2})


@pytest.mark.parametrize("door", ["dga", "fedavg"])
def test_outer_doors_refuse_an_average_damaged_on_the_wire(door):
    """DGA (delay 1): the damaged step's average is applied on no rank; FedAvg (period 2): the damaged average of
    the weights is refused, each rank keeping its own.  Every rank counts one skip and its weights stay finite."""
    from guard_workers import outer_damaged

    for rank, out in enumerate(spawn(outer_damaged, 2, door, 6, 3, timeout_s=60)):
        assert out["skipped"] == 1, rank
        assert all(torch.isfinite(p).all() for p in out["params"].values()), rank


def test_nonfinite_raise_ends_the_job_with_the_error_instead_of_skipping():
    from guard_workers import nan_raises

    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1: non-finite gradient \(NaN or Inf\) in .*no memory was changed"):
        spawn(nan_raises, 2, timeout_s=30)
    assert time.monotonic() - start < 60


def test_delayed_averaging_skips_a_nan_step_on_every_rank_as_the_simulator_does():
    """Real ranks (the verdict travels with the step's average) against the simulator's rule; the NaN rank's
    gradient never reaches any weights."""
    from dist_workers import digits64
    from guard_workers import dga_guarded

    delay, steps, nan_at = 2, 7, 2
    real = spawn(dga_guarded, 2, delay, steps, nan_at, timeout_s=90)
    x, y = digits64()
    model = mlp()
    sim = gradcomp.Simulator(model, "none", 2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                             delay=delay)

    def loss(m, shard):
        worker, batch = shard
        value = ce(m, batch)
        return value * float("nan") if worker == 1 and sim.steps == nan_at else value

    for xb, yb in batches(x, y, 64, steps):
        sim.step(list(enumerate(zip(xb.tensor_split(2), yb.tensor_split(2)))), loss)
    assert sim.skipped == 1 and [r["skipped"] for r in real] == [1, 1]
    assert real[0]["bytes"] == sim.bytes_sent[0]
    for rank, out in enumerate(real):
        for name, p in sim.models[rank].named_parameters():
            assert torch.isfinite(out["params"][name]).all()
            torch.testing.assert_close(out["params"][name], p.detach(), rtol=1e-12, atol=1e-12)


def test_simulator_skip_and_raise():
    """One worker's NaN: the step is skipped for all (memory and weights unchanged) or raises."""
    from dist_workers import digits64

    x, y = digits64()
    model = mlp()
    sim = gradcomp.Simulator(model, gradcomp.DGC(density=0.01, warmup_epochs=0), 2,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    shards = list(zip(x[:64].tensor_split(2), y[:64].tensor_split(2)))
    sim.step(shards, ce)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    memory = [m.state_dict()["memory"] for m in sim.methods]
    before = [{k: {n: t.clone() for n, t in v.items()} for k, v in m.items()} for m in memory]
    bad = [shards[0], (shards[1][0] * float("nan"), shards[1][1])]
    sim.step(bad, ce)
    assert sim.skipped == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for b, m in zip(before, sim.methods):
        after = m.state_dict()["memory"]
        for kind in b:
            for n in b[kind]:
                assert torch.equal(after[kind][n], b[kind][n]), (kind, n)
    strict = gradcomp.Simulator(model, "none", 2, nonfinite="raise")
    with pytest.raises(gradcomp.NonFiniteGradientError,
                       match=r"rank 1: non-finite gradient \(NaN or Inf\) in 0.weight"):
        strict.step(bad, ce)
    with pytest.raises(ValueError, match="nonfinite must be one of 'skip', 'raise', got 'ignore'"):
        gradcomp.Simulator(model, "none", 2, nonfinite="ignore")


def test_train_config_checks_nonfinite():
    from gradcomp.train.config import Exchange, TrainConfig

    assert TrainConfig(exchange=Exchange(nonfinite="raise")).exchange.nonfinite == "raise"
    with pytest.raises(ValueError, match="^TrainConfig.exchange: nonfinite must be one of 'skip', 'raise', got "
                                         "'ignore'$"):
        Exchange(nonfinite="ignore")

