"""Cost of DGC's compression step against one SGD step on the same elements.

Times, in steady state (buffers allocated once, warm-up iterations first):

* ``sgd``       one ``torch.optim.SGD(momentum=0.9)`` step — the baseline (1.0x);
* ``topk``      exact ``torch.topk`` selection of k = density * numel entries;
* ``dgc``       DGC's whole compression step: momentum correction (u, v),
                sampled top-k selection, removal of what was sent and
                momentum factor masking.

and prints each as a ratio to ``sgd``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..compressors.base import num_selected
from ..compressors.sparse import DGCSelect
from ..memory import DGCMemory

RESNET50_NUMEL = 25_557_032


@dataclass
class Timing:
    name: str
    samples: list[float]  # seconds per call

    @property
    def seconds(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    def ratio(self, baseline: Timing) -> float:
        return self.seconds / baseline.seconds


def measure(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> list[Timing]:
    """Time the candidates round-robin (interleaved), so a noisy neighbour slows all of them alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return [Timing(name, s) for name, s in samples.items()]


def run(numel: int = RESNET50_NUMEL, density: float = 0.001, repeats: int = 15, seed: int = 0) -> list[Timing]:
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(numel, generator=gen)
    param = torch.nn.Parameter(torch.randn(numel, generator=gen))
    param.grad = grad.clone()
    sgd = torch.optim.SGD([param], lr=1e-3, momentum=0.9)
    k = num_selected(density, numel)

    memory = DGCMemory(momentum=0.9)
    selector = DGCSelect(density=density)
    shaped = grad.view(1, -1)

    def dgc_step() -> None:
        acc = memory.compensate("g", shaped)
        sent = selector.compress(acc)
        memory.update("g", acc, selector, sent)

    def topk() -> None:
        torch.topk(grad.abs(), k, sorted=False)

    with torch.no_grad():
        return measure({"sgd": sgd.step, "topk": topk, "dgc": dgc_step}, repeats)


def report(timings: list[Timing], numel: int, density: float) -> str:
    base = timings[0]
    by = {t.name: t for t in timings}
    lines = [
        f"DGC compression step on {numel:,} elements (density {density}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "",
        "| step | median ms | best ms | ratio to SGD step (medians) |",
        "|---|---:|---:|---:|",
    ]
    for t in timings:
        lines.append(f"| {t.name} | {t.seconds * 1e3:.1f} | {t.best * 1e3:.1f} | {t.ratio(base):.2f}x |")
    lines += ["", f"dgc step is {by['topk'].seconds / by['dgc'].seconds:.1f}x faster than torch.topk selection"]
    return "\n".join(lines)


def main(numel: int = RESNET50_NUMEL, density: float = 0.001, repeats: int = 15) -> str:
    if numel < 1 or not math.isfinite(density) or not 0 < density <= 1:
        raise ValueError(f"need numel >= 1 and density in (0, 1], got {numel}, {density}")
    return report(run(numel, density, repeats), numel, density)


if __name__ == "__main__":
    print(main())
