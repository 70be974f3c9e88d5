"""The step-time model: a step's seconds on a link of a given speed, from its compute time and the bytes each
worker sends (the usual ring-algorithm costs of all-reduce and all-gather)."""

from __future__ import annotations

import math
from typing import Literal, get_args

__all__ = ["COLLECTIVES", "Collective", "DEFAULT_LINKS_GBPS", "estimate_step_time"]


#: How a method's payloads are combined, for the step-time model (:func:`estimate_step_time`).
Collective = Literal["allreduce", "allgather"]
#: The values of :data:`Collective`, for the checks at run time.
COLLECTIVES: tuple[Collective, ...] = get_args(Collective)
DEFAULT_LINKS_GBPS = (1.0, 10.0)


def estimate_step_time(compute_s: float, bytes_per_step: float, workers: int, link_gbps: float,
                       collective: Collective, *, latency_s: float = 0.0) -> float:
    """Seconds per step on a link of ``link_gbps`` Gbit/s: ``compute_s + communication``.

    ``bytes_per_step`` is what one worker contributes per step (its payloads,
    counted exactly), and every worker is taken to contribute the same amount.
    With N workers, bandwidth B = ``link_gbps * 1e9 / 8`` bytes/s per worker
    (full duplex) and per-message latency ``latency_s`` (alpha), the usual
    ring-algorithm costs are:

    - ``"allreduce"`` (dense, fp16, PowerSGD factors, shared-scale ternary):
      reduce-scatter then all-gather, each worker sends ``2 (N-1)/N * bytes``
      in ``2 (N-1)`` messages::

          t_comm = 2 (N-1)/N * bytes / B + 2 (N-1) * alpha

    - ``"allgather"`` (sparse payloads, which cannot be summed on the way):
      each worker receives every other worker's payload, ``(N-1) * bytes``,
      in ``N-1`` messages::

          t_comm = (N-1) * bytes / B + (N-1) * alpha

    One worker communicates nothing.  The model is deliberately simple: no
    overlap of communication with backward (an upper bound for methods that
    overlap), no congestion, and compression cost is assumed to be inside
    ``compute_s`` (it is, when ``compute_s`` is a measured step time).

    Args:
        compute_s: the step's seconds without communication (>= 0).
        bytes_per_step: what one worker contributes per step (>= 0).
        workers: N (>= 1).
        link_gbps: the link's speed in Gbit/s (finite, > 0).
        collective: ``"allreduce"`` or ``"allgather"``.
        latency_s: the per-message latency alpha, in seconds (>= 0).

    Returns:
        The estimated seconds per step.

    Raises:
        ValueError: a value out of range, or an unknown collective.

    Example:
        A 1 MB sparse payload of each of 4 workers, gathered over 1 Gbit/s, after 100 ms of compute:

        >>> from gradcomp.train.cost import estimate_step_time
        >>> round(estimate_step_time(0.1, 1e6, workers=4, link_gbps=1.0, collective="allgather"), 6)
        0.124
    """
    if not (isinstance(compute_s, (int, float)) and compute_s >= 0):
        raise ValueError(f"compute_s must be >= 0 seconds, got {compute_s!r}")
    if not (isinstance(bytes_per_step, (int, float)) and bytes_per_step >= 0):
        raise ValueError(f"bytes_per_step must be >= 0, got {bytes_per_step!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not (isinstance(link_gbps, (int, float)) and link_gbps > 0 and math.isfinite(link_gbps)):
        raise ValueError(f"link_gbps must be a finite number > 0, got {link_gbps!r}")
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
    if not (isinstance(latency_s, (int, float)) and latency_s >= 0):
        raise ValueError(f"latency_s must be >= 0 seconds, got {latency_s!r}")
    n = workers
    bandwidth = link_gbps * 1e9 / 8.0
    if collective == "allreduce":
        volume, messages = 2.0 * (n - 1) / n * bytes_per_step, 2 * (n - 1)
    else:
        volume, messages = (n - 1) * bytes_per_step, n - 1
    return float(compute_s) + volume / bandwidth + messages * latency_s
