"""``gradcomp bench latency``: delayed gradient averaging and FedAvg against emulated network latency.

This machine's kernel has no ``netem``, so the latency is emulated: every
collective completes no earlier than L ms after it was issued
(``Communicator(emulate_latency_ms=L)``); the bytes travel over loopback.
Real gloo ranks train a small MLP; each step also sleeps ``compute`` seconds,
standing in for a larger model's forward and backward.  For each latency the
step time of synchronous SGD (DGA with delay 0), DGA with delay D and FedAvg
with period K is printed as a ratio to the same method's step time without
latency, measured in the same run.  DGA hides the latency when D steps of
computation cover it (``D * step >= L``); synchronous SGD pays about L every
step and FedAvg about L every K steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from gradcomp.dga import DelayedGradientAveraging, FedAvg
from gradcomp.launch import spawn

from ..reproduce.common import Check, Context, Result, Study, markdown_table, register


def step_time(kind: str, param: int, latency_ms: float, steps: int, model: torch.nn.Module,
              loss_fn: Callable[[torch.nn.Module], torch.Tensor], delay: int = 0) -> float:
    """Seconds per training step of ``model`` on this rank under ``latency_ms`` of emulated latency.

    Each step is ``loss_fn(model).backward()`` and the step of the wrapper ``kind`` names, around SGD (lr 0.01);
    after the last step the wrapper's pending averages are finished and the ranks meet at a barrier.  The first
    ``param + delay + 1`` steps are not timed.  Needs an initialized process group (every rank calls it alike).

    Args:
        kind: ``"dga"`` (:class:`~gradcomp.dga.DelayedGradientAveraging`) or ``"fedavg"``
            (:class:`~gradcomp.dga.FedAvg`).
        param: DGA's delay in steps (0: synchronous SGD), or FedAvg's period in steps.
        latency_ms: the latency each collective is held back by (``emulate_latency_ms``), in milliseconds.
        steps: the steps run, timed ones included; more than ``param + delay + 1``.
        model: the model trained (its parameters are updated).
        loss_fn: this rank's loss of the model, recomputed every step.
        delay: FedAvg only: the steps its averages are applied late.

    Returns:
        The mean wall-clock seconds per step over the timed steps, on this rank.
    """
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = (FedAvg(sgd, model.named_parameters(), param, delay=delay, emulate_latency_ms=latency_ms)
           if kind == "fedavg" else
           DelayedGradientAveraging(sgd, model.named_parameters(), param, emulate_latency_ms=latency_ms))
    stamps = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        stamps.append(time.perf_counter())
    opt.finish()
    dist.barrier()
    skip = param + delay + 1
    return (stamps[-1] - stamps[skip - 1]) / (steps - skip)


def _worker(rank: int, world: int, plan: list[tuple[str, int, float]], compute_s: float, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        time.sleep(compute_s)  # the rest of a larger model's forward and backward
        return torch.nn.functional.cross_entropy(m(x), y)

    step_time("dga", 0, 0.0, 4, model, loss_fn)  # warm-up, not timed: first collectives, allocations
    return [step_time(kind, param, latency, steps, model, loss_fn) for kind, param, latency in plan]


def run(ctx: Context) -> Result:
    """``gradcomp bench latency``: the step time of synchronous SGD, DGA and FedAvg under each emulated latency.

    Args:
        ctx: the run's variant (``full``: 4 ranks, latencies 0, 50, 100 and 200 ms, 25 ms of stand-in
            computation per step, 60 steps; quick: 2 ranks, 0 and 150 ms, 20 ms, 24 steps).

    Returns:
        The report: each method's milliseconds per step (the slowest rank's) at each latency and its ratio to
        the same method at L = 0, the checks (synchronous SGD pays L every step; DGA hides a latency its delay
        covers), and as data the seconds and ratios.
    """
    latencies: tuple[float, ...]
    if ctx.full:
        world, latencies, compute_s, delay, period, steps = 4, (0.0, 50.0, 100.0, 200.0), 0.025, 10, 10, 60
    else:
        world, latencies, compute_s, delay, period, steps = 2, (0.0, 150.0), 0.02, 10, 10, 24
    methods = [("synchronous SGD (DGA delay 0)", "dga", 0), (f"DGA, delay {delay}", "dga", delay),
               (f"FedAvg, period {period}", "fedavg", period)]
    plan = [(kind, param, latency) for latency in latencies for _, kind, param in methods]
    per_rank = spawn(_worker, world, plan, compute_s, steps, timeout_s=900, threads=1)
    seconds = {key: max(r[i] for r in per_rank) for i, key in enumerate(plan)}  # the slowest rank sets the pace

    body, ratios = [], {}
    for label, kind, param in methods:
        base = seconds[(kind, param, 0.0)]
        row = [label]
        for latency in latencies:
            t = seconds[(kind, param, latency)]
            ratios[(kind, param, latency)] = t / base
            row.append(f"{1e3 * t:.1f} ms ({t / base:.2f}x)")
        body.append(row)
    table = markdown_table(["method", *[f"L = {lat:g} ms" for lat in latencies]], body,
                           align="l" + "r" * len(latencies))

    sync = seconds[("dga", 0, 0.0)]
    covered = [lat for lat in latencies if lat and delay * sync >= lat / 1e3]
    checks = []
    # A synchronous step is the computation plus the wait for its average, max(L, the exchange): it takes
    # at least the stand-in computation + L whatever the machine's load (the emulation's promise).
    for lat in latencies[1:]:
        t = seconds[("dga", 0, lat)]
        checks.append(Check(f"L = {lat:g} ms: synchronous SGD pays L every step (its step >= {1e3 * compute_s:g} "
                            "ms of computation + L)", t >= compute_s + lat / 1e3, f"{1e3 * t:.1f} ms"))
    for lat in covered:
        if ctx.full:  # the goal, against DGA's own step without latency
            checks.append(Check(f"L = {lat:g} ms, D x step >= L: DGA's step within 15 % of its zero-latency step",
                                ratios[("dga", delay, lat)] <= 1.15, f"{ratios[('dga', delay, lat)]:.2f}x"))
        else:  # CI: the behaviour only (a busy machine moves the baselines): most of L is hidden
            t, sync_t = seconds[("dga", delay, lat)], seconds[("dga", 0, lat)]
            checks.append(Check(f"L = {lat:g} ms, D x step >= L: DGA hides most of the latency synchronous SGD "
                                "pays (its step is shorter by more than L / 2)", t < sync_t - lat / 2e3,
                                f"{1e3 * t:.1f} vs {1e3 * sync_t:.1f} ms"))
    notes = [
        "Latency is emulated (no netem on this kernel): a collective's result is released no earlier than L ms "
        "after it was issued; rounds in flight overlap their latency as on a real link. Bandwidth is loopback's.",
        f"Zero-latency step: {1e3 * sync:.1f} ms ({1e3 * compute_s:.0f} ms of it the stand-in computation), so "
        f"DGA with delay {delay} covers up to {1e3 * delay * sync:.0f} ms of latency.",
        "Synchronous SGD waits for every average: about L per step. FedAvg averages every "
        f"{period} steps: about L / {period} per step. DGA waits for the average of {delay} steps ago, which has "
        "arrived when D steps take longer than L.",
    ]
    title = "Delayed gradient averaging under emulated latency: step time against the same method without latency"
    markdown = "\n".join(["## Step time (slowest rank) and ratio to L = 0", "", table, "", "## Notes", "",
                          *[f"- {n}" for n in notes], ""])
    setup = [f"{world} gloo ranks on this machine, a 256-256-10 MLP, batch 32 per rank, plus {1e3 * compute_s:g} ms "
             f"of sleep per step; {steps} steps per method and latency, the first D + 1 (K + 1) not timed"]
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks, plots=[],
                  setup=setup, data={"seconds": {f"{k}-{p}-{lat:g}": t for (k, p, lat), t in seconds.items()},
                                     "ratios": {f"{k}-{p}-{lat:g}": r for (k, p, lat), r in ratios.items()},
                                     "world": world, "compute_s": compute_s, "delay": delay, "period": period})


register(Study("latency", "DGA, FedAvg and synchronous SGD under emulated latency: step-time ratios", run, order=5,
               kind="bench", threads=1))
