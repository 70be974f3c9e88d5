"""Moving payloads between ranks with ``torch.distributed``.

A :class:`Communicator` drives the exchange generators of one bucket of
tensors (see :meth:`gradcomp.Method.exchange`) and issues, per round, one
collective per kind of payload:

* ``"sum"`` / ``"max"`` payloads: their tensors are flattened into one buffer
  per dtype and all-reduced together;
* ``"gather"`` payloads: their tensors are viewed as bytes, concatenated into
  one buffer and all-gathered with ``all_gather_single``.  gloo needs
  equal sizes on every rank; ``variable`` payloads (threshold, Dryden, AdaComp) first
  all-gather their lengths, then pad to the longest.

Every round but the last waits in the calling thread, so all ranks issue
their collectives in the same order; the last round completes
asynchronously and its decoding runs in the future's callback, so
communication overlaps the rest of the backward pass
(:meth:`Communicator.exchange`), or on the thread that waits for it, later
(:meth:`Communicator.exchange_later`, for delayed gradient averaging).

CUDA streams: every future that carries CUDA tensors is made with its
devices (``Future(devices=...)``), so whoever waits on it, DDP included,
waits for the kernels that fill them.  No callback calls ``wait()``: the
futures of a round's collectives are joined by :func:`all_done`, whose
callbacks only make one side stream wait for each collective's kernels.  The
work done in callbacks (decoding, writing gradients, putting memory back)
runs on that side stream (:func:`on_stream`), so the training stream never
waits for a collective, and the host never waits for the device there.

Latency emulation (experiments only): this machine's kernel has no
``netem``, so network latency cannot be shaped.  ``emulate_latency_ms=L``
makes each round's result available no earlier than L ms after the round was
issued: a delay on completion measured from issue time, so rounds in flight
at once overlap their latency as on a real link.  Bandwidth stays real (see
``gradcomp bench network``); reports that use this say the latency is
emulated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from .compressors.base import Payload
from .method import MethodExchange

__all__ = ["Communicator", "Pending", "all_done", "check_latency", "new_future", "on_stream"]

log = logging.getLogger(__name__)

#: The name of the threads that complete latency-emulated rounds (:func:`gradcomp.launch.shutdown` waits for them).
LATENCY_THREAD = "gradcomp-emulated-latency"

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

#: All-gather of equal-sized tensors into one: ``all_gather_single`` where torch has it (2.13 deprecates
#: ``all_gather_single`` with a FutureWarning), else its older name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_latency(emulate_latency_ms: float) -> float:
    """Check an emulated latency.

    Args:
        emulate_latency_ms: the latency to emulate, in milliseconds.

    Returns:
        ``emulate_latency_ms`` as a float.

    Raises:
        ValueError: it is not a finite number >= 0 (bools are not numbers here); the message names it.
    """
    ok = isinstance(emulate_latency_ms, (int, float)) and not isinstance(emulate_latency_ms, bool)
    if not (ok and math.isfinite(emulate_latency_ms) and emulate_latency_ms >= 0):
        raise ValueError(f"emulate_latency_ms must be a finite number >= 0, got {emulate_latency_ms!r}")
    return float(emulate_latency_ms)


def cuda_devices(tensors: Iterable[Tensor]) -> list[torch.device]:
    """The CUDA devices ``tensors`` are on, in a fixed order (what a future carrying them must be made with).

    Args:
        tensors: any tensors.

    Returns:
        Their CUDA devices, each once, sorted by name; empty for CPU tensors.
    """
    return sorted({t.device for t in tensors if t.is_cuda}, key=str)


def new_future(devices: Sequence[torch.device] = ()) -> Future:
    """A future for values on ``devices`` (CUDA ones: whoever waits on it waits for their kernels too).

    Args:
        devices: the CUDA devices of the tensors it will carry (none: a plain CPU future).

    Returns:
        A new, incomplete ``torch.futures.Future``.
    """
    return Future(devices=list(devices)) if devices else Future()


def _done(value: Any, devices: Sequence[torch.device] = ()) -> Future:
    fut = new_future(devices)
    fut.set_result(value)
    return fut


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block's kernels on the side ``stream`` (None: where they are).

    The side stream first waits for the current one (in a future's callback:
    the stream synchronized with that future's kernels), and the current one
    then waits for it, so the future a callback completes covers the block's
    kernels too.  Neither wait blocks the host.

    Args:
        stream: the side stream (:meth:`Communicator.stream`), or None to leave the block's kernels where
            they are (CPU tensors).
    """
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def all_done(futures: Sequence[Future], devices: Sequence[torch.device] = (),
             stream: torch.cuda.Stream | None = None) -> Future:
    """A future of ``futures``' values, completed when every one is (with the first error, if any).

    With CUDA futures (their tensors on ``devices``), ``stream`` (the side stream) waits for each one's
    kernels as it completes and the result is marked complete after it: no
    ``wait()``, no host sync.  Unlike ``torch.futures.collect_all``, whose
    CPU future would hand on CUDA tensors with no record of their kernels.

    Args:
        futures: the futures to join.
        devices: the CUDA devices of their tensors (none: CPU).
        stream: the side stream that waits for each one's kernels (None: CPU).

    Returns:
        A future of the list of their values, in order; it holds the first error instead if any failed.

    Example:
        >>> from torch.futures import Future
        >>> from gradcomp.comm import all_done
        >>> first, second = Future(), Future()
        >>> both = all_done([first, second])
        >>> first.set_result(1)
        >>> both.done()
        False
        >>> second.set_result(2)
        >>> both.wait()
        [1, 2]
    """
    out = new_future(devices)
    left, errors, lock = [len(futures)], [], threading.Lock()

    def one(f: Future) -> None:
        try:
            f.value()  # complete: raises its error, never blocks
        except Exception as error:  # noqa: BLE001 - handed on through ``out``
            errors.append(error)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # synchronized with f's kernels
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if not last:
            return
        if errors:
            out.set_exception(errors[0])
            return
        if stream is not None:
            torch.cuda.current_stream(stream.device).wait_stream(stream)  # out's events then cover every future
        out.set_result([f.value() for f in futures])

    if not futures:
        out.set_result([])
    for f in futures:
        f.add_done_callback(one)
    return out


def _not_before(fut: Future, deadline: float, devices: Sequence[torch.device] = (),
                stream: torch.cuda.Stream | None = None) -> Future:
    """A future with ``fut``'s result (or error) that completes no earlier than ``deadline`` (time.monotonic);
    CUDA tensors in it (on ``devices``) stay covered: ``stream`` waits for ``fut``'s kernels, and the result
    is marked complete from it."""
    out = new_future(devices)

    def settle(f: Future) -> None:
        try:
            value = f.value()
        except Exception as error:  # noqa: BLE001 - handed on to whoever waits
            out.set_exception(error)
            return
        with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
            out.set_result(value)  # its events are recorded on the side stream, which waited for f's

    def relay(f: Future) -> None:
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        delay = deadline - time.monotonic()
        if delay <= 0:
            settle(f)
            return
        timer = threading.Timer(delay, settle, args=(f,))
        timer.name, timer.daemon = LATENCY_THREAD, True
        timer.start()

    fut.add_done_callback(relay)
    return out


class Pending:
    """An exchange whose last round may still be in flight (:meth:`Communicator.exchange_later`).

    :meth:`wait` waits for it and finishes it on the calling thread (decoding,
    memory updates), once; later calls return the same result.

    Args:
        fut: the future of the last round's collectives.
        finish: what turns that completed future into the exchange's result (run once, by :meth:`wait`).
    """

    def __init__(self, fut: Future, finish: Callable[[Future], dict[str, Tensor]]) -> None:
        self._fut, self._finish = fut, finish
        self._result: dict[str, Tensor] | None = None

    def done(self) -> bool:
        """Whether :meth:`wait` would return without waiting for the network.

        Returns:
            True once the last round's collectives have completed (or :meth:`wait` has run).
        """
        return self._result is not None or self._fut.done()

    def wait(self) -> dict[str, Tensor]:
        """Wait for the last round and finish the exchange on this thread (the first call only).

        Returns:
            ``{name: averaged tensor}``, the same dict on every call.
        """
        if self._result is None:
            self._fut.wait()
            self._result = self._finish(self._fut)
        return self._result


def _as_bytes(t: Tensor) -> Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)


def _from_bytes(raw: Tensor, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    return raw.clone().view(dtype).view(shape)  # clone: a fresh, aligned allocation


class Communicator:
    """Collectives on ``process_group`` (None: the default group).

    ``bytes_sent`` counts the payload bytes this rank put on the wire,
    summed over every round (the lengths of variable payloads not included).
    ``emulate_latency_ms`` delays each round's completion (see the module
    docstring; for experiments only).

    Args:
        process_group: the group to communicate on (None: the default group).
        emulate_latency_ms: the latency each round's completion is delayed by, in milliseconds (0: none).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        ValueError: ``emulate_latency_ms`` is not a finite number >= 0.

    Example:
        In a process group of one:

        >>> import torch.distributed as dist
        >>> from gradcomp.comm import Communicator
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> comm = Communicator()
        >>> comm.rank, comm.world_size, comm.bytes_sent
        (0, 1, 0)
        >>> comm.all_objects({"density": 0.01}), comm.count_per_rank(3)
        ([{'density': 0.01}], [3])
        >>> dist.destroy_process_group()
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, emulate_latency_ms: float = 0.0) -> None:
        check_latency(emulate_latency_ms)
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
        self.latency = emulate_latency_ms / 1e3
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.bytes_sent = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stream(self, devices: Sequence[torch.device]) -> torch.cuda.Stream | None:
        """The side stream this communicator's callbacks run their kernels on (see :func:`on_stream`).

        Args:
            devices: the CUDA devices of the tensors (:func:`cuda_devices`); the first one's stream is used.

        Returns:
            The stream of the first device, made at first use; None for CPU tensors (no device).
        """
        if not devices:
            return None
        device = devices[0]
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _delayed(self, fut: Future, issued: float, devices: Sequence[torch.device]) -> Future:
        """``fut``, completing no earlier than the emulated latency after ``issued``."""
        return _not_before(fut, issued + self.latency, devices, self.stream(devices)) if self.latency else fut

    # -- agreement (control traffic: not payloads, not counted in bytes_sent) --------

    def all_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``: one ``all_gather_object`` (control traffic, not in ``bytes_sent``).

        Args:
            obj: something small and picklable.

        Returns:
            Every rank's ``obj``, in rank order.
        """
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, obj, group=self.group)
        return every

    def count_per_rank(self, count: int, device: torch.device | str = "cpu") -> list[int]:
        """Every rank's ``count``, waited for (:meth:`count_per_rank_async`).

        Args:
            count: this rank's count (it must fit an int32).
            device: where the all-reduce runs (``"cuda"`` under NCCL).

        Returns:
            Every rank's count, in rank order.
        """
        counts = self.count_per_rank_async(torch.tensor(count, dtype=torch.int32, device=device))
        return counts.wait().tolist()

    def count_per_rank_async(self, count: Tensor) -> Future:
        """Every rank's ``count``, without reading it on the host: one all-reduce (latency emulated).

        Args:
            count: a one-entry integer tensor, on the device the all-reduce runs on.

        Returns:
            A future of an int32 tensor of ``world_size`` entries on ``count``'s device, in rank order.
        """
        counts = torch.zeros(self.world_size, dtype=torch.int32, device=count.device)
        counts[self.rank] = count.reshape(())  # a copy on the device
        issued = time.monotonic()
        fut = dist.all_reduce(counts, group=self.group, async_op=True).get_future().then(lambda f: f.value()[0])
        return self._delayed(fut, issued, cuda_devices([counts]))

    # -- driving generators ---------------------------------------------------

    def exchange(self, gens: Mapping[str, MethodExchange]) -> Future:
        """Run one bucket's exchanges: every round but the last now, the last one asynchronously.

        Args:
            gens: the exchange generators of the bucket's tensors (:meth:`gradcomp.Method.exchange`), by name.

        Returns:
            A future of ``{name: averaged tensor}``, decoded in its callback, on the side stream.
        """
        fut, finish, devices = self._start(gens)
        stream = self.stream(devices)

        def decode(f: Future) -> dict[str, Tensor]:
            with on_stream(stream):
                return finish(f)

        return fut.then(decode)

    def exchange_later(self, gens: Mapping[str, MethodExchange]) -> Pending:
        """As :meth:`exchange`, but the last round is decoded by whoever calls ``wait()``, on that thread.

        Args:
            gens: the exchange generators of the tensors, by name.

        Returns:
            The exchange in flight; its :meth:`Pending.wait` gives ``{name: averaged tensor}``.
        """
        fut, finish, _ = self._start(gens)
        return Pending(fut, finish)

    def _start(self, gens: Mapping[str, MethodExchange]
               ) -> tuple[Future, Callable[[Future], dict[str, Tensor]], list[torch.device]]:
        """Run every round but the last; the last round's future, the function that finishes it and the CUDA
        devices of its payloads."""
        results: dict[str, Tensor] = {}
        pending = self._advance(gens, dict.fromkeys(gens), results)
        while pending:
            fut = self._launch(pending)
            live = {name: gens[name] for name in pending}
            if all(p.last for p in pending.values()):
                def finish(f: Future, live: dict = live) -> dict[str, Tensor]:
                    more = self._advance(live, f.value(), results)
                    if more:
                        raise RuntimeError(f"exchange of {sorted(more)} went on after a payload marked last")
                    return results

                return fut, finish, cuda_devices(t for p in pending.values() for t in p.tensors)
            pending = self._advance(live, fut.wait(), results)
        return _done(None), lambda _: results, []

    @staticmethod
    def _advance(gens: Mapping[str, MethodExchange], received: Mapping[str, Any],
                 results: dict[str, Tensor]) -> dict[str, Payload]:
        pending = {}
        for name, gen in gens.items():
            try:
                pending[name] = gen.send(received[name])
            except StopIteration as stop:
                results[name] = stop.value
        return pending

    # -- one round --------------------------------------------------------------

    def _launch(self, payloads: Mapping[str, Payload]) -> Future:
        """Issue this round's collectives; a future of ``{name: received payloads}``."""
        issued = time.monotonic()
        self.bytes_sent += sum(p.nbytes for p in payloads.values())
        futures, unpackers = [], []
        reduced: dict[tuple, list[str]] = {}
        gathered: list[str] = []
        for name, p in payloads.items():
            if p.op == "gather":
                gathered.append(name)
            else:
                for t in p.tensors:
                    if t.dtype != p.tensors[0].dtype:
                        raise TypeError(f"{name}: the tensors of a {p.op} payload must share one dtype")
                reduced.setdefault((p.op, p.tensors[0].dtype, p.tensors[0].device), []).append(name)
        for (op, _, _), names in reduced.items():
            fut, unpack = self._all_reduce(op, {n: payloads[n] for n in names})
            futures.append(fut)
            unpackers.append(unpack)
        if gathered:
            fut, unpack = self._all_gather({n: payloads[n] for n in gathered})
            futures.append(fut)
            unpackers.append(unpack)

        devices = cuda_devices(t for p in payloads.values() for t in p.tensors)

        def unpack_all(f: Future) -> dict[str, list[Payload]]:
            f.value()  # re-raises a collective's error
            received: dict[str, list[Payload]] = {}
            for unpack in unpackers:
                received.update(unpack())
            return received

        fut = (futures[0] if len(futures) == 1 else all_done(futures, devices, self.stream(devices))).then(unpack_all)
        return self._delayed(fut, issued, devices)

    def _all_reduce(self, op: str, payloads: dict[str, Payload]):
        flat = torch.cat([t.reshape(-1) for p in payloads.values() for t in p.tensors])
        work = dist.all_reduce(flat, op=_REDUCE_OPS[op], group=self.group, async_op=True)

        def unpack() -> dict[str, list[Payload]]:
            out, offset = {}, 0
            for name, p in payloads.items():
                tensors = []
                for t in p.tensors:
                    tensors.append(flat[offset:offset + t.numel()].view(t.shape))
                    offset += t.numel()
                out[name] = [p.replace(*tensors)]
            return out

        return work.get_future(), unpack

    def _all_gather(self, payloads: dict[str, Payload]):
        tensors = [t for p in payloads.values() for t in p.tensors]
        device = tensors[0].device
        local = torch.cat([_as_bytes(t) for t in tensors])
        n = self.world_size
        if any(p.variable for p in payloads.values()):
            numels = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=device)
            every = torch.empty(n * len(tensors), dtype=torch.int64, device=device)
            all_gather_single(every, numels, group=self.group)
            counts = every.view(n, -1).tolist()
        else:
            counts = [[t.numel() for t in tensors]] * n
        sizes = [[c * t.element_size() for c, t in zip(row, tensors)] for row in counts]
        longest = max(sum(row) for row in sizes)
        if local.numel() < longest:
            local = torch.cat([local, local.new_zeros(longest - local.numel())])
        out = torch.empty(n * longest, dtype=torch.uint8, device=device)
        work = all_gather_single(out, local, group=self.group, async_op=True)

        def unpack() -> dict[str, list[Payload]]:
            received: dict[str, list[Payload]] = {name: [] for name in payloads}
            for rank in range(n):
                offset = rank * longest
                i = 0
                for name, p in payloads.items():
                    parts = []
                    for t in p.tensors:
                        shape = t.shape if not p.variable else torch.Size([counts[rank][i]])
                        parts.append(_from_bytes(out[offset:offset + sizes[rank][i]], t.dtype, shape))
                        offset += sizes[rank][i]
                        i += 1
                    received[name].append(p.replace(*parts))
            return received

        return work.get_future(), unpack
