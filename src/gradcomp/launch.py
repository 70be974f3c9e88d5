"""Start N local worker processes joined by a real gloo (or NCCL) process group.

Used by ``gradcomp train`` to run its own workers and by the multi-process
tests.  Every worker runs ``fn(rank, world_size, *args)``; its return value
comes back to the parent.

On GPUs (``device="cuda"``) each process gets one: local rank ``r`` makes
``cuda:r`` (under torchrun ``cuda:LOCAL_RANK``) its current device before it
joins, and the NCCL group is bound to it (``device_id``), so NCCL's barriers
and object collectives, which run on the current device, use that GPU and no
other.  :func:`device_kind` resolves ``"auto"`` and refuses ``"cuda"`` where
there are not enough GPUs, before any process starts.

No hang.  One knob, ``timeout_s`` (of :func:`spawn` and of
:func:`init_from_env`), bounds how long any rank waits for a peer: in
``init_process_group`` (a rank that never joins), in every collective (a
rank that stalls or died) and in the final barrier.  A rank whose wait runs
out raises; a rank that dies closes its sockets, so its peers raise at once
("Connection closed by peer").  The parent watches every worker's result pipe
and process: on the first failure it gives the others :data:`GRACE_S` seconds
to report their own errors, then kills whoever is left, reaps every process
and raises :class:`WorkerError` saying, rank by rank and in the order it
happened, who raised what, who died of which signal, who never joined and
who was still running.  ``deadline_s`` optionally bounds the whole run too
(for ranks that all stall outside any collective, which no peer can see).
Each worker also exits if the parent dies, so no orphan is left behind.

Teardown order matters.  A gloo process that exits while collectives are
pending, or that destroys its group while a peer is still inside a
collective, aborts in C++.  So each worker waits for its own work, meets the
others in a barrier, and only then destroys the process group
(:func:`shutdown`).  Destroying the group must also end gloo's worker
threads.  A worker thread marks a collective complete and only then drops its
last reference to it; the collective's tensors have Python objects, so
dropping them takes the GIL.  If the interpreter is already finalizing, the
GIL is refused and the thread is stopped with ``pthread_exit``, whose
unwinding through that C++ destructor aborts the process: "terminate called
without an active exception" (SIGABRT) after a run that succeeded, now and
then (the main thread has to reach finalization first).  The threads end
when the group's C++ object is freed (it joins them with the GIL released,
so a thread still letting go of a collective finishes first), and it is not
freed while anything still refers to it: a live DDP model does, and so, for
good, do the default arguments (``group=group.WORLD``) of
:mod:`torch.distributed.nn.functional`, which DDP imports the first time it
is built, after the group exists.
gradcomp imports that module itself, before any group exists (importing
this module does it), so DDP does not pin the group; :func:`shutdown` frees
what only reference cycles hold and warns when a gloo thread outlives
``destroy_process_group`` anyway.

Ctrl-C.  SIGINT in a worker raises ``KeyboardInterrupt`` once (a second one is ignored): a terminal
signals the parent and every worker, and the parent forwards it to the workers that have not reported
within ``GRACE_S / 2``, listens up to ``GRACE_S`` for their reports and raises :class:`WorkerInterrupted`
(a ``KeyboardInterrupt``) with each rank's exception in one line.

Workers started here also leave with ``os._exit`` after flushing their
output and running their ``atexit`` handlers, skipping the interpreter's
finalization: a thread that runs Python code from C++ while the interpreter
finalizes (a torch future's ``then`` callback, or a ``threading.Timer`` that
completes a future, as latency emulation does in :mod:`gradcomp.comm`) is
stopped the same way.
"""

from __future__ import annotations

import atexit
import faulthandler
import gc
import io
import logging
import multiprocessing as mp
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 - before any process group exists: see the module docstring

__all__ = ["WorkerError", "WorkerInterrupted", "DEVICES", "DeviceKind", "DeviceRequest", "check_master_port",
           "device_kind", "free_port", "spawn",
           "init_from_env", "shutdown", "gloo_threads", "GRACE_S"]

#: Seconds the parent keeps listening after the first failure, so the other ranks' errors (a peer that died
#: makes them raise at once) are reported too, before it kills whoever is left.
GRACE_S = 2.0


class WorkerError(RuntimeError):
    """One or more workers failed, hung past the timeout, died or never joined; the message says which.

    ``str()`` is the whole report: a line per failed rank, the cause first, then each rank's traceback.
    ``summary`` is the one line to show a user: how many failed, and the cause.

    Args:
        message: the whole report.
        summary: the one line (default: the report's first line).
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or (message.splitlines() or [""])[0]


class WorkerInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped the workers.

    Args:
        reports: each rank that reported an exception on its way out, mapped to that exception in one line
            (e.g. ``"KeyboardInterrupt"``); kept as ``reports``.
    """

    def __init__(self, reports: dict[int, str]) -> None:
        super().__init__("; ".join(f"rank {r}: {line}" for r, line in sorted(reports.items())))
        self.reports = dict(reports)


#: What a job may ask to train on: ``auto`` is CUDA where every local rank gets a GPU of its own, else the CPU.
DeviceRequest = Literal["auto", "cpu", "cuda"]
#: The values of :data:`DeviceRequest`, for the checks at run time.
DEVICES: tuple[DeviceRequest, ...] = get_args(DeviceRequest)
#: What a job trains on (:func:`device_kind`'s answer, :func:`spawn`'s ``device``).
DeviceKind = Literal["cpu", "cuda"]


def device_kind(requested: DeviceRequest, local_ranks: int) -> DeviceKind:
    """The device, ``"cpu"`` or ``"cuda"``, that ``local_ranks`` processes on this machine train on.

    On CUDA, local rank ``r`` trains on ``cuda:r`` (one NCCL rank per GPU), so
    ``"cuda"`` needs as many visible GPUs as local ranks; ``"auto"`` is CUDA
    where that holds and the CPU (gloo) where it does not.  The same on every
    rank of a machine: a job's ranks must agree on the backend.

    Args:
        requested: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        local_ranks: the number of processes on this machine.

    Returns:
        ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: ``requested`` is not one of :data:`DEVICES`, or is ``"cuda"`` where CUDA is absent or has
            fewer GPUs than local ranks.

    Example:
        >>> from gradcomp.launch import device_kind
        >>> device_kind("cpu", 4)
        'cpu'
        >>> device_kind("tpu", 4)
        Traceback (most recent call last):
        ...
        ValueError: device must be one of auto, cpu, cuda, got 'tpu'
    """
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cpu" or (requested == "auto" and not 0 < local_ranks <= gpus):
        return "cpu"
    if gpus == 0:
        raise ValueError("device='cuda', but CUDA is not available here (torch.cuda.is_available() is False); "
                         "use 'cpu' or 'auto'")
    if local_ranks > gpus:
        raise ValueError(f"device='cuda' needs one GPU per local rank: {local_ranks} ranks on this machine, "
                         f"{gpus} GPU(s) visible")
    return "cuda"


def _bind(device: torch.device) -> dict[str, Any]:
    """Make ``device`` this process's current device when it is a GPU (NCCL's object collectives and barriers
    run on the current device) and return the ``init_process_group`` keywords that bind the group to it
    (``device_id``: NCCL then forms its communicator at once, on that GPU)."""
    if device.type != "cuda":
        return {}
    gpus = torch.cuda.device_count()
    if device.index is None or not 0 <= device.index < gpus:
        raise ValueError(f"local device {device} does not exist: {gpus} GPU(s) visible (one per local rank)")
    torch.cuda.set_device(device)
    return {"device_id": device}


def free_port() -> int:
    """A TCP port that is free on this machine now, for a rendezvous on 127.0.0.1.

    The port is only free when this returns: another process may take it before it is used.

    Returns:
        The port number, chosen by the OS.

    Example:
        >>> from gradcomp.launch import free_port
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_master_port() -> None:
    """Before a torchrun-style rank 0 serves the rendezvous on ``MASTER_PORT`` (``RANK=0`` without torchrun's
    agent store): a ``ValueError`` naming the port when it is not a port or is in use on this machine, instead
    of an EADDRINUSE traceback from ``init_process_group``.  Other ranks, and ranks under torchrun, whose
    agent serves the rendezvous, are not checked.

    Raises:
        ValueError: ``MASTER_PORT`` is not a port number, or is in use on this machine.
    """
    if os.environ.get("RANK") != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    text = os.environ.get("MASTER_PORT")
    if text is None:
        return  # init_process_group names what is missing
    try:
        port = int(text)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"MASTER_PORT={text!r} is not a port number (1-65535)") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store's server does
        try:
            s.bind(("", port))
        except OSError as error:
            raise ValueError(f"MASTER_PORT={port} is in use on this machine ({error.strerror}): rank 0 serves "
                             "the rendezvous there; choose a free port") from None


def shutdown() -> None:
    """Leave the process group cleanly (see the module docstring): no emulated-latency round still completing
    a future, a barrier (no peer still inside a collective), then destroy the group, freeing what only
    reference cycles hold first so that gloo's worker threads end with it.  Warns if one does not: something
    still refers to the group (a DDP model not deleted?) and the interpreter's exit may abort.

    Call it on every rank at the end of a ``torchrun`` script (the workers of :func:`spawn` call it
    themselves).  Without a process group it only waits for the emulated-latency rounds.

    Example:
        >>> import torch.distributed as dist, gradcomp
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> gradcomp.shutdown()
        >>> dist.is_initialized()
        False
    """
    from .comm import LATENCY_THREAD

    for thread in threading.enumerate():
        if thread.name == LATENCY_THREAD:
            thread.join()
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    left = gloo_threads()
    if left:
        warnings.warn(f"{left} gloo worker thread(s) outlived destroy_process_group: something still refers to the "
                      "process group (a DDP model not deleted?), and this process may abort at exit "
                      "(\"terminate called without an active exception\"); delete it before shutdown()",
                      RuntimeWarning, stacklevel=2)


def gloo_threads() -> int:
    """How many gloo worker threads (``ProcessGroupGloo::runLoop``, named ``pt_gloo_runloop`` by torch) this
    process has, as the OS lists them.

    Returns:
        The count; 0 off Linux (no ``/proc``).
    """
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except OSError:  # the thread ended meanwhile
            pass
    return count


def init_from_env(backend: str | None = None, timeout_s: float = 300.0, device: DeviceRequest = "auto"
                  ) -> tuple[int, int]:
    """Join a ``torchrun`` launch (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set).

    ``timeout_s`` is how long this rank waits for its peers, at the rendezvous
    and in every collective, before it raises instead of hanging (a peer that
    died, stalled or never joined).  torchrun then stops the other ranks.

    ``device`` is one of :data:`DEVICES` (``"auto"``: CUDA where every one
    of the ``LOCAL_WORLD_SIZE`` ranks on this machine gets a GPU, see
    :func:`device_kind`).  On CUDA this rank works on ``cuda:LOCAL_RANK``: it
    becomes the current device and the group is bound to it (``device_id``),
    and ``backend`` defaults to NCCL; on the CPU, to gloo.

    Args:
        backend: the ``torch.distributed`` backend (None: NCCL on CUDA, gloo on the CPU).
        timeout_s: how long this rank waits for its peers, in seconds (> 0).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(rank, world_size)``.

    Raises:
        ValueError: a bad ``timeout_s`` or ``device``, or ``"cuda"`` without a GPU per local rank.

    Example:
        In a script started with ``torchrun --nproc-per-node 4 train.py`` (not run here):

        .. code-block:: python

            rank, world_size = init_from_env(timeout_s=60)
            ...  # train
            gradcomp.shutdown()
    """
    _check_timeout("timeout_s", timeout_s)
    device = device_kind(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    bound = _bind(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device == "cuda"
                  else torch.device("cpu"))
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one store for all restarts (pytorch/pytorch#135712): the keys the killed attempt's ranks
        # wrote (each rank's address) are still there, and a restarted rank that reads one before its peer
        # overwrites it connects to a dead port.  Each attempt gets keys of its own.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        store = dist.PrefixStore(f"gradcomp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **bound)
    else:
        dist.init_process_group(backend, timeout=timeout, **bound)
    return dist.get_rank(), dist.get_world_size()


def _check_timeout(field: str, value: float | None, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    if not ok:
        raise ValueError(f"{field} must be a finite number of seconds > 0{' or None' if optional else ''}, "
                         f"got {value!r}")


# ------------------------------------------------------------------ worker side


def _context(fn: Callable[..., Any]) -> Any:
    """Workers are forked from a server that imported torch and ``fn``'s module once (about 0.1 s a start instead
    of the 2-3 s a fresh interpreter takes to import them); ``spawn`` where there is no fork server (Windows)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    preload = ["torch", "torch.distributed", __name__]
    if fn.__module__ != "__main__":  # a script is not imported again: its top level may not be guarded
        preload.append(fn.__module__)
    ctx.set_forkserver_preload(preload)
    return ctx


def _start_server(ctx: Any) -> None:
    """Start the fork server, if not yet running, with SIGINT ignored, which it inherits: it ignores SIGINT
    itself only once its imports (torch) are done, and a Ctrl-C before that killed it with a traceback.  The
    workers it forks install their own handler (:func:`_interrupt_once`)."""
    if ctx.get_start_method() != "forkserver" or threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import forkserver

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _exit_with_parent() -> None:
    """A daemon thread that ends this worker if the parent dies (no orphan left waiting in a collective)."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(70)

    threading.Thread(target=watch, name="gradcomp-parent-watch", daemon=True).start()


def _leave(code: int) -> None:
    """Exit now, without the interpreter's finalization (see the module docstring), output flushed first."""
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
                pass
    finally:
        os._exit(code)


def _worker(rank: int, world_size: int, address: str, port: int, backend: str, device: str, timeout_s: float,
            fn: Callable, args: tuple, conn: Connection, threads: int, before_init: Callable[[int], None] | None,
            environ: dict[str, str], crash_log: str | None = None) -> None:
    os.environ.clear()  # the parent's environment now, not the one the fork server started with
    os.environ.update(environ)
    # a crash in C++ (SIGSEGV, SIGABRT) still prints every thread's Python stack: to crash_log when given
    if crash_log is not None:
        faulthandler.enable(file=open(crash_log, "a"))  # noqa: SIM115 - kept open
    else:
        faulthandler.enable()
    _exit_with_parent()
    signal.signal(signal.SIGINT, _interrupt_once)
    _no_tqdm_semaphore()
    torch.set_num_threads(threads)
    phase = "before_init"
    code = 0
    try:
        if before_init is not None:
            before_init(rank)
        phase = "init"
        bound = _bind(torch.device("cuda", rank) if device == "cuda" else torch.device("cpu"))
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **bound)
        conn.send(("joined", None))
        phase = "run"
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)
        conn.send(("ok", buf.getvalue()))
        phase = "shutdown"
        shutdown()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second SIGINT (the parent forwards it) must not cut the report
        code = 1
        try:
            conn.send(("error", (phase, traceback.format_exc())))
        except OSError:  # the parent is gone
            pass
    conn.close()
    _leave(code)


def _no_tqdm_semaphore() -> None:
    """tqdm makes a multiprocessing lock (a named semaphore) for its first bar; a worker killed holding one makes
    the resource tracker warn of a "leaked semaphore" when the job ends, after its report.  Each worker writes
    only its own bars, so its thread lock is enough."""
    try:
        from tqdm.std import TqdmDefaultWriteLock
    except ImportError:
        return
    if not hasattr(TqdmDefaultWriteLock, "mp_lock"):
        TqdmDefaultWriteLock.mp_lock = None


def _interrupt_once(signum: int, frame: Any) -> None:
    """A worker's SIGINT handler: KeyboardInterrupt the first time, then ignored (Ctrl-C in a terminal signals
    the worker and the parent, and the parent forwards it to workers that have not answered)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


# ------------------------------------------------------------------ parent side


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by signal {name} (exit code {code})"
    return f"exited with code {code}"


_WHERE = {"before_init": "in before_init, before joining the process group",
          "init": "while joining the process group (init_process_group)",
          "run": "while running", "shutdown": "after reporting its result, while leaving the process group"}


#: The line naming an exception in a traceback; what torch wraps around one raised in a future's callback
#: (pybind11's "Unable to cast ... to Tensor" when the callback's value was to become a tensor); and the C++
#: source location gloo puts before its messages.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Interrupted)\b")
_CALLBACK_WRAP = re.compile(r"^(?:(?:[A-Za-z_][\w.]*(?:Error|Exception): )?"
                            r"(?:Unable to cast |Got the following error when running the callback: ))+")
_SOURCE_LOCATION = re.compile(r"^\[[^\]\s]+\.(?:cc|cpp|h|hpp):\d+\] ")
#: The advice gloo appends to a read error ("This is typically caused by a remote worker hanging ... GLHF!").
_GLOO_ADVICE = re.compile(r" This is typically caused by .*$")


def _exception_line(tb: str) -> str:
    """The exception of a formatted traceback, in one line: the first line of the last exception (after the
    last frame; torch appends "At:", the callbacks' frames and " to Tensor" to an error raised in a future's
    callback), unwrapped from the callbacks, without gloo's C++ source location and advice."""
    lines = tb.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = lines[frames[-1] + 1:] if frames else lines
    first = next((line for line in after if _EXCEPTION_LINE.match(line)), None)
    if first is None:
        first = next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1] if lines else "")
    name, sep, message = first.partition(": ")
    message = _CALLBACK_WRAP.sub("", message)
    if _EXCEPTION_LINE.match(message):  # the wrapped exception names itself
        name, sep, message = message.partition(": ")
    message = _GLOO_ADVICE.sub("", _SOURCE_LOCATION.sub("", message))
    return (f"{name}{sep}{message}" if sep else name).strip() or "an exception"


class _Rank:
    """What the parent knows of one worker."""

    def __init__(self, rank: int, proc: Any, conn: Connection) -> None:
        self.rank, self.proc = rank, proc
        self.conn: Connection | None = conn  # None once closed
        self.joined = False
        self.result: bytes | None = None
        self.error: tuple[str, str] | None = None  # (phase, traceback)
        self.failed_at: float | None = None  # when the parent learnt of its failure
        self.exited_at: float | None = None
        self.stopped: str | None = None  # why the launcher killed it

    def receive(self, now: float) -> None:
        assert self.conn is not None  # called for the open ranks only
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):  # the process is gone and every message has been read
            self.close(now)
            return
        if kind == "joined":
            self.joined = True
        elif kind == "ok":
            self.result = value
        else:
            self.error = value
            self.failed_at = self.failed_at or now

    def close(self, now: float) -> None:
        assert self.conn is not None  # closed once
        self.conn.close()
        self.conn = None
        if self.error is None and self.result is None and self.failed_at is None:
            self.failed_at = now  # died without a word

    def describe(self, timeout_s: float) -> tuple[str, str]:
        """(one line, details) for a failed rank."""
        r, code = self.rank, self.proc.exitcode
        if self.error is not None:
            phase, tb = self.error
            last = _exception_line(tb)
            hint = ""
            if "timed out" in tb.lower() or "timeout" in last.lower():
                hint = f" (a peer did not answer within timeout_s={timeout_s:g} s)"
            line = f"rank {r} raised {_WHERE.get(phase, phase)}{hint}: {last}"
            return line, tb.rstrip()
        if self.stopped is not None:
            if not self.joined:
                line = (f"rank {r} never joined the process group: still in before_init or init_process_group "
                        f"{self.stopped}; the launcher killed it")
            elif self.result is not None:
                line = (f"rank {r} reported its result but was still waiting in the final barrier {self.stopped}; "
                        f"the launcher killed it")
            else:
                line = f"rank {r} did not finish: still running (stalled?) {self.stopped}; the launcher killed it"
            return line, ""
        if self.result is not None:
            return f"rank {r} reported its result but then {_describe_exit(code)} while leaving the process group", ""
        where = "during the run" if self.joined else "before joining the process group"
        return f"rank {r} died {where} without reporting: {_describe_exit(code)}", ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.stopped is None and self.result is not None and self.proc.exitcode == 0


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None, device: DeviceKind = "cpu",
          timeout_s: float = 120.0, threads: int | None = None, address: str = "127.0.0.1",
          before_init: Callable[[int], None] | None = None, deadline_s: float | None = None,
          crash_log: str | os.PathLike | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results by rank.

    ``fn`` must be importable (a module-level function).  ``address`` is
    where rank 0 serves the rendezvous; ``before_init(rank)`` (importable
    too) runs in each worker before it joins the group (the network
    benchmark moves each worker into its own network namespace there).

    ``device="cuda"`` puts rank ``r`` on ``cuda:r`` (its current device, to
    which the group is bound) and ``backend`` then defaults to NCCL; on the
    CPU (the default) to gloo.

    ``timeout_s`` is the configurable timeout: how long a rank waits for a
    peer (to join, inside a collective, in the final barrier) before it
    raises.  A rank that dies fails the job at once; one that stalls or never
    joins fails it about ``timeout_s`` seconds after its peers started
    waiting for it; either way :func:`spawn` then kills the others and raises
    :class:`WorkerError` saying what happened to each rank.  ``deadline_s``
    (None: no limit) bounds the whole run as well, for the one hang no peer
    sees: every rank stalled outside any collective.

    ``crash_log``: a file each worker that crashes in C++ appends every thread's Python stack to
    (:mod:`faulthandler`) instead of writing it to stderr, where it would bury the report.

    Args:
        fn: the function every worker runs, ``fn(rank, world_size, *args)``; importable.
        world_size: the number of workers (>= 1).
        *args: more arguments of ``fn`` (picklable).
        backend: the ``torch.distributed`` backend (None: NCCL on CUDA, gloo on the CPU).
        device: ``"cpu"`` or ``"cuda"`` (one GPU per rank).
        timeout_s: how long a rank waits for a peer, in seconds (> 0).
        threads: torch's intra-op threads in each worker (None: the CPUs shared out).
        address: where rank 0 serves the rendezvous.
        before_init: run in each worker, with its rank, before it joins the group (importable).
        deadline_s: a bound on the whole run, in seconds (None: none).
        crash_log: see above (None: stderr).

    Returns:
        Each worker's return value, in rank order.

    Raises:
        ValueError: a bad setting (``world_size`` < 1, a timeout that is not a number of seconds > 0, a
            device that is not ``"cpu"`` or ``"cuda"``, ``"cuda"`` without a GPU per rank).
        WorkerError: a worker failed, hung past the timeout, died or never joined (the message says which).
        WorkerInterrupted: Ctrl-C stopped the workers.

    Example:
        Not run here (starting the workers takes seconds):

        .. code-block:: python

            import operator
            from gradcomp.launch import spawn

            spawn(operator.add, 4)  # each worker returns rank + world_size: [4, 5, 6, 7]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    _check_timeout("timeout_s", timeout_s)
    _check_timeout("deadline_s", deadline_s, optional=True)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        device_kind("cuda", world_size)  # one GPU per rank, else a ValueError saying so
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = _context(fn)
    _start_server(ctx)
    port = free_port()
    ranks: list[_Rank] = []
    interrupted = False
    try:
        for r in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(r, world_size, address, port, backend, device, timeout_s, fn, args,
                                                     writer, threads, before_init, dict(os.environ),
                                                     None if crash_log is None else os.fspath(crash_log)),
                              daemon=True)
            ranks.append(_Rank(r, proc, reader))
            proc.start()
            writer.close()  # the child holds its own copy: the reader sees EOF when the child is gone
        start = time.monotonic()
        try:
            _watch(ranks, start, deadline_s)
        except KeyboardInterrupt:
            _interrupt(ranks)
            interrupted = True
    finally:
        for w in ranks:
            if w.proc.is_alive():
                w.proc.kill()
            if w.proc.pid is not None:  # started (Ctrl-C may stop the loop above in proc.start())
                w.proc.join()
            if w.conn is not None:
                w.conn.close()
    if interrupted:
        raise WorkerInterrupted({w.rank: _exception_line(w.error[1]) for w in ranks if w.error is not None})
    failed = [w for w in ranks if not w.ok]
    if failed:
        # the causes first: who died, then who raised (by time), then who the launcher had to stop
        failed.sort(key=lambda w: (w.stopped is not None, w.error is not None, w.failed_at or 0.0, w.rank))
        described = [w.describe(timeout_s) for w in failed]
        lines = [f"{len(failed)} of {world_size} workers failed (timeout_s={timeout_s:g}):"]
        lines += [f"  {line}" for line, _ in described]
        for w, (_, details) in zip(failed, described):
            if details:
                lines.append(f"--- rank {w.rank}:\n{details}")
        raise WorkerError("\n".join(lines),
                          summary=f"{len(failed)} of {world_size} workers failed: {described[0][0]}")
    results = []
    for w in ranks:
        assert w.result is not None  # every rank is ok
        results.append(torch.load(io.BytesIO(w.result), weights_only=False))
    return results


def _interrupt(ranks: list[_Rank]) -> None:
    """SIGINT (Ctrl-C) reached the parent: give the workers a moment to report it too (a terminal signals
    them all), forward it to those that did not, and listen up to GRACE_S for their reports (the caller kills
    whoever is left).  A second SIGINT here ends the wait."""
    end = time.monotonic() + GRACE_S
    forwarded = False
    while any(w.conn is not None for w in ranks):
        now = time.monotonic()
        if now >= end:
            break
        if not forwarded and now >= end - GRACE_S / 2:
            forwarded = True
            for w in ranks:
                if w.conn is not None and w.error is None and w.proc.is_alive():
                    try:
                        os.kill(w.proc.pid, signal.SIGINT)
                    except ProcessLookupError:
                        pass
        open_ranks = [w for w in ranks if w.conn is not None]
        limit = (end - GRACE_S / 2 if not forwarded else end) - now
        ready = wait([w.conn for w in open_ranks if w.conn is not None], timeout=max(0.0, min(limit, 0.5)))
        for w in open_ranks:
            if w.conn in ready:
                w.receive(time.monotonic())
    for w in ranks:  # those that reported are on their way out (atexit handlers take a moment on a busy machine)
        if w.error is not None:
            w.proc.join(timeout=max(0.0, end + 2 * GRACE_S - time.monotonic()))


def _watch(ranks: list[_Rank], start: float, deadline_s: float | None) -> None:
    """Listen to the workers until every one has exited, or until GRACE_S after the first failure, or past the
    deadline; mark the ones still running as stopped (the caller kills them)."""
    first_failure: float | None = None
    reason = ""
    while any(w.conn is not None for w in ranks):
        now = time.monotonic()
        if first_failure is not None and now - first_failure >= GRACE_S:
            reason = f"{now - first_failure:.1f} s after the first failure"
            break
        if deadline_s is not None and now - start >= deadline_s:
            reason = f"when the run's deadline_s={deadline_s:g} s was reached"
            break
        limit = 0.5
        if first_failure is not None:
            limit = min(limit, GRACE_S - (now - first_failure))
        if deadline_s is not None:
            limit = min(limit, deadline_s - (now - start))
        open_ranks = [w for w in ranks if w.conn is not None]
        ready = wait([w.conn for w in open_ranks if w.conn is not None] + [w.proc.sentinel for w in open_ranks],
                     timeout=max(0.0, limit))
        now = time.monotonic()
        for w in open_ranks:
            if w.conn in ready:
                w.receive(now)
            if w.exited_at is None and w.proc.exitcode is not None:
                w.exited_at = now
            if w.conn is not None and w.exited_at is not None and now - w.exited_at > 1.0 and not w.conn.poll():
                w.close(now)  # exited, yet the pipe stays open: a process it started holds the other end
            if w.proc.exitcode not in (None, 0) and w.failed_at is None:
                w.failed_at = now  # exited abnormally after reporting its result
            if w.failed_at is not None:
                first_failure = min(first_failure or w.failed_at, w.failed_at)
    if not reason:  # every pipe is closed: the workers are on their way out
        for w in ranks:
            w.proc.join(timeout=5.0)
        reason = "5 s after it closed its result pipe"
    for w in ranks:
        if w.proc.is_alive():
            w.stopped = reason
            w.failed_at = w.failed_at or time.monotonic()
