"""A one-minute look at DGC: 4 simulated workers train an MLP on scikit-learn's
bundled digits, dense and with DGC, and compare accuracy and bytes sent."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .method import DGC
from .simulator import Simulator, split_batch


@dataclass
class DemoResult:
    method: str
    accuracy: float
    bytes_per_worker: int
    ratio: float
    seconds: float


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return x[:split], y[:split], x[split:], y[split:]


def train_digits(method_name: str, *, workers: int = 4, epochs: int = 20, batch_per_worker: int = 16,
                 density: float = 0.001, lr: float = 0.1, seed: int = 0, progress: bool = True) -> DemoResult:
    x_train, y_train, x_test, y_test = _digits(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    batch = workers * batch_per_worker
    steps_per_epoch = len(y_train) // batch
    if method_name == "dgc":
        method, momentum = DGC(density=density, momentum=0.9, steps_per_epoch=steps_per_epoch,
                               warmup_epochs=max(1, epochs // 5), min_numel=1000), 0.0
    else:
        method, momentum = method_name, 0.9
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    sim = Simulator(model, method, workers, optimizer=optimizer)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{method_name:>5}", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed + epoch))
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            loss = sim.step(split_batch((x_train[idx], y_train[idx]), workers),
                            lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        bar.set_postfix(loss=f"{loss.item():.3f}", MB=f"{sim.bytes_sent[0] / 1e6:.2f}")
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return DemoResult(method_name, accuracy, sim.bytes_sent[0], sim.compression_ratio, time.perf_counter() - start)


def run(epochs: int = 20, workers: int = 4, density: float = 0.001, progress: bool = True) -> str:
    if not (0 < density <= 1 and math.isfinite(density)):
        raise ValueError(f"density must be in (0, 1], got {density}")
    results = [train_digits(name, workers=workers, epochs=epochs, density=density, progress=progress)
               for name in ("none", "dgc")]
    lines = [f"digits (scikit-learn), MLP, {workers} simulated workers, {epochs} epochs; DGC density {density} "
             "after warm-up", "",
             "| method | test accuracy | MB sent per worker | compression ratio | seconds |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.method} | {r.accuracy:.4f} | {r.bytes_per_worker / 1e6:.3f} | {r.ratio:.1f}x | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)
