"""The futures gradcomp hands to DDP and to itself: joined without ``wait()`` in callbacks, made with their
devices, and their CUDA work kept off the training stream.  The CPU tests run everywhere; the CUDA ones
(marked ``gpu``) check stream semantics where a GPU is."""

import threading

import pytest
import torch
from torch.futures import Future

from gradcomp.comm import all_done, new_future, on_stream
from gradcomp.launch import spawn

HAS_CUDA = torch.cuda.is_available()


def test_all_done_waits_for_every_future_whatever_order_they_complete_in():
    futures = [Future() for _ in range(4)]
    out = all_done(futures)
    for i in (2, 0, 3):
        futures[i].set_result(i * 10)
        assert not out.done()
    futures[1].set_result(10)
    assert out.done() and out.wait() == [0, 10, 20, 30]
    assert all_done([]).wait() == []


def test_all_done_hands_on_the_first_error_once_every_future_is_done():
    futures = [Future() for _ in range(3)]
    out = all_done(futures)
    futures[1].set_exception(ValueError("collective 1 failed"))
    assert not out.done()  # the others are still in flight: nothing may be reused yet
    futures[0].set_result(0)
    futures[2].set_result(2)
    with pytest.raises(ValueError, match="collective 1 failed"):
        out.wait()


def test_all_done_counts_futures_completed_from_many_threads():
    for _ in range(20):
        futures = [Future() for _ in range(16)]
        out = all_done(futures)
        threads = [threading.Thread(target=f.set_result, args=(i,)) for i, f in enumerate(futures)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out.wait() == list(range(16))


def test_on_stream_without_a_stream_runs_the_block_as_it_is():
    ran = []
    with on_stream(None):
        ran.append(1)
    assert ran == [1]
    assert type(new_future()) is Future


def _counts(rank, world, latency_ms):
    import gradcomp.comm as comm

    c = comm.Communicator(emulate_latency_ms=latency_ms)
    return [c.count_per_rank(rank + 3), c.count_per_rank_async(torch.tensor(rank * 7)).wait().tolist()]


@pytest.mark.parametrize("latency_ms", [0.0, 30.0])
def test_count_per_rank_gives_every_rank_every_count_with_and_without_emulated_latency(latency_ms):
    for rank, (counts, later) in enumerate(spawn(_counts, 2, latency_ms, timeout_s=60)):
        assert counts == [3, 4], rank
        assert later == [0, 7], rank


# ------------------------------------------------------------------------------------------------- CUDA


def _slow_fill(stream, x, value):
    """Fill ``x`` with ``value`` on ``stream`` after ~50 ms of GPU time: a reader that does not wait for the
    stream sees the old values."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        x.fill_(value)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("n", [1, 3])
def test_cuda_futures_joined_by_all_done_cover_the_kernels_that_fill_them(n):
    """Each value is filled on its own stream behind a long kernel; the joined future's callback, on the side
    stream, must see every value filled, and the training (current) stream must not have waited for them."""
    device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device)
    futures, values = [], []
    for i in range(n):
        stream = torch.cuda.Stream(device)
        x = torch.zeros(1 << 20, device=device)
        _slow_fill(stream, x, i + 1)
        fut = new_future([device])
        with torch.cuda.stream(stream):
            fut.set_result(x)  # its event is recorded on that stream, after the fill
        futures.append(fut)
        values.append(x)
    joined = all_done(futures, [device], side)

    def total(f):
        with on_stream(side):
            return torch.stack([v.sum() for v in f.value()])

    sums = joined.then(total).wait()  # wait(): the current stream waits for the callback's kernels
    assert sums.tolist() == [float((i + 1) * (1 << 20)) for i in range(n)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_the_training_stream_does_not_wait_for_a_decode_on_the_side_stream():
    """A callback's kernels go to the side stream: the current stream stays free (query() True) while the side
    stream still works."""
    device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    fut = new_future([device])
    fut.set_result(torch.ones(4, device=device))

    def slow(f):
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
        return f.value()

    fut.then(slow)
    assert torch.cuda.current_stream(device).query()  # nothing queued on the training stream
    assert not side.query()
    torch.cuda.synchronize(device)


def _hook_syncs(rank, world, kind):
    """DDP with gradcomp's hook on cuda:0 (NCCL): the host syncs in one step's backward after warm-up, under
    ``torch.cuda.set_sync_debug_mode("warn")``, and the step's weights against the same step on the CPU."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradcomp

    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    net = DDP(model, device_ids=[0], bucket_cap_mb=0.1)
    method = gradcomp.DGC(density=0.01, warmup_steps=0) if kind == "dgc" else gradcomp.get(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **gradcomp.sgd_settings(method, 0.9))
    state = gradcomp.register_ddp_hook(net, method, optimizer=opt)
    x, y = torch.randn(64, 256, device=device), torch.randint(0, 10, (64,), device=device)
    syncs = []
    for step in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        if step == 3:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss.backward()
            torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        else:
            loss.backward()
        if not state.step_skipped:
            opt.step()
    return {"syncs": syncs, "bytes": state.comm.bytes_sent}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("kind", ["dgc", "topk", "none"])
def test_a_hook_step_on_cuda_syncs_the_host_at_most_once(kind):
    """The budget: one host read per step (the non-finite verdict), whatever the method."""
    out = spawn(_hook_syncs, 1, kind, backend="nccl", timeout_s=120)[0]
    assert out["bytes"] > 0
    assert len(out["syncs"]) <= 1, out["syncs"]
