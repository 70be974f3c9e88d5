"""Real bandwidth-limited links between local workers: Linux network namespaces and ``tc tbf``.

:class:`ShapedLinks` puts each of N workers in its own network namespace,
joins them with veth pairs to one bridge, and limits each worker's egress
with a token bucket filter (``tc qdisc add dev VETH root tbf rate RATE``).
The bytes really cross a link at that rate; latency cannot be shaped here
(the kernel has no ``netem``), so none is added.  Needs root and iproute2.

Everything is torn down when the ``with`` block ends, whether it ends
normally, by an exception, by Ctrl-C or by SIGTERM; names carry the process
id, so two runs never collide and a leftover is easy to spot
(``ip netns list | grep ^gc``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["ShapedLinks", "NetworkSetupError", "enter_namespace", "parse_rate"]

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


class NetworkSetupError(RuntimeError):
    """The shaped network could not be built here (not root, no iproute2, a command failed)."""


def parse_rate(rate: str) -> int:
    """``"1gbit"`` -> 1_000_000_000 bits per second (tc's units: bit, kbit, mbit, gbit; powers of 1000).

    Args:
        rate: a positive number and a unit, as ``tc`` writes it: ``"100mbit"``, ``"1gbit"``, ``"2.5gbit"``
            (case and surrounding blanks ignored).

    Returns:
        The rate in bits per second (a fractional rate is truncated to whole bits).

    Raises:
        ValueError: ``rate`` is not a string of that form, or its number is 0.
    """
    match = _RATE.match(rate.strip().lower()) if isinstance(rate, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"rate must look like 100mbit, 1gbit or 10gbit, got {rate!r}")
    return int(float(match.group(1)) * _SCALE[match.group(2)])


def enter_namespace(name: str) -> None:
    """Move the calling thread (a fresh worker process, before it opens sockets) into network namespace ``name``.

    Args:
        name: a namespace made by ``ip netns add`` (its handle is ``/var/run/netns/NAME``).

    Raises:
        OSError: the namespace does not exist (``FileNotFoundError``), or ``setns`` failed (not root: ``EPERM``);
            the message names the namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"cannot enter network namespace {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class ShapedLinks:
    """N namespaces on one bridge, each worker's egress limited to ``rate``.

    Nothing is built until the ``with`` block is entered; leaving it deletes every namespace and link made.
    Worker ``r`` has address ``10.213.S.(r + 1)`` on its veth ``gc{tag}v{r}`` inside namespace ``gc{tag}r{r}``,
    ``S`` derived from the tag; its egress is a ``tbf`` of ``rate`` with a burst of 1 ms of tokens (at least
    16 KiB).

    >>> with ShapedLinks(4, "1gbit") as links:
    ...     links.address(0), links.namespace(1), links.interface(1)
    ('10.213.X.1', 'gc12345r1', 'gc12345v1')

    Args:
        workers: the number of workers, 1 to 250.
        rate: each worker's egress rate in tc's units (``"100mbit"``, ``"1gbit"``, ...; :func:`parse_rate`).
        tag: the names' tag (digits); by default the last 5 digits of this process's id, so two runs never
            collide.

    Raises:
        ValueError: ``workers`` is not an integer in [1, 250], or ``rate`` is not a rate.
        NetworkSetupError: on entering the ``with`` block: not root, ``ip`` or ``tc`` not found, or an ``ip`` or
            ``tc`` command failed (what was built is torn down first).
    """

    def __init__(self, workers: int, rate: str, *, tag: str | None = None) -> None:
        if not isinstance(workers, int) or workers < 1 or workers > 250:
            raise ValueError(f"workers must be an integer in [1, 250], got {workers!r}")
        self.workers = workers
        self.rate = rate
        self.bits_per_second = parse_rate(rate)
        self.tag = tag or f"{os.getpid() % 100000:05d}"
        self._subnet = f"10.213.{int(self.tag) % 250}"
        self._created: list[tuple[str, str]] = []  # ("netns" | "link", name), for teardown
        self._old_handlers: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}

    # -- names --------------------------------------------------------------

    def namespace(self, rank: int) -> str:
        """The name of a worker's network namespace.

        Args:
            rank: the worker, 0 to ``workers - 1``.

        Returns:
            ``gc{tag}r{rank}``.
        """
        return f"gc{self.tag}r{rank}"

    def interface(self, rank: int) -> str:
        """The worker's end of its veth pair, inside its namespace (for ``GLOO_SOCKET_IFNAME``).

        Args:
            rank: the worker, 0 to ``workers - 1``.

        Returns:
            The interface's name, ``gc{tag}v{rank}``.
        """
        return f"gc{self.tag}v{rank}"

    def address(self, rank: int) -> str:
        """A worker's IPv4 address on the bridge (rank 0's is the rendezvous address given to ``spawn``).

        Args:
            rank: the worker, 0 to ``workers - 1``.

        Returns:
            The dotted address, ``10.213.S.(rank + 1)``.
        """
        return f"{self._subnet}.{rank + 1}"

    @property
    def bridge(self) -> str:
        """The name of the bridge that joins the workers' links, ``gc{tag}br``."""
        return f"gc{self.tag}br"

    def before_init(self) -> functools.partial:
        """For :func:`gradcomp.launch.spawn`: each worker enters its namespace and makes gloo use its link.

        Returns:
            A picklable call of ``rank`` that moves the worker into its namespace (:func:`enter_namespace`) and
            sets ``GLOO_SOCKET_IFNAME`` to its interface.
        """
        return functools.partial(_join, tuple(self.namespace(r) for r in range(self.workers)),
                                 tuple(self.interface(r) for r in range(self.workers)))

    # -- set-up and teardown --------------------------------------------------

    def __enter__(self) -> ShapedLinks:
        if os.geteuid() != 0:
            raise NetworkSetupError("shaping links needs root (network namespaces and tc); run as root")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise NetworkSetupError(f"{tool!r} was not found: install iproute2")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._interrupted)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def _run(self, *args: str) -> None:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise NetworkSetupError(f"`{' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")

    def _build(self) -> None:
        # 1 ms of tokens (at least 16 KiB): a bigger bucket lets small messages through at the veth's own speed
        # (with 4 ms, a 256 KB all-gather between 2 ranks beat the 1 Gbit/s line rate)
        burst = max(self.bits_per_second // 8 // 1000, 16384)
        self._run("ip", "link", "add", self.bridge, "type", "bridge")
        self._created.append(("link", self.bridge))
        self._run("ip", "link", "set", self.bridge, "up")
        for rank in range(self.workers):
            ns, inside, outside = self.namespace(rank), self.interface(rank), f"gc{self.tag}p{rank}"
            self._run("ip", "netns", "add", ns)
            self._created.append(("netns", ns))
            self._run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            self._created.append(("link", outside))  # deleting one end deletes the pair
            self._run("ip", "link", "set", outside, "master", self.bridge)
            self._run("ip", "link", "set", outside, "up")
            self._run("ip", "link", "set", inside, "netns", ns)
            self._run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(rank)}/24", "dev", inside)
            self._run("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
            self._run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self._run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inside, "root", "tbf",
                      "rate", self.rate, "burst", str(burst), "latency", "100ms")
        log.info("shaped links up: %d namespaces on %s, %s each", self.workers, self.bridge, self.rate)

    def close(self) -> None:
        """Delete every namespace and link this object made (idempotent; errors are logged, not raised)."""
        while self._created:
            kind, name = self._created.pop()
            args = ("ip", "netns", "del", name) if kind == "netns" else ("ip", "link", "del", name)
            done = subprocess.run(args, capture_output=True, text=True, timeout=30)
            if done.returncode != 0 and "Cannot find" not in done.stderr and "No such" not in done.stderr:
                log.warning("teardown: `%s` failed: %s", " ".join(args), done.stderr.strip())
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this tag that still exist (empty after a clean teardown).

        Returns:
            Their names, namespaces first, as ``ip netns list`` and ``ip link show`` list them.
        """
        found = []
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        found += [line.split()[0] for line in ns.splitlines() if line.startswith(f"gc{self.tag}")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
        found += [m for m in re.findall(r"^\d+: ([^:@]+)", links, flags=re.M) if m.startswith(f"gc{self.tag}")]
        return found


def _join(namespaces: tuple[str, ...], interfaces: tuple[str, ...], rank: int) -> None:
    enter_namespace(namespaces[rank])
    os.environ["GLOO_SOCKET_IFNAME"] = interfaces[rank]
