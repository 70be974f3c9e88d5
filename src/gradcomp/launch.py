"""Start N local worker processes joined by a real gloo (or NCCL) process group.

Used by ``gradcomp train`` to run its own workers and by the multi-process
tests.  Every worker runs ``fn(rank, world_size, *args)``; its return value
comes back to the parent.  The parent bounds the whole run in time: a worker
that fails, hangs or dies makes :func:`spawn` terminate the others and raise
:class:`WorkerError` with every rank's outcome, instead of waiting forever.

Teardown order matters.  A gloo process that exits while collectives are
pending, or that destroys its group while a peer is still inside a
collective, aborts in C++ ("terminate called without an active
exception").  So each worker waits for its own work, meets the others in a
barrier, and only then destroys the process group and exits.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["WorkerError", "free_port", "spawn", "init_from_env", "shutdown"]


class WorkerError(RuntimeError):
    """One or more workers failed, hung past the timeout, or died."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave the process group cleanly: barrier (no peer still inside a collective), then destroy."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join a ``torchrun`` launch (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _worker(rank: int, world_size: int, address: str, port: int, backend: str, timeout_s: float, fn: Callable,
            args: tuple, results: mp.Queue, threads: int, before_init: Callable[[int], None] | None) -> None:
    faulthandler.enable()  # a crash in C++ (SIGSEGV, SIGABRT) still prints every thread's Python stack
    torch.set_num_threads(threads)
    try:
        if before_init is not None:
            before_init(rank)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
        shutdown()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 120.0,
          threads: int | None = None, address: str = "127.0.0.1",
          before_init: Callable[[int], None] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results by rank.

    ``fn`` must be importable (a module-level function).  ``address`` is
    where rank 0 serves the rendezvous; ``before_init(rank)`` (importable
    too) runs in each worker before it joins the group (the network
    benchmark moves each worker into its own network namespace there).  Raises
    :class:`WorkerError` if any worker raises, exits abnormally or does not
    finish within ``timeout_s`` seconds (the collectives' own timeout is the
    same, so a rank stuck in a collective fails rather than hangs).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, address, port, backend, timeout_s, fn, args, results,
                                               threads, before_init), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 30
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.2)
                outcomes[rank] = (ok, value)
                if not ok:
                    break
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    time.sleep(0.5)  # let a failing worker's report arrive
                    if results.empty():
                        break
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()) if all(ok for ok, _ in outcomes.values()) else 1.0)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    while not results.empty():
        rank, ok, value = results.get_nowait()
        outcomes.setdefault(rank, (ok, value))
    failed = {r: v for r, (ok, v) in outcomes.items() if not ok}
    missing = [r for r in range(world_size) if r not in outcomes]
    bad_exit = [r for r, p in enumerate(procs) if p.exitcode not in (0, None) and r not in failed]
    if failed or missing or bad_exit:
        lines = [f"{len(failed) + len(missing)} of {world_size} workers failed"]
        for r, tb in sorted(failed.items()):
            lines.append(f"--- rank {r} raised:\n{tb.rstrip()}")
        for r in missing:
            lines.append(f"--- rank {r} gave no result (exit code {procs[r].exitcode}; killed after the timeout "
                         f"if None or -9)")
        for r in bad_exit:
            lines.append(f"--- rank {r} exited with code {procs[r].exitcode} after reporting")
        raise WorkerError("\n".join(lines))
    return [torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(world_size)]
