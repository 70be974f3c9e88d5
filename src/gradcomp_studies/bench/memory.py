"""``gradcomp bench memory``: DGC's memory stays bounded over a long run.

Two real gloo ranks (:func:`gradcomp.launch.spawn`) train gradcomp's default
digits model (an MLP, 64-256-128-10, on scikit-learn's bundled 8x8 digits) with
``DistributedDataParallel`` and gradcomp's DDP hook
(:func:`gradcomp.register_ddp_hook`), the path a user takes.  DGC runs with
``steps_per_epoch`` set, so its sparsity warm-up (25 %, 6.25 %, 1.56 %, 0.39 %,
then 0.1 %) advances by itself and ends a quarter of the way through the run.
The baseline is the same loop, in the same run, with the hook's ``"none"``
method (a dense all-reduce) and momentum SGD.

Every step each rank reads its own ``/proc/self/status``: ``VmRSS`` (resident
memory now) and ``VmHWM`` (the peak resident memory of this process so far,
including peaks between two samples).  The check is the issue's: the peak
stops growing after warm-up, i.e. ``VmHWM`` at the end of the run exceeds
``VmHWM`` at the end of the warm-up by less than :data:`TOLERANCE_MB`.  A slow
leak that stays under a peak set earlier is caught by the second check, on
the resident memory *now*: its least-squares slope over the steps after
warm-up, extrapolated over the same number of steps, must stay under the
same tolerance.

Python-level allocations are followed by :mod:`tracemalloc` in a separate
pass (fresh processes, the same training): tracing every allocation slows
this Python-heavy loop down (about 1.5x here) and its own bookkeeping adds to
the resident memory, so it must not run during the RSS pass.  Tensors' storage is not
allocated through Python's allocator and does not show in tracemalloc; a
leak of Python objects (a list of payloads, futures or names that grows every
step) does, to the byte, so its check is much tighter
(:data:`PY_TOLERANCE_KB`).  The tracemalloc pass is as long as the RSS pass.

Full: 2,000 steps, warm-up over the first 500.  Quick (CI): 200 steps, warm-up
over the first 50; most of its time is the eight processes' start-up.  The
real ranks are measured rather than :class:`gradcomp.Simulator` because the
hook's path holds what could leak across steps in a real run (the
communicator's futures, DDP's buckets, gloo's buffers), and each rank's
process holds nothing else.
"""

from __future__ import annotations

import gc
import math
import resource
import sys
import time
import tracemalloc
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradcomp.launch import spawn

from ..reproduce.common import Check, Context, Result, Study, markdown_table, new_figure, register, save_figure

#: allowed growth of the peak resident memory (and of the resident memory's trend) after warm-up, MB: about 1 %
#: of a rank's ~390 MB.  Measured first: the dense baseline's own peak grows by 1.2 to 1.8 MB over the 1,500
#: steps after warm-up (allocators settling) and then levels off; a leak of 3 KB per step would exceed 4 MB.
TOLERANCE_MB = 4.0
#: allowed growth of the live Python heap (tracemalloc after gc.collect()) after warm-up, KB: 40 bytes per
#: step over the full run's 1,500, less than one leaked Python object per step; the samples scatter by ~15 KB
PY_TOLERANCE_KB = 64.0
DENSITY = 0.001
GLOBAL_BATCH = 64


def read_rss_mb() -> tuple[float, float]:
    """(resident memory now, peak resident memory so far) of this process in MB (1 MB = 2**20 bytes).

    Linux: ``VmRSS`` and ``VmHWM`` (never below ``VmRSS``) of ``/proc/self/status``.  Elsewhere the peak comes from
    ``getrusage`` and stands for both.

    Returns:
        ``(now, peak)`` in MB; the peak is never below ``now``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        now, peak = int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
        return now, max(now, peak)  # the kernel's counters are read apart: VmHWM can trail VmRSS by a few pages
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KB elsewhere
        mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
        return mb, mb


def growth_after(values: Sequence[float], warmup: int) -> tuple[float, float]:
    """How much the running maximum of ``values`` grew after the first ``warmup`` samples.

    Args:
        values: the samples in order (peak resident memory per step, in MB, in this benchmark).
        warmup: how many of the first samples are the warm-up.

    Returns:
        ``(absolute, percent)``: ``max(values) - max(values[:warmup])`` in the units of ``values`` (0 when it did
        not grow), and that as a percentage of ``max(values[:warmup])`` (0 when that maximum is 0).

    Raises:
        ValueError: ``warmup`` is not in ``[1, len(values)]``.
    """
    if not 0 < warmup <= len(values):
        raise ValueError(f"warmup must be in [1, {len(values)}], got {warmup}")
    before, after = max(values[:warmup]), max(values)
    return after - before, 100.0 * (after - before) / before if before else 0.0


def trend(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index.

    Args:
        values: the samples in order, one per step.

    Returns:
        The slope in units of ``values`` per sample (MB per step for resident memory); 0.0 for fewer than 2
        samples.
    """
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxy = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    return sxy / sxx


def _train_setup(rank: int, world: int, method_name: str, warmup_steps: int, seed: int):
    """The digits MLP in DDP with gradcomp's hook running ``method_name``; returns (data, ddp, optimizer,
    hook state, steps per epoch)."""
    from torch.nn.parallel import DistributedDataParallel

    from gradcomp.ddp_hook import register_ddp_hook
    from gradcomp.method import DGC
    from gradcomp.train.data import load_dataset, steps_per_epoch
    from gradcomp.train.models import build_model

    torch.manual_seed(seed)
    data = load_dataset("digits")
    model = build_model("mlp", data)
    ddp = DistributedDataParallel(model)
    assert data.y_train is not None  # an image dataset's
    per_epoch = steps_per_epoch(len(data.y_train), GLOBAL_BATCH)
    method: DGC | str
    if method_name == "dgc":
        # the sparsity warm-up, in epochs of the real data, ends after ``warmup_steps`` steps
        method = DGC(density=DENSITY, warmup_epochs=warmup_steps / per_epoch, steps_per_epoch=per_epoch)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, weight_decay=1e-4)
    else:
        method = method_name
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return data, ddp, opt, register_ddp_hook(ddp, method), per_epoch


def _pass(rank: int, world: int, method_name: str, steps: int, warmup_steps: int, seed: int,
          collect_every: int | None) -> dict:
    """One training run of ``steps`` steps on this rank, memory sampled after every step.

    ``collect_every=None``: the RSS pass (nothing traced).  Otherwise the tracemalloc pass: the Python heap
    after every step, and every ``collect_every`` steps its live part (after ``gc.collect()``; between two
    collections the heap also holds garbage that the cyclic collector has not reached yet)."""
    from torch.nn import functional as F

    from gradcomp.train.data import image_batches

    data, ddp, opt, state, per_epoch = _train_setup(rank, world, method_name, warmup_steps, seed)
    trace = collect_every is not None
    # preallocated, so that sampling allocates nothing that stays (tracemalloc would count it)
    rss, peak, py = (array("d", bytes(8 * steps)) for _ in range(3))
    live: array[float] = array("d", bytes(8 * (steps // collect_every))) if collect_every is not None else array("d")
    gc.collect()
    if trace:
        tracemalloc.start()
    loss_first = loss_last = 0.0
    step, epoch, start = 0, 0, time.perf_counter()
    while step < steps:
        for shards in image_batches(data.x_train, data.y_train, GLOBAL_BATCH, world, epoch, seed):
            x, y = shards[rank]
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            if step < per_epoch:
                loss_first += loss.item() / per_epoch
            elif step >= steps - per_epoch:
                loss_last += loss.item() / per_epoch
            rss[step], peak[step] = read_rss_mb()
            step += 1
            if collect_every is not None:  # trace
                py[step - 1] = tracemalloc.get_traced_memory()[0] / 1024
                if step % collect_every == 0:
                    gc.collect()
                    live[step // collect_every - 1] = tracemalloc.get_traced_memory()[0] / 1024
            if step == steps:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    # tracemalloc stays on until the process leaves.  Stopped here, it raced a gloo thread still finishing the
    # last step's future callbacks (pybind11 makes and frees that thread's Python thread state through the
    # raw allocator tracemalloc wraps): a segfault in that thread, "<no Python frame>", in about 1 run in 10
    # on a loaded machine.  That is CPython's python/cpython#128679, fixed in 3.12 and 3.13, not in 3.11.
    return {"rss_mb": list(rss), "peak_mb": list(peak), "py_kb": list(py) if trace else [], "live_kb": list(live),
            "seconds": seconds, "loss_first": loss_first, "loss_last": loss_last,
            "density": getattr(state.method, "current_density", 1.0)}


def _measure(world: int, method: str, steps: int, warmup: int, seed: int, trace_steps: int,
             collect_every: int) -> list[dict]:
    """The RSS pass, then the tracemalloc pass, each in fresh processes; per rank, the RSS pass's samples with
    the tracemalloc pass's heap samples added.  (Both passes in the same processes, one DDP model after the
    other, crashed gloo's threads at the second model's construction: separate processes are also cleaner.)"""
    measured = spawn(_pass, world, method, steps, warmup, seed, None, timeout_s=600, threads=1)
    traced = spawn(_pass, world, method, trace_steps, warmup, seed, collect_every, timeout_s=600, threads=1)
    return [{**m, "py_kb": t["py_kb"], "live_kb": t["live_kb"], "trace_seconds": t["seconds"]}
            for m, t in zip(measured, traced)]


def _summary(r: dict, warmup: int, collect_every: int) -> dict:
    """The figures of one rank's run: peaks at the end of warm-up and of the run, growth, trends."""
    steps = len(r["peak_mb"])
    grown_mb, grown_pct = growth_after(r["peak_mb"], warmup)
    slope = trend(r["rss_mb"][warmup:])  # MB per step
    first = warmup // collect_every  # the first live-heap sample after warm-up (taken at step (first+1)*every)
    live = r["live_kb"]
    live_growth = max(live[first:]) - live[first] if first < len(live) else float("nan")
    return {"peak_warmup_mb": max(r["peak_mb"][:warmup]), "peak_end_mb": max(r["peak_mb"]),
            "growth_mb": grown_mb, "growth_pct": grown_pct, "rss_warmup_mb": r["rss_mb"][warmup - 1],
            "rss_end_mb": r["rss_mb"][-1], "trend_mb_per_1000": 1000 * slope,
            "trend_growth_mb": slope * (steps - warmup), "live_growth_kb": live_growth,
            "ms_per_step": 1e3 * r["seconds"] / steps}


def _plot(runs: dict[str, list[dict]], warmup: int, collect_every: int, path) -> None:
    fig = new_figure(11.0, 4.2)
    rss_ax, py_ax = fig.subplots(1, 2)
    colors = {"dgc": "C3", "none": "0.35"}
    for method, ranks in runs.items():
        for rank, r in enumerate(ranks):
            steps = range(1, len(r["rss_mb"]) + 1)
            style = "-" if rank == 0 else ":"
            rss_ax.plot(steps, r["rss_mb"], color=colors[method], linestyle=style, linewidth=1,
                        label=f"{method}, rank {rank}: RSS")
            rss_ax.plot(steps, r["peak_mb"], color=colors[method], linestyle=style, linewidth=2, alpha=0.35,
                        label=f"{method}, rank {rank}: peak RSS (VmHWM)")
            py_ax.plot(range(1, len(r["py_kb"]) + 1), r["py_kb"], color=colors[method], linestyle=style,
                       linewidth=0.6, alpha=0.5, label=f"{method}, rank {rank}: Python heap")
            py_ax.plot([collect_every * (i + 1) for i in range(len(r["live_kb"]))], r["live_kb"],
                       color=colors[method], linestyle=style, marker="o", markersize=2.5, linewidth=1.2,
                       label=f"{method}, rank {rank}: live after gc.collect()")
    for ax, unit in ((rss_ax, "resident memory (MB)"), (py_ax, "Python heap, tracemalloc (KB)")):
        ax.axvline(warmup, color="C0", linestyle="--", linewidth=1, label="end of DGC's sparsity warm-up")
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize="xx-small", loc="lower right")
    rss_ax.set_title("RSS pass (no tracing): every step, each rank")
    py_ax.set_title("tracemalloc pass (fresh processes, the same training)")
    save_figure(fig, path)


@dataclass(frozen=True)
class _Plan:
    """What a variant measures: steps per method, the warm-up, the traced pass and its live-heap sampling."""

    steps: int
    warmup: int
    trace_steps: int
    collect_every: int  # the traced pass samples the live heap (after gc.collect()) every this many steps
    world: int = 2


def _plan(full: bool) -> _Plan:
    """The full variant's passes, or the quick variant's."""
    return _Plan(2000, 500, 2000, 50) if full else _Plan(120, 30, 60, 15)


def _measure_methods(ctx: Context, plan: _Plan) -> dict[str, list[dict]]:
    """Both passes of DGC, then of the dense baseline: method -> per rank, the samples (:func:`_measure`)."""
    runs = {}
    for method in ("dgc", "none"):
        ctx.echo(f"memory: {method}, {plan.world} gloo ranks, {plan.steps} steps (+ {plan.trace_steps} traced)")
        runs[method] = _measure(plan.world, method, plan.steps, plan.warmup, ctx.seed, plan.trace_steps,
                                plan.collect_every)
    return runs


def _rank_table(runs: dict[str, list[dict]], figures: dict[str, list[dict]]) -> str:
    """The per-rank table: peaks, growth, trends, the live heap, speed, loss and final density."""
    rows = []
    for method, ranks in figures.items():
        for rank, f in enumerate(ranks):
            r = runs[method][rank]
            rows.append([method if rank == 0 else "", str(rank), f"{f['peak_warmup_mb']:.1f}",
                         f"{f['peak_end_mb']:.1f}", f"{f['growth_mb']:+.2f}", f"{f['growth_pct']:+.2f} %",
                         f"{f['rss_warmup_mb']:.1f} -> {f['rss_end_mb']:.1f}", f"{f['trend_mb_per_1000']:+.2f}",
                         f"{f['live_growth_kb']:+.1f}", f"{f['ms_per_step']:.1f}",
                         f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}", f"{r['density']:g}"])
    return markdown_table(["method", "rank", "peak RSS at warm-up end (MB)", "peak RSS at end (MB)",
                           "peak growth after warm-up (MB)", "peak growth (%)", "RSS now: warm-up end -> end (MB)",
                           "RSS trend after warm-up (MB / 1000 steps)",
                           "Python live heap after warm-up: highest - first sample (KB)", "ms / step",
                           "loss, first -> last epoch", "final density"], rows,
                          align="lrrrrrrrrrrr")


def _comparison_table(dgc: dict, base: dict) -> str:
    """DGC's worst rank against the baseline's: peak, peak growth, RSS trend and live heap growth."""
    ratio = dgc["peak_end_mb"] / base["peak_end_mb"]
    growth_ratio = dgc["growth_mb"] / base["growth_mb"] if base["growth_mb"] > 0 else float("inf")
    return markdown_table(
        ["figure (worst rank)", "DGC", "baseline", "DGC / baseline"],
        [["peak RSS at end of run (MB)", f"{dgc['peak_end_mb']:.1f}", f"{base['peak_end_mb']:.1f}", f"{ratio:.3f}x"],
         ["peak growth after warm-up (MB)", f"{dgc['growth_mb']:+.2f}", f"{base['growth_mb']:+.2f}",
          f"{growth_ratio:.2f}x" if math.isfinite(growth_ratio) else "n/a (baseline did not grow)"],
         ["RSS trend after warm-up (MB / 1000 steps)", f"{dgc['trend_mb_per_1000']:+.2f}",
          f"{base['trend_mb_per_1000']:+.2f}", ""],
         ["Python live heap after warm-up: highest - first sample (KB)", f"{dgc['live_growth_kb']:+.1f}",
          f"{base['live_growth_kb']:+.1f}", ""]], align="lrrr")


def _checks(plan: _Plan, dgc_runs: list[dict], dgc: dict, base: dict) -> list[Check]:
    """DGC's peak and trend within :data:`TOLERANCE_MB`, its live heap within :data:`PY_TOLERANCE_KB`, its peak
    growth near the baseline's, and its warm-up ended with training converged."""
    steps, warmup = plan.steps, plan.warmup
    return [
        Check(f"DGC: peak memory stops growing after warm-up (peak RSS grows < {TOLERANCE_MB:g} MB from step "
              f"{warmup} to step {steps}, every rank)", dgc["growth_mb"] < TOLERANCE_MB,
              f"{dgc['growth_mb']:+.2f} MB ({dgc['growth_pct']:+.2f} %); baseline {base['growth_mb']:+.2f} MB"),
        Check(f"DGC: no slow leak under the peak (RSS trend after warm-up x {steps - warmup} steps < "
              f"{TOLERANCE_MB:g} MB)", dgc["trend_growth_mb"] < TOLERANCE_MB,
              f"{dgc['trend_growth_mb']:+.2f} MB ({dgc['trend_mb_per_1000']:+.2f} MB / 1000 steps)"),
        Check(f"DGC: the live Python heap does not grow after warm-up (< {PY_TOLERANCE_KB:g} KB over "
              f"{plan.trace_steps - warmup} steps, tracemalloc after gc.collect())",
              dgc["live_growth_kb"] < PY_TOLERANCE_KB,
              f"{dgc['live_growth_kb']:+.1f} KB; baseline {base['live_growth_kb']:+.1f} KB"),
        Check(f"DGC's peak growth after warm-up is within {TOLERANCE_MB / 2:g} MB of the dense baseline's",
              dgc["growth_mb"] <= base["growth_mb"] + TOLERANCE_MB / 2,
              f"{dgc['growth_mb']:+.2f} vs {base['growth_mb']:+.2f} MB"),
        Check("DGC's sparsity warm-up ended and training converged (final density, last epoch's loss < first's)",
              all(r["density"] == DENSITY and r["loss_last"] < r["loss_first"] for r in dgc_runs),
              f"density {dgc_runs[0]['density']:g}"),
    ]


def _notes(plan: _Plan, base: dict) -> list[str]:
    """The report's notes: what peak and growth mean, the baseline's own growth, the heap samples, the passes."""
    return [
        "Peak RSS is the kernel's high-water mark (VmHWM), so a peak between two samples counts too. Growth is "
        f"the peak at step {plan.steps} minus the peak at step {plan.warmup} (the end of DGC's sparsity warm-up).",
        f"The dense baseline, which keeps no DGC state, grows by {base['growth_mb']:+.2f} MB over the same steps "
        f"(RSS trend {base['trend_mb_per_1000']:+.2f} MB / 1000 steps): growth of that size is the process's "
        "(glibc's malloc, torch's CPU allocator, gloo, autograd), not DGC's.",
        "The Python heap between two collections also holds garbage the cyclic collector has not reached yet; "
        f"the live heap is sampled every {plan.collect_every} steps after gc.collect(). Tensor storage is not "
        "allocated through Python's allocator and shows in the RSS only.",
        "Each pass of each method runs in fresh processes: the RSS pass, then the tracemalloc pass.",
    ]


def _markdown(plan: _Plan, runs: dict[str, list[dict]], figures: dict[str, list[dict]], dgc: dict,
              base: dict) -> str:
    """The report: the per-rank table, DGC against the baseline (worst rank) and the notes."""
    return "\n".join(["## Per rank", "", _rank_table(runs, figures), "", "## DGC against the baseline (worst rank)",
                      "", _comparison_table(dgc, base), "", "## Notes", "", *[f"- {n}" for n in _notes(plan, base)],
                      ""])


def _setup(plan: _Plan) -> list[str]:
    """The report's setup lines: the ranks, the model and data, the steps, how memory was read."""
    return [f"{plan.world} gloo ranks (gradcomp.launch.spawn), 1 torch thread each; DistributedDataParallel with "
            "gradcomp.register_ddp_hook; the digits MLP (64-256-128-10) on sklearn's digits, global batch "
            f"{GLOBAL_BATCH}",
            f"{plan.steps} steps per method, DGC's sparsity warm-up over the first {plan.warmup} "
            "(DGC(steps_per_epoch=...)); memory read from /proc/self/status after every step; tracemalloc pass of "
            f"{plan.trace_steps} steps"]


def run(ctx: Context) -> Result:
    """``gradcomp bench memory``: DGC's and a dense baseline's memory over a long run through the DDP hook.

    Each method trains on 2 gloo ranks twice, in fresh processes: the RSS pass, then the tracemalloc pass.  The
    plot of every rank's samples is written to the output folder.

    Args:
        ctx: the run's variant (``full``: 2,000 steps, warm-up over the first 500, a traced pass of 2,000 steps
            with the live heap sampled every 50; quick: 120 steps, warm-up 30, 60 traced steps, every 15),
            seed and output folder.

    Returns:
        The report: per rank the peak and resident memory (MB) at the end of warm-up and of the run, their
        growth and trend, the live Python heap's growth (KB), ms per step and the loss; DGC against the
        baseline (worst rank); the checks against :data:`TOLERANCE_MB` and :data:`PY_TOLERANCE_KB`; and as data
        every rank's samples.
    """
    plan = _plan(ctx.full)
    runs = _measure_methods(ctx, plan)
    figures = {m: [_summary(r, plan.warmup, plan.collect_every) for r in ranks] for m, ranks in runs.items()}
    worst = {m: {key: max(f[key] for f in ranks) for key in ranks[0]} for m, ranks in figures.items()}
    dgc, base = worst["dgc"], worst["none"]
    checks = _checks(plan, runs["dgc"], dgc, base)
    plot_path = ctx.path(".png")
    _plot(runs, plan.warmup, plan.collect_every, plot_path)
    markdown = _markdown(plan, runs, figures, dgc, base)
    title = (f"Bounded memory: {plan.steps} steps of DGC through the DDP hook, peak RSS after warm-up vs a dense "
             "baseline")
    data = {"steps": plan.steps, "warmup": plan.warmup, "trace_steps": plan.trace_steps,
            "collect_every": plan.collect_every, "tolerance_mb": TOLERANCE_MB, "py_tolerance_kb": PY_TOLERANCE_KB,
            "figures": figures, "worst": worst, "runs": runs}
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks,
                  plots=[plot_path], setup=_setup(plan), data=data)


register(Study("memory", "peak RSS and Python heap over a long DGC run through the DDP hook (2 gloo ranks) vs a "
                         "dense baseline: memory stops growing after warm-up", run, order=6, kind="bench", threads=1))
