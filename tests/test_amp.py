"""Mixed precision: the hook with a ``torch.amp.GradScaler``, and 16-bit gradients on the wire.

One spawn of 2 gloo ranks runs every job of the module (:func:`amp_workers.runs`); each test compares a job with
its reference run, on every rank."""

import pytest
import torch

import gradcomp
from gradcomp.launch import spawn

DGC = ("DGC", {"density": 0.01, "warmup_steps": 0})
NONE = ("none", {})
GROWING = {"init_scale": 2.0**10, "growth_interval": 2}  # doubles every second step: 2**10 ... 2**14
OVERFLOW_AT = 3
STEPS = 8  # amp_workers.amp_train's default

JOBS = {
    "dgc_scaled": {"spec": DGC, "scaler": GROWING},
    "dgc": {"spec": DGC},
    "dgc_overflow": {"spec": DGC, "scaler": {"init_scale": 2.0**10, "growth_interval": 3}, "inf_at": OVERFLOW_AT},
    "dgc_without_that_step": {"spec": DGC, "drop": (OVERFLOW_AT,)},
    "none_overflow": {"spec": NONE, "scaler": {"init_scale": 2.0**10, "growth_interval": 3}, "inf_at": OVERFLOW_AT},
    "none_without_that_step": {"spec": NONE, "drop": (OVERFLOW_AT,)},
    "none": {"spec": NONE},
    "none_bf16": {"spec": NONE, "dtype": torch.bfloat16},
    "ddp_bf16": {"dtype": torch.bfloat16},
    "dgc_bf16": {"spec": DGC, "dtype": torch.bfloat16},
    "fp16_scaled": {"spec": ("fp16", {}), "scaler": {"init_scale": 2.0**24, "growth_interval": 2}},
    "fp16": {"spec": ("fp16", {})},
    "optim_overflow": {"spec": DGC, "front": "optim", "scaler": GROWING, "inf_at": OVERFLOW_AT},
    "optim_without_that_step": {"spec": DGC, "front": "optim", "drop": (OVERFLOW_AT,)},
}


@pytest.fixture(scope="module")
def ranks():
    from amp_workers import runs

    return spawn(runs, 2, JOBS, timeout_s=120)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_stays_in_unscaled_units_while_the_scale_changes(ranks):
    """DGC through the hook with a GradScaler whose scale doubles every second step ends where the same run without
    a scaler ends: the same weights and the same residuals and momenta, bit for bit (scales are powers of two),
    after the same bytes."""
    for rank, out in enumerate(ranks):
        scaled, plain = out["dgc_scaled"], out["dgc"]
        scales = [before for before, _ in scaled["scales"]]
        assert len(set(scales)) >= 4 and scales == sorted(scales), (rank, scales)
        assert same(scaled["memory"], plain["memory"]), rank
        assert same(scaled["params"], plain["params"]), rank
        assert scaled["bytes"] == plain["bytes"] > 0


@pytest.mark.parametrize("method", ["dgc", "none", "optim"])
def test_an_overflow_on_one_rank_reaches_every_ranks_scaler_and_changes_no_memory(ranks, method):
    """An Inf in rank 1's loss at one step: on both ranks the scaler skips the step and halves its scale, the
    weights and the method's memory are what they were before the step, and the run ends where the run without
    that step's batch ends (through the hook with DGC and with "none", and through the DistributedOptimizer)."""
    for rank, out in enumerate(ranks):
        run, reference = out[f"{method}_overflow"], out[f"{method}_without_that_step"]
        before, after = run["scales"][OVERFLOW_AT]
        assert after == before / 2, (rank, run["scales"])
        assert [a == 2 * b for b, a in run["scales"][:OVERFLOW_AT]].count(True) == 1  # it grew once before
        assert run["skipped_seen"] and run["skipped"] == 1, rank
        assert run["weights_kept"] and run["memory_kept"], rank
        assert same(run["params"], reference["params"]), rank
        assert same(run["memory"], reference["memory"]), rank


def test_bf16_gradients_travel_as_bf16(ranks):
    """"none" sends a bf16 model's gradients in half the bytes of float32's and averages them as plain DDP does;
    DGC sends its dense tensors (biases, the small layer) in bf16: the bytes saved are exactly half theirs."""
    from conftest import mlp

    model = mlp()
    dense_entries = sum(p.numel() for p in model.parameters() if not gradcomp.DGC().sparsified(p))
    for rank, out in enumerate(ranks):
        assert out["none_bf16"]["bytes"] * 2 == out["none"]["bytes"], rank
        assert same(out["none_bf16"]["params"], out["ddp_bf16"]["params"]), rank
        assert all(p.dtype == torch.bfloat16 for p in out["none_bf16"]["params"].values())
        assert out["dgc"]["bytes"] - out["dgc_bf16"]["bytes"] == STEPS * dense_entries * 2, rank


def test_fp16_carries_loss_scaled_gradients_beyond_its_range(ranks):
    """With the scaler given to the hook, gradients scaled far beyond float16's 65504 go through fp16 (the scale is
    divided out first) and the run ends where the unscaled run ends; a gradient that is itself beyond the range is
    still refused, with the fix named."""
    for rank, out in enumerate(ranks):
        assert out["fp16_scaled"]["largest_grad"] > 65504 * 16, rank
        assert same(out["fp16_scaled"]["params"], out["fp16"]["params"]), rank
        assert out["fp16_scaled"]["bytes"] == out["fp16"]["bytes"]
    with pytest.raises(ValueError, match=r"fp16: a gradient entry exceeds float16's range \(65504\); with a "
                                         r"GradScaler, give it to the front door \(scaler=\)"):
        gradcomp.get("fp16").compress(torch.tensor([1.0, 7e4]))


def test_dgc_sends_a_bf16_dense_tensor_in_bf16_and_keeps_float32_memory():
    """One rank's exchange, driven by hand: the bias goes out as 2 bytes an entry, comes back as the float32 average;
    the sparsified matrix's memory is float32 and holds the unscaled gradient's momentum."""
    torch.manual_seed(0)
    dgc = gradcomp.DGC(density=0.01, warmup_steps=0, momentum=0.9).for_rank(0)
    grads = {"w": torch.randn(64, 48).bfloat16(), "b": torch.randn(48).bfloat16()}
    scale = torch.tensor(2.0**12)
    prepared = dgc.prepare({n: g * scale for n, g in grads.items()}, 2, scale)
    assert {n: t.dtype for n, t in prepared.items()} == {"w": torch.float32, "b": torch.float32}
    gen = dgc.exchange("b", prepared["b"], 2)
    payload = next(gen)
    assert payload.tensors[0].dtype == torch.bfloat16 and payload.nbytes == 48 * 2
    with pytest.raises(StopIteration) as done:
        gen.send([payload.replace(payload.tensors[0] * 2)])  # the sum over 2 ranks that sent the same
    assert done.value.value.dtype == torch.float32
    assert torch.equal(done.value.value, grads["b"].float())
    u = dgc.memory.u["w"]  # u = 0.9 * 0 + g, in gradient units, but for the entries sent (masked to 0)
    kept = u != 0
    assert u.dtype == torch.float32 and int((~kept).sum()) == 31  # ceil(0.01 * 3072)
    assert torch.equal(u[kept], grads["w"].float()[kept])


def test_method_none_keeps_16_bit_gradients_and_divides_the_scale_out():
    grads = {"h": torch.randn(10).half(), "b": torch.randn(10).bfloat16(), "f": torch.randn(10)}
    scale = torch.tensor(1024.0)
    prepared = gradcomp.Method(gradcomp.get("none")).prepare({n: g * scale for n, g in grads.items()}, 2, scale)
    assert {n: t.dtype for n, t in prepared.items()} == {n: g.dtype for n, g in grads.items()}
    assert same(prepared, grads)
    topk = gradcomp.Method(gradcomp.get("topk", density=0.5)).prepare(grads, 2)
    assert {n: t.dtype for n, t in topk.items()} == dict.fromkeys(grads, torch.float32)


def test_a_bad_scaler_is_refused_naming_it():
    with pytest.raises(TypeError, match="HookState: scaler must be a torch.amp.GradScaler or None, got float"):
        gradcomp.HookState("dgc", scaler=1024.0)
    with pytest.raises(ValueError, match="HookState: with a GradScaler nonfinite must be 'skip' .* got 'raise'"):
        gradcomp.HookState("dgc", scaler=torch.amp.GradScaler("cpu"), nonfinite="raise")
    disabled = gradcomp.HookState("dgc", scaler=torch.amp.GradScaler("cpu", enabled=False), nonfinite="raise")
    assert disabled.core.scaler is None and disabled.core.loss_scale() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_overflow_reaches_the_grad_scaler_and_changes_no_memory():
    """torch.amp.GradScaler("cuda"), NCCL, world size 1: an Inf at one step is skipped by the scaler, which halves
    its scale; weights and DGC memory are unchanged by it, and the run ends where the run without that step ends."""
    from amp_workers import runs

    jobs = {"overflow": {"spec": DGC, "device": "cuda", "inf_at": OVERFLOW_AT, "inf_rank": 0,
                         "scaler": {"init_scale": 2.0**16, "growth_interval": 2}},
            "reference": {"spec": DGC, "device": "cuda", "drop": (OVERFLOW_AT,)}}
    (out,) = spawn(runs, 1, jobs, backend="nccl", timeout_s=120)
    run, reference = out["overflow"], out["reference"]
    before, after = run["scales"][OVERFLOW_AT]
    assert after == before / 2 and run["skipped"] == 1
    assert run["weights_kept"] and run["memory_kept"]
    torch.testing.assert_close(run["params"], reference["params"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(run["memory"], reference["memory"], rtol=1e-6, atol=1e-7)
