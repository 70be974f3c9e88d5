"""Worker functions for test_no_hang.py: ranks that die, stall or never join (module level, so spawned
processes can import them)."""

import os
import signal
import time

import torch
import torch.distributed as dist

FOREVER = 3600.0


def note_pid(pid_dir, rank):
    """Leave this worker's process id in ``pid_dir`` (the test checks that none is left running)."""
    if pid_dir is not None:
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def mark(pid_dir, what):
    """Note when (time.monotonic: one clock for every process on Linux) the fault happened."""
    if pid_dir is not None:
        with open(os.path.join(pid_dir, what), "w") as f:
            f.write(repr(time.monotonic()))


def _die(how, pid_dir=None):
    mark(pid_dir, "fault_at")
    if how == "exit":
        os._exit(3)  # no Python cleanup, no report: as a crash in C++ or an OOM kill would leave it
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sigsegv":
        os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError(f"unknown way to die: {how!r}")


def die_in_collective(rank, world, bad_rank, how, pid_dir=None, steps_before=3):
    """Every rank all-reduces in a loop; ``bad_rank`` dies abruptly after ``steps_before`` of them, while the
    others are already inside the next one."""
    note_pid(pid_dir, rank)
    t = torch.ones(1 << 10)
    for step in range(1000):
        if rank == bad_rank and step == steps_before:
            time.sleep(0.5)  # the others are waiting in the all-reduce by now
            _die(how, pid_dir)
        dist.all_reduce(t)
        t.fill_(1.0)
    return float(t[0])


def stall_in_collective(rank, world, bad_rank, pid_dir=None):
    """``bad_rank`` sleeps forever after one all-reduce; the others wait for it in the next one."""
    note_pid(pid_dir, rank)
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == bad_rank:
        mark(pid_dir, "fault_at")
        time.sleep(FOREVER)
    dist.all_reduce(t)
    return float(t[0])


def stall_rank_1_before_init(rank):
    """``before_init`` hook: rank 1 never reaches init_process_group."""
    if rank == 1:
        time.sleep(FOREVER)


def quick_all_reduce(rank, world):
    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t[0])


def everyone_stalls(rank, world, pid_dir=None):
    """Every rank sleeps outside any collective: only the launcher's whole-run deadline can stop it."""
    note_pid(pid_dir, rank)
    time.sleep(FOREVER)


def dgc_train_then_die(rank, world, bad_rank, how, pid_dir=None, die_at=3, steps=40):
    """The digits MLP trained through DDP + gradcomp's DGC hook; ``bad_rank`` dies abruptly at step
    ``die_at`` (after its forward pass, so the others are in the hook's collectives of that step)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradcomp
    from conftest import batches, ce, mlp
    from dist_workers import digits64

    x, y = digits64()
    model = mlp()
    net = DDP(model)
    gradcomp.register_ddp_hook(net, gradcomp.DGC(density=0.05, warmup_epochs=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (xb, yb) in enumerate(batches(x, y, 64, steps)):
        shard = (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])
        opt.zero_grad()
        loss = ce(net, shard)
        if rank == bad_rank and step == die_at:
            time.sleep(0.5)
            _die(how, pid_dir)
        loss.backward()
        opt.step()
    return float(loss)


def dgc_optimizer_then_stall(rank, world, bad_rank, pid_dir=None, stall_at=3, steps=40):
    """gradcomp.DistributedOptimizer with DGC; ``bad_rank`` stalls forever at step ``stall_at``."""
    import gradcomp
    from conftest import batches, ce, mlp
    from dist_workers import digits64

    x, y = digits64()
    model = mlp()
    opt = gradcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                        gradcomp.DGC(density=0.05, warmup_epochs=0))
    for step, (xb, yb) in enumerate(batches(x, y, 64, steps)):
        if rank == bad_rank and step == stall_at:
            mark(pid_dir, "fault_at")
            time.sleep(FOREVER)
        opt.zero_grad()
        ce(model, (xb.tensor_split(world)[rank], yb.tensor_split(world)[rank])).backward()
        opt.step()
    return True


def callbacks_running_at_exit(rank, world):
    """Return while a daemon ``threading.Timer`` completes a torch future whose Python ``then`` callbacks are
    still running when the worker exits (as comm.py's latency emulation can leave them).  Interpreter
    finalization stops such a thread with pthread_exit inside C++ frames: SIGABRT, "terminate called without
    an active exception", after a run that succeeded."""
    import threading

    from torch.futures import Future

    t = torch.ones(1)
    dist.all_reduce(t)
    fut = Future()

    def slow(f):
        time.sleep(0.001)  # lets the GIL go: the main thread goes on exiting
        return f.value() + 1

    keep = [fut.then(slow) for _ in range(2000)]  # ~2 s of callbacks
    timer = threading.Timer(0.05, fut.set_result, args=(t,))
    timer.daemon = True
    timer.start()
    callbacks_running_at_exit.keep = keep
    time.sleep(0.2)  # the callbacks are running now, on the timer's thread
    return float(t[0])
