"""``gradcomp bench compress``: the cost of DGC's step against one SGD step on the same elements.

On ResNet-50's gradient (25,557,032 elements), both as one flat tensor and as
its 161 real tensors, in steady state (buffers allocated once, warm-up calls
first), timed round-robin so a noisy neighbour slows every candidate alike:

* ``sgd``    one ``torch.optim.SGD(momentum=0.9, weight_decay=1e-4)`` step — the baseline (1.0x);
* ``topk``   exact ``torch.topk`` selection of k = density * numel entries per tensor;
* ``dgc``    DGC's whole step per worker: momentum correction (u, v), sampled top-k
             selection, encoding on the compact wire, removal of what was sent and
             momentum factor masking (``gradcomp.DGC(sparsify_all=True)``, no
             communication);
* ``dgc-plain`` the same on the paper's fp32 + int32 wire;

and ``decompress + aggregate`` of N workers' payloads (N = 4, 8, 32), as a
rank does after the all-gather.  Each is printed as a ratio to the SGD step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from gradcomp.compressors.base import Payload, num_selected
from gradcomp.compressors.sparse import DGCSelect
from gradcomp.method import DGC

from ..reproduce.common import Check, Context, Result, Study, markdown_table, register
from ..reproduce.ratio import model_shapes

DENSITY = 0.001
GOAL = 0.6  # issue 5: the whole DGC step <= 0.6x an SGD step, both layouts
RESNET50_NUMEL = 25_557_032


def measure(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each candidate, timed round-robin (interleaved).

    Every candidate is first called ``warmup`` times, untimed; then each of ``repeats`` rounds times one call of
    every candidate in turn (``time.perf_counter``), so a noisy neighbour slows every candidate alike.

    Args:
        candidates: name -> a call with no arguments (its result is ignored).
        repeats: the timed rounds: calls timed per candidate.
        warmup: untimed calls of each candidate first.

    Returns:
        Name -> the seconds of each of its ``repeats`` timed calls, in the order taken.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def _layout(flat: bool, numel: int | None) -> list[tuple[str, tuple[int, ...]]]:
    shapes = model_shapes("resnet50")
    total = numel or sum(torch.Size(s).numel() for _, s in shapes)
    if flat or numel is not None:
        return [("flat", (total,))]
    return shapes


def _dgc_step(method: DGC, grads: dict[str, torch.Tensor]) -> Callable[[], dict[str, Payload]]:
    """One worker's DGC step without communication: compensate, select and encode, keep the rest."""
    return lambda: method.sparsify(grads)


def run_layout(flat: bool, repeats: int, seed: int, numel: int | None = None,
               workers: tuple[int, ...] = (4, 8, 32)) -> dict:
    """Time one SGD step, exact top-k, DGC's step on both wires and the decoding of N payloads, on one layout.

    The candidates, timed round-robin by :func:`measure` after 2 warm-up calls each: ``"sgd"`` (one
    ``torch.optim.SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4)`` step), ``"topk"`` (``torch.topk`` of k =
    ``ceil(density * numel)`` entries per tensor), ``"dgc"`` and ``"dgc-plain"`` (one worker's whole DGC step at
    density :data:`DENSITY`, every tensor sparsified, on the compact and the plain wire, no communication) and
    ``"decompress+aggregate, N workers"`` for each N of ``workers`` (the compact payloads of one step, N times,
    decoded and summed).

    Args:
        flat: one flat tensor holding every element (True), or ResNet-50's 161 parameter shapes (False).
        repeats: timed calls of each candidate.
        seed: seeds the parameters and gradients (standard normal).
        numel: the elements of one flat tensor instead of ResNet-50's 25,557,032 (given: the layout is flat
            whatever ``flat`` says).
        workers: the numbers of payloads decoded and summed, one candidate each.

    Returns:
        ``{"tensors": number of tensors, "numel": elements in all, "seconds": name -> median seconds per call,
        "best": name -> the fastest call's seconds}``.
    """
    shapes = _layout(flat, numel)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for _, s in shapes]
    grads: dict[str, torch.Tensor] = {}
    for (name, _), p in zip(shapes, params):
        p.grad = grads[name] = torch.randn(p.shape, generator=gen)
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    ks = {name: num_selected(DENSITY, g.numel()) for name, g in grads.items()}
    candidates: dict[str, Callable[[], object]] = {"sgd": sgd.step}
    candidates["topk"] = lambda: [torch.topk(g.view(-1).abs(), ks[n], sorted=False) for n, g in grads.items()]
    compact = DGC(density=DENSITY, warmup_epochs=0, sparsify_all=True)
    plain = DGC(density=DENSITY, warmup_epochs=0, sparsify_all=True, wire="plain")
    for m in (compact, plain):
        assert isinstance(m.compressor, DGCSelect)  # DGC's
        m.compressor.density = DENSITY
    dgc_step = candidates["dgc"] = _dgc_step(compact, grads)
    candidates["dgc-plain"] = _dgc_step(plain, grads)
    with torch.no_grad():
        payloads = dgc_step()
        selector = compact.compressor

        def aggregate(n: int) -> Callable[[], object]:
            return lambda: [selector.decompress([payloads[name]] * n, like=g) for name, g in grads.items()]

        for n in workers:  # n workers' payloads (the same one n times: decoding costs the same)
            candidates[f"decompress+aggregate, {n} workers"] = aggregate(n)
        samples = measure(candidates, repeats)
    return {"tensors": len(shapes), "numel": sum(g.numel() for g in grads.values()),
            "seconds": {name: statistics.median(s) for name, s in samples.items()},
            "best": {name: min(s) for name, s in samples.items()}}


def run(ctx: Context) -> Result:
    """``gradcomp bench compress``: DGC's step and its decoding against one SGD step on the same elements.

    Args:
        ctx: the run's variant (``full``: ResNet-50's 25,557,032 elements as one flat tensor and as its 161
            tensors, 15 repeats, the speed goal checked; quick: one flat tensor of 2,000,000 elements, 3 repeats)
            and seed.

    Returns:
        The report: median and best milliseconds per call of each step and their ratio to the SGD step's, the
        checks (full: DGC's whole step at most :data:`GOAL` x an SGD step; quick: every step ran), and as data
        each layout's timings.
    """
    numel = None if ctx.full else 2_000_000
    repeats = 15 if ctx.full else 3
    layouts = {"one flat tensor": run_layout(True, repeats, ctx.seed, numel)}
    if ctx.full:
        layouts["ResNet-50's 161 tensors"] = run_layout(False, repeats, ctx.seed)
    rows, checks = [], []
    for label, res in layouts.items():
        base = res["seconds"]["sgd"]
        for name, seconds in res["seconds"].items():
            rows.append([label if name == "sgd" else "", name, f"{1e3 * seconds:.1f}", f"{1e3 * res['best'][name]:.1f}",
                         f"{seconds / base:.2f}x"])
        ratio = res["seconds"]["dgc"] / base
        if ctx.full:  # a speed goal: checked on the full run only, never in CI
            checks.append(Check(f"{label}: the whole DGC step at most {GOAL}x an SGD step", ratio <= GOAL,
                                f"{ratio:.2f}x"))
        else:
            checks.append(Check(f"{label}: every step ran and took time", all(t > 0 for t in res["seconds"].values()),
                                f"{len(res['seconds'])} timed"))
    table = markdown_table(["layout", "step", "median ms", "best ms", "ratio to the SGD step (medians)"], rows,
                           align="llrrr")
    elements = next(iter(layouts.values()))["numel"]
    title = "Compression cost: DGC's step against one SGD step on ResNet-50's gradient"
    setup = [f"{elements:,} elements, density {DENSITY}; torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads; median of {repeats} round-robin repeats after 2 warm-up calls",
             "sgd: torch.optim.SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4).step() on the same elements"]
    return Result(title=title, console=title + "\n\n" + table, markdown=table + "\n", checks=checks, setup=setup,
                  data={"density": DENSITY, "layouts": layouts})


register(Study("compress", "DGC's whole step and its decoding vs one SGD step on ResNet-50's gradient, flat and as "
                           "161 tensors", run, order=2, kind="bench"))
